//! Batching across callers: concurrent calls of the same kind to the same service (a package
//! registration, a drone reservation, a delivery creation) are sent as one batch request
//! (`POST /api/<collection>/batch`, [`contracts::BatchRequest`]) instead of one request each.
//!
//! Each kind of call has a [`Lane`]: a queue and at most `in_flight` requests under way. A call
//! joins the queue; when no request is under way, a sender starts at once and takes what is
//! queued, so a call to an idle service waits for nothing and goes out alone, as the single call
//! it always was. Calls that arrive while a request is under way queue up and leave together, up
//! to `max_items`, when it is answered. A further sender (up to `in_flight`) starts only for a
//! full batch, and stops when less than a full batch is left for the others: a request costs its
//! service and database about as much whether it carries one item or thirty, so below saturation
//! one request at a time, carrying what queued meanwhile, is the cheapest; once a full batch
//! waits, more requests at once keep up. Each item's answer is decoded
//! and classified exactly as its single call's would be (the same [`CallError`]s, the same
//! `Retry-After`), so retries stay per item and are the caller's, as before. A batch passes the
//! target's breaker and concurrency cap once, as one call: its verdict is unwell when the request
//! failed or any item failed as an unwell service fails.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use contracts::BATCH_SEGMENT;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::client::{send, Answer, Downstream, Outcome, Service};
use crate::error::problem_code;
use crate::protection::Verdict;
use crate::CallError;

/// How long a lane sends single calls after the service answered that it has no batch route
/// (an older version during a rolling update), before it tries a batch again.
const NO_BATCH_ROUTE_PAUSE: Duration = Duration::from_secs(60);

/// One kind of batchable call: which service, and how an item's answer becomes its result.
pub(crate) struct Lane<T> {
    service: Service,
    outcome: Outcome<T>,
    max_items: usize,
    in_flight: usize,
    state: Mutex<LaneState<T>>,
}

struct LaneState<T> {
    queue: VecDeque<Pending<T>>,
    /// Senders running (each sends one request at a time).
    senders: usize,
    /// Until when the service is known to have no batch route.
    singles_until: Option<Instant>,
}

/// A call waiting for its answer.
pub(crate) struct Pending<T> {
    id: String,
    /// The item's JSON body, encoded once by the caller.
    body: Vec<u8>,
    /// The caller's span: a single call is made inside it, a batch's request is its child.
    span: tracing::Span,
    reply: oneshot::Sender<Result<T, CallError>>,
}

