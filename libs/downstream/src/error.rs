//! What a failed call means for the saga, and the one place that decides it (DESIGN §6).

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Deserialize;

/// Why a call to a domain service did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Trying again later may succeed: the service was unreachable, too slow, overloaded or
    /// failing (`5xx`, `408`, `429`). The caller retries with backoff, within its budget.
    #[error("{reason}")]
    Transient {
        /// What happened, for the journal and the logs.
        reason: String,
        /// How long the service asked us to wait (`Retry-After` in seconds), when it said so.
        retry_after: Option<Duration>,
    },
    /// Trying again cannot help: the service refused the request (`4xx` other than `408`/`429`),
    /// or answered something this client cannot understand. The saga fails at once.
    #[error("{reason}")]
    Permanent {
        /// What happened, for the journal and the logs.
        reason: String,
        /// The HTTP status, when the service answered at all.
        status: Option<u16>,
        /// The problem+json `code` (e.g. `not-found`, `package-conflict`), when the body had one.
        code: Option<String>,
    },
    /// The call was not made: the target service's circuit breaker is open (it has been failing),
    /// or its cap on concurrent calls is reached. Nothing reached the service. The caller waits
    /// `retry_after` (when the breaker lets a probe through) without counting it as an attempt:
    /// a saga parks as a durable timer, holding no slot.
    #[error("{reason}")]
    Rejected {
        /// Which service and why, for the journal and the logs.
        reason: String,
        /// When trying again can be let through.
        retry_after: Duration,
    },
}

impl CallError {
    /// True when the call may succeed if tried again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CallError::Transient { .. } | CallError::Rejected { .. }
        )
    }

    /// A failure before any answer arrived (connect error, timeout, broken connection).
    pub(crate) fn from_transport(call: &str, timeout: Duration, err: reqwest::Error) -> Self {
        // A request that could not even be built (bad header value, bad URL) fails the same way
        // every time; everything else is the network and may heal.
        let builder = err.is_builder();
        let what = if err.is_timeout() {
            format!("got no answer within {} ms", timeout.as_millis())
        } else if err.is_connect() {
            "could not connect".to_owned()
        } else {
            "failed".to_owned()
        };
        let reason = format!("{call} {what}: {}", chain(&err.without_url()));
        if builder {
            CallError::Permanent {
                reason,
                status: None,
                code: None,
            }
        } else {
            CallError::Transient {
                reason,
                retry_after: None,
            }
        }
    }

    /// An answer with a status other than the call's success statuses.
    pub(crate) fn from_status(
        call: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Self {
        let problem = ProblemBody::parse(body);
        let mut reason = format!("{call} answered {status}");
        if let Some(code) = &problem.code {
            reason.push_str(&format!(" ({code})"));
        }
        if let Some(detail) = problem.detail.or(problem.title) {
            reason.push_str(": ");
            reason.push_str(&detail);
        } else if !problem.is_json {
            let text = snippet(body);
            if !text.is_empty() {
                reason.push_str(": ");
                reason.push_str(&text);
            }
        }
        if is_transient_status(status) {
            CallError::Transient {
                reason,
                retry_after: retry_after(headers),
            }
        } else {
            CallError::Permanent {
                reason,
                status: Some(status.as_u16()),
                code: problem.code,
            }
        }
    }

    /// A success status whose body is not what the API promises.
    pub(crate) fn undecodable(call: &str, status: StatusCode, expected: &str, err: &str) -> Self {
        CallError::Permanent {
            reason: format!("{call} answered {status} with a body that is not {expected}: {err}"),
            status: Some(status.as_u16()),
            code: None,
        }
    }
}

