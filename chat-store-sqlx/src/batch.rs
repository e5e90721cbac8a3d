//! Group commit for message writes: concurrent upserts queue to one writer
//! task, which writes whatever has queued up as ONE multi-row statement (one
//! round trip, one commit, one WAL append or fsync) instead of one each.
//!
//! Order is kept per chat: a batch holds at most one write per chat and per
//! message id, and later writes of a chat wait for the next batch, so a chat
//! sees its writes applied in the order they were made. Each caller gets its
//! own result: a rejected row (not the user's chat, id of another chat) is
//! told apart on the error path, and a batch the database refuses as a whole
//! is retried row by row so one bad write never fails the others.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use chat_core::{StoreError, UserId};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};

use crate::schema::MessageRow;

/// The writer's sets of chat and id keys ([`Keys`]): looked up several times
/// per row on the writer task, so hashed with foldhash instead of SipHash.
/// They hold at most a few batches of keys, so flooding them with colliding
/// keys cannot slow them much.
type Set<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// Most rows in one statement (SQLite and Postgres bind limits are far above
/// this times the 10 values of a row).
pub(crate) const MAX_BATCH: usize = 128;

/// Statement sizes: a batch is padded up to the next of these with rows that
/// match no chat, so each connection caches a handful of prepared statements
/// instead of one per batch size, and a batch is still one statement.
pub(crate) const CHUNK_SIZES: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// The statement size for `rows` rows (`rows <= MAX_BATCH`).
pub(crate) fn padded(rows: usize) -> usize {
    CHUNK_SIZES
        .into_iter()
        .find(|&s| s >= rows)
        .unwrap_or(MAX_BATCH)
}

/// One queued message write.
pub(crate) struct Job {
    pub user: UserId,
    pub chat: String,
    pub row: MessageRow,
    /// The chat's and the id's hashes, which the writer's sets hold.
    keys: Keys,
    reply: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// A write's chat and message id as the writer tracks them: hashed once, when
/// the write is queued, so forming a batch compares and copies two `u64`s
/// per write instead of hashing, comparing and cloning two strings each time
/// the write is looked at (a write held back is looked at again each batch).
/// Two keys that collide only hold a write back for a batch: order is kept
/// either way.
#[derive(Debug, Clone, Copy)]
struct Keys {
    chat: u64,
    id: u64,
}

impl Keys {
    /// The keys of a write of message `id` into `chat`, with a seed drawn once per process.
    fn of(chat: &str, id: &str) -> Self {
        use std::hash::BuildHasher as _;
        static SEED: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
        let seed = SEED.get_or_init(foldhash::fast::RandomState::default);
        Self {
            chat: seed.hash_one(chat),
            id: seed.hash_one(id),
        }
    }
}

impl Job {
    /// A write of `row` into `chat` for `user`, answered on `reply`.
    fn new(
        user: UserId,
        chat: String,
        row: MessageRow,
        reply: Option<oneshot::Sender<Result<(), StoreError>>>,
    ) -> Self {
        let keys = Keys::of(&chat, &row.id);
        Self {
            user,
            chat,
            row,
            keys,
            reply,
        }
    }

    fn answer(&mut self, result: Result<(), StoreError>) {
        if let Some(reply) = self.reply.take() {
            // The caller may have gone away (a cancelled request): the write stands.
            let _ = reply.send(result);
        }
    }
}

/// A backend's side of group commit.
#[async_trait]
pub(crate) trait RowWriter: Send + Sync + 'static {
    /// Writes `jobs` (distinct chats, distinct ids, at most `MAX_BATCH`) in
    /// one statement of [`padded`] rows, each only into its user's chat, and
    /// returns how many rows were written.
    async fn write_rows(&self, jobs: &[Job]) -> Result<u64, StoreError>;

    /// Whether `chat` exists and belongs to `user` (the error path only).
    async fn owns(&self, user: &UserId, chat: &str) -> Result<bool, StoreError>;

    /// Batches the backend takes at once (each on its own connection).
    fn lanes(&self) -> usize {
        1
    }

    /// Nothing is queued or in flight: give back any connection kept
    /// between batches (see [`HeldConnections`]).
    fn idle(&self) {}

