//! Signed webhooks of client accounts (Ingestion): the registration body, what the API answers
//! about endpoints and deliveries, and the event a receiver gets.
//!
//! A receiver verifies a POST by computing `HMAC-SHA256(secret, "{Webhook-Timestamp}.{body}")`
//! over the raw body bytes and comparing its lowercase hex with the `v1=` value of
//! `Webhook-Signature`; `Webhook-Id` (= the event's `id`) is the same on every retry, so a
//! receiver that already handled it can answer 2xx again without acting twice.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validation::{FieldError, FromJsonObject, Object};
use crate::{DeliveryStage, RequestState, TimeWindow};

/// Most endpoints an account may register.
pub const MAX_WEBHOOK_URLS: usize = 5;
/// Longest endpoint URL accepted.
pub const MAX_WEBHOOK_URL_LEN: usize = 2048;
/// Header carrying the event id (stable across retries).
pub const WEBHOOK_ID_HEADER: &str = "Webhook-Id";
/// Header carrying the unix time (seconds) the attempt was signed at.
pub const WEBHOOK_TIMESTAMP_HEADER: &str = "Webhook-Timestamp";
/// Header carrying `v1=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
pub const WEBHOOK_SIGNATURE_HEADER: &str = "Webhook-Signature";

/// `PUT /api/webhooks`: the account's endpoints, replacing those registered before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WebhookRegistration {
    /// Absolute `https` URLs (`http` only where the server allows it), no credentials, no
    /// fragment, each at most once. Hosts that are or resolve to loopback, private, link-local
    /// or other non-public addresses are refused.
    #[schema(schema_with = urls_schema)]
    pub urls: Vec<String>,
}

/// `urls`: 1 to 5 distinct `uri` strings of at most 2048 characters.
fn urls_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaFormat, Type};
    let item = ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::Custom("uri".into())))
        .min_length(Some(1))
        .max_length(Some(MAX_WEBHOOK_URL_LEN))
        .pattern(Some("^[Hh][Tt][Tt][Pp][Ss]?://"));
    ArrayBuilder::new()
        .items(item)
        .min_items(Some(1))
        .max_items(Some(MAX_WEBHOOK_URLS))
        .unique_items(true)
        .description(Some(
            "Absolute https URLs (http only where the server allows it); no credentials, no \
             fragment; hosts that are or resolve to non-public addresses are refused",
        ))
        .build()
}

impl FromJsonObject for WebhookRegistration {
    /// The shape only (an array of 1 to 5 distinct URL-like strings): each URL's scheme, host
    /// and address are the server's policy and are checked there, named `urls[i]` alike.
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let urls = match o.required::<Value>("urls") {
            Some(Value::Array(items)) => {
                if items.is_empty() || items.len() > MAX_WEBHOOK_URLS {
                    o.error(
                        "urls",
                        format!(
                            "must hold 1 to {MAX_WEBHOOK_URLS} URLs, found {}",
                            items.len()
                        ),
                    );
                }
                let mut urls = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    let field = format!("urls[{i}]");
                    match item {
                        Value::String(s) => {
                            let url = s.trim().to_owned();
                            if let Err(reason) = url_shape(&url) {
                                o.error(&field, reason);
                            } else if let Some(first) = urls.iter().position(|u| *u == url) {
                                o.error(&field, format!("repeats urls[{first}]"));
                            }
                            urls.push(url);
                        }
                        _ => {
                            o.error(&field, "expected a URL string");
                            urls.push(String::new());
                        }
                    }
                }
                Some(urls)
            }
            Some(_) => {
                o.error("urls", "expected an array of URLs");
                None
            }
            None => None,
        };
        o.finish(|| Some(WebhookRegistration { urls: urls? }))
    }
}

/// What every endpoint URL must look like, whatever the server's policy.
fn url_shape(url: &str) -> Result<(), String> {
    let lower = url.to_ascii_lowercase();
    if url.is_empty() {
        Err("must not be empty".into())
    } else if url.len() > MAX_WEBHOOK_URL_LEN {
        Err(format!("must be at most {MAX_WEBHOOK_URL_LEN} characters"))
    } else if !(lower.starts_with("https://") || lower.starts_with("http://")) {
        Err("must be an absolute https URL".into())
    } else if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("must not contain spaces or control characters".into())
    } else {
        Ok(())
    }
}

