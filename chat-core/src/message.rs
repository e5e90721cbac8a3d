//! Messages in the AI SDK's `UIMessage` JSON shape (`ai` 5.x and later).

use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::ids::MessageId;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the model.
    System,
    /// The person chatting.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The wire name (`user`, `assistant`, `system`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

/// Why a generation ended. Serialized with the AI SDK's names; `Abort` is
/// this library's own value for a stop by the user (it is stored in message
/// metadata but never sent as a `finishReason` chunk field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FinishReason {
    /// The model finished normally.
    Stop,
    /// The output token limit was reached.
    Length,
    /// The provider filtered the content.
    ContentFilter,
    /// The model asked for tools and the step limit ended the turn.
    ToolCalls,
    /// The generation failed (model or store error, or the server crashed).
    Error,
    /// Any other reason.
    Other,
    /// Stopped by the user.
    Abort,
}

impl FinishReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content-filter",
            FinishReason::ToolCalls => "tool-calls",
            FinishReason::Error => "error",
            FinishReason::Other => "other",
            FinishReason::Abort => "abort",
        }
    }
}

/// Token counts reported by the model (AI SDK `LanguageModelUsage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Prompt tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    /// Completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    /// Total tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
    /// Reasoning tokens, when the provider reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
}

impl Usage {
    /// Adds another step's usage to this one.
    pub fn add(&mut self, other: &Usage) {
        fn sum(a: &mut Option<u64>, b: Option<u64>) {
            if let Some(b) = b {
                *a = Some(a.unwrap_or(0) + b);
            }
        }
        sum(&mut self.input_tokens, other.input_tokens);
        sum(&mut self.output_tokens, other.output_tokens);
        sum(&mut self.total_tokens, other.total_tokens);
        sum(&mut self.reasoning_tokens, other.reasoning_tokens);
    }
}

/// What the server records about a message (`UIMessage.metadata`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageMetadata {
    /// When the message was created, Unix epoch milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<i64>,
    /// Why the generation ended (assistant messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// Token usage of the whole turn (assistant messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

impl MessageMetadata {
    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        self.created_at.is_none() && self.finish_reason.is_none() && self.usage.is_none()
    }
}

/// A chat message as the AI SDK's `useChat` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UiMessage {
    /// Unique id within the chat.
    pub id: MessageId,
    /// Author.
    pub role: Role,
    /// Content, in order.
    pub parts: Vec<Part>,
    /// Server-recorded metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MessageMetadata>,
}

impl UiMessage {
    /// A message with the given parts and no metadata.
    pub fn new(id: MessageId, role: Role, parts: Vec<Part>) -> Self {
        Self {
            id,
            role,
            parts,
            metadata: None,
        }
    }

    /// A user message holding one text part.
    pub fn user_text(id: MessageId, text: impl Into<String>) -> Self {
        Self::new(id, Role::User, vec![Part::text(text)])
    }

    /// The concatenated text of all text parts.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for p in &self.parts {
            if let Part::Text(t) = p {
                out.push_str(&t.text);
            }
        }
        out
    }

    /// The metadata, created if absent.
    pub fn metadata_mut(&mut self) -> &mut MessageMetadata {
        self.metadata.get_or_insert_with(MessageMetadata::default)
    }
}

/// Whether a text or reasoning part is still being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextState {
    /// Still receiving deltas.
    Streaming,
    /// Complete.
    Done,
}

/// A text or reasoning part.
#[derive(Debug, Clone, PartialEq)]
pub struct TextPart {
    /// The text.
    pub text: String,
    /// Streaming state, when known.
    pub state: Option<TextState>,
    /// Provider-specific data, kept verbatim.
    pub provider_metadata: Option<Value>,
    /// The stream's part id: the AI SDK keeps it on `reasoning` parts.
    pub id: Option<String>,
}

/// The lifecycle of a tool invocation (AI SDK 5 states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ToolState {
    /// The model is still streaming the input.
    InputStreaming,
    /// The input is complete; the tool has not answered yet.
    InputAvailable,
    /// The tool answered.
    OutputAvailable,
    /// The tool (or its input) failed.
    OutputError,
}

impl ToolState {
    fn as_str(self) -> &'static str {
        match self {
            ToolState::InputStreaming => "input-streaming",
            ToolState::InputAvailable => "input-available",
            ToolState::OutputAvailable => "output-available",
            ToolState::OutputError => "output-error",
        }
    }
}

/// A tool invocation (`tool-<name>` or `dynamic-tool` part).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPart {
    /// The tool's name.
    pub tool_name: String,
    /// Serialized as `dynamic-tool` (name in `toolName`) instead of `tool-<name>`.
    pub dynamic: bool,
    /// The model's id for this call.
    pub tool_call_id: String,
    /// Lifecycle state.
    pub state: ToolState,
    /// The call's input (JSON).
    pub input: Option<Value>,
    /// The tool's output (JSON), when `state` is `output-available`.
    pub output: Option<Value>,
    /// The error, when `state` is `output-error`.
    pub error_text: Option<String>,
    /// Whether the provider ran the tool itself.
    pub provider_executed: Option<bool>,
}

