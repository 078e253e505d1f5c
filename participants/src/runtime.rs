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
//!
//! A batch of commands shares the runtime's statements: one records every delivery in the
//! inbox, one claims every ledger row, one writes every ledger change; only the service's
//! own steps run per command.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};

use chrono::Utc;
use events::{Action, Command, Envelope, Participant, Reply, Topics};
use messaging::consumer::{DeadLetters, Handler, HandlerError, Record};
use messaging::db::column;
use messaging::outbox::{Outbox, OutgoingMessage};
use messaging::pipeline::Pipeline;
use messaging::{db, inbox, kafka};
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
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

    /// Does the forward steps of `commands`, each `(saga id, command)`, as if one after the
    /// other in this order (a later one sees what an earlier one took), and returns their
    /// outcomes in the same order. The runtime hands over every forward step of a batch that
    /// is due at once, so a service can do them in a few statements, not a few per command.
    fn forward_all(
        &self,
        tx: &mut PgConnection,
        commands: &[(Uuid, &Command)],
    ) -> impl Future<Output = Result<Vec<StepOutcome>, HandlerError>> + Send;

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

/// An (order, step) row of the ledger, locked for this transaction.
#[derive(sqlx::FromRow)]
struct LedgerEntry {
    order_id: Uuid,
    step: String,
    forward_outcome: Option<String>,
    refusal_reason: Option<String>,
    compensated: bool,
}

/// What handling a command changes in its ledger row; written for a whole batch at once.
enum LedgerWrite {
    Nothing,
    Forward(StepOutcome),
    Compensated,
}

/// A decoded command of the batch at hand.
struct Delivered<'a> {
    record: &'a Record,
    envelope: Envelope<Command>,
}

impl Delivered<'_> {
    fn ledger_key(&self) -> (Uuid, &'static str) {
        let command = &self.envelope.body;
        (command.order_id(), command.step().as_str())
    }
}

