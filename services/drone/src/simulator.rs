//! The fleet simulator (`make run` turns it on): when a reserved window begins, the reserved
//! drone "flies" the delivery — positions on the way to the pickup, `picked-up`, positions on the
//! way to the drop-off, `delivered` — by sending each report to this service's own telemetry
//! endpoint over HTTP with the drone's key, exactly as a real drone would. So a booking made on a
//! laptop goes all the way to `delivered`, and the drone is free again afterwards.
//!
//! Locations written as Fabrikam writes them (`0,lat,lon`) are flown along a straight line; any
//! other text is reported as is at the pickup and the drop-off.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use contracts::{
    FlightStage, GeoPoint as Point, ReservationStatus, TelemetryKind, TelemetryReport,
};
use sea_orm::{
    ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use secrecy::SecretString;
use serde::Deserialize;
use service_kit::StopSignal;

use crate::entity::{flight, reservation};
use crate::telemetry::drone_key;

/// The simulator's settings (`APP_SIMULATOR__ENABLED`, ...). Off unless enabled.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SimulatorSettings {
    pub enabled: bool,
    /// How often it looks for windows that began.
    pub poll_ms: u64,
    /// How long each leg (to the pickup, to the drop-off) takes.
    pub leg_secs: u64,
    /// Position reports on each leg (the last one is `picked-up` / `delivered`).
    pub reports_per_leg: u32,
    /// Flights at once at most.
    pub max_flights: usize,
}

impl Default for SimulatorSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            poll_ms: 1000,
            leg_secs: 20,
            reports_per_leg: 4,
            max_flights: 200,
        }
    }
}

/// Runs until `stop`: flies every reservation whose window began and whose flight is not over.
/// `base` is this service's own URL, set once it listens.
pub(crate) async fn run(
    db: DatabaseConnection,
    settings: SimulatorSettings,
    service_token: SecretString,
    base: Arc<OnceLock<String>>,
    mut stop: StopSignal,
) {
    let flying: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut flights = tokio::task::JoinSet::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    tracing::info!(?settings, "fleet simulator on");
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(Duration::from_millis(settings.poll_ms.max(50))) => {}
        }
        while flights.try_join_next().is_some() {}
        let Some(base) = base.get() else { continue };
        let room = settings.max_flights.saturating_sub(lock(&flying).len());
        if room == 0 {
            continue;
        }
        let due = match due_flights(&db, room).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "fleet simulator: reading due flights failed");
                continue;
            }
        };
        for (r, stage) in due {
            if !lock(&flying).insert(r.delivery_id.clone()) {
                continue;
            }
            let plan = Flight {
                http: http.clone(),
                url: format!("{base}/api/telemetry/{}", r.drone_id),
                key: drone_key(&service_token, &r.drone_id),
                settings: settings.clone(),
            };
            let flying = flying.clone();
            flights.spawn(async move {
                let id = r.delivery_id.clone();
                plan.fly(&r, stage).await;
                lock(&flying).remove(&id);
            });
        }
    }
}