    /// How long the writer waits, idle, before it calls [`idle`](Self::idle)
    /// (zero: at once).
    fn idle_grace(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// How a batch writer keeps pool connections between batches. Giving a
/// connection back to a sqlx pool spawns a task that pings it (a round trip
/// to SQLite's connection thread or to the Postgres server), and taking one
/// pings it again unless the pool was told not to: with the connection given
/// back between every two batches, those round trips sat in front of the
/// batches every message write waits for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HoldPolicy {
    /// A connection is given back once it was held this long, so the pool can
    /// check and recycle it (and, on SQLite, whose one writer connection is
    /// all there is, so the pool's other users (chat creation, renames,
    /// deletes) wait for at most this plus one batch).
    pub at_most: std::time::Duration,
    /// Held connections are given back once no write came for this long.
    /// Zero: as soon as the writer has nothing queued or in flight.
    pub idle_grace: std::time::Duration,
}

impl HoldPolicy {
    /// SQLite: one writer connection, shared with the pool's other users.
    pub(crate) const SHARED: Self = Self {
        at_most: std::time::Duration::from_millis(10),
        idle_grace: std::time::Duration::ZERO,
    };
    /// Postgres: the pool has connections to spare, so each lane keeps its
    /// own across idle moments (a user message that found the writer idle
    /// used to wait for a ping before its statement).
    pub(crate) const DEDICATED: Self = Self {
        at_most: std::time::Duration::from_secs(60),
        idle_grace: std::time::Duration::from_secs(1),
    };
}

/// Pool connections a batch writer keeps while writes keep coming (see
/// [`HoldPolicy`]).
pub(crate) struct HeldConnections<DB: sqlx::Database> {
    conns: std::sync::Mutex<Vec<(sqlx::pool::PoolConnection<DB>, std::time::Instant)>>,
    policy: HoldPolicy,
}

impl<DB: sqlx::Database> std::fmt::Debug for HeldConnections<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldConnections")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<DB: sqlx::Database> HeldConnections<DB> {
    /// None held yet; kept as `policy` says.
    pub(crate) fn new(policy: HoldPolicy) -> Self {
        Self {
            conns: std::sync::Mutex::new(Vec::new()),
            policy,
        }
    }

    /// How long after its last write the writer gives its connections back.
    pub(crate) fn idle_grace(&self) -> std::time::Duration {
        self.policy.idle_grace
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Vec<(sqlx::pool::PoolConnection<DB>, std::time::Instant)>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A held connection and when it was taken from the pool, else a new one.
    pub(crate) async fn take(
        &self,
        pool: &sqlx::Pool<DB>,
    ) -> Result<(sqlx::pool::PoolConnection<DB>, std::time::Instant), StoreError> {
        let held = self.lock().pop();
        match held {
            Some(c) => Ok(c),
            None => Ok((
                pool.acquire().await.map_err(crate::error::map)?,
                std::time::Instant::now(),
            )),
        }
    }

    /// Keeps `conn` for the next batch, or gives it back once it was held
    /// [`HoldPolicy::at_most`]. Only a connection whose last statement
    /// succeeded should come here; after an error the pool's own check
    /// should see it.
    pub(crate) fn keep(&self, conn: sqlx::pool::PoolConnection<DB>, since: std::time::Instant) {
        if since.elapsed() < self.policy.at_most {
            self.lock().push((conn, since));
        }
    }

    /// Gives every held connection back to the pool.
    pub(crate) fn release(&self) {
        let conns = std::mem::take(&mut *self.lock());
        drop(conns);
    }
}

/// The queue in front of the writer task, started on first use (so a store
/// can be built outside a runtime) and shared by every clone of the store.
pub(crate) struct WriteQueue<W: RowWriter> {
    writer: Arc<W>,
    sender: OnceLock<mpsc::UnboundedSender<Job>>,
}

impl<W: RowWriter> std::fmt::Debug for WriteQueue<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteQueue")
            .field("started", &self.sender.get().is_some())
            .finish_non_exhaustive()
    }
}

impl<W: RowWriter> WriteQueue<W> {
    /// The backend's writer.
    pub(crate) fn writer(&self) -> &W {
        &self.writer
    }

    /// A queue writing through `writer`.
    pub(crate) fn new(writer: W) -> Self {
        Self {
            writer: Arc::new(writer),
            sender: OnceLock::new(),
        }
    }

