//! Telemetry shared by every service: JSON log lines through `tracing`, filtered by `RUST_LOG`, and
//! OpenTelemetry traces with the W3C trace-context propagator.
//!
//! - Every `tracing` span is also an OpenTelemetry span, so a booking's work in every service and
//!   across every message hop shares one trace id. Log lines carry `trace_id` and `span_id`.
//!   Below a span that adopted an unsampled trace, spans are left out of OpenTelemetry (the SDK
//!   would drop them), yet keep that trace's ids in their log lines and pass it on.
//! - Spans are exported over OTLP/HTTP only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard
//!   `OTEL_EXPORTER_OTLP_*` variables configure the exporter); otherwise nothing leaves the process.
//! - `traceparent` crosses process boundaries in HTTP headers ([`inject_http`], and the service
//!   kit's middleware extracts it) and in message headers ([`inject_current`] / [`set_parent`]).
//!
//! [`init`] returns a guard that flushes pending spans when dropped.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;

/// The header (and message header) that carries the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The companion W3C header with vendor state.
pub const TRACESTATE: &str = "tracestate";

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (production), with `trace_id` and `span_id`.
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

/// Flushes telemetry when dropped. Keep it alive for the life of the process.
#[must_use = "telemetry is flushed when the guard is dropped"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("telemetry: flushing spans at shutdown failed: {e}");
            }
        }
    }
}

/// Installs the global subscriber and the W3C propagator. `default_filter` applies when
/// `RUST_LOG` is not set. Spans are exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// is set. Calling it twice (tests spawning several apps) is harmless: the first subscriber stays.
pub fn init(service: &str, default_filter: &str, format: LogFormat) -> TelemetryGuard {
    let mut builder = SdkTracerProvider::builder().with_resource(resource(service));
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
    let mut export_error = None;
    if !endpoint.trim().is_empty() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => export_error = Some(e.to_string()),
        }
    }
    let provider = builder.build();
    let installed = install(service, &provider, default_filter, format);
    if installed {
        match export_error {
            Some(e) => {
                tracing::error!(service, error = %e, "OTLP exporter not created; spans are not exported")
            }
            None if !endpoint.trim().is_empty() => {
                tracing::info!(service, endpoint = %endpoint, "telemetry initialised, exporting spans over OTLP")
            }
            None => tracing::info!(
                service,
                "telemetry initialised (no OTLP endpoint: spans are not exported)"
            ),
        }
    }
    TelemetryGuard {
        provider: installed.then_some(provider),
    }
}

/// Installs the global subscriber with a caller-built tracer provider (tests use one with an
/// in-memory exporter). Returns false if a global subscriber was already set.
pub fn init_with_provider(
    service: &str,
    provider: &SdkTracerProvider,
    default_filter: &str,
    format: LogFormat,
) -> bool {
    install(service, provider, default_filter, format)
}

/// The resource every span of `service` carries (`service.name`).
pub fn resource(service: &str) -> Resource {
    Resource::builder()
        .with_service_name(service.to_owned())
        .build()
}

fn install(
    service: &str,
    provider: &SdkTracerProvider,
    default_filter: &str,
    format: LogFormat,
) -> bool {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // The OpenTelemetry SDK's own diagnostics are noise at info level.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{default_filter},opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry_otlp=warn"
        ))
    });
    let otel = otel_layer(provider.tracer(service.to_owned())).with_filter(SampledOnly);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(UnsampledMarks)
        .with(otel);
    let dispatch = match format {
        LogFormat::Json => Dispatch::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(JsonMembers)
                    .event_format(JsonWithTrace),
            ),
        ),
        LogFormat::Pretty => {
            Dispatch::new(registry.with(tracing_subscriber::fmt::layer().compact()))
        }
    };
    let weak = dispatch.downgrade();
    let result = dispatch.try_init();
    if result.is_ok() {
        let _ = GLOBAL_DISPATCH.set(weak);
    }
    if result.is_ok() {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    result.is_ok()
}

/// The span layer, without the per-span extras that cost CPU on every request and tell an
/// on-call person nothing a span name does not: source file/line and thread attributes, and
/// busy/idle time accounting on every poll of an instrumented future. Nor does it make a span's
/// OpenTelemetry context the current one on every poll (attached on enter, detached on exit):
/// what propagates trace context here ([`inject_current`], [`inject_http`], the log lines' ids)
/// reads the current tracing span's context first, and only an explicitly attached context (an
/// unsampled request's, see [`Head::Skip`]) is read from the OpenTelemetry side.
fn otel_layer<S>(
    tracer: opentelemetry_sdk::trace::SdkTracer,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
}

