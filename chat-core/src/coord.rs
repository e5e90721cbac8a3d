//! Cross-instance coordination of turns: a per-chat lease with a fencing
//! token, a chunk bus for replay + live follow from any instance, and stop
//! signals to whichever instance runs the turn.
//!
//! [`InProcessCoordinator`] is the single-process implementation; Redis and
//! Postgres implementations live in adapter crates. Any of them plugs into
//! [`CoordinatedSessions`](crate::CoordinatedSessions).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use web_time::Instant;

use crate::BoxStream;
use crate::buffer::TurnBuffer;
use crate::error::BoxError;
use crate::ids::{ChatId, MessageId};

/// A held lease on one chat's turn. `token` is a fencing token: strictly
/// increasing per chat across all instances, carried by every write of the turn.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The chat.
    pub chat: ChatId,
    /// The fencing token.
    pub token: u64,
}

/// The turn currently holding a chat's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningTurn {
    /// Its fencing token.
    pub token: u64,
    /// Its assistant message id, once announced with [`TurnCoordinator::begin`].
    pub message_id: Option<MessageId>,
}

/// A coordination backend failure.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The backend is unreachable or timed out; retrying may help.
    #[error("coordinator unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// Any other failure.
    #[error("coordinator error: {0}")]
    Backend(#[source] BoxError),
}

impl CoordError {
    /// Whether retrying may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CoordError::Unavailable(_))
    }
}

/// Coordinates turns across server instances. Implementations must make
/// `acquire` atomic (one winner), tokens strictly increasing per chat, and
/// `follow` replay every published frame from the first, then live, ending
/// with `[DONE]` after `release`.
#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
pub trait TurnCoordinator: crate::MaybeSendSync + 'static {
    /// Takes the chat's lease for `ttl`, or `None` while another live turn holds it.
    async fn acquire(&self, chat: &ChatId, ttl: Duration) -> Result<Option<Lease>, CoordError>;

    /// Announces the running turn's assistant message id (for history and resume).
    async fn begin(&self, lease: &Lease, message_id: &MessageId) -> Result<(), CoordError>;

    /// Extends the lease; `false` when it was lost (expired, maybe taken over).
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, CoordError>;

    /// Ends the turn: its stream gets `[DONE]` (kept a short while for late
    /// followers) and the lease is freed, if still held by `lease`.
    async fn release(&self, lease: &Lease) -> Result<(), CoordError>;

    /// The turn holding the chat's lease now, if any.
    async fn running(&self, chat: &ChatId) -> Result<Option<RunningTurn>, CoordError>;

    /// Appends SSE frames to the turn's stream, in order.
    async fn publish(&self, lease: &Lease, frames: &[Bytes]) -> Result<(), CoordError>;

    /// The running turn's frames from its first, then live; `None` when no turn runs.
    async fn follow(
        &self,
        chat: &ChatId,
    ) -> Result<Option<(RunningTurn, BoxStream<'static, Bytes>)>, CoordError>;

    /// Asks the instance running the chat's turn to stop it; `false` when none runs.
    async fn request_stop(&self, chat: &ChatId) -> Result<bool, CoordError>;

    /// Resolves when a stop was requested for this lease's turn.
    async fn stop_requested(&self, lease: &Lease) -> Result<(), CoordError>;
}

#[derive(Debug)]
struct Entry {
    token: u64,
    message_id: Option<MessageId>,
    expires: Instant,
    released: bool,
    buffer: Arc<TurnBuffer>,
    stop: CancellationToken,
}

/// [`TurnCoordinator`] inside one process (tests, single-instance servers).
#[derive(Debug, Default)]
pub struct InProcessCoordinator {
    state: Mutex<HashMap<ChatId, Entry>>,
    tokens: Mutex<HashMap<ChatId, u64>>,
}

impl InProcessCoordinator {
    /// A new coordinator.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChatId, Entry>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn live<'a>(map: &'a HashMap<ChatId, Entry>, chat: &ChatId) -> Option<&'a Entry> {
        map.get(chat)
            .filter(|e| !e.released && e.expires > Instant::now())
    }
}

#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
impl TurnCoordinator for InProcessCoordinator {
    async fn acquire(&self, chat: &ChatId, ttl: Duration) -> Result<Option<Lease>, CoordError> {
        let mut map = self.lock();
        if Self::live(&map, chat).is_some() {
            return Ok(None);
        }
        let token = {
            let mut t = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
            let n = t.entry(*chat).or_insert(0);
            *n += 1;
            *n
        };
        if let Some(old) = map.remove(chat) {
            // An expired holder's followers end.
            old.buffer.close();
        }
        map.insert(
            *chat,
            Entry {
                token,
                message_id: None,
                expires: Instant::now() + ttl,
                released: false,
                buffer: Arc::new(TurnBuffer::new()),
                stop: CancellationToken::new(),
            },
        );
        Ok(Some(Lease { chat: *chat, token }))
    }

    async fn begin(&self, lease: &Lease, message_id: &MessageId) -> Result<(), CoordError> {
        if let Some(e) = self
            .lock()
            .get_mut(&lease.chat)
            .filter(|e| e.token == lease.token)
        {
            e.message_id = Some(message_id.clone());
        }
        Ok(())
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, CoordError> {
        let mut map = self.lock();
        match map.get_mut(&lease.chat) {
            Some(e) if e.token == lease.token && !e.released => {
                e.expires = Instant::now() + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), CoordError> {
        let mut map = self.lock();
        if let Some(e) = map.get_mut(&lease.chat).filter(|e| e.token == lease.token) {
            e.released = true;
            e.buffer.close();
        }
        Ok(())
    }

    async fn running(&self, chat: &ChatId) -> Result<Option<RunningTurn>, CoordError> {
        let map = self.lock();
        Ok(Self::live(&map, chat).map(|e| RunningTurn {
            token: e.token,
            message_id: e.message_id.clone(),
        }))
    }

    async fn publish(&self, lease: &Lease, frames: &[Bytes]) -> Result<(), CoordError> {
        let map = self.lock();
        if let Some(e) = map.get(&lease.chat).filter(|e| e.token == lease.token) {
            for f in frames {
                e.buffer.push(f);
            }
        }
        Ok(())
    }

    async fn follow(
        &self,
        chat: &ChatId,
    ) -> Result<Option<(RunningTurn, BoxStream<'static, Bytes>)>, CoordError> {
        let map = self.lock();
        Ok(Self::live(&map, chat).map(|e| {
            (
                RunningTurn {
                    token: e.token,
                    message_id: e.message_id.clone(),
                },
                Box::pin(e.buffer.clone().follow()) as BoxStream<'static, Bytes>,
            )
        }))
    }

    async fn request_stop(&self, chat: &ChatId) -> Result<bool, CoordError> {
        let map = self.lock();
        Ok(Self::live(&map, chat).is_some_and(|e| {
            e.stop.cancel();
            true
        }))
    }

    async fn stop_requested(&self, lease: &Lease) -> Result<(), CoordError> {
        let stop = {
            let map = self.lock();
            map.get(&lease.chat)
                .filter(|e| e.token == lease.token)
                .map(|e| e.stop.clone())
        };
        match stop {
            Some(s) => s.cancelled().await,
            None => futures::future::pending::<()>().await,
        }
        Ok(())
    }
}
