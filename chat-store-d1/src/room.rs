//! [`ChatRoom`]: the body of the Durable Object that owns one chat's live turn.
//!
//! One SQLite-backed DO per chat, named `{userId}:{chatId}` by the Worker after
//! it checked ownership in D1 (see [`DoSessions`](crate::DoSessions)). The DO
//! runs chat-core's [`TurnRunner`]: the user message and the final assistant
//! message go to D1 (idempotent upserts by id); the partial assistant message is
//! checkpointed into the DO's own storage while it streams. If the DO is
//! evicted mid-turn, the next request or the safety alarm finds the checkpoint
//! and stores it in D1 as a finished message with finish reason `error` —
//! once, under the same id, so nothing is lost and nothing is stored twice.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chat_core::{
    BufferSink, Chat, ChatId, ChatPage, Error, FinishReason, MessageStatus, MessageStore,
    ModelProvider, NewChat, PageRequest, Role, StoreError, StoredMessage, TurnBuffer, TurnConfig,
    TurnRunner, UI_STREAM_HEADERS, UiMessage, UserId,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use worker::{Env, Headers, Method, Request, Response, State, Storage};

use crate::store::D1Store;
use crate::wire::{CHAT_HEADER, ErrorWire, MESSAGE_ID_HEADER, SendWire, USER_HEADER};

/// DO storage key of the running turn's checkpoint.
const TURN_KEY: &str = "turn";
/// DO storage key of the `{user}:{chat}` this object serves.
const OWNER_KEY: &str = "owner";
/// Default of [`RoomSettings::recovery_alarm`].
pub const DEFAULT_RECOVERY_ALARM: Duration = Duration::from_secs(30);

/// What a [`ChatRoom`] needs besides the runtime's `State` and `Env`.
#[derive(Clone)]
pub struct RoomSettings {
    /// Name of the D1 binding (e.g. `DB`).
    pub d1_binding: String,
    /// The model.
    pub model: Arc<dyn ModelProvider>,
    /// Turn settings (checkpoint interval, limits, tools, ...).
    pub config: TurnConfig,
    /// While a turn runs, an alarm stays this far ahead: if the object is
    /// evicted, the alarm wakes it to store the last checkpoint even when no
    /// request comes. Default [`DEFAULT_RECOVERY_ALARM`].
    pub recovery_alarm: Duration,
}

impl std::fmt::Debug for RoomSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomSettings")
            .field("d1_binding", &self.d1_binding)
            .field("model", &self.model.name())
            .finish_non_exhaustive()
    }
}

/// The running turn's checkpoint as kept in DO storage (JSON text).
#[derive(Debug, Serialize, Deserialize)]
struct TurnRecord {
    user: String,
    chat: String,
    message: UiMessage,
    created_at: i64,
    updated_at: i64,
}

/// The store the DO's turns write through: checkpoints into DO storage, every
/// other write to D1; a successful final assistant write clears the checkpoint.
struct CheckpointStore {
    d1: D1Store,
    storage: Rc<Storage>,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore").finish_non_exhaustive()
    }
}

fn do_error(e: &worker::Error) -> StoreError {
    StoreError::unavailable(crate::D1Error(format!("DO storage: {e}")))
}

impl CheckpointStore {
    async fn put_record(&self, record: &TurnRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record)
            .map_err(|e| StoreError::Invalid(format!("checkpoint does not serialize: {e}")))?;
        self.storage
            .put(TURN_KEY, json)
            .await
            .map_err(|e| do_error(&e))
    }

    async fn record(&self) -> Result<Option<TurnRecord>, StoreError> {
        let json: Option<String> = self.storage.get(TURN_KEY).await.map_err(|e| do_error(&e))?;
        json.map(|j| {
            serde_json::from_str(&j)
                .map_err(|e| StoreError::Invalid(format!("stored checkpoint is unreadable: {e}")))
        })
        .transpose()
    }

    async fn clear_record(&self) -> Result<(), StoreError> {
        self.storage
            .delete(TURN_KEY)
            .await
            .map(|_| ())
            .map_err(|e| do_error(&e))
    }
}

#[async_trait(?Send)]
impl MessageStore for CheckpointStore {
    async fn create_chat(&self, user: &UserId, chat: NewChat) -> Result<Chat, StoreError> {
        self.d1.create_chat(user, chat).await
    }

    async fn list_chats(&self, user: &UserId, page: PageRequest) -> Result<ChatPage, StoreError> {
        self.d1.list_chats(user, page).await
    }

