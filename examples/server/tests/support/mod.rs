//! Runs the real server binary and talks to it over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chat_core::{ChatId, MessageStatus, UiChunk, UserId, parse_sse};
use chat_store_sqlx::sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use futures::StreamExt;
use serde_json::{Value, json};

/// A database the server runs on, cleaned up on `drop_db`.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(String, std::sync::Arc<tempfile::TempDir>),
    Postgres { url: String, name: String },
}

fn pg_base() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

impl Db {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("chat.db").display());
        Db::Sqlite(url, std::sync::Arc::new(dir))
    }

    /// A fresh Postgres database; `None` (loudly) when unreachable outside CI.
    pub async fn postgres() -> Option<Self> {
        let base = pg_base();
        let mut admin = match PgConnection::connect(&base).await {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "Postgres {base} unreachable under CI=true: {e}"
                );
                eprintln!(
                    "!!! SKIPPING Postgres test: {base} unreachable ({e}); CI=true makes this a failure"
                );
                return None;
            }
        };
        let name = format!("chat_test_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        let (prefix, _) = base.rsplit_once('/').unwrap();
        Some(Db::Postgres {
            url: format!("{prefix}/{name}"),
            name,
        })
    }

    pub fn url(&self) -> &str {
        match self {
            Db::Sqlite(u, _) | Db::Postgres { url: u, .. } => u,
        }
    }

    /// Waits (up to 15 s) until the second message of `chat` is stored as a
    /// checkpoint whose text contains `needle`, read straight from the
    /// database, and returns that text.
    pub async fn wait_checkpoint(&self, user: &str, chat: &str, needle: &str) -> String {
        let store = chat_store_sqlx::connect(self.url())
            .await
            .unwrap()
            .into_dyn();
        let (user, chat) = (UserId::new(user).unwrap(), ChatId::parse(chat).unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let msgs = store.load_messages(&user, &chat).await.unwrap();
            if let Some(answer) = msgs.get(1) {
                let text = answer.message.text();
                if answer.status == MessageStatus::Streaming && text.contains(needle) {
                    return text;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint holding {needle:?} stored within 15 s: {msgs:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn drop_db(&self) {
        if let Db::Postgres { name, .. } = self {
            if let Ok(mut admin) = PgConnection::connect(&pg_base()).await {
                let _ = admin
                    .execute(AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .await;
            }
        }
    }
}

/// The server process.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub http: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn start(db: &Db, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-server-example"));
        cmd.env("PORT", "0")
            .env("DATABASE_URL", db.url())
            .env("MODEL", "demo")
            .env("TOKENS", "8")
            .env("TOKEN_DELAY_MS", "5")
            .env("CHECKPOINT_MS", "50")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn server");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.trim().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            base,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn req(&self, method: reqwest::Method, path: &str, user: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .header("x-user-id", user)
    }

    pub async fn create_chat(&self, user: &str) -> String {
        let r = self
            .req(reqwest::Method::POST, "/api/chat", user)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["chatId"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn send(&self, user: &str, chat: &str, text: &str) -> reqwest::Response {
        self.send_body(user, chat, json!({"id": chat, "message": user_msg(text)}))
            .await
    }

    pub async fn send_body(&self, user: &str, chat: &str, body: Value) -> reqwest::Response {
        self.req(
            reqwest::Method::POST,
            &format!("/api/chat/{chat}/messages"),
            user,
        )
        .json(&body)
        .send()
        .await
        .unwrap()
    }

    pub async fn get_json(&self, user: &str, path: &str) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::GET, path, user)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn messages(&self, user: &str, chat: &str) -> Vec<Value> {
        let (s, v) = self
            .get_json(user, &format!("/api/chat/{chat}/messages"))
            .await;
        assert_eq!(s, 200, "{v}");
        v["messages"].as_array().unwrap().clone()
    }

    /// Polls until no generation runs for the chat.
    pub async fn wait_idle(&self, user: &str, chat: &str) {
        for _ in 0..400 {
            let r = self
                .req(
                    reqwest::Method::GET,
                    &format!("/api/chat/{chat}/stream"),
                    user,
                )
                .send()
                .await
                .unwrap();
            if r.status() == 204 {
                return;
            }
            drop(r);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("generation did not finish");
    }
}

pub fn user_msg(text: &str) -> Value {
    json!({"id": uuid::Uuid::new_v4().simple().to_string(), "role": "user", "parts": [{"type": "text", "text": text}]})
}

/// Reads a whole SSE body; returns raw bytes and parsed chunks.
pub async fn read_stream(res: reqwest::Response) -> (Vec<u8>, Vec<UiChunk<'static>>, bool) {
    let bytes = res.bytes().await.unwrap().to_vec();
    let (chunks, done) = parse_sse(&bytes).unwrap();
    (bytes, chunks, done)
}

/// Reads frames until `n` text-deltas were seen; returns the bytes so far and the rest of the stream.
pub async fn read_deltas(
    res: reqwest::Response,
    n: usize,
) -> (
    Vec<u8>,
    impl futures::Stream<Item = reqwest::Result<bytes::Bytes>>,
) {
    let mut stream = res.bytes_stream();
    let mut buf = Vec::new();
    while count(&buf, b"\"text-delta\"") < n {
        match stream.next().await {
            Some(chunk) => buf.extend_from_slice(&chunk.unwrap()),
            None => break,
        }
    }
    (buf, stream)
}

pub fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

pub fn types(chunks: &[UiChunk<'_>]) -> Vec<&'static str> {
    chunks.iter().map(UiChunk::type_name).collect()
}
