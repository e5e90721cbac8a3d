//! The turn state machine: user message stored -> model steps (tools between
//! them) -> finalize, with every exit path persisting what was produced.

use std::borrow::Cow;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
// The clock the model's waits run on (`crate::sleep`): tokio's natively, so
// checkpoint pacing follows a paused test clock too.
#[cfg(not(target_arch = "wasm32"))]
use tokio::time::Instant;
#[cfg(target_arch = "wasm32")]
use web_time::Instant;

use crate::chunk::UiChunk;
use crate::error::{Error, ModelError, StoreError, ValidationError};
use crate::ids::{ChatId, MessageId, UserId};
use crate::message::{
    FinishReason, MessageMetadata, Part, Role, TextPart, TextState, ToolPart, ToolState, UiMessage,
    Usage,
};
use crate::model::{Conversation, ModelEvent, ModelProvider, ModelRequest, ModelStream};
use crate::session::{SendRequest, Trigger};
use crate::store::{Chat, MessageStatus, MessageStore, StoredMessage};
use crate::title::title_from_text;
use crate::tool::{ToolContext, ToolSet};
use crate::validate::Limits;

/// What the client sees when a turn fails (details go to the logs only).
pub const MODEL_ERROR_TEXT: &str = "The model failed to respond. Please try again.";
/// What the client sees when the final write fails.
pub const STORE_ERROR_TEXT: &str = "The answer could not be saved. Please try again.";

/// Settings of the turn state machine.
#[derive(Debug, Clone)]
pub struct TurnConfig {
    /// Most model steps per turn (tool calls run between steps). Default 10.
    pub max_steps: u32,
    /// Checkpoint the partial assistant message at most this often. Default 500 ms.
    /// Checkpoints are written off the token path (at most one write in
    /// flight; one falling due meanwhile replaces the pending one), and the
    /// final write waits for the one in flight, so it always wins. A turn's
    /// first checkpoint falls due up to half an interval sooner, by an amount
    /// drawn from its message id, so turns started together (a burst of
    /// users, a load test) do not all checkpoint in the same millisecond.
    pub checkpoint_interval: Duration,
    /// A checkpoint due by [`checkpoint_interval`](Self::checkpoint_interval)
    /// also waits until this many model events (tokens) arrived since the
    /// last one, unless [`checkpoint_max_interval`](Self::checkpoint_max_interval)
    /// has passed. Default 16. At a model's normal pace this never binds
    /// (20 ms tokens bring 25 per interval); when an overloaded machine
    /// stretches a stream, it keeps the checkpoints of every stream from
    /// multiplying with the stretch (a 10 s stream would write 20 full
    /// rewrites by time alone) and swamping the store. 0 = by time only.
    pub checkpoint_min_events: u32,
    /// A checkpoint is written once this long has passed since the last one
    /// and any event arrived, however few (never sooner than
    /// `checkpoint_interval`). Default 2 s: the most a crash can lose to the
    /// event floor above.
    pub checkpoint_max_interval: Duration,
    /// Also checkpoint after this many model events (0 = only by time). Default 0.
    pub checkpoint_every_events: u32,
    /// System prompt sent with every step.
    pub system_prompt: Option<String>,
    /// Input limits.
    pub limits: Limits,
    /// Tools the model may call.
    pub tools: ToolSet,
    /// Retries of the final write when the store error is retryable. Default 5.
    pub finalize_retries: u32,
    /// First backoff of the final write (doubles each retry). Default 50 ms.
    pub finalize_backoff: Duration,
}

impl TurnConfig {
    /// How much sooner than the interval this turn's first checkpoint falls
    /// due: up to half the interval, drawn from the (random) message id.
    fn first_checkpoint_head_start(&self, id: &MessageId) -> Duration {
        let spread = self.checkpoint_interval / 2;
        spread.mul_f64((crate::history::id_hash(id) % 1024) as f64 / 1024.0)
    }

    /// Whether a checkpoint is due `elapsed` after the last one, with
    /// `events` (at least one) arrived since.
    pub fn checkpoint_due(&self, elapsed: Duration, events: u32) -> bool {
        if self.checkpoint_every_events > 0 && events >= self.checkpoint_every_events {
            return true;
        }
        elapsed >= self.checkpoint_interval
            && (events >= self.checkpoint_min_events || elapsed >= self.checkpoint_max_interval)
    }
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            max_steps: 10,
            checkpoint_interval: Duration::from_millis(500),
            checkpoint_min_events: 16,
            checkpoint_max_interval: Duration::from_secs(2),
            checkpoint_every_events: 0,
            system_prompt: Some("You are a helpful AI assistant. Be concise and helpful.".into()),
            limits: Limits::default(),
            tools: ToolSet::new(),
            finalize_retries: 5,
            finalize_backoff: Duration::from_millis(50),
        }
    }
}

