use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validation::FieldError;

/// An RFC 9457 problem details body (`application/problem+json`), with a stable `code`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// A URI naming the kind of problem; stable across releases.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Short, stable machine-readable code, e.g. `validation-failed`, `no-drone-available`.
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Every invalid field, for validation problems.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_round_trips_with_type_key() {
        let p = Problem {
            kind: "https://problems.drone-delivery.dev/validation-failed".into(),
            title: "Invalid request".into(),
            status: 400,
            detail: Some("1 invalid field: ownerId".into()),
            code: "validation-failed".into(),
            instance: Some("/api/packages/x".into()),
            errors: vec![FieldError::new("ownerId", "is required")],
            request_id: Some("r1".into()),
        };
        let v = serde_json::to_value(&p).unwrap_or_default();
        assert_eq!(v["type"], p.kind);
        assert_eq!(v["requestId"], "r1");
        crate::round_trip(&p);
    }
}
