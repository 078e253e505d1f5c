//! The status HTTP API. Reads come from the saga tables; `POST /orders` publishes an
//! `OrderPlaced` to Kafka exactly as an outside client would.
//!
//! Every error is JSON: `{"error": {"code": "...", "message": "..."}}`.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use events::{Address, LineItem, OrderPlaced, Topics};
use messaging::outbox::{Outbox, Wake};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

use crate::handler::{commit_decision, join_saga_trace};
use crate::saga::{Decision, OperatorAction, Policies, Saga, SagaState, StepState};
use crate::store::{self, HistoryEntry, SagaFilter};

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub topics: Topics,
    pub policies: Policies,
    /// Renders `/metrics`.
    pub metrics: messaging::metrics::Metrics,
    /// Ends live streams (`/watch`) so that a graceful shutdown does not wait on them.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// The OpenAPI document of this API, checked against the server by `tests/it/openapi.rs`.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Every route, as the OpenAPI document lists it (the test compares the two).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/"),
    ("get", "/ui/app.js"),
    ("get", "/ui/style.css"),
    ("get", "/openapi.json"),
    ("get", "/metrics"),
    ("get", "/healthz"),
    ("get", "/stats"),
    ("get", "/sagas"),
    ("get", "/sagas/{saga_id}"),
    ("get", "/sagas/{saga_id}/history"),
    ("get", "/sagas/{saga_id}/watch"),
    ("post", "/sagas/{saga_id}/retry"),
    ("post", "/sagas/{saga_id}/skip"),
    ("post", "/sagas/{saga_id}/abort"),
    ("get", "/orders/{order_id}/saga"),
    ("post", "/orders"),
];

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { Html(include_str!("../web/index.html")) }),
        )
        .route(
            "/ui/app.js",
            get(|| async {
                static_file(
                    "text/javascript; charset=utf-8",
                    include_str!("../web/app.js"),
                )
            }),
        )
        .route(
            "/ui/style.css",
            get(|| async {
                static_file("text/css; charset=utf-8", include_str!("../web/style.css"))
            }),
        )
        .route(
            "/openapi.json",
            get(|| async { static_file("application/json", OPENAPI_JSON) }),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .route("/sagas", get(list_sagas))
        .route("/sagas/{saga_id}", get(get_saga))
        .route("/sagas/{saga_id}/history", get(get_history))
        .route("/sagas/{saga_id}/watch", get(watch))
        .route("/sagas/{saga_id}/{action}", post(operate))
        .route("/orders/{order_id}/saga", get(get_saga_by_order))
        .route("/orders", post(place_order))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .with_state(state)
}

