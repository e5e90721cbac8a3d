//! Hot paths of chat-core: SSE chunk encoding, a whole turn through the
//! state machine (InMemoryStore + DemoModel with no delay), and the lookup
//! of a message id in a long chat's history (done once per turn).

use std::sync::Arc;

use chat_core::{
    ChatId, ChatSession, DemoModel, History, InMemoryStore, LocalSessions, MessageId,
    MessageStatus, MessageStore, NewChat, SendRequest, SseEncoder, StoredMessage, TurnConfig,
    TurnRunner, UiChunk, UiMessage, UserId,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse_encode");
    g.throughput(Throughput::Elements(1));
    let mut enc = SseEncoder::new();
    g.bench_function("text_delta", |b| {
        b.iter(|| {
            let chunk = UiChunk::TextDelta {
                id: "text-0".into(),
                delta: std::hint::black_box("tok42 ").into(),
            };
            std::hint::black_box(enc.encode(&chunk))
        });
    });
    g.bench_function("text_delta_escaped", |b| {
        b.iter(|| {
            let chunk = UiChunk::TextDelta {
                id: "text-0".into(),
                delta: std::hint::black_box("line \"one\"\n\tünïcødé 👋").into(),
            };
            std::hint::black_box(enc.encode(&chunk))
        });
    });
    g.finish();
}

fn turn(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store: Arc<dyn MessageStore> = Arc::new(InMemoryStore::new());
    let user = UserId::new("bench").unwrap();
    let runner = TurnRunner::new(
        store.clone(),
        Arc::new(DemoModel::new(64)),
        TurnConfig::default(),
    );

    let mut g = c.benchmark_group("turn");
    g.throughput(Throughput::Elements(1));
    // A 64-token turn: prepare (store user message, title) + run (stream, finalize),
    // frames encoded into a buffer as the server does.
    g.bench_function("runner_64_tokens", |b| {
        b.to_async(&rt).iter(|| {
            let store = store.clone();
            let user = user.clone();
            let runner = runner.clone();
            async move {
                let chat = store
                    .create_chat(
                        &user,
                        NewChat {
                            id: ChatId::new(),
                            title: None,
                            created_at: 1,
                        },
                    )
                    .await
                    .unwrap();
                let msg = UiMessage::user_text(MessageId::new(), "hello");
                let turn = runner
                    .prepare(&user, &chat, SendRequest::submit(msg))
                    .await
                    .unwrap();
                let mut enc = SseEncoder::new();
                let mut bytes = 0usize;
                let mut sink = |c: &UiChunk<'_>| bytes += enc.encode(c).len();
                runner.run(turn, &mut sink, &CancellationToken::new()).await;
                std::hint::black_box(bytes)
            }
        });
    });
    // The same through the native session runtime (spawned task + replay buffer + follower).
    let sessions = LocalSessions::new(
        store.clone(),
        Arc::new(DemoModel::new(64)),
        TurnConfig::default(),
    );
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    g.bench_function("local_sessions_64_tokens", |b| {
        b.to_async(&mt).iter(|| {
            let store = store.clone();
            let user = user.clone();
            let sessions = sessions.clone();
            async move {
                let chat = store
                    .create_chat(
                        &user,
                        NewChat {
                            id: ChatId::new(),
                            title: None,
                            created_at: 1,
                        },
                    )
                    .await
                    .unwrap();
                let msg = UiMessage::user_text(MessageId::new(), "hello");
                let t = sessions
                    .send(&user, &chat.id, SendRequest::submit(msg))
                    .await
                    .unwrap();
                std::hint::black_box(
                    t.frames
                        .fold(0usize, |n, f| async move { n + f.len() })
                        .await,
                )
            }
        });
    });
    g.finish();
}

/// Each turn looks its user message's id up in the chat's history (a retry
/// reuses the id); a new id is the common case and used to scan every message.
fn history_lookup(c: &mut Criterion) {
    let history: History = (0..2_000)
        .map(|i| StoredMessage {
            message: UiMessage::user_text(MessageId::new(), format!("m{i}")),
            created_at: i,
            updated_at: i,
            status: MessageStatus::Complete,
        })
        .collect();
    let newest = history.last().unwrap().message.id.clone();
    let fresh = MessageId::new();
    let mut g = c.benchmark_group("history_2000_messages");
    g.throughput(Throughput::Elements(1));
    g.bench_function("position_of_a_new_id", |b| {
        b.iter(|| std::hint::black_box(history.position(std::hint::black_box(&fresh))));
    });
    g.bench_function("position_of_the_newest", |b| {
        b.iter(|| std::hint::black_box(history.position(std::hint::black_box(&newest))));
    });
    g.finish();
}

criterion_group!(benches, encode, turn, history_lookup);
criterion_main!(benches);
