//! The provider against a fake OpenAI-compatible server (axum) that streams
//! its SSE chunks slowly, with real delays, over real TCP.
#![allow(clippy::needless_pass_by_value)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chat_core::{
    ChatId, ChatSession, FinishReason, InMemoryStore, LocalSessions, MessageId, MessageStore,
    ModelError, ModelEvent, ModelProvider, ModelRequest, NewChat, Part, Role, SendRequest, Tool,
    ToolContext, ToolError, ToolSet, ToolSpec, ToolState, TurnConfig, UiMessage, UserId,
};
use chat_llm_openai::{OpenAiBuilder, OpenAiProvider};
use futures::StreamExt;
use serde_json::{Value, json};

const KEY: &str = "sk-test-secret-0123456789";

#[derive(Default)]
struct Fake {
    calls: AtomicUsize,
    bodies: Mutex<Vec<Value>>,
    headers: Mutex<Vec<HeaderMap>>,
    dropped_at: Mutex<Option<Instant>>,
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id":"c","object":"chat.completion.chunk","created":1,"model":"m",
        "choices":[{"index":0,"delta":delta,"finish_reason":finish}]})
    .to_string()
}

fn usage_chunk(prompt: u64, completion: u64) -> String {
    json!({"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],
        "usage":{"prompt_tokens":prompt,"completion_tokens":completion,"total_tokens":prompt + completion}})
    .to_string()
}

fn tool_delta(index: usize, id: Option<&str>, name: Option<&str>, args: &str) -> String {
    let mut call = json!({"index": index, "function": {"arguments": args}});
    if let Some(id) = id {
        call["id"] = json!(id);
        call["type"] = json!("function");
    }
    if let Some(name) = name {
        call["function"]["name"] = json!(name);
    }
    chunk(json!({"tool_calls": [call]}), None)
}

/// Records when the response body is dropped (the client hung up or it ended).
struct DropFlag(Arc<Fake>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        *self.0.dropped_at.lock().unwrap() = Some(Instant::now());
    }
}

/// How a fake stream ends.
#[derive(Clone, Copy, PartialEq)]
enum End {
    /// `data: [DONE]` then a clean end.
    Done,
    /// A clean end without `[DONE]`.
    Eof,
    /// The connection breaks (the body errors).
    Reset,
    /// Nothing more is sent for a long time.
    Stall,
}

