//! Translation between chat-core and the chat completions wire format.

use std::collections::VecDeque;

use chat_core::{
    FinishReason, ModelError, ModelEvent, ModelRequest, Part, Role, ToolState, UiMessage, Usage,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// One `chat.completion.chunk` (only the fields we read; unknown ones are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct StreamChunk {
    /// Choices (one, we never ask for more).
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    /// Token usage, on the last chunk when `include_usage` was requested.
    #[serde(default)]
    pub usage: Option<ChunkUsage>,
    /// Some compatible servers report failures mid-stream this way.
    #[serde(default)]
    pub error: Option<Value>,
}

/// A choice of a chunk.
#[derive(Debug, Default, Deserialize)]
pub struct ChunkChoice {
    /// What is new.
    #[serde(default)]
    pub delta: ChunkDelta,
    /// Set on the choice's last chunk.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// The new content of a chunk.
#[derive(Debug, Default, Deserialize)]
pub struct ChunkDelta {
    /// Visible text.
    #[serde(default)]
    pub content: Option<String>,
    /// Reasoning text (DeepSeek, vLLM, LiteLLM...).
    #[serde(default)]
    pub reasoning_content: Option<String>,
    /// Reasoning text (OpenRouter, Ollama...).
    #[serde(default)]
    pub reasoning: Option<String>,
    /// Tool call fragments.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A fragment of a tool call.
#[derive(Debug, Default, Deserialize)]
pub struct ToolCallDelta {
    /// Which call of the step this fragment belongs to (a few servers omit it).
    #[serde(default)]
    pub index: Option<usize>,
    /// The call id (first fragment).
    #[serde(default)]
    pub id: Option<String>,
    /// Name and argument text.
    #[serde(default)]
    pub function: Option<FunctionDelta>,
}

/// A fragment of a function call.
#[derive(Debug, Default, Deserialize)]
pub struct FunctionDelta {
    /// The function name (first fragment).
    #[serde(default)]
    pub name: Option<String>,
    /// A piece of the JSON arguments.
    #[serde(default)]
    pub arguments: Option<String>,
}

/// Usage as the server reports it.
#[derive(Debug, Default, Deserialize)]
pub struct ChunkUsage {
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: Option<u64>,
    /// Completion tokens.
    #[serde(default)]
    pub completion_tokens: Option<u64>,
    /// Total.
    #[serde(default)]
    pub total_tokens: Option<u64>,
    /// Breakdown of completion tokens.
    #[serde(default)]
    pub completion_tokens_details: Option<Value>,
}

#[derive(Debug, Default)]
struct PendingCall {
    id: Option<String>,
    name: Option<String>,
    arguments: String,
    started: bool,
}

/// Turns the chunks of one step into [`ModelEvent`]s: text and reasoning
/// deltas at once, tool calls assembled per index, and exactly one `Finish`
/// at the end (after the usage chunk that may follow the finish reason).
#[derive(Debug, Default)]
pub struct StreamMapper {
    calls: Vec<PendingCall>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    out: VecDeque<Result<ModelEvent, ModelError>>,
}

/// More parallel calls than this in one step is taken as a broken stream.
const MAX_CALLS_PER_STEP: usize = 128;

fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{r:016x}")
}

/// An `{"error": ...}` event inside a stream: a rejected request when the
/// server says so (`invalid_request_error` or a 4xx code), else an interruption.
fn stream_error(err: &Value) -> ModelError {
    let message = match err {
        Value::String(s) => s.clone(),
        _ => err
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| err.to_string(), str::to_owned),
    };
    let code = err.get("code").and_then(Value::as_u64).map(|c| c as u16);
    let invalid = err.get("type").and_then(Value::as_str) == Some("invalid_request_error");
    match code {
        Some(status @ 400..=499) if status != 408 && status != 429 => {
            ModelError::Rejected { status, message }
        }
        _ if invalid => ModelError::Rejected {
            status: 400,
            message,
        },
        _ => ModelError::Interrupted(format!("the server reported an error: {message}")),
    }
}

