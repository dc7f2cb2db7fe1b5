//! What keeps this process from hammering a service that is down (DESIGN §6): a circuit breaker
//! and a cap on concurrent calls per target service, in front of every call of the client.
//!
//! **Breaker.** Closed, it counts the outcome of every call in a rolling window (`window_ms`,
//! kept in ten buckets, so the oldest tenth leaves at once). When at least `min_calls` calls
//! finished within the window and the share that failed is at least `failure_ratio`, it opens:
//! every call is refused at once with [`CallError::Rejected`], whose `retry_after` is the time
//! left until the next probe plus a random jitter of up to a tenth of `open_ms` (50 ms – 1 s), so
//! that the thousands of sagas parked on it do not all wake in the same millisecond. After
//! `open_ms` it is half-open: up to `half_open_probes` (default 2) calls go through at once as
//! probes, the others are refused with a short `retry_after`; that many probe successes in a row
//! close it with an empty window, one probe failure opens it again, for twice as long as the
//! time before (`open_ms`, doubled per failed probe since it last closed, up to `max_open_ms`:
//! a service that stays down is asked, and the sagas parked on it wake, less and less often;
//! found by the chaos case `package_outage_behind_the_breaker`, where every parked saga's
//! wake-up per open period is a journal write). Two probes,
//! not one: a flapping service that answers one call in between does not reopen the floodgates,
//! and a sick one is never asked to serve more than two calls at once.
//!
//! **What counts as a failure** (the service is unwell): no answer — connect errors, timeouts, a
//! connection broken mid-answer — and the statuses `5xx`, `408` and `429`. Not failures (the
//! service worked and said something true): every success, every other `4xx` (the request was
//! wrong, not the service), a `2xx` whose body does not decode, and a `503` whose problem `code`
//! is one of [`CAPACITY_CODES`] — a healthy service saying "full" or "busy with that one": Drone's
//! `no-drone-available` under normal overbooking, ThirdParty's `no-carrier-available`, and
//! Delivery's `delivery-busy` (concurrent reports on one delivery). Those must never cut a
//! service off from every other saga. A request that was never sent (it could not be built) and
//! a call given up mid-way by its caller (its future dropped) count neither way.
//!
//! **Cap.** At most `max_concurrent_calls` calls are in flight to one service from this process;
//! one more waits up to `cap_wait_ms` for a free slot and is then refused with a short
//! `retry_after` (250 ms – 1 s). A refused call is never made: the caller waits without spending
//! an attempt.
//!
//! **Why not a crate.** `failsafe` 1.3, the established one, keeps its state private: it cannot
//! tell how long until the next probe (which callers need to park exactly that long) nor give a
//! snapshot for the dashboard, lets every call through while half-open, and runs on its own clock.
//! `tower-circuitbreaker` 0.2 is a young tower middleware (this client calls reqwest directly,
//! with no tower stack), reports through the `metrics` facade rather than the prometheus registry
//! the services serve, and does not report the time until half-open either. The state machine
//! below is small, takes the time as an argument (tests drive it without sleeping), and has no
//! I/O.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use contracts::{BreakerState, BreakerStatus};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use reqwest::StatusCode;
use tokio::sync::{Semaphore, SemaphorePermit, TryAcquireError};

use crate::settings::BreakerSettings;
use crate::{CallError, DownstreamSettings};

/// Problem codes of a `503` that mean "no capacity for this request right now" from a service
/// that is working normally; they never count against its breaker.
pub(crate) const CAPACITY_CODES: &[&str] = &[
    // Drone: every drone of the size is reserved for the window (overbooking; Retry-After).
    "no-drone-available",
    // ThirdParty: every carrier serving the route is full.
    "no-carrier-available",
    // Delivery: other requests are changing the same delivery at this moment.
    "delivery-busy",
];

/// The rolling window is kept in this many buckets of `window_ms / WINDOW_BUCKETS`.
const WINDOW_BUCKETS: u64 = 10;

/// What one finished call says about the health of the service called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It answered, as a working service does (whatever the answer meant for the caller).
    Healthy,
    /// No answer, or one that says it is unwell.
    Unwell,
    /// Nothing reached it (or the caller gave up on the call): says nothing either way.
    Unknown,
}

impl Verdict {
    /// An answer with `status`; `code` is asked for (the body parsed) only for a failure status.
    pub(crate) fn of_answer(status: StatusCode, code: impl FnOnce() -> Option<String>) -> Self {
        let failing = status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS;
        if !failing {
            return Verdict::Healthy;
        }
        if status == StatusCode::SERVICE_UNAVAILABLE
            && code().is_some_and(|c| CAPACITY_CODES.contains(&c.as_str()))
        {
            return Verdict::Healthy;
        }
        Verdict::Unwell
    }

    /// No answer: the network or a timeout (transient), or a request that could not be built
    /// (permanent, never sent).
    pub(crate) fn of_transport(error: &CallError) -> Self {
        match error {
            CallError::Transient { .. } => Verdict::Unwell,
            CallError::Permanent { .. } | CallError::Rejected { .. } => Verdict::Unknown,
        }
    }
}

/// The breaker's settings in the units it works in.
#[derive(Debug, Clone, Copy)]
struct Limits {
    window: Duration,
    bucket: Duration,
    min_calls: u64,
    failure_ratio: f64,
    open: Duration,
    max_open: Duration,
    probes: u32,
}

