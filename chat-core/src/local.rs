//! The in-process session runtime for native servers: one task per running
//! turn, nothing per idle chat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::admission::{AdaptiveAdmission, Admission, AdmissionPermit};
use crate::buffer::TurnBuffer;
use crate::error::Error;
use crate::history_cache::{CachedStore, DEFAULT_HISTORY_CACHE_BYTES, HistoryCache};
use crate::ids::{ChatId, MessageId, UserId};
use crate::message::UiMessage;
use crate::model::ModelProvider;
use crate::owner_cache::{DEFAULT_OWNER_CACHE_CHATS, OwnerCache};
use crate::session::{ChatSession, SendRequest, TurnStream};
use crate::store::{Chat, MessageStore};
use crate::tool::ToolSet;
use crate::turn::{BufferSink, PreparedTurn, TurnConfig, TurnRunner};

#[derive(Debug)]
struct ActiveTurn {
    message_id: MessageId,
    buffer: Arc<TurnBuffer>,
    cancel: CancellationToken,
}

struct Inner {
    /// Runs turns; its store is the caching wrapper when the cache is on.
    runner: TurnRunner,
    /// The store itself (settled history is read from here, not the cache).
    store: Arc<dyn MessageStore>,
    cache: Option<Arc<HistoryCache>>,
    /// Who owns which (titled) chat, so a turn skips the `get_chat` read.
    owners: Arc<OwnerCache>,
    active: Mutex<HashMap<ChatId, Arc<ActiveTurn>>>,
    /// Admission: a permit per generating turn (`None`: unbounded).
    admission: Option<Arc<Admission>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("runner", &self.runner)
            .field("cache", &self.cache)
            .field(
                "free_turn_slots",
                &self.admission.as_ref().map(|a| a.free()),
            )
            .finish_non_exhaustive()
    }
}

/// [`ChatSession`] for one process: a running turn is a tokio task writing
/// into a [`TurnBuffer`]; followers (the POST response, resumes) read it.
/// Single-flight per chat; the map of running turns is touched only when a
/// turn starts or ends, never per token.
///
/// A turn reads the chat's history from a bounded in-memory cache kept up to
/// date by the runtime's own writes (default [`DEFAULT_HISTORY_CACHE_BYTES`],
/// see [`with_history_cache`](Self::with_history_cache)). That needs this
/// process to be the only writer of its chats' messages; with several
/// instances use [`CoordinatedSessions`](crate::CoordinatedSessions).
///
/// The ownership check reads the chat row once and then answers from a
/// bounded in-process cache of titled chats (owner + title); a delete drops
/// the entry. A stale entry cannot let anyone write: every store write is
/// scoped by user in the store itself, and a `NotFound` from it drops the
/// entry. Another user's request is a cache miss and gets the store's
/// `NotFound`, exactly like a missing chat.
///
/// Admission control ([`with_max_running_turns`](Self::with_max_running_turns)
/// or [`with_adaptive_admission`](Self::with_adaptive_admission), off by
/// default): at most N turns generate at once; a turn beyond that has its
/// user message stored and its stream open, and waits (first come, first
/// served) for its first token instead of slowing every running stream down.
/// A queued turn can be stopped, resumed and deleted like a running one.
#[derive(Debug, Clone)]
pub struct LocalSessions {
    inner: Arc<Inner>,
}

/// Releases the single-flight slot if `prepare` fails.
struct Reservation<'a> {
    inner: &'a Inner,
    chat: ChatId,
    turn: Arc<ActiveTurn>,
    armed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.release(self.chat, &self.turn);
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChatId, Arc<ActiveTurn>>> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, chat: &ChatId) -> Option<Arc<ActiveTurn>> {
        self.lock().get(chat).cloned()
    }

    fn release(&self, chat: ChatId, turn: &Arc<ActiveTurn>) {
        let mut map = self.lock();
        if map.get(&chat).is_some_and(|t| Arc::ptr_eq(t, turn)) {
            map.remove(&chat);
        }
    }

    /// A generation permit if one is free now (`Ok(None)`: admission is
    /// off); `Err` when the turn has to queue for one.
    fn try_admit(&self) -> Result<Option<AdmissionPermit>, ()> {
        match &self.admission {
            None => Ok(None),
            Some(a) => a.try_admit().map(Some).ok_or(()),
        }
    }

    /// Waits for a generation permit (none needed when admission is off, or
    /// once `cancel` fires).
    async fn admit(&self, cancel: &CancellationToken) -> Option<AdmissionPermit> {
        self.admission.as_ref()?.admit(cancel).await
    }

    /// Drops what is cached about `chat` (history and ownership).
    fn invalidate(&self, chat: &ChatId) {
        if let Some(c) = &self.cache {
            c.invalidate(chat);
        }
        self.owners.invalidate(chat);
    }

    /// The chat if `user` owns it, else [`Error::NotFound`]: from the
    /// ownership cache when it is there for this user, else from the store.
    async fn owned_chat(&self, user: &UserId, chat: &ChatId) -> Result<Chat, Error> {
        if let Some(c) = self.owners.get(user, chat) {
            return Ok(c);
        }
        let epoch = self.owners.epoch();
        let c = self.runner.store().get_chat(user, chat).await?;
        self.owners.insert(&c, epoch);
        Ok(c)
    }
}

impl LocalSessions {
    /// A runtime over `store` and `model`.
    pub fn new(
        store: Arc<dyn MessageStore>,
        model: Arc<dyn ModelProvider>,
        config: TurnConfig,
    ) -> Self {
        Self::from_runner(TurnRunner::new(store, model, config))
    }

    /// A runtime around a configured [`TurnRunner`].
    pub fn from_runner(runner: TurnRunner) -> Self {
        Self::build(runner, DEFAULT_HISTORY_CACHE_BYTES, None)
    }

