//! [`ChatSession`] for several server instances sharing one store, coordinated
//! through a [`TurnCoordinator`] (Redis, Postgres, or in-process).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::buffer::TurnBuffer;
use crate::chunk::UiChunk;
use crate::coord::{CoordError, Lease, TurnCoordinator};
use crate::error::{Error, StoreError};
use crate::ids::{ChatId, MessageId, UserId};
use crate::message::{FinishReason, UiMessage};
use crate::session::{ChatSession, SendRequest, TurnFrames, TurnStream};
use crate::sse::{DONE_FRAME, SseEncoder};
use crate::store::{Chat, MessageStatus, StoredMessage};
use crate::turn::{ChunkSink, MODEL_ERROR_TEXT, TurnRunner};

/// Timing of the coordination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoordinationSettings {
    /// How long a lease lives without renewal (how fast a crashed instance's
    /// chat frees up). Default 10 s.
    pub lease_ttl: Duration,
    /// How often the running instance renews its lease. Default `lease_ttl / 3`.
    pub renew_every: Duration,
    /// How long `stop`/`delete` wait for a remote turn to end. Default 15 s.
    pub stop_wait: Duration,
    /// How often a remote follower checks that the turn's instance is alive. Default 500 ms.
    pub liveness_check: Duration,
}

impl Default for CoordinationSettings {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(10),
            renew_every: Duration::from_millis(3300),
            stop_wait: Duration::from_secs(15),
            liveness_check: Duration::from_millis(500),
        }
    }
}

#[derive(Debug)]
struct LocalTurn {
    message_id: MessageId,
    buffer: Arc<TurnBuffer>,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct Inner {
    runner: TurnRunner,
    coord: Arc<dyn TurnCoordinator>,
    settings: CoordinationSettings,
    local: Mutex<HashMap<ChatId, Arc<LocalTurn>>>,
}

impl std::fmt::Debug for dyn TurnCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TurnCoordinator")
    }
}

/// A session runtime for N instances behind a load balancer: one turn per chat
/// across all of them (lease), writes fenced by the lease's token, any
/// instance can resume (replay + live via the coordinator's bus) or stop a
/// turn running on another, and a crashed instance's turn is finalized from
/// its last checkpoint once its lease expires.
#[derive(Debug, Clone)]
pub struct CoordinatedSessions {
    inner: Arc<Inner>,
}

fn coord_err(e: CoordError) -> Error {
    tracing::error!(error = %e, "coordinator call failed");
    Error::Store(StoreError::unavailable(e))
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChatId, Arc<LocalTurn>>> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn local(&self, chat: &ChatId) -> Option<Arc<LocalTurn>> {
        self.lock().get(chat).cloned()
    }

    async fn owned_chat(&self, user: &UserId, chat: &ChatId) -> Result<Chat, Error> {
        Ok(self.runner.store().get_chat(user, chat).await?)
    }

    /// Finalizes checkpoints left by crashed turns, fenced with `token`.
    async fn repair_orphans(
        &self,
        user: &UserId,
        chat: &ChatId,
        token: u64,
        skip: Option<&MessageId>,
    ) -> Result<(), Error> {
        let store = self.runner.store();
        for mut m in store.load_messages(user, chat).await? {
            if m.status != MessageStatus::Streaming || Some(&m.message.id) == skip {
                continue;
            }
            finalize_orphan(&mut m);
            tracing::warn!(chat_id = %chat, message_id = %m.message.id,
                "finalizing the checkpoint of a turn whose instance died");
            store.upsert_message_fenced(user, chat, &m, token).await?;
        }
        Ok(())
    }

    async fn release_with_retry(&self, lease: &Lease) {
        for attempt in 0..5u32 {
            match self.coord.release(lease).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(chat_id = %lease.chat, attempt, error = %e, "lease release failed");
                    crate::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
        }
        tracing::error!(chat_id = %lease.chat, "lease release failed; it expires on its own");
    }
}

