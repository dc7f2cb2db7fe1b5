//! `make bench-e2e`: bookings per second that reach `scheduled`, booking-to-scheduled latency,
//! database commits per saga and CPU per process, with every service running as its own process
//! (started by `scripts/bench-e2e.sh`).
//!
//! For each run it offers bookings to Ingestion open loop (booking `i` is due at `start + i/rate`
//! whether or not earlier ones were answered), then waits until the Scheduler has finished a saga
//! for every `202`, watching its `/metrics` (which costs the databases nothing). The latencies
//! come from the Scheduler's journal: `saga_instances.updated_at` of a completed saga minus the
//! moment the client got its `202`. Commits come from `pg_stat_database.xact_commit` of each
//! service's database, minus the idle rate measured before the first run (lease renewals, outbox
//! polling) and minus this program's own queries; PostgreSQL publishes backend counters up to
//! 10 s late, so each run's closing snapshot waits `--flush-wait` after the last saga. CPU comes
//! from `/proc`: every service process, the PostgreSQL backends of each service database,
//! the rest of PostgreSQL, RabbitMQ (`beam.smp`), this generator, and the whole machine.
//!
//! A benchmark, not a test: the figures depend on the machine and on what else runs on it. The
//! exit status is non-zero only when a saga failed, or when the Scheduler reported every saga
//! finished while some `202` has no finished saga (a lost booking).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{CommandFactory, Parser};
use contracts::{DeliveryAccepted, DeliveryRequest, DELIVERY_REQUESTS_LOG, WORKFLOW_EVENTS_LOG};
use integration_tests::bench::flag::{millis, name_values, seconds, url};
use integration_tests::bench::{
    self, cores, env_var, error_chain, process_ticks, processes, splitmix64, MachineTicks,
    TICKS_PER_SECOND,
};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use tokio::sync::{mpsc, Semaphore};
use uuid::Uuid;

/// Pickup times fall between one hour and a year from now, so the drone fleet is not the limit.
const PICKUP_SPREAD_SECS: u64 = 365 * 24 * 3_600;

/// End-to-end sagas (`make bench-e2e`): offers bookings to Ingestion open loop and measures
/// scheduled/s, booking-to-scheduled latency, commits per saga and CPU per process, against
/// services that scripts/bench-e2e.sh started.
#[derive(Parser)]
#[command(
    name = "bench-e2e",
    // A flag given twice keeps its last value, so extra arguments (BENCH_E2E_ARGS) can override.
    args_override_self = true,
    override_usage = "bench-e2e --runs 'RATE:SECONDS ...' --scheduler-db URL --stats-db URL \
                      --databases SERVICE=DBNAME,... [OPTIONS]\n       \
                      bench-e2e --cleanup --prefix PREFIX --amqp-url URL [--partitions P]",
    after_help = "The JWT key comes from APP_AUTH__JWT_SECRET and the service token from \
                  APP_AUTH__SERVICE_TOKEN."
)]
struct Args {
    /// Offered rate and duration of each run, in order (e.g. '1000:20 2000:20')
    // `::std::vec::Vec`: one value that holds the list, not a repeated flag.
    #[arg(long, value_name = "'RATE:SECONDS ...'", value_parser = runs)]
    #[arg(default_value = "", hide_default_value = true)]
    runs: ::std::vec::Vec<(f64, f64)>,
    /// The Scheduler's PostgreSQL database (its journal holds the timings)
    #[arg(long, value_name = "URL", default_value_t, hide_default_value = true)]
    scheduler_db: String,
    /// Any database on the same server, to read pg_stat_database from
    #[arg(long, value_name = "URL", default_value_t, hide_default_value = true)]
    stats_db: String,
    /// Each service's database name, for commits per saga
    #[arg(long, value_name = "SERVICE=DBNAME,...", value_parser = name_values::<String>)]
    #[arg(default_value = "", hide_default_value = true)]
    databases: ::std::vec::Vec<(String, String)>,
    /// Service processes to measure the CPU of
    #[arg(long, value_name = "NAME=PID,...", value_parser = name_values::<u32>)]
    #[arg(default_value = "", hide_default_value = true)]
    pids: ::std::vec::Vec<(String, u32)>,
    /// Ingestion's base URL
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:18080", value_parser = url)]
    ingestion_url: String,
    /// The Account service's base URL (the client accounts are created there)
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:18081", value_parser = url)]
    account_url: String,
    /// The Scheduler's base URL (its /metrics shows progress)
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:18085", value_parser = url)]
    scheduler_url: String,
    /// Client accounts the bookings are spread over
    #[arg(long, value_name = "N", default_value_t = 1000)]
    accounts: usize,
    /// How long after a run's last booking its sagas may take, in seconds
    #[arg(long, value_name = "S", default_value = "900", value_parser = seconds)]
    drain_timeout: Duration,
    /// Wait before a closing pg_stat snapshot, in seconds (backends report their counters at
    /// most 10 s late)
    #[arg(long, value_name = "S", default_value = "11", value_parser = seconds)]
    flush_wait: Duration,
    /// Length of the idle measurement before the first run, in seconds
    #[arg(long, value_name = "S", default_value = "10", value_parser = seconds)]
    idle_window: Duration,
    /// Requests open at once
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_in_flight: usize,
    /// Request timeout in milliseconds
    #[arg(long = "timeout-ms", value_name = "MS", default_value = "5000", value_parser = millis)]
    timeout: Duration,
    /// Delete the logs and the compensation queue under PREFIX and exit
    #[arg(long)]
    cleanup: bool,
    /// The services' APP_MESSAGING__PREFIX (for --cleanup)
    #[arg(long, default_value_t, hide_default_value = true)]
    prefix: String,
    /// RabbitMQ URL (for --cleanup)
    #[arg(long, value_name = "URL")]
    #[arg(default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Partitions of the logs (for --cleanup)
    #[arg(long, value_name = "P", default_value_t = 8)]
    partitions: u32,
}

