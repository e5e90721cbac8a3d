//! The whole api.md contract against the real server process, on SQLite and Postgres.

mod support;

use std::time::Duration;

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use support::{Db, Server, read_deltas, read_stream, types, user_msg};

async fn contract(db: Db) {
    let s = Server::start(&db, &[]);
    let slow = Server::start(&db, &[("TOKENS", "400"), ("TOKEN_DELAY_MS", "10")]);
    auth_and_listing(&s).await;
    streaming_and_history(&s).await;
    ownership(&s, &slow).await;
    bad_input(&s).await;
    busy_resume_stop(&slow).await;
    disconnect_keeps_generating(&s).await;
    regenerate_and_retry(&s).await;
    delete(&s, &slow).await;
    openapi(&s).await;
    drop(s);
    drop(slow);
    db.drop_db().await;
}

#[tokio::test]
async fn contract_on_sqlite() {
    contract(Db::sqlite()).await;
}

#[tokio::test]
async fn contract_on_postgres() {
    if let Some(db) = Db::postgres().await {
        contract(db).await;
    }
}

async fn auth_and_listing(s: &Server) {
    for (m, p) in [
        (Method::GET, "/api/chat"),
        (Method::POST, "/api/chat"),
        (
            Method::GET,
            "/api/chat/00000000-0000-4000-8000-000000000000/history",
        ),
        (
            Method::GET,
            "/api/chat/00000000-0000-4000-8000-000000000000/messages",
        ),
        (
            Method::POST,
            "/api/chat/00000000-0000-4000-8000-000000000000/messages",
        ),
        (
            Method::GET,
            "/api/chat/00000000-0000-4000-8000-000000000000/stream",
        ),
        (
            Method::POST,
            "/api/chat/00000000-0000-4000-8000-000000000000/stop",
        ),
        (
            Method::DELETE,
            "/api/chat/00000000-0000-4000-8000-000000000000",
        ),
    ] {
        let r = s.http.request(m.clone(), s.url(p)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{m} {p}");
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"error": "Unauthorized"})
        );
        let r = s
            .http
            .request(m.clone(), s.url(p))
            .header("x-user-id", "bad id!")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{m} {p} with an invalid user id");
    }
    assert_eq!(
        s.http
            .get(s.url("/healthz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );

    let user = "lister";
    let r = s
        .req(Method::POST, "/api/chat", user)
        .json(&json!({"title": "Kept title"}))
        .send()
        .await
        .unwrap();
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["userId"], "lister");
    assert!(created["createdAt"].as_i64().unwrap() > 1_700_000_000_000);
    let id = created["chatId"].as_str().unwrap().to_owned();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
    // Body is optional.
    let r = s.req(Method::POST, "/api/chat", user).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for _ in 0..3 {
        s.create_chat(user).await;
    }
    let (st, page1) = s.get_json(user, "/api/chat?limit=2").await;
    assert_eq!(st, 200);
    assert_eq!(page1["chats"].as_array().unwrap().len(), 2);
    let cursor = page1["nextCursor"].as_str().unwrap().to_owned();
    let (_, page2) = s
        .get_json(user, &format!("/api/chat?limit=2&cursor={cursor}"))
        .await;
    let (_, page3) = s
        .get_json(
            user,
            &format!(
                "/api/chat?limit=2&cursor={}",
                page2["nextCursor"].as_str().unwrap()
            ),
        )
        .await;
    assert_eq!(page3["chats"].as_array().unwrap().len(), 1);
    assert!(page3["nextCursor"].is_null());
    let all: Vec<&str> = [&page1, &page2, &page3]
        .iter()
        .flat_map(|p| {
            p["chats"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap())
        })
        .collect();
    assert_eq!(all.len(), 5);
    assert!(all.contains(&id.as_str()));
    let kept = page3["chats"][0].clone();
    assert_eq!(
        kept["title"], "Kept title",
        "oldest chat is the titled one: {kept}"
    );
    for bad in [
        "/api/chat?limit=0",
        "/api/chat?limit=201",
        "/api/chat?limit=x",
        "/api/chat?cursor=garbage",
    ] {
        let (st, body) = s.get_json(user, bad).await;
        assert_eq!(st, 400, "{bad}: {body}");
        assert!(body["error"].is_string());
    }
}

async fn streaming_and_history(s: &Server) {
    let user = "streamer";
    let chat = s.create_chat(user).await;
    let long = "Explain   streaming in Rust, with all the details you know about it";
    let res = s.send(user, &chat, long).await;
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-vercel-ai-ui-message-stream"], "v1");
    assert_eq!(h["x-accel-buffering"], "no");
    let (raw, chunks, done) = read_stream(res).await;
    assert!(done, "no [DONE]");
    assert!(raw.ends_with(b"data: [DONE]\n\n"));
    let t = types(&chunks);
    assert_eq!(&t[..3], &["start", "start-step", "text-start"]);
    assert_eq!(t.iter().filter(|x| **x == "text-delta").count(), 8);
    assert_eq!(&t[t.len() - 3..], &["text-end", "finish-step", "finish"]);
    let chunk_json: Value = serde_json::from_str(
        std::str::from_utf8(&raw)
            .unwrap()
            .lines()
            .find(|l| l.contains("\"finish\""))
            .unwrap()
            .strip_prefix("data: ")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(chunk_json["finishReason"], "stop");
    let message_id = match &chunks[0] {
        chat_core::UiChunk::Start { message_id, .. } => message_id.to_string(),
        other => panic!("{other:?}"),
    };

    let msgs = s.messages(user, &chat).await;
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[1]["id"], message_id.as_str());
    assert_eq!(
        msgs[1]["parts"][1]["text"],
        "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    );
    assert_eq!(msgs[1]["metadata"]["finishReason"], "stop");
    assert!(msgs[1]["metadata"]["createdAt"].as_i64().is_some());

    let (_, hist) = s.get_json(user, &format!("/api/chat/{chat}/history")).await;
    assert_eq!(hist["chatId"], chat.as_str());
    let hm = hist["messages"].as_array().unwrap();
    assert_eq!(hm.len(), 2);
    let parts: Value = serde_json::from_str(hm[0]["content"].as_str().unwrap()).unwrap();
    assert_eq!(parts[0]["text"], long);
    assert!(hm[1]["createdAt"].as_i64().unwrap() >= hm[0]["createdAt"].as_i64().unwrap());

    let (_, list) = s.get_json(user, "/api/chat").await;
    let entry = list["chats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == chat.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        entry["title"],
        "Explain   streaming in Rust, with all the details..."
    );
    assert!(entry["updatedAt"].as_i64() > entry["createdAt"].as_i64());
}

async fn ownership(s: &Server, slow: &Server) {
    let chat = s.create_chat("owner").await;
    let _ = read_stream(s.send("owner", &chat, "private").await).await;
    let running = slow.create_chat("owner").await;
    let live = slow.send("owner", &running, "long private answer").await;
    for (srv, id) in [(s, &chat), (slow, &running)] {
        for (m, p) in [
            (Method::GET, format!("/api/chat/{id}/history")),
            (Method::GET, format!("/api/chat/{id}/messages")),
            (Method::GET, format!("/api/chat/{id}/stream")),
            (Method::POST, format!("/api/chat/{id}/stop")),
            (Method::DELETE, format!("/api/chat/{id}")),
        ] {
            let r = srv.req(m.clone(), &p, "intruder").send().await.unwrap();
            assert_eq!(r.status(), 404, "{m} {p}");
            assert_eq!(
                r.json::<Value>().await.unwrap(),
                json!({"error": "Chat not found"})
            );
        }
        let r = srv.send("intruder", id, "hi").await;
        assert_eq!(
            r.status(),
            404,
            "send to someone else's (maybe running) chat"
        );
        let missing = uuid::Uuid::new_v4().to_string();
        let (st, body) = srv
            .get_json("intruder", &format!("/api/chat/{missing}/history"))
            .await;
        assert_eq!(
            (st, body),
            (404, json!({"error": "Chat not found"})),
            "missing chat answers the same"
        );
        let (_, list) = srv.get_json("intruder", "/api/chat").await;
        assert!(list["chats"].as_array().unwrap().is_empty());
    }
    let (_, _, done) = read_stream(live).await;
    assert!(done, "owner's stream was disturbed");
    assert_eq!(s.messages("owner", &chat).await.len(), 2);
}

async fn bad_input(s: &Server) {
    let user = "fuzzy";
    let chat = s.create_chat(user).await;
    let path = format!("/api/chat/{chat}/messages");
    let post = |body: Vec<u8>, ct: &'static str| {
        s.req(Method::POST, &path, user)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let cases: Vec<(&str, Vec<u8>, &'static str, u16)> = vec![
        ("malformed JSON", b"{\"message\": ".to_vec(), "application/json", 400),
        ("not an object", b"[1,2]".to_vec(), "application/json", 400),
        ("empty text", serde_json::to_vec(&json!({"message": user_msg("   ")})).unwrap(), "application/json", 400),
        ("no parts", serde_json::to_vec(&json!({"message": {"id": "a1", "role": "user", "parts": []}})).unwrap(), "application/json", 400),
        ("assistant role", serde_json::to_vec(&json!({"message": {"id": "a2", "role": "assistant", "parts": [{"type":"text","text":"x"}]}})).unwrap(), "application/json", 400),
        ("unknown role", serde_json::to_vec(&json!({"message": {"id": "a3", "role": "robot", "parts": [{"type":"text","text":"x"}]}})).unwrap(), "application/json", 400),
        ("id too long", serde_json::to_vec(&json!({"message": {"id": "x".repeat(200), "role": "user", "parts": [{"type":"text","text":"x"}]}})).unwrap(), "application/json", 400),
        ("unknown trigger", serde_json::to_vec(&json!({"trigger": "explode", "message": user_msg("x")})).unwrap(), "application/json", 400),
        ("unknown field", serde_json::to_vec(&json!({"message": user_msg("x"), "sneaky": true})).unwrap(), "application/json", 400),
        ("chat id mismatch", serde_json::to_vec(&json!({"id": uuid::Uuid::new_v4().to_string(), "message": user_msg("x")})).unwrap(), "application/json", 400),
        ("malformed part", serde_json::to_vec(&json!({"message": {"id": "a4", "role": "user", "parts": [{"type":"text"}]}})).unwrap(), "application/json", 400),
        ("text too long", serde_json::to_vec(&json!({"message": user_msg(&"x".repeat(40_000))})).unwrap(), "application/json", 413),
        ("wrong content type", serde_json::to_vec(&json!({"message": user_msg("x")})).unwrap(), "text/plain", 415),
        ("2 MiB body", vec![b' '; 2 * 1024 * 1024], "application/json", 413),
    ];
    for (what, body, ct, want) in cases {
        let r = post(body, ct).await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, want, "{what}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {v}"
        );
    }
    let r = s
        .req(Method::GET, "/api/chat/not-a-uuid/messages", user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .req(Method::POST, "/api/chat", user)
        .header("content-type", "application/json")
        .body("{\"title\": 5}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Nothing changed.
    assert!(s.messages(user, &chat).await.is_empty());
    let (_, list) = s.get_json(user, "/api/chat").await;
    assert_eq!(list["chats"].as_array().unwrap().len(), 1);
    assert!(list["chats"][0]["title"].is_null());
}

async fn busy_resume_stop(s: &Server) {
    let user = "racer";
    let chat = s.create_chat(user).await;
    let first = s.send(user, &chat, "a long one").await;
    assert_eq!(first.status(), 200);
    let (head, rest) = read_deltas(first, 3).await;

    let second = s.send(user, &chat, "me too").await;
    assert_eq!(second.status(), 409);
    assert!(second.json::<Value>().await.unwrap()["error"].is_string());

    // Resume replays from the start and follows live.
    let resumed = s
        .req(Method::GET, &format!("/api/chat/{chat}/stream"), user)
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    assert_eq!(resumed.headers()["x-vercel-ai-ui-message-stream"], "v1");
    let (replay_head, replay_rest) = read_deltas(resumed, 10).await;
    assert!(
        replay_head.starts_with(&head[..head.len().min(replay_head.len())]),
        "replay differs from the live stream"
    );

    let r = s
        .req(Method::POST, &format!("/api/chat/{chat}/stop"), user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"stopped": true}));
    let live: Vec<u8> = rest.map(|c| c.unwrap().to_vec()).concat().await;
    let replay: Vec<u8> = replay_rest.map(|c| c.unwrap().to_vec()).concat().await;
    let mut full_live = head.clone();
    full_live.extend(live);
    let mut full_replay = replay_head;
    full_replay.extend(replay);
    assert_eq!(
        full_live, full_replay,
        "resume must replay the exact same bytes"
    );
    let (chunks, done) = chat_core::parse_sse(&full_live).unwrap();
    assert!(done);
    assert_eq!(types(&chunks).last(), Some(&"abort"));

    let msgs = s.messages(user, &chat).await;
    assert_eq!(msgs.len(), 2);
    let text = msgs[1]["parts"][1]["text"].as_str().unwrap();
    assert!(
        text.starts_with("tok0 tok1 tok2 ") && !text.contains("tok399"),
        "partial answer: {text}"
    );
    assert_eq!(msgs[1]["metadata"]["finishReason"], "abort");
    let r = s
        .req(Method::GET, &format!("/api/chat/{chat}/stream"), user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = s
        .req(Method::POST, &format!("/api/chat/{chat}/stop"), user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"stopped": false}));
    // And the chat takes new messages again.
    let again = s.send(user, &chat, "next").await;
    assert_eq!(again.status(), 200);
    s.req(Method::POST, &format!("/api/chat/{chat}/stop"), user)
        .send()
        .await
        .unwrap();
}

