//! JSON Schemas of the request fields whose rules the derived ones cannot state, for
//! `#[schema(schema_with = ...)]`: each says exactly what its parser in [`crate::validation`]
//! accepts, so that a schema-valid body is never refused as malformed and a schema-invalid one is
//! never accepted. A field the parser takes as absent when it is `null` is nullable here.

use utoipa::openapi::schema::{
    AllOfBuilder, ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat,
    SchemaType, Type,
};
use utoipa::openapi::{Ref, RefOr};

use crate::{MAX_ID, MAX_TEXT};

/// An identifier ([`crate::validation::is_identifier`]). The look-ahead keeps out `.` and `..`,
/// which a URL path cannot carry (clients remove them as dot segments).
pub const ID_PATTERN: &str = r"^(?!\.{1,2}$)[A-Za-z0-9._:-]{1,128}$";

/// Somewhere a character that is not white space (Unicode `White_Space`, what `str::trim`
/// removes): text that is not blank.
pub const NOT_BLANK: &str =
    r"[^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";

/// A word: characters none of which is white space (see [`NOT_BLANK`]).
pub const WORD: &str = r"^[^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$";

/// A number sent as a string ([`crate::validation::non_negative_number`]): digits with an
/// optional fraction.
pub const NUMERIC_STRING: &str = r"^[0-9]{1,20}(\.[0-9]{1,20})?$";

fn string(nullable: bool) -> ObjectBuilder {
    if nullable {
        ObjectBuilder::new().schema_type(SchemaType::from_iter([Type::String, Type::Null]))
    } else {
        ObjectBuilder::new().schema_type(Type::String)
    }
}

fn id(nullable: bool) -> Schema {
    string(nullable)
        .min_length(Some(1))
        .max_length(Some(MAX_ID))
        .pattern(Some(ID_PATTERN))
        .into()
}

/// Text that is not blank, of at most `max` characters ([`crate::validation::non_empty`]).
fn not_blank(max: usize, nullable: bool) -> Schema {
    string(nullable)
        .min_length(Some(1))
        .max_length(Some(max))
        .pattern(Some(NOT_BLANK))
        .into()
}

/// Text of at most `max` characters, blank allowed ([`crate::validation::text`]).
fn any_text(max: usize, nullable: bool) -> Schema {
    string(nullable).max_length(Some(max)).into()
}

fn number_or_numeric_string(nullable: bool) -> Schema {
    let mut one_of = OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Number)
                .minimum(Some(0.0)),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(NUMERIC_STRING)),
        );
    if nullable {
        one_of = one_of.item(ObjectBuilder::new().schema_type(Type::Null));
    }
    one_of
        .description(Some(
            "Kilograms, zero or more; a numeric string (digits, optional fraction) is accepted",
        ))
        .into()
}

pub fn identifier() -> Schema {
    id(false)
}

pub fn optional_identifier() -> Schema {
    id(true)
}

/// Not blank, at most [`MAX_TEXT`] characters.
pub fn text() -> Schema {
    not_blank(MAX_TEXT, false)
}

/// As [`text`], or `null`/absent.
pub fn optional_text() -> Schema {
    not_blank(MAX_TEXT, true)
}

/// A client's own id for something (not blank, at most [`MAX_ID`] characters, any characters).
pub fn external_id() -> Schema {
    not_blank(MAX_ID, false)
}

/// Free text that may be blank (Fabrikam's `deadline`), or `null`/absent.
pub fn free_text() -> Schema {
    any_text(MAX_TEXT, true)
}

/// A reason or detail for the Scheduler's control endpoints, blank allowed, or `null`/absent.
pub fn optional_reason() -> Schema {
    any_text(crate::REASON_MAX_CHARS, true)
}

/// A reason an operator must give (not blank, at most [`crate::REASON_MAX_CHARS`] characters).
pub fn reason() -> Schema {
    not_blank(crate::REASON_MAX_CHARS, false)
}

/// A confirmation's proof reference (not blank, at most 4096 characters), or `null`/absent.
pub fn optional_blob() -> Schema {
    not_blank(crate::CONFIRMATION_BLOB_MAX, true)
}

pub fn weight() -> Schema {
    number_or_numeric_string(false)
}

pub fn optional_weight() -> Schema {
    number_or_numeric_string(true)
}

/// An RFC 3339 timestamp, or `null`/absent.
pub fn optional_timestamp() -> Schema {
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
        )
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .into()
}

/// A flag that defaults to `false` when absent or `null`.
pub fn optional_flag() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Boolean, Type::Null]))
        .into()
}

/// `scopes` of a token request: words without white space, or `null`/absent for none.
pub fn scopes() -> Schema {
    let word = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .pattern(Some(WORD));
    ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .items(word)
        .into()
}

/// A reference to a component schema that may also be `null`/absent.
fn nullable_ref(name: &str) -> Schema {
    OneOfBuilder::new()
        .item(RefOr::Ref(Ref::from_schema_name(name)))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .into()
}

/// An account status, `active` when absent or `null`.
pub fn optional_account_status() -> Schema {
    nullable_ref("AccountStatus")
}

/// The stages a drone reports itself (the others are set by their own endpoints).
pub fn reported_stage() -> Schema {
    AllOfBuilder::new()
        .item(RefOr::Ref(Ref::from_schema_name("DeliveryStage")))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["HeadedToPickup", "HeadedToDropoff"])),
        )
        .into()
}

/// Request bodies that must change something: at least one of these fields present and not
/// `null` (their parsers say "must change at least one of ..."). [`at_least_one_of`] states it in
/// a document.
pub const AT_LEAST_ONE_OF: &[(&str, &[&str])] = &[
    (
        "RescheduleRequest",
        &[
            "pickupTime",
            "pickupLocation",
            "dropOffLocation",
            "deadline",
        ],
    ),
    ("PackagePatch", &["size", "weight", "tag"]),
    (
        "DeliveryPatch",
        &[
            "pickupTime",
            "deadline",
            "pickupLocation",
            "dropOffLocation",
            "droneId",
        ],
    ),
];

/// Adds [`AT_LEAST_ONE_OF`] to the component schemas of a document (as JSON) that has them.
pub fn at_least_one_of(doc: &mut serde_json::Value) {
    for (name, fields) in AT_LEAST_ONE_OF {
        let Some(schema) = doc
            .pointer_mut(&format!("/components/schemas/{name}"))
            .and_then(serde_json::Value::as_object_mut)
        else {
            continue;
        };
        let any_of: Vec<serde_json::Value> = fields
            .iter()
            .map(|f| {
                serde_json::json!({
                    "required": [f],
                    "properties": {(*f): {"not": {"type": "null"}}}
                })
            })
            .collect();
        schema.insert("anyOf".into(), any_of.into());
    }
}

/// An identifier as a type, for a parameter's `#[param(inline, value_type = Identifier)]` (a
/// `schema_with` parameter is never marked required).
pub struct Identifier;

impl utoipa::PartialSchema for Identifier {
    fn schema() -> RefOr<Schema> {
        identifier().into()
    }
}

impl utoipa::ToSchema for Identifier {}