/// One piece of a message's content.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Visible text.
    Text(TextPart),
    /// Model reasoning.
    Reasoning(TextPart),
    /// Marks the start of a model step.
    StepStart,
    /// A tool invocation.
    Tool(ToolPart),
    /// A cited URL (`source-url`).
    SourceUrl {
        /// Source id.
        source_id: String,
        /// The URL.
        url: String,
        /// Optional title.
        title: Option<String>,
    },
    /// A file (`file`), by URL or data URL.
    File {
        /// IANA media type.
        media_type: String,
        /// Original file name.
        filename: Option<String>,
        /// URL or data URL.
        url: String,
    },
    /// Any other part type (`data-*`, `source-document`, future types), kept verbatim.
    Other(Map<String, Value>),
}

impl Part {
    /// A complete text part.
    pub fn text(text: impl Into<String>) -> Self {
        Part::Text(TextPart {
            text: text.into(),
            state: None,
            provider_metadata: None,
            id: None,
        })
    }

    /// The `type` this part serializes with.
    pub fn type_name(&self) -> std::borrow::Cow<'_, str> {
        use std::borrow::Cow;
        match self {
            Part::Text(_) => Cow::Borrowed("text"),
            Part::Reasoning(_) => Cow::Borrowed("reasoning"),
            Part::StepStart => Cow::Borrowed("step-start"),
            Part::Tool(t) if t.dynamic => Cow::Borrowed("dynamic-tool"),
            Part::Tool(t) => Cow::Owned(format!("tool-{}", t.tool_name)),
            Part::SourceUrl { .. } => Cow::Borrowed("source-url"),
            Part::File { .. } => Cow::Borrowed("file"),
            Part::Other(m) => Cow::Owned(
                m.get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_owned(),
            ),
        }
    }
}

impl Serialize for Part {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Part::Text(t) | Part::Reasoning(t) => {
                let mut m = s.serialize_map(None)?;
                m.serialize_entry(
                    "type",
                    if matches!(self, Part::Text(_)) {
                        "text"
                    } else {
                        "reasoning"
                    },
                )?;
                if let Some(id) = &t.id {
                    m.serialize_entry("id", id)?;
                }
                m.serialize_entry("text", &t.text)?;
                if let Some(st) = t.state {
                    m.serialize_entry("state", &st)?;
                }
                if let Some(pm) = &t.provider_metadata {
                    m.serialize_entry("providerMetadata", pm)?;
                }
                m.end()
            }
            Part::StepStart => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("type", "step-start")?;
                m.end()
            }
            Part::Tool(t) => {
                let mut m = s.serialize_map(None)?;
                if t.dynamic {
                    m.serialize_entry("type", "dynamic-tool")?;
                    m.serialize_entry("toolName", &t.tool_name)?;
                } else {
                    m.serialize_entry("type", &format_args!("tool-{}", t.tool_name))?;
                }
                m.serialize_entry("toolCallId", &t.tool_call_id)?;
                m.serialize_entry("state", t.state.as_str())?;
                if let Some(v) = &t.input {
                    m.serialize_entry("input", v)?;
                }
                if let Some(v) = &t.output {
                    m.serialize_entry("output", v)?;
                }
                if let Some(v) = &t.error_text {
                    m.serialize_entry("errorText", v)?;
                }
                if let Some(v) = t.provider_executed {
                    m.serialize_entry("providerExecuted", &v)?;
                }
                m.end()
            }
            Part::SourceUrl {
                source_id,
                url,
                title,
            } => {
                let mut m = s.serialize_map(None)?;
                m.serialize_entry("type", "source-url")?;
                m.serialize_entry("sourceId", source_id)?;
                m.serialize_entry("url", url)?;
                if let Some(t) = title {
                    m.serialize_entry("title", t)?;
                }
                m.end()
            }
            Part::File {
                media_type,
                filename,
                url,
            } => {
                let mut m = s.serialize_map(None)?;
                m.serialize_entry("type", "file")?;
                m.serialize_entry("mediaType", media_type)?;
                if let Some(f) = filename {
                    m.serialize_entry("filename", f)?;
                }
                m.serialize_entry("url", url)?;
                m.end()
            }
            Part::Other(map) => map.serialize(s),
        }
    }
}

fn take_str<E: serde::de::Error>(m: &mut Map<String, Value>, key: &str) -> Result<String, E> {
    match m.remove(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(E::custom(format_args!(
            "part field `{key}` must be a string"
        ))),
        None => Err(E::custom(format_args!("part is missing `{key}`"))),
    }
}

fn take_opt_str<E: serde::de::Error>(
    m: &mut Map<String, Value>,
    key: &str,
) -> Result<Option<String>, E> {
    match m.remove(key) {
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Null) | None => Ok(None),
        Some(_) => Err(E::custom(format_args!(
            "part field `{key}` must be a string"
        ))),
    }
}

