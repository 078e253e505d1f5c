//! Reads: a saga, its history, a page of sagas, `/stats`, the saga definitions.

use std::time::{Duration, Instant};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{ApiError, AppState, SagaView};
use crate::saga::definitions::{ActionDefinition, StepKind};
use crate::saga::{SagaDefinition, SagaState};
use crate::store::{self, SagaFilter};

const STATS_WINDOW_SECS: i64 = 60;
/// How long one computation of `/stats` serves every caller: the page polls it every second
/// from every open tab.
const STATS_FRESH_FOR: Duration = Duration::from_secs(1);

/// The last `/stats` and when it was computed. Behind an async lock, so that callers arriving
/// together wait for one computation instead of starting one each.
#[derive(Default)]
pub struct StatsCache(tokio::sync::Mutex<Option<(Instant, store::Stats)>>);

pub(super) async fn stats(State(state): State<AppState>) -> Result<Json<store::Stats>, ApiError> {
    let mut cached = state.stats.0.lock().await;
    if let Some((at, stats)) = cached.as_ref() {
        if at.elapsed() < STATS_FRESH_FOR {
            return Ok(Json(stats.clone()));
        }
    }
    let stats = store::stats(&state.pool, STATS_WINDOW_SECS)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    *cached = Some((Instant::now(), stats.clone()));
    Ok(Json(stats))
}

pub(super) async fn get_saga(
    State(state): State<AppState>,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<SagaView>, ApiError> {
    let Path(saga_id) = path?;
    let (saga, version) = store::get(&state.pool, saga_id)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .ok_or_else(|| ApiError::not_found(format!("no saga {saga_id}")))?;
    let view = SagaView::new(saga, version)
        .with_duplicates(&state.pool)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    Ok(Json(view))
}

pub(super) async fn get_saga_by_order(
    State(state): State<AppState>,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<SagaView>, ApiError> {
    let Path(order_id) = path?;
    let not_found = || ApiError::not_found(format!("no saga for order {order_id}"));
    // The order sagas: every saga type an OrderPlaced starts (one, unless a deployment
    // renamed the order saga and still has sagas of the old name).
    let listed = state.catalog.list();
    let mut order_types: Vec<&str> = listed
        .iter()
        .filter(|(d, _, _)| d.trigger.message == events::OrderPlaced::TYPE_NAME)
        .map(|(d, _, _)| d.name.as_str())
        .collect();
    order_types.sort_unstable();
    order_types.dedup();
    saga_by_key(&state, &order_types, &order_id.to_string())
        .await?
        .map(Json)
        .ok_or_else(not_found)
}

/// The saga of one of `saga_types` whose key is `key` (the first started, should two types
/// share a key), if there is one.
pub(super) async fn saga_by_key(
    state: &AppState,
    saga_types: &[&str],
    key: &str,
) -> Result<Option<SagaView>, ApiError> {
    let Some(saga_id) = store::saga_id_for_key_of(&state.pool, saga_types, key)
        .await
        .map_err(|e| ApiError::internal(&e))?
    else {
        return Ok(None);
    };
    let Some((saga, version)) = store::get(&state.pool, saga_id)
        .await
        .map_err(|e| ApiError::internal(&e))?
    else {
        return Ok(None);
    };
    let view = SagaView::new(saga, version)
        .with_duplicates(&state.pool)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    Ok(Some(view))
}

/// `404` unless the saga exists.
async fn ensure_exists(state: &AppState, saga_id: Uuid) -> Result<(), ApiError> {
    match store::get(&state.pool, saga_id).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(ApiError::not_found(format!("no saga {saga_id}"))),
        Err(e) => Err(ApiError::internal(&e)),
    }
}

const HISTORY_DEFAULT_LIMIT: i64 = 500;
const HISTORY_MAX_LIMIT: i64 = 1_000;

#[derive(Debug, Deserialize)]
pub(super) struct HistoryQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

/// `GET /sagas/{id}/history`: oldest first, one page at a time (`next_after` continues).
pub(super) async fn get_history(
    State(state): State<AppState>,
    path: Result<Path<Uuid>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(saga_id) = path?;
    let Query(query) = query?;
    let limit = page_size(query.limit, HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT)?;
    let after = query.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request("after must not be negative"));
    }
    ensure_exists(&state, saga_id).await?;
    let mut history = store::history(&state.pool, saga_id, after, limit + 1)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let more = history.len() as i64 > limit;
    history.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_after = history.last().filter(|_| more).map(|line| line.id);
    Ok(Json(
        json!({ "saga_id": saga_id, "history": history, "next_after": next_after }),
    ))
}

/// `limit`, or `default` when it is missing; 400 outside `1..=max`.
fn page_size(limit: Option<i64>, default: i64, max: i64) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_request(format!(
            "limit must be between 1 and {max}"
        )))
    }
}

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    state: Option<String>,
    min_age_secs: Option<u32>,
    step: Option<String>,
    reason: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// A page position: the last row's creation time (microseconds) and id. Opaque to clients.
fn encode_cursor(created_at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{}", created_at.timestamp_micros(), id.simple())
}

