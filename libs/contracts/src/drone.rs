use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validation::{identifier, non_empty, timestamp, FieldError, FromJsonObject, Object};
use crate::{PackageSize, MAX_TEXT};

/// A half-open time interval `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeWindow {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl TimeWindow {
    pub fn overlaps(&self, other: &TimeWindow) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// `PUT /api/dronedeliveries/{deliveryId}` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DroneReservationRequest {
    pub pickup_time: DateTime<Utc>,
    #[schema(schema_with = crate::schema::text)]
    pub pickup_location: String,
    #[schema(schema_with = crate::schema::text)]
    pub drop_off_location: String,
    #[schema(schema_with = crate::schema::identifier)]
    pub package_id: String,
    pub size: PackageSize,
    #[serde(default)]
    #[schema(schema_with = crate::schema::optional_flag)]
    pub expedited: bool,
    /// The booking's owner, for utilization reports.
    #[serde(default)]
    #[schema(schema_with = crate::schema::optional_identifier)]
    pub owner_id: Option<String>,
}

impl FromJsonObject for DroneReservationRequest {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let pickup_time = o.required_with("pickupTime", timestamp);
        let pickup_location = o.required_with("pickupLocation", non_empty(MAX_TEXT));
        let drop_off_location = o.required_with("dropOffLocation", non_empty(MAX_TEXT));
        let package_id = o.required_with("packageId", identifier);
        let size = o.required::<PackageSize>("size");
        let expedited = o.optional::<bool>("expedited").unwrap_or(false);
        let owner_id = o.optional_with("ownerId", identifier);
        o.finish(|| {
            Some(DroneReservationRequest {
                pickup_time: pickup_time?,
                pickup_location: pickup_location?,
                drop_off_location: drop_off_location?,
                package_id: package_id?,
                size: size?,
                expedited,
                owner_id,
            })
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReservationStatus {
    Active,
    Released,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Active => "active",
            ReservationStatus::Released => "released",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(ReservationStatus::Active),
            "released" => Some(ReservationStatus::Released),
            _ => None,
        }
    }
}

/// A drone held for one delivery's time window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DroneReservation {
    pub delivery_id: String,
    pub drone_id: String,
    pub window: TimeWindow,
    pub status: ReservationStatus,
    pub package_id: String,
    pub size: PackageSize,
    pub owner_id: Option<String>,
    pub pickup_location: String,
    pub drop_off_location: String,
    pub expedited: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One drone of the fleet and what it is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Drone {
    pub id: String,
    /// The largest package size it can carry.
    pub max_package_size: PackageSize,
    /// The active reservation covering the current instant, if any.
    pub current_reservation: Option<DroneReservation>,
    /// Active reservations that have not ended yet (current one included).
    pub upcoming_reservations: u64,
}

/// `GET /api/drones`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fleet {
    pub size: u64,
    /// Drones with a reservation covering the current instant.
    pub busy_now: u64,
    pub drones: Vec<Drone>,
}

/// `GET /api/utilization?ownerId=&year=&month=`: what an owner's bookings held of the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Utilization {
    pub owner_id: String,
    pub year: i32,
    pub month: u32,
    /// Active reservations whose window starts in the month.
    pub reservations: u64,
    /// Sum of those windows, in minutes.
    pub reserved_minutes: u64,
    /// Distinct drones used.
    pub drones_used: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round_trip;
    use chrono::{Duration, Utc};

    #[test]
    fn drone_types_round_trip() {
        let now = Utc::now();
        let window = TimeWindow {
            start: now,
            end: now + Duration::minutes(30),
        };
        let r = DroneReservation {
            delivery_id: "d".into(),
            drone_id: "drone-001".into(),
            window,
            status: ReservationStatus::Active,
            package_id: "p".into(),
            size: PackageSize::Small,
            owner_id: None,
            pickup_location: "a".into(),
            drop_off_location: "b".into(),
            expedited: true,
            created_at: now,
            updated_at: now,
        };
        round_trip(&r);
        round_trip(&Fleet {
            size: 1,
            busy_now: 1,
            drones: vec![Drone {
                id: "drone-001".into(),
                max_package_size: PackageSize::Large,
                current_reservation: Some(r),
                upcoming_reservations: 1,
            }],
        });
    }

    #[test]
    fn windows_are_half_open() {
        let t = Utc::now();
        let a = TimeWindow {
            start: t,
            end: t + Duration::minutes(10),
        };
        let b = TimeWindow {
            start: a.end,
            end: a.end + Duration::minutes(10),
        };
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&a));
    }
}

/// What a drone reports about the delivery it flies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TelemetryKind {
    /// Where it is now (on its way to the pickup, or with the package to the drop-off).
    Position,
    /// It has the package.
    PickedUp,
    /// It handed the package over: the delivery is complete and the drone's window ends.
    Delivered,
}

impl TelemetryKind {
    pub const ALL: [TelemetryKind; 3] = [
        TelemetryKind::Position,
        TelemetryKind::PickedUp,
        TelemetryKind::Delivered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TelemetryKind::Position => "position",
            TelemetryKind::PickedUp => "picked-up",
            TelemetryKind::Delivered => "delivered",
        }
    }
}

/// `POST /api/telemetry/{droneId}`: a drone's report on the delivery it flies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryReport {
    /// The delivery the drone's reservation is for.
    #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._:-]+$")]
    pub delivery_id: String,
    pub kind: TelemetryKind,
    /// Where the drone is (`0,lat,lon`, as Fabrikam locations are written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 500, pattern = r"\S")]
    pub location: Option<String>,
}

impl FromJsonObject for TelemetryReport {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let delivery_id = o.required_with("deliveryId", identifier);
        let kind = o.required::<TelemetryKind>("kind");
        let location = o.optional_with("location", non_empty(MAX_TEXT));
        o.finish(|| {
            Some(TelemetryReport {
                delivery_id: delivery_id?,
                kind: kind?,
                location,
            })
        })
    }
}

/// Where a flight stands, as the Drone service recorded it from the drone's reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FlightStage {
    ToPickup,
    ToDropOff,
    Delivered,
}

impl FlightStage {
    pub const ALL: [FlightStage; 3] = [
        FlightStage::ToPickup,
        FlightStage::ToDropOff,
        FlightStage::Delivered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FlightStage::ToPickup => "to-pickup",
            FlightStage::ToDropOff => "to-drop-off",
            FlightStage::Delivered => "delivered",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A delivery's flight: the answer to a telemetry report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Flight {
    pub delivery_id: String,
    pub drone_id: String,
    pub stage: FlightStage,
    pub last_location: Option<String>,
    /// Reports received for this flight.
    pub reports: i64,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// `GET /api/drones/{id}/key`: the credential a drone presents on its telemetry (`Bearer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DroneKey {
    pub drone_id: String,
    pub key: String,
}
