//! The status HTTP API. Reads come from the saga tables; `POST /orders` publishes an
//! `OrderPlaced` to Kafka exactly as an outside client would.
//!
//! - [`guard`]: the `Host`/`Origin` check and the bearer token each route needs.
//! - [`reads`]: sagas, their history, lists and `/stats`.
//! - [`watch`]: the live streams and the one change feed behind them.
//! - [`actions`]: placing orders and operator actions.
//!
//! Every error is JSON: `{"error": {"code": "...", "message": "..."}}`, and never carries an
//! internal error's text (that goes to the log).

mod actions;
pub mod guard;
pub mod idempotency;
pub mod publisher;
mod reads;
pub mod server;
mod start;
pub mod tls;
pub mod watch;

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use events::{OrderPlaced, Topics};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::Access;
use crate::catalog::Catalog;
use crate::saga::{Saga, SagaState, StepState};
use guard::Guard;
use watch::WatchFeed;

#[derive(Clone)]
pub struct AppState {
    /// The API's own pool, apart from the message path's, so that readers can never take
    /// the connections the consumer, the relay and the deadline scanner need.
    pub pool: PgPool,
    /// Publishes what `POST /orders` accepts.
    pub orders: Arc<publisher::OrderPublisher>,
    pub topics: Topics,
    pub catalog: Arc<Catalog>,
    /// Renders `/metrics`.
    pub metrics: messaging::metrics::Metrics,
    /// Whether the message path can work now (`/healthz`).
    pub health: messaging::health::Health,
    /// Ends live streams (`/watch`) so that a graceful shutdown does not wait on them.
    pub shutdown: tokio_util::sync::CancellationToken,
    pub guard: Arc<Guard>,
    pub watch: Arc<WatchFeed>,
    /// The last `/stats`, shared by every caller for a second.
    pub stats: Arc<reads::StatsCache>,
    /// `HTTP_REQUEST_TIMEOUT_MS`: how long a request with an `Idempotency-Key` holds its key
    /// (past it the server has cut the request short).
    pub request_timeout: std::time::Duration,
}

/// The OpenAPI document of this API, checked against the server by `tests/it/openapi.rs`.
pub const OPENAPI_JSON: &str = include_str!("../../openapi.json");

/// The largest request body accepted; a larger one is answered 413. An order of 100 items
/// with every text at its longest is about 40 KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Every route, as the OpenAPI document lists it (the test compares the two), with the
/// access it needs (`None`: open).
pub const ROUTES: &[(&str, &str, Option<Access>)] = &[
    ("get", "/", None),
    ("get", "/ui/app.js", None),
    ("get", "/ui/style.css", None),
    ("get", "/openapi.json", None),
    ("get", "/metrics", Some(Access::Read)),
    ("get", "/healthz", Some(Access::Read)),
    ("get", "/stats", Some(Access::Read)),
    ("get", "/definitions", Some(Access::Read)),
    ("get", "/sagas", Some(Access::Read)),
    ("get", "/sagas/{saga_id}", Some(Access::Read)),
    ("get", "/sagas/{saga_id}/history", Some(Access::Read)),
    ("get", "/sagas/{saga_id}/watch", Some(Access::Read)),
    ("post", "/sagas/{saga_id}/retry", Some(Access::Operate)),
    ("post", "/sagas/{saga_id}/skip", Some(Access::Operate)),
    ("post", "/sagas/{saga_id}/abort", Some(Access::Operate)),
    ("get", "/orders/{order_id}/saga", Some(Access::Read)),
    ("post", "/orders", Some(Access::PlaceOrder)),
    (
        "post",
        "/definitions/{saga_type}/sagas",
        Some(Access::PlaceOrder),
    ),
    (
        "get",
        "/definitions/{saga_type}/sagas/{key}",
        Some(Access::Read),
    ),
];

