//! Which carriers may take a leg, in which order they are asked, and where the leg ends: pure
//! geometry and choice, without the database (which decides who gets the last slot).

use chrono::{DateTime, Duration, SubsecRound, Timelike, Utc};
use contracts::validation::FieldError;
use contracts::GeoPoint;

/// The share of the drones' range a hand-over point leaves for the drone: it flies at most this
/// much of `handoverWithinKm`, a margin for wind, detours and the way back.
pub(crate) const DRONE_SHARE: f64 = 0.8;

/// A carrier as the choice sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CarrierSpec {
    pub id: String,
    pub name: String,
    pub center: GeoPoint,
    pub radius_km: f64,
    pub daily_capacity: u32,
    pub max_weight_kg: f64,
    pub speed_kmh: f64,
}

impl CarrierSpec {
    fn covers(&self, p: GeoPoint) -> bool {
        self.center.distance_km(p) <= self.radius_km
    }

    /// Why it cannot take this route and weight; `None` when it can.
    fn refusal(&self, pickup: GeoPoint, drop_off: GeoPoint, weight: f64) -> Option<String> {
        let mut why = Vec::new();
        for (what, p) in [("pickup", pickup), ("drop-off", drop_off)] {
            if !self.covers(p) {
                why.push(format!(
                    "the {what} is {:.1} km from the centre of its area (radius {} km)",
                    self.center.distance_km(p),
                    self.radius_km
                ));
            }
        }
        if weight > self.max_weight_kg {
            why.push(format!("it takes at most {} kg", self.max_weight_kg));
        }
        (!why.is_empty()).then(|| format!("{} ({}): {}", self.id, self.name, why.join("; ")))
    }
}

/// No carrier serves the route and weight: a permanent refusal, with why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NoRoute {
    /// Why each carrier cannot take it, one sentence each.
    pub detail: String,
    /// The request fields that stand in the way.
    pub fields: Vec<FieldError>,
}

/// The carriers (of `carriers`) whose area holds both points and that take `weight`, or why none
/// does.
pub(crate) fn serving(
    carriers: &[CarrierSpec],
    pickup: GeoPoint,
    drop_off: GeoPoint,
    weight: f64,
) -> Result<Vec<&CarrierSpec>, NoRoute> {
    let fit: Vec<&CarrierSpec> = carriers
        .iter()
        .filter(|c| c.refusal(pickup, drop_off, weight).is_none())
        .collect();
    if !fit.is_empty() {
        return Ok(fit);
    }
    if carriers.is_empty() {
        return Err(NoRoute {
            detail: "no carrier is contracted".into(),
            fields: Vec::new(),
        });
    }
    let mut fields = Vec::new();
    if !carriers.iter().any(|c| c.covers(pickup)) {
        fields.push(FieldError::new(
            "pickupLocation",
            "outside every carrier's service area",
        ));
    }
    if !carriers.iter().any(|c| c.covers(drop_off)) {
        fields.push(FieldError::new(
            "dropOffLocation",
            "outside every carrier's service area",
        ));
    }
    let both: Vec<&CarrierSpec> = carriers
        .iter()
        .filter(|c| c.covers(pickup) && c.covers(drop_off))
        .collect();
    if fields.is_empty() && both.is_empty() {
        fields.push(FieldError::new(
            "dropOffLocation",
            "no carrier's service area holds both the pickup and the drop-off",
        ));
    }
    if let Some(heaviest) = both.iter().map(|c| c.max_weight_kg).reduce(f64::max) {
        fields.push(FieldError::new(
            "weight",
            format!("more than the {heaviest} kg the carriers serving this route take"),
        ));
    }
    let reasons: Vec<String> = carriers
        .iter()
        .filter_map(|c| c.refusal(pickup, drop_off, weight))
        .collect();
    Err(NoRoute {
        detail: format!(
            "no contracted carrier serves this route and weight: {}",
            reasons.join(". ")
        ),
        fields,
    })
}

/// The order in which carriers are asked for a slot: most capacity left on the day first, then by
/// id (deterministic). Those with nothing left are left out.
pub(crate) fn by_capacity_left<'a>(carriers: &[(&'a CarrierSpec, u32)]) -> Vec<&'a CarrierSpec> {
    let mut open: Vec<(&CarrierSpec, u32)> = carriers
        .iter()
        .copied()
        .filter(|(_, left)| *left > 0)
        .collect();
    open.sort_by(|(a, la), (b, lb)| lb.cmp(la).then_with(|| a.id.cmp(&b.id)));
    open.into_iter().map(|(c, _)| c).collect()
}

