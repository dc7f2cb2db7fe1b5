//! Stateful fakes of the five domain services (Account, Package, ThirdParty, Drone, Delivery) behind
//! [`downstream::Domain`], with seeded fault injection, for the deterministic simulation.
//!
//! The fakes keep the services' *rules* (DESIGN §5, and the services' own code) in memory:
//! idempotent `PUT`s on caller-assigned ids, idempotent `DELETE`s that leave a tombstone for an id
//! never created (so a late `PUT` cannot create it afterwards), a drone never double-booked, a
//! released reservation never taken again. Where a rule is subtle the real service is the model:
//! a `PUT` of a package or delivery that exists but was cancelled *finds* it (success, nothing
//! resurrected), exactly like the real services; only a tombstone refuses the `PUT`.
//!
//! Determinism: no threads, no wall clock (timestamps are an epoch plus tokio's virtual elapsed
//! time), ordered maps only, and every random choice comes from one `StdRng` seeded by the caller,
//! drawn at the start of each call in call order.

#![allow(dead_code)] // each simulation uses a different part of the inspection API

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use contracts::{
    Account, AccountStatus, Delivery, DeliveryPatch, DeliveryStage, DeliveryUpsert,
    DroneReservation, DroneReservationRequest, GeoPoint, LegRequest, LegStatus, Package,
    PackageSize, PackageStatus, PackageUpsert, ReservationStatus, ThirdPartyLeg, TimeWindow,
};
use downstream::{CallError, Domain};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long the Drone fake asks the caller to wait when no drone is free.
pub const NO_DRONE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The default reservation window, in minutes (the Drone service's default too).
pub const DEFAULT_WINDOW_MINUTES: u32 = 30;

/// How many drones of each size the fleet has; a drone carries its size or smaller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FleetSize {
    pub small: u32,
    pub medium: u32,
    pub large: u32,
}

/// What goes wrong, per call, drawn from the seeded RNG. Probabilities are clamped to `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// Chance that a call fails with `503` before it has any effect (`Transient`).
    pub transient_error: f64,
    /// Chance that a call's effect is applied but its answer is lost: the caller waits
    /// `lost_answer_timeout` and gets `Transient` "timed out".
    pub lost_answer: f64,
    /// How long a call whose answer is lost takes before it times out (virtual time).
    pub lost_answer_timeout: Duration,
    /// Chance that a call is slow: it takes a random virtual duration up to `max_slowness`, split
    /// at a random point into a wait before the effect and a wait after it.
    pub slow_answer: f64,
    /// The longest slow call.
    pub max_slowness: Duration,
    /// Chance that a call is refused before it is made, as the client's circuit breaker refuses
    /// calls to a failing service (`Rejected`, wait `rejected_wait`): the saga must park and try
    /// again, spending no attempt.
    pub rejected: f64,
    /// The wait a refused call names.
    pub rejected_wait: Duration,
}

impl Faults {
    /// Every call answers at once and correctly.
    pub fn none() -> Self {
        Self {
            transient_error: 0.0,
            lost_answer: 0.0,
            lost_answer_timeout: Duration::from_secs(5),
            slow_answer: 0.0,
            max_slowness: Duration::ZERO,
            rejected: 0.0,
            rejected_wait: Duration::from_millis(500),
        }
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self::none()
    }
}

/// Where a resource is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    /// Created and not undone: a registered package, an active reservation, a delivery that is
    /// not cancelled.
    Active,
    /// Created, then undone: a cancelled package or delivery, a released reservation.
    Cancelled,
    /// Undone before it was ever created: the `DELETE` of an unknown id left a tombstone, so no
    /// later `PUT` can create it.
    Tombstone,
}

/// A drone reservation as the invariant checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationState {
    /// Empty for a tombstone.
    pub drone_id: String,
    /// `[start, end)`; an empty window at the Unix epoch for a tombstone.
    pub window: TimeWindow,
    /// `Cancelled` means released.
    pub status: Status,
}

/// A delivery as the invariant checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryState {
    pub pickup_time: DateTime<Utc>,
    /// Empty for a tombstone.
    pub drone_id: String,
    pub package_id: String,
    pub status: Status,
    /// Reschedules that changed something.
    pub reschedules: u32,
}

/// How many times each id was newly created. Must stay at most 1 per id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Creations {
    pub packages: BTreeMap<String, u32>,
    pub reservations: BTreeMap<String, u32>,
    pub deliveries: BTreeMap<String, u32>,
    pub legs: BTreeMap<String, u32>,
    /// Reservations made while their delivery's package was not registered (yet): the drone
    /// asked for alongside the package.
    pub reservations_before_package: u64,
}

/// Faults injected so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub transient_errors: u64,
    pub lost_answers: u64,
    pub slow_answers: u64,
}

/// The state of all four services at one instant, as plain data.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub accounts: BTreeMap<String, AccountStatus>,
    pub packages: BTreeMap<String, Status>,
    /// By delivery id.
    pub reservations: BTreeMap<String, ReservationState>,
    pub deliveries: BTreeMap<String, DeliveryState>,
    /// Carrier legs by leg id (`<deliveryId>` or `<deliveryId>.r<n>`): the leg and its status.
    pub legs: BTreeMap<String, (Option<ThirdPartyLeg>, Status)>,
    pub created: Creations,
    /// Calls received, by operation (`put_package`, `release_drone`, ...), faulty ones included.
    pub calls: BTreeMap<&'static str, u64>,
    pub faults: FaultCounts,
}

