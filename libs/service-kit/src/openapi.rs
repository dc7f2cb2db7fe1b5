//! OpenAPI helpers shared by every service's document.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::Modify;

use crate::error::PROBLEM_JSON;

/// Declares the `serviceToken` (internal calls) and `clientToken` (client JWT) bearer schemes.
pub struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "serviceToken",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        let mut jwt = Http::new(HttpAuthScheme::Bearer);
        jwt.bearer_format = Some("JWT".into());
        components.add_security_scheme("clientToken", SecurityScheme::Http(jwt));
        // A drone's own key on its telemetry (Drone service).
        components.add_security_scheme(
            "droneKey",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// What every operation of every service can answer besides what its handler documents, added to
/// the document served at `/openapi.json` (see [`complete`]) so that it tells the truth without
/// each route repeating it.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Completes a service's document with what the service kit itself does on every route:
/// - errors are `application/problem+json` (a `Problem` documented as `application/json` moves);
/// - a secured operation can answer `401` (with `WWW-Authenticate`); one with parameters or a
///   body `400` (a parameter or field is invalid, every bad one named); one with a body `413`
///   (over the body limit) and `415` (not JSON); and every operation `503` when its database is
///   unavailable; `429` and `503` carry `Retry-After`;
/// - a string path parameter without a pattern or format is an identifier (see
///   [`contracts::validation::is_identifier`]: every id in a path is checked by `valid_id`).
pub fn complete(mut doc: serde_json::Value) -> serde_json::Value {
    use serde_json::{json, Value};

    let secured_by_default = doc
        .get("security")
        .and_then(Value::as_array)
        .is_some_and(|s| !s.is_empty());
    let problem = |description: &str| {
        json!({
            "description": description,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        })
    };
    let retry_after = json!({
        "description": "Seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"}
    });
    contracts::schema::at_least_one_of(&mut doc);
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return doc;
    };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        let path_params = item.get("parameters").cloned();
        for method in METHODS {
            let Some(op) = item.get_mut(method).and_then(Value::as_object_mut) else {
                continue;
            };
            if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                for p in params.iter_mut() {
                    if p.get("in").and_then(Value::as_str) != Some("path") {
                        continue;
                    }
                    if let Some(schema) = p.get_mut("schema").and_then(Value::as_object_mut) {
                        let plain_string = schema.get("type").and_then(Value::as_str)
                            == Some("string")
                            && !schema.contains_key("pattern")
                            && !schema.contains_key("format")
                            && !schema.contains_key("enum");
                        if plain_string {
                            schema.insert("pattern".into(), json!(contracts::ID_PATTERN));
                            schema.insert("minLength".into(), json!(1));
                            schema.insert("maxLength".into(), json!(contracts::MAX_ID));
                        }
                    }
                }
            }
            let has_params = op
                .get("parameters")
                .or(path_params.as_ref())
                .and_then(Value::as_array)
                .is_some_and(|p| !p.is_empty());
            let has_body = op.contains_key("requestBody");
            let secured = match op.get("security").and_then(Value::as_array) {
                Some(s) => s
                    .iter()
                    .any(|r| r.as_object().is_some_and(|r| !r.is_empty())),
                None => secured_by_default,
            };
            let responses = op
                .entry("responses")
                .or_insert_with(|| json!({}))
                .as_object_mut();
            let Some(responses) = responses else {
                continue;
            };
            for response in responses.values_mut() {
                spell_links(response);
                let Some(content) = response.get_mut("content").and_then(Value::as_object_mut)
                else {
                    continue;
                };
                let is_problem = content
                    .get("application/json")
                    .and_then(|c| c.pointer("/schema/$ref"))
                    .and_then(Value::as_str)
                    == Some("#/components/schemas/Problem");
                if is_problem {
                    if let Some(c) = content.remove("application/json") {
                        content.insert(PROBLEM_JSON.into(), c);
                    }
                }
            }
            let mut standard = Vec::new();
            if has_params || has_body {
                standard.push((
                    "400",
                    "Invalid request: a parameter or field is missing or invalid (every bad one is named)",
                ));
            }
            if secured {
                standard.push(("401", "Missing or invalid bearer token"));
            }
            if has_body {
                standard.push(("413", "Request body over the size limit"));
                standard.push(("415", "Content-Type is not JSON"));
            }
            standard.push((
                "503",
                "Temporarily unavailable (e.g. its database); nothing was done, retry after Retry-After",
            ));
            for (status, description) in standard {
                responses
                    .entry(status)
                    .or_insert_with(|| problem(description));
            }
            for (status, response) in responses.iter_mut() {
                let header = match status.as_str() {
                    "401" => (
                        "WWW-Authenticate",
                        json!({"description": "The scheme to authenticate with", "schema": {"type": "string"}}),
                    ),
                    "429" | "503" => ("Retry-After", retry_after.clone()),
                    _ => continue,
                };
                if let Some(response) = response.as_object_mut() {
                    let headers = response.entry("headers").or_insert_with(|| json!({}));
                    if let Some(headers) = headers.as_object_mut() {
                        headers.entry(header.0).or_insert(header.1);
                    }
                }
            }
        }
    }
    doc
}

