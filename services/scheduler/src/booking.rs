//! The booking saga: CheckAccount → RegisterPackage → ArrangeThirdParty → ReserveDrone →
//! CreateDelivery against the domain services. Every resource id is the deliveryId (a carrier leg
//! of a rescheduled booking: the deliveryId and the revision), so a retried or replayed step finds
//! what an earlier attempt made instead of making a second one. Cancel and reschedule arrive as
//! signals the engine applies between steps: a cancel stops (or undoes) the booking, a reschedule
//! changes the input and runs the saga again from ArrangeThirdParty (re-planning the carrier leg
//! and moving the drone's window), and CreateDelivery of a rescheduled booking updates the delivery
//! it created.
//!
//! ArrangeThirdParty books a carrier leg only when the drones cannot do the delivery alone: the
//! drop-off is beyond their range from the pickup (a leg to a hand-over point within range; the
//! drone flies from there, when the carrier arrives), or the package is heavier than any drone
//! carries (the carrier goes all the way; no drone is reserved). Otherwise it records why none is
//! needed and calls nothing.

use std::cell::RefCell;
use std::sync::Arc;

use async_trait::async_trait;
use contracts::{
    carrier_leg_id, carrier_leg_ids, AccountStatus, BookingStep, CarrierLeg, CompensationRequest,
    DeliveryPatch, DeliveryRequested, DeliveryRescheduled, DeliveryUpsert, DroneReservationRequest,
    GeoPoint, LegRequest, PackageUpsert, RequestState, SagaState, TimeWindow, WorkflowStateChanged,
    COMPENSATIONS_QUEUE, COMPENSATION_REQUESTED, DELIVERY_CANCELLED, DELIVERY_RESCHEDULED,
    WORKFLOW_EVENTS_LOG, WORKFLOW_STATE_CHANGED,
};
use downstream::{CallError, Domain};
use messaging::Envelope;
use saga::{
    Hooks, Lifecycle, OutboxMessage, RawJson, RetryPolicy, SagaRecord, Signal, SignalAction, Step,
    StepError,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::accounts::Lookup;
use crate::metrics::Metrics;
use crate::{StepPolicies, ThirdPartyRules};

pub const KIND: &str = "booking";

/// Why a booking its client cancelled stopped (its saga's error).
pub const CLIENT_CANCEL: &str = "cancelled by the client";

/// The "drone" of a delivery a carrier makes all the way: `carrier:<carrierId>`.
pub const CARRIER_PREFIX: &str = "carrier:";

/// The stable reason of a booking that found no drone within the capacity wait.
pub const NO_DRONE_AVAILABLE: &str = "no-drone-available";

/// A booking saga's input: the request as accepted, its trace, and how often it was rescheduled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BookingInput {
    #[serde(flatten)]
    pub request: DeliveryRequested,
    /// The booking's W3C `traceparent`, so a resumed saga stays in the booking's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Reschedules applied so far; the delivery of a rescheduled booking is updated, not created.
    #[serde(default)]
    pub revision: u32,
}

tokio::task_local! {
    /// The booking of the saga the current task drives, decoded once for its steps and
    /// announcements (see [`BookingInput::of`]); set up by [`with_booking_memo`].
    static MEMO: RefCell<Option<(String, Arc<BookingInput>)>>;
    /// The drone reservation RegisterPackage asked for alongside the package, for ReserveDrone
    /// (see [`DroneAhead`]); set up by [`with_booking_memo`].
    static AHEAD: RefCell<Option<DroneAhead>>;
}

/// Runs `task` (the driving of one saga) with a memo of its decoded booking: every step and
/// announcement reads the booking, and without the memo each decoded it from the saga's JSON
/// input again (about 7 % of the Scheduler's samples). It also carries the drone reservation
/// asked for ahead ([`DroneAhead`]) from RegisterPackage to ReserveDrone.
pub async fn with_booking_memo<F: std::future::Future>(task: F) -> F::Output {
    MEMO.scope(RefCell::new(None), AHEAD.scope(RefCell::new(None), task))
        .await
}

/// The drone reservation of a first booking that needs no carrier leg, asked for by
/// RegisterPackage at the same time as the package (ReserveDrone's request depends only on the
/// booking then, not on the package), so the saga waits for the slower of the two calls instead
/// of for both in turn. ReserveDrone takes the answer as its own if it is a reservation: the same
/// request under the same delivery id answers the same reservation, so taking it is what calling
/// again would give. An error is not kept for it (ReserveDrone asks again, as it always did), and
/// neither is anything for another saga or revision.
///
/// Nothing is left half done by it. From RegisterPackage on, a journal cannot tell whether
/// ReserveDrone's call was made (its success is written with a later step's,
/// `BookingStep::under_way_from`), so every compensation from there already releases the drone
/// as in doubt: after RegisterPackage failed, after a cancel between the two steps, or after a
/// crash. The answer lives in the driving task only: a saga resumed elsewhere (a crash, a takeover,
/// a park) asks again.
#[derive(Debug)]
struct DroneAhead {
    saga_id: String,
    /// Only a reservation is kept; a failed call leaves `None`, so a retried RegisterPackage
    /// does not ask the drone service again.
    reservation: Option<contracts::DroneReservation>,
}

impl DroneAhead {
    /// Whether saga `id`'s drone was already asked for in this task (or there is no task to
    /// keep an answer in, so it must not be asked for ahead).
    fn asked(id: &str) -> bool {
        AHEAD
            .try_with(|a| a.borrow().as_ref().is_some_and(|a| a.saga_id == id))
            .unwrap_or(true)
    }

    fn keep(id: &str, reservation: Option<contracts::DroneReservation>) {
        let _ = AHEAD.try_with(|a| {
            *a.borrow_mut() = Some(DroneAhead {
                saga_id: id.to_owned(),
                reservation,
            });
        });
    }

    /// Saga `id`'s reservation asked for ahead, once.
    fn take(id: &str) -> Option<contracts::DroneReservation> {
        AHEAD
            .try_with(|a| {
                let mut a = a.borrow_mut();
                if a.as_ref().is_some_and(|a| a.saga_id == id) {
                    a.take().and_then(|a| a.reservation)
                } else {
                    None
                }
            })
            .ok()
            .flatten()
    }
}

impl BookingInput {
    /// The booking of `saga`. Decoded from its input once per driving task and revision: the
    /// input changes only by a reschedule, which raises the revision, so a memo of the same saga
    /// and revision is the same booking. Outside a task with a memo, decoded each time.
    pub fn of(saga: &SagaRecord) -> Result<Arc<Self>, StepError> {
        let revision = revision_of(&saga.input);
        let hit = MEMO
            .try_with(|m| {
                m.borrow()
                    .as_ref()
                    .filter(|(id, b)| *id == saga.id && b.revision == revision)
                    .map(|(_, b)| b.clone())
            })
            .ok()
            .flatten();
        if let Some(booking) = hit {
            return Ok(booking);
        }
        let booking = Arc::new(Self::decode(saga)?);
        Self::remember(&saga.id, &booking);
        Ok(booking)
    }

