//! Row encoding shared by both backends.

use chat_core::{
    Chat, ChatId, MessageId, MessageMetadata, MessageStatus, Part, Role, StoreError, StoredMessage,
    UiMessage, UserId,
};

/// A message as it goes into a row.
pub(crate) struct MessageRow {
    pub id: String,
    pub role: &'static str,
    pub content: String,
    pub metadata: Option<String>,
    pub status: &'static str,
    pub finish_reason: Option<&'static str>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Encodes a message, rejecting rows over `max_bytes` before any write.
pub(crate) fn encode(m: &StoredMessage, max_bytes: usize) -> Result<MessageRow, StoreError> {
    let content = serde_json::to_string(&m.message.parts)
        .map_err(|e| StoreError::Invalid(format!("parts do not serialize: {e}")))?;
    let metadata = match &m.message.metadata {
        Some(md) if !md.is_empty() => Some(
            serde_json::to_string(md)
                .map_err(|e| StoreError::Invalid(format!("metadata does not serialize: {e}")))?,
        ),
        _ => None,
    };
    let size = content.len() + metadata.as_ref().map_or(0, String::len);
    if size > max_bytes {
        return Err(StoreError::Invalid(format!(
            "message {} is {size} bytes, over the row limit of {max_bytes}",
            m.message.id
        )));
    }
    Ok(MessageRow {
        id: m.message.id.as_str().to_owned(),
        role: m.message.role.as_str(),
        content,
        metadata,
        status: m.status.as_str(),
        finish_reason: m
            .message
            .metadata
            .as_ref()
            .and_then(|md| md.finish_reason)
            .map(chat_core::FinishReason::as_str),
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

fn corrupt(what: &str, id: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(format!("stored {what} of message {id} is unreadable: {e}"))
}

/// Decodes a message row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode(
    id: &str,
    role: &str,
    content: &str,
    metadata: Option<&str>,
    status: &str,
    created_at: i64,
    updated_at: i64,
) -> Result<StoredMessage, StoreError> {
    let parts: Vec<Part> = serde_json::from_str(content).map_err(|e| corrupt("content", id, e))?;
    let metadata: Option<MessageMetadata> = metadata
        .map(serde_json::from_str)
        .transpose()
        .map_err(|e| corrupt("metadata", id, e))?;
    Ok(StoredMessage {
        message: UiMessage {
            id: MessageId::parse(id).map_err(|e| corrupt("id", id, e))?,
            role: Role::parse(role).ok_or_else(|| corrupt("role", id, role))?,
            parts,
            metadata,
        },
        created_at,
        updated_at,
        status: MessageStatus::parse(status).ok_or_else(|| corrupt("status", id, status))?,
    })
}

/// Decodes a chat row.
pub(crate) fn chat(
    id: &str,
    user_id: &str,
    title: Option<String>,
    created_at: i64,
    updated_at: i64,
) -> Result<Chat, StoreError> {
    Ok(Chat {
        id: ChatId::parse(id)
            .map_err(|e| StoreError::Invalid(format!("stored chat id {id}: {e}")))?,
        user_id: UserId::new(user_id)
            .map_err(|e| StoreError::Invalid(format!("stored user id of chat {id}: {e}")))?,
        title,
        created_at,
        updated_at,
    })
}
