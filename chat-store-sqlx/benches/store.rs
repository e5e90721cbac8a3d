//! Store throughput and latency on SQLite (file, WAL) and, when reachable,
//! PostgreSQL: message appends, checkpoint rewrites, history of 1k and 10k
//! messages, one list page with 10k chats per user.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chat_core::{
    ChatId, MessageId, MessageStatus, MessageStore, NewChat, PageRequest, Part, Role,
    StoredMessage, UiMessage, UserId,
};
use chat_store_sqlx::sqlx::postgres::PgConnectOptions;
use chat_store_sqlx::sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use chat_store_sqlx::{PostgresStore, SqliteStore};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn msg(text: &str, status: MessageStatus) -> StoredMessage {
    StoredMessage {
        message: UiMessage::new(MessageId::new(), Role::Assistant, vec![Part::text(text)]),
        created_at: 1,
        updated_at: 1,
        status,
    }
}

async fn seed(
    store: &Arc<dyn MessageStore>,
    user: &UserId,
    chats: usize,
    messages: usize,
) -> ChatId {
    let mut first = None;
    for i in 0..chats {
        let c = store
            .create_chat(
                user,
                NewChat {
                    id: ChatId::new(),
                    title: Some(format!("chat {i}")),
                    created_at: i as i64,
                },
            )
            .await
            .unwrap();
        first.get_or_insert(c.id);
    }
    let chat = first.unwrap();
    for i in 0..messages {
        store
            .upsert_message(
                user,
                &chat,
                &msg(
                    &format!("message number {i} with some text"),
                    MessageStatus::Complete,
                ),
            )
            .await
            .unwrap();
    }
    chat
}

async fn postgres() -> Option<(PostgresStore, String)> {
    let url = std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let mut admin = PgConnection::connect(&url).await.ok()?;
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .await
        .ok()?;
    let opts = PgConnectOptions::from_str(&url)
        .ok()?
        .options([("search_path", schema.as_str())]);
    let store = PostgresStore::connect_with(opts, 8).await.ok()?;
    store.migrate().await.ok()?;
    Some((store, schema))
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut backends: Vec<(&str, Arc<dyn MessageStore>)> = Vec::new();
    let sqlite = rt.block_on(async {
        let s = SqliteStore::connect(&format!(
            "sqlite://{}",
            dir.path().join("bench.db").display()
        ))
        .await
        .unwrap();
        s.migrate().await.unwrap();
        s
    });
    backends.push(("sqlite", Arc::new(sqlite)));
    let pg = rt.block_on(postgres());
    if let Some((store, _)) = &pg {
        backends.push(("postgres", Arc::new(store.clone())));
    } else {
        eprintln!("Postgres unreachable: benchmarking SQLite only");
    }

    let mut g = c.benchmark_group("store");
    g.measurement_time(Duration::from_secs(5));
    for (name, store) in &backends {
        let user = UserId::new(format!("bench-{name}")).unwrap();
        let (chat, big_chat, huge_chat) = rt.block_on(async {
            let chat = seed(store, &user, 10_000, 0).await;
            let big = seed(
                store,
                &UserId::new(format!("big-{name}")).unwrap(),
                1,
                1_000,
            )
            .await;
            let huge = seed(
                store,
                &UserId::new(format!("huge-{name}")).unwrap(),
                1,
                10_000,
            )
            .await;
            (chat, big, huge)
        });
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("append_message", name), |b| {
            b.to_async(&rt).iter(|| async {
                store
                    .upsert_message(
                        &user,
                        &chat,
                        &msg("tok0 tok1 tok2 tok3", MessageStatus::Complete),
                    )
                    .await
                    .unwrap();
            });
        });
        // Many writers at once (the server's situation): 64 concurrent appends per iteration.
        g.throughput(Throughput::Elements(64));
        g.bench_function(
            BenchmarkId::new("append_message_x64_concurrent", name),
            |b| {
                b.to_async(&rt).iter(|| async {
                    let writes = (0..64).map(|_| async {
                        store
                            .upsert_message(
                                &user,
                                &chat,
                                &msg("tok0 tok1", MessageStatus::Complete),
                            )
                            .await
                            .unwrap();
                    });
                    futures::future::join_all(writes).await;
                });
            },
        );
        // The server's situation: 64 turns on 64 chats each storing a message at once.
        let many: Vec<ChatId> = rt.block_on(async {
            let mut out = Vec::new();
            for _ in 0..64 {
                out.push(seed(store, &user, 1, 0).await);
            }
            out
        });
        let author = &user;
        g.bench_function(BenchmarkId::new("append_message_x64_chats", name), |b| {
            b.to_async(&rt).iter(|| async {
                let writes = many.iter().map(|chat| async move {
                    store
                        .upsert_message(author, chat, &msg("tok0 tok1", MessageStatus::Complete))
                        .await
                        .unwrap();
                });
                futures::future::join_all(writes).await;
            });
        });
        // Checkpoints of 64 running turns at once: each rewrites its partial
        // answer in place, and group commit batches them into one statement.
        let drafts: Vec<StoredMessage> = many
            .iter()
            .map(|_| msg("partial answer so far", MessageStatus::Streaming))
            .collect();
        rt.block_on(async {
            for (chat, d) in many.iter().zip(&drafts) {
                store.upsert_message(&user, chat, d).await.unwrap();
            }
        });
        g.bench_function(
            BenchmarkId::new("checkpoint_rewrite_x64_chats", name),
            |b| {
                b.to_async(&rt).iter(|| async {
                    let writes = many.iter().zip(&drafts).map(|(chat, d)| async move {
                        store.upsert_message(author, chat, d).await.unwrap();
                    });
                    futures::future::join_all(writes).await;
                });
            },
        );
        g.throughput(Throughput::Elements(1));
        let cp = msg("partial answer so far", MessageStatus::Streaming);
        rt.block_on(store.upsert_message(&user, &chat, &cp))
            .unwrap();
        g.bench_function(BenchmarkId::new("checkpoint_rewrite", name), |b| {
            b.to_async(&rt)
                .iter(|| async { store.upsert_message(&user, &chat, &cp).await.unwrap() });
        });
        let big_user = UserId::new(format!("big-{name}")).unwrap();
        g.bench_function(BenchmarkId::new("history_1k_messages", name), |b| {
            b.to_async(&rt).iter(|| async {
                store
                    .load_messages(&big_user, &big_chat)
                    .await
                    .unwrap()
                    .len()
            });
        });
        let huge_user = UserId::new(format!("huge-{name}")).unwrap();
        g.bench_function(BenchmarkId::new("history_10k_messages", name), |b| {
            b.to_async(&rt).iter(|| async {
                store
                    .load_messages(&huge_user, &huge_chat)
                    .await
                    .unwrap()
                    .len()
            });
        });
        g.bench_function(
            BenchmarkId::new("list_page_of_50_at_10k_chats", name),
            |b| {
                b.to_async(&rt).iter(|| async {
                    store
                        .list_chats(
                            &user,
                            PageRequest {
                                limit: 50,
                                cursor: None,
                            },
                        )
                        .await
                        .unwrap()
                        .chats
                        .len()
                });
            },
        );
    }
    g.finish();
    if let Some((store, schema)) = pg {
        rt.block_on(async {
            store.close().await;
            if let Ok(mut admin) = PgConnection::connect(
                &std::env::var("TEST_POSTGRES_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            )
            .await
            {
                let _ = admin
                    .execute(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                    .await;
            }
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
