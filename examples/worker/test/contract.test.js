// The HTTP contract (shared/api.md) against the built Worker in local workerd:
// real D1, real SQLite-backed Durable Objects, real HTTP (so streaming and
// disconnects are real too). Same cases as the Axum integration tests.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  call,
  createChat,
  deltas,
  eventually,
  expectedText,
  history,
  json,
  readEvents,
  send,
  sleep,
  start,
  textOf,
  userMessage,
} from "./harness.js";

const UUID_V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

let w;
before(async () => {
  w = await start();
});
after(async () => {
  await w?.close();
});

/** Runs a whole turn and returns its events. */
async function turn(user, chatId, text) {
  const res = await send(w.url, user, chatId, text);
  assert.equal(res.status, 200, await res.clone().text());
  return readEvents(res);
}

async function expectError(res, status, pattern) {
  assert.equal(res.status, status);
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  const body = await json(res);
  assert.equal(typeof body.error, "string");
  if (pattern) assert.match(body.error, pattern);
  return body;
}

describe("public routes", () => {
  test("healthz answers ok without auth", async () => {
    const res = await fetch(`${w.url}/healthz`);
    assert.equal(res.status, 200);
    assert.equal(await res.text(), "ok");
  });

  test("openapi.json is the contract's OpenAPI 3.1 document", async () => {
    const res = await fetch(`${w.url}/openapi.json`);
    assert.equal(res.status, 200);
    const doc = await json(res);
    assert.match(doc.openapi, /^3\.1/);
    for (const p of ["/api/chat", "/api/chat/{chatId}/messages", "/api/chat/{chatId}/stream"]) {
      assert.ok(doc.paths[p], p);
    }
  });

  test("unknown routes are a JSON 404", async () => {
    await expectError(await call(w.url, "alice", "/api/nope"), 404);
  });
});

describe("authentication", () => {
  test("every /api route is 401 without or with a bad x-user-id", async () => {
    const chatId = await createChat(w.url, "alice");
    const routes = [
      ["POST", "/api/chat"],
      ["GET", "/api/chat"],
      ["GET", `/api/chat/${chatId}/history`],
      ["GET", `/api/chat/${chatId}/messages`],
      ["POST", `/api/chat/${chatId}/messages`],
      ["GET", `/api/chat/${chatId}/stream`],
      ["POST", `/api/chat/${chatId}/stop`],
      ["DELETE", `/api/chat/${chatId}`],
    ];
    for (const user of [null, "", "bad user!", "x".repeat(129)]) {
      for (const [method, path] of routes) {
        const res = await call(w.url, user, path, {
          method,
          headers: { "content-type": "application/json" },
          body: method === "POST" ? "{}" : undefined,
        });
        const body = await expectError(res, 401);
        assert.deepEqual(body, { error: "Unauthorized" }, `${method} ${path} as ${user}`);
      }
    }
    // Nothing happened to the chat.
    assert.deepEqual(await history(w.url, "alice", chatId), []);
  });
});

