//! PgCoordinator on the real Postgres: chat-core's coordinator, session and
//! multi-instance suites, fencing tokens above stored fences, and the
//! coordinator's connections dying in the middle of a turn.
#![cfg(feature = "coordination")]

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chat_core::testing::{SessionUnderTest, multi_instance_conformance, session_conformance};
use chat_core::{
    ChatId, ChatSession, CoordinatedSessions, CoordinationSettings, DemoModel, FinishReason,
    MessageId, MessageStatus, MessageStore, NewChat, SendRequest, StoredMessage, TurnConfig,
    TurnCoordinator, TurnRunner, UiMessage, UserId,
};
use chat_store_sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use chat_store_sqlx::sqlx::{Connection, PgConnection, PgPool};
use chat_store_sqlx::{PgCoordinator, PgCoordinatorSettings};
use futures::StreamExt;

/// A pool of its own inside the test schema, tagged with `app` (so a test can
/// kill exactly its connections).
async fn pool(schema: &str, app: &str) -> PgPool {
    let opts = PgConnectOptions::from_str(&common::pg_url())
        .unwrap()
        .options([("search_path", schema)])
        .application_name(app);
    PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts)
        .await
        .unwrap()
}

fn settings() -> PgCoordinatorSettings {
    PgCoordinatorSettings {
        // NOTIFY channels are per database; test runs share one.
        channel: format!("coord_{}", uuid::Uuid::new_v4().simple()),
        ..PgCoordinatorSettings::default()
    }
}

