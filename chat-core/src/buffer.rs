//! Replay + live follow of one turn's SSE frames.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use futures::Stream;

use crate::chunk::UiChunk;
use crate::session::TurnFrames;
use crate::sse::SseEncoder;

/// Bytes of one block of a turn's output. A 64-token answer is ~4.3 KB of
/// frames: five blocks, at most one partly empty (blocks sized 4 KiB plus a
/// `Vec<Bytes>` of frames cost ~12 KB per running turn, 120 MB at 10,000).
const BLOCK_BYTES: usize = 1024;

/// Room left in the open block under which a frame starts a new one.
const BLOCK_MIN_ROOM: usize = 160;

#[derive(Debug, Default)]
struct Frames {
    /// Full blocks, oldest first (shared with followers without copying).
    sealed: Vec<Bytes>,
    /// The block being written; its index is `sealed.len()`.
    open: BytesMut,
    /// Each frame's block and end offset in it (a frame never spans blocks).
    ends: Vec<(u32, u32)>,
    closed: bool,
    /// Followers waiting for the next frame (woken and cleared on each push).
    followers: Wakers,
    /// Waiting in [`TurnBuffer::closed`] (woken on close only).
    close_waiters: Wakers,
}

/// Tasks to wake, the first kept inline: a turn almost always has exactly
/// one follower (its POST response), and a push then touches no list on the heap.
#[derive(Debug, Default)]
struct Wakers {
    first: Option<Waker>,
    rest: Vec<Waker>,
}

impl Wakers {
    /// Adds `waker` unless it is there already.
    fn register(&mut self, waker: &Waker) {
        match &self.first {
            None => self.first = Some(waker.clone()),
            Some(w) if w.will_wake(waker) => {}
            Some(_) => {
                if !self.rest.iter().any(|w| w.will_wake(waker)) {
                    self.rest.push(waker.clone());
                }
            }
        }
    }

    /// Wakes and forgets every waker (the list keeps its room).
    fn wake_all(&mut self) {
        if let Some(w) = self.first.take() {
            w.wake();
        }
        if !self.rest.is_empty() {
            self.rest.drain(..).for_each(Waker::wake);
        }
    }
}

impl Frames {
    /// Makes room for the next frame: seals the open block when it is nearly full.
    fn room(&mut self, need: usize) {
        if self.open.capacity() - self.open.len() >= need.max(BLOCK_MIN_ROOM) {
            return;
        }
        if !self.open.is_empty() {
            self.sealed.push(self.open.split().freeze());
        }
        self.open = BytesMut::with_capacity(need.max(BLOCK_BYTES));
    }

    /// Records that the open block now ends a frame.
    fn end_frame(&mut self) {
        let block = u32::try_from(self.sealed.len()).unwrap_or(u32::MAX);
        let end = u32::try_from(self.open.len()).unwrap_or(u32::MAX);
        self.ends.push((block, end));
    }

    /// Frame `i` as `Bytes`: shared from a sealed block, copied from the open one.
    fn frame(&self, i: usize) -> Bytes {
        let (block, end) = self.ends[i];
        let start = match i.checked_sub(1).map(|p| self.ends[p]) {
            Some((b, e)) if b == block => e as usize,
            _ => 0,
        };
        match self.sealed.get(block as usize) {
            Some(b) => b.slice(start..end as usize),
            None => Bytes::copy_from_slice(&self.open[start..end as usize]),
        }
    }
}

/// All frames of one running turn, from its first chunk. Any number of
/// followers read it from the start and then live; a slow follower never
/// blocks the turn or other followers (there is no channel to fill up).
/// Memory is bounded by the turn's own output: the frames are kept back to
/// back in 1 KiB blocks with 8 bytes of bookkeeping each.
///
/// Waiting followers leave their waker under the buffer's own lock, which a
/// push takes anyway: a frame costs one uncontended lock and one wake per
/// waiting follower, nothing else.
#[derive(Debug)]
pub struct TurnBuffer {
    state: Mutex<Frames>,
}

impl Default for TurnBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl TurnBuffer {
    /// An empty, open buffer.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(Frames::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Frames> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a frame (copied) and wakes followers. Ignored after [`close`](Self::close).
    pub fn push(&self, frame: &[u8]) {
        self.append(|open| open.extend_from_slice(frame), frame.len(), true);
    }

