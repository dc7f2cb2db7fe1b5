//! The invariant checker: after a run, it waits until the suite has settled, reads every
//! service's own data (the Scheduler's journal, the Package, Drone and Delivery databases, the
//! Supervisor's parked queue, the client's view through Ingestion) and proves DESIGN §1:
//!
//! - every booking that got a `202` has exactly one saga, and it ended in exactly one terminal
//!   state: `completed` (scheduled), `compensated`, or `failed`/`cancelled` with nothing held;
//! - a scheduled booking holds exactly its package, one active drone reservation (the drone its
//!   saga journaled) and a live delivery on that drone; any other booking holds none of them;
//! - no package, reservation or live delivery exists without a scheduled saga behind it;
//! - no drone holds two overlapping reservations; no saga step took effect twice;
//! - nothing is stuck: no saga left running or compensating, no compensation parked;
//! - the client sees each booking in the state its saga ended in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::mem::take;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use serde_json::Value;
use uuid::Uuid;

use super::stack::{Service, Stack};
use crate::wait::{done_if, poll};

/// What the clients were told: the bookings that got a `202` (deliveryId → owner), the ones
/// whose cancel got a `202`, and how many requests got no clear answer (no response, or a 5xx)
/// and so may or may not have been accepted.
#[derive(Debug, Clone, Default)]
pub struct Bookings {
    pub accepted: BTreeMap<Uuid, String>,
    /// An accepted cancel is in the log: the booking must not end scheduled.
    pub cancelled: HashSet<Uuid>,
    pub unclear: usize,
}

impl Bookings {
    pub fn add(&mut self, id: Uuid, owner: &str) {
        self.accepted.insert(id, owner.to_owned());
    }

    pub fn merge(&mut self, other: &Bookings) {
        self.accepted
            .extend(other.accepted.iter().map(|(k, v)| (*k, v.clone())));
        self.cancelled.extend(other.cancelled.iter().copied());
        self.unclear += other.unclear;
    }
}

/// What a passing check found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Sagas by final state.
    pub by_state: BTreeMap<String, usize>,
    pub sagas: usize,
    /// From the start of the check until everything had settled.
    pub settled_after: Duration,
    /// Sagas of requests that got no clear answer (allowed: up to `Bookings::unclear`).
    pub unacknowledged: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sagas settled after {:.1} s: {:?}",
            self.sagas,
            self.settled_after.as_secs_f64(),
            self.by_state
        )?;
        if self.unacknowledged > 0 {
            write!(
                f,
                "; {} without a 202 (unclear answers)",
                self.unacknowledged
            )?;
        }
        Ok(())
    }
}

/// Every broken invariant, one line each.
#[derive(Debug, Clone)]
pub struct Violations(pub Vec<String>);

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} invariant violations:", self.0.len())?;
        for v in self.0.iter().take(40) {
            writeln!(f, "  - {v}")?;
        }
        if self.0.len() > 40 {
            writeln!(f, "  … and {} more", self.0.len() - 40)?;
        }
        Ok(())
    }
}

/// A row of the Drone service's `reservations`.
#[derive(Debug, Clone)]
struct Reservation {
    delivery: String,
    drone: String,
    start: i64,
    end: i64,
    active: bool,
}

#[derive(Debug, Clone)]
struct SagaRow {
    state: String,
    error: Option<String>,
    next_step: i32,
    drone: Option<String>,
    /// The carrier leg ArrangeThirdParty booked (its id), when it booked one.
    leg: Option<String>,
    /// Cancels or reschedules journaled but not yet applied by the saga.
    signals_pending: bool,
}

/// Steps with an effect to undo among the first `next_step` (CheckAccount has none).
fn holds_effects(next_step: i32) -> bool {
    next_step >= 2
}

/// Final, with nothing left for anyone to do.
fn settled(s: &SagaRow) -> bool {
    if s.signals_pending {
        return false;
    }
    match s.state.as_str() {
        "completed" | "compensated" => true,
        "failed" | "cancelled" => !holds_effects(s.next_step),
        _ => false,
    }
}

async fn connect(url: &str) -> DatabaseConnection {
    Database::connect(url)
        .await
        .unwrap_or_else(|e| panic!("the checker reaches {url}: {e}"))
}

