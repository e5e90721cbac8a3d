//! A Postgres-only [`TurnCoordinator`] (feature `coordination`): a deployment
//! of several instances over one Postgres needs nothing else.
//!
//! - **Lease**: one `chat_leases` row per running turn, taken with an
//!   `INSERT … ON CONFLICT DO UPDATE … WHERE expired` (one winner), expiry on
//!   the database clock. The fencing token comes from a sequence and is also
//!   kept above the chat's stored fence, so it always beats earlier turns
//!   whichever coordinator ran them.
//! - **Chunks**: the running turn's frames are rows of `turn_frames` (replay
//!   from the first); `NOTIFY` wakes followers, which then read what is new
//!   (so payload size limits do not matter). Only turns that someone follows
//!   notify (`NOTIFY` serializes commits database-wide). Release appends an
//!   end row.
//! - **Stop**: a flag on the lease row plus a `NOTIFY` to the holder.
//!
//! One `LISTEN` connection per coordinator fans notifications out; every
//! waiter also re-checks the tables every `poll`, so a notification lost while
//! the listener reconnects delays but never loses anything. Frames of ended
//! turns are swept after `retention`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chat_core::sse::DONE_FRAME;
use chat_core::{BoxStream, ChatId, CoordError, Lease, MessageId, RunningTurn, TurnCoordinator};
use futures::StreamExt;
use sqlx::Row as _;
use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::broadcast;

/// Tunables of a [`PgCoordinator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgCoordinatorSettings {
    /// The `NOTIFY` channel (per database; deployments sharing a database use
    /// different channels). Default `chat_coordination`.
    pub channel: String,
    /// How often waiters re-check the tables besides notifications. Default 1 s.
    pub poll: Duration,
    /// How long frames of an ended (or crashed) turn are kept. Default 60 s.
    pub retention: Duration,
    /// A follower gives up after the database has failed for this long (the
    /// stream then ends without `[DONE]`). Default 30 s.
    pub follow_give_up: Duration,
}

impl Default for PgCoordinatorSettings {
    fn default() -> Self {
        Self {
            channel: "chat_coordination".into(),
            poll: Duration::from_secs(1),
            retention: Duration::from_secs(60),
            follow_give_up: Duration::from_secs(30),
        }
    }
}

/// A notification payload: `f|d|s <chat> <token>`, or `*` after a reconnect.
type Event = Arc<str>;
const RESYNC: &str = "*";

/// [`TurnCoordinator`] on the store's Postgres (tables from the store's
/// migrations). Share it behind an `Arc`; dropping it ends its listener.
#[derive(Debug)]
pub struct PgCoordinator {
    pool: PgPool,
    settings: PgCoordinatorSettings,
    events: broadcast::Sender<Event>,
    listener: tokio::task::AbortHandle,
    last_sweep: Mutex<Option<tokio::time::Instant>>,
}

