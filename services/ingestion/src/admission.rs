//! Admission on the booking path: an adaptive limit on the bookings under way at once, so that
//! the work the service takes on stays within what it can finish in time and everything above it
//! is refused at once (`503` + `Retry-After`) instead of queueing until clients time out.
//!
//! The limit is AIMD driven by latency (`tower_acc::Aimd`, after Netflix's concurrency-limits):
//! each admitted booking's time from admission to its broker confirm is a sample. Samples within
//! the latency target, taken while at least half the limit is in use, raise the limit by one per
//! tenth of it (so by a tenth per limit's worth of bookings, whatever the rate); a
//! slower one (the CPU, the broker or its confirms are queueing) or a failed append cuts it by a
//! tenth, at most once per tenth of the target. So the limit settles where bookings still confirm
//! within the target, and sheds the rest with a `503` that costs a fraction of a booking. A refused booking was never appended:
//! nothing accepted is lost or duplicated by shedding.
//!
//! Latency sees only the bookings the handler already holds: when the CPU itself is the
//! bottleneck, requests queue before the handler (in sockets, waiting for their HTTP worker),
//! where no sample shows them (see docs/BENCHMARKS.md, issue 14). So each HTTP worker also
//! watches how busy it is (the share of wall time its runtime spends working rather than waiting
//! for events, as Node's event-loop utilisation): a worker busier than `worker_busy_target` over
//! a window cannot keep up with what arrives, and cuts the limit as a slow booking would, until
//! the refusals (far cheaper than bookings) bring it back under the target.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use service_kit::prometheus::{self, Gauge, IntCounter, IntGauge, Registry};
use tower_acc::{Aimd, Algorithm};

/// Bounds and latency target of the adaptive limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AdmissionSettings {
    /// The limit never goes below this many bookings under way (nor above `max_in_flight`).
    pub min_in_flight: usize,
    /// The limit at start. It grows only while at least half of it is in use, so it is also the
    /// headroom a healthy service keeps for bursts: at 20,000 bookings/s answered in 5 ms about
    /// 100 are under way, and a 40 ms hiccup of the broker or the CPU makes 800.
    pub initial_in_flight: usize,
    /// A booking whose append takes longer than this (milliseconds from admission to confirm)
    /// shrinks the limit.
    pub latency_target_ms: u64,
    /// The share of its time (0–1) an HTTP worker may spend working before the limit is cut
    /// (measured over 50 ms windows): above it, requests wait in the worker's sockets. `1` or
    /// more: never.
    pub worker_busy_target: f64,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        Self {
            min_in_flight: 64,
            initial_in_flight: 1024,
            latency_target_ms: 100,
            worker_busy_target: 0.75,
        }
    }
}

/// The adaptive limit and the bookings under way.
pub(crate) struct Admission {
    /// The algorithm, when it last cut the limit, and the fast samples since it last grew.
    algorithm: Mutex<(Aimd, Option<Instant>, usize)>,
    target: Duration,
    busy_target: f64,
    /// The algorithm's current limit, read without its lock.
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    metrics: Metrics,
}

struct Metrics {
    limit: IntGauge,
    in_flight: IntGauge,
    refused: IntCounter,
    worker_busy: Gauge,
}

/// How often an HTTP worker measures how busy it was.
const BUSY_WINDOW: Duration = Duration::from_millis(50);

thread_local! {
    /// This thread's runtime's busy time when it was last measured, and when.
    static LAST_BUSY: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
}

impl Admission {
    /// A limit between `min_in_flight` (at most `max`) and `max`.
    pub(crate) fn new(settings: &AdmissionSettings, max: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(max > 0, "max_in_flight must be positive");
        anyhow::ensure!(
            settings.latency_target_ms > 0,
            "admission latency_target_ms must be positive"
        );
        let min = settings.min_in_flight.clamp(1, max);
        let target = Duration::from_millis(settings.latency_target_ms);
        let algorithm = Aimd::builder()
            .min_limit(min)
            .max_limit(max)
            .initial_limit(settings.initial_in_flight.clamp(min, max))
            .timeout(target)
            .build();
        let limit = algorithm.max_concurrency();
        let metrics = Metrics {
            limit: IntGauge::new(
                "ingestion_admission_limit",
                "Bookings the adaptive limit lets be under way at once",
            )?,
            in_flight: IntGauge::new(
                "ingestion_admission_in_flight",
                "Bookings under way (admitted, not yet answered)",
            )?,
            refused: IntCounter::new(
                "ingestion_admission_refused_total",
                "Bookings refused with 503 because the limit was reached",
            )?,
            worker_busy: Gauge::new(
                "ingestion_admission_worker_busy_ratio",
                "Share of the last 50 ms an HTTP worker spent working (the last one measured)",
            )?,
        };
        metrics.limit.set(limit as i64);
        Ok(Self {
            algorithm: Mutex::new((algorithm, None, 0)),
            target,
            busy_target: settings.worker_busy_target,
            limit: AtomicUsize::new(limit),
            in_flight: AtomicUsize::new(0),
            metrics,
        })
    }

