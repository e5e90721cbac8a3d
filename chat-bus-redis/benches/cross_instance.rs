//! Multi-instance bench on the real Redis and Postgres: cross-instance resume
//! time-to-first-chunk, and streams/s with 3 coordinated instances vs 1
//! (and vs the single-instance runtime), all over one Postgres store.
//!
//! The instances are `CoordinatedSessions` in this process, each with its own
//! coordinator (own Redis connections / own Postgres pool and LISTEN), so the
//! numbers are the coordination cost, not HTTP. Writes a markdown table and
//! JSON to `benches/results/multi-instance/` (workspace root).
//!
//! `cargo bench -p chat-bus-redis --bench cross_instance` (env: BENCH_SECS,
//! BENCH_CLIENTS, BENCH_RESUMES, TEST_REDIS_URL, TEST_POSTGRES_URL).

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chat_bus_redis::{RedisCoordinator, RedisSettings};
use chat_core::{
    ChatId, ChatSession, CoordinatedSessions, CoordinationSettings, DemoModel, LocalSessions,
    MessageId, MessageStore, ModelProvider, NewChat, SendRequest, TurnConfig, TurnCoordinator,
    TurnRunner, UiMessage, UserId,
};
use chat_store_sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use chat_store_sqlx::sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use chat_store_sqlx::{PgCoordinator, PgCoordinatorSettings, PostgresStore};
use futures::StreamExt;

fn env_or<T: FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn pg_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Coord {
    /// `LocalSessions`: the single-instance runtime, no coordinator.
    None,
    Redis,
    Postgres,
}

impl Coord {
    fn name(self) -> &'static str {
        match self {
            Coord::None => "single-instance runtime",
            Coord::Redis => "redis",
            Coord::Postgres => "postgres",
        }
    }
}

struct Setup {
    schema: String,
    store: PostgresStore,
    /// Redis key prefix of this run.
    prefix: String,
    /// NOTIFY channel of this run (all instances share it).
    channel: String,
}

async fn setup() -> Setup {
    let mut admin = PgConnection::connect(&pg_url()).await.expect("Postgres");
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .await
        .unwrap();
    let store = PostgresStore::connect_with(opts(&schema), 16)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    Setup {
        schema,
        store,
        prefix: format!("bench:{}", uuid::Uuid::new_v4().simple()),
        channel: format!("bench_{}", uuid::Uuid::new_v4().simple()),
    }
}

fn opts(schema: &str) -> PgConnectOptions {
    PgConnectOptions::from_str(&pg_url())
        .unwrap()
        .options([("search_path", schema)])
}

async fn coordinator(s: &Setup, kind: Coord) -> Arc<dyn TurnCoordinator> {
    match kind {
        Coord::Redis => Arc::new(
            RedisCoordinator::connect(
                &redis_url(),
                RedisSettings {
                    prefix: s.prefix.clone(),
                    ..RedisSettings::default()
                },
            )
            .await
            .expect("Redis"),
        ),
        Coord::Postgres => {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .connect_with(opts(&s.schema))
                .await
                .unwrap();
            Arc::new(
                PgCoordinator::new(
                    pool,
                    PgCoordinatorSettings {
                        channel: s.channel.clone(),
                        ..PgCoordinatorSettings::default()
                    },
                )
                .await
                .unwrap(),
            )
        }
        Coord::None => unreachable!(),
    }
}

async fn instances(
    s: &Setup,
    kind: Coord,
    n: usize,
    model: &Arc<dyn ModelProvider>,
) -> Vec<Arc<dyn ChatSession>> {
    let store: Arc<dyn MessageStore> = Arc::new(s.store.clone());
    let config = TurnConfig::default();
    let mut out: Vec<Arc<dyn ChatSession>> = Vec::new();
    for _ in 0..n {
        if kind == Coord::None {
            out.push(Arc::new(LocalSessions::new(
                store.clone(),
                model.clone(),
                config.clone(),
            )));
            continue;
        }
        let coord = coordinator(s, kind).await;
        out.push(Arc::new(
            CoordinatedSessions::new(
                TurnRunner::new(store.clone(), model.clone(), config.clone()),
                coord,
                CoordinationSettings::default(),
            )
            .unwrap(),
        ));
    }
    out
}

async fn new_chat(store: &PostgresStore, user: &UserId) -> ChatId {
    store
        .create_chat(
            user,
            NewChat {
                id: ChatId::new(),
                title: None,
                created_at: chat_core::now_ms(),
            },
        )
        .await
        .unwrap()
        .id
}

