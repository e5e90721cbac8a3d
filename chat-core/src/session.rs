//! The live side of chats: run a turn, follow it, stop it.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

use crate::BoxStream;
use crate::buffer::Follower;
use crate::error::Error;
use crate::ids::{ChatId, MessageId, UserId};
use crate::message::UiMessage;

/// What started a turn (the AI SDK's `trigger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trigger {
    /// A new user message (`submit-message`).
    #[default]
    SubmitMessage,
    /// Regenerate the last assistant message (`regenerate-message`).
    RegenerateMessage,
}

impl Trigger {
    /// Parses the AI SDK's wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "submit-message" | "submit-user-message" => Some(Trigger::SubmitMessage),
            "regenerate-message" | "regenerate-assistant-message" => {
                Some(Trigger::RegenerateMessage)
            }
            _ => None,
        }
    }
}

/// A request to run a turn.
#[derive(Debug, Clone)]
pub struct SendRequest {
    /// The new user message (required for `SubmitMessage`; optional for
    /// `RegenerateMessage`, where it may repeat the last user message).
    pub message: Option<UiMessage>,
    /// What started the turn.
    pub trigger: Trigger,
    /// For `RegenerateMessage`: the assistant message to replace (else the last one).
    pub message_id: Option<MessageId>,
}

impl SendRequest {
    /// A `SubmitMessage` request for `message`.
    pub fn submit(message: UiMessage) -> Self {
        Self {
            message: Some(message),
            trigger: Trigger::SubmitMessage,
            message_id: None,
        }
    }

    /// A `RegenerateMessage` request.
    pub fn regenerate(message_id: Option<MessageId>) -> Self {
        Self {
            message: None,
            trigger: Trigger::RegenerateMessage,
            message_id,
        }
    }
}

/// A running turn's UI message stream: SSE frames (`data: ...\n\n`), ending
/// with `data: [DONE]\n\n`. Dropping it does not stop the turn.
pub struct TurnStream {
    /// The id the assistant message is stored under.
    pub message_id: MessageId,
    /// The frames, from the turn's start (replay) then live.
    pub frames: TurnFrames,
}

/// A turn's SSE frames, one item each: read straight from the turn's
/// [`TurnBuffer`](crate::TurnBuffer) when it runs in this process, or from
/// any stream of frames (a turn running elsewhere).
///
/// A stream over a buffer is held inline, not boxed: the response body
/// reaches the buffer without another allocation to touch per token.
pub struct TurnFrames(Source);

enum Source {
    Buffer(Follower),
    Stream(BoxStream<'static, Bytes>),
}

impl TurnFrames {
    /// Frames from any stream of them.
    pub fn from_stream(frames: BoxStream<'static, Bytes>) -> Self {
        Self(Source::Stream(frames))
    }

    pub(crate) fn from_follower(follower: Follower) -> Self {
        Self(Source::Buffer(follower))
    }
}

impl Stream for TurnFrames {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        match &mut self.0 {
            Source::Buffer(f) => Pin::new(f).poll_next(cx),
            Source::Stream(s) => s.as_mut().poll_next(cx),
        }
    }
}

impl std::fmt::Debug for TurnFrames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match self.0 {
            Source::Buffer(_) => "buffer",
            Source::Stream(_) => "stream",
        };
        f.debug_tuple("TurnFrames").field(&source).finish()
    }
}

impl std::fmt::Debug for TurnStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnStream")
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

/// Live chats: start a turn, follow it from any point, stop it, and list the
/// settled history. Each method checks that `user` owns `chat` first and
/// answers [`Error::NotFound`] otherwise.
#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
pub trait ChatSession: crate::MaybeSendSync + 'static {
    /// Stores the user message, starts the turn in the background and returns its stream.
    /// A turn already running for this chat is [`Error::Busy`].
    async fn send(
        &self,
        user: &UserId,
        chat: &ChatId,
        request: SendRequest,
    ) -> Result<TurnStream, Error>;

    /// The running turn's stream from its first chunk, then live; `None` when idle.
    async fn resume(&self, user: &UserId, chat: &ChatId) -> Result<Option<TurnStream>, Error>;

    /// Stops the running turn (what was produced is kept); returns whether one ran.
    async fn stop(&self, user: &UserId, chat: &ChatId) -> Result<bool, Error>;

    /// The settled history, oldest first: the running turn's assistant message
    /// is left out; a checkpoint left by a crash is finalized with finish reason
    /// `error` and listed.
    async fn history(&self, user: &UserId, chat: &ChatId) -> Result<Vec<UiMessage>, Error>;

    /// Stops any running turn, then deletes the chat and its messages.
    async fn delete(&self, user: &UserId, chat: &ChatId) -> Result<(), Error>;
}
