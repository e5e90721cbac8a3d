//! Pluggable authentication: request parts in, user id (or 401) out.

use async_trait::async_trait;
use chat_core::UserId;
use http::request::Parts;

/// Why a request was not authenticated (always answered 401 `Unauthorized`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unauthenticated: {0}")]
pub struct AuthError(pub &'static str);

/// Turns a request into the id of the user it acts for. Implement it for
/// session cookies, API keys, mTLS, ... and hand it to [`ChatService`](crate::ChatService).
#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
pub trait Authenticator: chat_core::MaybeSendSync + 'static {
    /// The authenticated user, or why not.
    async fn authenticate(&self, parts: &Parts) -> Result<UserId, AuthError>;
}

/// Trusts the `x-user-id` header. For local use and benchmarks only: anyone
/// can claim any user. Logs a warning when created.
#[derive(Debug, Clone, Copy)]
pub struct DevHeaderAuth(());

impl DevHeaderAuth {
    /// The header it reads.
    pub const HEADER: &'static str = "x-user-id";

    /// A new dev-header authenticator (logs a warning).
    pub fn new() -> Self {
        tracing::warn!(
            "dev-header authentication is on: the x-user-id header is trusted as is; never use it in production"
        );
        Self(())
    }
}

impl Default for DevHeaderAuth {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
impl Authenticator for DevHeaderAuth {
    async fn authenticate(&self, parts: &Parts) -> Result<UserId, AuthError> {
        let value = parts
            .headers
            .get(Self::HEADER)
            .ok_or(AuthError("missing x-user-id"))?;
        let s = value
            .to_str()
            .map_err(|_| AuthError("x-user-id is not ASCII"))?;
        UserId::new(s).map_err(|_| AuthError("invalid x-user-id"))
    }
}

/// `Authorization: Bearer <jwt>` signed with HS256; the user is the `sub`
/// claim; `exp` is required and checked.
#[derive(Clone)]
pub struct JwtAuth {
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuth").finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

impl JwtAuth {
    /// Verifies tokens signed with `secret` (HS256).
    pub fn hs256(secret: &[u8]) -> Self {
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Self {
            key: jsonwebtoken::DecodingKey::from_secret(secret),
            validation,
        }
    }
}

#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
impl Authenticator for JwtAuth {
    async fn authenticate(&self, parts: &Parts) -> Result<UserId, AuthError> {
        let header = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .ok_or(AuthError("missing Authorization"))?
            .to_str()
            .map_err(|_| AuthError("Authorization is not ASCII"))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or(AuthError("Authorization is not a Bearer token"))?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|_| AuthError("invalid or expired token"))?;
        UserId::new(&data.claims.sub).map_err(|_| AuthError("invalid sub claim"))
    }
}
