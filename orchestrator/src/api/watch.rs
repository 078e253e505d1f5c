//! `GET /sagas/{id}/watch`: live streams of sagas, fed by one shared change feed.
//!
//! However many streams are open, one task asks PostgreSQL what changed, every
//! [`WatchFeed::interval`], for all watched sagas at once: one statement for the sagas whose
//! version moved and one for their new history lines, on the API's own pool. Each change is
//! broadcast to the streams on that saga. A stream reads the database itself only when it
//! opens (its first snapshot) and when it fell too far behind the broadcast to catch up.
//! Streams are capped, in all and per token ([`WatchFeed::try_open`]); one more is answered
//! 429. Each stream is bounded: it lives at most [`WatchLimits::max_lifetime`] (it opens with
//! an SSE `retry`, and the client reconnects for a fresh snapshot), and sends at most
//! [`WatchLimits::snapshot_lines`] history lines at once (the latest; a `history_truncated`
//! event says where the history API pages the rest from).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{ApiError, AppState, SagaView};
use crate::auth::Caller;
use crate::saga::{Saga, SagaState};
use crate::store::{self, HistoryRecord};

/// What changed in one saga since the feed last looked.
#[derive(Debug)]
struct Change {
    saga: Saga,
    version: i64,
    history: Vec<HistoryRecord>,
    /// Lines left out up to this history id (inclusive): a stream sends at most
    /// [`WatchLimits::snapshot_lines`] at once.
    omitted_through: Option<i64>,
}

/// How much one stream and one token may hold.
#[derive(Debug, Clone, Copy)]
pub struct WatchLimits {
    /// Streams open at once, in all.
    pub max_streams: usize,
    /// Streams one token may hold at once.
    pub max_streams_per_token: usize,
    /// The longest a stream stays open before the server ends it (the client reconnects).
    pub max_lifetime: Duration,
    /// History lines one read of a stream sends at most: the latest.
    pub snapshot_lines: i64,
}

/// How long a client waits before it reconnects a stream the server ended (SSE `retry`).
pub const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// A saga someone watches: how far the feed has seen it, and its watchers.
struct Watched {
    /// `None` until its first watcher has read its snapshot (so the feed does not broadcast
    /// the whole history to a stream that is reading it anyway).
    seen: Option<(i64, i64)>,
    changes: broadcast::Sender<Arc<Change>>,
}

/// Changes a lagging stream may fall behind before it re-reads the saga itself.
const BROADCAST_CAPACITY: usize = 16;
/// History lines read per statement by a stream catching up.
const HISTORY_PAGE: i64 = 1_000;

pub struct WatchFeed {
    pool: PgPool,
    watched: Mutex<HashMap<Uuid, Watched>>,
    streams: Arc<Semaphore>,
    /// Streams open now, by token name.
    per_token: Arc<Mutex<HashMap<String, usize>>>,
    limits: WatchLimits,
    pub interval: Duration,
}

/// One open stream's place, in all and in its token's count; given back when dropped.
struct StreamSlot {
    _permit: OwnedSemaphorePermit,
    per_token: Arc<Mutex<HashMap<String, usize>>>,
    token: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut counts = self
            .per_token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.token) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.token);
            }
        }
    }
}

impl WatchFeed {
    pub fn new(pool: PgPool, limits: WatchLimits, interval: Duration) -> Self {
        Self {
            pool,
            watched: Mutex::new(HashMap::new()),
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            per_token: Arc::default(),
            limits,
            interval,
        }
    }

