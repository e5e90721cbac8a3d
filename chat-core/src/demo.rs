//! `DemoModel`: an offline, deterministic model for demos, tests and benchmarks.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use crate::error::{ModelError, ToolError};
use crate::message::{FinishReason, Part, Role, Usage};
use crate::model::{ModelEvent, ModelProvider, ModelRequest, ModelStream};
use crate::tool::{Tool, ToolContext, ToolSet, ToolSpec};

/// What the demo model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DemoScript {
    /// Chosen from the last user message: `[tool]` calls `get_weather` and
    /// answers in a second step, `[reasoning]` reasons first, `[error]` fails
    /// halfway, `[truncate]` ends halfway without finishing; otherwise plain text.
    #[default]
    FromPrompt,
    /// Plain text: `tokens` tokens, the i-th being `tok{i} `.
    Text,
    /// Reasoning tokens (`think{i} `), then the text.
    Reasoning,
    /// Step 1 calls `get_weather` with `{"city":"Paris"}`; step 2 answers in text.
    ToolCall,
    /// Streams this many text tokens, then fails with a retryable error.
    FailAfter(u32),
    /// Streams half the tokens, then ends without a finish event.
    Truncate,
}

/// The offline model of the example server: streams `tokens` tokens, the i-th
/// (from 0) being `tok{i} `, `delay` apart.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use chat_core::{DemoModel, ModelProvider, ModelRequest, ModelEvent};
/// use futures::StreamExt;
/// let model = DemoModel::new(2);
/// let req = ModelRequest { system: None, messages: vec![].into(), tools: vec![], step: 0 };
/// let events: Vec<_> = model.stream(req).await.unwrap().collect().await;
/// assert_eq!(events[0].as_ref().unwrap(), &ModelEvent::TextDelta("tok0 ".into()));
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct DemoModel {
    tokens: u32,
    delay: Duration,
    script: DemoScript,
}

impl DemoModel {
    /// A model streaming `tokens` tokens with no delay.
    pub fn new(tokens: u32) -> Self {
        Self {
            tokens,
            delay: Duration::ZERO,
            script: DemoScript::FromPrompt,
        }
    }

    /// Waits `delay` before each token.
    #[must_use]
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Uses a fixed script instead of reading the prompt.
    #[must_use]
    pub fn with_script(mut self, script: DemoScript) -> Self {
        self.script = script;
        self
    }

    fn script_for(&self, req: &ModelRequest) -> DemoScript {
        if self.script != DemoScript::FromPrompt {
            return self.script;
        }
        let prompt = req
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(crate::UiMessage::text)
            .unwrap_or_default();
        if prompt.contains("[tool]") {
            DemoScript::ToolCall
        } else if prompt.contains("[reasoning]") {
            DemoScript::Reasoning
        } else if prompt.contains("[error]") {
            DemoScript::FailAfter(self.tokens / 2)
        } else if prompt.contains("[truncate]") {
            DemoScript::Truncate
        } else {
            DemoScript::Text
        }
    }

    fn finish(&self, reason: FinishReason) -> ModelEvent {
        let n = u64::from(self.tokens);
        let usage = Usage {
            input_tokens: Some(8),
            output_tokens: Some(n),
            total_tokens: Some(8 + n),
            reasoning_tokens: None,
        };
        ModelEvent::Finish {
            reason,
            usage: Some(usage),
        }
    }
}

/// One model event as the stream yields it.
type Event = Result<ModelEvent, ModelError>;

/// A script's events: `reasoning` deltas, then `text` deltas, then `tail`.
/// One value inside the model's stream (no boxed iterator to reach per token).
struct DemoEvents {
    reasoning: std::ops::Range<u32>,
    text: std::ops::Range<u32>,
    tail: std::vec::IntoIter<Event>,
}

impl DemoEvents {
    fn new(reasoning: u32, text: u32, tail: Vec<Event>) -> Self {
        Self {
            reasoning: 0..reasoning,
            text: 0..text,
            tail: tail.into_iter(),
        }
    }
}