impl Limits {
    fn of(s: &BreakerSettings) -> Self {
        let window = Duration::from_millis(s.window_ms);
        Self {
            window,
            bucket: (window / u32::try_from(WINDOW_BUCKETS).unwrap_or(10))
                .max(Duration::from_millis(1)),
            min_calls: u64::from(s.min_calls),
            failure_ratio: s.failure_ratio,
            open: Duration::from_millis(s.open_ms),
            max_open: Duration::from_millis(s.max_open_ms.max(s.open_ms)),
            probes: s.half_open_probes,
        }
    }
}

/// Calls and failures per time bucket, the oldest first.
#[derive(Debug, Default)]
struct Window {
    buckets: VecDeque<Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    index: u64,
    calls: u64,
    failures: u64,
}

impl Window {
    fn forget_before(&mut self, now_index: u64) {
        let oldest = now_index.saturating_sub(WINDOW_BUCKETS - 1);
        while self.buckets.front().is_some_and(|b| b.index < oldest) {
            self.buckets.pop_front();
        }
    }

    fn add(&mut self, now_index: u64, failed: bool) {
        self.forget_before(now_index);
        match self.buckets.back_mut() {
            Some(b) if b.index == now_index => {
                b.calls += 1;
                b.failures += u64::from(failed);
            }
            _ => self.buckets.push_back(Bucket {
                index: now_index,
                calls: 1,
                failures: u64::from(failed),
            }),
        }
    }

    /// (calls, failures) within the window ending at `now_index`.
    fn totals(&self, now_index: u64) -> (u64, u64) {
        let oldest = now_index.saturating_sub(WINDOW_BUCKETS - 1);
        self.buckets
            .iter()
            .filter(|b| b.index >= oldest)
            .fold((0, 0), |(c, f), b| (c + b.calls, f + b.failures))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

/// Permission to make one call, to be handed back with its verdict (or released).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    /// Outcomes of calls let through before the last change of state are ignored: they say
    /// nothing about the state the breaker is in now.
    generation: u64,
    probe: bool,
}

/// The breaker's answer to "may I call?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Call(Ticket),
    /// Open: this long until the next probe.
    Open {
        left: Duration,
    },
    /// Half-open and every probe is under way.
    ProbesBusy,
}

/// One service's circuit breaker: a state machine that is given the time, never reads it.
#[derive(Debug)]
pub(crate) struct Breaker {
    limits: Limits,
    /// Bucket indexes count from here.
    epoch: Instant,
    state: State,
    generation: u64,
    window: Window,
    opened_at: Option<Instant>,
    /// Probes that failed since the breaker last closed: each doubles the next open time.
    failed_probes: u32,
    /// Why it opened last.
    why: String,
}

impl Breaker {
    pub(crate) fn new(settings: &BreakerSettings, now: Instant) -> Self {
        Self {
            limits: Limits::of(settings),
            epoch: now,
            state: State::Closed,
            generation: 0,
            window: Window::default(),
            opened_at: None,
            failed_probes: 0,
            why: String::new(),
        }
    }

    fn index(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(since / self.limits.bucket.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    pub(crate) fn state(&self) -> BreakerState {
        match self.state {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn set(&mut self, state: State) -> Option<BreakerState> {
        self.state = state;
        self.generation += 1;
        Some(self.state())
    }

    /// Opens for `open_ms`, doubled for every probe that failed since the breaker last closed,
    /// up to `max_open_ms`: a service that stays down is asked (and the sagas waiting on it
    /// wake) less and less often.
    fn open(&mut self, now: Instant, why: String) -> Option<BreakerState> {
        self.opened_at = Some(now);
        self.why = why;
        let factor = 1u32 << self.failed_probes.min(16);
        let open = self
            .limits
            .open
            .saturating_mul(factor)
            .min(self.limits.max_open);
        self.set(State::Open { until: now + open })
    }

    /// Open → half-open once the open time is over. Returns the new state when it changed.
    pub(crate) fn tick(&mut self, now: Instant) -> Option<BreakerState> {
        match self.state {
            State::Open { until } if now >= until => self.set(State::HalfOpen {
                in_flight: 0,
                successes: 0,
            }),
            _ => None,
        }
    }

    /// May a call be made now? A `Call` ticket must come back through [`finish`](Self::finish)
    /// or [`release`](Self::release).
    pub(crate) fn admit(&mut self, now: Instant) -> (Admission, Option<BreakerState>) {
        let changed = self.tick(now);
        let generation = self.generation;
        let admission = match &mut self.state {
            State::Closed => Admission::Call(Ticket {
                generation,
                probe: false,
            }),
            State::Open { until } => Admission::Open {
                left: until.saturating_duration_since(now),
            },
            State::HalfOpen {
                in_flight,
                successes,
            } => {
                if *in_flight + *successes < self.limits.probes {
                    *in_flight += 1;
                    Admission::Call(Ticket {
                        generation,
                        probe: true,
                    })
                } else {
                    Admission::ProbesBusy
                }
            }
        };
        (admission, changed)
    }

    /// The outcome of a call let through. Returns the new state when it changed.
    pub(crate) fn finish(
        &mut self,
        ticket: Ticket,
        verdict: Verdict,
        now: Instant,
    ) -> Option<BreakerState> {
        if ticket.generation != self.generation {
            return None;
        }
        match (&mut self.state, ticket.probe) {
            (State::Closed, false) => {
                if verdict == Verdict::Unknown {
                    return None;
                }
                let index = self.index(now);
                self.window.add(index, verdict == Verdict::Unwell);
                let (calls, failures) = self.window.totals(index);
                let ratio = failures as f64 / calls.max(1) as f64;
                if verdict == Verdict::Unwell
                    && calls >= self.limits.min_calls
                    && ratio >= self.limits.failure_ratio
                {
                    let why = format!(
                        "{failures} of {calls} calls failed in {}",
                        seconds(self.limits.window)
                    );
                    return self.open(now, why);
                }
                None
            }
            (
                State::HalfOpen {
                    in_flight,
                    successes,
                },
                true,
            ) => {
                *in_flight = in_flight.saturating_sub(1);
                match verdict {
                    Verdict::Unknown => None,
                    Verdict::Unwell => {
                        self.failed_probes = self.failed_probes.saturating_add(1);
                        self.open(now, "a probe call failed".to_owned())
                    }
                    Verdict::Healthy => {
                        *successes += 1;
                        if *successes >= self.limits.probes {
                            self.window = Window::default();
                            self.failed_probes = 0;
                            self.set(State::Closed)
                        } else {
                            None
                        }
                    }
                }
            }
            _ => None,
        }
    }

    /// A ticket whose call was not made after all (no free slot, or its caller gave up).
    pub(crate) fn release(&mut self, ticket: Ticket, now: Instant) {
        self.finish(ticket, Verdict::Unknown, now);
    }

    /// (calls, failures) in the window now.
    fn totals(&self, now: Instant) -> (u64, u64) {
        self.window.totals(self.index(now))
    }
}

/// Why a call was refused, as the `reason` label of `downstream_rejected_calls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Open,
    HalfOpen,
    Concurrency,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Open => "open",
            Refusal::HalfOpen => "half_open",
            Refusal::Concurrency => "concurrency",
        }
    }
}

fn transition_label(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::HalfOpen => "half_open",
        BreakerState::Open => "open",
    }
}

