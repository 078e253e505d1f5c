// The orchestrator's operations page: live counts, a filtered list of recent sagas, and a
// per-saga timeline fed by Server-Sent Events. Plain browser JavaScript, no build step.
//
// Everything the server sends is put into the page with textContent, never as HTML.
'use strict';

(() => {
  const STATS_INTERVAL_MS = 1000;
  const LIST_INTERVAL_MS = 2000;
  const PAGE_SIZE = 50;
  const MAX_LIMIT = 500;
  const ORDER_POLL_MS = 250;
  const ORDER_POLL_TIMEOUT_MS = 30000;
  const STATES = ['running', 'compensating', 'completed', 'compensated', 'failed'];
  const TERMINAL = new Set(['completed', 'compensated', 'failed']);
  const DASH = '\u2013'; // en dash: no value
  const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

  const DEMO_ORDERS = {
    happy: { customer_id: 'alice', country: 'DE' },
    payment_declined: { customer_id: 'carol', country: 'DE' },
    shipping_rejected: { customer_id: 'bob', country: 'AQ' },
  };

  const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);

  // ---------------------------------------------------------------------------------------
  // API access and errors

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** Fetches JSON; a non-2xx answer becomes an ApiError with the server's code and message. */
  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, {
        ...options,
        headers: { Accept: 'application/json', ...(options.headers || {}) },
        cache: 'no-store',
      });
    } catch (e) {
      throw new ApiError(0, 'network', `${path}: server unreachable (${e.message})`);
    }
    const body = await response.text();
    let parsed = null;
    try {
      parsed = body ? JSON.parse(body) : null;
    } catch {
      parsed = null;
    }
    if (!response.ok) {
      const error = parsed && parsed.error;
      if (error && typeof error.message === 'string') {
        throw new ApiError(response.status, String(error.code || 'error'), error.message);
      }
      throw new ApiError(response.status, 'http_' + response.status,
        `${response.status} ${response.statusText || ''}`.trim());
    }
    if (parsed === null) {
      throw new ApiError(response.status, 'bad_response', `${path}: the answer is not JSON`);
    }
    return { status: response.status, body: parsed };
  }

  // Errors are keyed by where they came from, so a poller that recovers clears its own error.
  const errors = new Map();
  const errorBar = $('error-bar');
  const errorList = $('error-list');

  function showError(source, error) {
    let text;
    if (error instanceof ApiError) {
      text = error.status ? `${error.status} ${error.code}: ${error.message}` : error.message;
    } else {
      text = String(error && error.message ? error.message : error);
    }
    errors.set(source, `${source}: ${text}`);
    renderErrors();
  }

  function clearError(source) {
    if (errors.delete(source)) renderErrors();
  }

  function renderErrors() {
    const items = [];
    for (const [source, text] of errors) {
      const li = document.createElement('li');
      li.dataset.source = source;
      li.dataset.testid = 'error-message';
      li.textContent = text;
      items.push(li);
    }
    errorList.replaceChildren(...items);
    errorBar.hidden = errors.size === 0;
  }

  $('error-dismiss').addEventListener('click', () => {
    errors.clear();
    renderErrors();
  });

  // ---------------------------------------------------------------------------------------
  // Formatting

  // Server clock minus ours, learnt from /stats, so that ages do not depend on this machine's clock.
  let clockOffsetMs = 0;
  const serverNow = () => Date.now() + clockOffsetMs;

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return DASH;
    const s = Math.max(0, seconds);
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.floor(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} m ${Math.floor(s % 60)} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} m`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  const pad = (n, width = 2) => String(n).padStart(width, '0');

  /** "HH:MM:SS.mmm" in local time; "YYYY-MM-DD HH:MM:SS.mmm" when not today. */
  function formatTime(iso) {
    if (!iso) return DASH;
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
    const today = new Date();
    if (d.toDateString() === today.toDateString()) return time;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
  }

  function formatRate(value) {
    if (typeof value !== 'number' || !Number.isFinite(value)) return DASH;
    return value >= 100 ? value.toFixed(0) : value.toFixed(2);
  }

  function formatMoney(cents, currency) {
    if (typeof cents !== 'number') return DASH;
    return `${(cents / 100).toFixed(2)} ${currency || ''}`.trim();
  }

  const shortId = (id) => (typeof id === 'string' ? id.slice(0, 8) : '');

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (key === 'text') node.textContent = value;
      else if (key === 'className') node.className = value;
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function setBadge(node, kind, value) {
    node.textContent = value || DASH;
    node.className = `badge ${kind}-${value || 'none'}`;
    node.dataset.state = value || '';
  }

  function timeSpan(iso, testid) {
    return el('time', { text: formatTime(iso), datetime: iso || undefined, title: iso || undefined, dataset: { testid } });
  }

  // ---------------------------------------------------------------------------------------
  // Header: counts and rates, every second

  const statsStatus = $('stats-status');
  let statsBusy = false;

  async function pollStats() {
    if (statsBusy) return;
    statsBusy = true;
    try {
      const { body } = await api('/stats');
      const counts = body.counts || {};
      for (const state of STATES) {
        const value = counts[state];
        $(`count-${state}`).textContent = Number.isInteger(value) ? String(value) : DASH;
      }
      $('count-total').textContent = Number.isInteger(body.total) ? String(body.total) : DASH;
      $('rate-started').textContent = formatRate(body.started_per_sec);
      $('rate-completed').textContent = formatRate(body.completed_per_sec);
      $('rate-compensated').textContent = formatRate(body.compensated_per_sec);
      $('rate-failed').textContent = formatRate(body.failed_per_sec);
      $('rate-window').textContent = Number.isFinite(body.window_secs) ? String(body.window_secs) : DASH;
      $('oldest-running').textContent = body.oldest_running_secs === null
        ? 'none' : formatDuration(body.oldest_running_secs);
      const at = Date.parse(body.at);
      if (!Number.isNaN(at)) clockOffsetMs = at - Date.now();
      statsStatus.textContent = 'live';
      statsStatus.dataset.status = 'live';
      statsStatus.title = `Statistics as of ${formatTime(body.at)}`;
      clearError('stats');
    } catch (e) {
      statsStatus.textContent = 'offline';
      statsStatus.dataset.status = 'offline';
      showError('stats', e);
    } finally {
      statsBusy = false;
    }
  }

  // ---------------------------------------------------------------------------------------
  // The list of recent sagas, every two seconds

  const filtersForm = $('filters');
  const rowsBody = $('saga-rows');
  const loadMoreButton = $('load-more');
  const listEmpty = $('saga-list-empty');
  const listInfo = $('list-info');

  const list = {
    sagas: [], // newest first
    nextCursor: null,
    token: 0, // the request whose answer counts
    pending: false,
    rows: new Map(), // saga id -> <tr>
  };
  let selectedSagaId = null;

  /** The filters as query parameters, or throws when one is not valid. */
  function filterParams() {
    const data = new FormData(filtersForm);
    const params = new URLSearchParams();
    const state = String(data.get('state') || '');
    if (state) params.set('state', state);
    const minAge = String(data.get('min_age_secs') || '').trim();
    if (minAge !== '') {
      if (!/^\d+$/.test(minAge)) throw new Error('min age must be a whole number of seconds \u2265 0');
      params.set('min_age_secs', minAge);
    }
    const step = String(data.get('step') || '');
    if (step) params.set('step', step);
    const reason = String(data.get('reason') || '').trim();
    if (reason) params.set('reason', reason);
    return params;
  }

  async function fetchList(mode) {
    let params;
    try {
      params = filterParams();
      clearError('filters');
    } catch (e) {
      showError('filters', e);
      return;
    }
    if (mode === 'more') {
      if (!list.nextCursor) return;
      params.set('limit', String(PAGE_SIZE));
      params.set('cursor', list.nextCursor);
    } else {
      // A refresh re-reads as many rows as are shown, so "load more" pages stay in view.
      params.set('limit', String(Math.min(MAX_LIMIT, Math.max(PAGE_SIZE, list.sagas.length))));
    }
    const token = ++list.token;
    list.pending = true;
    try {
      const { body } = await api(`/sagas?${params}`);
      if (token !== list.token) return; // the filters changed meanwhile
      const page = Array.isArray(body.sagas) ? body.sagas : [];
      if (mode === 'more') {
        const known = new Set(list.sagas.map((s) => s.saga_id));
        list.sagas = list.sagas.concat(page.filter((s) => !known.has(s.saga_id)));
      } else {
        list.sagas = page;
      }
      list.nextCursor = typeof body.next_cursor === 'string' ? body.next_cursor : null;
      renderList();
      clearError('list');
    } catch (e) {
      if (token === list.token) showError('list', e);
    } finally {
      if (token === list.token) list.pending = false;
    }
  }

  function refreshList() {
    if (list.pending) return;
    fetchList('refresh');
  }

  function resetList() {
    list.sagas = [];
    list.nextCursor = null;
    list.pending = false;
    fetchList('refresh');
  }

  function sagaAgeSeconds(saga) {
    const created = Date.parse(saga.created_at);
    return Number.isNaN(created) ? null : (serverNow() - created) / 1000;
  }

  function renderRow(tr, saga) {
    tr.dataset.sagaId = saga.saga_id;
    tr.dataset.state = saga.state;
    tr.classList.toggle('selected', saga.saga_id === selectedSagaId);
    tr.setAttribute('aria-selected', saga.saga_id === selectedSagaId ? 'true' : 'false');
    const cells = tr.children;
    cells[0].textContent = shortId(saga.saga_id);
    cells[0].title = saga.saga_id;
    cells[1].textContent = shortId(saga.order_id);
    cells[1].title = saga.order_id;
    setBadge(cells[2].firstChild, 'state', saga.state);
    cells[3].textContent = saga.current_step || DASH;
    cells[4].textContent = formatDuration(sagaAgeSeconds(saga));
    cells[4].title = `created ${saga.created_at}`;
    cells[5].textContent = saga.failure_reason || '';
    cells[5].title = saga.failure_reason || '';
  }

  function newRow() {
    const tr = el('tr', { dataset: { testid: 'saga-row' }, tabindex: '0' }, [
      el('td', { className: 'mono', dataset: { testid: 'saga-id' } }),
      el('td', { className: 'mono', dataset: { testid: 'order-id' } }),
      el('td', {}, [el('span', { dataset: { testid: 'saga-state' } })]),
      el('td', { dataset: { testid: 'current-step' } }),
      el('td', { className: 'num', dataset: { testid: 'saga-age' } }),
      el('td', { className: 'reason', dataset: { testid: 'failure-reason' } }),
    ]);
    return tr;
  }

  function renderList() {
    const seen = new Map();
    const ordered = [];
    for (const saga of list.sagas) {
      if (!saga || typeof saga.saga_id !== 'string' || seen.has(saga.saga_id)) continue;
      const tr = list.rows.get(saga.saga_id) || newRow();
      renderRow(tr, saga);
      seen.set(saga.saga_id, tr);
      ordered.push(tr);
    }
    list.rows = seen;
    rowsBody.replaceChildren(...ordered);
    listEmpty.hidden = ordered.length > 0;
    loadMoreButton.hidden = !list.nextCursor;
    listInfo.textContent = `${ordered.length} shown${list.nextCursor ? ', more available' : ''}`;
  }

  function markSelectedRow() {
    for (const [id, tr] of list.rows) {
      tr.classList.toggle('selected', id === selectedSagaId);
      tr.setAttribute('aria-selected', id === selectedSagaId ? 'true' : 'false');
    }
  }

  rowsBody.addEventListener('click', (event) => {
    const tr = event.target.closest('tr[data-saga-id]');
    if (tr) openSagaViaHash(tr.dataset.sagaId);
  });
  rowsBody.addEventListener('keydown', (event) => {
    if (event.key !== 'Enter' && event.key !== ' ') return;
    const tr = event.target.closest('tr[data-saga-id]');
    if (!tr) return;
    event.preventDefault();
    openSagaViaHash(tr.dataset.sagaId);
  });
  loadMoreButton.addEventListener('click', () => fetchList('more'));

  let reasonTimer = null;
  filtersForm.addEventListener('submit', (event) => {
    event.preventDefault();
    resetList();
  });
  filtersForm.addEventListener('change', () => resetList());
  filtersForm.addEventListener('input', (event) => {
    if (event.target.name !== 'reason' && event.target.name !== 'min_age_secs') return;
    clearTimeout(reasonTimer);
    reasonTimer = setTimeout(resetList, 300);
  });
  filtersForm.addEventListener('reset', () => setTimeout(resetList, 0));

  // ---------------------------------------------------------------------------------------
  // The timeline of one saga, live over Server-Sent Events

  const timeline = $('timeline');
  const connection = $('timeline-connection');
  const stepsTable = $('steps');
  const historyList = $('history');

  let watch = null; // { sagaId, source, historyIds, ended }

  function setConnection(status, text) {
    connection.dataset.status = status;
    connection.textContent = text;
  }

  function closeWatch() {
    if (watch && watch.source) watch.source.close();
    watch = null;
  }

  function openSaga(sagaId) {
    if (watch && watch.sagaId === sagaId) return;
    closeWatch();
    selectedSagaId = sagaId;
    markSelectedRow();
    timeline.hidden = false;
    timeline.dataset.sagaId = sagaId;
    $('timeline-saga-id').textContent = sagaId;
    setBadge($('timeline-state'), 'state', '');
    for (const id of ['timeline-order-id', 'timeline-customer', 'timeline-items', 'timeline-total',
      'timeline-address', 'timeline-current-step', 'timeline-created', 'timeline-updated',
      'timeline-finished', 'timeline-deadline', 'timeline-version']) {
      $(id).textContent = '';
    }
    $('timeline-failure').hidden = true;
    for (const old of stepsTable.querySelectorAll('tbody')) old.remove();
    historyList.replaceChildren();
    setConnection('connecting', 'connecting\u2026');

    const current = { sagaId, source: null, historyIds: new Set(), ended: false };
    watch = current;
    const source = new EventSource(`/sagas/${encodeURIComponent(sagaId)}/watch`);
    current.source = source;

    source.addEventListener('open', () => {
      if (watch !== current) return;
      setConnection('live', 'live');
      clearError('timeline');
    });
    source.addEventListener('saga', (event) => {
      if (watch !== current) return;
      const saga = parseEvent(event, 'saga');
      if (saga) {
        renderSaga(saga);
        setConnection('live', 'live');
      }
    });
    source.addEventListener('history', (event) => {
      if (watch !== current) return;
      const entry = parseEvent(event, 'history');
      if (entry) appendHistory(current, entry);
    });
    source.addEventListener('end', (event) => {
      if (watch !== current) return;
      current.ended = true;
      source.close();
      const data = parseEvent(event, 'end');
      setConnection('ended', data && data.state ? `ended: ${data.state}` : 'ended');
      refreshList();
    });
    source.addEventListener('error', (event) => {
      if (watch !== current || current.ended) return;
      if (event instanceof MessageEvent && typeof event.data === 'string') {
        // An `event: error` the server sent (it could not read the saga); it then closes the
        // stream and the browser reconnects.
        showError('timeline', new Error(`live stream of saga ${current.sagaId}: ${event.data}`));
        return;
      }
      if (source.readyState === EventSource.CLOSED) {
        // The server refused the stream (an unknown saga, a bad id): ask it why.
        setConnection('closed', 'closed');
        explainWatchFailure(current);
      } else {
        setConnection('reconnecting', 'reconnecting\u2026');
      }
    });
  }

  async function explainWatchFailure(current) {
    try {
      await api(`/sagas/${encodeURIComponent(current.sagaId)}`);
      showError('timeline', new Error(`the live stream of saga ${current.sagaId} closed`));
    } catch (e) {
      if (watch === current) showError('timeline', e);
    }
  }

  function parseEvent(event, kind) {
    try {
      return JSON.parse(event.data);
    } catch (e) {
      showError('timeline', new Error(`unreadable "${kind}" event: ${e.message}`));
      return null;
    }
  }

  function renderSaga(saga) {
    timeline.dataset.state = saga.state;
    $('timeline-saga-id').textContent = saga.saga_id;
    setBadge($('timeline-state'), 'state', saga.state);
    $('timeline-order-id').textContent = saga.order_id;
    const order = saga.order || {};
    $('timeline-customer').textContent = order.customer_id || DASH;
    $('timeline-items').textContent = Array.isArray(order.items)
      ? order.items.map((i) => `${i.quantity} \u00d7 ${i.sku} @ ${formatMoney(i.unit_price_cents, order.currency)}`).join(', ')
      : DASH;
    $('timeline-total').textContent = formatMoney(order.total_cents, order.currency);
    const a = order.shipping_address;
    $('timeline-address').textContent = a ? `${a.line1}, ${a.postal_code} ${a.city}, ${a.country}` : DASH;
    $('timeline-current-step').textContent = saga.current_step || DASH;
    for (const [id, iso] of [['timeline-created', saga.created_at], ['timeline-updated', saga.updated_at],
      ['timeline-finished', saga.finished_at], ['timeline-deadline', saga.deadline_at]]) {
      const node = $(id);
      node.textContent = formatTime(iso);
      node.title = iso || '';
    }
    $('timeline-version').textContent = `${saga.version ?? DASH} (definition ${saga.definition_version ?? DASH})`;
    const failure = $('timeline-failure');
    failure.hidden = !saga.failure_reason;
    failure.textContent = saga.failure_reason || '';

    // One <tbody> per step: its numbers and times, then its failure reason on a row of its own.
    const bodies = (Array.isArray(saga.steps) ? saga.steps : []).map((step) => {
      const main = el('tr', {}, [
        el('th', { scope: 'row', text: step.name }),
        el('td', {}, [el('span', { className: `badge step-${step.status}`, text: step.status, dataset: { testid: 'step-status', state: step.status } })]),
        el('td', { className: 'num', text: String(step.attempts ?? DASH), dataset: { testid: 'step-attempts' } }),
        el('td', { className: 'num', text: String(step.compensation_attempts ?? DASH), dataset: { testid: 'step-compensation-attempts' } }),
        el('td', { className: 'times' }, [
          el('div', {}, [el('span', { className: 'label', text: 'start ' }), timeSpan(step.started_at, 'step-started')]),
          el('div', {}, [el('span', { className: 'label', text: 'end ' }), timeSpan(step.finished_at, 'step-finished')]),
        ]),
        el('td', { className: 'times' }, [
          el('div', {}, [el('span', { className: 'label', text: 'start ' }), timeSpan(step.compensation_started_at, 'step-compensation-started')]),
          el('div', {}, [el('span', { className: 'label', text: 'done ' }), timeSpan(step.compensated_at, 'step-compensated')]),
        ]),
      ]);
      const reason = el('tr', { className: 'step-reason' }, [
        el('td', { colspan: '6', className: 'reason', text: step.failure_reason || '', dataset: { testid: 'step-failure-reason' } }),
      ]);
      reason.hidden = !step.failure_reason;
      return el('tbody', {
        dataset: { testid: `step-${step.name}`, step: step.name, status: step.status },
        className: saga.current_step === step.name ? 'current' : undefined,
      }, [main, reason]);
    });
    for (const old of stepsTable.querySelectorAll('tbody')) old.remove();
    stepsTable.append(...bodies);

    // Keep the list row in step with what the stream says.
    const index = list.sagas.findIndex((s) => s.saga_id === saga.saga_id);
    if (index >= 0) {
      list.sagas[index] = saga;
      const tr = list.rows.get(saga.saga_id);
      if (tr) renderRow(tr, saga);
    }
  }

  function appendHistory(current, entry) {
    const key = entry.id ?? `${entry.at}|${entry.message_type}|${entry.message_id}`;
    if (current.historyIds.has(key)) return; // sent again after a reconnect
    current.historyIds.add(key);
    const li = el('li', {
      dataset: { testid: 'history-entry', decision: entry.decision, messageType: entry.message_type, id: entry.id },
    }, [
      el('time', { text: formatTime(entry.at), datetime: entry.at, title: entry.at, dataset: { testid: 'history-at' } }),
      el('span', { className: 'type', text: entry.message_type, dataset: { testid: 'history-type' } }),
      el('span', { className: `badge decision-${entry.decision}`, text: entry.decision, dataset: { testid: 'history-decision' } }),
      el('span', { className: 'detail', text: entry.detail || '', dataset: { testid: 'history-detail' } }),
      el('span', { className: 'after', dataset: { testid: 'history-state-after' } }, [
        '\u2192 ', el('span', { className: `badge state-${entry.state_after}`, text: entry.state_after || DASH }),
      ]),
    ]);
    // Entries come in id order; one that arrives late is put in its place.
    const id = Number(entry.id);
    let before = null;
    if (Number.isFinite(id)) {
      for (const other of historyList.children) {
        if (Number(other.dataset.id) > id) { before = other; break; }
      }
    }
    historyList.insertBefore(li, before);
  }

  function closeTimeline() {
    closeWatch();
    selectedSagaId = null;
    timeline.hidden = true;
    delete timeline.dataset.sagaId;
    delete timeline.dataset.state;
    markSelectedRow();
    clearError('timeline');
  }

  $('timeline-close').addEventListener('click', () => {
    closeTimeline();
    if (location.hash) history.pushState(null, '', location.pathname + location.search);
  });

  // Deep links: /#saga=<uuid>
  function sagaFromHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ''));
    return params.get('saga');
  }

  function openSagaViaHash(sagaId) {
    const hash = `#saga=${sagaId}`;
    if (location.hash === hash) openSaga(sagaId);
    else location.hash = hash; // hashchange opens it
  }

  function followHash() {
    const sagaId = sagaFromHash();
    if (sagaId === null || sagaId === '') {
      if (watch) closeTimeline();
      return;
    }
    if (!UUID_RE.test(sagaId)) {
      showError('link', new Error(`"${sagaId}" is not a saga id`));
      return;
    }
    clearError('link');
    openSaga(sagaId.toLowerCase());
  }

  window.addEventListener('hashchange', followHash);

  // ---------------------------------------------------------------------------------------
  // Demo orders

  const demoForm = $('demo-form');
  const orderStatus = $('order-status');
  const placeButton = $('place-order');

  function demoOrder(scenario) {
    const demo = DEMO_ORDERS[scenario] || DEMO_ORDERS.happy;
    return {
      customer_id: demo.customer_id,
      items: [{ sku: 'WIDGET', quantity: 1, unit_price_cents: 1000 }],
      total_cents: 1000,
      currency: 'EUR',
      shipping_address: { country: demo.country, city: 'Berlin', line1: 'Unter den Linden 1', postal_code: '10117' },
    };
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function placeDemoOrder(scenario) {
    placeButton.disabled = true;
    orderStatus.dataset.orderId = '';
    orderStatus.textContent = 'placing\u2026';
    try {
      const { body } = await api('/orders', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(demoOrder(scenario)),
      });
      const orderId = body.order_id;
      orderStatus.dataset.orderId = orderId;
      orderStatus.textContent = `order ${shortId(orderId)} placed, waiting for its saga\u2026`;
      clearError('order');
      const statusUrl = typeof body.status_url === 'string' ? body.status_url : `/orders/${orderId}/saga`;
      const deadline = Date.now() + ORDER_POLL_TIMEOUT_MS;
      for (;;) {
        try {
          const { body: saga } = await api(statusUrl);
          orderStatus.textContent = `order ${shortId(orderId)} \u2192 saga ${shortId(saga.saga_id)}`;
          orderStatus.dataset.sagaId = saga.saga_id;
          refreshList();
          openSagaViaHash(saga.saga_id);
          return;
        } catch (e) {
          // 404 until the orchestrator has read the order from Kafka.
          if (!(e instanceof ApiError && e.status === 404)) throw e;
        }
        if (Date.now() > deadline) {
          throw new Error(`no saga for order ${orderId} after ${ORDER_POLL_TIMEOUT_MS / 1000} s`);
        }
        await sleep(ORDER_POLL_MS);
      }
    } catch (e) {
      orderStatus.textContent = 'failed';
      showError('order', e);
    } finally {
      placeButton.disabled = false;
    }
  }

  demoForm.addEventListener('submit', (event) => {
    event.preventDefault();
    placeDemoOrder(String(new FormData(demoForm).get('scenario') || 'happy'));
  });

  // ---------------------------------------------------------------------------------------
  // Start

  function every(ms, task) {
    setInterval(() => {
      if (!document.hidden) task();
    }, ms);
  }

  pollStats();
  resetList();
  followHash();
  every(STATS_INTERVAL_MS, pollStats);
  every(LIST_INTERVAL_MS, refreshList);
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) {
      pollStats();
      refreshList();
    }
  });
})();