describe("chats", () => {
  test("create returns a server-made UUID v4, the owner and a timestamp", async () => {
    const before = Date.now();
    const res = await call(w.url, "carol", "/api/chat", { method: "POST" });
    assert.equal(res.status, 200);
    const body = await json(res);
    assert.match(body.chatId, UUID_V4);
    assert.equal(body.userId, "carol");
    assert.ok(body.createdAt >= before - 1000 && body.createdAt <= Date.now() + 1000);
  });

  test("listing shows only the caller's chats, most recently updated first, paged", async () => {
    const user = `pager-${Date.now()}`;
    const ids = [];
    for (let i = 0; i < 3; i++) {
      ids.push(await createChat(w.url, user, { title: `chat ${i}` }));
      await sleep(5);
    }
    await createChat(w.url, `${user}-other`);
    // A message moves the oldest chat to the top.
    await turn(user, ids[0], "bump");
    let res = await call(w.url, user, "/api/chat?limit=2");
    assert.equal(res.status, 200);
    const page1 = await json(res);
    assert.deepEqual(
      page1.chats.map((c) => c.id),
      [ids[0], ids[2]],
    );
    assert.equal(page1.chats[0].title, "chat 0", "a title given at creation is kept");
    assert.ok(page1.chats[0].updatedAt > page1.chats[0].createdAt);
    assert.equal(typeof page1.nextCursor, "string");
    res = await call(w.url, user, `/api/chat?limit=2&cursor=${encodeURIComponent(page1.nextCursor)}`);
    const page2 = await json(res);
    assert.deepEqual(
      page2.chats.map((c) => c.id),
      [ids[1]],
    );
    assert.equal(page2.nextCursor, null);
  });

  test("bad listing queries are 400", async () => {
    for (const q of ["limit=0", "limit=201", "limit=abc", "cursor=garbage", "what=1"]) {
      await expectError(await call(w.url, "alice", `/api/chat?${q}`), 400);
    }
  });

  test("title: first 50 characters of the first user message, plus ... when longer", async () => {
    const long = "ä".repeat(30) + " " + "b".repeat(40);
    const chatId = await createChat(w.url, "titler");
    await turn("titler", chatId, long);
    await turn("titler", chatId, "a second message does not change it");
    const chats = (await json(await call(w.url, "titler", "/api/chat"))).chats;
    const chat = chats.find((c) => c.id === chatId);
    assert.equal(chat.title, [...long].slice(0, 50).join("").trim() + "...");
    const short = await createChat(w.url, "titler");
    await turn("titler", short, "  Short one  ");
    const chats2 = (await json(await call(w.url, "titler", "/api/chat"))).chats;
    assert.equal(chats2.find((c) => c.id === short).title, "Short one");
  });
});

describe("ownership", () => {
  test("another user's chat answers 404 on every chat route and is left untouched", async () => {
    const chatId = await createChat(w.url, "alice");
    await turn("alice", chatId, "alice's secret");
    const missing = crypto.randomUUID();
    for (const id of [chatId, missing]) {
      const routes = [
        ["GET", `/api/chat/${id}/history`],
        ["GET", `/api/chat/${id}/messages`],
        ["POST", `/api/chat/${id}/messages`],
        ["GET", `/api/chat/${id}/stream`],
        ["POST", `/api/chat/${id}/stop`],
        ["DELETE", `/api/chat/${id}`],
      ];
      for (const [method, path] of routes) {
        const res = await call(w.url, "mallory", path, {
          method,
          headers: { "content-type": "application/json" },
          body:
            method === "POST" && path.endsWith("/messages")
              ? JSON.stringify({ message: userMessage("hi") })
              : undefined,
        });
        const body = await expectError(res, 404);
        assert.deepEqual(body, { error: "Chat not found" }, `${method} ${path}`);
      }
    }
    const msgs = await history(w.url, "alice", chatId);
    assert.equal(msgs.length, 2);
    assert.equal(textOf(msgs[0]), "alice's secret");
    const list = (await json(await call(w.url, "mallory", "/api/chat"))).chats;
    assert.ok(!list.some((c) => c.id === chatId));
  });
});