fn gauge_value(state: BreakerState) -> i64 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
}

/// "10 s", "4.2 s", "0.3 s".
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// The breakers' clock: tokio's, so that tests with paused time move it too (the same as
/// `Instant::now()` otherwise).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A random wait in `[0, max]`, to the millisecond.
fn jitter(max: Duration) -> Duration {
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::random_range(0..=max_ms))
}

/// The jitter added to an open breaker's time until its next probe.
fn open_jitter(open: Duration) -> Duration {
    jitter((open / 10).clamp(Duration::from_millis(50), Duration::from_secs(1)))
}

/// The wait given when the probes are under way or no slot is free: 250 ms – 1 s.
fn short_wait() -> Duration {
    Duration::from_millis(250) + jitter(Duration::from_millis(750))
}

/// One target service: its breaker, its slots, what it refused.
#[derive(Debug)]
struct Target {
    name: &'static str,
    breaker: Mutex<Breaker>,
    slots: Semaphore,
    rejected: AtomicU64,
}

impl Target {
    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The metrics of one client's protection. Created with it, so they count from the start
/// whether or not they are registered anywhere.
#[derive(Debug, Clone)]
struct Metrics {
    state: IntGaugeVec,
    rejected: IntCounterVec,
    transitions: IntCounterVec,
    in_flight: IntGaugeVec,
}

impl Metrics {
    fn new() -> anyhow::Result<Self> {
        // `target`, not `service`: Prometheus Operator's scrape config gives every sample the
        // label `service` (the scraped pod's Kubernetes Service), which would rename ours to
        // `exported_service`.
        Ok(Self {
            state: IntGaugeVec::new(
                Opts::new(
                    "downstream_breaker_state",
                    "Circuit breaker per downstream service called: 0 closed, 1 half-open, 2 open",
                ),
                &["target"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "downstream_rejected_calls_total",
                    "Calls to a downstream service refused without being made (reason: open, half_open, concurrency)",
                ),
                &["target", "reason"],
            )?,
            transitions: IntCounterVec::new(
                Opts::new(
                    "downstream_breaker_transitions_total",
                    "Circuit breaker state changes per downstream service, by the state entered",
                ),
                &["target", "to"],
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new(
                    "downstream_calls_in_flight",
                    "Calls to a downstream service in flight from this process",
                ),
                &["target"],
            )?,
        })
    }
}

/// The breakers and caps of one client, one per target service.
#[derive(Debug)]
pub(crate) struct Protection {
    breaker_enabled: bool,
    open: Duration,
    cap_wait: Duration,
    max_concurrent_calls: usize,
    targets: Vec<Target>,
    metrics: Metrics,
}

impl Protection {
    /// Checks the settings, naming the one that is wrong.
    pub(crate) fn new(
        settings: &DownstreamSettings,
        names: &[&'static str],
    ) -> anyhow::Result<Self> {
        let b = &settings.breaker;
        if b.window_ms == 0 {
            bail!("downstream breaker.window_ms must be more than 0");
        }
        if b.min_calls == 0 {
            bail!("downstream breaker.min_calls must be more than 0");
        }
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            bail!(
                "downstream breaker.failure_ratio must be more than 0 and at most 1, not {}",
                b.failure_ratio
            );
        }
        if b.open_ms == 0 {
            bail!("downstream breaker.open_ms must be more than 0");
        }
        if b.half_open_probes == 0 {
            bail!("downstream breaker.half_open_probes must be more than 0");
        }
        if settings.max_concurrent_calls == 0
            || settings.max_concurrent_calls > Semaphore::MAX_PERMITS
        {
            bail!(
                "downstream max_concurrent_calls must be between 1 and {}",
                Semaphore::MAX_PERMITS
            );
        }
        let metrics = Metrics::new().context("creating the downstream metrics")?;
        let now = now();
        let targets = names
            .iter()
            .map(|&name| {
                metrics.state.with_label_values(&[name]).set(0);
                metrics.in_flight.with_label_values(&[name]).set(0);
                Target {
                    name,
                    breaker: Mutex::new(Breaker::new(b, now)),
                    slots: Semaphore::new(settings.max_concurrent_calls),
                    rejected: AtomicU64::new(0),
                }
            })
            .collect();
        Ok(Self {
            breaker_enabled: b.enabled,
            open: Duration::from_millis(b.open_ms),
            cap_wait: Duration::from_millis(settings.cap_wait_ms),
            max_concurrent_calls: settings.max_concurrent_calls,
            targets,
            metrics,
        })
    }