async fn rows(db: &DatabaseConnection, sql: &str) -> Vec<sea_orm::QueryResult> {
    db.query_all(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn get<T: sea_orm::TryGetable>(r: &sea_orm::QueryResult, col: &str) -> T {
    r.try_get("", col)
        .unwrap_or_else(|e| panic!("column {col}: {e}"))
}

async fn sagas(db: &DatabaseConnection) -> HashMap<Uuid, SagaRow> {
    rows(
        db,
        "SELECT id, state, next_step, outputs, error, signals FROM saga_instances",
    )
    .await
    .iter()
    .filter_map(|r| {
        let id: String = get(r, "id");
        let outputs: String = get(r, "outputs");
        let outputs: Value = serde_json::from_str(&outputs).unwrap_or(Value::Null);
        let signals: String = get(r, "signals");
        let signals: Value = serde_json::from_str(&signals).unwrap_or(Value::Null);
        Some((
            Uuid::parse_str(&id).ok()?,
            SagaRow {
                state: get(r, "state"),
                error: get(r, "error"),
                next_step: get(r, "next_step"),
                drone: outputs[contracts::BookingStep::ReserveDrone.as_str()]["droneId"]
                    .as_str()
                    .map(str::to_owned),
                leg: outputs[contracts::BookingStep::ArrangeThirdParty.as_str()]["legId"]
                    .as_str()
                    .map(str::to_owned),
                signals_pending: signals.as_array().is_some_and(|a| !a.is_empty()),
            },
        ))
    })
    .collect()
}

async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    rows(db, sql).await.first().map_or(0, |r| get(r, "n"))
}

/// What keeps the sagas from being final: accepted bookings without a saga (lost), sagas not
/// settled, and sagas still `completed` although their booking's cancel got a 202 (the cancel is
/// in the log; until the saga has applied it, its compensation is about to start).
fn unsettled<'a>(
    bookings: &Bookings,
    sagas: &'a HashMap<Uuid, SagaRow>,
) -> (Vec<Uuid>, Vec<(&'a Uuid, &'a SagaRow)>, Vec<&'a Uuid>) {
    let lost = bookings
        .accepted
        .keys()
        .filter(|id| !sagas.contains_key(id))
        .copied()
        .collect();
    let open = sagas.iter().filter(|(_, s)| !settled(s)).collect();
    let uncancelled = sagas
        .iter()
        .filter(|(id, s)| s.state == "completed" && bookings.cancelled.contains(id))
        .map(|(id, _)| id)
        .collect();
    (lost, open, uncancelled)
}

