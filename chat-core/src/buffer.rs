//! Replay + live follow of one turn's SSE frames.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::watch;

use crate::BoxStream;
use crate::sse::SseEncoder;

#[derive(Debug, Default)]
struct Frames {
    frames: Vec<Bytes>,
    closed: bool,
}

/// All frames of one running turn, from its first chunk. Any number of
/// followers read it from the start and then live; a slow follower never
/// blocks the turn or other followers (there is no channel to fill up).
/// Memory is bounded by the turn's own output.
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

    /// Appends a frame and wakes followers. Ignored after [`close`](Self::close).
    pub fn push(&self, frame: Bytes) {
        let n = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if s.closed {
                return;
            }
            s.frames.push(frame);
            s.frames.len()
        };
        self.len.send_replace(n);
    }

    /// Appends the final `[DONE]` frame and ends every follower's stream after it.
    pub fn close(&self) {
        let n = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if s.closed {
                return;
            }
            s.frames.push(SseEncoder::done());
            s.closed = true;
            s.frames.len()
        };
        self.len.send_replace(n);
    }

    /// Whether the turn has ended.
    pub fn is_closed(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed
    }

    /// Number of frames so far.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .frames
            .len()
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

    /// Appends frames `from..` (cheap `Bytes` clones) to `out`, reusing its
    /// capacity; returns how many were added and whether the buffer is closed.
    fn read_into(&self, from: usize, out: &mut VecDeque<Bytes>) -> (usize, bool) {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let new = s.frames.get(from..).unwrap_or_default();
        out.extend(new.iter().cloned());
        (new.len(), s.closed)
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
            pending: VecDeque::with_capacity(16),
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
