//! Dashboard logins: users seeded from settings with argon2id password hashes, sessions in the
//! database behind an HttpOnly, SameSite=Strict cookie, a CSRF token per session for every
//! state-changing form, and the viewer/operator split (only operators act).
//!
//! The settings are the truth about users: a user removed from them is deleted with its sessions
//! at the next start, and every request reads the role from the user row (not from the session),
//! so a changed role applies to sessions already open. Password checks run through a small
//! bounded pool, behind the per-user and per-address delays of [`crate::throttle`].

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::Utc;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    TransactionTrait,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use service_kit::ApiError;
use tokio::sync::Semaphore;

use crate::entities::{session, user};
use crate::throttle::{self, Keys, LoginSettings};

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

/// Longest user name: the name goes in front of every reason sent to the Scheduler
/// (`crate::actions::on_behalf`), whose length is bounded.
pub const USER_NAME_MAX_CHARS: usize = 64;

/// Writes the configured users (hashing plain passwords) and removes every user the settings no
/// longer name, with their sessions: the settings are the only source of users.
pub async fn seed_users(
    db: &DatabaseConnection,
    users: &BTreeMap<String, UserSettings>,
) -> anyhow::Result<()> {
    let mut rows = Vec::with_capacity(users.len());
    for (name, u) in users {
        if name.is_empty()
            || name.chars().count() > USER_NAME_MAX_CHARS
            || name.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            anyhow::bail!(
                "user {name:?}: a user name has 1 to {USER_NAME_MAX_CHARS} characters, no spaces"
            );
        }
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
        rows.push((name.clone(), role, hash));
    }
    // One transaction: a start that fails half-way leaves the users as they were.
    let txn = db.begin().await?;
    for (name, role, hash) in rows {
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
        .exec_without_returning(&txn)
        .await?;
        tracing::info!(user = %name, role = role.as_str(), "dashboard user configured");
    }
    let configured: Vec<String> = users.keys().cloned().collect();
    let gone: Vec<String> = user::Entity::find()
        .all(&txn)
        .await?
        .into_iter()
        .map(|u| u.name)
        .filter(|n| !users.contains_key(n))
        .collect();
    if !gone.is_empty() {
        let ended = session::Entity::delete_many()
            .filter(session::Column::UserName.is_in(gone.clone()))
            .exec(&txn)
            .await?
            .rows_affected;
        user::Entity::delete_many()
            .filter(user::Column::Name.is_in(gone.clone()))
            .exec(&txn)
            .await?;
        tracing::warn!(users = ?gone, sessions_ended = ended, "dashboard users no longer configured: removed");
    }
    // Sessions whose user row is gone by any other way (a manual delete) end as well.
    let orphans = session::Entity::delete_many();
    let orphans = if configured.is_empty() {
        orphans
    } else {
        orphans.filter(session::Column::UserName.is_not_in(configured))
    };
    orphans.exec(&txn).await?;
    txn.commit().await?;
    Ok(())
}

pub fn random_token() -> String {
    use rand::RngCore;
    let mut buf = [0u8; 32];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// How a login attempt went.
pub enum Attempt {
    /// The password matched; no session yet (the audit row of the login comes first).
    Verified(user::Model),
    /// Wrong user name or password; `wait` is the delay this failure imposed, if any (seconds).
    Wrong { wait: Option<u64> },
    /// Too many failures of this user name or address: not checked; try again after this long.
    Throttled { retry_after: u64 },
    /// Every password-check slot is busy: not checked; try again in a moment.
    Busy,
}

/// Checks a login: throttled keys are refused before any work, the password check takes a slot
/// of the bounded pool (or is refused at once), and a failure counts against `keys` before the
/// slot is given back. A slot holder checks the throttle again, so failures recorded by earlier
/// holders count: per wait, at most `free_failures` + `verify_concurrency` guesses are checked,
/// however many arrive at once.
pub async fn attempt(
    sessions: &Sessions,
    name: &str,
    password: &str,
    keys: &Keys,
) -> Result<Attempt, ApiError> {
    let db = &sessions.db;
    if let Some(retry_after) = throttle::wait(db, keys).await? {
        return Ok(Attempt::Throttled { retry_after });
    }
    let found = user::Entity::find_by_id(name.to_owned()).one(db).await?;
    // Verify against a dummy hash for unknown users too, so timing does not tell who exists.
    let hash = found
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| DUMMY_HASH.to_owned());
    let Ok(permit) = sessions.verifiers.clone().try_acquire_owned() else {
        return Ok(Attempt::Busy);
    };
    let slot = Arc::new(permit);
    if let Some(retry_after) = throttle::wait(db, keys).await? {
        return Ok(Attempt::Throttled { retry_after });
    }
    let password = password.to_owned();
    // The blocking task holds the slot too: should this future be dropped (the client hung up),
    // the slot is still taken until the check (and its memory) is done.
    let held = slot.clone();
    let ok = tokio::task::spawn_blocking(move || {
        let _slot = held;
        verify_password(&password, &hash)
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("password check")))?;
    let outcome = match found.filter(|_| ok) {
        Some(u) => {
            throttle::succeeded(db, &sessions.login, keys).await?;
            Attempt::Verified(u)
        }
        None => Attempt::Wrong {
            wait: throttle::failed(db, &sessions.login, keys).await?,
        },
    };
    drop(slot);
    Ok(outcome)
}