    /// Encodes `chunk` as a frame straight into the buffer and wakes followers.
    /// Ignored after [`close`](Self::close).
    pub fn push_chunk(&self, chunk: &UiChunk<'_>) {
        self.append(|open| SseEncoder::encode_into(open, chunk), 0, true);
    }

    /// Encodes `chunk` as a frame into the buffer without waking followers:
    /// a follower that polls reads it, a waiting one gets it with the next
    /// [`push`](Self::push), [`push_chunk`](Self::push_chunk) or
    /// [`close`](Self::close). For frames that need not travel alone (each
    /// wake makes the response write a packet of its own). Ignored after close.
    pub fn push_chunk_held(&self, chunk: &UiChunk<'_>) {
        self.append(|open| SseEncoder::encode_into(open, chunk), 0, false);
    }

    fn append(&self, write: impl FnOnce(&mut BytesMut), need: usize, wake: bool) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        s.room(need);
        write(&mut s.open);
        s.end_frame();
        if wake {
            // Waking only schedules the follower.
            s.followers.wake_all();
        }
    }

    /// Appends the final `[DONE]` frame and ends every follower's stream after it.
    pub fn close(&self) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        let done = SseEncoder::done();
        s.room(done.len());
        s.open.extend_from_slice(&done);
        s.closed = true;
        s.end_frame();
        s.followers.wake_all();
        s.close_waiters.wake_all();
    }

    /// Whether the turn has ended.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Number of frames so far.
    pub fn len(&self) -> usize {
        self.lock().ends.len()
    }

    /// True when no frame was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the turn has ended.
    pub async fn closed(&self) {
        std::future::poll_fn(|cx| {
            let mut s = self.lock();
            if s.closed {
                return Poll::Ready(());
            }
            s.close_waiters.register(cx.waker());
            Poll::Pending
        })
        .await;
    }

    /// A stream of every frame from the first, then live, ending after `[DONE]`.
    pub fn follow(self: Arc<Self>) -> TurnFrames {
        TurnFrames::from_follower(Follower { buf: self, pos: 0 })
    }
}

/// One reader of a [`TurnBuffer`]: the next frame to read and nothing else.
pub(crate) struct Follower {
    buf: Arc<TurnBuffer>,
    pos: usize,
}

impl Stream for Follower {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut s = self.buf.lock();
        if self.pos < s.ends.len() {
            let frame = s.frame(self.pos);
            drop(s);
            self.pos += 1;
            return Poll::Ready(Some(frame));
        }
        if s.closed {
            return Poll::Ready(None);
        }
        s.followers.register(cx.waker());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::StreamExt;

    use super::*;