async fn disconnect_keeps_generating(s: &Server) {
    let user = "leaver";
    let chat = s.create_chat(user).await;
    let res = s.send(user, &chat, "I will hang up").await;
    let (_head, rest) = read_deltas(res, 2).await;
    drop(rest);
    s.wait_idle(user, &chat).await;
    let msgs = s.messages(user, &chat).await;
    assert_eq!(
        msgs[1]["parts"][1]["text"],
        "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    );
    assert_eq!(msgs[1]["metadata"]["finishReason"], "stop");
}

async fn regenerate_and_retry(s: &Server) {
    let user = "again";
    let chat = s.create_chat(user).await;
    let msg = user_msg("same message twice");
    for _ in 0..2 {
        let r = s
            .send_body(user, &chat, json!({"id": chat, "message": msg}))
            .await;
        assert_eq!(r.status(), 200);
        read_stream(r).await;
    }
    let msgs = s.messages(user, &chat).await;
    assert_eq!(msgs.len(), 2, "retried user message duplicated: {msgs:?}");
    let assistant = msgs[1]["id"].clone();
    // useChat's regenerate: all messages but the last assistant one, trigger + messageId.
    let r = s
        .send_body(user, &chat, json!({"id": chat, "messages": [msg], "trigger": "regenerate-message", "messageId": assistant}))
        .await;
    assert_eq!(r.status(), 200);
    let (_, chunks, _) = read_stream(r).await;
    assert!(
        matches!(&chunks[0], chat_core::UiChunk::Start { message_id, .. } if *message_id == assistant.as_str().unwrap())
    );
    let after = s.messages(user, &chat).await;
    assert_eq!(after.len(), 2, "regenerate duplicated: {after:?}");
    assert_eq!(after[1]["id"], assistant);
}

async fn delete(s: &Server, slow: &Server) {
    let user = "deleter";
    let chat = s.create_chat(user).await;
    read_stream(s.send(user, &chat, "bye").await).await;
    let r = s
        .req(Method::DELETE, &format!("/api/chat/{chat}"), user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"success": true, "message": "Chat deleted successfully"})
    );
    let (st, _) = s
        .get_json(user, &format!("/api/chat/{chat}/messages"))
        .await;
    assert_eq!(st, 404);
    let r = s
        .req(Method::DELETE, &format!("/api/chat/{chat}"), user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Deleting a chat with a running generation stops it.
    let running = slow.create_chat(user).await;
    let live = slow.send(user, &running, "long").await;
    let (_, rest) = read_deltas(live, 2).await;
    let r = slow
        .req(Method::DELETE, &format!("/api/chat/{running}"), user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tail: Vec<u8> = tokio::time::timeout(
        Duration::from_secs(10),
        rest.map(|c| c.unwrap().to_vec()).concat(),
    )
    .await
    .unwrap();
    assert!(tail.ends_with(b"data: [DONE]\n\n"));
    let (_, list) = slow.get_json(user, "/api/chat").await;
    assert!(list["chats"].as_array().unwrap().is_empty());
}

async fn openapi(s: &Server) {
    let v: Value = s
        .http
        .get(s.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["openapi"].as_str().unwrap().starts_with("3.1"));
    for p in [
        "/api/chat",
        "/api/chat/{chatId}/messages",
        "/api/chat/{chatId}/stream",
        "/api/chat/{chatId}/stop",
        "/api/chat/{chatId}/history",
        "/api/chat/{chatId}",
    ] {
        assert!(v["paths"][p].is_object(), "missing {p}");
    }
    assert!(v["components"]["schemas"]["ChatListResponse"].is_object());
}