/// Marks a span of an unsampled trace: one that adopted an unsampled remote trace context
/// ([`set_parent_context`]), or one made below it ([`UnsampledMarks`]).
struct Unsampled;

thread_local! {
    /// For each span this thread has entered, innermost last: whether it is [`Unsampled`].
    static ENTERED_UNSAMPLED: std::cell::RefCell<Vec<bool>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Marks the spans below an [`Unsampled`] one and keeps [`ENTERED_UNSAMPLED`], which
/// [`SampledOnly`] reads. It sees every span: the OpenTelemetry layer's filter cannot look at
/// the spans it left out.
struct UnsampledMarks;

fn is_unsampled<S>(span: &tracing_subscriber::registry::SpanRef<'_, S>) -> bool
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    span.extensions().get::<Unsampled>().is_some()
}

impl<S> tracing_subscriber::Layer<S> for UnsampledMarks
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let parent = match attrs.parent() {
            Some(parent) => ctx.span(parent),
            None if attrs.is_contextual() => ctx.lookup_current(),
            None => None,
        };
        if parent.is_some_and(|parent| is_unsampled(&parent)) {
            if let Some(span) = ctx.span(id) {
                span.extensions_mut().insert(Unsampled);
            }
        }
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let unsampled = ctx.span(id).is_some_and(|span| is_unsampled(&span));
        ENTERED_UNSAMPLED.with(|entered| entered.borrow_mut().push(unsampled));
    }

    fn on_exit(&self, _id: &tracing::span::Id, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        ENTERED_UNSAMPLED.with(|entered| entered.borrow_mut().pop());
    }
}

/// The OpenTelemetry layer's filter: it leaves out the spans and events made inside a span of an
/// unsampled trace, below the span that adopted that trace ([`set_parent_context`]).
///
/// As deployed, Ingestion's door samples 1 % of new traces, and a saga runs under its booking's
/// trace. The OpenTelemetry SDK drops the spans of an unsampled trace, but only when each ends:
/// the layer still built every span's name, attributes and parent on creation and an SDK span on
/// close, about a tenth of the Scheduler's CPU in `make bench-e2e`. A span left out still has
/// its fields in the log lines, and its trace context is its nearest recorded ancestor's
/// ([`otel_context`]), so what it sends on carries the unsampled trace on.
///
/// It judges a span by the span entered where it is made, so a span with an explicit parent must
/// be made inside that parent's scope.
struct SampledOnly;

impl<S> tracing_subscriber::layer::Filter<S> for SampledOnly
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(
        &self,
        _metadata: &tracing::Metadata<'_>,
        _cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        !ENTERED_UNSAMPLED.with(|entered| entered.borrow().last().copied().unwrap_or(false))
    }

    fn callsite_enabled(
        &self,
        _metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        // Decided span by span, by where it is made.
        tracing::subscriber::Interest::sometimes()
    }
}

/// The OpenTelemetry context of span `id`, or else of its nearest ancestor that has one: a span of
/// an unsampled trace has none of its own ([`SampledOnly`]) and carries on its adopting span's.
fn otel_context(id: &tracing::span::Id, dispatch: &Dispatch) -> Option<Context> {
    let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>() else {
        return tracing_opentelemetry::get_otel_context(id, dispatch);
    };
    let mut span = registry.span(id)?;
    loop {
        if let Some(cx) = tracing_opentelemetry::get_otel_context(&span.id(), dispatch) {
            return Some(cx);
        }
        span = span.parent()?;
    }
}

/// The OpenTelemetry context of `span` ([`otel_context`]); empty without one.
fn span_context(span: &tracing::Span) -> Context {
    span.with_subscriber(|(id, dispatch)| otel_context(id, dispatch))
        .flatten()
        .unwrap_or_default()
}

/// For tests: spans get trace ids as in production (nothing is exported), so trace context
/// travels between in-process services; logs go to the test writer only when `TEST_LOG` is set.
/// Harmless when a subscriber is already installed.
pub fn init_for_tests() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
    let provider = PROVIDER.get_or_init(|| {
        SdkTracerProvider::builder()
            .with_resource(resource("tests"))
            .build()
    });
    let otel = otel_layer(provider.tracer("tests")).with_filter(SampledOnly);
    let log = std::env::var_os("TEST_LOG").is_some().then(|| {
        tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
            )
    });
    let _ = tracing_subscriber::registry()
        .with(UnsampledMarks)
        .with(otel)
        .with(log)
        .try_init();
}

/// The installed subscriber, so the log formatter can ask the OpenTelemetry layer for a span's ids
/// (`tracing` does not let a subscriber reach the current dispatcher while it handles an event).
static GLOBAL_DISPATCH: OnceLock<WeakDispatch> = OnceLock::new();

