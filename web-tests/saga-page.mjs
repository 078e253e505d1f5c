// Browser test of the orchestrator's operations page, against a running deployment.
//
//   SAGA_API=http://127.0.0.1:18081 ARTIFACT_DIR=target/artifacts node web-tests/saga-page.mjs
//
// Exit code 0 = pass; otherwise the reason is printed. scripts/browser-test.sh starts a fresh
// deployment and runs this. CHROMIUM overrides the browser (default /usr/bin/chromium).
import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const BASE = (process.env.SAGA_API || '').replace(/\/+$/, '');
const ARTIFACT_DIR = resolve(process.env.ARTIFACT_DIR || 'target/artifacts');
const EXECUTABLE = process.env.CHROMIUM || '/usr/bin/chromium';
const TERMINAL_WAIT_MS = 60_000;
const SHORT_WAIT_MS = 15_000;
const WHOLE_TEST_MS = 240_000;
const STEPS = ['reserve_stock', 'charge_payment', 'schedule_shipment'];
const TERMINAL = ['completed', 'compensated', 'failed'];

class TestFailure extends Error {}

function fail(message) {
  throw new TestFailure(message);
}

const log = (message) => console.log(`[saga-page] ${message}`);

/** Collects what the page must never do: console.error, uncaught exceptions. */
function watchPage(page, name, { allow = () => false } = {}) {
  const problems = [];
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const location = msg.location() || {};
    if (allow(msg.text(), location.url || '')) return;
    problems.push(`${name}: console.error: ${msg.text()}${location.url ? ` (at ${location.url})` : ''}`);
  });
  page.on('pageerror', (error) => {
    problems.push(`${name}: uncaught page error: ${error.stack || error.message}`);
  });
  return {
    problems,
    check() {
      if (problems.length) fail(`the page reported errors:\n  ${problems.join('\n  ')}`);
    },
  };
}

// While the page polls for a just-placed order's saga, the orchestrator answers 404 until it has
// read the order from Kafka; Chromium logs each such answer as a console error. Those, and only
// those, are expected.
const expectedOrderPoll = (text, url) =>
  /status of 404/.test(text) && /\/orders\/[0-9a-f-]{36}\/saga$/.test(url);

/** Records every state the timeline shows, per saga, so a short-lived `running` is not missed. */
function recordTimelineStates() {
  window.__timelineStates = {};
  window.__pageToken = Math.random().toString(36).slice(2);
  const record = () => {
    const panel = document.querySelector('[data-testid="timeline"]');
    const badge = document.querySelector('[data-testid="timeline-state"]');
    if (!panel || !badge || panel.hidden) return;
    const sagaId = panel.dataset.sagaId;
    const state = badge.dataset.state;
    if (!sagaId || !state) return;
    const seen = (window.__timelineStates[sagaId] ||= []);
    if (seen[seen.length - 1] !== state) seen.push(state);
  };
  const start = () => {
    new MutationObserver(record).observe(document.body, {
      subtree: true, childList: true, characterData: true, attributes: true,
      attributeFilter: ['data-state', 'data-saga-id', 'hidden'],
    });
    record();
  };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
}

/** What the page shows right now, for failure messages. */
async function pageSummary(page) {
  try {
    return await page.evaluate(() => {
      const text = (id) => document.querySelector(`[data-testid="${id}"]`)?.textContent?.trim() ?? '(absent)';
      const bar = document.querySelector('[data-testid="error-bar"]');
      const steps = [...document.querySelectorAll('[data-testid="steps"] tbody[data-step]')]
        .map((tr) => `${tr.dataset.step}=${tr.dataset.status}`).join(' ');
      return [
        `timeline saga=${document.querySelector('[data-testid="timeline"]')?.dataset.sagaId ?? '-'}`,
        `state=${text('timeline-state')}`,
        `connection=${text('timeline-connection')}`,
        `steps: ${steps || '-'}`,
        `history entries=${document.querySelectorAll('[data-testid="history-entry"]').length}`,
        `order status=${text('order-status')}`,
        `error bar=${bar && !bar.hidden ? bar.textContent.trim() : '(hidden)'}`,
      ].join('; ');
    });
  } catch (e) {
    return `(could not read the page: ${e.message})`;
  }
}

