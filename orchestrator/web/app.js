// The orchestrator's operations page: live counts, a filtered list of recent sagas, a
// per-saga timeline fed by Server-Sent Events, and the operator actions. Plain browser
// JavaScript, no build step.
//
// Every API call carries the tab's bearer token (asked for in a dialog). Everything the server
// sends is put into the page with textContent, never as HTML.
'use strict';

(() => {
  const STATS_INTERVAL_MS = 1000;
  const LIST_INTERVAL_MS = 2000;
  const PAGE_SIZE = 50;
  const MAX_LIMIT = 500;
  const ORDER_POLL_MS = 250;
  const ORDER_POLL_TIMEOUT_MS = 30000;
  // The saga states, in the engine's order, and those in which nothing more happens to a saga
  // (its live stream ends, no action applies: `failed` is not among them, it waits for an
  // operator). Both come from the API's own document (loadStates), whose enums a server test
  // keeps equal to the engine's.
  let sagaStates = [];
  let finalStates = new Set();
  // The state each operator action fits (the server refuses the rest with 409), by action
  // name: from the API document too (each action's `x-saga-state`).
  let actionStates = {};
  // How long a dropped live stream waits before it reconnects, unless the server says otherwise
  // (`retry:`): what Chromium's EventSource waits.
  const RECONNECT_MS = 3000;
  const TOKEN_KEY = 'sagas.api-token';
  const DASH = '\u2013'; // en dash: no value
  const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

  const DEMO_ORDERS = {
    happy: { customer_id: 'alice', country: 'DE' },
    payment_declined: { customer_id: 'carol', country: 'DE' },
    shipping_rejected: { customer_id: 'bob', country: 'AQ' },
  };

  const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);

  // ---------------------------------------------------------------------------------------
  // The API token, kept for this tab only

  // sessionStorage, not localStorage or a cookie: the token lives as long as this tab, other
  // tabs do not see it, and the browser never attaches it to a request on its own (a cookie
  // would go along with requests other sites make the browser send). Where storage is
  // unavailable the token is kept in memory, and a reload asks again.
  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || null;
    } catch {
      return null;
    }
  }

  let token = storedToken();

  function keepToken(value) {
    token = value;
    try {
      sessionStorage.setItem(TOKEN_KEY, value);
    } catch {
      // in memory only
    }
  }

  function dropToken() {
    token = null;
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // nothing was stored
    }
  }

  const authorization = (value) => (value ? { Authorization: `Bearer ${value}` } : {});

  // ---------------------------------------------------------------------------------------
  // API access and errors

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** The ApiError of a non-2xx answer: the server's code and message, or its status line. */
  function errorOf(response, text) {
    let parsed = null;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      parsed = null;
    }
    const error = parsed && parsed.error;
    if (error && typeof error.message === 'string') {
      return new ApiError(response.status, String(error.code || 'error'), error.message);
    }
    return new ApiError(response.status, 'http_' + response.status,
      `${response.status} ${response.statusText || ''}`.trim());
  }

  /**
   * Fetches JSON with the tab's token (or `options.token`, which a 401 does not sign out); a
   * non-2xx answer becomes an ApiError with the server's code and message.
   */
  async function api(path, options = {}) {
    const { token: given, ...init } = options;
    const used = given === undefined ? token : given;
    if (!used) throw new ApiError(401, 'no_token', 'no API token; sign in first');
    let response;
    try {
      response = await fetch(path, {
        ...init,
        headers: { Accept: 'application/json', ...(init.headers || {}), ...authorization(used) },
        cache: 'no-store',
      });
    } catch (e) {
      throw new ApiError(0, 'network', `${path}: server unreachable (${e.message})`);
    }
    const body = await response.text();
    if (!response.ok) {
      const error = errorOf(response, body);
      if (response.status === 401 && given === undefined) tokenRefused(used, error);
      throw error;
    }
    let parsed = null;
    try {
      parsed = body ? JSON.parse(body) : null;
    } catch {
      parsed = null;
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

  function describe(error) {
    if (error instanceof ApiError) {
      return error.status ? `${error.status} ${error.code}: ${error.message}` : error.message;
    }
    return String(error && error.message ? error.message : error);
  }

  function showError(source, error) {
    // A refused token is for the token dialog to say, once, not for every poller.
    if (error instanceof ApiError && error.status === 401) return;
    errors.set(source, `${source}: ${describe(error)}`);
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
  // Signing in and out: the token dialog

  const tokenDialog = $('token-dialog');
  const tokenForm = $('token-form');
  const tokenInput = $('token-input');
  const tokenError = $('token-error');
  const tokenStatus = $('token-status');
  const tokenSubmit = $('token-submit');
  const authStatus = $('auth-status');
  const signOutButton = $('sign-out');
  const signInButton = $('sign-in');

  function renderAuth() {
    // The server has no "who am I"; the page knows a token is held, not whose it is.
    authStatus.textContent = token ? 'signed in' : 'no token';
    authStatus.dataset.status = token ? 'signed-in' : 'signed-out';
    signOutButton.hidden = !token;
    signInButton.hidden = Boolean(token);
  }

  /** Opens the token dialog, with why it is asked again when there is a reason. */
  function askForToken(message) {
    tokenError.textContent = message || '';
    tokenError.hidden = !message;
    tokenStatus.textContent = '';
    tokenInput.value = '';
    if (!tokenDialog.open) tokenDialog.showModal();
    tokenInput.focus();
  }

  function signIn(value) {
    keepToken(value);
    tokenDialog.close();
    renderAuth();
    // What went wrong with the previous token says nothing about this one.
    errors.clear();
    renderErrors();
    start();
  }

  /** Forgets the token and what was read with it (the #saga= link stays, for after). */
  function signOut(message) {
    dropToken();
    renderAuth();
    closeTimeline();
    list.request++; // an answer still on its way belongs to the old token
    list.sagas = [];
    list.nextCursor = null;
    list.pending = false;
    renderList();
    clearStats();
    errors.clear();
    renderErrors();
    askForToken(message);
  }

  /** A 401: the server does not know the token this tab holds, or no longer accepts it. */
  function tokenRefused(used, error) {
    if (used !== token) return; // the answer to a token already replaced or dropped
    signOut(`The server refused the token: ${describe(error)}`);
  }

  tokenForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    const candidate = tokenInput.value.trim();
    if (!candidate) return;
    tokenSubmit.disabled = true;
    tokenStatus.textContent = 'checking\u2026';
    try {
      // One read tells a token the server does not know (401) from one it knows. A token
      // that may not read (403, a client-only token) is kept for what it may do, and anything
      // else (the server unreachable) is for the page to show once signed in.
      await api('/stats', { token: candidate });
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        tokenStatus.textContent = '';
        tokenError.textContent = `The server refused the token: ${describe(e)}`;
        tokenError.hidden = false;
        tokenInput.select();
        return;
      }
    } finally {
      tokenSubmit.disabled = false;
    }
    signIn(candidate);
  });

  signOutButton.addEventListener('click', () => signOut(''));
  signInButton.addEventListener('click', () => askForToken(''));

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
    if (statsBusy || !token) return;
    statsBusy = true;
    const used = token;
    try {
      const { body } = await api('/stats');
      if (token !== used) return; // signed out meanwhile
      const counts = body.counts || {};
      for (const state of sagaStates) {
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
      if (token !== used) return;
      statsStatus.textContent = 'offline';
      statsStatus.dataset.status = 'offline';
      showError('stats', e);
    } finally {
      statsBusy = false;
    }
  }

  function clearStats() {
    for (const id of [...sagaStates.map((state) => `count-${state}`), 'count-total', 'rate-started',
      'rate-completed', 'rate-compensated', 'rate-failed', 'rate-window', 'oldest-running']) {
      $(id).textContent = DASH;
    }
    statsStatus.textContent = 'signed out';
    statsStatus.dataset.status = 'offline';
    statsStatus.title = 'Statistics need an API token';
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
    request: 0, // the request whose answer counts
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
    if (!token) return;
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
    const request = ++list.request;
    list.pending = true;
    try {
      const { body } = await api(`/sagas?${params}`);
      if (request !== list.request) return; // the filters changed, or the token, meanwhile
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
      if (request === list.request) showError('list', e);
    } finally {
      if (request === list.request) list.pending = false;
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
    // An order saga's order id; another saga type's key (a return id).
    cells[1].textContent = shortId(saga.order_id || saga.saga_key);
    cells[1].title = saga.order_id || `${saga.definition_name} ${saga.saga_key}`;
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
    listEmpty.hidden = ordered.length > 0 || !token; // signed out, nothing was asked
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

  // { sagaId, abort: AbortController, historyIds, ended, version, retryMs, acting }
  let watch = null;

  function setConnection(status, text) {
    connection.dataset.status = status;
    connection.textContent = text;
  }

  function closeWatch() {
    // Aborting the fetch closes the connection, and the server stops following the saga.
    if (watch) watch.abort.abort();
    watch = null;
  }

  function openSaga(sagaId) {
    if (watch && watch.sagaId === sagaId) return;
    closeWatch();
    selectedSagaId = sagaId;
    markSelectedRow();
    timeline.hidden = false;
    timeline.dataset.sagaId = sagaId;
    delete timeline.dataset.state;
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

    const current = {
      sagaId,
      abort: new AbortController(),
      historyIds: new Set(),
      ended: false,
      version: -1,
      retryMs: RECONNECT_MS,
      acting: false,
    };
    watch = current;
    resetActions();
    follow(current);
  }

  /** Resolves after `ms`, or at once when `signal` aborts. */
  function pause(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      signal.addEventListener('abort', () => {
        clearTimeout(timer);
        resolve();
      }, { once: true });
    });
  }

  /**
   * Follows the saga's event stream until `end`, or until another saga is opened (the abort).
   * EventSource cannot send the token, so this is fetch with a reader, keeping what EventSource
   * did: a stream that drops is opened again after `retryMs`, and one the server refuses is
   * not (but its answer, which EventSource could not read, is shown).
   */
  async function follow(current) {
    const path = `/sagas/${encodeURIComponent(current.sagaId)}/watch`;
    const { signal } = current.abort;
    while (watch === current && !current.ended) {
      const used = token;
      let response;
      try {
        response = await fetch(path, {
          headers: { Accept: 'text/event-stream', ...authorization(used) },
          cache: 'no-store',
          signal,
        });
      } catch {
        if (signal.aborted) return;
        setConnection('reconnecting', 'reconnecting\u2026');
        await pause(current.retryMs, signal);
        continue;
      }
      const type = response.headers.get('Content-Type') || '';
      if (!response.ok || !type.startsWith('text/event-stream') || !response.body) {
        const error = response.ok
          ? new ApiError(response.status, 'bad_response', `${path}: the answer is not an event stream`)
          : errorOf(response, await response.text().catch(() => ''));
        if (signal.aborted) return;
        if (error.status === 401) {
          setConnection('closed', 'closed');
          tokenRefused(used, error);
          return;
        }
        showError('timeline', error);
        if (error.status === 429 || error.status === 503) {
          // Too many streams, or the server not ready: a refusal that passes.
          setConnection('reconnecting', 'reconnecting\u2026');
          await pause(current.retryMs, signal);
          continue;
        }
        // An unknown saga, a bad id, a token that may not read: trying again will not help.
        setConnection('closed', 'closed');
        return;
      }
      setConnection('live', 'live');
      clearError('timeline');
      try {
        await readEvents(response.body, current);
      } catch {
        // The connection broke, or was aborted (checked below).
      }
      if (signal.aborted || watch !== current || current.ended) return;
      // The stream ended without `end`: the server went away, or closed after an `error` event.
      setConnection('reconnecting', 'reconnecting\u2026');
      await pause(current.retryMs, signal);
    }
  }

  /** Reads an event stream to its end, handing each event to `onStreamEvent`. */
  async function readEvents(body, current) {
    const reader = body.getReader();
    const decoder = new TextDecoder(); // UTF-8, as the format requires; it drops a leading BOM
    const parse = eventStreamParser((type, data) => onStreamEvent(current, type, data), (ms) => {
      current.retryMs = ms;
    });
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        parse(decoder.decode(value, { stream: true }));
      }
      parse(decoder.decode(), true);
    } finally {
      reader.releaseLock();
    }
  }

  /**
   * The event stream format of the HTML standard, fed as text arrives in arbitrary pieces:
   * lines end in CRLF, LF or CR; a blank line dispatches the event (`dispatch(type, data)`,
   * type `message` when none was named, several `data:` lines joined by newlines); lines
   * starting with ":" are comments (the server's keep-alives); `retry:` sets the reconnection
   * wait; `id:` is not used (the server sends none and replays the saga on reconnection).
   * An event the stream ends in the middle of is dropped, as EventSource drops it.
   */
  function eventStreamParser(dispatch, setRetry) {
    let buffer = '';
    let type = '';
    let data = [];
    const line = (text) => {
      if (text === '') {
        if (data.length) dispatch(type || 'message', data.join('\n'));
        type = '';
        data = [];
        return;
      }
      if (text.startsWith(':')) return;
      const colon = text.indexOf(':');
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? '' : text.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
      else if (field === 'retry' && /^\d+$/.test(value)) setRetry(Number(value));
    };
    return (text, last = false) => {
      buffer += text;
      const eol = /\r\n|\r|\n/g;
      let start = 0;
      let match;
      while ((match = eol.exec(buffer)) !== null) {
        // A CR that ends what has arrived may be the first half of a CRLF still on its way.
        if (!last && match[0] === '\r' && match.index === buffer.length - 1) break;
        line(buffer.slice(start, match.index));
        start = eol.lastIndex;
      }
      buffer = buffer.slice(start);
    };
  }

  function onStreamEvent(current, type, data) {
    if (watch !== current || current.ended) return;
    if (type === 'saga') {
      const saga = parseEvent(data, 'saga');
      if (saga) {
        showSaga(current, saga);
        setConnection('live', 'live');
      }
    } else if (type === 'history') {
      const entry = parseEvent(data, 'history');
      if (entry) appendHistory(current, entry);
    } else if (type === 'end') {
      // Sent once the saga is completed or compensated; a failed saga's stream stays open,
      // since an operator can still move it.
      current.ended = true;
      current.abort.abort(); // nothing more will come; the server closes its side too
      const end = parseEvent(data, 'end');
      setConnection('ended', end && end.state ? `ended: ${end.state}` : 'ended');
      fitActions();
      refreshList();
    } else if (type === 'error') {
      // The server could not read the saga; it closes the stream next, and we reconnect.
      let message = data;
      try {
        const parsed = JSON.parse(data);
        if (parsed && parsed.error && typeof parsed.error.message === 'string') message = parsed.error.message;
      } catch {
        // shown as it came
      }
      showError('timeline', new Error(`live stream of saga ${current.sagaId}: ${message}`));
    }
  }

  function parseEvent(data, kind) {
    try {
      return JSON.parse(data);
    } catch (e) {
      showError('timeline', new Error(`unreadable "${kind}" event: ${e.message}`));
      return null;
    }
  }

  /** Shows a saga from the stream or from an action's answer, whichever is newer. */
  function showSaga(current, saga) {
    if (Number.isInteger(saga.version)) {
      if (saga.version < current.version) return;
      current.version = saga.version;
    }
    renderSaga(saga);
    fitActions();
  }

  function renderSaga(saga) {
    timeline.dataset.state = saga.state;
    $('timeline-saga-id').textContent = saga.saga_id;
    setBadge($('timeline-state'), 'state', saga.state);
    $('timeline-order-id').textContent = saga.order_id || `${saga.definition_name} ${saga.saga_key}`;
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
    $('timeline-definition').textContent = saga.definition_name
      ? `${saga.definition_name} v${saga.definition_version ?? DASH}` : DASH;
    $('timeline-version').textContent = String(saga.version ?? DASH);
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
    resetActions();
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
    if (token) openSaga(sagaId.toLowerCase()); // else once signed in
  }

  window.addEventListener('hashchange', followHash);

  // ---------------------------------------------------------------------------------------
  // Operator actions on the saga shown: retry, skip, abort

  const actionsForm = $('actions');
  const actionReason = $('action-reason');
  const actionStatus = $('action-status');
  const actionButtons = [...actionsForm.querySelectorAll('button[data-action]')];

  function setActionStatus(status, text) {
    actionStatus.dataset.status = status;
    actionStatus.textContent = text;
  }

  /** Enables the actions that fit the state shown; the server has the last word (409). */
  function fitActions() {
    const state = timeline.dataset.state;
    actionsForm.hidden = !state || finalStates.has(state);
    const busy = !watch || watch.acting;
    for (const button of actionButtons) {
      button.disabled = busy || actionStates[button.dataset.action] !== state;
    }
  }

  function resetActions() {
    actionReason.value = '';
    setActionStatus('', '');
    clearError('action');
    fitActions();
  }

  async function operate(action) {
    const current = watch;
    if (!current || current.acting) return;
    const reason = actionReason.value.trim();
    if (!reason) {
      setActionStatus('refused', `${action}: give a reason; it goes into the saga's history`);
      actionReason.focus();
      return;
    }
    current.acting = true;
    fitActions();
    setActionStatus('busy', `${action}\u2026`);
    try {
      // The reason only: the server records the token's name as who acted.
      const { body: saga } = await api(`/sagas/${encodeURIComponent(current.sagaId)}/${action}`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ reason }),
      });
      if (watch !== current) return;
      actionReason.value = '';
      setActionStatus('done', `${action} done: the saga is ${saga.state}`);
      clearError('action');
      showSaga(current, saga);
    } catch (e) {
      if (watch !== current) return;
      if (e instanceof ApiError && e.status === 403) {
        // The token may not do this; it stays, for what it may do.
        setActionStatus('forbidden', `${action} not allowed: ${e.message}`);
      } else if (e instanceof ApiError && e.status === 409) {
        setActionStatus('refused', e.message); // the saga's state does not fit; the server says why
      } else {
        setActionStatus('failed', `${action} failed`);
        showError('action', e);
      }
    } finally {
      current.acting = false;
      if (watch === current) fitActions();
    }
  }

  for (const button of actionButtons) {
    button.addEventListener('click', () => operate(button.dataset.action));
  }
  actionsForm.addEventListener('submit', (event) => event.preventDefault());

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
    if (!token) {
      askForToken('');
      return;
    }
    placeButton.disabled = true;
    orderStatus.dataset.orderId = '';
    orderStatus.dataset.status = 'busy';
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
          orderStatus.dataset.status = 'done';
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
      if (e instanceof ApiError && e.status === 403) {
        // Placing orders needs the `client` role (and following the saga a reading one); the
        // token stays, for what it may do.
        orderStatus.dataset.status = 'forbidden';
        orderStatus.textContent = `not allowed: ${e.message}`;
        clearError('order');
      } else {
        orderStatus.dataset.status = 'failed';
        orderStatus.textContent = 'failed';
        showError('order', e);
      }
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

  /**
   * Fills the step filter with the steps of every saga definition the orchestrator runs,
   * grouped by definition (the steps are data, not part of the page).
   */
  async function loadDefinitions() {
    const used = token;
    try {
      const { body } = await api('/definitions');
      if (token !== used) return;
      const select = document.querySelector('select[name="step"]');
      const chosen = select.value;
      for (const old of select.querySelectorAll('optgroup')) old.remove();
      const definitions = Array.isArray(body.definitions) ? body.definitions : [];
      for (const definition of definitions.filter((d) => d.newest)) {
        const steps = Array.isArray(definition.steps) ? definition.steps : [];
        const group = el('optgroup', { label: `${definition.name} v${definition.version}` },
          steps.map((step) => el('option', { value: step.name, text: step.name })));
        select.append(group);
      }
      select.value = chosen;
      clearError('definitions');
    } catch (e) {
      if (token !== used) return;
      showError('definitions', e);
    }
  }

  /**
   * Reads the saga states from the API document (`SagaState`, `WatchEnd`'s final states, each
   * operator action's `x-saga-state`) and adds a count and a filter option for each state. The
   * document needs no token.
   */
  async function loadStates() {
    try {
      const response = await fetch('/openapi.json');
      if (!response.ok) throw new Error(`/openapi.json answered ${response.status}`);
      const apiDocument = await response.json();
      const schemas = apiDocument.components.schemas;
      sagaStates = schemas.SagaState.enum;
      finalStates = new Set(schemas.WatchEnd.properties.state.enum);
      const total = $('count-total').parentElement;
      for (const state of sagaStates) {
        total.before(el('div', { className: `count state-${state}` }, [
          el('dt', { text: state }),
          el('dd', { text: DASH, dataset: { testid: `count-${state}` } }),
        ]));
      }
      $('filter-state').append(...sagaStates.map((state) => el('option', { value: state, text: state })));
      actionStates = Object.fromEntries([...document.querySelectorAll('button[data-action]')].map((button) => {
        const action = button.dataset.action;
        const operation = (apiDocument.paths[`/sagas/{saga_id}/${action}`] || {}).post || {};
        return [action, operation['x-saga-state']];
      }));
      clearError('states');
    } catch (e) {
      showError('states', e);
    }
  }

  /** Reads everything the page shows; at load with a token, and each time one is entered. */
  function start() {
    loadDefinitions();
    pollStats();
    resetList();
    followHash();
  }

  renderAuth();
  loadStates().then(() => {
    if (token) {
      start();
    } else {
      clearStats();
      askForToken('');
    }
  });
  every(STATS_INTERVAL_MS, pollStats);
  every(LIST_INTERVAL_MS, refreshList);
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) {
      pollStats();
      refreshList();
    }
  });
})();
