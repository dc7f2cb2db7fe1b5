//! Builds every service the same way (its database, its HTTP server, its background tasks under
//! one stop signal) and runs it until a shutdown future fires, then stops it in one order.

use std::collections::HashMap;
use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Server, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::{from_fn, ErrorHandlerResponse, ErrorHandlers, Next};
use actix_web::web::{self, PayloadConfig};
use actix_web::{App, HttpMessage, HttpResponse, HttpServer, ResponseError};
use anyhow::Context;
use sea_orm::DatabaseConnection;
use sea_orm_migration::MigratorTrait;
use secrecy::SecretString;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::auth::ServiceToken;
use crate::docs::docs_page;
use crate::error::{ApiError, PROBLEM_JSON};
use crate::extract::BodyLimit;
use crate::health::{healthz, readyz, DatabaseCheck, Readiness, ReadinessCheck};
use crate::settings::{AuthSettings, DatabaseSettings, HttpSettings};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Turns true once the service is stopping. A background task that holds work worth finishing
/// (a partition lease, a checkpoint, an unacked message) watches it and finishes that work first.
pub type StopSignal = watch::Receiver<bool>;

/// The id of the current request (from `X-Request-Id` or generated), echoed in the response.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Assembles a service: its routes plus the endpoints and middleware every service shares, and
/// the background tasks that run and stop with it.
pub struct ServiceBuilder {
    name: &'static str,
    http: HttpSettings,
    service_token: Option<SecretString>,
    openapi: Option<serde_json::Value>,
    readiness: Readiness,
    registry: prometheus::Registry,
    tasks: Tasks,
    shed: Option<Shed>,
}

/// Decides, before anything else is done for a request, whether to refuse it at once: the answer
/// it returns goes out as it is (see [`ServiceBuilder::shed`]).
pub type Shed = Arc<dyn Fn(&ServiceRequest) -> Option<HttpResponse> + Send + Sync>;

/// A service's background tasks, their stop signal, and how long they may take to stop.
struct Tasks {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<()>>,
    bound: Duration,
}

impl ServiceBuilder {
    pub fn new(name: &'static str, http: HttpSettings) -> Self {
        Self {
            name,
            http,
            service_token: None,
            openapi: None,
            readiness: Readiness::default(),
            registry: prometheus::Registry::new(),
            tasks: Tasks {
                stop: watch::Sender::new(false),
                handles: Vec::new(),
                bound: Duration::from_secs(5),
            },
            shed: None,
        }
    }

    /// How every service starts: its database connected and migrated (when `migrate_on_start`,
    /// behind a lock named after the service), a builder that requires the service token on
    /// internal calls and is ready while the database answers, and the database for its state.
    pub async fn start<M: MigratorTrait>(
        name: &'static str,
        http: &HttpSettings,
        database: &DatabaseSettings,
        auth: &AuthSettings,
    ) -> anyhow::Result<(Self, DatabaseConnection)> {
        let db = crate::db::connect(database)
            .await
            .with_context(|| format!("connecting to the {name} database"))?;
        if database.migrate_on_start {
            crate::db::migrate::<M>(database, &db, name)
                .await
                .with_context(|| format!("migrating the {name} database"))?;
        }
        let builder = Self::new(name, http.clone())
            .service_token(auth.service_token.clone())
            .readiness(DatabaseCheck(db.clone()));
        Ok((builder, db))
    }

    /// Internal calls must present this token (see `auth::ServiceCaller`).
    pub fn service_token(mut self, token: SecretString) -> Self {
        self.service_token = Some(token);
        self
    }

    /// Served at `/openapi.json` and rendered at `/docs`, completed with what the kit itself answers
    /// on every route (see [`crate::openapi::complete`]).
    pub fn openapi(mut self, doc: utoipa::openapi::OpenApi) -> Self {
        self.openapi = serde_json::to_value(doc).ok().map(crate::openapi::complete);
        self
    }

    /// Added to `/readyz`.
    pub fn readiness(mut self, check: impl ReadinessCheck + 'static) -> Self {
        self.readiness.0.push(Arc::new(check));
        self
    }

    /// Load shedding at the least cost: `shed` sees each request first, before the request id, the
    /// span, the metrics, routing and the body, and a response it returns is sent as it is. For
    /// refusing work an overloaded service cannot take (a `503` that must cost a fraction of the
    /// work it refuses); the service counts what it refuses itself, since nothing after this sees
    /// the request.
    pub fn shed(
        mut self,
        shed: impl Fn(&ServiceRequest) -> Option<HttpResponse> + Send + Sync + 'static,
    ) -> Self {
        self.shed = Some(Arc::new(shed));
        self
    }