    /// Keeps `booking` as saga `id`'s in the current task's memo, if it has one.
    pub fn remember(id: &str, booking: &Arc<Self>) {
        let _ = MEMO.try_with(|m| *m.borrow_mut() = Some((id.to_owned(), booking.clone())));
    }

    /// Read from the saga's input in place (no copy of the JSON, and no `flatten`, which
    /// buffers the whole object first).
    fn decode(saga: &SagaRecord) -> Result<Self, StepError> {
        let input = &saga.input;
        let request = DeliveryRequested::deserialize(input)
            .map_err(|e| StepError::permanent(format!("saga input is not a booking: {e}")))?;
        Ok(Self {
            request,
            traceparent: input
                .get("traceparent")
                .and_then(Value::as_str)
                .map(str::to_owned),
            revision: revision_of(input),
        })
    }

    /// The trace id (`00-<trace id>-<span id>-<flags>`).
    pub fn trace_id(&self) -> Option<String> {
        let id = self.traceparent.as_deref()?.split('-').nth(1)?;
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
    }

    /// This booking with a reschedule applied.
    pub fn rescheduled(&self, change: &DeliveryRescheduled) -> Self {
        let mut next = self.clone();
        let r = &mut next.request;
        if let Some(t) = change.pickup_time {
            r.pickup_time = t;
        }
        if let Some(v) = &change.pickup_location {
            r.pickup_location = v.clone();
        }
        if let Some(v) = &change.drop_off_location {
            r.drop_off_location = v.clone();
        }
        if let Some(v) = &change.deadline {
            r.deadline = v.clone();
        }
        next.revision += 1;
        next
    }
}

/// What steps share: the domain services, the metrics, and what the fleet can do alone.
pub struct Ctx {
    pub domain: Arc<dyn Domain>,
    /// Account statuses from `account-events`: checks answered without a call while fresh.
    pub accounts: Arc<crate::accounts::AccountCopy>,
    pub metrics: Arc<Metrics>,
    pub third_party: ThirdPartyRules,
    /// Whether RegisterPackage asks for a first booking's drone at the same time when no carrier
    /// leg is needed ([`DroneAhead`]; `APP_SCHEDULER__RESERVE_DRONE_WITH_PACKAGE`).
    pub drone_with_package: bool,
}

/// Whether a booking needs a carrier leg, and why (or why not).
#[derive(Debug, Clone, PartialEq)]
pub enum LegNeed {
    /// The drones can do it alone.
    None { reason: String },
    /// A carrier takes the package to within `handover_within_km` of the drop-off.
    Part {
        handover_within_km: f64,
        reason: String,
    },
    /// A carrier takes the package all the way.
    Whole { reason: String },
}

impl ThirdPartyRules {
    /// What `b` needs from a carrier under these rules.
    pub fn need(&self, b: &DeliveryRequested) -> LegNeed {
        let weight = b.package_info.weight;
        if weight > self.max_drone_payload_kg {
            return LegNeed::Whole {
                reason: format!(
                    "the package weighs {weight} kg, more than any drone carries ({} kg)",
                    self.max_drone_payload_kg
                ),
            };
        }
        match (
            GeoPoint::parse(&b.pickup_location),
            GeoPoint::parse(&b.drop_off_location),
        ) {
            (Some(from), Some(to)) => {
                let km = from.distance_km(to);
                if km > self.drone_range_km {
                    LegNeed::Part {
                        handover_within_km: self.drone_range_km,
                        reason: format!(
                            "the drop-off is {km:.1} km from the pickup, beyond the drones' {} km range",
                            self.drone_range_km
                        ),
                    }
                } else {
                    LegNeed::None {
                        reason: format!(
                            "the drop-off is {km:.1} km from the pickup, within the drones' {} km range",
                            self.drone_range_km
                        ),
                    }
                }
            }
            _ => LegNeed::None {
                reason:
                    "the locations are addresses, not points: the drones' own planning covers them"
                        .into(),
            },
        }
    }
}

/// A booking input's revision (0 when it has none).
fn revision_of(input: &Value) -> u32 {
    input
        .get("revision")
        .and_then(Value::as_u64)
        .and_then(|r| u32::try_from(r).ok())
        .unwrap_or(0)
}

/// ReserveDrone's request for booking `b` (delivery `id`): with a carrier leg, the drone starts
/// where and when the carrier hands over.
fn reservation_request(
    b: &DeliveryRequested,
    leg: Option<&CarrierLeg>,
    id: &str,
) -> DroneReservationRequest {
    let (pickup_location, pickup_time) = match leg {
        Some(l) => (l.to_location.clone(), l.handover_time),
        None => (b.pickup_location.clone(), b.pickup_time),
    };
    DroneReservationRequest {
        pickup_time,
        pickup_location,
        drop_off_location: b.drop_off_location.clone(),
        package_id: id.to_owned(),
        size: b.package_info.size,
        expedited: b.expedited,
        owner_id: Some(b.owner_id.clone()),
    }
}

/// The carrier leg a saga holds (ArrangeThirdParty's output), if it booked one.
pub fn carrier_leg(saga: &SagaRecord) -> Option<CarrierLeg> {
    let out = saga.outputs.get(BookingStep::ArrangeThirdParty.as_str())?;
    if out["required"].as_bool() != Some(true) {
        return None;
    }
    serde_json::from_value(out["leg"].clone()).ok()
}

fn step_error(e: CallError) -> StepError {
    match e {
        CallError::Transient {
            reason,
            retry_after,
        } => StepError::Transient {
            reason,
            retry_after,
        },
        CallError::Permanent { reason, .. } => StepError::Permanent { reason },
        // Not tried: the service's breaker is open (or its call cap full). Wait as a timer.
        CallError::Rejected {
            reason,
            retry_after,
        } => StepError::Deferred {
            reason,
            wait: retry_after,
        },
    }
}

/// Wraps a step's action with its metrics.
struct Metered<S: ?Sized> {
    inner: Box<S>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl<S: Step<Ctx> + ?Sized> Step<Ctx> for Metered<S> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn policy(&self) -> RetryPolicy {
        self.inner.policy()
    }
    async fn run(&self, ctx: &Ctx, saga: &SagaRecord) -> Result<Value, StepError> {
        let started = std::time::Instant::now();
        let result = self.inner.run(ctx, saga).await;
        let outcome = match &result {
            Ok(_) => "succeeded",
            Err(StepError::Transient { .. }) => "transient",
            Err(StepError::Permanent { .. }) => "permanent",
            Err(StepError::Deferred { .. }) => saga::DEFERRED,
        };
        self.metrics.step(self.name(), outcome, started.elapsed());
        result
    }
    fn written_with_next(&self, saga: &SagaRecord, output: &Value) -> bool {
        self.inner.written_with_next(saga, output)
    }
    fn reads_only(&self) -> bool {
        self.inner.reads_only()
    }
}

