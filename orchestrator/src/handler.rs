//! What the orchestrator does with a record: an `OrderPlaced` starts a saga, a reply moves
//! one. Each runs inside the consume loop's transaction: inbox row, saga row, history line and
//! outgoing commands and events (via the outbox) commit together or not at all.

use chrono::Utc;
use events::{Envelope, OrderPlaced, Participant, Reply, Topics};
use messaging::consumer::{Handler, HandlerError, Record};
use messaging::inbox;
use messaging::outbox::{self, OutgoingMessage};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::saga::{Decision, Effect, Policies, Saga};
use crate::store::{self, HistoryEntry};

pub struct OrchestratorHandler {
    topics: Topics,
    policies: Policies,
}

impl OrchestratorHandler {
    pub fn new(topics: Topics, policies: Policies) -> Self {
        Self { topics, policies }
    }

    async fn on_order(&self, tx: &mut PgConnection, record: &Record) -> Result<(), HandlerError> {
        let order = OrderPlaced::from_json(&record.payload)
            .map_err(|e| HandlerError::Reject(format!("invalid OrderPlaced: {e}")))?;
        let now = Utc::now();
        let order_id = order.order_id;
        let (saga, effects) = Saga::start(Uuid::new_v4(), order, now, &self.policies);
        record.describe(saga.id, "order", order_id);
        let trace_parent = messaging::telemetry::traceparent(&record.span);
        if !store::insert_saga(tx, &saga, trace_parent.as_deref()).await? {
            // The same order again: one order, one saga. Note it on the saga that exists.
            if let Some(existing) = store::saga_id_for_order(&mut *tx, order_id).await? {
                let entry = HistoryEntry {
                    at: now,
                    message_id: None,
                    message_type: "OrderPlaced".into(),
                    decision: "ignored".into(),
                    detail: Some(format!(
                        "duplicate order (record {}/{}@{})",
                        record.topic, record.partition, record.offset
                    )),
                    state_after: String::new(),
                };
                store::append_history(tx, existing, &entry).await?;
            }
            tracing::info!(%order_id, "duplicate OrderPlaced ignored");
            return Ok(());
        }
        let entry = HistoryEntry {
            at: now,
            message_id: None,
            message_type: "OrderPlaced".into(),
            decision: "started".into(),
            detail: None,
            state_after: saga.state.as_str().into(),
        };
        store::append_history(tx, saga.id, &entry).await?;
        tracing::info!(saga_id = %saga.id, %order_id, "saga started");
        crate::metrics::saga_started();
        emit(&self.topics, tx, &saga, 0, None, effects).await?;
        Ok(())
    }

    async fn on_reply(&self, tx: &mut PgConnection, record: &Record) -> Result<(), HandlerError> {
        let envelope = Envelope::<Reply>::from_json(&record.payload)
            .map_err(|e| HandlerError::Reject(format!("invalid reply: {e}")))?;
        record.describe(
            envelope.saga_id,
            envelope.body.step().as_str(),
            envelope.message_id,
        );
        if !inbox::first_delivery(tx, envelope.message_id).await? {
            tracing::debug!(message_id = %envelope.message_id, "redelivered reply ignored");
            return Ok(());
        }
        let reply = &envelope.body;
        let loaded = match store::load_for_update(tx, envelope.saga_id).await {
            Err(e @ crate::Error::CorruptRow { .. }) => {
                // Retrying cannot fix the row, and the reply is not at fault: park the saga.
                store::park_unreadable(tx, envelope.saga_id, &e).await?;
                return Ok(());
            }
            other => other?,
        };
        let Some((saga, version)) = loaded else {
            return Err(HandlerError::Reject(format!(
                "{} for unknown saga {}",
                reply.type_name(),
                envelope.saga_id
            )));
        };
        if saga.order.order_id != reply.order_id() {
            return Err(HandlerError::Reject(format!(
                "{} names order {} but saga {} is for order {}",
                reply.type_name(),
                reply.order_id(),
                saga.id,
                saga.order.order_id
            )));
        }
        let now = Utc::now();
        let entry = HistoryEntry {
            at: now,
            message_id: Some(envelope.message_id),
            message_type: reply.type_name().into(),
            decision: "applied".into(),
            detail: Some(format!(
                "{} attempt {}",
                reply.step().as_str(),
                reply.attempt()
            )),
            state_after: String::new(),
        };
        let decision = saga.on_reply(reply, now, &self.policies);
        commit_decision(
            &self.topics,
            tx,
            &saga,
            version,
            decision,
            entry,
            Some(envelope.message_id),
        )
        .await?;
        Ok(())
    }
}

