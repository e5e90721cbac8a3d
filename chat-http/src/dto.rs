//! Request and response bodies of the contract, with their OpenAPI schemas.

use chat_core::{ChatId, UiMessage};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /api/chat` (optional).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChatRequest {
    /// A title to keep (otherwise it is set from the first message).
    #[serde(default)]
    pub title: Option<String>,
}

/// Answer of `POST /api/chat`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateChatResponse {
    /// Server-generated UUID v4.
    #[schema(value_type = String)]
    pub chat_id: ChatId,
    /// The owner.
    pub user_id: String,
    /// Epoch ms.
    pub created_at: i64,
}

/// One chat in a listing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatSummary {
    /// Chat id.
    #[schema(value_type = String)]
    pub id: ChatId,
    /// Title, once set.
    pub title: Option<String>,
    /// Epoch ms.
    pub created_at: i64,
    /// Epoch ms of the last message.
    pub updated_at: i64,
}

/// Answer of `GET /api/chat`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatListResponse {
    /// Most recently updated first.
    pub chats: Vec<ChatSummary>,
    /// Pass as `?cursor=` for the next page; null at the end.
    pub next_cursor: Option<String>,
}

/// Query of `GET /api/chat`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size, 1..=200 (default 50).
    pub limit: Option<u32>,
    /// Opaque cursor from `nextCursor`.
    pub cursor: Option<String>,
}

/// One message in the seed's history shape.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryMessage {
    /// Message id.
    pub id: String,
    /// `user`, `assistant` or `system`.
    pub role: String,
    /// JSON string of the message's parts.
    pub content: String,
    /// Epoch ms.
    pub created_at: i64,
}

/// Answer of `GET /api/chat/{chatId}/history`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryResponse {
    /// The chat.
    #[schema(value_type = String)]
    pub chat_id: ChatId,
    /// Oldest first.
    pub messages: Vec<HistoryMessage>,
}

/// Answer of `GET /api/chat/{chatId}/messages`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagesResponse {
    /// The chat.
    #[schema(value_type = String)]
    pub chat_id: ChatId,
    /// AI SDK `UIMessage`s, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<UiMessage>,
}

/// Answer of `DELETE /api/chat/{chatId}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeleteResponse {
    /// Always true.
    pub success: bool,
    /// `Chat deleted successfully`.
    pub message: String,
}

/// Answer of `POST /api/chat/{chatId}/stop`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StopResponse {
    /// Whether a generation was running.
    pub stopped: bool,
}

/// Body of `POST /api/chat/{chatId}/messages`, as `useChat` sends it.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendMessageBody {
    /// The chat id (must match the path when given).
    #[serde(default)]
    pub id: Option<String>,
    /// The new user message.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub message: Option<UiMessage>,
    /// All messages (the last one is the new user message); history always comes from the store.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub messages: Option<Vec<UiMessage>>,
    /// `submit-message` (default) or `regenerate-message`.
    #[serde(default)]
    pub trigger: Option<String>,
    /// For `regenerate-message`: the assistant message to replace.
    #[serde(default)]
    pub message_id: Option<String>,
}
