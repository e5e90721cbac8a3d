//! The chat HTTP contract (`shared/api.md`) as a Cloudflare Worker in Rust.
//!
//! The stateless Worker authenticates (dev header or HS256 JWT), validates,
//! answers chat CRUD from D1 ([`chat_store_d1::D1Store`]) and, for everything
//! about a chat's messages, checks ownership in D1 and forwards to that chat's
//! Durable Object ([`ChatDo`], named `{userId}:{chatId}` by the server), which
//! runs the turn and streams the AI SDK UI message stream.
//!
//! Settings (`[vars]` / secrets): `AUTH` (`dev-header` | `jwt`),
//! `CHAT_JWT_SECRET`, `MODEL` (`demo` | `openai`, default `openai` when the
//! `OPENAI_API_KEY` secret is set), `OPENAI_BASE_URL`, `OPENAI_MODEL`, and
//! `TOKENS` / `TOKEN_DELAY_MS` for the demo model.
#![cfg(target_arch = "wasm32")]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// wasm32 is single-threaded: the `Arc`s chat-core's traits ask for hold JS handles.
#![allow(clippy::arc_with_non_send_sync)]

mod log;

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use chat_core::{
    DemoModel, MessageStore, ModelProvider, TurnConfig, TurnStream, UI_STREAM_HEADERS,
};
use chat_http::{ApiError, Authenticator, ChatService, DevHeaderAuth, JwtAuth, parse_chat_id};
use chat_llm_openai::OpenAiProvider;
use chat_store_d1::{ChatRoom, D1Store, DEFAULT_RECOVERY_ALARM, DoSessions, RoomSettings};
use futures::StreamExt;
use worker::{Context, Env, Headers, Method, Request, Response, State, event};

/// Name of the D1 binding in `wrangler.toml`.
const D1_BINDING: &str = "DB";
/// Name of the Durable Object binding in `wrangler.toml`.
const ROOM_BINDING: &str = "CHAT_ROOM";
/// The OpenAPI document (the same as the Axum router's; a host test keeps it in sync).
const OPENAPI_JSON: &str = include_str!("../openapi.json");

thread_local! {
    /// The authenticator, built once per isolate (not per request).
    static AUTH: RefCell<Option<Arc<dyn Authenticator>>> = const { RefCell::new(None) };
}

fn var(env: &Env, name: &str) -> Option<String> {
    env.var(name).ok().map(|v| v.to_string())
}

fn authenticator(env: &Env) -> Result<Arc<dyn Authenticator>, ApiError> {
    if let Some(a) = AUTH.with(|a| a.borrow().clone()) {
        return Ok(a);
    }
    let auth: Arc<dyn Authenticator> = match var(env, "AUTH").as_deref() {
        None | Some("dev-header") => Arc::new(DevHeaderAuth::new()),
        Some("jwt") => {
            let secret = env
                .secret("CHAT_JWT_SECRET")
                .map(|s| s.to_string())
                .map_err(|_| {
                    tracing::error!("AUTH=jwt needs the CHAT_JWT_SECRET secret");
                    internal()
                })?;
            Arc::new(JwtAuth::hs256(secret.as_bytes()))
        }
        Some(other) => {
            tracing::error!(auth = other, "unknown AUTH (expected dev-header or jwt)");
            return Err(internal());
        }
    };
    AUTH.with(|a| *a.borrow_mut() = Some(auth.clone()));
    Ok(auth)
}

fn internal() -> ApiError {
    ApiError::new(
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "Internal server error",
    )
}

fn demo_model(env: &Env) -> DemoModel {
    let tokens = var(env, "TOKENS")
        .and_then(|t| t.parse().ok())
        .unwrap_or(64);
    let delay = var(env, "TOKEN_DELAY_MS")
        .and_then(|t| t.parse().ok())
        .unwrap_or(20);
    DemoModel::new(tokens).with_delay(Duration::from_millis(delay))
}

/// `MODEL` = `demo` | `openai` (default: `openai` when the `OPENAI_API_KEY`
/// secret is set, else `demo`); `OPENAI_BASE_URL`, `OPENAI_MODEL` as for the server.
fn model(env: &Env) -> Result<Arc<dyn ModelProvider>, String> {
    let read = |name: &str| {
        env.secret(name)
            .ok()
            .map(|s| s.to_string())
            .or_else(|| var(env, name))
            .filter(|v| !v.trim().is_empty())
    };
    let key = read("OPENAI_API_KEY");
    match var(env, "MODEL").as_deref() {
        Some("demo") => Ok(Arc::new(demo_model(env))),
        None if key.is_none() => Ok(Arc::new(demo_model(env))),
        None | Some("openai") => OpenAiProvider::from_vars(read)
            .map(|p| Arc::new(p) as Arc<dyn ModelProvider>)
            .map_err(|e| format!("MODEL=openai: {e}")),
        Some(other) => Err(format!("unknown MODEL `{other}` (expected demo or openai)")),
    }
}