    async fn get_chat(&self, user: &UserId, chat: &ChatId) -> Result<Chat, StoreError> {
        self.d1.get_chat(user, chat).await
    }

    async fn delete_chat(&self, user: &UserId, chat: &ChatId) -> Result<(), StoreError> {
        self.d1.delete_chat(user, chat).await
    }

    async fn load_messages(
        &self,
        user: &UserId,
        chat: &ChatId,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.d1.load_messages(user, chat).await
    }

    async fn upsert_message(
        &self,
        user: &UserId,
        chat: &ChatId,
        message: &StoredMessage,
    ) -> Result<(), StoreError> {
        if message.status == MessageStatus::Streaming {
            return self
                .put_record(&TurnRecord {
                    user: user.as_str().to_owned(),
                    chat: chat.to_string(),
                    message: message.message.clone(),
                    created_at: message.created_at,
                    updated_at: message.updated_at,
                })
                .await;
        }
        self.d1.upsert_message(user, chat, message).await?;
        if message.message.role == Role::Assistant {
            // The final answer is in D1: the checkpoint has served its purpose.
            if let Err(e) = self.clear_record().await {
                tracing::warn!(chat_id = %chat, error = %e,
                    "could not clear the checkpoint; recovery will find the final message in D1");
            }
        }
        Ok(())
    }

    async fn set_title_if_unset(
        &self,
        user: &UserId,
        chat: &ChatId,
        title: &str,
    ) -> Result<bool, StoreError> {
        self.d1.set_title_if_unset(user, chat, title).await
    }

    async fn touch(&self, user: &UserId, chat: &ChatId, at: i64) -> Result<(), StoreError> {
        self.d1.touch(user, chat, at).await
    }
}

/// The running turn.
struct Live {
    message_id: RefCell<chat_core::MessageId>,
    buffer: Arc<TurnBuffer>,
    cancel: CancellationToken,
}

struct Room {
    store: Rc<CheckpointStore>,
    recovery_alarm: Duration,
    runner: TurnRunner,
    live: RefCell<Option<Rc<Live>>>,
    /// The `{user}:{chat}` checked against storage (once per instance).
    owner: RefCell<Option<String>>,
}

/// The Durable Object body: wrap it in your `#[durable_object]` struct and
/// forward `fetch` and `alarm` to it.
pub struct ChatRoom {
    room: Result<Rc<Room>, String>,
}

impl std::fmt::Debug for ChatRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatRoom").finish_non_exhaustive()
    }
}

fn error_response(e: &Error) -> worker::Result<Response> {
    let (status, wire) = ErrorWire::from_error(e);
    if status >= 500 {
        tracing::error!(error = %e, "chat room request failed");
    }
    Ok(Response::from_json(&wire)?.with_status(status))
}

fn header(req: &Request, name: &str) -> Result<String, Error> {
    req.headers().get(name).ok().flatten().ok_or_else(|| {
        Error::Store(StoreError::backend(crate::D1Error(format!(
            "missing {name}"
        ))))
    })
}

impl ChatRoom {
    /// The room of the DO whose `state` and `env` the runtime passed to `new`.
    #[allow(clippy::arc_with_non_send_sync)] // wasm32 is single-threaded; chat-core wants an Arc
    pub fn new(state: &State, env: &Env, settings: RoomSettings) -> Self {
        let room = D1Store::from_env(env, &settings.d1_binding)
            .map_err(|e| format!("D1 binding `{}`: {e}", settings.d1_binding))
            .map(|d1| {
                let store = Rc::new(CheckpointStore {
                    d1,
                    storage: Rc::new(state.storage()),
                });
                let runner = TurnRunner::new(
                    Arc::new(CheckpointStore {
                        d1: store.d1.clone(),
                        storage: store.storage.clone(),
                    }),
                    settings.model,
                    settings.config,
                );
                Rc::new(Room {
                    store,
                    recovery_alarm: settings.recovery_alarm,
                    runner,
                    live: RefCell::new(None),
                    owner: RefCell::new(None),
                })
            });
        if let Err(e) = &room {
            tracing::error!(error = %e, "chat room misconfigured");
        }
        Self { room }
    }

