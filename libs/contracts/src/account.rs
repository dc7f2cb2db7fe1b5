use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validation::{non_empty, FieldError, FromJsonObject, Object};
use crate::MAX_TEXT;

/// Scope that lets a client token act for any owner (operators, back-office tools).
pub const ADMIN_SCOPE: &str = "deliveries:admin";
/// Issuer of client tokens minted by the Account service.
pub const TOKEN_ISSUER: &str = "drone-delivery/account";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    Active,
    Suspended,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(AccountStatus::Active),
            "suspended" => Some(AccountStatus::Suspended),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    pub id: String,
    pub name: String,
    pub status: AccountStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `PUT /api/accounts/{id}` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountUpsert {
    #[schema(schema_with = crate::schema::text)]
    pub name: String,
    /// Defaults to `active`.
    #[serde(default = "active")]
    #[schema(schema_with = crate::schema::optional_account_status)]
    pub status: AccountStatus,
}

fn active() -> AccountStatus {
    AccountStatus::Active
}

impl FromJsonObject for AccountUpsert {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let name = o.required_with("name", non_empty(MAX_TEXT));
        let status = o.optional::<AccountStatus>("status");
        o.finish(|| {
            Some(AccountUpsert {
                name: name?,
                status: status.unwrap_or(AccountStatus::Active),
            })
        })
    }
}

/// Largest `ttlSeconds` a token request may state (2^53 - 1); the service's own cap is lower.
pub const MAX_TTL_SECONDS: u64 = 9_007_199_254_740_991;

/// `POST /api/accounts/{id}/tokens` body (every field optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequest {
    #[serde(default)]
    #[schema(schema_with = crate::schema::scopes)]
    pub scopes: Vec<String>,
    /// Lifetime in seconds; over the service's cap it is refused with `422`.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9_007_199_254_740_991_u64)]
    pub ttl_seconds: Option<u64>,
}

impl FromJsonObject for TokenRequest {
    fn from_object(o: &mut Object) -> Result<Self, Vec<FieldError>> {
        let scopes = o.optional::<Vec<String>>("scopes").unwrap_or_default();
        // A whole number, also when written with a fraction of zero (`60.0`), as JSON Schema's
        // `integer` reads it; at most 2^53 - 1, which every JSON reader holds exactly.
        let ttl_seconds = o.optional_with("ttlSeconds", |v| {
            let whole = v.as_u64().or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= MAX_TTL_SECONDS as f64)
                    .map(|f| f as u64)
            });
            match whole {
                Some(n) if (1..=MAX_TTL_SECONDS).contains(&n) => Ok(n),
                _ => Err(format!(
                    "must be a whole number of seconds from 1 to {MAX_TTL_SECONDS}"
                )),
            }
        });
        for s in &scopes {
            if s.is_empty() || s.contains(char::is_whitespace) {
                o.error(
                    "scopes",
                    "each scope must be a non-empty word without spaces",
                );
                break;
            }
        }
        o.finish(|| {
            Some(TokenRequest {
                scopes,
                ttl_seconds,
            })
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenResponse {
    pub account_id: String,
    pub token: String,
    pub token_type: String,
    pub expires_at: DateTime<Utc>,
    pub scopes: Vec<String>,
}

/// Claims of a client JWT minted by the Account service (HS256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientClaims {
    /// The account id.
    pub sub: String,
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
    /// Space-separated scopes (RFC 8693 style).
    #[serde(default)]
    pub scope: String,
}

impl ClientClaims {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scope.split_whitespace().any(|s| s == scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round_trip;
    use serde_json::json;

    #[test]
    fn account_types_round_trip() {
        let now = chrono::Utc::now();
        round_trip(&Account {
            id: "acc-1".into(),
            name: "Contoso".into(),
            status: AccountStatus::Suspended,
            created_at: now,
            updated_at: now,
        });
        round_trip(&TokenResponse {
            account_id: "a".into(),
            token: "t".into(),
            token_type: "Bearer".into(),
            expires_at: now,
            scopes: vec![ADMIN_SCOPE.into()],
        });
        let claims = ClientClaims {
            sub: "a".into(),
            iss: TOKEN_ISSUER.into(),
            iat: 1,
            exp: 2,
            scope: format!("x {ADMIN_SCOPE}"),
        };
        round_trip(&claims);
        assert!(claims.has_scope(ADMIN_SCOPE));
    }

    #[test]
    fn upsert_defaults_to_active_and_rejects_unknown_status() {
        let ok = AccountUpsert::from_json_value(json!({"name": "Contoso"}));
        assert_eq!(ok.map(|a| a.status).ok(), Some(AccountStatus::Active));
        let errs = AccountUpsert::from_json_value(json!({"status": "closed"}))
            .err()
            .unwrap_or_default();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["name", "status"]);
    }
}

/// Log of account changes, one partition (key = accountId), published by the Account service
/// from its outbox: the Scheduler keeps a copy of every account's status from it, so the common
/// booking makes no call to check its owner.
pub const ACCOUNT_EVENTS_LOG: &str = "account-events";
/// Partitions of [`ACCOUNT_EVENTS_LOG`]: one, so every change and mark is in one order.
pub const ACCOUNT_EVENTS_PARTITIONS: u32 = 1;
/// Event type of [`AccountChanged`].
pub const ACCOUNT_CHANGED: &str = "account.changed";
/// Event type of [`AccountFeedMark`].
pub const ACCOUNT_FEED_MARK: &str = "account.feed-mark";

/// An account as it is after a change (created, renamed, suspended, made active again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountChanged {
    pub account: Account,
    /// Raised by one with every change of this account: a copy keeps the highest it has seen, so
    /// an event delivered twice or late changes nothing.
    pub version: i64,
}

/// Every account change committed before `complete_as_of` is earlier in the log than this mark
/// (the Account service appends one while its outbox is empty): a copy that has read it knows
/// every account as of that time, so how stale it may be is `now - complete_as_of`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountFeedMark {
    pub complete_as_of: DateTime<Utc>,
}