impl<S: StepService> ParticipantHandler<S> {
    fn take_injected_failure(&self) -> bool {
        self.injected_compensation_failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// What the ledger says to do with `command`: answer from it, or run the step or its
    /// compensation.
    fn decide(&self, command: &Command, entry: LedgerEntry) -> Due {
        match command.action() {
            Action::Forward if entry.compensated => {
                let reason = "the step was already compensated; a forward command after its compensation is refused";
                // Remember the refusal unless the step had run before its compensation.
                let write = if entry.forward_outcome.is_none() {
                    LedgerWrite::Forward(StepOutcome::Refused(reason.into()))
                } else {
                    LedgerWrite::Nothing
                };
                Due::Answer(Reply::refused(command, reason), write)
            }
            Action::Forward => match entry.forward_outcome.as_deref() {
                Some("succeeded") => Due::Answer(Reply::done(command), LedgerWrite::Nothing),
                Some(_) => Due::Answer(
                    Reply::refused(command, entry.refusal_reason.unwrap_or_default()),
                    LedgerWrite::Nothing,
                ),
                None => Due::Forward,
            },
            Action::Compensate if entry.compensated => {
                Due::Answer(Reply::done(command), LedgerWrite::Nothing)
            }
            Action::Compensate if self.take_injected_failure() => Due::Answer(
                Reply::refused(command, "injected fault: compensation refused"),
                LedgerWrite::Nothing,
            ),
            Action::Compensate => Due::Compensate,
        }
    }

    /// Runs the forward steps of `commands[due]` together, and stores their answers.
    async fn run_forwards(
        &self,
        tx: &mut PgConnection,
        commands: &[Delivered<'_>],
        due: &mut Vec<usize>,
        answers: &mut [Option<(Reply, LedgerWrite)>],
    ) -> Result<(), HandlerError> {
        if due.is_empty() {
            return Ok(());
        }
        let steps: Vec<(Uuid, &Command)> = due
            .iter()
            .map(|&i| (commands[i].envelope.saga_id, &commands[i].envelope.body))
            .collect();
        let outcomes = self.service.forward_all(tx, &steps).await?;
        if outcomes.len() != steps.len() {
            return Err(HandlerError::Reject(format!(
                "{} outcomes for {} steps",
                outcomes.len(),
                steps.len()
            )));
        }
        for (i, outcome) in due.drain(..).zip(outcomes) {
            let command = &commands[i].envelope.body;
            answers[i] = Some((
                reply_for(command, outcome.clone()),
                LedgerWrite::Forward(outcome),
            ));
        }
        Ok(())
    }

    /// Handles `commands`, first deliveries with distinct (order, step), in order: claims
    /// their ledger rows in one statement, runs the steps that are due (consecutive forward
    /// steps together, each compensation in its turn), then writes the ledger changes in one
    /// statement and queues the replies.
    async fn handle_commands(
        &self,
        tx: &mut PgConnection,
        outbox: &mut Outbox,
        commands: &[Delivered<'_>],
    ) -> Result<(), HandlerError> {
        let entries = claim_ledger_entries(tx, commands).await?;
        let mut answers: Vec<Option<(Reply, LedgerWrite)>> = std::iter::repeat_with(|| None)
            .take(commands.len())
            .collect();
        let mut forwards = Vec::new();
        for (i, (delivered, entry)) in commands.iter().zip(entries).enumerate() {
            let Delivered { record, envelope } = delivered;
            let command = &envelope.body;
            match record.span.in_scope(|| self.decide(command, entry)) {
                Due::Answer(reply, write) => answers[i] = Some((reply, write)),
                Due::Forward => forwards.push(i),
                Due::Compensate => {
                    // The forward steps before it go first, as they came.
                    self.run_forwards(tx, commands, &mut forwards, &mut answers)
                        .await?;
                    let outcome = self
                        .service
                        .compensate(tx, envelope.saga_id, command)
                        .instrument(record.span.clone())
                        .await?;
                    let write = if outcome == StepOutcome::Done {
                        LedgerWrite::Compensated
                    } else {
                        LedgerWrite::Nothing
                    };
                    answers[i] = Some((reply_for(command, outcome), write));
                }
            }
        }
        self.run_forwards(tx, commands, &mut forwards, &mut answers)
            .await?;
        let mut writes = Vec::with_capacity(commands.len());
        for (delivered, answer) in commands.iter().zip(answers) {
            let Delivered { record, envelope } = delivered;
            let command = &envelope.body;
            let Some((reply, write)) = answer else {
                return Err(HandlerError::Reject(format!(
                    "no answer to {}",
                    command.type_name()
                )));
            };
            writes.push((delivered.ledger_key(), write));
            record.span.in_scope(|| {
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
                outbox.push(OutgoingMessage::new(
                    self.topics.replies(),
                    command.order_id().to_string(),
                    reply.to_json(),
                ));
            });
        }
        write_ledger(tx, &writes).await
    }
}

/// What the ledger says is due for a command.
enum Due {
    /// Nothing to run: this is the answer.
    Answer(Reply, LedgerWrite),
    Forward,
    Compensate,
}

impl<S: StepService> Handler for ParticipantHandler<S> {
    /// The batch's inbox rows in one statement, then its commands in runs whose (order, step)
    /// are distinct (a step's row is claimed and written once per statement).
    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        outbox: &mut Outbox,
        records: &[Record],
    ) -> Result<(), HandlerError> {
        let mut commands = Vec::with_capacity(records.len());
        for record in records {
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
            commands.push(Delivered { record, envelope });
        }
        let fresh =
            inbox::keep_first_deliveries(tx, commands, |c| (c.envelope.message_id, &c.record.span))
                .await?;
        let mut run_start = 0;
        let mut keys = HashSet::new();
        for (i, delivered) in fresh.iter().enumerate() {
            if !keys.insert(delivered.ledger_key()) {
                self.handle_commands(tx, outbox, &fresh[run_start..i])
                    .await?;
                run_start = i;
                keys.clear();
                keys.insert(delivered.ledger_key());
            }
        }
        self.handle_commands(tx, outbox, &fresh[run_start..]).await
    }
}

fn reply_for(command: &Command, outcome: StepOutcome) -> Reply {
    match outcome {
        StepOutcome::Done => Reply::done(command),
        StepOutcome::Refused(reason) => Reply::refused(command, reason),
    }
}

/// Creates the ledger rows of the commands' (order, step) where missing and locks them, in
/// (order, step) order so that two transactions cannot deadlock over them, so concurrent
/// commands for one step of one order (possible while partitions move between instances)
/// take turns. One statement: the upsert locks the rows it finds and returns them. Returns the
/// entries in the commands' order.
async fn claim_ledger_entries(
    tx: &mut PgConnection,
    commands: &[Delivered<'_>],
) -> Result<Vec<LedgerEntry>, HandlerError> {
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<LedgerEntry> = sqlx::query_as(
        "INSERT INTO step_ledger (order_id, saga_id, step) \
         SELECT order_id, saga_id, step FROM UNNEST($1::uuid[], $2::uuid[], $3::text[]) \
              AS c(order_id, saga_id, step) \
         ORDER BY order_id, step \
         ON CONFLICT (order_id, step) DO UPDATE SET saga_id = step_ledger.saga_id \
         RETURNING order_id, step, forward_outcome, refusal_reason, \
                   compensated_at IS NOT NULL AS compensated",
    )
    .bind(column(commands, |c| c.ledger_key().0))
    .bind(column(commands, |c| c.envelope.saga_id))
    .bind(column(commands, |c| c.ledger_key().1))
    .fetch_all(&mut *tx)
    .await?;
    let mut entries: HashMap<(Uuid, String), LedgerEntry> = rows
        .into_iter()
        .map(|entry| ((entry.order_id, entry.step.clone()), entry))
        .collect();
    commands
        .iter()
        .map(|c| {
            let (order_id, step) = c.ledger_key();
            entries
                .remove(&(order_id, step.to_owned()))
                .ok_or_else(|| HandlerError::Retry(format!("no ledger row for {order_id}/{step}")))
        })
        .collect()
}

/// Writes the ledger changes of a batch, at most one per (order, step), in one statement.
async fn write_ledger(
    tx: &mut PgConnection,
    writes: &[((Uuid, &'static str), LedgerWrite)],
) -> Result<(), HandlerError> {
    let writes: Vec<_> = writes
        .iter()
        .filter(|(_, write)| !matches!(write, LedgerWrite::Nothing))
        .collect();
    if writes.is_empty() {
        return Ok(());
    }
    fn outcome(write: &LedgerWrite) -> (Option<&'static str>, Option<&str>) {
        match write {
            LedgerWrite::Forward(StepOutcome::Done) => (Some("succeeded"), None),
            LedgerWrite::Forward(StepOutcome::Refused(reason)) => {
                (Some("refused"), Some(reason.as_str()))
            }
            LedgerWrite::Nothing | LedgerWrite::Compensated => (None, None),
        }
    }
    sqlx::query(
        "UPDATE step_ledger SET \
             forward_outcome = COALESCE(w.forward_outcome, step_ledger.forward_outcome), \
             refusal_reason = CASE WHEN w.forward_outcome IS NULL \
                                   THEN step_ledger.refusal_reason ELSE w.refusal_reason END, \
             compensated_at = CASE WHEN w.compensated THEN now() ELSE step_ledger.compensated_at END, \
             updated_at = now() \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bool[]) \
              AS w(order_id, step, forward_outcome, refusal_reason, compensated) \
         WHERE step_ledger.order_id = w.order_id AND step_ledger.step = w.step",
    )
    .bind(column(&writes, |((order_id, _), _)| *order_id))
    .bind(column(&writes, |((_, step), _)| *step))
    .bind(column(&writes, |(_, w)| outcome(w).0))
    .bind(column(&writes, |(_, w)| outcome(w).1))
    .bind(column(&writes, |(_, w)| matches!(w, LedgerWrite::Compensated)))
    .execute(tx)
    .await?;
    Ok(())
}
