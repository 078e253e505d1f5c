//! The status HTTP API. Reads come from the saga tables; `POST /orders` publishes an
//! `OrderPlaced` to Kafka exactly as an outside client would.
//!
//! Every error is JSON: `{"error": {"code": "...", "message": "..."}}`.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use events::{Address, LineItem, OrderPlaced, Topics};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::handler::commit_decision;
use crate::saga::{Decision, OperatorAction, Policies, Saga, SagaState, StepState};
use crate::store::{self, HistoryEntry};

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub topics: Topics,
    pub policies: Policies,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/sagas", get(list_sagas))
        .route("/sagas/{saga_id}", get(get_saga))
        .route("/sagas/{saga_id}/history", get(get_history))
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

/// A saga as the API shows it.
#[derive(Debug, Serialize)]
pub struct SagaView {
    pub saga_id: Uuid,
    pub order_id: Uuid,
    pub state: SagaState,
    pub failure_reason: Option<String>,
    pub definition_version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub order: OrderPlaced,
    pub steps: Vec<StepState>,
}

impl From<Saga> for SagaView {
    fn from(saga: Saga) -> Self {
        Self {
            saga_id: saga.id,
            order_id: saga.order.order_id,
            state: saga.state,
            failure_reason: saga.failure_reason,
            definition_version: saga.definition_version,
            created_at: saga.created_at,
            updated_at: saga.updated_at,
            finished_at: saga.finished_at,
            order: saga.order,
            steps: saga.steps,
        }
    }
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
    let saga = store::get(&state.pool, saga_id)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .ok_or_else(|| ApiError::not_found(format!("no saga {saga_id}")))?;
    Ok(Json(saga.into()))
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
    let saga = store::get(&state.pool, saga_id)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .ok_or_else(not_found)?;
    Ok(Json(saga.into()))
}

async fn get_history(
    State(state): State<AppState>,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(saga_id) = path?;
    if store::get(&state.pool, saga_id)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .is_none()
    {
        return Err(ApiError::not_found(format!("no saga {saga_id}")));
    }
    let history: Vec<HistoryEntry> = store::history(&state.pool, saga_id)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    Ok(Json(json!({ "saga_id": saga_id, "history": history })))
}

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    limit: Option<i64>,
}

async fn list_sagas(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query?;
    let filter = match query.state.as_deref() {
        None | Some("") => None,
        Some(name) => Some(SagaState::parse(name).ok_or_else(|| {
            let known: Vec<&str> = SagaState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad_request(format!("unknown state {name:?}; expected one of {known:?}"))
        })?),
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let sagas = store::list(&state.pool, filter, limit)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let sagas: Vec<SagaView> = sagas.into_iter().map(SagaView::from).collect();
    Ok(Json(json!({ "sagas": sagas })))
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
    let record = FutureRecord::to(&topic).key(&key).payload(&payload);
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
    let moved = commit_decision(
        &state.topics,
        &mut tx,
        &saga,
        version,
        decision,
        entry,
        None,
    )
    .await
    .map_err(internal)?;
    // An action that does not fit is refused, but the attempt stays in the history.
    tx.commit().await.map_err(|e| internal(e.into()))?;
    match moved {
        Some(next) => Ok(Json(next.into())),
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
