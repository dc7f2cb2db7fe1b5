//! `make bench-messaging`: a load generator for the `messaging` library, on RabbitMQ and on the
//! embedded (SQLite) backend. For each log batch size it appends as fast as confirms allow from
//! many concurrent producers (confirm latency in an HDR histogram), then reads every partition
//! back from the start and checks that every confirmed event is there; then it measures a work
//! queue (confirmed publishes, consume + ack). It prints a markdown table for docs/BENCHMARKS.md.
//!
//! A benchmark, not a test: the figures depend on the machine and on what else runs on it, so
//! nothing here is asserted except that no confirmed event is lost.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use integration_tests::bench::{
    self, env_var, flag, latency_histogram, percentile_cells, percentiles, Progress,
};
use messaging::{
    Broker, Envelope, MessagingSettings, PartitionedLog, QueueOptions, StartAt, WorkQueue,
};
use uuid::Uuid;

const LOG_NAME: &str = "bench-log";
const QUEUE_NAME: &str = "bench-queue";
const QUEUE_PUBLISHERS: usize = 64;
const QUEUE_PREFETCH: u16 = 100;
/// A reader or consumer that sees nothing new for this long gives up (and reports what is missing).
const IDLE_LIMIT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    RabbitMq,
    Embedded,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::RabbitMq => "rabbitmq",
            Backend::Embedded => "embedded",
        }
    }

    fn default_events(self) -> u64 {
        match self {
            Backend::RabbitMq => 200_000,
            // 20,000 took a quarter of a second at larger batch sizes: too short to measure.
            Backend::Embedded => 100_000,
        }
    }

    /// Unbatched appends are one broker message (or transaction) each: fewer keep the run short.
    fn unbatched_cap(self) -> u64 {
        match self {
            Backend::RabbitMq => 50_000,
            Backend::Embedded => 5_000,
        }
    }

    fn queue_messages(self) -> u64 {
        match self {
            Backend::RabbitMq => 20_000,
            Backend::Embedded => 5_000,
        }
    }
}

/// Which backends `--backend` measures.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backends {
    /// RabbitMQ at --url
    Rabbitmq,
    /// The SQLite backend in --embedded-file
    Embedded,
    /// RabbitMQ, then the embedded backend
    Both,
}

/// The messaging library's backends under load (`make bench-messaging`): confirmed appends and
/// the read-back of a partitioned log at several batch sizes, then a work queue; a markdown table
/// for docs/BENCHMARKS.md.
#[derive(Parser)]
// A flag given twice keeps its last value, as it always did.
#[command(name = "bench-messaging", args_override_self = true)]
struct Args {
    /// Which backends to measure
    #[arg(long, value_enum, default_value = "both")]
    backend: Backends,
    /// RabbitMQ URL [default: $AMQP_URL, else amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(long, value_name = "AMQP_URL")]
    url: Option<String>,
    /// SQLite file for the embedded backend, removed afterwards
    #[arg(long, value_name = "PATH", default_value = "target/bench/messaging.db")]
    embedded_file: PathBuf,
    /// Events appended per batch size [default: 200000 on RabbitMQ, 100000 embedded; batch size
    /// 1 is capped at 50000 / 5000]
    #[arg(long, value_name = "N")]
    events: Option<u64>,
    /// Log partitions
    #[arg(long, value_name = "P", default_value_t = 8)]
    partitions: u32,
    /// Concurrent producer tasks
    #[arg(long, value_name = "C", default_value_t = 512)]
    concurrency: usize,
    /// Size of each event's JSON body
    #[arg(long, value_name = "B", default_value_t = 400)]
    payload_bytes: usize,
    /// Log batch sizes (batch_max_events) to measure
    // `::std::vec::Vec`: one value that holds the list, not a repeated flag.
    #[arg(long, value_name = "1,16,64,256", value_parser = flag::list::<usize>)]
    #[arg(default_value = "1,16,64,256")]
    batch_sizes: ::std::vec::Vec<usize>,
}

