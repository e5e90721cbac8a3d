//! The storage seam: chats and messages, always scoped by owner.

use async_trait::async_trait;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::history::History;
use crate::ids::{ChatId, UserId};
use crate::message::UiMessage;

/// A chat as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chat {
    /// The chat's id.
    pub id: ChatId,
    /// Its owner.
    pub user_id: UserId,
    /// Title, once set.
    pub title: Option<String>,
    /// Creation time, epoch ms.
    pub created_at: i64,
    /// Last activity (a message added), epoch ms.
    pub updated_at: i64,
}

/// What `create_chat` needs.
#[derive(Debug, Clone)]
pub struct NewChat {
    /// Server-generated id.
    pub id: ChatId,
    /// Optional title given at creation (kept; never overwritten by the first message).
    pub title: Option<String>,
    /// Creation time, epoch ms (also the initial `updated_at`).
    pub created_at: i64,
}

/// Position in a `list_chats` listing: chats are ordered by `(updated_at desc, id desc)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatCursor {
    /// `updated_at` of the last chat on the previous page.
    pub updated_at: i64,
    /// `id` of the last chat on the previous page.
    pub id: ChatId,
}

impl ChatCursor {
    /// The cursor after `chat`.
    pub fn after(chat: &Chat) -> Self {
        Self {
            updated_at: chat.updated_at,
            id: chat.id,
        }
    }

    /// The opaque, URL-safe form given to clients.
    pub fn encode(&self) -> String {
        let raw = format!("{}:{}", self.updated_at, self.id);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// Parses the opaque form; `None` when it was not produced by [`encode`](Self::encode).
    pub fn decode(s: &str) -> Option<Self> {
        if s.len() > 128 {
            return None;
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (ts, id) = raw.split_once(':')?;
        Some(Self {
            updated_at: ts.parse().ok()?,
            id: ChatId::parse(id).ok()?,
        })
    }
}

/// A page request for `list_chats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Maximum chats to return (callers clamp to 1..=200).
    pub limit: u32,
    /// Continue after this position.
    pub cursor: Option<ChatCursor>,
}

/// One page of chats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatPage {
    /// The chats, most recently updated first.
    pub chats: Vec<Chat>,
    /// Where the next page starts; `None` at the end.
    pub next_cursor: Option<ChatCursor>,
}

/// Whether a stored message is final or a checkpoint of a running generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    /// Final.
    Complete,
    /// A checkpoint of a generation still running (or one that crashed).
    Streaming,
}

impl MessageStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Complete => "complete",
            MessageStatus::Streaming => "streaming",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "complete" => Some(MessageStatus::Complete),
            "streaming" => Some(MessageStatus::Streaming),
            _ => None,
        }
    }
}

/// A message with the server-side facts stores keep beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// The message (its `metadata.createdAt` equals `created_at`).
    pub message: UiMessage,
    /// Creation time, epoch ms. Ordering is by insertion, not by this value.
    pub created_at: i64,
    /// Last write, epoch ms; the chat's `updated_at` moves to at least this.
    pub updated_at: i64,
    /// Final or checkpoint.
    pub status: MessageStatus,
}

