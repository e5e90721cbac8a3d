//! The AI SDK UI message stream chunks (`UIMessageChunk`), limited to the types
//! and fields that `ai` 5.x, 6.x and 7.x all accept.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::message::{FinishReason, MessageMetadata};

/// One chunk of the UI message stream. Borrowed fields keep encoding allocation-free.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum UiChunk<'a> {
    /// The assistant message starts; `message_id` is the id it is stored under.
    Start {
        /// Id of the assistant message.
        message_id: Cow<'a, str>,
        /// Metadata known at the start (createdAt).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_metadata: Option<Cow<'a, MessageMetadata>>,
    },
    /// A model step starts.
    StartStep,
    /// A text part starts.
    TextStart {
        /// Part id, unique within the message.
        id: Cow<'a, str>,
    },
    /// A piece of text.
    TextDelta {
        /// Part id.
        id: Cow<'a, str>,
        /// The text to append.
        delta: Cow<'a, str>,
    },
    /// The text part is complete.
    TextEnd {
        /// Part id.
        id: Cow<'a, str>,
    },
    /// A reasoning part starts.
    ReasoningStart {
        /// Part id.
        id: Cow<'a, str>,
    },
    /// A piece of reasoning.
    ReasoningDelta {
        /// Part id.
        id: Cow<'a, str>,
        /// The text to append.
        delta: Cow<'a, str>,
    },
    /// The reasoning part is complete.
    ReasoningEnd {
        /// Part id.
        id: Cow<'a, str>,
    },
    /// The model starts writing a tool call.
    ToolInputStart {
        /// The call's id.
        tool_call_id: Cow<'a, str>,
        /// The tool's name.
        tool_name: Cow<'a, str>,
    },
    /// A piece of the tool call's JSON input.
    ToolInputDelta {
        /// The call's id.
        tool_call_id: Cow<'a, str>,
        /// Raw JSON text to append.
        input_text_delta: Cow<'a, str>,
    },
    /// The tool call's input is complete.
    ToolInputAvailable {
        /// The call's id.
        tool_call_id: Cow<'a, str>,
        /// The tool's name.
        tool_name: Cow<'a, str>,
        /// The parsed input.
        input: Cow<'a, Value>,
    },
    /// The tool answered.
    ToolOutputAvailable {
        /// The call's id.
        tool_call_id: Cow<'a, str>,
        /// The tool's output.
        output: Cow<'a, Value>,
    },
    /// The tool failed.
    ToolOutputError {
        /// The call's id.
        tool_call_id: Cow<'a, str>,
        /// What went wrong (shown to the user).
        error_text: Cow<'a, str>,
    },
    /// A model step ended.
    FinishStep,
    /// The message is complete.
    Finish {
        /// Why it ended (never `abort`: a stop is an `abort` chunk).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finish_reason: Option<FinishReason>,
        /// Final metadata (finish reason, usage).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_metadata: Option<Cow<'a, MessageMetadata>>,
    },
    /// The generation failed; the stream ends after this chunk.
    Error {
        /// A message safe to show (no internals).
        error_text: Cow<'a, str>,
    },
    /// The generation was stopped by the user.
    Abort,
}

impl UiChunk<'_> {
    /// The chunk's `type` on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            UiChunk::Start { .. } => "start",
            UiChunk::StartStep => "start-step",
            UiChunk::TextStart { .. } => "text-start",
            UiChunk::TextDelta { .. } => "text-delta",
            UiChunk::TextEnd { .. } => "text-end",
            UiChunk::ReasoningStart { .. } => "reasoning-start",
            UiChunk::ReasoningDelta { .. } => "reasoning-delta",
            UiChunk::ReasoningEnd { .. } => "reasoning-end",
            UiChunk::ToolInputStart { .. } => "tool-input-start",
            UiChunk::ToolInputDelta { .. } => "tool-input-delta",
            UiChunk::ToolInputAvailable { .. } => "tool-input-available",
            UiChunk::ToolOutputAvailable { .. } => "tool-output-available",
            UiChunk::ToolOutputError { .. } => "tool-output-error",
            UiChunk::FinishStep => "finish-step",
            UiChunk::Finish { .. } => "finish",
            UiChunk::Error { .. } => "error",
            UiChunk::Abort => "abort",
        }
    }

    /// A copy that owns all its data.
    pub fn into_owned(self) -> UiChunk<'static> {
        fn o(c: Cow<'_, str>) -> Cow<'static, str> {
            Cow::Owned(c.into_owned())
        }
        fn v(c: Cow<'_, Value>) -> Cow<'static, Value> {
            Cow::Owned(c.into_owned())
        }
        fn m(c: Option<Cow<'_, MessageMetadata>>) -> Option<Cow<'static, MessageMetadata>> {
            c.map(|c| Cow::Owned(c.into_owned()))
        }
        match self {
            UiChunk::Start {
                message_id,
                message_metadata,
            } => UiChunk::Start {
                message_id: o(message_id),
                message_metadata: m(message_metadata),
            },
            UiChunk::StartStep => UiChunk::StartStep,
            UiChunk::TextStart { id } => UiChunk::TextStart { id: o(id) },
            UiChunk::TextDelta { id, delta } => UiChunk::TextDelta {
                id: o(id),
                delta: o(delta),
            },
            UiChunk::TextEnd { id } => UiChunk::TextEnd { id: o(id) },
            UiChunk::ReasoningStart { id } => UiChunk::ReasoningStart { id: o(id) },
            UiChunk::ReasoningDelta { id, delta } => UiChunk::ReasoningDelta {
                id: o(id),
                delta: o(delta),
            },
            UiChunk::ReasoningEnd { id } => UiChunk::ReasoningEnd { id: o(id) },
            UiChunk::ToolInputStart {
                tool_call_id,
                tool_name,
            } => UiChunk::ToolInputStart {
                tool_call_id: o(tool_call_id),
                tool_name: o(tool_name),
            },
            UiChunk::ToolInputDelta {
                tool_call_id,
                input_text_delta,
            } => UiChunk::ToolInputDelta {
                tool_call_id: o(tool_call_id),
                input_text_delta: o(input_text_delta),
            },
            UiChunk::ToolInputAvailable {
                tool_call_id,
                tool_name,
                input,
            } => UiChunk::ToolInputAvailable {
                tool_call_id: o(tool_call_id),
                tool_name: o(tool_name),
                input: v(input),
            },
            UiChunk::ToolOutputAvailable {
                tool_call_id,
                output,
            } => UiChunk::ToolOutputAvailable {
                tool_call_id: o(tool_call_id),
                output: v(output),
            },
            UiChunk::ToolOutputError {
                tool_call_id,
                error_text,
            } => UiChunk::ToolOutputError {
                tool_call_id: o(tool_call_id),
                error_text: o(error_text),
            },
            UiChunk::FinishStep => UiChunk::FinishStep,
            UiChunk::Finish {
                finish_reason,
                message_metadata,
            } => UiChunk::Finish {
                finish_reason,
                message_metadata: m(message_metadata),
            },
            UiChunk::Error { error_text } => UiChunk::Error {
                error_text: o(error_text),
            },
            UiChunk::Abort => UiChunk::Abort,
        }
    }
}
