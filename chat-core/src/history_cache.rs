//! A bounded in-memory cache of chat histories for the single-instance
//! runtime ([`LocalSessions`](crate::LocalSessions)), so a turn does not
//! reload and decode the whole chat from the store.
//!
//! Only correct when this process is the chat's only writer: the cache is
//! filled from the store on a miss and then kept up to date by the writes
//! that go through [`CachedStore`]. Anything it cannot follow exactly (two
//! writes in flight for one chat, a write racing a fill, a store error, a
//! delete) drops the chat's entry, so the next load reads the store again.
//! Locks are short-held std mutexes (one per shard), never held across an
//! `.await`.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::error::StoreError;
use crate::history::{History, id_hash};
use crate::ids::{ChatId, UserId};
use crate::message::Part;
use crate::store::{Chat, ChatPage, MessageStore, NewChat, PageRequest, StoredMessage};

/// Default bound of the history cache: 128 MiB of approximate message bytes
/// (~120,000 messages of a few hundred characters). A miss reloads and
/// decodes the chat's whole history (~2.7 ms for 1,000 messages on SQLite),
/// so a budget below the working set of active chats costs far more CPU than
/// the memory it saves: 50 users with growing chats ran at 3,075 streams/s
/// with 32 MiB and 5,465 with 128 MiB, and used less memory (356 vs 191 MB
/// peak RSS, the reloads churning the heap).
pub const DEFAULT_HISTORY_CACHE_BYTES: usize = 128 << 20;

/// Fixed per-message overhead (the struct, its vectors, the metadata, its
/// place in the id-hash set).
const MESSAGE_OVERHEAD: usize = 208;

/// Shards of a cache of at least 1 MiB (smaller caches use one shard).
const SHARDS: usize = 16;

/// Approximate heap bytes of a JSON value (a walk, no serialization).
fn value_size(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 16,
        Value::String(s) => 24 + s.len(),
        Value::Array(a) => 24 + a.iter().map(value_size).sum::<usize>(),
        Value::Object(o) => map_size(o),
    }
}

fn map_size(o: &Map<String, Value>) -> usize {
    48 + o
        .iter()
        .map(|(k, v)| 24 + k.len() + value_size(v))
        .sum::<usize>()
}

fn opt_len(s: Option<&String>) -> usize {
    s.map_or(0, String::len)
}

/// Approximate heap bytes of a stored message: its strings and JSON values
/// plus fixed overheads (cheap: runs on every write).
fn approx_size(m: &StoredMessage) -> usize {
    let parts: usize = m
        .message
        .parts
        .iter()
        .map(|p| match p {
            Part::Text(t) | Part::Reasoning(t) => {
                64 + t.text.len()
                    + opt_len(t.id.as_ref())
                    + t.provider_metadata.as_ref().map_or(0, value_size)
            }
            Part::StepStart => 32,
            Part::Tool(t) => {
                128 + t.tool_name.len()
                    + t.tool_call_id.len()
                    + t.input.as_ref().map_or(0, value_size)
                    + t.output.as_ref().map_or(0, value_size)
                    + opt_len(t.error_text.as_ref())
            }
            Part::SourceUrl {
                source_id,
                url,
                title,
            } => 96 + source_id.len() + url.len() + opt_len(title.as_ref()),
            Part::File {
                media_type,
                filename,
                url,
            } => 96 + media_type.len() + url.len() + opt_len(filename.as_ref()),
            Part::Other(o) => map_size(o),
        })
        .sum();
    MESSAGE_OVERHEAD + m.message.id.as_str().len() + parts
}

struct Entry {
    /// The owner the store confirmed when the entry was filled.
    user: UserId,
    /// Identifies this fill (a write started against it must end against it).
    fill: u64,
    /// Shared with the turns that read them (a hit is an O(1) clone).
    messages: History,
    sizes: Vec<usize>,
    /// Hashes of the ids in `messages`: a write of a new id (every answer,
    /// every user message) appends without comparing it to the whole history.
    ids: HashSet<u64>,
    bytes: usize,
    /// Writes started against this entry and not yet ended.
    writes: u32,
    /// The entry may miss a write; dropped once no write is in flight.
    dirty: bool,
    used: u64,
}

