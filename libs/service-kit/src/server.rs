//! Builds every service's HTTP server the same way and runs it until a shutdown future fires.

use std::collections::HashMap;
use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::{from_fn, ErrorHandlerResponse, ErrorHandlers, Next};
use actix_web::web::{self, PayloadConfig};
use actix_web::{App, HttpMessage, HttpResponse, HttpServer, ResponseError};
use secrecy::SecretString;
use tracing::Instrument;

use crate::auth::ServiceToken;
use crate::docs::docs_page;
use crate::error::{ApiError, PROBLEM_JSON};
use crate::extract::BodyLimit;
use crate::health::{healthz, readyz, Readiness, ReadinessCheck};
use crate::settings::HttpSettings;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id of the current request (from `X-Request-Id` or generated), echoed in the response.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Assembles a service: its routes plus the endpoints and middleware every service shares.
pub struct ServiceBuilder {
    name: &'static str,
    http: HttpSettings,
    service_token: Option<SecretString>,
    openapi: Option<utoipa::openapi::OpenApi>,
    readiness: Readiness,
    registry: prometheus::Registry,
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
        }
    }

    /// Internal calls must present this token (see `auth::ServiceCaller`).
    pub fn service_token(mut self, token: SecretString) -> Self {
        self.service_token = Some(token);
        self
    }

    /// Served at `/openapi.json` and rendered at `/docs`.
    pub fn openapi(mut self, doc: utoipa::openapi::OpenApi) -> Self {
        self.openapi = Some(doc);
        self
    }

    /// Added to `/readyz`.
    pub fn readiness(mut self, check: impl ReadinessCheck + 'static) -> Self {
        self.readiness.0.push(Arc::new(check));
        self
    }

    /// The registry behind `/metrics`; services register their own metrics here.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// Binds the listener (port 0 picks a free one) and starts the server.
    pub fn build<F>(self, configure: F) -> anyhow::Result<RunningService>
    where
        F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
    {
        let listener =
            TcpListener::bind((self.http.host.as_str(), self.http.port)).map_err(|e| {
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

        let openapi = web::Data::new(self.openapi.unwrap_or_default());
        let readiness = web::Data::new(self.readiness);
        let token = self
            .service_token
            .map(|t| ServiceToken(Arc::new(t)))
            .unwrap_or_else(|| ServiceToken(Arc::new(SecretString::from(String::new()))));
        let limit = self.http.body_limit;
        let name = self.name;

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
                .app_data(ServiceName(name))
                .wrap(from_fn(request_context))
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
        })
    }
}

/// No route took the request: `405` when the path exists with other methods, else `404`.
async fn unmatched(req: actix_web::HttpRequest) -> HttpResponse {
    use actix_web::http::StatusCode;
    let status = if req.resource_map().has_resource(req.path()) {
        StatusCode::METHOD_NOT_ALLOWED
    } else {
        StatusCode::NOT_FOUND
    };
    ApiError::for_status(status).error_response()
}

async fn openapi_json(doc: web::Data<utoipa::openapi::OpenApi>) -> HttpResponse {
    HttpResponse::Ok().json(doc.get_ref())
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

/// The service's name, for request spans.
#[derive(Clone, Copy)]
struct ServiceName(&'static str);

/// Request id, a server span per request (a child of the caller's `traceparent`, if any), and a
/// log line per finished request: errors always, other requests at debug level (the per-route
/// counts and latencies are in `/metrics`; at thousands of requests a second a line each costs
/// more CPU than the request itself).
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
    let service = req
        .app_data::<ServiceName>()
        .map(|s| s.0)
        .unwrap_or("unknown");
    let quiet = route == "/healthz" || route == "/readyz" || route == "/metrics";
    let span = if quiet {
        tracing::Span::none()
    } else {
        tracing::info_span!(
            "http_request",
            otel.name = %format_args!("{} {}", req.method(), route),
            otel.kind = "server",
            service,
            http.request.method = %req.method(),
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            request_id = %request_id,
        )
    };
    let mut carrier = std::collections::BTreeMap::new();
    for name in [telemetry::TRACEPARENT, telemetry::TRACESTATE] {
        if let Some(v) = req.headers().get(name).and_then(|v| v.to_str().ok()) {
            carrier.insert(name.to_owned(), v.to_owned());
        }
    }
    if !carrier.is_empty() {
        telemetry::set_parent(&span, &carrier);
    }
    let started = Instant::now();
    let mut res = next.call(req).instrument(span.clone()).await?;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    let status = res.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
    span.in_scope(|| {
        if status >= 500 {
            tracing::error!(status, latency_ms, "request failed");
        } else if status >= 400 {
            tracing::info!(status, latency_ms, "request refused");
        } else if !quiet {
            tracing::debug!(status, latency_ms, "request finished");
        }
    });
    Ok(res.map_body(|_, b| EitherBody::left(b.boxed())))
}

/// A started server. Dropping it does not stop it; call [`RunningService::run_until`].
pub struct RunningService {
    name: &'static str,
    port: u16,
    server: Server,
}

impl RunningService {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
        let handle = self.server.handle();
        let mut server = std::pin::pin!(self.server);
        tokio::select! {
            result = &mut server => result,
            () = shutdown => {
                tracing::info!(service = self.name, "shutting down");
                // The server future itself carries out the stop, so keep polling it meanwhile.
                let (result, ()) = tokio::join!(server, handle.stop(true));
                result
            }
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
