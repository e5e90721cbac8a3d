//! The contract as an Axum [`Router`]: mount it into your app with `merge` or
//! `nest`, wrap it in your own layers, plug your own [`Authenticator`](crate::Authenticator).

use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chat_core::{TurnStream, UI_STREAM_HEADERS, UserId};
use futures::{Stream as _, StreamExt as _};
use tower_http::cors::CorsLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::Instrument as _;
use utoipa::OpenApi;

use crate::dto::{
    ChatListResponse, CreateChatResponse, DeleteResponse, HistoryResponse, ListQuery,
    MessagesResponse, StopResponse,
};
use crate::error::{ApiError, ErrorBody};
use crate::service::{ChatService, parse_chat_id};

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = Response::new(Body::from(self.body()));
        *res.status_mut() = self.status;
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        res
    }
}

/// Settings of the router beyond the service.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// Timeout of every non-streaming route (default 30 s).
    pub request_timeout: Duration,
    /// Comment frames sent on a stream silent this long (default 15 s; `None` = never).
    pub keep_alive: Option<Duration>,
    /// CORS policy (default: none, same-origin only).
    pub cors: Option<CorsLayer>,
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            keep_alive: Some(Duration::from_secs(15)),
            cors: None,
        }
    }
}

#[derive(Clone)]
struct AppState {
    service: ChatService,
    keep_alive: Option<Duration>,
}

/// The authenticated user of a request (401 otherwise).
#[derive(Debug, Clone)]
pub struct AuthUser(pub UserId);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match state.service.authenticator().authenticate(parts).await {
            Ok(u) => Ok(AuthUser(u)),
            Err(e) => {
                tracing::debug!(reason = e.0, "unauthenticated request");
                Err(ApiError::unauthorized())
            }
        }
    }
}

/// A JSON request body as raw bytes: 415 unless `application/json`, 413 over the limit.
struct JsonBytes(Bytes);

impl FromRequest<AppState> for JsonBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let has_body = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() != b"0");
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let ct = ct.split(';').next().unwrap_or_default().trim();
                ct.eq_ignore_ascii_case("application/json") || ct.ends_with("+json")
            });
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large(state.service.body_limit())
                } else {
                    ApiError::bad_request("could not read the request body")
                }
            })?;
        if !json && has_body && !bytes.is_empty() {
            return Err(ApiError::unsupported_media_type());
        }
        Ok(JsonBytes(bytes))
    }
}

fn chat_id(raw: &str) -> Result<chat_core::ChatId, ApiError> {
    parse_chat_id(raw)
}

/// How long a stream's response waits for the turn's first frame before its
/// head goes out alone. A running turn pushes `start` as soon as it begins
/// (within microseconds); a turn queued for admission may wait for seconds,
/// and its head should not (nor should the handler's state stay alive).
const HEAD_WAITS_FOR_FIRST_FRAME: Duration = Duration::from_millis(20);

/// The response of a stream, sent with the turn's first frame when that
/// comes within [`HEAD_WAITS_FOR_FIRST_FRAME`]: hyper writes a response's
/// head in a packet of its own when the body has nothing to add yet, one
/// packet (and one ACK back) more per stream than needed.
async fn stream_response(turn: TurnStream, keep_alive: Option<Duration>) -> Response {
    let mut frames = turn.frames;
    let first = match tokio::time::timeout(HEAD_WAITS_FOR_FIRST_FRAME, frames.next()).await {
        Ok(Some(frame)) => Some(frame),
        // Ended without a frame: the body ends at once (an ended stream is not polled again).
        Ok(None) => {
            frames = chat_core::TurnFrames::from_stream(futures::stream::empty().boxed());
            None
        }
        Err(_) => None,
    };
    let mut res = Response::new(Body::new(SseBody::new(first, frames, keep_alive)));
    for (k, v) in UI_STREAM_HEADERS {
        res.headers_mut().insert(k, HeaderValue::from_static(v));
    }
    res
}