impl Snapshot {
    /// One line per drone with two overlapping active reservations. Must be empty.
    pub fn overlaps(&self) -> Vec<String> {
        let mut by_drone: BTreeMap<&str, Vec<(&str, &TimeWindow)>> = BTreeMap::new();
        for (delivery_id, r) in &self.reservations {
            if r.status == Status::Active {
                by_drone
                    .entry(r.drone_id.as_str())
                    .or_default()
                    .push((delivery_id.as_str(), &r.window));
            }
        }
        let mut out = Vec::new();
        for (drone_id, windows) in by_drone {
            for (i, (a, wa)) in windows.iter().enumerate() {
                for (b, wb) in &windows[i + 1..] {
                    if wa.overlaps(wb) {
                        out.push(format!(
                            "drone {drone_id}: {a} [{}, {}) overlaps {b} [{}, {})",
                            wa.start, wa.end, wb.start, wb.end
                        ));
                    }
                }
            }
        }
        out
    }

    /// One line per id created more than once. Must be empty.
    pub fn double_creations(&self) -> Vec<String> {
        let kinds = [
            ("package", &self.created.packages),
            ("reservation", &self.created.reservations),
            ("delivery", &self.created.deliveries),
            ("carrier leg", &self.created.legs),
        ];
        kinds
            .into_iter()
            .flat_map(|(kind, counts)| {
                counts
                    .iter()
                    .filter(|(_, n)| **n > 1)
                    .map(move |(id, n)| format!("{kind} {id} created {n} times"))
            })
            .collect()
    }
}

/// The four domain services in memory. Cheap to clone; clones share the state, the faults and
/// the RNG, so the Scheduler, the simulated Supervisor and the invariant checks can each hold one.
#[derive(Clone)]
pub struct FakeDomain {
    inner: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FakeDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDomain").finish_non_exhaustive()
    }
}

struct State {
    rng: StdRng,
    faults: Faults,
    epoch: DateTime<Utc>,
    started: tokio::time::Instant,
    window_minutes: u32,
    /// `(size, id)`, smallest first, then by id.
    drones: Vec<(PackageSize, String)>,
    accounts: BTreeMap<String, Account>,
    packages: BTreeMap<String, Row<Package>>,
    reservations: BTreeMap<String, Row<DroneReservation>>,
    deliveries: BTreeMap<String, Row<(Delivery, u32)>>,
    legs: BTreeMap<String, Row<(ThirdPartyLeg, LegRequest)>>,
    created: Creations,
    calls: BTreeMap<&'static str, u64>,
    fault_counts: FaultCounts,
}

/// A stored resource, or the tombstone a `DELETE` of an unknown id left.
enum Row<T> {
    Tombstone,
    Live(T),
}

/// What the RNG decided for one call, drawn before anything happens.
struct Plan {
    before: Duration,
    rejected: Option<Duration>,
    fail_before: bool,
    after: Duration,
    lose_answer: bool,
    timeout: Duration,
}

/// `2030-01-01T00:00:00Z`: timestamps start here unless [`FakeDomain::with_epoch`] says otherwise.
const DEFAULT_EPOCH_SECS: i64 = 1_893_456_000;

impl FakeDomain {
    /// The services with no accounts, no data, the fleet `fleet` (drones `drone-001`, ... small
    /// first), the default window, no faults, and every random choice drawn from `seed`.
    pub fn new(seed: u64, fleet: FleetSize) -> Self {
        let sizes = std::iter::repeat_n(PackageSize::Small, fleet.small as usize)
            .chain(std::iter::repeat_n(
                PackageSize::Medium,
                fleet.medium as usize,
            ))
            .chain(std::iter::repeat_n(
                PackageSize::Large,
                fleet.large as usize,
            ));
        let drones = sizes
            .enumerate()
            .map(|(i, size)| (size, format!("drone-{:03}", i + 1)))
            .collect();
        Self {
            inner: Arc::new(Mutex::new(State {
                rng: StdRng::seed_from_u64(seed),
                faults: Faults::none(),
                epoch: DateTime::from_timestamp(DEFAULT_EPOCH_SECS, 0).unwrap_or_default(),
                started: tokio::time::Instant::now(),
                window_minutes: DEFAULT_WINDOW_MINUTES,
                drones,
                accounts: BTreeMap::new(),
                packages: BTreeMap::new(),
                reservations: BTreeMap::new(),
                deliveries: BTreeMap::new(),
                legs: BTreeMap::new(),
                created: Creations::default(),
                calls: BTreeMap::new(),
                fault_counts: FaultCounts::default(),
            })),
        }
    }

    /// Timestamps (`createdAt`, `updatedAt`) read `epoch` plus the virtual time elapsed since
    /// the fake was built. They never drive a rule: windows come from the callers' pickup times.
    pub fn with_epoch(self, epoch: DateTime<Utc>) -> Self {
        self.lock().epoch = epoch;
        self
    }

    /// Creates or updates an account.
    pub fn set_account(&self, id: &str, status: AccountStatus) {
        let mut s = self.lock();
        let now = s.now();
        let account = s.accounts.entry(id.to_owned()).or_insert_with(|| Account {
            id: id.to_owned(),
            name: format!("account {id}"),
            status,
            created_at: now,
            updated_at: now,
        });
        account.status = status;
        account.updated_at = now;
    }

    /// Replaces the faults from the next call on (calls under way keep their plan).
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// The reservation window length for reservations requested from now on (default 30).
    pub fn set_window_minutes(&self, minutes: u32) {
        self.lock().window_minutes = minutes;
    }