    fn build(runner: TurnRunner, cache_bytes: usize, admission: Option<Arc<Admission>>) -> Self {
        let store = runner.store().clone();
        let (runner, cache) = if cache_bytes == 0 {
            (runner, None)
        } else {
            let cache = Arc::new(HistoryCache::new(cache_bytes));
            let cached: Arc<dyn MessageStore> =
                Arc::new(CachedStore::new(store.clone(), cache.clone()));
            (runner.with_store(cached), Some(cache))
        };
        Self {
            inner: Arc::new(Inner {
                runner,
                store,
                cache,
                owners: Arc::new(OwnerCache::new(DEFAULT_OWNER_CACHE_CHATS)),
                active: Mutex::new(HashMap::new()),
                admission,
            }),
        }
    }

    /// Bounds the turn-history cache to about `max_bytes` of messages (`0`
    /// turns it off: every turn reads the store). Call before serving.
    #[must_use]
    pub fn with_history_cache(self, max_bytes: usize) -> Self {
        let runner = self
            .inner
            .runner
            .clone()
            .with_store(self.inner.store.clone());
        Self::build(runner, max_bytes, self.inner.admission.clone())
    }

    /// Lets at most `max` turns generate at once (`0` is taken as 1); the
    /// others wait in arrival order with their user message already stored.
    /// Under overload this keeps each admitted stream at the model's own pace
    /// (and its checkpoints few) instead of slowing every stream down.
    /// Call before serving.
    #[must_use]
    pub fn with_max_running_turns(self, max: usize) -> Self {
        self.rebuilt(|inner| inner.admission = Some(Arc::new(Admission::fixed(max))))
    }

    /// Like [`with_max_running_turns`](Self::with_max_running_turns), with a
    /// bound that follows the machine (see [`AdaptiveAdmission`]): it grows
    /// while turns queue and the runtime's timers fire on time, and shrinks
    /// when they fire late. Call before serving.
    #[must_use]
    pub fn with_adaptive_admission(self, settings: AdaptiveAdmission) -> Self {
        self.rebuilt(|inner| inner.admission = Some(Arc::new(Admission::adaptive(settings))))
    }

