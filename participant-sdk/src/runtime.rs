//! The participant runtime: everything a participant needs besides its business logic (the
//! [`Step`](crate::Step) impls it serves).
//!
//! For each command, in one transaction:
//! 1. decode the envelope and the payload into the typed request of the step it names (or
//!    dead-letter the record: unreadable, a step this participant does not serve, a payload
//!    that does not fit);
//! 2. record the message id in the inbox (a redelivery stops here);
//! 3. claim the (saga key, step) row of the step ledger and decide:
//!    - forward, first time: run the step and remember its outcome;
//!    - forward again (a retry with a new attempt): answer the remembered outcome, do nothing;
//!    - forward after the step was compensated: refuse — the saga has moved on;
//!    - compensate: run the compensation once, even when the forward step never happened here
//!      (it must then succeed doing nothing), and leave a tombstone;
//!    - compensate again: answer that it is done;
//! 4. write the reply to the outbox, named as the command said (its `replies`).
//!
//! A batch of commands shares the runtime's statements: one records every delivery in the
//! inbox and claims every ledger row, one writes every ledger change with every reply; only the
//! steps run per command (each step's due forward requests together).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};

use chrono::Utc;
use events::{Action, Command, Envelope, Reply, Topics};
use messaging::consumer::{Handler, HandlerError, Record};
use messaging::db::column;
use messaging::outbox::{Outbox, OutgoingMessage};
use messaging::service::Service;
use messaging::{inbox, kafka};
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::sdk::{Decoded, DecodedRequest, Participant, ServedStep, StepOutcome};
use crate::ParticipantConfig;

/// The runtime's own table, the step ledger.
pub static RUNTIME_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/participant");

/// Runs `participant` (already checked) until `shutdown` is cancelled.
pub(crate) async fn run(
    participant: Participant,
    config: ParticipantConfig,
    shutdown: CancellationToken,
) -> messaging::Result<()> {
    let name = participant.name;
    let mut service = Service::open(
        name,
        &config.service,
        &participant.schema_migrations(),
        shutdown,
    )
    .await?;
    let topics = Topics::new(config.service.kafka.topic_prefix.clone());
    let command_topic = topics.named(
        &config
            .command_topic
            .clone()
            .unwrap_or_else(|| format!("{name}.commands")),
    );
    // Only the topics it uses: on a secured cluster its identity may see no other (saga.events
    // is the orchestrator's and the clients'), and asking for one would stop it at start.
    let used = [
        command_topic.clone(),
        topics.replies(),
        topics.dead_letters(),
    ];
    kafka::ensure_topics(&config.service.kafka, &used).await?;
    let pipeline = service.pipeline(
        config.group.as_deref(),
        vec![command_topic.clone()],
        topics.dead_letters(),
    );
    tracing::info!(
        service = name,
        topic = %command_topic,
        steps = ?participant.step_names(),
        "participant started"
    );
    if config.fault_compensation_failures > 0 {
        tracing::warn!(
            count = config.fault_compensation_failures,
            "fault injection: refusing the first compensations"
        );
    }
    let handler = ParticipantHandler {
        name,
        steps: participant.steps,
        topics,
        injected_compensation_failures: AtomicU32::new(config.fault_compensation_failures),
    };
    if let Some(addr) = config.metrics_addr {
        service.serve_metrics(addr);
    }
    let retention_secs = config.step_ledger_retention_secs;
    service.sweep("step ledger retention", move |pool| async move {
        sweep_ledger(&pool, retention_secs).await
    });
    service.consume(pipeline, handler);
    service.run().await
}

