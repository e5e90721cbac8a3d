//! Router-level tests without a network: request parsing never panics, keep-alive
//! comments are valid SSE that parsers skip, JSON errors for extractor rejections.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use chat_core::{DemoModel, InMemoryStore, LocalSessions, MessageStore, TurnConfig, parse_sse};
use chat_http::axum::{RouterOptions, router_with};
use chat_http::{ChatService, DevHeaderAuth, parse_send_body};
use http::Request;
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::ServiceExt;

fn app(delay_ms: u64, keep_alive_ms: u64) -> axum::Router {
    let store: Arc<dyn MessageStore> = Arc::new(InMemoryStore::new());
    let model = Arc::new(DemoModel::new(3).with_delay(Duration::from_millis(delay_ms)));
    let sessions = Arc::new(LocalSessions::new(
        store.clone(),
        model,
        TurnConfig::default(),
    ));
    let service = ChatService::new(store, sessions, Arc::new(DevHeaderAuth::new()));
    router_with(
        service,
        RouterOptions {
            keep_alive: Some(Duration::from_millis(keep_alive_ms)),
            ..RouterOptions::default()
        },
    )
}

async fn call(app: &axum::Router, req: Request<Body>) -> (u16, Vec<u8>) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    (
        status,
        res.into_body().collect().await.unwrap().to_bytes().to_vec(),
    )
}

/// Creates a chat for `user` through `app`; the request that sends it one message.
async fn send_request(app: &axum::Router, user: &str) -> Request<Body> {
    let (_, body) = call(
        app,
        Request::post("/api/chat")
            .header("x-user-id", user)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    let chat: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id = chat["chatId"].as_str().unwrap();
    let msg = serde_json::json!({"message": {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}});
    Request::post(format!("/api/chat/{id}/messages"))
        .header("x-user-id", user)
        .header("content-type", "application/json")
        .body(Body::from(msg.to_string()))
        .unwrap()
}

/// Sends one message through `app` and returns the stream's bytes.
async fn one_turn(app: &axum::Router, user: &str) -> Vec<u8> {
    let (status, body) = call(app, send_request(app, user).await).await;
    assert_eq!(status, 200);
    body
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_keeps_talking_gets_no_keep_alive() {
    // Tokens 40 ms apart never leave 100 ms of silence (paused clock: exact).
    let body = one_turn(&app(40, 100), "busy").await;
    let text = String::from_utf8(body.clone()).unwrap();
    assert!(!text.contains(": keep-alive"), "{text}");
    assert!(parse_sse(&body).unwrap().1);
    // Silences of 120 ms do get one, at most 100 ms into them.
    let body = one_turn(&app(120, 100), "quiet").await;
    let text = String::from_utf8(body).unwrap();
    assert_eq!(text.matches(": keep-alive").count(), 4, "{text}");
}

#[tokio::test]
async fn keep_alive_comments_on_silent_streams_are_skipped_by_parsers() {
    let body = one_turn(&app(120, 30), "ka").await;
    let text = String::from_utf8(body.clone()).unwrap();
    assert!(
        text.contains(": keep-alive\n\n"),
        "no keep-alive during 120 ms silences: {text}"
    );
    let (chunks, done) = parse_sse(&body).unwrap();
    assert!(done);
    assert_eq!(
        chunks
            .iter()
            .filter(|c| c.type_name() == "text-delta")
            .count(),
        3
    );
}

#[tokio::test]
async fn extractor_rejections_are_json() {
    let app = app(0, 1000);
    let (status, body) = call(
        &app,
        Request::get("/api/chat?limit=abc")
            .header("x-user-id", "u")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"].is_string());
    let (status, body) = call(
        &app,
        Request::get("/api/chat/nope/history")
            .header("x-user-id", "u")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("UUID"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn send_body_parsing_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_send_body(&chat_core::ChatId::new(), &body);
    }

    #[test]
    fn json_shaped_send_bodies_never_panic(
        trigger in proptest::option::of("[a-z-]{0,24}"),
        text in any::<String>(),
        id in any::<String>(),
        role in "(user|assistant|system|robot)",
        part_type in "(text|reasoning|file|tool-x|dynamic-tool|data-y|step-start|\\PC{0,8})",
    ) {
        let body = serde_json::json!({
            "trigger": trigger,
            "message": {"id": id, "role": role, "parts": [{"type": part_type, "text": text}]},
        });
        let _ = parse_send_body(&chat_core::ChatId::new(), body.to_string().as_bytes());
    }
}

#[tokio::test]
async fn a_stream_response_comes_with_its_first_frame() {
    // hyper writes a response's head in a packet of its own when the body
    // has nothing yet; the send handler waits for the turn's first frame.
    let app = app(50, 15_000);
    let req = send_request(&app, "eager").await;
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    // Polled once, without yielding to the turn's task: the frame is there.
    let first = futures::FutureExt::now_or_never(body.frame())
        .expect("the response came before the turn's first frame")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(first.starts_with(br#"data: {"type":"start","#), "{first:?}");
    let rest = body.collect().await.unwrap().to_bytes();
    let (chunks, done) = parse_sse(&[&first[..], &rest[..]].concat()).unwrap();
    assert!(done);
    assert_eq!(chunks.len(), 9, "{chunks:?}");
}
