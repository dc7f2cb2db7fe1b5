//! `make bench-ingest`: an open-loop load generator for Ingestion's booking API.
//!
//! Request `i` is due at `start + i / rate` whether or not earlier ones were answered, and its
//! latency is measured from that due time, so a slow server (or a generator that falls behind)
//! shows up in the percentiles instead of quietly lowering the offered rate (no coordinated
//! omission). Pickup times are spread over the coming week so the bookings are realistic and the
//! drone fleet is not what is measured. Afterwards `--verify` reads the `delivery-requests` log
//! from the start and checks that every `202` is there exactly once, on the partition of its
//! deliveryId.
//!
//! A benchmark, not a test: the figures depend on the machine and on what else runs on it; only a
//! failed verification makes the exit status non-zero.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{CommandFactory, Parser};
use contracts::{
    DeliveryRequest, DeliveryRequested, DELIVERY_REQUESTED, DELIVERY_REQUESTS_LOG,
    WORKFLOW_EVENTS_LOG,
};
use hdrhistogram::Histogram;
use integration_tests::bench::flag::{millis, name_value, url};
use integration_tests::bench::http1;
use integration_tests::bench::{
    self, env_var, latency_histogram, percentile_cells, percentiles, process_ticks, splitmix64,
    MachineTicks, Progress,
};
use messaging::{MessagingSettings, PartitionedLog, StartAt};
use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::{mpsc, Semaphore};
use uuid::Uuid;

/// A partition reader still waiting for expected ids gives up after this long without a record.
const IDLE_LIMIT: Duration = Duration::from_secs(5);
/// Once a partition's expected ids were all seen, it is read on until quiet this long, so
/// duplicates appended after them are seen too.
const DRAIN_IDLE: Duration = Duration::from_secs(1);
/// Pickup times fall between one hour and eight days from the start of the run.
const PICKUP_SPREAD_SECS: u64 = 7 * 24 * 3_600;
/// A timed-out request's answer is still awaited this long (to keep its connection) before the
/// connection is dropped.
const ABANDON_AFTER: Duration = Duration::from_secs(30);
/// The generator is "behind" when it starts a request this late; its figures are then pessimistic.
const LAG_WARNING: Duration = Duration::from_millis(10);

/// An open-loop load generator for Ingestion's booking API (`make bench-ingest`): bookings at a
/// fixed rate, latency measured from each one's due time; `--verify` then checks the log.
#[derive(Parser)]
#[command(
    name = "loadgen",
    // A flag given twice keeps its last value, so extra arguments (LOADGEN_ARGS) can override.
    args_override_self = true,
    override_usage = "loadgen --rate R --duration S [OPTIONS]\n       \
                      loadgen --cleanup --prefix PREFIX [--amqp-url URL] [--partitions P]"
)]
struct Args {
    /// Ingestion base URL
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080", value_parser = url)]
    url: String,
    /// Bookings offered per second, on a fixed schedule (open loop)
    #[arg(long, value_name = "R", default_value_t, hide_default_value = true)]
    rate: f64,
    /// Seconds to offer them for (fractions allowed)
    #[arg(long, value_name = "S", default_value_t, hide_default_value = true)]
    duration: f64,
    /// Client accounts the bookings are spread over, one JWT each
    #[arg(long, value_name = "N", default_value_t = 1000)]
    accounts: usize,
    /// HS256 key for the client tokens [default: $APP_AUTH__JWT_SECRET]
    #[arg(long, value_name = "SECRET")]
    jwt_secret: Option<String>,
    /// A request not answered this long after it was due is a 'timeout' error
    #[arg(long = "timeout-ms", value_name = "MS", default_value = "2000", value_parser = millis)]
    timeout: Duration,
    /// Requests the generator keeps open at once; beyond it requests wait inside the generator,
    /// and that wait counts in their latency
    #[arg(long, value_name = "N", default_value_t = 8192)]
    max_in_flight: usize,
    /// Keep-alive connections opened (GET /healthz) before the clock starts
    #[arg(long, value_name = "N", default_value_t = 256)]
    warmup_connections: usize,
    /// Name of this run in the result line [default: '<rate>/s']
    #[arg(long, value_name = "TEXT")]
    label: Option<String>,
    /// Also report the CPU time process PID used during the load (repeatable; Linux), e.g.
    /// --cpu-of ingestion=1234
    #[arg(long, value_name = "NAME=PID", value_parser = name_value::<u32>)]
    cpu_of: Vec<(String, u32)>,
    /// Generator threads; 1 runs everything on one thread, which costs the least CPU per request
    /// when the service shares the machine
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: usize,
    /// Afterwards, read the delivery-requests log and check every 202 is there exactly once, on
    /// the partition of its deliveryId
    #[arg(long)]
    verify: bool,
    /// Only delete the service's delivery-requests and workflow-events logs (the stream queues
    /// under PREFIX) and exit
    #[arg(long)]
    cleanup: bool,
    /// The service's APP_MESSAGING__PREFIX [default: $APP_MESSAGING__PREFIX]
    #[arg(long)]
    prefix: Option<String>,
    /// RabbitMQ URL [default: $APP_MESSAGING__URL, else $AMQP_URL, else
    /// amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(long, value_name = "URL")]
    amqp_url: Option<String>,
    /// Partitions of the log
    #[arg(long, value_name = "P", default_value_t = 8)]
    partitions: u32,
}

