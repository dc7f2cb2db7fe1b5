//! What the benchmark binaries (`loadgen`, `bench-e2e`, `bench-messaging`) share: latency
//! histograms and their report figures, a progress bar fed from counters, CPU time from `/proc`,
//! the bookings they offer Ingestion with the client tokens that sign them, and the parsers of
//! their flag values; [`http1`], the lean client `loadgen` sends with.

pub mod http1;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use contracts::{ConfirmationType, DeliveryRequest, PackageInfo, PackageSize};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::header::HeaderValue;
use secrecy::SecretString;
use service_kit::auth::ClientTokens;

/// Latencies are recorded in microseconds, up to 10 minutes.
pub const MAX_LATENCY_US: u64 = 600_000_000;
/// `/proc` times are in USER_HZ, which Linux fixes at 100 for user space.
pub const TICKS_PER_SECOND: f64 = 100.0;
/// Pickup times start an hour after the run does.
const PICKUP_MIN_SECS: u64 = 3_600;

/// An empty latency histogram: microseconds up to [`MAX_LATENCY_US`], 3 significant digits.
pub fn latency_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("creating a latency histogram")
}

/// The latency at `quantile` in milliseconds.
pub fn ms(h: &Histogram<u64>, quantile: f64) -> f64 {
    h.value_at_quantile(quantile) as f64 / 1000.0
}

/// p50, p90, p99, p99.9 and max in milliseconds.
fn figures(h: &Histogram<u64>) -> [f64; 5] {
    let max = h.max() as f64 / 1000.0;
    [ms(h, 0.5), ms(h, 0.9), ms(h, 0.99), ms(h, 0.999), max]
}

/// `p50 …, p90 …, p99 …, p99.9 …, max …` in milliseconds, for a report line.
pub fn percentiles(h: &Histogram<u64>) -> String {
    let [p50, p90, p99, p999, max] = figures(h);
    format!("p50 {p50:.2}, p90 {p90:.2}, p99 {p99:.2}, p99.9 {p999:.2}, max {max:.2}")
}

/// The same five figures as the cells of a markdown table row: `p50 | p90 | p99 | p99.9 | max`.
pub fn percentile_cells(h: &Histogram<u64>) -> String {
    figures(h).map(|v| format!("{v:.2}")).join(" | ")
}

/// A progress bar fed from counters the workers bump (cheaper than touching the bar per request
/// or event); it disappears when dropped.
pub struct Progress {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// A bar of `len` steps drawn with `template` (indicatif's syntax); every `every`, `update`
    /// sets its position (and message) from the counters. Needs a tokio runtime.
    pub fn start(
        len: u64,
        template: &str,
        every: Duration,
        mut update: impl FnMut(&ProgressBar) + Send + 'static,
    ) -> Result<Self> {
        let bar = ProgressBar::new(len);
        bar.set_style(ProgressStyle::with_template(template).context("progress bar template")?);
        let ticker = tokio::spawn({
            let bar = bar.clone();
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    update(&bar);
                }
            }
        });
        Ok(Self { bar, ticker })
    }

    /// The bar, e.g. to set its message once.
    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// Open loop: `start(i, due, now)` starts request `i` of `total`, due at `start + i / rate`
/// whether or not earlier ones were answered. Everything due by `now` is started at once (a late
/// start is still timed from its due time), then it sleeps until the next is due. Returns when
/// the last one was started, with the moment the first was due.
pub async fn open_loop(
    rate: f64,
    total: u64,
    mut start: impl FnMut(u64, Instant, Instant) -> Result<()>,
) -> Result<Instant> {
    let first = Instant::now();
    let due = |i: u64| first + Duration::from_secs_f64(i as f64 / rate);
    let mut next = 0u64;
    while next < total {
        let now = Instant::now();
        let due_by_now = ((now - first).as_secs_f64() * rate).floor() as u64 + 1;
        while next < due_by_now.min(total) {
            start(next, due(next), now)?;
            next += 1;
        }
        if next < total {
            tokio::time::sleep_until(tokio::time::Instant::from_std(due(next))).await;
        }
    }
    Ok(first)
}

/// The cores this process may use (0 when unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// utime + stime of process `pid` from `/proc/<pid>/stat`, in ticks (Linux).
pub fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The whole machine's CPU time from the first line of `/proc/stat`, in ticks (Linux).
#[derive(Debug, Clone, Copy)]
pub struct MachineTicks {
    /// Everything but idle and iowait.
    pub busy: u64,
    /// user nice system idle iowait irq softirq steal (guest time is already in user).
    pub total: u64,
}

impl MachineTicks {
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0);
        let total = ticks.iter().take(8).sum::<u64>();
        Some(Self {
            busy: total.saturating_sub(idle),
            total,
        })
    }
}