enum Slot {
    /// A load from the store is under way; its result is kept only if this
    /// slot is still here (with this token) when it arrives.
    Loading(u64),
    Ready(Entry),
}

#[derive(Default)]
struct Shard {
    map: HashMap<ChatId, Slot>,
    bytes: usize,
}

impl Shard {
    fn remove(&mut self, chat: &ChatId) {
        if let Some(Slot::Ready(e)) = self.map.remove(chat) {
            self.bytes -= e.bytes;
        }
    }
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// The history, as the store would return it.
    Hit(History),
    /// Not cached: read the store, then [`HistoryCache::fill`] with this token
    /// (`None`: read the store but do not fill).
    Miss(Option<u64>),
}

/// A write in progress, from [`HistoryCache::begin_write`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteTicket {
    chat: ChatId,
    fill: Option<u64>,
}

/// Per-chat message lists bounded by approximate bytes (see the module docs).
///
/// The bound is one budget for the whole cache, not a share per shard: a
/// few long chats that happen to hash into one shard stay cached as long as
/// the cache as a whole has room (with a budget split per shard, 50 chats
/// over 16 shards evicted each other in the crowded shards while the cache
/// was half empty, and every eviction cost a reload of a whole history).
pub(crate) struct HistoryCache {
    shards: Box<[Mutex<Shard>]>,
    budget: usize,
    /// Sum of the shards' bytes.
    total: AtomicUsize,
    /// Held by the one caller evicting (the others skip: it is under way).
    evicting: Mutex<()>,
    hasher: std::collections::hash_map::RandomState,
    clock: AtomicU64,
}