/// utoipa 5.5 writes a response link's fields in snake case (`operation_id`); OpenAPI spells
/// them in camel case (`operationId`), without which no client can follow the link.
fn spell_links(response: &mut serde_json::Value) {
    let Some(links) = response
        .get_mut("links")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    for link in links
        .values_mut()
        .filter_map(serde_json::Value::as_object_mut)
    {
        for (snake, camel) in [
            ("operation_id", "operationId"),
            ("operation_ref", "operationRef"),
            ("request_body", "requestBody"),
        ] {
            if let Some(v) = link.remove(snake) {
                link.insert(camel.into(), v);
            }
        }
    }
}

/// The methods the document lists for the path template matching `path` (for the `Allow` header
/// of a `405`), or `None` when no documented path matches.
pub fn allowed_methods(doc: &serde_json::Value, path: &str) -> Option<String> {
    let paths = doc.get("paths")?.as_object()?;
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let (_, item) = paths.iter().find(|(template, _)| {
        let template: Vec<&str> = template.trim_end_matches('/').split('/').collect();
        template.len() == segments.len()
            && template
                .iter()
                .zip(&segments)
                .all(|(t, s)| (t.starts_with('{') && t.ends_with('}') && !s.is_empty()) || t == s)
    })?;
    let methods: Vec<String> = METHODS
        .iter()
        .filter(|m| item.get(**m).is_some())
        .map(|m| m.to_ascii_uppercase())
        .collect();
    Some(methods.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> serde_json::Value {
        complete(json!({
            "openapi": "3.1.0",
            "security": [{"serviceToken": []}],
            "paths": {
                "/api/things/{id}": {
                    "get": {
                        "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                        "responses": {
                            "200": {"description": "ok", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}},
                            "404": {"description": "none", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
                        }
                    },
                    "put": {
                        "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                        "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}},
                        "responses": {"201": {"description": "created", "links": {"Get": {"operation_id": "get"}}}}
                    }
                }
            }
        }))
    }

    #[test]
    fn errors_are_problem_json_and_the_kits_answers_are_documented() {
        let doc = doc();
        let get = &doc["paths"]["/api/things/{id}"]["get"]["responses"];
        assert!(get["200"]["content"]["application/json"].is_object());
        assert!(get["404"]["content"][PROBLEM_JSON].is_object());
        assert!(get["404"]["content"]["application/json"].is_null());
        assert!(get["401"]["headers"]["WWW-Authenticate"].is_object());
        assert!(get["400"].is_object() && get["503"]["headers"]["Retry-After"].is_object());
        assert!(get["413"].is_null(), "no body, no 413");
        let put = &doc["paths"]["/api/things/{id}"]["put"]["responses"];
        assert!(put["413"].is_object() && put["415"].is_object());
        assert_eq!(put["201"]["links"]["Get"]["operationId"], "get");
        let id = &doc["paths"]["/api/things/{id}"]["get"]["parameters"][0]["schema"];
        assert_eq!(id["pattern"], contracts::ID_PATTERN);
        assert_eq!(id["maxLength"], contracts::MAX_ID);
    }

    #[test]
    fn allowed_methods_follow_the_documented_path() {
        let doc = doc();
        assert_eq!(
            allowed_methods(&doc, "/api/things/t-1").as_deref(),
            Some("GET, PUT")
        );
        assert_eq!(allowed_methods(&doc, "/api/things"), None);
        assert_eq!(allowed_methods(&doc, "/api/things/t-1/x"), None);
    }
}
