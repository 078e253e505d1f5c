//! Starting a saga of any type over HTTP: `POST /definitions/{saga_type}/sagas` takes the
//! saga type's trigger message, checks it with that message's own contract rules and publishes
//! it to the trigger topic the type's newest definition names, where the orchestrator starts
//! it like any other trigger. `GET /definitions/{saga_type}/sagas/{key}` finds the saga by its
//! key. (`POST /orders` stays, with its generated order ids and `Idempotency-Key`.)
//!
//! No idempotency table is needed here: the trigger message carries its key (the schema
//! requires it), and the orchestrator starts one saga per type and key, so a retry of the
//! same body is the same saga.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Serialize;
use serde_json::{json, Value};
use tracing::Instrument;

use super::actions::request_trace;
use super::{ApiError, AppState, SagaView};
use crate::saga::definitions::{AcceptedTrigger, TriggerRefused};

#[derive(Debug, Serialize)]
struct SagaAccepted {
    saga_type: String,
    key: String,
    status_url: String,
}

fn invalid_trigger(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_trigger", message)
}

/// `/definitions/{saga_type}/sagas/{key}`, the key percent-encoded (a key is any text).
fn status_url(saga_type: &str, key: &str) -> String {
    format!(
        "/definitions/{saga_type}/sagas/{}",
        utf8_percent_encode(key, NON_ALPHANUMERIC)
    )
}

/// `POST /definitions/{saga_type}/sagas`.
pub(super) async fn start_saga(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Path(saga_type) = path?;
    let Json(trigger) = body?;
    let definition = state
        .catalog
        .newest(&saga_type)
        .ok_or_else(|| ApiError::not_found(format!("no saga type {saga_type:?}")))?;
    let AcceptedTrigger {
        message: checked,
        key,
    } = definition
        .trigger
        .accept(trigger)
        .map_err(|refused| match refused {
            // Loading refuses a definition whose trigger message the engine does not know.
            TriggerRefused::UnknownMessage(message_name) => {
                ApiError::internal(&crate::Error::Config(format!(
                    "saga type {saga_type} is triggered by {message_name}, which the engine does \
                     not know"
                )))
            }
            TriggerRefused::NotAnObject { message } => invalid_trigger(format!(
                "the body must be a JSON object: a {message} message"
            )),
            TriggerRefused::Encode(e) => ApiError::internal(&crate::Error::Encode(e)),
            other => invalid_trigger(other.to_string()),
        })?;
    // What goes out is the message as its type writes itself, as a client on Kafka would send.
    let payload =
        serde_json::to_vec(&checked).map_err(|e| ApiError::internal(&crate::Error::Encode(e)))?;
    let topic = state.topics.named(&definition.trigger.topic);
    let span = tracing::info_span!("start_saga", saga_type = %saga_type, key = %key);
    let record_headers = request_trace(&span, &headers);
    let sent = state
        .orders
        .send(&topic, &key, &payload, record_headers)
        .instrument(span)
        .await;
    if let Err(e) = sent {
        tracing::warn!(error.message = %e, saga_type, key, "publishing a trigger failed");
        let body = json!({ "error": {
            "code": "broker_unavailable",
            "message": "could not publish the trigger; send it again (its key makes it one saga)",
            "key": key,
        } });
        return Ok((StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response());
    }
    let accepted = SagaAccepted {
        status_url: status_url(&saga_type, &key),
        saga_type,
        key,
    };
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, accepted.status_url.clone())],
        Json(accepted),
    )
        .into_response())
}

/// `GET /definitions/{saga_type}/sagas/{key}`: the saga of that type and key.
pub(super) async fn get_saga_by_key(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<SagaView>, ApiError> {
    let Path((saga_type, key)) = path?;
    let not_found = || ApiError::not_found(format!("no {saga_type} saga with key {key:?}"));
    super::reads::saga_by_key(&state, &[saga_type.as_str()], &key)
        .await?
        .map(Json)
        .ok_or_else(not_found)
}
