//! A bounded in-process cache of chat ownership for the single-instance
//! runtime ([`LocalSessions`](crate::LocalSessions)), so a turn does not read
//! the chat row (`get_chat`) from the store every time.
//!
//! Safe because it only ever *narrows* what the store allows: an entry says
//! "this chat belonged to this user when the store last said so". A chat
//! never changes owner and its id is never reused, so a hit for the owner
//! can only be stale if the chat was deleted since — and every store write
//! is itself scoped by user in its query, so the turn then fails with
//! `NotFound` at its first write (the runtime drops the entry). A lookup by
//! another user is a miss and goes to the store, which answers `NotFound`
//! exactly as for a missing chat.
//!
//! Only titled chats are kept: the turn needs to know whether the title is
//! still to be set, and a title, once set, never changes (set-once).
//! Deletes bump an epoch so a store read that raced a delete is not cached.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::ids::{ChatId, UserId};
use crate::store::Chat;

/// Default bound of the ownership cache, in chats (about 150 bytes each
/// plus the title).
pub(crate) const DEFAULT_OWNER_CACHE_CHATS: usize = 65_536;

/// Shards of a cache of at least this many entries (smaller caches use one).
const SHARDS: usize = 16;

/// Chat id -> the chat as the store returned it (owner and title).
pub(crate) struct OwnerCache {
    shards: Box<[Mutex<HashMap<ChatId, Chat>>]>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
    /// Bumped by every invalidation; a fill read before a bump is dropped.
    epoch: AtomicU64,
}

impl std::fmt::Debug for OwnerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerCache")
            .field("shards", &self.shards.len())
            .field("per_shard", &self.per_shard)
            .finish_non_exhaustive()
    }
}

impl OwnerCache {
    /// A cache of at most about `max_chats` chats (at least one).
    pub(crate) fn new(max_chats: usize) -> Self {
        let shards = if max_chats >= SHARDS * 64 { SHARDS } else { 1 };
        Self {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (max_chats / shards).max(1),
            hasher: std::collections::hash_map::RandomState::new(),
            epoch: AtomicU64::new(0),
        }
    }

    fn shard(&self, chat: &ChatId) -> MutexGuard<'_, HashMap<ChatId, Chat>> {
        let h = self.hasher.hash_one(chat);
        let i = usize::try_from(h % self.shards.len() as u64).unwrap_or(0);
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The chat if it is cached for `user` (another user's chat is a miss).
    pub(crate) fn get(&self, user: &UserId, chat: &ChatId) -> Option<Chat> {
        self.shard(chat)
            .get(chat)
            .filter(|c| &c.user_id == user)
            .cloned()
    }

    /// Read before the store read whose answer goes to [`insert`](Self::insert).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Caches what the store returned, unless it has no title yet or an
    /// invalidation came in since `epoch` was read. Evicts an arbitrary
    /// entry when the shard is full.
    pub(crate) fn insert(&self, chat: &Chat, epoch: u64) {
        if chat.title.is_none() {
            return;
        }
        let mut shard = self.shard(&chat.id);
        // Checked under the shard lock: an invalidation bumps the epoch before
        // it takes the lock to remove, so it either stops this insert or
        // removes what it inserted.
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if shard.len() >= self.per_shard
            && !shard.contains_key(&chat.id)
            && let Some(victim) = shard.keys().next().copied()
        {
            shard.remove(&victim);
        }
        shard.insert(chat.id, chat.clone());
    }

    /// Forgets `chat` and drops every store read in flight.
    pub(crate) fn invalidate(&self, chat: &ChatId) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.shard(chat).remove(chat);
    }

    /// Number of cached chats.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(user: &str, title: Option<&str>) -> Chat {
        Chat {
            id: ChatId::new(),
            user_id: UserId::new(user).unwrap(),
            title: title.map(str::to_owned),
            created_at: 1,
            updated_at: 1,
        }
    }

    #[test]
    fn serves_only_the_owner() {
        let cache = OwnerCache::new(16);
        let c = chat("alice", Some("t"));
        cache.insert(&c, cache.epoch());
        assert_eq!(cache.get(&c.user_id, &c.id), Some(c.clone()));
        assert_eq!(cache.get(&UserId::new("mallory").unwrap(), &c.id), None);
        assert_eq!(cache.get(&c.user_id, &ChatId::new()), None);
    }

    #[test]
    fn untitled_chats_are_not_kept() {
        let cache = OwnerCache::new(16);
        let c = chat("alice", None);
        cache.insert(&c, cache.epoch());
        assert_eq!(cache.get(&c.user_id, &c.id), None);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_dropped() {
        let cache = OwnerCache::new(16);
        let c = chat("alice", Some("t"));
        let epoch = cache.epoch();
        cache.invalidate(&c.id);
        cache.insert(&c, epoch);
        assert_eq!(cache.get(&c.user_id, &c.id), None);
        cache.insert(&c, cache.epoch());
        assert_eq!(cache.get(&c.user_id, &c.id), Some(c.clone()));
        cache.invalidate(&c.id);
        assert_eq!(cache.get(&c.user_id, &c.id), None);
    }

    #[test]
    fn stays_within_its_bound() {
        let cache = OwnerCache::new(8);
        let chats: Vec<Chat> = (0..100).map(|_| chat("alice", Some("t"))).collect();
        for c in &chats {
            cache.insert(c, cache.epoch());
            assert!(cache.len() <= 8);
        }
        let last = chats.last().unwrap();
        assert_eq!(cache.get(&last.user_id, &last.id).as_ref(), Some(last));
    }
}
