//! Field-by-field parsing of JSON request bodies that reports *every* bad field at once.
//!
//! `serde` stops at the first error, which makes clients fix one field per round trip. Request types
//! here implement [`FromJsonObject`] instead: each field is parsed on its own, errors are collected
//! with the field's JSON path, and the value is only built when all of them parsed.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

/// One invalid field: its JSON path (`packageInfo.size`) and why it was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A request body type that can be parsed from a JSON object, naming every bad field.
pub trait FromJsonObject: Sized {
    fn from_object(object: &mut Object) -> Result<Self, Vec<FieldError>>;

    /// Parses a whole JSON value, which must be an object.
    fn from_json_value(value: Value) -> Result<Self, Vec<FieldError>> {
        match value {
            Value::Object(map) => Self::from_object(&mut Object::new(map, "")),
            other => Err(vec![FieldError::new(
                "body",
                format!("expected a JSON object, found {}", kind_of(&other)),
            )]),
        }
    }
}

/// A JSON object being parsed; collects the errors of every field it is asked for.
#[derive(Debug)]
pub struct Object {
    map: Map<String, Value>,
    prefix: String,
    errors: Vec<FieldError>,
}

impl Object {
    pub fn new(map: Map<String, Value>, prefix: &str) -> Self {
        Self {
            map,
            prefix: prefix.to_owned(),
            errors: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Records an error for `name` (relative to this object).
    pub fn error(&mut self, name: &str, reason: impl Into<String>) {
        let path = self.path(name);
        self.errors.push(FieldError::new(path, reason));
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        match self.map.remove(name) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// A field that must be present and non-null.
    pub fn required<T: DeserializeOwned>(&mut self, name: &str) -> Option<T> {
        self.required_with(name, |v| {
            serde_json::from_value(v).map_err(|e| e.to_string())
        })
    }

    /// A field that may be absent or null; present values must parse.
    pub fn optional<T: DeserializeOwned>(&mut self, name: &str) -> Option<T> {
        self.optional_with(name, |v| {
            serde_json::from_value(v).map_err(|e| e.to_string())
        })
    }

    /// A required field with a custom parser (e.g. a number that may arrive as a string).
    pub fn required_with<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(Value) -> Result<T, String>,
    ) -> Option<T> {
        match self.take(name) {
            None => {
                self.error(name, "is required");
                None
            }
            Some(v) => self.parsed(name, parse(v)),
        }
    }

    /// An optional field with a custom parser.
    pub fn optional_with<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(Value) -> Result<T, String>,
    ) -> Option<T> {
        let v = self.take(name)?;
        self.parsed(name, parse(v))
    }

    /// A required nested object, parsed with its own field paths (`packageInfo.size`).
    pub fn nested<T: FromJsonObject>(&mut self, name: &str) -> Option<T> {
        let path = self.path(name);
        match self.take(name) {
            None => {
                self.errors.push(FieldError::new(path, "is required"));
                None
            }
            Some(Value::Object(map)) => match T::from_object(&mut Object::new(map, &path)) {
                Ok(v) => Some(v),
                Err(errs) => {
                    self.errors.extend(errs);
                    None
                }
            },
            Some(other) => {
                let reason = format!("expected an object, found {}", kind_of(&other));
                self.errors.push(FieldError::new(path, reason));
                None
            }
        }
    }

    fn parsed<T>(&mut self, name: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(reason) => {
                self.error(name, reason);
                None
            }
        }
    }

    /// Adds an error for `name` unless `ok` holds. Use for rules across fields.
    pub fn ensure(&mut self, ok: bool, name: &str, reason: &str) {
        if !ok {
            self.error(name, reason);
        }
    }