/// One JSON object per log line: time, level, target, the event's fields, the fields of every
/// enclosing span (inner spans win), the current span's name, and its `trace_id`/`span_id`.
struct JsonWithTrace;

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = serde_json::Map::new();
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        line.insert("timestamp".into(), time.into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            let mut current = None;
            for span in scope.from_root() {
                {
                    let ext = span.extensions();
                    if let Some(fields) = ext.get::<FormattedFields<N>>() {
                        // `JsonMembers`: the members of an object, a later one overriding an
                        // earlier one of the same name.
                        if let Ok(serde_json::Value::Object(map)) =
                            serde_json::from_str::<serde_json::Value>(&format!("{{{fields}}}"))
                        {
                            line.extend(map);
                        }
                    }
                }
                current = Some((span.name(), span.id()));
            }
            if let Some((name, id)) = current {
                line.insert("span".into(), name.into());
                let cx = GLOBAL_DISPATCH
                    .get()
                    .and_then(WeakDispatch::upgrade)
                    .and_then(|d| otel_context(&id, &d));
                if let Some(cx) = cx {
                    let sc = cx.span().span_context().clone();
                    if sc.is_valid() {
                        line.insert("trace_id".into(), sc.trace_id().to_string().into());
                        line.insert("span_id".into(), sc.span_id().to_string().into());
                    }
                }
            }
        }
        let mut visitor = JsonVisitor(&mut line);
        event.record(&mut visitor);
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// A span's fields as the members of a JSON object, without the braces: `"a":1,"b":"x"`.
///
/// The fmt layer formats a span's fields when the span is created and again at every
/// `Span::record`, whether or not a log line ever shows them (most spans log nothing). With
/// `tracing_subscriber`'s `JsonFields`, every `record` parsed the span's JSON so far into a map
/// and wrote it out again: 5 % of the Scheduler's CPU in `make bench-e2e`, two records per saga
/// step, and one per HTTP request in every service. Here a record appends its members; a name
/// recorded twice appears twice, and [`JsonWithTrace`] keeps the later one when it reads them.
struct JsonMembers;

impl<'writer> FormatFields<'writer> for JsonMembers {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = MembersVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if !current.fields.is_empty() {
            current.fields.push(',');
        }
        self.format_fields(current.as_writer(), fields)
    }
}

/// Writes each field as a JSON member, separated by commas, straight into the span's text: a
/// string is escaped as it is written, a number or a boolean written as it is (no
/// `serde_json::Value` made and dropped per field).
struct MembersVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

/// `serde_json`'s writers over a `fmt::Write` (what it writes is UTF-8 in whole characters).
struct FmtIo<'a, 'w>(&'a mut Writer<'w>);

impl std::io::Write for FmtIo<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = std::str::from_utf8(buf).map_err(std::io::Error::other)?;
        fmt::Write::write_str(&mut self.0, text).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl MembersVisitor<'_, '_> {
    /// `"name":` after the separator; false once writing failed.
    fn name(&mut self, name: &str) -> bool {
        if self.result.is_err() {
            return false;
        }
        if !std::mem::take(&mut self.first) {
            self.result = fmt::Write::write_char(self.writer, ',');
        }
        self.result = self.result.and_then(|()| self.string(name));
        self.result = self
            .result
            .and_then(|()| fmt::Write::write_char(self.writer, ':'));
        self.result.is_ok()
    }

    /// `text` as a JSON string.
    fn string(&mut self, text: &str) -> fmt::Result {
        serde_json::to_writer(FmtIo(self.writer), text).map_err(|_| fmt::Error)
    }

    /// A member whose value is written as it displays (a number or a boolean).
    fn plain(&mut self, name: &str, value: impl fmt::Display) {
        if self.name(name) {
            self.result = write!(self.writer, "{value}");
        }
    }

    fn text(&mut self, name: &str, value: &str) {
        if self.name(name) {
            self.result = self.string(value);
        }
    }
}

impl tracing::field::Visit for MembersVisitor<'_, '_> {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        // JSON has no NaN or infinity: `null`, as `serde_json` writes them.
        if value.is_finite() {
            self.plain(field.name(), value);
        } else {
            self.plain(field.name(), "null");
        }
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.plain(field.name(), value);
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.plain(field.name(), value);
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.plain(field.name(), value);
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.text(field.name(), value);
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.text(field.name(), &format!("{value:?}"));
    }
}

struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

struct MapCarrier<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapView<'a>(&'a BTreeMap<String, String>);