impl Drop for PgCoordinator {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn map_err(e: sqlx::Error) -> CoordError {
    match crate::error::map(e) {
        e @ chat_core::StoreError::Unavailable { .. } => CoordError::Unavailable(Box::new(e)),
        e => CoordError::Backend(Box::new(e)),
    }
}

fn db_token(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl PgCoordinator {
    /// A coordinator on `pool` (e.g. [`PostgresStore::pool`](crate::PostgresStore::pool),
    /// migrated). Starts listening before it returns.
    pub async fn new(pool: PgPool, settings: PgCoordinatorSettings) -> Result<Self, CoordError> {
        let (events, _) = broadcast::channel(4096);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen(
            pool.clone(),
            settings.channel.clone(),
            events.clone(),
            ready_tx,
        ))
        .abort_handle();
        match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                listener.abort();
                return Err(e);
            }
            Ok(Err(_)) | Err(_) => {
                listener.abort();
                return Err(CoordError::Unavailable(
                    "LISTEN on the coordination channel did not start".into(),
                ));
            }
        }
        Ok(Self {
            pool,
            settings,
            events,
            listener,
            last_sweep: Mutex::new(None),
        })
    }

    /// The settings in use.
    pub fn settings(&self) -> &PgCoordinatorSettings {
        &self.settings
    }

    async fn lease_row(&self, chat: &ChatId) -> Result<Option<RunningTurn>, CoordError> {
        let row = sqlx::query(
            "SELECT token, message_id FROM chat_leases \
             WHERE chat_id = $1 AND expires_at > clock_timestamp()",
        )
        .bind(chat.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.map(|r| {
            let token: i64 = r.try_get("token").map_err(map_err)?;
            let mid: Option<String> = r.try_get("message_id").map_err(map_err)?;
            let message_id = mid
                .map(|m| MessageId::parse(&m))
                .transpose()
                .map_err(|e| CoordError::Backend(Box::new(e)))?;
            Ok(RunningTurn {
                token: token as u64,
                message_id,
            })
        })
        .transpose()
    }

    /// Deletes frames of turns that ended (or died) more than `retention` ago,
    /// at most every `retention / 2` per instance.
    async fn sweep(&self) {
        {
            let mut last = self
                .last_sweep
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < self.settings.retention / 2) {
                return;
            }
            *last = Some(tokio::time::Instant::now());
        }
        let r = sqlx::query(
            "DELETE FROM turn_frames f \
             WHERE f.created_at < clock_timestamp() - make_interval(secs => $1::float8 / 1000) \
             AND NOT EXISTS (SELECT 1 FROM chat_leases l WHERE l.chat_id = f.chat_id \
                 AND l.token = f.token AND l.expires_at > clock_timestamp())",
        )
        .bind(ms(self.settings.retention))
        .execute(&self.pool)
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "sweeping old turn frames failed");
        }
    }
}

