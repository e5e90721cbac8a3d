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