    /// Everything, as plain data.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        let empty = TimeWindow {
            start: DateTime::UNIX_EPOCH,
            end: DateTime::UNIX_EPOCH,
        };
        Snapshot {
            accounts: s
                .accounts
                .iter()
                .map(|(id, a)| (id.clone(), a.status))
                .collect(),
            packages: s
                .packages
                .iter()
                .map(|(id, row)| {
                    let status = match row {
                        Row::Tombstone => Status::Tombstone,
                        Row::Live(p) if p.status == PackageStatus::Cancelled => Status::Cancelled,
                        Row::Live(_) => Status::Active,
                    };
                    (id.clone(), status)
                })
                .collect(),
            reservations: s
                .reservations
                .iter()
                .map(|(id, row)| {
                    let state = match row {
                        Row::Tombstone => ReservationState {
                            drone_id: String::new(),
                            window: empty,
                            status: Status::Tombstone,
                        },
                        Row::Live(r) => ReservationState {
                            drone_id: r.drone_id.clone(),
                            window: r.window,
                            status: match r.status {
                                ReservationStatus::Active => Status::Active,
                                ReservationStatus::Released => Status::Cancelled,
                            },
                        },
                    };
                    (id.clone(), state)
                })
                .collect(),
            deliveries: s
                .deliveries
                .iter()
                .map(|(id, row)| {
                    let state = match row {
                        Row::Tombstone => DeliveryState {
                            pickup_time: DateTime::UNIX_EPOCH,
                            drone_id: String::new(),
                            package_id: String::new(),
                            status: Status::Tombstone,
                            reschedules: 0,
                        },
                        Row::Live((d, reschedules)) => DeliveryState {
                            pickup_time: d.pickup_time,
                            drone_id: d.drone_id.clone(),
                            package_id: d.package_id.clone(),
                            status: if d.stage == DeliveryStage::Cancelled {
                                Status::Cancelled
                            } else {
                                Status::Active
                            },
                            reschedules: *reschedules,
                        },
                    };
                    (id.clone(), state)
                })
                .collect(),
            legs: s
                .legs
                .iter()
                .map(|(id, row)| {
                    let state = match row {
                        Row::Tombstone => (None, Status::Tombstone),
                        Row::Live((l, _)) => (
                            Some(l.clone()),
                            if l.status == LegStatus::Cancelled {
                                Status::Cancelled
                            } else {
                                Status::Active
                            },
                        ),
                    };
                    (id.clone(), state)
                })
                .collect(),
            created: s.created.clone(),
            calls: s.calls.clone(),
            faults: s.fault_counts,
        }
    }

    /// One line per drone with two overlapping active reservations. Must be empty.
    pub fn overlaps(&self) -> Vec<String> {
        self.snapshot().overlaps()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if a test thread did, the maps are still valid.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one call: draws its faults, waits, applies `effect` (under the lock, with no await
    /// inside), waits, and answers — or loses the answer.
    async fn call<T>(
        &self,
        op: &'static str,
        what: String,
        effect: impl FnOnce(&mut State, &str) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        let plan = {
            let mut s = self.lock();
            *s.calls.entry(op).or_default() += 1;
            s.plan()
        };
        if let Some(retry_after) = plan.rejected {
            return Err(CallError::Rejected {
                reason: format!("{what} not called: the circuit breaker is open (injected)"),
                retry_after,
            });
        }
        sleep(plan.before).await;
        if plan.fail_before {
            return Err(CallError::Transient {
                reason: format!("{what} answered 503 Service Unavailable: injected failure"),
                retry_after: None,
            });
        }
        let result = {
            let mut s = self.lock();
            effect(&mut s, &what)
        };
        sleep(plan.after).await;
        if plan.lose_answer {
            sleep(plan.timeout).await;
            return Err(CallError::Transient {
                reason: format!(
                    "{what} got no answer within {} ms: timed out (injected; the effect was applied)",
                    plan.timeout.as_millis()
                ),
                retry_after: None,
            });
        }
        result
    }
}

async fn sleep(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

impl State {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = chrono::Duration::from_std(self.started.elapsed()).unwrap_or_default();
        self.epoch + elapsed
    }

    /// Always draws the same number of values, whatever the faults, so changing one probability
    /// does not shift every later draw.
    fn plan(&mut self) -> Plan {
        let f = self.faults.clone();
        let fail = self.rng.random::<f64>() < f.transient_error.clamp(0.0, 1.0);
        let lose = self.rng.random::<f64>() < f.lost_answer.clamp(0.0, 1.0);
        let slow = self.rng.random::<f64>() < f.slow_answer.clamp(0.0, 1.0);
        let max = u64::try_from(f.max_slowness.as_micros()).unwrap_or(u64::MAX);
        let total = self.rng.random_range(0..=max);
        let split = self.rng.random_range(0..=total);
        let rejected = self.rng.random::<f64>() < f.rejected.clamp(0.0, 1.0);
        let (before, after) = if slow {
            self.fault_counts.slow_answers += 1;
            (
                Duration::from_micros(split),
                Duration::from_micros(total - split),
            )
        } else {
            (Duration::ZERO, Duration::ZERO)
        };
        if fail {
            self.fault_counts.transient_errors += 1;
        } else if lose {
            self.fault_counts.lost_answers += 1;
        }
        Plan {
            before,
            rejected: rejected.then_some(f.rejected_wait),
            fail_before: fail,
            after,
            lose_answer: lose && !fail,
            timeout: f.lost_answer_timeout,
        }
    }

    fn account(&self, id: &str, what: &str) -> Result<Account, CallError> {
        self.accounts
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(what, "account", id))
    }

    fn put_package(
        &mut self,
        id: &str,
        body: &PackageUpsert,
        what: &str,
    ) -> Result<Package, CallError> {
        match self.packages.get(id) {
            Some(Row::Tombstone) => Err(conflict(
                what,
                "package-cancelled",
                &format!(
                    "package '{id}' was cancelled before it was registered; it cannot be registered now"
                ),
            )),
            // A replay finds what is there, cancelled or not; it resurrects nothing.
            Some(Row::Live(p)) if same_content(p, body) => Ok(p.clone()),
            Some(Row::Live(_)) => Err(conflict(
                what,
                "package-conflict",
                &format!("package '{id}' already exists with different content; use PATCH to change it"),
            )),
            None => {
                let now = self.now();
                let p = Package {
                    id: id.to_owned(),
                    owner_id: body.owner_id.clone(),
                    external_id: body.external_id.clone(),
                    size: body.size,
                    weight: body.weight,
                    tag: body.tag.clone(),
                    status: PackageStatus::Registered,
                    created_at: now,
                    updated_at: now,
                };
                self.packages.insert(id.to_owned(), Row::Live(p.clone()));
                *self.created.packages.entry(id.to_owned()).or_default() += 1;
                Ok(p)
            }
        }
    }

    fn delete_package(&mut self, id: &str) -> Result<(), CallError> {
        let now = self.now();
        match self.packages.get_mut(id) {
            Some(Row::Live(p)) => {
                if p.status != PackageStatus::Cancelled {
                    p.status = PackageStatus::Cancelled;
                    p.updated_at = now;
                }
            }
            Some(Row::Tombstone) => {}
            None => {
                self.packages.insert(id.to_owned(), Row::Tombstone);
            }
        }
        // The service answers 404 for a tombstone; the client counts that as done.
        Ok(())
    }

    /// The ThirdParty service's rules with one carrier of unlimited capacity that serves every
    /// route: same id and request → the same leg; a different request → `leg-conflict`; a
    /// cancelled or pre-empted id → `leg-cancelled`.
    fn arrange_leg(
        &mut self,
        id: &str,
        body: &LegRequest,
        what: &str,
    ) -> Result<ThirdPartyLeg, CallError> {
        match self.legs.get(id) {
            Some(Row::Tombstone) => {
                return Err(conflict(
                    what,
                    "leg-cancelled",
                    &format!("leg '{id}' was cancelled before it was booked"),
                ))
            }
            Some(Row::Live((l, _))) if l.status == LegStatus::Cancelled => {
                return Err(conflict(
                    what,
                    "leg-cancelled",
                    &format!("leg '{id}' was cancelled"),
                ))
            }
            Some(Row::Live((l, req))) if req == body => return Ok(l.clone()),
            Some(Row::Live(_)) => {
                return Err(conflict(
                    what,
                    "leg-conflict",
                    &format!("leg '{id}' exists for a different request"),
                ))
            }
            None => {}
        }
        let (Some(from), Some(to)) = (
            GeoPoint::parse(&body.pickup_location),
            GeoPoint::parse(&body.drop_off_location),
        ) else {
            return Err(conflict(what, "no-carrier-serves-route", "not points"));
        };
        let d = from.distance_km(to);
        let (handover, km) = match body.handover_within_km {
            Some(r) if d > 0.0 => {
                let km = (d - 0.8 * r).max(0.0);
                (from.toward(to, km / d), km)
            }
            Some(_) => (from, 0.0),
            None => (to, d),
        };
        let now = self.now();
        // 60 km/h, whole seconds.
        let secs = (km * 60.0).round() as i64;
        let leg = ThirdPartyLeg {
            delivery_id: id.to_owned(),
            owner_id: body.owner_id.clone(),
            carrier_id: "carrier-fake".into(),
            carrier_name: "Fake Freight".into(),
            from_location: body.pickup_location.clone(),
            to_location: if body.handover_within_km.is_none() {
                body.drop_off_location.clone()
            } else {
                handover.location()
            },
            whole_route: body.handover_within_km.is_none(),
            pickup_time: body.pickup_time,
            handover_time: body.pickup_time + chrono::Duration::seconds(secs),
            distance_km: km,
            status: LegStatus::Booked,
            created_at: now,
            updated_at: now,
        };
        self.legs
            .insert(id.to_owned(), Row::Live((leg.clone(), body.clone())));
        *self.created.legs.entry(id.to_owned()).or_default() += 1;
        Ok(leg)
    }

    fn cancel_leg(&mut self, id: &str) -> Result<(), CallError> {
        let now = self.now();
        match self.legs.get_mut(id) {
            Some(Row::Live((l, _))) => {
                if l.status != LegStatus::Cancelled {
                    l.status = LegStatus::Cancelled;
                    l.updated_at = now;
                }
            }
            Some(Row::Tombstone) => {}
            None => {
                self.legs.insert(id.to_owned(), Row::Tombstone);
            }
        }
        Ok(())
    }

    fn window(&self, req: &DroneReservationRequest) -> TimeWindow {
        // Expedited deliveries get the same window here, for simplicity.
        let minutes = chrono::Duration::minutes(i64::from(self.window_minutes));
        TimeWindow {
            start: req.pickup_time,
            end: req.pickup_time + minutes,
        }
    }

    /// The drones that can carry `size`, in the order the Drone service tries them: `preferred`
    /// first, then the smallest fitting size, each size rotated by the delivery id.
    fn candidates(
        &self,
        delivery_id: &str,
        size: PackageSize,
        preferred: Option<&str>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = preferred {
            if self.drones.iter().any(|(s, id)| *s >= size && id == p) {
                out.push(p.to_owned());
            }
        }
        let spread = fnv(delivery_id);
        for group_size in PackageSize::ALL.into_iter().filter(|s| *s >= size) {
            let group: Vec<&String> = self
                .drones
                .iter()
                .filter(|(s, _)| *s == group_size)
                .map(|(_, id)| id)
                .collect();
            if group.is_empty() {
                continue;
            }
            let first = (spread % group.len() as u64) as usize;
            out.extend(
                group[first..]
                    .iter()
                    .chain(&group[..first])
                    .filter(|id| Some(id.as_str()) != preferred)
                    .map(|id| (*id).clone()),
            );
        }
        out
    }

    /// True when `drone_id` has no active reservation other than `delivery_id`'s overlapping
    /// `window`.
    fn is_free(&self, drone_id: &str, delivery_id: &str, window: &TimeWindow) -> bool {
        !self.reservations.iter().any(|(other, row)| {
            matches!(row, Row::Live(r)
                if other != delivery_id
                    && r.drone_id == drone_id
                    && r.status == ReservationStatus::Active
                    && r.window.overlaps(window))
        })
    }

    fn reserve_drone(
        &mut self,
        delivery_id: &str,
        req: &DroneReservationRequest,
        what: &str,
    ) -> Result<DroneReservation, CallError> {
        let window = self.window(req);
        let now = self.now();
        let current = match self.reservations.get(delivery_id) {
            Some(Row::Tombstone) => return Err(released(what, delivery_id)),
            Some(Row::Live(r)) if r.status == ReservationStatus::Released => {
                return Err(released(what, delivery_id))
            }
            Some(Row::Live(r)) => Some(r.clone()),
            None => None,
        };
        if let Some(current) = &current {
            if current.window == window && current.size == req.size {
                return Ok(current.clone());
            }
        }
        // A new reservation, or a moved one: keep the drone when it is free.
        let preferred = current.as_ref().map(|r| r.drone_id.as_str());
        let free = self
            .candidates(delivery_id, req.size, preferred)
            .into_iter()
            .find(|d| self.is_free(d, delivery_id, &window));
        let Some(drone_id) = free else {
            return Err(CallError::Transient {
                reason: format!(
                    "{what} answered 503 Service Unavailable (no-drone-available): no {} drone is free for the window starting {}",
                    req.size.as_str(),
                    req.pickup_time.to_rfc3339()
                ),
                retry_after: Some(NO_DRONE_RETRY_AFTER),
            });
        };
        let reservation = DroneReservation {
            delivery_id: delivery_id.to_owned(),
            drone_id,
            window,
            status: ReservationStatus::Active,
            package_id: req.package_id.clone(),
            size: req.size,
            owner_id: req.owner_id.clone(),
            pickup_location: req.pickup_location.clone(),
            drop_off_location: req.drop_off_location.clone(),
            expedited: req.expedited,
            created_at: current.as_ref().map_or(now, |r| r.created_at),
            updated_at: now,
        };
        if current.is_none() {
            if !self.packages.contains_key(delivery_id) {
                self.created.reservations_before_package += 1;
            }
            *self
                .created
                .reservations
                .entry(delivery_id.to_owned())
                .or_default() += 1;
        }
        self.reservations
            .insert(delivery_id.to_owned(), Row::Live(reservation.clone()));
        Ok(reservation)
    }

    fn release_drone(&mut self, delivery_id: &str) -> Result<(), CallError> {
        let now = self.now();
        match self.reservations.get_mut(delivery_id) {
            Some(Row::Live(r)) => {
                if r.status != ReservationStatus::Released {
                    r.status = ReservationStatus::Released;
                    r.updated_at = now;
                }
            }
            Some(Row::Tombstone) => {}
            None => {
                self.reservations
                    .insert(delivery_id.to_owned(), Row::Tombstone);
            }
        }
        Ok(())
    }

    fn put_delivery(
        &mut self,
        id: &str,
        body: &DeliveryUpsert,
        what: &str,
    ) -> Result<(), CallError> {
        match self.deliveries.get(id) {
            Some(Row::Tombstone) => Err(conflict(
                what,
                "delivery-cancelled",
                &format!(
                    "delivery '{id}' was cancelled before it was created; it cannot be created now"
                ),
            )),
            // Found: the body is ignored, a replayed step has no second effect (also when the
            // delivery has since been cancelled, as in the real service).
            Some(Row::Live(_)) => Ok(()),
            None => {
                let now = self.now();
                let d = Delivery {
                    id: id.to_owned(),
                    owner_id: body.owner_id.clone(),
                    pickup_location: body.pickup_location.clone(),
                    drop_off_location: body.drop_off_location.clone(),
                    pickup_time: body.pickup_time,
                    deadline: body.deadline.clone(),
                    expedited: body.expedited,
                    confirmation_required: body.confirmation_required,
                    package_id: body.package_id.clone(),
                    drone_id: body.drone_id.clone(),
                    stage: DeliveryStage::Created,
                    created_at: now,
                    updated_at: now,
                };
                self.deliveries.insert(id.to_owned(), Row::Live((d, 0)));
                *self.created.deliveries.entry(id.to_owned()).or_default() += 1;
                Ok(())
            }
        }
    }

    fn reschedule_delivery(
        &mut self,
        id: &str,
        patch: &DeliveryPatch,
        what: &str,
    ) -> Result<Delivery, CallError> {
        let now = self.now();
        let Some(Row::Live((d, reschedules))) = self.deliveries.get_mut(id) else {
            return Err(not_found(what, "delivery", id));
        };
        if d.stage.is_final() {
            return Err(conflict(
                what,
                "delivery-closed",
                &format!(
                    "delivery '{id}' is {} and cannot be rescheduled",
                    d.stage.as_str().to_lowercase()
                ),
            ));
        }
        let mut changed = false;
        if let Some(t) = patch.pickup_time {
            changed |= replace(&mut d.pickup_time, t);
        }
        let texts = [
            (&patch.deadline, &mut d.deadline),
            (&patch.pickup_location, &mut d.pickup_location),
            (&patch.drop_off_location, &mut d.drop_off_location),
            (&patch.drone_id, &mut d.drone_id),
        ];
        for (new, stored) in texts {
            if let Some(new) = new {
                changed |= replace(stored, new.clone());
            }
        }
        // A patch that changes nothing (a retry) records nothing.
        if changed {
            d.stage = DeliveryStage::Rescheduled;
            d.updated_at = now;
            *reschedules += 1;
        }
        Ok(d.clone())
    }

    fn cancel_delivery(&mut self, id: &str) -> Result<(), CallError> {
        let now = self.now();
        match self.deliveries.get_mut(id) {
            Some(Row::Live((d, _))) => {
                if d.stage != DeliveryStage::Cancelled {
                    d.stage = DeliveryStage::Cancelled;
                    d.updated_at = now;
                }
            }
            Some(Row::Tombstone) => {}
            None => {
                self.deliveries.insert(id.to_owned(), Row::Tombstone);
            }
        }
        Ok(())
    }
}

