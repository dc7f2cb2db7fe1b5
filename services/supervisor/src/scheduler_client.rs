//! The Scheduler as the Supervisor calls it: report compensation outcomes, retry a saga on the
//! instance that owns its partition, read a saga's status, the partition leases, the sagas that
//! wait, and the circuit breakers of every replica (with the Supervisor's own, for the
//! dashboard's "Downstream services" line). (Lag is not asked of the Scheduler: a stalled one
//! would report none; see `stall`.)

use std::time::Duration;

use contracts::{
    BreakerStatus, CompensationReport, Outcome, PartitionLease, RetryRequest, WaitingSagas,
    Workflow, WorkflowSummary,
};
use downstream::Downstream;
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Where the Scheduler is (`APP_SCHEDULER__URL`, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerLink {
    /// Any instance (the Kubernetes Service): status, reports.
    pub url: String,
    /// One instance by ordinal, for retries, e.g. `http://scheduler-{ordinal}.scheduler:8085`.
    /// Unset: `url` is used (one replica).
    pub instance_url_template: Option<String>,
    /// Replicas of the Scheduler StatefulSet (partition `p` belongs to ordinal `p % replicas`).
    pub replicas: u32,
    pub timeout_ms: u64,
}

impl Default for SchedulerLink {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8085".into(),
            instance_url_template: None,
            replicas: 1,
            timeout_ms: 5000,
        }
    }
}

/// Why a Scheduler call did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchedulerError {
    #[error("no saga {0}")]
    NotFound(String),
    /// The saga's state forbids the change (the problem's detail says why).
    #[error("{0}")]
    Conflict(String),
    /// Another instance owns the saga's partition.
    #[error("{0}")]
    Misdirected(String),
    /// Unreachable, too slow or failing: try again later.
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

impl SchedulerError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

/// The longest the dashboard waits for one Scheduler replica's breakers: a hung replica must not
/// hold the overview up for the whole client timeout.
const BREAKERS_TIMEOUT: Duration = Duration::from_millis(1500);

/// The circuit breakers of one caller of the domain services, as the dashboard shows them.
#[derive(Debug, Clone)]
pub struct BreakerReport {
    /// `scheduler-<ordinal>`, `scheduler` (one URL for every replica) or `supervisor`.
    pub source: String,
    /// Why they are not known, when they are not.
    pub breakers: Result<Vec<BreakerStatus>, String>,
}

#[derive(Clone)]
pub struct SchedulerClient {
    http: reqwest::Client,
    link: SchedulerLink,
    token: SecretString,
}