impl<T: Send + 'static> Lane<T> {
    pub(crate) fn new(
        service: Service,
        outcome: Outcome<T>,
        max_items: usize,
        in_flight: usize,
    ) -> Self {
        Self {
            service,
            outcome,
            max_items: max_items.max(1),
            in_flight: in_flight.max(1),
            state: Mutex::new(LaneState {
                queue: VecDeque::new(),
                senders: 0,
                singles_until: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, LaneState<T>> {
        // The lock is never held across an await or a call that can panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues the call `PUT /api/<collection>/{id}` with `body` and waits for its result.
    pub(crate) async fn call(
        client: &Downstream,
        lane: fn(&Downstream) -> &Lane<T>,
        id: &str,
        body: Vec<u8>,
    ) -> Result<T, CallError> {
        let (reply, answer) = oneshot::channel();
        let this = lane(client);
        let start_sender = {
            let mut state = this.state();
            state.queue.push_back(Pending {
                id: id.to_owned(),
                body,
                span: tracing::Span::current(),
                reply,
            });
            let start = state.senders == 0
                || (state.senders < this.in_flight && state.queue.len() >= this.max_items);
            if start {
                state.senders += 1;
            }
            start
        };
        if start_sender {
            // A task of its own, so a caller that stops waiting does not strand the others.
            tokio::spawn(drain(client.clone(), lane));
        }
        answer.await.unwrap_or_else(|_| {
            Err(CallError::Transient {
                reason: format!(
                    "{} PUT of '{id}' was dropped before it was answered",
                    this.service.name()
                ),
                retry_after: None,
            })
        })
    }

    /// What to send next (empty: this sender has stopped, because nothing is queued, or less
    /// than a full batch is and another sender will take it), and whether it must go as single
    /// calls.
    fn next(&self) -> (Vec<Pending<T>>, bool) {
        let mut state = self.state();
        let take = state.queue.len().min(self.max_items);
        // A sender that is not the last one leaves less than a full batch to the others: it would
        // go out smaller, as one more request, than when the request under way is answered.
        if take == 0 || (state.senders > 1 && take < self.max_items) {
            state.senders -= 1;
            return (Vec::new(), false);
        }
        let singles = state
            .singles_until
            .is_some_and(|until| Instant::now() < until);
        (state.queue.drain(..take).collect(), singles)
    }

    fn no_batch_route(&self) {
        self.state().singles_until = Some(Instant::now() + NO_BATCH_ROUTE_PAUSE);
    }
}

/// A sender: sends what is queued until nothing is.
async fn drain<T: Send + 'static>(client: Downstream, lane: fn(&Downstream) -> &Lane<T>) {
    let lane = lane(&client);
    let mut running = Running {
        lane,
        stopped: false,
    };
    loop {
        let (items, singles) = lane.next();
        match items.len() {
            0 => {
                // `next` has counted this sender out.
                running.stopped = true;
                return;
            }
            1 => singly(&client, lane, items).await,
            _ if singles => singly(&client, lane, items).await,
            _ => batch(&client, lane, items).await,
        }
    }
}

/// Counts a sender out if it ends any other way than by finding the queue empty (a panic, or
/// its task aborted at shutdown), so the lane never waits for a sender that is gone.
struct Running<'a, T> {
    lane: &'a Lane<T>,
    stopped: bool,
}

impl<T> Drop for Running<'_, T> {
    fn drop(&mut self) {
        if !self.stopped {
            let mut state = self
                .lane
                .state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.senders = state.senders.saturating_sub(1);
        }
    }
}

/// Each item as its own call, all at once.
async fn singly<T: Send + 'static>(client: &Downstream, lane: &Lane<T>, items: Vec<Pending<T>>) {
    let calls = items.into_iter().map(|item| {
        let Pending {
            id,
            body,
            span,
            reply,
        } = item;
        async move {
            let result = client
                .exchange(lane.service, Method::PUT, &id, Some(body), lane.outcome)
                .instrument(span)
                .await;
            // The caller may have stopped waiting; the call's effect stands either way.
            let _ = reply.send(result);
        }
    });
    futures::future::join_all(calls).await;
}

/// A batch's answer as this client reads it: each item's body is kept as raw JSON and decoded by
/// the item's own outcome, as a single call's body is.
#[derive(Deserialize)]
struct RawAnswer<'a> {
    #[serde(borrow)]
    results: Vec<RawResult<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawResult<'a> {
    id: String,
    status: u16,
    #[serde(default)]
    retry_after: Option<u64>,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// The items as one batch request.