/// Maps an OpenAI finish reason to chat-core's.
pub fn finish_reason(s: &str) -> FinishReason {
    match s {
        "stop" | "end_turn" => FinishReason::Stop,
        "length" | "max_tokens" => FinishReason::Length,
        "content_filter" => FinishReason::ContentFilter,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        _ => FinishReason::Other,
    }
}

impl StreamMapper {
    /// A mapper for a new step.
    pub fn new() -> Self {
        Self::default()
    }

    /// Events ready to be handed out.
    pub fn pop(&mut self) -> Option<Result<ModelEvent, ModelError>> {
        self.out.pop_front()
    }

    /// Feeds one chunk.
    pub fn push(&mut self, chunk: StreamChunk) {
        if let Some(err) = chunk.error {
            self.out.push_back(Err(stream_error(&err)));
            return;
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(Usage {
                input_tokens: u.prompt_tokens,
                output_tokens: u.completion_tokens,
                total_tokens: u.total_tokens,
                reasoning_tokens: u
                    .completion_tokens_details
                    .as_ref()
                    .and_then(|d| d.get("reasoning_tokens"))
                    .and_then(Value::as_u64),
            });
        }
        for choice in chunk.choices {
            let d = choice.delta;
            if let Some(r) = d
                .reasoning_content
                .or(d.reasoning)
                .filter(|r| !r.is_empty())
            {
                self.out.push_back(Ok(ModelEvent::ReasoningDelta(r)));
            }
            if let Some(t) = d.content.filter(|t| !t.is_empty()) {
                self.out.push_back(Ok(ModelEvent::TextDelta(t)));
            }
            for tc in d.tool_calls.unwrap_or_default() {
                self.tool_delta(tc);
            }
            if let Some(f) = choice.finish_reason {
                self.finish = Some(finish_reason(&f));
            }
        }
    }

    /// Whether a finish reason arrived (only the usage chunk may follow).
    pub fn finished(&self) -> bool {
        self.finish.is_some()
    }

    /// An error ends the step: it is handed out after what came before it.
    pub fn fail(&mut self, error: ModelError) {
        self.out.push_back(Err(error));
    }

    fn tool_delta(&mut self, tc: ToolCallDelta) {
        let index = match tc.index {
            Some(i) => i,
            // Without an index, a new id starts a new call and anything else
            // continues the last one.
            None => match (&tc.id, self.calls.last()) {
                (Some(id), Some(last)) if last.id.as_ref() == Some(id) => self.calls.len() - 1,
                (None, Some(_)) => self.calls.len() - 1,
                _ => self.calls.len(),
            },
        };
        if index >= MAX_CALLS_PER_STEP {
            self.out.push_back(Err(ModelError::Malformed(format!(
                "tool call index {index} is out of range"
            ))));
            return;
        }
        if self.calls.len() <= index {
            self.calls.resize_with(index + 1, PendingCall::default);
        }
        let call = &mut self.calls[index];
        if let Some(id) = tc.id.filter(|s| !s.is_empty()) {
            call.id = Some(id);
        }
        let mut new_args = None;
        if let Some(f) = tc.function {
            if let Some(n) = f.name.filter(|s| !s.is_empty()) {
                call.name = Some(n);
            }
            new_args = f.arguments.filter(|s| !s.is_empty());
        }
        if let Some(a) = &new_args {
            call.arguments.push_str(a);
        }
        match (&call.id, &call.name, call.started) {
            (Some(id), Some(name), false) => {
                call.started = true;
                self.out.push_back(Ok(ModelEvent::ToolInputStart {
                    id: id.clone(),
                    name: name.clone(),
                }));
                if !call.arguments.is_empty() {
                    self.out.push_back(Ok(ModelEvent::ToolInputDelta {
                        id: id.clone(),
                        delta: call.arguments.clone(),
                    }));
                }
            }
            (Some(id), _, true) => {
                if let Some(a) = new_args {
                    self.out.push_back(Ok(ModelEvent::ToolInputDelta {
                        id: id.clone(),
                        delta: a,
                    }));
                }
            }
            _ => {}
        }
    }