impl Args {
    /// The flags with the defaults that come from the environment filled in, and their
    /// combinations checked.
    fn checked(mut self) -> Result<Self> {
        self.jwt_secret = self.jwt_secret.or_else(|| env_var("APP_AUTH__JWT_SECRET"));
        self.prefix = self.prefix.or_else(|| env_var("APP_MESSAGING__PREFIX"));
        if self.cleanup {
            if self.prefix.is_none() || self.partitions == 0 {
                bail!("--cleanup needs --prefix (or APP_MESSAGING__PREFIX) and --partitions >= 1");
            }
            return Ok(self);
        }
        let usage = Args::command().render_usage();
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("--rate must be a positive number of requests per second\n{usage}");
        }
        if !(self.duration.is_finite() && self.duration > 0.0) {
            bail!("--duration must be a positive number of seconds\n{usage}");
        }
        if self.accounts == 0 || self.max_in_flight == 0 || self.partitions == 0 {
            bail!("--accounts, --max-in-flight and --partitions must be at least 1");
        }
        if self.timeout.is_zero() {
            bail!("--timeout-ms must be at least 1");
        }
        if self.verify && self.prefix.is_none() {
            bail!("--verify needs --prefix (or APP_MESSAGING__PREFIX): the service's log prefix");
        }
        Ok(self)
    }

    fn amqp_url(&self) -> String {
        self.amqp_url
            .clone()
            .or_else(|| env_var("APP_MESSAGING__URL"))
            .or_else(|| env_var("AMQP_URL"))
            .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    fn total(&self) -> u64 {
        (self.rate * self.duration).round() as u64
    }

    fn label(&self) -> String {
        self.label
            .clone()
            .unwrap_or_else(|| format!("{:.0}/s", self.rate))
    }
}

fn main() -> Result<()> {
    let args = Args::parse().checked()?;
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    if args.cleanup {
        return cleanup(&args).await;
    }
    let secret = args
        .jwt_secret
        .clone()
        .context("a JWT secret is needed: --jwt-secret or APP_AUTH__JWT_SECRET")?;
    let run = format!("lg{:08x}", Uuid::new_v4().as_fields().0);
    let total = args.total();
    println!(
        "loadgen {run}: {} cores, {} -> {}/api/deliveryrequests for {}s = {total} bookings from {} \
         accounts, timeout {} ms, at most {} in flight",
        bench::cores(),
        args.label(),
        args.url,
        args.duration,
        args.accounts,
        args.timeout.as_millis(),
        args.max_in_flight,
    );

    let client = reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .no_proxy()
        .pool_max_idle_per_host(args.max_in_flight)
        .pool_idle_timeout(Duration::from_secs(300))
        .connect_timeout(args.timeout)
        .build()
        .context("building the HTTP client")?;
    check_ready(&client, &args.url).await?;
    // Keep-alive connections opened before the clock starts, as long-lived clients would have
    // them; otherwise the first millisecond of a 50k/s run is a connect storm.
    let pool = http1::Pool::new(&args.url)?;
    pool.warm(args.warmup_connections, "/healthz")
        .await
        .context("warming up connections with GET /healthz")?;

    let gen = Generator {
        pool,
        tokens: authorizations(&secret, args.accounts)?,
        run: run.clone(),
        started_at: Utc::now(),
        timeout: args.timeout,
        in_flight: Arc::new(Semaphore::new(args.max_in_flight)),
        max_in_flight: args.max_in_flight,
        counters: Arc::new(Counters::default()),
    };
    let cpu_before = CpuSample::take(&args.cpu_of);
    let load = run_load(gen, args.rate, total).await?;
    let mut failed = load.print(&args);
    if let (Some(before), Some(after)) = (cpu_before, CpuSample::take(&args.cpu_of)) {
        println!("{}", before.report(&after, load.answered()));
    }

    if args.verify {
        let prefix = args.prefix.clone().unwrap_or_default();
        let report = verify(&args, &prefix, &run, &load.accepted).await?;
        report.print();
        failed |= !report.passed();
        println!("{}", load.result_line(&args, Some(&report)));
    } else {
        println!("{}", load.result_line(&args, None));
    }
    if failed {
        bail!("verification failed: see above");
    }
    Ok(())
}

/// Deletes the logs Ingestion declared under the prefix: a benchmark leaves ~1 GB of bookings.
async fn cleanup(args: &Args) -> Result<()> {
    let prefix = args.prefix.clone().unwrap_or_default();
    let broker = messaging::connect(&broker_settings(args, &prefix))
        .await
        .context("connecting to the broker")?;
    for log in [DELIVERY_REQUESTS_LOG, WORKFLOW_EVENTS_LOG] {
        broker
            .delete_log(log, args.partitions)
            .await
            .with_context(|| format!("deleting the {log} log under prefix {prefix}"))?;
    }
    println!(
        "deleted the {DELIVERY_REQUESTS_LOG} and {WORKFLOW_EVENTS_LOG} logs of prefix {prefix}"
    );
    Ok(())
}

fn broker_settings(args: &Args, prefix: &str) -> MessagingSettings {
    MessagingSettings {
        prefix: prefix.to_owned(),
        connection_name: "loadgen".into(),
        ..MessagingSettings::new(args.amqp_url())
    }
}