/// `RATE:SECONDS RATE:SECONDS ...`
fn runs(value: &str) -> Result<Vec<(f64, f64)>, String> {
    value
        .split_whitespace()
        .map(|run| {
            let (rate, secs) = run
                .split_once(':')
                .ok_or_else(|| format!("run {run:?} is not RATE:SECONDS"))?;
            let number = |v: &str| v.parse::<f64>().map_err(|e| format!("run {run:?}: {e}"));
            Ok((number(rate)?, number(secs)?))
        })
        .collect()
}

impl Args {
    /// The flags, their combinations checked.
    fn checked(self) -> Result<Self> {
        if self.cleanup {
            if self.prefix.is_empty() {
                bail!("--cleanup needs --prefix");
            }
            return Ok(self);
        }
        let usage = || Args::command().render_usage();
        if self.runs.is_empty()
            || self
                .runs
                .iter()
                .any(|(r, s)| !(r.is_finite() && *r > 0.0 && s.is_finite() && *s > 0.0))
        {
            bail!("--runs needs positive RATE:SECONDS pairs\n{}", usage());
        }
        if self.scheduler_db.is_empty() || self.stats_db.is_empty() || self.databases.is_empty() {
            bail!(
                "--scheduler-db, --stats-db and --databases are required\n{}",
                usage()
            );
        }
        // The names go into SQL as literals: only what the script generates is accepted.
        for (_, db) in &self.databases {
            if !db
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                bail!("database name {db:?} must be lowercase letters, digits and '_'");
            }
        }
        if self.accounts == 0 || self.max_in_flight == 0 {
            bail!("--accounts and --max-in-flight must be at least 1");
        }
        Ok(self)
    }
}