impl Args {
    /// The flags, their numbers checked.
    fn checked(self) -> Result<Self> {
        if self.partitions == 0 || self.concurrency == 0 || self.batch_sizes.contains(&0) {
            bail!("--partitions, --concurrency and --batch-sizes must be at least 1");
        }
        Ok(self)
    }

    fn backends(&self) -> Vec<Backend> {
        match self.backend {
            Backends::Rabbitmq => vec![Backend::RabbitMq],
            Backends::Embedded => vec![Backend::Embedded],
            Backends::Both => vec![Backend::RabbitMq, Backend::Embedded],
        }
    }

    fn url(&self) -> String {
        self.url
            .clone()
            .or_else(|| env_var("AMQP_URL"))
            .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    /// Events to append at `batch` on `backend`.
    fn events(&self, backend: Backend, batch: usize) -> u64 {
        let events = self.events.unwrap_or_else(|| backend.default_events());
        if batch == 1 {
            events.min(backend.unbatched_cap())
        } else {
            events
        }
    }
}

/// One log run: appends at one batch size, then the read-back.
struct LogResult {
    backend: Backend,
    batch: usize,
    confirmed: u64,
    failed: u64,
    appends_per_sec: f64,
    latency: Histogram<u64>,
    /// Events read back per broker message (distinct offsets): how full the batches were.
    events_per_message: f64,
    consumed_per_sec: f64,
    missing: u64,
}

/// One work-queue run.
struct QueueResult {
    backend: Backend,
    confirmed: u64,
    failed: u64,
    publishes_per_sec: f64,
    latency: Histogram<u64>,
    consumed_per_sec: f64,
    missing: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse().checked()?;
    let template = template_envelope(args.payload_bytes)?;
    let encoded = serde_json::to_vec(&template).context("encoding the sample envelope")?;
    println!(
        "bench-messaging: {} cores, partitions {}, concurrency {}, body {} B (envelope {} B)",
        bench::cores(),
        args.partitions,
        args.concurrency,
        template.body.to_string().len(),
        encoded.len(),
    );

    let mut logs = Vec::new();
    let mut queues = Vec::new();
    let mut problems = Vec::new();
    for backend in args.backends() {
        if let Err(e) = run_backend(backend, &args, &template, &mut logs, &mut queues).await {
            eprintln!("{}: {e:#}", backend.label());
            problems.push(format!("{}: {e:#}", backend.label()));
        }
    }

    print_tables(&logs, &queues);

