//! What changes something: placing an order, and an operator's retry, skip or abort.

use std::ops::ControlFlow;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use events::{Address, LineItem, OrderPlaced};
use rdkafka::message::OwnedHeaders;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::Instrument;
use uuid::Uuid;

use super::idempotency::{self, Reservation};
use super::{ApiError, AppState, SagaView};
use crate::auth::Caller;
use crate::handler::{commit_decision, join_saga_trace};
use crate::saga::{Decision, OperatorAction, Saga, SagaDefinition};
use crate::store::{self, HistoryDecision, HistoryEntry};

/// The longest `traceparent` header continued; a W3C one (version 00) has 55 characters.
const MAX_TRACEPARENT_CHARS: usize = 128;

/// The body of `POST /orders`: an `OrderPlaced` without its `type`, and with an optional
/// order id (a new one is made when it is missing).
#[derive(Debug, Deserialize, Serialize)]
pub(super) struct NewOrder {
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

/// The header a client sends so that a retry of `POST /orders` places no second order.
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on an answer given again for a key seen before.
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

pub(super) async fn place_order(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(new) = body?;
    let key = idempotency_key(&headers)?;
    let (mut order, request_hash) = checked_order(new)?;
    // Reserved before the order goes out, so that two requests with one key never both
    // publish, and a retry publishes the same order id.
    if let Some(key) = &key {
        match reserve(&state, &caller, key, &request_hash, order.order_id).await? {
            ControlFlow::Continue(order_id) => order.order_id = order_id,
            ControlFlow::Break(answered) => return Ok(answered),
        }
    }
    if let Some(unavailable) = publish(&state, &caller, key.as_deref(), &headers, &order).await? {
        return Ok(unavailable);
    }
    Ok(accepted(&state, &caller, key.as_deref(), order.order_id).await)
}

/// The order a request places, checked by the contract's rules, and the hash of the request
/// that an `Idempotency-Key` is held to.
fn checked_order(new: NewOrder) -> Result<(OrderPlaced, [u8; 32]), ApiError> {
    // The request as parsed, not its bytes: the same order sent again with other spacing or
    // field order is the same request.
    let request_json =
        serde_json::to_vec(&new).map_err(|e| ApiError::internal(&crate::Error::Encode(e)))?;
    let request_hash: [u8; 32] = Sha256::digest(request_json).into();
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
    Ok((order, request_hash))
}

/// Reserves `key` for this request: the order id to publish, or the answer already given
/// (a replay); `409` while another request holds it, `422` when it came with another request.
async fn reserve(
    state: &AppState,
    caller: &Caller,
    key: &str,
    request_hash: &[u8; 32],
    order_id: Uuid,
) -> Result<ControlFlow<Response, Uuid>, ApiError> {
    let lease = state.request_timeout;
    let reserved = idempotency::reserve(
        &state.pool,
        &caller.name,
        key,
        request_hash,
        order_id,
        lease,
    )
    .await
    .map_err(|e| ApiError::internal(&e.into()))?;
    match reserved {
        Reservation::Publish { order_id } => Ok(ControlFlow::Continue(order_id)),
        Reservation::Replay { status, body } => Ok(ControlFlow::Break(replayed(status, body))),
        Reservation::InProgress => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_in_use",
            "a request with this Idempotency-Key is being handled; try again shortly",
        )),
        Reservation::OtherRequest => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was sent with another request; use a new key for a \
             new order",
        )),
    }
}