/// A new session of a verified user.
pub async fn start_session(
    db: &DatabaseConnection,
    u: &user::Model,
    ttl: chrono::Duration,
) -> Result<session::Model, DbErr> {
    let now = Utc::now();
    let token = random_token();
    let s = session::Model {
        id: session_key(&token),
        user_name: u.name.clone(),
        // Kept as a record of the role at login; requests read the user row's role.
        role: u.role.clone(),
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
    Ok(s)
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
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
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

/// Sessions and logins: what the extractor and the login handler need.
#[derive(Clone)]
pub struct Sessions {
    pub db: DatabaseConnection,
    pub secure_cookies: bool,
    pub ttl: chrono::Duration,
    pub login: LoginSettings,
    /// Slots of the bounded password-check pool.
    verifiers: Arc<Semaphore>,
}

impl Sessions {
    pub fn new(db: DatabaseConnection, s: &crate::SupervisorSettings) -> Self {
        Self {
            db,
            secure_cookies: s.secure_cookies,
            ttl: chrono::Duration::seconds(i64::try_from(s.session_ttl_secs).unwrap_or(3600)),
            login: s.login.clone(),
            verifiers: Arc::new(Semaphore::new(s.login.verify_concurrency.max(1))),
        }
    }
}

/// The client's address: the TCP peer, or the rightmost entry of the header the trusted proxy in
/// front sets (`client_address_header`).
pub fn client_address(req: &HttpRequest, s: &LoginSettings) -> String {
    let forwarded = s.client_address_header.as_deref().and_then(|h| {
        req.headers()
            .get_all(h)
            .last()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    });
    forwarded
        .or_else(|| req.peer_addr().map(|a| a.ip().to_string()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The path to go to after login: only a same-origin path, so the login cannot send anyone
/// elsewhere. Refused (the overview instead): anything not starting with one `/`, `//` or `/\`
/// (another host to a browser), a backslash anywhere, and any control, space or non-ASCII
/// character, also percent-encoded (`/%09/evil.example` is `//evil.example` once a browser drops
/// the tab).
pub fn safe_next(next: Option<&str>) -> String {
    const FALLBACK: &str = "/dashboard";
    let Some(next) = next else {
        return FALLBACK.to_owned();
    };
    let acceptable = |s: &str| {
        s.len() <= 2048
            && s.starts_with('/')
            && !s.starts_with("//")
            && !s.contains('\\')
            && s.chars().all(|c| c.is_ascii_graphic())
    };
    // Every decoding must pass (a double-encoded `%2509` hides a tab one level down).
    let mut current = next.to_owned();
    for _ in 0..4 {
        if !acceptable(&current) {
            return FALLBACK.to_owned();
        }
        let decoded = percent_decode(&current);
        if decoded == current {
            return next.to_owned();
        }
        current = decoded;
    }
    FALLBACK.to_owned()
}

/// `%XX` to its byte; anything else kept. Bytes that are not UTF-8 become U+FFFD (refused).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
            let db_error = |e: DbErr| actix_web::Error::from(ApiError::from(e));
            let key = session_key(&id);
            let Some(s) = session::Entity::find_by_id(key.clone())
                .one(&sessions.db)
                .await
                .map_err(db_error)?
                .filter(|s| s.expires_at > Utc::now())
            else {
                return Err(required().into());
            };
            // The role is the user row's now, not the one at login: a changed role applies at
            // once, and a user removed from the settings has no row and no session.
            let Some(u) = user::Entity::find_by_id(s.user_name.clone())
                .one(&sessions.db)
                .await
                .map_err(db_error)?
            else {
                let _ = session::Entity::delete_by_id(key).exec(&sessions.db).await;
                return Err(required().into());
            };
            Ok(Session {
                id,
                user: u.name,
                role: Role::parse(&u.role).unwrap_or(Role::Viewer),
                csrf: s.csrf,
            })
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
    fn next_is_a_same_origin_path_only() {
        for good in [
            "/dashboard",
            "/dashboard/sagas?state=failed&q=acc-1",
            "/dashboard/sagas/0b6f9c1e-6a39-4e59-8a3c-6a1f2b3c4d5e",
        ] {
            assert_eq!(safe_next(Some(good)), good);
        }
        for evil in [
            "/%09/evil.example",
            "/%2509/evil.example",
            "//evil.example",
            "/\\evil.example",
            "/%5Cevil.example",
            "/%2F/evil.example",
            "https://evil.example",
            "evil.example",
            "/\tevil",
            "/ /evil.example",
            "/dashboard\r\nSet-Cookie:x=1",
            "/dashboard%0d%0aSet-Cookie:x=1",
            "/é",
            "",
        ] {
            assert_eq!(safe_next(Some(evil)), "/dashboard", "{evil:?}");
        }
        assert_eq!(safe_next(None), "/dashboard");
    }

    #[test]
    fn client_address_is_the_rightmost_forwarded_entry_only_when_configured() {
        use actix_web::test::TestRequest;
        let req = TestRequest::default()
            .peer_addr(std::net::SocketAddr::from(([10, 0, 0, 9], 4000)))
            .insert_header(("x-forwarded-for", "1.2.3.4, 203.0.113.7"))
            .to_http_request();
        assert_eq!(client_address(&req, &LoginSettings::default()), "10.0.0.9");
        let behind_ingress = LoginSettings {
            client_address_header: Some("x-forwarded-for".into()),
            ..LoginSettings::default()
        };
        assert_eq!(client_address(&req, &behind_ingress), "203.0.113.7");
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
