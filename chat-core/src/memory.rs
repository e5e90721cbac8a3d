//! A real, concurrent in-memory [`MessageStore`] for tests and quick starts.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use async_trait::async_trait;

use crate::error::StoreError;
use crate::ids::{ChatId, MessageId, UserId};
use crate::store::{Chat, ChatCursor, ChatPage, MessageStore, NewChat, PageRequest, StoredMessage};

#[derive(Debug, Default)]
struct ChatEntry {
    chat: Option<Chat>,
    messages: Vec<StoredMessage>,
    index: HashMap<MessageId, usize>,
    /// Highest fencing token seen.
    fence: u64,
}

#[derive(Debug, Default)]
struct State {
    chats: HashMap<ChatId, ChatEntry>,
    /// Which chat each message id belongs to (ids are unique across chats).
    owners: HashMap<MessageId, ChatId>,
}

/// Chats and messages in process memory. Same semantics as the SQL stores
/// (it passes the same conformance suite); data is lost when dropped.
#[derive(Debug, Default)]
pub struct InMemoryStore {
    state: RwLock<State>,
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn owned<'a>(s: &'a State, user: &UserId, chat: &ChatId) -> Result<&'a ChatEntry, StoreError> {
    s.chats
        .get(chat)
        .filter(|e| e.chat.as_ref().is_some_and(|c| &c.user_id == user))
        .ok_or(StoreError::NotFound)
}

fn owned_mut<'a>(
    s: &'a mut State,
    user: &UserId,
    chat: &ChatId,
) -> Result<&'a mut ChatEntry, StoreError> {
    s.chats
        .get_mut(chat)
        .filter(|e| e.chat.as_ref().is_some_and(|c| &c.user_id == user))
        .ok_or(StoreError::NotFound)
}

#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
impl MessageStore for InMemoryStore {
    async fn create_chat(&self, user: &UserId, new: NewChat) -> Result<Chat, StoreError> {
        let chat = Chat {
            id: new.id,
            user_id: user.clone(),
            title: new.title,
            created_at: new.created_at,
            updated_at: new.created_at,
        };
        let mut s = self.write();
        if s.chats.contains_key(&new.id) {
            return Err(StoreError::Conflict(format!("chat {} exists", new.id)));
        }
        s.chats.insert(
            new.id,
            ChatEntry {
                chat: Some(chat.clone()),
                ..ChatEntry::default()
            },
        );
        Ok(chat)
    }

    async fn list_chats(&self, user: &UserId, page: PageRequest) -> Result<ChatPage, StoreError> {
        let s = self.read();
        let mut chats: Vec<&Chat> = s
            .chats
            .values()
            .filter_map(|e| e.chat.as_ref())
            .filter(|c| &c.user_id == user)
            .filter(|c| {
                page.cursor
                    .is_none_or(|cur| (c.updated_at, c.id) < (cur.updated_at, cur.id))
            })
            .collect();
        chats.sort_by_key(|c| std::cmp::Reverse((c.updated_at, c.id)));
        let limit = page.limit.max(1) as usize;
        let more = chats.len() > limit;
        let chats: Vec<Chat> = chats.into_iter().take(limit).cloned().collect();
        let next_cursor = if more {
            chats.last().map(ChatCursor::after)
        } else {
            None
        };
        Ok(ChatPage { chats, next_cursor })
    }

    async fn get_chat(&self, user: &UserId, chat: &ChatId) -> Result<Chat, StoreError> {
        let s = self.read();
        owned(&s, user, chat)?
            .chat
            .clone()
            .ok_or(StoreError::NotFound)
    }

    async fn delete_chat(&self, user: &UserId, chat: &ChatId) -> Result<(), StoreError> {
        let mut s = self.write();
        owned(&s, user, chat)?;
        if let Some(entry) = s.chats.remove(chat) {
            for id in entry.index.keys() {
                s.owners.remove(id);
            }
        }
        Ok(())
    }

    async fn load_messages(
        &self,
        user: &UserId,
        chat: &ChatId,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let s = self.read();
        Ok(owned(&s, user, chat)?.messages.clone())
    }

    async fn upsert_message(
        &self,
        user: &UserId,
        chat: &ChatId,
        message: &StoredMessage,
    ) -> Result<(), StoreError> {
        upsert(&mut self.write(), user, chat, message, None)
    }

    async fn set_title_if_unset(
        &self,
        user: &UserId,
        chat: &ChatId,
        title: &str,
    ) -> Result<bool, StoreError> {
        let mut s = self.write();
        let entry = owned_mut(&mut s, user, chat)?;
        match entry.chat.as_mut() {
            Some(c) if c.title.is_none() => {
                c.title = Some(title.to_owned());
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn supports_fencing(&self) -> bool {
        true
    }

    async fn upsert_message_fenced(
        &self,
        user: &UserId,
        chat: &ChatId,
        message: &StoredMessage,
        fence: u64,
    ) -> Result<(), StoreError> {
        upsert(&mut self.write(), user, chat, message, Some(fence))
    }

    async fn touch(&self, user: &UserId, chat: &ChatId, at: i64) -> Result<(), StoreError> {
        let mut s = self.write();
        let entry = owned_mut(&mut s, user, chat)?;
        if let Some(c) = entry.chat.as_mut() {
            c.updated_at = c.updated_at.max(at);
        }
        Ok(())
    }
}

fn upsert(
    s: &mut State,
    user: &UserId,
    chat: &ChatId,
    message: &StoredMessage,
    fence: Option<u64>,
) -> Result<(), StoreError> {
    let entry = owned(s, user, chat)?;
    if let Some(f) = fence
        && f < entry.fence
    {
        return Err(StoreError::Fenced);
    }
    let id = message.message.id.clone();
    if let Some(other) = s.owners.get(&id)
        && other != chat
    {
        return Err(StoreError::Conflict(format!(
            "message id {id} belongs to another chat"
        )));
    }
    s.owners.insert(id.clone(), *chat);
    let entry = owned_mut(s, user, chat)?;
    if let Some(f) = fence {
        entry.fence = f;
    }
    if let Some(&i) = entry.index.get(&id) {
        let slot = &mut entry.messages[i];
        let created_at = slot.created_at;
        *slot = message.clone();
        slot.created_at = created_at;
    } else {
        entry.index.insert(id, entry.messages.len());
        entry.messages.push(message.clone());
    }
    if let Some(c) = entry.chat.as_mut() {
        c.updated_at = c.updated_at.max(message.updated_at);
    }
    Ok(())
}