/// Fails fast (with the service's answer) when Ingestion is not ready.
async fn check_ready(client: &reqwest::Client, url: &str) -> Result<()> {
    let res = client
        .get(format!("{url}/readyz"))
        .send()
        .await
        .with_context(|| format!("GET {url}/readyz: is ingestion running?"))?;
    let status = res.status();
    if !status.is_success() {
        let body = res.text().await.unwrap_or_default();
        bail!("ingestion is not ready: GET /readyz answered {status}: {body}");
    }
    Ok(())
}

/// Each of `accounts` client accounts and its `Authorization` header value.
fn authorizations(secret: &str, accounts: usize) -> Result<Vec<(String, String)>> {
    bench::client_tokens(secret, "loadgen", accounts)?
        .into_iter()
        .map(|(owner, auth)| Ok((owner, auth.to_str()?.to_owned())))
        .collect()
}

/// Live counts for the progress bar.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    done: AtomicU64,
    accepted: AtomicU64,
    errors: AtomicU64,
    /// Timed-out requests answered later: 202, another answer, no answer within [`ABANDON_AFTER`].
    late_accepted: AtomicU64,
    late_other: AtomicU64,
    abandoned: AtomicU64,
}

/// What one request's client saw.
enum Outcome {
    Accepted(Uuid),
    /// Any other HTTP status.
    Status(StatusCode),
    /// A 202 whose body is not a `DeliveryAccepted`.
    BadBody(String),
    /// Not answered within the timeout of its due time, though it was sent.
    Timeout,
    /// Not even sent within the timeout: it waited for a free slot in the generator.
    QueuedTimeout,
    Connect(String),
    Other(String),
}

struct Done {
    index: u64,
    latency: Duration,
    outcome: Outcome,
}

/// Everything a request task needs, shared.
struct Generator {
    pool: http1::Pool,
    /// Each account and its `Authorization` header value.
    tokens: Vec<(String, String)>,
    /// Tags every booking of this run (`packageInfo.packageId`, `tag`) so the log check can tell
    /// them from earlier runs' bookings.
    run: String,
    started_at: DateTime<Utc>,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    counters: Arc<Counters>,
}

impl Generator {
    /// Booking `i`: account `i mod accounts`, pickup somewhere in the coming week.
    fn booking(&self, i: u64) -> (&str, DeliveryRequest) {
        let (owner, auth) = &self.tokens[(i % self.tokens.len() as u64) as usize];
        let request = bench::booking(
            owner,
            &self.run,
            i,
            splitmix64(i),
            self.started_at,
            PICKUP_SPREAD_SECS,
        );
        (auth, request)
    }

    /// Sends booking `i`, due at `due`; the timeout and the latency both count from `due`.
    async fn request(self: Arc<Self>, i: u64, due: Instant) -> Done {
        let deadline = tokio::time::Instant::from_std(due + self.timeout);
        let acquired = tokio::time::timeout_at(deadline, self.in_flight.clone().acquire_owned());
        let outcome = match acquired.await {
            Err(_) => Outcome::QueuedTimeout,
            Ok(Err(_)) => Outcome::Other("generator semaphore closed".into()),
            Ok(Ok(permit)) => {
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                let mut exchange = Box::pin(self.clone().send(i));
                match tokio::time::timeout_at(deadline, exchange.as_mut()).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        // The client has given up, but aborting would close the connection, and
                        // one host reconnecting thousands of times a second spends its CPU
                        // searching for free ephemeral ports (TIME_WAIT) instead of sending. So
                        // the answer is awaited in the background, still holding its slot.
                        let counters = self.counters.clone();
                        tokio::spawn(async move {
                            let late = tokio::time::timeout(ABANDON_AFTER, exchange).await;
                            let counter = match late {
                                Ok(Outcome::Accepted(_)) => &counters.late_accepted,
                                Ok(_) => &counters.late_other,
                                Err(_) => &counters.abandoned,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            drop(permit);
                        });
                        Outcome::Timeout
                    }
                }
            }
        };
        let latency = due.elapsed();
        self.counters.done.fetch_add(1, Ordering::Relaxed);
        if matches!(outcome, Outcome::Accepted(_)) {
            self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        Done {
            index: i,
            latency,
            outcome,
        }
    }

    async fn send(self: Arc<Self>, i: u64) -> Outcome {
        let (auth, booking) = self.booking(i);
        let body = match serde_json::to_vec(&booking) {
            Ok(body) => body,
            Err(e) => return Outcome::Other(format!("encoding the booking: {e}")),
        };
        let sent = self
            .pool
            .request(
                "POST",
                "/api/deliveryrequests",
                &[
                    ("Authorization", auth),
                    ("Content-Type", "application/json"),
                ],
                &body,
            )
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(http1::Error::Connect(e)) => return Outcome::Connect(e.to_string()),
            Err(e) => return Outcome::Other(e.to_string()),
        };
        if answer.status != StatusCode::ACCEPTED.as_u16() {
            return Outcome::Status(
                StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            );
        }
        // Only what the check needs is decoded (the rest of the echo is skipped, not built).
        match serde_json::from_slice::<AcceptedEcho>(&answer.body) {
            Ok(accepted) if accepted.package_info.package_id == booking.package_info.package_id => {
                Outcome::Accepted(accepted.delivery_id)
            }
            Ok(_) => Outcome::BadBody("202 echoes another booking".into()),
            Err(e) => Outcome::BadBody(format!("202 body is not a DeliveryAccepted: {e}")),
        }
    }
}