pub fn router(state: AppState) -> Router {
    let needs = |access: Access| {
        middleware::from_fn_with_state((state.guard.clone(), access), guard::require)
    };
    let open = Router::new()
        .route(
            "/",
            get(|| async { Html(include_str!("../../web/index.html")) }),
        )
        .route(
            "/ui/app.js",
            get(|| async {
                static_file(
                    "text/javascript; charset=utf-8",
                    include_str!("../../web/app.js"),
                )
            }),
        )
        .route(
            "/ui/style.css",
            get(|| async {
                static_file(
                    "text/css; charset=utf-8",
                    include_str!("../../web/style.css"),
                )
            }),
        )
        .route("/openapi.json", get(openapi_document));
    let reads = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/stats", get(reads::stats))
        .route("/definitions", get(reads::definitions))
        .route("/sagas", get(reads::list_sagas))
        .route("/sagas/{saga_id}", get(reads::get_saga))
        .route("/sagas/{saga_id}/history", get(reads::get_history))
        .route("/sagas/{saga_id}/watch", get(watch::watch))
        .route("/orders/{order_id}/saga", get(reads::get_saga_by_order))
        .route(
            "/definitions/{saga_type}/sagas/{key}",
            get(start::get_saga_by_key),
        )
        .route_layer(needs(Access::Read));
    let orders = Router::new()
        .route("/orders", post(actions::place_order))
        .route("/definitions/{saga_type}/sagas", post(start::start_saga))
        .route_layer(needs(Access::PlaceOrder));
    let operations = Router::new()
        .route("/sagas/{saga_id}/{action}", post(actions::operate))
        .route_layer(needs(Access::Operate));
    open.merge(reads)
        .merge(orders)
        .merge(operations)
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.guard.clone(),
            guard::same_origin,
        ))
        .layer(middleware::map_response(browser_protections))
        .with_state(state)
}

/// The page's Content-Security-Policy: its script and style only from this server, no inline
/// script or style, requests only to this server, no plugin, base or form target elsewhere,
/// and no other site may frame it (which would let it trick a signed-in operator into pressing
/// Retry, Skip or Abort).
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// What browsers use to protect the page and the data it shows, on every answer (outermost
/// layer: the guard's refusals and the fallbacks carry it too): the page's policy and no
/// framing (`X-Frame-Options` for browsers without `frame-ancestors`), no content-type
/// sniffing, no referrer, and no copy kept of an answer: most hold saga data, and the page's
/// files are small.
async fn browser_protections(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, header::HeaderValue::from_static(value));
    }
    response
}

/// `/healthz`, `/livez`, `/readyz` and `/metrics` without a token, for probes and Prometheus on
/// an address of their own (`OPS_HTTP_ADDR`; what each probe says: `messaging::health`).
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route(
            "/livez",
            get(|| async { messaging::metrics::live_response() }),
        )
        .route(
            "/readyz",
            get(|State(state): State<AppState>| async move {
                messaging::metrics::ready_response(&state.health)
            }),
        )
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
}

/// Describes the API's metrics (the token reloads', the HTTP server's, the watch streams').
pub fn describe_metrics() {
    guard::describe_metrics();
    server::describe_metrics();
    tls::describe_metrics();
}

/// A client-facing error with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// An error of ours: logged in full, answered without its text. A request that waited
    /// too long for one of the API's connections is answered 503, to try again.
    pub(crate) fn internal(e: &crate::Error) -> Self {
        if matches!(e, crate::Error::Database(sqlx::Error::PoolTimedOut)) {
            tracing::warn!("API request turned away: every API connection is busy");
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the API is busy; try again shortly",
            );
        }
        tracing::error!(error.message = %messaging::Chain(e), "request failed");
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
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body must be at most {MAX_BODY_BYTES} bytes"),
            );
        }
        Self::new(rejection.status(), "invalid_body", rejection.body_text())
    }
}

/// `GET /openapi.json`: the document, with the step names and saga types of this deployment's
/// saga definitions where the file leaves them open (`StepName`, the list's `step` filter, the
/// `saga_type` path parameters), so that a client (and Schemathesis) knows which it takes.
async fn openapi_document(State(state): State<AppState>) -> Response {
    match openapi_for(&state.catalog.step_names(), &state.catalog.saga_types()) {
        Ok(document) => Json(document).into_response(),
        Err(e) => ApiError::internal(&crate::Error::OpenApi(e)).into_response(),
    }
}

