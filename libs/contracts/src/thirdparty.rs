//! The third-party leg (seed step 3): when the drone fleet cannot do a delivery alone, a contracted
//! carrier takes the package part of the way (to a hand-over point within the drones' range of the
//! drop-off) or all the way (a package heavier than any drone carries). The ThirdParty service
//! books legs (`PUT /api/thirdparty/{deliveryId}`), the Scheduler's `ArrangeThirdParty` step asks
//! for one, and compensation cancels it.
//!
//! Locations are Fabrikam's `"0,lat,lon"` strings; [`GeoPoint`] reads them and measures distances.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validation::{
    identifier, non_empty, non_negative_number, timestamp, FieldError, FromJsonObject, Object,
};
use crate::{PackageSize, MAX_TEXT};

/// A point on the earth, read from Fabrikam's `"0,lat,lon"` location format.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeoPoint {
    pub lat: f64,
    pub lon: f64,
}

impl GeoPoint {
    /// Mean earth radius, in kilometres.
    const EARTH_RADIUS_KM: f64 = 6371.0;

    /// `0,lat,lon`; anything else (a street address, a bad number, a latitude past the poles) is
    /// not a point.
    pub fn parse(s: &str) -> Option<GeoPoint> {
        let mut parts = s.split(',').map(str::trim);
        let (_, lat, lon) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let (lat, lon) = (lat.parse::<f64>().ok()?, lon.parse::<f64>().ok()?);
        ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon))
            .then_some(GeoPoint { lat, lon })
    }

    /// The point as a location string (`0,lat,lon`, six decimals: about 10 cm).
    pub fn location(self) -> String {
        format!("0,{:.6},{:.6}", self.lat, self.lon)
    }

    /// Great-circle distance (haversine), in kilometres.
    pub fn distance_km(self, other: GeoPoint) -> f64 {
        let (p1, p2) = (self.lat.to_radians(), other.lat.to_radians());
        let dp = p2 - p1;
        let dl = (other.lon - self.lon).to_radians();
        let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
        2.0 * Self::EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
    }

    /// The point `t` (0..=1) of the way from `self` to `other`, on a straight line in latitude and
    /// longitude (close enough to the great circle for the distances a delivery covers).
    pub fn toward(self, other: GeoPoint, t: f64) -> GeoPoint {
        let t = t.clamp(0.0, 1.0);
        GeoPoint {
            lat: self.lat + (other.lat - self.lat) * t,
            lon: self.lon + (other.lon - self.lon) * t,
        }
    }
}

/// Parses a `"0,lat,lon"` location, as sent (kept as the client wrote it).
pub fn geo_location(v: serde_json::Value) -> Result<String, String> {
    let s = non_empty(MAX_TEXT)(v)?;
    if GeoPoint::parse(&s).is_some() {
        Ok(s)
    } else {
        Err("must be a point written \"0,<latitude>,<longitude>\" (latitude -90..90, longitude -180..180)".into())
    }
}

/// A location [`geo_location`] takes, as a pattern: anything without a comma (Fabrikam sends
/// `0`), a latitude of -90..90 and a longitude of -180..180 written as plain decimals. The parser
/// also takes white space around the numbers, exponents and the like, which no client sends.
pub const GEO_PATTERN: &str = r"^[^,]*,-?0*(90(\.0+)?|[1-8]?[0-9](\.[0-9]+)?),-?0*(180(\.0+)?|(1[0-7][0-9]|[1-9]?[0-9])(\.[0-9]+)?)$";

/// A number sent as a string that is more than zero (see [`crate::schema::NUMERIC_STRING`]).
pub const POSITIVE_NUMERIC_STRING: &str = r"^(?=[0-9.]*[1-9])[0-9]{1,20}(\.[0-9]{1,20})?$";

/// The schema of a `"0,lat,lon"` location field (see [`GEO_PATTERN`]).
pub fn geo_location_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(MAX_TEXT))
        .pattern(Some(GEO_PATTERN))
        .description(Some("A point written \"0,<latitude>,<longitude>\""))
        .into()
}

