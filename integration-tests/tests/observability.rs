//! Observability end to end: one booking is one trace across Ingestion, the log, the Scheduler and
//! the four domain services; `/metrics` counts what the sagas did. Real PostgreSQL and RabbitMQ;
//! spans go to an in-memory exporter installed as this test process's global tracer.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step should panic

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{metrics, stop};
use integration_tests::{
    eventually, metric_sample as sample, spawn_suite, Backend, Suite, SuiteFaults,
};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};

const WAIT: Duration = Duration::from_secs(30);

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_booking_is_one_trace_across_every_service() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .with_resource(telemetry::resource("integration-tests"))
        .build();
    assert!(
        telemetry::init_with_provider("suite", &provider, "info", telemetry::LogFormat::Json),
        "this test process installs the global subscriber first"
    );

    let suite = spawn_suite(Backend::Postgres, SuiteFaults::default()).await;
    suite.account("acc-1", "active").await;
    // The account check calls Account (its copy is never fresh enough), so that every domain
    // service serves this saga: a check answered by the copy makes no call and has no span there.
    let scheduler = suite
        .start_scheduler(|s| s.scheduler.accounts.max_staleness_ms = 0)
        .await;
    let id = suite.book(&Suite::booking("acc-1", 5, "Small")).await;
    let workflow = suite.workflow(&scheduler, id, "completed", WAIT).await;

    // Spans end a little after the answers that reveal them: wait until the saga span is in.
    let spans = eventually(Duration::from_secs(20), "the saga span", async || {
        let _ = provider.force_flush();
        let spans = exporter.get_finished_spans().unwrap();
        if spans
            .iter()
            .any(|s| s.name == "booking saga" && attr(s, "delivery_id") == Some(id.to_string()))
        {
            Ok(spans)
        } else {
            Err(format!("{} other spans", spans.len()))
        }
    })
    .await;

    let booking = spans
        .iter()
        .find(|s| {
            attr(s, "service").as_deref() == Some("ingestion")
                && attr(s, "http.route").as_deref() == Some("/api/deliveryrequests")
                && attr(s, "http.request.method").as_deref() == Some("POST")
        })
        .expect("Ingestion's server span for the booking");
    let trace: TraceId = booking.span_context.trace_id();
    let in_trace: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect();
    let by_id: HashMap<SpanId, &SpanData> = in_trace
        .iter()
        .map(|s| (s.span_context.span_id(), *s))
        .collect();

    // Across the message hop: the saga span's parent is Ingestion's span that appended the event.
    let saga = in_trace
        .iter()
        .find(|s| s.name == "booking saga")
        .expect("the Scheduler's saga span is in the booking's trace");
    assert_eq!(attr(saga, "service").as_deref(), Some("scheduler"));
    assert_eq!(attr(saga, "delivery_id"), Some(id.to_string()));
    let parent = by_id
        .get(&saga.parent_span_id)
        .expect("the saga span's parent is in the trace");
    assert_eq!(
        attr(parent, "service").as_deref(),
        Some("ingestion"),
        "the saga continues Ingestion's span: {parent:?}"
    );

    // Every domain service served the saga inside the same trace, each call a child of the
    // Scheduler's client span, which descends from the saga span.
    let services: HashSet<String> = in_trace.iter().filter_map(|s| attr(s, "service")).collect();
    for expected in [
        "ingestion",
        "scheduler",
        "account",
        "package",
        "drone",
        "delivery",
    ] {
        assert!(
            services.contains(expected),
            "no {expected} span in the trace: {services:?}"
        );
    }
    for server in in_trace.iter().filter(|s| {
        matches!(
            attr(s, "service").as_deref(),
            Some("account" | "package" | "drone" | "delivery")
        )
    }) {
        let client = by_id
            .get(&server.parent_span_id)
            .unwrap_or_else(|| panic!("{} has its parent in the trace", server.name));
        assert!(attr(client, "peer.service").is_some(), "{client:?}");
        let mut up = *client;
        while up.name != "booking saga" {
            up = by_id
                .get(&up.parent_span_id)
                .unwrap_or_else(|| panic!("{} descends from the saga span", client.name));
        }
    }

    // Each step has a span with its attributes, under the saga span.
    for step in [
        "CheckAccount",
        "RegisterPackage",
        "ReserveDrone",
        "CreateDelivery",
    ] {
        let span = in_trace
            .iter()
            .find(|s| s.name == step && attr(s, "step").as_deref() == Some(step))
            .unwrap_or_else(|| panic!("a span for step {step}"));
        assert_eq!(attr(span, "outcome").as_deref(), Some("succeeded"));
        assert_eq!(attr(span, "attempt").as_deref(), Some("1"));
        assert_eq!(attr(span, "delivery_id"), Some(id.to_string()));
    }

    // The status API (and so the dashboard) shows the trace id.
    assert_eq!(
        workflow["traceId"].as_str(),
        Some(trace.to_string().as_str())
    );

    // A booking whose caller's trace is not sampled: no service records any span of it, and no
    // service starts a trace of its own on its way (a span cut off from its unsampled parent
    // would be a new, sampled root, and the services it called would record their part).
    let before = exporter.get_finished_spans().unwrap().len();
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let body = Suite::booking("acc-1", 6, "Small");
    let token = suite.ingestion.token("acc-1", &[]);
    let reply = suite
        .ingestion
        .app
        .client
        .post(suite.ingestion.app.url("/api/deliveryrequests"))
        .bearer_auth(token)
        .header("traceparent", format!("00-{unsampled}-b7ad6b7169203331-00"))
        .json(&body)
        .send()
        .await
        .expect("the booking");
    assert_eq!(reply.status(), 202);
    let quiet: serde_json::Value = reply.json().await.expect("the answer");
    let quiet = quiet["deliveryId"]
        .as_str()
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .expect("deliveryId");
    let workflow = suite.workflow(&scheduler, quiet, "completed", WAIT).await;
    assert_eq!(workflow["traceId"].as_str(), Some(unsampled));
    let _ = provider.force_flush();
    let spans = exporter.get_finished_spans().unwrap();
    let new: Vec<&SpanData> = spans[before..]
        .iter()
        .filter(|s| {
            s.span_context.trace_id().to_string() == unsampled
                || attr(s, "delivery_id") == Some(quiet.to_string())
                || matches!(
                    attr(s, "service").as_deref(),
                    Some("account" | "package" | "drone" | "delivery")
                )
        })
        .collect();
    assert!(new.is_empty(), "spans of the unsampled booking: {new:#?}");
    stop(suite, scheduler).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_what_the_sagas_did() {
    telemetry::init_for_tests();
    let suite = spawn_suite(Backend::Postgres, SuiteFaults::default()).await;
    suite.account("acc-1", "active").await;
    suite.account("acc-2", "suspended").await;
    let scheduler = suite.start_scheduler(|_| {}).await;
    let mut ok = Vec::new();
    for hours in 1..=3 {
        ok.push(suite.book(&Suite::booking("acc-1", hours, "Small")).await);
    }
    let refused = suite.book(&Suite::booking("acc-2", 4, "Small")).await;
    for id in &ok {
        suite.workflow(&scheduler, *id, "completed", WAIT).await;
    }
    suite.workflow(&scheduler, refused, "failed", WAIT).await;

    let text = metrics(&scheduler).await;
    assert_eq!(sample(&text, "saga_started_total"), Some(4.0), "{text}");
    assert_eq!(
        sample(&text, "saga_finished_total{state=\"scheduled\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "saga_finished_total{state=\"failed\"}"),
        Some(1.0),
        "{text}"
    );
    for (step, outcome, count) in [
        ("CheckAccount", "succeeded", 3.0),
        ("CheckAccount", "permanent", 1.0),
        ("RegisterPackage", "succeeded", 3.0),
        ("ReserveDrone", "succeeded", 3.0),
        ("CreateDelivery", "succeeded", 3.0),
    ] {
        assert_eq!(
            sample(
                &text,
                &format!(
                    "saga_step_duration_seconds_count{{outcome=\"{outcome}\",step=\"{step}\"}}"
                )
            ),
            Some(count),
            "{step} {outcome}: {text}"
        );
    }
    assert!(
        text.contains("scheduler_partition_lag_seconds{partition="),
        "{text}"
    );
    assert!(text.contains("saga_outbox_backlog"), "{text}");

    // Ingestion counts requests by route and status, with latency histograms.
    let text = metrics(&suite.ingestion.app).await;
    let accepted: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("http_requests_total{")
                && l.contains("endpoint=\"/api/deliveryrequests\"")
                && l.contains("method=\"POST\"")
                && l.contains("status=\"202\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(accepted, 4.0, "{text}");
    assert!(
        text.contains("http_requests_duration_seconds_bucket{"),
        "{text}"
    );
    stop(suite, scheduler).await;
}
