//! The JSON error responses of the contract: `{"error": "..."}`.

use http::StatusCode;
use serde::Serialize;

/// An error answer: a status and a message safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Client-facing message (never internals; those go to the logs).
    pub message: String,
}

/// The JSON body of every error.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401 `Unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized")
    }

    /// 404 `Chat not found` (also for chats of other users).
    pub fn chat_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Chat not found")
    }

    /// 413 for a body over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 415 for a body that is not JSON.
    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        )
    }

    /// The JSON body bytes.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&ErrorBody {
            error: self.message.clone(),
        })
        .unwrap_or_else(|_| br#"{"error":"Internal server error"}"#.to_vec())
    }
}

impl From<chat_core::Error> for ApiError {
    fn from(e: chat_core::Error) -> Self {
        use chat_core::Error as E;
        match e {
            E::NotFound => Self::chat_not_found(),
            E::Busy { .. } => Self::new(
                StatusCode::CONFLICT,
                "A response is already being generated for this chat",
            ),
            E::Invalid(v) => Self::bad_request(v.to_string()),
            E::TooLarge { what, size, limit } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{what} is {size} bytes, over the limit of {limit}"),
            ),
            E::Unauthorized => Self::unauthorized(),
            E::Store(e) if e.is_retryable() => {
                tracing::error!(error = %e, "store unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service temporarily unavailable",
                )
            }
            E::Store(e) => {
                tracing::error!(error = %e, "store error");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error")
            }
            E::Model(e) => {
                tracing::error!(error = %e, "model error");
                Self::new(StatusCode::BAD_GATEWAY, "The model failed to respond")
            }
        }
    }
}

impl From<chat_core::ValidationError> for ApiError {
    fn from(e: chat_core::ValidationError) -> Self {
        Self::bad_request(e.to_string())
    }
}
