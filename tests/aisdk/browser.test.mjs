// End-to-end in a real browser: Debian's Chromium (headless) driven by
// playwright-core opens examples/web (React + useChat, built with Vite) served
// by the real example server, and uses it like a person would. Screenshots
// go to tests/aisdk/artifacts/<backend>/.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, existsSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomUUID } from 'node:crypto';

import { backends, freshDb, startServer, api, repoRoot } from './lib/server.mjs';
import { CHROMIUM, browserProfile } from './lib/browser.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const WEB_DIST = process.env.WEB_DIST ?? join(repoRoot, 'examples', 'web', 'dist');
const TOKENS = 60;
const full = Array.from({ length: TOKENS }, (_, i) => `tok${i} `).join('');

const lastAssistant = (page) => page.getByTestId('message-assistant').last();
const status = (page) => page.getByTestId('chat').getAttribute('data-status');

async function waitReady(page, ms = 20_000) {
  await page.waitForFunction(
    () => document.querySelector('[data-testid=chat]')?.dataset.status === 'ready',
    null,
    { timeout: ms },
  );
}

/** Types and sends a message; returns once the page shows it (status left `ready`). */
async function send(page, text) {
  const before = await page.getByTestId('message-user').count();
  await page.getByTestId('composer-input').fill(text);
  await page.getByTestId('send').click();
  await page.waitForFunction(
    (n) =>
      document.querySelectorAll('[data-testid=message-user]').length > n &&
      document.querySelector('[data-testid=chat]')?.dataset.status !== 'ready',
    before,
    { timeout: 10_000 },
  );
}

/** Waits until the `index`-th answer of the open chat (from 0) contains `text`. */
async function answerContains(page, index, text) {
  await page.waitForFunction(
    ([i, t]) => document.querySelectorAll('[data-testid=message-assistant]')[i]?.textContent.includes(t),
    [index, text],
    { timeout: 10_000 },
  );
}

/** Samples the last answer's text while it streams: several growing lengths. */
async function sampleGrowth(page, times = 6, everyMs = 150) {
  await page.waitForFunction(
    () => (document.querySelectorAll('[data-testid=message-assistant]') ?? []).length > 0 &&
      [...document.querySelectorAll('[data-testid=message-assistant]')].at(-1).textContent.length > 0,
    null,
    { timeout: 10_000 },
  );
  const seen = [];
  for (let i = 0; i < times; i++) {
    seen.push(await lastAssistant(page).textContent());
    await page.waitForTimeout(everyMs);
  }
  return seen;
}

