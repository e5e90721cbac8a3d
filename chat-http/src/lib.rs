//! The chat HTTP contract (`shared/api.md`): the seed's REST routes plus the
//! AI SDK UI message stream, over `http` types so native servers and the
//! Cloudflare Worker share it. Feature `axum` adds a ready [`axum::router`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use chat_core::{DemoModel, InMemoryStore, LocalSessions, MessageStore, TurnConfig};
//! use chat_http::{ChatService, DevHeaderAuth};
//!
//! let store: Arc<dyn MessageStore> = Arc::new(InMemoryStore::new());
//! let sessions = Arc::new(LocalSessions::new(store.clone(), Arc::new(DemoModel::new(64)), TurnConfig::default()));
//! let service = ChatService::new(store, sessions, Arc::new(DevHeaderAuth::new()));
//! let app = axum::Router::new().merge(chat_http::axum::router(service));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! // axum::serve works too; this one holds each connection's read buffer to 8 KiB.
//! chat_http::axum::serve(listener, app, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
#[cfg(feature = "axum")]
pub mod axum;
pub mod dto;
pub mod error;
pub mod service;

pub use auth::{AuthError, Authenticator, DevHeaderAuth, JwtAuth};
pub use error::{ApiError, ErrorBody};
pub use service::{ChatService, parse_chat_id, parse_send_body};
