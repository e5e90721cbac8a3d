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
    /// A pooled connection is checked (pinged) when it comes back to the
    /// pool, and before it is handed out only after 1 s idle.
    pub async fn connect_with(
        opts: PgConnectOptions,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let pool = crate::pool::checked_when_stale(PgPoolOptions::new())
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
        // The pool waits for every connection to come back, the writer's too.
        crate::batch::RowWriter::idle(self.queue.writer());
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
    lookup = LateralForUpdate,
    numbered = true,
    // The statement advances the chat itself (migration 0005 drops the trigger).
    touch_chats = true,
    // A batch is formed and sent while the previous one waits for its
    // commit's fsync (the server flushes both WAL records with one).
    lanes = 2,
    // Each lane keeps its connection while writes keep coming.
    hold = DEDICATED
);

#[cfg(test)]
mod tests {
    use sqlx::{Connection as _, Executor as _, PgConnection, Row as _};

    use super::*;
    use crate::batch::{CHUNK_SIZES, HoldPolicy, MAX_BATCH};

    /// The test server (`TEST_POSTGRES_URL`); `None` when it is unreachable
    /// outside CI (under CI=true that is a failure).
    async fn admin() -> Option<(PgConnection, String)> {
        let url = std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        match PgConnection::connect(&url).await {
            Ok(c) => Some((c, url)),
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "Postgres at {url} is unreachable under CI=true: {e}"
                );
                eprintln!("!!! SKIPPING Postgres test: {url} unreachable ({e})");
                None
            }
        }
    }

    /// A store in a schema of its own, dropped by [`Scratch::drop_schema`].
    struct Scratch {
        admin: PgConnection,
        schema: String,
        opts: PgConnectOptions,
        store: PostgresStore,
    }

    /// A migrated store with a pool of `max_connections` in a new schema;
    /// `None` as for [`admin`].
    async fn scratch(max_connections: u32) -> Option<Scratch> {
        let (mut admin, url) = admin().await?;
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .await
            .expect("create schema");
        let opts = PgConnectOptions::from_str(&url)
            .expect("url")
            .options([("search_path", schema.as_str())]);
        let store = PostgresStore::connect_with(opts.clone(), max_connections)
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        Some(Scratch {
            admin,
            schema,
            opts,
            store,
        })
    }

    impl Scratch {
        /// A chat of a user `alice`.
        async fn alice_chat(&self) -> (chat_core::UserId, chat_core::ChatId) {
            use chat_core::MessageStore as _;
            let user = chat_core::UserId::new("alice").expect("user");
            let chat = self
                .store
                .create_chat(
                    &user,
                    chat_core::NewChat {
                        id: chat_core::ChatId::new(),
                        title: None,
                        created_at: 1,
                    },
                )
                .await
                .expect("chat");
            (user, chat.id)
        }

        async fn drop_schema(mut self) {
            self.store.close().await;
            self.admin
                .execute(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA {} CASCADE",
                    self.schema
                )))
                .await
                .expect("drop schema");
        }
    }

    /// The message writer keeps one pool connection between writes (no
    /// health-check round trips in front of each batch), gives it back
    /// after its idle grace, and never keeps `close` waiting.
    #[tokio::test]
    async fn the_writer_keeps_its_connection_between_writes_and_gives_it_back() {
        use chat_core::{MessageId, MessageStatus, MessageStore as _, StoredMessage, UiMessage};
        let Some(scratch) = scratch(4).await else {
            return;
        };
        let (user, chat) = scratch.alice_chat().await;
        let store = &scratch.store;
        let checked_out = |s: &PostgresStore| s.pool().size() as usize - s.pool().num_idle();
        let message = |i: i64| StoredMessage {
            message: UiMessage::user_text(MessageId::new(), format!("hello {i}")),
            created_at: i,
            updated_at: i,
            status: MessageStatus::Complete,
        };
        for i in 0..5 {
            store
                .upsert_message(&user, &chat, &message(i))
                .await
                .expect("write");
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(checked_out(store), 1, "the writer holds one connection");
        }
        tokio::time::sleep(HoldPolicy::DEDICATED.idle_grace + Duration::from_millis(500)).await;
        assert_eq!(checked_out(store), 0, "given back after the idle grace");

        store
            .upsert_message(&user, &chat, &message(9))
            .await
            .expect("write");
        assert_eq!(checked_out(store), 1);
        tokio::time::timeout(HoldPolicy::DEDICATED.idle_grace / 2, store.close())
            .await
            .expect("close does not wait for the writer's idle grace");
        assert_eq!(
            store
                .load_messages(&user, &chat)
                .await
                .map(|m| m.len())
                .ok(),
            None,
            "closed"
        );
        scratch.drop_schema().await;
    }

    /// A pooled connection that sat idle past the ping window is checked
    /// before use: one whose server process went away is replaced, and the
    /// read succeeds.
    #[tokio::test]
    async fn a_stale_pooled_connection_whose_server_went_away_is_replaced() {
        use chat_core::MessageStore as _;
        let Some(mut scratch) = scratch(1).await else {
            return;
        };
        let (user, chat) = scratch.alice_chat().await;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(scratch.store.pool())
            .await
            .expect("pid");
        tokio::time::sleep(crate::pool::PING_IF_IDLE_FOR + Duration::from_millis(200)).await;
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&mut scratch.admin)
            .await
            .expect("terminate");
        assert!(killed);
        scratch
            .store
            .get_chat(&user, &chat)
            .await
            .expect("read on a new connection");
        let new_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(scratch.store.pool())
            .await
            .expect("pid");
        assert_ne!(pid, new_pid);
        scratch.drop_schema().await;
    }

    /// Every batch size looks its chats up by key, in the insert and in the
    /// chat update: no statement reads the whole `chats` table (a plain join
    /// made Postgres hash all 5,000 chats here for 32 rows and more).
    #[tokio::test]
    async fn batch_upserts_look_chats_up_by_key() {
        let Some(scratch) = scratch(2).await else {
            return;
        };
        let mut conn = PgConnection::connect_with(&scratch.opts)
            .await
            .expect("connect");
        conn.execute(
            "INSERT INTO chats (id, user_id, created_at, updated_at) \
             SELECT 'chat-' || i, 'user-' || i, 0, 0 FROM generate_series(1, 5000) AS i",
        )
        .await
        .expect("chats");
        conn.execute("ANALYZE chats").await.expect("analyze");

        for rows in CHUNK_SIZES {
            assert!(rows <= MAX_BATCH);
            let sql = BatchWriter::upsert_sql(rows).expect("a statement per chunk size");
            let mut q = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN (COSTS OFF) {sql}")));
            for r in 0..rows {
                q = q
                    .bind(format!("message-{r}"))
                    .bind(format!("chat-{}", r + 1))
                    .bind(format!("user-{}", r + 1))
                    .bind("assistant")
                    .bind("[]")
                    .bind(None::<String>)
                    .bind("streaming")
                    .bind(None::<String>)
                    .bind(1_i64)
                    .bind(1_i64);
            }
            let plan: Vec<String> = q
                .fetch_all(&mut conn)
                .await
                .expect("explain")
                .iter()
                .map(|row| row.get::<String, _>(0))
                .collect();
            let plan = plan.join("\n");
            assert!(
                !plan.contains("Seq Scan on chats"),
                "a batch of {rows} reads every chat:\n{plan}"
            );
            assert!(plan.contains("chats_pkey"), "{plan}");
        }

        drop(conn);
        scratch.drop_schema().await;
    }
}
