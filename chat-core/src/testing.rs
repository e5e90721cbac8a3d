//! Conformance suites every store and session runtime runs (feature `testing`).
//!
//! Each suite is a list of named checks; a run executes them all and panics
//! with the names and reasons of the ones that failed.
//!
//! ```ignore
//! chat_core::testing::store_conformance(Arc::new(MyStore::connect(..).await?)).await;
//! chat_core::testing::session_conformance(|model, config| SessionUnderTest { .. }).await;
//! ```
#![allow(
    clippy::missing_panics_doc,
    clippy::too_many_lines,
    clippy::expect_used,
    clippy::needless_pass_by_value
)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;

use crate::chunk::UiChunk;
use crate::demo::{DemoModel, DemoScript, demo_tools};
use crate::error::{Error, StoreError};
use crate::ids::{ChatId, MessageId, UserId};
use crate::message::{
    FinishReason, MessageMetadata, Part, Role, TextPart, TextState, ToolPart, ToolState, UiMessage,
};
use crate::model::ModelProvider;
use crate::session::{ChatSession, SendRequest, TurnStream};
use crate::sse::parse_sse;
use crate::store::{
    Chat, ChatCursor, MessageStatus, MessageStore, NewChat, PageRequest, StoredMessage,
};
use crate::turn::TurnConfig;

type CheckResult = Result<(), String>;
type BoxFut = Pin<Box<dyn Future<Output = CheckResult> + Send>>;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

fn user() -> UserId {
    UserId::new(format!("u-{}", uuid::Uuid::new_v4().simple())).expect("valid user id")
}

async fn new_chat(
    store: &dyn MessageStore,
    user: &UserId,
    title: Option<&str>,
) -> Result<Chat, String> {
    store
        .create_chat(
            user,
            NewChat {
                id: ChatId::new(),
                title: title.map(str::to_owned),
                created_at: crate::now_ms(),
            },
        )
        .await
        .map_err(|e| format!("create_chat: {e}"))
}

fn stored(msg: UiMessage, at: i64) -> StoredMessage {
    StoredMessage {
        message: msg,
        created_at: at,
        updated_at: at,
        status: MessageStatus::Complete,
    }
}

fn text_msg(role: Role, text: &str) -> UiMessage {
    UiMessage::new(MessageId::new(), role, vec![Part::text(text)])
}

fn not_found<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) -> CheckResult {
    match r {
        Err(StoreError::NotFound) => Ok(()),
        other => Err(format!("{what}: expected NotFound, got {other:?}")),
    }
}