/** Waits until `predicate(arg)` is true in the page; a timeout names what was awaited. */
async function waitInPage(page, what, predicate, arg, timeout = SHORT_WAIT_MS) {
  try {
    await page.waitForFunction(predicate, arg, { timeout, polling: 100 });
  } catch (e) {
    const reason = /Timeout/i.test(e.message) ? `timed out after ${timeout / 1000} s` : e.message;
    fail(`waiting for ${what}: ${reason}\n  page: ${await pageSummary(page)}`);
  }
}

async function testIdText(page, id) {
  return (await page.locator(`[data-testid="${id}"]`).first().textContent())?.trim() ?? '';
}

/** Clicks "place demo order" with a scenario; returns the id of the saga the page opens. */
async function placeOrderThroughPage(page, scenario, previousSagaId) {
  await page.selectOption('[data-testid="demo-scenario"]', scenario);
  await page.click('[data-testid="place-order"]');
  await waitInPage(page, `the page to open the saga of the "${scenario}" order`,
    (previous) => {
      const panel = document.querySelector('[data-testid="timeline"]');
      const id = panel && !panel.hidden ? panel.dataset.sagaId : null;
      return Boolean(id && id !== previous && location.hash === `#saga=${id}`);
    }, previousSagaId ?? null, 30_000);
  const sagaId = await page.getAttribute('[data-testid="timeline"]', 'data-saga-id');
  log(`${scenario}: saga ${sagaId} opened (${await testIdText(page, 'order-status')})`);
  return sagaId;
}

async function waitForTimelineState(page, sagaId, state) {
  await waitInPage(page, `the timeline of saga ${sagaId} to show state "${state}" (live, no reload)`,
    ([id, wanted]) => {
      const panel = document.querySelector('[data-testid="timeline"]');
      const badge = document.querySelector('[data-testid="timeline-state"]');
      return panel?.dataset.sagaId === id && badge?.dataset.state === wanted
        && badge.textContent.trim() === wanted;
    }, [sagaId, state], TERMINAL_WAIT_MS);
}

async function expectSteps(page, sagaId, expected) {
  await waitInPage(page, `saga ${sagaId}'s steps to show ${JSON.stringify(expected)}`,
    (want) => Object.entries(want).every(([step, status]) => {
      const row = document.querySelector(`[data-testid="step-${step}"]`);
      return row?.dataset.status === status
        && row.querySelector('[data-testid="step-status"]')?.textContent.trim() === status;
    }), expected);
}

async function historyEntries(page) {
  return page.evaluate(() => [...document.querySelectorAll('[data-testid="history-entry"]')].map((li) => ({
    type: li.querySelector('[data-testid="history-type"]')?.textContent.trim(),
    decision: li.querySelector('[data-testid="history-decision"]')?.textContent.trim(),
    after: li.querySelector('[data-testid="history-state-after"]')?.textContent.replace('→', '').trim(),
    time: li.querySelector('[data-testid="history-at"]')?.textContent.trim(),
  })));
}

async function expectHistory(page, sagaId, expectedTypes) {
  await waitInPage(page, `saga ${sagaId}'s history to list ${expectedTypes.join(', ')}`,
    (types) => {
      const shown = [...document.querySelectorAll('[data-testid="history-type"]')].map((n) => n.textContent.trim());
      return types.every((t) => shown.includes(t));
    }, expectedTypes);
  const entries = await historyEntries(page);
  for (const entry of entries) {
    if (!entry.type || !entry.decision || !entry.after || !entry.time || entry.time === '–') {
      fail(`saga ${sagaId}: a history entry lacks time, type, decision or state: ${JSON.stringify(entry)}`);
    }
  }
  const first = entries[0];
  if (first.type !== 'OrderPlaced' || first.decision !== 'started') {
    fail(`saga ${sagaId}: the history should begin with OrderPlaced/started, got ${JSON.stringify(first)}`);
  }
  return entries;
}