/// `{word}{i} `, written without the formatting machinery (once per token).
fn numbered(word: &str, i: u32) -> String {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut n = i;
    loop {
        at -= 1;
        // `n % 10` is a digit, so the cast keeps it whole.
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut s = String::with_capacity(word.len() + digits.len() - at + 1);
    s.push_str(word);
    s.extend(digits[at..].iter().map(|&d| char::from(d)));
    s.push(' ');
    s
}

impl Iterator for DemoEvents {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if let Some(i) = self.reasoning.next() {
            return Some(Ok(ModelEvent::ReasoningDelta(numbered("think", i))));
        }
        if let Some(i) = self.text.next() {
            return Some(Ok(ModelEvent::TextDelta(numbered("tok", i))));
        }
        self.tail.next()
    }
}

#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
impl ModelProvider for DemoModel {
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ModelError> {
        let n = self.tokens;
        let events = match self.script_for(&request) {
            DemoScript::FromPrompt | DemoScript::Text => {
                DemoEvents::new(0, n, vec![Ok(self.finish(FinishReason::Stop))])
            }
            DemoScript::Reasoning => {
                DemoEvents::new(n.div_ceil(4), n, vec![Ok(self.finish(FinishReason::Stop))])
            }
            DemoScript::ToolCall => {
                let answered = request.messages.last().is_some_and(|m| {
                    m.role == Role::Assistant && m.parts.iter().any(|p| matches!(p, Part::Tool(_)))
                });
                if answered {
                    DemoEvents::new(0, n, vec![Ok(self.finish(FinishReason::Stop))])
                } else {
                    let id = format!("call-{}", request.step);
                    let mut events = vec![Ok(ModelEvent::ToolInputStart {
                        id: id.clone(),
                        name: "get_weather".into(),
                    })];
                    for piece in ["{\"city\":", "\"Paris\"}"] {
                        events.push(Ok(ModelEvent::ToolInputDelta {
                            id: id.clone(),
                            delta: piece.into(),
                        }));
                    }
                    events.push(Ok(ModelEvent::ToolCall {
                        id,
                        name: "get_weather".into(),
                        input: json!({"city": "Paris"}),
                    }));
                    events.push(Ok(self.finish(FinishReason::ToolCalls)));
                    DemoEvents::new(0, 0, events)
                }
            }
            DemoScript::FailAfter(k) => DemoEvents::new(
                0,
                k,
                vec![Err(ModelError::Interrupted(
                    "demo model failed on purpose".into(),
                ))],
            ),
            DemoScript::Truncate => DemoEvents::new(0, n / 2, Vec::new()),
        };
        let delay = self.delay;
        let stream = futures::stream::iter(events).then(move |e| async move {
            if !delay.is_zero() {
                crate::sleep(delay).await;
            }
            e
        });
        Ok(Box::pin(stream))
    }

    fn name(&self) -> &str {
        "demo"
    }
}

use futures::StreamExt as _;

/// The tools the demo model calls: `get_weather`.
pub fn demo_tools() -> ToolSet {
    ToolSet::new().with(WeatherTool)
}

/// A deterministic weather tool: `{"city": string}` -> `{"city", "tempC", "sky"}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct WeatherTool;

#[cfg_attr(target_arch = "wasm32", async_trait(?Send))]
#[cfg_attr(not(target_arch = "wasm32"), async_trait)]
impl Tool for WeatherTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "get_weather".into(),
            description: "Current weather for a city".into(),
            input_schema: json!({
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"]
            }),
        }
    }

    async fn call(&self, _ctx: ToolContext, input: Value) -> Result<Value, ToolError> {
        let city = input
            .get("city")
            .and_then(Value::as_str)
            .ok_or_else(|| ToolError("`city` is required".into()))?;
        let temp = city.bytes().fold(7u32, |a, b| (a * 31 + u32::from(b)) % 35);
        Ok(json!({"city": city, "tempC": temp, "sky": "clear"}))
    }
}

#[cfg(test)]
mod tests {
    use super::numbered;

    #[test]
    fn numbered_tokens_read_as_formatted() {
        for i in [0, 7, 9, 10, 63, 99, 100, 1_000_007, u32::MAX] {
            assert_eq!(numbered("tok", i), format!("tok{i} "));
        }
    }
}