/// The response body of a stream: the turn's frames, plus a `: keep-alive`
/// comment once two ticks (half the keep-alive period each) passed without a
/// frame (SSE parsers, the AI SDK's included, ignore comments).
///
/// One timer per stream, not a timeout per frame; and the timer is left alone
/// while it cannot be due: the body goes pending once per token, and polling
/// the timer there re-registered the task's waker with it every time.
struct SseBody {
    /// A frame read before the response was sent, to go out first.
    first: Option<Bytes>,
    frames: chat_core::TurnFrames,
    keep_alive: Option<KeepAlive>,
}

/// The keep-alive timer of an [`SseBody`].
struct KeepAlive {
    /// Half the keep-alive period.
    tick: Duration,
    /// Fires at `due`.
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// When `sleep` fires (kept here so checking it touches no timer state).
    due: tokio::time::Instant,
    /// The waker `sleep` was last polled with (`None`: poll it next time).
    armed_for: Option<Waker>,
    /// Ticks since the last frame.
    idle_ticks: u8,
}

impl SseBody {
    fn new(first: Option<Bytes>, frames: chat_core::TurnFrames, every: Option<Duration>) -> Self {
        let keep_alive = every.map(|every| {
            let tick = (every / 2).max(Duration::from_millis(1));
            let due = tokio::time::Instant::now() + tick;
            KeepAlive {
                tick,
                sleep: Box::pin(tokio::time::sleep_until(due)),
                due,
                armed_for: None,
                idle_ticks: 0,
            }
        });
        Self {
            first,
            frames,
            keep_alive,
        }
    }
}

impl KeepAlive {
    /// `Ready` when a comment is due; otherwise the timer wakes `cx` at its next tick.
    fn poll_comment(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let armed = self
            .armed_for
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if armed && tokio::time::Instant::now() < self.due {
            return Poll::Pending;
        }
        while self.sleep.as_mut().poll(cx).is_ready() {
            // A late tick counts once, and the next is a full tick after it.
            self.due = tokio::time::Instant::now() + self.tick;
            self.sleep.as_mut().reset(self.due);
            self.idle_ticks += 1;
            if self.idle_ticks >= 2 {
                self.idle_ticks = 0;
                self.armed_for = None;
                return Poll::Ready(());
            }
        }
        self.armed_for = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl axum::body::HttpBody for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if let Some(f) = this.first.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(f))));
        }
        match Pin::new(&mut this.frames).poll_next(cx) {
            Poll::Ready(Some(f)) => {
                if let Some(k) = &mut this.keep_alive {
                    k.idle_ticks = 0;
                }
                return Poll::Ready(Some(Ok(http_body::Frame::data(f))));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        match this.keep_alive.as_mut().map(|k| k.poll_comment(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Some(Ok(http_body::Frame::data(
                Bytes::from_static(b": keep-alive\n\n"),
            )))),
            _ => Poll::Pending,
        }
    }
}

/// Creates a chat.
#[utoipa::path(post, path = "/api/chat", tag = "chats",
    request_body(content = Option<crate::dto::CreateChatRequest>, content_type = "application/json"),
    responses((status = 200, body = CreateChatResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user = %user.0))]
async fn create_chat(
    State(s): State<AppState>,
    user: AuthUser,
    JsonBytes(body): JsonBytes,
) -> Result<Json<CreateChatResponse>, ApiError> {
    s.service.create_chat(&user.0, &body).await.map(Json)
}

/// Lists the caller's chats, most recently updated first.
#[utoipa::path(get, path = "/api/chat", tag = "chats", params(ListQuery),
    responses((status = 200, body = ChatListResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user = %user.0))]
async fn list_chats(
    State(s): State<AppState>,
    user: AuthUser,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ChatListResponse>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::bad_request(format!("Invalid query: {}", e.body_text())))?;
    s.service
        .list_chats(&user.0, q.limit, q.cursor.as_deref())
        .await
        .map(Json)
}

/// The chat's messages in the seed's shape (`content` = JSON string of parts).
#[utoipa::path(get, path = "/api/chat/{chatId}/history", tag = "chats",
    params(("chatId" = String, Path)),
    responses((status = 200, body = HistoryResponse), (status = 404, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user = %user.0, chat = %raw))]