/// The schema of `handoverWithinKm`: kilometres, more than zero (a numeric string is accepted),
/// or `null`/absent.
pub fn handover_km_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Number)
                .exclusive_minimum(Some(0.0)),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(POSITIVE_NUMERIC_STRING)),
        )
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "Kilometres, more than zero; a numeric string is accepted. Absent: the carrier goes all the way",
        ))
        .into()
}

/// The id of a booking's carrier leg at a revision: the deliveryId as booked, `<id>.r<n>` after
/// the n-th reschedule (a re-planned leg is a new leg; the one before it is cancelled).
pub fn carrier_leg_id(delivery_id: &str, revision: u32) -> String {
    if revision == 0 {
        delivery_id.to_owned()
    } else {
        format!("{delivery_id}.r{revision}")
    }
}

/// Every leg id a booking at `revision` may have held, one per revision (cancelling one never
/// booked is a no-op).
pub fn carrier_leg_ids(delivery_id: &str, revision: u32) -> Vec<String> {
    (0..=revision)
        .map(|r| carrier_leg_id(delivery_id, r))
        .collect()
}

/// The deliveryId a leg id belongs to.
pub fn delivery_of_leg(leg_id: &str) -> &str {
    leg_id.split(".r").next().unwrap_or(leg_id)
}

/// Whether a leg is booked or was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LegStatus {
    Booked,
    Cancelled,
}

impl LegStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LegStatus::Booked => "booked",
            LegStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "booked" => Some(LegStatus::Booked),
            "cancelled" => Some(LegStatus::Cancelled),
            _ => None,
        }
    }
}

/// `PUT /api/thirdparty/{deliveryId}` body: the delivery a carrier is asked to take part of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LegRequest {
    #[schema(schema_with = crate::schema::identifier)]
    pub owner_id: String,
    /// `"0,lat,lon"`: where the carrier collects the package.
    #[schema(schema_with = geo_location_schema)]
    pub pickup_location: String,
    /// `"0,lat,lon"`: where the package must end up.
    #[schema(schema_with = geo_location_schema)]
    pub drop_off_location: String,
    pub pickup_time: DateTime<Utc>,
    pub size: PackageSize,
    /// Kilograms.
    #[schema(schema_with = crate::schema::weight)]
    pub weight: f64,
    /// How close to the drop-off the carrier must bring the package, in kilometres (the drones'
    /// range): a drone flies the rest. Absent: the carrier carries it all the way (no drone can).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = handover_km_schema)]
    pub handover_within_km: Option<f64>,
}

impl FromJsonObject for LegRequest {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let owner_id = o.required_with("ownerId", identifier);
        let pickup_location = o.required_with("pickupLocation", geo_location);
        let drop_off_location = o.required_with("dropOffLocation", geo_location);
        let pickup_time = o.required_with("pickupTime", timestamp);
        let size = o.required::<PackageSize>("size");
        let weight = o.required_with("weight", non_negative_number);
        let handover_within_km = o.optional_with("handoverWithinKm", non_negative_number);
        o.ensure(
            handover_within_km.is_none_or(|km| km > 0.0),
            "handoverWithinKm",
            "must be more than 0 (leave it out for a carrier that goes all the way)",
        );
        o.finish(|| {
            Some(LegRequest {
                owner_id: owner_id?,
                pickup_location: pickup_location?,
                drop_off_location: drop_off_location?,
                pickup_time: pickup_time?,
                size: size?,
                weight: weight?,
                handover_within_km,
            })
        })
    }
}