struct CheckAccount(RetryPolicy);
struct RegisterPackage(RetryPolicy);
struct ArrangeThirdParty(RetryPolicy);
struct ReserveDrone(RetryPolicy);
struct CreateDelivery(RetryPolicy);

#[async_trait]
impl Step<Ctx> for CheckAccount {
    fn name(&self) -> &'static str {
        BookingStep::CheckAccount.as_str()
    }
    fn policy(&self) -> RetryPolicy {
        self.0
    }
    async fn run(&self, ctx: &Ctx, saga: &SagaRecord) -> Result<Value, StepError> {
        let input = BookingInput::of(saga)?;
        let b = &input.request;
        // The copy answers while it is fresh; an account it does not know (created a moment
        // ago) or a copy that may be stale is asked of Account, as before.
        let (id, status, source) = match ctx.accounts.lookup(&b.owner_id) {
            Lookup::Known(status) => (b.owner_id.clone(), status, "copy"),
            Lookup::Unknown | Lookup::Stale => {
                let account = ctx.domain.account(&b.owner_id).await.map_err(step_error)?;
                (account.id, account.status, "call")
            }
        };
        ctx.metrics.account_checked(source);
        if status != AccountStatus::Active {
            return Err(StepError::permanent(format!(
                "account '{id}' is {}",
                status.as_str()
            )));
        }
        Ok(json!({"accountId": id, "status": status, "checkedBy": source}))
    }
    /// A read: it runs before the saga is recorded, and its success is written with the start
    /// (`Engine::start_checked`), so a booking's first write already has it behind it.
    ///
    /// Not written with the next step's, though: with RegisterPackage's, a journal saying "CheckAccount
    /// next" could no longer tell a booking refused at its account check (nothing to undo) from
    /// one whose package was registered just before a crash, and every refused booking would
    /// need a compensation.
    fn reads_only(&self) -> bool {
        true
    }
}

#[async_trait]
impl Step<Ctx> for RegisterPackage {
    fn name(&self) -> &'static str {
        BookingStep::RegisterPackage.as_str()
    }
    fn policy(&self) -> RetryPolicy {
        self.0
    }
    async fn run(&self, ctx: &Ctx, saga: &SagaRecord) -> Result<Value, StepError> {
        let input = BookingInput::of(saga)?;
        let b = &input.request;
        let id = b.delivery_id.to_string();
        let body = PackageUpsert {
            owner_id: b.owner_id.clone(),
            external_id: b.package_info.package_id.clone(),
            size: b.package_info.size,
            weight: b.package_info.weight,
            tag: b.package_info.tag.clone(),
        };
        let ahead = ctx.drone_with_package
            && input.revision == 0
            && !saga
                .outputs
                .contains_key(BookingStep::ReserveDrone.as_str())
            && matches!(ctx.third_party.need(b), LegNeed::None { .. })
            && !DroneAhead::asked(&id);
        let p = if ahead {
            let drone = reservation_request(b, None, &id);
            let (p, r) = tokio::join!(
                ctx.domain.put_package(&id, &body),
                ctx.domain.reserve_drone(&id, &drone)
            );
            DroneAhead::keep(&id, r.ok());
            p
        } else {
            ctx.domain.put_package(&id, &body).await
        }
        .map_err(step_error)?;
        Ok(json!({"packageId": p.id}))
    }
    /// Registered idempotently under the delivery's id (the same call again answers the same
    /// package): written with the next step's success, as the compensation expects
    /// (`BookingStep::may_write_with_next`, which decides).
    fn written_with_next(&self, _saga: &SagaRecord, _output: &Value) -> bool {
        BookingStep::RegisterPackage.may_write_with_next()
    }
}

#[async_trait]
impl Step<Ctx> for ArrangeThirdParty {
    fn name(&self) -> &'static str {
        BookingStep::ArrangeThirdParty.as_str()
    }
    fn policy(&self) -> RetryPolicy {
        self.0
    }
    async fn run(&self, ctx: &Ctx, saga: &SagaRecord) -> Result<Value, StepError> {
        let input = BookingInput::of(saga)?;
        let b = &input.request;
        let id = b.delivery_id.to_string();
        let leg_id = carrier_leg_id(&id, input.revision);
        let (handover_within_km, reason) = match ctx.third_party.need(b) {
            LegNeed::None { reason } => (None, reason),
            LegNeed::Part {
                handover_within_km,
                reason,
            } => (Some(Some(handover_within_km)), reason),
            LegNeed::Whole { reason } => (Some(None), reason),
        };
        let leg = match handover_within_km {
            None => None,
            Some(handover_within_km) => {
                let body = LegRequest {
                    owner_id: b.owner_id.clone(),
                    pickup_location: b.pickup_location.clone(),
                    drop_off_location: b.drop_off_location.clone(),
                    pickup_time: b.pickup_time,
                    size: b.package_info.size,
                    weight: b.package_info.weight,
                    handover_within_km,
                };
                let leg = ctx
                    .domain
                    .arrange_leg(&leg_id, &body)
                    .await
                    .map_err(step_error)?;
                Some(leg)
            }
        };
        // A rescheduled booking re-plans: the legs of its earlier revisions are cancelled once the
        // new plan stands (idempotent; a retry after a crash cancels them again). Every earlier
        // revision's, not only the one the last output names: an attempt whose answer was lost
        // may have booked one before a reschedule sent the saga back (found by the simulation,
        // SIM_SEED=6). A revision that never booked one is cancelled as a no-op.
        if input.revision > 0 {
            for revision in 0..input.revision {
                ctx.domain
                    .cancel_leg(&carrier_leg_id(&id, revision))
                    .await
                    .map_err(step_error)?;
            }
        }
        let mut output = match leg {
            None => json!({"required": false, "reason": reason}),
            Some(leg) => json!({
                "required": true,
                "reason": reason,
                "legId": leg_id,
                "leg": CarrierLeg::from(&leg),
            }),
        };
        if input.revision > 0 {
            output["cancelledEarlierLegs"] = json!(input.revision);
        }
        Ok(output)
    }
    /// No leg needed and none cancelled: nothing changed, so its success is written with
    /// ReserveDrone's (where `BookingStep::may_write_with_next` allows it).
    fn written_with_next(&self, _saga: &SagaRecord, output: &Value) -> bool {
        BookingStep::ArrangeThirdParty.may_write_with_next()
            && output["required"] == json!(false)
            && output.get("cancelledEarlierLegs").is_none()
    }
}

