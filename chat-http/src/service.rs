//! `ChatService`: the contract's operations over a store, a session runtime
//! and an authenticator, independent of any HTTP framework.

use std::sync::Arc;

use chat_core::{
    ChatCursor, ChatId, ChatSession, Limits, MessageId, MessageStore, NewChat, PageRequest,
    SendRequest, Trigger, TurnStream, UiMessage, UserId, now_ms,
};

use crate::auth::Authenticator;
use crate::dto::{
    ChatListResponse, ChatSummary, CreateChatRequest, CreateChatResponse, DeleteResponse,
    HistoryMessage, HistoryResponse, MessagesResponse, SendMessageBody, StopResponse,
};
use crate::error::ApiError;

/// Default page size of `GET /api/chat`.
pub const DEFAULT_PAGE: u32 = 50;
/// Largest page size of `GET /api/chat`.
pub const MAX_PAGE: u32 = 200;
/// Default request body limit (1 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// Everything a server needs to answer the contract.
#[derive(Clone)]
pub struct ChatService {
    store: Arc<dyn MessageStore>,
    sessions: Arc<dyn ChatSession>,
    auth: Arc<dyn Authenticator>,
    limits: Limits,
    body_limit: usize,
}

impl std::fmt::Debug for ChatService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatService")
            .field("limits", &self.limits)
            .field("body_limit", &self.body_limit)
            .finish_non_exhaustive()
    }
}

/// Parses a chat id from a path segment (400 if it is not a UUID).
pub fn parse_chat_id(s: &str) -> Result<ChatId, ApiError> {
    Ok(ChatId::parse(s)?)
}

impl ChatService {
    /// A service over `store` and `sessions` (which must persist into `store`).
    pub fn new(
        store: Arc<dyn MessageStore>,
        sessions: Arc<dyn ChatSession>,
        auth: Arc<dyn Authenticator>,
    ) -> Self {
        Self {
            store,
            sessions,
            auth,
            limits: Limits::default(),
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }

    /// Sets the input limits (must match the session runtime's `TurnConfig::limits`).
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the request body limit in bytes (default 1 MiB).
    #[must_use]
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The request body limit in bytes.
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }

    /// The authenticator.
    pub fn authenticator(&self) -> &Arc<dyn Authenticator> {
        &self.auth
    }

    /// The session runtime.
    pub fn sessions(&self) -> &Arc<dyn ChatSession> {
        &self.sessions
    }

    /// `POST /api/chat`.
    pub async fn create_chat(
        &self,
        user: &UserId,
        body: &[u8],
    ) -> Result<CreateChatResponse, ApiError> {
        let req: CreateChatRequest = if body.iter().all(u8::is_ascii_whitespace) {
            CreateChatRequest::default()
        } else {
            parse_json(body)?
        };
        let title = self.limits.check_title(req.title.as_deref())?;
        let chat = self
            .store
            .create_chat(
                user,
                NewChat {
                    id: ChatId::new(),
                    title,
                    created_at: now_ms(),
                },
            )
            .await
            .map_err(chat_core::Error::from)?;
        Ok(CreateChatResponse {
            chat_id: chat.id,
            user_id: chat.user_id.to_string(),
            created_at: chat.created_at,
        })
    }