    /// A copy of the settings with `change` applied, and no turn running.
    fn rebuilt(&self, change: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Inner {
            runner: self.inner.runner.clone(),
            store: self.inner.store.clone(),
            cache: self.inner.cache.clone(),
            owners: self.inner.owners.clone(),
            active: Mutex::new(HashMap::new()),
            admission: self.inner.admission.clone(),
        };
        change(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The admission bound now (`None` without admission control).
    pub fn admission_bound(&self) -> Option<usize> {
        self.inner.admission.as_ref().map(|a| a.bound())
    }

    /// Turns waiting for admission now (0 without
    /// [`with_max_running_turns`](Self::with_max_running_turns)).
    pub fn queued(&self) -> usize {
        self.inner.admission.as_ref().map_or(0, |a| a.queued())
    }

    /// Adds the tools the model may call. Call before serving.
    #[must_use]
    pub fn with_tools(self, tools: ToolSet) -> Self {
        self.rebuilt(|inner| inner.runner = inner.runner.clone().with_tools(tools))
    }

    /// Approximate bytes of history cached now (0 when the cache is off).
    pub fn history_cache_bytes(&self) -> usize {
        self.inner.cache.as_ref().map_or(0, |c| c.bytes())
    }

    /// Number of turns running now.
    pub fn running(&self) -> usize {
        self.inner.lock().len()
    }

    /// Graceful shutdown: waits up to `grace` for running turns to finish,
    /// then stops the rest and waits until each has stored what it produced.
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let turns: Vec<Arc<ActiveTurn>> = self.inner.lock().values().cloned().collect();
            if turns.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::info!(running = turns.len(), "stopping running turns for shutdown");
                for t in &turns {
                    t.cancel.cancel();
                }
                for t in &turns {
                    t.buffer.closed().await;
                }
                // Removal from the map follows the close; give it a moment.
                tokio::task::yield_now().await;
                if self.inner.lock().is_empty() {
                    return;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Runs an admitted turn to its end, holding `_permit` until its answer is
/// stored, then frees its chat's slot and closes its buffer.
async fn run_turn(
    inner: Arc<Inner>,
    turn: Arc<ActiveTurn>,
    chat: ChatId,
    prepared: PreparedTurn,
    _permit: Option<AdmissionPermit>,
) {
    let mut sink = BufferSink::new(turn.buffer.clone());
    let outcome = inner.runner.run(prepared, &mut sink, &turn.cancel).await;
    tracing::debug!(chat_id = %chat, reason = outcome.reason.as_str(),
        stored = outcome.stored, "turn ended");
    if !outcome.stored {
        inner.invalidate(&chat);
    }
    // Leave the map before closing, so a client that sees [DONE] can start the next turn.
    inner.release(chat, &turn);
    turn.buffer.close();
}

#[async_trait]
impl ChatSession for LocalSessions {
    async fn send(
        &self,
        user: &UserId,
        chat_id: &ChatId,
        request: SendRequest,
    ) -> Result<TurnStream, Error> {
        let chat = self.inner.owned_chat(user, chat_id).await?;
        let turn = {
            let mut map = self.inner.lock();
            if map.contains_key(chat_id) {
                return Err(Error::Busy {
                    chat_id: chat_id.to_string(),
                });
            }
            let turn = Arc::new(ActiveTurn {
                // Replaced below once the assistant id is known.
                message_id: MessageId::new(),
                buffer: Arc::new(TurnBuffer::new()),
                cancel: CancellationToken::new(),
            });
            map.insert(*chat_id, turn.clone());
            turn
        };
        let mut reservation = Reservation {
            inner: &self.inner,
            chat: *chat_id,
            turn: turn.clone(),
            armed: true,
        };
        let prepared = match self.inner.runner.prepare(user, &chat, request).await {
            Ok(p) => p,
            Err(e) => {
                // NotFound here: the chat went away after the ownership check
                // (every write is scoped by user in the store).
                if matches!(e, Error::Store(_) | Error::NotFound) {
                    self.inner.invalidate(chat_id);
                }
                return Err(e);
            }
        };
        // Publish the real assistant id (the slot is ours; swap in an updated entry).
        let turn = Arc::new(ActiveTurn {
            message_id: prepared.assistant_id.clone(),
            buffer: turn.buffer.clone(),
            cancel: turn.cancel.clone(),
        });
        {
            let mut map = self.inner.lock();
            map.insert(*chat_id, turn.clone());
        }
        reservation.armed = false;
        drop(reservation);

        let inner = self.inner.clone();
        let task_turn = turn.clone();
        match inner.try_admit() {
            Ok(permit) => {
                tokio::spawn(run_turn(inner, task_turn, *chat_id, prepared, permit));
            }
            Err(()) => {
                // A queued turn waits in a small task of its own and starts
                // the turn's task once admitted: the running turn's ~2 KB of
                // state is the task's own (no box to reach on every token),
                // and a queued one holds only a few hundred bytes. A stop
                // while queued still runs the turn, which then ends at once
                // as aborted.
                let chat_key = *chat_id;
                tokio::spawn(async move {
                    let permit = inner.admit(&task_turn.cancel).await;
                    tokio::spawn(run_turn(inner, task_turn, chat_key, prepared, permit));
                });
            }
        }
        Ok(TurnStream {
            message_id: turn.message_id.clone(),
            frames: turn.buffer.clone().follow(),
        })
    }

    async fn resume(&self, user: &UserId, chat: &ChatId) -> Result<Option<TurnStream>, Error> {
        self.inner.owned_chat(user, chat).await?;
        Ok(self.inner.get(chat).map(|t| TurnStream {
            message_id: t.message_id.clone(),
            frames: t.buffer.clone().follow(),
        }))
    }

    async fn stop(&self, user: &UserId, chat: &ChatId) -> Result<bool, Error> {
        self.inner.owned_chat(user, chat).await?;
        let Some(turn) = self.inner.get(chat) else {
            return Ok(false);
        };
        turn.cancel.cancel();
        // Return once the partial answer is stored.
        turn.buffer.closed().await;
        Ok(true)
    }

    async fn history(&self, user: &UserId, chat: &ChatId) -> Result<Vec<UiMessage>, Error> {
        self.inner.owned_chat(user, chat).await?;
        let running = self.inner.get(chat).map(|t| t.message_id.clone());
        let (listed, rewritten) =
            crate::store::listed_history(&*self.inner.store, user, chat, running.as_ref()).await?;
        if rewritten {
            // Written behind the cache's back: drop the chat from it.
            self.inner.invalidate(chat);
        }
        Ok(listed)
    }

    async fn delete(&self, user: &UserId, chat: &ChatId) -> Result<(), Error> {
        self.inner.owned_chat(user, chat).await?;
        if let Some(turn) = self.inner.get(chat) {
            turn.cancel.cancel();
            turn.buffer.closed().await;
        }
        self.inner.owners.invalidate(chat);
        let r = self.inner.runner.store().delete_chat(user, chat).await;
        self.inner.owners.invalidate(chat);
        Ok(r?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use futures::StreamExt;

    use super::*;
    use crate::demo::{DemoModel, demo_tools};
    use crate::error::StoreError;
    use crate::memory::InMemoryStore;
    use crate::message::{FinishReason, Role};
    use crate::store::{ChatPage, MessageStatus, NewChat, PageRequest, StoredMessage};

    /// An [`InMemoryStore`] whose message writes fail while `fail` is set.
    #[derive(Default)]
    struct Flaky {
        inner: InMemoryStore,
        fail: AtomicBool,
        loads: AtomicUsize,
        chat_reads: AtomicUsize,
    }

    #[async_trait]
    impl MessageStore for Flaky {
        async fn create_chat(&self, user: &UserId, chat: NewChat) -> Result<Chat, StoreError> {
            self.inner.create_chat(user, chat).await
        }
        async fn list_chats(
            &self,
            user: &UserId,
            page: PageRequest,
        ) -> Result<ChatPage, StoreError> {
            self.inner.list_chats(user, page).await
        }
        async fn get_chat(&self, user: &UserId, chat: &ChatId) -> Result<Chat, StoreError> {
            self.chat_reads.fetch_add(1, Ordering::SeqCst);
            self.inner.get_chat(user, chat).await
        }
        async fn delete_chat(&self, user: &UserId, chat: &ChatId) -> Result<(), StoreError> {
            self.inner.delete_chat(user, chat).await
        }
        async fn load_messages(
            &self,
            user: &UserId,
            chat: &ChatId,
        ) -> Result<Vec<StoredMessage>, StoreError> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            self.inner.load_messages(user, chat).await
        }
        async fn upsert_message(
            &self,
            user: &UserId,
            chat: &ChatId,
            message: &StoredMessage,
        ) -> Result<(), StoreError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Conflict("injected failure".into()));
            }
            self.inner.upsert_message(user, chat, message).await
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
    }

    struct Fixture {
        store: Arc<Flaky>,
        sessions: LocalSessions,
        user: UserId,
        chat: ChatId,
    }

    impl Fixture {
        async fn new() -> Self {
            let store = Arc::new(Flaky::default());
            let model = DemoModel::new(12).with_delay(Duration::from_millis(5));
            let config = TurnConfig {
                checkpoint_every_events: 3,
                finalize_retries: 0,
                ..TurnConfig::default()
            };
            let sessions =
                LocalSessions::new(store.clone(), Arc::new(model), config).with_tools(demo_tools());
            let user = UserId::new("alice").unwrap();
            let chat = store
                .create_chat(
                    &user,
                    NewChat {
                        id: ChatId::new(),
                        title: None,
                        created_at: crate::now_ms(),
                    },
                )
                .await
                .unwrap()
                .id;
            Self {
                store,
                sessions,
                user,
                chat,
            }
        }

        async fn run(&self, request: SendRequest) -> Result<(), Error> {
            let turn = self.sessions.send(&self.user, &self.chat, request).await?;
            turn.frames.collect::<Vec<_>>().await;
            Ok(())
        }

        async fn say(&self, text: &str) {
            let m = UiMessage::user_text(MessageId::new(), text);
            self.run(SendRequest::submit(m)).await.unwrap();
        }

        fn cached(&self) -> Option<Vec<StoredMessage>> {
            self.sessions.inner.cache.as_ref().unwrap().peek(&self.chat)
        }

        async fn stored(&self) -> Vec<StoredMessage> {
            self.store
                .load_messages(&self.user, &self.chat)
                .await
                .unwrap()
        }

        async fn assert_cache_matches(&self, when: &str) {
            let cached = self
                .cached()
                .unwrap_or_else(|| panic!("{when}: not cached"));
            assert_eq!(cached, self.stored().await, "{when}");
        }
    }

    #[tokio::test]
    async fn cached_history_equals_the_store_after_every_kind_of_turn() {
        let f = Fixture::new().await;
        assert!(f.cached().is_none());
        f.say("hello").await;
        f.assert_cache_matches("first turn").await;
        f.say("weather? [tool]").await;
        f.assert_cache_matches("tool turn").await;
        f.say("think [reasoning]").await;
        f.assert_cache_matches("reasoning turn").await;
        f.say("fail [error]").await;
        f.assert_cache_matches("model error").await;
        f.say("cut [truncate]").await;
        f.assert_cache_matches("truncated").await;

        // Regenerate the last answer, then an earlier one by id.
        f.run(SendRequest::regenerate(None)).await.unwrap();
        f.assert_cache_matches("regenerate last").await;
        let second_answer = f.stored().await[3].message.id.clone();
        f.run(SendRequest::regenerate(Some(second_answer)))
            .await
            .unwrap();
        f.assert_cache_matches("regenerate by id").await;

        // A retried user message (same id) replaces its answer in place.
        let again = f.stored().await[0].message.clone();
        f.run(SendRequest::submit(UiMessage::user_text(again.id, "hello")))
            .await
            .unwrap();
        f.assert_cache_matches("retried message").await;

        // Stop halfway: the partial answer.
        let turn = f
            .sessions
            .send(
                &f.user,
                &f.chat,
                SendRequest::submit(UiMessage::user_text(MessageId::new(), "long one")),
            )
            .await
            .unwrap();
        let mut frames = turn.frames;
        frames.next().await;
        assert!(f.sessions.stop(&f.user, &f.chat).await.unwrap());
        frames.collect::<Vec<_>>().await;
        f.assert_cache_matches("stopped").await;
        let last = f.stored().await.pop().unwrap();
        assert_eq!(
            last.message.metadata.and_then(|m| m.finish_reason),
            Some(FinishReason::Abort)
        );

        // Bad input changes nothing.
        let bad = f.run(SendRequest::regenerate(Some(MessageId::new()))).await;
        assert!(matches!(bad, Err(Error::Invalid(_))), "{bad:?}");
        f.assert_cache_matches("bad input").await;
        assert!(f.sessions.history_cache_bytes() > 0);

        // The history the client sees is the store's.
        let history = f.sessions.history(&f.user, &f.chat).await.unwrap();
        let stored: Vec<UiMessage> = f.stored().await.into_iter().map(|m| m.message).collect();
        assert_eq!(history, stored);
    }

    #[tokio::test]
    async fn turns_read_the_store_once_per_chat() {
        let f = Fixture::new().await;
        for text in ["one", "two [tool]", "three"] {
            f.say(text).await;
        }
        f.run(SendRequest::regenerate(None)).await.unwrap();
        assert_eq!(f.store.loads.load(Ordering::SeqCst), 1);
        f.assert_cache_matches("after four turns").await;
    }

    #[tokio::test]
    async fn store_errors_drop_the_chat_from_the_cache() {
        let f = Fixture::new().await;
        f.say("one").await;
        f.assert_cache_matches("filled").await;
        f.store.fail.store(true, Ordering::SeqCst);
        let r = f
            .run(SendRequest::submit(UiMessage::user_text(
                MessageId::new(),
                "two",
            )))
            .await;
        assert!(matches!(r, Err(Error::Store(_))), "{r:?}");
        assert!(f.cached().is_none());
        f.store.fail.store(false, Ordering::SeqCst);
        f.say("three").await;
        f.assert_cache_matches("refilled").await;

        // The final write fails (the user message went in first).
        let turn = f
            .sessions
            .send(
                &f.user,
                &f.chat,
                SendRequest::submit(UiMessage::user_text(MessageId::new(), "four")),
            )
            .await
            .unwrap();
        f.store.fail.store(true, Ordering::SeqCst);
        turn.frames.collect::<Vec<_>>().await;
        assert!(f.cached().is_none());
        f.store.fail.store(false, Ordering::SeqCst);
        f.say("five").await;
        f.assert_cache_matches("after a lost final write").await;
    }

    #[tokio::test]
    async fn delete_drops_the_chat_and_a_deleted_chat_is_never_served() {
        let f = Fixture::new().await;
        f.say("one").await;
        f.assert_cache_matches("filled").await;
        f.sessions.delete(&f.user, &f.chat).await.unwrap();
        assert!(f.cached().is_none());
        assert_eq!(f.sessions.history_cache_bytes(), 0);
        let r = f
            .run(SendRequest::submit(UiMessage::user_text(
                MessageId::new(),
                "two",
            )))
            .await;
        assert!(matches!(r, Err(Error::NotFound)), "{r:?}");
        assert!(f.cached().is_none());
    }

    #[tokio::test]
    async fn another_user_is_not_served_from_the_cache() {
        let f = Fixture::new().await;
        f.say("one").await;
        let mallory = UserId::new("mallory").unwrap();
        let m = UiMessage::user_text(MessageId::new(), "hi");
        let r = f
            .sessions
            .send(&mallory, &f.chat, SendRequest::submit(m))
            .await;
        assert!(matches!(r, Err(Error::NotFound)), "{r:?}");
        f.assert_cache_matches("owner's entry untouched").await;
    }

    #[tokio::test]
    async fn turns_read_the_chat_row_until_it_is_titled() {
        let f = Fixture::new().await;
        for text in ["first words", "two", "three", "four"] {
            f.say(text).await;
        }
        // Turn 1 reads the untitled chat and sets the title; turn 2 reads it
        // titled and caches it; turns 3 and 4 use the cache.
        assert_eq!(f.store.chat_reads.load(Ordering::SeqCst), 2);
        let chat = f.store.get_chat(&f.user, &f.chat).await.unwrap();
        assert_eq!(chat.title.as_deref(), Some("first words"));
        assert_eq!(f.stored().await.len(), 8);
    }

    #[tokio::test]
    async fn another_user_is_answered_like_for_a_missing_chat_while_cached() {
        let f = Fixture::new().await;
        f.say("one").await;
        f.say("two").await;
        assert_eq!(f.sessions.inner.owners.len(), 1);
        let mallory = UserId::new("mallory").unwrap();
        let missing = ChatId::new();
        for chat in [f.chat, missing] {
            let m = UiMessage::user_text(MessageId::new(), "mine now");
            let r = f
                .sessions
                .send(&mallory, &chat, SendRequest::submit(m))
                .await;
            assert!(matches!(r, Err(Error::NotFound)), "send {r:?}");
            let r = f.sessions.resume(&mallory, &chat).await;
            assert!(matches!(r, Err(Error::NotFound)), "resume {r:?}");
            let r = f.sessions.stop(&mallory, &chat).await;
            assert!(matches!(r, Err(Error::NotFound)), "stop {r:?}");
            let r = f.sessions.history(&mallory, &chat).await;
            assert!(matches!(r, Err(Error::NotFound)), "history {r:?}");
            let r = f.sessions.delete(&mallory, &chat).await;
            assert!(matches!(r, Err(Error::NotFound)), "delete {r:?}");
        }
        // Nothing of mallory's reached alice's chat, which still works.
        assert_eq!(f.stored().await.len(), 4);
        f.say("three").await;
        assert_eq!(f.stored().await.len(), 6);
        let history = f.sessions.history(&f.user, &f.chat).await.unwrap();
        assert_eq!(history[4].text(), "three");
    }

    #[tokio::test]
    async fn delete_then_send_is_not_found() {
        let f = Fixture::new().await;
        f.say("one").await;
        f.say("two").await;
        assert_eq!(f.sessions.inner.owners.len(), 1);
        f.sessions.delete(&f.user, &f.chat).await.unwrap();
        assert_eq!(f.sessions.inner.owners.len(), 0);
        let r = f
            .run(SendRequest::submit(UiMessage::user_text(
                MessageId::new(),
                "three",
            )))
            .await;
        assert!(matches!(r, Err(Error::NotFound)), "{r:?}");
        let r = f.sessions.resume(&f.user, &f.chat).await;
        assert!(matches!(r, Err(Error::NotFound)), "{r:?}");
        let r = f.store.load_messages(&f.user, &f.chat).await;
        assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    }

    #[tokio::test]
    async fn a_stale_ownership_entry_cannot_write() {
        let f = Fixture::new().await;
        f.say("one").await;
        f.say("two").await;
        assert_eq!(f.sessions.inner.owners.len(), 1);
        // Deleted behind the runtime's back: its caches still hold the chat.
        f.store.inner.delete_chat(&f.user, &f.chat).await.unwrap();
        let r = f
            .run(SendRequest::submit(UiMessage::user_text(
                MessageId::new(),
                "three",
            )))
            .await;
        assert!(matches!(r, Err(Error::NotFound)), "{r:?}");
        assert_eq!(f.sessions.inner.owners.len(), 0);
        assert!(f.cached().is_none());
        let r = f.store.load_messages(&f.user, &f.chat).await;
        assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
        // And the next attempt reads the store again.
        let reads = f.store.chat_reads.load(Ordering::SeqCst);
        let r = f
            .run(SendRequest::submit(UiMessage::user_text(
                MessageId::new(),
                "four",
            )))
            .await;
        assert!(matches!(r, Err(Error::NotFound)), "{r:?}");
        assert_eq!(f.store.chat_reads.load(Ordering::SeqCst), reads + 1);
    }

    /// An [`InMemoryStore`] whose checkpoint writes (status `streaming`)
    /// wait while `gate` is closed (and then `slow`, if set); it records the
    /// writes in the order they reach the store and the most in flight at once.
    struct SlowCheckpoints {
        inner: InMemoryStore,
        gate: tokio::sync::watch::Sender<bool>,
        slow: Option<Duration>,
        started: AtomicUsize,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
        log: Mutex<Vec<(MessageId, MessageStatus, String)>>,
    }

    impl SlowCheckpoints {
        fn new(open: bool, slow: Option<Duration>) -> Self {
            Self {
                inner: InMemoryStore::new(),
                gate: tokio::sync::watch::Sender::new(open),
                slow,
                started: AtomicUsize::new(0),
                in_flight: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(0),
                log: Mutex::new(Vec::new()),
            }
        }
    }

    #[async_trait]
    impl MessageStore for SlowCheckpoints {
        async fn create_chat(&self, user: &UserId, chat: NewChat) -> Result<Chat, StoreError> {
            self.inner.create_chat(user, chat).await
        }
        async fn list_chats(
            &self,
            user: &UserId,
            page: PageRequest,
        ) -> Result<ChatPage, StoreError> {
            self.inner.list_chats(user, page).await
        }
        async fn get_chat(&self, user: &UserId, chat: &ChatId) -> Result<Chat, StoreError> {
            self.inner.get_chat(user, chat).await
        }
        async fn delete_chat(&self, user: &UserId, chat: &ChatId) -> Result<(), StoreError> {
            self.inner.delete_chat(user, chat).await
        }
        async fn load_messages(
            &self,
            user: &UserId,
            chat: &ChatId,
        ) -> Result<Vec<StoredMessage>, StoreError> {
            self.inner.load_messages(user, chat).await
        }
        async fn upsert_message(
            &self,
            user: &UserId,
            chat: &ChatId,
            message: &StoredMessage,
        ) -> Result<(), StoreError> {
            let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(n, Ordering::SeqCst);
            if message.status == MessageStatus::Streaming {
                self.started.fetch_add(1, Ordering::SeqCst);
                let mut open = self.gate.subscribe();
                open.wait_for(|o| *o).await.unwrap();
                if let Some(d) = self.slow {
                    tokio::time::sleep(d).await;
                }
            }
            let r = self.inner.upsert_message(user, chat, message).await;
            self.log.lock().unwrap().push((
                message.message.id.clone(),
                message.status,
                message.message.text(),
            ));
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            r
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
    }

    async fn slow_fixture(
        store: &Arc<SlowCheckpoints>,
        model: DemoModel,
    ) -> (LocalSessions, UserId, ChatId) {
        let config = TurnConfig {
            checkpoint_every_events: 1,
            ..TurnConfig::default()
        };
        let sessions = LocalSessions::new(store.clone(), Arc::new(model), config);
        let user = UserId::new("alice").unwrap();
        let chat = store
            .create_chat(
                &user,
                NewChat {
                    id: ChatId::new(),
                    title: None,
                    created_at: crate::now_ms(),
                },
            )
            .await
            .unwrap()
            .id;
        (sessions, user, chat)
    }

    fn expected_text(tokens: u32) -> String {
        (0..tokens).map(|i| format!("tok{i} ")).collect()
    }

    #[tokio::test]
    async fn tokens_keep_flowing_while_a_checkpoint_write_is_stuck() {
        let store = Arc::new(SlowCheckpoints::new(false, None));
        let (sessions, user, chat) = slow_fixture(&store, DemoModel::new(20)).await;
        let m = UiMessage::user_text(MessageId::new(), "hi");
        let turn = sessions
            .send(&user, &chat, SendRequest::submit(m))
            .await
            .unwrap();
        let mut frames = turn.frames;
        // Every token arrives while the first checkpoint write cannot finish.
        let mut deltas = 0;
        while deltas < 20 {
            let f = frames.next().await.expect("stream ended early");
            if f.windows(12).any(|w| w == b"\"text-delta\"") {
                deltas += 1;
            }
        }
        // One write in flight; the checkpoints due meanwhile were coalesced.
        assert_eq!(store.started.load(Ordering::SeqCst), 1);
        assert_eq!(sessions.history(&user, &chat).await.unwrap().len(), 1);
        store.gate.send_replace(true);
        let rest: Vec<_> = frames.collect().await;
        assert_eq!(&rest.last().unwrap()[..], crate::sse::DONE_FRAME);
        let stored = store.inner.load_messages(&user, &chat).await.unwrap();
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[1].status, MessageStatus::Complete);
        assert_eq!(stored[1].message.text(), expected_text(20));
        assert!(store.started.load(Ordering::SeqCst) <= 2);
        assert_eq!(store.max_in_flight.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_final_write_comes_after_every_checkpoint_and_wins() {
        // Checkpoints take longer than a token: they pile up unless coalesced,
        // and a late one would overwrite the final message.
        let store = Arc::new(SlowCheckpoints::new(true, Some(Duration::from_millis(35))));
        let model = DemoModel::new(30).with_delay(Duration::from_millis(10));
        let (sessions, user, chat) = slow_fixture(&store, model).await;
        for round in 0..3 {
            let m = UiMessage::user_text(MessageId::new(), format!("round {round}"));
            let turn = sessions
                .send(&user, &chat, SendRequest::submit(m))
                .await
                .unwrap();
            let id = turn.message_id.clone();
            turn.frames.collect::<Vec<_>>().await;
            let log = store.log.lock().unwrap().clone();
            let mine: Vec<_> = log.iter().filter(|(m, _, _)| *m == id).collect();
            let (last_status, last_text) = mine.last().map(|(_, s, t)| (*s, t.clone())).unwrap();
            assert_eq!(last_status, MessageStatus::Complete, "round {round}");
            assert_eq!(last_text, expected_text(30), "round {round}");
            assert_eq!(
                mine.iter()
                    .filter(|(_, s, _)| *s == MessageStatus::Complete)
                    .count(),
                1
            );
            // Some checkpoints were written, far fewer than one per token.
            let checkpoints = mine.len() - 1;
            assert!((1..30).contains(&checkpoints), "{checkpoints} checkpoints");
            let stored = store.inner.load_messages(&user, &chat).await.unwrap();
            let answer = stored.last().unwrap();
            assert_eq!(answer.message.id, id);
            assert_eq!(answer.status, MessageStatus::Complete);
            assert_eq!(answer.message.text(), expected_text(30));
        }
        assert_eq!(store.max_in_flight.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn stopping_during_a_stuck_checkpoint_still_stores_the_partial_answer_last() {
        let store = Arc::new(SlowCheckpoints::new(false, None));
        let model = DemoModel::new(1000).with_delay(Duration::from_millis(1));
        let (sessions, user, chat) = slow_fixture(&store, model).await;
        let m = UiMessage::user_text(MessageId::new(), "hi");
        let turn = sessions
            .send(&user, &chat, SendRequest::submit(m))
            .await
            .unwrap();
        let mut frames = turn.frames;
        let mut deltas = 0;
        while deltas < 3 {
            let f = frames.next().await.expect("stream ended early");
            if f.windows(12).any(|w| w == b"\"text-delta\"") {
                deltas += 1;
            }
        }
        let stopper = {
            let (sessions, user) = (sessions.clone(), user.clone());
            tokio::spawn(async move { sessions.stop(&user, &chat).await })
        };
        // The stop waits for the stuck checkpoint, then the final write.
        while store.started.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        store.gate.send_replace(true);
        assert!(stopper.await.unwrap().unwrap());
        frames.collect::<Vec<_>>().await;
        let log = store.log.lock().unwrap().clone();
        assert_eq!(log.last().unwrap().1, MessageStatus::Complete);
        let stored = store.inner.load_messages(&user, &chat).await.unwrap();
        assert_eq!(stored[1].status, MessageStatus::Complete);
        assert_eq!(
            stored[1]
                .message
                .metadata
                .as_ref()
                .and_then(|m| m.finish_reason),
            Some(FinishReason::Abort)
        );
        assert!(stored[1].message.text().starts_with("tok0 tok1 tok2 "));
    }

    /// `n` chats of alice's in a fresh store, served with at most `max` generating turns.
    async fn admission_fixture(
        max: usize,
        model: DemoModel,
        n: usize,
    ) -> (Arc<InMemoryStore>, LocalSessions, UserId, Vec<ChatId>) {
        let store = Arc::new(InMemoryStore::new());
        let sessions = LocalSessions::new(store.clone(), Arc::new(model), TurnConfig::default())
            .with_max_running_turns(max);
        let user = UserId::new("alice").unwrap();
        let mut chats = Vec::new();
        for _ in 0..n {
            let chat = NewChat {
                id: ChatId::new(),
                title: None,
                created_at: crate::now_ms(),
            };
            chats.push(store.create_chat(&user, chat).await.unwrap().id);
        }
        (store, sessions, user, chats)
    }

    /// Sends `text` as a new user message to `chat`.
    async fn ask(
        sessions: &LocalSessions,
        user: &UserId,
        chat: &ChatId,
        text: &str,
    ) -> Result<TurnStream, Error> {
        let m = UiMessage::user_text(MessageId::new(), text);
        sessions.send(user, chat, SendRequest::submit(m)).await
    }

    /// Waits (in paused time) until `n` turns are queued.
    async fn until_queued(sessions: &LocalSessions, n: usize) {
        for _ in 0..1000 {
            if sessions.queued() == n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{} queued, expected {n}", sessions.queued());
    }

    fn is_delta(frame: &[u8]) -> bool {
        frame.windows(12).any(|w| w == b"\"text-delta\"")
    }

    #[tokio::test(start_paused = true)]
    async fn turns_beyond_the_bound_wait_for_a_running_one_to_end() {
        let model = DemoModel::new(5).with_delay(Duration::from_millis(10));
        let (store, sessions, user, chats) = admission_fixture(1, model, 3).await;
        let t0 = tokio::time::Instant::now();
        let mut turns = Vec::new();
        for (i, chat) in chats.iter().enumerate() {
            let m = UiMessage::user_text(MessageId::new(), format!("question {i}"));
            turns.push(
                sessions
                    .send(&user, chat, SendRequest::submit(m))
                    .await
                    .unwrap(),
            );
        }
        until_queued(&sessions, 2).await;
        assert_eq!(sessions.running(), 3);
        // The waiting turns' user messages are stored already.
        for chat in &chats {
            let listed = sessions.history(&user, chat).await.unwrap();
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].role, Role::User);
        }
        // Turn i streams its first token only after turns 0..i ended
        // (6 model waits of 10 ms each: 5 tokens and the finish).
        let mut ends = Vec::new();
        for (i, turn) in turns.into_iter().enumerate() {
            let mut frames = turn.frames;
            let mut first_delta = None;
            while let Some(f) = frames.next().await {
                if first_delta.is_none() && is_delta(&f) {
                    first_delta = Some(t0.elapsed());
                }
            }
            let first = first_delta.expect("no text");
            let expected = Duration::from_millis(60 * i as u64 + 10);
            assert!(first >= expected, "turn {i}: first token at {first:?}");
            ends.push(t0.elapsed());
        }
        assert!(ends[2] >= Duration::from_millis(180), "{ends:?}");
        assert_eq!(sessions.queued(), 0);
        for chat in &chats {
            let stored = store.load_messages(&user, chat).await.unwrap();
            assert_eq!(stored.len(), 2);
            assert_eq!(stored[1].status, MessageStatus::Complete);
            assert_eq!(stored[1].message.text(), expected_text(5));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_bound_admits_queued_turns_while_the_runtime_keeps_up() {
        let model = DemoModel::new(50).with_delay(Duration::from_millis(10));
        let (store, sessions, user, chats) = admission_fixture(1, model, 3).await;
        let sessions = sessions.with_adaptive_admission(AdaptiveAdmission::new(1, 1, 3));
        let mut turns = Vec::new();
        for chat in &chats {
            turns.push(ask(&sessions, &user, chat, "hi").await.unwrap());
        }
        until_queued(&sessions, 2).await;
        assert_eq!(sessions.admission_bound(), Some(1));
        // Paused time: every timer fires on time, so each 100 ms window
        // with turns queued raises the bound by one, up to its max.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(sessions.admission_bound(), Some(3));
        assert_eq!(sessions.queued(), 0, "all three generate at once");
        for turn in turns {
            turn.frames.collect::<Vec<_>>().await;
        }
        for chat in &chats {
            let stored = store.load_messages(&user, chat).await.unwrap();
            assert_eq!(stored[1].status, MessageStatus::Complete);
            assert_eq!(stored[1].message.text(), expected_text(50));
        }
        assert_eq!(
            sessions.admission_bound(),
            Some(3),
            "nothing queued: it stays"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_turn_can_be_stopped_and_its_answer_is_stored_as_aborted() {
        let model = DemoModel::new(1000).with_delay(Duration::from_millis(10));
        let (store, sessions, user, chats) = admission_fixture(1, model, 2).await;
        let (busy, waiting) = (chats[0], chats[1]);
        let first = ask(&sessions, &user, &busy, "a").await.unwrap();
        let queued = ask(&sessions, &user, &waiting, "b").await.unwrap();
        until_queued(&sessions, 1).await;
        // A second send to the queued chat is busy, like for a running turn.
        let again = ask(&sessions, &user, &waiting, "c").await;
        assert!(matches!(again, Err(Error::Busy { .. })), "{again:?}");
        assert!(sessions.resume(&user, &waiting).await.unwrap().is_some());
        assert!(sessions.stop(&user, &waiting).await.unwrap());
        let frames: Vec<_> = queued.frames.collect().await;
        assert!(!frames.iter().any(|f| is_delta(f)));
        assert!(
            frames
                .iter()
                .any(|f| f.windows(7).any(|w| w == b"\"abort\""))
        );
        assert_eq!(sessions.queued(), 0);
        let stored = store.load_messages(&user, &waiting).await.unwrap();
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[1].status, MessageStatus::Complete);
        assert_eq!(
            stored[1]
                .message
                .metadata
                .as_ref()
                .and_then(|m| m.finish_reason),
            Some(FinishReason::Abort)
        );
        // The running turn was not disturbed; the slot it holds frees on its stop.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(sessions.stop(&user, &busy).await.unwrap());
        let frames: Vec<_> = first.frames.collect().await;
        assert!(frames.iter().any(|f| is_delta(f)));
        let next = ask(&sessions, &user, &waiting, "again").await.unwrap();
        let mut frames = next.frames;
        let mut deltas = 0;
        while deltas < 3 {
            if is_delta(&frames.next().await.unwrap()) {
                deltas += 1;
            }
        }
        assert_eq!(sessions.queued(), 0);
        sessions.shutdown(Duration::ZERO).await;
    }

    #[tokio::test]
    async fn admission_survives_adding_tools_and_resizing_the_cache() {
        let store = Arc::new(InMemoryStore::new());
        let sessions =
            LocalSessions::new(store, Arc::new(DemoModel::new(2)), TurnConfig::default())
                .with_max_running_turns(0)
                .with_tools(demo_tools())
                .with_history_cache(1 << 20);
        let admission = sessions.inner.admission.as_ref().expect("admission kept");
        assert_eq!(admission.free(), 1);
        assert!(!sessions.inner.runner.config().tools.specs().is_empty());
    }

    /// Checkpoints written for one 64-token answer whose tokens come `delay` apart.
    async fn checkpoints_of_one_answer(delay: Duration, tokens: u32) -> usize {
        let store = Arc::new(SlowCheckpoints::new(true, None));
        let model = DemoModel::new(tokens).with_delay(delay);
        let sessions = LocalSessions::new(store.clone(), Arc::new(model), TurnConfig::default());
        let user = UserId::new("alice").unwrap();
        let chat = NewChat {
            id: ChatId::new(),
            title: None,
            created_at: crate::now_ms(),
        };
        let chat = store.create_chat(&user, chat).await.unwrap().id;
        let m = UiMessage::user_text(MessageId::new(), "hi");
        let turn = sessions
            .send(&user, &chat, SendRequest::submit(m))
            .await
            .unwrap();
        turn.frames.collect::<Vec<_>>().await;
        let stored = store.inner.load_messages(&user, &chat).await.unwrap();
        assert_eq!(stored[1].message.text(), expected_text(tokens));
        let log = store.log.lock().unwrap();
        log.iter()
            .filter(|(_, s, _)| *s == MessageStatus::Streaming)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stretched_stream_checkpoints_by_tokens_not_by_the_clock_alone() {
        // At 20 ms a token: every 500 ms (25 tokens), as before.
        assert_eq!(
            checkpoints_of_one_answer(Duration::from_millis(20), 64).await,
            2
        );
        // Five times slower (an overloaded machine): 6.4 s would be 12
        // checkpoints by time alone; the 16-token floor makes it 4.
        assert_eq!(
            checkpoints_of_one_answer(Duration::from_millis(100), 64).await,
            4
        );
        // A model slower than the floor still checkpoints every 2 s.
        assert_eq!(
            checkpoints_of_one_answer(Duration::from_secs(1), 5).await,
            2
        );
    }

    #[tokio::test]
    async fn cache_can_be_turned_off() {
        let store = Arc::new(InMemoryStore::new());
        let sessions =
            LocalSessions::new(store, Arc::new(DemoModel::new(2)), TurnConfig::default())
                .with_history_cache(0);
        assert!(sessions.inner.cache.is_none());
        assert_eq!(sessions.history_cache_bytes(), 0);
    }
}