async fn run_checks(suite: &str, checks: Vec<(&'static str, BoxFut)>) {
    let mut failed = Vec::new();
    let total = checks.len();
    for (name, fut) in checks {
        match fut.await {
            Ok(()) => eprintln!("{suite}: {name} ... ok"),
            Err(e) => {
                eprintln!("{suite}: {name} ... FAILED: {e}");
                failed.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{suite}: {} of {total} checks failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Runs every store check against `store`. Checks use fresh random users, so
/// a shared database is fine.
pub async fn store_conformance(store: Arc<dyn MessageStore>) {
    let s = || store.clone();
    let checks: Vec<(&'static str, BoxFut)> = vec![
        ("create_and_get", Box::pin(create_and_get(s()))),
        ("missing_chat_is_not_found", Box::pin(missing_chat(s()))),
        (
            "other_users_chat_is_not_found",
            Box::pin(ownership_isolation(s())),
        ),
        (
            "messages_keep_insertion_order",
            Box::pin(message_order(s())),
        ),
        (
            "upsert_is_idempotent_and_in_place",
            Box::pin(upsert_idempotent(s())),
        ),
        (
            "message_id_of_another_chat_conflicts",
            Box::pin(id_conflict(s())),
        ),
        ("upsert_moves_updated_at", Box::pin(updated_at_moves(s()))),
        ("title_is_set_once", Box::pin(title_once(s()))),
        ("list_is_keyset_paginated", Box::pin(pagination(s()))),
        ("delete_cascades", Box::pin(cascade_delete(s()))),
        ("concurrent_writers", Box::pin(concurrent_writers(s()))),
        (
            "parts_status_and_metadata_round_trip",
            Box::pin(round_trip(s())),
        ),
        (
            "fenced_writes_reject_older_tokens",
            Box::pin(fenced_writes(s())),
        ),
    ];
    run_checks("store_conformance", checks).await;
}

async fn create_and_get(store: Arc<dyn MessageStore>) -> CheckResult {
    let u = user();
    let c = new_chat(&*store, &u, None).await?;
    let got = store.get_chat(&u, &c.id).await.map_err(|e| e.to_string())?;
    ensure!(got == c, "get_chat returned {got:?}, created {c:?}");
    ensure!(
        got.title.is_none() && got.created_at == got.updated_at,
        "fresh chat fields: {got:?}"
    );
    let t = new_chat(&*store, &u, Some("Given title")).await?;
    let got = store.get_chat(&u, &t.id).await.map_err(|e| e.to_string())?;
    ensure!(
        got.title.as_deref() == Some("Given title"),
        "title at creation lost: {got:?}"
    );
    Ok(())
}

async fn missing_chat(store: Arc<dyn MessageStore>) -> CheckResult {
    let u = user();
    let id = ChatId::new();
    not_found(store.get_chat(&u, &id).await, "get_chat")?;
    not_found(store.load_messages(&u, &id).await, "load_messages")?;
    not_found(store.delete_chat(&u, &id).await, "delete_chat")?;
    not_found(
        store
            .upsert_message(&u, &id, &stored(text_msg(Role::User, "x"), 1))
            .await,
        "upsert_message",
    )?;
    not_found(
        store.set_title_if_unset(&u, &id, "t").await,
        "set_title_if_unset",
    )?;
    not_found(store.touch(&u, &id, 5).await, "touch")
}

async fn ownership_isolation(store: Arc<dyn MessageStore>) -> CheckResult {
    let (a, b) = (user(), user());
    let c = new_chat(&*store, &a, None).await?;
    let m = text_msg(Role::User, "secret");
    store
        .upsert_message(&a, &c.id, &stored(m.clone(), 10))
        .await
        .map_err(|e| e.to_string())?;
    not_found(store.get_chat(&b, &c.id).await, "get_chat by other user")?;
    not_found(
        store.load_messages(&b, &c.id).await,
        "load_messages by other user",
    )?;
    let mut evil = m.clone();
    evil.parts = vec![Part::text("overwritten")];
    let r = store.upsert_message(&b, &c.id, &stored(evil, 20)).await;
    ensure!(r.is_err(), "other user's upsert succeeded");
    not_found(
        store.set_title_if_unset(&b, &c.id, "pwned").await,
        "set_title by other user",
    )?;
    not_found(
        store.touch(&b, &c.id, i64::MAX / 2).await,
        "touch by other user",
    )?;
    not_found(store.delete_chat(&b, &c.id).await, "delete by other user")?;
    let page = store
        .list_chats(
            &b,
            PageRequest {
                limit: 50,
                cursor: None,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    ensure!(
        page.chats.iter().all(|x| x.id != c.id),
        "other user's list shows the chat"
    );
    let msgs = store
        .load_messages(&a, &c.id)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(
        msgs.len() == 1 && msgs[0].message.text() == "secret",
        "owner's data changed: {msgs:?}"
    );
    let got = store.get_chat(&a, &c.id).await.map_err(|e| e.to_string())?;
    ensure!(
        got.title.is_none() && got.updated_at < i64::MAX / 2,
        "owner's chat changed: {got:?}"
    );
    Ok(())
}

async fn message_order(store: Arc<dyn MessageStore>) -> CheckResult {
    let u = user();
    let c = new_chat(&*store, &u, None).await?;
    let mut ids = Vec::new();
    for i in 0..20 {
        let role = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        let m = text_msg(role, &format!("m{i}"));
        ids.push(m.id.clone());
        // Same timestamp for all: order must not depend on the clock.
        store
            .upsert_message(&u, &c.id, &stored(m, 1000))
            .await
            .map_err(|e| e.to_string())?;
    }
    let got: Vec<MessageId> = store
        .load_messages(&u, &c.id)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|m| m.message.id)
        .collect();
    ensure!(got == ids, "order differs: {got:?} vs {ids:?}");
    Ok(())
}

async fn upsert_idempotent(store: Arc<dyn MessageStore>) -> CheckResult {
    let u = user();
    let c = new_chat(&*store, &u, None).await?;
    let first = text_msg(Role::User, "q");
    let mut answer = text_msg(Role::Assistant, "partial");
    let last = text_msg(Role::User, "next");
    store
        .upsert_message(&u, &c.id, &stored(first.clone(), 100))
        .await
        .map_err(|e| e.to_string())?;
    let mut cp = stored(answer.clone(), 200);
    cp.status = MessageStatus::Streaming;
    store
        .upsert_message(&u, &c.id, &cp)
        .await
        .map_err(|e| e.to_string())?;
    store
        .upsert_message(&u, &c.id, &stored(last.clone(), 300))
        .await
        .map_err(|e| e.to_string())?;
    // Retried writes of the same message.
    store
        .upsert_message(&u, &c.id, &stored(first.clone(), 100))
        .await
        .map_err(|e| e.to_string())?;
    answer.parts = vec![Part::text("partial and final")];
    let mut fin = stored(answer.clone(), 400);
    fin.created_at = 999; // a later write must not move created_at
    store
        .upsert_message(&u, &c.id, &fin)
        .await
        .map_err(|e| e.to_string())?;
    let msgs = store
        .load_messages(&u, &c.id)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(msgs.len() == 3, "expected 3 rows, got {}", msgs.len());
    ensure!(
        msgs[1].message.id == answer.id,
        "in-place update moved the message"
    );
    ensure!(
        msgs[1].message.text() == "partial and final",
        "content not replaced"
    );
    ensure!(
        msgs[1].status == MessageStatus::Complete,
        "status not replaced"
    );
    ensure!(
        msgs[1].created_at == 200,
        "created_at changed to {}",
        msgs[1].created_at
    );
    Ok(())
}

async fn id_conflict(store: Arc<dyn MessageStore>) -> CheckResult {
    let (a, b) = (user(), user());
    let ca = new_chat(&*store, &a, None).await?;
    let cb = new_chat(&*store, &b, None).await?;
    let m = text_msg(Role::User, "mine");
    store
        .upsert_message(&a, &ca.id, &stored(m.clone(), 1))
        .await
        .map_err(|e| e.to_string())?;
    let mut stolen = m.clone();
    stolen.parts = vec![Part::text("theirs")];
    match store.upsert_message(&b, &cb.id, &stored(stolen, 2)).await {
        Err(StoreError::Conflict(_)) => {}
        other => return Err(format!("expected Conflict, got {other:?}")),
    }
    let msgs = store
        .load_messages(&a, &ca.id)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(msgs[0].message.text() == "mine", "original overwritten");
    let other = store
        .load_messages(&b, &cb.id)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(other.is_empty(), "conflicting message was stored");
    Ok(())
}

async fn updated_at_moves(store: Arc<dyn MessageStore>) -> CheckResult {
    let u = user();
    let c = new_chat(&*store, &u, None).await?;
    let later = c.created_at + 5_000;
    store
        .upsert_message(&u, &c.id, &stored(text_msg(Role::User, "x"), later))
        .await
        .map_err(|e| e.to_string())?;
    let got = store.get_chat(&u, &c.id).await.map_err(|e| e.to_string())?;
    ensure!(
        got.updated_at == later,
        "updated_at {} != {later}",
        got.updated_at
    );
    store
        .upsert_message(&u, &c.id, &stored(text_msg(Role::User, "y"), c.created_at))
        .await
        .map_err(|e| e.to_string())?;
    store
        .touch(&u, &c.id, c.created_at)
        .await
        .map_err(|e| e.to_string())?;
    let got = store.get_chat(&u, &c.id).await.map_err(|e| e.to_string())?;
    ensure!(
        got.updated_at == later,
        "updated_at moved back to {}",
        got.updated_at
    );
    store
        .touch(&u, &c.id, later + 1)
        .await
        .map_err(|e| e.to_string())?;
    let got = store.get_chat(&u, &c.id).await.map_err(|e| e.to_string())?;
    ensure!(got.updated_at == later + 1, "touch did not move updated_at");
    Ok(())
}

async fn title_once(store: Arc<dyn MessageStore>) -> CheckResult {
    let u = user();
    let c = new_chat(&*store, &u, None).await?;
    let first = store
        .set_title_if_unset(&u, &c.id, "First")
        .await
        .map_err(|e| e.to_string())?;
    let second = store
        .set_title_if_unset(&u, &c.id, "Second")
        .await
        .map_err(|e| e.to_string())?;
    ensure!(
        first && !second,
        "set_title_if_unset returned {first}, {second}"
    );
    let got = store.get_chat(&u, &c.id).await.map_err(|e| e.to_string())?;
    ensure!(
        got.title.as_deref() == Some("First"),
        "title is {:?}",
        got.title
    );
    let given = new_chat(&*store, &u, Some("Given")).await?;
    let set = store
        .set_title_if_unset(&u, &given.id, "Other")
        .await
        .map_err(|e| e.to_string())?;
    ensure!(!set, "title given at creation was replaced");
    Ok(())
}

async fn pagination(store: Arc<dyn MessageStore>) -> CheckResult {
    let u = user();
    let mut made = Vec::new();
    for i in 0..25 {
        let c = new_chat(&*store, &u, None).await?;
        // Pairs of chats share an updated_at: ties are ordered by id.
        store
            .touch(&u, &c.id, 10_000_000 + i / 2)
            .await
            .map_err(|e| e.to_string())?;
        made.push(store.get_chat(&u, &c.id).await.map_err(|e| e.to_string())?);
    }
    made.sort_by_key(|c| std::cmp::Reverse((c.updated_at, c.id)));
    let mut seen = Vec::new();
    let mut cursor: Option<ChatCursor> = None;
    for page_no in 0..5 {
        let page = store
            .list_chats(&u, PageRequest { limit: 10, cursor })
            .await
            .map_err(|e| e.to_string())?;
        seen.extend(page.chats.iter().map(|c| c.id));
        let expect_more = page_no < 2;
        ensure!(
            page.next_cursor.is_some() == expect_more,
            "page {page_no}: next_cursor {:?}",
            page.next_cursor
        );
        match page.next_cursor {
            Some(c) => {
                cursor = Some(ChatCursor::decode(&c.encode()).ok_or("cursor does not round-trip")?);
            }
            None => break,
        }
    }
    let want: Vec<ChatId> = made.iter().map(|c| c.id).collect();
    ensure!(seen == want, "pages {seen:?} != expected order {want:?}");
    Ok(())
}

async fn cascade_delete(store: Arc<dyn MessageStore>) -> CheckResult {
    let u = user();
    let c = new_chat(&*store, &u, None).await?;
    let keep = new_chat(&*store, &u, None).await?;
    let m = text_msg(Role::User, "bye");
    store
        .upsert_message(&u, &c.id, &stored(m.clone(), 1))
        .await
        .map_err(|e| e.to_string())?;
    store
        .upsert_message(&u, &keep.id, &stored(text_msg(Role::User, "stay"), 1))
        .await
        .map_err(|e| e.to_string())?;
    store
        .delete_chat(&u, &c.id)
        .await
        .map_err(|e| e.to_string())?;
    not_found(store.get_chat(&u, &c.id).await, "get after delete")?;
    not_found(store.load_messages(&u, &c.id).await, "load after delete")?;
    not_found(store.delete_chat(&u, &c.id).await, "second delete")?;
    // The message went with the chat: its id is free again.
    store
        .upsert_message(&u, &keep.id, &stored(m, 2))
        .await
        .map_err(|e| format!("id not freed: {e}"))?;
    let kept = store
        .load_messages(&u, &keep.id)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(kept.len() == 2, "other chat lost messages: {}", kept.len());
    Ok(())
}

async fn concurrent_writers(store: Arc<dyn MessageStore>) -> CheckResult {
    let u = user();
    let c = new_chat(&*store, &u, None).await?;
    let others: Vec<Chat> =
        futures::future::try_join_all((0..8).map(|_| new_chat(&*store, &u, None))).await?;
    let mut writes = Vec::new();
    for i in 0..40 {
        let store = store.clone();
        let u = u.clone();
        let chat = if i % 2 == 0 { c.id } else { others[i % 8].id };
        writes.push(async move {
            let m = text_msg(Role::User, &format!("w{i}"));
            store
                .upsert_message(&u, &chat, &stored(m.clone(), 1))
                .await?;
            // and a checkpoint-style rewrite of the same row
            store.upsert_message(&u, &chat, &stored(m, 2)).await
        });
    }
    let results = futures::future::join_all(writes).await;
    let errors: Vec<String> = results
        .into_iter()
        .filter_map(Result::err)
        .map(|e| e.to_string())
        .collect();
    ensure!(errors.is_empty(), "concurrent writes failed: {errors:?}");
    let n = store
        .load_messages(&u, &c.id)
        .await
        .map_err(|e| e.to_string())?
        .len();
    ensure!(n == 20, "one chat: expected 20 messages, got {n}");
    let mut total = 0;
    for o in &others {
        total += store
            .load_messages(&u, &o.id)
            .await
            .map_err(|e| e.to_string())?
            .len();
    }
    ensure!(
        total == 20,
        "other chats: expected 20 messages, got {total}"
    );
    Ok(())
}

async fn round_trip(store: Arc<dyn MessageStore>) -> CheckResult {
    let u = user();
    let c = new_chat(&*store, &u, None).await?;
    let mut m = UiMessage::new(
        MessageId::new(),
        Role::Assistant,
        vec![
            Part::StepStart,
            Part::Reasoning(TextPart {
                text: "hmm ✓".into(),
                state: Some(TextState::Done),
                provider_metadata: None,
                id: Some("reasoning-0".into()),
            }),
            Part::Tool(ToolPart {
                tool_name: "get_weather".into(),
                dynamic: false,
                tool_call_id: "call-1".into(),
                state: ToolState::OutputAvailable,
                input: Some(json!({"city": "Zürich"})),
                output: Some(json!({"tempC": 3})),
                error_text: None,
                provider_executed: None,
            }),
            Part::text("Emoji 👋🏽 and \"quotes\"\nnewline"),
        ],
    );
    m.metadata = Some(MessageMetadata {
        created_at: Some(42),
        finish_reason: Some(FinishReason::ToolCalls),
        usage: None,
    });
    let mut s = stored(m.clone(), 42);
    s.status = MessageStatus::Streaming;
    store
        .upsert_message(&u, &c.id, &s)
        .await
        .map_err(|e| e.to_string())?;
    let got = store
        .load_messages(&u, &c.id)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(got.len() == 1, "expected one message");
    ensure!(
        got[0].message == m,
        "message changed: {:?} vs {m:?}",
        got[0].message
    );
    ensure!(got[0].status == MessageStatus::Streaming, "status lost");
    ensure!(got[0].created_at == 42, "created_at lost");
    Ok(())
}

async fn fenced_writes(store: Arc<dyn MessageStore>) -> CheckResult {
    if !store.supports_fencing() {
        eprintln!(
            "store_conformance: fenced_writes: this store declares no fencing support (multi-instance coordination unavailable)"
        );
        let r = store
            .upsert_message_fenced(
                &user(),
                &ChatId::new(),
                &stored(text_msg(Role::User, "x"), 1),
                1,
            )
            .await;
        ensure!(
            matches!(r, Err(StoreError::Unsupported(_))),
            "store without fencing must answer Unsupported, got {r:?}"
        );
        return Ok(());
    }
    let u = user();
    let c = new_chat(&*store, &u, None).await?;
    let old = text_msg(Role::Assistant, "old turn");
    store
        .upsert_message_fenced(&u, &c.id, &stored(old.clone(), 1), 5)
        .await
        .map_err(|e| e.to_string())?;
    let newer = text_msg(Role::User, "new turn");
    store
        .upsert_message_fenced(&u, &c.id, &stored(newer, 2), 7)
        .await
        .map_err(|e| e.to_string())?;
    let mut late = old.clone();
    late.parts = vec![Part::text("late write from a paused instance")];
    match store
        .upsert_message_fenced(&u, &c.id, &stored(late, 3), 5)
        .await
    {
        Err(StoreError::Fenced) => {}
        other => return Err(format!("stale token: expected Fenced, got {other:?}")),
    }
    // Same token again is fine (a turn writes many times); other users still get NotFound.
    store
        .upsert_message_fenced(&u, &c.id, &stored(old, 4), 7)
        .await
        .map_err(|e| e.to_string())?;
    not_found(
        store
            .upsert_message_fenced(&user(), &c.id, &stored(text_msg(Role::User, "x"), 1), 99)
            .await,
        "fenced write by other user",
    )?;
    let msgs = store
        .load_messages(&u, &c.id)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(
        msgs.len() == 2 && msgs[0].message.text() == "old turn",
        "fenced write changed data: {msgs:?}"
    );
    Ok(())
}

/// What a session factory returns: the runtime under test and the store it writes to.
pub struct SessionUnderTest {
    /// The session runtime.
    pub session: Arc<dyn ChatSession>,
    /// The store the runtime persists into.
    pub store: Arc<dyn MessageStore>,
}

impl std::fmt::Debug for SessionUnderTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionUnderTest")
    }
}

/// Builds a session runtime around the given model and config.
pub trait SessionFactory:
    Fn(Arc<dyn ModelProvider>, TurnConfig) -> SessionUnderTest + Send + Sync
{
}
impl<F: Fn(Arc<dyn ModelProvider>, TurnConfig) -> SessionUnderTest + Send + Sync> SessionFactory
    for F
{
}

fn config() -> TurnConfig {
    TurnConfig {
        checkpoint_interval: Duration::from_millis(20),
        tools: demo_tools(),
        ..TurnConfig::default()
    }
}

fn slow(tokens: u32) -> Arc<dyn ModelProvider> {
    Arc::new(DemoModel::new(tokens).with_delay(Duration::from_millis(15)))
}

struct Ctx {
    session: Arc<dyn ChatSession>,
    store: Arc<dyn MessageStore>,
    user: UserId,
    chat: ChatId,
}

async fn ctx(
    f: &dyn SessionFactory,
    model: Arc<dyn ModelProvider>,
    config: TurnConfig,
) -> Result<Ctx, String> {
    let sut = f(model, config);
    let user = user();
    let chat = new_chat(&*sut.store, &user, None).await?.id;
    Ok(Ctx {
        session: sut.session,
        store: sut.store,
        user,
        chat,
    })
}

impl Ctx {
    async fn send(&self, text: &str) -> Result<TurnStream, String> {
        self.session
            .send(
                &self.user,
                &self.chat,
                SendRequest::submit(UiMessage::user_text(MessageId::new(), text)),
            )
            .await
            .map_err(|e| format!("send: {e}"))
    }

    async fn history(&self) -> Result<Vec<UiMessage>, String> {
        self.session
            .history(&self.user, &self.chat)
            .await
            .map_err(|e| format!("history: {e}"))
    }

    async fn wait_idle(&self) -> CheckResult {
        for _ in 0..500 {
            match self.session.resume(&self.user, &self.chat).await {
                Ok(None) => return Ok(()),
                Ok(Some(_)) => crate::sleep(Duration::from_millis(10)).await,
                Err(e) => return Err(format!("resume: {e}")),
            }
        }
        Err("turn did not finish in 5 s".into())
    }
}

async fn collect(stream: TurnStream) -> Vec<Bytes> {
    stream.frames.collect().await
}

fn chunks(frames: &[Bytes]) -> Result<(Vec<UiChunk<'static>>, bool), String> {
    parse_sse(&frames.concat()).map_err(|e| format!("unparseable stream: {e}"))
}

fn types(chunks: &[UiChunk<'_>]) -> Vec<&'static str> {
    chunks.iter().map(UiChunk::type_name).collect()
}

fn finish_reason(m: &UiMessage) -> Option<FinishReason> {
    m.metadata.as_ref().and_then(|md| md.finish_reason)
}

/// Runs every session check against runtimes built by `factory`.
pub async fn session_conformance<F: SessionFactory + 'static>(factory: F) {
    let f: Arc<dyn SessionFactory> = Arc::new(factory);
    macro_rules! check {
        ($name:literal, $fn:ident) => {
            ($name, Box::pin($fn(f.clone())) as BoxFut)
        };
    }
    let checks: Vec<(&'static str, BoxFut)> = vec![
        check!("text_turn_streams_and_persists", text_turn),
        check!("user_message_stored_before_the_model_answers", user_first),
        check!("client_disconnect_does_not_stop_the_turn", disconnect),
        check!("stop_keeps_the_partial_answer", stop_keeps_partial),
        check!("one_turn_per_chat", single_flight),
        check!("resume_replays_exactly_then_follows", resume_replays),
        check!(
            "model_error_mid_stream_persists_what_was_produced",
            model_error
        ),
        check!("truncated_model_stream_is_an_error", truncated),
        check!("tool_call_then_answer_over_two_steps", tool_turn),
        check!("step_limit_ends_with_tool_calls", step_limit),
        check!("other_users_get_not_found", session_ownership),
        check!("bad_input_changes_nothing", bad_input),
        check!("title_from_first_user_message", title_rule),
        check!("regenerate_replaces_the_answer", regenerate),
        check!("retried_user_message_is_not_duplicated", retried_message),
        check!(
            "checkpoints_while_streaming_and_hidden_from_history",
            checkpoints
        ),
        check!("crashed_checkpoint_is_listed_as_error", crashed_checkpoint),
        check!("delete_stops_the_running_turn", delete_running),
    ];
    run_checks("session_conformance", checks).await;
}

async fn text_turn(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, Arc::new(DemoModel::new(4)), config()).await?;
    let turn = c.send("Hello there").await?;
    let mid = turn.message_id.clone();
    let frames = collect(turn).await;
    let (ch, done) = chunks(&frames)?;
    ensure!(done, "no [DONE]");
    let want = [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-delta",
        "text-delta",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ];
    ensure!(types(&ch) == want, "chunk order {:?}", types(&ch));
    ensure!(
        matches!(&ch[0], UiChunk::Start { message_id, .. } if *message_id == mid.as_str()),
        "start id"
    );
    ensure!(
        matches!(
            ch.last(),
            Some(UiChunk::Finish {
                finish_reason: Some(FinishReason::Stop),
                ..
            })
        ),
        "finish reason"
    );
    let h = c.history().await?;
    ensure!(h.len() == 2, "history has {} messages", h.len());
    ensure!(
        h[0].role == Role::User && h[0].text() == "Hello there",
        "user message {:?}",
        h[0]
    );
    ensure!(
        h[1].id == mid && h[1].text() == "tok0 tok1 tok2 tok3 ",
        "assistant {:?}",
        h[1]
    );
    ensure!(
        finish_reason(&h[1]) == Some(FinishReason::Stop),
        "stored finish reason"
    );
    ensure!(
        h[1].metadata.as_ref().and_then(|m| m.created_at).is_some(),
        "createdAt missing"
    );
    let chat = c
        .store
        .get_chat(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(chat.updated_at >= chat.created_at, "updatedAt");
    Ok(())
}

async fn user_first(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, slow(30), config()).await?;
    let mut turn = c.send("first").await?;
    turn.frames.next().await;
    let stored = c
        .store
        .load_messages(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(
        stored.first().is_some_and(|m| m.message.text() == "first"),
        "user message not stored at stream start"
    );
    c.session
        .stop(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn disconnect(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, slow(12), config()).await?;
    let mut turn = c.send("go").await?;
    for _ in 0..4 {
        turn.frames.next().await;
    }
    drop(turn);
    c.wait_idle().await?;
    let h = c.history().await?;
    let want: String = (0..12).map(|i| format!("tok{i} ")).collect();
    ensure!(
        h.len() == 2 && h[1].text() == want,
        "answer after disconnect: {:?}",
        h.get(1).map(UiMessage::text)
    );
    ensure!(
        finish_reason(&h[1]) == Some(FinishReason::Stop),
        "finish reason after disconnect"
    );
    Ok(())
}

async fn stop_keeps_partial(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, slow(200), config()).await?;
    let mut turn = c.send("long").await?;
    let mut frames = Vec::new();
    while let Some(fr) = turn.frames.next().await {
        let is_delta = fr.windows(12).any(|w| w == b"\"text-delta\"");
        frames.push(fr);
        if is_delta && frames.len() >= 6 {
            break;
        }
    }
    let stopped = c
        .session
        .stop(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(stopped, "stop returned false while running");
    frames.extend(collect(turn).await);
    let (ch, done) = chunks(&frames)?;
    let t = types(&ch);
    ensure!(
        done && t.ends_with(&["text-end", "abort"]),
        "stream end {t:?}"
    );
    let h = c.history().await?;
    ensure!(h.len() == 2, "history len {}", h.len());
    let text = h[1].text();
    ensure!(
        text.starts_with("tok0 tok1 ") && !text.contains("tok199"),
        "partial answer {text:?}"
    );
    ensure!(
        finish_reason(&h[1]) == Some(FinishReason::Abort),
        "finish reason {:?}",
        finish_reason(&h[1])
    );
    let again = c
        .session
        .stop(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(!again, "stop on an idle chat returned true");
    Ok(())
}

async fn single_flight(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, slow(10), config()).await?;
    let turn = c.send("one").await?;
    let before = c
        .store
        .load_messages(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?
        .len();
    match c
        .session
        .send(
            &c.user,
            &c.chat,
            SendRequest::submit(UiMessage::user_text(MessageId::new(), "two")),
        )
        .await
    {
        Err(Error::Busy { .. }) => {}
        other => return Err(format!("second send: expected Busy, got {other:?}")),
    }
    let after = c
        .store
        .load_messages(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?
        .len();
    ensure!(before == after, "busy send stored something");
    collect(turn).await;
    c.wait_idle().await?;
    let t2 = c.send("three").await?;
    collect(t2).await;
    let h = c.history().await?;
    ensure!(h.len() == 4, "history len {}", h.len());
    Ok(())
}

async fn resume_replays(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, slow(20), config()).await?;
    ensure!(
        c.session
            .resume(&c.user, &c.chat)
            .await
            .map_err(|e| e.to_string())?
            .is_none(),
        "resume on idle chat"
    );
    let mut turn = c.send("resume me").await?;
    let mut first = Vec::new();
    for _ in 0..5 {
        if let Some(fr) = turn.frames.next().await {
            first.push(fr);
        }
    }
    let resumed = c
        .session
        .resume(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no running turn to resume")?;
    ensure!(
        resumed.message_id == turn.message_id,
        "resumed a different message"
    );
    let (rest, replay) = futures::join!(collect(turn), collect(resumed));
    first.extend(rest);
    ensure!(
        first == replay,
        "replay differs from the live stream ({} vs {} frames)",
        first.len(),
        replay.len()
    );
    let (ch, done) = chunks(&replay)?;
    ensure!(
        done && types(&ch).last() == Some(&"finish"),
        "replay incomplete"
    );
    Ok(())
}

async fn model_error(f: Arc<dyn SessionFactory>) -> CheckResult {
    let model = Arc::new(DemoModel::new(10).with_script(DemoScript::FailAfter(3)));
    let c = ctx(&*f, model, config()).await?;
    let frames = collect(c.send("fail please").await?).await;
    let (ch, done) = chunks(&frames)?;
    let t = types(&ch);
    ensure!(done && t.ends_with(&["text-end", "error"]), "stream {t:?}");
    if let Some(UiChunk::Error { error_text }) = ch.last() {
        ensure!(
            !error_text.contains("demo model"),
            "internal error text leaked: {error_text}"
        );
    }
    let h = c.history().await?;
    ensure!(
        h.len() == 2 && h[1].text() == "tok0 tok1 tok2 ",
        "stored {:?}",
        h.get(1)
    );
    ensure!(
        finish_reason(&h[1]) == Some(FinishReason::Error),
        "finish reason"
    );
    Ok(())
}

async fn truncated(f: Arc<dyn SessionFactory>) -> CheckResult {
    let model = Arc::new(DemoModel::new(6).with_script(DemoScript::Truncate));
    let c = ctx(&*f, model, config()).await?;
    let frames = collect(c.send("cut").await?).await;
    let (ch, _) = chunks(&frames)?;
    ensure!(
        types(&ch).last() == Some(&"error"),
        "stream {:?}",
        types(&ch)
    );
    let h = c.history().await?;
    ensure!(
        finish_reason(&h[1]) == Some(FinishReason::Error) && h[1].text() == "tok0 tok1 tok2 ",
        "stored {:?}",
        h[1]
    );
    Ok(())
}

async fn tool_turn(f: Arc<dyn SessionFactory>) -> CheckResult {
    let model = Arc::new(DemoModel::new(3).with_script(DemoScript::ToolCall));
    let c = ctx(&*f, model, config()).await?;
    let frames = collect(c.send("weather?").await?).await;
    let (ch, done) = chunks(&frames)?;
    let want = [
        "start",
        "start-step",
        "tool-input-start",
        "tool-input-delta",
        "tool-input-delta",
        "tool-input-available",
        "tool-output-available",
        "finish-step",
        "start-step",
        "text-start",
        "text-delta",
        "text-delta",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ];
    ensure!(done && types(&ch) == want, "chunks {:?}", types(&ch));
    let h = c.history().await?;
    let parts = &h[1].parts;
    ensure!(
        matches!(parts[0], Part::StepStart) && matches!(parts[2], Part::StepStart),
        "step parts {parts:?}"
    );
    match &parts[1] {
        Part::Tool(t) => {
            ensure!(
                t.state == ToolState::OutputAvailable && t.input == Some(json!({"city":"Paris"})),
                "tool part {t:?}"
            );
            ensure!(
                t.output.as_ref().and_then(|o| o.get("city")) == Some(&json!("Paris")),
                "tool output {t:?}"
            );
        }
        other => return Err(format!("expected tool part, got {other:?}")),
    }
    ensure!(h[1].text() == "tok0 tok1 tok2 ", "answer text");
    Ok(())
}

async fn step_limit(f: Arc<dyn SessionFactory>) -> CheckResult {
    let model = Arc::new(DemoModel::new(3).with_script(DemoScript::ToolCall));
    let c = ctx(
        &*f,
        model,
        TurnConfig {
            max_steps: 1,
            ..config()
        },
    )
    .await?;
    let frames = collect(c.send("weather?").await?).await;
    let (ch, _) = chunks(&frames)?;
    ensure!(
        matches!(
            ch.last(),
            Some(UiChunk::Finish {
                finish_reason: Some(FinishReason::ToolCalls),
                ..
            })
        ),
        "end {:?}",
        ch.last()
    );
    let h = c.history().await?;
    ensure!(
        finish_reason(&h[1]) == Some(FinishReason::ToolCalls),
        "stored reason"
    );
    Ok(())
}

async fn session_ownership(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, slow(20), config()).await?;
    let turn = c.send("mine").await?;
    let other = user();
    let msg = UiMessage::user_text(MessageId::new(), "theirs");
    let nf = |r: Result<(), Error>, what: &str| match r {
        Err(Error::NotFound) => Ok(()),
        other => Err(format!("{what}: expected NotFound, got {other:?}")),
    };
    nf(
        c.session
            .send(&other, &c.chat, SendRequest::submit(msg))
            .await
            .map(|_| ()),
        "send",
    )?;
    nf(
        c.session.resume(&other, &c.chat).await.map(|_| ()),
        "resume",
    )?;
    nf(c.session.stop(&other, &c.chat).await.map(|_| ()), "stop")?;
    nf(
        c.session.history(&other, &c.chat).await.map(|_| ()),
        "history",
    )?;
    nf(c.session.delete(&other, &c.chat).await, "delete")?;
    let frames = collect(turn).await;
    let (ch, _) = chunks(&frames)?;
    ensure!(
        types(&ch).last() == Some(&"finish"),
        "owner's turn was disturbed"
    );
    ensure!(c.history().await?.len() == 2, "owner's history changed");
    Ok(())
}

async fn bad_input(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, Arc::new(DemoModel::new(2)), config()).await?;
    let cases: Vec<(&str, SendRequest)> = vec![
        (
            "empty text",
            SendRequest::submit(UiMessage::user_text(MessageId::new(), "   ")),
        ),
        (
            "too large",
            SendRequest::submit(UiMessage::user_text(
                MessageId::new(),
                "x".repeat(40 * 1024),
            )),
        ),
        (
            "assistant role",
            SendRequest::submit(UiMessage::new(
                MessageId::new(),
                Role::Assistant,
                vec![Part::text("hi")],
            )),
        ),
        (
            "no parts",
            SendRequest::submit(UiMessage::new(MessageId::new(), Role::User, vec![])),
        ),
        (
            "no message",
            SendRequest {
                message: None,
                ..SendRequest::submit(UiMessage::user_text(MessageId::new(), "x"))
            },
        ),
        ("regenerate nothing", SendRequest::regenerate(None)),
    ];
    for (what, req) in cases {
        match c.session.send(&c.user, &c.chat, req).await {
            Err(Error::Invalid(_) | Error::TooLarge { .. }) => {}
            other => {
                return Err(format!(
                    "{what}: expected a validation error, got {other:?}"
                ));
            }
        }
    }
    let stored = c
        .store
        .load_messages(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(
        stored.is_empty(),
        "bad input stored {} messages",
        stored.len()
    );
    let chat = c
        .store
        .get_chat(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(chat.title.is_none(), "bad input set a title");
    ensure!(
        c.session
            .resume(&c.user, &c.chat)
            .await
            .map_err(|e| e.to_string())?
            .is_none(),
        "a turn is running"
    );
    Ok(())
}

async fn title_rule(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, Arc::new(DemoModel::new(1)), config()).await?;
    let long = format!("  {}é tail", "a".repeat(48));
    collect(c.send(&long).await?).await;
    collect(c.send("second message").await?).await;
    let chat = c
        .store
        .get_chat(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?;
    let want = crate::title_from_text(&long);
    ensure!(chat.title == want, "title {:?}, want {want:?}", chat.title);
    Ok(())
}

async fn regenerate(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, Arc::new(DemoModel::new(2)), config()).await?;
    collect(c.send("q").await?).await;
    let before = c.history().await?;
    let turn = c
        .session
        .send(
            &c.user,
            &c.chat,
            SendRequest::regenerate(Some(before[1].id.clone())),
        )
        .await
        .map_err(|e| e.to_string())?;
    ensure!(turn.message_id == before[1].id, "regenerate used a new id");
    collect(turn).await;
    let after = c.history().await?;
    ensure!(
        after.len() == 2,
        "regenerate added messages: {}",
        after.len()
    );
    ensure!(
        after[1].id == before[1].id && after[1].text() == "tok0 tok1 ",
        "regenerated {:?}",
        after[1]
    );
    let raw = c
        .store
        .load_messages(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(raw.len() == 2, "stored rows {}", raw.len());
    Ok(())
}

async fn retried_message(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, Arc::new(DemoModel::new(2)), config()).await?;
    let msg = UiMessage::user_text(MessageId::new(), "once");
    for _ in 0..2 {
        let t = c
            .session
            .send(&c.user, &c.chat, SendRequest::submit(msg.clone()))
            .await
            .map_err(|e| e.to_string())?;
        collect(t).await;
    }
    let h = c.history().await?;
    ensure!(h.len() == 2, "retry duplicated messages: {}", h.len());
    ensure!(h[0].id == msg.id, "user message id changed");
    Ok(())
}

async fn checkpoints(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, slow(40), config()).await?;
    let mut turn = c.send("checkpoint me").await?;
    // Past the default 16-token floor (and the 20 ms interval): start,
    // start-step, text-start and 19 tokens.
    for _ in 0..22 {
        turn.frames.next().await;
    }
    crate::sleep(Duration::from_millis(60)).await;
    let raw = c
        .store
        .load_messages(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?;
    let cp = raw
        .iter()
        .find(|m| m.message.id == turn.message_id)
        .ok_or("no checkpoint while streaming")?;
    ensure!(
        cp.status == MessageStatus::Streaming && cp.message.text().starts_with("tok0 "),
        "checkpoint {cp:?}"
    );
    let listed = c.history().await?;
    ensure!(
        listed.iter().all(|m| m.id != turn.message_id),
        "running message listed in history"
    );
    collect(turn).await;
    c.wait_idle().await?;
    let raw = c
        .store
        .load_messages(&c.user, &c.chat)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(
        raw.len() == 2 && raw[1].status == MessageStatus::Complete,
        "final row {:?}",
        raw.get(1)
    );
    Ok(())
}

async fn crashed_checkpoint(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, Arc::new(DemoModel::new(2)), config()).await?;
    let now = crate::now_ms();
    let q = text_msg(Role::User, "before the crash");
    c.store
        .upsert_message(&c.user, &c.chat, &stored(q, now))
        .await
        .map_err(|e| e.to_string())?;
    let partial = text_msg(Role::Assistant, "tok0 tok1 ");
    let mut cp = stored(partial.clone(), now);
    cp.status = MessageStatus::Streaming;
    c.store
        .upsert_message(&c.user, &c.chat, &cp)
        .await
        .map_err(|e| e.to_string())?;
    let h = c.history().await?;
    ensure!(
        h.len() == 2 && h[1].id == partial.id && h[1].text() == "tok0 tok1 ",
        "history {h:?}"
    );
    ensure!(
        finish_reason(&h[1]) == Some(FinishReason::Error),
        "finish reason {:?}",
        finish_reason(&h[1])
    );
    // The next turn works and the history stays consistent.
    collect(c.send("after").await?).await;
    ensure!(c.history().await?.len() == 4, "history after next turn");
    Ok(())
}

async fn delete_running(f: Arc<dyn SessionFactory>) -> CheckResult {
    let c = ctx(&*f, slow(100), config()).await?;
    let turn = c.send("doomed").await?;
    c.session
        .delete(&c.user, &c.chat)
        .await
        .map_err(|e| format!("delete: {e}"))?;
    let frames = collect(turn).await;
    let (_, done) = chunks(&frames)?;
    ensure!(done, "stream did not end after delete");
    match c.store.get_chat(&c.user, &c.chat).await {
        Err(StoreError::NotFound) => {}
        other => return Err(format!("chat still there: {other:?}")),
    }
    match c.session.history(&c.user, &c.chat).await {
        Err(Error::NotFound) => Ok(()),
        other => Err(format!("history after delete: {other:?}")),
    }
}

/// Runs every coordinator check (lease exclusivity and fencing tokens, bus
/// replay + follow, release, stop signals, expiry) against `coord`.
pub async fn coordinator_conformance(coord: Arc<dyn crate::TurnCoordinator>) {
    let c = || coord.clone();
    let checks: Vec<(&'static str, BoxFut)> = vec![
        (
            "lease_is_exclusive_and_tokens_increase",
            Box::pin(coord_lease(c())),
        ),
        (
            "bus_replays_then_follows_and_ends_on_release",
            Box::pin(coord_bus(c())),
        ),
        ("stop_reaches_the_holder", Box::pin(coord_stop(c()))),
        (
            "expired_lease_can_be_taken_over",
            Box::pin(coord_expiry(c())),
        ),
    ];
    run_checks("coordinator_conformance", checks).await;
}

fn ce(e: crate::CoordError) -> String {
    e.to_string()
}

async fn coord_lease(coord: Arc<dyn crate::TurnCoordinator>) -> CheckResult {
    let chat = ChatId::new();
    let ttl = Duration::from_secs(5);
    ensure!(
        coord.running(&chat).await.map_err(ce)?.is_none(),
        "fresh chat has a running turn"
    );
    let attempts = futures::future::join_all((0..8).map(|_| coord.acquire(&chat, ttl))).await;
    let winners: Vec<crate::Lease> = attempts
        .into_iter()
        .map(|r| r.map_err(ce))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    ensure!(
        winners.len() == 1,
        "{} concurrent acquires won",
        winners.len()
    );
    let first = winners[0].clone();
    let mid = MessageId::new();
    coord.begin(&first, &mid).await.map_err(ce)?;
    let running = coord
        .running(&chat)
        .await
        .map_err(ce)?
        .ok_or("no running turn")?;
    ensure!(
        running.token == first.token && running.message_id.as_ref() == Some(&mid),
        "running {running:?}"
    );
    ensure!(
        coord.renew(&first, ttl).await.map_err(ce)?,
        "renew of a held lease failed"
    );
    coord.release(&first).await.map_err(ce)?;
    ensure!(
        coord.running(&chat).await.map_err(ce)?.is_none(),
        "released lease still running"
    );
    ensure!(
        !coord.renew(&first, ttl).await.map_err(ce)?,
        "renew after release succeeded"
    );
    let second = coord
        .acquire(&chat, ttl)
        .await
        .map_err(ce)?
        .ok_or("re-acquire failed")?;
    ensure!(
        second.token > first.token,
        "token did not increase: {} then {}",
        first.token,
        second.token
    );
    coord.release(&second).await.map_err(ce)?;
    Ok(())
}

async fn coord_bus(coord: Arc<dyn crate::TurnCoordinator>) -> CheckResult {
    let chat = ChatId::new();
    let lease = coord
        .acquire(&chat, Duration::from_secs(5))
        .await
        .map_err(ce)?
        .ok_or("acquire")?;
    coord.begin(&lease, &MessageId::new()).await.map_err(ce)?;
    let frames: Vec<Bytes> = (0..5)
        .map(|i| Bytes::from(format!("data: {{\"n\":{i}}}\n\n")))
        .collect();
    coord.publish(&lease, &frames[..2]).await.map_err(ce)?;
    let (_, early) = coord
        .follow(&chat)
        .await
        .map_err(ce)?
        .ok_or("follow while running")?;
    coord.publish(&lease, &frames[2..3]).await.map_err(ce)?;
    let (_, late) = coord
        .follow(&chat)
        .await
        .map_err(ce)?
        .ok_or("second follow")?;
    let publish_rest = async {
        crate::sleep(Duration::from_millis(50)).await;
        coord.publish(&lease, &frames[3..]).await.map_err(ce)?;
        coord.release(&lease).await.map_err(ce)
    };
    let collect_all = |s: crate::BoxStream<'static, Bytes>| async move {
        tokio_like_timeout(Duration::from_secs(10), s.collect::<Vec<Bytes>>()).await
    };
    let (r, a, b) = futures::join!(publish_rest, collect_all(early), collect_all(late));
    r?;
    let mut want = frames.clone();
    want.push(Bytes::from_static(crate::sse::DONE_FRAME));
    ensure!(a.as_ref() == Some(&want), "early follower got {a:?}");
    ensure!(b.as_ref() == Some(&want), "late follower got {b:?}");
    ensure!(
        coord.follow(&chat).await.map_err(ce)?.is_none(),
        "follow after release"
    );
    Ok(())
}

async fn coord_stop(coord: Arc<dyn crate::TurnCoordinator>) -> CheckResult {
    let chat = ChatId::new();
    ensure!(
        !coord.request_stop(&chat).await.map_err(ce)?,
        "stop with nothing running returned true"
    );
    let lease = coord
        .acquire(&chat, Duration::from_secs(5))
        .await
        .map_err(ce)?
        .ok_or("acquire")?;
    let waiter = coord.stop_requested(&lease);
    let requester = async {
        crate::sleep(Duration::from_millis(50)).await;
        coord.request_stop(&chat).await
    };
    let (w, r) = futures::join!(
        tokio_like_timeout(Duration::from_secs(10), waiter),
        requester
    );
    ensure!(r.map_err(ce)?, "request_stop returned false while running");
    ensure!(
        matches!(w, Some(Ok(()))),
        "holder did not see the stop: {w:?}"
    );
    coord.release(&lease).await.map_err(ce)?;
    Ok(())
}

async fn coord_expiry(coord: Arc<dyn crate::TurnCoordinator>) -> CheckResult {
    let chat = ChatId::new();
    let short = Duration::from_millis(300);
    let old = coord
        .acquire(&chat, short)
        .await
        .map_err(ce)?
        .ok_or("acquire")?;
    ensure!(
        coord.acquire(&chat, short).await.map_err(ce)?.is_none(),
        "second acquire before expiry"
    );
    crate::sleep(Duration::from_millis(700)).await;
    ensure!(
        coord.running(&chat).await.map_err(ce)?.is_none(),
        "expired lease still running"
    );
    let new = coord
        .acquire(&chat, Duration::from_secs(5))
        .await
        .map_err(ce)?
        .ok_or("take over after expiry")?;
    ensure!(new.token > old.token, "takeover token not larger");
    ensure!(
        !coord.renew(&old, short).await.map_err(ce)?,
        "old holder renewed a taken-over lease"
    );
    coord.release(&old).await.map_err(ce)?; // must not free the new holder's lease
    ensure!(
        coord
            .running(&chat)
            .await
            .map_err(ce)?
            .is_some_and(|r| r.token == new.token),
        "old release freed the new lease"
    );
    coord.release(&new).await.map_err(ce)?;
    Ok(())
}

async fn tokio_like_timeout<F: Future>(d: Duration, f: F) -> Option<F::Output> {
    let f = std::pin::pin!(f);
    let t = std::pin::pin!(crate::sleep(d));
    match futures::future::select(f, t).await {
        futures::future::Either::Left((v, _)) => Some(v),
        futures::future::Either::Right(_) => None,
    }
}

/// Builds one server instance (a session runtime) over a shared store and
/// coordinator, for the multi-instance suite.
pub trait InstanceFactory:
    Fn(Arc<dyn ModelProvider>, TurnConfig) -> Arc<dyn ChatSession> + Send + Sync
{
}
impl<F: Fn(Arc<dyn ModelProvider>, TurnConfig) -> Arc<dyn ChatSession> + Send + Sync>
    InstanceFactory for F
{
}

/// Runs the multi-instance checks: three instances made by `instance` over one
/// `store` (and the coordinator the factory captures).
pub async fn multi_instance_conformance<F: InstanceFactory + 'static>(
    store: Arc<dyn MessageStore>,
    instance: F,
) {
    let f: Arc<dyn InstanceFactory> = Arc::new(instance);
    let checks: Vec<(&'static str, BoxFut)> = vec![
        (
            "send_on_a_resume_on_b_replays_identically",
            Box::pin(mi_resume(store.clone(), f.clone())),
        ),
        (
            "stop_on_c_stops_the_turn_on_a",
            Box::pin(mi_stop(store.clone(), f.clone())),
        ),
        (
            "concurrent_sends_on_two_instances_one_wins",
            Box::pin(mi_single_flight(store.clone(), f.clone())),
        ),
        (
            "history_on_b_hides_the_turn_running_on_a",
            Box::pin(mi_history(store.clone(), f.clone())),
        ),
    ];
    run_checks("multi_instance_conformance", checks).await;
}

async fn mi_setup(
    store: &Arc<dyn MessageStore>,
    f: &Arc<dyn InstanceFactory>,
    model: Arc<dyn ModelProvider>,
) -> Result<(Vec<Arc<dyn ChatSession>>, UserId, ChatId), String> {
    let nodes = (0..3).map(|_| f(model.clone(), config())).collect();
    let u = user();
    let chat = new_chat(&**store, &u, None).await?.id;
    Ok((nodes, u, chat))
}

async fn mi_resume(store: Arc<dyn MessageStore>, f: Arc<dyn InstanceFactory>) -> CheckResult {
    let (n, u, chat) = mi_setup(&store, &f, slow(20)).await?;
    let msg = UiMessage::user_text(MessageId::new(), "hello from A");
    let mut on_a = n[0]
        .send(&u, &chat, SendRequest::submit(msg))
        .await
        .map_err(|e| e.to_string())?;
    let mut first = Vec::new();
    for _ in 0..6 {
        first.extend(on_a.frames.next().await);
    }
    let on_b = n[1]
        .resume(&u, &chat)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("B sees no running turn")?;
    let (rest, replay) = futures::join!(collect(on_a), collect(on_b));
    first.extend(rest);
    ensure!(
        first == replay,
        "B's replay differs from A's stream ({} vs {} frames)",
        first.len(),
        replay.len()
    );
    let h = n[2].history(&u, &chat).await.map_err(|e| e.to_string())?;
    ensure!(
        h.len() == 2
            && h[1].text().starts_with("tok0 ")
            && finish_reason(&h[1]) == Some(FinishReason::Stop),
        "history on C {h:?}"
    );
    Ok(())
}

async fn mi_stop(store: Arc<dyn MessageStore>, f: Arc<dyn InstanceFactory>) -> CheckResult {
    let (n, u, chat) = mi_setup(&store, &f, slow(200)).await?;
    let msg = UiMessage::user_text(MessageId::new(), "stop me from C");
    let mut on_a = n[0]
        .send(&u, &chat, SendRequest::submit(msg))
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..6 {
        on_a.frames.next().await;
    }
    ensure!(
        n[2].stop(&u, &chat).await.map_err(|e| e.to_string())?,
        "stop on C found no turn"
    );
    let rest = collect(on_a).await;
    let (ch, done) = chunks(&rest)?;
    ensure!(
        done && types(&ch).last() == Some(&"abort"),
        "A's stream did not abort: {:?}",
        types(&ch)
    );
    let h = n[1].history(&u, &chat).await.map_err(|e| e.to_string())?;
    ensure!(
        h.len() == 2
            && finish_reason(&h[1]) == Some(FinishReason::Abort)
            && h[1].text().starts_with("tok0 "),
        "partial answer {h:?}"
    );
    Ok(())
}

async fn mi_single_flight(
    store: Arc<dyn MessageStore>,
    f: Arc<dyn InstanceFactory>,
) -> CheckResult {
    let (n, u, chat) = mi_setup(&store, &f, slow(10)).await?;
    let a = n[0].send(
        &u,
        &chat,
        SendRequest::submit(UiMessage::user_text(MessageId::new(), "a")),
    );
    let b = n[1].send(
        &u,
        &chat,
        SendRequest::submit(UiMessage::user_text(MessageId::new(), "b")),
    );
    let (a, b) = futures::join!(a, b);
    let (ok, busy) = match (a, b) {
        (Ok(s), Err(Error::Busy { .. })) | (Err(Error::Busy { .. }), Ok(s)) => (s, ()),
        (a, b) => return Err(format!("expected one Ok and one Busy, got {a:?} / {b:?}")),
    };
    let () = busy;
    collect(ok).await;
    let raw = store
        .load_messages(&u, &chat)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(
        raw.len() == 2,
        "expected 2 rows (one turn), got {}",
        raw.len()
    );
    Ok(())
}

async fn mi_history(store: Arc<dyn MessageStore>, f: Arc<dyn InstanceFactory>) -> CheckResult {
    let (n, u, chat) = mi_setup(&store, &f, slow(40)).await?;
    let msg = UiMessage::user_text(MessageId::new(), "running on A");
    let mut on_a = n[0]
        .send(&u, &chat, SendRequest::submit(msg))
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..10 {
        on_a.frames.next().await;
    }
    crate::sleep(Duration::from_millis(60)).await;
    let h = n[1].history(&u, &chat).await.map_err(|e| e.to_string())?;
    ensure!(
        h.len() == 1 && h[0].role == Role::User,
        "B lists the running answer: {h:?}"
    );
    match n[1]
        .send(
            &u,
            &chat,
            SendRequest::submit(UiMessage::user_text(MessageId::new(), "x")),
        )
        .await
    {
        Err(Error::Busy { .. }) => {}
        other => return Err(format!("send on B while A runs: {other:?}")),
    }
    collect(on_a).await;
    Ok(())
}

/// Checks one model step's stream against what the turn loop relies on from
/// every [`ModelProvider`]: a successful stream ends with exactly one
/// `Finish`; an error is the last item; tool input deltas and calls name a
/// call that was started and not yet completed; each started call completes
/// exactly once before `Finish`. A provider whose upstream ends early must
/// say so with an error, never with a silent end.
pub fn check_model_stream(
    events: &[Result<crate::ModelEvent, crate::ModelError>],
) -> Result<(), String> {
    use crate::ModelEvent as E;
    let mut started = std::collections::HashSet::new();
    let mut called = std::collections::HashSet::new();
    for (i, e) in events.iter().enumerate() {
        let last = i + 1 == events.len();
        match e {
            Err(e) => ensure!(last, "event {i}: an error must end the stream ({e})"),
            Ok(E::Finish { .. }) => ensure!(last, "event {i}: Finish must be the last event"),
            Ok(E::ToolInputStart { id, .. }) => {
                ensure!(
                    started.insert(id.clone()),
                    "event {i}: tool call {id} started twice"
                );
            }
            Ok(E::ToolInputDelta { id, .. }) => {
                ensure!(
                    started.contains(id),
                    "event {i}: input delta of tool call {id} before its start"
                );
                ensure!(
                    !called.contains(id),
                    "event {i}: input delta of tool call {id} after it completed"
                );
            }
            Ok(E::ToolCall { id, .. }) => {
                ensure!(
                    started.contains(id),
                    "event {i}: tool call {id} completed before its start"
                );
                ensure!(
                    called.insert(id.clone()),
                    "event {i}: tool call {id} completed twice"
                );
            }
            Ok(E::TextDelta(_) | E::ReasoningDelta(_)) => {}
        }
    }
    match events.last() {
        Some(Ok(E::Finish { .. })) => {
            ensure!(
                started == called,
                "tool calls started but never completed: {:?}",
                started.difference(&called).collect::<Vec<_>>()
            );
            Ok(())
        }
        Some(Err(_)) => Ok(()),
        _ => Err("the stream ended without Finish or an error".into()),
    }
}

/// The provider-facing conformance check: streams one step of `request`
/// from `model`, checks it with [`check_model_stream`] (panicking with the
/// reason when it fails) and returns the events for further assertions.
pub async fn model_stream_conformance(
    model: &dyn ModelProvider,
    request: crate::ModelRequest,
) -> Result<Vec<Result<crate::ModelEvent, crate::ModelError>>, crate::ModelError> {
    let events: Vec<_> = model.stream(request).await?.collect().await;
    if let Err(why) = check_model_stream(&events) {
        panic!(
            "{} broke the model stream contract: {why}\n{events:?}",
            model.name()
        );
    }
    Ok(events)
}