    /// A room that cannot work (e.g. its model is misconfigured): every request
    /// answers 500 and `reason` goes to the logs.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        tracing::error!(error = %reason, "chat room misconfigured");
        Self { room: Err(reason) }
    }

    /// Handles a request from [`DoSessions`](crate::DoSessions).
    pub async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        let room = match &self.room {
            Ok(r) => r.clone(),
            Err(e) => {
                return error_response(&Error::Store(StoreError::backend(crate::D1Error(
                    e.clone(),
                ))));
            }
        };
        let result = async {
            let user = UserId::new(header(&req, USER_HEADER)?)?;
            let chat = ChatId::parse(&header(&req, CHAT_HEADER)?)?;
            room.wake(&user, &chat).await?;
            let op = req.path();
            match (req.method(), op.as_str()) {
                (Method::Post, "/send") => {
                    let body = req.bytes().await.map_err(|e| {
                        Error::Store(StoreError::backend(crate::D1Error(e.to_string())))
                    })?;
                    let wire: SendWire = serde_json::from_slice(&body).map_err(|e| {
                        chat_core::ValidationError::new("message", format!("bad request: {e}"))
                    })?;
                    Room::send(&room, &user, &chat, wire.into_request()?).await
                }
                (Method::Get, "/resume") => Ok(room.resume()),
                (Method::Post, "/stop") => room.stop().await,
                (Method::Get, "/history") => room.history(&user, &chat).await,
                (Method::Post, "/delete") => room.delete(&user, &chat).await,
                _ => Err(Error::NotFound),
            }
        }
        .await;
        match result {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(e),
            Err(e) => error_response(&e),
        }
    }

    /// Handles the safety alarm: keeps it ahead while a turn runs, otherwise
    /// stores a checkpoint left by an evicted instance.
    pub async fn alarm(&self) -> worker::Result<Response> {
        let Ok(room) = &self.room else {
            return Response::empty();
        };
        if room.live.borrow().is_some() {
            room.store.storage.set_alarm(room.recovery_alarm).await?;
        } else if let Err(e) = room.recover().await {
            tracing::error!(error = %e, "recovery from the alarm failed; retrying later");
            room.store.storage.set_alarm(room.recovery_alarm).await?;
        }
        Response::empty()
    }
}

type Reply = Result<worker::Result<Response>, Error>;

fn json<T: Serialize>(value: &T) -> worker::Result<Response> {
    Response::from_json(value)
}

fn stream_response(live: &Live) -> worker::Result<Response> {
    let frames = live
        .buffer
        .clone()
        .follow()
        .map(|b| Ok::<Vec<u8>, worker::Error>(b.to_vec()));
    let headers = Headers::new();
    for (k, v) in UI_STREAM_HEADERS {
        headers.set(k, v)?;
    }
    headers.set(MESSAGE_ID_HEADER, live.message_id.borrow().as_str())?;
    Ok(Response::from_stream(frames)?.with_headers(headers))
}

impl Room {
    /// First request of this instance: bind it to its chat, and finish a turn an
    /// evicted instance left behind.
    async fn wake(&self, user: &UserId, chat: &ChatId) -> Result<(), Error> {
        let name = crate::room_name(user, chat);
        if self.owner.borrow().as_deref() == Some(name.as_str()) {
            return Ok(());
        }
        let stored: Option<String> = self
            .store
            .storage
            .get(OWNER_KEY)
            .await
            .map_err(|e| do_error(&e))?;
        match stored {
            Some(s) if s != name => {
                return Err(Error::Store(StoreError::backend(crate::D1Error(
                    "request for another chat reached this room".into(),
                ))));
            }
            Some(_) => {}
            None => self
                .store
                .storage
                .put(OWNER_KEY, name.clone())
                .await
                .map_err(|e| do_error(&e))?,
        }
        *self.owner.borrow_mut() = Some(name);
        if self.live.borrow().is_none() {
            self.recover().await?;
        }
        Ok(())
    }