/// Where a leg ends and how far the carrier drives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Handover {
    /// `None`: at the drop-off itself (the carrier goes all the way).
    pub point: Option<GeoPoint>,
    /// Kilometres the carrier covers, to the metre.
    pub distance_km: f64,
}

/// The leg from `pickup` toward `drop_off`. With `within` (the drones' range), it ends on the
/// straight line at `max(0, d − 0.8·within)` from the pickup, so the drone flies at most
/// `0.8·within`; without, the carrier goes all the way.
pub(crate) fn handover(pickup: GeoPoint, drop_off: GeoPoint, within: Option<f64>) -> Handover {
    let d = pickup.distance_km(drop_off);
    match within {
        None => Handover {
            point: None,
            distance_km: metres(d),
        },
        Some(range) => {
            let carried = (d - DRONE_SHARE * range).max(0.0);
            let t = if d > 0.0 { carried / d } else { 0.0 };
            Handover {
                point: Some(pickup.toward(drop_off, t)),
                distance_km: metres(carried),
            }
        }
    }
}

fn metres(km: f64) -> f64 {
    (km * 1000.0).round() / 1000.0
}

/// When a carrier at `speed_kmh` that leaves at `pickup_time` is `distance_km` further: to the
/// second, never before it set off.
pub(crate) fn handover_time(
    pickup_time: DateTime<Utc>,
    distance_km: f64,
    speed_kmh: f64,
) -> DateTime<Utc> {
    let hours = if speed_kmh > 0.0 {
        distance_km / speed_kmh
    } else {
        0.0
    };
    // Whole seconds; a leg so long it overflows is capped at a century (never reached: areas are
    // hundreds of kilometres).
    let secs = (hours * 3600.0)
        .round()
        .clamp(0.0, 100.0 * 365.0 * 86_400.0) as i64;
    let at = pickup_time + Duration::seconds(secs);
    if at.nanosecond() == 0 {
        at
    } else {
        at.trunc_subsecs(0) + Duration::seconds(1)
    }
}