fn msg() -> SendRequest {
    SendRequest::submit(UiMessage::user_text(MessageId::new(), "bench"))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Send on instance 0, wait for its first frame, then resume on instance
/// `on` and time that resume's first frame.
async fn resume_ttfc(s: &Setup, kind: Coord, same_instance: bool, n: usize) -> (f64, f64) {
    let model: Arc<dyn ModelProvider> =
        Arc::new(DemoModel::new(30).with_delay(Duration::from_millis(5)));
    let nodes = instances(s, kind, if same_instance { 1 } else { 2 }, &model).await;
    let user = UserId::new("bench-resume").unwrap();
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let chat = new_chat(&s.store, &user).await;
        let mut turn = nodes[0].send(&user, &chat, msg()).await.unwrap();
        turn.frames.next().await.unwrap();
        let t0 = Instant::now();
        let mut resumed = nodes[nodes.len() - 1]
            .resume(&user, &chat)
            .await
            .unwrap()
            .expect("no running turn to resume");
        resumed.frames.next().await.unwrap();
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        let (_, _): (Vec<_>, Vec<_>) = futures::join!(
            turn.frames.collect::<Vec<_>>(),
            resumed.frames.collect::<Vec<_>>()
        );
    }
    (pct(&mut times, 0.5), pct(&mut times, 0.99))
}

/// `clients` virtual users, each with its own chat on instance `i % n`, send
/// and read to the end in a loop for `secs`.
async fn throughput(s: &Setup, kind: Coord, n: usize, clients: usize, secs: f64) -> f64 {
    let model: Arc<dyn ModelProvider> = Arc::new(DemoModel::new(32));
    let nodes = instances(s, kind, n, &model).await;
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let node = nodes[i % n].clone();
        let store = s.store.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let user = UserId::new(format!("bench-{i}")).unwrap();
            let chat = new_chat(&store, &user).await;
            while Instant::now() < deadline {
                let turn = node.send(&user, &chat, msg()).await.unwrap();
                let frames: Vec<_> = turn.frames.collect().await;
                assert!(frames.len() > 32);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too: only run when asked.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let secs: f64 = env_or("BENCH_SECS", 8.0);
    let clients: usize = env_or("BENCH_CLIENTS", 48);
    let resumes: usize = env_or("BENCH_RESUMES", 100);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let s = setup().await;
    let mut md = String::new();
    let mut rows = Vec::new();
    writeln!(
        md,
        "| coordinator | instances | streams/s ({clients} clients, 32-token answers, no delay) |\n|---|---|---|"
    )
    .unwrap();
    for (kind, n) in [
        (Coord::None, 1),
        (Coord::Redis, 1),
        (Coord::Redis, 3),
        (Coord::Postgres, 1),
        (Coord::Postgres, 3),
    ] {
        let r = throughput(&s, kind, n, clients, secs).await;
        eprintln!("throughput {} x{n}: {r:.0} streams/s", kind.name());
        writeln!(md, "| {} | {n} | {r:.0} |", kind.name()).unwrap();
        rows.push(serde_json::json!({"bench": "throughput", "coordinator": kind.name(), "instances": n, "clients": clients, "streams_per_s": r}));
    }
    writeln!(
        md,
        "\n| coordinator | resume on | time to first chunk p50 / p99 ms ({resumes} resumes) |\n|---|---|---|"
    )
    .unwrap();
    for (kind, same) in [
        (Coord::None, true),
        (Coord::Redis, true),
        (Coord::Redis, false),
        (Coord::Postgres, false),
    ] {
        let (p50, p99) = resume_ttfc(&s, kind, same, resumes).await;
        let on = if same {
            "same instance"
        } else {
            "another instance"
        };
        eprintln!(
            "resume {} on {on}: p50 {p50:.2} ms, p99 {p99:.2} ms",
            kind.name()
        );
        writeln!(md, "| {} | {on} | {p50:.2} / {p99:.2} |", kind.name()).unwrap();
        rows.push(serde_json::json!({"bench": "resume_ttfc", "coordinator": kind.name(), "cross_instance": !same, "p50_ms": p50, "p99_ms": p99}));
    }
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/results/multi-instance");
    std::fs::create_dir_all(&root).unwrap();
    let header = format!(
        "# Multi-instance coordination bench\n\n```\nunix time ms: {}\ncpus: {}\nload average before the run: {}\n```\n\n\
         In-process instances (`CoordinatedSessions`, each with its own coordinator and connections) \
         over one Postgres store on this machine; Redis and Postgres are local. \
         `cargo bench -p chat-bus-redis --bench cross_instance`.\n\n",
        chat_core::now_ms(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        load.trim(),
    );
    std::fs::write(root.join("latest.md"), format!("{header}{md}")).unwrap();
    std::fs::write(
        root.join("latest.json"),
        serde_json::to_string_pretty(&rows).unwrap(),
    )
    .unwrap();
    println!("{header}{md}");
    s.store.close().await;
    let mut admin = PgConnection::connect(&pg_url()).await.unwrap();
    admin
        .execute(AssertSqlSafe(format!("DROP SCHEMA {} CASCADE", s.schema)))
        .await
        .unwrap();
}
