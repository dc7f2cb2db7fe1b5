//! The client: one connection pool for all the services, one function that builds every request
//! and one that sends it (past the target's breaker and cap), classifies the answer and logs
//! failures.

use std::sync::Arc;

use std::time::{Duration, Instant};
use tracing::Instrument;

use anyhow::{anyhow, bail, Context};
use contracts::{
    Account, Confirmation, Delivery, DeliveryPatch, DeliveryUpsert, DroneReservation,
    DroneReservationRequest, LegRequest, Package, PackageUpsert, ThirdPartyLeg, TrackingUpdate,
};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::batch::Lane;
use crate::error::problem_code;
use crate::protection::{Protection, Verdict};
use crate::{CallError, DownstreamSettings};

/// Idle pooled connections are dropped before the services' HTTP server (actix-web, 5 s
/// keep-alive by default) closes them, so a request is rarely written onto a dying connection.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// The problem `code` a service answers for an id it does not know (as opposed to
/// `route-not-found`, which means the URL itself is wrong and must not pass for "nothing to undo").
const NOT_FOUND_CODE: &str = "not-found";

/// Typed client for the Account, Package, Drone and Delivery services. Cheap to clone; clones share
/// one connection pool.
#[derive(Debug, Clone)]
pub struct Downstream {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    http: reqwest::Client,
    pub(crate) timeout: Duration,
    account: Url,
    package: Url,
    drone: Url,
    delivery: Url,
    thirdparty: Url,
    /// `Bearer <service token>`, marked sensitive so it never shows in debug output.
    authorization: HeaderValue,
    /// A circuit breaker and a cap on concurrent calls per service, indexed by [`Service::index`].
    pub(crate) protection: Arc<Protection>,
    /// The calls that are batched across callers (module `batch`).
    packages: Lane<Package>,
    drones: Lane<DroneReservation>,
    deliveries: Lane<()>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("timeout", &self.timeout)
            .field("account", &self.account)
            .field("package", &self.package)
            .field("drone", &self.drone)
            .field("delivery", &self.delivery)
            .field("thirdparty", &self.thirdparty)
            .field("protection", &self.protection)
            .finish_non_exhaustive()
    }
}

/// How an answer becomes a call's result.
pub(crate) type Outcome<T> = fn(&str, Answer) -> Result<T, CallError>;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Service {
    Account,
    Package,
    Drone,
    Delivery,
    ThirdParty,
}

impl Service {
    const ALL: [Service; 5] = [
        Service::Account,
        Service::Package,
        Service::ThirdParty,
        Service::Drone,
        Service::Delivery,
    ];

    pub(crate) fn index(self) -> usize {
        match self {
            Service::Account => 0,
            Service::Package => 1,
            Service::ThirdParty => 2,
            Service::Drone => 3,
            Service::Delivery => 4,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Service::Account => "account",
            Service::Package => "package",
            Service::Drone => "drone",
            Service::Delivery => "delivery",
            Service::ThirdParty => "thirdparty",
        }
    }

    /// The collection every call of this client addresses: `/api/<collection>/<id>`.
    pub(crate) fn collection(self) -> &'static str {
        match self {
            Service::Account => "accounts",
            Service::Package => "packages",
            Service::Drone => "dronedeliveries",
            Service::Delivery => "deliveries",
            Service::ThirdParty => "thirdparty",
        }
    }
}

/// What a service answered: any status, the body read in full.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn error(&self, call: &str) -> CallError {
        CallError::from_status(call, self.status, &self.headers, &self.body)
    }
}