    /// The registry behind `/metrics`; services register their own metrics here.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// True once the service is stopping: what background tasks watch.
    pub fn stop_signal(&self) -> StopSignal {
        self.tasks.stop.subscribe()
    }

    /// Runs a background task that watches [`stop_signal`](Self::stop_signal): once it turns
    /// true, the task finishes the work it holds and returns.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.handles.push(tokio::spawn(task));
    }

    /// Runs a background loop that holds nothing worth finishing (a gauge refresh): at the stop
    /// signal it is dropped at its next await.
    pub fn spawn_until_stopped(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        let mut stop = self.stop_signal();
        self.spawn(async move {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => {}
                () = task => {}
            }
        });
    }

    /// Takes background tasks started elsewhere from [`stop_signal`](Self::stop_signal).
    pub fn adopt(&mut self, tasks: impl IntoIterator<Item = JoinHandle<()>>) {
        self.tasks.handles.extend(tasks);
    }

    /// How long the background tasks may take to stop (5 s unless set); then they are aborted.
    pub fn stop_within(mut self, bound: Duration) -> Self {
        self.tasks.bound = bound;
        self
    }

    /// Binds the listener (port 0 picks a free one) and starts the server.
    pub fn build<F>(self, configure: F) -> anyhow::Result<RunningService>
    where
        F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
    {
        let listener = listen(&self.http).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot listen on {}:{}: {e}",
                self.name,
                self.http.host,
                self.http.port
            )
        })?;
        let port = listener.local_addr()?.port();

        let metrics = actix_web_prom::PrometheusMetricsBuilder::new("")
            .registry(self.registry.clone())
            .endpoint("/metrics")
            .const_labels(HashMap::from([(
                "service".to_owned(),
                self.name.to_owned(),
            )]))
            .mask_unmatched_patterns("UNMATCHED")
            .build()
            .map_err(|e| anyhow::anyhow!("metrics: {e}"))?;

        let openapi = web::Data::new(OpenApiDoc(self.openapi.unwrap_or_default()));
        let readiness = web::Data::new(self.readiness);
        let token = self
            .service_token
            .map(|t| ServiceToken(Arc::new(t)))
            .unwrap_or_else(|| ServiceToken(Arc::new(SecretString::from(String::new()))));
        let limit = self.http.body_limit;
        let name = self.name;
        let request_tracing = RequestTracing {
            service: name,
            sample_ratio: self.http.trace_sample_ratio.clamp(0.0, 1.0),
        };
        let shed = self.shed;

        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(PayloadConfig::new(limit))
                .app_data(BodyLimit(limit))
                .app_data(token.clone())
                .app_data(readiness.clone())
                .app_data(openapi.clone())
                .app_data(web::QueryConfig::default().error_handler(|err, _| {
                    ApiError::BadRequest {
                        code: "invalid-query",
                        detail: format!("invalid query string: {err}"),
                    }
                    .into()
                }))
                .app_data(web::PathConfig::default().error_handler(|err, _| {
                    ApiError::BadRequest {
                        code: "invalid-path",
                        detail: format!("invalid path parameter: {err}"),
                    }
                    .into()
                }))
                .wrap(
                    ErrorHandlers::new()
                        .default_handler_client(as_problem)
                        .default_handler_server(as_problem),
                )
                .wrap(metrics.clone())
                .app_data(request_tracing)
                .wrap(from_fn(request_context))
                .wrap(Shedding {
                    shed: shed.clone(),
                    drain_limit: limit,
                })
                .route("/healthz", web::get().to(healthz))
                .route("/readyz", web::get().to(readyz))
                .route("/openapi.json", web::get().to(openapi_json))
                .route("/docs", web::get().to(docs_page))
                .configure(configure.clone())
                .default_service(web::to(unmatched))
        })
        .disable_signals()
        .shutdown_timeout(self.http.shutdown_timeout_secs)
        .listen(listener)?;
        if self.http.workers > 0 {
            server = server.workers(self.http.workers);
        }
        tracing::info!(service = name, port, "listening");
        Ok(RunningService {
            name,
            port,
            server: server.run(),
            tasks: self.tasks,
        })
    }
}