async function expectListRow(page, sagaId, state) {
  await waitInPage(page, `the list row of saga ${sagaId} to show "${state}"`,
    ([id, wanted]) => {
      const row = document.querySelector(`[data-testid="saga-row"][data-saga-id="${id}"]`);
      return row?.querySelector('[data-testid="saga-state"]')?.textContent.trim() === wanted;
    }, [sagaId, state], SHORT_WAIT_MS);
  const row = page.locator(`[data-testid="saga-row"][data-saga-id="${sagaId}"]`);
  const shortId = (await row.locator('[data-testid="saga-id"]').textContent()).trim();
  if (!sagaId.startsWith(shortId) || shortId.length < 6) {
    fail(`the list row of saga ${sagaId} shows the id "${shortId}"`);
  }
  const age = (await row.locator('[data-testid="saga-age"]').textContent()).trim();
  if (!/\d/.test(age)) fail(`the list row of saga ${sagaId} shows no age ("${age}")`);
}

async function expectNoErrorBar(page) {
  const bar = page.locator('[data-testid="error-bar"]');
  if (await bar.isVisible()) fail(`the error bar shows: ${(await bar.textContent()).trim()}`);
}

async function run(browser) {
  mkdirSync(ARTIFACT_DIR, { recursive: true });
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  const page = await context.newPage();
  const guard = watchPage(page, 'page', { allow: expectedOrderPoll });
  await page.addInitScript(recordTimelineStates);

  // 1. The page and its header.
  log(`opening ${BASE}/`);
  const response = await page.goto(`${BASE}/`, { waitUntil: 'load' });
  if (!response || response.status() !== 200) fail(`GET / answered ${response && response.status()}`);
  await waitInPage(page, 'the header counts to show numbers (GET /stats)',
    () => ['running', 'compensating', 'completed', 'compensated', 'failed', 'total'].every((s) =>
      /^\d+$/.test(document.querySelector(`[data-testid="count-${s}"]`)?.textContent.trim() ?? '')));
  await waitInPage(page, 'the header rates to show numbers',
    () => ['started', 'completed', 'compensated', 'failed'].every((s) =>
      /^\d+(\.\d+)?$/.test(document.querySelector(`[data-testid="rate-${s}"]`)?.textContent.trim() ?? '')));
  const completedBefore = Number(await testIdText(page, 'count-completed'));
  log(`header renders: completed=${completedBefore}`);
  const pageToken = await page.evaluate(() => window.__pageToken);

  // 2. An order that completes, placed through the page's button.
  const happy = await placeOrderThroughPage(page, 'happy', null);
  await waitForTimelineState(page, happy, 'completed');
  const seen = await page.evaluate((id) => window.__timelineStates[id] || [], happy);
  const entries = await expectHistory(page, happy, ['OrderPlaced', 'StockReserved', 'PaymentCharged', 'ShipmentScheduled']);
  const sawInFlight = seen.some((s) => !TERMINAL.includes(s));
  const transitions = ['StockReserved', 'PaymentCharged', 'ShipmentScheduled'].every((t) =>
    entries.some((e) => e.type === t && e.decision === 'applied'));
  if (!sawInFlight && !transitions) {
    fail(`saga ${happy}: the timeline never showed it in flight (states seen: ${seen.join(' → ')}) and the history lacks the applied step replies`);
  }
  log(`happy: states seen ${seen.join(' → ')}; ${sawInFlight ? 'saw it in flight' : 'too fast to see running; the history shows the transitions'}`);
  const lastState = entries[entries.length - 1].after;
  if (lastState !== 'completed') fail(`saga ${happy}: the last history entry leaves it "${lastState}", not completed`);
  await expectSteps(page, happy, Object.fromEntries(STEPS.map((s) => [s, 'succeeded'])));
  for (const step of STEPS) {
    const attempts = (await page
      .locator(`[data-testid="step-${step}"] [data-testid="step-attempts"]`).textContent()).trim();
    if (!/^[1-9]\d*$/.test(attempts)) fail(`saga ${happy}: step ${step} shows attempts "${attempts}"`);
  }
  await waitInPage(page, `the timeline's stream of saga ${happy} to end`,
    () => document.querySelector('[data-testid="timeline-connection"]')?.dataset.status === 'ended');
  if (await page.evaluate(() => window.__pageToken) !== pageToken) fail('the page was reloaded; the update was not live');
  await expectListRow(page, happy, 'completed');
  await waitInPage(page, `the header's completed count to pass ${completedBefore}`,
    (before) => Number(document.querySelector('[data-testid="count-completed"]').textContent) > before,
    completedBefore);
  await expectNoErrorBar(page);
  guard.check();
  await page.screenshot({ path: join(ARTIFACT_DIR, 'saga-page.png'), fullPage: true });
  log(`happy: completed; screenshot ${join(ARTIFACT_DIR, 'saga-page.png')}`);

  // 3. An order that is compensated: carol's payment is declined.
  const compensatedBefore = Number(await testIdText(page, 'count-compensated'));
  const declined = await placeOrderThroughPage(page, 'payment_declined', happy);
  await waitForTimelineState(page, declined, 'compensated');
  await expectSteps(page, declined, {
    reserve_stock: 'compensated', charge_payment: 'failed', schedule_shipment: 'pending',
  });
  const failure = await testIdText(page, 'timeline-failure');
  if (!/charge_payment/.test(failure)) fail(`saga ${declined}: the failure reason shown is "${failure}"`);
  const paymentReason = (await page.locator('[data-testid="step-charge_payment"] [data-testid="step-failure-reason"]').textContent()).trim();
  if (!paymentReason) fail(`saga ${declined}: charge_payment shows no failure reason`);
  const compensatedAt = (await page.locator('[data-testid="step-reserve_stock"] [data-testid="step-compensated"]').textContent()).trim();
  if (!/\d\d:\d\d:\d\d/.test(compensatedAt)) fail(`saga ${declined}: reserve_stock shows compensated at "${compensatedAt}"`);
  await expectHistory(page, declined, ['OrderPlaced', 'StockReserved', 'PaymentDeclined', 'StockReleased']);
  await waitInPage(page, `the timeline's stream of saga ${declined} to end`,
    () => document.querySelector('[data-testid="timeline-connection"]')?.dataset.status === 'ended');
  await expectListRow(page, declined, 'compensated');
  await waitInPage(page, `the header's compensated count to pass ${compensatedBefore}`,
    (before) => Number(document.querySelector('[data-testid="count-compensated"]').textContent) > before,
    compensatedBefore);
  await expectNoErrorBar(page);
  guard.check();
  await page.screenshot({ path: join(ARTIFACT_DIR, 'saga-compensated.png'), fullPage: true });
  log(`payment declined: compensated (${failure}); screenshot ${join(ARTIFACT_DIR, 'saga-compensated.png')}`);

  // 4. The filters reach the server: state, reason (substring, any case), step, min age.
  await page.selectOption('[data-testid="filter-state"]', 'compensated');
  await page.fill('[data-testid="filter-reason"]', 'CHARGE_PAYMENT');
  await waitInPage(page, 'the list filtered by state=compensated and reason=CHARGE_PAYMENT',
    ([keep, drop]) => {
      const ids = [...document.querySelectorAll('[data-testid="saga-row"]')].map((r) => r.dataset.sagaId);
      const states = [...document.querySelectorAll('[data-testid="saga-row"] [data-testid="saga-state"]')].map((n) => n.textContent.trim());
      return ids.includes(keep) && !ids.includes(drop) && states.every((s) => s === 'compensated');
    }, [declined, happy]);
  await page.fill('[data-testid="filter-min-age"]', '86400');
  await waitInPage(page, 'the list filtered by min_age_secs=86400 to drop the new sagas',
    (keep) => ![...document.querySelectorAll('[data-testid="saga-row"]')].some((r) => r.dataset.sagaId === keep),
    declined);
  await page.click('[data-testid="filter-reset"]');
  await page.selectOption('[data-testid="filter-step"]', 'charge_payment');
  await waitInPage(page, 'the list filtered by step=charge_payment to drop terminal sagas',
    ([a, b]) => {
      const ids = [...document.querySelectorAll('[data-testid="saga-row"]')].map((r) => r.dataset.sagaId);
      return !ids.includes(a) && !ids.includes(b)
        && [...document.querySelectorAll('[data-testid="saga-row"] [data-testid="current-step"]')]
          .every((n) => n.textContent.trim() === 'charge_payment');
    }, [happy, declined]);
  await page.click('[data-testid="filter-reset"]');
  await waitInPage(page, 'the unfiltered list to show both sagas again',
    (ids) => ids.every((id) => document.querySelector(`[data-testid="saga-row"][data-saga-id="${id}"]`)),
    [happy, declined]);
  await expectNoErrorBar(page);
  log('filters: state, reason, min age and step narrow the list');

  // 5. Clicking a row opens that saga's timeline.
  await page.click(`[data-testid="saga-row"][data-saga-id="${happy}"]`);
  await waitForTimelineState(page, happy, 'completed');
  if (await page.evaluate(() => location.hash) !== `#saga=${happy}`) fail('clicking a row did not set #saga=<id>');
  guard.check();
  log('clicking a row opens its timeline');

  // 6. A deep link opens the timeline of a saga in a fresh page.
  const linked = await context.newPage();
  const linkedGuard = watchPage(linked, 'deep-link page');
  await linked.goto(`${BASE}/#saga=${declined}`, { waitUntil: 'load' });
  await waitForTimelineState(linked, declined, 'compensated');
  await expectHistory(linked, declined, ['OrderPlaced', 'PaymentDeclined', 'StockReleased']);
  linkedGuard.check();
  await linked.close();
  log('deep link /#saga=<id> opens the timeline');

  // 7. API errors reach the error bar (an unknown saga: the server answers 404).
  const missing = await context.newPage();
  const missingGuard = watchPage(missing, 'unknown-saga page', { allow: (text) => /\b404\b/.test(text) });
  const unknown = '00000000-0000-4000-8000-000000000000';
  await missing.goto(`${BASE}/#saga=${unknown}`, { waitUntil: 'load' });
  await waitInPage(missing, 'the error bar to show the 404 of an unknown saga',
    () => {
      const bar = document.querySelector('[data-testid="error-bar"]');
      return bar && !bar.hidden && /404/.test(bar.textContent) && /not_found/.test(bar.textContent);
    });
  missingGuard.check();
  log(`error bar: ${(await missing.locator('[data-testid="error-bar"] li').first().textContent()).trim()}`);
  await missing.close();

  guard.check();
  await context.close();
}

