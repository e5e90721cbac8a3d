//! The in-process session runtime for native servers: one task per running
//! turn, nothing per idle chat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::buffer::TurnBuffer;
use crate::error::Error;
use crate::ids::{ChatId, MessageId, UserId};
use crate::message::{FinishReason, UiMessage};
use crate::model::ModelProvider;
use crate::session::{ChatSession, SendRequest, TurnStream};
use crate::store::{Chat, MessageStatus, MessageStore};
use crate::tool::ToolSet;
use crate::turn::{BufferSink, TurnConfig, TurnRunner};

#[derive(Debug)]
struct ActiveTurn {
    message_id: MessageId,
    buffer: Arc<TurnBuffer>,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct Inner {
    runner: TurnRunner,
    active: Mutex<HashMap<ChatId, Arc<ActiveTurn>>>,
}

/// [`ChatSession`] for one process: a running turn is a tokio task writing
/// into a [`TurnBuffer`]; followers (the POST response, resumes) read it.
/// Single-flight per chat; the map of running turns is touched only when a
/// turn starts or ends, never per token.
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

    async fn owned_chat(&self, user: &UserId, chat: &ChatId) -> Result<Chat, Error> {
        Ok(self.runner.store().get_chat(user, chat).await?)
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
        Self {
            inner: Arc::new(Inner {
                runner,
                active: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Adds the tools the model may call.
    #[must_use]
    pub fn with_tools(self, tools: ToolSet) -> Self {
        let runner = self.inner.runner.clone().with_tools(tools);
        Self::from_runner(runner)
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
        let prepared = self.inner.runner.prepare(user, &chat, request).await?;
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
        let chat_key = *chat_id;
        tokio::spawn(async move {
            let mut sink = BufferSink::new(task_turn.buffer.clone());
            let outcome = inner
                .runner
                .run(prepared, &mut sink, &task_turn.cancel)
                .await;
            tracing::debug!(chat_id = %chat_key, reason = outcome.reason.as_str(),
                stored = outcome.stored, "turn ended");
            // Leave the map before closing, so a client that sees [DONE] can start the next turn.
            inner.release(chat_key, &task_turn);
            task_turn.buffer.close();
        });
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
        let stored = self.inner.runner.store().load_messages(user, chat).await?;
        let mut out = Vec::with_capacity(stored.len());
        for mut m in stored {
            if running.as_ref() == Some(&m.message.id) {
                continue;
            }
            if m.status == MessageStatus::Streaming {
                // No turn runs for it: the process that ran it died. Keep the
                // last checkpoint as a finished message that failed.
                m.status = MessageStatus::Complete;
                m.message.metadata_mut().finish_reason = Some(FinishReason::Error);
                if let Err(e) = self
                    .inner
                    .runner
                    .store()
                    .upsert_message(user, chat, &m)
                    .await
                {
                    tracing::warn!(chat_id = %chat, message_id = %m.message.id, error = %e,
                        "could not finalize an orphaned checkpoint");
                }
            }
            out.push(m.message);
        }
        Ok(out)
    }

    async fn delete(&self, user: &UserId, chat: &ChatId) -> Result<(), Error> {
        self.inner.owned_chat(user, chat).await?;
        if let Some(turn) = self.inner.get(chat) {
            turn.cancel.cancel();
            turn.buffer.closed().await;
        }
        self.inner.runner.store().delete_chat(user, chat).await?;
        Ok(())
    }
}