describe("streaming", () => {
  test("a turn streams token by token as the AI SDK UI message stream, then is stored", async () => {
    const chatId = await createChat(w.url, "streamer");
    const res = await send(w.url, "streamer", chatId, "Hello!");
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("content-type"), "text/event-stream");
    assert.equal(res.headers.get("cache-control"), "no-cache");
    assert.equal(res.headers.get("x-vercel-ai-ui-message-stream"), "v1");
    assert.equal(res.headers.get("x-accel-buffering"), "no");
    const { events, done, reads } = await readEvents(res);
    assert.ok(done, "ends with [DONE]");
    // Delivered incrementally: many separate reads, not one buffered body.
    assert.ok(reads >= 20, `only ${reads} reads`);
    const types = events.map((e) => e.type);
    assert.deepEqual(types.slice(0, 3), ["start", "start-step", "text-start"]);
    assert.deepEqual(types.slice(-3), ["text-end", "finish-step", "finish"]);
    assert.equal(events.at(-1).finishReason, "stop");
    assert.equal(deltas(events).length, 64);
    assert.equal(deltas(events).join(""), expectedText(64));
    const messageId = events[0].messageId;

    const msgs = await history(w.url, "streamer", chatId);
    assert.deepEqual(
      msgs.map((m) => m.role),
      ["user", "assistant"],
    );
    assert.equal(msgs[1].id, messageId);
    assert.equal(textOf(msgs[1]), expectedText(64));
    assert.equal(msgs[1].metadata.finishReason, "stop");
    assert.equal(typeof msgs[0].metadata.createdAt, "number");

    // The seed's history shape: content is the JSON string of the parts.
    const seed = await json(await call(w.url, "streamer", `/api/chat/${chatId}/history`));
    assert.equal(seed.chatId, chatId);
    assert.deepEqual(
      seed.messages.map((m) => [m.id, m.role]),
      msgs.map((m) => [m.id, m.role]),
    );
    assert.deepEqual(JSON.parse(seed.messages[1].content), msgs[1].parts);
  });

  test("a second message continues the conversation without duplicating anything", async () => {
    const chatId = await createChat(w.url, "twice");
    await turn("twice", chatId, "one");
    await turn("twice", chatId, "two");
    const msgs = await history(w.url, "twice", chatId);
    assert.deepEqual(
      msgs.map((m) => m.role),
      ["user", "assistant", "user", "assistant"],
    );
    assert.equal(new Set(msgs.map((m) => m.id)).size, 4);
  });

  test("a retried request (same user message id) does not duplicate rows", async () => {
    const chatId = await createChat(w.url, "retrier");
    const message = userMessage("retry me");
    const body = JSON.stringify({ id: chatId, message });
    for (let i = 0; i < 2; i++) {
      const res = await call(w.url, "retrier", `/api/chat/${chatId}/messages`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body,
      });
      assert.equal(res.status, 200);
      await readEvents(res);
    }
    const rows = await w.db
      .prepare("SELECT id, role FROM messages WHERE chat_id = ?1 ORDER BY seq")
      .bind(chatId)
      .all();
    assert.equal(rows.results.length, 2);
    assert.equal(rows.results[0].id, message.id);
  });

  test("regenerate replaces the last answer in place, under the same id", async () => {
    const chatId = await createChat(w.url, "regen");
    const message = userMessage("answer twice");
    await turn("regen", chatId, "ignored");
    const first = await history(w.url, "regen", chatId);
    const assistant = first[1].id;
    const res = await call(w.url, "regen", `/api/chat/${chatId}/messages`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        id: chatId,
        messages: [message],
        trigger: "regenerate-message",
        messageId: assistant,
      }),
    });
    assert.equal(res.status, 200);
    const { events, done } = await readEvents(res);
    assert.ok(done);
    assert.equal(events[0].messageId, assistant);
    const after = await history(w.url, "regen", chatId);
    assert.equal(after.length, 2);
    assert.equal(after[1].id, assistant);
    assert.equal(textOf(after[0]), "ignored", "history comes from the store, not the client");
  });

  test("a message id of another chat is refused and overwrites nothing", async () => {
    const a = await createChat(w.url, "ids");
    const b = await createChat(w.url, "ids");
    const message = userMessage("mine");
    const post = (chatId, m) =>
      call(w.url, "ids", `/api/chat/${chatId}/messages`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ message: m }),
      });
    const ok = await post(a, message);
    assert.equal(ok.status, 200);
    await readEvents(ok);
    const clash = await post(b, { ...message, parts: [{ type: "text", text: "stolen" }] });
    assert.ok(clash.status >= 400, `status ${clash.status}`);
    await json(clash);
    assert.equal(textOf((await history(w.url, "ids", a))[0]), "mine");
    assert.deepEqual(await history(w.url, "ids", b), []);
    // The chat is not left busy.
    assert.ok((await turn("ids", b, "fresh")).done);
  });

  test("a second POST while a turn runs is 409 and changes nothing", async () => {
    const chatId = await createChat(w.url, "busy");
    const first = await send(w.url, "busy", chatId, "first");
    assert.equal(first.status, 200);
    const second = await send(w.url, "busy", chatId, "second");
    await expectError(second, 409);
    const { done } = await readEvents(first);
    assert.ok(done);
    const msgs = await history(w.url, "busy", chatId);
    assert.deepEqual(
      msgs.map(textOf).slice(0, 1),
      ["first"],
    );
    assert.equal(msgs.length, 2);
  });

  test("resume replays the running turn from its start and follows it live; 204 when idle", async () => {
    const chatId = await createChat(w.url, "resumer");
    const idle = await call(w.url, "resumer", `/api/chat/${chatId}/stream`);
    assert.equal(idle.status, 204);
    const res = await send(w.url, "resumer", chatId, "resume me");
    const head = await readEvents(res, (ev) => deltas(ev).length >= 5);
    const resumed = await call(w.url, "resumer", `/api/chat/${chatId}/stream`);
    assert.equal(resumed.status, 200);
    assert.equal(resumed.headers.get("x-vercel-ai-ui-message-stream"), "v1");
    const { events, done } = await readEvents(resumed);
    assert.ok(done);
    assert.equal(events[0].type, "start");
    assert.equal(events[0].messageId, head.events[0].messageId);
    assert.equal(deltas(events).join(""), expectedText(64));
    // While it ran, the history left the running answer out; now it is there once.
    const msgs = await history(w.url, "resumer", chatId);
    assert.equal(msgs.length, 2);
    assert.equal(textOf(msgs[1]), expectedText(64));
    const after = await call(w.url, "resumer", `/api/chat/${chatId}/stream`);
    assert.equal(after.status, 204);
  });

  test("history leaves the running answer out until it is final", async () => {
    const chatId = await createChat(w.url, "midway");
    const res = await send(w.url, "midway", chatId, "wait for it");
    await readEvents(res, (ev) => deltas(ev).length >= 3);
    const during = await history(w.url, "midway", chatId);
    assert.deepEqual(
      during.map((m) => m.role),
      ["user"],
    );
    await eventually(async () => (await history(w.url, "midway", chatId)).length === 2);
  });

  test("a client that disconnects does not stop the turn: the whole answer is stored", async () => {
    const chatId = await createChat(w.url, "leaver");
    const ctrl = new AbortController();
    const res = await send(w.url, "leaver", chatId, "I will leave", { signal: ctrl.signal });
    assert.equal(res.status, 200);
    const reader = res.body.getReader();
    await reader.read();
    await reader.read();
    ctrl.abort();
    const msgs = await eventually(async () => {
      const m = await history(w.url, "leaver", chatId);
      return m.length === 2 ? m : null;
    });
    assert.equal(textOf(msgs[1]), expectedText(64));
    assert.equal(msgs[1].metadata.finishReason, "stop");
  });

  test("stop ends the stream with abort and keeps what was generated", async () => {
    const chatId = await createChat(w.url, "stopper");
    const res = await send(w.url, "stopper", chatId, "stop me");
    const reading = readEvents(res);
    await eventually(async () => {
      // Wait until a few tokens went out, then stop.
      const r = await call(w.url, "stopper", `/api/chat/${chatId}/stream`);
      if (r.status !== 200) return false;
      const { events } = await readEvents(r, (ev) => deltas(ev).length >= 5);
      return deltas(events).length >= 5;
    });
    const stop = await call(w.url, "stopper", `/api/chat/${chatId}/stop`, { method: "POST" });
    assert.equal(stop.status, 200);
    assert.deepEqual(await json(stop), { stopped: true });
    const { events, done } = await reading;
    assert.ok(done);
    assert.deepEqual(events.at(-1), { type: "abort" });
    const n = deltas(events).length;
    assert.ok(n >= 5 && n < 64, `${n} tokens before the stop`);
    const msgs = await history(w.url, "stopper", chatId);
    assert.equal(msgs.length, 2);
    assert.equal(textOf(msgs[1]), expectedText(n));
    assert.equal(msgs[1].metadata.finishReason, "abort");
    const again = await call(w.url, "stopper", `/api/chat/${chatId}/stop`, { method: "POST" });
    assert.deepEqual(await json(again), { stopped: false });
    // The chat is free again.
    const next = await turn("stopper", chatId, "go on");
    assert.ok(next.done);
  });
});