    /// Queues one write and waits for its own result.
    pub(crate) async fn write(
        &self,
        user: &UserId,
        chat: String,
        row: MessageRow,
    ) -> Result<(), StoreError> {
        let sender = self.sender.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(self.writer.clone(), rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        let job = Job::new(user.clone(), chat, row, Some(reply));
        if let Err(mpsc::error::SendError(job)) = sender.send(job) {
            // The task's runtime is gone (the store outlived it): write directly.
            tracing::debug!("store writer task gone; writing without batching");
            let mut jobs = [job];
            write_chunk(&*self.writer, &mut jobs).await;
            // No writer loop goes idle after this write to give its connection back.
            self.writer.idle();
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::unavailable(
                "the store's writer task stopped before answering",
            ))
        })
    }
}

/// The writer task: takes everything queued, writes it in batches, answers
/// each caller; ends when every sender (every store clone) is gone and
/// every queued write is answered.
///
/// Up to [`RowWriter::lanes`] batches are in flight at once (Postgres: a
/// batch is formed and sent while the previous one waits for its commit's
/// fsync, and the server flushes both with one; SQLite has one writer).
/// Batches in flight never share a chat or a message id, and a chat's later
/// writes wait until its batch is done, so per-chat order holds.
async fn run<W: RowWriter>(writer: Arc<W>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let lanes = writer.lanes().max(1);
    let mut pending: VecDeque<Job> = VecDeque::new();
    let mut inflight = FuturesUnordered::new();
    // Chats and ids of the batches in flight.
    let mut busy_chats: Set<u64> = Set::default();
    let mut busy_ids: Set<u64> = Set::default();
    let mut open = true;
    let idle_grace = writer.idle_grace();
    // Armed when the writer falls idle with a grace period to wait out.
    let idle_timer = tokio::time::sleep(std::time::Duration::ZERO);
    tokio::pin!(idle_timer);
    let mut idle_armed = false;
    // A batch was written since the connections were last given back.
    let mut holding = false;
    loop {
        while pending.len() < MAX_BATCH * 8 {
            match rx.try_recv() {
                Ok(job) => pending.push_back(job),
                Err(_) => break,
            }
        }
        if inflight.len() < lanes && !pending.is_empty() {
            let mut batch = take_batch(&mut pending, &busy_chats, &busy_ids);
            if !batch.is_empty() {
                for job in &batch {
                    busy_chats.insert(job.keys.chat);
                    busy_ids.insert(job.keys.id);
                }
                // A stable lock order across batches (Postgres locks the chat rows).
                batch.sort_by(|a, b| a.chat.cmp(&b.chat));
                let writer = writer.clone();
                holding = true;
                inflight.push(async move {
                    write_chunk(&*writer, &mut batch).await;
                    batch
                });
                continue;
            }
        }
        if inflight.is_empty() && pending.is_empty() {
            if !open {
                writer.idle();
                return;
            }
            if idle_grace.is_zero() {
                writer.idle();
            } else if holding && !idle_armed {
                idle_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + idle_grace);
                idle_armed = true;
            }
        } else {
            idle_armed = false;
        }
        tokio::select! {
            () = &mut idle_timer, if idle_armed => {
                writer.idle();
                idle_armed = false;
                holding = false;
            }
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                for job in done {
                    busy_chats.remove(&job.keys.chat);
                    busy_ids.remove(&job.keys.id);
                }
            }
            job = rx.recv(), if open => match job {
                Some(job) => {
                    pending.push_back(job);
                    if inflight.is_empty() && lanes == 1 {
                        // One writer: let the writers woken with this one
                        // queue up too (no timer, no wait when nothing else is
                        // runnable). With lanes to spare, a write goes out at
                        // once and later ones take the next lane: the yield
                        // put each idle-time write behind every runnable task
                        // (Postgres 20 ms / 500 clients, seven pairs: TTFT p50
                        // median 24.0 -> 23.3 ms, lower in six; p99 median
                        // 31.5 -> 30.2 ms; streams/s unchanged).
                        tokio::task::yield_now().await;
                    }
                }
                None => open = false,
            },
        }
    }
}