impl std::fmt::Debug for HistoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryCache")
            .field("shards", &self.shards.len())
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl HistoryCache {
    /// A cache holding at most about `max_bytes` of messages.
    pub(crate) fn new(max_bytes: usize) -> Self {
        let shards = if max_bytes >= 1 << 20 { SHARDS } else { 1 };
        Self {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            budget: max_bytes,
            total: AtomicUsize::new(0),
            evicting: Mutex::new(()),
            hasher: std::collections::hash_map::RandomState::new(),
            clock: AtomicU64::new(1),
        }
    }

    fn shard_index(&self, chat: &ChatId) -> usize {
        let h = self.hasher.hash_one(chat);
        usize::try_from(h % self.shards.len() as u64).unwrap_or(0)
    }

    fn lock_shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the shard of `chat` and carries its change of bytes into
    /// the total (the shard stays locked throughout, so the change is exact).
    fn with_shard<R>(&self, chat: &ChatId, f: impl FnOnce(&mut Shard) -> R) -> R {
        self.with_shard_at(self.shard_index(chat), f)
    }

    /// [`with_shard`](Self::with_shard) for shard `i`.
    fn with_shard_at<R>(&self, i: usize, f: impl FnOnce(&mut Shard) -> R) -> R {
        let mut shard = self.lock_shard(i);
        let before = shard.bytes;
        let r = f(&mut shard);
        let after = shard.bytes;
        drop(shard);
        if after >= before {
            self.total.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.total.fetch_sub(before - after, Ordering::Relaxed);
        }
        r
    }

    /// When the cache is over its budget, evicts the least recently used
    /// entries of all shards (those with a write in flight last) down to 7/8
    /// of it, so the scan is paid once per many insertions. Never holds two
    /// shard locks at once; a concurrent caller finds the eviction under way
    /// and returns.
    fn evict(&self) {
        if self.total.load(Ordering::Relaxed) <= self.budget {
            return;
        }
        let Ok(_evicting) = self.evicting.try_lock() else {
            return;
        };
        let target = self.budget - self.budget / 8;
        let mut order: Vec<(bool, u64, usize, ChatId)> = Vec::new();
        for i in 0..self.shards.len() {
            let shard = self.lock_shard(i);
            order.extend(shard.map.iter().filter_map(|(id, s)| match s {
                Slot::Ready(e) => Some((e.writes > 0, e.used, i, *id)),
                Slot::Loading(_) => None,
            }));
        }
        order.sort_unstable();
        for (_, used, i, id) in order {
            if self.total.load(Ordering::Relaxed) <= target {
                break;
            }
            self.with_shard_at(i, |shard| {
                // Used since the scan: it is no longer among the oldest.
                if matches!(shard.map.get(&id), Some(Slot::Ready(e)) if e.used == used) {
                    shard.remove(&id);
                }
            });
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn shard(&self, chat: &ChatId) -> MutexGuard<'_, Shard> {
        self.lock_shard(self.shard_index(chat))
    }

    /// Approximate bytes held now.
    pub(crate) fn bytes(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// The cached history of `chat` for `user`, or what to do on a miss.
    pub(crate) fn lookup(&self, user: &UserId, chat: &ChatId) -> Lookup {
        let now = self.tick();
        let mut shard = self.shard(chat);
        match shard.map.get_mut(chat) {
            Some(Slot::Ready(e)) if &e.user == user && !e.dirty => {
                e.used = now;
                Lookup::Hit(e.messages.clone())
            }
            // Another user (the store answers NotFound), a dirty entry, or a
            // load already under way: read the store, leave the slot alone.
            Some(_) => Lookup::Miss(None),
            None => {
                shard.map.insert(*chat, Slot::Loading(now));
                Lookup::Miss(Some(now))
            }
        }
    }

    /// Stores what the store returned for the miss that handed out `token`,
    /// unless a write or invalidation came in between.
    pub(crate) fn fill(&self, user: &UserId, chat: &ChatId, token: u64, messages: History) {
        let sizes: Vec<usize> = messages.iter().map(|m| approx_size(m)).collect();
        let bytes: usize = sizes.iter().sum();
        let ids = messages.id_hashes().collect();
        let now = self.tick();
        let budget = self.budget;
        self.with_shard(chat, |shard| {
            if !matches!(shard.map.get(chat), Some(Slot::Loading(t)) if *t == token) {
                return;
            }
            if bytes > budget {
                shard.map.remove(chat);
                return;
            }
            shard.map.insert(
                *chat,
                Slot::Ready(Entry {
                    user: user.clone(),
                    fill: now,
                    messages,
                    sizes,
                    ids,
                    bytes,
                    writes: 0,
                    dirty: false,
                    used: now,
                }),
            );
            shard.bytes += bytes;
        });
        self.evict();
    }

    /// Gives up the fill of a failed load.
    pub(crate) fn abandon(&self, chat: &ChatId, token: u64) {
        let mut shard = self.shard(chat);
        if matches!(shard.map.get(chat), Some(Slot::Loading(t)) if *t == token) {
            shard.map.remove(chat);
        }
    }

    /// Drops whatever is cached for `chat`.
    pub(crate) fn invalidate(&self, chat: &ChatId) {
        self.with_shard(chat, |shard| shard.remove(chat));
    }

    /// Call before writing a message of `chat` to the store.
    pub(crate) fn begin_write(&self, user: &UserId, chat: &ChatId) -> WriteTicket {
        let mut shard = self.shard(chat);
        let fill = match shard.map.get_mut(chat) {
            Some(Slot::Ready(e)) if &e.user == user => {
                e.writes += 1;
                if e.writes > 1 {
                    // Two writes at once: their order in the store is unknown here.
                    e.dirty = true;
                }
                Some(e.fill)
            }
            Some(Slot::Loading(_)) => {
                // The load may or may not see this write.
                shard.map.remove(chat);
                None
            }
            // Not cached, or cached for another user (the store refuses the write).
            Some(Slot::Ready(_)) | None => None,
        };
        WriteTicket { chat: *chat, fill }
    }

    /// Call after the write: `written` is the message when the store took it,
    /// `None` when the write failed.
    pub(crate) fn end_write(&self, ticket: WriteTicket, written: Option<&StoredMessage>) {
        let size = written.map(approx_size);
        let now = self.tick();
        self.with_shard(&ticket.chat, |shard| {
            Self::apply_write(shard, ticket, written, size, now);
        });
        self.evict();
    }

    fn apply_write(
        shard: &mut Shard,
        ticket: WriteTicket,
        written: Option<&StoredMessage>,
        size: Option<usize>,
        now: u64,
    ) {
        let Some(Slot::Ready(e)) = shard.map.get_mut(&ticket.chat) else {
            // A load started after the write began may or may not have seen it.
            shard.map.remove(&ticket.chat);
            return;
        };
        if ticket.fill != Some(e.fill) {
            // Filled (or refilled) while this write was in flight.
            shard.remove(&ticket.chat);
            return;
        }
        e.writes -= 1;
        match (written, size) {
            (Some(m), Some(size)) if !e.dirty => {
                let list = &mut e.messages;
                let hash = id_hash(&m.message.id);
                // A known id is searched from the end (rewrites are of the
                // newest messages); an unknown one is new.
                let known = if e.ids.insert(hash) {
                    None
                } else {
                    list.position(&m.message.id)
                };
                if let Some(i) = known {
                    // Replaced in place; the store keeps position and created_at.
                    let created_at = list.get(i).map_or(m.created_at, |x| x.created_at);
                    list.set(
                        i,
                        Arc::new(StoredMessage {
                            created_at,
                            ..m.clone()
                        }),
                    );
                    e.bytes = e.bytes - e.sizes[i] + size;
                    shard.bytes = shard.bytes - e.sizes[i] + size;
                    e.sizes[i] = size;
                } else {
                    list.push(Arc::new(m.clone()));
                    e.sizes.push(size);
                    e.bytes += size;
                    shard.bytes += size;
                }
                e.used = now;
            }
            _ => e.dirty = true,
        }
        if e.dirty && e.writes == 0 {
            shard.remove(&ticket.chat);
        }
    }

    /// The cached list of `chat`, whoever owns it (tests).
    #[cfg(test)]
    pub(crate) fn peek(&self, chat: &ChatId) -> Option<Vec<StoredMessage>> {
        match self.shard(chat).map.get(chat) {
            Some(Slot::Ready(e)) if !e.dirty => {
                Some(e.messages.iter().map(|m| (**m).clone()).collect())
            }
            _ => None,
        }
    }
}

/// A [`MessageStore`] that serves `load_messages` from a [`HistoryCache`] and
/// writes through to the wrapped store, keeping the cache in step.
pub(crate) struct CachedStore {
    inner: Arc<dyn MessageStore>,
    cache: Arc<HistoryCache>,
}

impl CachedStore {
    /// Wraps `inner`.
    pub(crate) fn new(inner: Arc<dyn MessageStore>, cache: Arc<HistoryCache>) -> Self {
        Self { inner, cache }
    }

    async fn write<F>(
        &self,
        user: &UserId,
        chat: &ChatId,
        message: &StoredMessage,
        write: F,
    ) -> Result<(), StoreError>
    where
        F: std::future::Future<Output = Result<(), StoreError>>,
    {
        let mut guard = WriteGuard {
            cache: &self.cache,
            ticket: Some(self.cache.begin_write(user, chat)),
        };
        let r = write.await;
        if let Some(t) = guard.ticket.take() {
            self.cache.end_write(t, r.is_ok().then_some(message));
        }
        r
    }
}

/// Ends a write as failed if its future is dropped before the store answered.
struct WriteGuard<'a> {
    cache: &'a HistoryCache,
    ticket: Option<WriteTicket>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.cache.end_write(t, None);
        }
    }
}