/// The parts of a `DeliveryAccepted` (the id and the echoed request's fields) the generator
/// checks.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AcceptedEcho {
    delivery_id: Uuid,
    package_info: EchoedPackage,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EchoedPackage {
    package_id: String,
}

/// What the load phase measured.
struct Load {
    offered: u64,
    /// From the first due time to the last answer.
    wall: Duration,
    accepted: HashMap<Uuid, u64>,
    /// 202s whose deliveryId had already been handed out in this run.
    duplicate_ids: u64,
    latency: Histogram<u64>,
    /// Latency of the `503` refusals (overload or log unavailable) answered within the timeout.
    refusals: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    first_errors: BTreeMap<String, String>,
    /// How late the generator started requests (its own queueing), worst case.
    max_lag: Duration,
    late_starts: u64,
    /// The slowest 202 of each second of the run (by due time), in µs: where the tail comes from.
    slowest_by_second: Vec<u64>,
    /// From the first due time until no request was open any more, timed-out ones included.
    drained: Duration,
    late_accepted: u64,
    late_other: u64,
    abandoned: u64,
    /// Answers other than 202 within the timeout.
    other_statuses: u64,
}

/// Schedules `total` requests at `rate`/s and collects their outcomes.
async fn run_load(gen: Generator, rate: f64, total: u64) -> Result<Load> {
    let counters = gen.counters.clone();
    let progress = load_progress(total, counters.clone(), rate)?;
    let gen = Arc::new(gen);
    let (tx, rx) = mpsc::unbounded_channel::<Done>();
    let collector = tokio::spawn(collect(rx, rate));

    let mut max_lag = Duration::ZERO;
    let mut late_starts = 0u64;
    let start = bench::open_loop(rate, total, |i, due, now| {
        let lag = now.saturating_duration_since(due);
        max_lag = max_lag.max(lag);
        if lag > LAG_WARNING {
            late_starts += 1;
        }
        let (gen, tx) = (gen.clone(), tx.clone());
        tokio::spawn(async move {
            // The collector outlives every request task, so a send error cannot happen.
            let _ = tx.send(gen.request(i, due).await);
        });
        Ok(())
    })
    .await?;
    drop(tx);
    let mut load = collector.await.context("collector task")??;
    load.wall = start.elapsed();
    load.offered = total;
    load.max_lag = max_lag;
    load.late_starts = late_starts;
    // Timed-out requests still being answered in the background would load the service during
    // the log check and the next run: wait for them (each gives up after ABANDON_AFTER).
    let slots = u32::try_from(gen.max_in_flight).unwrap_or(u32::MAX);
    let drained = gen.in_flight.acquire_many(slots).await;
    drop(drained);
    load.drained = start.elapsed();
    load.late_accepted = counters.late_accepted.load(Ordering::Relaxed);
    load.late_other = counters.late_other.load(Ordering::Relaxed);
    load.abandoned = counters.abandoned.load(Ordering::Relaxed);
    drop(progress);
    Ok(load)
}

async fn collect(mut rx: mpsc::UnboundedReceiver<Done>, rate: f64) -> Result<Load> {
    let mut load = Load {
        offered: 0,
        wall: Duration::ZERO,
        accepted: HashMap::new(),
        duplicate_ids: 0,
        latency: latency_histogram()?,
        refusals: latency_histogram()?,
        errors: BTreeMap::new(),
        first_errors: BTreeMap::new(),
        max_lag: Duration::ZERO,
        late_starts: 0,
        slowest_by_second: Vec::new(),
        drained: Duration::ZERO,
        late_accepted: 0,
        late_other: 0,
        abandoned: 0,
        other_statuses: 0,
    };
    while let Some(done) = rx.recv().await {
        let micros = u64::try_from(done.latency.as_micros()).unwrap_or(u64::MAX);
        let (kind, detail) = match done.outcome {
            Outcome::Accepted(id) => {
                load.latency.saturating_record(micros);
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let second = (done.index as f64 / rate) as usize;
                if load.slowest_by_second.len() <= second {
                    load.slowest_by_second.resize(second + 1, 0);
                }
                load.slowest_by_second[second] = load.slowest_by_second[second].max(micros);
                if load.accepted.insert(id, done.index).is_some() {
                    load.duplicate_ids += 1;
                }
                continue;
            }
            Outcome::Status(status) => {
                load.other_statuses += 1;
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    load.refusals.saturating_record(micros);
                }
                (status.as_u16().to_string(), None)
            }
            Outcome::BadBody(why) => ("bad 202 body".to_owned(), Some(why)),
            Outcome::Timeout => ("timeout".to_owned(), None),
            Outcome::QueuedTimeout => ("timeout (queued in generator)".to_owned(), None),
            Outcome::Connect(why) => ("connect".to_owned(), Some(why)),
            Outcome::Other(why) => ("other".to_owned(), Some(why)),
        };
        if let Some(why) = detail {
            load.first_errors.entry(kind.clone()).or_insert(why);
        }
        *load.errors.entry(kind).or_default() += 1;
    }
    Ok(load)
}

