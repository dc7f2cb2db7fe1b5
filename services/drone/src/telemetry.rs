//! Drone telemetry: each drone reports its flight (`position`, `picked-up`, `delivered`) for the
//! delivery its reservation is for; each report becomes a tracking event of the Delivery service,
//! and `delivered` also ends the drone's window now, so the drone is free for the next booking.
//!
//! A drone authenticates with its own key, `Bearer <key>`: HMAC-SHA256 of its id under the
//! suite's service token, so no key table needs provisioning and a key opens one drone's
//! reports only. Operators (and the fleet simulator) read a drone's key with the service token.

use actix_web::HttpRequest;
use contracts::{
    Confirmation, ConfirmationType, DeliveryStage, Flight, FlightStage, ReservationStatus,
    TelemetryKind, TelemetryReport, TrackingUpdate,
};
use downstream::{CallError, Downstream};
use hmac::{Hmac, Mac};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use secrecy::{ExposeSecret, SecretString};
use service_kit::auth::bearer;
use service_kit::ApiError;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::entity::{flight, reservation};

/// The key drone `drone_id` presents on its reports.
pub fn drone_key(service_token: &SecretString, drone_id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(service_token.expose_secret().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(b"drone-telemetry:");
    mac.update(drone_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Admits the request only with the key of `drone_id`.
pub(crate) fn authenticate(
    req: &HttpRequest,
    service_token: &SecretString,
    drone_id: &str,
) -> Result<(), ApiError> {
    let presented = bearer(req)?;
    let expected = drone_key(service_token, drone_id);
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(format!(
            "the bearer token is not the key of drone '{drone_id}'"
        )))
    }
}

/// Records one report: the Delivery service first (the report counts only once it has it), then
/// the flight, then, on `delivered`, the end of the window.
pub(crate) async fn report(
    db: &DatabaseConnection,
    deliveries: &Downstream,
    drone_id: &str,
    report: &TelemetryReport,
) -> Result<Flight, ApiError> {
    let delivery_id = report.delivery_id.as_str();
    let reservation = reservation::Entity::find_by_id(delivery_id.to_owned())
        .one(db)
        .await?
        .filter(|r| r.drone_id == drone_id)
        .ok_or_else(|| {
            ApiError::not_found("reservation", format!("{delivery_id} of drone {drone_id}"))
        })?;
    if reservation.status != ReservationStatus::Active.as_str() {
        return Err(ApiError::conflict(
            "reservation-released",
            format!("the reservation for delivery '{delivery_id}' was released: do not fly it"),
        ));
    }
    let current = flight::Entity::find_by_id(delivery_id.to_owned())
        .one(db)
        .await?;
    let stage = current
        .as_ref()
        .and_then(|f| FlightStage::parse(&f.stage))
        .unwrap_or(FlightStage::ToPickup);
    if stage == FlightStage::Delivered {
        return match (report.kind, current) {
            (TelemetryKind::Delivered, Some(done)) => to_wire(done),
            _ => Err(ApiError::conflict(
                "flight-completed",
                format!("delivery '{delivery_id}' was delivered; its flight takes no more reports"),
            )),
        };
    }
    let next = match report.kind {
        TelemetryKind::Position => stage,
        TelemetryKind::PickedUp => FlightStage::ToDropOff,
        TelemetryKind::Delivered => FlightStage::Delivered,
    };
    let recorded = match next {
        FlightStage::ToPickup | FlightStage::ToDropOff => {
            let stage = if next == FlightStage::ToPickup {
                DeliveryStage::HeadedToPickup
            } else {
                DeliveryStage::HeadedToDropoff
            };
            deliveries
                .track_delivery(
                    delivery_id,
                    &TrackingUpdate {
                        stage,
                        location: report.location.clone(),
                    },
                )
                .await
        }
        FlightStage::Delivered => {
            deliveries
                .confirm_delivery(
                    delivery_id,
                    &Confirmation {
                        confirmation_type: ConfirmationType::None,
                        confirmation_blob: None,
                        location: report.location.clone(),
                    },
                )
                .await
        }
    };
    recorded.map_err(|e| delivery_refused(delivery_id, e))?;

    let now = service_kit::now();
    let delivered_at = (next == FlightStage::Delivered).then_some(now);
    flight::Entity::insert(flight::ActiveModel {
        delivery_id: Set(delivery_id.to_owned()),
        drone_id: Set(drone_id.to_owned()),
        stage: Set(next.as_str().to_owned()),
        last_location: Set(report.location.clone()),
        reports: Set(1),
        started_at: Set(now),
        updated_at: Set(now),
        delivered_at: Set(delivered_at),
    })
    .on_conflict({
        let mut update = OnConflict::column(flight::Column::DeliveryId);
        update
            .value(flight::Column::Stage, next.as_str())
            .value(
                flight::Column::Reports,
                Expr::col((flight::Entity, flight::Column::Reports)).add(1),
            )
            .value(flight::Column::UpdatedAt, now)
            .value(flight::Column::DeliveredAt, delivered_at);
        if let Some(location) = &report.location {
            update.value(flight::Column::LastLocation, location.clone());
        }
        update
    })
    .exec_without_returning(db)
    .await?;
    if next == FlightStage::Delivered {
        end_window(db, &reservation, now.timestamp_millis()).await?;
        tracing::info!(
            delivery_id,
            drone_id,
            "delivered; the drone's window ends now"
        );
    }
    let saved = flight::Entity::find_by_id(delivery_id.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("flight {delivery_id} vanished")))?;
    to_wire(saved)
}

