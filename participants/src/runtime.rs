//! The participant runtime: everything a participant needs besides its business logic.
//!
//! For each command, in one transaction:
//! 1. decode the envelope (or dead-letter the record) and check the command is for us;
//! 2. record the message id in the inbox (a redelivery stops here);
//! 3. claim the (order, step) row of the step ledger and decide:
//!    - forward, first time: run the service's step and remember its outcome;
//!    - forward again (a retry with a new attempt): answer the remembered outcome, do nothing;
//!    - forward after the step was compensated: refuse — the saga has moved on;
//!    - compensate: run the service's compensation once, even when the forward step never
//!      happened here (it must then succeed doing nothing), and leave a tombstone;
//!    - compensate again: answer that it is done;
//! 4. write the reply to the outbox.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};

use chrono::Utc;
use events::{Action, Command, Envelope, Participant, Reply, Topics};
use messaging::consumer::{DeadLetters, Handler, HandlerError, Record};
use messaging::outbox::{Outbox, OutgoingMessage};
use messaging::pipeline::Pipeline;
use messaging::{db, inbox, kafka};
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ParticipantConfig;

/// The runtime's own table, the step ledger.
pub static RUNTIME_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/participant");

/// How a step or compensation went, in business terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    Done,
    /// Refused for a business reason; the service changed nothing.
    Refused(String),
}

/// A participant's business logic. Both methods run inside the runtime's transaction and
/// must only touch the service's own tables.
pub trait StepService: Send + Sync {
    /// Which commands this service takes.
    const PARTICIPANT: Participant;

    /// The service's own tables (and demo data).
    fn migrations() -> &'static Migrator;

    /// Does the forward step of `command`.
    fn forward(
        &self,
        tx: &mut PgConnection,
        saga_id: Uuid,
        command: &Command,
    ) -> impl Future<Output = Result<StepOutcome, HandlerError>> + Send;

    /// Undoes the step of `command`. Must succeed, doing nothing, when there is nothing to
    /// undo (the forward step never ran here). `Refused` means it cannot be undone.
    fn compensate(
        &self,
        tx: &mut PgConnection,
        saga_id: Uuid,
        command: &Command,
    ) -> impl Future<Output = Result<StepOutcome, HandlerError>> + Send;
}

/// Runs `service` until `shutdown` is cancelled.
///
/// # Errors
/// Start-up failures: database, migrations, Kafka configuration.
pub async fn run<S: StepService + 'static>(
    service: S,
    config: ParticipantConfig,
    shutdown: CancellationToken,
) -> messaging::Result<()> {
    let name = S::PARTICIPANT.as_str();
    let (pool, schema) = db::open(
        &config.database,
        name,
        &[&RUNTIME_MIGRATIONS, S::migrations()],
    )
    .await?;
    let topics = Topics::new(config.kafka.topic_prefix.clone());
    kafka::ensure_topics(&config.kafka, &topics.all()).await?;
    let pipeline = Pipeline {
        kafka: config.kafka.clone(),
        relay: config.relay.clone(),
        retention: config.retention.clone(),
        schema,
        group: config
            .group
            .clone()
            .unwrap_or_else(|| format!("{}{name}", topics.prefix())),
        topics: vec![topics.commands(S::PARTICIPANT)],
        dead_letters: DeadLetters {
            topic: topics.dead_letters(),
            consumer: name.into(),
        },
        faults: config.faults.clone(),
    };
    tracing::info!(service = name, "participant started");
    if config.fault_compensation_failures > 0 {
        tracing::warn!(
            count = config.fault_compensation_failures,
            "fault injection: refusing the first compensations"
        );
    }
    let handler = ParticipantHandler {
        service,
        topics,
        injected_compensation_failures: AtomicU32::new(config.fault_compensation_failures),
    };
    let metrics_server = config.metrics_addr.map(|addr| {
        let metrics = messaging::metrics::Metrics::install();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            // Metrics are for watching; a taken port must not stop the service.
            if let Err(e) = metrics.serve(addr, stop).await {
                tracing::warn!(error.message = %e, %addr, "not serving /metrics");
            }
        })
    });
    let result = pipeline.run(pool.clone(), handler, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    pool.close().await;
    result
}

struct ParticipantHandler<S> {
    service: S,
    topics: Topics,
    /// Compensations still to refuse (fault injection).
    injected_compensation_failures: AtomicU32,
}

/// A (saga, step) row of the ledger, locked for this transaction.
struct LedgerEntry {
    forward_outcome: Option<String>,
    refusal_reason: Option<String>,
    compensated: bool,
}

