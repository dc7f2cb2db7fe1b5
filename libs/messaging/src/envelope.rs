use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{MessagingError, Result};

/// Every message on the log and the queues: who, what, which version, and a JSON body.
///
/// `B` is the body: a JSON value as consumers read it, or (for a producer on a hot path, see
/// [`Envelope::typed`]) the typed event itself, encoded without building the value first. Both
/// encode to the same record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<B = serde_json::Value> {
    /// Unique per event; consumers dedupe on it.
    pub id: Uuid,
    /// Event type, e.g. `delivery.requested`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Version of the body's schema for this type.
    pub schema_version: u32,
    /// Partitioning key (the deliveryId).
    pub key: String,
    pub time: DateTime<Utc>,
    /// Free-form metadata, e.g. `traceparent`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub body: B,
}

/// An envelope encoded for the log, with the key its partition comes from; made by
/// [`Envelope::encoded`], appended by `PartitionedLog::append_encoded`.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub(crate) key: String,
    pub(crate) bytes: Vec<u8>,
}

impl<B: Serialize> Envelope<B> {
    /// A new event whose body stays typed until it is encoded (with a fresh id, the current time
    /// and the current trace context, as [`Envelope::new`]): what a producer appending thousands
    /// a second uses, since it skips building the body's JSON value only to encode it.
    pub fn typed(kind: &str, schema_version: u32, key: &str, body: B) -> Self {
        let mut headers = BTreeMap::new();
        telemetry::inject_current(&mut headers);
        Self {
            id: Uuid::new_v4(),
            kind: kind.to_owned(),
            schema_version,
            key: key.to_owned(),
            time: Utc::now(),
            headers,
            body,
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name.to_owned(), value.to_owned());
        self
    }

    /// The record as stored on the log and the queues.
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| MessagingError::Encode(e.to_string()))
    }

    /// Encoded for `PartitionedLog::append_encoded` (the key moves into it).
    pub fn encoded(self) -> Result<Encoded> {
        let bytes = self.encode()?;
        Ok(Encoded {
            key: self.key,
            bytes,
        })
    }
}

impl Envelope {
    /// A new event with a fresh id and the current time.
    /// The current span's trace context goes into `headers` (`traceparent`), so the consumer's work
    /// joins the producer's trace.
    pub fn new(kind: &str, schema_version: u32, key: &str, body: &impl Serialize) -> Result<Self> {
        let body = serde_json::to_value(body).map_err(|e| MessagingError::Encode(e.to_string()))?;
        Ok(Envelope::typed(kind, schema_version, key, body))
    }

    /// The body as `T`, or the reason it does not fit. Read from the body in place (no copy of
    /// it first: every consumer decodes every event it reads).
    pub fn decode<T: DeserializeOwned>(&self) -> std::result::Result<T, String> {
        T::deserialize(&self.body)
            .map_err(|e| format!("{} v{}: {e}", self.kind, self.schema_version))
    }

    pub(crate) fn decode_one(bytes: &[u8]) -> std::result::Result<Envelope, Poison> {
        serde_json::from_slice(bytes)
            .map_err(|e| Poison::new(bytes, format!("undecodable envelope: {e}")))
    }

    /// Decodes a log batch; a batch that does not decode is one poison record.
    pub(crate) fn decode_batch(bytes: &[u8]) -> std::result::Result<Vec<Envelope>, Poison> {
        serde_json::from_slice(bytes)
            .map_err(|e| Poison::new(bytes, format!("undecodable log batch: {e}")))
    }
}

/// A message that could not be decoded, with why. Never retried; parked or skipped with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    pub reason: String,
    /// The raw bytes (truncated to 64 KiB).
    pub raw: Vec<u8>,
}

impl Poison {
    pub fn new(raw: &[u8], reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            raw: raw[..raw.len().min(64 * 1024)].to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_envelope_encodes_the_record_its_json_value_would() {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Booked<'a> {
            delivery_id: &'a str,
            weight: f64,
            stops: Vec<&'a str>,
        }
        let body = Booked {
            delivery_id: "d-1",
            weight: 2.5,
            stops: vec!["a", "b \"quoted\""],
        };
        let typed = Envelope::typed("delivery.requested", 1, "d-1", &body)
            .with_header("x-request-id", "r-1");
        let as_value = Envelope {
            id: typed.id,
            kind: typed.kind.clone(),
            schema_version: 1,
            key: "d-1".into(),
            time: typed.time,
            headers: typed.headers.clone(),
            body: serde_json::to_value(&body).unwrap_or_default(),
        };
        let record = typed.encoded().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(record.key, "d-1");
        let as_read =
            Envelope::decode_one(&record.bytes).unwrap_or_else(|p| panic!("{}", p.reason));
        assert_eq!(as_read, as_value);
    }

    #[test]
    fn envelope_round_trips_and_decodes_bodies() {
        let e = Envelope::new("delivery.requested", 1, "k1", &serde_json::json!({"a": 1}))
            .map(|e| e.with_header("traceparent", "00-abc-def-01"));
        let e = e.ok();
        let bytes = e.as_ref().and_then(|e| e.encode().ok()).unwrap_or_default();
        let back = Envelope::decode_one(&bytes).ok();
        assert_eq!(back, e);
        let text = String::from_utf8(bytes).unwrap_or_default();
        assert!(text.contains("\"type\":\"delivery.requested\"") && text.contains("schemaVersion"));
        #[derive(Deserialize)]
        struct Body {
            a: u32,
        }
        assert_eq!(
            back.and_then(|b| b.decode::<Body>().ok()).map(|b| b.a),
            Some(1)
        );
    }

    #[test]
    fn garbage_is_poison_with_a_reason() {
        let p = Envelope::decode_one(b"not json").err();
        assert!(p.is_some_and(|p| p.reason.starts_with("undecodable envelope")));
        let p = Envelope::decode_batch(b"{\"x\":1}").err();
        assert!(p.is_some_and(|p| p.raw == b"{\"x\":1}"));
    }
}
