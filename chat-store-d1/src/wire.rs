//! The private protocol between [`DoSessions`](crate::DoSessions) (in the
//! Worker) and [`ChatRoom`](crate::ChatRoom) (the Durable Object). The DO is
//! reachable only through its binding, and its name is built by the Worker
//! after the ownership check, so these headers are set by the server only.

use chat_core::{Error, MessageId, SendRequest, StoreError, Trigger, UiMessage, ValidationError};
use serde::{Deserialize, Serialize};

/// Header carrying the (authenticated, ownership-checked) user id.
pub const USER_HEADER: &str = "x-chat-user";
/// Header carrying the chat id.
pub const CHAT_HEADER: &str = "x-chat-id";
/// Response header naming the assistant message of a turn stream.
pub const MESSAGE_ID_HEADER: &str = "x-message-id";
/// Base URL of requests to the DO (never leaves the runtime).
pub const BASE: &str = "https://chat-room.internal";

/// A [`SendRequest`] as sent to the DO.
#[derive(Debug, Serialize, Deserialize)]
pub struct SendWire {
    /// The new user message.
    pub message: Option<UiMessage>,
    /// `regenerate-message` rather than `submit-message`.
    pub regenerate: bool,
    /// For regenerate: the assistant message to replace.
    pub message_id: Option<String>,
}

impl SendWire {
    /// The wire form of `request`.
    pub fn from_request(request: SendRequest) -> Self {
        Self {
            message: request.message,
            regenerate: request.trigger == Trigger::RegenerateMessage,
            message_id: request.message_id.map(|m| m.as_str().to_owned()),
        }
    }

    /// Back to a [`SendRequest`].
    pub fn into_request(self) -> Result<SendRequest, Error> {
        Ok(SendRequest {
            message: self.message,
            trigger: if self.regenerate {
                Trigger::RegenerateMessage
            } else {
                Trigger::SubmitMessage
            },
            message_id: self.message_id.map(MessageId::parse).transpose()?,
        })
    }
}

/// A [`chat_core::Error`] as sent back by the DO.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ErrorWire {
    /// [`Error::NotFound`].
    NotFound,
    /// [`Error::Busy`].
    Busy,
    /// [`Error::Invalid`].
    Invalid {
        /// The offending field.
        field: String,
        /// Why.
        reason: String,
    },
    /// [`Error::TooLarge`].
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A store conflict.
    Conflict {
        /// Detail (logged, never shown to clients).
        detail: String,
    },
    /// A transient store failure.
    Unavailable {
        /// Detail (logged, never shown to clients).
        detail: String,
    },
    /// Any other failure.
    Internal {
        /// Detail (logged, never shown to clients).
        detail: String,
    },
}

/// Field names chat-core's validation uses (a `ValidationError` field is `&'static str`).
const FIELDS: &[&str] = &[
    "message",
    "message.id",
    "message.role",
    "message.parts",
    "messageId",
    "trigger",
    "chatId",
];
const SIZED: &[&str] = &["message text", "title"];

fn known(list: &[&'static str], s: &str, fallback: &'static str) -> &'static str {
    list.iter().copied().find(|f| *f == s).unwrap_or(fallback)
}

impl ErrorWire {
    /// The wire form of `e` and the HTTP status it travels with.
    pub fn from_error(e: &Error) -> (u16, Self) {
        match e {
            Error::NotFound => (404, Self::NotFound),
            Error::Busy { .. } => (409, Self::Busy),
            Error::Invalid(v) => (
                400,
                Self::Invalid {
                    field: v.field.to_owned(),
                    reason: v.reason.clone(),
                },
            ),
            Error::TooLarge { what, size, limit } => (
                413,
                Self::TooLarge {
                    what: (*what).to_owned(),
                    size: *size,
                    limit: *limit,
                },
            ),
            Error::Store(StoreError::Conflict(d)) => (409, Self::Conflict { detail: d.clone() }),
            Error::Store(s) if s.is_retryable() => (
                503,
                Self::Unavailable {
                    detail: s.to_string(),
                },
            ),
            other => (
                500,
                Self::Internal {
                    detail: other.to_string(),
                },
            ),
        }
    }

    /// Back to a [`chat_core::Error`] for `chat`.
    pub fn into_error(self, chat: &chat_core::ChatId) -> Error {
        match self {
            Self::NotFound => Error::NotFound,
            Self::Busy => Error::Busy {
                chat_id: chat.to_string(),
            },
            Self::Invalid { field, reason } => Error::Invalid(ValidationError::new(
                known(FIELDS, &field, "request"),
                reason,
            )),
            Self::TooLarge { what, size, limit } => Error::TooLarge {
                what: known(SIZED, &what, "request"),
                size,
                limit,
            },
            Self::Conflict { detail } => Error::Store(StoreError::Conflict(detail)),
            Self::Unavailable { detail } => {
                Error::Store(StoreError::unavailable(crate::D1Error(detail)))
            }
            Self::Internal { detail } => Error::Store(StoreError::backend(crate::D1Error(detail))),
        }
    }
}