/// The next batch: at most one write per chat and per id, none of a chat or
/// id in flight, at most [`MAX_BATCH`]; a chat seen here (taken or not)
/// keeps all its later writes back, so they stay in order for the next round.
/// Only the front of the queue up to the last write taken is looked at and
/// moved: under a backlog (up to `MAX_BATCH * 8` queued) the rest stays
/// where it is instead of being scanned and rebuilt for every batch.
fn take_batch(pending: &mut VecDeque<Job>, busy_chats: &Set<u64>, busy_ids: &Set<u64>) -> Vec<Job> {
    let mut chats: Set<u64> = Set::default();
    let mut ids: Set<u64> = Set::default();
    let mut take: Vec<bool> = Vec::new();
    let mut taken = 0;
    for job in pending.iter() {
        if taken == MAX_BATCH {
            break;
        }
        let Keys { chat, id } = job.keys;
        let free = !busy_chats.contains(&chat) && !busy_ids.contains(&id);
        // `insert` is false when a job before this one had the chat or id.
        let first = chats.insert(chat) & ids.insert(id);
        let yes = free && first;
        taken += usize::from(yes);
        take.push(yes);
    }
    let mut batch = Vec::with_capacity(taken);
    let mut kept = Vec::with_capacity(take.len() - taken);
    for (job, yes) in pending.drain(..take.len()).zip(take) {
        if yes {
            batch.push(job);
        } else {
            kept.push(job);
        }
    }
    // The writes held back go back to the front, in their order.
    for job in kept.into_iter().rev() {
        pending.push_front(job);
    }
    batch
}

/// Writes one chunk and answers its callers. A chunk that wrote fewer rows
/// than it holds, or was refused as a whole, is written again one row at a
/// time so each caller learns its own outcome (rewriting a row that did land
/// changes nothing: same content, same place).
async fn write_chunk<W: RowWriter>(writer: &W, chunk: &mut [Job]) {
    let started = std::time::Instant::now();
    let outcome = writer.write_rows(chunk).await;
    tracing::trace!(
        rows = chunk.len(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "wrote a batch of messages"
    );
    match outcome {
        Ok(n) if n as usize == chunk.len() => {
            for job in chunk.iter_mut() {
                job.answer(Ok(()));
            }
        }
        Ok(_) if chunk.len() > 1 => {
            for job in chunk.chunks_mut(1) {
                Box::pin(write_chunk(writer, job)).await;
            }
        }
        Ok(_) => {
            let job = &chunk[0];
            let e = rejected(writer, &job.user, &job.chat, &job.row.id).await;
            chunk[0].answer(Err(e));
        }
        Err(e) if chunk.len() > 1 => {
            tracing::warn!(error = %e, rows = chunk.len(),
                "batched message write failed; retrying row by row");
            for job in chunk.chunks_mut(1) {
                Box::pin(write_chunk(writer, job)).await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, chat_id = %chunk[0].chat, message_id = %chunk[0].row.id,
                "message write failed");
            chunk[0].answer(Err(e));
        }
    }
}

/// Why a scoped write changed nothing: not this user's chat, or the id
/// belongs to another chat.
pub(crate) async fn rejected<W: RowWriter>(
    writer: &W,
    user: &UserId,
    chat: &str,
    message_id: &str,
) -> StoreError {
    match writer.owns(user, chat).await {
        Err(e) => e,
        Ok(false) => StoreError::NotFound,
        Ok(true) => {
            StoreError::Conflict(format!("message id {message_id} belongs to another chat"))
        }
    }
}

/// How the multi-row upsert finds each row's chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChatLookup {
    /// A plain join on the chat's key (SQLite, whose planner searches the
    /// key once per row).
    Join,
    /// A lateral subquery that looks up and locks (`FOR UPDATE`) each row's
    /// chat by its key (Postgres). As a plain join, Postgres's planner
    /// hashed the whole `chats` table for batches of 32 rows and more (a
    /// sequential scan of every chat per batch) where a key lookup per row
    /// reads a few pages.
    LateralForUpdate,
}