    fn target(&self, index: usize) -> Option<&Target> {
        self.targets.get(index)
    }

    fn changed(&self, target: &Target, to: Option<BreakerState>) {
        let Some(to) = to else { return };
        self.metrics
            .state
            .with_label_values(&[target.name])
            .set(gauge_value(to));
        self.metrics
            .transitions
            .with_label_values(&[target.name, transition_label(to)])
            .inc();
        match to {
            BreakerState::Open => {
                let why = target.breaker().why.clone();
                let open_ms = u64::try_from(self.open.as_millis()).unwrap_or(u64::MAX);
                tracing::warn!(
                    service = target.name,
                    reason = %why,
                    open_ms,
                    "downstream circuit breaker opened: calls are refused until its probe"
                );
            }
            BreakerState::HalfOpen => {
                tracing::info!(
                    service = target.name,
                    "downstream circuit breaker half-open: probing"
                );
            }
            BreakerState::Closed => {
                tracing::info!(
                    service = target.name,
                    "downstream circuit breaker closed: the service answers again"
                );
            }
        }
    }

    fn refuse(
        &self,
        target: &Target,
        refusal: Refusal,
        reason: String,
        retry_after: Duration,
    ) -> CallError {
        target.rejected.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .rejected
            .with_label_values(&[target.name, refusal.label()])
            .inc();
        tracing::debug!(service = target.name, reason = %reason, "downstream call rejected");
        CallError::Rejected {
            reason,
            retry_after,
        }
    }

    /// Lets one call to target `index` through, or refuses it at once (breaker) or after
    /// `cap_wait` (no free slot). The pass must be [`finish`](Pass::finish)ed with the call's
    /// verdict; dropped unfinished, it counts as a call not made.
    pub(crate) async fn enter(&self, index: usize) -> Result<Pass<'_>, CallError> {
        let Some(target) = self.target(index) else {
            return Err(CallError::Permanent {
                reason: format!("no downstream target number {index}"),
                status: None,
                code: None,
            });
        };
        let ticket = if self.breaker_enabled {
            let now = now();
            let (admission, changed) = target.breaker().admit(now);
            self.changed(target, changed);
            match admission {
                Admission::Call(ticket) => Some(ticket),
                Admission::Open { left } => {
                    let retry_after = left + open_jitter(self.open);
                    let why = target.breaker().why.clone();
                    return Err(self.refuse(
                        target,
                        Refusal::Open,
                        format!(
                            "{} circuit breaker is open ({why}); next probe in {}",
                            target.name,
                            seconds(retry_after)
                        ),
                        retry_after,
                    ));
                }
                Admission::ProbesBusy => {
                    let retry_after = short_wait();
                    return Err(self.refuse(
                        target,
                        Refusal::HalfOpen,
                        format!(
                            "{} circuit breaker is half-open and its probe calls are under way; try again in {}",
                            target.name,
                            seconds(retry_after)
                        ),
                        retry_after,
                    ));
                }
            }
        } else {
            None
        };
        // From here a dropped pass gives the ticket back.
        let mut pass = Pass {
            protection: self,
            target,
            ticket,
            slot: None,
        };
        let slot = match target.slots.try_acquire() {
            Ok(slot) => slot,
            Err(TryAcquireError::Closed) | Err(TryAcquireError::NoPermits) => {
                match tokio::time::timeout(self.cap_wait, target.slots.acquire()).await {
                    Ok(Ok(slot)) => slot,
                    Ok(Err(_)) | Err(_) => {
                        let retry_after = short_wait();
                        let refused = self.refuse(
                            target,
                            Refusal::Concurrency,
                            format!(
                                "{} already has {} calls in flight from this process (waited {} for one to finish); try again in {}",
                                target.name,
                                self.max_concurrent_calls,
                                seconds(self.cap_wait),
                                seconds(retry_after)
                            ),
                            retry_after,
                        );
                        drop(pass);
                        return Err(refused);
                    }
                }
            }
        };
        self.metrics
            .in_flight
            .with_label_values(&[target.name])
            .inc();
        pass.slot = Some(slot);
        Ok(pass)
    }

    /// Open breakers whose time is over become half-open even when no call comes (the gauge and
    /// the snapshot must not say "open" for ever about a service nobody calls any more).
    fn tick_all(&self) {
        if !self.breaker_enabled {
            return;
        }
        let now = now();
        for target in &self.targets {
            let changed = target.breaker().tick(now);
            self.changed(target, changed);
        }
    }

