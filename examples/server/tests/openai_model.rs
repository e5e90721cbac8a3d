//! MODEL=openai: the real server binary talks to a fake OpenAI-compatible
//! server (axum, in this test) that streams its answer slowly over SSE.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use support::{Db, Server, read_stream, types};

const KEY: &str = "sk-example-test-key-42";

#[derive(Default)]
struct Fake {
    requests: Mutex<Vec<(HeaderMap, Value)>>,
}

fn chunk(delta: &Value, finish: Option<&str>) -> String {
    json!({"id":"c","object":"chat.completion.chunk","created":1,"model":"fake-model",
        "choices":[{"index":0,"delta":delta,"finish_reason":finish}]})
    .to_string()
}

/// Sends `events` as SSE, 40 ms apart, then `[DONE]`.
fn slow_sse(events: Vec<String>) -> Response {
    let frames = events
        .into_iter()
        .map(|e| format!("data: {e}\n\n"))
        .chain(std::iter::once("data: [DONE]\n\n".to_owned()));
    let stream = futures::stream::iter(frames).then(|f| async move {
        tokio::time::sleep(Duration::from_millis(40)).await;
        Ok::<_, std::convert::Infallible>(Bytes::from(f))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn completions(State(fake): State<Arc<Fake>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    fake.requests
        .lock()
        .unwrap()
        .push((headers.clone(), body.clone()));
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {KEY}"))
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}})),
        )
            .into_response();
    }
    let messages = body["messages"].as_array().unwrap();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    let has_tool_result = messages.last().is_some_and(|m| m["role"] == "tool");
    let usage = json!({"id":"c","object":"chat.completion.chunk","created":1,"model":"fake-model",
        "choices":[],"usage":{"prompt_tokens":11,"completion_tokens":6,"total_tokens":17}})
    .to_string();
    if last_user.contains("weather") && !has_tool_result {
        return slow_sse(vec![
            chunk(
                &json!({"tool_calls":[{"index":0,"id":"call_w","type":"function","function":{"name":"get_weather","arguments":"{\"city\""}}]}),
                None,
            ),
            chunk(
                &json!({"tool_calls":[{"index":0,"function":{"arguments":":\"Paris\"}"}}]}),
                None,
            ),
            chunk(&json!({}), Some("tool_calls")),
            usage,
        ]);
    }
    let words = if has_tool_result {
        vec!["It is ", "clear ", "in Paris."]
    } else {
        vec!["Hello", " from", " the", " fake", " model."]
    };
    let mut events: Vec<String> = words
        .into_iter()
        .map(|w| chunk(&json!({"content": w}), None))
        .collect();
    events.push(chunk(&json!({}), Some("stop")));
    events.push(usage);
    slow_sse(events)
}

async fn fake_openai() -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(completions))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), fake)
}

fn openai_env<'a>(base: &'a str, key: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("MODEL", "openai"),
        ("OPENAI_API_KEY", key),
        ("OPENAI_BASE_URL", base),
        ("OPENAI_MODEL", "fake-model"),
    ]
}

fn text_of(message: &Value) -> String {
    message["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "text")
        .map(|p| p["text"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_openai_answers_are_stored() {
    let (base, fake) = fake_openai().await;
    let db = Db::sqlite();
    let s = Server::start(&db, &openai_env(&base, KEY));
    let user = "alice";
    let chat = s.create_chat(user).await;

    // A plain answer, streamed through to the client and stored.
    let res = s.send(user, &chat, "hi there").await;
    assert_eq!(res.status(), 200);
    let (_, chunks, done) = read_stream(res).await;
    assert!(done);
    let t = types(&chunks);
    assert_eq!(t.iter().filter(|t| **t == "text-delta").count(), 5, "{t:?}");
    assert_eq!(t.last(), Some(&"finish"));
    let msgs = s.messages(user, &chat).await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(text_of(&msgs[1]), "Hello from the fake model.");
    assert_eq!(msgs[1]["metadata"]["finishReason"], "stop");
    assert_eq!(msgs[1]["metadata"]["usage"]["totalTokens"], 17);

    // A tool call: the server runs the demo weather tool, then the model answers.
    let (_, chunks, done) = read_stream(s.send(user, &chat, "weather in Paris?").await).await;
    assert!(done);
    let t = types(&chunks);
    assert!(t.contains(&"tool-input-available"), "{t:?}");
    assert!(t.contains(&"tool-output-available"), "{t:?}");
    let msgs = s.messages(user, &chat).await;
    assert_eq!(msgs.len(), 4);
    let answer = &msgs[3];
    let tool = answer["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "tool-get_weather")
        .unwrap_or_else(|| panic!("{answer}"));
    assert_eq!(tool["state"], "output-available");
    assert_eq!(tool["input"], json!({"city": "Paris"}));
    assert_eq!(tool["output"]["city"], "Paris");
    assert_eq!(text_of(answer), "It is clear in Paris.");

    // What the fake saw: the key, the model, the whole conversation incl. the tool result.
    let requests = fake.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    let (headers, first) = &requests[0];
    assert_eq!(headers["authorization"], format!("Bearer {KEY}").as_str());
    assert_eq!(first["model"], "fake-model");
    assert_eq!(first["stream"], true);
    // (After the configured system prompt, if any.)
    let last: Vec<&Value> = requests[2].1["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] != "system")
        .collect();
    let roles: Vec<&str> = last.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        ["user", "assistant", "user", "assistant", "tool"],
        "{last:?}"
    );
    assert_eq!(last[1]["content"], "Hello from the fake model.");
    assert_eq!(last[3]["tool_calls"][0]["id"], "call_w");
    assert_eq!(last[4]["tool_call_id"], "call_w");
    drop(s);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_ends_the_answer_with_an_error_and_no_key_in_it() {
    let (base, _fake) = fake_openai().await;
    let db = Db::sqlite();
    let wrong = "sk-wrong-key-that-must-not-leak";
    let s = Server::start(&db, &openai_env(&base, wrong));
    let user = "bob";
    let chat = s.create_chat(user).await;
    let (bytes, chunks, done) = read_stream(s.send(user, &chat, "hello?").await).await;
    assert!(done);
    assert!(types(&chunks).contains(&"error"), "{:?}", types(&chunks));
    assert!(!String::from_utf8_lossy(&bytes).contains(wrong));
    let msgs = s.messages(user, &chat).await;
    assert_eq!(msgs.len(), 2, "the user message is kept: {msgs:?}");
    assert_eq!(msgs[0]["parts"][0]["text"], "hello?");
    assert_eq!(msgs[1]["metadata"]["finishReason"], "error");
    assert!(!msgs.iter().any(|m| m.to_string().contains(wrong)));
    drop(s);
    db.drop_db().await;
}

#[test]
fn model_openai_without_a_key_for_api_openai_com_fails_at_startup() {
    let db = Db::sqlite();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server-example"))
        .env("PORT", "0")
        .env("DATABASE_URL", db.url())
        .env("MODEL", "openai")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OPENAI_API_KEY"), "{stderr}");
}
