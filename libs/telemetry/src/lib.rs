//! Logging setup shared by every service: JSON lines through `tracing`, filtered by `RUST_LOG`.
//!
//! OpenTelemetry export is added here later (the observability issue); [`init`] returns a guard so
//! callers already hold the value that will flush spans on shutdown.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (production).
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

/// Flushes telemetry when dropped. Keep it alive for the life of the process.
#[must_use = "telemetry is flushed when the guard is dropped"]
pub struct TelemetryGuard {
    _private: (),
}

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is not set.
/// Calling it twice (tests spawning several apps) is harmless: the first subscriber stays.
pub fn init(service: &str, default_filter: &str, format: LogFormat) -> TelemetryGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(tracing_subscriber::fmt::layer().compact())
            .try_init(),
    };
    if result.is_ok() {
        tracing::info!(service, "telemetry initialised");
    }
    TelemetryGuard { _private: () }
}

/// For tests: logs go to the test writer only when `TEST_LOG` is set.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
            )
            .with_test_writer()
            .try_init();
    }
}