describe("delete", () => {
  test("deleting a chat removes its messages (cascade) and it is gone for its owner", async () => {
    const chatId = await createChat(w.url, "deleter");
    await turn("deleter", chatId, "soon gone");
    const res = await call(w.url, "deleter", `/api/chat/${chatId}`, { method: "DELETE" });
    assert.equal(res.status, 200);
    assert.deepEqual(await json(res), { success: true, message: "Chat deleted successfully" });
    await expectError(await call(w.url, "deleter", `/api/chat/${chatId}/messages`), 404);
    await expectError(await call(w.url, "deleter", `/api/chat/${chatId}`, { method: "DELETE" }), 404);
    const list = (await json(await call(w.url, "deleter", "/api/chat"))).chats;
    assert.ok(!list.some((c) => c.id === chatId));
    const rows = await w.db
      .prepare("SELECT COUNT(*) AS n FROM messages WHERE chat_id = ?1")
      .bind(chatId)
      .first();
    assert.equal(rows.n, 0);
  });

  test("deleting a chat while it streams stops the turn first", async () => {
    const chatId = await createChat(w.url, "deleter2");
    const res = await send(w.url, "deleter2", chatId, "delete me mid-way");
    const reading = readEvents(res);
    await sleep(200);
    const del = await call(w.url, "deleter2", `/api/chat/${chatId}`, { method: "DELETE" });
    assert.equal(del.status, 200);
    const { done, events } = await reading;
    assert.ok(done);
    assert.equal(events.at(-1).type, "abort");
    const rows = await w.db
      .prepare("SELECT COUNT(*) AS n FROM messages WHERE chat_id = ?1")
      .bind(chatId)
      .first();
    assert.equal(rows.n, 0);
  });
});

