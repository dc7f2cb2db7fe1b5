//! The one mapping from error kinds to HTTP statuses, rendered as `application/problem+json`
//! (RFC 9457) with a stable `code`. 5xx bodies say nothing internal; the cause chain goes to the log.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use contracts::validation::FieldError;
use contracts::Problem;

use crate::db::{classify, DbErrorKind};

pub type ApiResult<T> = Result<T, ApiError>;

pub const PROBLEM_JSON: &str = "application/problem+json";
const PROBLEM_BASE: &str = "https://drone-delivery.dev/problems/";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// One or more fields are missing or invalid.
    #[error("invalid request: {}", summary(.0))]
    Validation(Vec<FieldError>),
    /// The body is not JSON at all.
    #[error("malformed JSON body: {0}")]
    MalformedJson(String),
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: String },
    /// Well-formed, but a business rule refuses it (a pickup time in the past, ...): `422`,
    /// naming the fields.
    #[error("refused: {}", summary(.0))]
    Unprocessable(Vec<FieldError>),
    /// A `422` with a code and title of its own (a refusal a caller tells apart from
    /// `rule-violated`, e.g. ThirdParty's `no-carrier-serves-route`), naming the fields.
    #[error("{detail}")]
    Refused {
        code: &'static str,
        title: &'static str,
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{what} '{id}' does not exist")]
    NotFound { what: &'static str, id: String },
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("too many requests; retry after {retry_after} s")]
    RateLimited { retry_after: u64 },
    /// A retryable condition: the caller should try again after `retry_after` seconds.
    #[error("{detail}")]
    Unavailable {
        code: &'static str,
        detail: String,
        retry_after: u64,
    },
    /// Load shed: the service has as much work under way as it can finish in time. Not logged
    /// (a line per refusal would cost an overloaded service more than the refusal itself); the
    /// service counts its refusals in a metric.
    #[error(
        "too many requests in flight; nothing was accepted, please retry after {retry_after} s"
    )]
    Overloaded { retry_after: u64 },
    /// Anything else. Logged with its full cause chain; the client sees a generic message.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

fn summary(errors: &[FieldError]) -> String {
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    match fields.len() {
        1 => format!("1 invalid field: {}", fields.join(", ")),
        n => format!("{n} invalid fields: {}", fields.join(", ")),
    }
}

impl ApiError {
    pub fn field(field: &str, reason: impl Into<String>) -> Self {
        ApiError::Validation(vec![FieldError::new(field, reason)])
    }

    /// A `422`: `field` is well-formed but a business rule refuses it.
    pub fn rule(field: &str, reason: impl Into<String>) -> Self {
        ApiError::Unprocessable(vec![FieldError::new(field, reason)])
    }

