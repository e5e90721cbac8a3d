//! A Redis [`TurnCoordinator`] for chat-core: several server instances behind
//! a load balancer share one turn per chat.
//!
//! - **Lease**: `SET … PX` inside a Lua script that also `INCR`s the chat's
//!   fencing counter, so taking the lease and getting a strictly larger token
//!   is one atomic step. Renew and release are compare-and-set scripts on the
//!   token, so an instance whose lease expired can neither extend nor free the
//!   lease of the instance that took over.
//! - **Chunks**: one Redis Stream per turn (`XADD` from the running instance,
//!   `XREAD BLOCK` from followers on any instance). Release appends an end
//!   entry and sets a TTL, so late followers still replay a finished turn for a
//!   while and nothing is left behind.
//! - **Stop**: a per-chat stop key (the token to stop) plus a pub/sub message
//!   to wake the holder at once; the holder also re-checks the key
//!   periodically, so a message lost during a reconnect delays a stop but never
//!   loses it.
//!
//! Every key of one chat shares a hash tag, so the scripts also work on Redis
//! Cluster. The fencing counter is seeded from the Redis clock in microseconds
//! when it is (re)created, so tokens keep growing even after Redis loses its
//! data, and are above the fences a store saw from earlier turns.
//!
//! ```no_run
//! # async fn demo() -> Result<(), chat_core::CoordError> {
//! use std::sync::Arc;
//! use chat_bus_redis::{RedisCoordinator, RedisSettings};
//! let coord = RedisCoordinator::connect("redis://127.0.0.1:6379", RedisSettings::default()).await?;
//! let coord: Arc<dyn chat_core::TurnCoordinator> = Arc::new(coord);
//! // chat_core::CoordinatedSessions::new(runner, coord, Default::default())
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chat_core::sse::DONE_FRAME;
use chat_core::{BoxStream, ChatId, CoordError, Lease, MessageId, RunningTurn, TurnCoordinator};
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, RedisError, Script};
use tokio::sync::broadcast;

/// Tunables of a [`RedisCoordinator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// Prefix of every key and channel (several deployments or test runs can
    /// share one Redis); no braces. Default `chat`.
    pub prefix: String,
    /// Time limit of one Redis call; past it the call fails as unavailable. Default 2 s.
    pub op_timeout: Duration,
    /// How long a finished turn's stream stays readable. Default 60 s.
    pub done_ttl: Duration,
    /// How long a running turn's stream lives after its last frame (bounds
    /// what a crashed instance leaves behind). Default 1 h.
    pub stream_ttl: Duration,
    /// How long a chat's fencing counter lives after its last turn (it is
    /// re-seeded from the clock, still larger, when it expired). Default 7 days.
    pub fence_ttl: Duration,
    /// How long one `XREAD BLOCK` of a follower waits. Default 2 s.
    pub block: Duration,
    /// How often a running turn re-checks its stop key besides pub/sub. Default 1 s.
    pub stop_poll: Duration,
    /// A follower gives up after Redis has failed for this long (the stream
    /// then ends without `[DONE]`). Default 30 s.
    pub follow_give_up: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            prefix: "chat".into(),
            op_timeout: Duration::from_secs(2),
            done_ttl: Duration::from_secs(60),
            stream_ttl: Duration::from_secs(3600),
            fence_ttl: Duration::from_secs(7 * 24 * 3600),
            block: Duration::from_secs(2),
            stop_poll: Duration::from_secs(1),
            follow_give_up: Duration::from_secs(30),
        }
    }
}

/// Takes the lease if free: seeds the counter from the clock when missing,
/// `INCR`s it, stores the token as the lease value with a TTL.
/// KEYS: lease, fence. ARGV: lease ttl ms, fence ttl ms. Returns the token or nil.
const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], t[1] .. string.format('%06d', tonumber(t[2])))
end
local tok = string.format('%d', redis.call('INCR', KEYS[2]))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], tok, 'PX', ARGV[1])
return tok
";

