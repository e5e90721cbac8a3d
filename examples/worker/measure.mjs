// Prints the Worker's size and cold-start numbers in local workerd (informational;
// ci.sh runs it, nothing is asserted). `node measure.mjs [runs]`
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { createChat, history, root, start } from "./test/harness.js";

const runs = Number(process.argv[2] ?? 5);
const wasm = readFileSync(join(root, "build/index_bg.wasm"));
const js = readFileSync(join(root, "build/index.js"));
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const rows = { ready: [], firstRequest: [], warmRequest: [], firstChatRoom: [] };
for (let i = 0; i < runs; i++) {
  const w = await start();
  rows.ready.push(w.readyMs);
  let t = performance.now();
  await (await fetch(`${w.url}/healthz`)).text();
  rows.firstRequest.push(performance.now() - t);
  t = performance.now();
  await (await fetch(`${w.url}/healthz`)).text();
  rows.warmRequest.push(performance.now() - t);
  const chat = await createChat(w.url, "measure");
  t = performance.now();
  await history(w.url, "measure", chat);
  rows.firstChatRoom.push(performance.now() - t);
  await w.close();
}
const ms = (x) => Math.round(x * 10) / 10;
console.log(
  JSON.stringify(
    {
      wasmBytes: wasm.length,
      wasmGzipBytes: gzipSync(wasm, { level: 9 }).length,
      jsGzipBytes: gzipSync(js, { level: 9 }).length,
      runs,
      medianMs: Object.fromEntries(Object.entries(rows).map(([k, v]) => [k, ms(median(v))])),
    },
    null,
    2,
  ),
);