/// The UTC day of a pickup, `YYYY-MM-DD`: the day whose capacity a leg takes.
pub(crate) fn day_of(pickup_time: DateTime<Utc>) -> String {
    pickup_time.date_naive().format("%Y-%m-%d").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(lat: f64, lon: f64) -> GeoPoint {
        GeoPoint { lat, lon }
    }

    fn carrier(id: &str, center: GeoPoint, radius_km: f64, max_weight_kg: f64) -> CarrierSpec {
        CarrierSpec {
            id: id.into(),
            name: format!("{id} inc."),
            center,
            radius_km,
            daily_capacity: 10,
            max_weight_kg,
            speed_kmh: 60.0,
        }
    }

    const SEATTLE: GeoPoint = GeoPoint {
        lat: 47.6062,
        lon: -122.3321,
    };
    const TACOMA: GeoPoint = GeoPoint {
        lat: 47.2529,
        lon: -122.4443,
    };
    const PORTLAND: GeoPoint = GeoPoint {
        lat: 45.5152,
        lon: -122.6784,
    };

    #[test]
    fn the_drone_flies_at_most_four_fifths_of_its_range() {
        let d = SEATTLE.distance_km(TACOMA);
        let h = handover(SEATTLE, TACOMA, Some(20.0));
        let to = h.point.unwrap_or(SEATTLE);
        assert!((h.distance_km - (d - 16.0)).abs() < 0.001, "{h:?}");
        // On the line: what the carrier drives plus what the drone flies is the whole way.
        assert!((SEATTLE.distance_km(to) - h.distance_km).abs() < 0.1);
        assert!((to.distance_km(TACOMA) - 16.0).abs() < 0.1);
        assert!(to.distance_km(TACOMA) <= 20.0 * DRONE_SHARE + 0.05);
    }

    #[test]
    fn a_route_within_the_drones_range_needs_no_driving_and_none_means_all_the_way() {
        let near = point(47.62, -122.35);
        let h = handover(SEATTLE, near, Some(20.0));
        assert_eq!(h.distance_km, 0.0);
        assert_eq!(h.point, Some(SEATTLE));
        let same = handover(SEATTLE, SEATTLE, Some(5.0));
        assert_eq!((same.point, same.distance_km), (Some(SEATTLE), 0.0));

        let all = handover(SEATTLE, TACOMA, None);
        assert_eq!(all.point, None);
        assert!((all.distance_km - SEATTLE.distance_km(TACOMA)).abs() < 0.001);
        assert_eq!(all.distance_km, (all.distance_km * 1000.0).round() / 1000.0);
    }

    #[test]
    fn handover_times_are_whole_seconds_after_the_pickup() {
        let t = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_default()
        };
        // 30 km at 60 km/h.
        assert_eq!(
            handover_time(t("2030-01-01T10:00:00Z"), 30.0, 60.0),
            t("2030-01-01T10:30:00Z")
        );
        // 1 km at 70 km/h = 51.43 s → 51 s.
        assert_eq!(
            handover_time(t("2030-01-01T10:00:00Z"), 1.0, 70.0),
            t("2030-01-01T10:00:51Z")
        );
        // A pickup with a fraction of a second: the next whole second, never earlier.
        assert_eq!(
            handover_time(t("2030-01-01T10:00:00.250Z"), 0.0, 60.0),
            t("2030-01-01T10:00:01Z")
        );
        assert_eq!(day_of(t("2030-01-01T23:59:59Z")), "2030-01-01");
        assert_eq!(day_of(t("2030-01-02T00:30:00+02:00")), "2030-01-01");
    }

    #[test]
    fn carriers_serve_routes_inside_their_area_and_weights_they_take() {
        let carriers = [
            carrier("local", SEATTLE, 50.0, 50.0),
            carrier("heavy", TACOMA, 300.0, 1000.0),
        ];
        let ids = |r: Result<Vec<&CarrierSpec>, NoRoute>| -> Vec<String> {
            r.map(|v| v.iter().map(|c| c.id.clone()).collect())
                .unwrap_or_default()
        };
        assert_eq!(
            ids(serving(&carriers, SEATTLE, TACOMA, 10.0)),
            ["local", "heavy"]
        );
        assert_eq!(ids(serving(&carriers, SEATTLE, TACOMA, 60.0)), ["heavy"]);
        assert_eq!(ids(serving(&carriers, SEATTLE, PORTLAND, 1.0)), ["heavy"]);
    }

    #[test]
    fn no_route_says_why_and_names_the_fields() {
        let carriers = [
            carrier("local", SEATTLE, 50.0, 50.0),
            carrier("south", PORTLAND, 50.0, 500.0),
        ];
        let fields =
            |r: &NoRoute| -> Vec<String> { r.fields.iter().map(|f| f.field.clone()).collect() };
        // Each end is in some area, but never both in one.
        let Err(split) = serving(&carriers, SEATTLE, PORTLAND, 1.0) else {
            panic!("no carrier holds both");
        };
        assert_eq!(fields(&split), ["dropOffLocation"]);
        assert!(split.detail.contains("local (local inc.): the drop-off is"));
        assert!(split.detail.contains("south (south inc.): the pickup is"));
        // Nowhere near.
        let Err(far) = serving(&carriers, point(10.0, 10.0), point(11.0, 11.0), 1.0) else {
            panic!("outside every area");
        };
        assert_eq!(fields(&far), ["pickupLocation", "dropOffLocation"]);
        // Inside the area, too heavy.
        let Err(heavy) = serving(&carriers, SEATTLE, TACOMA, 51.0) else {
            panic!("too heavy");
        };
        assert_eq!(fields(&heavy), ["weight"]);
        assert!(heavy.fields[0].reason.contains("50 kg"), "{heavy:?}");
        assert!(heavy.detail.contains("it takes at most 50 kg"));
        // No carrier at all.
        let Err(none) = serving(&[], SEATTLE, TACOMA, 1.0) else {
            panic!("no carriers");
        };
        assert_eq!(none.detail, "no carrier is contracted");
    }

    #[test]
    fn the_most_capacity_left_is_asked_first_then_by_id() {
        let (a, b, c) = (
            carrier("a", SEATTLE, 100.0, 10.0),
            carrier("b", SEATTLE, 100.0, 10.0),
            carrier("c", SEATTLE, 100.0, 10.0),
        );
        let order = |left: [u32; 3]| -> Vec<String> {
            by_capacity_left(&[(&c, left[2]), (&a, left[0]), (&b, left[1])])
                .iter()
                .map(|c| c.id.clone())
                .collect()
        };
        assert_eq!(order([1, 5, 3]), ["b", "c", "a"]);
        assert_eq!(order([2, 2, 2]), ["a", "b", "c"]);
        assert_eq!(order([0, 2, 2]), ["b", "c"]);
        assert!(order([0, 0, 0]).is_empty());
    }
}