    fn delta(i: usize, text: &str) -> UiChunk<'static> {
        UiChunk::TextDelta {
            id: format!("t{i}").into(),
            delta: text.to_owned().into(),
        }
    }

    fn encoded(chunks: &[UiChunk<'_>]) -> Vec<u8> {
        let mut enc = SseEncoder::new();
        let mut out: Vec<u8> = chunks.iter().flat_map(|c| enc.encode(c).to_vec()).collect();
        out.extend_from_slice(&SseEncoder::done());
        out
    }

    async fn read_all(buf: Arc<TurnBuffer>) -> Vec<u8> {
        buf.follow()
            .fold(Vec::new(), |mut acc, b| async move {
                acc.extend_from_slice(&b);
                acc
            })
            .await
    }

    #[tokio::test]
    async fn followers_from_any_point_read_every_byte_in_order() {
        // Small frames, a frame larger than a block, and frames that end
        // exactly at a block's edge all read back as the encoder's bytes.
        let big = "x".repeat(3 * BLOCK_BYTES);
        let chunks: Vec<UiChunk<'static>> = (0..200)
            .map(|i| match i % 50 {
                7 => delta(i, &big),
                _ => delta(i, &"y".repeat(i % 23)),
            })
            .collect();
        let buf = Arc::new(TurnBuffer::new());
        let early = tokio::spawn(read_all(buf.clone()));
        let mut middle = None;
        for (i, c) in chunks.iter().enumerate() {
            buf.push_chunk(c);
            if i == 100 {
                middle = Some(tokio::spawn(read_all(buf.clone())));
            }
            if i % 10 == 0 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(buf.len(), chunks.len());
        buf.close();
        let want = encoded(&chunks);
        assert_eq!(early.await.unwrap(), want);
        assert_eq!(middle.unwrap().await.unwrap(), want);
        assert_eq!(
            read_all(buf.clone()).await,
            want,
            "a follower after the end replays all"
        );
        assert_eq!(buf.len(), chunks.len() + 1, "[DONE] counts as a frame");
    }

    #[tokio::test]
    async fn pushed_frames_and_encoded_chunks_mix_and_nothing_follows_close() {
        let buf = Arc::new(TurnBuffer::new());
        let mut enc = SseEncoder::new();
        buf.push(&enc.encode(&delta(0, "a")));
        buf.push_chunk(&delta(1, "b"));
        buf.close();
        buf.push_chunk(&delta(2, "ignored"));
        buf.push(b"ignored");
        assert!(buf.is_closed());
        assert_eq!(
            read_all(buf).await,
            encoded(&[delta(0, "a"), delta(1, "b")])
        );
    }

    #[tokio::test]
    async fn a_live_follower_gets_each_frame_as_it_is_pushed() {
        let buf = Arc::new(TurnBuffer::new());
        let mut follower = buf.clone().follow();
        for i in 0..5 {
            buf.push_chunk(&delta(i, "tok"));
            let got = follower.next().await.unwrap();
            let mut one = encoded(&[delta(i, "tok")]);
            one.truncate(one.len() - SseEncoder::done().len());
            assert_eq!(&got[..], &one[..], "one frame per item");
        }
        buf.close();
        assert_eq!(&follower.next().await.unwrap()[..], &SseEncoder::done()[..]);
        assert!(follower.next().await.is_none());
    }

    /// Counts the wakes of a waker.
    #[derive(Default)]
    struct WakeCount(std::sync::atomic::AtomicUsize);

    impl futures::task::ArcWake for WakeCount {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_held_frame_wakes_no_follower_and_goes_with_the_next_one() {
        let buf = Arc::new(TurnBuffer::new());
        let wakes = Arc::new(WakeCount::default());
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut follower = buf.clone().follow();
        let count = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        assert!(Pin::new(&mut follower).poll_next(&mut cx).is_pending());
        buf.push_chunk_held(&UiChunk::TextEnd { id: "t".into() });
        buf.push_chunk_held(&UiChunk::FinishStep);
        assert_eq!(count(), 0, "a held frame woke the follower");
        buf.push_chunk(&UiChunk::Abort);
        assert_eq!(count(), 1);
        let mut got = Vec::new();
        while let Poll::Ready(Some(f)) = Pin::new(&mut follower).poll_next(&mut cx) {
            got.extend_from_slice(&f);
        }
        let mut enc = SseEncoder::new();
        let want: Vec<u8> = [
            UiChunk::TextEnd { id: "t".into() },
            UiChunk::FinishStep,
            UiChunk::Abort,
        ]
        .iter()
        .flat_map(|c| enc.encode(c).to_vec())
        .collect();
        assert_eq!(got, want);
        // A follower that polls reads a held frame at once.
        buf.push_chunk_held(&UiChunk::FinishStep);
        let Poll::Ready(Some(f)) = Pin::new(&mut follower).poll_next(&mut cx) else {
            panic!("the held frame was not readable");
        };
        assert_eq!(&f[..], &enc.encode(&UiChunk::FinishStep)[..]);
    }

    #[tokio::test]
    async fn closed_returns_once_the_turn_ends_and_many_followers_all_finish() {
        let buf = Arc::new(TurnBuffer::new());
        let waiter = tokio::spawn({
            let buf = buf.clone();
            async move { buf.closed().await }
        });
        let followers: Vec<_> = (0..3)
            .map(|_| tokio::spawn(read_all(buf.clone())))
            .collect();
        // A follower that goes away before the end leaves nothing behind.
        drop(buf.clone().follow());
        for i in 0..10 {
            buf.push_chunk(&delta(i, "tok"));
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "closed() must wait for close()");
        buf.close();
        waiter.await.unwrap();
        let want = encoded(&(0..10).map(|i| delta(i, "tok")).collect::<Vec<_>>());
        for f in followers {
            assert_eq!(f.await.unwrap(), want);
        }
        buf.closed().await;
    }
}
