//! Signed webhooks for client accounts: an account registers up to five endpoint URLs and gets a
//! POST, signed with its own secret, for each change of its bookings (`booking.scheduled`,
//! `.rescheduled`, `.cancelled`, `.failed`, `.compensated`, `.delivered`).
//!
//! - [`follower`] follows `workflow-events` on its own checkpoints and records one delivery per
//!   (endpoint, event) — idempotent, so every replica may follow the whole log.
//! - [`dispatcher`] sends due deliveries under a lease in the database, at least once and in
//!   order per booking and endpoint, retrying with exponential back-off and jitter for
//!   `retry_for_secs`; the schedule is in the rows, so a restart continues it.
//! - [`guard`] keeps endpoints on public `https` addresses, at registration and at each send.
//!
//! Nothing on the booking path waits on any of it: a receiver that is down only grows the
//! backlog of its own deliveries.
//!
//! Signature: `Webhook-Signature: v1=<hex HMAC-SHA256(secret, "{Webhook-Timestamp}.{body}")>`.

mod dispatcher;
mod follower;
mod guard;
mod migration;
mod routes;
mod store;

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac as _};
use prometheus::{IntCounterVec, IntGauge, Opts};
use sea_orm::DatabaseConnection;
use serde::Deserialize;
use service_kit::{prometheus, ServiceBuilder};
use sha2::Sha256;
use tokio::sync::Notify;

pub(crate) use migration::CreateWebhooks;
pub(crate) use routes::{configure, openapi};

use guard::UrlPolicy;
use store::Store;

/// Webhook settings (`APP_INGESTION__WEBHOOKS__...`). The defaults are production's: `https`
/// only, public addresses only.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WebhookSettings {
    /// Follow `workflow-events` and send deliveries (the API is served either way).
    pub enabled: bool,
    /// Accept and send to `http` URLs (local development and tests only).
    pub allow_http: bool,
    /// Accept and send to hosts that are or resolve to loopback, private, link-local or other
    /// non-public addresses (local development and tests only).
    pub allow_private_addresses: bool,
    /// How long a delivery is retried before it is given up (at least a day in production).
    pub retry_for_secs: u64,
    /// The wait after the first failed attempt; it doubles with every further one.
    pub min_delay_ms: u64,
    /// The longest wait between attempts before jitter (jitter adds up to as much again).
    pub max_delay_ms: u64,
    /// How long one POST may take before it counts as failed.
    pub timeout_ms: u64,
    /// POSTs under way at once (per replica).
    pub concurrency: usize,
    /// How often the database is asked for due deliveries when nothing wakes the sender sooner.
    pub poll_interval_ms: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            allow_http: false,
            allow_private_addresses: false,
            retry_for_secs: 24 * 3600,
            min_delay_ms: 5_000,
            max_delay_ms: 3_600_000,
            timeout_ms: 10_000,
            concurrency: 32,
            poll_interval_ms: 1_000,
        }
    }
}

impl WebhookSettings {
    /// For a machine of one's own (`make run`): receivers on `http://127.0.0.1` are fine.
    pub fn local() -> Self {
        Self {
            allow_http: true,
            allow_private_addresses: true,
            ..Self::default()
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }

    pub(crate) fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(10))
    }

    /// How long a claimed attempt is held: its timeout and some margin to record the outcome.
    pub(crate) fn lease(&self) -> Duration {
        self.timeout() * 2 + Duration::from_secs(10)
    }

    pub(crate) fn retry_for_ms(&self) -> i64 {
        i64::try_from(self.retry_for_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    fn policy(&self) -> UrlPolicy {
        UrlPolicy {
            allow_http: self.allow_http,
            allow_private: self.allow_private_addresses,
        }
    }
}

/// Attempts by outcome and the backlog, on `/metrics`.
#[derive(Clone)]
pub(crate) struct Metrics {
    attempts: IntCounterVec,
    pending: IntGauge,
}

impl Metrics {
    fn new(registry: &prometheus::Registry) -> anyhow::Result<Self> {
        let attempts = IntCounterVec::new(
            Opts::new(
                "webhook_attempts_total",
                "Webhook POST attempts by outcome: delivered, retry (will be tried again), failed (given up)",
            ),
            &["outcome"],
        )?;
        let pending = IntGauge::new(
            "webhook_deliveries_pending",
            "Webhook deliveries not yet delivered or given up (all accounts)",
        )?;
        registry.register(Box::new(attempts.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        Ok(Self { attempts, pending })
    }
}

/// The webhook API's state; the sender runs as the service's background task, the follower as
/// the service starts it ([`Webhooks::follower`]).
pub(crate) struct Webhooks {
    store: Arc<Store>,
    settings: WebhookSettings,
    policy: UrlPolicy,
    wake: Arc<Notify>,
    follower: Option<Arc<follower::WebhookFollower>>,
}

impl Webhooks {
    /// Registers the metrics and, when enabled, starts sending; the follower of
    /// `workflow-events` that records what to send is the caller's to start.
    pub(crate) fn start(
        builder: &mut ServiceBuilder,
        db: DatabaseConnection,
        settings: &WebhookSettings,
    ) -> anyhow::Result<Arc<Self>> {
        if settings.concurrency == 0 || settings.retry_for_secs == 0 {
            anyhow::bail!("webhooks concurrency and retry_for_secs must be positive");
        }
        tracing::info!(
            enabled = settings.enabled,
            allow_http = settings.allow_http,
            allow_private_addresses = settings.allow_private_addresses,
            retry_for_secs = settings.retry_for_secs,
            min_delay_ms = settings.min_delay_ms,
            max_delay_ms = settings.max_delay_ms,
            timeout_ms = settings.timeout_ms,
            concurrency = settings.concurrency,
            "webhooks"
        );
        let store = Arc::new(Store::new(db));
        let metrics = Metrics::new(builder.registry())?;
        let wake = Arc::new(Notify::new());
        let policy = settings.policy();
        let follower = settings.enabled.then(|| {
            Arc::new(follower::WebhookFollower {
                store: store.clone(),
                wake: wake.clone(),
                retry_for_ms: settings.retry_for_ms(),
            })
        });
        if settings.enabled {
            let sender = Arc::new(dispatcher::Dispatcher::new(
                store.clone(),
                settings.clone(),
                policy,
                metrics,
                wake.clone(),
            )?);
            builder.spawn(sender.run(builder.stop_signal()));
        }
        Ok(Arc::new(Self {
            store,
            settings: settings.clone(),
            policy,
            wake,
            follower,
        }))
    }

    /// What records the client events of `workflow-events` as deliveries, when webhooks are
    /// enabled.
    pub(crate) fn follower(&self) -> Option<Arc<follower::WebhookFollower>> {
        self.follower.clone()
    }
}

/// The lowercase hex of `HMAC-SHA256(secret, "{timestamp}.{body}")`.
pub(crate) fn sign(
    secret: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, hmac::digest::InvalidLength> {
    let mut mac = <Hmac<Sha256>>::new_from_slice(secret.as_bytes())?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() -> Result<(), hmac::digest::InvalidLength> {
        // RFC 4231, test case 2.
        let mut mac = <Hmac<Sha256>>::new_from_slice(b"Jefe")?;
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let mut mac = <Hmac<Sha256>>::new_from_slice(b"whsec_x")?;
        mac.update(b"1700000000.{\"a\":1}");
        assert_eq!(
            sign("whsec_x", 1_700_000_000, b"{\"a\":1}")?,
            hex::encode(mac.finalize().into_bytes())
        );
        Ok(())
    }
}