/// A client-facing error with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn internal(e: &crate::Error) -> Self {
        tracing::error!(error.message = %e, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request(format!("invalid path parameter: {}", rejection.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(format!("invalid query: {}", rejection.body_text()))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::new(rejection.status(), "invalid_body", rejection.body_text())
    }
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// A saga as the API shows it.
#[derive(Debug, Serialize)]
pub struct SagaView {
    pub saga_id: Uuid,
    pub order_id: Uuid,
    pub state: SagaState,
    /// The step the saga waits on, or for a failed saga the one it is stuck at.
    pub current_step: Option<events::StepName>,
    pub failure_reason: Option<String>,
    pub definition_version: i32,
    /// Bumped by every change; a watcher compares it.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub order: OrderPlaced,
    pub steps: Vec<StepState>,
}

impl SagaView {
    pub fn new(saga: Saga, version: i64) -> Self {
        Self {
            saga_id: saga.id,
            order_id: saga.order.order_id,
            state: saga.state,
            current_step: saga.step_in_focus(),
            failure_reason: saga.failure_reason,
            definition_version: saga.definition_version,
            version,
            created_at: saga.created_at,
            updated_at: saga.updated_at,
            finished_at: saga.finished_at,
            deadline_at: saga.deadline_at,
            order: saga.order,
            steps: saga.steps,
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.response().await
}

async fn stats(State(state): State<AppState>) -> Result<Json<store::Stats>, ApiError> {
    store::stats(&state.pool, STATS_WINDOW_SECS)
        .await
        .map(Json)
        .map_err(|e| ApiError::internal(&e))
}

const STATS_WINDOW_SECS: i64 = 60;
/// How often a live stream looks for changes.
const WATCH_POLL: Duration = Duration::from_millis(200);

/// `GET /sagas/{id}/watch`: Server-Sent Events with the saga (`saga`) each time it changes, its
/// new history lines (`history`), and `end` once it is finished.
///
/// The stream polls the saga's row (a primary-key read) rather than listening for
/// notifications, so watchers cost the message path nothing.
async fn watch(
    State(state): State<AppState>,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(saga_id) = path?;
    ensure_exists(&state, saga_id).await?;
    let (events_tx, events_rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(stream_saga(state, saga_id, events_tx));
    let stream = futures_util::stream::unfold(events_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn stream_saga(state: AppState, saga_id: Uuid, events: tokio::sync::mpsc::Sender<Event>) {
    let mut seen_version = -1;
    let mut seen_history = 0;
    loop {
        let read = async {
            let saga = store::get(&state.pool, saga_id).await?;
            let history = store::history(&state.pool, saga_id, seen_history).await?;
            Ok::<_, crate::Error>((saga, history))
        };
        let (saga, history) = match read.await {
            Ok((Some(saga), history)) => (saga, history),
            // Removed by retention while watched: nothing more will happen to it.
            Ok((None, _)) => return,
            Err(e) => {
                tracing::warn!(error.message = %e, %saga_id, "watch: reading the saga failed");
                let _ = events
                    .send(
                        Event::default()
                            .event("error")
                            .json_data(json!({ "error": { "code": "internal", "message": e.to_string() } }))
                            .unwrap_or_default(),
                    )
                    .await;
                return;
            }
        };
        for record in history {
            seen_history = record.id;
            if !send_json(&events, "history", &record).await {
                return;
            }
        }
        let (saga, version) = saga;
        let terminal = saga.state.is_terminal();
        let state_name = saga.state.as_str();
        if version != seen_version {
            seen_version = version;
            if !send_json(&events, "saga", &SagaView::new(saga, version)).await {
                return;
            }
        }
        if terminal {
            let _ = send_json(&events, "end", &json!({ "state": state_name })).await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_POLL) => {}
            _ = events.closed() => return,
            _ = state.shutdown.cancelled() => return,
        }
    }
}

/// Sends one SSE event; `false` when the client has gone.
async fn send_json<T: Serialize>(
    events: &tokio::sync::mpsc::Sender<Event>,
    name: &str,
    data: &T,
) -> bool {
    let Ok(event) = Event::default().event(name).json_data(data) else {
        return false;
    };
    events.send(event).await.is_ok()
}

async fn healthz(State(state): State<AppState>) -> Response {
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => Json(json!({ "status": "ok" })).into_response(),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("database unreachable: {e}"),
        )
        .into_response(),
    }
}

async fn get_saga(
    State(state): State<AppState>,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<SagaView>, ApiError> {
    let Path(saga_id) = path?;
    let (saga, version) = store::get(&state.pool, saga_id)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .ok_or_else(|| ApiError::not_found(format!("no saga {saga_id}")))?;
    Ok(Json(SagaView::new(saga, version)))
}

async fn get_saga_by_order(
    State(state): State<AppState>,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<SagaView>, ApiError> {
    let Path(order_id) = path?;
    let not_found = || ApiError::not_found(format!("no saga for order {order_id}"));
    let saga_id = store::saga_id_for_order(&state.pool, order_id)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .ok_or_else(not_found)?;
    let (saga, version) = store::get(&state.pool, saga_id)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .ok_or_else(not_found)?;
    Ok(Json(SagaView::new(saga, version)))
}

/// `404` unless the saga exists.
async fn ensure_exists(state: &AppState, saga_id: Uuid) -> Result<(), ApiError> {
    match store::get(&state.pool, saga_id).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(ApiError::not_found(format!("no saga {saga_id}"))),
        Err(e) => Err(ApiError::internal(&e)),
    }
}

async fn get_history(
    State(state): State<AppState>,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(saga_id) = path?;
    ensure_exists(&state, saga_id).await?;
    let history = store::history(&state.pool, saga_id, 0)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    Ok(Json(json!({ "saga_id": saga_id, "history": history })))
}

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

#[derive(Debug, Deserialize)]
struct ListQuery {
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

/// `GET /sagas`: newest first, filtered, one page at a time.
async fn list_sagas(
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
        Some(name) => Some(events::StepName::parse(&name).ok_or_else(|| {
            let known: Vec<&str> = crate::saga::STEPS.iter().map(|s| s.name.as_str()).collect();
            ApiError::bad_request(format!("unknown step {name:?}; expected one of {known:?}"))
        })?),
    };
    let after = match non_empty(query.cursor) {
        None => None,
        Some(cursor) => Some(decode_cursor(&cursor).ok_or_else(|| {
            ApiError::bad_request("invalid cursor; pass a next_cursor from an earlier page")
        })?),
    };
    let reason = non_empty(query.reason);
    // PostgreSQL's text cannot hold NUL: the query would fail (a 500).
    if reason.as_deref().is_some_and(|r| r.contains('\0')) {
        return Err(ApiError::bad_request("`reason` must not contain NUL"));
    }
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let filter = SagaFilter {
        state: state_filter,
        created_before: query
            .min_age_secs
            .map(|secs| Utc::now() - chrono::Duration::seconds(i64::from(secs))),
        step,
        reason,
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

/// The body of `POST /orders`: an `OrderPlaced` without its `type`, and with an optional
/// order id (a new one is made when it is missing).
#[derive(Debug, Deserialize)]
struct NewOrder {
    order_id: Option<Uuid>,
    customer_id: String,
    items: Vec<LineItem>,
    total_cents: i64,
    currency: String,
    shipping_address: Address,
}

#[derive(Debug, Serialize)]
struct OrderAccepted {
    order_id: Uuid,
    status_url: String,
}

async fn place_order(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(new) = body?;
    let order = OrderPlaced {
        order_id: new.order_id.unwrap_or_else(Uuid::new_v4),
        customer_id: new.customer_id,
        items: new.items,
        total_cents: new.total_cents,
        currency: new.currency,
        shipping_address: new.shipping_address,
    };
    order.validate().map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_order",
            e.to_string(),
        )
    })?;
    let payload = serde_json::to_vec(&order).unwrap_or_default();
    let key = order.order_id.to_string();
    let topic = state.topics.orders();
    // The order's trace starts here (or continues the caller's, from its `traceparent`).
    let span = tracing::info_span!("place_order", order_id = %order.order_id);
    if let Some(parent) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        messaging::telemetry::continue_trace(&span, parent);
    }
    let traceparent = messaging::telemetry::traceparent(&span);
    let record = FutureRecord::to(&topic)
        .key(&key)
        .payload(&payload)
        .headers(messaging::kafka::record_headers(
            traceparent.as_deref().map(|value| ("traceparent", value)),
        ));
    state
        .producer
        .send(record, Duration::from_secs(5))
        .await
        .map_err(|(e, _)| {
            tracing::warn!(error.message = %e, "publishing OrderPlaced failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                format!("could not publish the order: {e}"),
            )
        })?;
    let status_url = format!("/orders/{}/saga", order.order_id);
    let accepted = OrderAccepted {
        order_id: order.order_id,
        status_url: status_url.clone(),
    };
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, status_url)],
        Json(accepted),
    )
        .into_response())
}

