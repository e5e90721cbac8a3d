//! [`History`]: a chat's stored messages as a list whose copies share storage.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::ids::MessageId;
use crate::message::UiMessage;
use crate::store::StoredMessage;

/// Messages per chunk: a copy-on-write touches one chunk plus the list of
/// chunks, ~`CHUNK + len / CHUNK` pointers, never the whole history.
const CHUNK: usize = 64;

/// A message with the hash of its id, so looking an id up scans a few
/// contiguous words per message instead of following three pointers.
type Slot = (u64, Arc<StoredMessage>);

/// Up to [`CHUNK`] messages and a Bloom filter of their id hashes, so a
/// lookup skips every chunk that cannot hold the id: a new message's id (the
/// common case: each turn checks that its user message is not a retry) is
/// answered from one cache line per 64 messages instead of a scan of them all.
#[derive(Clone, Default)]
struct Chunk {
    slots: Vec<Slot>,
    /// Two bits per id hash out of 512. A clear bit means no id here has
    /// that hash; a set one may be stale (a replaced message), which only
    /// costs a scan. With 64 ids ~5% of the chunks that lack an id get scanned.
    filter: [u64; 8],
}

impl Chunk {
    /// The filter's two bits for `hash`: (word, mask) pairs.
    fn bits(hash: u64) -> [(usize, u64); 2] {
        let a = (hash & 511) as usize;
        let b = ((hash >> 32) & 511) as usize;
        [(a / 64, 1 << (a % 64)), (b / 64, 1 << (b % 64))]
    }

    fn mark(filter: &mut [u64; 8], hash: u64) {
        for (w, m) in Self::bits(hash) {
            filter[w] |= m;
        }
    }

    fn may_hold(&self, hash: u64) -> bool {
        Self::bits(hash)
            .iter()
            .all(|&(w, m)| self.filter[w] & m != 0)
    }

    fn push(&mut self, slot: Slot) {
        Self::mark(&mut self.filter, slot.0);
        self.slots.push(slot);
    }

    /// Rebuilds the filter from the slots (after a truncation or a replacement).
    fn refilter(&mut self) {
        let mut filter = [0; 8];
        for (hash, _) in &self.slots {
            Self::mark(&mut filter, *hash);
        }
        self.filter = filter;
    }
}

/// The hash kept beside each message (a collision only costs a comparison).
pub(crate) fn id_hash(id: &MessageId) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    id.as_str().hash(&mut h);
    h.finish()
}