/// Publishes `order` to the orders topic in the request's trace. `Some` answer (`503`) when
/// the broker did not take it; `key`, if any, is then given back.
async fn publish(
    state: &AppState,
    caller: &Caller,
    key: Option<&str>,
    headers: &HeaderMap,
    order: &OrderPlaced,
) -> Result<Option<Response>, ApiError> {
    // After the reservation, which may hand back the order id a first attempt published. An
    // order that could not be encoded fails the request (its reservation lapses after its
    // lease) rather than going out as an empty record.
    let payload =
        serde_json::to_vec(order).map_err(|e| ApiError::internal(&crate::Error::Encode(e)))?;
    let record_key = order.order_id.to_string();
    let topic = state.topics.orders();
    let span = tracing::info_span!("place_order", order_id = %order.order_id);
    let record_headers = request_trace(&span, headers);
    let Err(e) = state
        .orders
        .send(&topic, &record_key, &payload, record_headers)
        .await
    else {
        return Ok(None);
    };
    tracing::warn!(error.message = %messaging::Chain(&e), order_id = %order.order_id, "publishing OrderPlaced failed");
    // The record may still be written; a retry with the same key (or this order id)
    // publishes the same order, which the orchestrator starts once.
    if let Some(key) = key {
        if let Err(e) = idempotency::release(&state.pool, &caller.name, key).await {
            tracing::warn!(error.message = %messaging::Chain(&e), "giving an idempotency key back failed; it passes with its lease");
        }
    }
    let body = json!({ "error": {
        "code": "broker_unavailable",
        "message": "could not publish the order; send it again with the same \
                    Idempotency-Key or order_id",
        "order_id": order.order_id,
    } });
    Ok(Some(
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response(),
    ))
}

/// `202` with where to follow the saga, stored as `key`'s answer, if any, for a retry.
async fn accepted(
    state: &AppState,
    caller: &Caller,
    key: Option<&str>,
    order_id: Uuid,
) -> Response {
    let status_url = format!("/orders/{order_id}/saga");
    let accepted = OrderAccepted {
        order_id,
        status_url: status_url.clone(),
    };
    if let Some(key) = key {
        let body = serde_json::to_value(&accepted).unwrap_or_default();
        let stored = idempotency::complete(&state.pool, &caller.name, key, 202, &body).await;
        if let Err(e) = stored {
            // The order went out; a retry before the lease passes gets 409, after it the same
            // order id published again (one saga).
            tracing::warn!(error.message = %messaging::Chain(&e), "storing an idempotency key's answer failed");
        }
    }
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, status_url)],
        Json(accepted),
    )
        .into_response()
}

/// The request's `Idempotency-Key`, if it sent one; `400` when it is not a usable key.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if idempotency::valid_key(key) => Ok(Some(key.to_owned())),
        _ => Err(ApiError::bad_request(format!(
            "`Idempotency-Key` must be 1 to {} visible ASCII characters",
            idempotency::MAX_KEY_CHARS
        ))),
    }
}

/// The answer a request with this idempotency key got before (`status`, `body`), given again.
fn replayed(status: u16, body: serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED);
    let location = body["status_url"].as_str().and_then(|u| u.parse().ok());
    let mut response = (status, Json(body)).into_response();
    if let Some(url) = location {
        response.headers_mut().insert(header::LOCATION, url);
    }
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

/// The headers of a record published for an HTTP request: the trace of `span`, which starts
/// here or continues the caller's (its `traceparent`, when it sent a usable one).
pub(super) fn request_trace(span: &tracing::Span, headers: &HeaderMap) -> OwnedHeaders {
    if let Some(parent) = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= MAX_TRACEPARENT_CHARS)
    {
        messaging::telemetry::continue_trace(span, parent);
    }
    let traceparent = messaging::telemetry::traceparent(span);
    messaging::kafka::record_headers(traceparent.as_deref().map(|value| ("traceparent", value)))
}

const MAX_REASON_CHARS: usize = 2_000;

/// The body of an operator action: why. Who acts is the caller's token name, never a name
/// the body could make up; a body that still sends `operator` is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OperatorRequest {
    reason: String,
}

