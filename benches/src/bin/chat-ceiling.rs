//! The ceiling: a bare SSE server that answers `POST /api/chat` and
//! `POST /api/chat/{id}/messages` with the same bytes as the example server's
//! demo-model stream (TOKENS tokens, TOKEN_DELAY_MS apart), but stores
//! nothing, authenticates nobody and runs no turn machinery. What the machine
//! can do at all with this HTTP stack; the load bench reports the real server
//! as a ratio of it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use clap::Parser;
use futures::StreamExt as _;

/// Bare SSE server emitting the example server's stream bytes.
#[derive(Debug, Parser)]
#[command(name = "chat-ceiling", about)]
struct Args {
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 3001)]
    port: u16,
    /// Address to bind.
    #[arg(long, env = "BIND", default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Tokens per answer.
    #[arg(long, env = "TOKENS", default_value_t = 64)]
    tokens: u32,
    /// Milliseconds before each token (and before the finish), as the demo model.
    #[arg(long, env = "TOKEN_DELAY_MS", default_value_t = 20)]
    token_delay_ms: u64,
}

/// One frame of the answer (`None`: this request's `finish` frame), and
/// whether the model "waits" before it.
type Script = Arc<Vec<(bool, Option<Bytes>)>>;

#[derive(Clone)]
struct App {
    script: Script,
    delay: Duration,
    tokens: u32,
}

/// Every frame after `start`, exactly as chat-core's encoder writes them for
/// a text answer, marked where the demo model sleeps.
fn script(tokens: u32) -> Vec<(bool, Option<Bytes>)> {
    let text_id = "text-0";
    let delta = |i: u32| {
        frame(&format!(
            r#"{{"type":"text-delta","id":"{text_id}","delta":"tok{i} "}}"#
        ))
    };
    let mut frames = vec![(false, Some(frame(r#"{"type":"start-step"}"#)))];
    for i in 0..tokens {
        if i == 0 {
            frames.push((
                true,
                Some(frame(&format!(
                    r#"{{"type":"text-start","id":"{text_id}"}}"#
                ))),
            ));
            frames.push((false, Some(delta(i))));
        } else {
            frames.push((true, Some(delta(i))));
        }
    }
    frames.push((
        true,
        Some(frame(&format!(r#"{{"type":"text-end","id":"{text_id}"}}"#))),
    ));
    frames.push((false, Some(frame(r#"{"type":"finish-step"}"#))));
    frames.push((false, None));
    frames.push((false, Some(Bytes::from_static(b"data: [DONE]\n\n"))));
    frames
}

fn frame(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

async fn create_chat() -> Response {
    let body = format!(
        r#"{{"chatId":"{}","userId":"bench","createdAt":{}}}"#,
        uuid::Uuid::new_v4(),
        now_ms()
    );
    let mut res = Response::new(Body::from(body));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

async fn send(State(app): State<App>, _body: Bytes) -> Response {
    // The example server stamps the answer's creation time into start and finish.
    let created = now_ms();
    let start = frame(&format!(
        r#"{{"type":"start","messageId":"{}","messageMetadata":{{"createdAt":{created}}}}}"#,
        uuid::Uuid::new_v4()
    ));
    let n = app.tokens;
    let finish = frame(&format!(
        r#"{{"type":"finish","finishReason":"stop","messageMetadata":{{"createdAt":{created},"finishReason":"stop","usage":{{"inputTokens":8,"outputTokens":{n},"totalTokens":{}}}}}}}"#,
        n + 8
    ));
    let head = futures::stream::iter([start]);
    let delay = app.delay;
    let script = app.script.clone();
    let rest = futures::stream::iter(0..script.len()).then(move |i| {
        let script = script.clone();
        let finish = finish.clone();
        async move {
            let (wait, bytes) = &script[i];
            if *wait && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            bytes.clone().unwrap_or(finish)
        }
    });
    let body = Body::from_stream(head.chain(rest).map(Ok::<_, std::convert::Infallible>));
    let mut res = Response::new(body);
    for (k, v) in [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("x-vercel-ai-ui-message-stream", "v1"),
        ("x-accel-buffering", "no"),
    ] {
        res.headers_mut().insert(k, HeaderValue::from_static(v));
    }
    res
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = App {
        script: Arc::new(script(args.tokens)),
        delay: Duration::from_millis(args.token_delay_ms),
        tokens: args.tokens,
    };
    let router = Router::new()
        .route("/api/chat", post(create_chat))
        .route("/api/chat/{id}/messages", post(send))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(app);
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    println!("listening on http://{}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router).await?;
    Ok(())
}