/// The multi-row upsert for `rows` rows: each row goes into its chat only if
/// the chat belongs to the row's user, at the chat's next sequence number, or
/// replaces the message in place when its id is already in that chat.
/// `lookup` is how the backend finds (and locks) each row's chat.
///
/// With `numbered` the parameters are `$1, $2, ..` (Postgres); without, plain
/// `?` in order (SQLite: sqlx looks every named parameter up by index, and
/// SQLite's lookup walks a list, which is quadratic in a 1,280-parameter
/// statement).
///
/// With `touch_chats` the statement itself advances each written chat's
/// `next_seq` and `updated_at` (Postgres: the insert is a data-modifying CTE
/// and the chats are updated from what it returns, one update per chat per
/// statement; a PL/pgSQL row trigger cost a function call and an UPDATE per
/// row); without, the backend's triggers do it (SQLite). The update also
/// names its chats as a key array, so Postgres looks them up by key: joined
/// with the returned rows alone, it hashed the whole `chats` table for
/// batches of 32 rows and more. Either way the
/// statement's row count is the number of messages written (one per chat).
pub(crate) fn upsert_sql(
    rows: usize,
    lookup: ChatLookup,
    numbered: bool,
    touch_chats: bool,
) -> String {
    use std::fmt::Write as _;
    let mut sql = String::from(if touch_chats { "WITH written AS (" } else { "" });
    sql.push_str(
        "INSERT INTO messages (id, chat_id, seq, role, content, metadata, status, \
         finish_reason, created_at, updated_at) \
         SELECT v.column1, c.id, c.next_seq + 1, v.column4, v.column5, v.column6, v.column7, \
         v.column8, v.column9, v.column10 FROM (VALUES ",
    );
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 1..=10 {
            if c > 1 {
                sql.push_str(", ");
            }
            if numbered {
                let _ = write!(sql, "${}", r * 10 + c);
            } else {
                sql.push('?');
            }
        }
        sql.push(')');
    }
    sql.push_str(match lookup {
        ChatLookup::Join => ") AS v JOIN chats c ON c.id = v.column2 AND c.user_id = v.column3",
        // FOR UPDATE also keeps the planner from flattening the subquery
        // back into a join.
        ChatLookup::LateralForUpdate => {
            ") AS v CROSS JOIN LATERAL (SELECT id, next_seq FROM chats \
             WHERE id = v.column2 AND user_id = v.column3 FOR UPDATE) AS c"
        }
    });
    sql.push_str(
        " WHERE true \
         ON CONFLICT (id) DO UPDATE SET role = excluded.role, content = excluded.content, \
         metadata = excluded.metadata, status = excluded.status, \
         finish_reason = excluded.finish_reason, updated_at = excluded.updated_at \
         WHERE messages.chat_id = excluded.chat_id",
    );
    if touch_chats {
        sql.push_str(
            " RETURNING chat_id, seq, updated_at) \
             UPDATE chats c SET next_seq = GREATEST(c.next_seq, w.seq), \
             updated_at = GREATEST(c.updated_at, w.updated_at) \
             FROM written w WHERE c.id = w.chat_id \
             AND c.id = ANY (ARRAY(SELECT chat_id FROM written))",
        );
    }
    sql
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Records each batch, checks that batches in flight never share a chat
    /// or an id, and holds each batch long enough for the next to start.
    struct Recorder {
        lanes: usize,
        state: std::sync::Mutex<Recorded>,
    }

    #[derive(Default)]
    struct Recorded {
        /// Rows in the order their batches ended.
        written: Vec<(String, String)>,
        inflight: Vec<HashSet<String>>,
        most_inflight: usize,
        overlap: bool,
    }

    #[async_trait]
    impl RowWriter for Recorder {
        async fn write_rows(&self, jobs: &[Job]) -> Result<u64, StoreError> {
            let chats: HashSet<String> = jobs.iter().map(|j| j.chat.clone()).collect();
            {
                let mut s = self.state.lock().unwrap();
                if s.inflight.iter().any(|other| !other.is_disjoint(&chats)) {
                    s.overlap = true;
                }
                s.inflight.push(chats.clone());
                s.most_inflight = s.most_inflight.max(s.inflight.len());
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let mut s = self.state.lock().unwrap();
            s.inflight.retain(|c| *c != chats);
            s.written
                .extend(jobs.iter().map(|j| (j.chat.clone(), j.row.id.clone())));
            Ok(jobs.len() as u64)
        }

        async fn owns(&self, _: &UserId, _: &str) -> Result<bool, StoreError> {
            Ok(true)
        }

        fn lanes(&self) -> usize {
            self.lanes
        }
    }

    /// Counts the times the writer gave its connections back.
    struct IdleCounter {
        grace: std::time::Duration,
        idles: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl RowWriter for IdleCounter {
        async fn write_rows(&self, jobs: &[Job]) -> Result<u64, StoreError> {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            Ok(jobs.len() as u64)
        }

        async fn owns(&self, _: &UserId, _: &str) -> Result<bool, StoreError> {
            Ok(true)
        }

        fn idle(&self) {
            self.idles
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }

        fn idle_grace(&self) -> std::time::Duration {
            self.grace
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_writer_gives_its_connections_back_after_the_idle_grace_only() {
        let ms = std::time::Duration::from_millis;
        let user = UserId::new("alice").unwrap();
        let idles = |q: &WriteQueue<IdleCounter>| {
            q.writer().idles.load(std::sync::atomic::Ordering::Relaxed)
        };
        let queue_with_grace = |grace| {
            WriteQueue::new(IdleCounter {
                grace,
                idles: std::sync::atomic::AtomicUsize::default(),
            })
        };

        // A grace of 1 s: writes 500 ms apart keep the connection; it goes
        // back once, 1 s after the last write, and not again while idle.
        let queue = queue_with_grace(ms(1000));
        for i in 0..4 {
            queue
                .write(&user, "chat".into(), row(format!("m{i}")))
                .await
                .unwrap();
            tokio::time::sleep(ms(500)).await;
            assert_eq!(idles(&queue), 0, "given back between writes");
        }
        tokio::time::sleep(ms(600)).await;
        assert_eq!(idles(&queue), 1, "given back after the grace");
        tokio::time::sleep(ms(10_000)).await;
        assert_eq!(idles(&queue), 1, "given back again with nothing held");
        queue
            .write(&user, "chat".into(), row("m9".into()))
            .await
            .unwrap();
        tokio::time::sleep(ms(1100)).await;
        assert_eq!(
            idles(&queue),
            2,
            "held again after a write, given back again"
        );

        // No grace (SQLite's one shared connection): back after every idle moment.
        let queue = queue_with_grace(std::time::Duration::ZERO);
        for i in 0..3 {
            queue
                .write(&user, "chat".into(), row(format!("m{i}")))
                .await
                .unwrap();
            tokio::time::sleep(ms(5)).await;
            assert_eq!(idles(&queue), i + 1);
        }
    }

    fn row(id: String) -> MessageRow {
        MessageRow {
            id,
            role: "user",
            content: "[]".into(),
            metadata: None,
            status: "complete",
            finish_reason: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn a_batch_takes_the_first_write_of_each_free_chat_and_id_and_keeps_the_rest_in_order() {
        let user = UserId::new("alice").unwrap();
        let job = |chat: &str, id: &str| Job::new(user.clone(), chat.into(), row(id.into()), None);
        let mut pending: VecDeque<Job> = [
            job("c1", "m1"),
            job("c1", "m2"), // c1 already taken: waits
            job("c2", "m3"),
            job("c3", "m1"), // id m1 already taken: waits
            job("c4", "m4"), // c4 has a batch in flight: waits
            job("c5", "m5"), // m5 is in flight: waits
            job("c6", "m6"),
        ]
        .into();
        let busy_chats: Set<u64> = [Keys::of("c4", "-").chat].into_iter().collect();
        let busy_ids: Set<u64> = [Keys::of("-", "m5").id].into_iter().collect();
        let keys = |jobs: &mut dyn Iterator<Item = &Job>| -> Vec<(String, String)> {
            jobs.map(|j| (j.chat.clone(), j.row.id.clone())).collect()
        };
        let pair = |c: &str, m: &str| (c.to_owned(), m.to_owned());
        let batch = take_batch(&mut pending, &busy_chats, &busy_ids);
        assert_eq!(
            keys(&mut batch.iter()),
            [pair("c1", "m1"), pair("c2", "m3"), pair("c6", "m6")]
        );
        assert_eq!(
            keys(&mut pending.iter()),
            [
                pair("c1", "m2"),
                pair("c3", "m1"),
                pair("c4", "m4"),
                pair("c5", "m5")
            ]
        );

        // At most MAX_BATCH rows; the rest stay queued in order.
        let mut pending: VecDeque<Job> = (0..MAX_BATCH + 3)
            .map(|i| job(&format!("c{i}"), &format!("m{i}")))
            .collect();
        let batch = take_batch(&mut pending, &Set::default(), &Set::default());
        assert_eq!(batch.len(), MAX_BATCH);
        assert_eq!(
            keys(&mut pending.iter()),
            (MAX_BATCH..MAX_BATCH + 3)
                .map(|i| (format!("c{i}"), format!("m{i}")))
                .collect::<Vec<_>>()
        );

        // A full batch from a backlog: the writes held back before the cut
        // and every write after it stay queued, in their order.
        let mut pending: VecDeque<Job> = std::iter::once(job("c0", "a"))
            .chain(std::iter::once(job("c0", "b")))
            .chain((1..MAX_BATCH + 5).map(|i| job(&format!("c{i}"), &format!("m{i}"))))
            .chain(std::iter::once(job("c0", "c")))
            .collect();
        let batch = take_batch(&mut pending, &Set::default(), &Set::default());
        assert_eq!(batch.len(), MAX_BATCH);
        assert_eq!(keys(&mut batch.iter())[0], pair("c0", "a"));
        let mut want = vec![pair("c0", "b")];
        want.extend((MAX_BATCH..MAX_BATCH + 5).map(|i| (format!("c{i}"), format!("m{i}"))));
        want.push(pair("c0", "c"));
        assert_eq!(keys(&mut pending.iter()), want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_in_flight_share_no_chat_and_each_chat_keeps_its_order() {
        for lanes in [1, 2] {
            let queue = WriteQueue::new(Recorder {
                lanes,
                state: std::sync::Mutex::new(Recorded::default()),
            });
            let user = UserId::new("alice").unwrap();
            // 3 rounds of one write to each of 300 chats (more chats than a
            // batch holds, so a second batch has work while the first is in
            // flight), then 6 writes in a row to one chat: all queued at once.
            let mut order: Vec<(String, String)> = Vec::new();
            for round in 0..3 {
                for c in 0..300 {
                    order.push((format!("chat-{c}"), format!("m-{c}-{round}")));
                }
            }
            for i in 0..6 {
                order.push(("chat-hot".into(), format!("m-hot-{i}")));
            }
            let writes = order
                .iter()
                .map(|(chat, id)| queue.write(&user, chat.clone(), row(id.clone())));
            for r in futures::future::join_all(writes).await {
                r.unwrap();
            }
            let s = queue.writer().state.lock().unwrap();
            assert!(!s.overlap, "two batches in flight shared a chat");
            assert_eq!(s.most_inflight, lanes, "lanes in use");
            assert_eq!(s.written.len(), order.len(), "every write once");
            for chat in order.iter().map(|(c, _)| c) {
                let want: Vec<&String> = order
                    .iter()
                    .filter(|(c, _)| c == chat)
                    .map(|(_, i)| i)
                    .collect();
                let got: Vec<&String> = s
                    .written
                    .iter()
                    .filter(|(c, _)| c == chat)
                    .map(|(_, i)| i)
                    .collect();
                assert_eq!(got, want, "order of {chat} with {lanes} lanes");
            }
        }
    }

    #[test]
    fn batches_pad_to_few_statement_sizes() {
        assert_eq!(padded(1), 1);
        assert_eq!(padded(3), 4);
        assert_eq!(padded(64), 64);
        assert_eq!(padded(65), 128);
        assert_eq!(padded(MAX_BATCH), MAX_BATCH);
    }

    #[test]
    fn upsert_sql_numbers_every_row() {
        let sql = upsert_sql(3, ChatLookup::LateralForUpdate, true, true);
        assert!(sql.contains("($1, $2, $3, $4, $5, $6, $7, $8, $9, $10), ($11,"));
        assert!(sql.contains("$30)"));
        assert!(!sql.contains("$31"));
        let sql = upsert_sql(3, ChatLookup::Join, false, false);
        assert_eq!(sql.matches('?').count(), 30);
        assert!(!sql.contains('$'));
    }
}
