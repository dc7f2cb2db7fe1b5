//! Dashboard logins: users seeded from settings with argon2id password hashes, sessions in the
//! database behind an HttpOnly, SameSite=Strict cookie, a CSRF token per session for every
//! state-changing form, and the viewer/operator split (only operators act).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use actix_web::http::{header, StatusCode};
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::Utc;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use service_kit::ApiError;

use crate::entities::{session, user};

pub const SESSION_COOKIE: &str = "sv_session";
/// Login form CSRF token (double-submit cookie: there is no session yet).
pub const LOGIN_COOKIE: &str = "sv_login";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Viewer,
    Operator,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "operator" => Some(Self::Operator),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
        }
    }
}

/// One dashboard user (`APP_USERS__<NAME>__ROLE`, `__PASSWORD` or `__PASSWORD_HASH`).
#[derive(Debug, Clone, Deserialize)]
pub struct UserSettings {
    /// `viewer` or `operator`.
    pub role: String,
    /// Hashed at start; prefer `password_hash` outside development.
    #[serde(default)]
    pub password: Option<SecretString>,
    /// An argon2 PHC string (`$argon2id$v=19$...`).
    #[serde(default)]
    pub password_hash: Option<String>,
}

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Writes the configured users (hashing plain passwords). Users not configured keep their rows.
pub async fn seed_users(
    db: &DatabaseConnection,
    users: &BTreeMap<String, UserSettings>,
) -> anyhow::Result<()> {
    for (name, u) in users {
        let role = Role::parse(&u.role)
            .ok_or_else(|| anyhow::anyhow!("user {name}: role must be viewer or operator"))?;
        let hash = match (&u.password_hash, &u.password) {
            (Some(h), _) => {
                PasswordHash::new(h)
                    .map_err(|e| anyhow::anyhow!("user {name}: password_hash: {e}"))?;
                h.clone()
            }
            (None, Some(p)) => {
                let p = p.expose_secret().to_owned();
                tokio::task::spawn_blocking(move || hash_password(&p)).await??
            }
            (None, None) => anyhow::bail!("user {name}: set password or password_hash"),
        };
        user::Entity::insert(user::ActiveModel {
            name: Set(name.clone()),
            role: Set(role.as_str().to_owned()),
            password_hash: Set(hash),
            updated_at: Set(Utc::now()),
        })
        .on_conflict(
            OnConflict::column(user::Column::Name)
                .update_columns([
                    user::Column::Role,
                    user::Column::PasswordHash,
                    user::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
        tracing::info!(user = %name, role = role.as_str(), "dashboard user configured");
    }
    Ok(())
}

pub fn random_token() -> String {
    use rand::RngCore;
    let mut buf = [0u8; 32];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a login; the new session on success.
pub async fn login(
    db: &DatabaseConnection,
    name: &str,
    password: &str,
    ttl: chrono::Duration,
) -> anyhow::Result<Option<session::Model>> {
    let found = user::Entity::find_by_id(name.to_owned()).one(db).await?;
    // Verify against a dummy hash for unknown users too, so timing does not tell who exists.
    let hash = found
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| DUMMY_HASH.to_owned());
    let password = password.to_owned();
    let ok = web::block(move || verify_password(&password, &hash)).await?;
    let Some(u) = found.filter(|_| ok) else {
        return Ok(None);
    };
    let now = Utc::now();
    let token = random_token();
    let s = session::Model {
        id: session_key(&token),
        user_name: u.name,
        role: u.role,
        csrf: random_token(),
        created_at: now,
        expires_at: now + ttl,
    };
    session::Entity::insert(session::ActiveModel {
        id: Set(s.id.clone()),
        user_name: Set(s.user_name.clone()),
        role: Set(s.role.clone()),
        csrf: Set(s.csrf.clone()),
        created_at: Set(s.created_at),
        expires_at: Set(s.expires_at),
    })
    .exec_without_returning(db)
    .await?;
    // The cookie gets the token; the database only its hash.
    let s = session::Model { id: token, ..s };
    // Expired sessions go whenever someone logs in.
    let _ = session::Entity::delete_many()
        .filter(session::Column::ExpiresAt.lt(now))
        .exec(db)
        .await;
    Ok(Some(s))
}

const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2yDmrA9M3Bx3Kq1ZGJ0xS9q3vY3Qe8pM7w2Hc0cFfV8";

/// Ends the session whose cookie carries `token`.
pub async fn logout(db: &DatabaseConnection, token: &str) {
    let _ = session::Entity::delete_by_id(session_key(token))
        .exec(db)
        .await;
}

/// What the database keeps of a session token: its SHA-256, so a leaked sessions table (a backup,
/// a read-only replica) gives no one a usable cookie.
fn session_key(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The cookie that carries a session (or clears it, with `max_age` 0).
pub fn cookie(name: &str, value: &str, max_age_secs: i64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}")
}

pub fn cookie_value(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Session settings the extractor needs.
#[derive(Clone)]
pub struct Sessions {
    pub db: DatabaseConnection,
    pub secure_cookies: bool,
    pub ttl: chrono::Duration,
}

/// A logged-in dashboard user. Without a valid session, pages redirect to the login page.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub user: String,
    pub role: Role,
    pub csrf: String,
}

impl Session {
    pub fn is_operator(&self) -> bool {
        self.role == Role::Operator
    }

    /// Only operators act.
    pub fn require_operator(&self) -> Result<(), ApiError> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "only operators may do this; you are signed in as a viewer".into(),
            ))
        }
    }

    /// The form's CSRF token must be this session's.
    pub fn check_csrf(&self, token: &str) -> Result<(), ApiError> {
        use subtle::ConstantTimeEq;
        if bool::from(self.csrf.as_bytes().ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "missing or wrong CSRF token; reload the page".into(),
            ))
        }
    }
}

