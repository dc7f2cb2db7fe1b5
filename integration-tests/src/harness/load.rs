//! A steady booking load for chaos runs: bookings at a fixed rate from a few accounts, pickups
//! spread a minute apart so the fleet never runs short, and every `cancel_every`-th accepted
//! booking cancelled a little later (so compensations run during the chaos too). It records
//! what the clients were told, for the invariant checker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use uuid::Uuid;

use super::invariants::Bookings;
use super::stack::StackClient;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub rate_per_second: u32,
    pub owners: Vec<String>,
    /// Every n-th accepted booking is cancelled `cancel_after` later (0 = none).
    pub cancel_every: usize,
    pub cancel_after: Duration,
    /// Pickup of the first booking, in minutes from now; each next one a minute later.
    pub first_pickup_minutes: i64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            rate_per_second: 20,
            owners: vec!["chaos-a".into(), "chaos-b".into(), "chaos-c".into()],
            cancel_every: 7,
            cancel_after: Duration::from_millis(300),
            first_pickup_minutes: 24 * 60,
        }
    }
}

/// What the load saw, by answer.
#[derive(Debug, Clone, Default)]
pub struct LoadOutcome {
    pub bookings: Bookings,
    /// Status (0 = no answer) → count, for the requests that did not get a 202.
    pub rejected: std::collections::BTreeMap<u16, usize>,
    pub cancels_sent: usize,
    pub cancels_accepted: usize,
}

/// A running load; [`Load::stop`] ends it and returns what it saw.
pub struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<LoadOutcome>,
    accepted: Arc<AtomicU64>,
}

impl Load {
    pub fn start(client: StackClient, options: LoadOptions) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let task = tokio::spawn(run(client, options, s, a));
        Load {
            stop,
            task,
            accepted,
        }
    }

    /// Bookings accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub async fn stop(self) -> LoadOutcome {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the load task ends")
    }
}

async fn run(
    client: StackClient,
    options: LoadOptions,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
) -> LoadOutcome {
    let outcome = Arc::new(Mutex::new(LoadOutcome::default()));
    let interval = Duration::from_secs_f64(1.0 / f64::from(options.rate_per_second.max(1)));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut i: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let owner = options.owners[usize::try_from(i).unwrap_or(0) % options.owners.len()].clone();
        let mut body = StackClient::booking(&owner, options.first_pickup_minutes + i, "Small");
        if i % 5 == 4 {
            // Every fifth drops off 40 km away (Seattle → Tacoma): a carrier leg first.
            body["pickupLocation"] = serde_json::json!("0,47.6062,-122.3321");
            body["dropOffLocation"] = serde_json::json!("0,47.2529,-122.4443");
        }
        let (client, outcome, accepted, options) = (
            client.clone(),
            outcome.clone(),
            accepted.clone(),
            options.clone(),
        );
        i += 1;
        tasks.spawn(async move {
            let a = client.book(&body).await;
            let id = (a.status == 202)
                .then(|| {
                    a.body["deliveryId"]
                        .as_str()
                        .and_then(|s| Uuid::parse_str(s).ok())
                })
                .flatten();
            let Some(id) = id else {
                let mut o = outcome.lock().await;
                *o.rejected.entry(a.status).or_default() += 1;
                if a.status == 0 || a.status >= 500 {
                    o.bookings.unclear += 1;
                }
                return;
            };
            let n = accepted.fetch_add(1, Ordering::Relaxed) + 1;
            outcome.lock().await.bookings.add(id, &owner);
            if options.cancel_every > 0 && n % options.cancel_every as u64 == 0 {
                tokio::time::sleep(options.cancel_after).await;
                // A cancel is a wish, not a promise: whatever its answer, the booking must end
                // in one terminal state.
                let c = client.cancel(&owner, id).await;
                let mut o = outcome.lock().await;
                o.cancels_sent += 1;
                if c.status == 202 {
                    o.cancels_accepted += 1;
                    o.bookings.cancelled.insert(id);
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let o = outcome.lock().await.clone();
    println!(
        "load: {} accepted in {:.1} s, rejected {:?} ({} unclear), cancels {} sent / {} accepted",
        o.bookings.accepted.len(),
        started.elapsed().as_secs_f64(),
        o.rejected,
        o.bookings.unclear,
        o.cancels_sent,
        o.cancels_accepted
    );
    o
}