    /// Stores the checkpoint of a turn that no instance runs any more as a
    /// finished message with finish reason `error` (unless its final version
    /// reached D1), then forgets it. Idempotent: an upsert by message id.
    async fn recover(&self) -> Result<(), Error> {
        let Some(rec) = self.store.record().await? else {
            return Ok(());
        };
        let user = UserId::new(&rec.user)?;
        let chat = ChatId::parse(&rec.chat)?;
        match self.store.d1.load_messages(&user, &chat).await {
            Ok(messages) => {
                let done = messages
                    .iter()
                    .any(|m| m.message.id == rec.message.id && m.status == MessageStatus::Complete);
                if !done {
                    let mut message = rec.message;
                    message.metadata_mut().finish_reason = Some(FinishReason::Error);
                    tracing::warn!(chat_id = %chat, message_id = %message.id,
                        "storing the checkpoint of a turn interrupted by eviction");
                    self.store
                        .d1
                        .upsert_message(
                            &user,
                            &chat,
                            &StoredMessage {
                                message,
                                created_at: rec.created_at,
                                updated_at: chat_core::now_ms(),
                                status: MessageStatus::Complete,
                            },
                        )
                        .await?;
                }
            }
            // The chat was deleted meanwhile: nothing to keep.
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.store.clear_record().await?;
        Ok(())
    }

    async fn send(
        room: &Rc<Room>,
        user: &UserId,
        chat_id: &ChatId,
        request: chat_core::SendRequest,
    ) -> Reply {
        // Single flight: check and reserve with no await in between (the DO runs
        // one event at a time, but requests interleave at every await).
        if room.live.borrow().is_some() {
            return Err(Error::Busy {
                chat_id: chat_id.to_string(),
            });
        }
        let live = Rc::new(Live {
            message_id: RefCell::new(chat_core::MessageId::new()),
            buffer: Arc::new(TurnBuffer::new()),
            cancel: CancellationToken::new(),
        });
        *room.live.borrow_mut() = Some(live.clone());
        let prepared = async {
            // A checkpoint a failed final write left behind is stored before a new turn
            // replaces it.
            room.recover().await?;
            let chat = room.store.d1.get_chat(user, chat_id).await?;
            let prepared = room.runner.prepare(user, &chat, request).await?;
            // From here on an eviction is recoverable: an empty checkpoint first.
            let mut message =
                UiMessage::new(prepared.assistant_id.clone(), Role::Assistant, vec![]);
            message.metadata_mut().created_at = Some(prepared.created_at);
            room.store
                .put_record(&TurnRecord {
                    user: user.as_str().to_owned(),
                    chat: chat_id.to_string(),
                    message,
                    created_at: prepared.created_at,
                    updated_at: prepared.created_at,
                })
                .await?;
            room.store
                .storage
                .set_alarm(room.recovery_alarm)
                .await
                .map_err(|e| do_error(&e))?;
            Ok::<_, Error>(prepared)
        }
        .await;
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                *room.live.borrow_mut() = None;
                // Release anyone who waited on this turn meanwhile (stop, delete, resume).
                live.buffer.close();
                return Err(e);
            }
        };
        *live.message_id.borrow_mut() = prepared.assistant_id.clone();

        let task_room = room.clone();
        let task_live = live.clone();
        worker::wasm_bindgen_futures::spawn_local(async move {
            let mut sink = BufferSink::new(task_live.buffer.clone());
            let outcome = task_room
                .runner
                .run(prepared, &mut sink, &task_live.cancel)
                .await;
            tracing::debug!(
                reason = outcome.reason.as_str(),
                stored = outcome.stored,
                "turn ended"
            );
            // Leave before closing, so a client that sees [DONE] can start the next turn.
            let mine = task_room
                .live
                .borrow()
                .as_ref()
                .is_some_and(|l| Rc::ptr_eq(l, &task_live));
            if mine {
                *task_room.live.borrow_mut() = None;
            }
            task_live.buffer.close();
            if outcome.stored
                && let Err(e) = task_room.store.storage.delete_alarm().await
            {
                tracing::warn!(error = %e, "could not delete the safety alarm");
            }
        });
        Ok(stream_response(&live))
    }

    fn resume(&self) -> worker::Result<Response> {
        match self.live.borrow().as_ref() {
            Some(live) => stream_response(live),
            None => Ok(Response::empty()?.with_status(204)),
        }
    }

    async fn stop(&self) -> Reply {
        let live = self.live.borrow().clone();
        let Some(live) = live else {
            return Ok(json(&serde_json::json!({ "stopped": false })));
        };
        live.cancel.cancel();
        // Answer once the partial message is stored.
        live.buffer.closed().await;
        Ok(json(&serde_json::json!({ "stopped": true })))
    }

    async fn history(&self, user: &UserId, chat: &ChatId) -> Reply {
        let running = self
            .live
            .borrow()
            .as_ref()
            .map(|l| l.message_id.borrow().clone());
        // Leftover checkpoints in D1 were not written by this DO (its own live in
        // DO storage): a dead writer's; they are listed as finished messages that failed.
        let (out, _) =
            chat_core::store::listed_history(&self.store.d1, user, chat, running.as_ref()).await?;
        Ok(json(&out))
    }

    async fn delete(&self, user: &UserId, chat: &ChatId) -> Reply {
        let live = self.live.borrow().clone();
        if let Some(live) = live {
            live.cancel.cancel();
            live.buffer.closed().await;
        }
        self.store.d1.delete_chat(user, chat).await?;
        self.store.clear_record().await?;
        Ok(json(&serde_json::json!({ "deleted": true })))
    }
}
