//! Sends due deliveries: claims them (a lease in the database, so replicas never send the same
//! attempt at once), POSTs the signed body with bounded concurrency, and records the outcome
//! with the next attempt's time (exponential back-off with jitter) in the same row, so a
//! restart continues the schedule. Nothing here is on the booking path.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use contracts::{WEBHOOK_ID_HEADER, WEBHOOK_SIGNATURE_HEADER, WEBHOOK_TIMESTAMP_HEADER};
use service_kit::StopSignal;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use super::guard::{GuardedResolver, UrlPolicy};
use super::store::{millis, Claimed, Finish, Store, ENDPOINT_REMOVED};
use super::{sign, Metrics, WebhookSettings};

const USER_AGENT: &str = concat!("drone-delivery-webhooks/", env!("CARGO_PKG_VERSION"));
/// How often the pending gauge is refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(5);
/// Longest error text kept per attempt.
const MAX_ERROR: usize = 500;

pub(crate) struct Dispatcher {
    store: Arc<Store>,
    client: reqwest::Client,
    settings: WebhookSettings,
    policy: UrlPolicy,
    metrics: Metrics,
    wake: Arc<Notify>,
}

impl Dispatcher {
    pub(crate) fn new(
        store: Arc<Store>,
        settings: WebhookSettings,
        policy: UrlPolicy,
        metrics: Metrics,
        wake: Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(settings.timeout())
            .connect_timeout(settings.timeout())
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would connect wherever it likes: the address checks would mean nothing.
            .no_proxy()
            .dns_resolver(GuardedResolver {
                allow_private: policy.allow_private,
            })
            .build()?;
        Ok(Self {
            store,
            client,
            settings,
            policy,
            metrics,
            wake,
        })
    }