/// Keeps one `LISTEN` connection, reconnecting with backoff, and fans the
/// notifications out to this instance's waiters (a `*` after each reconnect,
/// since notifications may have been missed).
async fn listen(
    pool: PgPool,
    channel: String,
    out: broadcast::Sender<Event>,
    ready: tokio::sync::oneshot::Sender<Result<(), CoordError>>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        if pool.is_closed() {
            return;
        }
        let started = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        match started {
            Ok(mut l) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                } else {
                    let _ = out.send(RESYNC.into());
                }
                backoff = Duration::from_millis(100);
                loop {
                    match l.try_recv().await {
                        Ok(Some(n)) => {
                            // No receiver (nothing waiting here) is fine.
                            let _ = out.send(n.payload().into());
                        }
                        Ok(None) => {
                            tracing::warn!(
                                channel,
                                "coordination LISTEN connection lost; reconnected"
                            );
                            let _ = out.send(RESYNC.into());
                        }
                        Err(e) => {
                            tracing::warn!(channel, error = %e, "coordination LISTEN failed; restarting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(channel, error = %e, "coordination LISTEN could not start; retrying");
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(map_err(e)));
                    return;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

struct Follower {
    pool: PgPool,
    chat: String,
    token: i64,
    last: i64,
    pending: std::collections::VecDeque<Bytes>,
    done: bool,
    events: broadcast::Receiver<Event>,
    wake: String,
    poll: Duration,
    give_up: Duration,
    failing_since: Option<tokio::time::Instant>,
}

impl Follower {
    async fn next(mut self) -> Option<(Bytes, Self)> {
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Some((f, self));
            }
            if self.done {
                return None;
            }
            match self.read().await {
                Ok(true) => {
                    self.failing_since = None;
                    continue;
                }
                Ok(false) => self.failing_since = None,
                Err(e) => {
                    let since = *self
                        .failing_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= self.give_up {
                        tracing::error!(chat_id = self.chat, error = %e,
                            "following a turn failed for too long; giving up");
                        return None;
                    }
                    tracing::warn!(chat_id = self.chat, error = %e, "following a turn failed; retrying");
                }
            }
            // Nothing new: wait for a notification about this turn, or the poll.
            let deadline = tokio::time::sleep(self.poll);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    e = self.events.recv() => match e {
                        Ok(e) if e.as_ref() == RESYNC || e.get(2..) == Some(self.wake.as_str()) => break,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            (&mut deadline).await;
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Reads new frames; `true` when any arrived.
    async fn read(&mut self) -> Result<bool, CoordError> {
        let rows = sqlx::query(
            "SELECT id, frame FROM turn_frames \
             WHERE chat_id = $1 AND token = $2 AND id > $3 ORDER BY id LIMIT 512",
        )
        .bind(&self.chat)
        .bind(self.token)
        .bind(self.last)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let any = !rows.is_empty();
        for r in rows {
            self.last = r.try_get("id").map_err(map_err)?;
            let frame: Option<Vec<u8>> = r.try_get("frame").map_err(map_err)?;
            match frame {
                Some(f) => self.pending.push_back(Bytes::from(f)),
                None => {
                    self.pending.push_back(Bytes::from_static(DONE_FRAME));
                    self.done = true;
                    break;
                }
            }
        }
        Ok(any)
    }
}

#[async_trait]
impl TurnCoordinator for PgCoordinator {
    async fn acquire(&self, chat: &ChatId, ttl: Duration) -> Result<Option<Lease>, CoordError> {
        // The new token beats the sequence, the chat's stored fence and the
        // previous (expired) holder of the row.
        let row = sqlx::query(
            "INSERT INTO chat_leases AS l (chat_id, token, message_id, expires_at, stop) \
             SELECT $1, GREATEST(nextval('chat_lease_tokens'), \
                 COALESCE((SELECT fence FROM chats WHERE id = $1), 0) + 1), \
                 NULL, clock_timestamp() + make_interval(secs => $2::float8 / 1000), FALSE \
             ON CONFLICT (chat_id) DO UPDATE SET token = GREATEST(EXCLUDED.token, l.token + 1), \
                 message_id = NULL, expires_at = EXCLUDED.expires_at, stop = FALSE, watched = FALSE \
             WHERE l.expires_at <= clock_timestamp() \
             RETURNING token",
        )
        .bind(chat.to_string())
        .bind(ms(ttl))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.map(|r| {
            let token: i64 = r.try_get("token").map_err(map_err)?;
            Ok(Lease {
                chat: *chat,
                token: token as u64,
            })
        })
        .transpose()
    }

    async fn begin(&self, lease: &Lease, message_id: &MessageId) -> Result<(), CoordError> {
        sqlx::query("UPDATE chat_leases SET message_id = $3 WHERE chat_id = $1 AND token = $2")
            .bind(lease.chat.to_string())
            .bind(db_token(lease.token))
            .bind(message_id.as_str())
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, CoordError> {
        let r = sqlx::query(
            "UPDATE chat_leases SET expires_at = clock_timestamp() + make_interval(secs => $3::float8 / 1000) \
             WHERE chat_id = $1 AND token = $2 AND expires_at > clock_timestamp()",
        )
        .bind(lease.chat.to_string())
        .bind(db_token(lease.token))
        .bind(ms(ttl))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(r.rows_affected() == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<(), CoordError> {
        let chat = lease.chat.to_string();
        let token = db_token(lease.token);
        // One statement: free the lease (if still ours), end the stream, and
        // wake followers if the turn had any.
        sqlx::query(
            "WITH del AS (DELETE FROM chat_leases WHERE chat_id = $1 AND token = $2 RETURNING watched), \
             ins AS (INSERT INTO turn_frames (chat_id, token, frame) VALUES ($1, $2, NULL)) \
             SELECT pg_notify($3, $4) FROM del WHERE watched",
        )
        .bind(&chat)
        .bind(token)
        .bind(&self.settings.channel)
        .bind(format!("d {chat} {token}"))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        self.sweep().await;
        Ok(())
    }

    async fn running(&self, chat: &ChatId) -> Result<Option<RunningTurn>, CoordError> {
        self.lease_row(chat).await
    }

    async fn publish(&self, lease: &Lease, frames: &[Bytes]) -> Result<(), CoordError> {
        if frames.is_empty() {
            return Ok(());
        }
        let chat = lease.chat.to_string();
        let token = db_token(lease.token);
        let data: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        // One statement: frames only while the lease is held, then, if a
        // follower watches, the wake-up (delivered at commit, so followers
        // see the rows).
        let held = sqlx::query(
            "WITH l AS (SELECT watched FROM chat_leases WHERE chat_id = $1 AND token = $2 \
                 AND expires_at > clock_timestamp()), \
             ins AS ( \
                 INSERT INTO turn_frames (chat_id, token, frame) \
                 SELECT $1, $2, t.f FROM unnest($3::bytea[]) WITH ORDINALITY AS t(f, n) \
                 WHERE EXISTS (SELECT 1 FROM l) \
                 ORDER BY t.n RETURNING 1) \
             SELECT (SELECT watched FROM l) AS watched, \
                 CASE WHEN (SELECT watched FROM l) THEN pg_notify($4, $5) END \
             FROM (SELECT 1 FROM ins LIMIT 1) x",
        )
        .bind(&chat)
        .bind(token)
        .bind(&data)
        .bind(&self.settings.channel)
        .bind(format!("f {chat} {token}"))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        if held.is_none() {
            tracing::debug!(
                chat_id = chat,
                token,
                "frames of a turn that lost its lease were dropped"
            );
        }
        Ok(())
    }

    async fn follow(
        &self,
        chat: &ChatId,
    ) -> Result<Option<(RunningTurn, BoxStream<'static, Bytes>)>, CoordError> {
        // Subscribe first: frames published after the read below still wake us.
        let events = self.events.subscribe();
        let Some(running) = self.lease_row(chat).await? else {
            return Ok(None);
        };
        let token = db_token(running.token);
        // From now on publishing wakes followers; frames before are read below.
        sqlx::query("UPDATE chat_leases SET watched = TRUE WHERE chat_id = $1 AND token = $2")
            .bind(chat.to_string())
            .bind(token)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        let follower = Follower {
            pool: self.pool.clone(),
            chat: chat.to_string(),
            token,
            last: 0,
            pending: std::collections::VecDeque::new(),
            done: false,
            events,
            wake: format!("{chat} {token}"),
            poll: self.settings.poll,
            give_up: self.settings.follow_give_up,
            failing_since: None,
        };
        Ok(Some((
            running,
            futures::stream::unfold(follower, Follower::next).boxed(),
        )))
    }

    async fn request_stop(&self, chat: &ChatId) -> Result<bool, CoordError> {
        let row = sqlx::query(
            "WITH s AS (UPDATE chat_leases SET stop = TRUE \
                 WHERE chat_id = $1 AND expires_at > clock_timestamp() RETURNING token) \
             SELECT pg_notify($2, 's ' || $1 || ' ' || token) FROM s",
        )
        .bind(chat.to_string())
        .bind(&self.settings.channel)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(row.is_some())
    }

    async fn stop_requested(&self, lease: &Lease) -> Result<(), CoordError> {
        // Subscribe before checking the flag: a stop between the two is not missed.
        let mut rx = self.events.subscribe();
        let mine = format!("s {} {}", lease.chat, lease.token);
        let chat = lease.chat.to_string();
        let token = db_token(lease.token);
        let mut check = true;
        loop {
            if check {
                let r = sqlx::query(
                    "SELECT 1 FROM chat_leases WHERE chat_id = $1 AND token = $2 AND stop",
                )
                .bind(&chat)
                .bind(token)
                .fetch_optional(&self.pool)
                .await;
                match r {
                    Ok(Some(_)) => return Ok(()),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(chat_id = chat, error = %e,
                        "checking for a stop request failed; retrying"),
                }
            }
            check = tokio::select! {
                m = rx.recv() => match m {
                    Ok(m) if *m == *mine => return Ok(()),
                    Ok(m) => m.as_ref() == RESYNC,
                    Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep(self.settings.poll).await;
                        true
                    }
                },
                () = tokio::time::sleep(self.settings.poll) => true,
            };
        }
    }
}