#[async_trait]
impl Step<Ctx> for ReserveDrone {
    fn name(&self) -> &'static str {
        BookingStep::ReserveDrone.as_str()
    }
    fn policy(&self) -> RetryPolicy {
        self.0
    }
    async fn run(&self, ctx: &Ctx, saga: &SagaRecord) -> Result<Value, StepError> {
        let input = BookingInput::of(saga)?;
        let b = &input.request;
        let id = b.delivery_id.to_string();
        // With a carrier leg, the drone starts where and when the carrier hands over.
        let leg = carrier_leg(saga);
        if let Some(leg) = leg.as_ref().filter(|l| l.whole_route) {
            // No drone flies. One reserved for an earlier plan of this booking is released.
            let had_drone = saga
                .outputs
                .get(BookingStep::ReserveDrone.as_str())
                .and_then(|o| o["droneId"].as_str())
                .is_some_and(|d| !d.starts_with(CARRIER_PREFIX));
            if had_drone {
                ctx.domain.release_drone(&id).await.map_err(step_error)?;
            }
            return Ok(json!({
                "droneId": format!("{CARRIER_PREFIX}{}", leg.carrier_id),
                "carrier": leg.carrier_name,
                "window": null,
            }));
        }
        // Asked for by RegisterPackage with this very request (a first booking, no leg).
        let ahead = (leg.is_none() && input.revision == 0)
            .then(|| DroneAhead::take(&id))
            .flatten();
        let r = match ahead {
            Some(r) => {
                ctx.metrics.drone_reserved("with-package");
                r
            }
            None => {
                let r = ctx
                    .domain
                    .reserve_drone(&id, &reservation_request(b, leg.as_ref(), &id))
                    .await
                    .map_err(step_error)?;
                ctx.metrics.drone_reserved("by-step");
                r
            }
        };
        Ok(json!({"droneId": r.drone_id, "window": r.window}))
    }
    /// A first booking's reservation is made idempotently under the delivery's id (the same
    /// call again answers the reservation it has): written with CreateDelivery's success
    /// (where `BookingStep::may_write_with_next` allows it). A rescheduled booking's moves or
    /// releases what an earlier plan held, decided from the outputs on record, so it writes its
    /// own.
    fn written_with_next(&self, saga: &SagaRecord, _output: &Value) -> bool {
        BookingStep::ReserveDrone.may_write_with_next()
            && BookingInput::of(saga).is_ok_and(|b| b.revision == 0)
    }
}

#[async_trait]
impl Step<Ctx> for CreateDelivery {
    fn name(&self) -> &'static str {
        BookingStep::CreateDelivery.as_str()
    }
    fn policy(&self) -> RetryPolicy {
        self.0
    }
    async fn run(&self, ctx: &Ctx, saga: &SagaRecord) -> Result<Value, StepError> {
        let input = BookingInput::of(saga)?;
        let b = &input.request;
        let id = b.delivery_id.to_string();
        let drone_id = saga
            .outputs
            .get(BookingStep::ReserveDrone.as_str())
            .and_then(|o| o["droneId"].as_str())
            .ok_or_else(|| StepError::permanent("no drone in the ReserveDrone output"))?
            .to_owned();
        let body = DeliveryUpsert {
            owner_id: b.owner_id.clone(),
            pickup_location: b.pickup_location.clone(),
            drop_off_location: b.drop_off_location.clone(),
            pickup_time: b.pickup_time,
            deadline: b.deadline.clone(),
            expedited: b.expedited,
            confirmation_required: b.confirmation_required,
            package_id: id.clone(),
            drone_id: drone_id.clone(),
        };
        ctx.domain
            .put_delivery(&id, &body)
            .await
            .map_err(step_error)?;
        if input.revision > 0 {
            // Rescheduled: the PUT found the delivery an earlier run made (or made it with the new
            // values); either way the delivery now takes the new values and drone.
            let patch = DeliveryPatch {
                pickup_time: Some(b.pickup_time),
                deadline: (!b.deadline.is_empty()).then(|| b.deadline.clone()),
                pickup_location: Some(b.pickup_location.clone()),
                drop_off_location: Some(b.drop_off_location.clone()),
                drone_id: Some(drone_id.clone()),
            };
            ctx.domain
                .reschedule_delivery(&id, &patch)
                .await
                .map_err(step_error)?;
        }
        Ok(json!({"deliveryId": id, "droneId": drone_id, "revision": input.revision}))
    }
}

/// The steps, in order, with their policies and metrics.
pub fn steps(policies: &StepPolicies, metrics: &Arc<Metrics>) -> Vec<Arc<dyn Step<Ctx>>> {
    let metered = |s: Box<dyn Step<Ctx>>| -> Arc<dyn Step<Ctx>> {
        Arc::new(Metered {
            inner: s,
            metrics: metrics.clone(),
        })
    };
    vec![
        metered(Box::new(CheckAccount(policies.account))),
        metered(Box::new(RegisterPackage(policies.package))),
        metered(Box::new(ArrangeThirdParty(policies.third_party))),
        metered(Box::new(ReserveDrone(policies.drone))),
        metered(Box::new(CreateDelivery(policies.delivery))),
    ]
}

/// The index of a step in the saga.
pub fn index_of(step: BookingStep) -> usize {
    BookingStep::ALL
        .iter()
        .position(|s| *s == step)
        .unwrap_or(0)
}

/// A lifecycle event for the `workflow-events` log, as an outbox row: the state the client sees,
/// with the package and drone the saga holds so far.
pub fn state_event(
    saga: &SagaRecord,
    state: RequestState,
    detail: Option<String>,
) -> Option<OutboxMessage> {
    let input = BookingInput::of(saga).ok()?;
    let b = &input.request;
    let output = |step: BookingStep, field: &str| {
        saga.outputs
            .get(step.as_str())
            .and_then(|o| o[field].as_str())
            .map(str::to_owned)
    };
    let pickup_window = saga
        .outputs
        .get(BookingStep::ReserveDrone.as_str())
        .and_then(|o| serde_json::from_value::<TimeWindow>(o["window"].clone()).ok());
    let body = WorkflowStateChanged {
        delivery_id: b.delivery_id,
        owner_id: b.owner_id.clone(),
        state,
        version: saga.version,
        detail,
        at: chrono::Utc::now(),
        package_id: output(BookingStep::RegisterPackage, "packageId"),
        drone_id: output(BookingStep::ReserveDrone, "droneId"),
        pickup_window,
        pickup_location: Some(b.pickup_location.clone()),
        drop_off_location: Some(b.drop_off_location.clone()),
        pickup_time: Some(b.pickup_time),
        revision: Some(input.revision),
        carrier_leg: carrier_leg(saga),
    };
    envelope_message(WORKFLOW_EVENTS_LOG, WORKFLOW_STATE_CHANGED, &saga.id, &body)
}