/// The lease value is `token` or `token:message_id`.
const HOLDS: &str = r"
local function holds(key, tok)
  local v = redis.call('GET', key)
  return v and string.match(v, '^%d+') == tok
end
";

/// KEYS: lease. ARGV: token, message id.
const BEGIN: &str = r"
if holds(KEYS[1], ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'KEEPTTL')
  return 1
end
return 0
";

/// KEYS: lease. ARGV: token, ttl ms.
const RENEW: &str = r"
if holds(KEYS[1], ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Frees the lease if held by the token, and ends the token's stream.
/// KEYS: lease, stream. ARGV: token, done ttl ms.
const RELEASE: &str = r"
if holds(KEYS[1], ARGV[1]) then redis.call('DEL', KEYS[1]) end
redis.call('XADD', KEYS[2], '*', 'done', '1')
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
";

/// Appends frames if the lease is still held. KEYS: lease, stream.
/// ARGV: token, stream ttl ms, frames...
const PUBLISH: &str = r"
if not holds(KEYS[1], ARGV[1]) then return 0 end
for i = 3, #ARGV do redis.call('XADD', KEYS[2], '*', 'f', ARGV[i]) end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
";

/// Marks the running turn for stopping and wakes its holder.
/// KEYS: lease, stop. ARGV: channel, chat id, stop ttl ms. Returns 1 if a turn runs.
const REQUEST_STOP: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local tok = string.match(v, '^%d+')
redis.call('SET', KEYS[2], tok, 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ':' .. tok)
return 1
";

#[derive(Debug)]
struct Scripts {
    acquire: Script,
    begin: Script,
    renew: Script,
    release: Script,
    publish: Script,
    request_stop: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_holds = |body: &str| Script::new(&format!("{HOLDS}{body}"));
        Self {
            acquire: Script::new(ACQUIRE),
            begin: with_holds(BEGIN),
            renew: with_holds(RENEW),
            release: with_holds(RELEASE),
            publish: with_holds(PUBLISH),
            request_stop: Script::new(REQUEST_STOP),
        }
    }
}

/// A stop message: `chat:token`.
type StopMsg = Arc<str>;

/// [`TurnCoordinator`] on Redis. Cheap to share behind an `Arc`; dropping it
/// ends its background stop subscription.
#[derive(Debug)]
pub struct RedisCoordinator {
    client: Client,
    conn: ConnectionManager,
    settings: RedisSettings,
    scripts: Scripts,
    stops: broadcast::Sender<StopMsg>,
    subscriber: tokio::task::AbortHandle,
}

