//! The model seam: a provider turns a conversation into a stream of events.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::BoxStream;
use crate::error::ModelError;
use crate::history::History;
use crate::message::{FinishReason, UiMessage, Usage};
use crate::store::{MessageStatus, StoredMessage};
use crate::tool::ToolSpec;

/// What one model step is asked to do.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    /// System prompt, if any.
    pub system: Option<String>,
    /// The conversation, oldest first. The last message may be the assistant
    /// message of the running turn holding earlier steps' tool calls and
    /// results.
    pub messages: Conversation,
    /// Tools the model may call.
    pub tools: Vec<ToolSpec>,
    /// Zero-based index of this step within the turn.
    pub step: u32,
}

/// A conversation, oldest first, shared without copying: cloning it, or
/// handing a turn's history from the history cache to each step's request,
/// copies pointers, not messages.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    messages: History,
}

impl Conversation {
    /// A conversation over already shared stored messages.
    pub fn from_stored(messages: impl Into<History>) -> Self {
        Self {
            messages: messages.into(),
        }
    }

    /// The messages, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &UiMessage> + ExactSizeIterator {
        self.messages.messages()
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether there are no messages.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The newest message.
    pub fn last(&self) -> Option<&UiMessage> {
        self.messages.last().map(|m| &m.message)
    }

    /// This conversation plus `message` at the end (the shared ones are not copied).
    #[must_use]
    pub fn with_message(&self, message: UiMessage) -> Self {
        let mut all = self.messages.clone();
        all.push(Arc::new(unstored(message)));
        Self::from_stored(all)
    }
}

fn unstored(message: UiMessage) -> StoredMessage {
    StoredMessage {
        message,
        created_at: 0,
        updated_at: 0,
        status: MessageStatus::Complete,
    }
}

impl From<Vec<UiMessage>> for Conversation {
    fn from(messages: Vec<UiMessage>) -> Self {
        messages.into_iter().collect()
    }
}

impl FromIterator<UiMessage> for Conversation {
    fn from_iter<I: IntoIterator<Item = UiMessage>>(iter: I) -> Self {
        Self::from_stored(iter.into_iter().map(unstored).collect::<History>())
    }
}

impl PartialEq for Conversation {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

/// One event of a model step.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelEvent {
    /// A piece of visible text.
    TextDelta(String),
    /// A piece of reasoning text.
    ReasoningDelta(String),
    /// The model started a tool call.
    ToolInputStart {
        /// The call's id.
        id: String,
        /// The tool's name.
        name: String,
    },
    /// A piece of a tool call's raw JSON input.
    ToolInputDelta {
        /// The call's id.
        id: String,
        /// Raw JSON text.
        delta: String,
    },
    /// A complete tool call. Emitted once per call, after its deltas (if any).
    ToolCall {
        /// The call's id.
        id: String,
        /// The tool's name.
        name: String,
        /// The parsed input.
        input: Value,
    },
    /// The step ended. Every successful stream ends with exactly one.
    Finish {
        /// Why.
        reason: FinishReason,
        /// Token usage of the step, if reported.
        usage: Option<Usage>,
    },
}

/// The events of one model step.
pub type ModelStream = BoxStream<'static, Result<ModelEvent, ModelError>>;

/// A language model. Implementations translate; all turn logic lives in chat-core.
#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
pub trait ModelProvider: crate::MaybeSendSync + 'static {
    /// Starts one step. Errors before the first event (connect, 4xx, 5xx) are
    /// returned here; errors after it arrive in the stream. Dropping the stream
    /// must cancel the upstream request.
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ModelError>;

    /// A short name for logs (e.g. `openai:gpt-4o`).
    fn name(&self) -> &str;
}