impl Extractor for MapView<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes the current span's trace context (`traceparent`, `tracestate`) into message headers.
/// Without a current span, the current OpenTelemetry context counts (an unsampled request's, see
/// [`head_sample`]). Nothing is written when there is no valid current trace.
pub fn inject_current(headers: &mut BTreeMap<String, String>) {
    let cx = current_context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MapCarrier(headers));
    }
}

/// The current span's context, or else the current OpenTelemetry context.
fn current_context() -> Context {
    let cx = span_context(&tracing::Span::current());
    if cx.span().span_context().is_valid() {
        cx
    } else {
        Context::current()
    }
}

/// A head sampling decision (see [`head_sample`]).
pub enum Head {
    /// Record the request: its span is a child of this context (the caller's; empty for a new
    /// trace), see [`set_parent_context`].
    Record(Context),
    /// Create no span for it and run it under this unsampled span context (the caller's, or a
    /// new trace), so that what it sends on carries the unsampled flag and no service downstream
    /// records a fragment of the trace.
    Skip(Context),
}

/// Parent-based head sampling of a request at the door (a server span). A caller's valid trace
/// context in `headers` decides by its sampled flag; without one, `ratio` (0–1) of new traces
/// are sampled, the rest not.
pub fn head_sample(headers: &BTreeMap<String, String>, ratio: f64) -> Head {
    let caller = extract(headers);
    let sc = caller.span().span_context().clone();
    if sc.is_valid() {
        return if sc.is_sampled() {
            Head::Record(caller)
        } else {
            Head::Skip(caller)
        };
    }
    if ratio >= 1.0 || (ratio > 0.0 && rand::random::<f64>() < ratio) {
        return Head::Record(caller);
    }
    let unsampled = opentelemetry::trace::SpanContext::new(
        opentelemetry::trace::TraceId::from(rand::random::<u128>().max(1)),
        opentelemetry::trace::SpanId::from(rand::random::<u64>().max(1)),
        opentelemetry::trace::TraceFlags::default(),
        false,
        opentelemetry::trace::TraceState::default(),
    );
    Head::Skip(Context::new().with_remote_span_context(unsampled))
}

/// The trace context carried by message (or HTTP) headers; empty when there is none.
pub fn extract(headers: &BTreeMap<String, String>) -> Context {
    TraceContextPropagator::new().extract(&MapView(headers))
}

/// Makes `span` a child of the trace context in `headers`, if they carry a valid one.
pub fn set_parent(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    set_parent_context(span, extract(headers));
}

/// Makes `span` a child of `cx` (already extracted, e.g. by [`head_sample`]), if it is valid.
///
/// When `cx` is an unsampled trace's, the span's descendants are left out of OpenTelemetry
/// ([`SampledOnly`]): the SDK would drop them anyway. Call it before the span has children.
pub fn set_parent_context(span: &tracing::Span, cx: Context) {
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        let _ = span.set_parent(cx);
        if !sc.is_sampled() {
            span.with_subscriber(|(id, dispatch)| {
                if let Some(span) = dispatch
                    .downcast_ref::<tracing_subscriber::Registry>()
                    .and_then(|registry| registry.span(id))
                {
                    span.extensions_mut().insert(Unsampled);
                }
            });
        }
    }
}

/// Writes the current span's trace context into outgoing HTTP request headers (as
/// [`inject_current`] does into message headers).
pub fn inject_http(headers: &mut http::HeaderMap) {
    let cx = current_context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new()
            .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
    }
}