    /// `GET /api/chat?limit=&cursor=`.
    pub async fn list_chats(
        &self,
        user: &UserId,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<ChatListResponse, ApiError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "limit must be between 1 and {MAX_PAGE}"
            )));
        }
        let cursor = match cursor {
            None | Some("") => None,
            Some(c) => {
                Some(ChatCursor::decode(c).ok_or_else(|| ApiError::bad_request("invalid cursor"))?)
            }
        };
        let page = self
            .store
            .list_chats(user, PageRequest { limit, cursor })
            .await
            .map_err(chat_core::Error::from)?;
        Ok(ChatListResponse {
            chats: page
                .chats
                .into_iter()
                .map(|c| ChatSummary {
                    id: c.id,
                    title: c.title,
                    created_at: c.created_at,
                    updated_at: c.updated_at,
                })
                .collect(),
            next_cursor: page.next_cursor.map(|c| c.encode()),
        })
    }

    /// `GET /api/chat/{chatId}/history` (seed shape).
    pub async fn history(&self, user: &UserId, chat: &ChatId) -> Result<HistoryResponse, ApiError> {
        let messages = self.sessions.history(user, chat).await?;
        let messages = messages
            .into_iter()
            .map(|m| {
                Ok(HistoryMessage {
                    content: serde_json::to_string(&m.parts).map_err(|e| {
                        tracing::error!(error = %e, "parts failed to serialize");
                        ApiError::new(
                            http::StatusCode::INTERNAL_SERVER_ERROR,
                            "Internal server error",
                        )
                    })?,
                    created_at: m
                        .metadata
                        .as_ref()
                        .and_then(|md| md.created_at)
                        .unwrap_or(0),
                    role: m.role.as_str().to_owned(),
                    id: m.id.to_string(),
                })
            })
            .collect::<Result<_, ApiError>>()?;
        Ok(HistoryResponse {
            chat_id: *chat,
            messages,
        })
    }

    /// `GET /api/chat/{chatId}/messages` (AI SDK `UIMessage[]`).
    pub async fn messages(
        &self,
        user: &UserId,
        chat: &ChatId,
    ) -> Result<MessagesResponse, ApiError> {
        Ok(MessagesResponse {
            chat_id: *chat,
            messages: self.sessions.history(user, chat).await?,
        })
    }

    /// `DELETE /api/chat/{chatId}`.
    pub async fn delete(&self, user: &UserId, chat: &ChatId) -> Result<DeleteResponse, ApiError> {
        self.sessions.delete(user, chat).await?;
        Ok(DeleteResponse {
            success: true,
            message: "Chat deleted successfully".into(),
        })
    }

    /// `POST /api/chat/{chatId}/messages`: starts a turn and returns its stream.
    pub async fn send(
        &self,
        user: &UserId,
        chat: &ChatId,
        body: &[u8],
    ) -> Result<TurnStream, ApiError> {
        let request = parse_send_body(chat, body)?;
        self.send_parsed(user, chat, request).await
    }

    /// [`send`](Self::send) with a body already parsed by [`parse_send_body`],
    /// so the caller can drop the request body before the turn starts.
    pub async fn send_parsed(
        &self,
        user: &UserId,
        chat: &ChatId,
        request: SendRequest,
    ) -> Result<TurnStream, ApiError> {
        Ok(self.sessions.send(user, chat, request).await?)
    }

    /// `GET /api/chat/{chatId}/stream`: the running turn, or `None` (204).
    pub async fn resume(
        &self,
        user: &UserId,
        chat: &ChatId,
    ) -> Result<Option<TurnStream>, ApiError> {
        Ok(self.sessions.resume(user, chat).await?)
    }

    /// `POST /api/chat/{chatId}/stop`.
    pub async fn stop(&self, user: &UserId, chat: &ChatId) -> Result<StopResponse, ApiError> {
        Ok(StopResponse {
            stopped: self.sessions.stop(user, chat).await?,
        })
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "Malformed JSON"
        } else {
            "Invalid request body"
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// Parses the `useChat` body of `POST /api/chat/{chatId}/messages` into a
/// [`SendRequest`]. The new user message is `message`, else the last of
/// `messages`; everything else the client sent about history is ignored.
pub fn parse_send_body(chat: &ChatId, body: &[u8]) -> Result<SendRequest, ApiError> {
    let body: SendMessageBody = parse_json(body)?;
    if let Some(id) = &body.id
        && ChatId::parse(id).ok().as_ref() != Some(chat)
    {
        return Err(ApiError::bad_request(
            "id: does not match the chat in the path",
        ));
    }
    let trigger = match body.trigger.as_deref() {
        None => Trigger::SubmitMessage,
        Some(t) => Trigger::parse(t)
            .ok_or_else(|| ApiError::bad_request(format!("trigger: unknown value `{t}`")))?,
    };
    let message: Option<UiMessage> = match (body.message, body.messages) {
        (Some(m), _) => Some(m),
        (None, Some(mut all)) => all.pop(),
        (None, None) => None,
    };
    let message_id = body.message_id.map(MessageId::parse).transpose()?;
    match trigger {
        Trigger::SubmitMessage => {
            let message = message
                .ok_or_else(|| ApiError::bad_request("message: a user message is required"))?;
            Ok(SendRequest {
                message: Some(message),
                trigger,
                message_id,
            })
        }
        Trigger::RegenerateMessage => Ok(SendRequest {
            // History comes from the store: the client's copy of the last user message is not needed.
            message: None,
            trigger,
            message_id,
        }),
    }
}