impl Downstream {
    /// Builds the client. Fails when a URL is not an absolute `http(s)` URL, the timeout is zero,
    /// a breaker or cap setting is out of range, or the service token is empty or not usable in a
    /// header.
    pub fn new(settings: &DownstreamSettings) -> anyhow::Result<Self> {
        if settings.timeout_ms == 0 {
            bail!("downstream timeout_ms must be more than 0");
        }
        let names = Service::ALL.map(Service::name);
        let protection = Arc::new(Protection::new(settings, &names)?);
        let token = settings.service_token.expose_secret();
        if token.trim().is_empty() {
            bail!("the downstream service token is empty: set it to the suite's service token");
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| {
                anyhow!("the downstream service token has characters not allowed in a header")
            })?;
        authorization.set_sensitive(true);
        let timeout = Duration::from_millis(settings.timeout_ms);
        let batch = settings.batch;
        if !(1..=contracts::MAX_BATCH_ITEMS).contains(&batch.max_items)
            || !(1..=64).contains(&batch.in_flight)
        {
            bail!(
                "downstream batch max_items must be 1 to {} and in_flight 1 to 64 (got {} and {})",
                contracts::MAX_BATCH_ITEMS,
                batch.max_items,
                batch.in_flight
            );
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // Internal services never redirect; following one could only hide a misconfigured URL.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!(
                "drone-delivery-downstream/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .context("building the downstream HTTP client")?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                timeout,
                account: base_url("account_url", &settings.account_url)?,
                package: base_url("package_url", &settings.package_url)?,
                drone: base_url("drone_url", &settings.drone_url)?,
                delivery: base_url("delivery_url", &settings.delivery_url)?,
                thirdparty: base_url("thirdparty_url", &settings.thirdparty_url)?,
                authorization,
                protection,
                packages: Lane::new(
                    Service::Package,
                    decode::<Package>,
                    batch.max_items,
                    batch.in_flight,
                ),
                drones: Lane::new(
                    Service::Drone,
                    decode::<DroneReservation>,
                    batch.max_items,
                    batch.in_flight,
                ),
                deliveries: Lane::new(Service::Delivery, done, batch.max_items, batch.in_flight),
            }),
        })
    }

    /// Registers the client's metrics in `registry` (the service's `/metrics`), per target
    /// service: `downstream_breaker_state` (0 closed, 1 half-open, 2 open),
    /// `downstream_rejected_calls_total{reason=open|half_open|concurrency}`,
    /// `downstream_breaker_transitions_total{to}` and `downstream_calls_in_flight`, each labelled
    /// `target`. They count from the client's start whether registered or not; once per registry.
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> anyhow::Result<()> {
        self.inner.protection.register(registry)
    }

    /// [`register_metrics`](Self::register_metrics), for building and registering in one
    /// expression.
    pub fn with_metrics(self, registry: &prometheus::Registry) -> anyhow::Result<Self> {
        self.register_metrics(registry)?;
        Ok(self)
    }

    /// Each service's circuit breaker and concurrency cap in this client (shared by its clones),
    /// in the order a booking calls them.
    pub fn breakers(&self) -> Vec<contracts::BreakerStatus> {
        self.inner.protection.snapshot()
    }

    /// `GET /api/accounts/{id}`. A suspended account is data, not an error: the caller decides.
    pub async fn account(&self, id: &str) -> Result<Account, CallError> {
        self.exchange(Service::Account, Method::GET, id, None, decode::<Account>)
            .await
    }

    /// `PUT /api/packages/{id}`: registers the package (`201`) or finds the same one (`200`).
    /// Different content under the same id is `Permanent` with code `package-conflict`. Batched
    /// with concurrent registrations.
    pub async fn put_package(&self, id: &str, body: &PackageUpsert) -> Result<Package, CallError> {
        let body = json_body(body)?;
        Lane::call(self, |d| &d.inner.packages, id, body).await
    }

    /// `DELETE /api/packages/{id}`: cancels the package. An unknown package counts as done.
    pub async fn delete_package(&self, id: &str) -> Result<(), CallError> {
        self.exchange(Service::Package, Method::DELETE, id, None, undone)
            .await
    }

    /// `PUT /api/dronedeliveries/{deliveryId}`: reserves a drone for the delivery's window; the same
    /// delivery always gets the same drone. No free drone is `Transient` with the service's
    /// `Retry-After`. Batched with concurrent reservations.
    pub async fn reserve_drone(
        &self,
        delivery_id: &str,
        body: &DroneReservationRequest,
    ) -> Result<DroneReservation, CallError> {
        let body = json_body(body)?;
        Lane::call(self, |d| &d.inner.drones, delivery_id, body).await
    }

    /// `DELETE /api/dronedeliveries/{deliveryId}`: releases the drone. An unknown reservation counts
    /// as done.
    pub async fn release_drone(&self, delivery_id: &str) -> Result<(), CallError> {
        self.exchange(Service::Drone, Method::DELETE, delivery_id, None, undone)
            .await
    }

    /// `PUT /api/deliveries/{id}`: creates the delivery (`201`) or finds it already there (`204`).
    /// Batched with concurrent creations.
    pub async fn put_delivery(&self, id: &str, body: &DeliveryUpsert) -> Result<(), CallError> {
        let body = json_body(body)?;
        Lane::call(self, |d| &d.inner.deliveries, id, body).await
    }

    /// `PATCH /api/deliveries/{id}`: reschedules. A completed or cancelled delivery is `Permanent`
    /// with code `delivery-closed`.
    pub async fn reschedule_delivery(
        &self,
        id: &str,
        body: &DeliveryPatch,
    ) -> Result<Delivery, CallError> {
        let body = json_body(body)?;
        self.exchange(
            Service::Delivery,
            Method::PATCH,
            id,
            Some(body),
            decode::<Delivery>,
        )
        .await
    }

    /// `DELETE /api/deliveries/{id}`: cancels the delivery. An unknown delivery counts as done; one
    /// already completed cannot be undone and is `Permanent` with code `delivery-closed`.
    pub async fn cancel_delivery(&self, id: &str) -> Result<(), CallError> {
        self.exchange(Service::Delivery, Method::DELETE, id, None, undone)
            .await
    }

    /// `POST /api/deliveries/{id}/events`: records a drone's progress (`HeadedToPickup`,
    /// `HeadedToDropoff`). A completed or cancelled delivery is `Permanent` (`delivery-closed`).
    pub async fn track_delivery(&self, id: &str, body: &TrackingUpdate) -> Result<(), CallError> {
        let body = json_body(body)?;
        self.exchange_at(
            Service::Delivery,
            Method::POST,
            id,
            Some("events"),
            Some(body),
            done,
        )
        .await
    }

    /// `POST /api/deliveries/{id}/confirmations`: the hand-over; the delivery is completed. One
    /// already completed counts as done (a repeated report).
    pub async fn confirm_delivery(&self, id: &str, body: &Confirmation) -> Result<(), CallError> {
        let body = json_body(body)?;
        self.exchange_at(
            Service::Delivery,
            Method::POST,
            id,
            Some("confirmations"),
            Some(body),
            completed,
        )
        .await
    }

    /// `PUT /api/thirdparty/{deliveryId}`: books a carrier leg (`201`) or finds the same one
    /// (`200`). No carrier with capacity left is `Transient` with the service's `Retry-After`; a
    /// leg cancelled before it was booked is `Permanent` with code `leg-cancelled`; a route no
    /// carrier serves is `Permanent` with code `no-carrier-serves-route`.
    pub async fn arrange_leg(
        &self,
        delivery_id: &str,
        body: &LegRequest,
    ) -> Result<ThirdPartyLeg, CallError> {
        let body = json_body(body)?;
        self.exchange(
            Service::ThirdParty,
            Method::PUT,
            delivery_id,
            Some(body),
            decode::<ThirdPartyLeg>,
        )
        .await
    }

    /// `DELETE /api/thirdparty/{deliveryId}`: cancels the leg (and refuses a later `PUT` for the
    /// id). An unknown leg counts as done.
    pub async fn cancel_leg(&self, delivery_id: &str) -> Result<(), CallError> {
        self.exchange(
            Service::ThirdParty,
            Method::DELETE,
            delivery_id,
            None,
            undone,
        )
        .await
    }

    /// Builds every request this client sends: the URL, the service token, the JSON headers.
    /// Headers for all calls (e.g. a `traceparent`) belong here.
    /// The URL is `/api/<collection>/<id>`, or `/api/<collection>/<id>/<sub>`.
    pub(crate) fn request_at(
        &self,
        service: Service,
        method: Method,
        id: &str,
        sub: Option<&str>,
    ) -> Result<(RequestBuilder, Url), CallError> {
        let base = match service {
            Service::Account => &self.inner.account,
            Service::Package => &self.inner.package,
            Service::Drone => &self.inner.drone,
            Service::Delivery => &self.inner.delivery,
            Service::ThirdParty => &self.inner.thirdparty,
        };
        let mut url = base.clone();
        // Pushing segments percent-encodes the id, so no id can reach another route.
        url.path_segments_mut()
            .map_err(|()| CallError::Permanent {
                reason: format!("{} base URL {base} cannot take a path", service.name()),
                status: None,
                code: None,
            })?
            .pop_if_empty()
            .extend(["api", service.collection(), id])
            .extend(sub);
        let builder = self
            .inner
            .http
            .request(method, url.clone())
            .header(AUTHORIZATION, self.inner.authorization.clone())
            .header(ACCEPT, "application/json, application/problem+json");
        Ok((builder, url))
    }

    /// Sends one request, turns the answer into the call's result with `outcome`, and logs a
    /// failure once, here.
    #[tracing::instrument(
        level = "debug",
        name = "downstream call",
        skip_all,
        fields(service = service.name(), method = %method, id = %id)
    )]
    pub(crate) async fn exchange<T>(
        &self,
        service: Service,
        method: Method,
        id: &str,
        body: Option<Vec<u8>>,
        outcome: Outcome<T>,
    ) -> Result<T, CallError> {
        self.exchange_at(service, method, id, None, body, outcome)
            .await
    }

    /// [`exchange`](Self::exchange) with `/api/<collection>/<id>/<sub>`.
    async fn exchange_at<T>(
        &self,
        service: Service,
        method: Method,
        id: &str,
        sub: Option<&str>,
        body: Option<Vec<u8>>,
        outcome: fn(&str, Answer) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        let (mut builder, url) = self.request_at(service, method.clone(), id, sub).inspect_err(|e| {
            tracing::warn!(service = service.name(), method = %method, reason = %e, "downstream call failed");
        })?;
        if let Some(body) = body {
            builder = builder.header(CONTENT_TYPE, "application/json").body(body);
        }
        let path = url.path();
        let call = format!("{} {method} {path}", service.name());
        // Past the breaker and the cap, or refused without being made (not logged one by one: a
        // breaker open on a busy service refuses thousands; the metrics count them).
        let pass = self.inner.protection.enter(service.index()).await?;
        // A client span; its context travels in `traceparent` so the callee's span is its child.
        let span = tracing::info_span!(
            "downstream_call",
            otel.name = %format_args!("{} {method}", service.name()),
            otel.kind = "client",
            peer.service = service.name(),
            http.request.method = %method,
            url.path = path,
        );
        let mut trace_headers = reqwest::header::HeaderMap::new();
        span.in_scope(|| telemetry::inject_http(&mut trace_headers));
        builder = builder.headers(trace_headers);
        let started = Instant::now();
        let sent = send(builder, &call, self.inner.timeout)
            .instrument(span.clone())
            .await;
        pass.finish(match &sent {
            Ok(answer) => Verdict::of_answer(answer.status, || problem_code(&answer.body)),
            Err(e) => Verdict::of_transport(e),
        });
        let result = match sent {
            Ok(answer) => {
                let status = answer.status;
                outcome(&call, answer).map_err(|e| (Some(status), e))
            }
            Err(e) => Err((None, e)),
        };
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match result {
            Ok(value) => {
                tracing::debug!(service = service.name(), method = %method, path, elapsed_ms, "downstream call succeeded");
                Ok(value)
            }
            Err((status, e)) => {
                tracing::warn!(
                    service = service.name(),
                    method = %method,
                    path,
                    status = status.map(|s| s.as_u16()),
                    transient = e.is_transient(),
                    elapsed_ms,
                    reason = %e,
                    "downstream call failed"
                );
                Err(e)
            }
        }
    }
}

