// AUTH=jwt: HS256 bearer tokens, user = `sub`, `exp` required.
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { after, before, test } from "node:test";
import { json, start } from "./harness.js";

const SECRET = "a-test-secret-of-reasonable-length";
const b64 = (v) => Buffer.from(typeof v === "string" ? v : JSON.stringify(v)).toString("base64url");

function token(claims, secret = SECRET) {
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64(claims);
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

const now = () => Math.floor(Date.now() / 1000);

let w;
before(async () => {
  w = await start({ vars: { AUTH: "jwt", CHAT_JWT_SECRET: SECRET } });
});
after(async () => {
  await w?.close();
});

const api = (path, auth, init = {}) =>
  fetch(w.url + path, { ...init, headers: { ...(init.headers ?? {}), ...(auth ? { authorization: auth } : {}) } });

test("a valid token acts as its sub; bad, expired or missing tokens are 401", async () => {
  const alice = `Bearer ${token({ sub: "alice", exp: now() + 600 })}`;
  const res = await api("/api/chat", alice, { method: "POST" });
  assert.equal(res.status, 200);
  const { chatId, userId } = await json(res);
  assert.equal(userId, "alice");

  const bob = `Bearer ${token({ sub: "bob", exp: now() + 600 })}`;
  assert.equal((await api(`/api/chat/${chatId}/messages`, bob)).status, 404);
  assert.equal((await api(`/api/chat/${chatId}/messages`, alice)).status, 200);

  for (const bad of [
    undefined,
    `Bearer ${token({ sub: "alice", exp: now() - 600 })}`,
    `Bearer ${token({ sub: "alice", exp: now() + 600 }, "another-secret")}`,
    `Bearer ${token({ sub: "alice" })}`,
    `Basic ${Buffer.from("alice:pw").toString("base64")}`,
    "Bearer not.a.jwt",
  ]) {
    const r = await api("/api/chat", bad);
    assert.equal(r.status, 401, String(bad));
    assert.deepEqual(await json(r), { error: "Unauthorized" });
  }
  // The dev header means nothing under AUTH=jwt.
  const r = await fetch(`${w.url}/api/chat`, { headers: { "x-user-id": "alice" } });
  assert.equal(r.status, 401);
});