    /// A place for one more stream of `caller`, or the refusal: all streams taken, or all
    /// the token may hold.
    fn try_open(&self, caller: &Caller) -> Result<StreamSlot, ApiError> {
        let too_many = |message: String| {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_streams", message)
        };
        let mut counts = self
            .per_token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = counts.get(&caller.name).copied().unwrap_or(0);
        if held >= self.limits.max_streams_per_token {
            return Err(too_many(format!(
                "the token {:?} holds {held} live streams, the most one token may \
                 (WATCH_MAX_STREAMS_PER_TOKEN); close one or try again later",
                caller.name
            )));
        }
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            too_many(format!(
                "{} live streams are open, the most this server serves; try again later",
                self.limits.max_streams
            ))
        })?;
        *counts.entry(caller.name.clone()).or_default() += 1;
        Ok(StreamSlot {
            _permit: permit,
            per_token: self.per_token.clone(),
            token: caller.name.clone(),
        })
    }

    fn subscribe(&self, saga_id: Uuid) -> broadcast::Receiver<Arc<Change>> {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        watched
            .entry(saga_id)
            .or_insert_with(|| Watched {
                seen: None,
                changes: broadcast::channel(BROADCAST_CAPACITY).0,
            })
            .changes
            .subscribe()
    }

    /// Tells the feed where a new saga's first snapshot stopped; from there on it broadcasts.
    fn seen_from(&self, saga_id: Uuid, version: i64, history_id: i64) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = watched.get_mut(&saga_id) {
            entry.seen.get_or_insert((version, history_id));
        }
    }

    /// Looks for changes every `interval` until `shutdown`. A failed look is logged and
    /// tried again at the next tick: streams then see changes late, never wrongly.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(e) = self.look().await {
                tracing::warn!(error.message = %messaging::Chain(&e), "watch feed: reading changes failed");
            }
        }
    }

    async fn look(&self) -> crate::Result<()> {
        let seen: Vec<(Uuid, i64, i64)> = {
            let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            watched.retain(|_, w| w.changes.receiver_count() > 0);
            watched
                .iter()
                .filter_map(|(id, w)| w.seen.map(|(version, history)| (*id, version, history)))
                .collect()
        };
        if seen.is_empty() {
            return Ok(());
        }
        let changed = store::changed_since(&self.pool, &seen).await?;
        if changed.is_empty() {
            return Ok(());
        }
        let last_lines: HashMap<Uuid, i64> = seen
            .iter()
            .map(|(id, _, history)| (*id, *history))
            .collect();
        let after: Vec<(Uuid, i64)> = changed
            .iter()
            .filter_map(|(saga, _)| last_lines.get(&saga.id).map(|line| (saga.id, *line)))
            .collect();
        let mut history = store::history_since(&self.pool, &after).await?;
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        for (saga, version) in changed {
            let lines: Vec<HistoryRecord> = history.remove(&saga.id).unwrap_or_default();
            let Some(entry) = watched.get_mut(&saga.id) else {
                continue;
            };
            let last_line = lines.last().map(|l| l.id).or(entry.seen.map(|(_, h)| h));
            entry.seen = Some((version, last_line.unwrap_or(0)));
            // No receiver left is fine: the entry goes at the next look.
            let _ = entry.changes.send(Arc::new(Change {
                saga,
                version,
                history: lines,
                omitted_through: None,
            }));
        }
        Ok(())
    }
}