/// A booked (or cancelled) carrier leg. The same deliveryId always names the same leg.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThirdPartyLeg {
    pub delivery_id: String,
    pub owner_id: String,
    pub carrier_id: String,
    pub carrier_name: String,
    /// Where the carrier collects the package (the booking's pickup).
    pub from_location: String,
    /// Where the carrier hands the package over: a point within the drones' range of the
    /// drop-off, or the drop-off itself when `wholeRoute`.
    pub to_location: String,
    /// The carrier goes all the way; no drone flies.
    pub whole_route: bool,
    pub pickup_time: DateTime<Utc>,
    /// When the carrier is at `toLocation` (a drone's window starts then).
    pub handover_time: DateTime<Utc>,
    /// Kilometres the carrier covers.
    pub distance_km: f64,
    pub status: LegStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a booking's tracking and its lifecycle events say about its carrier leg.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CarrierLeg {
    pub carrier_id: String,
    pub carrier_name: String,
    pub from_location: String,
    pub to_location: String,
    pub whole_route: bool,
    pub handover_time: DateTime<Utc>,
}

impl From<&ThirdPartyLeg> for CarrierLeg {
    fn from(l: &ThirdPartyLeg) -> Self {
        CarrierLeg {
            carrier_id: l.carrier_id.clone(),
            carrier_name: l.carrier_name.clone(),
            from_location: l.from_location.clone(),
            to_location: l.to_location.clone(),
            whole_route: l.whole_route,
            handover_time: l.handover_time,
        }
    }
}

/// `GET /api/carriers`: a contracted carrier, its service area and what is left of its capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Carrier {
    pub id: String,
    pub name: String,
    /// Centre of the service area (`"0,lat,lon"`).
    pub area_center: String,
    pub area_radius_km: f64,
    /// Legs it takes per day (UTC, by pickup day).
    pub daily_capacity: u32,
    /// Heaviest package it takes, in kilograms.
    pub max_weight_kg: f64,
    /// Average speed on the road, for the hand-over time.
    pub speed_kmh: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn points_parse_measure_and_interpolate() {
        let seattle = GeoPoint::parse("0,47.6062,-122.3321");
        let tacoma = GeoPoint::parse(" 0, 47.2529 , -122.4443");
        let (Some(a), Some(b)) = (seattle, tacoma) else {
            panic!("both are points");
        };
        let d = a.distance_km(b);
        assert!((d - 40.1).abs() < 0.5, "{d}");
        assert!(a.distance_km(a) < 1e-9);
        let mid = a.toward(b, 0.5);
        assert!((a.distance_km(mid) - d / 2.0).abs() < 0.2);
        assert_eq!(GeoPoint::parse("1 Main St"), None);
        assert_eq!(GeoPoint::parse("0,91,0"), None);
        assert_eq!(GeoPoint::parse("0,1,2,3"), None);
        assert_eq!(a.location(), "0,47.606200,-122.332100");
    }

    #[test]
    fn leg_ids_name_the_delivery_and_the_revision() {
        assert_eq!(carrier_leg_id("d", 0), "d");
        assert_eq!(carrier_leg_id("d", 2), "d.r2");
        assert_eq!(carrier_leg_ids("d", 2), vec!["d", "d.r1", "d.r2"]);
        assert_eq!(delivery_of_leg("d.r2"), "d");
        assert_eq!(delivery_of_leg("d"), "d");
    }

    #[test]
    fn leg_requests_name_every_bad_field() {
        let bad = LegRequest::from_json_value(json!({
            "ownerId": "a b",
            "pickupLocation": "1 Main St",
            "dropOffLocation": "0,47,-122",
            "pickupTime": "tomorrow",
            "size": "Huge",
            "weight": -1,
            "handoverWithinKm": 0
        }));
        let fields: Vec<String> = bad
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            vec![
                "ownerId",
                "pickupLocation",
                "pickupTime",
                "size",
                "weight",
                "handoverWithinKm"
            ]
        );
        let ok = LegRequest::from_json_value(json!({
            "ownerId": "acc-1",
            "pickupLocation": "0,47.6,-122.3",
            "dropOffLocation": "0,47.2,-122.4",
            "pickupTime": "2030-01-01T10:00:00Z",
            "size": "Small",
            "weight": "2.5"
        }));
        assert_eq!(
            ok.map(|r| (r.weight, r.handover_within_km)),
            Ok((2.5, None))
        );
    }
}
