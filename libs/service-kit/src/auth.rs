//! Authentication: the internal service token (every service-to-service call) and client JWTs
//! (minted by Account, verified by Ingestion).

use std::future::{ready, Ready};
use std::sync::Arc;

use actix_web::http::header;
use actix_web::{dev::Payload, FromRequest, HttpRequest};
use contracts::{ClientClaims, TOKEN_ISSUER};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The expected internal token, stored as app data by the server builder.
#[derive(Clone)]
pub struct ServiceToken(pub Arc<SecretString>);

/// Extractor that admits only callers presenting the service token (`Authorization: Bearer ...`).
#[derive(Debug, Clone, Copy)]
pub struct ServiceCaller;

impl FromRequest for ServiceCaller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(check_service_token(req))
    }
}

fn check_service_token(req: &HttpRequest) -> Result<ServiceCaller, ApiError> {
    let expected = req
        .app_data::<ServiceToken>()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("service token not configured")))?;
    let presented = bearer(req)?;
    let expected = expected.0.expose_secret().as_bytes();
    if expected.is_empty() || !bool::from(presented.as_bytes().ct_eq(expected)) {
        return Err(ApiError::Unauthorized(
            "the bearer token is not a valid service token".into(),
        ));
    }
    Ok(ServiceCaller)
}

/// The bearer token of the `Authorization` header, or a `401` saying what is wrong with it.
pub fn bearer(req: &HttpRequest) -> Result<&str, ApiError> {
    let value = req.headers().get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized("missing Authorization header (Bearer token)".into())
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("Authorization header is not ASCII".into()))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::Unauthorized(
            "Authorization header must be 'Bearer <token>'".into(),
        )),
    }
}

/// Mints and verifies client JWTs (HS256, issuer [`TOKEN_ISSUER`], subject = account id).
///
/// A client presents the same token on every request for its lifetime, so verified tokens are
/// kept (keyed by the whole token: a hit is the very token that was verified) with their claims,
/// and a repeat costs a hash lookup and the expiry check instead of decoding and an HMAC.
#[derive(Clone)]
pub struct ClientTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    verified: Arc<quick_cache::sync::Cache<String, ClientClaims>>,
}

/// Verified tokens kept at most (an entry is a token and its claims, a few hundred bytes).
const VERIFIED_TOKENS: usize = 50_000;

impl ClientTokens {
    pub fn new(secret: &SecretString) -> Self {
        let key = secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[TOKEN_ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        validation.leeway = 30;
        Self {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
            verified: Arc::new(quick_cache::sync::Cache::new(VERIFIED_TOKENS)),
        }
    }

    /// A token for `account_id` valid for `ttl` from now.
    pub fn mint(
        &self,
        account_id: &str,
        scopes: &[String],
        ttl: chrono::Duration,
    ) -> anyhow::Result<(String, chrono::DateTime<chrono::Utc>)> {
        let now = chrono::Utc::now();
        let expires = now + ttl;
        let claims = ClientClaims {
            sub: account_id.to_owned(),
            iss: TOKEN_ISSUER.to_owned(),
            iat: now.timestamp(),
            exp: expires.timestamp(),
            scope: scopes.join(" "),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok((token, expires))
    }

    /// The claims of a valid token, or a `401` that says why it was refused.
    pub fn verify(&self, token: &str) -> Result<ClientClaims, ApiError> {
        self.verify_at(token, jsonwebtoken::get_current_timestamp())
    }

    /// [`Self::verify`] at `now` (seconds since the epoch): a token verified before is answered
    /// from the cache until it expires (with the same leeway as a first verification).
    fn verify_at(&self, token: &str, now: u64) -> Result<ClientClaims, ApiError> {
        let expired = |claims: &ClientClaims| {
            u64::try_from(claims.exp)
                .map_or(true, |exp| exp.saturating_add(self.validation.leeway) < now)
        };
        if let Some(claims) = self.verified.get(token) {
            if expired(&claims) {
                self.verified.remove(token);
                return Err(ApiError::Unauthorized("the token has expired".into()));
            }
            return Ok(claims);
        }
        let claims = jsonwebtoken::decode::<ClientClaims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::InvalidSignature => "the token signature is invalid",
                    ErrorKind::InvalidIssuer => "the token was not issued by the account service",
                    _ => "the token is malformed",
                };
                ApiError::Unauthorized(why.into())
            })?;
        if !expired(&claims) {
            self.verified.insert(token.to_owned(), claims.clone());
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_tampered_ones_do_not() {
        let tokens = ClientTokens::new(&SecretString::from("k".repeat(32)));
        let (token, _) = tokens
            .mint(
                "acc-1",
                &["deliveries:admin".into()],
                chrono::Duration::hours(1),
            )
            .unwrap_or_default();
        let claims = tokens.verify(&token).ok();
        assert_eq!(claims.as_ref().map(|c| c.sub.as_str()), Some("acc-1"));
        assert!(claims.is_some_and(|c| c.has_scope("deliveries:admin")));

        let other = ClientTokens::new(&SecretString::from("z".repeat(32)));
        assert!(other.verify(&token).is_err());

        let (expired, _) = tokens
            .mint("acc-1", &[], chrono::Duration::hours(-2))
            .unwrap_or_default();
        assert!(tokens.verify(&expired).is_err());
        assert!(tokens.verify("not-a-jwt").is_err());
    }

    #[test]
    fn a_cached_token_is_refused_once_it_expires() {
        let tokens = ClientTokens::new(&SecretString::from("k".repeat(32)));
        let (token, expires) = tokens
            .mint("acc-1", &[], chrono::Duration::minutes(5))
            .unwrap_or_default();
        let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or_default();
        let exp = u64::try_from(expires.timestamp()).unwrap_or_default();
        assert!(tokens.verify_at(&token, now).is_ok());
        assert_eq!(tokens.verified.len(), 1, "a verified token is kept");
        // Within the leeway it still passes (as a first verification would), then it is refused.
        assert!(tokens.verify_at(&token, exp + 30).is_ok());
        let refused = tokens.verify_at(&token, exp + 31);
        assert!(
            matches!(&refused, Err(ApiError::Unauthorized(why)) if why.contains("expired")),
            "{refused:?}"
        );
        assert_eq!(tokens.verified.len(), 0, "an expired token is dropped");
        // A tampered token never matches a cached one: it is verified, and refused.
        let tampered = format!("{token}x");
        assert!(tokens.verify_at(&tampered, now).is_err());
    }
}