/// `POST /sagas/{id}/retry|skip|abort`: an operator moves a stuck or running saga.
pub(super) async fn operate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(Uuid, String)>, PathRejection>,
    body: Result<Json<OperatorRequest>, JsonRejection>,
) -> Result<Json<SagaView>, ApiError> {
    let Path((saga_id, action_name)) = path?;
    let Json(request) = body?;
    let action = operator_action(&action_name, &request)?;
    let internal = |e: crate::Error| ApiError::internal(&e);
    let mut tx = state.pool.begin().await.map_err(|e| internal(e.into()))?;
    let (saga, version, now, definition) = movable_saga(&state, &mut tx, saga_id).await?;
    let decision = saga.on_operator(&action, now, &definition);
    let refusal = match &decision {
        Decision::Ignored { reason } => Some(reason.clone()),
        Decision::Applied { .. } => None,
    };
    let entry = HistoryEntry {
        at: now,
        message_id: None,
        message_type: format!("Operator{}", capitalised(&action_name)),
        decision: HistoryDecision::Operator,
        detail: Some(format!(
            "{action_name} by {}: {}",
            caller.name, request.reason
        )),
        // Set to the state the decision leaves (`commit_decision`).
        state_after: saga.state,
    };
    let span = tracing::info_span!("operator", %saga_id, action = %action_name);
    join_saga_trace(&mut tx, &span, saga_id)
        .await
        .map_err(internal)?;
    let moved = commit_decision(&state.topics, &mut tx, &saga, version, decision, entry)
        .instrument(span)
        .await
        .map_err(|e| match e {
            // Refused by the row's version (and counted): the caller may try again on the saga
            // as it is now.
            crate::Error::VersionConflict { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("saga {saga_id} changed meanwhile: {}", messaging::chain(&e)),
            ),
            e => internal(e),
        })?;
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

/// The action `name` asks for, once its reason is one the history and a saga event can hold.
fn operator_action(name: &str, request: &OperatorRequest) -> Result<OperatorAction, ApiError> {
    // The reason ends up in the history and in a saga event: bounded, so that the event can
    // always be published, and without NUL, which PostgreSQL's text refuses.
    if request.reason.trim().is_empty()
        || request.reason.chars().count() > MAX_REASON_CHARS
        || request.reason.contains('\0')
    {
        return Err(ApiError::bad_request(format!(
            "`reason` must be 1 to {MAX_REASON_CHARS} characters, without NUL"
        )));
    }
    match name {
        "retry" => Ok(OperatorAction::Retry),
        "skip" => Ok(OperatorAction::Skip),
        "abort" => Ok(OperatorAction::Abort {
            reason: request.reason.clone(),
        }),
        other => Err(ApiError::not_found(format!(
            "no action {other:?}; expected retry, skip or abort"
        ))),
    }
}

/// The saga `saga_id`, locked in `tx` for an operator's action, with its version, the
/// database's time and the definition it runs on; 404 when there is none, 409 when this
/// build cannot read its row or its definition.
async fn movable_saga(
    state: &AppState,
    tx: &mut sqlx::PgConnection,
    saga_id: Uuid,
) -> Result<(Saga, i64, DateTime<Utc>, Arc<SagaDefinition>), ApiError> {
    let internal = |e: crate::Error| ApiError::internal(&e);
    let cannot_move = |e: &(dyn std::error::Error + 'static)| {
        ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("saga {saga_id} cannot move: {}", messaging::chain(e)),
        )
    };
    let (saga, version, now) = store::load_for_update(&mut *tx, saga_id)
        .await
        .map_err(|e| match e {
            // Nothing can move a saga whose row this build cannot read; it stays as it is.
            crate::Error::CorruptRow { .. } => cannot_move(&e),
            e => internal(e),
        })?
        .ok_or_else(|| ApiError::not_found(format!("no saga {saga_id}")))?;
    let definition = crate::handler::definition_of(&state.catalog, &mut *tx, &saga)
        .await
        .map_err(internal)?
        .map_err(|e| cannot_move(&e))?;
    Ok((saga, version, now, definition))
}

fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}