    /// Registers the limit, the bookings under way and the refusals.
    pub(crate) fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.metrics.limit.clone()))?;
        registry.register(Box::new(self.metrics.in_flight.clone()))?;
        registry.register(Box::new(self.metrics.worker_busy.clone()))?;
        registry.register(Box::new(self.metrics.refused.clone()))
    }

    /// A place under the limit, or `None` (counted as refused) when every place is taken.
    pub(crate) fn try_admit(self: &Arc<Self>) -> Option<Admitted> {
        let now = Instant::now();
        self.watch_worker(now);
        let limit = self.limit.load(Ordering::Relaxed);
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            });
        if taken.is_err() {
            self.metrics.refused.inc();
            return None;
        }
        self.metrics.in_flight.inc();
        Some(Admitted {
            admission: self.clone(),
            since: now,
            sample: None,
        })
    }

    /// Whether a booking arriving now finds every place taken (counted as refused): the check
    /// made before any other work on the request, so that a refusal costs as little as possible
    /// when the service is overloaded. A booking that passes still has to [`try_admit`]
    /// (Self::try_admit), which may refuse it after all if others took the last places meanwhile.
    pub(crate) fn full(&self) -> bool {
        self.watch_worker(Instant::now());
        let full = self.in_flight.load(Ordering::Relaxed) >= self.limit.load(Ordering::Relaxed);
        if full {
            self.metrics.refused.inc();
        }
        full
    }

    /// Once per window on each HTTP worker (a runtime of one thread): how busy it was since the
    /// last time, and a cut of the limit when busier than the target.
    fn watch_worker(&self, now: Instant) {
        if self.busy_target >= 1.0 {
            return;
        }
        let last = LAST_BUSY.get();
        if last.is_some_and(|(at, _)| now.saturating_duration_since(at) < BUSY_WINDOW) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let metrics = runtime.metrics();
        if metrics.num_workers() != 1 {
            return;
        }
        let busy = metrics.worker_total_busy_duration(0);
        LAST_BUSY.set(Some((now, busy)));
        let Some((at, was)) = last else {
            return;
        };
        let share = busy.saturating_sub(was).as_secs_f64()
            / now.saturating_duration_since(at).as_secs_f64();
        self.metrics.worker_busy.set(share);
        if share > self.busy_target {
            self.sample(
                self.target * 2,
                self.in_flight.load(Ordering::Relaxed),
                true,
            );
        }
    }

    fn release(&self, sample: Option<(Duration, bool)>) {
        let in_flight = self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.metrics.in_flight.dec();
        let Some((rtt, is_error)) = sample else {
            return;
        };
        self.sample(rtt, in_flight, is_error);
    }

    /// One sample for the algorithm: `rtt` of a booking (or of a worker's window) with
    /// `in_flight` under way; `is_error` (a failed append, an overloaded worker) always cuts.
    fn sample(&self, rtt: Duration, in_flight: usize, is_error: bool) {
        // A poisoned lock only means another thread panicked mid-update: the state is numbers.
        let mut state = self.algorithm.lock().unwrap_or_else(|e| e.into_inner());
        let (algorithm, last_cut, fast) = &mut *state;
        let slow = is_error || rtt > self.target;
        if slow {
            // At most one cut per tenth of the target, as TCP backs off once per round trip: the
            // hundreds of bookings caught in one short stall (a broker pause) are a few signals,
            // while a lasting overload still cuts the limit ten times per target interval.
            if last_cut.is_some_and(|at| at.elapsed() < self.target / 10) {
                return;
            }
            *last_cut = Some(Instant::now());
        } else {
            // It grows by one per tenth of the limit in fast bookings (ten per limit's worth, as
            // TCP grows once per round trip), not per booking: at tens of thousands of bookings
            // a second, growth per booking would outrun any cut.
            *fast += 1;
            if *fast * 10 < algorithm.max_concurrency() {
                return;
            }
            *fast = 0;
        }
        algorithm.update(rtt, in_flight, is_error, false);
        let limit = algorithm.max_concurrency();
        drop(state);
        self.limit.store(limit, Ordering::Relaxed);
        self.metrics.limit.set(limit as i64);
    }
}

/// A booking's place under the limit, given back when dropped. Only a booking that reached the
/// log (confirmed or failed) is a sample of the limit; one refused earlier (bad token, invalid
/// body, a replay) gives its place back without one.
pub(crate) struct Admitted {
    admission: Arc<Admission>,
    since: Instant,
    sample: Option<(Duration, bool)>,
}

