//! The client-facing booking types (Ingestion), compatible with Fabrikam drone-delivery clients.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validation::{
    identifier, non_empty, non_negative_number, text, timestamp, FieldError, FromJsonObject, Object,
};
use crate::{ConfirmationType, PackageSize, MAX_ID, MAX_TEXT};

/// `packageInfo` of a booking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackageInfo {
    #[schema(schema_with = crate::schema::external_id)]
    pub package_id: String,
    pub size: PackageSize,
    /// Kilograms; clients may send a numeric string.
    #[schema(schema_with = crate::schema::weight)]
    pub weight: f64,
    #[serde(default)]
    #[schema(schema_with = crate::schema::optional_text)]
    pub tag: Option<String>,
}

impl FromJsonObject for PackageInfo {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let package_id = o.required_with("packageId", non_empty(MAX_ID));
        let size = o.required::<PackageSize>("size");
        let weight = o.required_with("weight", non_negative_number);
        let tag = o.optional_with("tag", non_empty(MAX_TEXT));
        o.finish(|| {
            Some(PackageInfo {
                package_id: package_id?,
                size: size?,
                weight: weight?,
                tag,
            })
        })
    }
}

/// `POST /api/deliveryrequests` body. Unknown fields (such as a client-sent `deliveryId`) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRequest {
    #[schema(schema_with = crate::schema::identifier)]
    pub owner_id: String,
    #[schema(schema_with = crate::schema::text)]
    pub pickup_location: String,
    #[schema(schema_with = crate::schema::text)]
    pub drop_off_location: String,
    /// Not in the past (beyond a small clock-skew tolerance): else `422`.
    pub pickup_time: DateTime<Utc>,
    #[serde(default)]
    #[schema(schema_with = crate::schema::free_text)]
    pub deadline: String,
    #[serde(default)]
    #[schema(schema_with = crate::schema::optional_flag)]
    pub expedited: bool,
    pub confirmation_required: ConfirmationType,
    pub package_info: PackageInfo,
}

impl FromJsonObject for DeliveryRequest {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let owner_id = o.required_with("ownerId", identifier);
        let pickup_location = o.required_with("pickupLocation", non_empty(MAX_TEXT));
        let drop_off_location = o.required_with("dropOffLocation", non_empty(MAX_TEXT));
        let pickup_time = o.required_with("pickupTime", timestamp);
        let deadline = o
            .optional_with("deadline", text(MAX_TEXT))
            .unwrap_or_default();
        let expedited = o.optional::<bool>("expedited").unwrap_or(false);
        let confirmation_required = o.required::<ConfirmationType>("confirmationRequired");
        let package_info = o.nested::<PackageInfo>("packageInfo");
        o.finish(|| {
            Some(DeliveryRequest {
                owner_id: owner_id?,
                pickup_location: pickup_location?,
                drop_off_location: drop_off_location?,
                pickup_time: pickup_time?,
                deadline,
                expedited,
                confirmation_required: confirmation_required?,
                package_info: package_info?,
            })
        })
    }
}

/// `202 Accepted` body: the request echoed with the server-assigned id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryAccepted {
    pub delivery_id: uuid::Uuid,
    #[serde(flatten)]
    pub request: DeliveryRequest,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round_trip;
    use serde_json::json;

    fn fabrikam_body() -> serde_json::Value {
        json!({
            "deliveryId": "client-sent-and-ignored",
            "ownerId": "owner-1",
            "pickupLocation": "1 Main St",
            "dropOffLocation": "2 Side St",
            "pickupTime": "2030-01-01T10:00:00Z",
            "deadline": "LinkedIn",
            "expedited": true,
            "confirmationRequired": "FingerPrint",
            "packageInfo": {"packageId": "pkg-7", "size": "Small", "weight": "2.5", "tag": "fragile"}
        })
    }

    #[test]
    fn fabrikam_client_body_is_accepted() {
        let r = DeliveryRequest::from_json_value(fabrikam_body());
        let r = r.ok();
        assert_eq!(r.as_ref().map(|r| r.package_info.weight), Some(2.5));
        assert_eq!(
            r.as_ref().map(|r| r.confirmation_required),
            Some(ConfirmationType::FingerPrint)
        );
        if let Some(r) = r {
            let accepted = DeliveryAccepted {
                delivery_id: uuid::Uuid::new_v4(),
                request: r,
            };
            round_trip(&accepted);
            let v = serde_json::to_value(&accepted).unwrap_or_default();
            assert_eq!(v["packageInfo"]["packageId"], "pkg-7");
            assert!(v["deliveryId"].is_string());
        }
    }

    #[test]
    fn nested_errors_carry_their_path() {
        let mut body = fabrikam_body();
        body["packageInfo"]["size"] = json!("Huge");
        body["confirmationRequired"] = json!("Retina");
        let errs = DeliveryRequest::from_json_value(body)
            .err()
            .unwrap_or_default();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["confirmationRequired", "packageInfo.size"]);
    }
}

/// `PATCH /api/deliveryrequests/{id}` body: reschedule (any subset).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RescheduleRequest {
    /// Not in the past (beyond a small clock-skew tolerance): else `422`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_timestamp)]
    pub pickup_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_text)]
    pub pickup_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_text)]
    pub drop_off_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_text)]
    pub deadline: Option<String>,
}

impl FromJsonObject for RescheduleRequest {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let r = RescheduleRequest {
            pickup_time: o.optional_with("pickupTime", timestamp),
            pickup_location: o.optional_with("pickupLocation", non_empty(MAX_TEXT)),
            drop_off_location: o.optional_with("dropOffLocation", non_empty(MAX_TEXT)),
            deadline: o.optional_with("deadline", non_empty(MAX_TEXT)),
        };
        o.ensure(
            !(r == RescheduleRequest::default() && o.is_valid()),
            "body",
            "must change at least one of pickupTime, pickupLocation, dropOffLocation, deadline",
        );
        o.finish(|| Some(r))
    }
}
