//! Typed errors. Each says what failed and whether retrying can help; none carries
//! message text or secrets.

use std::error::Error as StdError;

/// A boxed error source kept for logs.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The error every public chat-core operation returns.
///
/// The HTTP layer maps the variants to status codes: `NotFound` 404, `Busy` 409,
/// `Invalid` 400, `TooLarge` 413, `Unauthorized` 401, `Store`/`Model` 5xx.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The chat does not exist or belongs to another user (indistinguishable on purpose).
    #[error("chat not found")]
    NotFound,
    /// A generation is already running for this chat.
    #[error("a generation is already running for chat {chat_id}")]
    Busy {
        /// The busy chat.
        chat_id: String,
    },
    /// The input was rejected before anything was changed.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The input is larger than the configured limit.
    #[error("{what} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// No or bad credentials.
    #[error("unauthorized")]
    Unauthorized,
    /// The message store failed (a store's `NotFound` becomes [`Error::NotFound`]).
    #[error(transparent)]
    Store(StoreError),
    /// The model provider failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Error::NotFound,
            other => Error::Store(other),
        }
    }
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Busy { .. } => true,
            Error::Store(e) => e.is_retryable(),
            Error::Model(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Why an input was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The offending field (JSON path-like, e.g. `message.parts`).
    pub field: &'static str,
    /// What is wrong with it, safe to show to the client.
    pub reason: String,
}

impl ValidationError {
    /// A new validation error for `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// A failure of a [`MessageStore`](crate::MessageStore).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The chat does not exist or is not owned by the user.
    #[error("chat not found")]
    NotFound,
    /// The write conflicts with existing data (e.g. a message id used in another chat).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The data was rejected by the store (bad encoding, row too large).
    #[error("invalid data: {0}")]
    Invalid(String),
    /// A fenced write carried a fencing token older than one already seen for
    /// the chat: another instance took over the turn. Never retry it.
    #[error("write fenced off: a newer turn owns this chat")]
    Fenced,
    /// The store does not support this operation (see its capabilities).
    #[error("unsupported by this store: {0}")]
    Unsupported(&'static str),
    /// The backend is unreachable or overloaded; retrying may help.
    #[error("store unavailable: {source}")]
    Unavailable {
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// Any other backend failure; retrying will not help.
    #[error("store backend error: {source}")]
    Backend {
        /// The backend's error.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// Wraps a transient backend error.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        StoreError::Unavailable {
            source: source.into(),
        }
    }

    /// Wraps a permanent backend error.
    pub fn backend(source: impl Into<BoxError>) -> Self {
        StoreError::Backend {
            source: source.into(),
        }
    }
}

/// A failure of a [`ModelProvider`](crate::ModelProvider).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The request was refused (bad key, unknown model, bad request); retrying will not help.
    #[error("model request rejected ({status}): {message}")]
    Rejected {
        /// Upstream HTTP status, 0 when not HTTP.
        status: u16,
        /// The server's explanation (never contains credentials).
        message: String,
    },
    /// Rate limited or temporarily unavailable; retrying may help.
    #[error("model temporarily unavailable: {message}")]
    Unavailable {
        /// What happened.
        message: String,
        /// How long the server asked us to wait, if it said.
        retry_after: Option<std::time::Duration>,
    },
    /// The stream ended before the model said it finished.
    #[error("model stream interrupted: {0}")]
    Interrupted(String),
    /// The server sent something we could not understand.
    #[error("malformed model response: {0}")]
    Malformed(String),
    /// Any other failure.
    #[error("model error: {0}")]
    Other(String),
}

impl ModelError {
    /// Whether retrying the same request may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ModelError::Unavailable { .. } | ModelError::Interrupted(_)
        )
    }
}

/// A failure of a [`Tool`](crate::Tool) call; its text is shown to the model and the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ToolError(pub String);