/// [`OPENAPI_JSON`] with `steps` as the enum of step names.
///
/// # Errors
/// When the embedded document is not JSON (a build from a broken file).
pub fn openapi_for(
    steps: &[String],
    saga_types: &[String],
) -> Result<serde_json::Value, serde_json::Error> {
    let mut document: serde_json::Value = serde_json::from_str(OPENAPI_JSON)?;
    // The saga types, where a path names one.
    if let Some(paths) = document
        .get_mut("paths")
        .and_then(serde_json::Value::as_object_mut)
    {
        let parameters = paths
            .values_mut()
            .filter_map(serde_json::Value::as_object_mut)
            .flat_map(|operations| operations.values_mut())
            .filter_map(|operation| operation.get_mut("parameters")?.as_array_mut())
            .flatten()
            .filter(|parameter| parameter["name"] == "saga_type");
        for parameter in parameters {
            parameter["schema"]["enum"] = json!(saga_types);
        }
    }
    if let Some(step_name) = document.pointer_mut("/components/schemas/StepName") {
        step_name["enum"] = json!(steps);
    }
    let filter = document
        .pointer_mut("/paths/~1sagas/get/parameters")
        .and_then(serde_json::Value::as_array_mut)
        .and_then(|parameters| parameters.iter_mut().find(|p| p["name"] == "step"));
    if let Some(filter) = filter {
        let mut allowed = json!(steps);
        if let Some(list) = allowed.as_array_mut() {
            list.push(json!(""));
        }
        filter["schema"]["enum"] = allowed;
    }
    Ok(document)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// A saga as the API shows it.
#[derive(Debug, Serialize)]
pub struct SagaView {
    pub saga_id: Uuid,
    /// An order saga's order id (its key); absent for other saga types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    /// The saga's key: its trigger message's value at the definition's `trigger.key`.
    pub saga_key: String,
    pub state: SagaState,
    /// The step the saga waits on, or for a failed saga the one it is stuck at.
    pub current_step: Option<String>,
    pub failure_reason: Option<String>,
    /// The saga definition it runs on, to its end: name and version.
    pub definition_name: String,
    pub definition_version: i32,
    /// Bumped by every change; a watcher compares it.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub deadline_at: Option<DateTime<Utc>>,
    /// How often the saga's trigger arrived again, when it did: only the single-saga reads
    /// fill it in ([`SagaView::with_duplicates`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<crate::store::DuplicatesSeen>,
    /// An order saga's `OrderPlaced` (its trigger); absent for other saga types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<OrderPlaced>,
    /// The message that started the saga, as JSON, whatever its type.
    pub trigger: serde_json::Value,
    pub steps: Vec<StepState>,
}

impl SagaView {
    pub fn new(saga: Saga, version: i64) -> Self {
        // An order saga is one an OrderPlaced started: its trigger reads back as one.
        let order = (saga.trigger.get("type").and_then(|t| t.as_str())
            == Some(OrderPlaced::TYPE_NAME))
        .then(|| serde_json::from_value::<OrderPlaced>(saga.trigger.clone()).ok())
        .flatten();
        Self {
            saga_id: saga.id,
            order_id: order.as_ref().map(|o| o.order_id),
            current_step: saga.step_in_focus().map(str::to_owned),
            saga_key: saga.key,
            state: saga.state,
            failure_reason: saga.failure_reason,
            definition_name: saga.definition_name,
            definition_version: saga.definition_version,
            version,
            created_at: saga.created_at,
            updated_at: saga.updated_at,
            finished_at: saga.finished_at,
            deadline_at: saga.deadline_at,
            duplicates: None,
            order,
            trigger: saga.trigger,
            steps: saga.steps,
        }
    }
}

impl SagaView {
    /// The view with the repeats of the saga's trigger, read from its history.
    pub(crate) async fn with_duplicates(mut self, db: &sqlx::PgPool) -> Result<Self, crate::Error> {
        self.duplicates = crate::store::duplicates_seen(db, self.saga_id).await?;
        Ok(self)
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.response().await
}

/// Ready when the consume loop is not waiting for an unwell database (which may still answer
/// `SELECT 1`: read-only, say) and the API's pool reaches the database.
async fn healthz(State(state): State<AppState>) -> Response {
    if state.health.ready().is_err() {
        return messaging::metrics::health_response(&state.health);
    }
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => Json(json!({ "status": "ok" })).into_response(),
        Err(e) => {
            tracing::warn!(error.message = %messaging::Chain(&e), "health check: database unreachable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database is unreachable",
            )
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::OPENAPI_JSON;
    use crate::saga::{OperatorAction, SagaState, StepStatus};
    use crate::store::HistoryDecision;

    /// The error `GET /openapi.json` logs when the document cannot be completed keeps
    /// serde_json's error as its cause, and its chain reads as the text it logged before.
    #[test]
    fn an_unusable_document_keeps_serdes_error() {
        let json = || serde_json::from_str::<serde_json::Value>("{").expect_err("not JSON");
        let error = crate::Error::OpenApi(json());
        let cause = std::error::Error::source(&error).expect("serde's error");
        assert!(cause.downcast_ref::<serde_json::Error>().is_some());
        assert_eq!(
            messaging::chain(&error),
            format!("invalid configuration: openapi.json: {}", json())
        );
    }

    /// The document names the engine's enums as the engine serialises them, so that a client
    /// (and the page, which reads the states from the document) sees what the server sends.
    #[test]
    fn the_document_lists_the_engines_enums() {
        let document: Value = serde_json::from_str(OPENAPI_JSON).expect("openapi.json parses");
        let at = |pointer: &str| document.pointer(pointer).cloned().unwrap_or(Value::Null);
        assert_eq!(
            at("/components/schemas/SagaState/enum"),
            json!(SagaState::ALL)
        );
        assert_eq!(
            at("/components/schemas/StepStatus/enum"),
            json!(StepStatus::ALL)
        );
        assert_eq!(
            at("/components/schemas/HistoryEntry/properties/decision/enum"),
            json!(HistoryDecision::ALL)
        );
        // A watch ends when the saga reached a state nothing moves it out of: a terminal one
        // but `failed`, which an operator may still move.
        let stream_ends: Vec<SagaState> = SagaState::ALL
            .into_iter()
            .filter(|s| s.is_terminal() && *s != SagaState::Failed)
            .collect();
        assert_eq!(
            at("/components/schemas/WatchEnd/properties/state/enum"),
            json!(stream_ends)
        );
        let state_filter = at("/paths/~1sagas/get/parameters")
            .as_array()
            .and_then(|parameters| parameters.iter().find(|p| p["name"] == "state").cloned())
            .unwrap_or(Value::Null);
        let mut states = json!(SagaState::ALL);
        if let Some(list) = states.as_array_mut() {
            list.push(json!(""));
        }
        assert_eq!(state_filter["schema"]["enum"], states);
        // A history line that counts a trigger's repeats, and a saga view showing them, send
        // only properties the document lists (both schemas refuse any other).
        let line = crate::store::HistoryRecord {
            id: 7,
            entry: crate::store::HistoryEntry {
                at: chrono::Utc::now(),
                message_id: None,
                message_type: "OrderPlaced".into(),
                decision: HistoryDecision::Ignored,
                detail: Some("duplicate order (record orders/0@9)".into()),
                state_after: SagaState::Completed,
            },
            repeats: Some(crate::store::Repeats {
                duplicates: 500,
                last_duplicate_at: chrono::Utc::now(),
                last_duplicate_detail: Some("duplicate order (record orders/0@508)".into()),
            }),
        };
        let seen = crate::store::DuplicatesSeen {
            count: 500,
            first_at: chrono::Utc::now(),
            last_at: chrono::Utc::now(),
        };
        for (schema, sent) in [
            ("HistoryEntry", json!(line)),
            ("SagaView/properties/duplicates", json!(seen)),
        ] {
            let listed = at(&format!("/components/schemas/{schema}/properties"));
            let sent = sent.as_object().cloned().unwrap_or_default();
            assert!(!sent.is_empty(), "{schema}");
            for name in sent.keys() {
                assert!(listed.get(name).is_some(), "{schema} does not list {name}");
            }
        }
        // Each operator action says the state it applies in (the page enables its button by it).
        for (name, action) in [
            ("retry", OperatorAction::Retry),
            ("skip", OperatorAction::Skip),
            (
                "abort",
                OperatorAction::Abort {
                    reason: String::new(),
                },
            ),
        ] {
            assert_eq!(
                at(&format!(
                    "/paths/~1sagas~1{{saga_id}}~1{name}/post/x-saga-state"
                )),
                json!(action.applies_in()),
                "{name}"
            );
        }
    }
}