/// The trace id of `span` (32 hex digits), if it belongs to a trace.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span_context(span);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The `traceparent` value of `span`, if it belongs to a trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span_context(span);
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut headers = BTreeMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut MapCarrier(&mut headers));
    headers.remove(TRACEPARENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::trace::InMemorySpanExporter;

    #[test]
    fn context_travels_through_message_headers() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let mut headers = BTreeMap::new();
            let producer = tracing::info_span!("produce");
            let sent_trace = {
                let _g = producer.enter();
                inject_current(&mut headers);
                trace_id(&producer)
            };
            drop(producer);
            assert!(headers
                .get(TRACEPARENT)
                .is_some_and(|v| v.starts_with("00-")));
            let consumer = tracing::info_span!("consume");
            set_parent(&consumer, &headers);
            assert_eq!(trace_id(&consumer), sent_trace);
            drop(consumer);
        });
        let _ = provider.force_flush();
        let spans = exporter.get_finished_spans().unwrap_or_default();
        assert_eq!(spans.len(), 2);
        let produce = spans
            .iter()
            .find(|s| s.name == "produce")
            .map(|s| s.span_context.clone());
        let consume = spans.iter().find(|s| s.name == "consume");
        let (Some(produce), Some(consume)) = (produce, consume) else {
            panic!("both spans exported: {spans:?}");
        };
        assert_eq!(consume.span_context.trace_id(), produce.trace_id());
        assert_eq!(consume.parent_span_id, produce.span_id());
    }

    /// A log line carries the fields of its spans, those recorded after the span began too (the
    /// later value of a field recorded twice), with strings escaped and numbers, booleans and
    /// debug values as JSON has them.
    #[test]
    fn log_lines_carry_span_fields_recorded_later() {
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(JsonMembers)
                .event_format(JsonWithTrace)
                .with_writer(move || out.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!(
                "outer",
                delivery_id = "d-1",
                note = "a \"quoted\" word\n\u{1}é",
                ratio = 0.5,
                missing = f64::NAN,
                held = true,
                below = -3i64,
                shown = ?Some("x"),
            );
            let _o = outer.enter();
            let inner = tracing::info_span!(
                "inner",
                step = "ReserveDrone",
                attempt = tracing::field::Empty,
                outcome = tracing::field::Empty,
            );
            inner.record("attempt", 1);
            inner.record("outcome", "transient");
            inner.record("attempt", 2);
            let _i = inner.enter();
            tracing::info!(wait_ms = 5u64, "step retried");
        });
        let text = String::from_utf8(buffer.0.lock().map(|b| b.clone()).unwrap_or_default())
            .unwrap_or_default();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
        assert_eq!(line["delivery_id"], "d-1", "{text}");
        assert_eq!(line["note"], "a \"quoted\" word\n\u{1}é", "{text}");
        assert_eq!(line["ratio"], 0.5, "{text}");
        assert_eq!(line["missing"], serde_json::Value::Null, "{text}");
        assert_eq!(line["held"], true, "{text}");
        assert_eq!(line["below"], -3, "{text}");
        assert_eq!(line["shown"], "Some(\"x\")", "{text}");
        assert_eq!(line["step"], "ReserveDrone", "{text}");
        assert_eq!(line["attempt"], 2, "{text}");
        assert_eq!(line["outcome"], "transient", "{text}");
        assert_eq!(line["wait_ms"], 5, "{text}");
        assert_eq!(line["message"], "step retried", "{text}");
        assert_eq!(line["span"], "inner", "{text}");
    }

    /// Below a span that adopted an unsampled trace context, spans are left out of
    /// OpenTelemetry (it would drop them anyway), yet what they send on and log still carries that
    /// trace, unsampled. Under a sampled context every span is recorded as before.
    #[test]
    fn spans_below_an_unsampled_parent_are_left_out_of_opentelemetry() {
        const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(UnsampledMarks)
            .with(otel_layer(provider.tracer("test")).with_filter(SampledOnly));
        let own_context = |span: &tracing::Span| {
            span.with_subscriber(|(id, d)| tracing_opentelemetry::get_otel_context(id, d))
                .flatten()
        };
        tracing::subscriber::with_default(subscriber, || {
            for flags in ["00", "01"] {
                let caller = BTreeMap::from([(
                    TRACEPARENT.to_owned(),
                    format!("00-{TRACE}-00f067aa0ba902b7-{flags}"),
                )]);
                let root = tracing::info_span!("saga");
                set_parent(&root, &caller);
                let step = root.in_scope(|| tracing::info_span!("saga_step", step = "a"));
                let call = step.in_scope(|| tracing::info_span!("downstream_call"));
                let mut sent = BTreeMap::new();
                call.in_scope(|| inject_current(&mut sent));
                let traceparent = sent.get(TRACEPARENT).cloned().unwrap_or_default();
                assert!(
                    traceparent.starts_with(&format!("00-{TRACE}-"))
                        && traceparent.ends_with(&format!("-{flags}")),
                    "{flags}: {traceparent}"
                );
                assert_eq!(trace_id(&call).as_deref(), Some(TRACE), "{flags}");
                let recorded = flags == "01";
                assert_eq!(own_context(&step).is_some(), recorded, "{flags}");
                assert_eq!(own_context(&call).is_some(), recorded, "{flags}");
                drop((call, step, root));
            }
        });
        let names: Vec<String> = exporter
            .get_finished_spans()
            .unwrap_or_default()
            .iter()
            .map(|s| s.name.to_string())
            .collect();
        assert_eq!(names, ["downstream_call", "saga_step", "saga"]);
    }

    #[test]
    fn no_context_means_no_headers() {
        let mut headers = BTreeMap::new();
        inject_current(&mut headers);
        assert!(headers.is_empty());
        assert!(!extract(&headers).span().span_context().is_valid());
    }
}