/// Why the runtime cannot take a command: its text, with its cause's, is the dead-letter
/// reason.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error("invalid command")]
    Invalid(#[source] events::ContractError),
    #[error(
        "{command} is for step {step}, which {participant} does not serve (it serves {served})"
    )]
    StepNotServed {
        command: String,
        step: String,
        participant: &'static str,
        served: String,
    },
    #[error("the payload of {command} does not fit the {request} request of step {step}")]
    PayloadMisfit {
        command: String,
        request: &'static str,
        step: String,
        #[source]
        source: serde_json::Error,
    },
    /// The definition says the step always succeeds: the record is dead-lettered with the
    /// reason rather than answered wrongly.
    #[error("{command} ({action} of step {step}) was refused ({reason}), but the command names no failure reply")]
    NoFailureReply {
        command: String,
        action: &'static str,
        step: String,
        reason: String,
    },
    #[error("step {step} answered {answered} of {asked} requests")]
    ShortAnswer {
        step: &'static str,
        answered: usize,
        asked: usize,
    },
    #[error("no answer to {command}")]
    NoAnswer { command: String },
    /// The claim returns every row it locks; one missing is worth another try.
    #[error("no ledger row for {key}/{step}")]
    NoLedgerRow { key: String, step: String },
}

struct ParticipantHandler {
    name: &'static str,
    steps: Vec<Box<dyn ServedStep>>,
    topics: Topics,
    /// Compensations still to refuse (fault injection).
    injected_compensation_failures: AtomicU32,
}

/// What the ledger remembers of a step's forward command: PostgreSQL's `ledger_outcome`
/// (participant migration 103).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "ledger_outcome", rename_all = "snake_case")]
pub enum LedgerOutcome {
    Succeeded,
    Refused,
}

impl LedgerOutcome {
    pub const ALL: [Self; 2] = [Self::Succeeded, Self::Refused];
}

/// A (saga key, step) row of the ledger, locked for this transaction.
struct LedgerEntry {
    saga_key: String,
    step: String,
    forward_outcome: Option<LedgerOutcome>,
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
    /// Index of the step it is for, in the participant's steps.
    step: usize,
    payload: Decoded,
}

impl Delivered<'_> {
    fn command(&self) -> &Command {
        &self.envelope.body
    }

    fn ledger_key(&self) -> (&str, &str) {
        let command = self.command();
        (&command.key, &command.step)
    }

    fn request(&self) -> DecodedRequest<'_> {
        let command = self.command();
        DecodedRequest {
            saga_id: self.envelope.saga_id,
            key: &command.key,
            attempt: command.attempt,
            payload: &self.payload,
        }
    }
}

/// The reply that says `command` was refused (or could not be undone) for `reason`. A command
/// that names no failure reply cannot be refused: the definition says the step always
/// succeeds, so the record is dead-lettered with the reason rather than answered wrongly.
fn refusal(command: &Command, reason: &str) -> Result<Reply, HandlerError> {
    Reply::failed(command, reason).ok_or_else(|| {
        HandlerError::reject(CommandError::NoFailureReply {
            command: command.name.clone(),
            action: command.action.as_str(),
            step: command.step.clone(),
            reason: reason.to_owned(),
        })
    })
}

fn reply_for(command: &Command, outcome: &StepOutcome) -> Result<Reply, HandlerError> {
    match outcome {
        StepOutcome::Done => Ok(Reply::succeeded(command)),
        StepOutcome::Refused(reason) => refusal(command, reason),
    }
}

/// What the ledger says is due for a command.
enum Due {
    /// Nothing to run: this is the answer.
    Answer(Reply, LedgerWrite),
    Forward,
    Compensate,
}

/// Reads a command record's bytes as the runtime does before it touches the database: the
/// envelope (every bound checked; fields it does not know ignored, the contract's tolerant
/// reader), the step of `steps` it names, and its payload decoded into that step's request. An
/// error is what the record is dead-lettered with.
pub(crate) fn read_command(
    participant: &'static str,
    steps: &[Box<dyn ServedStep>],
    payload: &[u8],
) -> Result<(Envelope<Command>, usize, Decoded), HandlerError> {
    let envelope = Envelope::<Command>::from_json(payload)
        .map_err(|e| HandlerError::reject(CommandError::Invalid(e)))?;
    let (step, decoded) = route(participant, steps, &envelope.body)?;
    Ok((envelope, step, decoded))
}

