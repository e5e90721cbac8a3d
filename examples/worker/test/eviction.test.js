// The Durable Object dies mid-turn (the whole workerd process is killed): the
// next request for the chat wakes a fresh instance, which stores the last
// checkpoint in D1 exactly once, as a finished message with finish reason
// "error" — nothing acknowledged is lost and nothing is stored twice.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import {
  call,
  createChat,
  deltas,
  eventually,
  expectedText,
  history,
  readEvents,
  send,
  sleep,
  start,
  textOf,
} from "./harness.js";

const vars = { TOKENS: "200", TOKEN_DELAY_MS: "50" };

async function rows(w, chatId) {
  const r = await w.db
    .prepare("SELECT id, role, status FROM messages WHERE chat_id = ?1 ORDER BY seq")
    .bind(chatId)
    .all();
  return r.results;
}

test("a turn cut off by eviction is recovered from the DO's checkpoint, once", async () => {
  const dir = mkdtempSync(join(tmpdir(), "chat-worker-evict-"));
  let w = await start({ persist: dir, vars });
  try {
    const chatId = await createChat(w.url, "evicted");
    const res = await send(w.url, "evicted", chatId, "a long answer, please");
    assert.equal(res.status, 200);
    // 20 tokens at 50 ms: past the 500 ms checkpoint interval.
    const head = await readEvents(res, (ev) => deltas(ev).length >= 20);
    const messageId = head.events[0].messageId;
    await sleep(100);
    await w.close();

    w = await start({ persist: dir, vars });
    // Only the user message reached D1 so far; the partial answer is in the DO's storage.
    assert.deepEqual(
      (await rows(w, chatId)).map((r) => r.role),
      ["user"],
    );
    const msgs = await history(w.url, "evicted", chatId);
    assert.equal(msgs.length, 2);
    assert.equal(msgs[1].id, messageId);
    assert.equal(msgs[1].metadata.finishReason, "error");
    const text = textOf(msgs[1]);
    assert.ok(text.length > 0, "the checkpoint kept some of the answer");
    assert.ok(expectedText(200).startsWith(text), text);
    assert.ok(text.length < expectedText(200).length);

    // Asking again (a new wake-up, a resume) stores nothing twice.
    assert.deepEqual(await history(w.url, "evicted", chatId), msgs);
    assert.equal((await call(w.url, "evicted", `/api/chat/${chatId}/stream`)).status, 204);
    const stored = await rows(w, chatId);
    assert.equal(stored.length, 2);
    assert.ok(stored.every((r) => r.status === "complete"));

    // The chat is usable again.
    const next = await send(w.url, "evicted", chatId, "again");
    assert.equal(next.status, 200);
    assert.ok((await readEvents(next)).done);
    assert.equal((await rows(w, chatId)).length, 4);
  } finally {
    await w.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("with no request at all, the safety alarm stores the checkpoint after an eviction", async () => {
  const dir = mkdtempSync(join(tmpdir(), "chat-worker-alarm-"));
  const alarmVars = { ...vars, RECOVERY_ALARM_MS: "1000" };
  let w = await start({ persist: dir, vars: alarmVars });
  try {
    const chatId = await createChat(w.url, "alarmed");
    const res = await send(w.url, "alarmed", chatId, "a long answer, please");
    const head = await readEvents(res, (ev) => deltas(ev).length >= 20);
    const messageId = head.events[0].messageId;
    await sleep(100);
    await w.close();

    w = await start({ persist: dir, vars: alarmVars });
    // Nobody asks for the chat: only the alarm can wake its DO.
    const recovered = await eventually(async () => {
      const r = await rows(w, chatId);
      return r.length === 2 ? r : null;
    }, 15000);
    assert.equal(recovered[1].id, messageId);
    assert.equal(recovered[1].status, "complete");
    const meta = await w.db
      .prepare("SELECT finish_reason FROM messages WHERE id = ?1")
      .bind(messageId)
      .first();
    assert.equal(meta.finish_reason, "error");
    const msgs = await history(w.url, "alarmed", chatId);
    assert.equal(msgs.length, 2);
    assert.ok(expectedText(200).startsWith(textOf(msgs[1])));
  } finally {
    await w.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