    /// Claims and sends due deliveries until `stop`; then lets the sends under way finish (those
    /// cut off are sent again once their lease runs out).
    pub(crate) async fn run(self: Arc<Self>, mut stop: StopSignal) {
        let permits = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let mut sends = JoinSet::new();
        let mut gauge_at: Option<tokio::time::Instant> = None;
        loop {
            while sends.try_join_next().is_some() {}
            let free = permits.available_permits();
            if free > 0 {
                self.claim_due(free, &permits, &mut sends).await;
            }
            if gauge_at.is_none_or(|t| t.elapsed() >= GAUGE_EVERY) {
                gauge_at = Some(tokio::time::Instant::now());
                match self.store.pending().await {
                    Ok(n) => self
                        .metrics
                        .pending
                        .set(i64::try_from(n).unwrap_or(i64::MAX)),
                    Err(e) => {
                        tracing::warn!(error = %e, "counting pending webhook deliveries failed")
                    }
                }
            }
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                _ = sends.join_next(), if !sends.is_empty() => {}
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.settings.poll_interval()) => {}
            }
        }
        while sends.join_next().await.is_some() {}
    }

    async fn claim_due(
        self: &Arc<Self>,
        free: usize,
        permits: &Arc<Semaphore>,
        sends: &mut JoinSet<()>,
    ) {
        let now = millis(service_kit::now());
        let ids = match self.store.due(now, free).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "finding due webhook deliveries failed");
                return;
            }
        };
        for id in ids {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            let token = Uuid::new_v4();
            let lease_until = now + millis_of(self.settings.lease());
            match self.store.claim(&id, token, now, lease_until).await {
                Ok(Some(claimed)) => {
                    let this = self.clone();
                    sends.spawn(async move {
                        this.attempt(claimed, token).await;
                        drop(permit);
                    });
                }
                // Another replica won it, or it is no longer due.
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, id, "claiming a webhook delivery failed"),
            }
        }
    }

    #[tracing::instrument(skip_all, fields(webhook_delivery = %claimed.row.id, delivery_id = %claimed.row.delivery_id))]
    async fn attempt(&self, claimed: Claimed, token: Uuid) {
        let row = &claimed.row;
        let outcome = match &claimed.secret {
            None => Finish::Failed {
                status_code: None,
                error: ENDPOINT_REMOVED.into(),
            },
            Some(secret) => {
                self.send(
                    &row.url,
                    &row.event_id,
                    &row.payload,
                    secret,
                    row.attempts,
                    row.give_up_ms,
                )
                .await
            }
        };
        let label = match &outcome {
            Finish::Delivered { .. } => "delivered",
            Finish::Retry { .. } => "retry",
            Finish::Failed { .. } => "failed",
        };
        self.metrics.attempts.with_label_values(&[label]).inc();
        match &outcome {
            Finish::Delivered { status_code } => {
                tracing::debug!(status = status_code, "webhook delivered")
            }
            Finish::Retry {
                error,
                next_attempt_ms,
                ..
            } => {
                tracing::info!(error, next_attempt_ms, "webhook attempt failed; will retry")
            }
            Finish::Failed { error, .. } => {
                tracing::warn!(error, url = row.url, "webhook delivery given up")
            }
        }
        // The outcome must be recorded: otherwise the lease runs out and it is sent again
        // (at least once), which is worse for the receiver than a short wait here.
        let mut wait = Duration::from_millis(100);
        loop {
            match self
                .store
                .finish(&row.id, token, &outcome, millis(service_kit::now()))
                .await
            {
                Ok(true) => break,
                Ok(false) => {
                    tracing::warn!("webhook lease ran out before the outcome was recorded");
                    break;
                }
                Err(e) if wait < self.settings.lease() => {
                    tracing::warn!(error = %e, "recording a webhook outcome failed, retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(e) => {
                    tracing::error!(error = %e, "recording a webhook outcome failed; it will be sent again");
                    break;
                }
            }
        }
        self.wake.notify_one();
    }

    /// One POST; what it means for the delivery.
    async fn send(
        &self,
        url: &str,
        event_id: &str,
        payload: &str,
        secret: &str,
        attempts_before: i32,
        give_up_ms: i64,
    ) -> Finish {
        let url = match self.policy.parse(url) {
            Ok(u) => u,
            Err(why) => return given_up(None, format!("endpoint refused: {why}")),
        };
        if let Some(why) = self.policy.literal_refused(&url) {
            return given_up(None, format!("endpoint refused: host {why}"));
        }
        let timestamp = chrono::Utc::now().timestamp();
        let signature = match sign(secret, timestamp, payload.as_bytes()) {
            Ok(s) => s,
            Err(e) => return given_up(None, format!("cannot sign with the account's secret: {e}")),
        };
        let sent = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(WEBHOOK_ID_HEADER, event_id)
            .header(WEBHOOK_TIMESTAMP_HEADER, timestamp.to_string())
            .header(WEBHOOK_SIGNATURE_HEADER, format!("v1={signature}"))
            .body(payload.to_owned())
            .send()
            .await;
        let (code, error) = match sent {
            Ok(res) if res.status().is_success() => {
                return Finish::Delivered {
                    status_code: res.status().as_u16(),
                }
            }
            Ok(res) => {
                let code = res.status().as_u16();
                (Some(code), format!("answered {}", res.status()))
            }
            Err(e) if e.is_timeout() => (
                None,
                format!("no answer within {} ms", self.settings.timeout_ms),
            ),
            Err(e) => (None, chain(&e)),
        };
        let now = millis(service_kit::now());
        if now >= give_up_ms {
            return given_up(code, error);
        }
        let attempt = usize::try_from(attempts_before.max(0)).unwrap_or(0);
        Finish::Retry {
            status_code: code,
            error,
            next_attempt_ms: now + millis_of(self.settings.delay_after(attempt)),
        }
    }
}

impl WebhookSettings {
    /// The wait after failed attempt number `attempt` (0 = the first): exponential from
    /// `min_delay_ms`, capped at `max_delay_ms`, plus a random jitter of up to the same again.
    pub(crate) fn delay_after(&self, attempt: usize) -> Duration {
        let min = Duration::from_millis(self.min_delay_ms.max(1));
        ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(Duration::from_millis(self.max_delay_ms).max(min))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempt)
            .unwrap_or(min)
    }
}

fn given_up(status_code: Option<u16>, error: String) -> Finish {
    Finish::Failed { status_code, error }
}

fn millis_of(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// An error with its causes, short enough to keep.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    if text.len() > MAX_ERROR {
        let mut end = MAX_ERROR;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_with_jitter_and_stop_growing_at_the_cap() {
        let s = WebhookSettings {
            min_delay_ms: 1_000,
            max_delay_ms: 60_000,
            ..WebhookSettings::default()
        };
        for attempt in 0..30 {
            let base = (1_000u64 << attempt.min(20)).min(60_000);
            let d = s.delay_after(attempt).as_millis() as u64;
            assert!(
                d >= base && d <= 2 * base,
                "attempt {attempt}: {d} ms for base {base}"
            );
        }
    }
}