async function main() {
  if (!BASE) fail('set SAGA_API to the orchestrator\'s base URL, e.g. http://127.0.0.1:18081');
  const timer = setTimeout(() => {
    console.error(`[saga-page] FAIL: the whole test took longer than ${WHOLE_TEST_MS / 1000} s`);
    process.exit(2);
  }, WHOLE_TEST_MS);
  timer.unref();
  let browser;
  try {
    browser = await chromium.launch({
      executablePath: EXECUTABLE,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
  } catch (e) {
    fail(`could not start Chromium at ${EXECUTABLE}: ${e.message}`);
  }
  try {
    await run(browser);
  } catch (e) {
    // Keep a picture of what the page showed when it failed.
    for (const context of browser.contexts()) {
      for (const [i, page] of context.pages().entries()) {
        await page.screenshot({ path: join(ARTIFACT_DIR, `failure-${i}.png`), fullPage: true }).catch(() => {});
      }
    }
    throw e;
  } finally {
    await browser.close().catch(() => {});
  }
}

main().then(
  () => {
    console.log('[saga-page] PASS');
    process.exit(0);
  },
  (e) => {
    const message = e instanceof TestFailure ? e.message : (e && e.stack) || String(e);
    console.error(`[saga-page] FAIL: ${message}`);
    process.exit(1);
  },
);