/// Receives the chunks of a turn as they are produced (encode, buffer, send).
///
/// [`BufferSink`] encodes into a [`TurnBuffer`](crate::TurnBuffer) for replay + live follow.
pub trait ChunkSink: crate::MaybeSendSync {
    /// Called once per chunk, in order. Must not block.
    fn emit(&mut self, chunk: &UiChunk<'_>);

    /// Like [`emit`](Self::emit), for a chunk that readers may get together
    /// with the next emitted one rather than at once. The turn holds the
    /// chunks that close its last step (`text-end`, `finish-step`): the
    /// final chunk follows them as soon as the answer is stored, and a
    /// stream's reader then gets the three in one write instead of two.
    /// A chunk held is never the last: `finish`, `error` or `abort` always
    /// follows. Defaults to `emit`.
    fn emit_held(&mut self, chunk: &UiChunk<'_>) {
        self.emit(chunk);
    }
}

/// A sink that holds every chunk it is given (see [`ChunkSink::emit_held`]).
struct Held<'s>(&'s mut dyn ChunkSink);

impl ChunkSink for Held<'_> {
    fn emit(&mut self, chunk: &UiChunk<'_>) {
        self.0.emit_held(chunk);
    }
}

impl<F: FnMut(&UiChunk<'_>) + crate::MaybeSendSync> ChunkSink for F {
    fn emit(&mut self, chunk: &UiChunk<'_>) {
        self(chunk);
    }
}

/// A turn whose user message is stored and that is ready to run.
#[derive(Debug, Clone)]
pub struct PreparedTurn {
    /// The chat's owner.
    pub user: UserId,
    /// The chat.
    pub chat: ChatId,
    /// Id the assistant message is stored under.
    pub assistant_id: MessageId,
    /// The conversation sent to the model, oldest first (shared with each
    /// step's [`ModelRequest`], never copied per step).
    pub conversation: Conversation,
    /// Creation time of the assistant message, epoch ms.
    pub created_at: i64,
    /// Fencing token every write of this turn carries (multi-instance runtimes).
    pub fence: Option<u64>,
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnOutcome {
    /// The assistant message as stored (or as it would have been, if the final write failed).
    pub message: UiMessage,
    /// Why it ended.
    pub reason: FinishReason,
    /// Whether the final message reached the store.
    pub stored: bool,
}

/// Runs turns against a store and a model. Cheap to clone.
#[derive(Clone)]
pub struct TurnRunner {
    store: Arc<dyn MessageStore>,
    model: Arc<dyn ModelProvider>,
    config: Arc<TurnConfig>,
}

impl std::fmt::Debug for TurnRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnRunner")
            .field("model", &self.model.name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

enum End {
    Finished(FinishReason),
    Aborted,
    Failed(ModelError),
}

/// The assistant message under construction plus open-part bookkeeping.
struct Draft {
    msg: UiMessage,
    open_text: Option<OpenPart>,
    open_reasoning: Option<OpenPart>,
    part_seq: u32,
    usage: Option<Usage>,
}

/// A text or reasoning part still streaming. Its text grows here, beside its
/// id, and moves into the message's part (`msg.parts[idx]`, a placeholder
/// until then) when the part closes: a token touches the draft and this
/// text, not the parts vector too (a cold cache line per token when
/// thousands of turns stream at once).
struct OpenPart {
    idx: usize,
    id: String,
    text: String,
}

impl OpenPart {
    /// The part's text, read from `parts` for the placeholder at `idx`.
    fn slot<'p>(&self, parts: &'p mut [Part]) -> Option<&'p mut TextPart> {
        match parts.get_mut(self.idx) {
            Some(Part::Text(t) | Part::Reasoning(t)) => Some(t),
            _ => None,
        }
    }
}

impl Draft {
    fn next_id(&mut self, kind: &str) -> String {
        let id = format!("{kind}-{}", self.part_seq);
        self.part_seq += 1;
        id
    }

