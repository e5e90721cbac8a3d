// Protocol conformance: the real example server's UI message streams go
// through the Vercel AI SDK's own client code — `DefaultChatTransport`
// (SSE parsing + strict chunk validation), `readUIMessageStream` and
// `AbstractChat` (the class `useChat` wraps) — for every pinned `ai` major.
// The message the client assembles must equal what the server then stores
// (GET /api/chat/:id/messages). A chunk the SDK rejects fails the test.
//
// The demo model picks a script from the user's text: `[reasoning]`,
// `[tool]` (get_weather over two steps), `[error]` (fails after half the
// tokens); anything else is plain text `tok0 tok1 ...`.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { randomUUID } from 'node:crypto';

import { backends, freshDb, startServer, api, waitFor } from './lib/server.mjs';
import { makeTransport, readAll, makeChat, textOf } from './lib/client.mjs';

const require = createRequire(import.meta.url);
const TOKENS = 40;
const tokens = (n) => Array.from({ length: n }, (_, i) => `tok${i} `).join('');

/** Every `ai` major under test: the npm alias and its installed version. */
const SDKS = ['ai', 'ai6', 'ai5'].map((pkg) => ({
  pkg,
  version: JSON.parse(readFileSync(require.resolve(`${pkg}/package.json`), 'utf8')).version,
}));

/** The user message the client sent, as it is stored (the server adds metadata.createdAt). */
function assertUserStored(stored, client) {
  assert.equal(stored.id, client.id);
  assert.equal(stored.role, 'user');
  assert.deepEqual(stored.parts, client.parts);
  assert.equal(typeof stored.metadata?.createdAt, 'number');
}

/**
 * The assistant message the client assembled equals the stored one: id,
 * role, every part (state, ids, inputs, outputs) and the metadata the stream
 * carried (`createdAt` at start; `finishReason` and `usage` at finish).
 */
function assertAssistantStored(stored, assembled, { finished }) {
  assert.ok(assembled, 'the client assembled no message');
  // As JSON (how a message is sent and stored): the SDK leaves some absent
  // optional fields as explicit `undefined` (e.g. `providerMetadata`).
  const client = json(assembled);
  assert.equal(client.id, stored.id, 'message id from the start chunk is the stored id');
  assert.equal(client.role, 'assistant');
  assert.equal(stored.role, 'assistant');
  assert.deepEqual(client.parts, stored.parts);
  if (finished) {
    assert.deepEqual(client.metadata, stored.metadata);
  } else {
    // No finish chunk (stop, error): the stream carried only createdAt.
    assert.equal(client.metadata?.createdAt, stored.metadata?.createdAt);
  }
}

function json(x) {
  return JSON.parse(JSON.stringify(x));
}

function types(chunks) {
  return chunks.map((c) => c.type);
}

