//! What the orchestrator does with a record: a trigger message (an `OrderPlaced` on `orders`,
//! a `ReturnRequested` on `returns`, whatever the definitions name) starts a saga, a reply
//! moves one. Each runs inside the consume loop's transaction: inbox row, saga row, history line and
//! outgoing commands and events (via the outbox) commit together or not at all.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use events::{Envelope, Reply, Topics};
use messaging::consumer::{Handler, HandlerError, Record};
use messaging::inbox;
use messaging::outbox::{Outbox, OutgoingMessage};
use sqlx::PgConnection;
use tracing::Instrument;
use uuid::Uuid;

use crate::catalog::Catalog;
use crate::saga::definitions::trigger_message;
use crate::saga::{Decision, Effect, Saga, SagaDefinition};
use crate::store::{self, HistoryDecision, HistoryEntry};

/// Why the orchestrator cannot take a record: its text, with its cause's, is the dead-letter
/// reason (or, for [`RecordError::NoDatabaseTime`], what a retry may cure).
#[derive(Debug, thiserror::Error)]
enum RecordError {
    /// Loading refused a definition whose trigger message the engine does not know.
    #[error("no trigger message {message} in this build")]
    UnknownTrigger { message: String },
    #[error("invalid {message}")]
    InvalidTrigger {
        message: String,
        #[source]
        source: events::ContractError,
    },
    #[error("{message} makes no saga key")]
    NoSagaKey {
        message: String,
        #[source]
        source: crate::saga::definitions::PayloadError,
    },
    #[error("invalid reply")]
    InvalidReply(#[source] events::ContractError),
    #[error("{reply} for unknown saga {saga_id}")]
    UnknownSaga { reply: String, saga_id: Uuid },
    #[error("{reply} names key {key:?} but saga {saga_id} has key {saga_key}")]
    OtherSagasKey {
        reply: String,
        key: String,
        saga_id: Uuid,
        saga_key: String,
    },
    /// A saga was locked, so its statement read the database's time.
    #[error("saga {saga_id} was locked without the database's time")]
    NoDatabaseTime { saga_id: Uuid },
    #[error("the orchestrator does not read topic {topic}")]
    UnreadTopic { topic: String },
}

pub struct OrchestratorHandler {
    topics: Topics,
    catalog: Arc<Catalog>,
}

impl OrchestratorHandler {
    pub fn new(topics: Topics, catalog: Arc<Catalog>) -> Self {
        Self { topics, catalog }
    }

    /// Starts a saga of `definition` for the trigger message in `record`, unless one of its
    /// type and key started already. `now` is the database's time.
    async fn on_trigger(
        &self,
        tx: &mut PgConnection,
        outbox: &mut Outbox,
        record: &Record,
        definition: &SagaDefinition,
        now: DateTime<Utc>,
    ) -> Result<(), HandlerError> {
        let message = &definition.trigger.message;
        // Loading refused a definition whose trigger message the engine does not know.
        let Some(known) = trigger_message(message) else {
            return Err(HandlerError::reject(RecordError::UnknownTrigger {
                message: message.clone(),
            }));
        };
        let trigger = (known.decode)(&record.payload).map_err(|source| {
            HandlerError::reject(RecordError::InvalidTrigger {
                message: message.clone(),
                source,
            })
        })?;
        let (saga, effects) =
            Saga::start(Uuid::new_v4(), trigger, now, definition).map_err(|source| {
                HandlerError::reject(RecordError::NoSagaKey {
                    message: message.clone(),
                    source,
                })
            })?;
        // A trigger message has no message id of its own; the span names the saga and its type.
        record
            .span
            .record("saga_id", tracing::field::display(saga.id))
            .record("step", definition.name.as_str());
        let trace_parent = messaging::telemetry::traceparent(&record.span);
        let started = HistoryEntry {
            at: now,
            message_id: None,
            message_type: message.clone(),
            decision: HistoryDecision::Started,
            detail: None,
            state_after: saga.state,
        };
        if !store::insert_saga(tx, &saga, trace_parent.as_deref(), &started).await? {
            // The same subject again: one saga per type and key. Note it on the saga that
            // exists.
            let detail = format!(
                "duplicate {} (record {}/{}@{})",
                definition.name, record.topic, record.partition, record.offset
            );
            store::note_duplicate(tx, &definition.name, &saga.key, message, &detail).await?;
            tracing::info!(saga_type = %definition.name, key = %saga.key, "duplicate {message} ignored");
            return Ok(());
        }
        tracing::info!(saga_id = %saga.id, saga_type = %definition.name, key = %saga.key, "saga started");
        crate::metrics::saga_started();
        emit(&self.topics, outbox, &saga, 0, None, effects);
        Ok(())
    }

