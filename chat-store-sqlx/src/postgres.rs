//! PostgreSQL backend: one pool, prepared statements (cached per connection),
//! the chat row locked for the duration of a message write, concurrent
//! message writes group-committed (one statement and one commit per batch,
//! see `batch`).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chat_core::StoreError;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::batch::WriteQueue;
use crate::store::{DEFAULT_MAX_ROW_BYTES, message_store_impl};

/// Chats and messages in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    pub(crate) max_row_bytes: usize,
    /// Group commit of message writes (shared by clones).
    queue: Arc<WriteQueue<BatchWriter>>,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://...`).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let opts = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Invalid(format!("bad Postgres URL: {e}")))?;
        Self::connect_with(opts, 16).await
    }

    /// Connects with explicit options (e.g. a `search_path`) and pool size.
    pub async fn connect_with(
        opts: PgConnectOptions,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(crate::error::map)?;
        Ok(Self::from_pool(pool))
    }

    /// Wraps an existing pool.
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            queue: Arc::new(WriteQueue::new(BatchWriter::new(pool.clone()))),
            pool,
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
        }
    }

    /// Sets the largest encoded message accepted (default 4 MiB).
    #[must_use]
    pub fn with_max_row_bytes(mut self, bytes: usize) -> Self {
        self.max_row_bytes = bytes;
        self
    }

    /// Applies the embedded migrations (`migrations/postgres`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(StoreError::backend)
    }

    /// The pool (shared with e.g. a Postgres coordinator).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes all connections.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) fn reader(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn writer(&self) -> &PgPool {
        &self.pool
    }
}

message_store_impl!(
    PostgresStore,
    db = sqlx::Postgres,
    pool = PgPool,
    greatest = "GREATEST",
    lock = " FOR UPDATE OF c",
    numbered = true,
    // The statement advances the chat itself (migration 0005 drops the trigger).
    touch_chats = true,
    // A batch is formed and sent while the previous one waits for its
    // commit's fsync (the server flushes both WAL records with one).
    lanes = 2
);