for (const backend of backends()) {
  describe(`AI SDK client against the example server on ${backend}`, () => {
    let db;
    let server;
    before(async () => {
      db = freshDb(backend);
      server = await startServer(db, { TOKENS: String(TOKENS), TOKEN_DELAY_MS: '15' });
    });
    after(async () => {
      await server?.stop();
      db?.drop();
    });

    for (const sdk of SDKS) {
      describe(`ai@${sdk.version}`, () => {
        let ai;
        before(async () => {
          ai = await import(sdk.pkg);
        });
        const user = () => `u-${sdk.pkg}-${randomUUID().slice(0, 8)}`;

        /** Sends one user message through the transport; returns what the SDK read. */
        async function send(base, who, chatId, text, opts = {}) {
          const transport = makeTransport(ai, base, who);
          const message = { id: randomUUID(), role: 'user', parts: [{ type: 'text', text }] };
          const stream = await transport.sendMessages({
            chatId,
            messages: [message],
            trigger: 'submit-message',
            messageId: undefined,
            abortSignal: opts.signal,
          });
          return { message, read: await readAll(ai, stream, opts) };
        }

        test('plain text: chunks accepted, assembled message = stored message', async () => {
          const who = user();
          const c = api(server.base, who);
          const chatId = await c.createChat();
          const { message, read } = await send(server.base, who, chatId, 'hello there');
          assert.equal(read.rejected, undefined, `SDK rejected the stream: ${read.rejected}`);
          assert.deepEqual(read.errors, []);
          assert.deepEqual(types(read.chunks), [
            'start',
            'start-step',
            'text-start',
            ...Array(TOKENS).fill('text-delta'),
            'text-end',
            'finish-step',
            'finish',
          ]);
          assert.equal(read.chunks.at(-1).finishReason, 'stop');
          // One snapshot per token: the text grows as it streams.
          const lengths = read.snapshots.map((m) => textOf(m).length);
          assert.ok(new Set(lengths).size >= TOKENS, `text grew in ${new Set(lengths).size} steps`);
          assert.equal(textOf(read.message), tokens(TOKENS));
          const stored = await c.messages(chatId);
          assert.equal(stored.length, 2);
          assertUserStored(stored[0], message);
          assertAssistantStored(stored[1], read.message, { finished: true });
          assert.equal(stored[1].metadata.finishReason, 'stop');
        });

        test('reasoning: reasoning part then text, = stored', async () => {
          const who = user();
          const c = api(server.base, who);
          const chatId = await c.createChat();
          const { read } = await send(server.base, who, chatId, '[reasoning] why?');
          assert.equal(read.rejected, undefined, `SDK rejected the stream: ${read.rejected}`);
          assert.ok(types(read.chunks).includes('reasoning-delta'));
          const kinds = read.message.parts.map((p) => p.type);
          assert.deepEqual(kinds, ['step-start', 'reasoning', 'text']);
          assert.match(read.message.parts[1].text, /^think0 think1 /);
          assert.equal(read.message.parts[1].state, 'done');
          assert.equal(read.message.parts[2].state, 'done');
          const stored = await c.messages(chatId);
          assertAssistantStored(stored[1], read.message, { finished: true });
        });

        test('tool call with result over two steps, = stored', async () => {
          const who = user();
          const c = api(server.base, who);
          const chatId = await c.createChat();
          const { read } = await send(server.base, who, chatId, '[tool] weather in Paris?');
          assert.equal(read.rejected, undefined, `SDK rejected the stream: ${read.rejected}`);
          const t = types(read.chunks);
          for (const want of [
            'tool-input-start',
            'tool-input-delta',
            'tool-input-available',
            'tool-output-available',
          ]) {
            assert.ok(t.includes(want), `${want} in ${t.join(',')}`);
          }
          assert.equal(t.filter((x) => x === 'start-step').length, 2, 'two steps');
          const parts = read.message.parts;
          assert.deepEqual(
            parts.map((p) => p.type),
            ['step-start', 'tool-get_weather', 'step-start', 'text'],
          );
          const tool = parts[1];
          assert.equal(tool.state, 'output-available');
          assert.deepEqual(tool.input, { city: 'Paris' });
          assert.equal(tool.output.city, 'Paris');
          assert.equal(textOf(read.message), tokens(TOKENS));
          const stored = await c.messages(chatId);
          assertAssistantStored(stored[1], read.message, { finished: true });
        });

        test('error mid-stream: SDK reports errorText, partial answer = stored', async () => {
          const who = user();
          const c = api(server.base, who);
          const chatId = await c.createChat();
          const { read } = await send(server.base, who, chatId, '[error] please fail');
          assert.equal(read.rejected, undefined, `SDK rejected the stream: ${read.rejected}`);
          assert.equal(read.chunks.at(-1).type, 'error');
          assert.equal(read.errors.length, 1);
          assert.ok(read.errors[0].message.length > 0);
          assert.doesNotMatch(read.errors[0].message, /panicked|sqlx|src\//, 'no internals leak');
          assert.equal(textOf(read.message), tokens(TOKENS / 2));
          const stored = await c.messages(chatId);
          assert.equal(stored.length, 2);
          assertAssistantStored(stored[1], read.message, { finished: false });
          assert.equal(stored[1].metadata.finishReason, 'error');
        });

        test('stop (POST /stop) mid-stream: abort chunk, partial answer = stored', async () => {
          const who = user();
          const c = api(server.base, who);
          const chatId = await c.createChat();
          let stopped;
          const { read } = await send(server.base, who, chatId, 'a long answer', {
            onChunk: (chunk, all) => {
              if (chunk.type === 'text-delta' && all.filter((x) => x.type === 'text-delta').length === 5) {
                stopped = c.stop(chatId);
              }
            },
          });
          assert.equal(read.rejected, undefined, `SDK rejected the stream: ${read.rejected}`);
          assert.deepEqual(await stopped, { status: 200, body: { stopped: true } });
          assert.equal(read.chunks.at(-1).type, 'abort');
          const text = textOf(read.message);
          assert.ok(text.length > 0 && text.length < tokens(TOKENS).length, `partial: ${text}`);
          const stored = await c.messages(chatId);
          assertAssistantStored(stored[1], read.message, { finished: false });
        });

        test('resume: client gone mid-stream, reconnect replays and follows to the stored answer', async () => {
          const who = user();
          const c = api(server.base, who);
          const chatId = await c.createChat();
          const transport = makeTransport(ai, server.base, who);
          const gone = new AbortController();
          const first = await send(server.base, who, chatId, 'resume me', {
            signal: gone.signal,
            onChunk: (chunk, all) => {
              if (all.filter((x) => x.type === 'text-delta').length === 5) gone.abort();
            },
          });
          assert.ok(first.read.rejected, 'the first read ends with the abort');
          // While it runs, the listing leaves the assistant message out.
          const during = await c.messages(chatId);
          assert.deepEqual(
            during.map((m) => m.role),
            ['user'],
          );
          const stream = await transport.reconnectToStream({ chatId });
          assert.ok(stream, 'a generation is running: 200, not 204');
          const read = await readAll(ai, stream);
          assert.equal(read.rejected, undefined, `SDK rejected the stream: ${read.rejected}`);
          assert.equal(read.chunks[0].type, 'start');
          assert.equal(read.chunks.at(-1).type, 'finish');
          assert.equal(textOf(read.message), tokens(TOKENS));
          const stored = await c.messages(chatId);
          assert.equal(stored.length, 2);
          assertAssistantStored(stored[1], read.message, { finished: true });
          // Nothing runs any more: 204, which the SDK turns into null.
          assert.equal(await transport.reconnectToStream({ chatId }), null);
        });

        test('AbstractChat (useChat core): send, reasoning, tool, error, stop, resume, regenerate = stored', async () => {
          const who = user();
          const c = api(server.base, who);
          const chatId = await c.createChat();
          const errors = [];
          const transport = makeTransport(ai, server.base, who);
          const { chat, state } = makeChat(ai, { id: chatId, transport, onError: (e) => errors.push(e) });
          const stored = () => c.messages(chatId);
          const sameAsStored = async (finishedIdx = []) => {
            const s = await stored();
            assert.equal(chat.messages.length, s.length);
            s.forEach((m, i) => {
              if (m.role === 'user') assertUserStored(m, chat.messages[i]);
              else assertAssistantStored(m, chat.messages[i], { finished: finishedIdx.includes(i) });
            });
          };

          // Plain text; the chat renders it token by token.
          await chat.sendMessage({ text: 'hi' });
          assert.equal(chat.status, 'ready');
          assert.deepEqual(errors, []);
          const grow = state.renders.map((m) => textOf(m).length);
          assert.ok(new Set(grow).size >= 10, `rendered ${new Set(grow).size} distinct lengths`);
          await sameAsStored([1]);

          await chat.sendMessage({ text: '[reasoning] think' });
          await chat.sendMessage({ text: '[tool] weather?' });
          assert.equal(chat.status, 'ready');
          assert.deepEqual(errors, []);
          await sameAsStored([1, 3, 5]);

          await chat.sendMessage({ text: '[error] now' });
          assert.equal(chat.status, 'error');
          assert.equal(errors.length, 1);
          await sameAsStored([1, 3, 5]);

          // Stop from the server side (what the web example's Stop button does).
          chat.clearError();
          const sending = chat.sendMessage({ text: 'long one' });
          await waitFor('streaming', () => chat.status === 'streaming' && textOf(chat.lastMessage).length > 10);
          assert.deepEqual((await c.stop(chatId)).body, { stopped: true });
          await sending;
          assert.equal(chat.status, 'ready');
          assert.equal(errors.length, 1);
          await sameAsStored([1, 3, 5]);

          // Regenerate the stopped answer: replaced in place (same id, full text).
          const before = chat.lastMessage.id;
          await chat.regenerate();
          assert.equal(chat.status, 'ready');
          assert.equal(chat.lastMessage.id, before);
          assert.equal(textOf(chat.lastMessage), tokens(TOKENS));
          await sameAsStored([1, 3, 5, 9]);

          // "Reload" mid-stream: the page goes away; a new chat built from
          // GET /messages resumes with GET /stream and ends equal to the store.
          const sending2 = chat.sendMessage({ text: 'survive a reload' });
          await waitFor('streaming', () => textOf(chat.lastMessage).length > 10 && chat.status === 'streaming');
          await chat.stop(); // client-side abort only: the server keeps generating
          await sending2;
          const history = await stored();
          assert.equal(history.at(-1).role, 'user', 'running answer not listed');
          const reloaded = makeChat(ai, { id: chatId, messages: history, transport, onError: (e) => errors.push(e) });
          await reloaded.chat.resumeStream();
          assert.equal(reloaded.chat.status, 'ready');
          assert.equal(errors.length, 1);
          assert.equal(textOf(reloaded.chat.lastMessage), tokens(TOKENS));
          const s = await stored();
          assert.equal(reloaded.chat.messages.length, s.length);
          assertAssistantStored(s.at(-1), reloaded.chat.lastMessage, { finished: true });
        });

        test('bad input from the SDK-shaped body gets a 4xx JSON error, nothing stored', async () => {
          const who = user();
          const c = api(server.base, who);
          const chatId = await c.createChat();
          const msg = (extra = {}) => ({ id: randomUUID(), role: 'user', parts: [{ type: 'text', text: 'x' }], ...extra });
          const cases = [
            ['unknown trigger', { id: chatId, message: msg(), trigger: 'explode' }],
            ['message without parts', { id: chatId, message: { id: 'm1', role: 'user', parts: [] } }],
            ['message with parts missing', { id: chatId, message: { id: 'm2', role: 'user' } }],
            ['last of messages without parts', { id: chatId, messages: [{ id: 'm3', role: 'user', parts: [] }] }],
            ['message id too long', { id: chatId, message: msg({ id: 'x'.repeat(300) }) }],
            ['regenerate messageId too long', { id: chatId, message: msg(), trigger: 'regenerate-message', messageId: 'y'.repeat(300) }],
            ['chat id too long in body', { id: 'z'.repeat(300), message: msg() }],
          ];
          for (const [what, body] of cases) {
            const r = await c.call('POST', `/api/chat/${chatId}/messages`, body);
            assert.ok(r.status >= 400 && r.status < 500, `${what}: ${r.status}`);
            assert.equal(r.status, 400, `${what}: ${JSON.stringify(r.body)}`);
            assert.equal(typeof r.body.error, 'string', what);
          }
          const longPath = await c.call('POST', `/api/chat/${'a'.repeat(300)}/messages`, { message: msg() });
          assert.equal(longPath.status, 400, JSON.stringify(longPath.body));
          // The SDK surfaces the 4xx as an error of sendMessages.
          const transport = makeTransport(ai, server.base, who);
          await assert.rejects(
            transport.sendMessages({
              chatId,
              messages: [{ id: 'm4', role: 'user', parts: [] }],
              trigger: 'submit-message',
              messageId: undefined,
            }),
            /error/,
          );
          assert.deepEqual(await c.messages(chatId), []);
        });
      });
    }

    test('every SDK version under test was exercised', () => {
      assert.deepEqual(
        SDKS.map((s) => s.version.split('.')[0]),
        ['7', '6', '5'],
      );
    });
  });
}