fn decode_cursor(cursor: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (micros, id) = cursor.split_once('_')?;
    // Only what `encode_cursor` writes: at most 16 digits (years 1653 to 2286; PostgreSQL refuses
    // times before 4713 BC, a 500) and the id as 32 lower-case hex digits.
    let digits = micros.strip_prefix('-').unwrap_or(micros);
    if !(1..=16).contains(&digits.len())
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || id.len() != 32
        || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    Some((at, Uuid::parse_str(id).ok()?))
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// Shortest and longest reason filter, in characters. The trigram index that answers it
/// needs three.
const REASON_FILTER_CHARS: std::ops::RangeInclusive<usize> = 3..=200;

fn reason_filter(reason: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(reason) = non_empty(reason) else {
        return Ok(None);
    };
    let chars = reason.chars().count();
    if !REASON_FILTER_CHARS.contains(&chars) || reason.contains('\0') {
        return Err(ApiError::bad_request(format!(
            "reason must be {} to {} characters, without NUL",
            REASON_FILTER_CHARS.start(),
            REASON_FILTER_CHARS.end()
        )));
    }
    Ok(Some(reason))
}

/// `GET /sagas`: newest first, filtered, one page at a time.
pub(super) async fn list_sagas(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query?;
    let state_filter = match non_empty(query.state) {
        None => None,
        Some(name) => Some(SagaState::parse(&name).ok_or_else(|| {
            let known: Vec<&str> = SagaState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad_request(format!("unknown state {name:?}; expected one of {known:?}"))
        })?),
    };
    let step = match non_empty(query.step) {
        None => None,
        Some(name) => {
            let known = state.catalog.step_names();
            if !known.contains(&name) {
                return Err(ApiError::bad_request(format!(
                    "unknown step {name:?}; expected one of {known:?}"
                )));
            }
            Some(name)
        }
    };
    let after = match non_empty(query.cursor) {
        None => None,
        Some(cursor) => Some(decode_cursor(&cursor).ok_or_else(|| {
            ApiError::bad_request("invalid cursor; pass a next_cursor from an earlier page")
        })?),
    };
    let limit = page_size(query.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let filter = SagaFilter {
        state: state_filter,
        // Ages are reckoned on the database's clock, the one `created_at` is written on.
        created_before: match query.min_age_secs {
            None => None,
            Some(secs) => Some(
                store::database_now(&state.pool)
                    .await
                    .map_err(|e| ApiError::internal(&e))?
                    - chrono::Duration::seconds(i64::from(secs)),
            ),
        },
        step,
        reason: reason_filter(query.reason)?,
        after,
    };
    // One row more than asked says whether another page follows.
    let mut page = store::list(&state.pool, &filter, limit + 1)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let more = page.len() as i64 > limit;
    page.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = match page.last() {
        Some((saga, _)) if more => Some(encode_cursor(saga.created_at, saga.id)),
        _ => None,
    };
    let sagas: Vec<SagaView> = page
        .into_iter()
        .map(|(saga, version)| SagaView::new(saga, version))
        .collect();
    Ok(Json(json!({ "sagas": sagas, "next_cursor": next_cursor })))
}

/// `GET /definitions`: every saga definition version this orchestrator knows, by name and
/// version; `newest` marks the ones new sagas start on.
pub(super) async fn definitions(State(state): State<AppState>) -> Json<serde_json::Value> {
    let definitions: Vec<DefinitionView> = state
        .catalog
        .list()
        .into_iter()
        .map(|(definition, newest, first_seen_at)| {
            DefinitionView::new(&definition, newest, first_seen_at)
        })
        .collect();
    Json(json!({ "definitions": definitions }))
}

/// A saga definition as the API shows it.
#[derive(Debug, Serialize)]
struct DefinitionView {
    name: String,
    version: i32,
    /// Whether new sagas start on this version.
    newest: bool,
    digest: String,
    /// When an orchestrator first stored this version.
    first_seen_at: Option<DateTime<Utc>>,
    trigger: TriggerView,
    pivot: Option<String>,
    steps: Vec<StepView>,
}

#[derive(Debug, Serialize)]
struct TriggerView {
    topic: String,
    message: String,
    key: String,
}

#[derive(Debug, Serialize)]
struct StepView {
    name: String,
    participant: String,
    topic: String,
    /// `compensable`, `pivot` or `retriable`.
    kind: &'static str,
    forward: ActionView,
    compensation: Option<ActionView>,
}

#[derive(Debug, Serialize)]
struct ActionView {
    action: String,
    success: String,
    failure: Option<String>,
    timeout_ms: i64,
    /// `null`: retried until it answers.
    max_attempts: Option<u32>,
    max_timeout_ms: i64,
}

impl DefinitionView {
    fn new(
        definition: &SagaDefinition,
        newest: bool,
        first_seen_at: Option<DateTime<Utc>>,
    ) -> Self {
        let action = |a: &ActionDefinition| ActionView {
            action: a.name.clone(),
            success: a.success.clone(),
            failure: a.failure.clone(),
            timeout_ms: a.retry.timeout.num_milliseconds(),
            max_attempts: (a.retry.max_attempts != u32::MAX).then_some(a.retry.max_attempts),
            max_timeout_ms: a.retry.max_timeout.num_milliseconds(),
        };
        Self {
            name: definition.name.clone(),
            version: definition.version,
            newest,
            digest: definition.digest(),
            first_seen_at,
            trigger: TriggerView {
                topic: definition.trigger.topic.clone(),
                message: definition.trigger.message.clone(),
                key: definition.trigger.key.to_string(),
            },
            pivot: definition.pivot().map(|i| definition.steps[i].name.clone()),
            steps: definition
                .steps
                .iter()
                .map(|step| StepView {
                    name: step.name.clone(),
                    participant: step.participant.clone(),
                    topic: step.topic.clone(),
                    kind: match step.kind {
                        StepKind::Compensable => "compensable",
                        StepKind::Pivot => "pivot",
                        StepKind::Retriable => "retriable",
                    },
                    forward: action(&step.forward),
                    compensation: step.compensation.as_ref().map(action),
                })
                .collect(),
        }
    }
}