/// An SSE response sending `events` one by one, `delay` apart.
fn sse(events: Vec<String>, delay: Duration, end: End, fake: Arc<Fake>) -> Response {
    let flag = DropFlag(fake);
    let frames = events
        .into_iter()
        .map(|e| Ok(format!("data: {e}\n\n")))
        .chain((end == End::Done).then(|| Ok("data: [DONE]\n\n".to_owned())))
        .chain((end == End::Reset).then(|| Err(std::io::Error::other("connection reset"))))
        .collect::<Vec<_>>();
    let stream = futures::stream::iter(frames)
        .then(move |f| async move {
            tokio::time::sleep(delay).await;
            f.map(Bytes::from)
        })
        .chain(futures::stream::once(async move {
            if end == End::Stall {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Ok(Bytes::new())
        }))
        .map(move |b| {
            let _keep = &flag;
            b
        });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn tool_results(body: &Value) -> usize {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .count()
}

async fn completions(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let n = fake.calls.fetch_add(1, Ordering::SeqCst);
    fake.headers.lock().unwrap().push(headers.clone());
    fake.bodies.lock().unwrap().push(body.clone());
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let d = Duration::from_millis(30);
    let f = fake.clone();
    let text = move |f: Arc<Fake>| {
        sse(
            vec![
                chunk(json!({"role":"assistant","content":""}), None),
                chunk(json!({"content":"Hel"}), None),
                chunk(json!({"content":"lo"}), None),
                chunk(json!({}), Some("stop")),
                usage_chunk(5, 3),
            ],
            d,
            End::Done,
            f,
        )
    };
    let error = |status: StatusCode, message: &str, kind: &str| {
        (
            status,
            axum::Json(json!({"error":{"message":message,"type":kind,"param":null,"code":null}})),
        )
    };
    match model.as_str() {
        "rate-limited" if n == 0 => (
            [("retry-after", "1")],
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "slow down",
                "rate_limit_error",
            ),
        )
            .into_response(),
        "flaky" if n == 0 => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        // After the first failure these answer normally.
        "text" | "rate-limited" | "flaky" => text(f),
        "reasoning" => sse(
            vec![
                chunk(json!({"reasoning_content":"thinking"}), None),
                chunk(json!({"reasoning_content":" hard"}), None),
                chunk(json!({"content":"answer"}), Some("stop")),
            ],
            d,
            End::Done,
            f,
        ),
        "tools" => sse(
            vec![
                tool_delta(0, Some("call_a"), Some("get_weather"), ""),
                tool_delta(0, None, None, "{\"city\":"),
                tool_delta(
                    1,
                    Some("call_b"),
                    Some("get_weather"),
                    "{\"city\":\"Oslo\"}",
                ),
                tool_delta(0, None, None, "\"Paris\"}"),
                chunk(json!({}), Some("tool_calls")),
                usage_chunk(9, 20),
            ],
            d,
            End::Done,
            f,
        ),
        // Step 1: two calls in parallel; step 2: one more; step 3: the answer.
        "agent" => match tool_results(&body) {
            0 => sse(
                vec![
                    chunk(json!({"content":"Let me check."}), None),
                    tool_delta(0, Some("call_1"), Some("add"), "{\"a\":"),
                    tool_delta(1, Some("call_2"), Some("get_weather"), ""),
                    tool_delta(0, None, None, "2,\"b\":3}"),
                    tool_delta(1, None, None, "{\"city\":\"Paris\"}"),
                    chunk(json!({}), Some("tool_calls")),
                    usage_chunk(10, 7),
                ],
                d,
                End::Done,
                f,
            ),
            2 => sse(
                vec![
                    tool_delta(0, Some("call_3"), Some("add"), "{\"a\":5,\"b\":10}"),
                    chunk(json!({}), Some("tool_calls")),
                    usage_chunk(20, 5),
                ],
                d,
                End::Done,
                f,
            ),
            _ => sse(
                vec![
                    chunk(json!({"content":"The answer"}), None),
                    chunk(json!({"content":" is 15."}), None),
                    chunk(json!({}), Some("stop")),
                    usage_chunk(30, 4),
                ],
                d,
                End::Done,
                f,
            ),
        },
        "rate-limited-long" => (
            [("retry-after", "120")],
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "come back later",
                "rate_limit_error",
            ),
        )
            .into_response(),
        "no-quota" => error(
            StatusCode::TOO_MANY_REQUESTS,
            "You exceeded your current quota",
            "insufficient_quota",
        )
        .into_response(),
        "down" => (StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response(),
        "bad-key" => error(
            StatusCode::UNAUTHORIZED,
            &format!("Incorrect API key provided: {KEY}."),
            "invalid_request_error",
        )
        .into_response(),
        "forbidden" => error(
            StatusCode::FORBIDDEN,
            "project has no access",
            "invalid_request_error",
        )
        .into_response(),
        "bad-request" => error(
            StatusCode::BAD_REQUEST,
            "This model's maximum context length is 128000 tokens",
            "invalid_request_error",
        )
        .into_response(),
        "error-event-mid-stream" => sse(
            vec![
                chunk(json!({"content":"partial"}), None),
                json!({"error":{"message":"upstream exploded","type":"server_error"}}).to_string(),
            ],
            d,
            End::Eof,
            f,
        ),
        "reset-mid-stream" => sse(
            vec![
                chunk(json!({"content":"par"}), None),
                chunk(json!({"content":"tial"}), None),
            ],
            d,
            End::Reset,
            f,
        ),
        "truncated" => sse(vec![chunk(json!({"content":"cut"}), None)], d, End::Done, f),
        "eof" => sse(vec![chunk(json!({"content":"cut"}), None)], d, End::Eof, f),
        "finish-then-stall" => sse(
            vec![chunk(json!({"content":"done"}), Some("stop"))],
            d,
            End::Stall,
            f,
        ),
        "stall" => sse(
            vec![chunk(json!({"content":"wait"}), None)],
            d,
            End::Stall,
            f,
        ),
        "malformed" => sse(
            vec![chunk(json!({"content":"ok"}), None), "{not json".to_owned()],
            d,
            End::Done,
            f,
        ),
        "slow" => sse(
            (0..200)
                .map(|i| chunk(json!({"content": format!("t{i} ")}), None))
                .collect(),
            Duration::from_millis(100),
            End::Done,
            f,
        ),
        _ => (StatusCode::NOT_FOUND, "unknown model").into_response(),
    }
}

async fn fake_server() -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), fake)
}