    /// Opens a text (`reasoning` false) or reasoning part: a placeholder in
    /// the message, its text kept open beside it.
    fn open(&mut self, reasoning: bool, sink: &mut dyn ChunkSink) -> &mut OpenPart {
        let id = self.next_id(if reasoning { "reasoning" } else { "text" });
        let mut part = TextPart {
            text: String::new(),
            state: Some(TextState::Streaming),
            provider_metadata: None,
            id: None,
        };
        let open = if reasoning {
            sink.emit(&UiChunk::ReasoningStart {
                id: Cow::Borrowed(&id),
            });
            // useChat keeps the stream id on reasoning parts (not on text).
            part.id = Some(id.clone());
            self.msg.parts.push(Part::Reasoning(part));
            &mut self.open_reasoning
        } else {
            sink.emit(&UiChunk::TextStart {
                id: Cow::Borrowed(&id),
            });
            self.msg.parts.push(Part::Text(part));
            &mut self.open_text
        };
        open.insert(OpenPart {
            idx: self.msg.parts.len() - 1,
            id,
            text: String::new(),
        })
    }

    /// Adds `delta` to the open text (`reasoning` false) or reasoning part,
    /// closing the other kind and opening this one first when needed, and
    /// emits it.
    fn append(&mut self, reasoning: bool, delta: &str, sink: &mut dyn ChunkSink) {
        if reasoning {
            self.close_text(sink);
        } else {
            self.close_reasoning(sink);
        }
        let open = match (reasoning, &mut self.open_reasoning, &mut self.open_text) {
            (true, Some(open), _) | (false, _, Some(open)) => open,
            _ => self.open(reasoning, sink),
        };
        open.text.push_str(delta);
        let (id, delta) = (Cow::Borrowed(open.id.as_str()), Cow::Borrowed(delta));
        sink.emit(&if reasoning {
            UiChunk::ReasoningDelta { id, delta }
        } else {
            UiChunk::TextDelta { id, delta }
        });
    }

    /// Moves an open part's text into its place in the message, marked done.
    fn settle(parts: &mut [Part], open: OpenPart) -> String {
        if let Some(t) = open.slot(parts) {
            t.text = open.text;
            t.state = Some(TextState::Done);
        }
        open.id
    }

    fn close_text(&mut self, sink: &mut dyn ChunkSink) {
        if let Some(open) = self.open_text.take() {
            let id = Self::settle(&mut self.msg.parts, open);
            sink.emit(&UiChunk::TextEnd { id: id.into() });
        }
    }

    fn close_reasoning(&mut self, sink: &mut dyn ChunkSink) {
        if let Some(open) = self.open_reasoning.take() {
            let id = Self::settle(&mut self.msg.parts, open);
            sink.emit(&UiChunk::ReasoningEnd { id: id.into() });
        }
    }

    /// The message as it stands, open parts' text so far included (a checkpoint).
    fn snapshot(&self) -> UiMessage {
        let mut msg = self.msg.clone();
        for open in [&self.open_text, &self.open_reasoning]
            .into_iter()
            .flatten()
        {
            if let Some(t) = open.slot(&mut msg.parts) {
                t.text.clone_from(&open.text);
            }
        }
        msg
    }

    fn close_all(&mut self, sink: &mut dyn ChunkSink) {
        self.close_reasoning(sink);
        self.close_text(sink);
    }

    fn tool_mut(&mut self, call_id: &str) -> Option<&mut ToolPart> {
        self.msg.parts.iter_mut().rev().find_map(|p| match p {
            Part::Tool(t) if t.tool_call_id == call_id => Some(t),
            _ => None,
        })
    }

    /// Marks tool calls that never got a result as failed, so the stored
    /// conversation stays valid for the next model call.
    fn fail_unfinished_tools(&mut self, sink: &mut dyn ChunkSink, why: &str) {
        for p in &mut self.msg.parts {
            if let Part::Tool(t) = p
                && matches!(
                    t.state,
                    ToolState::InputStreaming | ToolState::InputAvailable
                )
            {
                t.state = ToolState::OutputError;
                t.error_text = Some(why.to_owned());
                if t.input.is_none() {
                    t.input = Some(Value::Object(serde_json::Map::new()));
                }
                sink.emit(&UiChunk::ToolOutputError {
                    tool_call_id: Cow::Borrowed(&t.tool_call_id),
                    error_text: Cow::Borrowed(why),
                });
            }
        }
    }
}

/// A checkpoint write in flight (`Send` natively, local on wasm32).
#[cfg(not(target_arch = "wasm32"))]
type CheckpointWrite<'a> = futures::future::BoxFuture<'a, ()>;
/// A checkpoint write in flight (`Send` natively, local on wasm32).
#[cfg(target_arch = "wasm32")]
type CheckpointWrite<'a> = futures::future::LocalBoxFuture<'a, ()>;