/// A compensation request for the Supervisor, as an outbox row. Every step that ever succeeded
/// is undone, also one past `next_step`: a rescheduled booking runs again from ReserveDrone while
/// the delivery it created earlier still stands.
pub fn compensation(saga: &SagaRecord, reason: &str) -> Option<OutboxMessage> {
    let input = BookingInput::of(saga).ok()?;
    let b = &input.request;
    // ArrangeThirdParty that decided no leg was needed has nothing to undo (legs of earlier
    // revisions it cancelled itself before it succeeded).
    let no_leg = |s: &BookingStep| {
        *s == BookingStep::ArrangeThirdParty
            && saga
                .outputs
                .get(s.as_str())
                .is_some_and(|o| o["required"].as_bool() == Some(false))
    };
    let succeeded: Vec<String> = BookingStep::ALL
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            s.has_effect()
                && (*i < saga.next_step || saga.outputs.contains_key(s.as_str()))
                && !no_leg(s)
        })
        .map(|(_, s)| s.as_str().to_owned())
        .collect();
    // In doubt: the step under way (an attempt may have reached the service), and for a
    // rescheduled booking every later step too: a reschedule can send the saga back while a later
    // step was being retried, after an attempt whose answer was lost had taken effect. Undoing
    // what never happened is a no-op.
    // The steps under way reach past `next_step` by the steps whose success is written with the
    // next one's (`BookingStep::under_way_from`): the journal still names the first of them when
    // a crash came after a later step's call.
    let rescheduled = input.revision > 0;
    let under_way = BookingStep::ALL
        .get(saga.next_step)
        .map_or(&[][..], |s| BookingStep::under_way_from(*s));
    let in_doubt = BookingStep::ALL
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            s.has_effect() && (under_way.contains(s) || (rescheduled && *i > saga.next_step))
        })
        .map(|(_, s)| s.as_str().to_owned())
        .filter(|s| !succeeded.contains(s))
        .collect::<Vec<String>>();
    let third_party = BookingStep::ArrangeThirdParty.as_str();
    let carrier_legs = if succeeded.iter().chain(&in_doubt).any(|s| s == third_party) {
        carrier_leg_ids(&b.delivery_id.to_string(), input.revision)
    } else {
        Vec::new()
    };
    let body = CompensationRequest {
        delivery_id: b.delivery_id,
        owner_id: b.owner_id.clone(),
        succeeded_steps: succeeded,
        in_doubt_steps: in_doubt,
        carrier_legs,
        reason: reason.to_owned(),
        saga_version: saga.version,
    };
    if body.succeeded_steps.is_empty() && body.in_doubt_steps.is_empty() {
        return None;
    }
    envelope_message(COMPENSATIONS_QUEUE, COMPENSATION_REQUESTED, &saga.id, &body)
}

fn envelope_message(
    destination: &str,
    kind: &str,
    key: &str,
    body: &impl Serialize,
) -> Option<OutboxMessage> {
    // The envelope (and its id) is fixed when the row is written, so a re-sent row is recognisable.
    // Encoded once, from the typed body: the row's text is what the relay hands the broker.
    let envelope = Envelope::typed(kind, 1, key, body);
    Some(OutboxMessage {
        destination: destination.to_owned(),
        key: key.to_owned(),
        payload: RawJson::encode(&envelope).ok()?,
    })
}

/// A failed saga's error as the client sees it: the stable `no-drone-available` first when that
/// is why.
pub fn client_reason(error: &str) -> String {
    if error.contains(NO_DRONE_AVAILABLE) && !error.starts_with(NO_DRONE_AVAILABLE) {
        format!("{NO_DRONE_AVAILABLE}: {error}")
    } else {
        error.to_owned()
    }
}

/// Lifecycle → workflow events and compensation requests, committed with each change; signals →
/// what they do to the booking.
pub struct BookingHooks;

impl Hooks<Ctx> for BookingHooks {
    fn announce(&self, _ctx: &Ctx, saga: &SagaRecord, change: &Lifecycle) -> Vec<OutboxMessage> {
        let mut out = Vec::new();
        match change {
            // Counted by the worker once the start proved new: this runs before it is known.
            Lifecycle::Started => {
                out.extend(state_event(saga, RequestState::Scheduling, None));
            }
            Lifecycle::StepSucceeded { .. } => {}
            Lifecycle::Completed => {
                let detail = BookingInput::of(saga)
                    .ok()
                    .filter(|b| b.revision > 0)
                    .map(|b| format!("rescheduled to {}", b.request.pickup_time.to_rfc3339()));
                out.extend(state_event(saga, RequestState::Scheduled, detail));
            }
            Lifecycle::Failed { step, reason } => {
                let detail = client_reason(&format!("{step}: {reason}"));
                out.extend(state_event(
                    saga,
                    RequestState::Failed,
                    Some(detail.clone()),
                ));
                out.extend(compensation(saga, &detail));
            }
            Lifecycle::Cancelled { reason } => {
                out.extend(state_event(
                    saga,
                    RequestState::Cancelled,
                    Some(reason.clone()),
                ));
                out.extend(compensation(saga, reason));
            }
            Lifecycle::Rewound { detail } => {
                out.extend(state_event(
                    saga,
                    RequestState::Scheduling,
                    Some(detail.clone()),
                ));
            }
        }
        out
    }

    fn committed(&self, ctx: &Ctx, _saga: &SagaRecord, change: &Lifecycle) {
        // Counted once durable: a final write refused by a fence (a new owner took the saga
        // over) is not counted here, and the new owner's is.
        match change {
            Lifecycle::Completed => ctx.metrics.finished("scheduled"),
            Lifecycle::Failed { .. } => ctx.metrics.finished("failed"),
            Lifecycle::Cancelled { .. } => ctx.metrics.finished("cancelled"),
            Lifecycle::Started | Lifecycle::StepSucceeded { .. } | Lifecycle::Rewound { .. } => {}
        }
    }