fn text_part<E: serde::de::Error>(m: &mut Map<String, Value>) -> Result<TextPart, E> {
    let text = take_str(m, "text")?;
    let state = match m.remove("state") {
        None | Some(Value::Null) => None,
        Some(v) => Some(serde_json::from_value(v).map_err(E::custom)?),
    };
    Ok(TextPart {
        text,
        state,
        provider_metadata: m.remove("providerMetadata"),
        id: take_opt_str(m, "id")?,
    })
}

impl<'de> Deserialize<'de> for Part {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut m = Map::<String, Value>::deserialize(d)?;
        let ty = match m.get("type") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(D::Error::custom("part is missing a string `type`")),
        };
        let part = match ty.as_str() {
            "text" => Part::Text(text_part(&mut m)?),
            "reasoning" => Part::Reasoning(text_part(&mut m)?),
            "step-start" => Part::StepStart,
            "source-url" => Part::SourceUrl {
                source_id: take_str(&mut m, "sourceId")?,
                url: take_str(&mut m, "url")?,
                title: take_opt_str(&mut m, "title")?,
            },
            "file" => Part::File {
                media_type: take_str(&mut m, "mediaType")?,
                filename: take_opt_str(&mut m, "filename")?,
                url: take_str(&mut m, "url")?,
            },
            t if t == "dynamic-tool" || t.starts_with("tool-") => {
                let dynamic = t == "dynamic-tool";
                let tool_name = if dynamic {
                    take_str(&mut m, "toolName")?
                } else {
                    t["tool-".len()..].to_owned()
                };
                if tool_name.is_empty() {
                    return Err(D::Error::custom("tool part has an empty tool name"));
                }
                let state = match m.remove("state") {
                    Some(v) => serde_json::from_value(v).map_err(D::Error::custom)?,
                    None => return Err(D::Error::custom("tool part is missing `state`")),
                };
                Part::Tool(ToolPart {
                    tool_name,
                    dynamic,
                    tool_call_id: take_str(&mut m, "toolCallId")?,
                    state,
                    input: m.remove("input").filter(|v| !v.is_null()),
                    output: m.remove("output").filter(|v| !v.is_null()),
                    error_text: take_opt_str(&mut m, "errorText")?,
                    provider_executed: m.remove("providerExecuted").and_then(|v| v.as_bool()),
                })
            }
            _ => Part::Other(m),
        };
        Ok(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages exactly as `ai` 5.x `useChat` holds them after a tool-using turn
    /// (captured from the AI SDK's own `readUIMessageStream`).
    const AI_SDK_MESSAGES: &str = r#"[
      {"id":"VQzr0aCUlnR6fq1E","role":"user","parts":[{"type":"text","text":"What is the weather in Paris?"}]},
      {"id":"msg-1","role":"assistant","metadata":{"createdAt":1732492800000,"finishReason":"stop"},"parts":[
        {"type":"step-start"},
        {"type":"reasoning","text":"Need the weather tool.","state":"done"},
        {"type":"tool-weather","toolCallId":"call_1","state":"output-available","input":{"city":"Paris"},"output":{"tempC":21}},
        {"type":"step-start"},
        {"type":"text","text":"It is 21°C in Paris.","state":"done"},
        {"type":"source-url","sourceId":"s1","url":"https://example.com","title":"Ex"},
        {"type":"dynamic-tool","toolName":"lookup","toolCallId":"call_2","state":"output-error","input":{},"errorText":"boom"},
        {"type":"data-weather","id":"d1","data":{"a":1}},
        {"type":"file","mediaType":"image/png","url":"data:image/png;base64,AA=="}
      ]}
    ]"#;

    #[test]
    fn round_trips_ai_sdk_json() {
        let msgs: Vec<UiMessage> = serde_json::from_str(AI_SDK_MESSAGES).unwrap();
        assert_eq!(msgs.len(), 2);
        assert!(
            matches!(msgs[1].parts[2], Part::Tool(ref t) if t.tool_name == "weather" && t.state == ToolState::OutputAvailable)
        );
        assert!(matches!(msgs[1].parts[7], Part::Other(_)));
        let back = serde_json::to_value(&msgs).unwrap();
        let orig: Value = serde_json::from_str(AI_SDK_MESSAGES).unwrap();
        assert_eq!(back, orig);
    }

    #[test]
    fn rejects_malformed_parts() {
        for bad in [
            r#"{"text":"no type"}"#,
            r#"{"type":"text"}"#,
            r#"{"type":"text","text":5}"#,
            r#"{"type":"tool-x","toolCallId":"a"}"#,
            r#"{"type":"tool-","toolCallId":"a","state":"input-available"}"#,
            r#"{"type":"tool-x","toolCallId":"a","state":"weird"}"#,
        ] {
            assert!(serde_json::from_str::<Part>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_role_is_rejected() {
        let r = serde_json::from_str::<UiMessage>(r#"{"id":"a","role":"robot","parts":[]}"#);
        assert!(r.is_err());
    }
}