describe("bad input", () => {
  async function unchanged(chatId) {
    assert.deepEqual(await history(w.url, "checker", chatId), []);
  }

  test("malformed JSON, wrong shapes, empty text, bad ids: 400 and nothing stored", async () => {
    const chatId = await createChat(w.url, "checker");
    const post = (body, type = "application/json") =>
      call(w.url, "checker", `/api/chat/${chatId}/messages`, {
        method: "POST",
        headers: { "content-type": type },
        body,
      });
    await expectError(await post("{not json"), 400, /Malformed JSON/);
    await expectError(await post("[]"), 400);
    await expectError(await post(JSON.stringify({})), 400);
    await expectError(await post(JSON.stringify({ message: userMessage("   ") })), 400, /empty/);
    await expectError(
      await post(JSON.stringify({ message: { id: "x", role: "user", parts: [] } })),
      400,
    );
    await expectError(
      await post(JSON.stringify({ message: { ...userMessage("hi"), role: "assistant" } })),
      400,
    );
    await expectError(
      await post(JSON.stringify({ id: crypto.randomUUID(), message: userMessage("hi") })),
      400,
    );
    await expectError(
      await post(JSON.stringify({ message: userMessage("hi"), trigger: "nonsense" })),
      400,
    );
    await unchanged(chatId);
    // A chat id that is not a UUID.
    for (const path of ["/api/chat/not-a-uuid/messages", "/api/chat/123/history"]) {
      await expectError(await call(w.url, "checker", path), 400);
    }
    await expectError(
      await call(w.url, "checker", "/api/chat", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: "{oops",
      }),
      400,
    );
  });

  test("a body that is not JSON is 415", async () => {
    const chatId = await createChat(w.url, "checker");
    const res = await call(w.url, "checker", `/api/chat/${chatId}/messages`, {
      method: "POST",
      headers: { "content-type": "text/plain" },
      body: JSON.stringify({ message: userMessage("hi") }),
    });
    await expectError(res, 415);
    await unchanged(chatId);
  });

  test("a body over 1 MiB is 413", async () => {
    const chatId = await createChat(w.url, "checker");
    const res = await send(w.url, "checker", chatId, "x".repeat(1024 * 1024 + 10));
    await expectError(res, 413);
    await unchanged(chatId);
  });

  test("a message text over the limit (but a body under 1 MiB) is rejected", async () => {
    const chatId = await createChat(w.url, "checker");
    // The default limit of one message's text is 32 KiB.
    const res = await send(w.url, "checker", chatId, "y".repeat(40 * 1024));
    await expectError(res, 413, /message text/);
    await unchanged(chatId);
  });
});