/// Puts `span`, work the engine does on its own for `saga_id` (a deadline, an operator
/// action), into the trace of the order that started the saga.
pub(crate) async fn join_saga_trace(
    tx: &mut PgConnection,
    span: &tracing::Span,
    saga_id: Uuid,
) -> crate::Result<()> {
    if let Some(parent) = store::trace_parent(&mut *tx, saga_id).await? {
        messaging::telemetry::continue_trace(span, &parent);
    }
    Ok(())
}

/// Stores what the state machine decided about `saga` (loaded at `version`): the new state,
/// a history line (`entry`, completed here; an ignored event keeps its reason), and the
/// effects in the outbox. Returns the new saga when the decision applied.
///
/// # Errors
/// [`crate::Error::VersionConflict`] when the saga changed since it was loaded; database errors.
pub(crate) async fn commit_decision(
    topics: &Topics,
    tx: &mut PgConnection,
    saga: &Saga,
    version: i64,
    decision: Decision,
    mut entry: HistoryEntry,
    causation_id: Option<Uuid>,
) -> crate::Result<Option<Saga>> {
    match decision {
        Decision::Applied {
            saga: next,
            effects,
        } => {
            store::update_saga(tx, &next, version).await?;
            entry.state_after = next.state.as_str().into();
            store::append_history(tx, next.id, &entry).await?;
            tracing::info!(saga_id = %next.id, event = %entry.message_type, state = next.state.as_str(), "saga moved");
            crate::metrics::transition(
                saga,
                &next,
                effects.iter().filter_map(|effect| match effect {
                    Effect::Send(command) => Some(command),
                    Effect::Publish(_) => None,
                }),
            );
            // The row is now at `version + 1`: that numbers the event this transition publishes.
            let sequence = u64::try_from(version + 1).unwrap_or_default();
            emit(topics, tx, &next, sequence, causation_id, effects).await?;
            Ok(Some(*next))
        }
        Decision::Ignored { reason } => {
            tracing::info!(saga_id = %saga.id, event = %entry.message_type, %reason, "ignored");
            entry.decision = "ignored".into();
            entry.detail = Some(reason);
            entry.state_after = saga.state.as_str().into();
            store::append_history(tx, saga.id, &entry).await?;
            Ok(None)
        }
    }
}

/// Writes the saga's commands and events to the outbox, keyed by order id so that every
/// message of one order stays in one partition, in order. Events carry `sequence`, the saga
/// row's version after this transition (one event per transition at most).
async fn emit(
    topics: &Topics,
    tx: &mut PgConnection,
    saga: &Saga,
    sequence: u64,
    causation_id: Option<Uuid>,
    effects: Vec<Effect>,
) -> crate::Result<()> {
    let key = saga.order.order_id.to_string();
    for effect in effects {
        let message = match effect {
            Effect::Send(command) => {
                let topic = topics.commands(Participant::for_step(command.step()));
                let envelope = Envelope::new(saga.id, causation_id, saga.updated_at, command);
                OutgoingMessage::new(topic, key.clone(), envelope.to_json())
            }
            Effect::Publish(event) => {
                let envelope = Envelope::new(saga.id, causation_id, saga.updated_at, event)
                    .with_sequence(sequence);
                OutgoingMessage::new(topics.saga_events(), key.clone(), envelope.to_json())
            }
        };
        outbox::enqueue(tx, &message).await?;
    }
    Ok(())
}

impl Handler for OrchestratorHandler {
    async fn handle(&self, tx: &mut PgConnection, record: &Record) -> Result<(), HandlerError> {
        if record.topic == self.topics.orders() {
            self.on_order(tx, record).await
        } else if record.topic == self.topics.replies() {
            self.on_reply(tx, record).await
        } else {
            Err(HandlerError::Reject(format!(
                "the orchestrator does not read topic {}",
                record.topic
            )))
        }
    }
}