/// Gives up a fill if the load's future is dropped before the store answered.
struct LoadGuard<'a> {
    cache: &'a HistoryCache,
    chat: ChatId,
    token: Option<u64>,
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.token.take() {
            self.cache.abandon(&self.chat, t);
        }
    }
}

#[async_trait]
impl MessageStore for CachedStore {
    async fn create_chat(&self, user: &UserId, chat: NewChat) -> Result<Chat, StoreError> {
        self.inner.create_chat(user, chat).await
    }

    async fn list_chats(&self, user: &UserId, page: PageRequest) -> Result<ChatPage, StoreError> {
        self.inner.list_chats(user, page).await
    }

    async fn get_chat(&self, user: &UserId, chat: &ChatId) -> Result<Chat, StoreError> {
        self.inner.get_chat(user, chat).await
    }

    async fn delete_chat(&self, user: &UserId, chat: &ChatId) -> Result<(), StoreError> {
        self.cache.invalidate(chat);
        let r = self.inner.delete_chat(user, chat).await;
        self.cache.invalidate(chat);
        r
    }

    async fn load_messages(
        &self,
        user: &UserId,
        chat: &ChatId,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let shared = self.load_history(user, chat).await?;
        Ok(shared.iter().map(|m| (**m).clone()).collect())
    }