impl<S: StepService> ParticipantHandler<S> {
    fn take_injected_failure(&self) -> bool {
        self.injected_compensation_failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    async fn reply_to(
        &self,
        tx: &mut PgConnection,
        saga_id: Uuid,
        command: &Command,
        entry: LedgerEntry,
    ) -> Result<Reply, HandlerError> {
        let step = command.step().as_str();
        let order_id = command.order_id();
        let reply = match command.action() {
            Action::Forward if entry.compensated => {
                let reason = "the step was already compensated; a forward command after its compensation is refused";
                // Remember the refusal unless the step had run before its compensation.
                if entry.forward_outcome.is_none() {
                    record_forward(tx, order_id, step, &StepOutcome::Refused(reason.into()))
                        .await?;
                }
                Reply::refused(command, reason)
            }
            Action::Forward => match entry.forward_outcome.as_deref() {
                Some("succeeded") => Reply::done(command),
                Some(_) => Reply::refused(command, entry.refusal_reason.unwrap_or_default()),
                None => {
                    let outcome = self.service.forward(tx, saga_id, command).await?;
                    record_forward(tx, order_id, step, &outcome).await?;
                    reply_for(command, outcome)
                }
            },
            Action::Compensate if entry.compensated => Reply::done(command),
            Action::Compensate if self.take_injected_failure() => {
                Reply::refused(command, "injected fault: compensation refused")
            }
            Action::Compensate => {
                let outcome = self.service.compensate(tx, saga_id, command).await?;
                if outcome == StepOutcome::Done {
                    record_compensation(tx, order_id, step).await?;
                }
                reply_for(command, outcome)
            }
        };
        Ok(reply)
    }
}

impl<S: StepService> Handler for ParticipantHandler<S> {
    async fn handle(
        &self,
        tx: &mut PgConnection,
        outbox: &mut Outbox,
        record: &Record,
    ) -> Result<(), HandlerError> {
        let envelope = Envelope::<Command>::from_json(&record.payload)
            .map_err(|e| HandlerError::Reject(format!("invalid command: {e}")))?;
        let command = &envelope.body;
        record.describe(
            envelope.saga_id,
            command.step().as_str(),
            envelope.message_id,
        );
        if Participant::for_step(command.step()) != S::PARTICIPANT {
            return Err(HandlerError::Reject(format!(
                "{} is not a command for {}",
                command.type_name(),
                S::PARTICIPANT.as_str()
            )));
        }
        let Some(entry) =
            claim_ledger_entry(tx, envelope.message_id, envelope.saga_id, command).await?
        else {
            tracing::debug!(message_id = %envelope.message_id, "redelivered command ignored");
            return Ok(());
        };
        let reply = self.reply_to(tx, envelope.saga_id, command, entry).await?;
        tracing::info!(
            saga_id = %envelope.saga_id,
            command = command.type_name(),
            attempt = command.attempt(),
            reply = reply.type_name(),
            "command handled"
        );
        let reply = Envelope::new(
            envelope.saga_id,
            Some(envelope.message_id),
            Utc::now(),
            reply,
        );
        let message = OutgoingMessage::new(
            self.topics.replies(),
            command.order_id().to_string(),
            reply.to_json(),
        );
        outbox.push(message);
        Ok(())
    }
}

fn reply_for(command: &Command, outcome: StepOutcome) -> Reply {
    match outcome {
        StepOutcome::Done => Reply::done(command),
        StepOutcome::Refused(reason) => Reply::refused(command, reason),
    }
}

/// Records the delivery of command `message_id` in the inbox and, the first time, creates the
/// ledger row of (order, step) if needed and locks it, so concurrent commands for one step of
/// one order (possible while partitions move between instances) take turns. Returns `None`
/// for a redelivery. One statement: the upsert locks the row it finds and returns it.
async fn claim_ledger_entry(
    tx: &mut PgConnection,
    message_id: Uuid,
    saga_id: Uuid,
    command: &Command,
) -> Result<Option<LedgerEntry>, HandlerError> {
    let (deliveries, forward_outcome, refusal_reason, compensated): (
        i32,
        Option<String>,
        Option<String>,
        bool,
    ) = sqlx::query_as(&format!(
        "WITH delivery AS ({}), \
         ledger AS ( \
             INSERT INTO step_ledger (order_id, saga_id, step) VALUES ($2, $3, $4) \
             ON CONFLICT (order_id, step) DO UPDATE SET saga_id = step_ledger.saga_id \
             RETURNING forward_outcome, refusal_reason, compensated_at IS NOT NULL AS compensated \
         ) \
         SELECT (SELECT deliveries FROM delivery), forward_outcome, refusal_reason, compensated \
         FROM ledger",
        inbox::RECORD_DELIVERY
    ))
    .bind(message_id)
    .bind(command.order_id())
    .bind(saga_id)
    .bind(command.step().as_str())
    .fetch_one(&mut *tx)
    .await?;
    Ok((deliveries == 1).then_some(LedgerEntry {
        forward_outcome,
        refusal_reason,
        compensated,
    }))
}

async fn record_forward(
    tx: &mut PgConnection,
    order_id: Uuid,
    step: &str,
    outcome: &StepOutcome,
) -> Result<(), HandlerError> {
    let (label, reason) = match outcome {
        StepOutcome::Done => ("succeeded", None),
        StepOutcome::Refused(reason) => ("refused", Some(reason.as_str())),
    };
    sqlx::query(
        "UPDATE step_ledger SET forward_outcome = $3, refusal_reason = $4, updated_at = now() \
         WHERE order_id = $1 AND step = $2",
    )
    .bind(order_id)
    .bind(step)
    .bind(label)
    .bind(reason)
    .execute(tx)
    .await?;
    Ok(())
}

async fn record_compensation(
    tx: &mut PgConnection,
    order_id: Uuid,
    step: &str,
) -> Result<(), HandlerError> {
    sqlx::query(
        "UPDATE step_ledger SET compensated_at = now(), updated_at = now() \
         WHERE order_id = $1 AND step = $2",
    )
    .bind(order_id)
    .bind(step)
    .execute(tx)
    .await?;
    Ok(())
}