/// A chat's stored messages, oldest first, shared without copying.
///
/// Cloning is O(1): the clone shares the chunks (64 messages each) with the
/// original, and a later change to either copies only the chunk it touches
/// and the list of chunks (copy-on-write). This is how the history cache
/// hands every turn its chat's history (a 1,000-message chat used to cost a
/// copy of 1,000 pointers per turn, and as much again to drop it), and how a
/// turn adds its messages without disturbing the cache or other turns.
///
/// Written here rather than taken from a persistent-collections crate: the
/// access pattern is append-mostly with rewrites at the end, which this
/// two-level list serves with ~50 lines, and the candidates (`imbl`, `rpds`)
/// are MPL-licensed.
#[derive(Clone, Default)]
pub struct History {
    chunks: Arc<Vec<Arc<Chunk>>>,
    len: usize,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl PartialEq for History {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no messages.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot(&self, i: usize) -> Option<&Slot> {
        if i >= self.len {
            return None;
        }
        self.chunks.get(i / CHUNK)?.slots.get(i % CHUNK)
    }

    /// The `i`-th message (from 0, oldest first).
    pub fn get(&self, i: usize) -> Option<&Arc<StoredMessage>> {
        self.slot(i).map(|(_, m)| m)
    }

    /// The newest message.
    pub fn last(&self) -> Option<&Arc<StoredMessage>> {
        self.len.checked_sub(1).and_then(|i| self.get(i))
    }

    /// The messages, oldest first.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            history: self,
            front: 0,
            back: self.len,
        }
    }

    /// The messages as UI messages, oldest first.
    pub fn messages(&self) -> impl DoubleEndedIterator<Item = &UiMessage> + ExactSizeIterator {
        self.iter().map(|m| &m.message)
    }

    /// The hashes of the messages' ids, oldest first (as [`position`](Self::position) uses them).
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn id_hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.slots.iter().map(|(h, _)| *h))
    }

    /// Where the message with this id is, searched from the newest.
    pub fn position(&self, id: &MessageId) -> Option<usize> {
        let hash = id_hash(id);
        for (c, chunk) in self.chunks.iter().enumerate().rev() {
            if !chunk.may_hold(hash) {
                continue;
            }
            for (j, (h, m)) in chunk.slots.iter().enumerate().rev() {
                if *h == hash && m.message.id == *id {
                    return Some(c * CHUNK + j);
                }
            }
        }
        None
    }

    /// Appends a message.
    pub fn push(&mut self, message: Arc<StoredMessage>) {
        let slot = (id_hash(&message.message.id), message);
        let chunks = Arc::make_mut(&mut self.chunks);
        match chunks.last_mut() {
            Some(last) if last.slots.len() < CHUNK => Arc::make_mut(last).push(slot),
            // Grown as needed, not made 64 long up front: most chats are
            // short, and a cache of 10,000 of them would hold ~10 MB of room.
            _ => {
                let mut chunk = Chunk::default();
                chunk.push(slot);
                chunks.push(Arc::new(chunk));
            }
        }
        self.len += 1;
    }

    /// Replaces the `i`-th message; `false` (and nothing changed) when there is none.
    pub fn set(&mut self, i: usize, message: Arc<StoredMessage>) -> bool {
        if i >= self.len {
            return false;
        }
        let chunks = Arc::make_mut(&mut self.chunks);
        let chunk = Arc::make_mut(&mut chunks[i / CHUNK]);
        let hash = id_hash(&message.message.id);
        let old = std::mem::replace(&mut chunk.slots[i % CHUNK], (hash, message));
        if old.0 != hash {
            chunk.refilter();
        }
        true
    }

    /// Keeps the first `len` messages.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let chunks = Arc::make_mut(&mut self.chunks);
        chunks.truncate(len.div_ceil(CHUNK));
        if let Some(last) = chunks.last_mut()
            && len % CHUNK != 0
        {
            let last = Arc::make_mut(last);
            last.slots.truncate(len % CHUNK);
            last.refilter();
        }
        self.len = len;
    }
}

impl FromIterator<Arc<StoredMessage>> for History {
    fn from_iter<I: IntoIterator<Item = Arc<StoredMessage>>>(iter: I) -> Self {
        let mut h = Self::new();
        for m in iter {
            h.push(m);
        }
        h
    }
}

impl FromIterator<StoredMessage> for History {
    fn from_iter<I: IntoIterator<Item = StoredMessage>>(iter: I) -> Self {
        iter.into_iter().map(Arc::new).collect()
    }
}

impl From<Vec<Arc<StoredMessage>>> for History {
    fn from(messages: Vec<Arc<StoredMessage>>) -> Self {
        messages.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a History {
    type Item = &'a Arc<StoredMessage>;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Iterator over a [`History`], oldest first.
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    history: &'a History,
    front: usize,
    back: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a Arc<StoredMessage>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        self.front += 1;
        self.history.get(self.front - 1)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.back - self.front;
        (n, Some(n))
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        self.back -= 1;
        self.history.get(self.back)
    }
}

impl ExactSizeIterator for Iter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MessageStatus;

