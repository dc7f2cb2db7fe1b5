//! Batch calls, server side ([`contracts::BatchRequest`]): the extractor that reads the items
//! and checks each one as its single call would, and the answer with one result per item.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, HttpResponse};
use contracts::validation::FromJsonObject;
use contracts::MAX_BATCH_ITEMS;
use serde::Serialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::extract::{json_bytes, valid_id};

/// A batch request's items, in order. The envelope must be `{"items": [...]}` with 1 to
/// [`MAX_BATCH_ITEMS`] items, each an object with a string `id` and an object `body`; anything else
/// refuses the whole request (`400`, naming the field, e.g. `items[3].id`). An item whose id or
/// body the single call would refuse keeps its place with that refusal, so it is answered on its
/// own and the others go ahead.
#[derive(Debug)]
pub struct Batch<T>(pub Vec<BatchEntry<T>>);

/// One item of a [`Batch`]: its id as sent, and its body, or why the single call would refuse it.
#[derive(Debug)]
pub struct BatchEntry<T> {
    pub id: String,
    pub body: Result<T, ApiError>,
}

impl<T: FromJsonObject + 'static> FromRequest for Batch<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let bytes = json_bytes(req, payload);
        Box::pin(async move { parse_batch(&bytes.await?).map(Batch) })
    }
}

impl<T> Batch<T> {
    /// The items the single call would take (id and body), in order: what the service acts on.
    pub fn valid(&self) -> Vec<(&str, &T)> {
        self.0
            .iter()
            .filter_map(|e| Some((e.id.as_str(), e.body.as_ref().ok()?)))
            .collect()
    }

    /// The `200` answer: each refused item with its refusal, the others with `answers` (one per
    /// item of [`valid`](Self::valid), in its order; each the single call's status and body, or
    /// its refusal).
    pub fn reply<R: Serialize>(
        &self,
        answers: impl IntoIterator<Item = Result<(StatusCode, Option<R>), ApiError>>,
    ) -> HttpResponse {
        let mut answers = answers.into_iter();
        let mut reply = BatchReply::with_capacity(self.0.len());
        for entry in &self.0 {
            match &entry.body {
                Err(refusal) => reply.refused(&entry.id, refusal),
                Ok(_) => reply.item(
                    &entry.id,
                    answers.next().unwrap_or_else(|| {
                        Err(ApiError::Internal(anyhow::anyhow!(
                            "batch item '{}' was not answered",
                            entry.id
                        )))
                    }),
                ),
            }
        }
        reply.finish()
    }
}

/// Parses a batch body (see [`Batch`]).
pub fn parse_batch<T: FromJsonObject>(bytes: &[u8]) -> Result<Vec<BatchEntry<T>>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::field("body", "a JSON object is required"));
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let Value::Object(mut envelope) = value else {
        return Err(ApiError::field("body", "a JSON object is required"));
    };
    let items = match envelope.remove("items") {
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::field("items", "must be an array")),
        None => return Err(ApiError::field("items", "is required")),
    };
    if items.is_empty() || items.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::field(
            "items",
            format!(
                "must hold 1 to {MAX_BATCH_ITEMS} items, not {}",
                items.len()
            ),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(mut item) = item else {
                return Err(ApiError::field(
                    &format!("items[{i}]"),
                    "must be an object with an id and a body",
                ));
            };
            let id = match item.remove("id") {
                Some(Value::String(id)) => id,
                _ => {
                    return Err(ApiError::field(
                        &format!("items[{i}].id"),
                        "is required, as a string",
                    ))
                }
            };
            let body = match item.remove("body") {
                Some(body @ Value::Object(_)) => body,
                Some(_) => {
                    return Err(ApiError::field(
                        &format!("items[{i}].body"),
                        "must be a JSON object",
                    ))
                }
                None => return Err(ApiError::field(&format!("items[{i}].body"), "is required")),
            };
            let body = match valid_id("id", &id) {
                Ok(_) => T::from_json_value(body).map_err(ApiError::Validation),
                Err(e) => Err(e),
            };
            Ok(BatchEntry { id, body })
        })
        .collect()
}

/// A batch's answer, written one item at a time: `200` with `{"results": [...]}`
/// ([`contracts::BatchAnswer`]). Each item's body is encoded once, straight into the answer.
#[derive(Debug)]
pub struct BatchReply {
    buf: Vec<u8>,
    items: usize,
}

impl BatchReply {
    /// An answer for `items` items.
    pub fn with_capacity(items: usize) -> Self {
        let mut buf = Vec::with_capacity(32 + items * 384);
        buf.extend_from_slice(b"{\"results\":[");
        Self { buf, items: 0 }
    }

    /// What the single call would have answered for item `id`: `status` with `body` (none for
    /// a single call that answers without one), or the refusal.
    pub fn item<T: Serialize>(
        &mut self,
        id: &str,
        answer: Result<(StatusCode, Option<T>), ApiError>,
    ) {
        match answer {
            Ok((status, body)) => self.answered(id, status, None, |buf| match body {
                Some(body) => serde_json::to_writer(buf, &body),
                None => {
                    buf.extend_from_slice(b"null");
                    Ok(())
                }
            }),
            Err(error) => self.refused(id, &error),
        }
    }