/// No session: a redirect to the login page (HTML routes) or `401` (JSON routes).
#[derive(Debug, thiserror::Error)]
#[error("login required")]
pub struct LoginRequired {
    pub json: bool,
    pub next: String,
}

impl ResponseError for LoginRequired {
    fn status_code(&self) -> StatusCode {
        if self.json {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::SEE_OTHER
        }
    }

    fn error_response(&self) -> HttpResponse {
        if self.json {
            return ApiError::Unauthorized("login required".into()).error_response();
        }
        HttpResponse::SeeOther()
            .insert_header((
                header::LOCATION,
                format!("/login?next={}", urlencode(&self.next)),
            ))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .finish()
    }
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl FromRequest for Session {
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let sessions = req.app_data::<web::Data<Sessions>>().cloned();
        let id = cookie_value(req, SESSION_COOKIE);
        let json = req.path().ends_with(".json");
        let next = if req.method() == actix_web::http::Method::GET {
            req.uri()
                .path_and_query()
                .map_or("/dashboard".to_owned(), |p| p.as_str().to_owned())
        } else {
            "/dashboard".to_owned()
        };
        Box::pin(async move {
            let required = || LoginRequired {
                json,
                next: next.clone(),
            };
            let (Some(sessions), Some(id)) = (sessions, id) else {
                return Err(required().into());
            };
            let row = session::Entity::find_by_id(session_key(&id))
                .one(&sessions.db)
                .await
                .map_err(|e| actix_web::Error::from(ApiError::from(e)))?;
            match row {
                Some(s) if s.expires_at > Utc::now() => Ok(Session {
                    id,
                    user: s.user_name,
                    role: Role::parse(&s.role).unwrap_or(Role::Viewer),
                    csrf: s.csrf,
                }),
                _ => Err(required().into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("s3cret").unwrap_or_default();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("s3cret", "not a hash"));
    }

    #[test]
    fn cookies_are_http_only_and_strict() {
        let c = cookie(SESSION_COOKIE, "abc", 60, true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert_eq!(
            urlencode("/dashboard/sagas?q=a b"),
            "/dashboard/sagas%3Fq%3Da%20b"
        );
    }
}