/// The service's listening socket, with a listen queue of `http.backlog` (the standard library's
/// own `bind` queues only 128, which a burst of reconnecting clients overflows at once).
fn listen(http: &HttpSettings) -> std::io::Result<TcpListener> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for address in (http.host.as_str(), http.port).to_socket_addrs()? {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // As the standard library's bind: a restarted service may rebind at once.
        socket.set_reuse_address(true)?;
        let bound = socket
            .bind(&address.into())
            .and_then(|()| socket.listen(i32::try_from(http.backlog).unwrap_or(i32::MAX)));
        match bound {
            Ok(()) => return Ok(socket.into()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")
    }))
}

/// No route took the request: `405` when the path exists with other methods (with `Allow`
/// naming the documented ones), else `404`.
async fn unmatched(req: actix_web::HttpRequest) -> HttpResponse {
    use actix_web::http::StatusCode;
    if !req.resource_map().has_resource(req.path()) {
        return ApiError::for_status(StatusCode::NOT_FOUND).error_response();
    }
    let mut response = ApiError::for_status(StatusCode::METHOD_NOT_ALLOWED).error_response();
    let allowed = req
        .app_data::<web::Data<OpenApiDoc>>()
        .and_then(|doc| crate::openapi::allowed_methods(&doc.0, req.path()))
        .and_then(|methods| HeaderValue::from_str(&methods).ok());
    if let Some(allowed) = allowed {
        response.headers_mut().insert(header::ALLOW, allowed);
    }
    response
}

/// The service's OpenAPI document as served.
struct OpenApiDoc(serde_json::Value);

async fn openapi_json(doc: web::Data<OpenApiDoc>) -> HttpResponse {
    HttpResponse::Ok().json(&doc.0)
}

/// Turns any error response that is not already problem+json (unknown route, wrong method, payload
/// errors raised by actix itself) into one, so clients see a single error format.
fn as_problem<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_problem = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROBLEM_JSON));
    if is_problem {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let (req, _) = res.into_parts();
    let response = ApiError::for_status(status).error_response();
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, response).map_into_right_body(),
    ))
}

/// The outermost middleware: a request the service's [`Shed`] answers goes no further.
struct Shedding {
    shed: Option<Shed>,
    /// The most body bytes a refused request's connection reads and discards (the body limit).
    drain_limit: usize,
}

impl<S, B> Transform<S, ServiceRequest> for Shedding
where
    S: actix_web::dev::Service<
        ServiceRequest,
        Response = ServiceResponse<B>,
        Error = actix_web::Error,
    >,
    B: MessageBody,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = ShedService<S>;
    type InitError = ();
    type Future = std::future::Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        std::future::ready(Ok(ShedService {
            service,
            shed: self.shed.clone(),
            drain_limit: self.drain_limit,
        }))
    }
}

struct ShedService<S> {
    service: S,
    shed: Option<Shed>,
    drain_limit: usize,
}

impl<S, B> actix_web::dev::Service<ServiceRequest> for ShedService<S>
where
    S: actix_web::dev::Service<
        ServiceRequest,
        Response = ServiceResponse<B>,
        Error = actix_web::Error,
    >,
    B: MessageBody,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = futures::future::Either<
        futures::future::LocalBoxFuture<'static, Result<Self::Response, Self::Error>>,
        futures::future::MapOk<S::Future, fn(ServiceResponse<B>) -> Self::Response>,
    >;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        use futures::{StreamExt, TryFutureExt};
        if let Some(response) = self.shed.as_ref().and_then(|shed| shed(&req)) {
            let limit = self.drain_limit;
            let (req, mut body) = req.into_parts();
            return futures::future::Either::Left(Box::pin(async move {
                // The body is read (it is usually in the buffer already) and discarded, so the
                // connection stays open for the client's next request: one answered before its
                // body was read is closed after the answer. A body past the limit is not read.
                let mut read = 0;
                while let Some(Ok(chunk)) = body.next().await {
                    read += chunk.len();
                    if read > limit {
                        break;
                    }
                }
                Ok(ServiceResponse::new(req, response).map_into_right_body())
            }));
        }
        let pass: fn(ServiceResponse<B>) -> Self::Response = ServiceResponse::map_into_left_body;
        futures::future::Either::Right(self.service.call(req).map_ok(pass))
    }
}

/// What the request middleware needs to know of its service: the name for request spans, and
/// the share of new traces it samples (`HttpSettings::trace_sample_ratio`).
#[derive(Clone, Copy)]
struct RequestTracing {
    service: &'static str,
    sample_ratio: f64,
}