async fn batch<T: Send + 'static>(client: &Downstream, lane: &Lane<T>, items: Vec<Pending<T>>) {
    let service = lane.service;
    let call = format!(
        "{} POST /api/{}/{BATCH_SEGMENT} ({} items)",
        service.name(),
        service.collection(),
        items.len()
    );
    let (builder, url) = match client.request_at(service, Method::POST, BATCH_SEGMENT, None) {
        Ok(request) => request,
        Err(e) => return answer_all(items, &e),
    };
    let mut body = Vec::with_capacity(16 + items.iter().map(|i| i.body.len() + 48).sum::<usize>());
    body.extend_from_slice(b"{\"items\":[");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"id\":");
        // A string always serialises.
        let _ = serde_json::to_writer(&mut body, &item.id);
        body.extend_from_slice(b",\"body\":");
        body.extend_from_slice(&item.body);
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    let pass = match client.inner.protection.enter(service.index()).await {
        Ok(pass) => pass,
        Err(e) => return answer_all(items, &e),
    };
    // One client span for the request, a child of the first caller's (its trace carries on in
    // the service); the others' traces show their wait and their own outcome. Made inside the
    // caller's span rather than with an explicit parent: telemetry judges a span by the span
    // entered where it is made (it leaves unsampled traces out of OpenTelemetry).
    let span = items[0].span.in_scope(|| {
        tracing::info_span!(
            "downstream_call",
            otel.name = %format_args!("{} POST batch", service.name()),
            otel.kind = "client",
            peer.service = service.name(),
            http.request.method = "POST",
            url.path = url.path(),
            batch.size = items.len(),
        )
    });
    let mut trace_headers = HeaderMap::new();
    span.in_scope(|| telemetry::inject_http(&mut trace_headers));
    let builder = builder
        .header(CONTENT_TYPE, "application/json")
        .headers(trace_headers)
        .body(body);
    let started = Instant::now();
    let sent = send(builder, &call, client.inner.timeout)
        .instrument(span)
        .await;
    let answer = match sent {
        Ok(answer) => answer,
        Err(e) => {
            pass.finish(Verdict::of_transport(&e));
            tracing::warn!(service = service.name(), items = items.len(), reason = %e, "downstream batch failed");
            return answer_all(items, &e);
        }
    };
    if answer.status != StatusCode::OK {
        pass.finish(Verdict::of_answer(answer.status, || {
            problem_code(&answer.body)
        }));
        let code = problem_code(&answer.body);
        if matches!(
            answer.status,
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
        ) && code.as_deref() != Some("not-found")
        {
            // No batch route here (yet): these items and the next ones go as single calls.
            tracing::warn!(
                service = service.name(),
                status = answer.status.as_u16(),
                "the service has no batch route; sending single calls"
            );
            lane.no_batch_route();
            return singly(client, lane, items).await;
        }
        let error = answer.error(&call);
        tracing::warn!(service = service.name(), items = items.len(), status = answer.status.as_u16(), reason = %error, "downstream batch failed");
        return answer_all(items, &error);
    }
    let decoded: Result<RawAnswer<'_>, _> = serde_json::from_slice(&answer.body);
    let results = match decoded {
        Ok(raw)
            if raw.results.len() == items.len()
                && raw.results.iter().zip(&items).all(|(r, i)| r.id == i.id) =>
        {
            raw.results
        }
        Ok(raw) => {
            pass.finish(Verdict::Healthy);
            let error = CallError::undecodable(
                &call,
                answer.status,
                "one result per item in order",
                &format!("{} results for {} items", raw.results.len(), items.len()),
            );
            return answer_all(items, &error);
        }
        Err(e) => {
            pass.finish(Verdict::Healthy);
            let error = CallError::undecodable(&call, answer.status, "BatchAnswer", &e.to_string());
            return answer_all(items, &error);
        }
    };
    let mut verdict = Verdict::Healthy;
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    for (result, item) in results.into_iter().zip(items) {
        let status = StatusCode::from_u16(result.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let body = result.body.get().as_bytes();
        if Verdict::of_answer(status, || problem_code(body)) == Verdict::Unwell {
            verdict = Verdict::Unwell;
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = result.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        let path = format!("/api/{}/{}", service.collection(), item.id);
        let item_call = format!("{} PUT {path}", service.name());
        let outcome = (lane.outcome)(
            &item_call,
            Answer {
                status,
                headers,
                body: body.to_vec(),
            },
        );
        if let Err(e) = &outcome {
            let _entered = item.span.enter();
            tracing::warn!(
                service = service.name(),
                method = "PUT",
                path,
                status = result.status,
                transient = e.is_transient(),
                elapsed_ms,
                reason = %e,
                "downstream call failed"
            );
        }
        let _ = item.reply.send(outcome);
    }
    pass.finish(verdict);
}

/// The same failure for every item.
fn answer_all<T>(items: Vec<Pending<T>>, error: &CallError) {
    for item in items {
        let _ = item.reply.send(Err(error.clone()));
    }
}
