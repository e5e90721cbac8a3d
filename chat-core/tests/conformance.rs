//! InMemoryStore and LocalSessions run the shared conformance suites.

use std::sync::Arc;

use chat_core::testing::{SessionUnderTest, session_conformance, store_conformance};
use chat_core::{InMemoryStore, LocalSessions, MessageStore};
use futures::StreamExt;

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

#[tokio::test]
async fn demo_model_streams_conform() {
    use chat_core::testing::{check_model_stream, model_stream_conformance};
    use chat_core::{
        DemoModel, DemoScript, MessageId, ModelEvent, ModelProvider, ModelRequest, UiMessage,
    };
    let request = |step| ModelRequest {
        system: None,
        messages: vec![UiMessage::user_text(MessageId::new(), "hi")].into(),
        tools: chat_core::demo::demo_tools().specs(),
        step,
    };
    for script in [
        DemoScript::Text,
        DemoScript::Reasoning,
        DemoScript::ToolCall,
        DemoScript::FailAfter(3),
    ] {
        let model = DemoModel::new(6).with_script(script);
        let first = model_stream_conformance(&model, request(0)).await.unwrap();
        assert!(!first.is_empty(), "{script:?}");
        if script == DemoScript::ToolCall {
            assert!(
                first
                    .iter()
                    .any(|e| matches!(e, Ok(ModelEvent::ToolCall { .. })))
            );
        }
    }
    // The check catches what a provider must never do: end silently.
    let truncated: Vec<_> = DemoModel::new(6)
        .with_script(DemoScript::Truncate)
        .stream(request(0))
        .await
        .unwrap()
        .collect::<Vec<_>>()
        .await;
    assert!(check_model_stream(&truncated).is_err());
    // ...or complete a tool call nobody started, or keep going after Finish.
    let finish = ModelEvent::Finish {
        reason: chat_core::FinishReason::Stop,
        usage: None,
    };
    let orphan = vec![
        Ok(ModelEvent::ToolCall {
            id: "c1".into(),
            name: "get_weather".into(),
            input: serde_json::json!({}),
        }),
        Ok(finish.clone()),
    ];
    assert!(check_model_stream(&orphan).is_err());
    let after = vec![Ok(finish), Ok(ModelEvent::TextDelta("late".into()))];
    assert!(check_model_stream(&after).is_err());
}