/// Persistent chats and messages.
///
/// Every method takes the owner's id and must treat a chat of another user
/// exactly like a missing one ([`StoreError::NotFound`]), in the query itself.
#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
pub trait MessageStore: crate::MaybeSendSync + 'static {
    /// Creates a chat owned by `user`.
    async fn create_chat(&self, user: &UserId, chat: NewChat) -> Result<Chat, StoreError>;

    /// Lists `user`'s chats, most recently updated first (keyset pagination).
    async fn list_chats(&self, user: &UserId, page: PageRequest) -> Result<ChatPage, StoreError>;

    /// One chat of `user`.
    async fn get_chat(&self, user: &UserId, chat: &ChatId) -> Result<Chat, StoreError>;

    /// Deletes the chat and all its messages atomically.
    async fn delete_chat(&self, user: &UserId, chat: &ChatId) -> Result<(), StoreError>;

    /// All messages of the chat in insertion order (checkpoints included).
    async fn load_messages(
        &self,
        user: &UserId,
        chat: &ChatId,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// [`load_messages`](Self::load_messages) as a shared [`History`]: a
    /// store that keeps histories in memory hands out its own (the turn
    /// runtime reads history this way, so a cached history is never copied).
    async fn load_history(&self, user: &UserId, chat: &ChatId) -> Result<History, StoreError> {
        Ok(self.load_messages(user, chat).await?.into_iter().collect())
    }

    /// Inserts the message, or replaces it in place when its id exists in this
    /// chat (keeping its position and `created_at`), and moves the chat's
    /// `updated_at` to at least `message.updated_at`, atomically. An id that
    /// exists in another chat is a [`StoreError::Conflict`].
    async fn upsert_message(
        &self,
        user: &UserId,
        chat: &ChatId,
        message: &StoredMessage,
    ) -> Result<(), StoreError>;

    /// Sets the title only if none is set; returns whether it was set.
    async fn set_title_if_unset(
        &self,
        user: &UserId,
        chat: &ChatId,
        title: &str,
    ) -> Result<bool, StoreError>;

    /// Moves the chat's `updated_at` to at least `at`.
    async fn touch(&self, user: &UserId, chat: &ChatId, at: i64) -> Result<(), StoreError>;

    /// Whether [`upsert_message_fenced`](Self::upsert_message_fenced) is supported
    /// (needed by multi-instance coordination).
    fn supports_fencing(&self) -> bool {
        false
    }

    /// [`upsert_message`](Self::upsert_message) guarded by a fencing token: the
    /// write happens only if `fence` is at least the highest token seen for the
    /// chat, which it then records, atomically. An older token is
    /// [`StoreError::Fenced`]: a newer turn (on another instance) owns the chat.
    async fn upsert_message_fenced(
        &self,
        user: &UserId,
        chat: &ChatId,
        message: &StoredMessage,
        fence: u64,
    ) -> Result<(), StoreError> {
        let _ = (user, chat, message, fence);
        Err(StoreError::Unsupported("fenced writes"))
    }
}

/// The messages of a chat as clients are shown them (`GET .../messages`):
/// the running turn's assistant message (`running`) is left out, and every
/// other checkpoint (a [`MessageStatus::Streaming`] message no turn runs for:
/// its writer died) is finalized in the store as a finished message with
/// finish reason `error`. Returns the messages and whether any was rewritten.
/// A failed rewrite is logged and the message is still listed as finished.
pub async fn listed_history(
    store: &dyn MessageStore,
    user: &UserId,
    chat: &ChatId,
    running: Option<&crate::ids::MessageId>,
) -> Result<(Vec<UiMessage>, bool), StoreError> {
    let stored = store.load_messages(user, chat).await?;
    let mut rewritten = false;
    let mut out = Vec::with_capacity(stored.len());
    for mut m in stored {
        if running == Some(&m.message.id) {
            continue;
        }
        if m.status == MessageStatus::Streaming {
            m.status = MessageStatus::Complete;
            m.message.metadata_mut().finish_reason = Some(crate::message::FinishReason::Error);
            rewritten = true;
            if let Err(e) = store.upsert_message(user, chat, &m).await {
                tracing::warn!(chat_id = %chat, message_id = %m.message.id, error = %e,
                    "could not finalize an orphaned checkpoint");
            }
        }
        out.push(m.message);
    }
    Ok((out, rewritten))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let c = ChatCursor {
            updated_at: 1_732_492_800_123,
            id: ChatId::new(),
        };
        assert_eq!(ChatCursor::decode(&c.encode()), Some(c));
        assert_eq!(ChatCursor::decode("nope"), None);
        assert_eq!(ChatCursor::decode(""), None);
    }
}