fn service(env: &Env) -> Result<ChatService, ApiError> {
    let store = D1Store::from_env(env, D1_BINDING).map_err(|e| {
        tracing::error!(error = %e, "no D1 binding");
        internal()
    })?;
    let rooms = env.durable_object(ROOM_BINDING).map_err(|e| {
        tracing::error!(error = %e, "no Durable Object binding");
        internal()
    })?;
    let sessions = Arc::new(DoSessions::new(store.clone(), rooms));
    let store: Arc<dyn MessageStore> = Arc::new(store);
    Ok(ChatService::new(store, sessions, authenticator(env)?))
}

fn error_response(e: &ApiError) -> worker::Result<Response> {
    let headers = Headers::new();
    headers.set("content-type", "application/json")?;
    Ok(Response::from_bytes(e.body())?
        .with_status(e.status.as_u16())
        .with_headers(headers))
}

fn json<T: serde::Serialize>(value: &T) -> Result<Response, ApiError> {
    Response::from_json(value).map_err(|e| {
        tracing::error!(error = %e, "response did not serialize");
        internal()
    })
}

fn stream_response(turn: TurnStream) -> Result<Response, ApiError> {
    let frames = turn
        .frames
        .map(|b| Ok::<Vec<u8>, worker::Error>(b.to_vec()));
    let headers = Headers::new();
    for (k, v) in UI_STREAM_HEADERS {
        headers.set(k, v).map_err(|_| internal())?;
    }
    Ok(Response::from_stream(frames)
        .map_err(|_| internal())?
        .with_headers(headers))
}

/// The request as `http` parts, for the [`Authenticator`].
fn parts(req: &Request) -> Result<http::request::Parts, ApiError> {
    let mut builder = http::Request::builder().uri(req.path());
    for (k, v) in req.headers() {
        builder = builder.header(k, v);
    }
    builder
        .body(())
        .map(|r| r.into_parts().0)
        .map_err(|_| ApiError::bad_request("invalid request headers"))
}

/// A JSON body: 415 unless `application/json`, 413 over the limit.
async fn json_body(req: &mut Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    let header = |name: &str| req.headers().get(name).ok().flatten();
    if let Some(len) = header("content-length").and_then(|l| l.parse::<usize>().ok())
        && len > limit
    {
        return Err(ApiError::too_large(limit));
    }
    let is_json = header("content-type").is_some_and(|ct| {
        let ct = ct.split(';').next().unwrap_or_default().trim();
        ct.eq_ignore_ascii_case("application/json") || ct.ends_with("+json")
    });
    let body = req
        .bytes()
        .await
        .map_err(|_| ApiError::bad_request("could not read the request body"))?;
    if body.len() > limit {
        return Err(ApiError::too_large(limit));
    }
    if !is_json && !body.is_empty() {
        return Err(ApiError::unsupported_media_type());
    }
    Ok(body)
}

/// `?limit=&cursor=` of `GET /api/chat` (unknown keys are rejected, as by the Axum router).
fn list_query(req: &Request) -> Result<(Option<u32>, Option<String>), ApiError> {
    let url = req
        .url()
        .map_err(|_| ApiError::bad_request("Invalid query"))?;
    let (mut limit, mut cursor) = (None, None);
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "limit" => {
                limit = Some(v.parse::<u32>().map_err(|_| {
                    ApiError::bad_request("Invalid query: limit must be a non-negative integer")
                })?);
            }
            "cursor" => cursor = Some(v.into_owned()),
            other => {
                return Err(ApiError::bad_request(format!(
                    "Invalid query: unknown field `{other}`"
                )));
            }
        }
    }
    Ok((limit, cursor))
}

