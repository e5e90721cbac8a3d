//! Golden tests: whole UI message streams, byte for byte.

use std::sync::Arc;

use chat_core::turn::PreparedTurn;
use chat_core::{
    ChatId, DemoModel, DemoScript, InMemoryStore, MessageId, MessageStore, NewChat, SendRequest,
    SseEncoder, TurnConfig, TurnRunner, UiChunk, UiMessage, UserId, demo::demo_tools,
};
use tokio_util::sync::CancellationToken;

async fn prepared(store: &Arc<dyn MessageStore>, runner: &TurnRunner, text: &str) -> PreparedTurn {
    let user = UserId::new("golden").unwrap();
    let chat = store
        .create_chat(
            &user,
            NewChat {
                id: ChatId::new(),
                title: None,
                created_at: 1,
            },
        )
        .await
        .unwrap();
    runner
        .prepare(
            &user,
            &chat,
            SendRequest::submit(UiMessage::user_text(MessageId::new(), text)),
        )
        .await
        .unwrap()
}

/// Runs one turn and returns its SSE body with the message id and timestamps normalized.
async fn stream(script: DemoScript, tokens: u32, cancel_after: Option<usize>) -> String {
    let store: Arc<dyn MessageStore> = Arc::new(InMemoryStore::new());
    let config = TurnConfig {
        tools: demo_tools(),
        ..TurnConfig::default()
    };
    let model = DemoModel::new(tokens).with_script(script);
    let runner = TurnRunner::new(store.clone(), Arc::new(model), config);
    let turn = prepared(&store, &runner, "hi").await;
    let id = turn.assistant_id.to_string();
    let created = turn.created_at.to_string();
    let cancel = CancellationToken::new();
    let mut enc = SseEncoder::new();
    let mut body = Vec::new();
    let mut count = 0usize;
    let c2 = cancel.clone();
    let mut sink = |chunk: &UiChunk<'_>| {
        body.extend_from_slice(&enc.encode(chunk));
        count += 1;
        if cancel_after == Some(count) {
            c2.cancel();
        }
    };
    runner.run(turn, &mut sink, &cancel).await;
    body.extend_from_slice(&SseEncoder::done());
    String::from_utf8(body)
        .unwrap()
        .replace(&id, "M")
        .replace(&created, "T")
}

fn lines(expected: &[&str]) -> String {
    expected.iter().map(|l| format!("data: {l}\n\n")).collect()
}

const START: &str = r#"{"type":"start","messageId":"M","messageMetadata":{"createdAt":T}}"#;
const USAGE2: &str = r#""usage":{"inputTokens":8,"outputTokens":2,"totalTokens":10}"#;

#[tokio::test]
async fn plain_text() {
    let got = stream(DemoScript::Text, 2, None).await;
    let fin = format!(
        r#"{{"type":"finish","finishReason":"stop","messageMetadata":{{"createdAt":T,"finishReason":"stop",{USAGE2}}}}}"#
    );
    let want = lines(&[
        START,
        r#"{"type":"start-step"}"#,
        r#"{"type":"text-start","id":"text-0"}"#,
        r#"{"type":"text-delta","id":"text-0","delta":"tok0 "}"#,
        r#"{"type":"text-delta","id":"text-0","delta":"tok1 "}"#,
        r#"{"type":"text-end","id":"text-0"}"#,
        r#"{"type":"finish-step"}"#,
        &fin,
        "[DONE]",
    ]);
    assert_eq!(got, want);
}

#[tokio::test]
async fn reasoning_then_text() {
    let got = stream(DemoScript::Reasoning, 2, None).await;
    let fin = format!(
        r#"{{"type":"finish","finishReason":"stop","messageMetadata":{{"createdAt":T,"finishReason":"stop",{USAGE2}}}}}"#
    );
    let want = lines(&[
        START,
        r#"{"type":"start-step"}"#,
        r#"{"type":"reasoning-start","id":"reasoning-0"}"#,
        r#"{"type":"reasoning-delta","id":"reasoning-0","delta":"think0 "}"#,
        r#"{"type":"reasoning-end","id":"reasoning-0"}"#,
        r#"{"type":"text-start","id":"text-1"}"#,
        r#"{"type":"text-delta","id":"text-1","delta":"tok0 "}"#,
        r#"{"type":"text-delta","id":"text-1","delta":"tok1 "}"#,
        r#"{"type":"text-end","id":"text-1"}"#,
        r#"{"type":"finish-step"}"#,
        &fin,
        "[DONE]",
    ]);
    assert_eq!(got, want);
}