fn builder(base: &str, model: &str) -> OpenAiBuilder {
    OpenAiProvider::builder()
        .api_key(KEY)
        .base_url(base)
        .model(model)
        .max_retries(2)
        .retry_backoff(Duration::from_millis(20))
}

fn provider(base: &str, model: &str) -> OpenAiProvider {
    builder(base, model).build().unwrap()
}

fn request() -> ModelRequest {
    ModelRequest {
        system: Some("be brief".into()),
        messages: vec![UiMessage::user_text(MessageId::new(), "hi")].into(),
        tools: vec![],
        step: 0,
    }
}

type Events = Vec<Result<ModelEvent, ModelError>>;

async fn events(p: &OpenAiProvider) -> Result<Events, ModelError> {
    let ev: Events = p.stream(request()).await?.collect().await;
    check_stream_contract(&ev);
    Ok(ev)
}

/// chat-core's provider-facing conformance: what the turn loop relies on
/// from any provider stream.
fn check_stream_contract(ev: &Events) {
    if let Err(why) = chat_core::testing::check_model_stream(ev) {
        panic!("stream contract broken: {why}\n{ev:?}");
    }
}

async fn ok_events(p: &OpenAiProvider) -> Vec<ModelEvent> {
    events(p)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn plain_text_streams_with_usage_and_sends_the_configured_headers() {
    let (base, fake) = fake_server().await;
    let p = builder(&base, "text")
        .organization("org-1")
        .project("proj-1")
        .header("x-gateway", "blue")
        .build()
        .unwrap();
    let ev = ok_events(&p).await;
    assert_eq!(
        ev,
        vec![
            ModelEvent::TextDelta("Hel".into()),
            ModelEvent::TextDelta("lo".into()),
            ModelEvent::Finish {
                reason: FinishReason::Stop,
                usage: Some(chat_core::Usage {
                    input_tokens: Some(5),
                    output_tokens: Some(3),
                    total_tokens: Some(8),
                    reasoning_tokens: None,
                }),
            },
        ]
    );
    let body = fake.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["model"], "text");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(
        body["messages"],
        json!([{"role":"system","content":"be brief"},{"role":"user","content":"hi"}])
    );
    let h = fake.headers.lock().unwrap()[0].clone();
    assert_eq!(h["authorization"], format!("Bearer {KEY}").as_str());
    assert_eq!(h["openai-organization"], "org-1");
    assert_eq!(h["openai-project"], "proj-1");
    assert_eq!(h["x-gateway"], "blue");
}

#[tokio::test]
async fn events_arrive_as_the_server_sends_them() {
    let (base, _) = fake_server().await;
    let p = provider(&base, "slow");
    let started = Instant::now();
    let mut s = p.stream(request()).await.unwrap();
    let mut at = Vec::new();
    for _ in 0..3 {
        s.next().await.unwrap().unwrap();
        at.push(started.elapsed());
    }
    // Chunks are 100 ms apart on the server: nothing is buffered up.
    assert!(
        at[2].saturating_sub(at[0]) >= Duration::from_millis(150),
        "{at:?}"
    );
}

