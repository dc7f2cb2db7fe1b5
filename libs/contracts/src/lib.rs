//! Wire types shared by the services and their clients: ids, enums, request and response bodies,
//! the problem+json error body, and the client token claims; the Scheduler's contract (saga states,
//! booking steps, compensation requests, its status API) is in `workflow`.
//!
//! Field names are camelCase on the wire (Fabrikam-compatible). Request bodies implement
//! [`validation::FromJsonObject`] so servers can name every bad field; they also derive `Deserialize`
//! so typed clients and tests can use them directly.

pub mod schema;
pub mod validation;

mod account;
mod batch;
mod breaker;
mod delivery;
mod drone;
mod events;
mod package;
mod problem;
mod request;
mod thirdparty;
mod tracking;
mod webhooks;
mod workflow;

pub use account::*;
pub use batch::*;
pub use breaker::*;
pub use delivery::*;
pub use drone::*;
pub use events::*;
pub use package::*;
pub use problem::*;
pub use request::*;
pub use thirdparty::*;
pub use tracking::*;
pub use webhooks::*;
pub use workflow::*;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Timestamps on the wire: RFC 3339, UTC.
pub type Timestamp = chrono::DateTime<chrono::Utc>;

/// Longest free-text field we accept (locations, names, tags).
pub const MAX_TEXT: usize = 500;
/// Longest id we accept in a path or body.
pub const MAX_ID: usize = 128;
/// Longest confirmation proof reference we accept.
pub const CONFIRMATION_BLOB_MAX: usize = 4096;
pub use schema::ID_PATTERN;

/// Package size classes, as Fabrikam clients spell them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
pub enum PackageSize {
    Small,
    Medium,
    Large,
}

impl PackageSize {
    pub const ALL: [PackageSize; 3] = [PackageSize::Small, PackageSize::Medium, PackageSize::Large];

    pub fn as_str(self) -> &'static str {
        match self {
            PackageSize::Small => "Small",
            PackageSize::Medium => "Medium",
            PackageSize::Large => "Large",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// How the recipient confirms the hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum ConfirmationType {
    FingerPrint,
    Picture,
    Voice,
    None,
}

impl ConfirmationType {
    pub const ALL: [ConfirmationType; 4] = [
        ConfirmationType::FingerPrint,
        ConfirmationType::Picture,
        ConfirmationType::Voice,
        ConfirmationType::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConfirmationType::FingerPrint => "FingerPrint",
            ConfirmationType::Picture => "Picture",
            ConfirmationType::Voice => "Voice",
            ConfirmationType::None => "None",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

#[cfg(test)]
pub(crate) fn round_trip<T>(value: &T)
where
    T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let text = serde_json::to_string(value).unwrap_or_default();
    let back: Option<T> = serde_json::from_str(&text).ok();
    assert_eq!(back.as_ref(), Some(value), "round trip through {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_use_fabrikam_spelling() {
        assert_eq!(
            serde_json::to_string(&PackageSize::Medium).ok().as_deref(),
            Some("\"Medium\"")
        );
        assert_eq!(
            serde_json::to_string(&ConfirmationType::FingerPrint)
                .ok()
                .as_deref(),
            Some("\"FingerPrint\"")
        );
        for s in PackageSize::ALL {
            assert_eq!(PackageSize::parse(s.as_str()), Some(s));
            round_trip(&s);
        }
        for c in ConfirmationType::ALL {
            assert_eq!(ConfirmationType::parse(c.as_str()), Some(c));
            round_trip(&c);
        }
    }
}