    /// Every target's breaker and cap now.
    pub(crate) fn snapshot(&self) -> Vec<BreakerStatus> {
        self.tick_all();
        let now = now();
        let wall = Utc::now();
        let at = |instant: Instant| -> Option<DateTime<Utc>> {
            let delta = if instant >= now {
                chrono::Duration::from_std(instant - now).ok()
            } else {
                chrono::Duration::from_std(now - instant).ok().map(|d| -d)
            };
            delta.map(|d| wall + d)
        };
        self.targets
            .iter()
            .map(|target| {
                let b = target.breaker();
                let state = if self.breaker_enabled {
                    b.state()
                } else {
                    BreakerState::Closed
                };
                let (calls, failures) = b.totals(now);
                let open = state != BreakerState::Closed;
                let max = self.max_concurrent_calls;
                let free = target.slots.available_permits();
                BreakerStatus {
                    service: target.name.to_owned(),
                    state,
                    calls_in_window: calls,
                    failures_in_window: failures,
                    reason: open.then(|| b.why.clone()),
                    opened_at: b.opened_at.filter(|_| open).and_then(at),
                    next_probe_at: match b.state {
                        State::Open { until } => at(until),
                        _ => None,
                    },
                    rejected_total: target.rejected.load(Ordering::Relaxed),
                    in_flight: u64::try_from(max.saturating_sub(free)).unwrap_or(u64::MAX),
                    max_concurrent_calls: u64::try_from(max).unwrap_or(u64::MAX),
                }
            })
            .collect()
    }

    /// The four metrics, in `registry`, brought up to date at each scrape.
    pub(crate) fn register(self: &Arc<Self>, registry: &Registry) -> anyhow::Result<()> {
        registry
            .register(Box::new(Exported {
                protection: Arc::downgrade(self),
                metrics: self.metrics.clone(),
            }))
            .context("registering the downstream metrics (breaker state, rejected calls, transitions, calls in flight)")
    }
}

/// One call let through: holds its slot and its breaker ticket until it is finished.
#[derive(Debug)]
pub(crate) struct Pass<'a> {
    protection: &'a Protection,
    target: &'a Target,
    ticket: Option<Ticket>,
    slot: Option<SemaphorePermit<'a>>,
}

impl Pass<'_> {
    /// The call's outcome goes to the breaker; the slot is freed.
    pub(crate) fn finish(mut self, verdict: Verdict) {
        if let Some(ticket) = self.ticket.take() {
            let changed = self.target.breaker().finish(ticket, verdict, now());
            self.protection.changed(self.target, changed);
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.target.breaker().release(ticket, now());
        }
        if self.slot.take().is_some() {
            self.protection
                .metrics
                .in_flight
                .with_label_values(&[self.target.name])
                .dec();
        }
    }
}

/// What the registry holds: the metrics, and a way to bring the breaker states up to date before
/// they are read.
struct Exported {
    protection: std::sync::Weak<Protection>,
    metrics: Metrics,
}

