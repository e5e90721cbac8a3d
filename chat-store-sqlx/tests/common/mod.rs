//! Test databases: SQLite files in temp dirs, Postgres schemas per test run.
#![allow(dead_code)]

use std::str::FromStr;

use chat_store_sqlx::sqlx::postgres::PgConnectOptions;
use chat_store_sqlx::sqlx::{Connection, Executor, PgConnection};
use chat_store_sqlx::{PostgresStore, SqliteStore};

/// The Postgres server tests use.
pub fn pg_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh schema on the test Postgres, dropped on `cleanup`.
pub struct PgSchema {
    pub name: String,
    pub store: PostgresStore,
}

impl PgSchema {
    /// Creates a schema and a migrated store inside it. Under CI=true an
    /// unreachable server is a failure; locally the test is skipped loudly.
    pub async fn create() -> Option<Self> {
        let url = pg_url();
        let mut admin = match PgConnection::connect(&url).await {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "Postgres at {url} is unreachable under CI=true: {e}"
                );
                eprintln!(
                    "!!! SKIPPING Postgres test: {url} unreachable ({e}); set CI=true to fail instead"
                );
                return None;
            }
        };
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let sql = format!("CREATE SCHEMA {name}");
        admin
            .execute(chat_store_sqlx::sqlx::AssertSqlSafe(sql))
            .await
            .expect("create schema");
        let opts = PgConnectOptions::from_str(&url)
            .expect("url")
            .options([("search_path", name.as_str())]);
        let store = PostgresStore::connect_with(opts, 8).await.expect("connect");
        store.migrate().await.expect("migrate");
        Some(Self { name, store })
    }

    /// Drops the schema.
    pub async fn cleanup(self) {
        self.store.close().await;
        let mut admin = PgConnection::connect(&pg_url()).await.expect("connect");
        let sql = format!("DROP SCHEMA {} CASCADE", self.name);
        admin
            .execute(chat_store_sqlx::sqlx::AssertSqlSafe(sql))
            .await
            .expect("drop schema");
    }
}

/// A migrated SQLite store in a temp dir (kept alive by the returned guard).
pub async fn sqlite_file() -> (SqliteStore, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    let store = SqliteStore::connect(&url).await.expect("connect");
    store.migrate().await.expect("migrate");
    (store, dir, url)
}