#[tokio::test]
async fn tool_call_and_result_over_two_steps() {
    let got = stream(DemoScript::ToolCall, 1, None).await;
    let fin = r#"{"type":"finish","finishReason":"stop","messageMetadata":{"createdAt":T,"finishReason":"stop","usage":{"inputTokens":16,"outputTokens":2,"totalTokens":18}}}"#;
    let want = lines(&[
        START,
        r#"{"type":"start-step"}"#,
        r#"{"type":"tool-input-start","toolCallId":"call-0","toolName":"get_weather"}"#,
        r#"{"type":"tool-input-delta","toolCallId":"call-0","inputTextDelta":"{\"city\":"}"#,
        r#"{"type":"tool-input-delta","toolCallId":"call-0","inputTextDelta":"\"Paris\"}"}"#,
        r#"{"type":"tool-input-available","toolCallId":"call-0","toolName":"get_weather","input":{"city":"Paris"}}"#,
        r#"{"type":"tool-output-available","toolCallId":"call-0","output":{"city":"Paris","sky":"clear","tempC":13}}"#,
        r#"{"type":"finish-step"}"#,
        r#"{"type":"start-step"}"#,
        r#"{"type":"text-start","id":"text-0"}"#,
        r#"{"type":"text-delta","id":"text-0","delta":"tok0 "}"#,
        r#"{"type":"text-end","id":"text-0"}"#,
        r#"{"type":"finish-step"}"#,
        fin,
        "[DONE]",
    ]);
    assert_eq!(got, want);
}

#[tokio::test]
async fn error_mid_stream() {
    let got = stream(DemoScript::FailAfter(1), 4, None).await;
    let want = lines(&[
        START,
        r#"{"type":"start-step"}"#,
        r#"{"type":"text-start","id":"text-0"}"#,
        r#"{"type":"text-delta","id":"text-0","delta":"tok0 "}"#,
        r#"{"type":"text-end","id":"text-0"}"#,
        r#"{"type":"error","errorText":"The model failed to respond. Please try again."}"#,
        "[DONE]",
    ]);
    assert_eq!(got, want);
}

#[tokio::test]
async fn stop_closes_open_parts_then_aborts() {
    // Cancel right after the second delta was emitted.
    let got = stream(DemoScript::Text, 50, Some(5)).await;
    let want = lines(&[
        START,
        r#"{"type":"start-step"}"#,
        r#"{"type":"text-start","id":"text-0"}"#,
        r#"{"type":"text-delta","id":"text-0","delta":"tok0 "}"#,
        r#"{"type":"text-delta","id":"text-0","delta":"tok1 "}"#,
        r#"{"type":"text-end","id":"text-0"}"#,
        r#"{"type":"abort"}"#,
        "[DONE]",
    ]);
    assert_eq!(got, want);
}

/// Records each chunk's type and whether the turn held it (`emit_held`).
#[derive(Default)]
struct HoldRecorder(Vec<(bool, String)>);

impl HoldRecorder {
    fn record(&mut self, held: bool, chunk: &UiChunk<'_>) {
        let json = serde_json::to_value(chunk).unwrap();
        self.0
            .push((held, json["type"].as_str().unwrap().to_owned()));
    }
}

impl chat_core::ChunkSink for HoldRecorder {
    fn emit(&mut self, chunk: &UiChunk<'_>) {
        self.record(false, chunk);
    }

    fn emit_held(&mut self, chunk: &UiChunk<'_>) {
        self.record(true, chunk);
    }
}

#[tokio::test]
async fn only_the_last_steps_closing_chunks_are_held_for_the_final_one() {
    let store: Arc<dyn MessageStore> = Arc::new(InMemoryStore::new());
    let config = TurnConfig {
        tools: demo_tools(),
        ..TurnConfig::default()
    };
    let model = DemoModel::new(1).with_script(DemoScript::ToolCall);
    let runner = TurnRunner::new(store.clone(), Arc::new(model), config);
    let turn = prepared(&store, &runner, "hi").await;
    let mut sink = HoldRecorder::default();
    runner.run(turn, &mut sink, &CancellationToken::new()).await;
    let held: Vec<(bool, &str)> = sink.0.iter().map(|(h, t)| (*h, t.as_str())).collect();
    assert_eq!(
        held,
        [
            (false, "start"),
            (false, "start-step"),
            (false, "tool-input-start"),
            (false, "tool-input-delta"),
            (false, "tool-input-delta"),
            (false, "tool-input-available"),
            (false, "tool-output-available"),
            // The tool step's end goes out at once: the next step waits on the model.
            (false, "finish-step"),
            (false, "start-step"),
            (false, "text-start"),
            (false, "text-delta"),
            // The last step's end waits for the final chunk, which follows the answer's write.
            (true, "text-end"),
            (true, "finish-step"),
            (false, "finish"),
        ]
    );
}
