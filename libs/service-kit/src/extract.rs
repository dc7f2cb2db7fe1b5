//! Request extractors whose failures are problem+json naming the field.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{FromRequest, HttpRequest};
use contracts::validation::FromJsonObject;

use crate::error::ApiError;

/// A JSON body parsed field by field: malformed JSON, a non-object body, and every missing or
/// invalid field become a `400` problem naming them; bodies over the limit a `413`; a non-JSON
/// `Content-Type` a `415`. Unknown fields are ignored.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: FromJsonObject + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let bytes = json_bytes(req, payload);
        Box::pin(async move { parse_json(&bytes.await?).map(Json) })
    }
}

/// A JSON request's body, read in full: a non-JSON `Content-Type` is a `415`, a body over the
/// limit a `413`, one that cannot be read a `400`.
pub(crate) fn json_bytes(
    req: &HttpRequest,
    payload: &mut Payload,
) -> impl Future<Output = Result<Bytes, ApiError>> + 'static {
    let content_type_ok = match req.headers().get(header::CONTENT_TYPE) {
        None => true,
        Some(v) => v
            .to_str()
            .map(|s| {
                let s = s.to_ascii_lowercase();
                s.starts_with("application/json") || s.contains("+json")
            })
            .unwrap_or(false),
    };
    let limit = req.app_data::<BodyLimit>().map_or(64 * 1024, |l| l.0);
    let bytes = Bytes::from_request(req, payload);
    async move {
        if !content_type_ok {
            return Err(ApiError::UnsupportedMediaType(
                "Content-Type must be application/json".into(),
            ));
        }
        let bytes = bytes
            .await
            .map_err(|e| match e.as_error::<PayloadError>() {
                Some(PayloadError::Overflow) => ApiError::PayloadTooLarge(limit),
                _ => ApiError::BadRequest {
                    code: "unreadable-body",
                    detail: format!("the request body could not be read: {e}"),
                },
            })?;
        Ok(bytes)
    }
}

/// Parses a JSON body field by field (see [`Json`]); for handlers that read the bytes themselves,
/// e.g. to accept an empty body.
pub fn parse_json<T: FromJsonObject>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::field("body", "a JSON object is required"));
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    T::from_json_value(value).map_err(ApiError::Validation)
}

/// True for an optional body that is not there: empty, white space, or JSON `null`.
pub fn is_absent(bytes: &[u8]) -> bool {
    let text = bytes.trim_ascii();
    text.is_empty() || text == b"null"
}

/// The body limit in force, stored next to actix's `PayloadConfig` so errors can state it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimit(pub usize);

/// Checks an id taken from the path: 1 to 128 characters of letters, digits, `-`, `_`, `.`, `:`.
pub fn valid_id<'a>(field: &str, id: &'a str) -> Result<&'a str, ApiError> {
    if contracts::validation::is_identifier(id) {
        Ok(id)
    } else {
        Err(ApiError::field(
            field,
            "must be 1-128 characters of letters, digits, '-', '_', '.', ':'",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("id", "drone-001").is_ok());
        assert!(valid_id("id", "").is_err());
        assert!(valid_id("id", "a b").is_err());
        assert!(valid_id("id", &"x".repeat(129)).is_err());
    }
}
