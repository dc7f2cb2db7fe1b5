use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validation::{
    identifier, non_empty, text, timestamp, FieldError, FromJsonObject, Object,
};
use crate::{ConfirmationType, MAX_TEXT};

/// Stages of a delivery, as recorded by tracking events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum DeliveryStage {
    Created,
    Rescheduled,
    HeadedToPickup,
    HeadedToDropoff,
    Completed,
    Cancelled,
}

impl DeliveryStage {
    pub const ALL: [DeliveryStage; 6] = [
        DeliveryStage::Created,
        DeliveryStage::Rescheduled,
        DeliveryStage::HeadedToPickup,
        DeliveryStage::HeadedToDropoff,
        DeliveryStage::Completed,
        DeliveryStage::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStage::Created => "Created",
            DeliveryStage::Rescheduled => "Rescheduled",
            DeliveryStage::HeadedToPickup => "HeadedToPickup",
            DeliveryStage::HeadedToDropoff => "HeadedToDropoff",
            DeliveryStage::Completed => "Completed",
            DeliveryStage::Cancelled => "Cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// No further events are accepted after these.
    pub fn is_final(self) -> bool {
        matches!(self, DeliveryStage::Completed | DeliveryStage::Cancelled)
    }
}

/// `PUT /api/deliveries/{id}` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryUpsert {
    #[schema(schema_with = crate::schema::identifier)]
    pub owner_id: String,
    #[schema(schema_with = crate::schema::text)]
    pub pickup_location: String,
    #[schema(schema_with = crate::schema::text)]
    pub drop_off_location: String,
    pub pickup_time: DateTime<Utc>,
    #[serde(default)]
    #[schema(schema_with = crate::schema::free_text)]
    pub deadline: String,
    #[serde(default)]
    #[schema(schema_with = crate::schema::optional_flag)]
    pub expedited: bool,
    pub confirmation_required: ConfirmationType,
    #[schema(schema_with = crate::schema::identifier)]
    pub package_id: String,
    #[schema(schema_with = crate::schema::identifier)]
    pub drone_id: String,
}

impl FromJsonObject for DeliveryUpsert {
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
        let package_id = o.required_with("packageId", identifier);
        let drone_id = o.required_with("droneId", identifier);
        o.finish(|| {
            Some(DeliveryUpsert {
                owner_id: owner_id?,
                pickup_location: pickup_location?,
                drop_off_location: drop_off_location?,
                pickup_time: pickup_time?,
                deadline,
                expedited,
                confirmation_required: confirmation_required?,
                package_id: package_id?,
                drone_id: drone_id?,
            })
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub id: String,
    pub owner_id: String,
    pub pickup_location: String,
    pub drop_off_location: String,
    pub pickup_time: DateTime<Utc>,
    pub deadline: String,
    pub expedited: bool,
    pub confirmation_required: ConfirmationType,
    pub package_id: String,
    pub drone_id: String,
    /// The stage of the latest tracking event.
    pub stage: DeliveryStage,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `PATCH /api/deliveries/{id}` body: a reschedule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_timestamp)]
    pub pickup_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_text)]
    pub deadline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_text)]
    pub pickup_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_text)]
    pub drop_off_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::optional_identifier)]
    pub drone_id: Option<String>,
}

impl FromJsonObject for DeliveryPatch {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let p = DeliveryPatch {
            pickup_time: o.optional_with("pickupTime", timestamp),
            deadline: o.optional_with("deadline", non_empty(MAX_TEXT)),
            pickup_location: o.optional_with("pickupLocation", non_empty(MAX_TEXT)),
            drop_off_location: o.optional_with("dropOffLocation", non_empty(MAX_TEXT)),
            drone_id: o.optional_with("droneId", identifier),
        };
        o.ensure(
            !(p == DeliveryPatch::default() && o.is_valid()),
            "body",
            "must change at least one of pickupTime, deadline, pickupLocation, dropOffLocation, droneId",
        );
        o.finish(|| Some(p))
    }
}

/// One stored tracking event; a delivery's status is derived from these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrackingEvent {
    pub delivery_id: String,
    /// Position in this delivery's history, from 1.
    pub sequence: i64,
    pub stage: DeliveryStage,
    pub location: Option<String>,
    pub detail: Option<String>,
    pub at: DateTime<Utc>,
}

/// `GET /api/deliveries/{id}/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryStatus {
    pub delivery_id: String,
    pub stage: DeliveryStage,
    pub last_location: Option<String>,
    pub last_event_at: DateTime<Utc>,
    pub events: u64,
}

/// `POST /api/deliveries/{id}/events`: the drone reports progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrackingUpdate {
    /// `HeadedToPickup` or `HeadedToDropoff`.
    #[schema(schema_with = crate::schema::reported_stage)]
    pub stage: DeliveryStage,
    #[serde(default)]
    #[schema(schema_with = crate::schema::optional_text)]
    pub location: Option<String>,
}

impl FromJsonObject for TrackingUpdate {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let stage = o.required_with(
            "stage",
            |v| match serde_json::from_value::<DeliveryStage>(v).map_err(|e| e.to_string())? {
                s @ (DeliveryStage::HeadedToPickup | DeliveryStage::HeadedToDropoff) => Ok(s),
                other => Err(format!(
                    "must be HeadedToPickup or HeadedToDropoff ({} is set by its own endpoint)",
                    other.as_str()
                )),
            },
        );
        let location = o.optional_with("location", non_empty(MAX_TEXT));
        o.finish(|| {
            Some(TrackingUpdate {
                stage: stage?,
                location,
            })
        })
    }
}

/// `POST /api/deliveries/{id}/confirmations`: the hand-over happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Confirmation {
    pub confirmation_type: ConfirmationType,
    /// Reference to the proof (fingerprint hash, picture id, ...).
    #[serde(default)]
    #[schema(schema_with = crate::schema::optional_blob)]
    pub confirmation_blob: Option<String>,
    #[serde(default)]
    #[schema(schema_with = crate::schema::optional_text)]
    pub location: Option<String>,
}

impl FromJsonObject for Confirmation {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let confirmation_type = o.required::<ConfirmationType>("confirmationType");
        let confirmation_blob =
            o.optional_with("confirmationBlob", non_empty(crate::CONFIRMATION_BLOB_MAX));
        let location = o.optional_with("location", non_empty(MAX_TEXT));
        o.finish(|| {
            Some(Confirmation {
                confirmation_type: confirmation_type?,
                confirmation_blob,
                location,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round_trip;
    use serde_json::json;

    #[test]
    fn delivery_types_round_trip() {
        let now = chrono::Utc::now();
        round_trip(&Delivery {
            id: "d".into(),
            owner_id: "o".into(),
            pickup_location: "a".into(),
            drop_off_location: "b".into(),
            pickup_time: now,
            deadline: "LinkedIn".into(),
            expedited: false,
            confirmation_required: ConfirmationType::Picture,
            package_id: "p".into(),
            drone_id: "drone-001".into(),
            stage: DeliveryStage::HeadedToDropoff,
            created_at: now,
            updated_at: now,
        });
        round_trip(&TrackingEvent {
            delivery_id: "d".into(),
            sequence: 2,
            stage: DeliveryStage::Rescheduled,
            location: None,
            detail: Some("pickupTime".into()),
            at: now,
        });
        for s in DeliveryStage::ALL {
            assert_eq!(DeliveryStage::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn tracking_update_rejects_final_stages() {
        let errs = TrackingUpdate::from_json_value(json!({"stage": "Completed"}))
            .err()
            .unwrap_or_default();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "stage");
    }
}