/// Waits (up to `within`) until the suite has settled, then checks every invariant.
pub async fn check(
    stack: &Stack,
    bookings: &Bookings,
    within: Duration,
) -> Result<Report, Violations> {
    let started = Instant::now();
    let deadline = started + within;
    let scheduler_db = connect(&stack.database_url(Service::Scheduler)).await;
    let mut v: Vec<String> = Vec::new();

    // 1. Settle: every accepted booking has a saga, every saga is final, the outbox is empty.
    let settling = poll(within, Duration::from_millis(250), async || {
        let sagas = sagas(&scheduler_db).await;
        let outbox = count(&scheduler_db, "SELECT count(*) AS n FROM saga_outbox").await;
        let (lost, open, uncancelled) = unsettled(bookings, &sagas);
        if lost.is_empty() && open.is_empty() && uncancelled.is_empty() && outbox == 0 {
            Ok(sagas)
        } else {
            Err((sagas, outbox))
        }
    })
    .await;
    let settled_after = started.elapsed();
    let sagas = match settling {
        Ok(sagas) => sagas,
        Err((sagas, outbox)) => {
            let (lost, open, uncancelled) = unsettled(bookings, &sagas);
            if !lost.is_empty() {
                v.push(format!(
                    "{} bookings that got a 202 have no saga (lost), e.g. {:?}; {}",
                    lost.len(),
                    &lost[..lost.len().min(3)],
                    where_in_log(stack, &lost).await
                ));
            }
            let mut stuck: BTreeMap<(String, i32), usize> = BTreeMap::new();
            for (_, s) in &open {
                *stuck.entry((s.state.clone(), s.next_step)).or_default() += 1;
            }
            if !open.is_empty() {
                v.push(format!(
                    "{} sagas stuck after {within:?} (state, next step → count): {stuck:?}, e.g. {}",
                    open.len(),
                    open[0].0
                ));
            }
            if !uncancelled.is_empty() {
                v.push(format!(
                    "{} bookings whose cancel got a 202 are still scheduled after {within:?}, e.g. {}",
                    uncancelled.len(),
                    uncancelled[0]
                ));
            }
            if outbox > 0 {
                v.push(format!("{outbox} outbox rows never left the Scheduler"));
            }
            sagas
        }
    };
    let _ = scheduler_db.close().await;
    println!(
        "invariants: {} sagas, settled (or given up) after {:.1} s",
        sagas.len(),
        settled_after.as_secs_f64()
    );

    // 2. Sagas nobody was told about.
    let accepted: HashSet<Uuid> = bookings.accepted.keys().copied().collect();
    let unacknowledged = sagas.keys().filter(|id| !accepted.contains(id)).count();
    if unacknowledged > bookings.unclear {
        v.push(format!(
            "{unacknowledged} sagas without a 202, but only {} requests had an unclear answer",
            bookings.unclear
        ));
    }

    // 3. What each domain service holds.
    let package_db = connect(&stack.database_url(Service::Package)).await;
    let packages: HashMap<String, String> = rows(&package_db, "SELECT id, status FROM packages")
        .await
        .iter()
        .map(|r| (get(r, "id"), get(r, "status")))
        .collect();
    let _ = package_db.close().await;
    let drone_db = connect(&stack.database_url(Service::Drone)).await;
    let reservations: Vec<Reservation> = rows(
        &drone_db,
        "SELECT delivery_id, drone_id, window_start_ms, window_end_ms, status FROM reservations",
    )
    .await
    .iter()
    .map(|r| Reservation {
        delivery: get(r, "delivery_id"),
        drone: get(r, "drone_id"),
        start: get(r, "window_start_ms"),
        end: get(r, "window_end_ms"),
        active: get::<String>(r, "status") == "active",
    })
    .collect();
    let _ = drone_db.close().await;
    let delivery_db = connect(&stack.database_url(Service::Delivery)).await;
    // deliveryId → (droneId, last stage). Rows without an owner are tombstones (a cancel that
    // came before the creation, which can then never happen), not deliveries.
    let deliveries: HashMap<String, (String, String)> = rows(
        &delivery_db,
        "SELECT d.id, d.drone_id, (SELECT t.stage FROM tracking_events t WHERE t.delivery_id = d.id \
         ORDER BY t.sequence DESC LIMIT 1) AS stage FROM deliveries d WHERE d.owner_id <> ''",
    )
    .await
    .iter()
    .map(|r| {
        let stage: Option<String> = get(r, "stage");
        (get(r, "id"), (get(r, "drone_id"), stage.unwrap_or_default()))
    })
    .collect();
    let _ = delivery_db.close().await;
    // Booked carrier legs by leg id (`<deliveryId>` or `<deliveryId>.r<n>`).
    let thirdparty_db = connect(&stack.database_url(Service::ThirdParty)).await;
    let booked_legs: Vec<String> = rows(
        &thirdparty_db,
        "SELECT delivery_id FROM legs WHERE status = 'booked'",
    )
    .await
    .iter()
    .map(|r| get(r, "delivery_id"))
    .collect();
    let _ = thirdparty_db.close().await;

    let mut active: HashMap<&str, Vec<&Reservation>> = HashMap::new();
    for r in reservations.iter().filter(|r| r.active) {
        active.entry(r.delivery.as_str()).or_default().push(r);
    }
    for (id, s) in &sagas {
        let key = id.to_string();
        let package = packages.get(&key).map(String::as_str);
        let held: Vec<&Reservation> = active.get(key.as_str()).cloned().unwrap_or_default();
        let delivery = deliveries.get(&key);
        let live_delivery = delivery.filter(|(_, stage)| stage != "Cancelled");
        if !settled(s) {
            continue; // reported as stuck above; a saga still at work may hold things
        }
        match s.state.as_str() {
            "completed" => {
                if package != Some("registered") {
                    v.push(format!(
                        "scheduled {id}: package is {package:?}, not registered"
                    ));
                }
                if held.len() != 1 {
                    v.push(format!(
                        "scheduled {id}: {} active drone reservations",
                        held.len()
                    ));
                } else if Some(&held[0].drone) != s.drone.as_ref() {
                    v.push(format!(
                        "scheduled {id}: reserved drone {} is not the journaled {:?}",
                        held[0].drone, s.drone
                    ));
                }
                match live_delivery {
                    None => v.push(format!("scheduled {id}: no live delivery ({delivery:?})")),
                    Some((drone, _)) if Some(drone) != s.drone.as_ref() => v.push(format!(
                        "scheduled {id}: the delivery's drone {drone} is not the journaled {:?}",
                        s.drone
                    )),
                    Some(_) => {}
                }
            }
            state => {
                if package == Some("registered") {
                    v.push(format!("{state} {id} still holds its package"));
                }
                if !held.is_empty() {
                    v.push(format!("{state} {id} still holds drone {}", held[0].drone));
                }
                if live_delivery.is_some() {
                    v.push(format!("{state} {id} still has a live delivery"));
                }
            }
        }
    }

    // 4. Nothing held without a scheduled saga behind it.
    let scheduled = |id: &str| {
        Uuid::parse_str(id)
            .ok()
            .and_then(|u| sagas.get(&u))
            .is_some_and(|s| s.state == "completed")
    };
    for (id, status) in &packages {
        if status == "registered" && !scheduled(id) {
            v.push(format!(
                "package {id} is registered without a scheduled saga"
            ));
        }
    }
    for id in active.keys() {
        if !scheduled(id) {
            v.push(format!(
                "reservation {id} is active without a scheduled saga"
            ));
        }
    }
    // A booked leg belongs to a scheduled saga, and is the one its saga journaled.
    for leg in &booked_legs {
        let id = contracts::delivery_of_leg(leg);
        let journaled = Uuid::parse_str(id)
            .ok()
            .and_then(|u| sagas.get(&u))
            .and_then(|s| s.leg.as_deref());
        if !scheduled(id) {
            v.push(format!(
                "carrier leg {leg} is booked without a scheduled saga"
            ));
        } else if journaled != Some(leg.as_str()) {
            v.push(format!(
                "carrier leg {leg} is booked but its saga journaled {journaled:?}"
            ));
        }
    }
    for (id, s) in &sagas {
        if let Some(leg) = s.leg.as_ref().filter(|_| s.state == "completed") {
            if !booked_legs.contains(leg) {
                v.push(format!(
                    "scheduled {id}: its carrier leg {leg} is not booked"
                ));
            }
        }
    }
    for (id, (_, stage)) in &deliveries {
        if stage != "Cancelled" && !scheduled(id) {
            v.push(format!(
                "delivery {id} is live ({stage}) without a scheduled saga"
            ));
        }
    }

    // 5. No drone is double-booked.
    let mut by_drone: BTreeMap<&str, Vec<(i64, i64, &str)>> = BTreeMap::new();
    for r in reservations.iter().filter(|r| r.active) {
        by_drone
            .entry(r.drone.as_str())
            .or_default()
            .push((r.start, r.end, r.delivery.as_str()));
    }
    for (drone, mut windows) in by_drone {
        windows.sort_unstable();
        for pair in windows.windows(2) {
            if pair[1].0 < pair[0].1 {
                v.push(format!(
                    "drone {drone} holds overlapping reservations {} and {}",
                    pair[0].2, pair[1].2
                ));
            }
        }
    }

    // 6. No step took effect twice: one successful attempt per step, plus one per reschedule
    //    applied (a reschedule runs ReserveDrone and CreateDelivery again, to move them).
    let scheduler_db = connect(&stack.database_url(Service::Scheduler)).await;
    for r in rows(
        &scheduler_db,
        "SELECT a.saga_id, a.step, count(*) AS n FROM saga_attempts a \
         JOIN saga_instances i ON i.id = a.saga_id WHERE a.outcome = 'succeeded' \
         GROUP BY a.saga_id, a.step, i.input \
         HAVING count(*) > 1 + COALESCE((i.input::jsonb->>'revision')::int, 0)",
    )
    .await
    {
        let id: String = get(&r, "saga_id");
        let step: String = get(&r, "step");
        let n: i64 = get(&r, "n");
        v.push(format!("saga {id}: step {step} succeeded {n} times"));
    }
    let _ = scheduler_db.close().await;

    // 7. No compensation waits for a person.
    let (status, parked) = stack.service(Service::Supervisor).get("/api/parked").await;
    match parked.as_array() {
        Some(p) if p.is_empty() => {}
        Some(p) => v.push(format!(
            "{} compensation requests parked: {:?}",
            p.len(),
            p.first()
        )),
        None => v.push(format!(
            "supervisor /api/parked answered {status}: {parked}"
        )),
    }

    // 8. The client sees what the saga did (Ingestion's read model follows workflow-events).
    let client = stack.client();
    // A booking its client cancelled stays `cancelled` for the client while it is undone.
    let expected = |s: &SagaRow| match s.state.as_str() {
        "completed" => "scheduled".to_owned(),
        "compensating" | "compensated" if s.error.as_deref() == Some("cancelled by the client") => {
            "cancelled".to_owned()
        }
        other => other.to_owned(),
    };
    let mut pending: Vec<(Uuid, String, String)> = bookings
        .accepted
        .iter()
        .filter_map(|(id, owner)| sagas.get(id).map(|s| (*id, owner.clone(), expected(s))))
        .collect();
    let client_within =
        deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(30);
    let shown = poll(client_within, Duration::from_millis(500), async || {
        let seen: Vec<(Uuid, String, String, Value)> = futures::stream::iter(take(&mut pending))
            .map(|(id, owner, want)| {
                let client = &client;
                async move {
                    let a = client.status(&owner, id).await;
                    (id, owner, want, a.body["state"].clone())
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        pending = seen
            .iter()
            .filter(|(_, _, want, got)| got.as_str() != Some(want.as_str()))
            .map(|(id, owner, want, _)| (*id, owner.clone(), want.clone()))
            .collect();
        done_if(pending.is_empty(), seen)
    })
    .await;
    if let Err(seen) = shown {
        let (id, _, want, got) = seen
            .iter()
            .find(|(_, _, want, got)| got.as_str() != Some(want.as_str()))
            .cloned()
            .unwrap_or((Uuid::nil(), String::new(), String::new(), Value::Null));
        v.push(format!(
            "{} bookings shown to the client in another state than their saga's, e.g. {id}: \
             {got} instead of {want}",
            pending.len()
        ));
    }

    println!(
        "invariants: checks done {:.1} s after the start of the check",
        started.elapsed().as_secs_f64()
    );
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for s in sagas.values() {
        *by_state.entry(s.state.clone()).or_default() += 1;
    }
    if v.is_empty() {
        Ok(Report {
            by_state,
            sagas: sagas.len(),
            settled_after,
            unacknowledged,
        })
    } else {
        v.push(format!("(saga states: {by_state:?})"));
        Err(Violations(v))
    }
}

/// Where bookings without a saga are in the booking log: in it (the Scheduler skipped them) or
/// not (lost between Ingestion's 202 and the broker's storage).
async fn where_in_log(stack: &Stack, ids: &[Uuid]) -> String {
    let mut settings = messaging::MessagingSettings::new(stack.amqp_url.clone());
    settings.prefix = stack.prefix.clone();
    settings.connection_name = format!("{}-invariants", stack.prefix);
    let wanted: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
    let mut found: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    let mut records = 0usize;
    let read = async {
        let broker = messaging::connect(&settings).await?;
        let log = broker
            .log(contracts::DELIVERY_REQUESTS_LOG, stack.partitions)
            .await?;
        for p in 0..stack.partitions {
            let mut reader = log.read(p, messaging::StartAt::First).await?;
            while let Ok(Some(r)) =
                tokio::time::timeout(Duration::from_millis(700), reader.next()).await
            {
                records += 1;
                if let Ok(e) = &r.event {
                    if e.kind == contracts::DELIVERY_REQUESTED && wanted.contains(&e.key) {
                        found.insert(e.key.clone(), (p, r.position.offset));
                    }
                }
            }
        }
        Ok::<_, messaging::MessagingError>(())
    };
    // When Ingestion accepted them (its read model keeps the time of the 202).
    let ingestion = connect(&stack.database_url(Service::Ingestion)).await;
    let list: Vec<String> = ids.iter().map(|id| format!("'{id}'")).collect();
    let times: Vec<String> = rows(
        &ingestion,
        &format!(
            "SELECT to_char(accepted_at AT TIME ZONE 'UTC', 'HH24:MI:SS.MS') AS at \
             FROM delivery_requests WHERE delivery_id IN ({}) ORDER BY accepted_at",
            list.join(",")
        ),
    )
    .await
    .iter()
    .map(|r| get(r, "at"))
    .collect();
    let _ = ingestion.close().await;
    match read.await {
        Ok(()) => format!(
            "of these, {} are in the booking log (the Scheduler skipped them: {:?}) and {} are \
             not (lost after the 202); {records} records read; accepted at {times:?} (UTC)",
            found.len(),
            found.iter().take(3).collect::<Vec<_>>(),
            ids.len() - found.len()
        ),
        Err(e) => format!("the booking log could not be read: {e}"),
    }
}