    /// Item `id` refused as the single call would have refused it (logged as that call's answer
    /// would be).
    pub fn refused(&mut self, id: &str, error: &ApiError) {
        error.log();
        let status = actix_web::ResponseError::status_code(error);
        self.answered(id, status, error.retry_after(), |buf| {
            serde_json::to_writer(buf, &error.problem())
        });
    }

    fn answered(
        &mut self,
        id: &str,
        status: StatusCode,
        retry_after: Option<u64>,
        body: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
    ) {
        let mark = self.buf.len();
        if self.items > 0 {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(b"{\"id\":");
        let written = serde_json::to_writer(&mut self.buf, id).and_then(|()| {
            self.buf.extend_from_slice(b",\"status\":");
            self.buf
                .extend_from_slice(status.as_u16().to_string().as_bytes());
            if let Some(secs) = retry_after {
                self.buf.extend_from_slice(b",\"retryAfter\":");
                self.buf.extend_from_slice(secs.to_string().as_bytes());
            }
            self.buf.extend_from_slice(b",\"body\":");
            body(&mut self.buf)
        });
        match written {
            Ok(()) => {
                self.buf.push(b'}');
                self.items += 1;
            }
            Err(e) => {
                // A body that cannot be encoded is this item's internal error, not the batch's.
                self.buf.truncate(mark);
                let error = ApiError::Internal(
                    anyhow::Error::new(e).context(format!("encoding batch item '{id}'")),
                );
                self.refused(id, &error);
            }
        }
    }

    /// The `200` answer.
    pub fn finish(mut self) -> HttpResponse {
        self.buf.extend_from_slice(b"]}");
        HttpResponse::Ok()
            .content_type("application/json")
            .body(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contracts::validation::{FieldError, Object};
    use contracts::BatchAnswer;

    #[derive(Debug, PartialEq, Serialize)]
    struct Thing {
        size: u32,
    }

    impl FromJsonObject for Thing {
        fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
            let size = o.required::<u32>("size");
            o.finish(|| Some(Thing { size: size? }))
        }
    }

    fn field_of(error: &ApiError) -> String {
        error
            .problem()
            .errors
            .first()
            .map(|e| e.field.clone())
            .unwrap_or_default()
    }

    #[test]
    fn items_are_checked_one_by_one_and_the_envelope_as_a_whole() {
        let entries = parse_batch::<Thing>(
            br#"{"items":[{"id":"a","body":{"size":1}},{"id":"b c","body":{"size":2}},{"id":"d","body":{"size":"x"}}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].id, "a");
        assert_eq!(entries[0].body.as_ref().ok(), Some(&Thing { size: 1 }));
        assert_eq!(
            entries[1].body.as_ref().err().map(field_of).as_deref(),
            Some("id")
        );
        assert_eq!(
            entries[2].body.as_ref().err().map(field_of).as_deref(),
            Some("size")
        );

        for (body, field) in [
            (&br#"[]"#[..], "body"),
            (br#"{}"#, "items"),
            (br#"{"items":{}}"#, "items"),
            (br#"{"items":[]}"#, "items"),
            (br#"{"items":[{"id":"a","body":{}},7]}"#, "items[1]"),
            (br#"{"items":[{"id":1,"body":{}}]}"#, "items[0].id"),
            (br#"{"items":[{"id":"a"}]}"#, "items[0].body"),
            (br#"{"items":[{"id":"a","body":[]}]}"#, "items[0].body"),
        ] {
            let error = parse_batch::<Thing>(body).err();
            assert_eq!(
                error.as_ref().map(field_of).as_deref(),
                Some(field),
                "{body:?}"
            );
        }
        let too_many = format!(
            "{{\"items\":[{}]}}",
            vec![r#"{"id":"a","body":{"size":1}}"#; MAX_BATCH_ITEMS + 1].join(",")
        );
        assert!(parse_batch::<Thing>(too_many.as_bytes()).is_err());
        assert!(matches!(
            parse_batch::<Thing>(b"{"),
            Err(ApiError::MalformedJson(_))
        ));
    }

    #[actix_web::test]
    async fn the_answer_holds_one_result_per_item_as_the_single_call_would_answer() {
        let mut reply = BatchReply::with_capacity(3);
        reply.item("a", Ok((StatusCode::CREATED, Some(Thing { size: 1 }))));
        reply.item::<Thing>("b", Ok((StatusCode::NO_CONTENT, None)));
        reply.item::<Thing>(
            "c",
            Err(ApiError::unavailable("no-drone-free", "all busy", 7)),
        );
        let response = reply.finish();
        assert_eq!(response.status(), StatusCode::OK);
        let body = actix_web::body::to_bytes(response.into_body())
            .await
            .unwrap_or_default();
        let answer: BatchAnswer =
            serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        let got: Vec<(String, u16, Option<u64>)> = answer
            .results
            .iter()
            .map(|r| (r.id.clone(), r.status, r.retry_after))
            .collect();
        assert_eq!(
            got,
            [
                ("a".to_owned(), 201, None),
                ("b".to_owned(), 204, None),
                ("c".to_owned(), 503, Some(7)),
            ]
        );
        assert_eq!(answer.results[0].body, serde_json::json!({"size": 1}));
        assert_eq!(answer.results[1].body, serde_json::Value::Null);
        assert_eq!(answer.results[2].body["code"], "no-drone-free");
    }
}
