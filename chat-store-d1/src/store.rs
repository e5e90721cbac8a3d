//! [`D1Store`]: chats and messages in Cloudflare D1, the same schema as
//! chat-store-sqlx's SQLite migrations.
//!
//! Numbers cross the JS boundary as `f64` (D1 has no `BigInt`, and `worker`'s
//! integer binding is 32-bit): epoch milliseconds fit exactly in 53 bits. Ids
//! are TEXT. D1 has no interactive transactions, so every multi-statement
//! write is one `batch` (atomic), shaped so a rejected write changes nothing.

use std::rc::Rc;

use async_trait::async_trait;
use chat_core::{
    Chat, ChatCursor, ChatId, ChatPage, MessageId, MessageMetadata, MessageStatus, MessageStore,
    NewChat, PageRequest, Part, Role, StoreError, StoredMessage, UiMessage, UserId,
};
use serde::Deserialize;
use worker::D1Database;
use worker::wasm_bindgen::JsValue;

/// Largest encoded message (parts + metadata) accepted, in bytes (D1 rows are at most 2 MB).
pub const DEFAULT_MAX_ROW_BYTES: usize = 1_900_000;

/// A D1 failure kept as text (JS errors are not `Send`, `StoreError` sources must be).
#[derive(Debug, thiserror::Error)]
#[error("D1: {0}")]
pub struct D1Error(pub String);

fn backend(e: &worker::Error) -> StoreError {
    let text = e.to_string();
    // Transient conditions D1 reports as text; everything else is permanent.
    let transient = [
        "Network connection lost",
        "overloaded",
        "timed out",
        "reset",
        "try again",
    ];
    if transient.iter().any(|t| text.contains(t)) {
        StoreError::unavailable(D1Error(text))
    } else {
        StoreError::backend(D1Error(text))
    }
}

fn num(v: i64) -> JsValue {
    // Exact for |v| < 2^53, which covers epoch milliseconds and sequence numbers.
    JsValue::from_f64(v as f64)
}

fn text(s: &str) -> JsValue {
    JsValue::from_str(s)
}

fn opt_text(s: Option<&str>) -> JsValue {
    s.map_or(JsValue::NULL, JsValue::from_str)
}

#[derive(Deserialize)]
struct ChatRow {
    id: String,
    user_id: String,
    title: Option<String>,
    created_at: f64,
    updated_at: f64,
}

impl ChatRow {
    fn into_chat(self) -> Result<Chat, StoreError> {
        Ok(Chat {
            id: ChatId::parse(&self.id)
                .map_err(|e| StoreError::Invalid(format!("stored chat id {}: {e}", self.id)))?,
            user_id: UserId::new(&self.user_id).map_err(|e| {
                StoreError::Invalid(format!("stored user id of chat {}: {e}", self.id))
            })?,
            title: self.title,
            created_at: self.created_at as i64,
            updated_at: self.updated_at as i64,
        })
    }
}

/// A `chats LEFT JOIN messages` row: all message columns are NULL for an empty chat.
#[derive(Deserialize)]
struct MessageRow {
    id: Option<String>,
    role: Option<String>,
    content: Option<String>,
    metadata: Option<String>,
    status: Option<String>,
    created_at: Option<f64>,
    updated_at: Option<f64>,
}

fn corrupt(what: &str, id: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(format!("stored {what} of message {id} is unreadable: {e}"))
}

impl MessageRow {
    fn decode(self) -> Result<Option<StoredMessage>, StoreError> {
        let Some(id) = self.id else {
            return Ok(None);
        };
        let role = self.role.unwrap_or_default();
        let status = self.status.unwrap_or_default();
        let parts: Vec<Part> = serde_json::from_str(self.content.as_deref().unwrap_or("[]"))
            .map_err(|e| corrupt("content", &id, e))?;
        let metadata: Option<MessageMetadata> = self
            .metadata
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| corrupt("metadata", &id, e))?;
        Ok(Some(StoredMessage {
            message: UiMessage {
                id: MessageId::parse(&id).map_err(|e| corrupt("id", &id, e))?,
                role: Role::parse(&role).ok_or_else(|| corrupt("role", &id, &role))?,
                parts,
                metadata,
            },
            created_at: self.created_at.unwrap_or_default() as i64,
            updated_at: self.updated_at.unwrap_or_default() as i64,
            status: MessageStatus::parse(&status).ok_or_else(|| corrupt("status", &id, &status))?,
        }))
    }
}

/// [`MessageStore`] on a D1 database (binding from `env.d1("DB")`). Cheap to clone.
#[derive(Clone)]
pub struct D1Store {
    db: Rc<D1Database>,
    max_row_bytes: usize,
}

impl std::fmt::Debug for D1Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("D1Store")
            .field("max_row_bytes", &self.max_row_bytes)
            .finish_non_exhaustive()
    }
}

const CHAT_COLUMNS: &str = "id, user_id, title, created_at, updated_at";