impl Collector for Exported {
    fn desc(&self) -> Vec<&Desc> {
        let m = &self.metrics;
        let mut out = m.state.desc();
        out.extend(m.rejected.desc());
        out.extend(m.transitions.desc());
        out.extend(m.in_flight.desc());
        out
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(p) = self.protection.upgrade() {
            p.tick_all();
        }
        let m = &self.metrics;
        let mut out = m.state.collect();
        out.extend(m.rejected.collect());
        out.extend(m.transitions.collect());
        out.extend(m.in_flight.collect());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn settings() -> BreakerSettings {
        BreakerSettings::default()
    }

    /// Admits one call at `now` and finishes it with `verdict`.
    fn call(b: &mut Breaker, now: Instant, verdict: Verdict) -> Option<BreakerState> {
        match b.admit(now).0 {
            Admission::Call(t) => b.finish(t, verdict, now),
            other => panic!("expected the call to be let through, got {other:?}"),
        }
    }

    fn left(b: &mut Breaker, now: Instant) -> Duration {
        match b.admit(now).0 {
            Admission::Open { left } => left,
            other => panic!("expected open, got {other:?}"),
        }
    }

    /// A breaker opened at `t0` by 20 failures of 20 calls.
    fn opened(t0: Instant) -> Breaker {
        let mut b = Breaker::new(&settings(), t0);
        for i in 0..19 {
            assert_eq!(call(&mut b, t0 + i * MS, Verdict::Unwell), None);
        }
        assert_eq!(
            call(&mut b, t0 + 19 * MS, Verdict::Unwell),
            Some(BreakerState::Open)
        );
        b
    }

    #[test]
    fn opens_at_the_failure_ratio_once_enough_calls_were_made() {
        let t0 = Instant::now();
        let mut b = Breaker::new(&settings(), t0);
        // 10 successes and 9 failures: 19 calls, below min_calls, whatever the ratio.
        for i in 0..10 {
            assert_eq!(call(&mut b, t0 + i * MS, Verdict::Healthy), None);
        }
        for i in 10..19 {
            assert_eq!(call(&mut b, t0 + i * MS, Verdict::Unwell), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // The 20th call, a failure: 10 of 20 failed, exactly the ratio.
        assert_eq!(
            call(&mut b, t0 + 19 * MS, Verdict::Unwell),
            Some(BreakerState::Open)
        );
        assert_eq!(b.why, "10 of 20 calls failed in 10 s");
    }

    #[test]
    fn stays_closed_below_the_ratio_or_below_min_calls() {
        let t0 = Instant::now();
        let mut b = Breaker::new(&settings(), t0);
        // 11 successes, 9 failures: 45 % failed.
        for i in 0..11 {
            call(&mut b, t0 + i * MS, Verdict::Healthy);
        }
        for i in 11..20 {
            assert_eq!(call(&mut b, t0 + i * MS, Verdict::Unwell), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);

        // 19 failures of 19 calls: every call failed, but too few to judge.
        let mut b = Breaker::new(&settings(), t0);
        for i in 0..19 {
            assert_eq!(call(&mut b, t0 + i * MS, Verdict::Unwell), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // Failures that left the window do not count: 11 s later, 19 more are again too few.
        let later = t0 + Duration::from_secs(11);
        for i in 0..19 {
            assert_eq!(call(&mut b, later + i * MS, Verdict::Unwell), None);
        }
        assert_eq!(b.totals(later + 19 * MS), (19, 19));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn capacity_answers_and_client_errors_are_not_failures() {
        let capacity = |code: &str| {
            let code = code.to_owned();
            Verdict::of_answer(StatusCode::SERVICE_UNAVAILABLE, move || Some(code))
        };
        for code in CAPACITY_CODES {
            assert_eq!(capacity(code), Verdict::Healthy, "{code}");
        }
        // The test fault injector's 503 and a 503 without a body are failures.
        assert_eq!(capacity("injected-fault"), Verdict::Unwell);
        assert_eq!(
            Verdict::of_answer(StatusCode::SERVICE_UNAVAILABLE, || None),
            Verdict::Unwell
        );
        // A capacity code on another status is not a capacity answer.
        assert_eq!(
            Verdict::of_answer(StatusCode::INTERNAL_SERVER_ERROR, || Some(
                "no-drone-available".into()
            )),
            Verdict::Unwell
        );
        for status in [500, 502, 504, 408, 429] {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
            assert_eq!(
                Verdict::of_answer(status, || None),
                Verdict::Unwell,
                "{status}"
            );
        }
        for status in [200, 201, 204, 400, 401, 403, 404, 409, 422] {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
            assert_eq!(
                Verdict::of_answer(status, || panic!("the body is not read for {status}")),
                Verdict::Healthy,
                "{status}"
            );
        }
        let transient = CallError::Transient {
            reason: "timeout".into(),
            retry_after: None,
        };
        assert_eq!(Verdict::of_transport(&transient), Verdict::Unwell);
        let unbuildable = CallError::Permanent {
            reason: "bad header".into(),
            status: None,
            code: None,
        };
        assert_eq!(Verdict::of_transport(&unbuildable), Verdict::Unknown);

        // A fleet that stays full for 40 calls never opens the drone breaker; nor do 40 `409`s.
        let t0 = Instant::now();
        let mut b = Breaker::new(&settings(), t0);
        for i in 0..40 {
            assert_eq!(
                call(&mut b, t0 + i * MS, capacity("no-drone-available")),
                None
            );
            let conflict = Verdict::of_answer(StatusCode::CONFLICT, || None);
            assert_eq!(call(&mut b, t0 + i * MS, conflict), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.totals(t0 + 40 * MS), (80, 0));
    }

    #[test]
    fn open_refuses_every_call_with_the_time_left_until_the_probe() {
        let t0 = Instant::now();
        let opened_at = t0 + 19 * MS;
        let mut b = opened(t0);
        assert_eq!(left(&mut b, opened_at), Duration::from_secs(5));
        assert_eq!(
            left(&mut b, opened_at + Duration::from_millis(800)),
            Duration::from_millis(4200)
        );
        assert_eq!(
            left(&mut b, opened_at + Duration::from_millis(4999)),
            Duration::from_millis(1)
        );
        assert_eq!(b.state(), BreakerState::Open);
        // Late outcomes of calls let through before it opened change nothing.
        let mut c = Breaker::new(&settings(), t0);
        let Admission::Call(early) = c.admit(t0).0 else {
            panic!("closed lets calls through")
        };
        for i in 0..20 {
            call(&mut c, t0 + i * MS, Verdict::Unwell);
        }
        assert_eq!(c.state(), BreakerState::Open);
        assert_eq!(c.finish(early, Verdict::Healthy, t0 + 30 * MS), None);
        assert_eq!(c.state(), BreakerState::Open);
    }

    #[test]
    fn half_open_lets_only_the_probes_through_and_closes_on_their_success() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let probe_time = t0 + 19 * MS + Duration::from_secs(5);
        let (first, changed) = b.admit(probe_time);
        assert_eq!(changed, Some(BreakerState::HalfOpen));
        let (second, changed) = b.admit(probe_time);
        assert_eq!(changed, None);
        let (Admission::Call(first), Admission::Call(second)) = (first, second) else {
            panic!("two probes are let through: {first:?} {second:?}");
        };
        assert!(first.probe && second.probe);
        // Every other call waits for the probes.
        assert_eq!(b.admit(probe_time).0, Admission::ProbesBusy);
        assert_eq!(b.finish(first, Verdict::Healthy, probe_time), None);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // One probe succeeded, one is under way: still nobody else.
        assert_eq!(b.admit(probe_time).0, Admission::ProbesBusy);
        assert_eq!(
            b.finish(second, Verdict::Healthy, probe_time),
            Some(BreakerState::Closed)
        );
        // Closed with an empty window: the failures that opened it are forgotten.
        assert_eq!(b.totals(probe_time), (0, 0));
        assert!(matches!(
            b.admit(probe_time).0,
            Admission::Call(Ticket { probe: false, .. })
        ));
    }

    #[test]
    fn a_failed_probe_opens_it_again_for_twice_the_open_time() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let probe_time = t0 + 19 * MS + Duration::from_secs(5);
        let Admission::Call(probe) = b.admit(probe_time).0 else {
            panic!("a probe is let through");
        };
        let Admission::Call(other) = b.admit(probe_time).0 else {
            panic!("a second probe is let through");
        };
        let failed_at = probe_time + Duration::from_millis(300);
        assert_eq!(
            b.finish(probe, Verdict::Unwell, failed_at),
            Some(BreakerState::Open)
        );
        assert_eq!(b.why, "a probe call failed");
        assert_eq!(left(&mut b, failed_at), Duration::from_secs(10));
        // The other probe's late success belongs to the half-open that is over.
        assert_eq!(b.finish(other, Verdict::Healthy, failed_at), None);
        assert_eq!(b.state(), BreakerState::Open);
    }

    /// A service that stays down is probed less and less often (each failed probe doubles the
    /// open time, up to `max_open_ms`), so the sagas parked on it wake less often too; once it
    /// closes, the next opening starts from `open_ms` again.
    #[test]
    fn repeated_probe_failures_double_the_open_time_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let mut now = t0 + 19 * MS;
        let mut opens = Vec::new();
        for _ in 0..5 {
            now += left(&mut b, now);
            let Admission::Call(probe) = b.admit(now).0 else {
                panic!("a probe is let through");
            };
            assert_eq!(
                b.finish(probe, Verdict::Unwell, now),
                Some(BreakerState::Open)
            );
            opens.push(left(&mut b, now).as_secs());
        }
        // 5 s (default) doubled per failed probe, capped at 30 s (default).
        assert_eq!(opens, vec![10, 20, 30, 30, 30]);
        // Healthy again: two probe successes close it, and the next opening is 5 s.
        now += left(&mut b, now);
        for _ in 0..2 {
            assert!(matches!(
                call(&mut b, now, Verdict::Healthy),
                None | Some(BreakerState::Closed)
            ));
        }
        assert_eq!(b.state(), BreakerState::Closed);
        for i in 0..20 {
            call(&mut b, now + i * MS, Verdict::Unwell);
        }
        assert_eq!(left(&mut b, now + 19 * MS), Duration::from_secs(5));
    }

    #[test]
    fn a_probe_not_made_frees_its_place() {
        let t0 = Instant::now();
        let mut s = settings();
        s.half_open_probes = 1;
        let mut b = Breaker::new(&s, t0);
        for i in 0..20 {
            call(&mut b, t0 + i * MS, Verdict::Unwell);
        }
        let probe_time = t0 + Duration::from_secs(6);
        let Admission::Call(probe) = b.admit(probe_time).0 else {
            panic!("a probe is let through");
        };
        assert_eq!(b.admit(probe_time).0, Admission::ProbesBusy);
        b.release(probe, probe_time);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let Admission::Call(again) = b.admit(probe_time).0 else {
            panic!("the place of a probe not made is free again");
        };
        assert_eq!(
            b.finish(again, Verdict::Healthy, probe_time),
            Some(BreakerState::Closed)
        );
    }

    #[test]
    fn open_becomes_half_open_without_any_call() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        assert_eq!(b.tick(t0 + Duration::from_secs(1)), None);
        assert_eq!(
            b.tick(t0 + Duration::from_secs(6)),
            Some(BreakerState::HalfOpen)
        );
        assert_eq!(b.tick(t0 + Duration::from_secs(7)), None);
    }

    #[test]
    fn waits_are_jittered_within_their_bounds() {
        for _ in 0..200 {
            let j = open_jitter(Duration::from_secs(5));
            assert!(j <= Duration::from_millis(500), "{j:?}");
            let w = short_wait();
            assert!(
                w >= Duration::from_millis(250) && w <= Duration::from_secs(1),
                "{w:?}"
            );
        }
        assert_eq!(seconds(Duration::from_secs(10)), "10 s");
        assert_eq!(seconds(Duration::from_millis(4200)), "4.2 s");
    }

    fn protection(max: usize, cap_wait_ms: u64) -> Arc<Protection> {
        let settings = DownstreamSettings {
            max_concurrent_calls: max,
            cap_wait_ms,
            ..DownstreamSettings::default()
        };
        Arc::new(
            Protection::new(&settings, &["package", "drone"]).unwrap_or_else(|e| panic!("{e:#}")),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_makes_one_call_too_many_wait_then_refuses_it() {
        let p = protection(2, 1000);
        let a = p.enter(0).await.unwrap_or_else(|e| panic!("{e}"));
        let b = p.enter(0).await.unwrap_or_else(|e| panic!("{e}"));
        // The other service has its own slots.
        let other = p.enter(1).await.unwrap_or_else(|e| panic!("{e}"));
        other.finish(Verdict::Healthy);

        // A third call to the first waits for a slot; one frees within the wait: it goes.
        let p2 = p.clone();
        let waiting = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let pass = p2.enter(0).await.map(|pass| pass.finish(Verdict::Healthy));
            (pass.is_ok(), started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        a.finish(Verdict::Healthy);
        let (went, waited) = waiting.await.unwrap_or((false, Duration::ZERO));
        assert!(went, "the call got the slot that was freed");
        assert_eq!(waited, Duration::from_millis(400));

        // None frees: refused after cap_wait_ms, without being made, with a short wait.
        let _c = p.enter(0).await.unwrap_or_else(|e| panic!("{e}"));
        let started = tokio::time::Instant::now();
        let refused = p.enter(0).await.err();
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        match refused {
            Some(CallError::Rejected {
                reason,
                retry_after,
            }) => {
                assert!(
                    reason.contains("package already has 2 calls in flight"),
                    "{reason}"
                );
                assert!(
                    retry_after >= Duration::from_millis(250)
                        && retry_after <= Duration::from_secs(1),
                    "{retry_after:?}"
                );
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        let status = p.snapshot();
        assert_eq!(status[0].in_flight, 2);
        assert_eq!(status[0].rejected_total, 1);
        assert_eq!(status[0].state, BreakerState::Closed);
        assert_eq!(status[1].in_flight, 0);
        drop(b);
        assert_eq!(p.snapshot()[0].in_flight, 1);
        assert_eq!(
            p.metrics
                .rejected
                .with_label_values(&["package", "concurrency"])
                .get(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_refuses_at_once_and_says_when_to_come_back() {
        let p = protection(64, 1000);
        for _ in 0..20 {
            let pass = p.enter(0).await.unwrap_or_else(|e| panic!("{e}"));
            pass.finish(Verdict::Unwell);
        }
        let refused = p.enter(0).await.err();
        match refused {
            Some(CallError::Rejected {
                reason,
                retry_after,
            }) => {
                assert!(
                    reason.starts_with(
                        "package circuit breaker is open (20 of 20 calls failed in 10 s); next probe in "
                    ),
                    "{reason}"
                );
                assert!(
                    retry_after >= Duration::from_secs(5)
                        && retry_after <= Duration::from_millis(5500),
                    "{retry_after:?}"
                );
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        let status = &p.snapshot()[0];
        assert_eq!(status.state, BreakerState::Open);
        assert_eq!(
            (status.calls_in_window, status.failures_in_window),
            (20, 20)
        );
        assert!(status.next_probe_at.is_some() && status.opened_at.is_some());
        assert_eq!(status.rejected_total, 1);
        let m = &p.metrics;
        assert_eq!(m.state.with_label_values(&["package"]).get(), 2);
        assert_eq!(m.state.with_label_values(&["drone"]).get(), 0);
        assert_eq!(
            m.transitions.with_label_values(&["package", "open"]).get(),
            1
        );

        // After open_ms the probes go through; one dropped unfinished (its caller gave up)
        // neither counts nor keeps its place.
        tokio::time::advance(Duration::from_secs(6)).await;
        let first = p.enter(0).await.unwrap_or_else(|e| panic!("{e}"));
        let second = p.enter(0).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            p.enter(0).await,
            Err(CallError::Rejected { ref reason, .. }) if reason.contains("half-open")
        ));
        assert_eq!(p.snapshot()[0].state, BreakerState::HalfOpen);
        drop(first);
        let third = p.enter(0).await.unwrap_or_else(|e| panic!("{e}"));
        second.finish(Verdict::Healthy);
        third.finish(Verdict::Healthy);
        assert_eq!(p.snapshot()[0].state, BreakerState::Closed);
        assert_eq!(m.state.with_label_values(&["package"]).get(), 0);
        assert_eq!(
            m.transitions
                .with_label_values(&["package", "half_open"])
                .get(),
            1
        );
        assert_eq!(
            m.transitions
                .with_label_values(&["package", "closed"])
                .get(),
            1
        );
        assert_eq!(
            m.rejected
                .with_label_values(&["package", "half_open"])
                .get(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_turns_half_open_on_its_own_at_a_scrape() {
        let p = protection(64, 1000);
        for _ in 0..20 {
            let pass = p.enter(1).await.unwrap_or_else(|e| panic!("{e}"));
            pass.finish(Verdict::Unwell);
        }
        let registry = Registry::new();
        p.register(&registry).unwrap_or_else(|e| panic!("{e:#}"));
        let value = |registry: &Registry| {
            let text = prometheus::TextEncoder::new()
                .encode_to_string(&registry.gather())
                .unwrap_or_default();
            text.lines()
                .find_map(|l| l.strip_prefix("downstream_breaker_state{target=\"drone\"} "))
                .and_then(|v| v.parse::<f64>().ok())
        };
        assert_eq!(value(&registry), Some(2.0));
        // Nobody calls the drone service any more: the scrape after open_ms still sees it move.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(value(&registry), Some(1.0));
        // Registered twice in one registry is an error that says what.
        let twice = p.register(&registry).err().map(|e| format!("{e:#}"));
        assert!(
            twice.is_some_and(|e| e.contains("downstream metrics")),
            "a second registration is refused"
        );
    }

    #[test]
    fn settings_are_checked_naming_the_setting() {
        let check = |f: &dyn Fn(&mut DownstreamSettings)| {
            let mut s = DownstreamSettings::default();
            f(&mut s);
            Protection::new(&s, &["package"])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(check(&|s| s.breaker.failure_ratio = 0.0).contains("breaker.failure_ratio"));
        assert!(check(&|s| s.breaker.failure_ratio = 1.5).contains("breaker.failure_ratio"));
        assert!(check(&|s| s.breaker.failure_ratio = f64::NAN).contains("breaker.failure_ratio"));
        assert!(check(&|s| s.breaker.window_ms = 0).contains("breaker.window_ms"));
        assert!(check(&|s| s.breaker.min_calls = 0).contains("breaker.min_calls"));
        assert!(check(&|s| s.breaker.open_ms = 0).contains("breaker.open_ms"));
        assert!(check(&|s| s.breaker.half_open_probes = 0).contains("breaker.half_open_probes"));
        assert!(check(&|s| s.max_concurrent_calls = 0).contains("max_concurrent_calls"));
        assert_eq!(check(&|s| s.breaker.failure_ratio = 1.0), "");
        assert_eq!(check(&|s| s.cap_wait_ms = 0), "");
    }
}