/// Every process with its command name (`/proc/<pid>/comm`).
pub fn processes() -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((pid, comm.trim().to_owned()))
        })
        .collect()
}

/// `Bearer` headers for accounts `<prefix>-00000`, `<prefix>-00001`, ...
pub fn client_tokens(
    secret: &str,
    prefix: &str,
    accounts: usize,
) -> Result<Vec<(String, HeaderValue)>> {
    let tokens = ClientTokens::new(&SecretString::from(secret.to_owned()));
    (0..accounts)
        .map(|k| {
            let account = format!("{prefix}-{k:05}");
            let (token, _) = tokens
                .mint(&account, &[], chrono::Duration::hours(12))
                .context("minting a client token")?;
            let header = HeaderValue::from_str(&format!("Bearer {token}"))
                .context("client token as a header value")?;
            Ok((account, header))
        })
        .collect()
}

/// Booking `i` of run `run` for account `owner`. `mix`, a well-mixed 64-bit value of `i` (see
/// [`splitmix64`]), picks the addresses, size, weight and options, and a pickup time between one
/// hour and one hour plus `pickup_spread_secs` after `from`. The package id is `<run>-<i>` and
/// the tag `run`, so a reader of the log tells this run's bookings from earlier ones.
pub fn booking(
    owner: &str,
    run: &str,
    i: u64,
    mix: u64,
    from: DateTime<Utc>,
    pickup_spread_secs: u64,
) -> DeliveryRequest {
    let r = mix;
    DeliveryRequest {
        owner_id: owner.to_owned(),
        pickup_location: format!("{} Pike St, Seattle", 1 + (r >> 20) % 2000),
        drop_off_location: format!("{} Broad St, Seattle", 1 + (r >> 32) % 2000),
        pickup_time: from
            + chrono::Duration::seconds((PICKUP_MIN_SECS + r % pickup_spread_secs) as i64),
        deadline: "LinkedIn".into(),
        expedited: r & 1 == 1,
        confirmation_required: ConfirmationType::ALL[((r >> 8) % 4) as usize],
        package_info: PackageInfo {
            package_id: format!("{run}-{i}"),
            size: PackageSize::ALL[((r >> 12) % 3) as usize],
            weight: 0.5 + ((r >> 40) % 200) as f64 / 10.0,
            tag: Some(run.to_owned()),
        },
    }
}

/// A well-mixed 64-bit value of `i` (SplitMix64's finalizer): spreads pickup times, sizes and
/// addresses without a random-number dependency, and the same `i` always gives the same value.
pub fn splitmix64(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An error with its causes, `outer: inner: ...` (reqwest's own message hides them).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// An environment variable that is set and not empty.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Parsers of flag values, for `#[arg(value_parser = ...)]`.
pub mod flag {
    use std::fmt::Display;
    use std::str::FromStr;
    use std::time::Duration;

    type Error = Box<dyn std::error::Error + Send + Sync>;

    /// A base URL without its trailing slashes.
    pub fn url(value: &str) -> Result<String, Error> {
        Ok(value.trim_end_matches('/').to_owned())
    }

    /// Whole milliseconds.
    pub fn millis(value: &str) -> Result<Duration, Error> {
        Ok(Duration::from_millis(value.parse()?))
    }

    /// Seconds, fractions allowed.
    pub fn seconds(value: &str) -> Result<Duration, Error> {
        Ok(Duration::try_from_secs_f64(value.parse()?)?)
    }

    /// `NAME=VALUE`.
    pub fn name_value<T: FromStr<Err: Display>>(value: &str) -> Result<(String, T), String> {
        let (name, v) = value
            .split_once('=')
            .ok_or_else(|| format!("{value:?} is not NAME=VALUE"))?;
        let v = v.parse().map_err(|e| format!("{v:?}: {e}"))?;
        Ok((name.to_owned(), v))
    }

    /// `NAME=VALUE,NAME=VALUE,...` (empty entries skipped).
    pub fn name_values<T: FromStr<Err: Display>>(value: &str) -> Result<Vec<(String, T)>, String> {
        let pairs = value.split(',').filter(|p| !p.is_empty());
        pairs.map(name_value).collect()
    }

    /// `A,B,C`, each trimmed.
    pub fn list<T: FromStr<Err: Display>>(value: &str) -> Result<Vec<T>, String> {
        let parse = |s: &str| s.trim().parse().map_err(|e| format!("{s:?}: {e}"));
        value.split(',').map(parse).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_splitmix64_finalizer_is_the_reference_one() {
        // The first outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(0x9e37_79b9_7f4a_7c15), 0x6e78_9e6a_a1b9_65f4);
    }
}
