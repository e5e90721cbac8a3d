//! SQLite backend: WAL, synchronous=NORMAL, foreign keys on, one writer
//! connection (so concurrent writers queue instead of failing with SQLITE_BUSY;
//! concurrent message writes are group-committed, see `batch`) and a pool of
//! readers.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chat_core::StoreError;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::batch::WriteQueue;
use crate::store::{DEFAULT_MAX_ROW_BYTES, message_store_impl};

/// Bytes of the database file mapped into memory for reads (address space, not RSS).
const MMAP_BYTES: u64 = 256 * 1024 * 1024;

/// WAL pages written before the writer copies them back into the database
/// (SQLite's default is 1,000). Message writes touch pages all over the
/// indexes (random ids); a longer WAL lets a checkpoint write each hot page
/// once for many commits: ~1.3x the append rate measured here, for a WAL of
/// up to ~32 MiB.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 8_000;

/// Chats and messages in SQLite.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    reader: SqlitePool,
    writer: SqlitePool,
    pub(crate) max_row_bytes: usize,
    /// Group commit of message writes (shared by clones).
    queue: Arc<WriteQueue<BatchWriter>>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`,
    /// `sqlite:path` or `sqlite::memory:`), tuned for a server.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Invalid(format!("bad SQLite URL: {e}")))?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            .synchronous(SqliteSynchronous::Normal);
        if memory {
            // One connection is the whole database: share it for reads and writes.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(opts)
                .await
                .map_err(crate::error::map)?;
            return Ok(Self::from_pools(pool.clone(), pool));
        }
        // Memory-mapped reads: in WAL mode every write by the writer makes the
        // readers drop their page cache at their next transaction, so without
        // mmap each history load re-reads its pages with one pread() per page.
        let opts = opts
            .journal_mode(SqliteJournalMode::Wal)
            .pragma("mmap_size", MMAP_BYTES.to_string());
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(
                opts.clone()
                    .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string()),
            )
            .await
            .map_err(crate::error::map)?;
        let readers = std::thread::available_parallelism()
            .map_or(4, |n| n.get() * 2)
            .max(4) as u32;
        let reader = SqlitePoolOptions::new()
            .max_connections(readers)
            .connect_with(opts.read_only(true))
            .await
            .map_err(crate::error::map)?;
        Ok(Self::from_pools(reader, writer))
    }

    fn from_pools(reader: SqlitePool, writer: SqlitePool) -> Self {
        Self {
            queue: Arc::new(WriteQueue::new(BatchWriter::new(writer.clone()))),
            reader,
            writer,
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
        }
    }

    /// Sets the largest encoded message accepted (default 4 MiB).
    #[must_use]
    pub fn with_max_row_bytes(mut self, bytes: usize) -> Self {
        self.max_row_bytes = bytes;
        self
    }

    /// Applies the embedded migrations (`migrations/sqlite`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.writer)
            .await
            .map_err(StoreError::backend)
    }

    /// Closes all connections.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    pub(crate) fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    pub(crate) fn writer(&self) -> &SqlitePool {
        &self.writer
    }
}

message_store_impl!(
    SqliteStore,
    pool = SqlitePool,
    greatest = "MAX",
    lock = "",
    numbered = false
);