impl D1Store {
    /// A store over `db` (its schema comes from `migrations/`, applied with
    /// `wrangler d1 migrations apply`).
    pub fn new(db: D1Database) -> Self {
        Self {
            db: Rc::new(db),
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
        }
    }

    /// The store of the D1 binding named `binding` in `env`.
    pub fn from_env(env: &worker::Env, binding: &str) -> Result<Self, StoreError> {
        env.d1(binding).map(Self::new).map_err(|e| backend(&e))
    }

    /// Sets the largest encoded message accepted, in bytes.
    #[must_use]
    pub fn with_max_row_bytes(mut self, bytes: usize) -> Self {
        self.max_row_bytes = bytes;
        self
    }

    fn stmt(&self, sql: &str, args: &[JsValue]) -> Result<worker::D1PreparedStatement, StoreError> {
        self.db.prepare(sql).bind(args).map_err(|e| backend(&e))
    }

    async fn changes(&self, sql: &str, args: &[JsValue]) -> Result<usize, StoreError> {
        let result = self.stmt(sql, args)?.run().await.map_err(|e| backend(&e))?;
        changes_of(&result)
    }
}

fn changes_of(result: &worker::D1Result) -> Result<usize, StoreError> {
    if let Some(err) = result.error() {
        return Err(StoreError::backend(D1Error(err)));
    }
    Ok(result
        .meta()
        .map_err(|e| backend(&e))?
        .and_then(|m| m.changes)
        .unwrap_or(0))
}

#[async_trait(?Send)]
impl MessageStore for D1Store {
    async fn create_chat(&self, user: &UserId, chat: NewChat) -> Result<Chat, StoreError> {
        self.changes(
            "INSERT INTO chats (id, user_id, title, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)",
            &[
                text(&chat.id.to_string()),
                text(user.as_str()),
                opt_text(chat.title.as_deref()),
                num(chat.created_at),
            ],
        )
        .await?;
        Ok(Chat {
            id: chat.id,
            user_id: user.clone(),
            title: chat.title,
            created_at: chat.created_at,
            updated_at: chat.created_at,
        })
    }

    async fn list_chats(&self, user: &UserId, page: PageRequest) -> Result<ChatPage, StoreError> {
        let limit = i64::from(page.limit.clamp(1, 1000));
        let stmt = match page.cursor {
            None => self.stmt(
                &format!(
                    "SELECT {CHAT_COLUMNS} FROM chats WHERE user_id = ?1 \
                     ORDER BY updated_at DESC, id DESC LIMIT ?2"
                ),
                &[text(user.as_str()), num(limit + 1)],
            )?,
            Some(c) => self.stmt(
                &format!(
                    "SELECT {CHAT_COLUMNS} FROM chats WHERE user_id = ?1 \
                     AND (updated_at < ?2 OR (updated_at = ?2 AND id < ?3)) \
                     ORDER BY updated_at DESC, id DESC LIMIT ?4"
                ),
                &[
                    text(user.as_str()),
                    num(c.updated_at),
                    text(&c.id.to_string()),
                    num(limit + 1),
                ],
            )?,
        };
        let rows: Vec<ChatRow> = stmt
            .all()
            .await
            .and_then(|r| r.results())
            .map_err(|e| backend(&e))?;
        let mut chats = rows
            .into_iter()
            .map(ChatRow::into_chat)
            .collect::<Result<Vec<_>, _>>()?;
        let more = chats.len() as i64 > limit;
        chats.truncate(limit as usize);
        let next_cursor = if more {
            chats.last().map(ChatCursor::after)
        } else {
            None
        };
        Ok(ChatPage { chats, next_cursor })
    }

    async fn get_chat(&self, user: &UserId, chat: &ChatId) -> Result<Chat, StoreError> {
        let row: Option<ChatRow> = self
            .stmt(
                &format!("SELECT {CHAT_COLUMNS} FROM chats WHERE id = ?1 AND user_id = ?2"),
                &[text(&chat.to_string()), text(user.as_str())],
            )?
            .first(None)
            .await
            .map_err(|e| backend(&e))?;
        row.ok_or(StoreError::NotFound)?.into_chat()
    }

    async fn delete_chat(&self, user: &UserId, chat: &ChatId) -> Result<(), StoreError> {
        let args = [text(&chat.to_string()), text(user.as_str())];
        // One atomic batch; the messages go first (and only if the chat is the user's),
        // so it does not depend on D1's foreign-key enforcement.
        let results = self
            .db
            .batch(vec![
                self.stmt(
                    "DELETE FROM messages WHERE chat_id = ?1 \
                     AND EXISTS (SELECT 1 FROM chats WHERE id = ?1 AND user_id = ?2)",
                    &args,
                )?,
                self.stmt("DELETE FROM chats WHERE id = ?1 AND user_id = ?2", &args)?,
            ])
            .await
            .map_err(|e| backend(&e))?;
        let deleted = results.get(1).map(changes_of).transpose()?.unwrap_or(0);
        if deleted == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn load_messages(
        &self,
        user: &UserId,
        chat: &ChatId,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        // One scoped query: no row = no such chat (for this user); one row with
        // NULL message columns = an empty chat.
        let rows: Vec<MessageRow> = self
            .stmt(
                "SELECT m.id, m.role, m.content, m.metadata, m.status, m.created_at, m.updated_at \
                 FROM chats c LEFT JOIN messages m ON m.chat_id = c.id \
                 WHERE c.id = ?1 AND c.user_id = ?2 ORDER BY m.seq",
                &[text(&chat.to_string()), text(user.as_str())],
            )?
            .all()
            .await
            .and_then(|r| r.results())
            .map_err(|e| backend(&e))?;
        if rows.is_empty() {
            return Err(StoreError::NotFound);
        }
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            if let Some(m) = row.decode()? {
                out.push(m);
            }
        }
        Ok(out)
    }