fn is_transient_status(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// `Retry-After` in delta-seconds, the form the services send. The HTTP-date form is not used
/// inside the suite; it yields `None` and the caller falls back to its own backoff.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The problem+json `code` of an answer's body, when it has one.
pub(crate) fn problem_code(body: &[u8]) -> Option<String> {
    ProblemBody::parse(body).code
}

/// The fields of a problem+json body this client uses. Lenient on purpose: a problem from a proxy
/// or a foreign service may lack our `code`, and a body that is no JSON at all is still an answer.
#[derive(Debug, Default, Deserialize)]
struct ProblemBody {
    code: Option<String>,
    title: Option<String>,
    detail: Option<String>,
    #[serde(skip)]
    is_json: bool,
}

impl ProblemBody {
    fn parse(body: &[u8]) -> Self {
        match serde_json::from_slice::<ProblemBody>(body) {
            Ok(p) => ProblemBody { is_json: true, ..p },
            Err(_) => ProblemBody::default(),
        }
    }
}

/// The start of a non-JSON body (an HTML error page, a plain-text message), on one line.
fn snippet(body: &[u8]) -> String {
    const MAX_CHARS: usize = 200;
    let text = String::from_utf8_lossy(body);
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > MAX_CHARS {
        let cut: String = one_line.chars().take(MAX_CHARS).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

/// An error and its causes on one line (`a: b: c`), which is where reqwest keeps the useful part
/// ("Connection refused").
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(retry_after: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = retry_after {
            h.insert(
                RETRY_AFTER,
                HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("x")),
            );
        }
        h
    }

    const CALL: &str = "drone PUT /api/dronedeliveries/d1";

    #[test]
    fn overload_and_server_failures_are_transient_with_retry_after() {
        let body = br#"{"type":"t","title":"Temporarily unavailable","status":503,
                        "code":"no-drone-available","detail":"no Small drone is free"}"#;
        let e = CallError::from_status(
            CALL,
            StatusCode::SERVICE_UNAVAILABLE,
            &headers(Some("30")),
            body,
        );
        assert_eq!(
            e,
            CallError::Transient {
                reason: format!(
                    "{CALL} answered 503 Service Unavailable (no-drone-available): no Small drone is free"
                ),
                retry_after: Some(Duration::from_secs(30)),
            }
        );
        for status in [408, 429, 500, 502, 504] {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
            let e = CallError::from_status(CALL, status, &headers(Some("soon")), b"");
            assert!(e.is_transient(), "{status}");
            assert!(matches!(
                e,
                CallError::Transient {
                    retry_after: None,
                    ..
                }
            ));
        }
    }

    #[test]
    fn other_client_errors_are_permanent_with_status_and_code() {
        let body = br#"{"status":409,"code":"package-conflict","title":"Conflict"}"#;
        let e = CallError::from_status(CALL, StatusCode::CONFLICT, &headers(None), body);
        assert_eq!(
            e,
            CallError::Permanent {
                reason: format!("{CALL} answered 409 Conflict (package-conflict): Conflict"),
                status: Some(409),
                code: Some("package-conflict".into()),
            }
        );
        assert_eq!(
            e.to_string(),
            format!("{CALL} answered 409 Conflict (package-conflict): Conflict")
        );
        let redirect = CallError::from_status(CALL, StatusCode::FOUND, &headers(None), b"");
        assert!(matches!(
            redirect,
            CallError::Permanent {
                status: Some(302),
                ..
            }
        ));
        assert!(!redirect.is_transient());
    }

    #[test]
    fn non_json_bodies_are_tolerated_and_shortened() {
        let html = format!("<html>\n  <body>{}</body></html>", "x".repeat(500));
        let e = CallError::from_status(
            CALL,
            StatusCode::INTERNAL_SERVER_ERROR,
            &headers(None),
            html.as_bytes(),
        );
        let reason = e.to_string();
        assert!(e.is_transient());
        assert!(
            reason.contains("500 Internal Server Error: <html> <body>xxx"),
            "{reason}"
        );
        assert!(reason.chars().count() < CALL.len() + 260, "{reason}");

        let e = CallError::from_status(CALL, StatusCode::UNAUTHORIZED, &headers(None), b"nope");
        assert_eq!(
            e,
            CallError::Permanent {
                reason: format!("{CALL} answered 401 Unauthorized: nope"),
                status: Some(401),
                code: None,
            }
        );
    }
}