for (const backend of backends()) {
  describe(`web example in Chromium, server on ${backend}`, () => {
    let db;
    let server;
    const shots = join(here, 'artifacts', backend);
    before(async () => {
      assert.ok(existsSync(join(WEB_DIST, 'index.html')), `${WEB_DIST} not built: cd examples/web && npm run build`);
      assert.ok(existsSync(CHROMIUM), `${CHROMIUM} missing: apt-get install chromium`);
      mkdirSync(shots, { recursive: true });
      db = freshDb(backend);
      server = await startServer(db, {
        WEB_DIR: WEB_DIST,
        TOKENS: String(TOKENS),
        TOKEN_DELAY_MS: '40',
      });
    });
    after(async () => {
      await server?.stop();
      db?.drop();
    });

    test('a person chats: stream, titles, reload, switch, stop, resume, delete, isolation', async () => {
      const alice = `alice-${randomUUID().slice(0, 8)}`;
      const aliceApi = api(server.base, alice);
      const a = await browserProfile();
      const page = a.context.pages()[0] ?? (await a.context.newPage());
      const consoleErrors = [];
      page.on('pageerror', (e) => consoleErrors.push(String(e)));
      const shot = (name) => page.screenshot({ path: join(shots, `${name}.png`) });
      try {
        await page.goto(`${server.base}/?user=${alice}`);
        await page.getByTestId('user').filter({ hasText: alice }).waitFor();
        assert.equal(await page.getByTestId('chat-item').count(), 0);

        // New chat, send, the answer grows token by token in the DOM.
        await page.getByTestId('new-chat').click();
        await page.getByTestId('composer-input').waitFor();
        const firstId = await page.evaluate(() => window.location.hash.slice(1));
        assert.match(firstId, /^[0-9a-f-]{36}$/);
        await send(page, 'Hello from the browser');
        const seen = await sampleGrowth(page);
        await shot('01-streaming');
        const lengths = seen.map((s) => s.length);
        assert.ok(lengths[0] < full.length, `first sample already complete: ${lengths}`);
        for (let i = 1; i < lengths.length; i++) {
          assert.ok(lengths[i] >= lengths[i - 1], `text never shrinks: ${lengths}`);
          assert.ok(full.startsWith(seen[i]), `a prefix of the answer: ${seen[i]}`);
        }
        assert.ok(new Set(lengths).size >= 4, `grew in several steps: ${lengths}`);
        await waitReady(page);
        assert.equal(await lastAssistant(page).textContent(), full);

        // The title shows in the sidebar.
        await page.getByTestId('chat-item').filter({ hasText: 'Hello from the browser' }).waitFor();
        await shot('02-answered');

        // Reload: history from GET /api/chat/:id/messages.
        await page.reload();
        await page.getByTestId('message-assistant').first().waitFor();
        assert.deepEqual(await page.getByTestId('message-user').allTextContents(), ['Hello from the browser']);
        assert.deepEqual(await page.getByTestId('message-assistant').allTextContents(), [full]);

        // A second chat (with a tool call), then back to the first.
        await page.getByTestId('new-chat').click();
        await page.waitForFunction((id) => window.location.hash.slice(1) !== id, firstId);
        const secondId = await page.evaluate(() => window.location.hash.slice(1));
        await page.getByTestId('composer-input').waitFor();
        assert.equal(await page.getByTestId('message-user').count(), 0);
        await send(page, '[tool] Weather in Paris?');
        await waitReady(page);
        await page.locator('[data-testid=part-tool][data-state=output-available]').waitFor();
        assert.match(await page.getByTestId('part-tool').textContent(), /get_weather.*Paris/);
        await page.getByTestId('chat-item').filter({ hasText: '[tool] Weather in Paris?' }).waitFor();
        assert.equal(await page.getByTestId('chat-item').count(), 2);
        await shot('03-second-chat-tool');
        await page.getByTestId('chat-item').filter({ hasText: 'Hello from the browser' }).getByRole('button').first().click();
        await page.getByTestId('message-user').filter({ hasText: 'Hello from the browser' }).waitFor();
        assert.deepEqual(await page.getByTestId('message-assistant').allTextContents(), [full]);
        assert.equal(await page.evaluate(() => window.location.hash.slice(1)), firstId);

        // Stop mid-stream: the partial answer stays, also after a reload.
        await send(page, 'Please stop me');
        await answerContains(page, 1, 'tok8 ');
        await page.getByTestId('stop').click();
        await waitReady(page);
        const partial = await lastAssistant(page).textContent();
        assert.ok(partial.length > 0 && partial.length < full.length, `partial: ${partial.length}`);
        await page.waitForTimeout(300);
        assert.equal(await lastAssistant(page).textContent(), partial, 'nothing arrives after Stop');
        await shot('04-stopped');
        await page.reload();
        await page.getByTestId('message-user').filter({ hasText: 'Please stop me' }).waitFor();
        await page.getByTestId('message-assistant').nth(1).waitFor();
        assert.equal(await lastAssistant(page).textContent(), partial);
        const storedFirst = await aliceApi.messages(firstId);
        assert.equal(storedFirst.length, 4);
        assert.equal(storedFirst[3].parts.filter((p) => p.type === 'text').map((p) => p.text).join(''), partial);

        // Reload mid-stream: the page resumes from GET /stream and finishes the answer once.
        await send(page, 'Reload while streaming');
        await answerContains(page, 2, 'tok5 ');
        await page.reload();
        await page.getByTestId('message-user').filter({ hasText: 'Reload while streaming' }).waitFor();
        await page.waitForFunction(
          (text) => [...document.querySelectorAll('[data-testid=message-assistant]')].at(-1)?.textContent === text,
          full,
          { timeout: 20_000 },
        );
        await waitReady(page);
        assert.equal(await page.getByTestId('message-assistant').count(), 3);
        assert.equal(await page.getByTestId('message-user').count(), 3);
        await shot('05-resumed-after-reload');
        await page.reload();
        await page.getByTestId('message-assistant').nth(2).waitFor();
        assert.equal(await lastAssistant(page).textContent(), full);

        // Delete the second chat.
        await page.getByTestId('chat-item').filter({ hasText: '[tool] Weather' }).getByTestId('delete-chat').click();
        await page.waitForFunction(() => document.querySelectorAll('[data-testid=chat-item]').length === 1);
        assert.deepEqual((await aliceApi.chats()).map((c) => c.id), [firstId]);
        assert.equal((await aliceApi.call('GET', `/api/chat/${secondId}/messages`)).status, 404);
        await shot('06-deleted');
        assert.deepEqual(consoleErrors, []);
      } catch (e) {
        await shot('failure').catch(() => {});
        throw e;
      } finally {
        await a.close();
      }

      // A second user (own browser profile) sees none of alice's chats.
      const bob = `bob-${randomUUID().slice(0, 8)}`;
      const b = await browserProfile();
      try {
        const page2 = b.context.pages()[0] ?? (await b.context.newPage());
        await page2.goto(`${server.base}/?user=${bob}`);
        await page2.getByTestId('user').filter({ hasText: bob }).waitFor();
        await page2.getByTestId('new-chat').waitFor();
        await page2.waitForTimeout(300);
        assert.equal(await page2.getByTestId('chat-item').count(), 0);
        // Even alice's chat id in the address only gives "Chat not found".
        const firstId = (await aliceApi.chats())[0].id;
        await page2.goto(`${server.base}/?user=${bob}#${firstId}`);
        await page2.getByText('Chat not found').waitFor();
        assert.equal(await page2.getByTestId('message-user').count(), 0);
        await page2.screenshot({ path: join(shots, '07-second-user.png') });
        assert.deepEqual(await api(server.base, bob).chats(), []);
      } finally {
        await b.close();
      }
    });
  });
}
