//! SIGKILL mid-stream keeps the user message and the last checkpoint; JWT auth.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{Value, json};
use support::{Db, Server, read_deltas, read_stream};

async fn crash_keeps_checkpoint(db: Db) {
    // 2,000 tokens 10 ms apart: the answer runs ~20 s, far longer than the
    // test needs, so the kill lands mid-stream however loaded the machine is.
    let env = [
        ("TOKENS", "2000"),
        ("TOKEN_DELAY_MS", "10"),
        ("CHECKPOINT_MS", "30"),
    ];
    let user = "crasher";
    let chat;
    let seen;
    {
        let mut s = Server::start(&db, &env);
        chat = s.create_chat(user).await;
        let res = s.send(user, &chat, "survive a crash").await;
        let (_, rest) = read_deltas(res, 25).await;
        // Wait until a checkpoint past the 20th token is in the database (no
        // fixed sleep: a loaded machine commits late), then kill -9.
        seen = db.wait_checkpoint(user, &chat, "tok20 ").await;
        s.child.kill().unwrap();
        s.child.wait().unwrap();
        drop(rest);
    }
    // Restarted with short answers: the next turn need not run 20 s.
    let s = Server::start(&db, &[("TOKENS", "20"), ("TOKEN_DELAY_MS", "10")]);
    let msgs = s.messages(user, &chat).await;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs[0]["parts"][0]["text"], "survive a crash");
    let text = msgs[1]["parts"][1]["text"].as_str().unwrap();
    // What was stored before the kill survives it (a later checkpoint may
    // have landed between our read and the kill).
    assert!(
        text.starts_with("tok0 tok1 tok2 ") && text.starts_with(seen.as_str()),
        "checkpoint: {text}, seen before the kill: {seen}"
    );
    assert!(
        !text.contains("tok1999"),
        "the answer cannot be complete: {text}"
    );
    assert_eq!(msgs[1]["metadata"]["finishReason"], "error");
    // The chat works again after the crash, and the next answer is listed after it.
    let (_, chunks, done) = read_stream(s.send(user, &chat, "still there?").await).await;
    assert!(done && !chunks.is_empty());
    let r = s
        .req(Method::POST, &format!("/api/chat/{chat}/stop"), user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.messages(user, &chat).await.len(), 4);
    drop(s);
    db.drop_db().await;
}

#[tokio::test]
async fn sigkill_mid_stream_on_sqlite() {
    crash_keeps_checkpoint(Db::sqlite()).await;
}

#[tokio::test]
async fn sigkill_mid_stream_on_postgres() {
    if let Some(db) = Db::postgres().await {
        crash_keeps_checkpoint(db).await;
    }
}

fn token(secret: &str, sub: &str, exp_offset: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "exp": now + exp_offset}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn jwt_auth() {
    let secret = "a-test-secret-of-enough-length";
    let db = Db::sqlite();
    let s = Server::start(&db, &[("AUTH", "jwt"), ("CHAT_JWT_SECRET", secret)]);
    let call = |auth: Option<String>| {
        let mut r = s.http.request(Method::GET, s.url("/api/chat"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    let ok = call(Some(format!("Bearer {}", token(secret, "jwt-user", 600))))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    for (what, auth) in [
        ("none", None),
        (
            "expired",
            Some(format!("Bearer {}", token(secret, "jwt-user", -600))),
        ),
        (
            "bad signature",
            Some(format!(
                "Bearer {}",
                token("another-secret-entirely!!", "jwt-user", 600)
            )),
        ),
        (
            "not bearer",
            Some(format!("Basic {}", token(secret, "jwt-user", 600))),
        ),
        ("garbage", Some("Bearer abc.def.ghi".to_owned())),
    ] {
        let r = call(auth).await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"error": "Unauthorized"})
        );
    }
    // The header of dev-header auth means nothing here.
    let r = s
        .http
        .get(s.url("/api/chat"))
        .header("x-user-id", "jwt-user")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Chats belong to the token's subject.
    let bearer = format!("Bearer {}", token(secret, "jwt-user", 600));
    let created: Value = s
        .http
        .post(s.url("/api/chat"))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(created["userId"], "jwt-user");
}

#[tokio::test]
async fn jwt_without_secret_refuses_to_start() {
    let db = Db::sqlite();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server-example"))
        .env("PORT", "0")
        .env("DATABASE_URL", db.url())
        .env("AUTH", "jwt")
        .env_remove("CHAT_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CHAT_JWT_SECRET"));
}

#[test]
fn help_lists_the_settings() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server-example"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "PORT",
        "BIND",
        "DATABASE_URL",
        "AUTH",
        "MODEL",
        "OPENAI_API_KEY",
        "TOKENS",
        "TOKEN_DELAY_MS",
    ] {
        assert!(help.contains(var), "--help lacks {var}");
    }
}