fn finalize_orphan(m: &mut StoredMessage) {
    m.status = MessageStatus::Complete;
    m.updated_at = crate::now_ms();
    m.message.metadata_mut().finish_reason = Some(FinishReason::Error);
}

/// Encodes into the local buffer and hands frames to the publisher task.
struct CoordSink {
    encoder: SseEncoder,
    buffer: Arc<TurnBuffer>,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl ChunkSink for CoordSink {
    fn emit(&mut self, chunk: &UiChunk<'_>) {
        let frame = self.encoder.encode(chunk);
        self.buffer.push(&frame);
        // The publisher only stops after the sink is dropped.
        let _ = self.tx.send(frame);
    }
}

impl CoordinatedSessions {
    /// A runtime over `runner`'s store and model, coordinated by `coord`.
    /// The store must support fenced writes.
    pub fn new(
        runner: TurnRunner,
        coord: Arc<dyn TurnCoordinator>,
        settings: CoordinationSettings,
    ) -> Result<Self, Error> {
        if !runner.store().supports_fencing() {
            return Err(StoreError::Unsupported("fenced writes (needed for coordination)").into());
        }
        Ok(Self {
            inner: Arc::new(Inner {
                runner,
                coord,
                settings,
                local: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Turns running on this instance.
    pub fn running_here(&self) -> usize {
        self.inner.lock().len()
    }

    /// Graceful shutdown: waits up to `grace` for this instance's turns, then
    /// stops the rest and waits until each has stored what it produced.
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let turns: Vec<Arc<LocalTurn>> = self.inner.lock().values().cloned().collect();
            if turns.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                for t in &turns {
                    t.cancel.cancel();
                }
                for t in &turns {
                    t.buffer.closed().await;
                }
                tokio::task::yield_now().await;
                if self.inner.lock().is_empty() {
                    return;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Follows a turn running on another instance, ending the stream with an
    /// error if that instance dies (its lease lapses without `[DONE]`).
    fn watch_remote(
        &self,
        chat: ChatId,
        token: u64,
        mut frames: crate::BoxStream<'static, Bytes>,
    ) -> TurnFrames {
        let buffer = Arc::new(TurnBuffer::new());
        let out = buffer.clone();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(inner.settings.liveness_check);
            tick.tick().await;
            let mut done = false;
            loop {
                tokio::select! {
                    f = frames.next() => match f {
                        Some(f) if &f[..] == DONE_FRAME => { done = true; break; }
                        Some(f) => buffer.push(&f),
                        None => break,
                    },
                    _ = tick.tick() => {
                        // A coordinator error is not proof of death: keep following.
                        let alive = match inner.coord.running(&chat).await {
                            Ok(Some(t)) => t.token == token,
                            Ok(None) => false,
                            Err(_) => true,
                        };
                        if !alive {
                            // Drain what was published before the lease lapsed: a
                            // turn released a moment ago may still have its last
                            // frames and end marker on the way from a remote bus.
                            let drain = async {
                                while let Some(f) = frames.next().await {
                                    if &f[..] == DONE_FRAME {
                                        return true;
                                    }
                                    buffer.push(&f);
                                }
                                false
                            };
                            done = tokio::time::timeout(inner.settings.liveness_check, drain)
                                .await
                                .unwrap_or(false);
                            break;
                        }
                    }
                }
            }
            if !done {
                let mut enc = SseEncoder::new();
                buffer.push(&enc.encode(&UiChunk::Error {
                    error_text: MODEL_ERROR_TEXT.into(),
                }));
            }
            buffer.close();
        });
        out.follow()
    }
}

#[async_trait]
impl ChatSession for CoordinatedSessions {
    async fn send(
        &self,
        user: &UserId,
        chat_id: &ChatId,
        request: SendRequest,
    ) -> Result<TurnStream, Error> {
        let inner = &self.inner;
        let chat = inner.owned_chat(user, chat_id).await?;
        let busy = || Error::Busy {
            chat_id: chat_id.to_string(),
        };
        if inner.local(chat_id).is_some() {
            return Err(busy());
        }
        let lease = inner
            .coord
            .acquire(chat_id, inner.settings.lease_ttl)
            .await
            .map_err(coord_err)?
            .ok_or_else(busy)?;
        let prepared = async {
            inner
                .repair_orphans(user, chat_id, lease.token, None)
                .await?;
            inner
                .runner
                .prepare_fenced(user, &chat, request, Some(lease.token))
                .await
        }
        .await;
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                inner.release_with_retry(&lease).await;
                return Err(match e {
                    Error::Store(StoreError::Fenced) => busy(),
                    other => other,
                });
            }
        };
        if let Err(e) = inner.coord.begin(&lease, &prepared.assistant_id).await {
            inner.release_with_retry(&lease).await;
            return Err(coord_err(e));
        }
        let turn = Arc::new(LocalTurn {
            message_id: prepared.assistant_id.clone(),
            buffer: Arc::new(TurnBuffer::new()),
            cancel: CancellationToken::new(),
        });
        inner.lock().insert(*chat_id, turn.clone());

        let task_inner = inner.clone();
        let task_turn = turn.clone();
        tokio::spawn(async move {
            let inner = task_inner;
            let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
            let pub_inner = inner.clone();
            let pub_lease = lease.clone();
            let publisher = tokio::spawn(async move {
                let mut batch = Vec::with_capacity(64);
                while let Some(f) = rx.recv().await {
                    batch.push(f);
                    while let Ok(f) = rx.try_recv() {
                        batch.push(f);
                    }
                    let mut attempt = 0u32;
                    loop {
                        match pub_inner.coord.publish(&pub_lease, &batch).await {
                            Ok(()) => break,
                            Err(e) if attempt < 5 => {
                                attempt += 1;
                                tracing::warn!(chat_id = %pub_lease.chat, attempt, error = %e,
                                    "publishing frames failed; retrying");
                                crate::sleep(Duration::from_millis(50 << attempt)).await;
                            }
                            Err(e) => {
                                tracing::error!(chat_id = %pub_lease.chat, error = %e,
                                    "publishing frames failed; remote followers miss them");
                                break;
                            }
                        }
                    }
                    batch.clear();
                }
            });
            let w_inner = inner.clone();
            let w_lease = lease.clone();
            let w_cancel = task_turn.cancel.clone();
            let watchdog = tokio::spawn(async move {
                let stop = async {
                    if let Err(e) = w_inner.coord.stop_requested(&w_lease).await {
                        tracing::warn!(chat_id = %w_lease.chat, error = %e, "stop signal unavailable");
                        futures::future::pending::<()>().await;
                    }
                };
                let renew = async {
                    loop {
                        tokio::time::sleep(w_inner.settings.renew_every).await;
                        match w_inner
                            .coord
                            .renew(&w_lease, w_inner.settings.lease_ttl)
                            .await
                        {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::error!(chat_id = %w_lease.chat, token = w_lease.token,
                                    "lease lost; stopping the turn (its writes are fenced off)");
                                return;
                            }
                            Err(e) => tracing::warn!(chat_id = %w_lease.chat, error = %e,
                                "lease renewal failed; retrying"),
                        }
                    }
                };
                tokio::select! {
                    () = stop => {}
                    () = renew => {}
                }
                w_cancel.cancel();
            });
            let mut sink = CoordSink {
                encoder: SseEncoder::new(),
                buffer: task_turn.buffer.clone(),
                tx,
            };
            let outcome = inner
                .runner
                .run(prepared, &mut sink, &task_turn.cancel)
                .await;
            watchdog.abort();
            drop(sink);
            if let Err(e) = publisher.await {
                tracing::error!(error = %e, "publisher task failed");
            }
            tracing::debug!(chat_id = %lease.chat, reason = outcome.reason.as_str(),
                stored = outcome.stored, "turn ended");
            inner.release_with_retry(&lease).await;
            {
                let mut map = inner.lock();
                if map
                    .get(&lease.chat)
                    .is_some_and(|t| Arc::ptr_eq(t, &task_turn))
                {
                    map.remove(&lease.chat);
                }
            }
            task_turn.buffer.close();
        });
        Ok(TurnStream {
            message_id: turn.message_id.clone(),
            frames: turn.buffer.clone().follow(),
        })
    }

    async fn resume(&self, user: &UserId, chat: &ChatId) -> Result<Option<TurnStream>, Error> {
        self.inner.owned_chat(user, chat).await?;
        if let Some(t) = self.inner.local(chat) {
            return Ok(Some(TurnStream {
                message_id: t.message_id.clone(),
                frames: t.buffer.clone().follow(),
            }));
        }
        let Some((running, frames)) = self.inner.coord.follow(chat).await.map_err(coord_err)?
        else {
            return Ok(None);
        };
        Ok(Some(TurnStream {
            message_id: running.message_id.clone().unwrap_or_default(),
            frames: self.watch_remote(*chat, running.token, frames),
        }))
    }

    async fn stop(&self, user: &UserId, chat: &ChatId) -> Result<bool, Error> {
        self.inner.owned_chat(user, chat).await?;
        if let Some(t) = self.inner.local(chat) {
            t.cancel.cancel();
            t.buffer.closed().await;
            return Ok(true);
        }
        if !self
            .inner
            .coord
            .request_stop(chat)
            .await
            .map_err(coord_err)?
        {
            return Ok(false);
        }
        let deadline = tokio::time::Instant::now() + self.inner.settings.stop_wait;
        while tokio::time::Instant::now() < deadline {
            if self
                .inner
                .coord
                .running(chat)
                .await
                .map_err(coord_err)?
                .is_none()
            {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        tracing::warn!(chat_id = %chat, "remote turn did not end within the stop wait");
        Ok(true)
    }

    async fn history(&self, user: &UserId, chat: &ChatId) -> Result<Vec<UiMessage>, Error> {
        let inner = &self.inner;
        inner.owned_chat(user, chat).await?;
        let running_id = match inner.local(chat) {
            Some(t) => Some(t.message_id.clone()),
            None => inner
                .coord
                .running(chat)
                .await
                .map_err(coord_err)?
                .map(|r| r.message_id.unwrap_or_default()),
        };
        let stored = inner.runner.store().load_messages(user, chat).await?;
        let orphans = stored.iter().any(|m| {
            m.status == MessageStatus::Streaming && Some(&m.message.id) != running_id.as_ref()
        });
        if orphans && running_id.is_none() {
            // Take the lease so no turn starts while the checkpoints are finalized.
            if let Some(lease) = inner
                .coord
                .acquire(chat, inner.settings.lease_ttl)
                .await
                .map_err(coord_err)?
            {
                let r = inner.repair_orphans(user, chat, lease.token, None).await;
                inner.release_with_retry(&lease).await;
                r?;
                return Ok(inner
                    .runner
                    .store()
                    .load_messages(user, chat)
                    .await?
                    .into_iter()
                    .map(|m| m.message)
                    .collect());
            }
        }
        Ok(stored
            .into_iter()
            .filter(|m| Some(&m.message.id) != running_id.as_ref())
            .map(|mut m| {
                if m.status == MessageStatus::Streaming {
                    finalize_orphan(&mut m);
                }
                m.message
            })
            .collect())
    }

    async fn delete(&self, user: &UserId, chat: &ChatId) -> Result<(), Error> {
        self.stop(user, chat).await?;
        self.inner.runner.store().delete_chat(user, chat).await?;
        Ok(())
    }
}
