// Browser test of the orchestrator's operations page, against a running deployment.
//
//   SAGA_API=http://127.0.0.1:18081 SAGA_TOKEN=... SAGA_TOKEN_NAME=page-operator \
//     SAGA_VIEWER_TOKEN=... ARTIFACT_DIR=target/artifacts node web-tests/saga-page.mjs
//
// SAGA_TOKEN has the roles operator and client (SAGA_TOKEN_NAME is its name in the token list),
// SAGA_VIEWER_TOKEN only viewer. The deployment must turn a shipping-rejected order into a
// `failed` saga that one retry compensates: the payment service refuses its first
// compensation (FAULT_COMPENSATION_FAILURES=1) and the orchestrator gives up after one
// attempt (COMPENSATION_MAX_ATTEMPTS=1).
//
// Exit code 0 = pass; otherwise the reason is printed. scripts/browser-test.sh starts a fresh
// deployment like that and runs this. CHROMIUM overrides the browser (default /usr/bin/chromium).
import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const BASE = (process.env.SAGA_API || '').replace(/\/+$/, '');
const TOKEN = process.env.SAGA_TOKEN || '';
const TOKEN_NAME = process.env.SAGA_TOKEN_NAME || '';
const VIEWER_TOKEN = process.env.SAGA_VIEWER_TOKEN || '';
const ARTIFACT_DIR = resolve(process.env.ARTIFACT_DIR || 'target/artifacts');
const EXECUTABLE = process.env.CHROMIUM || '/usr/bin/chromium';
const TERMINAL_WAIT_MS = 60_000;
const SHORT_WAIT_MS = 15_000;
const WHOLE_TEST_MS = 240_000;
const TERMINAL = ['completed', 'compensated', 'failed'];

class TestFailure extends Error {}

function fail(message) {
  throw new TestFailure(message);
}

const log = (message) => console.log(`[saga-page] ${message}`);

/** The order saga's steps, in order, as the deployment's definitions give them. */
async function orderSteps() {
  const response = await fetch(`${BASE}/definitions`, {
    headers: { authorization: `Bearer ${VIEWER_TOKEN}` },
  });
  if (!response.ok) fail(`GET /definitions answered ${response.status}`);
  const body = await response.json();
  const order = (body.definitions || []).find((d) => d.name === 'order' && d.newest);
  if (!order) fail('GET /definitions lists no order saga that new sagas start on');
  return order.steps.map((step) => step.name);
}

// The page, its assets and the API's document (from which the page reads the saga states) are
// public; everything else needs the token.
const isApiPath = (pathname) =>
  pathname !== '/' && pathname !== '/openapi.json' && !pathname.startsWith('/ui/');

/**
 * Collects what the page must never do: console.error, uncaught exceptions, and an API call
 * without `guard.token` as its bearer token (with `guard.token` null: any API call at all).
 */
function watchPage(page, name, { allow = () => false } = {}) {
  const problems = [];
  const guard = {
    token: null,
    problems,
    check() {
      if (problems.length) fail(`the page reported errors:\n  ${problems.join('\n  ')}`);
    },
  };
  page.on('request', (request) => {
    const url = new URL(request.url());
    if (url.origin !== new URL(BASE).origin || !isApiPath(url.pathname)) return;
    const sent = request.headers().authorization;
    const what = `${name}: ${request.method()} ${url.pathname}`;
    if (guard.token === null) problems.push(`${what} while the page held no token`);
    else if (sent !== `Bearer ${guard.token}`) {
      problems.push(`${what} sent ${sent === undefined ? 'no Authorization header' : 'another Authorization header'}`);
    }
  });
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const location = msg.location() || {};
    if (allow(msg.text(), location.url || '')) return;
    problems.push(`${name}: console.error: ${msg.text()}${location.url ? ` (at ${location.url})` : ''}`);
  });
  page.on('pageerror', (error) => {
    problems.push(`${name}: uncaught page error: ${error.stack || error.message}`);
  });
  return guard;
}

// While the page polls for a just-placed order's saga, the orchestrator answers 404 until it has
// read the order from Kafka; Chromium logs each such answer as a console error. Those, and only
// those, are expected.
const expectedOrderPoll = (text, url) =>
  /status of 404/.test(text) && /\/orders\/[0-9a-f-]{36}\/saga$/.test(url);