async fn history(
    State(s): State<AppState>,
    user: AuthUser,
    Path(raw): Path<String>,
) -> Result<Json<HistoryResponse>, ApiError> {
    s.service.history(&user.0, &chat_id(&raw)?).await.map(Json)
}

/// The chat's messages as AI SDK `UIMessage`s.
#[utoipa::path(get, path = "/api/chat/{chatId}/messages", tag = "chats",
    params(("chatId" = String, Path)),
    responses((status = 200, body = MessagesResponse), (status = 404, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user = %user.0, chat = %raw))]
async fn messages(
    State(s): State<AppState>,
    user: AuthUser,
    Path(raw): Path<String>,
) -> Result<Json<MessagesResponse>, ApiError> {
    s.service.messages(&user.0, &chat_id(&raw)?).await.map(Json)
}

/// Deletes the chat and its messages (a running generation is stopped).
#[utoipa::path(delete, path = "/api/chat/{chatId}", tag = "chats",
    params(("chatId" = String, Path)),
    responses((status = 200, body = DeleteResponse), (status = 404, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user = %user.0, chat = %raw))]
async fn delete_chat(
    State(s): State<AppState>,
    user: AuthUser,
    Path(raw): Path<String>,
) -> Result<Json<DeleteResponse>, ApiError> {
    s.service.delete(&user.0, &chat_id(&raw)?).await.map(Json)
}

/// Sends a user message and streams the answer (AI SDK UI message stream).
#[utoipa::path(post, path = "/api/chat/{chatId}/messages", tag = "stream",
    params(("chatId" = String, Path)),
    request_body(content = crate::dto::SendMessageBody, content_type = "application/json"),
    responses((status = 200, description = "UI message stream", content_type = "text/event-stream", body = String),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user = %user.0, chat = %raw))]
async fn send(
    State(s): State<AppState>,
    user: AuthUser,
    Path(raw): Path<String>,
    JsonBytes(body): JsonBytes,
) -> Result<Response, ApiError> {
    let chat = chat_id(&raw)?;
    let request = crate::parse_send_body(&chat, &body)?;
    // The body shares hyper's read buffer: held across the store write below,
    // it made hyper allocate a second 8 KiB buffer per connection meanwhile.
    drop(body);
    let turn = s.service.send_parsed(&user.0, &chat, request).await?;
    Ok(stream_response(turn, s.keep_alive).await)
}

/// Resumes the running generation (replay from its start, then live); 204 when none runs.
#[utoipa::path(get, path = "/api/chat/{chatId}/stream", tag = "stream",
    params(("chatId" = String, Path)),
    responses((status = 200, description = "UI message stream", content_type = "text/event-stream", body = String),
        (status = 204, description = "No generation is running"), (status = 404, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user = %user.0, chat = %raw))]
async fn resume(
    State(s): State<AppState>,
    user: AuthUser,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    match s.service.resume(&user.0, &chat_id(&raw)?).await? {
        Some(turn) => Ok(stream_response(turn, s.keep_alive).await),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// Stops the running generation; what was generated so far is kept.
#[utoipa::path(post, path = "/api/chat/{chatId}/stop", tag = "stream",
    params(("chatId" = String, Path)),
    responses((status = 200, body = StopResponse), (status = 404, body = ErrorBody)))]
#[tracing::instrument(skip_all, fields(user = %user.0, chat = %raw))]
async fn stop(
    State(s): State<AppState>,
    user: AuthUser,
    Path(raw): Path<String>,
) -> Result<Json<StopResponse>, ApiError> {
    s.service.stop(&user.0, &chat_id(&raw)?).await.map(Json)
}

/// Liveness probe.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_json().unwrap_or_default(),
    )
        .into_response()
}

/// A JSON 404 for unknown routes; use it as your app's fallback if you like.
#[allow(clippy::unused_async)] // an axum handler must be async
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Not found")
}

/// The OpenAPI document of the contract, generated from the handlers and types.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "chat-rs HTTP API", description = "Chats, history and the AI SDK UI message stream"),
    paths(create_chat, list_chats, history, messages, delete_chat, send, resume, stop, healthz),
    tags((name = "chats"), (name = "stream"), (name = "ops"))
)]
pub struct ApiDoc;