    async fn load_history(&self, user: &UserId, chat: &ChatId) -> Result<History, StoreError> {
        match self.cache.lookup(user, chat) {
            Lookup::Hit(list) => Ok(list),
            Lookup::Miss(token) => {
                let mut guard = LoadGuard {
                    cache: &self.cache,
                    chat: *chat,
                    token,
                };
                let r = self.inner.load_history(user, chat).await;
                match (&r, guard.token.take()) {
                    (Ok(list), Some(t)) => self.cache.fill(user, chat, t, list.clone()),
                    (Ok(_), None) => {}
                    (Err(_), t) => {
                        if let Some(t) = t {
                            self.cache.abandon(chat, t);
                        }
                        self.cache.invalidate(chat);
                    }
                }
                r
            }
        }
    }

    async fn upsert_message(
        &self,
        user: &UserId,
        chat: &ChatId,
        message: &StoredMessage,
    ) -> Result<(), StoreError> {
        self.write(
            user,
            chat,
            message,
            self.inner.upsert_message(user, chat, message),
        )
        .await
    }

    async fn set_title_if_unset(
        &self,
        user: &UserId,
        chat: &ChatId,
        title: &str,
    ) -> Result<bool, StoreError> {
        self.inner.set_title_if_unset(user, chat, title).await
    }

    async fn touch(&self, user: &UserId, chat: &ChatId, at: i64) -> Result<(), StoreError> {
        self.inner.touch(user, chat, at).await
    }

    fn supports_fencing(&self) -> bool {
        self.inner.supports_fencing()
    }