/// Sends the request and reads the whole answer (the client's timeout covers both).
pub(crate) async fn send(
    builder: RequestBuilder,
    call: &str,
    timeout: Duration,
) -> Result<Answer, CallError> {
    let response = builder
        .send()
        .await
        .map_err(|e| CallError::from_transport(call, timeout, e))?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = match response.bytes().await {
        Ok(bytes) => bytes.to_vec(),
        // Without the body a success cannot be decoded: the connection broke or the time ran out.
        Err(e) if status.is_success() => return Err(CallError::from_transport(call, timeout, e)),
        // A failure status says enough on its own.
        Err(_) => Vec::new(),
    };
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// A `2xx` whose body must be a `T`.
fn decode<T: DeserializeOwned>(call: &str, answer: Answer) -> Result<T, CallError> {
    if !answer.status.is_success() {
        return Err(answer.error(call));
    }
    serde_json::from_slice(&answer.body).map_err(|e| {
        let expected = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("the expected type");
        CallError::undecodable(call, answer.status, expected, &e.to_string())
    })
}

/// Any `2xx`; the body does not matter.
fn done(call: &str, answer: Answer) -> Result<(), CallError> {
    if answer.status.is_success() {
        Ok(())
    } else {
        Err(answer.error(call))
    }
}

/// A compensation: any `2xx`, or `404 not-found` (nothing there, so nothing to undo).
fn undone(call: &str, answer: Answer) -> Result<(), CallError> {
    if answer.status.is_success() {
        return Ok(());
    }
    let error = answer.error(call);
    match &error {
        CallError::Permanent {
            status: Some(404),
            code: Some(code),
            ..
        } if code == NOT_FOUND_CODE => {
            tracing::debug!(call, "nothing to undo: the resource does not exist");
            Ok(())
        }
        _ => Err(error),
    }
}

/// A confirmation: any `2xx`, or `409 already-completed` (a repeat of one that was recorded).
fn completed(call: &str, answer: Answer) -> Result<(), CallError> {
    if answer.status.is_success() {
        return Ok(());
    }
    let error = answer.error(call);
    match &error {
        CallError::Permanent {
            status: Some(409),
            code: Some(code),
            ..
        } if code == "already-completed" => Ok(()),
        _ => Err(error),
    }
}

fn json_body<B: Serialize>(body: &B) -> Result<Vec<u8>, CallError> {
    serde_json::to_vec(body).map_err(|e| CallError::Permanent {
        reason: format!("the request body cannot be serialised: {e}"),
        status: None,
        code: None,
    })
}

/// Parses a service's base URL from the settings, naming the setting when it is unusable.
fn base_url(setting: &str, value: &str) -> anyhow::Result<Url> {
    let url = Url::parse(value.trim())
        .with_context(|| format!("downstream {setting} '{value}' is not a valid URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() || url.host().is_none() {
        bail!("downstream {setting} '{value}' must be an http:// or https:// URL with a host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("downstream {setting} '{value}' must not have a query or fragment");
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DownstreamSettings {
        DownstreamSettings {
            service_token: "a-service-token-0123456789".to_owned().into(),
            ..DownstreamSettings::default()
        }
    }

    #[test]
    fn urls_are_built_under_the_base_path_with_the_id_encoded() {
        let mut s = settings();
        s.drone_url = "http://gateway.internal/drone/".into();
        let d = Downstream::new(&s).unwrap_or_else(|e| panic!("{e:#}"));
        let (_, url) = d
            .request_at(Service::Drone, Method::PUT, "a/b?c", None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            url.as_str(),
            "http://gateway.internal/drone/api/dronedeliveries/a%2Fb%3Fc"
        );
        let (_, url) = d
            .request_at(Service::Account, Method::GET, "acc-1", None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(url.as_str(), "http://127.0.0.1:8081/api/accounts/acc-1");
        let (_, url) = d
            .request_at(Service::Delivery, Method::POST, "d/1", Some("events"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8084/api/deliveries/d%2F1/events"
        );
    }

    #[test]
    fn unusable_settings_are_refused_without_printing_the_token() {
        let mut s = settings();
        s.package_url = "127.0.0.1:8082".into();
        let err = Downstream::new(&s)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("package_url"), "{err}");

        let mut s = settings();
        s.timeout_ms = 0;
        assert!(Downstream::new(&s).is_err());

        let mut s = settings();
        s.service_token = String::new().into();
        assert!(Downstream::new(&s).is_err());

        let d = Downstream::new(&settings()).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!format!("{d:?}").contains("a-service-token"));
    }
}
