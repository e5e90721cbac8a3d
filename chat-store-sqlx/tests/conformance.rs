//! Both backends run chat-core's store and session conformance suites.

mod common;

use std::sync::Arc;

use chat_core::testing::{SessionUnderTest, session_conformance, store_conformance};
use chat_core::{LocalSessions, MessageStore};

fn sessions_over(store: Arc<dyn MessageStore>) -> impl chat_core::testing::SessionFactory {
    move |model, config| SessionUnderTest {
        session: Arc::new(LocalSessions::new(store.clone(), model, config)),
        store: store.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_store_conforms() {
    let (store, _dir, _) = common::sqlite_file().await;
    store_conformance(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_memory_store_conforms() {
    let store = chat_store_sqlx::connect("sqlite::memory:").await.unwrap();
    store.migrate().await.unwrap();
    store_conformance(store.into_dyn()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sessions_conform() {
    let (store, _dir, _) = common::sqlite_file().await;
    session_conformance(sessions_over(Arc::new(store))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms() {
    let Some(pg) = common::PgSchema::create().await else {
        return;
    };
    store_conformance(Arc::new(pg.store.clone())).await;
    pg.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sessions_conform() {
    let Some(pg) = common::PgSchema::create().await else {
        return;
    };
    session_conformance(sessions_over(Arc::new(pg.store.clone()))).await;
    pg.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinated_sessions_on_sqlite_conform() {
    use chat_core::{CoordinatedSessions, CoordinationSettings, InProcessCoordinator, TurnRunner};
    let (store, _dir, _) = common::sqlite_file().await;
    let store: Arc<dyn MessageStore> = Arc::new(store);
    let coord = Arc::new(InProcessCoordinator::new());
    let s2 = store.clone();
    chat_core::testing::multi_instance_conformance(store, move |model, config| {
        Arc::new(
            CoordinatedSessions::new(
                TurnRunner::new(s2.clone(), model, config),
                coord.clone(),
                CoordinationSettings::default(),
            )
            .unwrap(),
        ) as Arc<dyn chat_core::ChatSession>
    })
    .await;
}
