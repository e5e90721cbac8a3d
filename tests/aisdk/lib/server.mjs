// Starts the real example server (`chat-server-example`) on SQLite or a fresh
// Postgres database, and talks to its JSON routes. Shared by the protocol
// conformance test and the browser test.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { randomUUID } from 'node:crypto';

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, '..', '..', '..');

/** The server binary: $CHAT_SERVER_BIN, else the workspace's debug build. */
export function serverBin() {
  const bin =
    process.env.CHAT_SERVER_BIN ??
    join(process.env.CARGO_TARGET_DIR ?? join(repoRoot, 'target'), 'debug', 'chat-server-example');
  if (!existsSync(bin)) {
    throw new Error(`${bin} missing: run \`cargo build -p chat-server-example\` (or set CHAT_SERVER_BIN)`);
  }
  return bin;
}

const PG_BASE = process.env.TEST_POSTGRES_URL ?? 'postgres://postgres@127.0.0.1:5432/test';

/** Which backends to run on: $AISDK_DBS (comma-separated), default both. */
export function backends() {
  return (process.env.AISDK_DBS ?? 'sqlite,postgres')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
}

/**
 * A fresh database: a SQLite file in a temp dir, or a new Postgres database
 * (created with psql, dropped by `drop()`). Postgres unreachable fails.
 */
export function freshDb(kind) {
  if (kind === 'sqlite') {
    const dir = mkdtempSync(join(tmpdir(), 'aisdk-sqlite-'));
    return {
      kind,
      url: `sqlite://${join(dir, 'chat.db')}`,
      drop() {
        rmSync(dir, { recursive: true, force: true });
      },
    };
  }
  if (kind === 'postgres') {
    const name = `aisdk_${randomUUID().replaceAll('-', '')}`;
    // Fails loudly (and so fails the test) when Postgres is unreachable.
    execFileSync('psql', [PG_BASE, '-v', 'ON_ERROR_STOP=1', '-qc', `CREATE DATABASE ${name}`], {
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    const prefix = PG_BASE.slice(0, PG_BASE.lastIndexOf('/'));
    return {
      kind,
      url: `${prefix}/${name}`,
      drop() {
        execFileSync('psql', [PG_BASE, '-qc', `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`], {
          stdio: ['ignore', 'ignore', 'inherit'],
        });
      },
    };
  }
  throw new Error(`unknown backend ${kind}`);
}

/**
 * Starts the server on `db` with extra environment `env` (PORT=0: a free
 * port). Resolves once it prints `listening on <url>`.
 */
export async function startServer(db, env = {}) {
  // A single instance: no multi-instance coordination picked up from the caller's environment.
  const { REDIS_URL, COORDINATION, WEB_DIR, ...inherited } = process.env;
  const child = spawn(serverBin(), [], {
    env: {
      ...inherited,
      PORT: '0',
      BIND: '127.0.0.1',
      DATABASE_URL: db.url,
      AUTH: 'dev-header',
      MODEL: 'demo',
      TOKENS: '40',
      TOKEN_DELAY_MS: '15',
      CHECKPOINT_MS: '100',
      RUST_LOG: process.env.RUST_LOG ?? 'warn',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: child.stdout });
  const base = await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error('server did not start in 30 s')), 30_000);
    child.once('exit', (code) => fail(new Error(`server exited with ${code} before listening`)));
    lines.on('line', (line) => {
      const m = /^listening on (\S+)/.exec(line);
      if (m) {
        clearTimeout(timer);
        ok(m[1]);
      }
    });
  });
  return {
    base,
    child,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((ok) => child.once('exit', ok));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** A JSON client of the contract's non-streaming routes for one user. */
export function api(base, user) {
  const headers = { 'x-user-id': user };
  async function call(method, path, body) {
    const res = await fetch(base + path, {
      method,
      headers: body === undefined ? headers : { ...headers, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let json;
    try {
      json = JSON.parse(text);
    } catch {
      json = text;
    }
    return { status: res.status, body: json };
  }
  return {
    headers,
    call,
    async createChat() {
      const r = await call('POST', '/api/chat', {});
      if (r.status !== 200) throw new Error(`create chat: ${r.status} ${JSON.stringify(r.body)}`);
      return r.body.chatId;
    },
    async messages(chatId) {
      const r = await call('GET', `/api/chat/${chatId}/messages`);
      if (r.status !== 200) throw new Error(`messages: ${r.status} ${JSON.stringify(r.body)}`);
      return r.body.messages;
    },
    async chats() {
      const r = await call('GET', '/api/chat');
      if (r.status !== 200) throw new Error(`list: ${r.status} ${JSON.stringify(r.body)}`);
      return r.body.chats;
    },
    async stop(chatId) {
      return call('POST', `/api/chat/${chatId}/stop`);
    },
  };
}

/** Polls `check` until it returns a truthy value (or throws after `ms`). */
export async function waitFor(what, check, ms = 10_000) {
  const until = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
