//! Cloudflare Workers backend of chat-rs (wasm32 only): [`D1Store`], the
//! [`MessageStore`](chat_core::MessageStore) on D1 with the same schema as
//! chat-store-sqlx's SQLite migrations (`migrations/`, applied with
//! `wrangler d1 migrations apply`), [`ChatRoom`], the Durable Object that runs
//! one chat's live turn, and [`DoSessions`], the Worker-side
//! [`ChatSession`](chat_core::ChatSession) that checks ownership in D1 and then
//! talks to the chat's DO by a server-built name.
//!
//! On the host the crate is empty, so `cargo test --workspace` never builds `worker`.
#![cfg(target_arch = "wasm32")]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod room;
pub mod sessions;
pub mod store;
pub mod wire;

pub use room::{ChatRoom, DEFAULT_RECOVERY_ALARM, RoomSettings};
pub use sessions::{DoSessions, room_name};
pub use store::{D1Error, D1Store};
