//! `MessageStore` for chat-core on SQLite and PostgreSQL, through sqlx.
//!
//! One implementation of the store rules (user-scoped SQL, idempotent
//! upserts, per-chat sequence ordering, keyset pagination, fenced writes),
//! instantiated for each backend; migrations are embedded per backend.
//!
//! ```no_run
//! # async fn demo() -> Result<(), chat_core::StoreError> {
//! let store = chat_store_sqlx::connect("sqlite://chat.db").await?; // or postgres://...
//! store.migrate().await?;
//! let store: std::sync::Arc<dyn chat_core::MessageStore> = store.into_dyn();
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod batch;
#[cfg(feature = "coordination")]
pub mod coordination;
mod error;
mod pool;
#[cfg(feature = "postgres")]
mod postgres;
mod schema;
#[cfg(feature = "sqlite")]
mod sqlite;
mod store;

use std::sync::Arc;

use chat_core::{MessageStore, StoreError};

#[cfg(feature = "coordination")]
pub use coordination::{PgCoordinator, PgCoordinatorSettings};

#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
pub use sqlx;
pub use store::DEFAULT_MAX_ROW_BYTES;

/// A store on whichever backend the URL named.
#[derive(Debug, Clone)]
pub enum SqlStore {
    /// SQLite.
    #[cfg(feature = "sqlite")]
    Sqlite(SqliteStore),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(PostgresStore),
}

/// Connects to `url`: `sqlite://path`, `sqlite:path`, `sqlite::memory:` or
/// `postgres://...` / `postgresql://...`. Run [`SqlStore::migrate`] before use.
pub async fn connect(url: &str) -> Result<SqlStore, StoreError> {
    #[cfg(feature = "sqlite")]
    if url.starts_with("sqlite:") {
        return SqliteStore::connect(url).await.map(SqlStore::Sqlite);
    }
    #[cfg(feature = "postgres")]
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return PostgresStore::connect(url).await.map(SqlStore::Postgres);
    }
    Err(StoreError::Invalid(format!(
        "unsupported database URL scheme in `{}` (expected sqlite: or postgres://)",
        url.split(':').next().unwrap_or_default()
    )))
}

impl SqlStore {
    /// Applies the backend's embedded migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            #[cfg(feature = "sqlite")]
            SqlStore::Sqlite(s) => s.migrate().await,
            #[cfg(feature = "postgres")]
            SqlStore::Postgres(s) => s.migrate().await,
        }
    }

    /// The backend's name (`sqlite` or `postgres`).
    pub fn backend(&self) -> &'static str {
        match self {
            #[cfg(feature = "sqlite")]
            SqlStore::Sqlite(_) => "sqlite",
            #[cfg(feature = "postgres")]
            SqlStore::Postgres(_) => "postgres",
        }
    }

    /// Closes all connections.
    pub async fn close(&self) {
        match self {
            #[cfg(feature = "sqlite")]
            SqlStore::Sqlite(s) => s.close().await,
            #[cfg(feature = "postgres")]
            SqlStore::Postgres(s) => s.close().await,
        }
    }

    /// The store as a shareable trait object.
    pub fn into_dyn(self) -> Arc<dyn MessageStore> {
        match self {
            #[cfg(feature = "sqlite")]
            SqlStore::Sqlite(s) => Arc::new(s),
            #[cfg(feature = "postgres")]
            SqlStore::Postgres(s) => Arc::new(s),
        }
    }
}