// Where the test makes the server refuse a token (401) or a role (403), Chromium logs that too.
const refusedToken = (text) => /status of 401/.test(text);
const refusedRole = (text) => /status of 403/.test(text);

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
    detail: li.querySelector('[data-testid="history-detail"]')?.textContent.trim(),
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

/** Waits until `predicate()` (in the test, not the page) is true. */
async function until(what, predicate, timeout = SHORT_WAIT_MS) {
  const deadline = Date.now() + timeout;
  while (!predicate()) {
    if (Date.now() > deadline) fail(`waiting for ${what}: timed out after ${timeout / 1000} s`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

const tokenDialogOpen = () => document.querySelector('[data-testid="token-dialog"]')?.open === true;

/** Enters `token` in the token dialog (which must be asking); `guard` expects it from then on. */
async function enterToken(page, guard, token) {
  await waitInPage(page, 'the token dialog to ask for a token', tokenDialogOpen);
  guard.token = token;
  await page.fill('[data-testid="token-input"]', token);
  await page.click('[data-testid="token-submit"]');
}

async function signIn(page, guard, token) {
  await enterToken(page, guard, token);
  await waitInPage(page, 'the token dialog to close (the token accepted)', () =>
    document.querySelector('[data-testid="token-dialog"]')?.open === false
    && document.querySelector('[data-testid="auth-status"]')?.dataset.status === 'signed-in');
}

/** The dialog asks (again) and says why: `pattern` matches its error text. */
async function expectTokenRefused(page, what, pattern) {
  await waitInPage(page, `the token dialog to ask again after ${what}, saying ${pattern}`,
    (source) => {
      const error = document.querySelector('[data-testid="token-error"]');
      return document.querySelector('[data-testid="token-dialog"]')?.open === true
        && error && !error.hidden && new RegExp(source).test(error.textContent);
    }, pattern.source);
  return testIdText(page, 'token-error');
}

/** Where the page keeps `token`: the tab's sessionStorage only, never localStorage or a cookie. */
async function tokenStorage(page, token) {
  const kept = await page.evaluate((t) => ({
    session: Object.keys(sessionStorage).some((k) => sessionStorage.getItem(k) === t),
    local: Object.keys(localStorage).some((k) => (localStorage.getItem(k) || '').includes(t)),
    cookie: document.cookie.includes(t),
  }), token);
  const cookies = await page.context().cookies();
  if (kept.local) fail('the page put the token into localStorage');
  if (kept.cookie || cookies.some((c) => c.value.includes(token))) fail('the page put the token into a cookie');
  return kept.session;
}

async function expectTokenKept(page, token) {
  if (!await tokenStorage(page, token)) fail('the token is not kept in the tab\'s sessionStorage');
}

async function expectTokenDropped(page, token) {
  if (await tokenStorage(page, token)) fail('the page still keeps the token in sessionStorage');
}

async function run(browser) {
  mkdirSync(ARTIFACT_DIR, { recursive: true });
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  const page = await context.newPage();
  const guard = watchPage(page, 'page', { allow: expectedOrderPoll });
  await page.addInitScript(recordTimelineStates);

  // 1. The page asks for a token before it reads anything (the guard fails any API call made
  // without one), then keeps it for the tab and sends it with every call.
  const STEPS = await orderSteps();
  log(`opening ${BASE}/`);
  const response = await page.goto(`${BASE}/`, { waitUntil: 'load' });
  if (!response || response.status() !== 200) fail(`GET / answered ${response && response.status()}`);
  if (BASE.startsWith('https://')) {
    // Over HTTPS (the browser trusting the server's CA, no certificate error ignored), the page
    // tells the browser to use HTTPS for this host from now on.
    const hsts = (await response.allHeaders())['strict-transport-security'] || '';
    if (!/max-age=\d+/.test(hsts)) fail(`GET / over HTTPS has no Strict-Transport-Security (${hsts || 'none'})`);
    log(`served over HTTPS with a certificate the browser trusts; Strict-Transport-Security: ${hsts}`);
  }
  await waitInPage(page, 'the token dialog to ask for a token', tokenDialogOpen);
  if (await page.locator('[data-testid="token-error"]').isVisible()) {
    fail(`the first token dialog shows an error: ${await testIdText(page, 'token-error')}`);
  }
  await page.waitForTimeout(1500); // a poller's tick or two: nothing may call the API meanwhile
  if (await testIdText(page, 'count-total') !== '–') fail('the header shows counts before a token was entered');
  guard.check();
  await signIn(page, guard, TOKEN);
  await expectTokenKept(page, TOKEN);
  log('the page asked for a token and keeps it in sessionStorage only');

  // The header.
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
  const definition = await testIdText(page, 'timeline-definition');
  if (definition !== 'order v1') fail(`saga ${happy}: the timeline shows definition "${definition}", not "order v1"`);
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

  // 6. A deep link opens the timeline of a saga in a fresh page: a tab of its own, so it asks
  // for a token first. A reload keeps the tab's token; signing out forgets it.
  const linked = await context.newPage();
  const linkedGuard = watchPage(linked, 'deep-link page');
  await linked.goto(`${BASE}/#saga=${declined}`, { waitUntil: 'load' });
  await signIn(linked, linkedGuard, TOKEN);
  await waitForTimelineState(linked, declined, 'compensated');
  await expectHistory(linked, declined, ['OrderPlaced', 'PaymentDeclined', 'StockReleased']);
  await linked.reload({ waitUntil: 'load' });
  await waitForTimelineState(linked, declined, 'compensated');
  if (await linked.evaluate(tokenDialogOpen)) fail('after a reload the page asks for the token again');
  await linked.click('[data-testid="sign-out"]');
  linkedGuard.token = null;
  await waitInPage(linked, 'signing out to ask for a token and close the timeline',
    () => document.querySelector('[data-testid="token-dialog"]')?.open === true
      && document.querySelector('[data-testid="timeline"]')?.hidden === true
      && document.querySelector('[data-testid="count-total"]')?.textContent.trim() === '–');
  await expectTokenDropped(linked, TOKEN);
  await linked.waitForTimeout(1500); // signed out: no poller may call the API
  linkedGuard.check();
  await linked.close();
  log('deep link /#saga=<id> opens the timeline after the token; a reload keeps it, signing out drops it');

  // 7. API errors reach the error bar (an unknown saga: the server answers 404).
  const missing = await context.newPage();
  const missingGuard = watchPage(missing, 'unknown-saga page', { allow: (text) => /\b404\b/.test(text) });
  const unknown = '00000000-0000-4000-8000-000000000000';
  await missing.goto(`${BASE}/#saga=${unknown}`, { waitUntil: 'load' });
  await signIn(missing, missingGuard, TOKEN);
  await waitInPage(missing, 'the error bar to show the 404 of an unknown saga',
    () => {
      const bar = document.querySelector('[data-testid="error-bar"]');
      return bar && !bar.hidden && /404/.test(bar.textContent) && /not_found/.test(bar.textContent);
    });
  missingGuard.check();
  log(`error bar: ${(await missing.locator('[data-testid="error-bar"] li').first().textContent()).trim()}`);
  await missing.close();

  // 8. The page's own side of the stream, the actions and the token, against answers the test
  // scripts (the rest of the API is the real server's).
  await scriptedStream(context);

  // 9. Against the server's auth: a failed saga's stream stays open; a viewer may look but not
  // act or order; the operator's retry is recorded under the token's name.
  await failedSagaAndRoles(context, page, guard);

  // 10. A token the server does not know: the dialog asks again and says why.
  await wrongToken(context);

  // 11. Another site may not frame the page (it could trick a signed-in operator into pressing
  // Retry, Skip or Abort): the server's Content-Security-Policy says frame-ancestors 'none'.
  await framingRefused(browser);

  guard.check();
  await context.close();
}

/**
 * bob's parcel to AQ is refused, and the refund of his payment too (once: the deployment's
 * fault injection), so the saga is `failed`. Its stream stays open; a viewer may look but not
 * retry or order; the operator's retry compensates it, under the token's name.
 */
async function failedSagaAndRoles(context, page, guard) {
  const failedBefore = Number(await testIdText(page, 'count-failed'));
  const shown = await page.getAttribute('[data-testid="timeline"]', 'data-saga-id');
  const stuck = await placeOrderThroughPage(page, 'shipping_rejected', shown);
  await waitForTimelineState(page, stuck, 'failed');
  await expectSteps(page, stuck, {
    reserve_stock: 'succeeded', charge_payment: 'compensation_failed', schedule_shipment: 'failed',
  });
  await page.waitForTimeout(1500); // several of the server's polls of the saga
  const connection = await page.getAttribute('[data-testid="timeline-connection"]', 'data-status');
  if (connection !== 'live') {
    fail(`the stream of failed saga ${stuck} is "${await testIdText(page, 'timeline-connection')}"; it should stay open while an operator can act`);
  }
  await expectListRow(page, stuck, 'failed');
  await waitInPage(page, `the header's failed count to pass ${failedBefore}`,
    (before) => Number(document.querySelector('[data-testid="count-failed"]').textContent) > before,
    failedBefore);
  await page.screenshot({ path: join(ARTIFACT_DIR, 'saga-failed.png'), fullPage: true });
  log(`shipping rejected, refund refused: saga ${stuck} failed, its stream still live`);

  const viewer = await context.newPage();
  const viewerGuard = watchPage(viewer, 'viewer page', { allow: refusedRole });
  await viewer.goto(`${BASE}/#saga=${stuck}`, { waitUntil: 'load' });
  await signIn(viewer, viewerGuard, VIEWER_TOKEN);
  await waitForTimelineState(viewer, stuck, 'failed');
  await viewer.fill('[data-testid="action-reason"]', 'a viewer tries');
  await viewer.click('[data-testid="action-retry"]');
  await waitInPage(viewer, 'the viewer\'s retry to be refused with the server\'s 403 message',
    () => {
      const status = document.querySelector('[data-testid="action-status"]');
      return status?.dataset.status === 'forbidden' && /not allowed: \S/.test(status.textContent);
    });
  const refusedAction = await testIdText(viewer, 'action-status');
  await viewer.selectOption('[data-testid="demo-scenario"]', 'happy');
  await viewer.click('[data-testid="place-order"]');
  await waitInPage(viewer, 'the viewer\'s demo order to be refused with the server\'s 403 message',
    () => {
      const status = document.querySelector('[data-testid="order-status"]');
      return status?.dataset.status === 'forbidden' && /not allowed: \S/.test(status.textContent);
    });
  const refusedOrder = await testIdText(viewer, 'order-status');
  if (await viewer.evaluate(tokenDialogOpen)) fail('a 403 made the page ask for another token');
  await expectTokenKept(viewer, VIEWER_TOKEN);
  if (await testIdText(viewer, 'timeline-state') !== 'failed') fail('the viewer\'s refused retry moved the saga');
  await viewer.screenshot({ path: join(ARTIFACT_DIR, 'saga-viewer.png'), fullPage: true });
  viewerGuard.check();
  await viewer.close();
  log(`viewer token: "${refusedAction}"; "${refusedOrder}"`);

  const reason = 'browser test: the refund works again';
  await page.fill('[data-testid="action-reason"]', reason);
  await page.click('[data-testid="action-retry"]');
  await waitInPage(page, 'the page to report the retry done',
    () => /^retry done/.test(document.querySelector('[data-testid="action-status"]')?.textContent ?? ''));
  await waitForTimelineState(page, stuck, 'compensated');
  if (await page.locator('[data-testid="actions"]').isVisible()) fail('a compensated saga still offers operator actions');
  await expectSteps(page, stuck, {
    reserve_stock: 'compensated', charge_payment: 'compensated', schedule_shipment: 'failed',
  });
  const entries = await expectHistory(page, stuck,
    ['OrderPlaced', 'ShipmentRejected', 'OperatorRetry', 'PaymentRefunded', 'StockReleased']);
  const retry = entries.find((e) => e.type === 'OperatorRetry');
  if (!retry.detail.includes(TOKEN_NAME) || !retry.detail.includes(reason)) {
    fail(`the history should record the retry under the token's name "${TOKEN_NAME}" with the reason; it says "${retry.detail}"`);
  }
  await waitInPage(page, `the timeline's stream of saga ${stuck} to end once compensated`,
    () => document.querySelector('[data-testid="timeline-connection"]')?.textContent.trim() === 'ended: compensated');
  await expectListRow(page, stuck, 'compensated');
  await expectNoErrorBar(page);
  guard.check();
  await page.screenshot({ path: join(ARTIFACT_DIR, 'saga-retried.png'), fullPage: true });
  log(`operator retry: compensated; history "${retry.detail}"`);
}

/** A token the server does not know, entered or held by the tab: the dialog asks again. */
async function wrongToken(context) {
  const page = await context.newPage();
  const guard = watchPage(page, 'wrong-token page', { allow: refusedToken });
  await page.goto(`${BASE}/`, { waitUntil: 'load' });
  const wrong = 'not-a-token-the-server-knows';
  await enterToken(page, guard, wrong);
  const said = await expectTokenRefused(page, 'a wrong token', /401 unauthorized/);
  await page.screenshot({ path: join(ARTIFACT_DIR, 'token-refused.png') });
  await expectTokenDropped(page, wrong);
  if (await testIdText(page, 'count-total') !== '–') fail('a refused token still shows counts');

  // A token the tab holds that the server no longer takes (revoked; the server restarted with
  // another list): the first 401 asks again. `sagas.api-token` is the page's storage key.
  const revoked = 'a-token-since-revoked';
  guard.token = revoked;
  await page.evaluate((t) => sessionStorage.setItem('sagas.api-token', t), revoked);
  await page.reload({ waitUntil: 'load' });
  await expectTokenRefused(page, 'a held token the server refuses', /401 unauthorized/);
  await expectTokenDropped(page, revoked);
  await signIn(page, guard, TOKEN);
  await waitInPage(page, 'the header counts after the right token',
    () => /^\d+$/.test(document.querySelector('[data-testid="count-total"]')?.textContent.trim() ?? ''));
  guard.check();
  await page.close();
  log(`wrong token: the dialog asks again ("${said}")`);
}

const SCRIPTED_SAGA = '5c0e0000-0000-4000-8000-00000000d1a1';

/** A saga as the API shows it, `state` with steps to match, for the scripted stream. */
function scriptedSaga(version, state) {
  const at = new Date().toISOString();
  const step = (name, status, extra = {}) => ({
    name, status, attempts: status === 'pending' ? 0 : 1, compensation_attempts: 0,
    compensation_budget_from: 0, started_at: status === 'pending' ? null : at,
    finished_at: status === 'pending' ? null : at, compensation_started_at: null,
    compensated_at: null, failure_reason: null, ...extra,
  });
  const refund = {
    failed: step('charge_payment', 'compensation_failed', { compensation_attempts: 1, compensation_started_at: at, failure_reason: 'refund refused' }),
    compensating: step('charge_payment', 'compensating', { compensation_attempts: 2, compensation_started_at: at }),
    compensated: step('charge_payment', 'compensated', { compensation_attempts: 2, compensation_started_at: at, compensated_at: at }),
  }[state];
  return {
    saga_id: SCRIPTED_SAGA, order_id: '5c0e0000-0000-4000-8000-0000000000de', state,
    current_step: state === 'compensated' ? null : 'charge_payment',
    failure_reason: 'schedule_shipment failed: destination country AQ is on the deny-list',
    definition_name: 'order', definition_version: 1, version, created_at: at, updated_at: at,
    finished_at: state === 'compensating' ? null : at, deadline_at: null,
    order: {
      order_id: '5c0e0000-0000-4000-8000-0000000000de', customer_id: 'bob',
      items: [{ sku: 'WIDGET', quantity: 1, unit_price_cents: 1000 }], total_cents: 1000, currency: 'EUR',
      shipping_address: { country: 'AQ', city: 'Berlin', line1: 'Unter den Linden 1', postal_code: '10117' },
    },
    steps: [
      step('reserve_stock', state === 'compensated' ? 'compensated' : 'succeeded'),
      refund,
      step('schedule_shipment', 'failed', { failure_reason: 'destination country AQ is on the deny-list' }),
    ],
  };
}

function scriptedHistory(id, type, decision, stateAfter) {
  return {
    id, at: new Date().toISOString(), message_id: null, message_type: type, decision,
    detail: `scripted ${type}`, state_after: stateAfter,
  };
}

/**
 * The watch stream, operator actions and a 401, with the server's answers scripted by the test:
 * the stream arrives with comments, CRLF and CR line ends, a `retry:` and data over two lines;
 * it drops after a `failed` saga without `end`, the page reconnects (with the token again),
 * an action posts the reason only, a 403 keeps the token, a 401 asks for another.
 */
async function scriptedStream(context) {
  const page = await context.newPage();
  const guard = watchPage(page, 'scripted-stream page', { allow: (text) => refusedToken(text) || refusedRole(text) });
  await page.addInitScript(recordTimelineStates);
  const streams = [];
  let releaseSecond;
  const secondMayAnswer = new Promise((resolve) => { releaseSecond = resolve; });
  const history1 = JSON.stringify(scriptedHistory(1, 'OrderPlaced', 'started', 'running'));
  const comma = history1.indexOf(',');
  const first = [
    ': the page skips comments\r\n',
    'retry: 300\r\n\r\n',
    `event: saga\r\ndata: ${JSON.stringify(scriptedSaga(5, 'failed'))}\r\n\r\n`,
    // One event's data over two lines: joined with a newline, still one JSON document.
    `event: history\ndata: ${history1.slice(0, comma + 1)}\ndata: ${history1.slice(comma + 1)}\n\n`,
    `event: history\rdata: ${JSON.stringify(scriptedHistory(2, 'CompensationFailed', 'applied', 'failed'))}\r\r`,
    ':\n\n',
  ].join('');
  const second = [
    // What was sent before comes again after a reconnection; an older saga than the page
    // shows (the action's answer) must not take it back.
    `event: saga\ndata: ${JSON.stringify(scriptedSaga(5, 'failed'))}\n\n`,
    `event: history\ndata: ${history1}\n\n`,
    `event: history\ndata: ${JSON.stringify(scriptedHistory(2, 'CompensationFailed', 'applied', 'failed'))}\n\n`,
    `event: history\ndata: ${JSON.stringify(scriptedHistory(3, 'OperatorRetry', 'operator', 'compensating'))}\n\n`,
    `event: saga\ndata: ${JSON.stringify(scriptedSaga(7, 'compensated'))}\n\n`,
    'event: end\ndata: {"state":"compensated"}\n\n',
  ].join('');
  await page.route(`**/sagas/${SCRIPTED_SAGA}/watch`, async (route) => {
    streams.push(route.request().headers().authorization);
    if (streams.length === 2) await secondMayAnswer;
    await route.fulfill({
      status: 200,
      headers: { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' },
      body: streams.length === 1 ? first : second,
    });
  });
  const actions = [];
  await page.route(`**/sagas/${SCRIPTED_SAGA}/retry`, async (route) => {
    const request = route.request();
    actions.push({ method: request.method(), body: request.postData(), authorization: request.headers().authorization });
    if (actions.length === 1) {
      await route.fulfill({
        status: 403, contentType: 'application/json',
        body: JSON.stringify({ error: { code: 'forbidden', message: 'scripted: your token may not operate sagas' } }),
      });
    } else {
      await route.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify(scriptedSaga(6, 'compensating')) });
    }
  });

  await page.goto(`${BASE}/#saga=${SCRIPTED_SAGA}`, { waitUntil: 'load' });
  await signIn(page, guard, TOKEN);
  await waitForTimelineState(page, SCRIPTED_SAGA, 'failed');
  await until('the page to open the stream again after it dropped', () => streams.length >= 2);
  const connection = await page.getAttribute('[data-testid="timeline-connection"]', 'data-status');
  if (connection !== 'reconnecting') {
    fail(`while the dropped stream of a failed saga reconnects the timeline says "${connection}"`);
  }
  const history = await historyEntries(page);
  if (history.length !== 2 || history[0].type !== 'OrderPlaced' || history[1].type !== 'CompensationFailed') {
    fail(`the scripted stream's history shows ${JSON.stringify(history)}`);
  }
  const enabled = await page.evaluate(() => Object.fromEntries(['retry', 'skip', 'abort'].map((a) =>
    [a, !document.querySelector(`[data-testid="action-${a}"]`).disabled])));
  if (!enabled.retry || !enabled.skip || enabled.abort) {
    fail(`a failed saga should offer retry and skip, not abort; enabled: ${JSON.stringify(enabled)}`);
  }
  if (await page.locator('[data-testid="actions"] input:not([name="reason"])').count()) {
    fail('the actions ask for more than a reason (the server names the operator from the token)');
  }

  // An action without a reason is not sent; with one, it posts the reason only.
  await page.click('[data-testid="action-retry"]');
  if (actions.length) fail('an action without a reason was sent');
  const reason = 'scripted: the refund service is back';
  await page.fill('[data-testid="action-reason"]', reason);
  await page.click('[data-testid="action-retry"]');
  await waitInPage(page, 'the 403 of the scripted retry to be shown, keeping the token',
    () => {
      const status = document.querySelector('[data-testid="action-status"]');
      return status?.dataset.status === 'forbidden' && /your token may not operate sagas/.test(status.textContent);
    });
  if (await page.evaluate(tokenDialogOpen)) fail('a 403 made the page ask for another token');
  await expectTokenKept(page, TOKEN);
  await page.click('[data-testid="action-retry"]');
  await waitForTimelineState(page, SCRIPTED_SAGA, 'compensating');
  for (const action of actions) {
    if (action.method !== 'POST' || action.authorization !== `Bearer ${TOKEN}`) fail(`the retry was sent as ${JSON.stringify(action)}`);
    let body;
    try { body = JSON.parse(action.body); } catch { body = null; }
    if (!body || Object.keys(body).join() !== 'reason' || body.reason !== reason) {
      fail(`the retry should send {"reason": ...} only, sent ${action.body}`);
    }
  }
  const status = await testIdText(page, 'action-status');
  if (!/retry done/.test(status)) fail(`after the retry the page says "${status}"`);

  // The reconnection replays an older saga (ignored), then the saga moves on and ends.
  releaseSecond();
  await waitForTimelineState(page, SCRIPTED_SAGA, 'compensated');
  await waitInPage(page, 'the scripted stream to end',
    () => document.querySelector('[data-testid="timeline-connection"]')?.textContent.trim() === 'ended: compensated');
  if (await page.locator('[data-testid="actions"]').isVisible()) fail('a compensated saga still offers operator actions');
  const seen = await page.evaluate((id) => window.__timelineStates[id] || [], SCRIPTED_SAGA);
  if (seen.join() !== 'failed,compensating,compensated') fail(`the scripted saga went through ${seen.join(' → ')}`);
  const after = await historyEntries(page);
  if (after.map((e) => e.type).join() !== 'OrderPlaced,CompensationFailed,OperatorRetry') {
    fail(`after the reconnection the history shows ${after.map((e) => e.type).join(', ')}`);
  }
  if (streams.length !== 2 || streams.some((a) => a !== `Bearer ${TOKEN}`)) {
    fail(`the stream was opened ${streams.length} times, with ${JSON.stringify(streams.map((a) => a && a.replace(TOKEN, 'TOKEN')))}`);
  }
  await page.screenshot({ path: join(ARTIFACT_DIR, 'saga-scripted.png'), fullPage: true });

  // Any 401 asks for a token again, with the server's message, and forgets the one held.
  await page.route('**/stats', (route) => route.fulfill({
    status: 401, contentType: 'application/json', headers: { 'WWW-Authenticate': 'Bearer' },
    body: JSON.stringify({ error: { code: 'unauthorized', message: 'scripted: unknown token' } }),
  }));
  await expectTokenRefused(page, 'a 401 from /stats', /401 unauthorized: scripted: unknown token/);
  guard.token = null;
  await expectTokenDropped(page, TOKEN);
  await page.unroute('**/stats');
  await signIn(page, guard, TOKEN);
  await waitInPage(page, 'the header counts after signing in again',
    () => /^\d+$/.test(document.querySelector('[data-testid="count-total"]')?.textContent.trim() ?? ''));
  guard.check();
  await page.close();
  log('scripted stream: comments, CR/CRLF, two-line data, retry:, reconnection with the token, no end while failed; retry posts the reason only; 403 keeps the token, 401 asks again');
}

/**
 * A page of another origin (about:blank, opaque) that embeds the operations page in a frame:
 * Chromium refuses to show it there (the policy's frame-ancestors 'none', X-Frame-Options DENY),
 * says so in the embedding page's console, and the frame never holds the page's token dialog.
 */
async function framingRefused(browser) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const refusals = [];
  page.on('console', (msg) => {
    if (/frame-ancestors|X-Frame-Options|Refused to (display|frame)/i.test(msg.text())) refusals.push(msg.text());
  });
  await page.setContent(`<iframe src="${BASE}/" width="800" height="600"></iframe>`);
  await until('Chromium to refuse showing the page in another origin\'s frame', () => refusals.length > 0);
  const frame = page.frames().find((f) => f !== page.mainFrame());
  if (frame && (await frame.locator('[data-testid="token-dialog"]').count()) > 0) {
    fail(`the page was shown in another origin's frame (${frame.url()})`);
  }
  await page.screenshot({ path: join(ARTIFACT_DIR, 'framing-refused.png') });
  await context.close();
  log(`framing: refused (${refusals[0]})`);
}

async function main() {
  if (!BASE) fail('set SAGA_API to the orchestrator\'s base URL, e.g. http://127.0.0.1:18081');
  if (!TOKEN || !TOKEN_NAME || !VIEWER_TOKEN) {
    fail('set SAGA_TOKEN (roles operator,client), SAGA_TOKEN_NAME (its name) and SAGA_VIEWER_TOKEN (role viewer)');
  }
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
