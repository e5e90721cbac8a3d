//! Replay + live follow of one turn's SSE frames.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use crate::BoxStream;
use crate::chunk::UiChunk;
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

    /// Records that the open block now ends a frame; returns the frame count.
    fn end_frame(&mut self) -> usize {
        let block = u32::try_from(self.sealed.len()).unwrap_or(u32::MAX);
        let end = u32::try_from(self.open.len()).unwrap_or(u32::MAX);
        self.ends.push((block, end));
        self.ends.len()
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
#[derive(Debug)]
pub struct TurnBuffer {
    state: Mutex<Frames>,
    len: watch::Sender<usize>,
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
            len: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Frames> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a frame (copied) and wakes followers. Ignored after [`close`](Self::close).
    pub fn push(&self, frame: &[u8]) {
        self.append(|open| open.extend_from_slice(frame), frame.len());
    }

    /// Encodes `chunk` as a frame straight into the buffer and wakes followers.
    /// Ignored after [`close`](Self::close).
    pub fn push_chunk(&self, chunk: &UiChunk<'_>) {
        self.append(|open| SseEncoder::encode_into(open, chunk), 0);
    }

    fn append(&self, write: impl FnOnce(&mut BytesMut), need: usize) {
        let n = {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            s.room(need);
            write(&mut s.open);
            s.end_frame()
        };
        self.len.send_replace(n);
    }

    /// Appends the final `[DONE]` frame and ends every follower's stream after it.
    pub fn close(&self) {
        let n = {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            let done = SseEncoder::done();
            s.room(done.len());
            s.open.extend_from_slice(&done);
            s.closed = true;
            s.end_frame()
        };
        self.len.send_replace(n);
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
        let mut rx = self.len.subscribe();
        loop {
            rx.borrow_and_update();
            if self.is_closed() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Appends frames `from..` to `out` (sealed blocks shared, the open
    /// block's frames copied); returns how many were added and whether the
    /// buffer is closed.
    fn read_into(&self, from: usize, out: &mut VecDeque<Bytes>) -> (usize, bool) {
        let s = self.lock();
        let to = s.ends.len();
        out.extend((from..to).map(|i| s.frame(i)));
        (to.saturating_sub(from), s.closed)
    }

    /// A stream of every frame from the first, then live, ending after `[DONE]`.
    pub fn follow(self: std::sync::Arc<Self>) -> BoxStream<'static, Bytes> {
        struct St {
            buf: std::sync::Arc<TurnBuffer>,
            rx: watch::Receiver<usize>,
            pos: usize,
            pending: VecDeque<Bytes>,
        }
        let rx = self.len.subscribe();
        let st = St {
            buf: self,
            rx,
            pos: 0,
            pending: VecDeque::with_capacity(4),
        };
        let s = futures::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(f) = st.pending.pop_front() {
                    return Some((f, st));
                }
                st.rx.borrow_and_update();
                let (added, closed) = st.buf.read_into(st.pos, &mut st.pending);
                if added > 0 {
                    st.pos += added;
                    continue;
                }
                if closed || st.rx.changed().await.is_err() {
                    return None;
                }
            }
        });
        Box::pin(s)
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
}