    async fn upsert_message(
        &self,
        user: &UserId,
        chat: &ChatId,
        message: &StoredMessage,
    ) -> Result<(), StoreError> {
        let content = serde_json::to_string(&message.message.parts)
            .map_err(|e| StoreError::Invalid(format!("parts do not serialize: {e}")))?;
        let metadata =
            match &message.message.metadata {
                Some(md) if !md.is_empty() => Some(serde_json::to_string(md).map_err(|e| {
                    StoreError::Invalid(format!("metadata does not serialize: {e}"))
                })?),
                _ => None,
            };
        let size = content.len() + metadata.as_ref().map_or(0, String::len);
        if size > self.max_row_bytes {
            return Err(StoreError::Invalid(format!(
                "message {} is {size} bytes, over the row limit of {}",
                message.message.id, self.max_row_bytes
            )));
        }
        let finish_reason = message
            .message
            .metadata
            .as_ref()
            .and_then(|md| md.finish_reason)
            .map(chat_core::FinishReason::as_str);
        let chat_id = chat.to_string();
        let id = message.message.id.as_str();
        // 1. Insert at the chat's next sequence number, or replace in place when the
        //    id exists in this chat (an id of another chat is left alone: 0 changes).
        //    The SELECT makes it a no-op for a chat the user does not own.
        let upsert = self.stmt(
            "INSERT INTO messages (id, chat_id, seq, role, content, metadata, status, \
             finish_reason, created_at, updated_at) \
             SELECT ?1, c.id, c.next_seq + 1, ?3, ?4, ?5, ?6, ?7, ?8, ?9 FROM chats c \
             WHERE c.id = ?2 AND c.user_id = ?10 \
             ON CONFLICT (id) DO UPDATE SET role = excluded.role, content = excluded.content, \
             metadata = excluded.metadata, status = excluded.status, \
             finish_reason = excluded.finish_reason, updated_at = excluded.updated_at \
             WHERE messages.chat_id = excluded.chat_id",
            &[
                text(id),
                text(&chat_id),
                text(message.message.role.as_str()),
                text(&content),
                opt_text(metadata.as_deref()),
                text(message.status.as_str()),
                opt_text(finish_reason),
                num(message.created_at),
                num(message.updated_at),
                text(user.as_str()),
            ],
        )?;
        // 2. Advance the sequence and the chat's activity time, only if the message
        //    is now in this chat (so a rejected write changes nothing).
        let touch = self.stmt(
            "UPDATE chats SET \
             next_seq = MAX(next_seq, (SELECT COALESCE(MAX(seq), 0) FROM messages WHERE chat_id = ?1)), \
             updated_at = MAX(updated_at, ?2) \
             WHERE id = ?1 AND user_id = ?3 \
             AND EXISTS (SELECT 1 FROM messages WHERE id = ?4 AND chat_id = ?1)",
            &[
                text(&chat_id),
                num(message.updated_at),
                text(user.as_str()),
                text(id),
            ],
        )?;
        let results = self
            .db
            .batch(vec![upsert, touch])
            .await
            .map_err(|e| backend(&e))?;
        let written = results.first().map(changes_of).transpose()?.unwrap_or(0);
        if written == 0 {
            // Tell "not yours / not there" from "the id belongs to another chat".
            self.get_chat(user, chat).await?;
            return Err(StoreError::Conflict(format!(
                "message id {id} belongs to another chat"
            )));
        }
        Ok(())
    }

    async fn set_title_if_unset(
        &self,
        user: &UserId,
        chat: &ChatId,
        title: &str,
    ) -> Result<bool, StoreError> {
        let n = self
            .changes(
                "UPDATE chats SET title = ?3 WHERE id = ?1 AND user_id = ?2 AND title IS NULL",
                &[text(&chat.to_string()), text(user.as_str()), text(title)],
            )
            .await?;
        if n == 1 {
            return Ok(true);
        }
        self.get_chat(user, chat).await.map(|_| false)
    }

    async fn touch(&self, user: &UserId, chat: &ChatId, at: i64) -> Result<(), StoreError> {
        let n = self
            .changes(
                "UPDATE chats SET updated_at = MAX(updated_at, ?3) WHERE id = ?1 AND user_id = ?2",
                &[text(&chat.to_string()), text(user.as_str()), num(at)],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}
