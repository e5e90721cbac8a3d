//! SQLite backend: WAL, synchronous=NORMAL, foreign keys on, one writer
//! connection (so concurrent writers queue instead of failing with SQLITE_BUSY;
//! concurrent message writes are group-committed, see `batch`) and a pool of
//! readers.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chat_core::StoreError;
use sqlx::Connection as _;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};

use crate::batch::WriteQueue;
use crate::store::{DEFAULT_MAX_ROW_BYTES, message_store_impl};

/// Bytes of the database file mapped into memory for reads (address space, not RSS).
const MMAP_BYTES: u64 = 256 * 1024 * 1024;

/// WAL pages after which the writer itself checkpoints (SQLite's default is
/// 1,000). Normally the background checkpointer has copied almost all of the
/// WAL back by then, so this is a backstop that bounds the WAL (~64 MiB).
const WAL_AUTOCHECKPOINT_PAGES: u32 = 16_000;

/// How often the background checkpointer copies the WAL back into the
/// database. Checkpointing off the writer keeps its fsync and page copies
/// out of every write's latency (they stalled the writer for tens of ms).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// Chats and messages in SQLite.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    reader: SqlitePool,
    writer: SqlitePool,
    pub(crate) max_row_bytes: usize,
    /// Group commit of message writes (shared by clones).
    queue: Arc<WriteQueue<BatchWriter>>,
    /// The background WAL checkpointer (file databases), stopped with the last clone.
    checkpointer: Option<Arc<AbortOnDrop>>,
}

/// Aborts the task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Copies the WAL back into the database every [`CHECKPOINT_EVERY`] on its
/// own connection, without blocking the writer (`PASSIVE`). The WAL restarts
/// from its beginning at the next write after a checkpoint that caught up.
async fn checkpoint_loop(mut conn: SqliteConnection) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            // The writer's own autocheckpoint still bounds the WAL meanwhile.
            tracing::warn!(error = %e, "background WAL checkpoint failed");
        }
    }
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
        let writer = crate::pool::checked_when_stale(SqlitePoolOptions::new())
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
        let reader = crate::pool::checked_when_stale(SqlitePoolOptions::new())
            .max_connections(readers)
            .connect_with(opts.clone().read_only(true))
            .await
            .map_err(crate::error::map)?;
        let checkpointer = SqliteConnection::connect_with(&opts)
            .await
            .map_err(crate::error::map)?;
        let mut store = Self::from_pools(reader, writer);
        store.checkpointer = Some(Arc::new(AbortOnDrop(tokio::spawn(checkpoint_loop(
            checkpointer,
        )))));
        Ok(store)
    }

    fn from_pools(reader: SqlitePool, writer: SqlitePool) -> Self {
        Self {
            queue: Arc::new(WriteQueue::new(BatchWriter::new(writer.clone()))),
            reader,
            writer,
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
            checkpointer: None,
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

    /// Closes all connections (and stops the background checkpointer).
    pub async fn close(&self) {
        if let Some(c) = &self.checkpointer {
            c.0.abort();
        }
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
    db = sqlx::Sqlite,
    pool = SqlitePool,
    greatest = "MAX",
    lookup = Join,
    numbered = false,
    // The triggers of migration 0002 advance the chat.
    touch_chats = false,
    // One writer connection: SQLite takes one write transaction at a time.
    lanes = 1,
    // ...which the pool's other users share: given back often.
    hold = SHARED
);