impl Admitted {
    /// The append was confirmed (`ok`) or failed: the time since admission is a sample.
    pub(crate) fn appended(&mut self, ok: bool) {
        self.sample = Some((self.since.elapsed(), !ok));
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission.release(self.sample);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic
mod tests {
    use super::*;

    fn admission(min: usize, initial: usize, max: usize) -> Arc<Admission> {
        admission_busy(min, initial, max, 0.9)
    }

    fn admission_busy(min: usize, initial: usize, max: usize, busy: f64) -> Arc<Admission> {
        let settings = AdmissionSettings {
            min_in_flight: min,
            initial_in_flight: initial,
            latency_target_ms: 100,
            worker_busy_target: busy,
        };
        Arc::new(Admission::new(&settings, max).unwrap())
    }

    /// `n` bookings admitted at once, each confirmed after `rtt`.
    fn round(a: &Arc<Admission>, n: usize, rtt: Duration) {
        let mut held: Vec<Admitted> = (0..n).filter_map(|_| a.try_admit()).collect();
        for admitted in &mut held {
            admitted.sample = Some((rtt, false));
        }
    }

    #[test]
    fn admits_up_to_the_limit_and_refuses_the_rest_until_a_place_is_free() {
        let a = admission(3, 3, 3);
        let held: Vec<_> = (0..3).map(|_| a.try_admit().expect("a place")).collect();
        assert!(a.try_admit().is_none(), "the fourth is refused");
        assert_eq!(a.metrics.refused.get(), 1);
        assert_eq!(a.metrics.in_flight.get(), 3);
        drop(held);
        assert_eq!(a.metrics.in_flight.get(), 0);
        assert!(a.try_admit().is_some(), "places are given back on drop");
    }

    #[test]
    fn the_limit_shrinks_when_appends_miss_the_target_and_grows_back_when_they_recover() {
        let a = admission(8, 100, 1_000);
        let (fast, slow) = (Duration::from_millis(5), Duration::from_millis(150));
        round(&a, 100, fast);
        let grown = a.limit();
        assert!(
            (101..=110).contains(&grown),
            "a limit's worth of fast bookings raises it by a tenth at most, not by one each: {grown}"
        );
        for _ in 0..1_000 {
            round(&a, a.limit(), fast);
        }
        assert_eq!(
            a.limit(),
            1_000,
            "appends within the target raise it to the ceiling"
        );
        round(&a, 10, slow);
        assert_eq!(
            a.limit(),
            900,
            "ten slow appends of one stall cut a tenth, once"
        );
        for _ in 0..5 {
            a.forget_last_cut();
            round(&a, a.limit(), slow);
        }
        let congested = a.limit();
        assert!(
            (525..=535).contains(&congested),
            "each later interval with slow appends cuts a tenth: {congested}"
        );
        for _ in 0..60 {
            a.forget_last_cut();
            round(&a, a.limit(), slow);
        }
        assert_eq!(a.limit(), 8, "never below the floor");
        a.forget_last_cut();
        let mut failed = a.try_admit().unwrap();
        failed.appended(false);
        drop(failed);
        assert_eq!(
            a.limit(),
            8,
            "a failed append cuts it too, to the floor at most"
        );
        round(&a, 8, fast);
        assert!(a.limit() > 8, "it grows back: {}", a.limit());
        round(&a, 4, fast);
        let lightly = a.limit();
        round(&a, 2, fast);
        assert_eq!(
            a.limit(),
            lightly,
            "no growth while most of the limit is unused"
        );
    }

    impl Admission {
        fn limit(&self) -> usize {
            self.limit.load(Ordering::Relaxed)
        }

        /// As if the last cut was longer ago than the target.
        fn forget_last_cut(&self) {
            self.algorithm.lock().unwrap().1 = None;
        }
    }

    #[test]
    fn a_booking_refused_before_the_log_is_no_sample() {
        let a = admission(1, 10, 10);
        for _ in 0..100 {
            drop(a.try_admit());
        }
        assert_eq!(a.limit(), 10);
        assert_eq!(a.metrics.in_flight.get(), 0);
    }

    #[test]
    fn a_worker_busier_than_the_target_cuts_the_limit() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A target of one half: far from both the idle and the busy window, so a test machine
        // that preempts this thread for a few milliseconds changes nothing.
        let a = admission_busy(8, 100, 1_000, 0.5);
        runtime.block_on(async {
            drop(a.try_admit());
            // Waiting for events is not being busy.
            tokio::time::sleep(BUSY_WINDOW + Duration::from_millis(10)).await;
            drop(a.try_admit());
            assert_eq!(a.limit(), 100, "an idle worker does not cut");
            let share = a.metrics.worker_busy.get();
            assert!(share < 0.25, "idle: {share}");

            // Working through a whole window without waiting: requests would queue meanwhile.
            let until = Instant::now() + BUSY_WINDOW + Duration::from_millis(10);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            // The runtime accounts its busy time when it next looks for events.
            tokio::task::yield_now().await;
            drop(a.try_admit());
            let share = a.metrics.worker_busy.get();
            assert!(share > 0.75, "busy: {share}");
            assert_eq!(a.limit(), 90, "a busy worker cuts a tenth");
        });
    }

    #[test]
    fn a_floor_above_the_ceiling_is_the_ceiling() {
        let a = admission(64, 256, 1);
        assert_eq!(a.limit(), 1);
        assert!(a.try_admit().is_some());
    }
}