impl SchedulerClient {
    pub fn new(link: &SchedulerLink, token: SecretString) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(link.timeout_ms))
            .build()?;
        Ok(Self {
            http,
            link: link.clone(),
            token,
        })
    }

    fn base_for_partition(&self, partition: i32) -> String {
        match &self.link.instance_url_template {
            Some(t) => {
                let ordinal = u32::try_from(partition).unwrap_or(0) % self.link.replicas.max(1);
                t.replace("{ordinal}", &ordinal.to_string())
            }
            None => self.link.url.clone(),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, SchedulerError> {
        self.call_within(base, method, path, body, None).await
    }

    /// [`call`](Self::call) with a shorter limit than the link's `timeout_ms`.
    async fn call_within<T: DeserializeOwned>(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Option<Duration>,
    ) -> Result<T, SchedulerError> {
        let url = format!("{}{path}", base.trim_end_matches('/'));
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(self.token.expose_secret());
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(t) = timeout {
            req = req.timeout(t.min(Duration::from_millis(self.link.timeout_ms)));
        }
        let res = req
            .send()
            .await
            .map_err(|e| SchedulerError::Transient(format!("scheduler {method} {path}: {e}")))?;
        let status = res.status();
        if status.is_success() {
            return res.json::<T>().await.map_err(|e| {
                SchedulerError::Permanent(format!("scheduler answer to {path}: {e}"))
            });
        }
        let detail = res
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_owned))
            .unwrap_or_else(|| status.to_string());
        Err(match status {
            StatusCode::NOT_FOUND => SchedulerError::NotFound(detail),
            StatusCode::CONFLICT => SchedulerError::Conflict(detail),
            StatusCode::MISDIRECTED_REQUEST => SchedulerError::Misdirected(detail),
            s if s.is_server_error()
                || s == StatusCode::REQUEST_TIMEOUT
                || s == StatusCode::TOO_MANY_REQUESTS =>
            {
                SchedulerError::Transient(format!("scheduler {method} {path}: {status}: {detail}"))
            }
            _ => {
                SchedulerError::Permanent(format!("scheduler {method} {path}: {status}: {detail}"))
            }
        })
    }

    /// Records a compensation outcome on the saga, on the replica that owns its partition.
    pub async fn report(
        &self,
        delivery_id: &str,
        outcome: Outcome,
        detail: Option<String>,
    ) -> Result<WorkflowSummary, SchedulerError> {
        let body = serde_json::to_value(CompensationReport {
            state: outcome,
            detail,
        })
        .map_err(|e| SchedulerError::Permanent(e.to_string()))?;
        let path = format!("/api/workflows/{delivery_id}/compensation");
        // Only the replica holding the saga's partition writes it; any replica tells which
        // partition that is.
        match self
            .call(&self.link.url, Method::POST, &path, Some(body.clone()))
            .await
        {
            Err(SchedulerError::Misdirected(_)) => {
                let partition = self.workflow(delivery_id).await?.partition;
                self.call(
                    &self.base_for_partition(partition),
                    Method::POST,
                    &path,
                    Some(body),
                )
                .await
            }
            other => other,
        }
    }

    /// One saga's status: steps, attempts, errors, timings.
    pub async fn workflow(&self, delivery_id: &str) -> Result<Workflow, SchedulerError> {
        self.call(
            &self.link.url,
            Method::GET,
            &format!("/api/workflows/{delivery_id}"),
            None,
        )
        .await
    }

    /// Runs a failed saga again, asking the instance that owns its partition.
    pub async fn retry(
        &self,
        delivery_id: &str,
        partition: i32,
        reason: &str,
    ) -> Result<WorkflowSummary, SchedulerError> {
        let body = serde_json::to_value(RetryRequest {
            reason: Some(reason.to_owned()),
        })
        .map_err(|e| SchedulerError::Permanent(e.to_string()))?;
        self.call(
            &self.base_for_partition(partition),
            Method::POST,
            &format!("/api/workflows/{delivery_id}/retry"),
            Some(body),
        )
        .await
    }

    pub async fn partitions(&self) -> Result<Vec<PartitionLease>, SchedulerError> {
        self.call(&self.link.url, Method::GET, "/api/partitions", None)
            .await
    }

    /// Running sagas that wait (parked until a wake-up time) apart from those making progress.
    pub async fn waiting(&self) -> Result<WaitingSagas, SchedulerError> {
        self.call(&self.link.url, Method::GET, "/api/waiting", None)
            .await
    }

    /// The circuit breakers in front of the domain services: every Scheduler replica's (each
    /// has its own; asked at once, each within [`BREAKERS_TIMEOUT`]; through `url` alone when
    /// there is no `instance_url_template`), then those of `own`, the Supervisor's client.
    pub async fn breakers(&self, own: &Downstream) -> Vec<BreakerReport> {
        let replicas: Vec<(String, String)> = match &self.link.instance_url_template {
            Some(t) => (0..self.link.replicas.max(1))
                .map(|i| {
                    (
                        format!("scheduler-{i}"),
                        t.replace("{ordinal}", &i.to_string()),
                    )
                })
                .collect(),
            None => vec![("scheduler".to_owned(), self.link.url.clone())],
        };
        let mut out =
            futures::future::join_all(replicas.into_iter().map(|(source, base)| async move {
                let breakers = self
                    .call_within::<Vec<BreakerStatus>>(
                        &base,
                        Method::GET,
                        "/api/breakers",
                        None,
                        Some(BREAKERS_TIMEOUT),
                    )
                    .await
                    .map_err(|e| e.to_string());
                BreakerReport { source, breakers }
            }))
            .await;
        out.push(BreakerReport {
            source: "supervisor".to_owned(),
            breakers: Ok(own.breakers()),
        });
        out
    }
}