/// Finds the step `command` is for, and decodes its payload into that step's request.
fn route(
    participant: &'static str,
    steps: &[Box<dyn ServedStep>],
    command: &Command,
) -> Result<(usize, Decoded), HandlerError> {
    let Some(index) = steps.iter().position(|s| s.name() == command.step) else {
        let served: Vec<&str> = steps.iter().map(|s| s.name()).collect();
        return Err(HandlerError::reject(CommandError::StepNotServed {
            command: command.name.clone(),
            step: command.step.clone(),
            participant,
            served: served.join(", "),
        }));
    };
    let compensation = command.action == Action::Compensate;
    let payload = steps[index]
        .decode(compensation, &command.payload)
        .map_err(|source| {
            HandlerError::reject(CommandError::PayloadMisfit {
                command: command.name.clone(),
                request: if compensation {
                    "compensation"
                } else {
                    "forward"
                },
                step: command.step.clone(),
                source,
            })
        })?;
    Ok((index, payload))
}

/// The envelope the runtime answers `command` with: a new message id, the command's saga id,
/// and the command's message id as its cause (the contract's "Causation").
pub fn reply_envelope(command: &Envelope<Command>, reply: Reply) -> Envelope<Reply> {
    Envelope::new(command.saga_id, Some(command.message_id), Utc::now(), reply)
}

impl ParticipantHandler {
    /// Refuses the next compensation while injected failures are left, if the command can be
    /// refused at all.
    fn take_injected_failure(&self, command: &Command) -> bool {
        command.replies.failure.is_some()
            && self
                .injected_compensation_failures
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
    }

    /// What the ledger says to do with `command`: answer from it, or run the step or its
    /// compensation.
    fn decide(&self, command: &Command, entry: LedgerEntry) -> Result<Due, HandlerError> {
        Ok(match command.action {
            Action::Forward if entry.compensated => {
                let reason = "the step was already compensated; a forward command after its compensation is refused";
                // Remember the refusal unless the step had run before its compensation.
                let write = if entry.forward_outcome.is_none() {
                    LedgerWrite::Forward(StepOutcome::Refused(reason.into()))
                } else {
                    LedgerWrite::Nothing
                };
                Due::Answer(refusal(command, reason)?, write)
            }
            Action::Forward => match entry.forward_outcome {
                Some(LedgerOutcome::Succeeded) => {
                    Due::Answer(Reply::succeeded(command), LedgerWrite::Nothing)
                }
                Some(LedgerOutcome::Refused) => Due::Answer(
                    refusal(command, entry.refusal_reason.as_deref().unwrap_or_default())?,
                    LedgerWrite::Nothing,
                ),
                None => Due::Forward,
            },
            Action::Compensate if entry.compensated => {
                Due::Answer(Reply::succeeded(command), LedgerWrite::Nothing)
            }
            Action::Compensate if self.take_injected_failure(command) => Due::Answer(
                refusal(command, "injected fault: compensation refused")?,
                LedgerWrite::Nothing,
            ),
            Action::Compensate => Due::Compensate,
        })
    }