/// Request id, a server span per sampled request (a child of the caller's `traceparent`, if any;
/// see [`telemetry::head_sample`]), and a log line per finished request: errors always, other
/// requests at debug level (the per-route counts and latencies are in `/metrics`; at thousands of
/// requests a second a line each costs more CPU than the request itself).
async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<BoxBody>>, actix_web::Error> {
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let route = req.match_pattern().unwrap_or_else(|| "UNMATCHED".into());
    let tracing_of = req.app_data::<RequestTracing>().copied();
    let quiet = route == "/healthz" || route == "/readyz" || route == "/metrics";
    let (span, unsampled) = if quiet {
        (tracing::Span::none(), None)
    } else {
        let mut carrier = std::collections::BTreeMap::new();
        for name in [telemetry::TRACEPARENT, telemetry::TRACESTATE] {
            if let Some(v) = req.headers().get(name).and_then(|v| v.to_str().ok()) {
                carrier.insert(name.to_owned(), v.to_owned());
            }
        }
        match telemetry::head_sample(&carrier, tracing_of.map_or(1.0, |t| t.sample_ratio)) {
            telemetry::Head::Skip(cx) => (tracing::Span::none(), Some(cx)),
            telemetry::Head::Record(parent) => {
                let span = tracing::info_span!(
                    "http_request",
                    otel.name = %format_args!("{} {}", req.method(), route),
                    otel.kind = "server",
                    service = tracing_of.map_or("unknown", |t| t.service),
                    http.request.method = %req.method(),
                    http.route = %route,
                    http.response.status_code = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                    request_id = %request_id,
                );
                telemetry::set_parent_context(&span, parent);
                (span, None)
            }
        }
    };
    let started = Instant::now();
    let call = next.call(req).instrument(span.clone());
    let mut res = match unsampled {
        // No span: the unsampled context is what the request's work (and what it sends on) sees.
        Some(cx) => opentelemetry::context::FutureExt::with_context(call, cx).await?,
        None => call.await?,
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    let status = res.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
    // The request id is in the span's fields; an unsampled request has none, so the line says it.
    let request_id = span.is_none().then_some(request_id.as_str());
    span.in_scope(|| {
        if status == 503 {
            // Shed load or a dependency down: the service says why where it decides (a line per
            // refusal would cost an overloaded service more than the refusal itself).
            tracing::debug!(
                status,
                latency_ms,
                request_id,
                "request refused: unavailable"
            );
        } else if status >= 500 {
            tracing::error!(status, latency_ms, request_id, "request failed");
        } else if status >= 400 {
            tracing::info!(status, latency_ms, request_id, "request refused");
        } else if !quiet {
            tracing::debug!(status, latency_ms, request_id, "request finished");
        }
    });
    Ok(res.map_body(|_, b| EitherBody::left(b.boxed())))
}

/// A service as its binary, the standalone suite and the tests build, run and stop it: every
/// service crate's `Application` implements it.
pub trait Service: Sized {
    /// Its settings: defaults, then `config/<name>` or `APP_CONFIG_FILE`, then `APP_` variables.
    type Settings: serde::de::DeserializeOwned;
    /// Its name in logs, settings files, traces and metrics.
    const NAME: &'static str;
    /// Checks the settings, connects and migrates the database, starts the background tasks
    /// and binds the HTTP listener.
    fn build(settings: Self::Settings) -> impl Future<Output = anyhow::Result<Self>>;
    /// The port the HTTP listener is bound to.
    fn port(&self) -> u16;
    /// Serves until `shutdown` resolves, then stops in the order [`RunningService::run_until`]
    /// gives.
    fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'static;
}

/// A service binary's whole `main`: JSON logs (and traces, where configured), the settings,
/// then the service until SIGTERM or Ctrl-C.
pub fn main<S: Service>() -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async {
        let _telemetry = telemetry::init(S::NAME, "info", telemetry::LogFormat::Json);
        let settings: S::Settings = crate::settings::load(S::NAME)?;
        S::build(settings)
            .await?
            .run_until(shutdown_signal())
            .await?;
        Ok(())
    })
}

/// A started service. Dropping it does not stop it; call [`RunningService::run_until`].
pub struct RunningService {
    name: &'static str,
    port: u16,
    server: Server,
    tasks: Tasks,
}

