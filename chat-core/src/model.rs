//! The model seam: a provider turns a conversation into a stream of events.

use async_trait::async_trait;
use serde_json::Value;

use crate::BoxStream;
use crate::error::ModelError;
use crate::message::{FinishReason, UiMessage, Usage};
use crate::tool::ToolSpec;

/// What one model step is asked to do.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    /// System prompt, if any.
    pub system: Option<String>,
    /// The conversation, oldest first. The last message may be the assistant
    /// message of the running turn holding earlier steps' tool calls and
    /// results. Shared (a step's request does not copy the history).
    pub messages: std::sync::Arc<[UiMessage]>,
    /// Tools the model may call.
    pub tools: Vec<ToolSpec>,
    /// Zero-based index of this step within the turn.
    pub step: u32,
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
