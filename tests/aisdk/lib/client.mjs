// The AI SDK client pieces the tests drive: the transport configured as an
// existing frontend would configure it for the api.md routes, a reader that
// records every chunk the transport accepts (and the error when it rejects
// one), and a Node `ChatState` so that `AbstractChat` (what `useChat` wraps)
// runs unmodified outside React.

/**
 * `DefaultChatTransport` pointed at the api.md routes: the new user message
 * goes as `{id, message}` to POST /api/chat/:id/messages (plus `trigger` and
 * `messageId` for a regenerate), resume is GET /api/chat/:id/stream.
 */
export function makeTransport(ai, base, user) {
  return new ai.DefaultChatTransport({
    api: `${base}/api/chat`,
    headers: { 'x-user-id': user },
    prepareSendMessagesRequest: ({ id, messages, trigger, messageId }) => ({
      api: `${base}/api/chat/${encodeURIComponent(id)}/messages`,
      body:
        trigger === 'regenerate-message'
          ? { id, message: messages.at(-1), trigger, messageId }
          : { id, message: messages.at(-1) },
    }),
    prepareReconnectToStreamRequest: ({ id }) => ({
      api: `${base}/api/chat/${encodeURIComponent(id)}/stream`,
    }),
  });
}

/**
 * Reads a transport stream (chunks already parsed and validated by the SDK)
 * and assembles it with the SDK's `readUIMessageStream`. `onChunk(chunk, all)`
 * sees every chunk as it arrives. Resolves to `{chunks, message, snapshots,
 * errors, rejected}`: `rejected` is the error the SDK raised for a chunk it
 * refused (validation) or a broken stream; `errors` are the `error` chunks the
 * SDK reported through `onError`.
 */
export async function readAll(ai, stream, { seed, onChunk } = {}) {
  const chunks = [];
  const errors = [];
  let rejected;
  let feed;
  const fed = new ReadableStream({
    start(c) {
      feed = c;
    },
  });
  const pump = (async () => {
    const reader = stream.getReader();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks.push(value);
        feed.enqueue(value);
        await onChunk?.(value, chunks);
      }
      feed.close();
    } catch (e) {
      rejected = e;
      feed.error(e);
    }
  })();
  const snapshots = [];
  let message;
  try {
    for await (const m of ai.readUIMessageStream({
      stream: fed,
      message: seed,
      onError: (e) => errors.push(e),
    })) {
      message = m;
      snapshots.push(m);
    }
  } catch (e) {
    rejected ??= e;
  }
  await pump;
  return { chunks, message, snapshots, errors, rejected };
}

/** A plain `ChatState` (what `useChat` keeps in React state) with a log of renders. */
export class NodeChatState {
  constructor(messages = []) {
    this.messages = messages;
    this.status = 'ready';
    this.error = undefined;
    /** Every assistant message the chat rendered while it streamed. */
    this.renders = [];
  }
  pushMessage(m) {
    this.messages = this.messages.concat(m);
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
  }
  replaceMessage(i, m) {
    this.messages = [...this.messages.slice(0, i), m, ...this.messages.slice(i + 1)];
    this.renders.push(this.snapshot(m));
  }
  snapshot(x) {
    return structuredClone(x);
  }
}

/** A `Chat` like `@ai-sdk/react`'s: `AbstractChat` over `NodeChatState`. */
export function makeChat(ai, { id, messages, transport, onError, onFinish }) {
  const state = new NodeChatState(messages);
  class NodeChat extends ai.AbstractChat {
    constructor() {
      super({ id, transport, state, onError, onFinish });
    }
  }
  return { chat: new NodeChat(), state };
}

/** The text of a message's text parts. */
export function textOf(m) {
  return (m?.parts ?? [])
    .filter((p) => p.type === 'text')
    .map((p) => p.text)
    .join('');
}