    /// True when no field has failed so far.
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }

    /// Returns the built value if every field parsed, otherwise every error collected.
    /// Unknown fields are ignored (older and newer clients send extra ones).
    pub fn finish<T>(&mut self, build: impl FnOnce() -> Option<T>) -> Result<T, Vec<FieldError>> {
        if !self.errors.is_empty() {
            return Err(std::mem::take(&mut self.errors));
        }
        build().ok_or_else(|| vec![FieldError::new(self.path("body"), "is invalid")])
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses a string of at most `max` characters (as sent) that is not blank, trimmed.
pub fn non_empty(max: usize) -> impl FnOnce(Value) -> Result<String, String> {
    move |v| match v {
        Value::String(s) => {
            let t = s.trim();
            if t.is_empty() {
                Err("must not be empty".into())
            } else if s.chars().count() > max {
                Err(format!("must be at most {max} characters"))
            } else {
                Ok(t.to_owned())
            }
        }
        other => Err(format!("expected a string, found {}", kind_of(&other))),
    }
}

/// True for an identifier: 1 to 128 characters of ASCII letters, digits, `-`, `_`, `.`, `:`, but
/// not `.` or `..` (a URL path cannot carry those: clients remove them as dot segments). Ids
/// travel in URL paths, so every id a body carries follows the same rule
/// ([`crate::schema::ID_PATTERN`]).
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= crate::MAX_ID
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

/// Parses an identifier (see [`is_identifier`]).
pub fn identifier(v: Value) -> Result<String, String> {
    match v {
        Value::String(s) if is_identifier(&s) => Ok(s),
        Value::String(_) => Err(
            "must be 1-128 characters of letters, digits, '-', '_', '.', ':' (not '.' or '..')"
                .into(),
        ),
        other => Err(format!("expected a string, found {}", kind_of(&other))),
    }
}

/// Parses a string of at most `max` characters (as sent), trimmed; empty is allowed (optional
/// free text such as Fabrikam's `deadline`).
pub fn text(max: usize) -> impl FnOnce(Value) -> Result<String, String> {
    move |v| match v {
        Value::String(s) if s.chars().count() <= max => Ok(s.trim().to_owned()),
        Value::String(_) => Err(format!("must be at most {max} characters")),
        other => Err(format!("expected a string, found {}", kind_of(&other))),
    }
}

/// Parses a finite, non-negative number that may also arrive as a numeric string of digits with
/// an optional fraction, at most 20 digits each ([`crate::schema::NUMERIC_STRING`]; existing
/// Fabrikam clients send `"weight": "2.5"`).
pub fn non_negative_number(v: Value) -> Result<f64, String> {
    let n = match &v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if is_numeric_string(s) => s.parse::<f64>().ok(),
        Value::String(_) => {
            return Err("must be a number, or a string of digits with an optional fraction".into())
        }
        _ => None,
    };
    match n {
        Some(n) if n.is_finite() && n >= 0.0 => Ok(n),
        Some(_) => Err("must be a finite number of zero or more".into()),
        None => Err(format!("expected a number, found {}", kind_of(&v))),
    }
}

fn is_numeric_string(s: &str) -> bool {
    let digits = |d: &str| (1..=20).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit());
    match s.split_once('.') {
        Some((whole, fraction)) => digits(whole) && digits(fraction),
        None => digits(s),
    }
}

/// Parses an RFC 3339 timestamp (JSON Schema's `date-time`), as sent.
pub fn timestamp(v: Value) -> Result<chrono::DateTime<chrono::Utc>, String> {
    match v {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|e| format!("expected an RFC 3339 timestamp ({e})")),
        other => Err(format!(
            "expected an RFC 3339 timestamp string, found {}",
            kind_of(&other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Sample {
        name: String,
        weight: f64,
        inner: Inner,
    }
    struct Inner {
        size: String,
    }
    impl FromJsonObject for Inner {
        fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
            let size = o.required_with("size", non_empty(5));
            o.finish(|| Some(Inner { size: size? }))
        }
    }
    impl FromJsonObject for Sample {
        fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
            let name = o.required_with("name", non_empty(10));
            let weight = o.required_with("weight", non_negative_number);
            let inner = o.nested::<Inner>("inner");
            o.finish(|| {
                Some(Sample {
                    name: name?,
                    weight: weight?,
                    inner: inner?,
                })
            })
        }
    }

    #[test]
    fn every_bad_field_is_named() {
        let errs = Sample::from_json_value(json!({"weight": "heavy", "inner": {"size": ""}}))
            .err()
            .unwrap_or_default();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["name", "weight", "inner.size"]);
    }

    #[test]
    fn numeric_strings_and_unknown_fields_are_accepted() {
        let s = Sample::from_json_value(
            json!({"name": " a ", "weight": "2.5", "inner": {"size": "S"}, "extra": 1}),
        );
        let s = s.ok();
        assert_eq!(s.as_ref().map(|s| s.name.as_str()), Some("a"));
        assert_eq!(s.as_ref().map(|s| s.weight), Some(2.5));
        assert_eq!(s.as_ref().map(|s| s.inner.size.as_str()), Some("S"));
    }

    #[test]
    fn dot_segments_are_not_identifiers() {
        assert!(is_identifier("a.b") && is_identifier("..."));
        assert!(!is_identifier(".") && !is_identifier(".."));
    }

    #[test]
    fn lengths_count_what_was_sent_and_numeric_strings_are_plain() {
        assert!(non_empty(3)(json!(" ab ")).is_err(), "4 characters as sent");
        assert_eq!(non_empty(3)(json!(" a ")).ok().as_deref(), Some("a"));
        assert_eq!(non_negative_number(json!("2.5")).ok(), Some(2.5));
        for refused in ["", " 2.5", "-1", "1e3", "inf", "NaN", ".5", "5.", "+1"] {
            assert!(non_negative_number(json!(refused)).is_err(), "{refused}");
        }
        assert!(timestamp(json!(" 2030-01-01T00:00:00Z")).is_err());
    }

    #[test]
    fn non_object_body_is_rejected() {
        let errs = Sample::from_json_value(json!([1, 2]))
            .err()
            .unwrap_or_default();
        assert_eq!(errs[0].field, "body");
    }
}