/// `GET`/`PUT /api/webhooks`: the account's endpoints and the secret their POSTs are signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSubscription {
    pub account_id: String,
    pub urls: Vec<String>,
    /// The HMAC-SHA256 key (its UTF-8 bytes, as shown) of `Webhook-Signature`; created at the
    /// first registration and kept while the account has endpoints or deliveries.
    pub secret: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The kinds of webhook event, as receivers see them in `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum WebhookEventType {
    /// The booking is scheduled (drone reserved, delivery created).
    #[serde(rename = "booking.scheduled")]
    Scheduled,
    /// A reschedule of the booking took effect (`data.revision` counts them).
    #[serde(rename = "booking.rescheduled")]
    Rescheduled,
    #[serde(rename = "booking.cancelled")]
    Cancelled,
    /// Scheduling failed (`data.detail` says why); compensation follows.
    #[serde(rename = "booking.failed")]
    Failed,
    /// Everything a failed booking had done is undone.
    #[serde(rename = "booking.compensated")]
    Compensated,
    /// The package was handed over (tracking stage `Completed`).
    #[serde(rename = "booking.delivered")]
    Delivered,
}

impl WebhookEventType {
    pub const ALL: [WebhookEventType; 6] = [
        WebhookEventType::Scheduled,
        WebhookEventType::Rescheduled,
        WebhookEventType::Cancelled,
        WebhookEventType::Failed,
        WebhookEventType::Compensated,
        WebhookEventType::Delivered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEventType::Scheduled => "booking.scheduled",
            WebhookEventType::Rescheduled => "booking.rescheduled",
            WebhookEventType::Cancelled => "booking.cancelled",
            WebhookEventType::Failed => "booking.failed",
            WebhookEventType::Compensated => "booking.compensated",
            WebhookEventType::Delivered => "booking.delivered",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// The body of a webhook POST.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEvent {
    /// The event's id: the same on every retry, from every replica (also `Webhook-Id`).
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: WebhookEventType,
    pub delivery_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub data: WebhookEventData,
}

/// The booking as it stands after the event; fields the event does not know are absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEventData {
    /// The booking's state (absent on `booking.delivered`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RequestState>,
    /// The tracking stage (`booking.delivered` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<DeliveryStage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Reschedules applied so far (0 = as booked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drone_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_window: Option<TimeWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_off_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pickup_time: Option<DateTime<Utc>>,
    /// Where the drone was (`booking.delivered`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The carrier that takes the package part (or all) of the way, when the booking has a leg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier_leg: Option<crate::CarrierLeg>,
}

/// Where one event stands with one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookDeliveryStatus {
    /// Not delivered yet: waiting for its turn, for its next attempt, or being sent.
    Pending,
    /// A 2xx answered it.
    Delivered,
    /// Given up (retried for the whole retry period, or its endpoint was removed).
    Failed,
}

impl WebhookDeliveryStatus {
    pub const ALL: [WebhookDeliveryStatus; 3] = [
        WebhookDeliveryStatus::Pending,
        WebhookDeliveryStatus::Delivered,
        WebhookDeliveryStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookDeliveryStatus::Pending => "pending",
            WebhookDeliveryStatus::Delivered => "delivered",
            WebhookDeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// One event for one endpoint, with its attempts so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDelivery {
    pub id: Uuid,
    pub event_id: Uuid,
    #[serde(rename = "type")]
    pub kind: WebhookEventType,
    pub delivery_id: Uuid,
    pub url: String,
    pub status: WebhookDeliveryStatus,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status_code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the next attempt is due (pending deliveries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime<Utc>>,
}

/// `GET /api/webhooks/deliveries`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDeliveryPage {
    pub items: Vec<WebhookDelivery>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round_trip;
    use serde_json::json;

    fn fields(body: Value) -> Vec<String> {
        WebhookRegistration::from_json_value(body)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn registration_names_every_bad_url() {
        let ok = WebhookRegistration::from_json_value(json!({"urls": [" https://a.example/h "]}));
        assert_eq!(
            ok.ok().map(|r| r.urls),
            Some(vec!["https://a.example/h".into()])
        );
        assert_eq!(fields(json!({})), vec!["urls"]);
        assert_eq!(fields(json!({"urls": []})), vec!["urls"]);
        assert_eq!(fields(json!({"urls": "https://a.example"})), vec!["urls"]);
        assert_eq!(
            fields(json!({"urls": ["https://a.example", 3, "ftp://x", "https://a.example", ""]})),
            vec!["urls[1]", "urls[2]", "urls[3]", "urls[4]"]
        );
        let six: Vec<String> = (0..6).map(|i| format!("https://h{i}.example")).collect();
        assert_eq!(fields(json!({ "urls": six })), vec!["urls"]);
    }

    #[test]
    fn wire_spellings() {
        for t in WebhookEventType::ALL {
            assert_eq!(WebhookEventType::parse(t.as_str()), Some(t));
            assert_eq!(
                serde_json::to_value(t).ok(),
                Some(Value::String(t.as_str().into()))
            );
        }
        for s in WebhookDeliveryStatus::ALL {
            assert_eq!(WebhookDeliveryStatus::parse(s.as_str()), Some(s));
            round_trip(&s);
        }
        let now = Utc::now();
        round_trip(&WebhookEvent {
            id: Uuid::new_v4(),
            kind: WebhookEventType::Rescheduled,
            delivery_id: Uuid::new_v4(),
            occurred_at: now,
            data: WebhookEventData {
                state: Some(RequestState::Scheduled),
                revision: Some(1),
                carrier_leg: None,
                drone_id: Some("drone-001".into()),
                ..Default::default()
            },
        });
    }
}
