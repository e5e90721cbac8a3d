//! InMemoryStore and LocalSessions run the shared conformance suites.

use std::sync::Arc;

use chat_core::testing::{SessionUnderTest, session_conformance, store_conformance};
use chat_core::{InMemoryStore, LocalSessions, MessageStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_store_conforms() {
    store_conformance(Arc::new(InMemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_sessions_on_in_memory_store_conform() {
    let store: Arc<dyn MessageStore> = Arc::new(InMemoryStore::new());
    session_conformance(move |model, config| SessionUnderTest {
        session: Arc::new(LocalSessions::new(store.clone(), model, config)),
        store: store.clone(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinated_sessions_with_in_process_coordinator_conform() {
    use chat_core::{CoordinatedSessions, CoordinationSettings, InProcessCoordinator, TurnRunner};
    let store: Arc<dyn MessageStore> = Arc::new(InMemoryStore::new());
    let coord = Arc::new(InProcessCoordinator::new());
    session_conformance(move |model, config| SessionUnderTest {
        session: Arc::new(
            CoordinatedSessions::new(
                TurnRunner::new(store.clone(), model, config),
                coord.clone(),
                CoordinationSettings::default(),
            )
            .unwrap(),
        ),
        store: store.clone(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_coordinator_conforms() {
    chat_core::testing::coordinator_conformance(Arc::new(chat_core::InProcessCoordinator::new()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_over_one_in_process_coordinator() {
    use chat_core::{CoordinatedSessions, CoordinationSettings, InProcessCoordinator, TurnRunner};
    let store: Arc<dyn MessageStore> = Arc::new(InMemoryStore::new());
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