    /// The upstream stream ended: emits the assembled tool calls and the
    /// `Finish`, or an `Interrupted` error when no finish reason arrived.
    pub fn end(&mut self) {
        let Some(reason) = self.finish else {
            self.out.push_back(Err(ModelError::Interrupted(
                "the stream ended without a finish reason".into(),
            )));
            return;
        };
        for (i, call) in std::mem::take(&mut self.calls).into_iter().enumerate() {
            let Some(name) = call.name else {
                // A gap in the indexes (never started) is skipped; a call with
                // arguments but no name cannot be run.
                if call.id.is_none() && call.arguments.is_empty() {
                    continue;
                }
                self.out.push_back(Err(ModelError::Malformed(format!(
                    "tool call {i} has no function name"
                ))));
                return;
            };
            // Some servers send no call id; the turn needs one unique in the message.
            let id = call
                .id
                .unwrap_or_else(|| format!("call_{}_{i}", random_suffix()));
            let input = if call.arguments.trim().is_empty() {
                json!({})
            } else {
                match serde_json::from_str(&call.arguments) {
                    Ok(v) => v,
                    Err(e) => {
                        self.out.push_back(Err(ModelError::Malformed(format!(
                            "arguments of tool call {id} are not JSON: {e}"
                        ))));
                        return;
                    }
                }
            };
            if !call.started {
                self.out.push_back(Ok(ModelEvent::ToolInputStart {
                    id: id.clone(),
                    name: name.clone(),
                }));
            }
            self.out
                .push_back(Ok(ModelEvent::ToolCall { id, name, input }));
        }
        self.out.push_back(Ok(ModelEvent::Finish {
            reason,
            usage: self.usage.take(),
        }));
    }
}

fn text_of(parts: &[Part]) -> String {
    let mut s = String::new();
    for p in parts {
        if let Part::Text(t) = p {
            s.push_str(&t.text);
        }
    }
    s
}

fn user_content(m: &UiMessage) -> Value {
    let files: Vec<&Part> = m
        .parts
        .iter()
        .filter(|p| matches!(p, Part::File { media_type, .. } if media_type.starts_with("image/")))
        .collect();
    if files.is_empty() {
        return Value::String(text_of(&m.parts));
    }
    let mut content = Vec::new();
    for p in &m.parts {
        match p {
            Part::Text(t) => content.push(json!({"type": "text", "text": t.text})),
            Part::File {
                media_type, url, ..
            } if media_type.starts_with("image/") => {
                content.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            _ => {}
        }
    }
    Value::Array(content)
}

/// Appends an assistant message as OpenAI messages: per step one assistant
/// message (text + tool calls), followed by one `tool` message per result.
fn push_assistant(m: &UiMessage, out: &mut Vec<Value>) {
    let mut steps: Vec<Vec<&Part>> = vec![Vec::new()];
    for p in &m.parts {
        if matches!(p, Part::StepStart) {
            if steps.last().is_some_and(|s| !s.is_empty()) {
                steps.push(Vec::new());
            }
        } else if let Some(last) = steps.last_mut() {
            last.push(p);
        }
    }
    for step in steps {
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut results = Vec::new();
        for p in step {
            match p {
                Part::Text(t) => text.push_str(&t.text),
                Part::Tool(t) => {
                    let Some(input) = &t.input else { continue };
                    let content = match t.state {
                        ToolState::OutputAvailable => t
                            .output
                            .as_ref()
                            .map_or_else(|| "null".to_owned(), Value::to_string),
                        ToolState::OutputError => {
                            json!({"error": t.error_text.clone().unwrap_or_default()}).to_string()
                        }
                        // A call without a result cannot be sent back.
                        _ => continue,
                    };
                    calls.push(json!({
                        "id": t.tool_call_id,
                        "type": "function",
                        "function": {"name": t.tool_name, "arguments": input.to_string()},
                    }));
                    results.push(
                        json!({"role": "tool", "tool_call_id": t.tool_call_id, "content": content}),
                    );
                }
                _ => {}
            }
        }
        if text.is_empty() && calls.is_empty() {
            continue;
        }
        let mut msg = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { Value::String(text) }});
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(calls);
        }
        out.push(msg);
        out.extend(results);
    }
}