/// What `TraceLayer::new_for_http()` records for a request (a `request`
/// span, debug events when it starts and when its response starts), without
/// wrapping the response body.
async fn trace_stream_request(req: Request, next: axum::middleware::Next) -> Response {
    let span = tracing::debug_span!("request", method = %req.method(), uri = %req.uri(), version = ?req.version());
    async move {
        let started = std::time::Instant::now();
        tracing::debug!("started processing request");
        let res = next.run(req).await;
        tracing::debug!(
            status = res.status().as_u16(),
            latency_ms = started.elapsed().as_millis(),
            "finished processing request; the stream follows"
        );
        if res.status().is_server_error() {
            tracing::error!(status = res.status().as_u16(), "response failed");
        }
        res
    }
    .instrument(span)
    .await
}

/// The whole contract with default options.
pub fn router(service: ChatService) -> Router {
    router_with(service, RouterOptions::default())
}

/// The whole contract: `/api/*`, `/healthz`, `/openapi.json`.
pub fn router_with(service: ChatService, options: RouterOptions) -> Router {
    let body_limit = service.body_limit();
    let state = AppState {
        service,
        keep_alive: options.keep_alive,
    };
    // Non-streaming routes get a timeout; streams live as long as their turn.
    let json = Router::new()
        .route("/api/chat", post(create_chat).get(list_chats))
        .route("/api/chat/{chat_id}", axum::routing::delete(delete_chat))
        .route("/api/chat/{chat_id}/history", get(history))
        .route("/api/chat/{chat_id}/stop", post(stop))
        .route("/api/chat/{chat_id}/messages", get(messages))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            options.request_timeout,
        ));
    let json = json
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi_json))
        .layer(TraceLayer::new_for_http());
    // Streams get the same request span and events but no body wrapper: the
    // trace layer's body stood between hyper and every token's frame (the
    // turn logs how it ended).
    let streams = Router::new()
        .route("/api/chat/{chat_id}/messages", post(send))
        .route("/api/chat/{chat_id}/stream", get(resume))
        .layer(axum::middleware::from_fn(trace_stream_request));
    let mut app = Router::new()
        .merge(json)
        .merge(streams)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state);
    if let Some(cors) = options.cors {
        app = app.layer(cors);
    }
    app
}

/// Settings of [`serve_with`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Most bytes a request's head (request line and headers) may take; a
    /// larger head is answered `431`. It is also the size of each
    /// connection's read buffer. Default 8 KiB, hyper's least (a smaller
    /// value is raised to it).
    pub max_request_head_bytes: usize,
    /// How long a client may take to send a request's head. Default 30 s.
    pub header_read_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_request_head_bytes: 8 * 1024,
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `app` on `listener` over HTTP/1 until `shutdown` completes, then
/// stops accepting, lets requests in flight end (a stream ends when its turn
/// does) and returns. Like `axum::serve`, with [`ServeOptions::default`].
///
/// ```no_run
/// # async fn demo(app: axum::Router) -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// chat_http::axum::serve(listener, app, async { let _ = tokio::signal::ctrl_c().await; }).await
/// # }
/// ```
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve_with(listener, app, shutdown, ServeOptions::default()).await
}

/// [`serve`] with settings. What it does that `axum::serve` does not:
/// - a connection's read buffer stays at `max_request_head_bytes`: with
///   hyper's defaults it grows to 16 KiB at a keep-alive connection's second
///   request (hyper reserves 8 KiB past what is buffered), 164 MB of the
///   heap at 10,000 open connections;
/// - `TCP_NODELAY` on every connection: each stream frame is small, and
///   Nagle's algorithm would hold it for the client's delayed ACK.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
    options: ServeOptions,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(options.max_request_head_bytes.max(8 * 1024))
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            // The client went away between connecting and being accepted.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors or similar: wait for some to close
                // instead of spinning.
                tracing::error!(error = %e, "accept failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        let conn = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Errors of one connection (not of the listener) that `accept` reports.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