fn fast() -> CoordinationSettings {
    CoordinationSettings {
        lease_ttl: Duration::from_secs(3),
        renew_every: Duration::from_secs(1),
        stop_wait: Duration::from_secs(10),
        liveness_check: Duration::from_millis(200),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_coordinator_conforms() {
    let Some(pg) = common::PgSchema::create().await else {
        return;
    };
    let coord = PgCoordinator::new(pg.store.pool().clone(), settings())
        .await
        .unwrap();
    chat_core::testing::coordinator_conformance(Arc::new(coord)).await;
    pg.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_over_postgres_conform() {
    let Some(pg) = common::PgSchema::create().await else {
        return;
    };
    let s = settings();
    let mut coords: Vec<Arc<dyn TurnCoordinator>> = Vec::new();
    for i in 0..3 {
        let p = pool(&pg.name, &format!("instance{i}")).await;
        coords.push(Arc::new(PgCoordinator::new(p, s.clone()).await.unwrap()));
    }
    let store: Arc<dyn MessageStore> = Arc::new(pg.store.clone());
    let s2 = store.clone();
    let next = AtomicUsize::new(0);
    multi_instance_conformance(store, move |model, config| {
        let coord = coords[next.fetch_add(1, Ordering::Relaxed) % 3].clone();
        Arc::new(
            CoordinatedSessions::new(TurnRunner::new(s2.clone(), model, config), coord, fast())
                .unwrap(),
        ) as Arc<dyn ChatSession>
    })
    .await;
    pg.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinated_sessions_over_postgres_conform() {
    let Some(pg) = common::PgSchema::create().await else {
        return;
    };
    let coord: Arc<dyn TurnCoordinator> = Arc::new(
        PgCoordinator::new(pool(&pg.name, "sessions").await, settings())
            .await
            .unwrap(),
    );
    let store: Arc<dyn MessageStore> = Arc::new(pg.store.clone());
    session_conformance(move |model, config| SessionUnderTest {
        session: Arc::new(
            CoordinatedSessions::new(
                TurnRunner::new(store.clone(), model, config),
                coord.clone(),
                fast(),
            )
            .unwrap(),
        ),
        store: store.clone(),
    })
    .await;
    pg.cleanup().await;
}

async fn chat_of(store: &dyn MessageStore, user: &UserId) -> ChatId {
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

/// Tokens beat the chat's stored fence, e.g. after switching from Redis
/// (clock-seeded tokens) to Postgres coordination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_beat_the_stored_fence() {
    let Some(pg) = common::PgSchema::create().await else {
        return;
    };
    let coord = PgCoordinator::new(pg.store.pool().clone(), settings())
        .await
        .unwrap();
    let user = UserId::new("fence-user").unwrap();
    let chat = chat_of(&pg.store, &user).await;
    let big = 1_700_000_000_000_000u64;
    let msg = StoredMessage {
        message: UiMessage::user_text(MessageId::new(), "from an earlier coordinator"),
        status: MessageStatus::Complete,
        created_at: chat_core::now_ms(),
        updated_at: chat_core::now_ms(),
    };
    pg.store
        .upsert_message_fenced(&user, &chat, &msg, big)
        .await
        .unwrap();
    let lease = coord
        .acquire(&chat, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(
        lease.token > big,
        "token {} not above fence {big}",
        lease.token
    );
    coord.release(&lease).await.unwrap();
    // Released: frames are fenced off, the stream has its end row.
    coord
        .publish(&lease, &[bytes::Bytes::from_static(b"data: late\n\n")])
        .await
        .unwrap();
    let n: i64 = chat_store_sqlx::sqlx::query_scalar(
        "SELECT count(*) FROM turn_frames WHERE chat_id = $1 AND frame IS NOT NULL",
    )
    .bind(chat.to_string())
    .fetch_one(pg.store.pool())
    .await
    .unwrap();
    assert_eq!(n, 0);
    pg.cleanup().await;
}

async fn kill_connections(app: &str) -> u64 {
    let mut admin = PgConnection::connect(&common::pg_url()).await.unwrap();
    let killed: Vec<bool> = chat_store_sqlx::sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(app)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();
    killed.len() as u64
}

/// The coordinator's database connections are killed in the middle of a turn
/// (its LISTEN connection too): the turn still ends and is stored complete,
/// and afterwards the coordinator works again, stop signals included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_connections_dying_mid_turn() {
    let Some(pg) = common::PgSchema::create().await else {
        return;
    };
    let app = format!("coord_outage_{}", uuid::Uuid::new_v4().simple());
    let coord = Arc::new(
        PgCoordinator::new(pool(&pg.name, &app).await, settings())
            .await
            .unwrap(),
    );
    let store: Arc<dyn MessageStore> = Arc::new(pg.store.clone());
    let model = Arc::new(DemoModel::new(40).with_delay(Duration::from_millis(25)));
    let config = TurnConfig {
        checkpoint_interval: Duration::from_millis(50),
        ..TurnConfig::default()
    };
    let sessions = CoordinatedSessions::new(
        TurnRunner::new(store.clone(), model.clone(), config.clone()),
        coord.clone(),
        fast(),
    )
    .unwrap();
    let user = UserId::new("outage-user").unwrap();
    let chat = chat_of(&*store, &user).await;
    let mut turn = sessions
        .send(
            &user,
            &chat,
            SendRequest::submit(UiMessage::user_text(MessageId::new(), "survive")),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        turn.frames.next().await.unwrap();
    }
    assert!(kill_connections(&app).await >= 1, "nothing to kill");
    let rest: Vec<bytes::Bytes> =
        tokio::time::timeout(Duration::from_secs(30), turn.frames.collect())
            .await
            .expect("turn hung after the coordinator lost its connections");
    assert_eq!(&rest.last().unwrap()[..], chat_core::sse::DONE_FRAME);
    let stored = store.load_messages(&user, &chat).await.unwrap();
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1].status, MessageStatus::Complete);
    assert_eq!(
        stored[1]
            .message
            .metadata
            .as_ref()
            .and_then(|m| m.finish_reason),
        Some(FinishReason::Stop)
    );
    assert!(stored[1].message.text().ends_with("tok39 "));
    // Back to normal: a second instance stops a new turn through the
    // reconnected listener.
    let other = CoordinatedSessions::new(
        TurnRunner::new(store.clone(), model, config),
        Arc::new(
            PgCoordinator::new(pool(&pg.name, "other").await, coord.settings().clone())
                .await
                .unwrap(),
        ),
        fast(),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while sessions.running_here() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let mut turn = sessions
        .send(
            &user,
            &chat,
            SendRequest::submit(UiMessage::user_text(MessageId::new(), "stop me")),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        turn.frames.next().await.unwrap();
    }
    let t0 = std::time::Instant::now();
    assert!(other.stop(&user, &chat).await.unwrap());
    let rest: Vec<bytes::Bytes> = turn.frames.collect().await;
    let text = String::from_utf8_lossy(&rest.concat()).into_owned();
    assert!(text.contains(r#""type":"abort""#), "{text}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t0.elapsed()
    );
    let h = other.history(&user, &chat).await.unwrap();
    assert_eq!(h.len(), 4);
    assert_eq!(
        h[3].metadata.as_ref().and_then(|m| m.finish_reason),
        Some(FinishReason::Abort)
    );
    pg.cleanup().await;
}
