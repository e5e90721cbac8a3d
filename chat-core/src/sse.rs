//! Server-sent-event framing of the UI message stream.

use bytes::{BufMut, Bytes, BytesMut};

use crate::chunk::UiChunk;

/// Response headers of a UI message stream (name, value).
pub const UI_STREAM_HEADERS: [(&str, &str); 4] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-vercel-ai-ui-message-stream", "v1"),
    ("x-accel-buffering", "no"),
];

/// The last event of every UI message stream.
pub const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

/// Encodes chunks into `data: <json>\n\n` frames, reusing one buffer.
///
/// ```
/// use chat_core::{SseEncoder, UiChunk};
/// let mut enc = SseEncoder::new();
/// let frame = enc.encode(&UiChunk::TextDelta { id: "t0".into(), delta: "hi".into() });
/// assert_eq!(&frame[..], b"data: {\"type\":\"text-delta\",\"id\":\"t0\",\"delta\":\"hi\"}\n\n");
/// ```
#[derive(Debug, Default)]
pub struct SseEncoder {
    buf: BytesMut,
}

impl SseEncoder {
    /// A new encoder.
    pub fn new() -> Self {
        Self {
            buf: BytesMut::with_capacity(4096),
        }
    }

    /// Encodes one chunk as a frame. The returned `Bytes` shares the encoder's
    /// allocation until it runs out, so frames cost no allocation of their own.
    pub fn encode(&mut self, chunk: &UiChunk<'_>) -> Bytes {
        if self.buf.capacity() < 512 {
            self.buf.reserve(4096);
        }
        Self::encode_into(&mut self.buf, chunk);
        self.buf.split().freeze()
    }

    /// Appends one chunk's frame to `buf` (growing it if needed).
    pub(crate) fn encode_into(buf: &mut BytesMut, chunk: &UiChunk<'_>) {
        buf.put_slice(b"data: ");
        // Serializing our own types into memory cannot fail.
        let mut w = buf.writer();
        if serde_json::to_writer(&mut w, chunk).is_err() {
            tracing::error!(chunk = chunk.type_name(), "chunk failed to serialize");
        }
        w.into_inner().put_slice(b"\n\n");
    }

    /// The final `data: [DONE]` frame.
    pub fn done() -> Bytes {
        Bytes::from_static(DONE_FRAME)
    }
}

/// Parses a UI message stream body back into chunks (for tests and clients).
/// Returns the chunks and whether `[DONE]` was seen; comments and blank lines are skipped.
pub fn parse_sse(body: &[u8]) -> Result<(Vec<UiChunk<'static>>, bool), serde_json::Error> {
    let text = String::from_utf8_lossy(body);
    let mut chunks = Vec::new();
    let mut done = false;
    for line in text.split('\n') {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: UiChunk<'_> = serde_json::from_str(data)?;
        chunks.push(chunk.into_owned());
    }
    Ok((chunks, done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::FinishReason;
    use proptest::prelude::*;

    #[test]
    fn frames_match_the_wire_format() {
        let mut e = SseEncoder::new();
        let f = e.encode(&UiChunk::Start {
            message_id: "m1".into(),
            message_metadata: None,
        });
        assert_eq!(
            &f[..],
            b"data: {\"type\":\"start\",\"messageId\":\"m1\"}\n\n"
        );
        let f = e.encode(&UiChunk::Finish {
            finish_reason: Some(FinishReason::Stop),
            message_metadata: None,
        });
        assert_eq!(
            &f[..],
            b"data: {\"type\":\"finish\",\"finishReason\":\"stop\"}\n\n"
        );
        let f = e.encode(&UiChunk::Abort);
        assert_eq!(&f[..], b"data: {\"type\":\"abort\"}\n\n");
    }

    proptest! {
        #[test]
        fn any_text_round_trips(delta in any::<String>(), id in "[a-z0-9-]{1,20}") {
            let mut e = SseEncoder::new();
            let chunk = UiChunk::TextDelta { id: id.as_str().into(), delta: delta.as_str().into() };
            let frame = e.encode(&chunk);
            // One event: a single data line (JSON escapes every newline) and a blank line.
            prop_assert!(frame.ends_with(b"\n\n"));
            prop_assert_eq!(frame.iter().filter(|b| **b == b'\n').count(), 2);
            let (chunks, done) = parse_sse(&frame).unwrap();
            prop_assert!(!done);
            prop_assert_eq!(chunks, vec![chunk.into_owned()]);
        }
    }
}
