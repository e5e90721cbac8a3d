//! `chat_http::axum::serve` over real TCP: keep-alive requests, the bounded
//! request head, and a graceful shutdown that lets a running stream finish.

use std::sync::Arc;
use std::time::Duration;

use chat_core::{DemoModel, InMemoryStore, LocalSessions, MessageStore, TurnConfig, parse_sse};
use chat_http::axum::{ServeOptions, router, serve, serve_with};
use chat_http::{ChatService, DevHeaderAuth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

fn app(tokens: u32, delay_ms: u64) -> axum::Router {
    let store: Arc<dyn MessageStore> = Arc::new(InMemoryStore::new());
    let model = Arc::new(DemoModel::new(tokens).with_delay(Duration::from_millis(delay_ms)));
    let sessions = Arc::new(LocalSessions::new(
        store.clone(),
        model,
        TurnConfig::default(),
    ));
    router(ChatService::new(
        store,
        sessions,
        Arc::new(DevHeaderAuth::new()),
    ))
}

/// A served app, its address, and the sender that starts its shutdown.
struct Served {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(app: axum::Router, options: ServeOptions) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(serve_with(
        listener,
        app,
        async move {
            let _ = stopped.await;
        },
        options,
    ));
    Served {
        addr,
        stop: Some(stop),
        done,
    }
}

/// Waits (at most 10 s) for a server's `serve` to return, and checks it returned `Ok`.
async fn ended(done: tokio::task::JoinHandle<std::io::Result<()>>) {
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Creates a chat for `u1` over `conn`; its id.
async fn create_chat(conn: &mut TcpStream) -> String {
    let (status, body) = request(conn, "POST /api/chat HTTP/1.1\r\nx-user-id: u1", "").await;
    assert_eq!(status, 200, "{body}");
    let chat: serde_json::Value = serde_json::from_str(&body).unwrap();
    chat["chatId"].as_str().unwrap().to_owned()
}

/// One HTTP/1.1 response read off `conn`: status and body (content-length
/// or chunked; chunk framing left in, the SSE parser only needs the data).
async fn read_response(conn: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let body = &text[end + 4..];
            let status: u16 = head[9..12].parse().unwrap();
            if let Some(len) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
            {
                if body.len() >= len.trim().parse::<usize>().unwrap() {
                    return (status, body.to_owned());
                }
            } else if body.ends_with("0\r\n\r\n") {
                return (status, body.to_owned());
            }
        }
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-response: {text}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The user message every test sends.
const HI: &str = r#"{"message":{"id":"m1","role":"user","parts":[{"type":"text","text":"hi"}]}}"#;

/// The head of `u1`'s send to chat `id`.
fn post_message(id: &str) -> String {
    format!(
        "POST /api/chat/{id}/messages HTTP/1.1\r\nx-user-id: u1\r\ncontent-type: application/json"
    )
}

/// A whole HTTP/1.1 request: `head` (request line and headers) plus `body`.
fn http_request(head: &str, body: &str) -> String {
    format!(
        "{head}\r\nhost: test\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn request(conn: &mut TcpStream, head: &str, body: &str) -> (u16, String) {
    conn.write_all(http_request(head, body).as_bytes())
        .await
        .unwrap();
    read_response(conn).await
}

/// The SSE data of a chunked body (chunk-size lines dropped).
fn unchunk(body: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&tail.as_bytes()[..n]);
        rest = &tail[n + 2..];
    }
    out
}

#[tokio::test]
async fn one_connection_carries_a_chat_and_its_stream_and_a_big_head_gets_431() {
    let mut served = start(app(5, 0), ServeOptions::default()).await;
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    let id = create_chat(&mut conn).await;
    let (status, body) = request(&mut conn, &post_message(&id), HI).await;
    assert_eq!(status, 200, "{body}");
    let (chunks, done) = parse_sse(&unchunk(&body)).unwrap();
    assert!(done, "{body}");
    assert!(
        chunks
            .iter()
            .any(|c| matches!(c, chat_core::UiChunk::TextDelta { .. })),
        "{body}"
    );

    // A head over 8 KiB is refused with 431, and the server goes on serving.
    let mut big = TcpStream::connect(served.addr).await.unwrap();
    let cookie = "a".repeat(9 * 1024);
    let (status, _) = request(
        &mut big,
        &format!("GET /healthz HTTP/1.1\r\ncookie: {cookie}"),
        "",
    )
    .await;
    assert_eq!(status, 431);
    let (status, _) = request(&mut conn, "GET /healthz HTTP/1.1", "").await;
    assert_eq!(status, 200);

    served.stop.take().unwrap().send(()).unwrap();
    drop(conn);
    ended(served.done).await;
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_a_running_stream_finish() {
    // 40 tokens 50 ms apart: the stream outlives the listener's close by far.
    let mut served = start(app(40, 50), ServeOptions::default()).await;
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    let id = create_chat(&mut conn).await;
    conn.write_all(http_request(&post_message(&id), HI).as_bytes())
        .await
        .unwrap();
    // The stream has started (~2 s to go).
    let mut first = [0u8; 64];
    let n = conn.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));

    served.stop.take().unwrap().send(()).unwrap();
    // The listener closes soon after the signal (polled: a loaded machine
    // may take a while to run the server's task).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while TcpStream::connect(served.addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a stopping server accepts no new connection"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!served.done.is_finished(), "the stream is still running");
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).await.unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("tok39 "), "{text}");
    assert!(text.contains("data: [DONE]"), "{text}");
    ended(served.done).await;
}

#[tokio::test]
async fn serve_is_serve_with_the_defaults() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(serve(listener, app(1, 0), async move {
        let _ = stopped.await;
    }));
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let (status, body) = request(&mut conn, "GET /healthz HTTP/1.1", "").await;
    assert_eq!(status, 200, "{body}");
    stop.send(()).unwrap();
    drop(conn);
    ended(done).await;
}