    /// Runs the forward steps of `commands[due]`, each step's requests together in their
    /// order, and stores their answers.
    async fn run_forwards(
        &self,
        tx: &mut PgConnection,
        commands: &[Delivered<'_>],
        due: &mut Vec<usize>,
        answers: &mut [Option<(Reply, LedgerWrite)>],
    ) -> Result<(), HandlerError> {
        let mut by_step: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in due.drain(..) {
            let step = commands[i].step;
            match by_step.iter_mut().find(|(s, _)| *s == step) {
                Some((_, indexes)) => indexes.push(i),
                None => by_step.push((step, vec![i])),
            }
        }
        for (step, indexes) in by_step {
            let requests: Vec<DecodedRequest<'_>> =
                indexes.iter().map(|&i| commands[i].request()).collect();
            let outcomes = self.steps[step].forward_all(tx, &requests).await?;
            if outcomes.len() != requests.len() {
                return Err(HandlerError::reject(CommandError::ShortAnswer {
                    step: self.steps[step].name(),
                    answered: outcomes.len(),
                    asked: requests.len(),
                }));
            }
            for (i, outcome) in indexes.into_iter().zip(outcomes) {
                let reply = reply_for(commands[i].command(), &outcome)?;
                answers[i] = Some((reply, LedgerWrite::Forward(outcome)));
            }
        }
        Ok(())
    }

    /// Handles `commands`, first deliveries with distinct (saga key, step), in order, whose
    /// ledger `entries` (in the same order) are claimed: runs the steps that are due
    /// (consecutive forward requests together, each compensation in its turn), then writes the
    /// ledger changes and the replies in one statement.
    async fn handle_claimed(
        &self,
        tx: &mut PgConnection,
        outbox: &mut Outbox,
        commands: &[Delivered<'_>],
        entries: Vec<LedgerEntry>,
    ) -> Result<(), HandlerError> {
        let answers = self.answer_all(tx, commands, entries).await?;
        let mut writes = Vec::with_capacity(commands.len());
        for (delivered, answer) in commands.iter().zip(answers) {
            let Some((reply, write)) = answer else {
                return Err(HandlerError::reject(CommandError::NoAnswer {
                    command: delivered.command().name.clone(),
                }));
            };
            writes.push((delivered.ledger_key(), write));
            self.queue_reply(outbox, delivered, reply);
        }
        write_ledger(tx, &writes, outbox).await
    }

    /// Each command's answer and ledger change, as the ledger `entries` (in the commands'
    /// order) decide: answered from the ledger, or by running the step or its compensation.
    async fn answer_all(
        &self,
        tx: &mut PgConnection,
        commands: &[Delivered<'_>],
        entries: Vec<LedgerEntry>,
    ) -> Result<Vec<Option<(Reply, LedgerWrite)>>, HandlerError> {
        let mut answers: Vec<Option<(Reply, LedgerWrite)>> = std::iter::repeat_with(|| None)
            .take(commands.len())
            .collect();
        let mut forwards = Vec::new();
        for (i, (delivered, entry)) in commands.iter().zip(entries).enumerate() {
            let command = delivered.command();
            match delivered
                .record
                .span
                .in_scope(|| self.decide(command, entry))?
            {
                Due::Answer(reply, write) => answers[i] = Some((reply, write)),
                Due::Forward => forwards.push(i),
                Due::Compensate => {
                    // The forward steps before it go first, as they came.
                    self.run_forwards(tx, commands, &mut forwards, &mut answers)
                        .await?;
                    let request = delivered.request();
                    let outcome = self.steps[delivered.step]
                        .compensate(tx, &request)
                        .instrument(delivered.record.span.clone())
                        .await?;
                    let write = if outcome == StepOutcome::Done {
                        LedgerWrite::Compensated
                    } else {
                        LedgerWrite::Nothing
                    };
                    answers[i] = Some((reply_for(command, &outcome)?, write));
                }
            }
        }
        self.run_forwards(tx, commands, &mut forwards, &mut answers)
            .await?;
        Ok(answers)
    }

    /// Queues `reply` to `delivered`'s command in `outbox`, in the command's span (so that it
    /// joins the saga's trace).
    fn queue_reply(&self, outbox: &mut Outbox, delivered: &Delivered<'_>, reply: Reply) {
        let Delivered {
            record, envelope, ..
        } = delivered;
        let command = &envelope.body;
        record.span.in_scope(|| {
            tracing::info!(
                saga_id = %envelope.saga_id,
                command = %command.name,
                attempt = command.attempt,
                reply = %reply.name,
                "command handled"
            );
            let reply = reply_envelope(envelope, reply);
            outbox.push(OutgoingMessage::new(
                self.topics.replies(),
                command.key.clone(),
                reply.to_json(),
            ));
        });
    }
}

impl Handler for ParticipantHandler {
    /// The batch's commands in runs whose (saga key, step) are distinct (a step's row is
    /// claimed and written once per statement). The first run's claim also records the whole
    /// batch's deliveries in the inbox, in the same statement, before it is known which are
    /// redeliveries: claiming a redelivery's ledger row only touches it, and the command is
    /// dropped right after, unanswered.
    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        outbox: &mut Outbox,
        records: &[Record],
    ) -> Result<(), HandlerError> {
        let mut commands = Vec::with_capacity(records.len());
        for record in records {
            let (envelope, step, payload) = read_command(self.name, &self.steps, &record.payload)?;
            record.describe(envelope.saga_id, &envelope.body.step, envelope.message_id);
            commands.push(Delivered {
                record,
                envelope,
                step,
                payload,
            });
        }
        let first_run = distinct_run(&commands);
        let message_ids = column(&commands, |c| c.envelope.message_id);
        let claimed = claim_ledger_entries(tx, &commands[..first_run], &message_ids).await?;
        // The first run's commands with their entries, the rest without.
        let mut entries = claimed.entries.into_iter();
        let commands = commands.into_iter().map(|c| (c, entries.next())).collect();
        let fresh = inbox::keep_fresh(
            commands,
            claimed.fresh,
            |(c, _): &(Delivered<'_>, Option<LedgerEntry>)| (c.envelope.message_id, &c.record.span),
        );
        let (mut first, mut first_entries, mut rest) = (Vec::new(), Vec::new(), Vec::new());
        for (command, entry) in fresh {
            match entry {
                Some(entry) => {
                    first.push(command);
                    first_entries.push(entry);
                }
                None => rest.push(command),
            }
        }
        self.handle_claimed(tx, outbox, &first, first_entries)
            .await?;
        let mut start = 0;
        while start < rest.len() {
            let run = &rest[start..start + distinct_run(&rest[start..])];
            let entries = claim_ledger_entries(tx, run, &[]).await?.entries;
            self.handle_claimed(tx, outbox, run, entries).await?;
            start += run.len();
        }
        Ok(())
    }
}

/// How many of `commands`, from the first, have distinct (saga key, step): a run whose ledger
/// rows one statement claims and one writes.
fn distinct_run(commands: &[Delivered<'_>]) -> usize {
    let mut keys = HashSet::new();
    commands
        .iter()
        .take_while(|c| keys.insert(c.ledger_key()))
        .count()
}

/// The ledger rows [`claim_ledger_entries`] claimed, and which deliveries it found fresh.
struct Claimed {
    /// In the commands' order.
    entries: Vec<LedgerEntry>,
    /// The message ids it counted in the inbox that were first deliveries.
    fresh: Vec<Uuid>,
}

/// Creates the ledger rows of the commands' (saga key, step) where missing and locks them, in
/// (key, step) order so that two transactions cannot deadlock over them, so concurrent
/// commands for one step of one saga (possible while partitions move between instances) take
/// turns. One statement: the upsert locks the rows it finds, marks them touched (the ledger's
/// retention counts from the last command for a step, so an entry that still answers repeated
/// commands is never swept) and returns them. The same statement records a delivery of each of
/// `inbox` (message ids) in the inbox, through `inbox_first_deliveries` (messaging migration
/// 8), when there is a command to claim.
async fn claim_ledger_entries(
    tx: &mut PgConnection,
    commands: &[Delivered<'_>],
    inbox: &[Uuid],
) -> Result<Claimed, HandlerError> {
    if commands.is_empty() {
        return Ok(Claimed {
            entries: Vec::new(),
            fresh: Vec::new(),
        });
    }
    // Every command returns its row (`DO UPDATE`), so the inbox's call in `RETURNING` runs.
    let rows = sqlx::query!(
        r#"WITH delivered AS (SELECT message_id, fresh FROM inbox_first_deliveries($4))
           INSERT INTO step_ledger (saga_key, saga_id, step)
           SELECT saga_key, saga_id, step FROM UNNEST($1::text[], $2::uuid[], $3::text[])
                AS c(saga_key, saga_id, step)
           ORDER BY saga_key, step
           ON CONFLICT (saga_key, step) DO UPDATE SET updated_at = now()
           RETURNING saga_key, step, forward_outcome AS "forward_outcome: LedgerOutcome",
                     refusal_reason, compensated_at IS NOT NULL AS "compensated!",
                     ARRAY(SELECT message_id FROM delivered WHERE fresh) AS "fresh!""#,
        &column(commands, |c| c.ledger_key().0) as &[&str],
        &column(commands, |c| c.envelope.saga_id),
        &column(commands, |c| c.ledger_key().1) as &[&str],
        inbox,
    )
    .fetch_all(&mut *tx)
    .await?;
    let fresh = rows
        .first()
        .map(|row| row.fresh.clone())
        .unwrap_or_default();
    let mut entries: HashMap<(String, String), LedgerEntry> = rows
        .into_iter()
        .map(|row| {
            let entry = LedgerEntry {
                saga_key: row.saga_key,
                step: row.step,
                forward_outcome: row.forward_outcome,
                refusal_reason: row.refusal_reason,
                compensated: row.compensated,
            };
            ((entry.saga_key.clone(), entry.step.clone()), entry)
        })
        .collect();
    let entries = commands
        .iter()
        .map(|c| {
            let (key, step) = c.ledger_key();
            entries
                .remove(&(key.to_owned(), step.to_owned()))
                .ok_or_else(|| {
                    HandlerError::retry(CommandError::NoLedgerRow {
                        key: key.to_owned(),
                        step: step.to_owned(),
                    })
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(Claimed { entries, fresh })
}

/// Deletes up to [`messaging::retention::SWEEP_BATCH`] ledger entries nothing touched for
/// `retention_secs` (a command for an entry's step touches it: [`claim_ledger_entries`]);
/// returns how many. The entries are walked by when they were made (indexed, and never
/// updated, so a touch stays a HOT update); one touched since is passed over.
async fn sweep_ledger(pool: &sqlx::PgPool, retention_secs: u64) -> sqlx::Result<u64> {
    let retention_secs = retention_secs as f64;
    Ok(sqlx::query!(
        "DELETE FROM step_ledger WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM step_ledger
             WHERE created_at < now() - make_interval(secs => $1)
               AND updated_at < now() - make_interval(secs => $1)
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
        retention_secs,
        messaging::retention::SWEEP_BATCH,
    )
    .execute(pool)
    .await?
    .rows_affected())
}

/// Writes the ledger changes of a batch, at most one per (saga key, step), and the messages
/// queued in `outbox` (the replies), in one statement: the last of the transaction before its
/// commit, so the consume loop has nothing left to write.
async fn write_ledger(
    tx: &mut PgConnection,
    writes: &[((&str, &str), LedgerWrite)],
    outbox: &mut Outbox,
) -> Result<(), HandlerError> {
    let writes: Vec<_> = writes
        .iter()
        .filter(|(_, write)| !matches!(write, LedgerWrite::Nothing))
        .collect();
    if writes.is_empty() {
        return Ok(());
    }
    fn outcome(write: &LedgerWrite) -> (Option<LedgerOutcome>, Option<&str>) {
        match write {
            LedgerWrite::Forward(StepOutcome::Done) => (Some(LedgerOutcome::Succeeded), None),
            LedgerWrite::Forward(StepOutcome::Refused(reason)) => {
                (Some(LedgerOutcome::Refused), Some(reason.as_str()))
            }
            LedgerWrite::Nothing | LedgerWrite::Compensated => (None, None),
        }
    }
    let queued = outbox.take();
    sqlx::query!(
        "WITH written AS (
             UPDATE step_ledger SET
                 forward_outcome = COALESCE(w.forward_outcome, step_ledger.forward_outcome),
                 refusal_reason = CASE WHEN w.forward_outcome IS NULL
                                       THEN step_ledger.refusal_reason ELSE w.refusal_reason END,
                 compensated_at = CASE WHEN w.compensated THEN now() ELSE step_ledger.compensated_at END,
                 updated_at = now()
             FROM UNNEST($1::text[], $2::text[], $3::ledger_outcome[], $4::text[], $5::bool[])
                  AS w(saga_key, step, forward_outcome, refusal_reason, compensated)
             WHERE step_ledger.saga_key = w.saga_key AND step_ledger.step = w.step
         )
         SELECT outbox_enqueue($6, $7, $8, $9, NULL)",
        &column(&writes, |((key, _), _)| *key) as &[&str],
        &column(&writes, |((_, step), _)| *step) as &[&str],
        &column(&writes, |(_, w)| outcome(w).0) as &[Option<LedgerOutcome>],
        &column(&writes, |(_, w)| outcome(w).1) as &[Option<&str>],
        &column(&writes, |(_, w)| matches!(w, LedgerWrite::Compensated)),
        &queued.topics,
        &queued.keys as &[Option<Vec<u8>>],
        &queued.payloads,
        &queued.headers,
    )
    .fetch_one(tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dead-letter reasons read as they did when each was formatted where it arose (the
    /// texts on the right are those formats), and keep their typed cause.
    #[test]
    fn a_commands_reason_reads_as_before_and_keeps_its_cause() {
        let invalid = Envelope::<Command>::from_json(b"{").expect_err("not JSON");
        let invalid_text = invalid.to_string();
        let misfit = serde_json::from_str::<u32>("\"three\"").expect_err("not a number");
        let misfit_text = misfit.to_string();
        let cases = [
            (
                HandlerError::reject(CommandError::Invalid(invalid)),
                format!("invalid command: {invalid_text}"),
            ),
            (
                HandlerError::reject(CommandError::StepNotServed {
                    command: "ShipIt".into(),
                    step: "ship".into(),
                    participant: "inventory",
                    served: "reserve_stock, restock".into(),
                }),
                format!(
                    "{} is for step {}, which {} does not serve (it serves {})",
                    "ShipIt", "ship", "inventory", "reserve_stock, restock"
                ),
            ),
            (
                HandlerError::reject(CommandError::PayloadMisfit {
                    command: "ReserveStock".into(),
                    request: "forward",
                    step: "reserve_stock".into(),
                    source: misfit,
                }),
                format!(
                    "the payload of {} does not fit the {} request of step {}: {misfit_text}",
                    "ReserveStock", "forward", "reserve_stock"
                ),
            ),
            (
                HandlerError::reject(CommandError::NoFailureReply {
                    command: "ScheduleShipment".into(),
                    action: "forward",
                    step: "schedule_shipment".into(),
                    reason: "no".into(),
                }),
                format!(
                    "{} ({} of step {}) was refused ({}), but the command names no failure reply",
                    "ScheduleShipment", "forward", "schedule_shipment", "no"
                ),
            ),
            (
                HandlerError::reject(CommandError::ShortAnswer {
                    step: "reserve_stock",
                    answered: 1,
                    asked: 2,
                }),
                format!("step {} answered {} of {} requests", "reserve_stock", 1, 2),
            ),
            (
                HandlerError::reject(CommandError::NoAnswer {
                    command: "ReserveStock".into(),
                }),
                format!("no answer to {}", "ReserveStock"),
            ),
            (
                HandlerError::retry(CommandError::NoLedgerRow {
                    key: "k".into(),
                    step: "s".into(),
                }),
                format!("no ledger row for {}/{}", "k", "s"),
            ),
        ];
        for (error, before) in cases {
            assert_eq!(error.reason(), before);
            assert!(error.cause().downcast_ref::<CommandError>().is_some());
        }
    }
}