#[tokio::test]
async fn reasoning_content_is_mapped() {
    let (base, _) = fake_server().await;
    let ev = ok_events(&provider(&base, "reasoning")).await;
    assert_eq!(
        ev[..3],
        [
            ModelEvent::ReasoningDelta("thinking".into()),
            ModelEvent::ReasoningDelta(" hard".into()),
            ModelEvent::TextDelta("answer".into()),
        ]
    );
    assert!(matches!(
        ev[3],
        ModelEvent::Finish {
            reason: FinishReason::Stop,
            usage: None
        }
    ));
}

#[tokio::test]
async fn two_tool_calls_split_across_chunks() {
    let (base, _) = fake_server().await;
    let ev = ok_events(&provider(&base, "tools")).await;
    let starts: Vec<&ModelEvent> = ev
        .iter()
        .filter(|e| matches!(e, ModelEvent::ToolInputStart { .. }))
        .collect();
    assert_eq!(starts.len(), 2);
    let calls: Vec<&ModelEvent> = ev
        .iter()
        .filter(|e| matches!(e, ModelEvent::ToolCall { .. }))
        .collect();
    assert_eq!(
        calls,
        [
            &ModelEvent::ToolCall {
                id: "call_a".into(),
                name: "get_weather".into(),
                input: json!({"city":"Paris"})
            },
            &ModelEvent::ToolCall {
                id: "call_b".into(),
                name: "get_weather".into(),
                input: json!({"city":"Oslo"})
            },
        ]
    );
    let deltas: String = ev
        .iter()
        .filter_map(|e| match e {
            ModelEvent::ToolInputDelta { id, delta } if id == "call_a" => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(deltas, "{\"city\":\"Paris\"}");
    match ev.last().unwrap() {
        ModelEvent::Finish {
            reason: FinishReason::ToolCalls,
            usage: Some(u),
        } => assert_eq!(u.total_tokens, Some(29)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn rate_limit_then_success_honours_retry_after() {
    let (base, fake) = fake_server().await;
    let started = Instant::now();
    let ev = events(&provider(&base, "rate-limited")).await.unwrap();
    assert!(ev.iter().all(Result::is_ok), "{ev:?}");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    // Retry-After: 1 (the backoff without it would be ~20 ms).
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After not honoured ({:?})",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_retry_after_longer_than_allowed_is_returned_not_waited() {
    let (base, fake) = fake_server().await;
    let err = events(&provider(&base, "rate-limited-long"))
        .await
        .unwrap_err();
    match &err {
        ModelError::Unavailable {
            message,
            retry_after,
        } => {
            assert!(message.contains("come back later"), "{message}");
            assert_eq!(*retry_after, Some(Duration::from_secs(120)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn exhausted_quota_is_not_retried() {
    let (base, fake) = fake_server().await;
    let err = events(&provider(&base, "no-quota")).await.unwrap_err();
    assert!(
        matches!(&err, ModelError::Rejected { status: 429, message } if message.contains("quota")),
        "{err:?}"
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn server_error_before_first_token_is_retried() {
    let (base, fake) = fake_server().await;
    let ev = events(&provider(&base, "flaky")).await.unwrap();
    assert!(ev.iter().all(Result::is_ok), "{ev:?}");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn persistent_5xx_is_retryable_after_bounded_attempts() {
    let (base, fake) = fake_server().await;
    let err = events(&provider(&base, "down")).await.unwrap_err();
    assert!(
        matches!(&err, ModelError::Unavailable { message, .. } if message == "503: overloaded"),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3, "1 try + 2 retries");
}

#[tokio::test]
async fn connect_errors_are_retried_then_retryable() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p = provider(&format!("http://127.0.0.1:{port}/v1"), "text");
    let err = events(&p).await.unwrap_err();
    assert!(matches!(err, ModelError::Unavailable { .. }), "{err:?}");
}

/// Collects everything logged while a test runs.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn client_errors_are_rejected_once_with_the_message_and_no_key() {
    let logs = LogBuf::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (base, fake) = fake_server().await;
    let cases = [
        ("bad-key", 401, "Incorrect API key provided: ***."),
        ("forbidden", 403, "project has no access"),
        ("no-such-model", 404, "unknown model"),
        (
            "bad-request",
            400,
            "This model's maximum context length is 128000 tokens",
        ),
    ];
    for (i, (model, status, text)) in cases.into_iter().enumerate() {
        let err = events(&provider(&base, model)).await.unwrap_err();
        match &err {
            ModelError::Rejected { status: s, message } => {
                assert_eq!((*s, message.as_str()), (status, text));
            }
            other => panic!("{model}: {other:?}"),
        }
        assert!(!err.is_retryable());
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            i + 1,
            "{model}: no retry"
        );
        assert!(!format!("{err} {err:?}").contains(KEY));
    }
    assert!(!format!("{:?}", provider(&base, "x")).contains(KEY));
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("model request failed"), "{logs}");
    assert!(!logs.contains(KEY), "the key leaked into the logs: {logs}");
}

#[tokio::test]
async fn error_event_mid_stream_ends_with_an_error_after_the_partial_text() {
    let (base, fake) = fake_server().await;
    let ev = events(&provider(&base, "error-event-mid-stream"))
        .await
        .unwrap();
    assert_eq!(
        ev[0].as_ref().unwrap(),
        &ModelEvent::TextDelta("partial".into())
    );
    assert!(
        matches!(ev.last(), Some(Err(ModelError::Interrupted(m))) if m.contains("upstream exploded")),
        "{ev:?}"
    );
    assert_eq!(ev.len(), 2);
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        1,
        "no retry after the first token"
    );
}

#[tokio::test]
async fn connection_broken_mid_stream_is_interrupted_and_not_retried() {
    let (base, fake) = fake_server().await;
    let ev = events(&provider(&base, "reset-mid-stream")).await.unwrap();
    assert_eq!(
        ev[0].as_ref().unwrap(),
        &ModelEvent::TextDelta("par".into())
    );
    assert_eq!(
        ev[1].as_ref().unwrap(),
        &ModelEvent::TextDelta("tial".into())
    );
    assert!(
        matches!(ev.last(), Some(Err(ModelError::Interrupted(_)))),
        "{ev:?}"
    );
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        1,
        "no retry after the first token"
    );
}

#[tokio::test]
async fn truncated_stream_is_interrupted_not_success() {
    let (base, _) = fake_server().await;
    for model in ["truncated", "eof"] {
        let ev = events(&provider(&base, model)).await.unwrap();
        assert_eq!(
            ev[0].as_ref().unwrap(),
            &ModelEvent::TextDelta("cut".into())
        );
        assert!(
            matches!(ev.last(), Some(Err(ModelError::Interrupted(_)))),
            "{model}: {ev:?}"
        );
        assert!(
            !ev.iter()
                .any(|e| matches!(e, Ok(ModelEvent::Finish { .. })))
        );
    }
}

#[tokio::test]
async fn a_stalled_stream_times_out_as_interrupted() {
    let (base, _) = fake_server().await;
    let p = builder(&base, "stall")
        .read_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = Instant::now();
    let ev = events(&p).await.unwrap();
    assert_eq!(
        ev[0].as_ref().unwrap(),
        &ModelEvent::TextDelta("wait".into())
    );
    assert!(
        matches!(ev.last(), Some(Err(ModelError::Interrupted(_)))),
        "{ev:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_stall_after_the_finish_reason_still_finishes_the_step() {
    let (base, _) = fake_server().await;
    let p = builder(&base, "finish-then-stall")
        .read_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let ev = ok_events(&p).await;
    assert_eq!(ev[0], ModelEvent::TextDelta("done".into()));
    assert!(matches!(
        ev[1],
        ModelEvent::Finish {
            reason: FinishReason::Stop,
            usage: None
        }
    ));
}

#[tokio::test]
async fn malformed_chunk_is_malformed() {
    let (base, _) = fake_server().await;
    let ev = events(&provider(&base, "malformed")).await.unwrap();
    assert_eq!(ev[0].as_ref().unwrap(), &ModelEvent::TextDelta("ok".into()));
    assert!(
        matches!(ev.last(), Some(Err(ModelError::Malformed(m))) if m.contains("not json")),
        "{ev:?}"
    );
    assert_eq!(ev.len(), 2);
}

async fn wait_dropped(fake: &Fake) -> Instant {
    for _ in 0..100 {
        if let Some(at) = *fake.dropped_at.lock().unwrap() {
            return at;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never saw the client leave");
}

#[tokio::test]
async fn dropping_the_stream_closes_the_upstream_connection() {
    let (base, fake) = fake_server().await;
    let p = provider(&base, "slow");
    let mut s = p.stream(request()).await.unwrap();
    s.next().await.unwrap().unwrap();
    let dropped = Instant::now();
    drop(s);
    let at = wait_dropped(&fake).await;
    assert!(
        at.duration_since(dropped) < Duration::from_secs(1),
        "{:?}",
        at.duration_since(dropped)
    );
}

/// A tool of the test: adds two numbers and remembers its inputs.
#[derive(Default, Clone)]
struct Add(Arc<Mutex<Vec<Value>>>);

#[async_trait]
impl Tool for Add {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "add".into(),
            description: "Adds a and b".into(),
            input_schema: json!({"type":"object","properties":{"a":{"type":"number"},"b":{"type":"number"}},"required":["a","b"]}),
        }
    }

    async fn call(&self, _ctx: ToolContext, input: Value) -> Result<Value, ToolError> {
        self.0.lock().unwrap().push(input.clone());
        let a = input["a"].as_i64().ok_or_else(|| ToolError("a".into()))?;
        let b = input["b"].as_i64().ok_or_else(|| ToolError("b".into()))?;
        Ok(json!({"sum": a + b}))
    }
}

struct Harness {
    sessions: LocalSessions,
    store: Arc<dyn MessageStore>,
    user: UserId,
    chat: ChatId,
}

async fn harness(base: &str, model: &str, tools: ToolSet) -> Harness {
    let store: Arc<dyn MessageStore> = Arc::new(InMemoryStore::new());
    let config = TurnConfig {
        tools,
        system_prompt: Some("You are a test.".into()),
        checkpoint_interval: Duration::from_millis(50),
        ..TurnConfig::default()
    };
    let sessions = LocalSessions::new(store.clone(), Arc::new(provider(base, model)), config);
    let user = UserId::new("u").unwrap();
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
    Harness {
        sessions,
        store,
        user,
        chat: chat.id,
    }
}

fn roles(body: &Value) -> Vec<String> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = m["role"].as_str().unwrap().to_owned();
            match m["tool_calls"].as_array() {
                Some(calls) => format!("{role}+{}", calls.len()),
                None => role,
            }
        })
        .collect()
}

#[tokio::test]
async fn multi_step_tool_loop_end_to_end() {
    let (base, fake) = fake_server().await;
    let add = Add::default();
    let tools = chat_core::demo::demo_tools().with(add.clone());
    let h = harness(&base, "agent", tools).await;

    let turn = h
        .sessions
        .send(
            &h.user,
            &h.chat,
            SendRequest::submit(UiMessage::user_text(MessageId::new(), "What is 2+3+10?")),
        )
        .await
        .unwrap();
    let frames: Vec<_> = turn.frames.collect().await;
    let (chunks, done) = chat_core::parse_sse(&frames.concat()).unwrap();
    assert!(done);
    let types: Vec<&str> = chunks.iter().map(chat_core::UiChunk::type_name).collect();
    assert_eq!(types.last(), Some(&"finish"));
    assert_eq!(types.iter().filter(|t| **t == "start-step").count(), 3);
    assert_eq!(
        types
            .iter()
            .filter(|t| **t == "tool-output-available")
            .count(),
        3
    );

    // The tools got the streamed, assembled inputs.
    assert_eq!(
        *add.0.lock().unwrap(),
        vec![json!({"a":2,"b":3}), json!({"a":5,"b":10})]
    );

    // The stored answer: three steps, three tool results, the final text, usage summed.
    let history = h.sessions.history(&h.user, &h.chat).await.unwrap();
    assert_eq!(history.len(), 2);
    let answer = &history[1];
    assert_eq!(answer.role, Role::Assistant);
    let tools: Vec<_> = answer
        .parts
        .iter()
        .filter_map(|p| match p {
            Part::Tool(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(tools.len(), 3);
    assert!(tools.iter().all(|t| t.state == ToolState::OutputAvailable));
    assert_eq!(tools[0].output, Some(json!({"sum":5})));
    assert_eq!(tools[1].output.as_ref().unwrap()["city"], "Paris");
    assert_eq!(tools[2].output, Some(json!({"sum":15})));
    assert_eq!(answer.text(), "Let me check.The answer is 15.");
    let meta = answer.metadata.as_ref().unwrap();
    assert_eq!(meta.finish_reason, Some(FinishReason::Stop));
    assert_eq!(meta.usage.as_ref().unwrap().input_tokens, Some(60));
    assert_eq!(meta.usage.as_ref().unwrap().output_tokens, Some(16));

    // What the server was sent at each step: the earlier steps' calls and results.
    {
        let bodies = fake.bodies.lock().unwrap();
        assert_eq!(bodies.len(), 3);
        assert_eq!(roles(&bodies[0]), ["system", "user"]);
        assert_eq!(
            roles(&bodies[1]),
            ["system", "user", "assistant+2", "tool", "tool"]
        );
        assert_eq!(
            roles(&bodies[2]),
            [
                "system",
                "user",
                "assistant+2",
                "tool",
                "tool",
                "assistant+1",
                "tool"
            ]
        );
        let step2 = bodies[2]["messages"].as_array().unwrap();
        assert_eq!(step2[2]["content"], "Let me check.");
        assert_eq!(step2[2]["tool_calls"][0]["id"], "call_1");
        assert_eq!(
            step2[2]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":2,\"b\":3}"
        );
        assert_eq!(step2[3]["tool_call_id"], "call_1");
        assert_eq!(step2[3]["content"], "{\"sum\":5}");
        assert_eq!(step2[4]["tool_call_id"], "call_2");
        let names: Vec<&str> = bodies[0]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["get_weather", "add"]);
    }

    // A follow-up turn sends the stored conversation, tool calls included.
    let turn = h
        .sessions
        .send(
            &h.user,
            &h.chat,
            SendRequest::submit(UiMessage::user_text(MessageId::new(), "Thanks!")),
        )
        .await
        .unwrap();
    let _: Vec<_> = turn.frames.collect().await;
    let bodies = fake.bodies.lock().unwrap();
    assert_eq!(
        roles(&bodies[3]),
        [
            "system",
            "user",
            "assistant+2",
            "tool",
            "tool",
            "assistant+1",
            "tool",
            "assistant",
            "user"
        ]
    );
    assert_eq!(bodies[3]["messages"][7]["content"], "The answer is 15.");
}

#[tokio::test]
async fn stopping_a_turn_closes_the_upstream_and_keeps_the_partial_answer() {
    let (base, fake) = fake_server().await;
    let h = harness(&base, "slow", ToolSet::new()).await;
    let turn = h
        .sessions
        .send(
            &h.user,
            &h.chat,
            SendRequest::submit(UiMessage::user_text(MessageId::new(), "count slowly")),
        )
        .await
        .unwrap();
    let mut frames = turn.frames;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("t2 ") {
        seen.extend_from_slice(&frames.next().await.unwrap());
    }
    let stopped = Instant::now();
    assert!(h.sessions.stop(&h.user, &h.chat).await.unwrap());
    let at = wait_dropped(&fake).await;
    assert!(
        at.duration_since(stopped) < Duration::from_secs(1),
        "{:?}",
        at.duration_since(stopped)
    );
    let _: Vec<_> = frames.collect().await;
    let history = h.sessions.history(&h.user, &h.chat).await.unwrap();
    let answer = &history[1];
    assert!(answer.text().starts_with("t0 t1 t2 "), "{}", answer.text());
    assert!(!answer.text().contains("t199"));
    assert_eq!(
        answer.metadata.as_ref().unwrap().finish_reason,
        Some(FinishReason::Abort)
    );
    drop(h.store);
}
