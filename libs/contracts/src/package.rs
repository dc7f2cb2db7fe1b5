use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validation::{
    identifier, non_empty, non_negative_number, FieldError, FromJsonObject, Object,
};
use crate::{PackageSize, MAX_ID, MAX_TEXT};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PackageStatus {
    Registered,
    Cancelled,
}

impl PackageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PackageStatus::Registered => "registered",
            PackageStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "registered" => Some(PackageStatus::Registered),
            "cancelled" => Some(PackageStatus::Cancelled),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Package {
    pub id: String,
    pub owner_id: String,
    /// The client's own package id (data, never a key).
    pub external_id: String,
    pub size: PackageSize,
    /// Kilograms.
    pub weight: f64,
    pub tag: Option<String>,
    pub status: PackageStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `PUT /api/packages/{id}` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackageUpsert {
    #[schema(schema_with = crate::schema::identifier)]
    pub owner_id: String,
    #[schema(schema_with = crate::schema::external_id)]
    pub external_id: String,
    pub size: PackageSize,
    #[schema(schema_with = crate::schema::weight)]
    pub weight: f64,
    #[serde(default)]
    #[schema(schema_with = crate::schema::optional_text)]
    pub tag: Option<String>,
}

impl FromJsonObject for PackageUpsert {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let owner_id = o.required_with("ownerId", identifier);
        let external_id = o.required_with("externalId", non_empty(MAX_ID));
        let size = o.required::<PackageSize>("size");
        let weight = o.required_with("weight", non_negative_number);
        let tag = o.optional_with("tag", non_empty(MAX_TEXT));
        o.finish(|| {
            Some(PackageUpsert {
                owner_id: owner_id?,
                external_id: external_id?,
                size: size?,
                weight: weight?,
                tag,
            })
        })
    }
}

/// `PATCH /api/packages/{id}` body: any subset of the mutable fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackagePatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<PackageSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_weight)]
    pub weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_text)]
    pub tag: Option<String>,
}

impl FromJsonObject for PackagePatch {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let size = o.optional::<PackageSize>("size");
        let weight = o.optional_with("weight", non_negative_number);
        let tag = o.optional_with("tag", non_empty(MAX_TEXT));
        let empty = size.is_none() && weight.is_none() && tag.is_none();
        o.ensure(
            !(empty && o.is_valid()),
            "body",
            "must change at least one of size, weight, tag",
        );
        o.finish(|| Some(PackagePatch { size, weight, tag }))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SizeCounts {
    pub small: u64,
    pub medium: u64,
    pub large: u64,
}

/// `GET /api/packages/summary/{ownerId}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackageSummary {
    pub owner_id: String,
    pub total: u64,
    pub registered: u64,
    pub cancelled: u64,
    /// Total weight of the registered (not cancelled) packages, in kilograms.
    pub registered_weight: f64,
    /// Registered packages by size.
    pub by_size: SizeCounts,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round_trip;
    use serde_json::json;

    #[test]
    fn package_types_round_trip() {
        let now = chrono::Utc::now();
        round_trip(&Package {
            id: "p".into(),
            owner_id: "o".into(),
            external_id: "e".into(),
            size: PackageSize::Large,
            weight: 3.5,
            tag: Some("fragile".into()),
            status: PackageStatus::Registered,
            created_at: now,
            updated_at: now,
        });
        round_trip(&PackageSummary {
            owner_id: "o".into(),
            total: 3,
            registered: 2,
            cancelled: 1,
            registered_weight: 4.0,
            by_size: SizeCounts {
                small: 1,
                medium: 1,
                large: 0,
            },
        });
        round_trip(&PackagePatch {
            size: Some(PackageSize::Small),
            ..Default::default()
        });
    }

    #[test]
    fn upsert_names_wrong_enum_and_missing_fields() {
        let errs = PackageUpsert::from_json_value(json!({"size": "Huge", "weight": -1}))
            .err()
            .unwrap_or_default();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["ownerId", "externalId", "size", "weight"]);
        assert!(errs[2].reason.contains("unknown variant"));
    }

    #[test]
    fn empty_patch_is_rejected() {
        assert!(PackagePatch::from_json_value(json!({})).is_err());
        assert!(PackagePatch::from_json_value(json!({"weight": "1.5"})).is_ok());
    }
}