fn env_secret(name: &str) -> Result<String> {
    env_var(name).with_context(|| format!("{name} must be set"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse().checked()?;
    if args.cleanup {
        return cleanup(&args).await;
    }
    let bench = Arc::new(Bench::connect(args).await?);
    bench.create_accounts().await?;
    println!(
        "bench-e2e: {} cores, {} accounts; idle measurement ({} s flush wait, then {} s)",
        cores(),
        bench.args.accounts,
        bench.args.flush_wait.as_secs_f64(),
        bench.args.idle_window.as_secs_f64(),
    );
    tokio::time::sleep(bench.args.flush_wait).await;
    let idle_start = bench.pg_snapshot().await?;
    let idle_cpu_start = bench.cpu_snapshot().await?;
    tokio::time::sleep(bench.args.idle_window).await;
    let idle_end = bench.pg_snapshot().await?;
    let idle_cpu = bench.cpu_snapshot().await?.since(&idle_cpu_start);
    let idle = idle_end.rates_since(&idle_start);
    println!(
        "idle commits/s: {}",
        idle.iter()
            .map(|(db, r)| format!("{}={r:.1}", bench.service_of(db)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("idle CPU (cores): {}", idle_cpu.text());

    let mut lines = Vec::new();
    let mut failed = false;
    let mut before = idle_end;
    for (rate, secs) in bench.args.runs.clone() {
        let (report, after) = bench.run(rate, secs, &before, &idle).await?;
        report.print(&bench);
        failed |= report.failed > 0 || (report.drained && report.unfinished + report.missing > 0);
        lines.push(report.table_line());
        before = after;
    }
    println!();
    println!("RESULTS");
    println!(
        "| offered/s × s | accepted | scheduled | scheduled/s (overall) | scheduled/s (peak 5 s) | \
         p50 ms | p90 ms | p99 ms | max ms | commits/saga | WAL syncs/saga | CPU ms/saga | \
         busiest (cores, during the load) | not the suite (cores) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|");
    for line in lines {
        println!("{line}");
    }
    if failed {
        bail!("sagas failed or bookings were lost: see above");
    }
    Ok(())
}

async fn cleanup(args: &Args) -> Result<()> {
    let settings = messaging::MessagingSettings {
        prefix: args.prefix.clone(),
        connection_name: "bench-e2e".into(),
        ..messaging::MessagingSettings::new(args.amqp_url.clone())
    };
    let broker = messaging::connect(&settings)
        .await
        .context("connecting to the broker")?;
    for log in [DELIVERY_REQUESTS_LOG, WORKFLOW_EVENTS_LOG] {
        broker
            .delete_log(log, args.partitions)
            .await
            .with_context(|| format!("deleting {log}"))?;
    }
    broker
        .delete_log(
            contracts::ACCOUNT_EVENTS_LOG,
            contracts::ACCOUNT_EVENTS_PARTITIONS,
        )
        .await
        .context("deleting the account-events log")?;
    broker
        .delete_queue(contracts::COMPENSATIONS_QUEUE)
        .await
        .context("deleting the compensation queue")?;
    println!("deleted the logs and queues of prefix {}", args.prefix);
    Ok(())
}

/// Counters of one database.
#[derive(Debug, Clone, Copy, Default)]
struct DbCounters {
    commits: i64,
    rows_written: i64,
}

struct PgSnapshot {
    at: Instant,
    dbs: BTreeMap<String, DbCounters>,
    /// Cluster-wide (other databases on the server included).
    wal_syncs: i64,
    wal_bytes: i64,
}

impl PgSnapshot {
    fn rates_since(&self, earlier: &PgSnapshot) -> BTreeMap<String, f64> {
        let secs = (self.at - earlier.at).as_secs_f64().max(0.001);
        self.dbs
            .iter()
            .map(|(db, c)| {
                let before = earlier.dbs.get(db).copied().unwrap_or_default();
                (db.clone(), (c.commits - before.commits) as f64 / secs)
            })
            .collect()
    }
}

/// CPU ticks by process group, and the machine's busy and total ticks.
struct CpuSnapshot {
    at: Instant,
    groups: BTreeMap<String, u64>,
    machine_busy: u64,
}

/// Cores used by each group over an interval.
struct CpuUse {
    groups: Vec<(String, f64)>,
    machine: f64,
}

impl CpuSnapshot {
    fn since(&self, earlier: &CpuSnapshot) -> CpuUse {
        let secs = (self.at - earlier.at).as_secs_f64().max(0.001);
        let cores = |now: u64, then: u64| now.saturating_sub(then) as f64 / TICKS_PER_SECOND / secs;
        let mut groups: Vec<(String, f64)> = self
            .groups
            .iter()
            .map(|(g, t)| {
                (
                    g.clone(),
                    cores(*t, earlier.groups.get(g).copied().unwrap_or(0)),
                )
            })
            .collect();
        let machine = cores(self.machine_busy, earlier.machine_busy);
        let listed: f64 = groups.iter().map(|(_, c)| c).sum();
        // Kernel threads, interrupts, and processes that ended between the snapshots (other
        // builds' compilers, mostly).
        groups.push(("unaccounted".into(), (machine - listed).max(0.0)));
        groups.sort_by(|a, b| b.1.total_cmp(&a.1));
        CpuUse { groups, machine }
    }
}

impl CpuUse {
    /// Cores used by whatever is not the suite, the broker or the generator.
    fn others(&self) -> f64 {
        self.groups
            .iter()
            .filter(|(g, _)| g.starts_with("other") || g == "unaccounted")
            .map(|(_, c)| c)
            .sum()
    }

    fn text(&self) -> String {
        let parts: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, c)| *c >= 0.01)
            .map(|(g, c)| format!("{g} {c:.2}"))
            .collect();
        format!(
            "machine {:.2} of {} (not the suite: {:.2}) | {}",
            self.machine,
            cores(),
            self.others(),
            parts.join(", ")
        )
    }

    /// The busiest groups of the suite (services, their databases, the broker).
    fn top(&self, n: usize) -> String {
        self.groups
            .iter()
            .filter(|(g, _)| !g.starts_with("other") && g != "unaccounted")
            .take(n)
            .map(|(g, c)| format!("{g} {c:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The first part of a run's load, reported apart: the step from an idle stack to the offered
/// rate (connections opened, statements prepared, batches not yet grown) is its own figure.
const WARM_UP: Duration = Duration::from_secs(2);

/// A booking that `202` accepted.
struct Accepted {
    id: Uuid,
    at: DateTime<Utc>,
}

#[derive(Default)]
struct LoadResult {
    accepted: Vec<Accepted>,
    errors: BTreeMap<String, u64>,
    http_ms: Vec<f64>,
    max_lag: Duration,
}

struct Bench {
    args: Args,
    client: reqwest::Client,
    scheduler_db: DatabaseConnection,
    stats_db: DatabaseConnection,
    tokens: Vec<(String, HeaderValue)>,
    service_token: String,
    /// Queries this program ran against each service database (they count as commits there).
    own_queries: BTreeMap<String, AtomicU64>,
}

impl Bench {
    async fn connect(args: Args) -> Result<Self> {
        let secret = env_secret("APP_AUTH__JWT_SECRET")?;
        let service_token = env_secret("APP_AUTH__SERVICE_TOKEN")?;
        let tokens = bench::client_tokens(&secret, "bench", args.accounts)?;
        let client = reqwest::Client::builder()
            .http1_only()
            .tcp_nodelay(true)
            .no_proxy()
            .pool_max_idle_per_host(args.max_in_flight)
            // Well below the services' keep-alive (actix-web closes a connection idle for 5 s):
            // a pooled connection the server is just closing can take a request and fail it with
            // "connection closed before message completed" (the server logs nothing). With the
            // machine saturated the server's worker sees the request and its keep-alive timer
            // late, so a 1 s margin (4 s) still lost 78 of 40,000 requests in a 2000/s run.
            .pool_idle_timeout(Duration::from_secs(2))
            .timeout(args.timeout)
            .build()
            .context("building the HTTP client")?;
        let scheduler_db = sea_orm::Database::connect(args.scheduler_db.as_str())
            .await
            .context("connecting to the scheduler database")?;
        let stats_db = sea_orm::Database::connect(args.stats_db.as_str())
            .await
            .context("connecting to the stats database")?;
        let own_queries = args
            .databases
            .iter()
            .map(|(_, db)| (db.clone(), AtomicU64::new(0)))
            .collect();
        Ok(Self {
            args,
            client,
            scheduler_db,
            stats_db,
            tokens,
            service_token,
            own_queries,
        })
    }

    fn service_of<'a>(&'a self, db: &'a str) -> &'a str {
        self.args
            .databases
            .iter()
            .find(|(_, d)| d == db)
            .map_or(db, |(s, _)| s.as_str())
    }

    /// One query of this program against the scheduler database (subtracted from its commits).
    fn count_own_scheduler_query(&self) {
        if let Some(n) = self
            .scheduler_db_name()
            .and_then(|db| self.own_queries.get(db))
        {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn scheduler_db_name(&self) -> Option<&str> {
        self.args
            .databases
            .iter()
            .find(|(s, _)| s == "scheduler")
            .map(|(_, d)| d.as_str())
    }

    async fn create_accounts(&self) -> Result<()> {
        let sem = Arc::new(Semaphore::new(32));
        let mut tasks = Vec::new();
        for (account, _) in &self.tokens {
            let permit = sem.clone().acquire_owned().await?;
            let request = self
                .client
                .put(format!("{}/api/accounts/{account}", self.args.account_url))
                .bearer_auth(&self.service_token)
                .json(&serde_json::json!({"name": account, "status": "active"}));
            let account = account.clone();
            tasks.push(tokio::spawn(async move {
                let res = request.send().await;
                drop(permit);
                match res {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => bail!("creating account {account}: {}", r.status()),
                    Err(e) => Err(e).context("creating an account"),
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(())
    }

    async fn pg_snapshot(&self) -> Result<PgSnapshot> {
        let names: Vec<String> = self
            .args
            .databases
            .iter()
            .map(|(_, d)| format!("'{d}'"))
            .collect();
        let backend = self.stats_db.get_database_backend();
        let rows = self
            .stats_db
            .query_all(Statement::from_string(
                backend,
                format!(
                    "SELECT datname::text AS datname, xact_commit, \
                     tup_inserted + tup_updated + tup_deleted AS written \
                     FROM pg_stat_database WHERE datname IN ({})",
                    names.join(",")
                ),
            ))
            .await?;
        let mut dbs = BTreeMap::new();
        for r in rows {
            dbs.insert(
                r.try_get::<String>("", "datname")?,
                DbCounters {
                    commits: r.try_get("", "xact_commit")?,
                    rows_written: r.try_get("", "written")?,
                },
            );
        }
        let wal = self
            .stats_db
            .query_one(Statement::from_string(
                backend,
                "SELECT wal_sync, wal_bytes::bigint AS wal_bytes FROM pg_stat_wal".to_owned(),
            ))
            .await?
            .context("pg_stat_wal has no row")?;
        Ok(PgSnapshot {
            at: Instant::now(),
            dbs,
            wal_syncs: wal.try_get("", "wal_sync")?,
            wal_bytes: wal.try_get("", "wal_bytes")?,
        })
    }

    async fn cpu_snapshot(&self) -> Result<CpuSnapshot> {
        let mut groups = BTreeMap::new();
        for (name, pid) in &self.args.pids {
            groups.insert(name.clone(), process_ticks(*pid).unwrap_or(0));
        }
        groups.insert(
            "bench-e2e (load generator)".into(),
            process_ticks(std::process::id()).unwrap_or(0),
        );
        // PostgreSQL backends serving each service database; the rest of PostgreSQL apart.
        let backend = self.stats_db.get_database_backend();
        let rows = self
            .stats_db
            .query_all(Statement::from_string(
                backend,
                "SELECT pid, datname::text AS datname FROM pg_stat_activity \
                 WHERE datname IS NOT NULL"
                    .to_owned(),
            ))
            .await?;
        let mut db_of: HashMap<u32, String> = HashMap::new();
        for r in rows {
            let pid: i32 = r.try_get("", "pid")?;
            let db: String = r.try_get("", "datname")?;
            if let Ok(pid) = u32::try_from(pid) {
                db_of.insert(pid, db);
            }
        }
        let ours: Vec<u32> = self
            .args
            .pids
            .iter()
            .map(|(_, p)| *p)
            .chain([std::process::id()])
            .collect();
        for (pid, comm) in processes() {
            if ours.contains(&pid) {
                continue;
            }
            let ticks = process_ticks(pid).unwrap_or(0);
            let group = match comm.as_str() {
                "beam.smp" => "rabbitmq".to_owned(),
                "postgres" => match db_of.get(&pid) {
                    Some(db) if self.args.databases.iter().any(|(_, d)| d == db) => {
                        format!("postgres ({})", self.service_of(db))
                    }
                    _ => "postgres (other)".to_owned(),
                },
                // Whatever else runs on the machine (other builds and tests), by name.
                other => format!("other: {other}"),
            };
            *groups.entry(group).or_default() += ticks;
        }
        Ok(CpuSnapshot {
            at: Instant::now(),
            groups,
            machine_busy: MachineTicks::read().map_or(0, |m| m.busy),
        })
    }

    async fn metrics(&self) -> Result<Metrics> {
        let text = self
            .client
            .get(format!("{}/metrics", self.args.scheduler_url))
            .send()
            .await
            .context("GET scheduler /metrics")?
            .text()
            .await?;
        Ok(Metrics::parse(&text))
    }

    fn booking(&self, i: u64, run: &str, now: DateTime<Utc>) -> (&HeaderValue, DeliveryRequest) {
        let (owner, auth) = &self.tokens[(i % self.tokens.len() as u64) as usize];
        let request = bench::booking(
            owner,
            run,
            i,
            splitmix64(i ^ fnv(run)),
            now,
            PICKUP_SPREAD_SECS,
        );
        (auth, request)
    }

    /// Offers `rate`/s for `secs` seconds, open loop.
    async fn load(self: &Arc<Self>, rate: f64, secs: f64, run: &str) -> Result<LoadResult> {
        let total = (rate * secs).round() as u64;
        let (tx, mut rx) = mpsc::unbounded_channel::<(Result<Accepted, String>, f64)>();
        let endpoint = format!("{}/api/deliveryrequests", self.args.ingestion_url);
        let now = Utc::now();
        let mut max_lag = Duration::ZERO;
        let in_flight = Arc::new(Semaphore::new(self.args.max_in_flight));
        bench::open_loop(rate, total, |i, due, _| {
            max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
            let (auth, booking) = self.booking(i, run, now);
            let request = self
                .client
                .post(&endpoint)
                .header(AUTHORIZATION, auth.clone())
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(serde_json::to_vec(&booking)?);
            let (tx, in_flight) = (tx.clone(), in_flight.clone());
            tokio::spawn(async move {
                let outcome = match in_flight.acquire_owned().await {
                    Err(_) => Err("generator semaphore closed".to_owned()),
                    Ok(_permit) => send(request).await,
                };
                let ms = due.elapsed().as_secs_f64() * 1000.0;
                let _ = tx.send((outcome, ms));
            });
            Ok(())
        })
        .await?;
        drop(tx);
        let mut result = LoadResult {
            max_lag,
            ..LoadResult::default()
        };
        while let Some((outcome, ms)) = rx.recv().await {
            match outcome {
                Ok(a) => {
                    result.accepted.push(a);
                    result.http_ms.push(ms);
                }
                Err(kind) => *result.errors.entry(kind).or_default() += 1,
            }
        }
        Ok(result)
    }

    /// One run: load, drain, measure. Returns the report and the closing pg snapshot.
    async fn run(
        self: &Arc<Self>,
        rate: f64,
        secs: f64,
        before: &PgSnapshot,
        idle: &BTreeMap<String, f64>,
    ) -> Result<(Report, PgSnapshot)> {
        println!();
        println!("=== {rate:.0} bookings/s for {secs} s ===");
        let run = format!("e2e{:08x}", Uuid::new_v4().as_fields().0);
        let m0 = self.metrics().await?;
        let cpu0 = self.cpu_snapshot().await?;
        let t0_wall = Utc::now();
        let t0 = Instant::now();

        // Progress while the load runs and while the sagas drain.
        let progress = {
            let this = self.clone();
            let m0 = m0.clone();
            tokio::spawn(async move {
                let mut last = 0.0;
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if let Ok(m) = this.metrics().await {
                        let done = m.finished() - m0.finished();
                        println!(
                            "  t={:>5.1}s started {:>7.0} finished {:>7.0} ({:>5.0}/s) \
                             outbox backlog {:.0}",
                            t0.elapsed().as_secs_f64(),
                            m.get("saga_started_total", &[]) - m0.get("saga_started_total", &[]),
                            done,
                            (done - last) / 2.0,
                            m.get("saga_outbox_backlog", &[]),
                        );
                        last = done;
                    }
                }
            })
        };
        let load = self.load(rate, secs, &run).await?;
        let load_end = Instant::now();
        let cpu_load = self.cpu_snapshot().await?;
        let accepted = load.accepted.len() as f64;
        let mut drained = false;
        while load_end.elapsed() < self.args.drain_timeout {
            let m = self.metrics().await?;
            if m.finished() - m0.finished() >= accepted {
                drained = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The finished counter moves when a saga's last write is made, a moment before the
        // journal's group commit holds it: wait (within the same timeout) until the journal
        // agrees, so that a slow commit is not taken for a saga still running.
        while drained && load_end.elapsed() < self.args.drain_timeout {
            let row = self
                .scheduler_db
                .query_one(Statement::from_sql_and_values(
                    self.scheduler_db.get_database_backend(),
                    "SELECT count(*) AS n FROM saga_instances \
                     WHERE created_at >= $1 AND state = 'running'",
                    [(t0_wall - chrono::Duration::seconds(1)).into()],
                ))
                .await?;
            self.count_own_scheduler_query();
            let running: i64 = row.map_or(Ok(0), |r| r.try_get("", "n"))?;
            if running == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        progress.abort();
        let cpu_drain = self.cpu_snapshot().await?;
        let m1 = self.metrics().await?;
        if !drained {
            println!(
                "  not every accepted booking finished within {} s of the end of the load",
                self.args.drain_timeout.as_secs()
            );
        }

        // Timings from the journal: one query, counted against the scheduler database.
        let rows = self
            .scheduler_db
            .query_all(Statement::from_sql_and_values(
                self.scheduler_db.get_database_backend(),
                "SELECT id, state, created_at, updated_at FROM saga_instances \
                 WHERE created_at >= $1",
                [(t0_wall - chrono::Duration::seconds(1)).into()],
            ))
            .await?;
        self.count_own_scheduler_query();
        let mut sagas: HashMap<String, Saga> = HashMap::new();
        for r in rows {
            sagas.insert(
                r.try_get("", "id")?,
                Saga {
                    state: r.try_get("", "state")?,
                    created_at: r.try_get("", "created_at")?,
                    updated_at: r.try_get("", "updated_at")?,
                },
            );
        }

        tokio::time::sleep(self.args.flush_wait).await;
        let after = self.pg_snapshot().await?;
        let report = Report::build(
            self,
            Window {
                rate,
                secs,
                t0_wall,
                t0,
                load_end,
                drained,
            },
            load,
            &sagas,
            (&m0, &m1),
            (before, &after),
            idle,
            (&cpu0, &cpu_load, &cpu_drain),
        );
        Ok((report, after))
    }
}

async fn send(request: reqwest::RequestBuilder) -> Result<Accepted, String> {
    let res = request.send().await.map_err(|e| {
        if e.is_timeout() {
            "timeout".to_owned()
        } else {
            // The whole chain (reset, closed, ...): the URL is the same for every request, so
            // alike errors still count together.
            error_chain(&e)
        }
    })?;
    let status = res.status();
    let body = res
        .bytes()
        .await
        .map_err(|_| "reading the body".to_owned())?;
    let at = Utc::now();
    if status != StatusCode::ACCEPTED {
        return Err(status.as_u16().to_string());
    }
    serde_json::from_slice::<DeliveryAccepted>(&body)
        .map(|a| Accepted {
            id: a.delivery_id,
            at,
        })
        .map_err(|_| "bad 202 body".to_owned())
}

/// FNV-1a of `s`: each run books other addresses, sizes and pickup times.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A saga row of the journal.
struct Saga {
    state: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// The Scheduler's `/metrics`, by name and sorted labels.
#[derive(Clone, Default)]
struct Metrics(HashMap<String, f64>);

impl Metrics {
    fn key(name: &str, labels: &[(&str, &str)]) -> String {
        let mut labels: Vec<(&str, &str)> = labels.to_vec();
        labels.sort_unstable();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{name}{{{}}}", labels.join(","))
    }

    fn parse(text: &str) -> Self {
        let mut out = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels: Vec<(&str, &str)> = labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            out.insert(Self::key(name, &labels), value);
        }
        Self(out)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0.get(&Self::key(name, labels)).copied().unwrap_or(0.0)
    }

    fn finished(&self) -> f64 {
        ["scheduled", "failed", "cancelled"]
            .iter()
            .map(|s| self.get("saga_finished_total", &[("state", s)]))
            .sum()
    }
}

/// When a run's load ran.
struct Window {
    rate: f64,
    secs: f64,
    t0_wall: DateTime<Utc>,
    t0: Instant,
    load_end: Instant,
    drained: bool,
}

struct Report {
    label: String,
    offered: u64,
    accepted: usize,
    errors: BTreeMap<String, u64>,
    http: Percentiles,
    max_lag: Duration,
    scheduled: usize,
    failed: usize,
    /// Accepted bookings whose saga was still running at the end, or had not started.
    unfinished: usize,
    missing: usize,
    /// The Scheduler finished as many sagas as there were `202`s before the drain timeout.
    drained: bool,
    overall_rate: f64,
    peak_rate: f64,
    load_phase_rate: f64,
    drain_secs: f64,
    total: Percentiles,
    /// `total` of the bookings accepted in the first [`WARM_UP`] of the load, and of the rest:
    /// the stack's answer to the step from idle to the offered rate, and its steady state.
    total_first: Percentiles,
    total_after: Percentiles,
    to_start: Percentiles,
    saga: Percentiles,
    steps: Vec<(String, f64, f64)>,
    /// Transient step failures that were retried, by step.
    retries: Vec<(String, f64)>,
    commits: Vec<(String, f64, f64, f64)>,
    commits_total: f64,
    wal_syncs_per_saga: f64,
    wal_bytes_per_saga: f64,
    cpu_load: CpuUse,
    cpu_drain: CpuUse,
    /// From the first booking until the last saga finished.
    cpu_run: CpuUse,
    run_secs: f64,
    load_secs: f64,
    drain_window_secs: f64,
}

#[derive(Default)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }

    fn text(&self) -> String {
        format!(
            "p50 {:.0} / p90 {:.0} / p99 {:.0} / max {:.0} ms",
            self.p50, self.p90, self.p99, self.max
        )
    }
}

fn ms(d: chrono::Duration) -> f64 {
    d.num_microseconds()
        .map_or(f64::MAX, |us| us as f64 / 1000.0)
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn build(
        bench: &Bench,
        w: Window,
        load: LoadResult,
        sagas: &HashMap<String, Saga>,
        (m0, m1): (&Metrics, &Metrics),
        (pg0, pg1): (&PgSnapshot, &PgSnapshot),
        idle: &BTreeMap<String, f64>,
        (cpu0, cpu_load, cpu_drain): (&CpuSnapshot, &CpuSnapshot, &CpuSnapshot),
    ) -> Report {
        let mut total = Vec::new();
        let (mut total_first, mut total_after) = (Vec::new(), Vec::new());
        let warm_up_end = w.t0_wall + chrono::Duration::from_std(WARM_UP).unwrap_or_default();
        let mut to_start = Vec::new();
        let mut saga_ms = Vec::new();
        let (mut scheduled, mut failed, mut unfinished, mut missing) = (0, 0, 0, 0);
        let mut done_at: Vec<DateTime<Utc>> = Vec::new();
        for a in &load.accepted {
            match sagas.get(&a.id.to_string()) {
                Some(s) if s.state == "completed" => {
                    scheduled += 1;
                    total.push(ms(s.updated_at - a.at));
                    if a.at < warm_up_end {
                        total_first.push(ms(s.updated_at - a.at));
                    } else {
                        total_after.push(ms(s.updated_at - a.at));
                    }
                    to_start.push(ms(s.created_at - a.at));
                    saga_ms.push(ms(s.updated_at - s.created_at));
                    done_at.push(s.updated_at);
                }
                Some(s) if s.state == "running" => unfinished += 1,
                Some(_) => failed += 1,
                None => missing += 1,
            }
        }
        done_at.sort_unstable();
        let overall_rate = done_at.last().map_or(0.0, |last| {
            scheduled as f64 / (ms(*last - w.t0_wall) / 1000.0).max(0.001)
        });
        let load_end_wall =
            w.t0_wall + chrono::Duration::milliseconds((w.load_end - w.t0).as_millis() as i64);
        let load_phase_rate =
            done_at.iter().filter(|t| **t <= load_end_wall).count() as f64 / w.secs;
        // Busiest 5 s: a sliding window over the completion times.
        let mut peak = 0usize;
        let mut lo = 0usize;
        for hi in 0..done_at.len() {
            while done_at[hi] - done_at[lo] > chrono::Duration::seconds(5) {
                lo += 1;
            }
            peak = peak.max(hi - lo + 1);
        }
        let drain_secs = done_at
            .last()
            .map_or(0.0, |last| ms(*last - load_end_wall) / 1000.0);

        let steps = contracts::BookingStep::ALL
            .map(contracts::BookingStep::as_str)
            .iter()
            .map(|step| {
                let labels = [("step", *step), ("outcome", "succeeded")];
                let sum = m1.get("saga_step_duration_seconds_sum", &labels)
                    - m0.get("saga_step_duration_seconds_sum", &labels);
                let count = m1.get("saga_step_duration_seconds_count", &labels)
                    - m0.get("saga_step_duration_seconds_count", &labels);
                ((*step).to_owned(), sum * 1000.0 / count.max(1.0), count)
            })
            .collect();
        let retries: Vec<(String, f64)> = contracts::BookingStep::ALL
            .map(contracts::BookingStep::as_str)
            .iter()
            .map(|s| {
                let n = m1.get("saga_step_retries_total", &[("step", s)])
                    - m0.get("saga_step_retries_total", &[("step", s)]);
                ((*s).to_owned(), n)
            })
            .filter(|(_, n)| *n > 0.0)
            .collect();

        // Commits: the closing snapshot minus the opening one, minus the idle rate over the
        // interval and this program's own queries.
        let secs = (pg1.at - pg0.at).as_secs_f64();
        let n = scheduled.max(1) as f64;
        let mut commits = Vec::new();
        let mut commits_total = 0.0;
        for (service, db) in &bench.args.databases {
            let a = pg0.dbs.get(db).copied().unwrap_or_default();
            let b = pg1.dbs.get(db).copied().unwrap_or_default();
            let own = bench
                .own_queries
                .get(db)
                .map_or(0, |q| q.swap(0, Ordering::Relaxed)) as f64;
            let raw = (b.commits - a.commits) as f64;
            let net = (raw - idle.get(db).copied().unwrap_or(0.0) * secs - own).max(0.0);
            commits_total += net;
            commits.push((
                service.clone(),
                net / n,
                raw / n,
                (b.rows_written - a.rows_written) as f64 / n,
            ));
        }
        Report {
            label: format!("{:.0}/s × {} s", w.rate, w.secs),
            offered: (w.rate * w.secs).round() as u64,
            accepted: load.accepted.len(),
            errors: load.errors,
            http: Percentiles::of(load.http_ms),
            max_lag: load.max_lag,
            scheduled,
            failed,
            unfinished,
            missing,
            drained: w.drained,
            overall_rate,
            peak_rate: peak as f64 / 5.0,
            load_phase_rate,
            drain_secs,
            total: Percentiles::of(total),
            total_first: Percentiles::of(total_first),
            total_after: Percentiles::of(total_after),
            to_start: Percentiles::of(to_start),
            saga: Percentiles::of(saga_ms),
            steps,
            retries,
            commits,
            commits_total: commits_total / n,
            wal_syncs_per_saga: (pg1.wal_syncs - pg0.wal_syncs) as f64 / n,
            wal_bytes_per_saga: (pg1.wal_bytes - pg0.wal_bytes) as f64 / n,
            cpu_load: cpu_load.since(cpu0),
            cpu_drain: cpu_drain.since(cpu_load),
            cpu_run: cpu_drain.since(cpu0),
            run_secs: (cpu_drain.at - cpu0.at).as_secs_f64(),
            load_secs: (cpu_load.at - cpu0.at).as_secs_f64(),
            drain_window_secs: (cpu_drain.at - cpu_load.at).as_secs_f64(),
        }
    }

    fn print(&self, _bench: &Bench) {
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            format!("{:?}", self.errors)
        };
        println!(
            "offered {} | accepted {} | errors {errors} | 202 latency {} | generator max lag {} ms",
            self.offered,
            self.accepted,
            self.http.text(),
            self.max_lag.as_millis()
        );
        println!(
            "scheduled {} | failed {} | still running {} | not started {} ({}) | retried step \
             attempts: {}",
            self.scheduled,
            self.failed,
            self.unfinished,
            self.missing,
            if self.drained {
                "the scheduler finished as many sagas as there were 202s"
            } else {
                "DRAIN TIMEOUT: the run was cut short"
            },
            if self.retries.is_empty() {
                "none".to_owned()
            } else {
                self.retries
                    .iter()
                    .map(|(s, n)| format!("{s} {n:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        println!(
            "scheduled/s: overall {:.0} (scheduled ÷ first booking → last saga) | during the load \
             {:.0} | peak 5 s {:.0} | last saga {:.1} s after the last booking",
            self.overall_rate, self.load_phase_rate, self.peak_rate, self.drain_secs
        );
        println!("booking → scheduled: {}", self.total.text());
        println!(
            "  booked in the first {} s of the load: {} | after: {}",
            WARM_UP.as_secs(),
            self.total_first.text(),
            self.total_after.text()
        );
        println!("  booking → saga started: {}", self.to_start.text());
        println!("  saga started → completed: {}", self.saga.text());
        println!(
            "  mean step time: {}",
            self.steps
                .iter()
                .map(|(s, ms, _)| format!("{s} {ms:.1} ms"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "commits per saga (net of idle and of this program; raw; rows written): total {:.2}",
            self.commits_total
        );
        for (service, net, raw, rows) in &self.commits {
            println!("  {service:<10} {net:>6.2}   raw {raw:>6.2}   rows {rows:>6.2}");
        }
        println!(
            "WAL (whole server): {:.2} syncs and {:.0} bytes per saga",
            self.wal_syncs_per_saga, self.wal_bytes_per_saga
        );
        println!(
            "CPU during the load ({:.1} s, cores): {}",
            self.load_secs,
            self.cpu_load.text()
        );
        println!(
            "CPU while draining ({:.1} s, cores): {}",
            self.drain_window_secs,
            self.cpu_drain.text()
        );
        let (suite, per_saga) = self.cpu_per_saga();
        println!(
            "CPU ms per scheduled saga (whole run, {:.1} s): suite total {suite:.2} ms, so {} cores \
             could schedule at most ≈ {:.0} sagas/s at this cost | {}",
            self.run_secs,
            cores(),
            cores() as f64 * 1000.0 / suite.max(0.001),
            per_saga
                .iter()
                .filter(|(_, ms)| *ms >= 0.01)
                .map(|(g, ms)| format!("{g} {ms:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    /// CPU milliseconds per scheduled saga of the suite as a whole and of each of its groups.
    fn cpu_per_saga(&self) -> (f64, Vec<(String, f64)>) {
        let n = self.scheduled.max(1) as f64;
        let per_saga: Vec<(String, f64)> = self
            .cpu_run
            .groups
            .iter()
            .filter(|(g, _)| !g.starts_with("other") && g != "unaccounted")
            .map(|(g, c)| (g.clone(), c * self.run_secs * 1000.0 / n))
            .collect();
        (per_saga.iter().map(|(_, ms)| ms).sum(), per_saga)
    }

    fn table_line(&self) -> String {
        format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} \
             | {} | {:.2} |",
            self.label,
            self.accepted,
            self.scheduled,
            self.overall_rate,
            self.peak_rate,
            self.total.p50,
            self.total.p90,
            self.total.p99,
            self.total.max,
            self.commits_total,
            self.wal_syncs_per_saga,
            self.cpu_per_saga().0,
            self.cpu_load.top(4),
            self.cpu_load.others(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_of_bench_e2e_sh_parse() -> Result<()> {
        Args::command().debug_assert();
        let parse = |line: &str| Args::try_parse_from(line.split_whitespace())?.checked();
        // scripts/bench-e2e.sh, then BENCH_E2E_ARGS: a flag given again overrides.
        let args = parse(
            "bench-e2e --runs 200:20 --ingestion-url http://127.0.0.1:18090/ \
             --account-url http://127.0.0.1:18091 --scheduler-url http://127.0.0.1:18095 \
             --scheduler-db postgres://h/bench_scheduler_ab --stats-db postgres://h/postgres \
             --databases account=bench_account_ab,scheduler=bench_scheduler_ab, \
             --pids account=12,scheduler=34 --accounts 5000 --drain-timeout 2.5 --runs 100:5",
        )?;
        assert_eq!(args.runs, [(100.0, 5.0)]);
        assert_eq!(args.ingestion_url, "http://127.0.0.1:18090");
        let scheduler = ("scheduler".into(), "bench_scheduler_ab".into());
        assert_eq!((args.databases.len(), &args.databases[1]), (2, &scheduler));
        let pids = [("account".to_owned(), 12), ("scheduler".to_owned(), 34)];
        assert_eq!(args.pids, pids);
        assert_eq!(args.drain_timeout, Duration::from_millis(2500));
        let runs = Args::try_parse_from(["bench-e2e", "--runs", "200:20 1000:2.5"])?.runs;
        assert_eq!(runs, [(200.0, 20.0), (1000.0, 2.5)]);
        let cleanup =
            parse("bench-e2e --cleanup --prefix p --amqp-url amqp://h/%2f --partitions 8")?;
        assert!(cleanup.cleanup);
        Ok(())
    }
}