    /// The definition `saga` runs on: `Ok(Err(_))` when no orchestrator stored it or it does
    /// not read back (retrying cannot help: the saga is parked), `Err` for a database error
    /// (worth a retry).
    pub(crate) async fn definition_of(
        &self,
        tx: &mut PgConnection,
        saga: &Saga,
    ) -> Result<Result<Arc<SagaDefinition>, crate::Error>, HandlerError> {
        definition_of(&self.catalog, tx, saga)
            .await
            .map_err(Into::into)
    }

    /// Handles a batch's replies together: one statement records their deliveries in the
    /// inbox, one locks their sagas, the state machine moves each saga in memory reply by
    /// reply (a saga answered twice in the batch moves twice), and one statement each writes
    /// the sagas and their history lines. A reply the batch cannot take (undecodable, for an
    /// unknown saga or with another saga's key) fails the batch: the consume loop then handles its
    /// records one at a time, and that one is dead-lettered.
    async fn on_replies(
        &self,
        tx: &mut PgConnection,
        outbox: &mut Outbox,
        records: &[&Record],
    ) -> Result<(), HandlerError> {
        let replies = decode_replies(records)?;
        let mut replies = inbox::keep_first_deliveries(tx, replies, |(record, envelope)| {
            (envelope.message_id, &record.span)
        })
        .await?;
        let mut sagas = self.lock_sagas(tx, &mut replies).await?;
        let history = self.apply_replies(outbox, &mut sagas, &replies)?;
        let updates: Vec<store::SagaUpdate<'_>> = sagas
            .locked
            .values()
            .filter_map(|(saga, version)| {
                let loaded = sagas.loaded_versions.get(&saga.id).copied()?;
                (*version != loaded).then_some(store::SagaUpdate {
                    saga,
                    expected_version: loaded,
                    new_version: *version,
                })
            })
            .collect();
        store::save_transitions(tx, &updates, &history, store::Writer::Consume, outbox).await?;
        Ok(())
    }