/// The checkpoint writes of one turn, kept off the token path: at most one
/// write is in flight, a checkpoint that falls due meanwhile replaces the
/// pending one (only the latest draft is worth writing), and the writes are
/// polled alongside whatever the turn awaits (the model, a tool), so a slow
/// store never holds back a token. [`finish`](Self::finish) waits for the
/// write in flight and drops the pending one, so the final write always
/// comes after every checkpoint and wins.
struct Checkpoints<'a> {
    runner: &'a TurnRunner,
    turn: &'a PreparedTurn,
    inflight: Option<CheckpointWrite<'a>>,
    pending: Option<StoredMessage>,
    cancel: CancelWatch<'a>,
}

/// Watches a turn's cancellation for every await of the turn with one
/// registration, not a new `cancelled()` future per token, and answers
/// "cancelled yet?" from one atomic flag: the registration wakes the turn
/// through [`CancelFlag`], which sets the flag first (the token's own
/// `is_cancelled` takes a mutex, paid twice per token before).
struct CancelWatch<'a> {
    /// Holds the registration; polled only with the flag's waker.
    wait: Pin<Box<WaitForCancellationFuture<'a>>>,
    flag: Arc<CancelFlag>,
    /// The turn's waker the flag forwards to (to skip the flag's lock when unchanged).
    waker: Option<Waker>,
}

/// Set (then the turn woken) when the cancellation fires.
#[derive(Default)]
struct CancelFlag {
    fired: std::sync::atomic::AtomicBool,
    turn: std::sync::Mutex<Option<Waker>>,
}

impl std::task::Wake for CancelFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, std::sync::atomic::Ordering::Release);
        let turn = self
            .turn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(w) = turn {
            w.wake();
        }
    }
}

impl<'a> CancelWatch<'a> {
    fn new(token: &'a CancellationToken) -> Self {
        Self {
            wait: Box::pin(token.cancelled()),
            flag: Arc::new(CancelFlag::default()),
            waker: None,
        }
    }

    /// Whether the token fired; the turn (`cx`) is woken when it does.
    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> bool {
        if self.flag.fired.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return false;
        }
        // First poll, or the turn moved to another waker: forward to it, and
        // (first time) register the flag with the token.
        *self
            .flag
            .turn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cx.waker().clone());
        self.waker = Some(cx.waker().clone());
        let flag_waker = Waker::from(self.flag.clone());
        if self
            .wait
            .as_mut()
            .poll(&mut Context::from_waker(&flag_waker))
            .is_ready()
        {
            self.flag
                .fired
                .store(true, std::sync::atomic::Ordering::Release);
        }
        self.flag.fired.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl<'a> Checkpoints<'a> {
    fn new(runner: &'a TurnRunner, turn: &'a PreparedTurn, cancel: &'a CancellationToken) -> Self {
        Self {
            runner,
            turn,
            inflight: None,
            pending: None,
            cancel: CancelWatch::new(cancel),
        }
    }

    /// Writes `msg` as a checkpoint now, or once the write in flight is done.
    fn save(&mut self, msg: UiMessage) {
        let stored = StoredMessage {
            message: msg,
            created_at: self.turn.created_at,
            updated_at: crate::now_ms(),
            status: MessageStatus::Streaming,
        };
        if self.inflight.is_some() {
            self.pending = Some(stored);
        } else {
            self.inflight = Some(self.write(stored));
        }
    }

    fn write(&self, stored: StoredMessage) -> CheckpointWrite<'a> {
        let (runner, turn) = (self.runner, self.turn);
        Box::pin(async move {
            if let Err(e) = runner
                .write(&turn.user, &turn.chat, &stored, turn.fence)
                .await
            {
                tracing::warn!(chat_id = %turn.chat, message_id = %turn.assistant_id, error = %e,
                    "checkpoint failed; the turn continues");
            }
        })
    }

    /// Moves the writes along; `Ready` once none is in flight or pending.
    fn poll_writes(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(w) = self.inflight.as_mut() else {
                return Poll::Ready(());
            };
            if w.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.inflight = self.pending.take().map(|m| self.write(m));
        }
    }

    /// Awaits `fut` while moving the checkpoint writes along; `None` (and
    /// `fut` dropped) once the turn is cancelled.
    async fn until_cancelled<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let mut fut = pin!(fut);
        std::future::poll_fn(|cx| {
            if self.cancel.poll_cancelled(cx) {
                return Poll::Ready(None);
            }
            // Writes first: a model that is always ready must not starve them.
            let _ = self.poll_writes(cx);
            fut.as_mut().poll(cx).map(Some)
        })
        .await
    }

    /// Waits for the write in flight; the pending one is left to the final write.
    async fn finish(&mut self) {
        self.pending = None;
        if let Some(w) = self.inflight.take() {
            w.await;
        }
    }
}