impl Drop for RedisCoordinator {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

fn map_err(e: &RedisError) -> CoordError {
    let msg = e.to_string();
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        CoordError::Unavailable(msg.into())
    } else {
        CoordError::Backend(msg.into())
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

impl RedisCoordinator {
    /// Connects to `url` (`redis://host:port/db`, `rediss://…`) and starts the
    /// stop subscription. Fails when Redis is unreachable.
    pub async fn connect(url: &str, settings: RedisSettings) -> Result<Self, CoordError> {
        if settings.prefix.contains(['{', '}']) {
            // Redis Cluster hashes the first {...} of a key: the chat's tag must be it.
            return Err(CoordError::Backend(
                format!(
                    "Redis key prefix {:?} must not contain braces",
                    settings.prefix
                )
                .into(),
            ));
        }
        let client = Client::open(url).map_err(|e| CoordError::Backend(e.to_string().into()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.op_timeout))
            .set_connection_timeout(Some(settings.op_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(
            settings.op_timeout * 2,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| CoordError::Unavailable("connecting to Redis timed out".into()))?
        .map_err(|e| map_err(&e))?;
        let (stops, _) = broadcast::channel(1024);
        let channel = format!("{}:stop", settings.prefix);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let subscriber = tokio::spawn(subscribe_stops(
            client.clone(),
            channel,
            stops.clone(),
            ready_tx,
        ))
        .abort_handle();
        // The first subscription is in place before any turn can wait on it.
        if tokio::time::timeout(settings.op_timeout * 2, ready_rx)
            .await
            .is_err()
        {
            subscriber.abort();
            return Err(CoordError::Unavailable(
                "subscribing to Redis stop messages timed out".into(),
            ));
        }
        Ok(Self {
            client,
            conn,
            settings,
            scripts: Scripts::new(),
            stops,
            subscriber,
        })
    }

    /// The settings in use.
    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    fn key(&self, chat: &ChatId, what: &str) -> String {
        chat_key(&self.settings.prefix, chat, what)
    }

    fn stream_key(&self, chat: &ChatId, token: u64) -> String {
        self.key(chat, &format!("s:{token}"))
    }

    async fn call<T, F>(&self, f: F) -> Result<T, CoordError>
    where
        F: Future<Output = Result<T, RedisError>>,
    {
        match tokio::time::timeout(self.settings.op_timeout, f).await {
            Ok(r) => r.map_err(|e| map_err(&e)),
            Err(_) => Err(CoordError::Unavailable("Redis call timed out".into())),
        }
    }

    async fn lease_value(&self, chat: &ChatId) -> Result<Option<RunningTurn>, CoordError> {
        let mut conn = self.conn.clone();
        let key = self.key(chat, "lease");
        let v: Option<String> = self
            .call(redis::cmd("GET").arg(&key).query_async(&mut conn))
            .await?;
        v.map(|v| parse_lease(&v)).transpose()
    }

    async fn stopped(&self, lease: &Lease) -> Result<bool, CoordError> {
        let mut conn = self.conn.clone();
        let key = self.key(&lease.chat, "stop");
        let v: Option<String> = self
            .call(redis::cmd("GET").arg(&key).query_async(&mut conn))
            .await?;
        Ok(v.is_some_and(|v| v == lease.token.to_string()))
    }

    async fn follower_conn(&self) -> Result<MultiplexedConnection, CoordError> {
        // XREAD BLOCK holds its connection: followers get their own.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.op_timeout))
            .set_response_timeout(Some(self.settings.block + self.settings.op_timeout));
        self.call(
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
    }
}

/// A key of one chat: the `{chat}` hash tag keeps all of them in one cluster
/// slot, as multi-key scripts require.
fn chat_key(prefix: &str, chat: &ChatId, what: &str) -> String {
    format!("{prefix}:{{{chat}}}:{what}")
}

fn parse_lease(v: &str) -> Result<RunningTurn, CoordError> {
    let (tok, mid) = v.split_once(':').map_or((v, None), |(t, m)| (t, Some(m)));
    let token = tok
        .parse::<u64>()
        .map_err(|e| CoordError::Backend(format!("bad lease value {v:?}: {e}").into()))?;
    let message_id = match mid {
        Some(m) => Some(
            MessageId::parse(m)
                .map_err(|e| CoordError::Backend(format!("bad message id {m:?}: {e}").into()))?,
        ),
        None => None,
    };
    Ok(RunningTurn { token, message_id })
}

/// Keeps one subscription to the stop channel, reconnecting with backoff,
/// and fans messages out to the waiting turns of this instance.
async fn subscribe_stops(
    client: Client,
    channel: String,
    out: broadcast::Sender<StopMsg>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, RedisError>(ps)
        }
        .await;
        match subscribed {
            Ok(ps) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                backoff = Duration::from_millis(100);
                let mut messages = ps.into_on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(payload) = msg.get_payload::<String>() {
                        // No receiver (no turn waiting here) is fine.
                        let _ = out.send(payload.into());
                    }
                }
                tracing::warn!(channel, "Redis stop subscription lost; resubscribing");
            }
            Err(e) => {
                tracing::warn!(channel, error = %e, "Redis stop subscription failed; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Parsed `XREAD` reply: streams of (id, flat field/value list).
type XreadReply = Option<Vec<(String, Vec<(String, Vec<Vec<u8>>)>)>>;

struct Follower {
    client: Client,
    conn: Option<MultiplexedConnection>,
    key: String,
    last: String,
    pending: std::collections::VecDeque<Bytes>,
    done: bool,
    settings: RedisSettings,
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
                Ok(()) => self.failing_since = None,
                Err(e) => {
                    let since = *self
                        .failing_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= self.settings.follow_give_up {
                        tracing::error!(stream = self.key, error = %e,
                            "following a turn failed for too long; giving up");
                        return None;
                    }
                    tracing::warn!(stream = self.key, error = %e, "following a turn failed; retrying");
                    self.conn = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn read(&mut self) -> Result<(), CoordError> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.settings.op_timeout))
                    .set_response_timeout(Some(self.settings.block + self.settings.op_timeout));
                let c = tokio::time::timeout(
                    self.settings.op_timeout,
                    self.client
                        .get_multiplexed_async_connection_with_config(&config),
                )
                .await
                .map_err(|_| CoordError::Unavailable("connecting to Redis timed out".into()))?
                .map_err(|e| map_err(&e))?;
                self.conn.insert(c)
            }
        };
        let reply: XreadReply = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(512)
            .arg("BLOCK")
            .arg(ms(self.settings.block))
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last)
            .query_async(conn)
            .await
            .map_err(|e| map_err(&e))?;
        for (_, entries) in reply.into_iter().flatten() {
            for (id, fields) in entries {
                self.last = id;
                let mut it = fields.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    match &k[..] {
                        b"f" => self.pending.push_back(Bytes::from(v)),
                        b"done" => {
                            self.pending.push_back(Bytes::from_static(DONE_FRAME));
                            self.done = true;
                        }
                        _ => {}
                    }
                }
                if self.done {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl TurnCoordinator for RedisCoordinator {
    async fn acquire(&self, chat: &ChatId, ttl: Duration) -> Result<Option<Lease>, CoordError> {
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.acquire.prepare_invoke();
        inv.key(self.key(chat, "lease"))
            .key(self.key(chat, "fence"))
            .arg(ms(ttl))
            .arg(ms(self.settings.fence_ttl));
        let tok: Option<String> = self.call(inv.invoke_async(&mut conn)).await?;
        tok.map(|t| {
            t.parse::<u64>()
                .map(|token| Lease { chat: *chat, token })
                .map_err(|e| CoordError::Backend(format!("bad token {t:?}: {e}").into()))
        })
        .transpose()
    }

    async fn begin(&self, lease: &Lease, message_id: &MessageId) -> Result<(), CoordError> {
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.begin.prepare_invoke();
        inv.key(self.key(&lease.chat, "lease"))
            .arg(lease.token)
            .arg(message_id.to_string());
        let _: i64 = self.call(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, CoordError> {
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.renew.prepare_invoke();
        inv.key(self.key(&lease.chat, "lease"))
            .arg(lease.token)
            .arg(ms(ttl));
        let held: i64 = self.call(inv.invoke_async(&mut conn)).await?;
        Ok(held == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<(), CoordError> {
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.release.prepare_invoke();
        inv.key(self.key(&lease.chat, "lease"))
            .key(self.stream_key(&lease.chat, lease.token))
            .arg(lease.token)
            .arg(ms(self.settings.done_ttl));
        let _: i64 = self.call(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn running(&self, chat: &ChatId) -> Result<Option<RunningTurn>, CoordError> {
        self.lease_value(chat).await
    }

    async fn publish(&self, lease: &Lease, frames: &[Bytes]) -> Result<(), CoordError> {
        if frames.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.publish.prepare_invoke();
        inv.key(self.key(&lease.chat, "lease"))
            .key(self.stream_key(&lease.chat, lease.token))
            .arg(lease.token)
            .arg(ms(self.settings.stream_ttl));
        for f in frames {
            inv.arg(&f[..]);
        }
        let held: i64 = self.call(inv.invoke_async(&mut conn)).await?;
        if held == 0 {
            tracing::debug!(chat_id = %lease.chat, token = lease.token,
                "frames of a turn that lost its lease were dropped");
        }
        Ok(())
    }

    async fn follow(
        &self,
        chat: &ChatId,
    ) -> Result<Option<(RunningTurn, BoxStream<'static, Bytes>)>, CoordError> {
        let Some(running) = self.lease_value(chat).await? else {
            return Ok(None);
        };
        let conn = self.follower_conn().await?;
        let follower = Follower {
            client: self.client.clone(),
            conn: Some(conn),
            key: self.stream_key(chat, running.token),
            last: "0-0".into(),
            pending: std::collections::VecDeque::new(),
            done: false,
            settings: self.settings.clone(),
            failing_since: None,
        };
        Ok(Some((
            running,
            futures::stream::unfold(follower, Follower::next).boxed(),
        )))
    }

    async fn request_stop(&self, chat: &ChatId) -> Result<bool, CoordError> {
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.request_stop.prepare_invoke();
        inv.key(self.key(chat, "lease"))
            .key(self.key(chat, "stop"))
            .arg(format!("{}:stop", self.settings.prefix))
            .arg(chat.to_string())
            .arg(ms(self.settings.stream_ttl));
        let found: i64 = self.call(inv.invoke_async(&mut conn)).await?;
        Ok(found == 1)
    }

    async fn stop_requested(&self, lease: &Lease) -> Result<(), CoordError> {
        // Subscribe before checking the key: a stop between the two is not missed.
        let mut rx = self.stops.subscribe();
        let mine = format!("{}:{}", lease.chat, lease.token);
        let mut check = true;
        loop {
            if check {
                match self.stopped(lease).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(chat_id = %lease.chat, error = %e,
                        "checking for a stop request failed; retrying"),
                }
            }
            check = tokio::select! {
                m = rx.recv() => match m {
                    Ok(m) if *m == *mine => return Ok(()),
                    Ok(_) => false,
                    Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep(self.settings.stop_poll).await;
                        true
                    }
                },
                () = tokio::time::sleep(self.settings.stop_poll) => true,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_values_parse() {
        let t = parse_lease("1732500000000123").unwrap();
        assert_eq!(t.token, 1_732_500_000_000_123);
        assert_eq!(t.message_id, None);
        let mid = MessageId::new();
        let t = parse_lease(&format!("42:{mid}")).unwrap();
        assert_eq!((t.token, t.message_id), (42, Some(mid)));
        assert!(parse_lease("x:1").is_err());
        assert!(parse_lease("1:has space").is_err());
    }

    #[test]
    fn keys_of_one_chat_share_a_hash_tag() {
        let chat = ChatId::new();
        let slot = |k: &str| {
            let open = k.find('{').unwrap();
            let close = open + k[open..].find('}').unwrap();
            k[open + 1..close].to_owned()
        };
        let keys: Vec<String> = ["lease", "fence", "stop", "s:7"]
            .iter()
            .map(|w| chat_key("app:{x}", &chat, w))
            .collect();
        // Redis hashes the first {...}: a prefix with braces would break the
        // tag, which is why `connect` refuses one.
        assert!(keys.iter().all(|k| slot(k) == "x"), "{keys:?}");
        let keys: Vec<String> = ["lease", "fence", "stop", "s:7"]
            .iter()
            .map(|w| chat_key("app", &chat, w))
            .collect();
        assert!(keys.iter().all(|k| slot(k) == chat.to_string()), "{keys:?}");
        assert_eq!(ms(Duration::from_micros(10)), 1);
        assert_eq!(ms(Duration::from_secs(2)), 2000);
    }

    #[tokio::test]
    async fn a_prefix_with_braces_is_refused_before_connecting() {
        let settings = RedisSettings {
            prefix: "app{1}".into(),
            ..RedisSettings::default()
        };
        let err = RedisCoordinator::connect("redis://127.0.0.1:1", settings)
            .await
            .unwrap_err();
        assert!(
            !err.is_retryable() && err.to_string().contains("braces"),
            "{err}"
        );
    }
}