    /// Locks the sagas `replies` answer, with the definitions they run on. A saga whose row
    /// or definition does not read back is parked, and its replies dropped: retrying cannot
    /// fix the row, and the replies are not at fault.
    async fn lock_sagas(
        &self,
        tx: &mut PgConnection,
        replies: &mut Vec<(&Record, Envelope<Reply>)>,
    ) -> Result<LockedSagas, HandlerError> {
        let saga_ids: Vec<Uuid> = replies
            .iter()
            .map(|(_, e)| e.saga_id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let store::Locked {
            sagas: (mut locked, mut unreadable),
            now,
        } = store::lock_sagas(tx, &saga_ids).await?;
        let mut definitions = HashMap::new();
        for (saga, _) in locked.values() {
            match self.definition_of(tx, saga).await? {
                Ok(definition) => {
                    definitions.insert(saga.id, definition);
                }
                Err(e) => unreadable.push((saga.id, e)),
            }
        }
        locked.retain(|id, _| definitions.contains_key(id));
        for (saga_id, e) in &unreadable {
            store::park_unreadable(tx, *saga_id, e).await?;
            replies.retain(|(_, envelope)| envelope.saga_id != *saga_id);
        }
        let loaded_versions = locked
            .iter()
            .map(|(id, (_, version))| (*id, *version))
            .collect();
        Ok(LockedSagas {
            locked,
            loaded_versions,
            definitions,
            now,
        })
    }

    /// Moves the locked sagas in memory, reply by reply, queueing what each move sends in
    /// `outbox`; returns their history lines.
    fn apply_replies(
        &self,
        outbox: &mut Outbox,
        sagas: &mut LockedSagas,
        replies: &[(&Record, Envelope<Reply>)],
    ) -> Result<Vec<(Uuid, HistoryEntry)>, HandlerError> {
        let mut history = Vec::with_capacity(replies.len());
        for (record, envelope) in replies {
            let reply = &envelope.body;
            let Some((saga, version)) = sagas.locked.get_mut(&envelope.saga_id) else {
                return Err(HandlerError::reject(RecordError::UnknownSaga {
                    reply: reply.name.clone(),
                    saga_id: envelope.saga_id,
                }));
            };
            let Some(definition) = sagas.definitions.get(&saga.id) else {
                continue;
            };
            if saga.key != reply.key {
                return Err(HandlerError::reject(RecordError::OtherSagasKey {
                    reply: reply.name.clone(),
                    key: reply.key.clone(),
                    saga_id: saga.id,
                    saga_key: saga.key.clone(),
                }));
            }
            let Some(now) = sagas.now else {
                return Err(HandlerError::retry(RecordError::NoDatabaseTime {
                    saga_id: saga.id,
                }));
            };
            let entry = HistoryEntry {
                at: now,
                message_id: Some(envelope.message_id),
                message_type: reply.name.clone(),
                decision: HistoryDecision::Applied,
                detail: Some(format!("{} attempt {}", reply.step, reply.attempt)),
                // Set to the state the decision leaves (`note_decision`).
                state_after: saga.state,
            };
            let decision = saga.on_reply(reply, now, definition);
            // In the record's span, so that the commands it causes join the order's trace.
            let (next, entry) = record.span.in_scope(|| {
                note_decision(
                    &self.topics,
                    outbox,
                    saga,
                    *version,
                    decision,
                    entry,
                    Some(envelope.message_id),
                )
            });
            history.push((saga.id, entry));
            if let Some(next) = next {
                *saga = next;
                *version += 1;
            }
        }
        Ok(history)
    }
}

/// The sagas a batch's replies answer, locked for its transaction.
struct LockedSagas {
    /// Each saga as the replies move it, at its version so far.
    locked: HashMap<Uuid, (Saga, i64)>,
    /// Each saga's version as it was loaded.
    loaded_versions: HashMap<Uuid, i64>,
    definitions: HashMap<Uuid, Arc<SagaDefinition>>,
    /// The database's time; `None` only when nothing was locked.
    now: Option<DateTime<Utc>>,
}

/// Decodes and checks the replies in `records`, and names on each record's span what it is
/// about. Unknown fields are ignored (the contract's tolerant reader: `events::Reply`). A reply
/// keyed otherwise than by its body's `key` (no key, another key) is taken by its body and
/// counted ([`crate::metrics::reply_key_mismatch`]): the body says which saga it answers, and
/// dead-lettering it would leave that saga waiting for its deadline over a producer setting.
fn decode_replies<'r>(
    records: &[&'r Record],
) -> Result<Vec<(&'r Record, Envelope<Reply>)>, HandlerError> {
    let mut replies = Vec::with_capacity(records.len());
    for record in records {
        let envelope = Envelope::<Reply>::from_json(&record.payload)
            .and_then(|envelope| envelope.body.validate().map(|()| envelope))
            .map_err(|e| HandlerError::reject(RecordError::InvalidReply(e)))?;
        record.describe(envelope.saga_id, &envelope.body.step, envelope.message_id);
        let body_key = envelope.body.key.as_str();
        if record.key.as_deref() != Some(body_key.as_bytes()) {
            crate::metrics::reply_key_mismatch(
                record.key.as_deref(),
                body_key,
                &envelope.body.name,
            );
        }
        replies.push((*record, envelope));
    }
    Ok(replies)
}

/// The definition `saga` runs on, from `catalog`: `Ok(Err(_))` when it is not stored or does
/// not read back (the saga cannot move; callers park it), `Err` for a database error.
pub(crate) async fn definition_of(
    catalog: &Catalog,
    tx: &mut PgConnection,
    saga: &Saga,
) -> crate::Result<crate::Result<Arc<SagaDefinition>>> {
    match catalog
        .get(&mut *tx, &saga.definition_name, saga.definition_version)
        .await
    {
        Ok(definition) => Ok(Ok(definition)),
        Err(e @ (crate::Error::Database(_) | crate::Error::Messaging(_))) => Err(e),
        Err(e) => Ok(Err(e)),
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

/// Stores what the state machine decided about `saga` (loaded at `version`): the new state, a
/// history line (`entry`, completed here; an ignored event keeps its reason) and the effects,
/// all in the saga's one statement, the effects announced by `NOTIFY` (`store::Writer::wake`).
/// Returns the new saga when the decision applied. For work the engine does on its own (a
/// deadline, an operator action): no message caused it.
///
/// # Errors
/// [`crate::Error::VersionConflict`] when the saga changed since it was loaded; database errors.
pub(crate) async fn commit_decision(
    topics: &Topics,
    tx: &mut PgConnection,
    saga: &Saga,
    version: i64,
    decision: Decision,
    entry: HistoryEntry,
) -> crate::Result<Option<Saga>> {
    // Its history line says which: an operator's action, else a deadline.
    let writer = match entry.decision {
        HistoryDecision::Operator => store::Writer::Operator,
        _ => store::Writer::Deadline,
    };
    // Only an applied decision has effects, and its saga update writes them.
    let mut outbox = Outbox::default();
    let (next, entry) = note_decision(topics, &mut outbox, saga, version, decision, entry, None);
    match &next {
        Some(next) => store::update_saga(tx, next, version, &entry, writer, &mut outbox).await?,
        None => store::append_history(tx, saga.id, &entry).await?,
    }
    Ok(next)
}

/// What a decision about `saga` (at `version`) amounts to, short of writing the saga: the new
/// saga when it applied, its history line (`entry`, completed), its effects queued in
/// `outbox`, logs and metrics.
fn note_decision(
    topics: &Topics,
    outbox: &mut Outbox,
    saga: &Saga,
    version: i64,
    decision: Decision,
    mut entry: HistoryEntry,
    causation_id: Option<Uuid>,
) -> (Option<Saga>, HistoryEntry) {
    match decision {
        Decision::Applied {
            saga: next,
            effects,
        } => {
            entry.state_after = next.state;
            tracing::info!(saga_id = %next.id, event = %entry.message_type, state = next.state.as_str(), "saga moved");
            crate::metrics::transition(
                saga,
                &next,
                effects.iter().filter_map(|effect| match effect {
                    Effect::Send { command, .. } => Some(command),
                    Effect::Publish(_) => None,
                }),
            );
            // The row will be at `version + 1`: that numbers the event this transition
            // publishes.
            let sequence = u64::try_from(version + 1).unwrap_or_default();
            emit(topics, outbox, &next, sequence, causation_id, effects);
            (Some(*next), entry)
        }
        Decision::Ignored { reason } => {
            tracing::info!(saga_id = %saga.id, event = %entry.message_type, %reason, "ignored");
            // A refused operator action keeps who asked and why in front of the refusal.
            entry.detail = Some(match (entry.decision, entry.detail.take()) {
                (HistoryDecision::Operator, Some(asked)) => format!("{asked}; refused: {reason}"),
                _ => reason,
            });
            entry.decision = HistoryDecision::Ignored;
            entry.state_after = saga.state;
            (None, entry)
        }
    }
}

/// Queues the saga's commands and events for the outbox, keyed by the saga's key (the order
/// saga: the order id, as its trigger is keyed) so that every message of one saga stays in one
/// partition, in order. Events carry `sequence`, the saga
/// row's version after this transition (one event per transition at most).
fn emit(
    topics: &Topics,
    outbox: &mut Outbox,
    saga: &Saga,
    sequence: u64,
    causation_id: Option<Uuid>,
    effects: Vec<Effect>,
) {
    let key = saga.key.clone();
    for effect in effects {
        let message = match effect {
            Effect::Send { topic, command } => {
                let topic = topics.named(&topic);
                let envelope = Envelope::new(saga.id, causation_id, saga.updated_at, command);
                OutgoingMessage::new(topic, key.clone(), envelope.to_json())
            }
            Effect::Publish(event) => {
                let envelope = Envelope::new(saga.id, causation_id, saga.updated_at, event)
                    .with_sequence(sequence);
                OutgoingMessage::new(topics.saga_events(), key.clone(), envelope.to_json())
            }
        };
        outbox.push(message);
    }
}

impl Handler for OrchestratorHandler {
    /// Trigger messages one at a time (one statement each), then all replies together.
    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        outbox: &mut Outbox,
        records: &[Record],
    ) -> Result<(), HandlerError> {
        let mut replies = Vec::with_capacity(records.len());
        // Read once for the batch's triggers, the database's clock: a new saga's times and
        // its first deadline are reckoned on it, as every later move's are.
        let mut now = None;
        for record in records {
            let trigger = record
                .topic
                .strip_prefix(self.topics.prefix())
                .and_then(|topic| self.catalog.for_topic(topic));
            if let Some(definition) = trigger {
                // A reply never answers a saga started in its own batch: its command went out
                // after that saga committed. So triggers may go first.
                let now = match now {
                    Some(now) => now,
                    None => *now.insert(store::database_now(&mut *tx).await?),
                };
                self.on_trigger(tx, outbox, record, &definition, now)
                    .instrument(record.span.clone())
                    .await?;
            } else if record.topic == self.topics.replies() {
                replies.push(record);
            } else {
                return Err(HandlerError::reject(RecordError::UnreadTopic {
                    topic: record.topic.clone(),
                }));
            }
        }
        if replies.is_empty() {
            return Ok(());
        }
        self.on_replies(tx, outbox, &replies).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dead-letter reasons read as they did when each was formatted where it arose (the
    /// texts on the right are those formats), and keep their typed cause.
    #[test]
    fn a_records_reason_reads_as_before_and_keeps_its_cause() {
        let record = Record {
            topic: "saga.replies".into(),
            partition: 0,
            offset: 7,
            key: None,
            payload: b"{".to_vec(),
            span: tracing::Span::none(),
        };
        let rejected = decode_replies(&[&record]).expect_err("not JSON");
        let contract = Envelope::<Reply>::from_json(b"{").expect_err("not JSON");
        assert_eq!(rejected.reason(), format!("invalid reply: {contract}"));
        assert!(matches!(
            rejected.cause().downcast_ref::<RecordError>(),
            Some(RecordError::InvalidReply(_))
        ));
        let trigger = events::OrderPlaced::from_json(b"[]").expect_err("not an order");
        let trigger_text = trigger.to_string();
        let message = "OrderPlaced".to_owned();
        let saga_id = Uuid::from_u128(7);
        let cases = [
            (
                HandlerError::reject(RecordError::InvalidTrigger {
                    message: message.clone(),
                    source: trigger,
                }),
                format!("invalid {message}: {trigger_text}"),
            ),
            (
                HandlerError::reject(RecordError::UnknownTrigger {
                    message: message.clone(),
                }),
                format!("no trigger message {message} in this build"),
            ),
            (
                HandlerError::reject(RecordError::UnknownSaga {
                    reply: "StockReserved".into(),
                    saga_id,
                }),
                format!("{} for unknown saga {}", "StockReserved", saga_id),
            ),
            (
                HandlerError::reject(RecordError::OtherSagasKey {
                    reply: "StockReserved".into(),
                    key: "k1".into(),
                    saga_id,
                    saga_key: "k2".into(),
                }),
                format!(
                    "{} names key {:?} but saga {} has key {}",
                    "StockReserved", "k1", saga_id, "k2"
                ),
            ),
            (
                HandlerError::retry(RecordError::NoDatabaseTime { saga_id }),
                format!("saga {saga_id} was locked without the database's time"),
            ),
            (
                HandlerError::reject(RecordError::UnreadTopic {
                    topic: "elsewhere".into(),
                }),
                format!("the orchestrator does not read topic {}", "elsewhere"),
            ),
        ];
        for (error, before) in cases {
            assert_eq!(error.reason(), before);
            assert!(error.cause().downcast_ref::<RecordError>().is_some());
        }
    }
}