fn lock(set: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    set.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Active reservations whose window holds now and whose flight is not delivered, with the stage
/// the flight reached (a restarted simulator carries on from there).
async fn due_flights(
    db: &DatabaseConnection,
    limit: usize,
) -> Result<Vec<(reservation::Model, FlightStage)>, DbErr> {
    let now = chrono::Utc::now().timestamp_millis();
    let windows = reservation::Entity::find()
        .filter(reservation::Column::Status.eq(ReservationStatus::Active.as_str()))
        .filter(reservation::Column::DroneId.ne(""))
        .filter(reservation::Column::WindowStartMs.lte(now))
        .filter(reservation::Column::WindowEndMs.gt(now))
        .order_by_asc(reservation::Column::WindowStartMs)
        .limit(u64::try_from(limit).unwrap_or(u64::MAX))
        .all(db)
        .await?;
    if windows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = windows.iter().map(|r| r.delivery_id.clone()).collect();
    let reached: std::collections::HashMap<String, FlightStage> = flight::Entity::find()
        .filter(flight::Column::DeliveryId.is_in(ids))
        .all(db)
        .await?
        .into_iter()
        .filter_map(|f| FlightStage::parse(&f.stage).map(|s| (f.delivery_id, s)))
        .collect();
    Ok(windows
        .into_iter()
        .filter_map(|r| {
            let stage = reached
                .get(&r.delivery_id)
                .copied()
                .unwrap_or(FlightStage::ToPickup);
            (stage != FlightStage::Delivered).then_some((r, stage))
        })
        .collect())
}

struct Flight {
    http: reqwest::Client,
    url: String,
    key: String,
    settings: SimulatorSettings,
}

/// Why a flight stops early.
enum Stop {
    /// The service said no for good (cancelled, released, unknown): nothing to fly.
    Refused(String),
    /// Still failing after the retries.
    GaveUp(String),
}

impl Flight {
    async fn fly(&self, r: &reservation::Model, from: FlightStage) {
        let pickup = Point::parse(&r.pickup_location);
        let drop_off = Point::parse(&r.drop_off_location);
        // The drone comes from its base, a little north-east of the pickup.
        let base = pickup.map(|p| Point {
            lat: p.lat + 0.01,
            lon: p.lon + 0.01,
        });
        let n = self.settings.reports_per_leg.max(1);
        let pause = Duration::from_millis(self.settings.leg_secs * 1000 / u64::from(n));
        let mut plan: Vec<(TelemetryKind, Option<String>)> = Vec::new();
        if from == FlightStage::ToPickup {
            for i in 1..n {
                plan.push((TelemetryKind::Position, along(base, pickup, i, n)));
            }
            plan.push((TelemetryKind::PickedUp, Some(r.pickup_location.clone())));
        }
        for i in 1..n {
            plan.push((TelemetryKind::Position, along(pickup, drop_off, i, n)));
        }
        plan.push((TelemetryKind::Delivered, Some(r.drop_off_location.clone())));
        tracing::info!(delivery_id = %r.delivery_id, drone_id = %r.drone_id, reports = plan.len(), "fleet simulator: flight starts");
        for (kind, location) in plan {
            tokio::time::sleep(pause).await;
            let report = TelemetryReport {
                delivery_id: r.delivery_id.clone(),
                kind,
                location,
            };
            match self.send(&report).await {
                Ok(()) => {}
                Err(Stop::Refused(why)) => {
                    tracing::info!(delivery_id = %r.delivery_id, %why, "fleet simulator: flight stopped");
                    return;
                }
                Err(Stop::GaveUp(why)) => {
                    tracing::warn!(delivery_id = %r.delivery_id, %why, "fleet simulator: report failed; the flight is tried again later");
                    return;
                }
            }
        }
        tracing::info!(delivery_id = %r.delivery_id, drone_id = %r.drone_id, "fleet simulator: delivered");
    }

    /// Sends one report, retrying what may pass later (`5xx`, `429`, no answer) with back-off.
    async fn send(&self, report: &TelemetryReport) -> Result<(), Stop> {
        let once = || async {
            let answer = self
                .http
                .post(&self.url)
                .bearer_auth(&self.key)
                .json(report)
                .send()
                .await
                .map_err(|e| (true, e.to_string()))?;
            let status = answer.status();
            if status.is_success() {
                return Ok(());
            }
            let body = answer.text().await.unwrap_or_default();
            let again = status.is_server_error() || status.as_u16() == 429;
            Err((again, format!("{status}: {body}")))
        };
        once.retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(10)
                .with_jitter(),
        )
        .when(|(again, _)| *again)
        .await
        .map_err(|(again, why)| {
            if again {
                Stop::GaveUp(why)
            } else {
                Stop::Refused(why)
            }
        })
    }
}

/// The point `i/n` of the way from `a` to `b`, written as a location; `None` without both.
fn along(a: Option<Point>, b: Option<Point>, i: u32, n: u32) -> Option<String> {
    Some(a?.toward(b?, f64::from(i) / f64::from(n)).location())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flights_go_along_a_line_between_fabrikam_points() {
        let a = Point::parse("0,0,0");
        let b = Point::parse("0,1,2");
        assert_eq!(along(a, b, 1, 2).as_deref(), Some("0,0.500000,1.000000"));
        assert_eq!(along(a, None, 1, 2), None);
    }
}