impl Load {
    /// Requests the service answered (any status), in time or after the client's timeout.
    fn answered(&self) -> u64 {
        self.accepted.len() as u64
            + self.duplicate_ids
            + self.other_statuses
            + self.late_accepted
            + self.late_other
    }

    fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "none".into();
        }
        self.errors
            .iter()
            .map(|(kind, n)| format!("{kind}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Prints the summary; true when the 202s themselves are already wrong (repeated ids).
    fn print(&self, args: &Args) -> bool {
        let accepted = self.accepted.len() as u64 + self.duplicate_ids;
        println!(
            "offered {} bookings at {:.0}/s over {:.1}s; last answer after {:.2}s",
            self.offered,
            args.rate,
            args.duration,
            self.wall.as_secs_f64()
        );
        println!(
            "accepted (202) {accepted} = {:.0}/s; errors {} ({})",
            accepted as f64 / args.duration,
            self.errors_total(),
            self.errors_text()
        );
        for (kind, why) in &self.first_errors {
            println!("  first {kind} error: {why}");
        }
        println!(
            "202 latency from due time, ms: {}",
            percentiles(&self.latency)
        );
        if !self.refusals.is_empty() {
            println!(
                "refused (503) in time: {}, latency from due time, ms: {}",
                self.refusals.len(),
                percentiles(&self.refusals)
            );
        }
        let late = self.late_accepted + self.late_other + self.abandoned;
        if late > 0 {
            println!(
                "timed-out requests answered later: {} with 202 (counted as timeouts), {} otherwise, \
                 {} not within {}s",
                self.late_accepted,
                self.late_other,
                self.abandoned,
                ABANDON_AFTER.as_secs(),
            );
        }
        // What the service got through, whether or not the client still waited: its capacity
        // when it is overloaded.
        println!(
            "service answered {} requests ({} 202s in time or late) until all settled {:.1}s after \
             the start = {:.0}/s",
            self.answered(),
            accepted + self.late_accepted,
            self.drained.as_secs_f64(),
            self.answered() as f64 / self.drained.as_secs_f64().max(1e-9)
        );
        let mut slowest: Vec<(usize, u64)> =
            self.slowest_by_second.iter().copied().enumerate().collect();
        slowest.sort_by_key(|&(_, micros)| std::cmp::Reverse(micros));
        if !slowest.is_empty() {
            let text: Vec<String> = slowest
                .iter()
                .take(3)
                .map(|&(second, micros)| format!("{second} s: {:.1} ms", micros as f64 / 1000.0))
                .collect();
            println!(
                "slowest 202 of the slowest seconds (due time): {}",
                text.join(", ")
            );
        }
        if self.late_starts > 0 {
            println!(
                "note: the generator started {} requests more than {} ms late (worst {:.1} ms); \
                 that delay is included in their latency",
                self.late_starts,
                LAG_WARNING.as_millis(),
                self.max_lag.as_secs_f64() * 1000.0
            );
        }
        if self.duplicate_ids > 0 {
            println!(
                "!!! {} 202s repeated a deliveryId already given to another booking",
                self.duplicate_ids
            );
        }
        self.duplicate_ids > 0
    }

    /// One markdown table row for docs/BENCHMARKS.md.
    fn result_line(&self, args: &Args, report: Option<&VerifyReport>) -> String {
        let accepted = self.accepted.len() as u64 + self.duplicate_ids;
        let verified = match report {
            None => "not checked".to_owned(),
            Some(r) => r.summary(),
        };
        format!(
            "RESULT | {} | {:.0} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} |",
            args.label(),
            args.rate,
            self.offered,
            accepted,
            accepted as f64 / args.duration,
            self.answered() as f64 / self.drained.as_secs_f64().max(1e-9),
            percentile_cells(&self.latency),
            self.errors_text(),
            verified,
            if self.refusals.is_empty() {
                "–".to_owned()
            } else {
                format!("{:.2}", bench::ms(&self.refusals, 0.99))
            },
        )
    }
}

/// CPU ticks of the machine and of some processes, from `/proc` (Linux only).
struct CpuSample {
    at: Instant,
    busy: u64,
    total: u64,
    processes: Vec<(String, Option<u64>)>,
}

impl CpuSample {
    fn take(others: &[(String, u32)]) -> Option<Self> {
        let machine = MachineTicks::read()?;
        let mut processes = vec![("generator".to_owned(), process_ticks(std::process::id()))];
        for (name, pid) in others {
            processes.push((name.clone(), process_ticks(*pid)));
        }
        Some(Self {
            at: Instant::now(),
            busy: machine.busy,
            total: machine.total,
            processes,
        })
    }

    /// Machine busy share and, per process, cores used and CPU time per request.
    fn report(&self, after: &CpuSample, requests: u64) -> String {
        let cores = bench::cores().max(1) as f64;
        let total = after.total.saturating_sub(self.total).max(1) as f64;
        // Ticks of one core over the interval: no need to know the tick rate.
        let per_core = total / cores;
        let mut text = format!(
            "CPU during the load: machine {:.0}% busy ({cores:.0} cores)",
            after.busy.saturating_sub(self.busy) as f64 * 100.0 / total
        );
        let mut accounted = 0.0;
        for ((name, before), (_, now)) in self.processes.iter().zip(&after.processes) {
            if let (Some(before), Some(now)) = (before, now) {
                let used = now.saturating_sub(*before) as f64 / per_core;
                accounted += used;
                text.push_str(&format!("; {name} {used:.2} cores"));
                if requests > 0 {
                    let wall_us = after.at.duration_since(self.at).as_secs_f64() * 1e6;
                    text.push_str(&format!(
                        " ({:.0} us/request)",
                        used * wall_us / requests as f64
                    ));
                }
            }
        }
        let busy_cores = after.busy.saturating_sub(self.busy) as f64 / per_core;
        text.push_str(&format!(
            "; everything else {:.2} cores",
            (busy_cores - accounted).max(0.0)
        ));
        text
    }
}

/// A booking of this run found in the log.
struct Found {
    delivery_id: Uuid,
    partition: u32,
    /// The booking number from `packageInfo.packageId`.
    index: Option<u64>,
}

#[derive(Default)]
struct PartitionRead {
    records: u64,
    found: Vec<Found>,
    /// Bookings of earlier runs against the same log.
    earlier: u64,
    other_kinds: u64,
    poison: u64,
    undecodable: u64,
    /// Why the reader stopped before seeing all its expected ids, if it did.
    gave_up: Option<String>,
}

#[derive(Default)]
struct VerifyReport {
    expected: u64,
    records: u64,
    earlier: u64,
    other_kinds: u64,
    poison: u64,
    undecodable: u64,
    missing: u64,
    /// Extra copies of a deliveryId (a booking in the log twice counts 1).
    duplicates: u64,
    /// Extra copies of one HTTP request under different deliveryIds.
    double_appends: u64,
    wrong_partition: u64,
    /// In the log with a deliveryId a 202 gave to a different booking.
    mismatched: u64,
    /// Bookings of this run in the log whose client saw an error or timeout (not a failure: the
    /// client was not told yes, so it would retry with its Idempotency-Key).
    appended_without_202: u64,
    gave_up: Vec<String>,
    examples: Vec<String>,
    elapsed: Duration,
}

impl VerifyReport {
    fn passed(&self) -> bool {
        self.missing == 0
            && self.duplicates == 0
            && self.double_appends == 0
            && self.wrong_partition == 0
            && self.mismatched == 0
            && self.poison == 0
            && self.undecodable == 0
    }

    fn summary(&self) -> String {
        if self.passed() {
            format!("all {} in the log exactly once", self.expected)
        } else {
            format!(
                "FAILED: {} missing, {} duplicated, {} on the wrong partition",
                self.missing, self.duplicates, self.wrong_partition
            )
        }
    }

    fn print(&self) {
        println!(
            "verify: read {} records in {:.1}s ({} from earlier runs, {} of other kinds); \
             {} 202s expected",
            self.records,
            self.elapsed.as_secs_f64(),
            self.earlier,
            self.other_kinds,
            self.expected
        );
        println!(
            "verify: missing {}, duplicated {}, appended twice under different ids {}, wrong \
             partition {}, mismatched {}, poison {}, undecodable {}; appended though the client \
             saw an error {}",
            self.missing,
            self.duplicates,
            self.double_appends,
            self.wrong_partition,
            self.mismatched,
            self.poison,
            self.undecodable,
            self.appended_without_202
        );
        for why in &self.gave_up {
            println!("verify: {why}");
        }
        for example in &self.examples {
            println!("verify:   e.g. {example}");
        }
        if self.passed() {
            println!("verify: OK, every 202 is in the log exactly once, on its partition");
        } else {
            println!("!!! verify {}", self.summary());
        }
    }
}

/// Reads every partition of the log from the start and checks it against the 202s.
async fn verify(
    args: &Args,
    prefix: &str,
    run: &str,
    accepted: &HashMap<Uuid, u64>,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let broker = messaging::connect(&broker_settings(args, prefix))
        .await
        .context("connecting to the broker to verify the log")?;
    let log = broker
        .log(DELIVERY_REQUESTS_LOG, args.partitions)
        .await
        .context("opening the delivery-requests log")?;

    let mut per_partition: Vec<HashSet<Uuid>> = vec![HashSet::new(); args.partitions as usize];
    for id in accepted.keys() {
        let p = messaging::partition_for(&id.to_string(), args.partitions);
        if let Some(set) = per_partition.get_mut(p as usize) {
            set.insert(*id);
        }
    }
    let counters = Arc::new(Counters::default());
    let progress = verify_progress(accepted.len() as u64, counters.clone())?;
    let prefix_of_run = format!("{run}-");
    let readers: Vec<_> = per_partition
        .into_iter()
        .enumerate()
        .map(|(p, expected)| {
            let log = log.clone();
            let counters = counters.clone();
            let prefix_of_run = prefix_of_run.clone();
            tokio::spawn(async move {
                read_partition(log, p, expected, &prefix_of_run, &counters).await
            })
        })
        .collect();
    let mut reads = Vec::new();
    for reader in readers {
        reads.push(reader.await.context("partition reader task")??);
    }
    drop(progress);
    let mut report = check(accepted, reads, args.partitions);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Compares what the partitions held with the 202s (deliveryId -> booking number).
fn check(
    accepted: &HashMap<Uuid, u64>,
    reads: Vec<PartitionRead>,
    partitions: u32,
) -> VerifyReport {
    let mut report = VerifyReport {
        expected: accepted.len() as u64,
        ..VerifyReport::default()
    };
    let mut copies: HashMap<Uuid, u64> = HashMap::new();
    let mut appends_of_request: HashMap<u64, u64> = HashMap::new();
    for read in reads {
        report.records += read.records;
        report.earlier += read.earlier;
        report.other_kinds += read.other_kinds;
        report.poison += read.poison;
        report.undecodable += read.undecodable;
        report.gave_up.extend(read.gave_up);
        for found in read.found {
            *copies.entry(found.delivery_id).or_default() += 1;
            if let Some(index) = found.index {
                *appends_of_request.entry(index).or_default() += 1;
            }
            let home = messaging::partition_for(&found.delivery_id.to_string(), partitions);
            if found.partition != home {
                report.wrong_partition += 1;
                note(
                    &mut report.examples,
                    format!(
                        "{} is on partition {}, its key maps to {home}",
                        found.delivery_id, found.partition
                    ),
                );
            }
            match accepted.get(&found.delivery_id) {
                None => report.appended_without_202 += 1,
                Some(index) if found.index != Some(*index) => {
                    report.mismatched += 1;
                    note(
                        &mut report.examples,
                        format!(
                            "{} was answered to booking {index} but the log has booking {:?}",
                            found.delivery_id, found.index
                        ),
                    );
                }
                Some(_) => {}
            }
        }
    }
    for (id, index) in accepted {
        match copies.get(id).copied().unwrap_or(0) {
            0 => {
                report.missing += 1;
                note(
                    &mut report.examples,
                    format!("{id} (booking {index}) got a 202 but is not in the log"),
                );
            }
            1 => {}
            n => {
                report.duplicates += n - 1;
                note(
                    &mut report.examples,
                    format!("{id} (booking {index}) is in the log {n} times"),
                );
            }
        }
    }
    // Each request is sent once. Its extra copies under the same deliveryId are already counted
    // in `duplicates`; the rest were appended again under another deliveryId.
    report.double_appends = appends_of_request
        .values()
        .map(|n| n.saturating_sub(1))
        .sum::<u64>()
        .saturating_sub(report.duplicates);
    report
}

fn note(examples: &mut Vec<String>, example: String) {
    if examples.len() < 5 {
        examples.push(example);
    }
}

/// Reads one partition from the start until all of `expected` was seen and the partition is
/// quiet, or nothing new arrives for [`IDLE_LIMIT`].
async fn read_partition(
    log: Arc<dyn PartitionedLog>,
    partition: usize,
    mut expected: HashSet<Uuid>,
    prefix_of_run: &str,
    counters: &Counters,
) -> Result<PartitionRead> {
    let partition = u32::try_from(partition).context("partition number")?;
    let mut reader = log
        .read(partition, StartAt::First)
        .await
        .with_context(|| format!("opening a reader on partition {partition}"))?;
    let mut read = PartitionRead::default();
    loop {
        let idle = if expected.is_empty() {
            DRAIN_IDLE
        } else {
            IDLE_LIMIT
        };
        let record = match tokio::time::timeout(idle, reader.next()).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                if !expected.is_empty() {
                    read.gave_up = Some(format!(
                        "partition {partition}: the reader closed with {} ids still expected",
                        expected.len()
                    ));
                }
                break;
            }
            Err(_) => {
                if !expected.is_empty() {
                    read.gave_up = Some(format!(
                        "partition {partition}: nothing new for {}s with {} ids still expected",
                        IDLE_LIMIT.as_secs(),
                        expected.len()
                    ));
                }
                break;
            }
        };
        read.records += 1;
        let event = match record.event {
            Ok(event) => event,
            Err(_) => {
                read.poison += 1;
                continue;
            }
        };
        if event.kind != DELIVERY_REQUESTED {
            read.other_kinds += 1;
            continue;
        }
        // Deserialized from the borrowed body: `Envelope::decode` would clone it first.
        let Ok(requested) = DeliveryRequested::deserialize(&event.body) else {
            read.undecodable += 1;
            continue;
        };
        let Some(index) = requested
            .package_info
            .package_id
            .strip_prefix(prefix_of_run)
        else {
            read.earlier += 1;
            continue;
        };
        if expected.remove(&requested.delivery_id) {
            counters.done.fetch_add(1, Ordering::Relaxed);
        }
        read.found.push(Found {
            delivery_id: requested.delivery_id,
            partition: record.partition,
            index: index.parse().ok(),
        });
    }
    Ok(read)
}