async fn handle(mut req: Request, env: &Env) -> Result<Response, ApiError> {
    let path = req.path();
    let method = req.method();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.clone(), segments.as_slice()) {
        (Method::Get, ["healthz"]) => return Response::ok("ok").map_err(|_| internal()),
        (Method::Get, ["openapi.json"]) => {
            let headers = Headers::new();
            headers
                .set("content-type", "application/json")
                .map_err(|_| internal())?;
            return Response::ok(OPENAPI_JSON)
                .map(|r| r.with_headers(headers))
                .map_err(|_| internal());
        }
        (_, ["api", "chat", ..]) => {}
        _ => return Err(ApiError::new(http::StatusCode::NOT_FOUND, "Not found")),
    }
    let route = match segments.as_slice() {
        ["api", "chat"] => Route::Chats,
        ["api", "chat", id] => Route::Chat(id.to_string(), ""),
        ["api", "chat", id, "history"] => Route::Chat(id.to_string(), "history"),
        ["api", "chat", id, "messages"] => Route::Chat(id.to_string(), "messages"),
        ["api", "chat", id, "stream"] => Route::Chat(id.to_string(), "stream"),
        ["api", "chat", id, "stop"] => Route::Chat(id.to_string(), "stop"),
        _ => return Err(ApiError::new(http::StatusCode::NOT_FOUND, "Not found")),
    };
    #[allow(clippy::unnested_or_patterns)] // one line per route reads best
    let allowed = matches!(
        (&route, &method),
        (Route::Chats, Method::Get | Method::Post)
            | (Route::Chat(_, ""), Method::Delete)
            | (Route::Chat(_, "history" | "stream"), Method::Get)
            | (Route::Chat(_, "messages"), Method::Get | Method::Post)
            | (Route::Chat(_, "stop"), Method::Post)
    );
    if !allowed {
        return Err(ApiError::new(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
        ));
    }

    let service = service(env)?;
    let user = service
        .authenticator()
        .authenticate(&parts(&req)?)
        .await
        .map_err(|e| {
            tracing::debug!(reason = e.0, "unauthenticated request");
            ApiError::unauthorized()
        })?;

    match route {
        Route::Chats if method == Method::Post => {
            let body = json_body(&mut req, service.body_limit()).await?;
            json(&service.create_chat(&user, &body).await?)
        }
        Route::Chats => {
            let (limit, cursor) = list_query(&req)?;
            json(&service.list_chats(&user, limit, cursor.as_deref()).await?)
        }
        Route::Chat(raw, sub) => {
            // Body checks (415/413) come before the id check, as in the Axum router.
            let body = if method == Method::Post && sub == "messages" {
                Some(json_body(&mut req, service.body_limit()).await?)
            } else {
                None
            };
            let chat = parse_chat_id(&raw)?;
            match (sub, body) {
                ("", _) => json(&service.delete(&user, &chat).await?),
                ("history", _) => json(&service.history(&user, &chat).await?),
                ("messages", Some(body)) => {
                    stream_response(service.send(&user, &chat, &body).await?)
                }
                ("messages", None) => json(&service.messages(&user, &chat).await?),
                ("stream", _) => match service.resume(&user, &chat).await? {
                    Some(turn) => stream_response(turn),
                    None => Response::empty()
                        .map(|r| r.with_status(204))
                        .map_err(|_| internal()),
                },
                _ => json(&service.stop(&user, &chat).await?),
            }
        }
    }
}

enum Route {
    Chats,
    Chat(String, &'static str),
}

/// The Worker's entry point.
#[event(fetch)]
async fn fetch(req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
    log::init();
    match handle(req, &env).await {
        Ok(r) => Ok(r),
        Err(e) => error_response(&e),
    }
}

pub use chat_room::ChatDo;

/// The Durable Object class (its JS glue methods come from `#[durable_object]`).
#[allow(missing_docs)] // the macro generates undocumented public glue
mod chat_room {
    use super::{
        ChatRoom, D1_BINDING, DEFAULT_RECOVERY_ALARM, Duration, Env, Request, Response,
        RoomSettings, State, TurnConfig,
    };
    use worker::{DurableObject, durable_object};

    /// The Durable Object of one chat: the live turn, its stream and its checkpoints.
    #[durable_object]
    #[derive(Debug)]
    pub struct ChatDo {
        room: ChatRoom,
    }

    impl DurableObject for ChatDo {
        fn new(state: State, env: Env) -> Self {
            crate::log::init();
            let room = match crate::model(&env) {
                Ok(model) => ChatRoom::new(
                    &state,
                    &env,
                    RoomSettings {
                        d1_binding: D1_BINDING.into(),
                        model,
                        config: TurnConfig::default(),
                        recovery_alarm: crate::var(&env, "RECOVERY_ALARM_MS")
                            .and_then(|v| v.parse().ok())
                            .map_or(DEFAULT_RECOVERY_ALARM, Duration::from_millis),
                    },
                ),
                Err(e) => ChatRoom::unavailable(e),
            };
            Self { room }
        }

        async fn fetch(&self, req: Request) -> worker::Result<Response> {
            self.room.fetch(req).await
        }

        async fn alarm(&self) -> worker::Result<Response> {
            self.room.alarm().await
        }
    }
}