    fn msg(i: usize) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            message: UiMessage::user_text(MessageId::new(), format!("m{i}")),
            created_at: i as i64,
            updated_at: i as i64,
            status: MessageStatus::Complete,
        })
    }

    fn texts(h: &History) -> Vec<String> {
        h.messages().map(UiMessage::text).collect()
    }

    #[test]
    fn behaves_like_a_vector_across_chunk_edges() {
        let mut model: Vec<Arc<StoredMessage>> = Vec::new();
        let mut h = History::new();
        for i in 0..3 * CHUNK + 5 {
            let m = msg(i);
            model.push(m.clone());
            h.push(m);
            assert_eq!(h.len(), model.len());
        }
        assert!(h.iter().eq(model.iter()));
        assert!(h.iter().rev().eq(model.iter().rev()));
        assert_eq!(h.iter().len(), model.len());
        assert_eq!(h.last(), model.last());
        for (i, m) in model.iter().enumerate() {
            assert_eq!(h.position(&m.message.id), Some(i));
        }
        assert_eq!(h.position(&MessageId::new()), None);

        for len in [3 * CHUNK + 5, 2 * CHUNK + 1, 2 * CHUNK, CHUNK - 1, 0] {
            let mut t = h.clone();
            t.truncate(len);
            assert_eq!(t.len(), len);
            assert!(t.iter().eq(model[..len].iter()), "truncate to {len}");
            let m = msg(1000);
            t.push(m.clone());
            assert_eq!(t.position(&m.message.id), Some(len));
            assert_eq!(t.get(len), Some(&m));
        }
        assert!(h.iter().eq(model.iter()), "the original is untouched");
    }

    #[test]
    fn ids_are_found_exactly_while_present_whatever_the_filters_hold() {
        // Thousands of ids over many chunks: every present id is found where
        // it is, and ids never added, replaced or truncated away are not.
        let mut h: History = (0..40 * CHUNK).map(msg).collect();
        let mut model: Vec<Arc<StoredMessage>> = h.iter().cloned().collect();
        for _ in 0..2_000 {
            assert_eq!(h.position(&MessageId::new()), None);
        }
        let replaced = model[5].message.id.clone();
        let other = msg(9_000);
        assert!(h.set(5, other.clone()));
        model[5] = other.clone();
        assert_eq!(h.position(&replaced), None, "a replaced id is gone");
        assert_eq!(h.position(&other.message.id), Some(5));
        let cut = model.split_off(30 * CHUNK + 7);
        h.truncate(30 * CHUNK + 7);
        for m in &cut {
            assert_eq!(h.position(&m.message.id), None, "a truncated id is gone");
        }
        for (i, m) in model.iter().enumerate() {
            assert_eq!(h.position(&m.message.id), Some(i));
        }
    }

    #[test]
    fn clones_share_until_one_changes_and_then_only_it_changes() {
        let mut a: History = (0..2 * CHUNK + 3).map(msg).collect();
        let before = texts(&a);
        let snapshot = a.clone();
        // A rewrite in a sealed chunk, one in the open chunk, and an append.
        let old = msg(500);
        assert!(a.set(1, old.clone()));
        assert!(a.set(2 * CHUNK + 1, msg(501)));
        a.push(msg(502));
        assert!(!a.set(a.len(), msg(503)), "no such index");
        assert_eq!(texts(&snapshot), before, "the snapshot kept its messages");
        assert_eq!(a.len(), 2 * CHUNK + 4);
        assert_eq!(a.get(1), Some(&old));
        assert_eq!(a.position(&old.message.id), Some(1));
        assert_eq!(
            snapshot.position(&old.message.id),
            None,
            "nor does it find the rewritten id"
        );
        assert_eq!(a.get(2 * CHUNK + 1).unwrap().message.text(), "m501");
        assert_eq!(a.last().unwrap().message.text(), "m502");
        // The chunk nothing touched is still shared; the touched ones were copied.
        assert!(Arc::ptr_eq(&a.chunks[1], &snapshot.chunks[1]));
        assert!(!Arc::ptr_eq(&a.chunks[0], &snapshot.chunks[0]));
        assert!(!Arc::ptr_eq(&a.chunks[2], &snapshot.chunks[2]));
        let b = a.clone();
        assert!(Arc::ptr_eq(&a.chunks, &b.chunks));
        assert_eq!(a, b);
        assert_ne!(a, snapshot);
    }
}