/// The load phase's bar: answered of `total`, with what was sent, due, accepted and failed.
fn load_progress(total: u64, counters: Arc<Counters>, rate: f64) -> Result<Progress> {
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    Progress::start(
        total,
        "[{elapsed_precise}] {wide_bar} {pos}/{len} answered  {msg}",
        Duration::from_millis(250),
        move |bar| {
            let done = counters.done.load(Ordering::Relaxed);
            let accepted = counters.accepted.load(Ordering::Relaxed);
            let now = Instant::now();
            let recent =
                (accepted - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-9);
            last = (now, accepted);
            bar.set_position(done);
            bar.set_message(format!(
                "sent {} (due {}), accepted {accepted} ({recent:.0}/s), errors {}",
                counters.sent.load(Ordering::Relaxed),
                ((started.elapsed().as_secs_f64() * rate) as u64).min(total),
                counters.errors.load(Ordering::Relaxed),
            ));
        },
    )
}

/// The log check's bar: 202s found of `expected`.
fn verify_progress(expected: u64, counters: Arc<Counters>) -> Result<Progress> {
    Progress::start(
        expected,
        "verify [{elapsed_precise}] {wide_bar} {pos}/{len} 202s found {per_sec:>12}",
        Duration::from_millis(100),
        move |bar| bar.set_position(counters.done.load(Ordering::Relaxed)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use contracts::validation::FromJsonObject;

    fn found(delivery_id: Uuid, index: u64, partitions: u32) -> Found {
        Found {
            delivery_id,
            partition: messaging::partition_for(&delivery_id.to_string(), partitions),
            index: Some(index),
        }
    }

    fn read(found: Vec<Found>) -> PartitionRead {
        PartitionRead {
            records: found.len() as u64,
            found,
            ..PartitionRead::default()
        }
    }

    #[test]
    fn the_flags_of_bench_ingest_parse() -> Result<()> {
        Args::command().debug_assert();
        // scripts/bench-ingest.sh, then LOADGEN_ARGS: a flag given again overrides.
        let args = Args::try_parse_from(
            "loadgen --url http://127.0.0.1:8080/ --rate 5000 --duration 2.5 --label spike-50000/s \
             --verify --prefix bench-ingest-1 --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f \
             --partitions 8 --cpu-of ingestion=12 --cpu-of rabbitmq=34 --accounts 5000 \
             --timeout-ms 1000 --partitions 4 --jwt-secret s"
                .split_whitespace(),
        )?
        .checked()?;
        assert_eq!(args.url, "http://127.0.0.1:8080");
        assert_eq!(
            (args.total(), args.label().as_str()),
            (12_500, "spike-50000/s")
        );
        let cpu_of = [("ingestion".to_owned(), 12), ("rabbitmq".to_owned(), 34)];
        assert_eq!(args.cpu_of, cpu_of);
        assert_eq!((args.timeout, args.partitions), (Duration::from_secs(1), 4));
        let cleanup = ["loadgen", "--cleanup", "--prefix", "p", "--partitions", "8"];
        assert!(Args::try_parse_from(cleanup)?.checked()?.cleanup);
        Ok(())
    }

    #[test]
    fn every_202_once_on_its_partition_passes() {
        let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
        let accepted: HashMap<Uuid, u64> = ids.iter().zip(0..).map(|(id, i)| (*id, i)).collect();
        let mut log: Vec<Found> = ids
            .iter()
            .zip(0..)
            .map(|(id, i)| found(*id, i, 8))
            .collect();
        // A booking whose client timed out may be in the log: not a failure.
        log.push(found(Uuid::new_v4(), 99, 8));
        let report = check(&accepted, vec![read(log)], 8);
        assert!(report.passed(), "{}", report.summary());
        assert_eq!(report.appended_without_202, 1);
    }

    #[test]
    fn missing_duplicated_misplaced_and_mismatched_bookings_fail() {
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        let accepted: HashMap<Uuid, u64> = ids.iter().zip(0..).map(|(id, i)| (*id, i)).collect();
        let mut misplaced = found(ids[2], 2, 8);
        misplaced.partition = (misplaced.partition + 1) % 8;
        let log = vec![
            // ids[0] is missing
            found(ids[1], 1, 8),
            found(ids[1], 1, 8),
            misplaced,
            found(ids[3], 7, 8),
            // booking 3 appended a second time under another id
            found(Uuid::new_v4(), 3, 8),
        ];
        let report = check(&accepted, vec![read(log)], 8);
        assert!(!report.passed());
        assert_eq!(report.missing, 1);
        assert_eq!(report.duplicates, 1);
        assert_eq!(report.wrong_partition, 1);
        assert_eq!(report.mismatched, 1);
        assert_eq!(report.double_appends, 0);

        let report = check(
            &accepted,
            vec![read(vec![
                found(ids[0], 0, 8),
                found(ids[1], 1, 8),
                found(ids[2], 2, 8),
                found(ids[3], 3, 8),
                found(Uuid::new_v4(), 3, 8),
            ])],
            8,
        );
        assert_eq!(report.double_appends, 1);
        assert!(!report.passed());
    }

    #[test]
    fn bookings_are_valid_and_pickups_fall_in_the_coming_week() -> Result<()> {
        let secret = "s".repeat(32);
        let gen = Generator {
            pool: http1::Pool::new("http://127.0.0.1:1")?,
            tokens: authorizations(&secret, 3)?,
            run: "lgtest".into(),
            started_at: Utc::now(),
            timeout: Duration::from_secs(1),
            in_flight: Arc::new(Semaphore::new(1)),
            max_in_flight: 1,
            counters: Arc::new(Counters::default()),
        };
        assert_eq!(gen.tokens.len(), 3);
        for i in 0..1000 {
            let (_, booking) = gen.booking(i);
            let ahead = booking.pickup_time - gen.started_at;
            assert!(ahead >= chrono::Duration::hours(1) && ahead <= chrono::Duration::days(8));
            assert_eq!(booking.package_info.package_id, format!("lgtest-{i}"));
            let json = serde_json::to_value(&booking).unwrap_or_default();
            assert!(DeliveryRequest::from_json_value(json).is_ok());
        }
        Ok(())
    }
}
