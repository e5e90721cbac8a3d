//! Bad input in the shapes the AI SDK client sends (`{id, message}`,
//! `{id, messages, trigger, messageId}`), against the real server: each gets
//! api.md's 4xx JSON error and nothing is stored.

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use support::{Db, Server, user_msg};

async fn post_raw(s: &Server, user: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = s
        .req(Method::POST, path, user)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, v)
}

#[tokio::test]
async fn sdk_shaped_bad_input_gets_4xx_and_changes_nothing() {
    let db = Db::sqlite();
    let s = Server::start(&db, &[]);
    let user = "sdk-client";
    let chat = s.create_chat(user).await;
    let path = format!("/api/chat/{chat}/messages");
    let long = "x".repeat(300);
    let no_parts = json!({"id": "m1", "role": "user", "parts": []});
    let cases = [
        (
            "unknown trigger",
            json!({"id": chat, "message": user_msg("x"), "trigger": "submit-everything"}),
        ),
        (
            "unknown trigger, messages form",
            json!({"id": chat, "messages": [user_msg("x")], "trigger": "resume-stream"}),
        ),
        (
            "message without parts",
            json!({"id": chat, "message": no_parts}),
        ),
        (
            "message with no parts field",
            json!({"id": chat, "message": {"id": "m2", "role": "user"}}),
        ),
        (
            "parts not an array",
            json!({"id": chat, "message": {"id": "m3", "role": "user", "parts": "hi"}}),
        ),
        (
            "last of messages without parts",
            json!({"id": chat, "messages": [user_msg("ok"), no_parts]}),
        ),
        ("empty messages", json!({"id": chat, "messages": []})),
        ("neither message nor messages", json!({"id": chat})),
        (
            "message id too long",
            json!({"id": chat, "message": {"id": long, "role": "user", "parts": [{"type": "text", "text": "x"}]}}),
        ),
        (
            "regenerate messageId too long",
            json!({"id": chat, "messages": [user_msg("x")], "trigger": "regenerate-message", "messageId": long}),
        ),
        (
            "chat id too long in the body",
            json!({"id": long, "message": user_msg("x")}),
        ),
    ];
    for (what, body) in &cases {
        let (status, v) = post_raw(&s, user, &path, body).await;
        assert_eq!(status, 400, "{what}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {v}"
        );
    }

    // Ids too long in the path, on every chat route: 400, not 404 or 500.
    let long_chat = "a".repeat(300);
    for (method, route) in [
        (Method::GET, format!("/api/chat/{long_chat}/messages")),
        (Method::GET, format!("/api/chat/{long_chat}/history")),
        (Method::GET, format!("/api/chat/{long_chat}/stream")),
        (Method::POST, format!("/api/chat/{long_chat}/stop")),
        (Method::DELETE, format!("/api/chat/{long_chat}")),
    ] {
        let r = s.req(method.clone(), &route, user).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{method} {route}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].is_string(), "{method} {route}: {v}");
    }
    let (status, v) = post_raw(
        &s,
        user,
        &format!("/api/chat/{long_chat}/messages"),
        &json!({"message": user_msg("x")}),
    )
    .await;
    assert_eq!(status, 400, "{v}");

    // A user id over 128 characters is not a user: 401.
    let r = s
        .req(Method::GET, "/api/chat", &"u".repeat(129))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "Unauthorized"})
    );

    // Nothing was stored, no title was set.
    assert!(s.messages(user, &chat).await.is_empty());
    let (_, list) = s.get_json(user, "/api/chat").await;
    assert_eq!(list["chats"].as_array().unwrap().len(), 1);
    assert!(list["chats"][0]["title"].is_null());
    drop(s);
    db.drop_db().await;
}
