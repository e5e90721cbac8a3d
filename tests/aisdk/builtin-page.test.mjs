// The example server's own page at `/` (the README's main job: plain HTML + JS
// in the binary, no build step), used in real Chromium like a person would:
// create a chat, watch the answer stream in, title in the sidebar, reload
// shows history, a second chat and switching back, Stop keeps the partial
// answer, delete, and another user sees nothing. Screenshots go to
// tests/aisdk/artifacts/builtin-<backend>/.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

import { backends, freshDb, startServer, api } from './lib/server.mjs';
import { browserProfile } from './lib/browser.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const TOKENS = 60;
const full = Array.from({ length: TOKENS }, (_, i) => `tok${i} `).join('');

const assistantText = (page) =>
  page.evaluate(() => {
    const all = document.querySelectorAll('#messages .msg.assistant');
    return all.length ? all[all.length - 1].textContent : '';
  });

async function send(page, text) {
  await page.fill('#input', text);
  await page.click('#send');
}

for (const kind of backends()) {
  describe(`built-in page on ${kind}`, () => {
    let db;
    let server;
    let browser;
    const shots = join(here, 'artifacts', `builtin-${kind}`);

    before(async () => {
      mkdirSync(shots, { recursive: true });
      db = freshDb(kind);
      server = await startServer(db, { TOKENS: String(TOKENS), TOKEN_DELAY_MS: '40' });
      browser = await browserProfile();
    });
    after(async () => {
      await browser?.close();
      await server?.stop();
      db?.drop();
    });

    test('a person chats, reloads, switches, stops, deletes; another user sees nothing', async () => {
      const page = await browser.context.newPage();
      await page.goto(server.base + '/');
      await page.fill('#user', 'page-alice');
      await page.dispatchEvent('#user', 'change');

      // New chat, send, and the answer grows token by token in the DOM.
      await page.click('#new');
      await page.waitForSelector('#chats li.active');
      await send(page, 'What is streaming, in a few words?');
      const samples = [];
      for (let i = 0; i < 40 && samples.length < 6; i++) {
        await page.waitForTimeout(150);
        const t = await assistantText(page);
        if (t && (samples.length === 0 || t !== samples.at(-1))) samples.push(t);
      }
      assert.ok(samples.length >= 4, `answer did not grow visibly: ${JSON.stringify(samples)}`);
      for (let i = 1; i < samples.length; i++) {
        assert.ok(samples[i].length > samples[i - 1].length, 'the answer only grows');
      }
      await page.waitForFunction((want) => {
        const all = document.querySelectorAll('#messages .msg.assistant');
        return all.length && all[all.length - 1].textContent.includes(want);
      }, `tok${TOKENS - 1}`, { timeout: 20_000 });
      await page.screenshot({ path: join(shots, '1-answered.png') });

      // The title appears in the sidebar.
      await page.waitForFunction(
        () => document.querySelector('#chats li.active span')?.textContent === 'What is streaming, in a few words?',
        null,
        { timeout: 5_000 },
      );
      const firstChat = await page.getAttribute('#chats li.active', 'data-id');

      // Reload shows the history.
      await page.reload();
      await page.waitForFunction(
        (want) => [...document.querySelectorAll('#messages .msg.assistant')].some((m) => m.textContent.includes(want)),
        full.trim(),
        { timeout: 10_000 },
      );

      // A second chat, then back to the first.
      await page.click('#new');
      await page.waitForFunction((first) => {
        const a = document.querySelector('#chats li.active');
        return a && a.dataset.id !== first;
      }, firstChat);
      const secondChat = await page.getAttribute('#chats li.active', 'data-id');
      // Stop mid-stream keeps the partial answer.
      await send(page, 'Tell me a long story');
      await page.waitForFunction(() => {
        const all = document.querySelectorAll('#messages .msg.assistant');
        return all.length && all[all.length - 1].textContent.includes('tok5 ');
      }, null, { timeout: 10_000 });
      await page.click('#stop');
      await page.waitForFunction(() => document.querySelector('#stop').disabled, null, { timeout: 10_000 });
      const stopped = await assistantText(page);
      assert.ok(!stopped.includes(`tok${TOKENS - 1}`), 'stopped before the end');
      await page.screenshot({ path: join(shots, '2-stopped.png') });
      await page.click(`#chats li[data-id="${firstChat}"]`);
      await page.waitForFunction(
        (want) => [...document.querySelectorAll('#messages .msg.assistant')].some((m) => m.textContent.includes(want)),
        full.trim(),
        { timeout: 10_000 },
      );
      await page.reload();
      await page.click(`#chats li[data-id="${secondChat}"]`);
      await page.waitForFunction(() => document.querySelectorAll('#messages .msg.assistant').length === 1, null, {
        timeout: 10_000,
      });
      const stored = await api(server.base, 'page-alice').call('GET', `/api/chat/${secondChat}/messages`);
      const storedText = stored.body.messages[1].parts.filter((p) => p.type === 'text').map((p) => p.text).join('');
      assert.ok(storedText.startsWith('tok0 tok1 tok2 tok3 tok4 tok5 '), storedText);
      assert.ok(!storedText.includes(`tok${TOKENS - 1}`), 'the partial answer is kept, not completed');
      assert.ok((await assistantText(page)).includes(storedText.trim()), 'the page shows the stored partial answer');

      // Delete removes it.
      await page.click(`#chats li[data-id="${secondChat}"] button`);
      await page.waitForFunction((id) => !document.querySelector(`#chats li[data-id="${id}"]`), secondChat, {
        timeout: 5_000,
      });
      const gone = await api(server.base, 'page-alice').call('GET', `/api/chat/${secondChat}/messages`);
      assert.equal(gone.status, 404);
      await page.screenshot({ path: join(shots, '3-deleted.png') });

      // Another user sees none of the first user's chats.
      await page.fill('#user', 'page-bob');
      await page.dispatchEvent('#user', 'change');
      await page.waitForTimeout(500);
      assert.equal(await page.locator('#chats li').count(), 0);
      await page.screenshot({ path: join(shots, '4-other-user.png') });
      await page.close();
    });
  });
}
