// MODEL=openai in workerd: the Worker's DO calls chat-llm-openai (async-openai
// over fetch) against a fake OpenAI-compatible server that streams slowly
// (the model's network is the only thing faked).
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, test } from "node:test";
import { createChat, deltas, history, readEvents, send, textOf } from "./harness.js";
import { start } from "./harness.js";

const WORDS = ["Hello", " from", " the", " fake", " model", "."];
const requests = [];

function chunk(delta, finish = null) {
  return JSON.stringify({
    id: "c",
    object: "chat.completion.chunk",
    created: 1,
    model: "fake",
    choices: [{ index: 0, delta, finish_reason: finish }],
  });
}

const fake = createServer((req, res) => {
  let body = "";
  req.on("data", (d) => (body += d));
  req.on("end", async () => {
    requests.push({ url: req.url, auth: req.headers.authorization, body: JSON.parse(body) });
    res.writeHead(200, { "content-type": "text/event-stream" });
    res.write(`data: ${chunk({ role: "assistant", content: "" })}\n\n`);
    for (const w of WORDS) {
      await new Promise((r) => setTimeout(r, 30));
      res.write(`data: ${chunk({ content: w })}\n\n`);
    }
    res.write(`data: ${chunk({}, "stop")}\n\n`);
    res.end("data: [DONE]\n\n");
  });
});

let w;
before(async () => {
  await new Promise((r) => fake.listen(0, "127.0.0.1", r));
  const base = `http://127.0.0.1:${fake.address().port}/v1`;
  w = await start({
    vars: { OPENAI_API_KEY: "sk-test-key", OPENAI_BASE_URL: base, OPENAI_MODEL: "fake-model" },
  });
});
after(async () => {
  await w?.close();
  fake.close();
});

test("with OPENAI_API_KEY the DO streams the OpenAI-compatible model's answer and stores it", async () => {
  const chatId = await createChat(w.url, "openai-user");
  const res = await send(w.url, "openai-user", chatId, "Say hello");
  assert.equal(res.status, 200);
  const { events, done } = await readEvents(res);
  assert.ok(done);
  assert.deepEqual(deltas(events), WORDS);
  assert.equal(events.at(-1).type, "finish");
  assert.equal(events.at(-1).finishReason, "stop");

  assert.equal(requests.length, 1);
  assert.equal(requests[0].url, "/v1/chat/completions");
  assert.equal(requests[0].auth, "Bearer sk-test-key");
  assert.equal(requests[0].body.model, "fake-model");
  assert.equal(requests[0].body.stream, true);
  const last = requests[0].body.messages.at(-1);
  assert.equal(last.role, "user");
  assert.match(JSON.stringify(last.content), /Say hello/);

  const msgs = await history(w.url, "openai-user", chatId);
  assert.equal(msgs.length, 2);
  assert.equal(textOf(msgs[1]), WORDS.join(""));
});