    async fn upsert_message_fenced(
        &self,
        user: &UserId,
        chat: &ChatId,
        message: &StoredMessage,
        fence: u64,
    ) -> Result<(), StoreError> {
        self.write(
            user,
            chat,
            message,
            self.inner.upsert_message_fenced(user, chat, message, fence),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::MessageId;
    use crate::message::UiMessage;
    use crate::store::MessageStatus;

    fn msg(text: &str, at: i64) -> StoredMessage {
        StoredMessage {
            message: UiMessage::user_text(MessageId::new(), text),
            created_at: at,
            updated_at: at,
            status: MessageStatus::Complete,
        }
    }

    fn user(name: &str) -> UserId {
        UserId::new(name).unwrap()
    }

    fn filled(cache: &HistoryCache, u: &UserId, chat: &ChatId, list: Vec<StoredMessage>) {
        let Lookup::Miss(Some(t)) = cache.lookup(u, chat) else {
            panic!("expected a fresh miss");
        };
        cache.fill(u, chat, t, list.into_iter().collect());
    }

    fn hit(cache: &HistoryCache, u: &UserId, chat: &ChatId) -> Option<Vec<StoredMessage>> {
        match cache.lookup(u, chat) {
            Lookup::Hit(l) => Some(l.iter().map(|m| (**m).clone()).collect()),
            Lookup::Miss(_) => None,
        }
    }

    #[test]
    fn writes_replace_known_ids_anywhere_and_append_new_ones() {
        let cache = HistoryCache::new(1 << 20);
        let u = user("alice");
        let chat = ChatId::new();
        let list: Vec<StoredMessage> = (0..5).map(|i| msg(&format!("m{i}"), i)).collect();
        filled(&cache, &u, &chat, list.clone());
        // The oldest message rewritten: in place, keeping its created_at.
        let mut old = list[0].clone();
        old.message = UiMessage::user_text(old.message.id.clone(), "edited");
        old.created_at = 99;
        let t = cache.begin_write(&u, &chat);
        cache.end_write(t, Some(&old));
        // A new id: appended, and found again when rewritten.
        let new = msg("new", 6);
        let t = cache.begin_write(&u, &chat);
        cache.end_write(t, Some(&new));
        let mut again = new.clone();
        again.message = UiMessage::user_text(new.message.id.clone(), "new, edited");
        let t = cache.begin_write(&u, &chat);
        cache.end_write(t, Some(&again));
        let got = hit(&cache, &u, &chat).expect("still cached");
        assert_eq!(got.len(), 6);
        assert_eq!(got[0].message.text(), "edited");
        assert_eq!(got[0].created_at, 0);
        assert_eq!(got[5].message.id, new.message.id);
        assert_eq!(got[5].message.text(), "new, edited");
        assert_eq!(got[1..5], list[1..5]);
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let one = approx_size(&msg(&"x".repeat(1000), 1));
        // Room for two chats of one message each, not three.
        let cache = HistoryCache::new(one * 2 + one / 2);
        let u = user("alice");
        let (a, b, c) = (ChatId::new(), ChatId::new(), ChatId::new());
        filled(&cache, &u, &a, vec![msg(&"a".repeat(1000), 1)]);
        filled(&cache, &u, &b, vec![msg(&"b".repeat(1000), 1)]);
        assert!(
            hit(&cache, &u, &a).is_some(),
            "a is used again, b is now the oldest"
        );
        filled(&cache, &u, &c, vec![msg(&"c".repeat(1000), 1)]);
        assert_eq!(cache.bytes(), one * 2);
        assert!(cache.peek(&b).is_none(), "b was evicted");
        assert!(hit(&cache, &u, &a).is_some());
        assert!(hit(&cache, &u, &c).is_some());

        // Growth by writes evicts too.
        let t = cache.begin_write(&u, &a);
        let big = msg(&"y".repeat(1000), 2);
        cache.end_write(t, Some(&big));
        assert!(
            cache.bytes() <= one * 2 + one / 2,
            "bytes {}",
            cache.bytes()
        );
        assert!(cache.peek(&c).is_none(), "c was the least recently used");
        assert_eq!(cache.peek(&a).map(|l| l.len()), Some(2));

        // A history larger than the whole budget is not kept.
        let d = ChatId::new();
        filled(&cache, &u, &d, vec![msg(&"d".repeat(4000), 1)]);
        assert!(cache.peek(&d).is_none());
    }

    #[test]
    fn the_budget_is_the_whole_caches_not_a_share_per_shard() {
        // 64 chats over 16 shards: some shards get twice their share. With
        // the budget split per shard those evicted each other while the
        // cache was far from full; all fit in one budget for the whole cache.
        let chats: Vec<ChatId> = (0..64).map(|_| ChatId::new()).collect();
        let one = approx_size(&msg(&"x".repeat(20_000), 1));
        let budget = (one * 64 * 10 / 9).max(1 << 20);
        let cache = HistoryCache::new(budget);
        assert_eq!(cache.shards.len(), SHARDS);
        let u = user("alice");
        let per_shard = chats.iter().fold([0usize; SHARDS], |mut n, c| {
            n[cache.shard_index(c)] += 1;
            n
        });
        assert!(
            per_shard.iter().any(|&n| n * one > budget / SHARDS),
            "the test needs a crowded shard: {per_shard:?}"
        );
        for c in &chats {
            filled(&cache, &u, c, vec![msg(&"x".repeat(20_000), 1)]);
        }
        assert_eq!(cache.bytes(), one * 64);
        for c in &chats {
            assert!(hit(&cache, &u, c).is_some(), "every chat stays cached");
        }

        // Past the budget, the least recently used go first, from any shard.
        let late: Vec<ChatId> = (0..16).map(|_| ChatId::new()).collect();
        for c in &late {
            filled(&cache, &u, c, vec![msg(&"x".repeat(20_000), 1)]);
        }
        assert!(
            cache.bytes() <= budget,
            "bytes {} > {budget}",
            cache.bytes()
        );
        for c in &late {
            assert!(cache.peek(c).is_some(), "the newest are kept");
        }
        let evicted = chats.iter().take_while(|c| cache.peek(c).is_none()).count();
        assert!(evicted > 0, "the oldest were evicted");
        assert!(
            chats[evicted..].iter().all(|c| cache.peek(c).is_some()),
            "in order of last use"
        );
        let held: usize = cache.shards.iter().map(|s| s.lock().unwrap().bytes).sum();
        assert_eq!(held, cache.bytes(), "the total is the shards' sum");
    }

    #[test]
    fn writes_keep_the_list_as_the_store_has_it() {
        let cache = HistoryCache::new(DEFAULT_HISTORY_CACHE_BYTES);
        let u = user("alice");
        let chat = ChatId::new();
        let first = msg("first", 10);
        filled(&cache, &u, &chat, vec![first.clone()]);
        let second = msg("second", 20);
        let t = cache.begin_write(&u, &chat);
        cache.end_write(t, Some(&second));
        // Replacing keeps the position and the first created_at.
        let mut again = first.clone();
        again.created_at = 99;
        again.updated_at = 30;
        let t = cache.begin_write(&u, &chat);
        cache.end_write(t, Some(&again));
        let list = hit(&cache, &u, &chat).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].message.id, first.message.id);
        assert_eq!((list[0].created_at, list[0].updated_at), (10, 30));
        assert_eq!(list[1], second);
        // Another user never gets it, and does not disturb it.
        assert!(matches!(
            cache.lookup(&user("mallory"), &chat),
            Lookup::Miss(None)
        ));
        assert!(hit(&cache, &u, &chat).is_some());
    }