fn replace<T: PartialEq>(stored: &mut T, new: T) -> bool {
    if *stored == new {
        false
    } else {
        *stored = new;
        true
    }
}

/// True when a stored package has exactly the content a PUT asks for (status aside).
fn same_content(p: &Package, body: &PackageUpsert) -> bool {
    p.owner_id == body.owner_id
        && p.external_id == body.external_id
        && p.size == body.size
        && p.weight == body.weight
        && p.tag == body.tag
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn not_found(what: &str, kind: &str, id: &str) -> CallError {
    CallError::Permanent {
        reason: format!("{what} answered 404 Not Found (not-found): no {kind} '{id}'"),
        status: Some(404),
        code: Some("not-found".into()),
    }
}

fn conflict(what: &str, code: &str, detail: &str) -> CallError {
    CallError::Permanent {
        reason: format!("{what} answered 409 Conflict ({code}): {detail}"),
        status: Some(409),
        code: Some(code.into()),
    }
}

fn released(what: &str, delivery_id: &str) -> CallError {
    conflict(
        what,
        "reservation-released",
        &format!(
            "the reservation for delivery '{delivery_id}' was released; a released reservation is not taken again"
        ),
    )
}

#[async_trait]
impl Domain for FakeDomain {
    async fn account(&self, id: &str) -> Result<Account, CallError> {
        let what = format!("account GET /api/accounts/{id}");
        self.call("account", what, |s, what| s.account(id, what))
            .await
    }

    async fn put_package(&self, id: &str, body: &PackageUpsert) -> Result<Package, CallError> {
        let what = format!("package PUT /api/packages/{id}");
        self.call("put_package", what, |s, what| s.put_package(id, body, what))
            .await
    }

    async fn delete_package(&self, id: &str) -> Result<(), CallError> {
        let what = format!("package DELETE /api/packages/{id}");
        self.call("delete_package", what, |s, _| s.delete_package(id))
            .await
    }

    async fn arrange_leg(
        &self,
        delivery_id: &str,
        body: &LegRequest,
    ) -> Result<ThirdPartyLeg, CallError> {
        let what = format!("thirdparty PUT /api/thirdparty/{delivery_id}");
        self.call("arrange_leg", what, |s, what| {
            s.arrange_leg(delivery_id, body, what)
        })
        .await
    }

    async fn cancel_leg(&self, delivery_id: &str) -> Result<(), CallError> {
        let what = format!("thirdparty DELETE /api/thirdparty/{delivery_id}");
        self.call("cancel_leg", what, |s, _| s.cancel_leg(delivery_id))
            .await
    }

    async fn reserve_drone(
        &self,
        delivery_id: &str,
        body: &DroneReservationRequest,
    ) -> Result<DroneReservation, CallError> {
        let what = format!("drone PUT /api/dronedeliveries/{delivery_id}");
        self.call("reserve_drone", what, |s, what| {
            s.reserve_drone(delivery_id, body, what)
        })
        .await
    }

    async fn release_drone(&self, delivery_id: &str) -> Result<(), CallError> {
        let what = format!("drone DELETE /api/dronedeliveries/{delivery_id}");
        self.call("release_drone", what, |s, _| s.release_drone(delivery_id))
            .await
    }

    async fn put_delivery(&self, id: &str, body: &DeliveryUpsert) -> Result<(), CallError> {
        let what = format!("delivery PUT /api/deliveries/{id}");
        self.call("put_delivery", what, |s, what| {
            s.put_delivery(id, body, what)
        })
        .await
    }

    async fn reschedule_delivery(
        &self,
        id: &str,
        body: &DeliveryPatch,
    ) -> Result<Delivery, CallError> {
        let what = format!("delivery PATCH /api/deliveries/{id}");
        self.call("reschedule_delivery", what, |s, what| {
            s.reschedule_delivery(id, body, what)
        })
        .await
    }

    async fn cancel_delivery(&self, id: &str) -> Result<(), CallError> {
        let what = format!("delivery DELETE /api/deliveries/{id}");
        self.call("cancel_delivery", what, |s, _| s.cancel_delivery(id))
            .await
    }
}

// ---------------------------------------------------------------------------------------------
// Tests of the fakes themselves (they run in the simulation's test binary).

fn fake_test_time(minutes: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(DEFAULT_EPOCH_SECS + 3_600, 0).unwrap_or_default()
        + chrono::Duration::minutes(minutes)
}

fn fake_test_reservation(pickup_minutes: i64, size: PackageSize) -> DroneReservationRequest {
    DroneReservationRequest {
        pickup_time: fake_test_time(pickup_minutes),
        pickup_location: "a".into(),
        drop_off_location: "b".into(),
        package_id: "p".into(),
        size,
        expedited: false,
        owner_id: Some("acc".into()),
    }
}

fn fake_test_package() -> PackageUpsert {
    PackageUpsert {
        owner_id: "acc".into(),
        external_id: "ext".into(),
        size: PackageSize::Small,
        weight: 1.0,
        tag: None,
    }
}

fn fake_test_delivery(drone_id: &str) -> DeliveryUpsert {
    DeliveryUpsert {
        owner_id: "acc".into(),
        pickup_location: "a".into(),
        drop_off_location: "b".into(),
        pickup_time: fake_test_time(0),
        deadline: String::new(),
        expedited: false,
        confirmation_required: contracts::ConfirmationType::None,
        package_id: "p".into(),
        drone_id: drone_id.into(),
    }
}

fn fake_test_code<T: std::fmt::Debug>(r: Result<T, CallError>) -> String {
    match r {
        Err(CallError::Permanent { code, .. }) => code.unwrap_or_default(),
        Err(CallError::Transient { reason, .. }) => format!("transient: {reason}"),
        Err(CallError::Rejected { reason, .. }) => format!("rejected: {reason}"),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn fakes_keep_the_services_idempotency_and_tombstone_rules() {
    let d = FakeDomain::new(1, FleetSize::default());
    d.set_account("acc", AccountStatus::Suspended);
    assert_eq!(
        d.account("acc").await.map(|a| a.status),
        Ok(AccountStatus::Suspended)
    );
    assert_eq!(fake_test_code(d.account("nobody").await), "not-found");

    // Package: created once, found again, a tombstone refuses a late PUT.
    let p = fake_test_package();
    assert!(d.put_package("pk1", &p).await.is_ok());
    assert!(d.put_package("pk1", &p).await.is_ok());
    let other = PackageUpsert {
        weight: 2.0,
        ..p.clone()
    };
    assert_eq!(
        fake_test_code(d.put_package("pk1", &other).await),
        "package-conflict"
    );
    assert!(d.delete_package("pk1").await.is_ok());
    assert!(d.delete_package("pk1").await.is_ok());
    // Like the real service: a replay finds the cancelled package and resurrects nothing.
    assert_eq!(
        d.put_package("pk1", &p).await.map(|p| p.status),
        Ok(PackageStatus::Cancelled)
    );
    assert!(d.delete_package("pk2").await.is_ok());
    assert_eq!(
        fake_test_code(d.put_package("pk2", &p).await),
        "package-cancelled"
    );

    // Delivery: PATCH of unknown and cancelled ones, tombstones.
    assert_eq!(
        fake_test_code(
            d.reschedule_delivery("dl1", &DeliveryPatch::default())
                .await
        ),
        "not-found"
    );
    assert!(d
        .put_delivery("dl1", &fake_test_delivery("drone-001"))
        .await
        .is_ok());
    assert!(d
        .put_delivery("dl1", &fake_test_delivery("drone-009"))
        .await
        .is_ok());
    let patch = DeliveryPatch {
        pickup_time: Some(fake_test_time(60)),
        drone_id: Some("drone-002".into()),
        ..DeliveryPatch::default()
    };
    let moved = d.reschedule_delivery("dl1", &patch).await;
    assert_eq!(
        moved.map(|m| (m.pickup_time, m.drone_id)),
        Ok((fake_test_time(60), "drone-002".to_owned()))
    );
    assert!(d.reschedule_delivery("dl1", &patch).await.is_ok());
    assert!(d.cancel_delivery("dl1").await.is_ok());
    assert!(d.cancel_delivery("dl1").await.is_ok());
    assert_eq!(
        fake_test_code(d.reschedule_delivery("dl1", &patch).await),
        "delivery-closed"
    );
    assert!(d.cancel_delivery("dl2").await.is_ok());
    assert_eq!(
        fake_test_code(
            d.put_delivery("dl2", &fake_test_delivery("drone-001"))
                .await
        ),
        "delivery-cancelled"
    );

    let snap = d.snapshot();
    assert_eq!(snap.packages.get("pk1"), Some(&Status::Cancelled));
    assert_eq!(snap.packages.get("pk2"), Some(&Status::Tombstone));
    let dl1 = snap.deliveries.get("dl1");
    assert_eq!(
        dl1.map(|x| (x.status, x.reschedules)),
        Some((Status::Cancelled, 1))
    );
    assert_eq!(
        snap.deliveries.get("dl2").map(|x| x.status),
        Some(Status::Tombstone)
    );
    assert_eq!(snap.created.packages.get("pk1"), Some(&1));
    assert_eq!(snap.created.deliveries.get("dl1"), Some(&1));
    assert!(snap.double_creations().is_empty());
    assert_eq!(snap.calls.get("put_package"), Some(&5));
}

#[tokio::test(start_paused = true)]
async fn fakes_never_double_book_a_drone() {
    let d = FakeDomain::new(
        2,
        FleetSize {
            small: 1,
            medium: 1,
            large: 0,
        },
    );
    let small = |m| fake_test_reservation(m, PackageSize::Small);
    let r1 = d.reserve_drone("d1", &small(0)).await;
    let r2 = d.reserve_drone("d2", &small(10)).await;
    let (Ok(r1), Ok(r2)) = (r1, r2) else {
        panic!("two drones, two reservations");
    };
    assert_ne!(r1.drone_id, r2.drone_id);
    // The same request again: the same reservation.
    assert_eq!(d.reserve_drone("d1", &small(0)).await.as_ref(), Ok(&r1));
    // Both drones are busy around minute 20: no drone, retry in a second.
    match d.reserve_drone("d3", &small(20)).await {
        Err(CallError::Transient {
            reason,
            retry_after,
        }) => {
            assert!(reason.contains("no-drone-available"), "{reason}");
            assert_eq!(retry_after, Some(NO_DRONE_RETRY_AFTER));
        }
        other => panic!("expected no drone, got {other:?}"),
    }
    // A medium package never takes the small drone.
    let medium = d
        .reserve_drone("d4", &fake_test_reservation(120, PackageSize::Medium))
        .await;
    assert_eq!(medium.map(|r| r.drone_id), Ok("drone-002".to_owned()));
    // Moving d1 to where its drone is free keeps the drone.
    let moved = d.reserve_drone("d1", &small(200)).await;
    assert_eq!(moved.as_ref().map(|r| &r.drone_id), Ok(&r1.drone_id));
    // Moving d2 to where d4 holds its drone moves it to the other drone, which is free then.
    let onto_busy = d.reserve_drone("d2", &small(125)).await;
    assert_eq!(onto_busy.map(|r| r.drone_id), Ok(r1.drone_id.clone()));
    // Moving it where no drone is free fails and leaves the reservation where it was.
    let d5 = d
        .reserve_drone("d5", &fake_test_reservation(200, PackageSize::Medium))
        .await;
    assert_eq!(d5.map(|r| r.drone_id), Ok("drone-002".to_owned()));
    assert!(d.reserve_drone("d2", &small(210)).await.is_err());
    let d2 = d.snapshot().reservations.get("d2").map(|r| r.window.start);
    assert_eq!(d2, Some(fake_test_time(125)));
    // Released is final; releasing an unknown one leaves a tombstone.
    assert!(d.release_drone("d1").await.is_ok());
    assert_eq!(
        fake_test_code(d.reserve_drone("d1", &small(200)).await),
        "reservation-released"
    );
    assert!(d.release_drone("d9").await.is_ok());
    assert_eq!(
        fake_test_code(d.reserve_drone("d9", &small(500)).await),
        "reservation-released"
    );
    let snap = d.snapshot();
    assert!(d.overlaps().is_empty(), "{:?}", d.overlaps());
    assert!(snap.double_creations().is_empty());
    assert_eq!(
        snap.reservations.get("d9").map(|r| r.status),
        Some(Status::Tombstone)
    );
    assert_eq!(
        snap.reservations.get("d1").map(|r| r.status),
        Some(Status::Cancelled)
    );
}

#[tokio::test(start_paused = true)]
async fn fake_faults_are_seeded_and_lost_answers_keep_their_effect() {
    async fn run(seed: u64) -> (Vec<String>, Duration, Snapshot) {
        let d = FakeDomain::new(
            seed,
            FleetSize {
                small: 2,
                medium: 0,
                large: 0,
            },
        );
        d.set_faults(Faults {
            transient_error: 0.3,
            lost_answer: 0.3,
            lost_answer_timeout: Duration::from_secs(2),
            slow_answer: 0.5,
            max_slowness: Duration::from_millis(800),
            ..Faults::none()
        });
        let start = tokio::time::Instant::now();
        let mut outcomes = Vec::new();
        for i in 0..40 {
            let r = d
                .put_package(&format!("pk{}", i % 10), &fake_test_package())
                .await;
            outcomes.push(match r {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.to_string(),
            });
        }
        (outcomes, start.elapsed(), d.snapshot())
    }
    let (a, ta, sa) = run(7).await;
    let (b, tb, sb) = run(7).await;
    assert_eq!((&a, ta), (&b, tb), "same seed, same run");
    assert_eq!(sa.faults, sb.faults);
    assert!(
        sa.faults.transient_errors > 0 && sa.faults.lost_answers > 0 && sa.faults.slow_answers > 0
    );
    // Every lost answer still registered its package, and none was created twice.
    assert!(a.iter().any(|o| o.contains("timed out")));
    assert!(sa.double_creations().is_empty());
    let (c, _, _) = run(8).await;
    assert_ne!(a, c, "another seed, another run");

    // Switching the faults off lets everything finish cleanly.
    let d = FakeDomain::new(9, FleetSize::default());
    d.set_faults(Faults {
        transient_error: 1.0,
        ..Faults::none()
    });
    assert!(d.delete_package("x").await.is_err());
    d.set_faults(Faults::none());
    assert!(d.delete_package("x").await.is_ok());
}
