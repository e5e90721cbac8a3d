// Starts the built Worker (build/) in local workerd through Miniflare, with a
// local D1 database (schema from chat-store-d1/migrations) and the SQLite-backed
// Durable Object class, and offers small HTTP helpers for the tests.
import { readFileSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Miniflare } from "miniflare";

const here = dirname(fileURLToPath(import.meta.url));
export const root = join(here, "..");
const migrations = join(root, "../../chat-store-d1/migrations");

/** The compatibility date from wrangler.toml (one source of truth). */
const compatibilityDate = /compatibility_date\s*=\s*"([^"]+)"/.exec(
  readFileSync(join(root, "wrangler.toml"), "utf8"),
)[1];

/** Statements of a migration file (full-line `--` comments dropped). */
function statements(sql) {
  return sql
    .split("\n")
    .filter((l) => !l.trim().startsWith("--"))
    .join("\n")
    .split(";")
    .map((s) => s.trim())
    .filter(Boolean);
}

/**
 * A running Worker. `vars` override wrangler.toml's [vars]; `persist` is a
 * directory for D1 + DO state (kept across restarts), else in memory.
 */
export async function start({ vars = {}, persist } = {}) {
  const t0 = performance.now();
  const mf = new Miniflare({
    modules: true,
    scriptPath: join(root, "build/index.js"),
    modulesRules: [{ type: "CompiledWasm", include: ["**/*.wasm"], fallthrough: true }],
    compatibilityDate,
    port: 0,
    d1Databases: { DB: "00000000-0000-4000-8000-000000000000" },
    durableObjects: { CHAT_ROOM: { className: "ChatDo", useSQLite: true } },
    bindings: { AUTH: "dev-header", TOKENS: "64", TOKEN_DELAY_MS: "20", ...vars },
    d1Persist: persist ? join(persist, "d1") : false,
    durableObjectsPersist: persist ? join(persist, "do") : false,
  });
  const url = (await mf.ready).toString().replace(/\/$/, "");
  const readyMs = performance.now() - t0;
  const db = await mf.getD1Database("DB");
  if (!persist || !(await tableExists(db))) {
    for (const file of readdirSync(migrations).sort()) {
      const sql = readFileSync(join(migrations, file), "utf8");
      await db.batch(statements(sql).map((s) => db.prepare(s)));
    }
  }
  return { mf, url, db, readyMs, close: () => mf.dispose() };
}

async function tableExists(db) {
  const row = await db
    .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'chats'")
    .first();
  return row !== null;
}

/** fetch with the dev-header user (`null` = no credentials). */
export function call(url, user, path, init = {}) {
  const headers = { ...(init.headers ?? {}) };
  if (user !== null) headers["x-user-id"] = user;
  return fetch(url + path, { ...init, headers });
}

export async function json(res) {
  const text = await res.text();
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`not JSON (${res.status}): ${text}`);
  }
}

export async function createChat(url, user, body) {
  const res = await call(url, user, "/api/chat", {
    method: "POST",
    headers: body ? { "content-type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  if (res.status !== 200) throw new Error(`create chat: ${res.status} ${await res.text()}`);
  return (await json(res)).chatId;
}

let seq = 0;
/** A user message as `useChat` sends it. */
export function userMessage(text) {
  seq += 1;
  return { id: `u-${Date.now()}-${seq}`, role: "user", parts: [{ type: "text", text }] };
}

export function send(url, user, chatId, text, init = {}) {
  return call(url, user, `/api/chat/${chatId}/messages`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ id: chatId, message: userMessage(text), trigger: "submit-message" }),
    ...init,
  });
}

/**
 * Reads an SSE response. Stops early (cancelling the body) once `until(events)`
 * holds. Returns the parsed events, whether `[DONE]` came, and how many
 * separate reads delivered data.
 */
export async function readEvents(res, until = () => false) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  const events = [];
  let buf = "";
  let reads = 0;
  let done = false;
  for (;;) {
    const { value, done: end } = await reader.read();
    if (end) break;
    reads += 1;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") done = true;
        else events.push(JSON.parse(data));
      }
    }
    if (until(events)) {
      await reader.cancel();
      break;
    }
  }
  return { events, done, reads };
}

export const deltas = (events) => events.filter((e) => e.type === "text-delta").map((e) => e.delta);

export const expectedText = (n) => Array.from({ length: n }, (_, i) => `tok${i} `).join("");

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `f` until it returns a truthy value (or throws after `ms`). */
export async function eventually(f, ms = 10000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error("condition not reached in time");
    await sleep(50);
  }
}

export async function history(url, user, chatId) {
  const res = await call(url, user, `/api/chat/${chatId}/messages`);
  if (res.status !== 200) throw new Error(`messages: ${res.status} ${await res.text()}`);
  return (await json(res)).messages;
}

export const textOf = (m) =>
  m.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