    #[test]
    fn anything_it_cannot_follow_drops_the_entry() {
        let cache = HistoryCache::new(DEFAULT_HISTORY_CACHE_BYTES);
        let u = user("alice");

        // A failed write.
        let chat = ChatId::new();
        filled(&cache, &u, &chat, vec![msg("a", 1)]);
        let t = cache.begin_write(&u, &chat);
        cache.end_write(t, None);
        assert!(cache.peek(&chat).is_none());

        // Two writes in flight at once.
        let chat = ChatId::new();
        filled(&cache, &u, &chat, vec![msg("a", 1)]);
        let t1 = cache.begin_write(&u, &chat);
        let t2 = cache.begin_write(&u, &chat);
        cache.end_write(t1, Some(&msg("b", 2)));
        assert!(
            hit(&cache, &u, &chat).is_none(),
            "dirty while a write is in flight"
        );
        cache.end_write(t2, Some(&msg("c", 3)));
        assert!(cache.peek(&chat).is_none());
        assert_eq!(cache.bytes(), 0);

        // A write that starts while a load is under way: the fill is dropped.
        let chat = ChatId::new();
        let Lookup::Miss(Some(token)) = cache.lookup(&u, &chat) else {
            panic!("expected a fresh miss");
        };
        let t = cache.begin_write(&u, &chat);
        cache.end_write(t, Some(&msg("b", 2)));
        cache.fill(&u, &chat, token, [msg("a", 1)].into_iter().collect());
        assert!(cache.peek(&chat).is_none());

        // A write that started before a load and ends after its fill.
        let chat = ChatId::new();
        let t = cache.begin_write(&u, &chat);
        filled(&cache, &u, &chat, vec![msg("a", 1)]);
        cache.end_write(t, Some(&msg("b", 2)));
        assert!(cache.peek(&chat).is_none());

        // Invalidation.
        let chat = ChatId::new();
        filled(&cache, &u, &chat, vec![msg("a", 1)]);
        cache.invalidate(&chat);
        assert!(cache.peek(&chat).is_none());
        assert_eq!(cache.bytes(), 0);
    }
}
