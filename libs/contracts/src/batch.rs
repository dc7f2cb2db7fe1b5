//! Batch calls: many calls of one kind to one service in one request (DESIGN §5, issue 19).
//!
//! A batch is `POST /api/<collection>/batch` with `{"items": [{"id": ..., "body": ...}, ...]}`;
//! each item is what the single call (`PUT /api/<collection>/{id}` with `body`) would carry. The
//! answer is `200` with one result per item, in the items' order: the status the single call
//! would have answered, its `Retry-After` in seconds when it had one, and its body (the resource
//! or a problem). Items are independent: one refused item never fails the others, and every item
//! keeps the single call's idempotency (same id, same effect, same answer). Only a failure of the
//! request as a whole (a malformed envelope, an unavailable database) answers a non-`200`, and it
//! then holds for every item.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Items in one batch request at most; a request with more is refused (`400`, field `items`).
pub const MAX_BATCH_ITEMS: usize = 64;

/// The last path segment of a batch call: `POST /api/<collection>/batch`.
pub const BATCH_SEGMENT: &str = "batch";

/// A batch request: the items, each one single call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchRequest<T> {
    /// 1 to 64 items; the same id may appear more than once (each is answered as its own call,
    /// in order).
    #[schema(min_items = 1, max_items = 64)]
    pub items: Vec<BatchItem<T>>,
}

/// One item of a batch: the id the single call takes in its path, and the body it sends. Both
/// are checked as the single call checks them, item by item: an item the single call would refuse
/// is answered with that refusal (`400`, naming the fields) in its own result, and the others go
/// ahead, so the document does not constrain them beyond their JSON types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchItem<T> {
    /// The id the single call takes in its path.
    pub id: String,
    /// The single call's body.
    #[schema(value_type = Object)]
    pub body: T,
}

/// The answer to a batch request: one result per item, in the items' order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchAnswer {
    pub results: Vec<BatchResult>,
}

/// What one item's single call would have answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchResult {
    /// The item's id, as sent.
    pub id: String,
    /// The HTTP status the single call would have answered.
    #[schema(minimum = 100, maximum = 599)]
    pub status: u16,
    /// Seconds to wait before trying this item again, when the single call would have sent
    /// `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// The single call's body: the resource on success, a problem (`application/problem+json`)
    /// on failure, `null` when the single call answers without a body.
    #[schema(value_type = Object, nullable)]
    pub body: serde_json::Value,
}