impl RunningService {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` resolves, then stops in the same order for every service: stop
    /// taking work (the listener closes and in-flight requests finish), drain and release (the
    /// background tasks see the stop signal and finish what they hold: a partition saves its
    /// checkpoint and releases its lease, a compensation finishes or goes back to the queue),
    /// abort what has not stopped within the bound, and close (the service's database and broker
    /// handles are dropped with it).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let handle = self.server.handle();
        let mut server = std::pin::pin!(self.server);
        let result = tokio::select! {
            result = &mut server => result,
            () = shutdown => {
                tracing::info!(service = self.name, "shutting down");
                // The server future itself carries out the stop, so keep polling it meanwhile.
                let (result, ()) = tokio::join!(server, handle.stop(true));
                result
            }
        };
        self.tasks.stop(self.name).await;
        result
    }
}

impl Tasks {
    /// Signals every task, waits for them until the bound has passed, then aborts the rest (a
    /// task left running after its service has stopped would hold its leases and connections).
    async fn stop(self, service: &'static str) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + self.bound;
        let mut aborted = 0usize;
        for mut task in self.handles {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                aborted += 1;
            }
        }
        if aborted > 0 {
            let bound_ms = self.bound.as_millis();
            tracing::warn!(
                service,
                aborted,
                bound_ms,
                "background tasks did not stop in time"
            );
        }
    }
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tasks_that_watch_the_signal_finish_and_the_others_are_aborted() {
        let mut builder = ServiceBuilder::new("test", HttpSettings::default());
        let (finished_tx, finished_rx) = tokio::sync::oneshot::channel();
        let mut stop = builder.stop_signal();
        builder.spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            let _ = finished_tx.send(());
        });
        builder.spawn_until_stopped(std::future::pending());
        let (_never_tx, never_rx) = tokio::sync::oneshot::channel::<()>();
        let deaf = tokio::spawn(async move {
            let _ = never_rx.await;
        });
        let deaf_abort = deaf.abort_handle();
        builder.adopt([deaf]);

        let started = tokio::time::Instant::now();
        builder.tasks.stop("test").await;
        assert!(
            finished_rx.await.is_ok(),
            "the watching task finished its work"
        );
        let waited = started.elapsed();
        assert_eq!(
            waited,
            Duration::from_secs(5),
            "waited for the bound, no longer"
        );
        tokio::task::yield_now().await;
        assert!(deaf_abort.is_finished(), "the deaf task was aborted");
    }

    /// Parent-based head sampling at the door: what is recorded, and what the request passes on.
    #[actix_web::test]
    async fn unsampled_requests_record_no_span_and_pass_the_unsampled_flag_on() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;

        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _default = tracing::subscriber::set_default(subscriber);

        // The handler answers the trace context it would send on (in a message or a call).
        async fn passes_on() -> HttpResponse {
            let mut headers = std::collections::BTreeMap::new();
            telemetry::inject_current(&mut headers);
            HttpResponse::Ok().json(headers)
        }
        async fn call(ratio: f64, traceparent: Option<&str>) -> String {
            let app = actix_web::test::init_service(
                App::new()
                    .app_data(RequestTracing {
                        service: "test",
                        sample_ratio: ratio,
                    })
                    .wrap(from_fn(request_context))
                    .route("/x", web::get().to(passes_on)),
            )
            .await;
            let mut req = actix_web::test::TestRequest::get().uri("/x");
            if let Some(tp) = traceparent {
                req = req.insert_header((telemetry::TRACEPARENT, tp));
            }
            let sent: std::collections::BTreeMap<String, String> =
                actix_web::test::call_and_read_body_json(&app, req.to_request()).await;
            sent.get(telemetry::TRACEPARENT)
                .cloned()
                .unwrap_or_default()
        }
        let spans = |exporter: &opentelemetry_sdk::trace::InMemorySpanExporter| {
            let _ = provider.force_flush();
            let spans = exporter.get_finished_spans().unwrap_or_default();
            exporter.reset();
            spans
        };
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";

        // A new trace, not sampled: no span, and an unsampled context goes on.
        let sent = call(0.0, None).await;
        assert!(sent.starts_with("00-") && sent.ends_with("-00"), "{sent}");
        assert!(spans(&exporter).is_empty());

        // A new trace, sampled: one server span, and its context goes on sampled.
        let sent = call(1.0, None).await;
        let recorded = spans(&exporter);
        assert_eq!(recorded.len(), 1);
        let id = recorded[0].span_context.trace_id().to_string();
        assert!(
            sent.starts_with(&format!("00-{id}-")) && sent.ends_with("-01"),
            "{sent}"
        );

        // A caller's flag wins over the ratio, both ways, and its trace id goes on.
        let sent = call(0.0, Some(&format!("00-{trace}-00f067aa0ba902b7-01"))).await;
        let recorded = spans(&exporter);
        assert_eq!(recorded.len(), 1, "a sampled caller is followed");
        assert_eq!(recorded[0].span_context.trace_id().to_string(), trace);
        assert!(
            sent.starts_with(&format!("00-{trace}-")) && sent.ends_with("-01"),
            "{sent}"
        );

        let sent = call(1.0, Some(&format!("00-{trace}-00f067aa0ba902b7-00"))).await;
        assert!(
            spans(&exporter).is_empty(),
            "an unsampled caller is followed"
        );
        assert_eq!(sent, format!("00-{trace}-00f067aa0ba902b7-00"));
    }

    /// A request the service sheds is answered before anything else runs (no request id), and
    /// its connection stays open: the unread body is discarded rather than the connection closed.
    #[actix_web::test]
    async fn shed_requests_are_answered_first_and_keep_their_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let http = HttpSettings {
            host: "127.0.0.1".into(),
            port: 0,
            workers: 1,
            ..HttpSettings::default()
        };
        let refusal = crate::CannedResponse::of(&ApiError::Overloaded { retry_after: 3 });
        let service = ServiceBuilder::new("test", http)
            .shed(move |req| {
                req.headers()
                    .contains_key("x-shed")
                    .then(|| refusal.response())
            })
            .build(|cfg| {
                cfg.route(
                    "/x",
                    web::post().to(|body: web::Bytes| async move { HttpResponse::Ok().body(body) }),
                );
            })
            .unwrap_or_else(|e| panic!("build: {e}"));
        let port = service.port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = actix_web::rt::spawn(service.run_until(async {
            let _ = stopped.await;
        }));

        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        // One answer: the head, then as many body bytes as its Content-Length says.
        let mut buf = Vec::new();
        let mut answer = async |conn: &mut tokio::net::TcpStream| -> (String, String) {
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + length {
                        let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]);
                        let body = body.into_owned();
                        buf.drain(..end + 4 + length);
                        return (head, body);
                    }
                }
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk))
                    .await
                    .unwrap_or_else(|_| panic!("no answer within 5 s"))
                    .unwrap_or_else(|e| panic!("read: {e}"));
                assert!(n > 0, "the connection was closed");
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        let body = "{\"a\":1}";
        let request = |shed: bool| {
            format!(
                "POST /x HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n{}\
                 content-length: {}\r\n\r\n{body}",
                if shed { "x-shed: 1\r\n" } else { "" },
                body.len()
            )
        };
        for shed in [true, true, false, true, false] {
            conn.write_all(request(shed).as_bytes())
                .await
                .unwrap_or_else(|e| panic!("write: {e}"));
            let (head, answered) = answer(&mut conn).await;
            if shed {
                assert!(head.starts_with("http/1.1 503"), "{head}");
                assert!(
                    head.contains("content-type: application/problem+json"),
                    "{head}"
                );
                assert!(head.contains("retry-after: 3"), "{head}");
                assert!(!head.contains("x-request-id"), "no middleware ran: {head}");
                assert!(answered.contains("\"code\":\"overloaded\""), "{answered}");
            } else {
                assert!(head.starts_with("http/1.1 200"), "{head}");
                assert!(head.contains("x-request-id"), "{head}");
                assert_eq!(
                    answered, body,
                    "the next request on the connection is whole"
                );
            }
        }
        let _ = stop.send(());
        let _ = server.await;
    }

    /// A burst of new connections (clients reconnecting, a load balancer scaling out) waits in
    /// the listen queue until a worker accepts it: a connection the kernel drops instead is
    /// retried by its client only a second later.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_listen_queue() {
        let http = HttpSettings {
            host: "127.0.0.1".into(),
            port: 0,
            ..HttpSettings::default()
        };
        let listener = listen(&http).unwrap_or_else(|e| panic!("listen: {e}"));
        let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        // Nobody accepts: every connection must be queued by the kernel (up to its own cap).
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        // 500: far above the 128 of the standard library's bind, and within the 1,024 open files
        // a process may have by default.
        let burst = cap.min(500);
        let connects = (0..burst).map(|_| {
            tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(address),
            )
        });
        let results = futures::future::join_all(connects).await;
        let queued = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(queued, burst, "connections queued of a burst of {burst}");
        drop(listener);
    }
}