const MAX_OPERATOR_CHARS: usize = 200;
const MAX_REASON_CHARS: usize = 2_000;

/// The body of an operator action: who acts and why, both recorded in the saga's history.
#[derive(Debug, Deserialize)]
struct OperatorRequest {
    operator: String,
    reason: String,
}

/// `POST /sagas/{id}/retry|skip|abort`: an operator moves a stuck or running saga.
async fn operate(
    State(state): State<AppState>,
    path: Result<Path<(Uuid, String)>, PathRejection>,
    body: Result<Json<OperatorRequest>, JsonRejection>,
) -> Result<Json<SagaView>, ApiError> {
    let Path((saga_id, action_name)) = path?;
    let Json(request) = body?;
    if request.operator.trim().is_empty() || request.reason.trim().is_empty() {
        return Err(ApiError::bad_request(
            "`operator` and `reason` must not be empty",
        ));
    }
    // Both end up in the history and the reason in a saga event: bounded, so that the event
    // can always be published, and without NUL, which PostgreSQL's text refuses.
    for (field, value, max) in [
        ("operator", &request.operator, MAX_OPERATOR_CHARS),
        ("reason", &request.reason, MAX_REASON_CHARS),
    ] {
        if value.chars().count() > max || value.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "`{field}` must be at most {max} characters, without NUL"
            )));
        }
    }
    let action = match action_name.as_str() {
        "retry" => OperatorAction::Retry,
        "skip" => OperatorAction::Skip,
        "abort" => OperatorAction::Abort {
            reason: request.reason.clone(),
        },
        other => {
            return Err(ApiError::not_found(format!(
                "no action {other:?}; expected retry, skip or abort"
            )))
        }
    };
    let internal = |e: crate::Error| ApiError::internal(&e);
    let mut tx = state.pool.begin().await.map_err(|e| internal(e.into()))?;
    let (saga, version) = store::load_for_update(&mut tx, saga_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| ApiError::not_found(format!("no saga {saga_id}")))?;
    let now = Utc::now();
    let decision = saga.on_operator(&action, now, &state.policies);
    let refusal = match &decision {
        Decision::Ignored { reason } => Some(reason.clone()),
        Decision::Applied { .. } => None,
    };
    let entry = HistoryEntry {
        at: now,
        message_id: None,
        message_type: format!("Operator{}", capitalised(&action_name)),
        decision: "operator".into(),
        detail: Some(format!(
            "{action_name} by {}: {}",
            request.operator, request.reason
        )),
        state_after: String::new(),
    };
    let span = tracing::info_span!("operator", %saga_id, action = %action_name);
    join_saga_trace(&mut tx, &span, saga_id)
        .await
        .map_err(internal)?;
    let mut outbox = Outbox::default();
    let moved = commit_decision(
        &state.topics,
        &mut tx,
        &mut outbox,
        &saga,
        version,
        decision,
        entry,
    )
    .instrument(span)
    .await
    .map_err(internal)?;
    outbox
        .write(&mut tx, Wake::Notify)
        .await
        .map_err(|e| internal(e.into()))?;
    // An action that does not fit is refused, but the attempt stays in the history.
    tx.commit().await.map_err(|e| internal(e.into()))?;
    match moved {
        Some(next) => {
            ::metrics::counter!(crate::metrics::OPERATOR_ACTIONS, "action" => action_name)
                .increment(1);
            Ok(Json(SagaView::new(next, version + 1)))
        }
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("{action_name} refused: {}", refusal.unwrap_or_default()),
        )),
    }
}

fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}