    fn on_signal(&self, _ctx: &Ctx, saga: &SagaRecord, signal: &Signal) -> SignalAction {
        let state = SagaState::parse(&saga.state);
        let live = matches!(state, Some(SagaState::Running | SagaState::Completed));
        match signal.kind.as_str() {
            DELIVERY_CANCELLED if live => SignalAction::Cancel {
                reason: CLIENT_CANCEL.into(),
            },
            DELIVERY_RESCHEDULED if live => {
                let change: DeliveryRescheduled =
                    match serde_json::from_value(signal.payload.clone()) {
                        Ok(c) => c,
                        Err(e) => {
                            return SignalAction::Ignore {
                                why: format!("undecodable reschedule: {e}"),
                            }
                        }
                    };
                let current = match BookingInput::of(saga) {
                    Ok(b) => b,
                    Err(e) => return SignalAction::Ignore { why: e.to_string() },
                };
                let next = current.rescheduled(&change);
                // A new time or place needs the carrier leg re-planned and the drone window
                // moved; a new deadline text only the delivery updated.
                let moves = next.request.pickup_time != current.request.pickup_time
                    || next.request.pickup_location != current.request.pickup_location
                    || next.request.drop_off_location != current.request.drop_off_location;
                let to = if moves {
                    BookingStep::ArrangeThirdParty
                } else {
                    BookingStep::CreateDelivery
                };
                SignalAction::Rewind {
                    deadline: Some(next.request.pickup_time),
                    detail: format!("rescheduling to {}", next.request.pickup_time.to_rfc3339()),
                    input: serde_json::to_value(&next).unwrap_or(Value::Null),
                    to_step: index_of(to),
                }
            }
            other => SignalAction::Ignore {
                why: format!("{other} on a {} booking: nothing to change", saga.state),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic
mod tests {
    use super::*;

    /// The compensation request `saga` hands the Supervisor, decoded from its outbox row.
    fn compensation_request(saga: &SagaRecord, reason: &str) -> CompensationRequest {
        let message = compensation(saga, reason).expect("something to undo");
        let envelope: Envelope = serde_json::from_str(message.payload.get()).expect("an envelope");
        envelope.decode().expect("a request")
    }

    /// Found by the simulation: a scheduled booking rescheduled to a full slot runs again from
    /// ReserveDrone and fails there; its compensation must still undo the delivery it created.
    #[test]
    fn compensation_undoes_what_a_rewound_saga_made_earlier() {
        let id = uuid::Uuid::new_v4();
        let request = DeliveryRequested {
            delivery_id: id,
            owner_id: "acc".into(),
            pickup_location: "a".into(),
            drop_off_location: "b".into(),
            pickup_time: chrono::Utc::now(),
            deadline: String::new(),
            expedited: false,
            confirmation_required: contracts::ConfirmationType::None,
            package_info: contracts::PackageInfo {
                package_id: "p".into(),
                size: contracts::PackageSize::Small,
                weight: 1.0,
                tag: None,
            },
            accepted_at: chrono::Utc::now(),
        };
        let input = BookingInput {
            request,
            traceparent: None,
            revision: 1,
        };
        let mut outputs = serde_json::Map::new();
        for s in BookingStep::ALL {
            outputs.insert(s.as_str().to_owned(), json!({}));
        }
        outputs.insert(
            BookingStep::ArrangeThirdParty.as_str().to_owned(),
            json!({"required": false, "reason": "within range"}),
        );
        let saga = saga_record(
            &id.to_string(),
            &input,
            "failed",
            outputs,
            BookingStep::ReserveDrone,
            9,
        );
        // Found by the simulation (SIM_SEED=562): CreateDelivery was being retried after an
        // attempt whose answer was lost had created the delivery, when a reschedule sent the
        // saga back to ReserveDrone, which then found no drone.
        let mut in_progress = saga.clone();
        in_progress
            .outputs
            .remove(BookingStep::CreateDelivery.as_str());
        let request = compensation_request(&in_progress, "no drone");
        assert!(request
            .steps_to_undo()
            .contains(&BookingStep::CreateDelivery));
        let request = compensation_request(&saga, "no drone");
        assert_eq!(
            request.steps_to_undo(),
            vec![
                BookingStep::CreateDelivery,
                BookingStep::ReserveDrone,
                BookingStep::RegisterPackage
            ]
        );
        assert!(request.carrier_legs.is_empty(), "no leg was needed");

        // With a carrier leg, every revision's leg id is named for the Supervisor to cancel.
        let mut with_leg = saga.clone();
        with_leg.outputs.insert(
            BookingStep::ArrangeThirdParty.as_str().to_owned(),
            json!({"required": true, "legId": format!("{id}.r1")}),
        );
        let request = compensation_request(&with_leg, "no drone");
        assert_eq!(
            request.steps_to_undo(),
            vec![
                BookingStep::CreateDelivery,
                BookingStep::ReserveDrone,
                BookingStep::ArrangeThirdParty,
                BookingStep::RegisterPackage
            ]
        );
        assert_eq!(
            request.carrier_legs,
            vec![id.to_string(), format!("{id}.r1")]
        );
    }

    /// Caught by `make test` (`chaos::scheduler_kill_under_load`): when a step's success is
    /// written with the next one's, a saga whose journal still names the first may have made the
    /// next one's call just before a crash; cancelled then, it must undo that too. CheckAccount
    /// (which folded then) no longer folds; RegisterPackage, ArrangeThirdParty (with no leg) and
    /// a first booking's ReserveDrone do, so from any of them the calls up to CreateDelivery's
    /// may have been made.
    #[test]
    fn the_step_in_doubt_reaches_past_steps_that_write_with_the_next() {
        let input = BookingInput {
            request: requested("a", "b", 1.0),
            traceparent: None,
            revision: 0,
        };
        let saga_at = |next: BookingStep, outputs: &[BookingStep]| {
            let outputs = outputs
                .iter()
                .map(|s| (s.as_str().to_owned(), json!({})))
                .collect();
            saga_record(
                &uuid::Uuid::nil().to_string(),
                &input,
                "cancelled",
                outputs,
                next,
                2,
            )
        };
        let in_doubt = |saga: &SagaRecord| -> Vec<String> {
            compensation_request(saga, "cancelled by the client").in_doubt_steps
        };
        // Refused at the account check: nothing happened, nothing to undo.
        assert!(compensation(&saga_at(BookingStep::CheckAccount, &[]), "suspended").is_none());
        assert_eq!(
            in_doubt(&saga_at(
                BookingStep::RegisterPackage,
                &[BookingStep::CheckAccount]
            )),
            [
                "RegisterPackage",
                "ArrangeThirdParty",
                "ReserveDrone",
                "CreateDelivery"
            ]
        );
        assert_eq!(
            in_doubt(&saga_at(
                BookingStep::ArrangeThirdParty,
                &[BookingStep::CheckAccount, BookingStep::RegisterPackage]
            )),
            ["ArrangeThirdParty", "ReserveDrone", "CreateDelivery"]
        );
        assert_eq!(
            in_doubt(&saga_at(
                BookingStep::ReserveDrone,
                &[
                    BookingStep::CheckAccount,
                    BookingStep::RegisterPackage,
                    BookingStep::ArrangeThirdParty
                ]
            )),
            ["ReserveDrone", "CreateDelivery"]
        );
    }

    /// The booking memo of a driving task: the same saga and revision is served from it, a
    /// reschedule (a new revision) or another saga is decoded afresh, and without a memo every
    /// read decodes.
    #[tokio::test]
    async fn a_rescheduled_booking_is_never_read_from_the_memo() {
        let record = |id: &str, booking: &BookingInput| {
            saga_record(
                id,
                booking,
                "running",
                serde_json::Map::new(),
                BookingStep::CheckAccount,
                1,
            )
        };
        let first = BookingInput {
            request: requested("a", "b", 1.0),
            traceparent: None,
            revision: 0,
        };
        let moved = first.rescheduled(&DeliveryRescheduled {
            delivery_id: first.request.delivery_id,
            owner_id: "acc".into(),
            pickup_time: None,
            pickup_location: Some("c".into()),
            drop_off_location: None,
            deadline: None,
            requested_at: chrono::Utc::now(),
        });
        let (saga, rescheduled) = (record("s-1", &first), record("s-1", &moved));
        let other = record("s-2", &moved);
        with_booking_memo(async {
            let a = BookingInput::of(&saga).expect("a booking");
            let again = BookingInput::of(&saga).expect("a booking");
            assert!(Arc::ptr_eq(&a, &again), "served from the memo");
            let b = BookingInput::of(&rescheduled).expect("a booking");
            assert_eq!(b.request.pickup_location, "c");
            assert_eq!(b.revision, 1);
            let c = BookingInput::of(&other).expect("a booking");
            assert!(!Arc::ptr_eq(&b, &c), "another saga is decoded afresh");
            assert_eq!(*c, moved);
        })
        .await;
        let a = BookingInput::of(&saga).expect("a booking");
        let again = BookingInput::of(&saga).expect("a booking");
        assert!(!Arc::ptr_eq(&a, &again), "no memo outside a driving task");
        assert_eq!(*a, first);
    }

    /// Booking saga `id` as the journal holds it.
    fn saga_record(
        id: &str,
        input: &BookingInput,
        state: &str,
        outputs: serde_json::Map<String, Value>,
        next: BookingStep,
        version: i64,
    ) -> SagaRecord {
        SagaRecord {
            id: id.to_owned(),
            kind: KIND.into(),
            shard: 0,
            state: state.to_owned(),
            input: serde_json::to_value(input).expect("encoded"),
            outputs,
            next_step: index_of(next),
            version,
            error: None,
            deadline: None,
            wake_at: None,
            signals: Vec::new(),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        }
    }

    fn requested(pickup: &str, drop_off: &str, weight: f64) -> DeliveryRequested {
        DeliveryRequested {
            delivery_id: uuid::Uuid::nil(),
            owner_id: "acc".into(),
            pickup_location: pickup.into(),
            drop_off_location: drop_off.into(),
            pickup_time: chrono::Utc::now(),
            deadline: String::new(),
            expedited: false,
            confirmation_required: contracts::ConfirmationType::None,
            package_info: contracts::PackageInfo {
                package_id: "p".into(),
                size: contracts::PackageSize::Small,
                weight,
                tag: None,
            },
            accepted_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_leg_is_needed_beyond_the_range_or_the_payload_only() {
        let rules = ThirdPartyRules::default();
        let seattle = "0,47.6062,-122.3321";
        let tacoma = "0,47.2529,-122.4443";
        let near = "0,47.62,-122.35";
        assert!(matches!(
            rules.need(&requested(seattle, tacoma, 2.0)),
            LegNeed::Part { handover_within_km, .. } if (handover_within_km - 20.0).abs() < 1e-9
        ));
        assert!(matches!(
            rules.need(&requested(seattle, near, 2.0)),
            LegNeed::None { .. }
        ));
        // Heavier than any drone carries: all the way, near or far.
        assert!(matches!(
            rules.need(&requested(seattle, near, 25.5)),
            LegNeed::Whole { .. }
        ));
        assert!(matches!(
            rules.need(&requested(seattle, tacoma, 40.0)),
            LegNeed::Whole { .. }
        ));
        // Addresses are not points: the drones' own planning covers them (as before).
        assert!(matches!(
            rules.need(&requested("1 Main St", "2 Side St", 2.0)),
            LegNeed::None { .. }
        ));
    }

    /// The package and drone services as RegisterPackage and ReserveDrone see them: every call
    /// recorded; the package answers `package` (a refusal, or a package), the drone a reservation
    /// or, while `drone_busy`, no drone. Nothing else is called by these two steps.
    struct Recording {
        calls: std::sync::Mutex<Vec<&'static str>>,
        package_refused: bool,
        drone_busy: std::sync::atomic::AtomicBool,
    }

    impl Recording {
        fn new(package_refused: bool, drone_busy: bool) -> Arc<Self> {
            Arc::new(Self {
                calls: std::sync::Mutex::new(Vec::new()),
                package_refused,
                drone_busy: std::sync::atomic::AtomicBool::new(drone_busy),
            })
        }
        fn calls(&self) -> Vec<&'static str> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
        fn record(&self, call: &'static str) {
            if let Ok(mut c) = self.calls.lock() {
                c.push(call);
            }
        }
    }

    fn not_here(what: &str) -> CallError {
        CallError::Permanent {
            reason: format!("{what} is not called by these steps"),
            status: None,
            code: None,
        }
    }

    #[async_trait]
    impl Domain for Recording {
        async fn account(&self, _: &str) -> Result<contracts::Account, CallError> {
            Err(not_here("account"))
        }
        async fn put_package(
            &self,
            id: &str,
            body: &PackageUpsert,
        ) -> Result<contracts::Package, CallError> {
            self.record("put_package");
            if self.package_refused {
                return Err(CallError::Permanent {
                    reason: "package PUT answered 409 (package-conflict)".into(),
                    status: Some(409),
                    code: Some("package-conflict".into()),
                });
            }
            Ok(contracts::Package {
                id: id.to_owned(),
                owner_id: body.owner_id.clone(),
                external_id: body.external_id.clone(),
                size: body.size,
                weight: body.weight,
                tag: body.tag.clone(),
                status: contracts::PackageStatus::Registered,
                created_at: chrono::Utc::now(),
                updated_at: chrono::Utc::now(),
            })
        }
        async fn delete_package(&self, _: &str) -> Result<(), CallError> {
            Err(not_here("delete_package"))
        }
        async fn arrange_leg(
            &self,
            _: &str,
            _: &LegRequest,
        ) -> Result<contracts::ThirdPartyLeg, CallError> {
            Err(not_here("arrange_leg"))
        }
        async fn cancel_leg(&self, _: &str) -> Result<(), CallError> {
            Err(not_here("cancel_leg"))
        }
        async fn reserve_drone(
            &self,
            id: &str,
            body: &DroneReservationRequest,
        ) -> Result<contracts::DroneReservation, CallError> {
            self.record("reserve_drone");
            if self.drone_busy.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(CallError::Transient {
                    reason: "drone PUT answered 503 (no-drone-available)".into(),
                    retry_after: None,
                });
            }
            Ok(contracts::DroneReservation {
                delivery_id: id.to_owned(),
                drone_id: "drone-7".into(),
                window: TimeWindow {
                    start: body.pickup_time,
                    end: body.pickup_time + chrono::Duration::minutes(30),
                },
                status: contracts::ReservationStatus::Active,
                package_id: body.package_id.clone(),
                size: body.size,
                owner_id: body.owner_id.clone(),
                pickup_location: body.pickup_location.clone(),
                drop_off_location: body.drop_off_location.clone(),
                expedited: body.expedited,
                created_at: chrono::Utc::now(),
                updated_at: chrono::Utc::now(),
            })
        }
        async fn release_drone(&self, _: &str) -> Result<(), CallError> {
            Err(not_here("release_drone"))
        }
        async fn put_delivery(&self, _: &str, _: &DeliveryUpsert) -> Result<(), CallError> {
            Err(not_here("put_delivery"))
        }
        async fn reschedule_delivery(
            &self,
            _: &str,
            _: &DeliveryPatch,
        ) -> Result<contracts::Delivery, CallError> {
            Err(not_here("reschedule_delivery"))
        }
        async fn cancel_delivery(&self, _: &str) -> Result<(), CallError> {
            Err(not_here("cancel_delivery"))
        }
    }

    fn ctx(domain: Arc<Recording>, drone_with_package: bool) -> Ctx {
        let clock: Arc<dyn saga::Clock> = Arc::new(saga::SystemClock);
        Ctx {
            domain,
            accounts: Arc::new(crate::accounts::AccountCopy::new(
                crate::accounts::AccountCopySettings::default(),
                clock,
            )),
            metrics: Arc::new(Metrics::register(&prometheus::Registry::new()).expect("metrics")),
            third_party: ThirdPartyRules::default(),
            drone_with_package,
        }
    }

    /// RegisterPackage, ArrangeThirdParty and ReserveDrone of `saga` in turn, as the engine runs
    /// them (each success's output recorded before the next step): their outputs, or the first
    /// error and at which step.
    async fn run_to_delivery(
        ctx: &Ctx,
        mut saga: SagaRecord,
    ) -> Result<serde_json::Map<String, Value>, (BookingStep, StepError)> {
        let all = steps(&StepPolicies::default(), &ctx.metrics);
        for step in [
            BookingStep::RegisterPackage,
            BookingStep::ArrangeThirdParty,
            BookingStep::ReserveDrone,
        ] {
            let output = all[index_of(step)]
                .run(ctx, &saga)
                .await
                .map_err(|e| (step, e))?;
            saga.outputs.insert(step.as_str().to_owned(), output);
            saga.next_step = index_of(step) + 1;
        }
        Ok(saga.outputs)
    }

    const SEATTLE: &str = "0,47.6062,-122.3321";
    const NEAR: &str = "0,47.62,-122.35";

    fn first_booking(drop_off: &str, weight: f64) -> SagaRecord {
        let input = BookingInput {
            request: requested(SEATTLE, drop_off, weight),
            traceparent: None,
            revision: 0,
        };
        saga_record(
            "s-1",
            &input,
            "running",
            serde_json::Map::new(),
            BookingStep::RegisterPackage,
            2,
        )
    }

    #[tokio::test]
    async fn a_first_booking_within_range_asks_for_its_drone_with_its_package() {
        let domain = Recording::new(false, false);
        let ctx = ctx(domain.clone(), true);
        let outputs = with_booking_memo(run_to_delivery(&ctx, first_booking(NEAR, 2.0)))
            .await
            .expect("the steps succeed");
        // One drone call, made while the package was registered; ReserveDrone used its answer.
        assert_eq!(domain.calls(), ["put_package", "reserve_drone"]);
        assert_eq!(
            outputs[BookingStep::ReserveDrone.as_str()]["droneId"],
            "drone-7"
        );
        let used = |asked: &str| {
            ctx.metrics
                .drone_reservations
                .with_label_values(&[asked])
                .get()
        };
        assert_eq!((used("with-package"), used("by-step")), (1, 0));
    }

    #[tokio::test]
    async fn the_drone_is_asked_for_in_its_own_step_otherwise() {
        // Switched off.
        let domain = Recording::new(false, false);
        with_booking_memo(run_to_delivery(
            &ctx(domain.clone(), false),
            first_booking(NEAR, 2.0),
        ))
        .await
        .expect("the steps succeed");
        assert_eq!(domain.calls(), ["put_package", "reserve_drone"]);
        // No task to keep the answer in: nothing asked ahead (it would be asked twice).
        let domain = Recording::new(false, false);
        let c = ctx(domain.clone(), true);
        let all = steps(&StepPolicies::default(), &c.metrics);
        all[index_of(BookingStep::RegisterPackage)]
            .run(&c, &first_booking(NEAR, 2.0))
            .await
            .expect("registered");
        assert_eq!(domain.calls(), ["put_package"]);
        // A heavy package goes by carrier all the way: no drone at all, and none asked ahead.
        let domain = Recording::new(false, false);
        let c = ctx(domain.clone(), true);
        let heavy = first_booking(NEAR, 40.0);
        with_booking_memo(async {
            all[index_of(BookingStep::RegisterPackage)]
                .run(&c, &heavy)
                .await
                .expect("registered");
        })
        .await;
        assert_eq!(domain.calls(), ["put_package"]);
        // A rescheduled booking moves what it holds in ReserveDrone, from the outputs on record.
        let domain = Recording::new(false, false);
        let c = ctx(domain.clone(), true);
        let mut moved = first_booking(NEAR, 2.0);
        moved.input["revision"] = json!(1);
        with_booking_memo(async {
            all[index_of(BookingStep::RegisterPackage)]
                .run(&c, &moved)
                .await
                .expect("registered");
        })
        .await;
        assert_eq!(domain.calls(), ["put_package"]);
    }

    #[tokio::test]
    async fn a_drone_refusal_asked_ahead_is_not_kept() {
        // No drone free while the package is registered: ReserveDrone asks again itself (the
        // answer may have changed), as it always did.
        let domain = Recording::new(false, true);
        let c = ctx(domain.clone(), true);
        let saga = first_booking(NEAR, 2.0);
        let all = steps(&StepPolicies::default(), &c.metrics);
        let outputs = with_booking_memo(async {
            let package = all[index_of(BookingStep::RegisterPackage)]
                .run(&c, &saga)
                .await
                .expect("registered");
            domain
                .drone_busy
                .store(false, std::sync::atomic::Ordering::SeqCst);
            let mut saga = saga.clone();
            saga.outputs
                .insert(BookingStep::RegisterPackage.as_str().into(), package);
            all[index_of(BookingStep::ReserveDrone)]
                .run(&c, &saga)
                .await
                .expect("a drone, asked again")
        })
        .await;
        assert_eq!(
            domain.calls(),
            ["put_package", "reserve_drone", "reserve_drone"]
        );
        assert_eq!(outputs["droneId"], "drone-7");
    }

    #[tokio::test]
    async fn a_package_refused_beside_a_reserved_drone_leaves_the_drone_to_compensation() {
        let domain = Recording::new(true, false);
        let c = ctx(domain.clone(), true);
        let saga = first_booking(NEAR, 2.0);
        let failed = with_booking_memo(run_to_delivery(&c, saga.clone())).await;
        assert!(
            matches!(
                failed,
                Err((BookingStep::RegisterPackage, StepError::Permanent { .. }))
            ),
            "{failed:?}"
        );
        // The drone was reserved all the same; the saga fails at RegisterPackage, and its
        // compensation releases the drone as in doubt.
        assert_eq!(domain.calls(), ["put_package", "reserve_drone"]);
        let mut at_failure = saga;
        at_failure.state = "failed".into();
        let request = compensation_request(&at_failure, "package-conflict");
        assert!(
            request
                .in_doubt_steps
                .iter()
                .any(|s| s == BookingStep::ReserveDrone.as_str()),
            "{request:?}"
        );
    }

    #[test]
    fn no_drone_is_a_stable_reason() {
        let d = client_reason(
            "ReserveDrone: drone PUT answered 503 (no-drone-available): busy (gave up after 9 attempts)",
        );
        assert!(d.starts_with("no-drone-available: "), "{d}");
        assert_eq!(client_reason("CheckAccount: x"), "CheckAccount: x");
    }
}