impl TurnRunner {
    /// A runner over `store` and `model` with no tools.
    pub fn new(
        store: Arc<dyn MessageStore>,
        model: Arc<dyn ModelProvider>,
        config: TurnConfig,
    ) -> Self {
        Self {
            store,
            model,
            config: Arc::new(config),
        }
    }

    /// Adds the tools the model may call.
    #[must_use]
    pub fn with_tools(mut self, tools: ToolSet) -> Self {
        Arc::make_mut(&mut self.config).tools = tools;
        self
    }

    /// The same runner over another store (the runtime's caching wrapper).
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn with_store(mut self, store: Arc<dyn MessageStore>) -> Self {
        self.store = store;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn MessageStore> {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &TurnConfig {
        &self.config
    }

    /// Validates the request, stores the user message (before any model call),
    /// sets the title once, and returns the turn to run. `chat` must come from
    /// `store.get_chat(user, ..)` (the ownership check). Nothing is changed on error.
    pub async fn prepare(
        &self,
        user: &UserId,
        chat: &Chat,
        request: SendRequest,
    ) -> Result<PreparedTurn, Error> {
        self.prepare_fenced(user, chat, request, None).await
    }

    /// [`prepare`](Self::prepare) for a turn whose writes carry the fencing
    /// token `fence` (see [`MessageStore::upsert_message_fenced`]).
    pub async fn prepare_fenced(
        &self,
        user: &UserId,
        chat: &Chat,
        request: SendRequest,
        fence: Option<u64>,
    ) -> Result<PreparedTurn, Error> {
        let now = crate::now_ms();
        // Shared with the history cache: the conversation copies no message.
        let mut history = self.store.load_history(user, &chat.id).await?;
        let assistant_id;

        match request.trigger {
            Trigger::SubmitMessage => {
                let Some(mut msg) = request.message else {
                    return Err(ValidationError::new("message", "is required").into());
                };
                self.config.limits.check_user_message(&msg)?;
                let existing = history
                    .position(&msg.id)
                    .and_then(|i| Some((i, history.get(i)?.clone())));
                let created_at = existing.as_ref().map_or(now, |(_, m)| m.created_at);
                msg.metadata = Some(MessageMetadata {
                    created_at: Some(created_at),
                    ..MessageMetadata::default()
                });
                if let Some((i, found)) = existing {
                    // A retried request: keep the message where it is and replace the
                    // answer that followed it (if any) instead of adding another.
                    if found.message.role != Role::User {
                        return Err(ValidationError::new(
                            "message.id",
                            "is already used by a non-user message",
                        )
                        .into());
                    }
                    assistant_id = history
                        .get(i + 1)
                        .filter(|m| m.message.role == Role::Assistant)
                        .map_or_else(MessageId::new, |m| m.message.id.clone());
                    history.truncate(i);
                } else {
                    assistant_id = MessageId::new();
                }
                let stored = StoredMessage {
                    message: msg,
                    created_at,
                    updated_at: now,
                    status: MessageStatus::Complete,
                };
                self.write(user, &chat.id, &stored, fence).await?;
                history.push(Arc::new(stored));
            }
            Trigger::RegenerateMessage => {
                let target = match &request.message_id {
                    Some(id) => {
                        let i = history.position(id).ok_or_else(|| {
                            ValidationError::new("messageId", "no such message in this chat")
                        })?;
                        if history.get(i).map(|m| m.message.role) != Some(Role::Assistant) {
                            return Err(ValidationError::new(
                                "messageId",
                                "must name an assistant message",
                            )
                            .into());
                        }
                        Some(i)
                    }
                    None => history
                        .iter()
                        .rposition(|m| m.message.role == Role::Assistant)
                        .filter(|&i| i + 1 == history.len()),
                };
                let upto = target.unwrap_or(history.len());
                assistant_id = target
                    .and_then(|i| history.get(i))
                    .map_or_else(MessageId::new, |m| m.message.id.clone());
                history.truncate(upto);
                if !history.iter().any(|m| m.message.role == Role::User) {
                    return Err(ValidationError::new(
                        "trigger",
                        "there is no user message to answer",
                    )
                    .into());
                }
            }
        }

        if chat.title.is_none()
            && let Some(first) = history.iter().find(|m| m.message.role == Role::User)
            && let Some(title) = title_from_text(&first.message.text())
        {
            self.store
                .set_title_if_unset(user, &chat.id, &title)
                .await?;
        }

        Ok(PreparedTurn {
            user: user.clone(),
            chat: chat.id,
            assistant_id,
            conversation: Conversation::from_stored(history),
            created_at: now,
            fence,
        })
    }

    /// Runs a prepared turn to its end, emitting chunks to `sink`. Always
    /// finalizes: the assistant message is stored with a finish reason whether
    /// the model finished, `cancel` fired, the model failed, or a write failed.
    pub async fn run(
        &self,
        turn: PreparedTurn,
        sink: &mut dyn ChunkSink,
        cancel: &CancellationToken,
    ) -> TurnOutcome {
        let mut msg = UiMessage::new(turn.assistant_id.clone(), Role::Assistant, Vec::new());
        msg.metadata = Some(MessageMetadata {
            created_at: Some(turn.created_at),
            ..MessageMetadata::default()
        });
        sink.emit(&UiChunk::Start {
            message_id: Cow::Borrowed(turn.assistant_id.as_str()),
            message_metadata: msg.metadata.as_ref().map(Cow::Borrowed),
        });
        let mut draft = Draft {
            msg,
            open_text: None,
            open_reasoning: None,
            part_seq: 0,
            usage: None,
        };
        let mut checkpoints = Checkpoints::new(self, &turn, cancel);
        let end = self
            .steps(&turn, &mut draft, sink, cancel, &mut checkpoints)
            .await;
        checkpoints.finish().await;
        self.finalize(&turn, draft, end, sink).await
    }

    async fn steps(
        &self,
        turn: &PreparedTurn,
        draft: &mut Draft,
        sink: &mut dyn ChunkSink,
        cancel: &CancellationToken,
        checkpoints: &mut Checkpoints<'_>,
    ) -> End {
        let specs = self.config.tools.specs();
        let mut last_checkpoint = Instant::now()
            .checked_sub(self.config.first_checkpoint_head_start(&turn.assistant_id))
            .unwrap_or_else(Instant::now);
        let mut events_since_checkpoint = 0u32;
        for step in 0..self.config.max_steps {
            sink.emit(&UiChunk::StartStep);
            draft.msg.parts.push(Part::StepStart);
            let messages = if step == 0 {
                turn.conversation.clone()
            } else {
                turn.conversation.with_message(draft.msg.clone())
            };
            let request = ModelRequest {
                system: self.config.system_prompt.clone(),
                messages,
                tools: specs.clone(),
                step,
            };
            let mut stream: ModelStream = match checkpoints
                .until_cancelled(self.model.stream(request))
                .await
            {
                None => return End::Aborted,
                Some(Err(e)) => return End::Failed(e),
                Some(Ok(s)) => s,
            };
            let mut step_reason = None;
            let mut calls: Vec<(String, String, Value)> = Vec::new();
            loop {
                let Some(next) = checkpoints.until_cancelled(stream.next()).await else {
                    return End::Aborted;
                };
                let event = match next {
                    None => {
                        return End::Failed(ModelError::Interrupted(
                            "stream ended without a finish event".into(),
                        ));
                    }
                    Some(Err(e)) => return End::Failed(e),
                    Some(Ok(e)) => e,
                };
                match event {
                    ModelEvent::TextDelta(delta) => draft.append(false, &delta, sink),
                    ModelEvent::ReasoningDelta(delta) => draft.append(true, &delta, sink),
                    ModelEvent::ToolInputStart { id, name } => {
                        draft.close_all(sink);
                        sink.emit(&UiChunk::ToolInputStart {
                            tool_call_id: Cow::Borrowed(&id),
                            tool_name: Cow::Borrowed(&name),
                        });
                        draft.msg.parts.push(Part::Tool(ToolPart {
                            tool_name: name,
                            dynamic: false,
                            tool_call_id: id,
                            state: ToolState::InputStreaming,
                            input: None,
                            output: None,
                            error_text: None,
                            provider_executed: None,
                        }));
                    }
                    ModelEvent::ToolInputDelta { id, delta } => {
                        if draft.tool_mut(&id).is_some() {
                            sink.emit(&UiChunk::ToolInputDelta {
                                tool_call_id: Cow::Borrowed(&id),
                                input_text_delta: Cow::Borrowed(&delta),
                            });
                        }
                    }
                    ModelEvent::ToolCall { id, name, input } => {
                        draft.close_all(sink);
                        if draft.tool_mut(&id).is_none() {
                            sink.emit(&UiChunk::ToolInputStart {
                                tool_call_id: Cow::Borrowed(&id),
                                tool_name: Cow::Borrowed(&name),
                            });
                            draft.msg.parts.push(Part::Tool(ToolPart {
                                tool_name: name.clone(),
                                dynamic: false,
                                tool_call_id: id.clone(),
                                state: ToolState::InputStreaming,
                                input: None,
                                output: None,
                                error_text: None,
                                provider_executed: None,
                            }));
                        }
                        if let Some(t) = draft.tool_mut(&id) {
                            t.state = ToolState::InputAvailable;
                            t.input = Some(input.clone());
                        }
                        sink.emit(&UiChunk::ToolInputAvailable {
                            tool_call_id: Cow::Borrowed(&id),
                            tool_name: Cow::Borrowed(&name),
                            input: Cow::Borrowed(&input),
                        });
                        calls.push((id, name, input));
                    }
                    ModelEvent::Finish { reason, usage } => {
                        if calls.is_empty() {
                            // The turn's last step: its final chunk comes
                            // right after the answer's write.
                            draft.close_all(&mut Held(sink));
                        } else {
                            draft.close_all(sink);
                        }
                        if let Some(u) = usage {
                            draft.usage.get_or_insert_with(Usage::default).add(&u);
                        }
                        step_reason = Some(reason);
                    }
                }
                if step_reason.is_some() {
                    break;
                }
                events_since_checkpoint += 1;
                if self
                    .config
                    .checkpoint_due(last_checkpoint.elapsed(), events_since_checkpoint)
                {
                    checkpoints.save(draft.snapshot());
                    last_checkpoint = Instant::now();
                    events_since_checkpoint = 0;
                }
            }
            drop(stream);

            // Run the step's tool calls, then continue with the next step.
            for (id, name, input) in &calls {
                let result = match self.config.tools.get(name) {
                    None => Err(format!("Unknown tool `{name}`")),
                    Some(tool) => {
                        let ctx = ToolContext {
                            user: turn.user.clone(),
                            chat: turn.chat,
                            tool_call_id: id.clone(),
                        };
                        match checkpoints
                            .until_cancelled(tool.call(ctx, input.clone()))
                            .await
                        {
                            None => return End::Aborted,
                            Some(r) => r.map_err(|e| e.0),
                        }
                    }
                };
                let part = draft.tool_mut(id);
                match result {
                    Ok(output) => {
                        sink.emit(&UiChunk::ToolOutputAvailable {
                            tool_call_id: Cow::Borrowed(id),
                            output: Cow::Borrowed(&output),
                        });
                        if let Some(t) = part {
                            t.state = ToolState::OutputAvailable;
                            t.output = Some(output);
                        }
                    }
                    Err(text) => {
                        sink.emit(&UiChunk::ToolOutputError {
                            tool_call_id: Cow::Borrowed(id),
                            error_text: Cow::Borrowed(&text),
                        });
                        if let Some(t) = part {
                            t.state = ToolState::OutputError;
                            t.error_text = Some(text);
                        }
                    }
                }
            }
            let reason = step_reason.unwrap_or(FinishReason::Other);
            if calls.is_empty() {
                sink.emit_held(&UiChunk::FinishStep);
                return End::Finished(reason);
            }
            sink.emit(&UiChunk::FinishStep);
            if cancel.is_cancelled() {
                return End::Aborted;
            }
        }
        End::Finished(FinishReason::ToolCalls)
    }

    async fn finalize(
        &self,
        turn: &PreparedTurn,
        mut draft: Draft,
        end: End,
        sink: &mut dyn ChunkSink,
    ) -> TurnOutcome {
        draft.close_all(sink);
        let reason = match &end {
            End::Finished(r) => *r,
            End::Aborted => FinishReason::Abort,
            End::Failed(_) => FinishReason::Error,
        };
        match &end {
            End::Aborted => draft.fail_unfinished_tools(sink, "Stopped before the tool ran."),
            End::Failed(_) => {
                draft.fail_unfinished_tools(sink, "The turn failed before the tool ran.");
            }
            End::Finished(_) => {}
        }
        if let End::Failed(e) = &end {
            tracing::error!(chat_id = %turn.chat, message_id = %turn.assistant_id,
                model = self.model.name(), error = %e, "model failed during the turn");
        }
        let usage = draft.usage;
        let meta = draft.msg.metadata_mut();
        meta.finish_reason = Some(reason);
        meta.usage = usage;
        let msg = draft.msg;
        let stored = self.store_final(turn, &msg).await;

        match end {
            End::Finished(r) => {
                if stored {
                    sink.emit(&UiChunk::Finish {
                        finish_reason: Some(r),
                        message_metadata: msg.metadata.as_ref().map(Cow::Borrowed),
                    });
                } else {
                    sink.emit(&UiChunk::Error {
                        error_text: STORE_ERROR_TEXT.into(),
                    });
                }
            }
            End::Aborted => sink.emit(&UiChunk::Abort),
            End::Failed(_) => sink.emit(&UiChunk::Error {
                error_text: MODEL_ERROR_TEXT.into(),
            }),
        }
        TurnOutcome {
            message: msg,
            reason,
            stored,
        }
    }

    async fn write(
        &self,
        user: &UserId,
        chat: &ChatId,
        message: &StoredMessage,
        fence: Option<u64>,
    ) -> Result<(), StoreError> {
        match fence {
            Some(f) => {
                self.store
                    .upsert_message_fenced(user, chat, message, f)
                    .await
            }
            None => self.store.upsert_message(user, chat, message).await,
        }
    }

    /// Writes the final message, retrying retryable store errors with backoff.
    async fn store_final(&self, turn: &PreparedTurn, msg: &UiMessage) -> bool {
        let mut backoff = self.config.finalize_backoff;
        let mut attempt = 0;
        loop {
            let stored = StoredMessage {
                message: msg.clone(),
                created_at: turn.created_at,
                updated_at: crate::now_ms(),
                status: MessageStatus::Complete,
            };
            match self
                .write(&turn.user, &turn.chat, &stored, turn.fence)
                .await
            {
                Ok(()) => return true,
                Err(e) if e.is_retryable() && attempt < self.config.finalize_retries => {
                    attempt += 1;
                    tracing::warn!(chat_id = %turn.chat, message_id = %turn.assistant_id,
                        attempt, error = %e, "final write failed; retrying");
                    crate::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                }
                Err(e) => {
                    log_lost(turn, &e, attempt);
                    return false;
                }
            }
        }
    }
}

fn log_lost(turn: &PreparedTurn, e: &StoreError, attempts: u32) {
    tracing::error!(chat_id = %turn.chat, message_id = %turn.assistant_id, attempts, error = %e,
        "final write of the assistant message failed; the last checkpoint is all that is kept");
}

/// A sink that encodes chunks as SSE frames into a [`TurnBuffer`](crate::TurnBuffer).
#[derive(Debug)]
pub struct BufferSink {
    buffer: Arc<crate::TurnBuffer>,
}

impl BufferSink {
    /// A sink writing to `buffer`.
    pub fn new(buffer: Arc<crate::TurnBuffer>) -> Self {
        Self { buffer }
    }
}

impl ChunkSink for BufferSink {
    fn emit(&mut self, chunk: &UiChunk<'_>) {
        self.buffer.push_chunk(chunk);
    }

    fn emit_held(&mut self, chunk: &UiChunk<'_>) {
        self.buffer.push_chunk_held(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn first_checkpoints_of_turns_started_together_spread_over_half_an_interval() {
        let config = TurnConfig::default();
        let half = config.checkpoint_interval / 2;
        let starts: Vec<Duration> = (0..200)
            .map(|_| config.first_checkpoint_head_start(&MessageId::new()))
            .collect();
        assert!(starts.iter().all(|s| *s < half), "never more than half");
        assert!(starts.iter().any(|s| *s < half / 4), "some early");
        assert!(starts.iter().any(|s| *s > half * 3 / 4), "some late");
        let id = MessageId::new();
        assert_eq!(
            config.first_checkpoint_head_start(&id),
            config.first_checkpoint_head_start(&id),
            "the same turn, the same head start"
        );
    }

    #[test]
    fn a_checkpoint_is_due_by_time_once_enough_events_arrived() {
        let c = TurnConfig::default();
        assert!(!c.checkpoint_due(499 * MS, 100), "before the interval");
        assert!(c.checkpoint_due(500 * MS, 16));
        assert!(!c.checkpoint_due(500 * MS, 15), "too few events");
        assert!(!c.checkpoint_due(1999 * MS, 15));
        assert!(
            c.checkpoint_due(2000 * MS, 1),
            "the max interval caps the wait"
        );
    }

    #[test]
    fn the_event_floor_can_be_turned_off_and_events_alone_can_trigger() {
        let by_time = TurnConfig {
            checkpoint_min_events: 0,
            ..TurnConfig::default()
        };
        assert!(by_time.checkpoint_due(500 * MS, 1));
        assert!(!by_time.checkpoint_due(499 * MS, 1000));
        let by_events = TurnConfig {
            checkpoint_every_events: 3,
            ..TurnConfig::default()
        };
        assert!(by_events.checkpoint_due(Duration::ZERO, 3));
        assert!(!by_events.checkpoint_due(Duration::ZERO, 2));
    }

    #[test]
    fn a_max_interval_below_the_interval_does_not_shorten_it() {
        let c = TurnConfig {
            checkpoint_interval: Duration::from_secs(5),
            ..TurnConfig::default()
        };
        assert!(!c.checkpoint_due(Duration::from_secs(3), 1));
        assert!(c.checkpoint_due(Duration::from_secs(5), 1));
    }
}