/// Ends an active window at `now_ms` (never before it started: a delivery reported before its
/// window keeps one millisecond of it), so the drone can be reserved from now on.
async fn end_window(
    db: &DatabaseConnection,
    r: &reservation::Model,
    now_ms: i64,
) -> Result<(), sea_orm::DbErr> {
    let end = if r.window_start_ms < now_ms {
        now_ms
    } else {
        r.window_start_ms + 1
    };
    reservation::Entity::update_many()
        .col_expr(reservation::Column::WindowEndMs, Expr::value(end))
        .col_expr(
            reservation::Column::UpdatedAt,
            Expr::value(service_kit::now()),
        )
        .filter(reservation::Column::DeliveryId.eq(r.delivery_id.as_str()))
        .filter(reservation::Column::Status.eq(ReservationStatus::Active.as_str()))
        .filter(reservation::Column::WindowEndMs.gt(end))
        .exec(db)
        .await
        .map(|_| ())
}

/// What the drone hears when the Delivery service did not record its report.
fn delivery_refused(delivery_id: &str, e: CallError) -> ApiError {
    match e {
        CallError::Transient {
            reason,
            retry_after,
        } => {
            tracing::warn!(delivery_id, %reason, "delivery service unavailable for a report");
            ApiError::unavailable(
                "delivery-unavailable",
                "the delivery service did not record the report; send it again",
                retry_after.map_or(1, |d| d.as_secs().max(1)),
            )
        }
        // Not called: the Delivery service has been failing (its breaker is open).
        CallError::Rejected {
            reason,
            retry_after,
        } => {
            tracing::warn!(delivery_id, %reason, "delivery service not called for a report");
            ApiError::unavailable(
                "delivery-unavailable",
                "the delivery service is failing; send the report again later",
                retry_after.as_secs().max(1),
            )
        }
        CallError::Permanent {
            code: Some(code), ..
        } if code == "delivery-closed" => ApiError::conflict(
            "delivery-closed",
            format!("delivery '{delivery_id}' is cancelled: do not fly it"),
        ),
        CallError::Permanent {
            status: Some(404), ..
        } => ApiError::not_found("delivery", delivery_id),
        other => ApiError::Internal(anyhow::anyhow!(
            "the delivery service refused a report for {delivery_id}: {other}"
        )),
    }
}

fn to_wire(f: flight::Model) -> Result<Flight, ApiError> {
    let stage = FlightStage::parse(&f.stage).ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!(
            "flight {} has unknown stage {}",
            f.delivery_id,
            f.stage
        ))
    })?;
    Ok(Flight {
        delivery_id: f.delivery_id,
        drone_id: f.drone_id,
        stage,
        last_location: f.last_location,
        reports: f.reports,
        started_at: f.started_at,
        updated_at: f.updated_at,
        delivered_at: f.delivered_at,
    })
}
