//! Streaming multi-session chat, the loss-free core.
//!
//! chat-core owns the types (AI SDK `UIMessage` and UI stream chunks), the
//! three seams ([`MessageStore`], [`ModelProvider`], [`ChatSession`]) and the
//! turn state machine that makes every exit path persist what was produced.
//! Adapters (sqlx, D1, OpenAI, HTTP) only translate.
//!
//! ```
//! # #[cfg(not(target_arch = "wasm32"))]
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use chat_core::{ChatSession, DemoModel, InMemoryStore, LocalSessions, MessageStore,
//!     NewChat, ChatId, MessageId, SendRequest, UiMessage, UserId, TurnConfig, now_ms};
//! use futures::StreamExt;
//!
//! let store = Arc::new(InMemoryStore::new());
//! let sessions = LocalSessions::new(store.clone(), Arc::new(DemoModel::new(3)), TurnConfig::default());
//! let user = UserId::new("alice").unwrap();
//! let chat = store.create_chat(&user, NewChat { id: ChatId::new(), title: None, created_at: now_ms() }).await.unwrap();
//! let msg = UiMessage::user_text(MessageId::new(), "Hello!");
//! let mut turn = sessions.send(&user, &chat.id, SendRequest::submit(msg)).await.unwrap();
//! while let Some(frame) = turn.frames.next().await {
//!     print!("{}", String::from_utf8_lossy(&frame)); // data: {"type":"text-delta",...}
//! }
//! let history = sessions.history(&user, &chat.id).await.unwrap();
//! assert_eq!(history[1].text(), "tok0 tok1 tok2 ");
//! # });
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

#[cfg(not(target_arch = "wasm32"))]
mod admission;
pub mod buffer;
pub mod chunk;
pub mod coord;
#[cfg(not(target_arch = "wasm32"))]
pub mod coordinated;
pub mod demo;
pub mod error;
pub mod history;
#[cfg(not(target_arch = "wasm32"))]
mod history_cache;
pub mod ids;
#[cfg(not(target_arch = "wasm32"))]
pub mod local;
pub mod memory;
pub mod message;
pub mod model;
#[cfg(not(target_arch = "wasm32"))]
mod owner_cache;
pub mod session;
pub mod sse;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod title;
pub mod tool;
pub mod turn;
pub mod validate;

#[cfg(not(target_arch = "wasm32"))]
pub use admission::AdaptiveAdmission;
pub use buffer::TurnBuffer;
pub use chunk::UiChunk;
pub use coord::{CoordError, InProcessCoordinator, Lease, RunningTurn, TurnCoordinator};
#[cfg(not(target_arch = "wasm32"))]
pub use coordinated::{CoordinatedSessions, CoordinationSettings};
pub use demo::{DemoModel, DemoScript};
pub use error::{BoxError, Error, ModelError, StoreError, ToolError, ValidationError};
pub use history::History;
#[cfg(not(target_arch = "wasm32"))]
pub use history_cache::DEFAULT_HISTORY_CACHE_BYTES;
pub use ids::{ChatId, MessageId, UserId};
#[cfg(not(target_arch = "wasm32"))]
pub use local::LocalSessions;
pub use memory::InMemoryStore;
pub use message::{
    FinishReason, MessageMetadata, Part, Role, TextPart, TextState, ToolPart, ToolState, UiMessage,
    Usage,
};
pub use model::{Conversation, ModelEvent, ModelProvider, ModelRequest, ModelStream};
pub use session::{ChatSession, SendRequest, Trigger, TurnFrames, TurnStream};
pub use sse::{SseEncoder, UI_STREAM_HEADERS, parse_sse};
pub use store::{
    Chat, ChatCursor, ChatPage, MessageStatus, MessageStore, NewChat, PageRequest, StoredMessage,
    listed_history,
};
pub use title::title_from_text;
pub use tool::{Tool, ToolContext, ToolSet, ToolSpec};
pub use turn::{BufferSink, ChunkSink, PreparedTurn, TurnConfig, TurnOutcome, TurnRunner};
pub use validate::Limits;

/// `Send + Sync` on native targets; nothing on wasm32, where JS handles are neither.
#[cfg(not(target_arch = "wasm32"))]
pub trait MaybeSendSync: Send + Sync {}
#[cfg(not(target_arch = "wasm32"))]
impl<T: Send + Sync + ?Sized> MaybeSendSync for T {}
/// `Send + Sync` on native targets; nothing on wasm32, where JS handles are neither.
#[cfg(target_arch = "wasm32")]
pub trait MaybeSendSync {}
#[cfg(target_arch = "wasm32")]
impl<T: ?Sized> MaybeSendSync for T {}

/// A boxed stream: `Send` on native targets, local on wasm32.
#[cfg(not(target_arch = "wasm32"))]
pub type BoxStream<'a, T> = futures::stream::BoxStream<'a, T>;
/// A boxed stream: `Send` on native targets, local on wasm32.
#[cfg(target_arch = "wasm32")]
pub type BoxStream<'a, T> = futures::stream::LocalBoxStream<'a, T>;

/// The current time in Unix epoch milliseconds (works on wasm32 too).
pub fn now_ms() -> i64 {
    web_time::SystemTime::now()
        .duration_since(web_time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Sleeps on the platform's timer (tokio natively, the JS event loop on wasm32).
pub async fn sleep(duration: std::time::Duration) {
    #[cfg(not(target_arch = "wasm32"))]
    tokio::time::sleep(duration).await;
    #[cfg(target_arch = "wasm32")]
    futures_timer::Delay::new(duration).await;
}
