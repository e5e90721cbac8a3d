//! [`DoSessions`]: [`ChatSession`] for a Worker, one Durable Object per chat.

use async_trait::async_trait;
use bytes::Bytes;
use chat_core::{
    ChatId, ChatSession, Error, MessageId, MessageStore, SendRequest, StoreError, TurnFrames,
    TurnStream, UiMessage, UserId,
};
use futures::StreamExt;
use worker::{Headers, Method, ObjectNamespace, Request, RequestInit, Response};

use crate::store::D1Store;
use crate::wire::{BASE, CHAT_HEADER, ErrorWire, MESSAGE_ID_HEADER, SendWire, USER_HEADER};

/// The name of the DO of `user`'s chat `chat`. Built by the server only, after
/// the ownership check: user ids cannot contain `:` and chat ids are UUIDs, so
/// two different pairs never share a name.
pub fn room_name(user: &UserId, chat: &ChatId) -> String {
    format!("{}:{chat}", user.as_str())
}

/// Runs every chat's turns in its own [`ChatRoom`](crate::ChatRoom) Durable
/// Object. Each call first checks in D1 that `user` owns `chat` (404 otherwise,
/// before any DO is touched), then forwards to the DO named [`room_name`].
#[derive(Clone)]
pub struct DoSessions {
    store: D1Store,
    rooms: ObjectNamespace,
}

impl std::fmt::Debug for DoSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoSessions").finish_non_exhaustive()
    }
}

fn runtime(e: &worker::Error) -> Error {
    Error::Store(StoreError::unavailable(crate::D1Error(format!(
        "Durable Object call: {e}"
    ))))
}

impl DoSessions {
    /// Sessions over `store` (for the ownership check) and the DO namespace `rooms`.
    pub fn new(store: D1Store, rooms: ObjectNamespace) -> Self {
        Self { store, rooms }
    }

    /// Checks ownership, then calls `op` on the chat's DO.
    async fn call(
        &self,
        user: &UserId,
        chat: &ChatId,
        method: Method,
        op: &str,
        body: Option<String>,
    ) -> Result<Response, Error> {
        self.store.get_chat(user, chat).await?;
        let stub = self
            .rooms
            .id_from_name(&room_name(user, chat))
            .and_then(|id| id.get_stub())
            .map_err(|e| runtime(&e))?;
        let headers = Headers::new();
        headers
            .set(USER_HEADER, user.as_str())
            .and_then(|()| headers.set(CHAT_HEADER, &chat.to_string()))
            .map_err(|e| runtime(&e))?;
        let mut init = RequestInit::new();
        init.with_method(method).with_headers(headers);
        if let Some(b) = body {
            init.with_body(Some(b.into()));
        }
        let req =
            Request::new_with_init(&format!("{BASE}/{op}"), &init).map_err(|e| runtime(&e))?;
        let mut res = stub
            .fetch_with_request(req)
            .await
            .map_err(|e| runtime(&e))?;
        if res.status_code() >= 400 {
            let wire: ErrorWire = res.json().await.map_err(|e| runtime(&e))?;
            return Err(wire.into_error(chat));
        }
        Ok(res)
    }

    async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        user: &UserId,
        chat: &ChatId,
        method: Method,
        op: &str,
    ) -> Result<T, Error> {
        let mut res = self.call(user, chat, method, op, None).await?;
        res.json().await.map_err(|e| runtime(&e))
    }
}

fn turn_stream(mut res: Response) -> Result<TurnStream, Error> {
    let message_id = res
        .headers()
        .get(MESSAGE_ID_HEADER)
        .ok()
        .flatten()
        .map(MessageId::parse)
        .transpose()?
        .unwrap_or_default();
    let body = res.stream().map_err(|e| runtime(&e))?;
    let frames = body
        .take_while(|r| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "turn stream from the chat room broke off");
            }
            futures::future::ready(r.is_ok())
        })
        .filter_map(|r| futures::future::ready(r.ok().map(Bytes::from)));
    Ok(TurnStream {
        message_id,
        frames: TurnFrames::from_stream(Box::pin(frames)),
    })
}

#[derive(serde::Deserialize)]
struct Stopped {
    stopped: bool,
}

#[async_trait(?Send)]
impl ChatSession for DoSessions {
    async fn send(
        &self,
        user: &UserId,
        chat: &ChatId,
        request: SendRequest,
    ) -> Result<TurnStream, Error> {
        let body = serde_json::to_string(&SendWire::from_request(request))
            .map_err(|e| Error::Store(StoreError::Invalid(e.to_string())))?;
        let res = self
            .call(user, chat, Method::Post, "send", Some(body))
            .await?;
        turn_stream(res)
    }

    async fn resume(&self, user: &UserId, chat: &ChatId) -> Result<Option<TurnStream>, Error> {
        let res = self.call(user, chat, Method::Get, "resume", None).await?;
        if res.status_code() == 204 {
            return Ok(None);
        }
        turn_stream(res).map(Some)
    }

    async fn stop(&self, user: &UserId, chat: &ChatId) -> Result<bool, Error> {
        let s: Stopped = self.call_json(user, chat, Method::Post, "stop").await?;
        Ok(s.stopped)
    }

    async fn history(&self, user: &UserId, chat: &ChatId) -> Result<Vec<UiMessage>, Error> {
        self.call_json(user, chat, Method::Get, "history").await
    }

    async fn delete(&self, user: &UserId, chat: &ChatId) -> Result<(), Error> {
        let _: serde_json::Value = self.call_json(user, chat, Method::Post, "delete").await?;
        Ok(())
    }
}