    /// A `422` with its own `code` and `title`, the `detail` and the fields in the way.
    pub fn refused(
        code: &'static str,
        title: &'static str,
        detail: impl Into<String>,
        errors: Vec<FieldError>,
    ) -> Self {
        ApiError::Refused {
            code,
            title,
            detail: detail.into(),
            errors,
        }
    }

    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        ApiError::NotFound {
            what,
            id: id.into(),
        }
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::Conflict {
            code,
            detail: detail.into(),
        }
    }

    pub fn unavailable(code: &'static str, detail: impl Into<String>, retry_after: u64) -> Self {
        ApiError::Unavailable {
            code,
            detail: detail.into(),
            retry_after,
        }
    }

    /// A problem for a bare status produced outside our handlers (unknown route, wrong method, ...).
    pub fn for_status(status: StatusCode) -> Self {
        let reason = status.canonical_reason().unwrap_or("error").to_owned();
        match status.as_u16() {
            401 => ApiError::Unauthorized(reason),
            403 => ApiError::Forbidden(reason),
            404 => ApiError::BadRequest {
                code: "route-not-found",
                detail: "no such route".into(),
            },
            405 => ApiError::BadRequest {
                code: "method-not-allowed",
                detail: "this route does not accept that method".into(),
            },
            413 => ApiError::PayloadTooLarge(0),
            415 => ApiError::UnsupportedMediaType(reason),
            429 => ApiError::RateLimited { retry_after: 1 },
            s if s >= 500 => ApiError::unavailable("server-error", reason, 1),
            _ => ApiError::BadRequest {
                code: "bad-request",
                detail: reason,
            },
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Validation(_) => "validation-failed",
            ApiError::MalformedJson(_) => "malformed-json",
            ApiError::BadRequest { code, .. } => code,
            ApiError::Unprocessable(_) => "rule-violated",
            ApiError::Refused { code, .. } => code,
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound { .. } => "not-found",
            ApiError::Conflict { code, .. } => code,
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::RateLimited { .. } => "rate-limited",
            ApiError::Unavailable { code, .. } => code,
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::Internal(_) => "internal-error",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::Validation(_) => "Invalid request",
            ApiError::MalformedJson(_) => "Malformed JSON",
            ApiError::BadRequest { code, .. } if *code == "route-not-found" => "Not found",
            ApiError::BadRequest { code, .. } if *code == "method-not-allowed" => {
                "Method not allowed"
            }
            ApiError::BadRequest { .. } => "Bad request",
            ApiError::Unprocessable(_) => "Refused by a business rule",
            ApiError::Refused { title, .. } => title,
            ApiError::Unauthorized(_) => "Authentication required",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::NotFound { .. } => "Not found",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::PayloadTooLarge(_) => "Payload too large",
            ApiError::UnsupportedMediaType(_) => "Unsupported media type",
            ApiError::RateLimited { .. } => "Too many requests",
            ApiError::Unavailable { .. } => "Temporarily unavailable",
            ApiError::Overloaded { .. } => "Overloaded",
            ApiError::Internal(_) => "Internal error",
        }
    }

    pub(crate) fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after }
            | ApiError::Unavailable { retry_after, .. }
            | ApiError::Overloaded { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// Logs what the answer does not say: an internal error's cause chain, and an unavailable
    /// answer. Once per error answered (a whole request's, or one item's of a batch).
    pub(crate) fn log(&self) {
        match self {
            ApiError::Internal(e) => tracing::error!(error = format!("{e:#}"), "request failed"),
            ApiError::Unavailable { code, detail, .. } => {
                tracing::warn!(code, detail, "request answered as unavailable")
            }
            _ => {}
        }
    }

    /// The problem body clients receive.
    pub fn problem(&self) -> Problem {
        let status = self.status_code();
        let detail = match self {
            ApiError::Internal(_) => {
                "the server failed to handle this request; it has been logged".to_owned()
            }
            ApiError::PayloadTooLarge(0) => "request body is too large".to_owned(),
            other => other.to_string(),
        };
        Problem {
            kind: format!("{PROBLEM_BASE}{}", self.code()),
            title: self.title().to_owned(),
            status: status.as_u16(),
            detail: Some(detail),
            code: self.code().to_owned(),
            instance: None,
            errors: match self {
                ApiError::Validation(errors)
                | ApiError::Unprocessable(errors)
                | ApiError::Refused { errors, .. } => errors.clone(),
                _ => Vec::new(),
            },
            request_id: None,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) | ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::BadRequest { code, .. } => match *code {
                "route-not-found" => StatusCode::NOT_FOUND,
                "method-not-allowed" => StatusCode::METHOD_NOT_ALLOWED,
                _ => StatusCode::BAD_REQUEST,
            },
            ApiError::Unprocessable(_) | ApiError::Refused { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } | ApiError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        self.log();
        let mut builder = HttpResponse::build(self.status_code());
        builder.insert_header((header::CONTENT_TYPE, PROBLEM_JSON));
        if let Some(secs) = self.retry_after() {
            builder.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        if matches!(self, ApiError::Unauthorized(_)) {
            builder.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        builder.body(serde_json::to_vec(&self.problem()).unwrap_or_default())
    }
}

/// An error's answer encoded once and sent many times: for load shedding, where the refusal must
/// cost a fraction of the work it refuses (see [`crate::ServiceBuilder::shed`]).
#[derive(Clone)]
pub struct CannedResponse {
    status: StatusCode,
    headers: header::HeaderMap,
    body: actix_web::web::Bytes,
}

impl CannedResponse {
    /// What `error` answers (status, headers and problem body), as it is now.
    pub fn of(error: &ApiError) -> Self {
        let response = error.error_response();
        Self {
            status: response.status(),
            headers: response.headers().clone(),
            body: serde_json::to_vec(&error.problem())
                .unwrap_or_default()
                .into(),
        }
    }

    /// The answer, again.
    pub fn response(&self) -> HttpResponse {
        let mut response = HttpResponse::with_body(self.status, self.body.clone());
        *response.headers_mut() = self.headers.clone();
        response.map_into_boxed_body()
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(err: sea_orm::DbErr) -> Self {
        match classify(&err) {
            DbErrorKind::UniqueViolation => ApiError::conflict(
                "already-exists",
                "a resource with the same identity already exists",
            ),
            DbErrorKind::Unavailable => {
                tracing::warn!(error = %err, "database unavailable");
                ApiError::unavailable("database-unavailable", "the database is unavailable", 2)
            }
            _ => ApiError::Internal(anyhow::Error::new(err).context("database error")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_codes_and_bodies() {
        let v = ApiError::Validation(vec![
            FieldError::new("ownerId", "is required"),
            FieldError::new("size", "unknown variant"),
        ]);
        assert_eq!(v.status_code(), StatusCode::BAD_REQUEST);
        let p = v.problem();
        assert_eq!(p.code, "validation-failed");
        assert_eq!(p.errors.len(), 2);
        assert_eq!(
            p.detail.as_deref(),
            Some("invalid request: 2 invalid fields: ownerId, size")
        );

        let internal = ApiError::Internal(anyhow::anyhow!("secret connection string"));
        assert_eq!(internal.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!internal
            .problem()
            .detail
            .unwrap_or_default()
            .contains("secret"));

        let busy = ApiError::unavailable("no-drone-available", "none free", 30);
        let resp = busy.error_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            resp.headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("30")
        );
        assert_eq!(
            resp.headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some(PROBLEM_JSON)
        );
        assert_eq!(
            ApiError::for_status(StatusCode::METHOD_NOT_ALLOWED).status_code(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