/// The streaming chat completion request for `req` (history, tools, and
/// `stream_options.include_usage` when `include_usage`).
pub fn request_body(model: &str, req: &ModelRequest, include_usage: bool) -> Value {
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = &req.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    for m in req.messages.iter() {
        match m.role {
            Role::System => messages.push(json!({"role": "system", "content": text_of(&m.parts)})),
            Role::User => messages.push(json!({"role": "user", "content": user_content(m)})),
            Role::Assistant => push_assistant(m, &mut messages),
        }
    }
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    if !req.tools.is_empty() {
        body["tools"] = req
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.input_schema,
                }})
            })
            .collect();
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_core::{MessageId, ToolPart};

    fn chunk(v: Value) -> StreamChunk {
        serde_json::from_value(v).unwrap()
    }

    fn drain(m: &mut StreamMapper) -> Vec<Result<ModelEvent, ModelError>> {
        std::iter::from_fn(|| m.pop()).collect()
    }

    #[test]
    fn two_tool_calls_split_across_chunks() {
        let mut m = StreamMapper::new();
        m.push(chunk(json!({"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f","arguments":"{\"x\""}}]}}]})));
        m.push(chunk(json!({"choices":[{"delta":{"tool_calls":[{"index":1,"id":"b","function":{"name":"g","arguments":""}}]}}]})));
        m.push(chunk(json!({"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]})));
        m.push(chunk(json!({"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{}"}}]},"finish_reason":"tool_calls"}]})));
        m.push(chunk(json!({"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}})));
        m.end();
        let ev: Vec<ModelEvent> = drain(&mut m).into_iter().map(Result::unwrap).collect();
        assert_eq!(
            ev[0],
            ModelEvent::ToolInputStart {
                id: "a".into(),
                name: "f".into()
            }
        );
        assert!(ev.contains(&ModelEvent::ToolCall {
            id: "a".into(),
            name: "f".into(),
            input: json!({"x":1})
        }));
        assert!(ev.contains(&ModelEvent::ToolCall {
            id: "b".into(),
            name: "g".into(),
            input: json!({})
        }));
        assert_eq!(
            ev.last().unwrap(),
            &ModelEvent::Finish {
                reason: FinishReason::ToolCalls,
                usage: Some(Usage {
                    input_tokens: Some(3),
                    output_tokens: Some(4),
                    total_tokens: Some(7),
                    reasoning_tokens: None
                })
            }
        );
    }

    #[test]
    fn missing_finish_is_interrupted() {
        let mut m = StreamMapper::new();
        m.push(chunk(json!({"choices":[{"delta":{"content":"hi"}}]})));
        m.end();
        let ev = drain(&mut m);
        assert!(matches!(ev.last(), Some(Err(ModelError::Interrupted(_)))));
    }

    #[test]
    fn history_maps_tool_steps() {
        let mut a = UiMessage::new(MessageId::new(), Role::Assistant, vec![Part::StepStart]);
        a.parts.push(Part::Tool(ToolPart {
            tool_name: "get_weather".into(),
            dynamic: false,
            tool_call_id: "c1".into(),
            state: ToolState::OutputAvailable,
            input: Some(json!({"city": "Paris"})),
            output: Some(json!({"tempC": 3})),
            error_text: None,
            provider_executed: None,
        }));
        a.parts.push(Part::StepStart);
        a.parts.push(Part::text("It is 3°C."));
        let req = ModelRequest {
            system: Some("sys".into()),
            messages: vec![UiMessage::user_text(MessageId::new(), "weather?"), a].into(),
            tools: vec![],
            step: 0,
        };
        let body = request_body("m", &req, true);
        let msgs = body["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 5, "{msgs:#?}");
        assert_eq!(
            msgs[2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(msgs[3]["role"], "tool");
        assert_eq!(msgs[3]["content"], "{\"tempC\":3}");
        assert_eq!(msgs[4]["content"], "It is 3°C.");
        assert_eq!(body["stream_options"]["include_usage"], true);
    }
}