/// Server-Sent Events with the saga (`saga`) each time it changes, its new history lines
/// (`history`), and `end` once it is completed or compensated. A failed saga's stream stays
/// open: an operator may still move it. Every stream ends after `WATCH_STREAM_MAX_MS` (the
/// client reconnects after the `retry` it opened with).
pub async fn watch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(saga_id) = path?;
    let permit = state.watch.try_open(&caller)?;
    // Subscribed before the snapshot is read, so that no change falls between the two.
    let changes = state.watch.subscribe(saga_id);
    let snapshot = read_since(&state.pool, saga_id, 0, state.watch.limits.snapshot_lines)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .ok_or_else(|| ApiError::not_found(format!("no saga {saga_id}")))?;
    let (events_tx, events_rx) = mpsc::channel::<Event>(64);
    // Its whole life bounded, sends to a client that does not read included: then the stream
    // ends (its place is given back) and the client reconnects (`retry`) to a fresh snapshot.
    let lifetime = state.watch.limits.max_lifetime;
    tokio::spawn(async move {
        let streamed = stream_saga(state, saga_id, snapshot, changes, events_tx, permit);
        let _ = tokio::time::timeout(lifetime, streamed).await;
    });
    let stream = futures_util::stream::unfold(events_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A saga and its history lines after `history_id`, the latest `max_lines` of them at most,
/// read by one stream.
async fn read_since(
    pool: &PgPool,
    saga_id: Uuid,
    mut history_id: i64,
    max_lines: i64,
) -> crate::Result<Option<Change>> {
    let Some((saga, version)) = store::get(pool, saga_id).await? else {
        return Ok(None);
    };
    // The newest line left out, when there are more than `max_lines` (the index on
    // (saga_id, id) walks back from the newest).
    let omitted_through = sqlx::query_scalar!(
        "SELECT id FROM saga_history WHERE saga_id = $1 AND id > $2
         ORDER BY id DESC OFFSET $3 LIMIT 1",
        saga_id,
        history_id,
        max_lines
    )
    .fetch_optional(pool)
    .await?;
    if let Some(through) = omitted_through {
        history_id = through;
    }
    let mut history = Vec::new();
    loop {
        let page = store::history(pool, saga_id, history_id, HISTORY_PAGE).await?;
        let full = page.len() as i64 == HISTORY_PAGE;
        history_id = page.last().map_or(history_id, |l| l.id);
        history.extend(page);
        if !full {
            break;
        }
    }
    Ok(Some(Change {
        saga,
        version,
        history,
        omitted_through,
    }))
}

/// What a stream has sent.
struct Sent {
    version: i64,
    history_id: i64,
}

async fn stream_saga(
    state: AppState,
    saga_id: Uuid,
    snapshot: Change,
    mut changes: broadcast::Receiver<Arc<Change>>,
    events: mpsc::Sender<Event>,
    _slot: StreamSlot,
) {
    let mut sent = Sent {
        version: -1,
        history_id: 0,
    };
    // First the reconnection wait, so that a client reconnects soon after this stream ends.
    if events
        .send(Event::default().retry(RECONNECT_AFTER).comment("watch"))
        .await
        .is_err()
    {
        return;
    }
    if !send_change(&events, &mut sent, saga_id, &snapshot).await {
        return;
    }
    state
        .watch
        .seen_from(saga_id, sent.version, sent.history_id);
    loop {
        let change = tokio::select! {
            received = changes.recv() => match received {
                Ok(change) => change,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let lines = state.watch.limits.snapshot_lines;
                    match read_since(&state.pool, saga_id, sent.history_id, lines).await {
                        Ok(Some(change)) => Arc::new(change),
                        // Removed by retention while watched: nothing more will happen to it.
                        Ok(None) => return,
                        Err(e) => {
                            tracing::warn!(error.message = %messaging::Chain(&e), %saga_id, "watch: catching up failed");
                            let _ = send_json(&events, "error", &json!({ "error": {
                                "code": "internal", "message": "reading the saga failed; reconnect"
                            } })).await;
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = events.closed() => return,
            _ = state.shutdown.cancelled() => return,
        };
        if !send_change(&events, &mut sent, saga_id, &change).await {
            return;
        }
    }
}

/// Sends what `change` has that the stream has not: history lines, then the saga if its
/// version moved, then `end` if it is over. `false` when the stream is done: ended, or its
/// client has gone.
async fn send_change(
    events: &mpsc::Sender<Event>,
    sent: &mut Sent,
    saga_id: Uuid,
    change: &Change,
) -> bool {
    if let Some(through) = change.omitted_through.filter(|t| *t > sent.history_id) {
        // The lines in between are on the history API's pages, from `after` on.
        let truncated = json!({
            "after": sent.history_id,
            "through": through,
            "history_url": format!("/sagas/{saga_id}/history?after={}", sent.history_id),
        });
        if !send_json(events, "history_truncated", &truncated).await {
            return false;
        }
    }
    let already_sent = sent.history_id;
    for line in change.history.iter().filter(|l| l.id > already_sent) {
        if !send_json(events, "history", line).await {
            return false;
        }
        sent.history_id = line.id;
    }
    if change.version > sent.version {
        sent.version = change.version;
        let view = SagaView::new(change.saga.clone(), change.version);
        if !send_json(events, "saga", &view).await {
            return false;
        }
    }
    let state = change.saga.state;
    if matches!(state, SagaState::Completed | SagaState::Compensated) {
        let _ = send_json(events, "end", &json!({ "state": state.as_str() })).await;
        return false;
    }
    true
}

/// Sends one SSE event; `false` when the client has gone.
async fn send_json<T: Serialize>(events: &mpsc::Sender<Event>, name: &str, data: &T) -> bool {
    let Ok(event) = Event::default().event(name).json_data(data) else {
        return false;
    };
    events.send(event).await.is_ok()
}