    for r in &logs {
        if r.missing > 0 {
            problems.push(format!(
                "{} batch {}: {} confirmed events were not read back",
                r.backend.label(),
                r.batch,
                r.missing
            ));
        }
    }
    for r in &queues {
        if r.missing > 0 {
            problems.push(format!(
                "{} work queue: {} confirmed messages were not delivered",
                r.backend.label(),
                r.missing
            ));
        }
    }
    if !problems.is_empty() {
        eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        for p in &problems {
            eprintln!("!!! {p}");
        }
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
        bail!("{} problem(s), see above", problems.len());
    }
    Ok(())
}

/// All runs on one backend; each run connects with a fresh prefix, so its streams and queues are
/// new, and deletes them afterwards (also when interrupted with Ctrl-C).
async fn run_backend(
    backend: Backend,
    args: &Args,
    template: &Envelope,
    logs: &mut Vec<LogResult>,
    queues: &mut Vec<QueueResult>,
) -> Result<()> {
    let url = match backend {
        Backend::RabbitMq => args.url(),
        Backend::Embedded => {
            if let Some(dir) = args.embedded_file.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            remove_sqlite_files(&args.embedded_file)?;
            format!("sqlite://{}?mode=rwc", args.embedded_file.display())
        }
    };
    let outcome = run_backend_at(backend, args, template, &url, logs, queues).await;
    if backend == Backend::Embedded {
        remove_sqlite_files(&args.embedded_file)?;
    }
    outcome
}

async fn run_backend_at(
    backend: Backend,
    args: &Args,
    template: &Envelope,
    url: &str,
    logs: &mut Vec<LogResult>,
    queues: &mut Vec<QueueResult>,
) -> Result<()> {
    for &batch in &args.batch_sizes {
        let settings = MessagingSettings {
            prefix: fresh_prefix(),
            connection_name: "bench-messaging".into(),
            batch_max_events: batch,
            ..MessagingSettings::new(url)
        };
        let broker = messaging::connect(&settings)
            .await
            .with_context(|| format!("connecting to the {} backend", backend.label()))?;
        let events = args.events(backend, batch);
        let outcome = until_interrupted(bench_log(
            broker.as_ref(),
            backend,
            batch,
            events,
            args,
            template,
        ))
        .await;
        let cleanup = broker
            .delete_log(LOG_NAME, args.partitions)
            .await
            .context("deleting the benchmark log");
        let result = outcome?;
        cleanup?;
        logs.push(result);
    }

    let settings = MessagingSettings {
        prefix: fresh_prefix(),
        connection_name: "bench-messaging".into(),
        ..MessagingSettings::new(url)
    };
    let broker = messaging::connect(&settings)
        .await
        .with_context(|| format!("connecting to the {} backend", backend.label()))?;
    let outcome = until_interrupted(bench_queue(
        broker.as_ref(),
        backend,
        backend.queue_messages(),
        template,
    ))
    .await;
    let cleanup = broker
        .delete_queue(QUEUE_NAME)
        .await
        .context("deleting the benchmark queue");
    let result = outcome?;
    cleanup?;
    queues.push(result);
    Ok(())
}

/// Runs `work` unless Ctrl-C comes first, so the caller still cleans up.
async fn until_interrupted<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

async fn bench_log(
    broker: &dyn Broker,
    backend: Backend,
    batch: usize,
    events: u64,
    args: &Args,
    template: &Envelope,
) -> Result<LogResult> {
    let log = broker
        .log(LOG_NAME, args.partitions)
        .await
        .context("declaring the benchmark log")?;
    let title = format!("{} batch {batch}", backend.label());
    let ledger = Arc::new(Ledger::new(events));

    let produced = produce(
        Target::Log(log.clone()),
        args.concurrency,
        args.partitions,
        &ledger,
        template,
        &format!("{title}: append"),
    )
    .await?;
    let confirmed = produced.confirmed();
    let appends_per_sec = per_sec(confirmed, produced.elapsed);
    println!(
        "{title}: {confirmed} appends confirmed ({} failed) in {:.2}s = {:.0}/s; confirm latency ms: {}",
        produced.failed,
        produced.elapsed.as_secs_f64(),
        appends_per_sec,
        percentiles(&produced.latency),
    );
    if let Some(e) = &produced.first_error {
        eprintln!("{title}: first append error: {e}");
    }

    // Read-back: one reader per partition from the start, until every confirmed event is seen.
    let (progress, done) = progress_bar(confirmed, format!("{title}: consume"))?;
    let started = Instant::now();
    let readers: Vec<_> = (0..args.partitions)
        .zip(produced.per_partition.iter().copied())
        .map(|(partition, expected)| {
            let log = log.clone();
            let ledger = ledger.clone();
            let done = done.clone();
            tokio::spawn(read_partition(log, partition, expected, ledger, done))
        })
        .collect();
    let mut read = ReadBack::default();
    for reader in readers {
        let r = reader.await.context("reader task")??;
        read.records += r.records;
        read.messages += r.messages;
        read.found += r.found;
        read.unconfirmed += r.unconfirmed;
        read.duplicates += r.duplicates;
        read.poison += r.poison;
    }
    let elapsed = started.elapsed();
    drop(progress);
    let consumed_per_sec = per_sec(read.records, elapsed);
    let missing = confirmed.saturating_sub(read.found);
    println!(
        "{title}: read {} events in {} messages ({:.1} events/message) in {:.2}s = {:.0}/s; \
         {missing} missing, {} duplicates, {} stored but not confirmed, {} poison",
        read.records,
        read.messages,
        read.records as f64 / read.messages.max(1) as f64,
        elapsed.as_secs_f64(),
        consumed_per_sec,
        read.duplicates,
        read.unconfirmed,
        read.poison,
    );
    if missing > 0 {
        eprintln!("!!! {title}: {missing} CONFIRMED EVENTS WERE NOT READ BACK !!!");
    }

    Ok(LogResult {
        backend,
        batch,
        confirmed,
        failed: produced.failed,
        appends_per_sec,
        latency: produced.latency,
        events_per_message: read.records as f64 / read.messages.max(1) as f64,
        consumed_per_sec,
        missing,
    })
}

#[derive(Default)]
struct ReadBack {
    records: u64,
    /// Distinct offsets: the broker messages (batches) the records came in.
    messages: u64,
    /// Confirmed events seen for the first time.
    found: u64,
    unconfirmed: u64,
    duplicates: u64,
    poison: u64,
    ack_errors: u64,
}

/// Reads `partition` from the start until the `expected` confirmed events were seen (or nothing
/// new arrives for [`IDLE_LIMIT`]).
async fn read_partition(
    log: Arc<dyn PartitionedLog>,
    partition: u32,
    expected: u64,
    ledger: Arc<Ledger>,
    done: Arc<AtomicU64>,
) -> Result<ReadBack> {
    let mut read = ReadBack::default();
    if expected == 0 {
        return Ok(read);
    }
    let mut reader = log
        .read(partition, StartAt::First)
        .await
        .with_context(|| format!("opening a reader on partition {partition}"))?;
    let mut last_offset = None;
    while read.found < expected {
        let record = match tokio::time::timeout(IDLE_LIMIT, reader.next()).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                eprintln!("partition {partition}: the reader closed");
                break;
            }
            Err(_) => {
                eprintln!(
                    "partition {partition}: nothing new for {}s with {} events still expected",
                    IDLE_LIMIT.as_secs(),
                    expected - read.found
                );
                break;
            }
        };
        read.records += 1;
        if last_offset != Some(record.position.offset) {
            last_offset = Some(record.position.offset);
            read.messages += 1;
        }
        match record.event {
            Ok(event) => match ledger.check(event.id) {
                Seen::First => read.found += 1,
                Seen::Again => read.duplicates += 1,
                Seen::Unconfirmed => read.unconfirmed += 1,
            },
            Err(_) => read.poison += 1,
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(read)
}

async fn bench_queue(
    broker: &dyn Broker,
    backend: Backend,
    messages: u64,
    template: &Envelope,
) -> Result<QueueResult> {
    let queue = broker
        .queue(QUEUE_NAME, QueueOptions::default())
        .await
        .context("declaring the benchmark queue")?;
    let title = format!("{} work queue", backend.label());
    let ledger = Arc::new(Ledger::new(messages));

    let produced = produce(
        Target::Queue(queue.clone()),
        QUEUE_PUBLISHERS,
        1,
        &ledger,
        template,
        &format!("{title}: publish"),
    )
    .await?;
    let confirmed = produced.confirmed();
    let publishes_per_sec = per_sec(confirmed, produced.elapsed);
    println!(
        "{title}: {confirmed} publishes confirmed ({} failed) by {QUEUE_PUBLISHERS} publishers in \
         {:.2}s = {:.0}/s; confirm latency ms: {}",
        produced.failed,
        produced.elapsed.as_secs_f64(),
        publishes_per_sec,
        percentiles(&produced.latency),
    );
    if let Some(e) = &produced.first_error {
        eprintln!("{title}: first publish error: {e}");
    }

    let (progress, done) = progress_bar(confirmed, format!("{title}: consume"))?;
    let started = Instant::now();
    let consumed = consume_queue(queue.as_ref(), confirmed, &ledger, &done).await?;
    let elapsed = started.elapsed();
    drop(progress);
    let consumed_per_sec = per_sec(consumed.records, elapsed);
    let missing = confirmed.saturating_sub(consumed.found);
    println!(
        "{title}: consumed and acked {} messages (prefetch {QUEUE_PREFETCH}) in {:.2}s = {:.0}/s; \
         {missing} missing, {} redelivered, {} not confirmed, {} ack errors",
        consumed.records,
        elapsed.as_secs_f64(),
        consumed_per_sec,
        consumed.duplicates,
        consumed.unconfirmed,
        consumed.ack_errors,
    );
    if missing > 0 {
        eprintln!("!!! {title}: {missing} CONFIRMED MESSAGES WERE NOT DELIVERED !!!");
    }
    Ok(QueueResult {
        backend,
        confirmed,
        failed: produced.failed,
        publishes_per_sec,
        latency: produced.latency,
        consumed_per_sec,
        missing,
    })
}

/// Consumes until the `expected` confirmed messages arrived, acking concurrently (the prefetch
/// bounds how many are unanswered).
async fn consume_queue(
    queue: &dyn WorkQueue,
    expected: u64,
    ledger: &Ledger,
    done: &AtomicU64,
) -> Result<ReadBack> {
    let mut receiver = queue
        .consume(QUEUE_PREFETCH)
        .await
        .context("starting the queue consumer")?;
    let mut acks = FuturesUnordered::new();
    let mut read = ReadBack::default();
    let mut first_ack_error = None;
    while read.found < expected {
        tokio::select! {
            Some(acked) = acks.next(), if !acks.is_empty() => {
                if let Err::<(), messaging::MessagingError>(e) = acked {
                    first_ack_error.get_or_insert(e.to_string());
                    read.ack_errors += 1;
                }
            }
            message = tokio::time::timeout(IDLE_LIMIT, receiver.next()) => match message {
                Ok(Some(message)) => {
                    read.records += 1;
                    match ledger.check(message.event.id) {
                        Seen::First => read.found += 1,
                        Seen::Again => read.duplicates += 1,
                        Seen::Unconfirmed => read.unconfirmed += 1,
                    }
                    acks.push(message.ack());
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => {
                    eprintln!("the queue consumer closed");
                    break;
                }
                Err(_) => {
                    eprintln!(
                        "nothing delivered for {}s with {} messages still expected",
                        IDLE_LIMIT.as_secs(),
                        expected - read.found
                    );
                    break;
                }
            },
        }
    }
    while let Some(acked) = acks.next().await {
        if let Err(e) = acked {
            first_ack_error.get_or_insert(e.to_string());
            read.ack_errors += 1;
        }
    }
    if let Some(e) = first_ack_error {
        eprintln!("first ack error: {e}");
    }
    Ok(read)
}

/// Where producers send: a log (append) or a work queue (publish).
#[derive(Clone)]
enum Target {
    Log(Arc<dyn PartitionedLog>),
    Queue(Arc<dyn WorkQueue>),
}

impl Target {
    /// Sends and waits for the confirm; the partition it went to (0 for a queue).
    async fn send(&self, event: Envelope) -> messaging::Result<u32> {
        match self {
            Target::Log(log) => log.append(event).await.map(|a| a.partition),
            Target::Queue(queue) => queue.publish(event).await.map(|()| 0),
        }
    }
}

/// What the producers did.
struct Produced {
    elapsed: Duration,
    latency: Histogram<u64>,
    /// Confirmed events per partition.
    per_partition: Vec<u64>,
    failed: u64,
    first_error: Option<String>,
}

impl Produced {
    fn confirmed(&self) -> u64 {
        self.per_partition.iter().sum()
    }
}

/// What one producer task did. Latencies are kept as plain numbers and go into one histogram at
/// the end: a histogram per task (≈250 KiB each) thrashed the cache with hundreds of tasks.
struct Producer {
    latencies_us: Vec<u32>,
    per_partition: Vec<u64>,
    failed: u64,
    first_error: Option<String>,
}

/// `concurrency` tasks send events numbered from a shared counter until the ledger's count, each
/// waiting for its confirm before the next (so `concurrency` is the number in flight).
async fn produce(
    target: Target,
    concurrency: usize,
    partitions: u32,
    ledger: &Arc<Ledger>,
    template: &Envelope,
    title: &str,
) -> Result<Produced> {
    let (progress, done) = progress_bar(ledger.events, title.to_owned())?;
    let next = Arc::new(AtomicU64::new(0));
    let template = Arc::new(template.clone());
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let target = target.clone();
            let next = next.clone();
            let ledger = ledger.clone();
            let template = template.clone();
            let done = done.clone();
            let mut rng =
                SplitMix64(ledger.nonce ^ (task as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            tokio::spawn(async move {
                let mut me = Producer {
                    latencies_us: Vec::new(),
                    per_partition: vec![0; partitions as usize],
                    failed: 0,
                    first_error: None,
                };
                loop {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq >= ledger.events {
                        break;
                    }
                    let event = ledger.event(&template, seq, &mut rng);
                    let sent = Instant::now();
                    match target.send(event).await {
                        Ok(partition) => {
                            let us = sent.elapsed().as_micros();
                            me.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                            ledger.confirmed.set(seq);
                            if let Some(n) = me.per_partition.get_mut(partition as usize) {
                                *n += 1;
                            }
                        }
                        Err(e) => {
                            me.failed += 1;
                            me.first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                me
            })
        })
        .collect();
    let mut all = Produced {
        elapsed: Duration::ZERO,
        latency: latency_histogram()?,
        per_partition: vec![0; partitions as usize],
        failed: 0,
        first_error: None,
    };
    let mut finished = Vec::with_capacity(tasks.len());
    for task in tasks {
        finished.push(task.await.context("producer task")?);
    }
    all.elapsed = started.elapsed();
    drop(progress);
    for me in finished {
        for us in me.latencies_us {
            all.latency.saturating_record(u64::from(us));
        }
        for (sum, n) in all.per_partition.iter_mut().zip(me.per_partition) {
            *sum += n;
        }
        all.failed += me.failed;
        if all.first_error.is_none() {
            all.first_error = me.first_error;
        }
    }
    Ok(all)
}

/// The events of one run are numbered, and the number is in the event id next to a random
/// per-run nonce, so what was confirmed and what was read back are two bitmaps (sets of ids
/// would cost more CPU than the broker client on this path).
struct Ledger {
    nonce: u64,
    events: u64,
    confirmed: Bitmap,
    seen: Bitmap,
}

enum Seen {
    /// A confirmed event, the first time.
    First,
    /// A confirmed event already seen.
    Again,
    /// Not (yet) confirmed, or not from this run: stored although the append reported an error.
    Unconfirmed,
}

impl Ledger {
    fn new(events: u64) -> Self {
        Self {
            nonce: Uuid::new_v4().as_u64_pair().0,
            events,
            confirmed: Bitmap::new(events),
            seen: Bitmap::new(events),
        }
    }

    /// Event `seq`: the template with its id, a random key (so a random partition), and the time.
    fn event(&self, template: &Envelope, seq: u64, rng: &mut SplitMix64) -> Envelope {
        let mut event = template.clone();
        event.id = Uuid::from_u64_pair(self.nonce, seq);
        event.key = Uuid::from_u64_pair(rng.next(), rng.next()).to_string();
        event.time = chrono::Utc::now();
        event
    }

    fn check(&self, id: Uuid) -> Seen {
        let (nonce, seq) = id.as_u64_pair();
        if nonce != self.nonce || !self.confirmed.get(seq) {
            Seen::Unconfirmed
        } else if self.seen.set(seq) {
            Seen::Again
        } else {
            Seen::First
        }
    }
}

/// A fixed-size set of numbers, shared between tasks.
struct Bitmap(Vec<AtomicU64>);

impl Bitmap {
    fn new(bits: u64) -> Self {
        Self((0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn word(&self, bit: u64) -> Option<&AtomicU64> {
        self.0.get(usize::try_from(bit / 64).ok()?)
    }

    /// Sets `bit`; whether it was set already.
    fn set(&self, bit: u64) -> bool {
        let mask = 1 << (bit % 64);
        self.word(bit)
            .is_some_and(|w| w.fetch_or(mask, Ordering::Relaxed) & mask != 0)
    }

    fn get(&self, bit: u64) -> bool {
        let mask = 1 << (bit % 64);
        self.word(bit)
            .is_some_and(|w| w.load(Ordering::Relaxed) & mask != 0)
    }
}

/// A small fast PRNG for event keys (`Uuid::new_v4` asks the OS for randomness each time).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        // The finalizer of the state before the step is the value of the state after it.
        let z = bench::splitmix64(self.0);
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z
    }
}

/// A bar titled `message`, and the counter of done events the workers bump to move it.
fn progress_bar(len: u64, message: String) -> Result<(Progress, Arc<AtomicU64>)> {
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(
        len,
        "{msg:32} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec:>12} eta {eta}",
        Duration::from_millis(100),
        {
            let done = done.clone();
            move |bar| bar.set_position(done.load(Ordering::Relaxed))
        },
    )?;
    progress.bar().set_message(message);
    Ok((progress, done))
}

/// A delivery-request-like event whose JSON body is about `payload_bytes` long.
fn template_envelope(payload_bytes: usize) -> Result<Envelope> {
    let mut body = serde_json::json!({
        "deliveryId": Uuid::new_v4(),
        "ownerId": Uuid::new_v4(),
        "pickup": { "lat": 47.620_5, "lng": -122.349_3, "address": "400 Broad St, Seattle" },
        "dropoff": { "lat": 47.609_7, "lng": -122.333_1, "address": "1st Ave & Pike St, Seattle" },
        "packageIds": [Uuid::new_v4(), Uuid::new_v4()],
        "deadline": "2030-01-01T12:00:00Z",
        "note": "",
    });
    let pad = payload_bytes.saturating_sub(body.to_string().len());
    if let Some(note) = body.get_mut("note") {
        *note = serde_json::Value::String("x".repeat(pad));
    }
    Envelope::new("delivery.requested", 1, "template", &body).context("building the sample event")
}

fn fresh_prefix() -> String {
    format!("bench-{:08x}", Uuid::new_v4().as_fields().0)
}

fn per_sec(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn remove_sqlite_files(path: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", Path::new(&name).display()))
            }
        }
    }
    Ok(())
}

fn print_tables(logs: &[LogResult], queues: &[QueueResult]) {
    if !logs.is_empty() {
        println!("\n### Partitioned log: confirmed appends, then read-back from the start\n");
        println!(
            "| backend | batch size | events | appends/s | p50 ms | p90 ms | p99 ms | p99.9 ms | \
             max ms | events/message | consume events/s |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in logs {
            let failed = if r.failed > 0 {
                format!(" ({} failed)", r.failed)
            } else {
                String::new()
            };
            println!(
                "| {} | {} | {}{failed} | {:.0} | {} | {:.1} | {:.0} |",
                r.backend.label(),
                r.batch,
                r.confirmed,
                r.appends_per_sec,
                percentile_cells(&r.latency),
                r.events_per_message,
                r.consumed_per_sec,
            );
        }
    }
    if !queues.is_empty() {
        println!(
            "\n### Work queue: {QUEUE_PUBLISHERS} confirmed publishers, then consume + ack with \
             prefetch {QUEUE_PREFETCH}\n"
        );
        println!("| backend | messages | publishes/s | p50 ms | p99 ms | consume + ack msgs/s |");
        println!("|---|---:|---:|---:|---:|---:|");
        for r in queues {
            let failed = if r.failed > 0 {
                format!(" ({} failed)", r.failed)
            } else {
                String::new()
            };
            println!(
                "| {} | {}{failed} | {:.0} | {:.2} | {:.2} | {:.0} |",
                r.backend.label(),
                r.confirmed,
                r.publishes_per_sec,
                bench::ms(&r.latency, 0.5),
                bench::ms(&r.latency, 0.99),
                r.consumed_per_sec,
            );
        }
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_flags_of_make_bench_parse() -> Result<()> {
        Args::command().debug_assert();
        // scripts/bench.sh with BENCH_QUICK=1 (the Makefile passes the first three).
        let args = Args::try_parse_from(
            "bench-messaging --backend both --url amqp://h/%2f \
             --embedded-file target/bench/m.db --events 5000 --batch-sizes 1,64"
                .split_whitespace(),
        )?
        .checked()?;
        assert_eq!(args.backends(), [Backend::RabbitMq, Backend::Embedded]);
        assert_eq!(args.url(), "amqp://h/%2f");
        assert_eq!(args.batch_sizes, [1, 64]);
        assert_eq!(args.events(Backend::RabbitMq, 1), 5000);
        Ok(())
    }
}
