//! `sagactl conformance --participant <name>`: drives a running participant, written in any
//! language, through the message contract by its topics alone, and prints PASS, FAIL or n/a
//! per rule (exit status non-zero on any FAIL). The steps it serves, their commands and
//! payloads come from the saga definitions (`sagas/*.toml`); replies are judged by the
//! contract's schemas (`events/contract/schemas/`). Every check is a function of
//! [`checks`], named as the report names the rule; a FAIL says what was sent and what was seen.
//!
//! Each step the participant serves is driven with keys of its own (fresh UUIDs), so the runs
//! of several steps and rules go on side by side, and the participant may serve other traffic
//! meanwhile: a forward command, the same record again, a new attempt, a compensation before
//! its forward command and the forward command after it, a payload that breaks its schema,
//! odd records, and (with `--restart`) a command across a restart of the participant. Then
//! every reply to the kit's commands is checked against its schema, its command, its key and
//! partition, and its trace.

mod checks;
mod schemas;
mod wire;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use events::{Action, Command, Topics};
use saga_core::definitions::{SagaDefinition, Step};
use serde_json::Value;
use uuid::Uuid;

use crate::deployment::Deployment;
use crate::ops::DeploymentArgs;
use checks::Verdict;
use wire::{Probe, SentCommand, SentRecord};

#[derive(Debug, Clone, Args)]
pub struct ConformanceArgs {
    /// The participant, as the saga definitions name it (inventory, payment, shipping, ...):
    /// its steps and command topic are the definitions'.
    #[arg(long)]
    participant: String,
    /// The saga definitions.
    #[arg(long, env = "SAGAS_DIR", default_value = "sagas")]
    sagas_dir: PathBuf,
    /// The contract's directory (its `schemas/` judge the replies).
    #[arg(long, default_value = "events/contract")]
    contract_dir: PathBuf,
    /// A shell command that restarts the participant (e.g. `kill -9 $(cat pid); start-it &`),
    /// run right after a command is sent: the rule that a command across a restart gets exactly
    /// one outcome. Unset: that rule is n/a.
    #[arg(long)]
    restart: Option<String>,
    /// How long to wait for a reply or a dead letter (the replies across the restart get twice
    /// this).
    #[arg(long, default_value_t = 30)]
    reply_timeout_secs: u64,
    /// How long to keep listening where the absence of a record is the point (a redelivery
    /// not answered differently, an odd record not answered).
    #[arg(long, default_value_t = 3000)]
    quiet_ms: u64,
    #[command(flatten)]
    deployment: DeploymentArgs,
}

/// A rule's verdict for one step (or `*`: every reply of the run).
struct Line {
    rule: &'static str,
    step: String,
    verdict: Verdict,
}

/// What one step's run sent and judged.
#[derive(Default)]
struct Run {
    lines: Vec<Line>,
    sent: Vec<SentCommand>,
    /// Keys used in bodies that are no command the kit's bookkeeping holds (odd records).
    keys: Vec<String>,
}

impl Run {
    fn judge(&mut self, rule: &'static str, step: &str, verdict: Verdict) {
        self.lines.push(Line {
            rule,
            step: step.to_owned(),
            verdict,
        });
    }

    fn merge(&mut self, other: Run) {
        self.lines.extend(other.lines);
        self.sent.extend(other.sent);
        self.keys.extend(other.keys);
    }
}

/// One step the participant serves, and the saga type it belongs to.
#[derive(Clone)]
struct Target {
    saga: Arc<SagaDefinition>,
    step: Step,
}

impl Target {
    /// The command of `action` for a saga keyed `key`, built as the orchestrator builds it.
    fn command(&self, action: Action, key: &str, attempt: u32) -> anyhow::Result<Command> {
        let definition = match action {
            Action::Forward => &self.step.forward,
            Action::Compensate => self
                .step
                .compensation
                .as_ref()
                .context("the step has no compensation")?,
        };
        Ok(definition.command(
            &self.saga,
            &self.step,
            action,
            &crate::deployment::keyed_trigger(&self.saga, key),
            attempt,
        )?)
    }
}

fn fresh_key() -> String {
    Uuid::new_v4().to_string()
}

struct Kit {
    probe: Probe,
    timeout: Duration,
    quiet: Duration,
}

impl Kit {
    async fn reply_to(&self, sent: &SentCommand, timeout: Duration) {
        let id = sent.message_id();
        self.probe
            .wait_until(timeout, |seen| !checks::replies_to(seen, id).is_empty())
            .await;
    }

    async fn reply_or_dead_letter(&self, sent: &SentCommand) {
        let id = sent.message_id();
        self.probe
            .wait_until(self.timeout, |seen| {
                !checks::replies_to(seen, id).is_empty()
                    || !checks::dead_letters_of(seen, &sent.landed).is_empty()
            })
            .await;
    }

    /// A forward command, the same record again, and a new attempt of the finished step.
    async fn answers_and_repeats(&self, target: &Target) -> anyhow::Result<Run> {
        let mut run = Run::default();
        let name = &target.step.name;
        let key = fresh_key();
        let saga_id = Uuid::new_v4();
        let first = self
            .probe
            .send_command(
                "a forward command",
                saga_id,
                target.command(Action::Forward, &key, 1)?,
            )
            .await?;
        self.reply_to(&first, self.timeout).await;
        run.judge(
            "forward_command_is_answered",
            name,
            checks::forward_command_is_answered(&first, &self.probe.seen()),
        );
        self.probe.redeliver(&first).await?;
        tokio::time::sleep(self.quiet).await;
        run.judge(
            "redelivered_command_is_not_acted_on_twice",
            name,
            checks::redelivered_command_is_not_acted_on_twice(&first, &self.probe.seen()),
        );
        let again = self
            .probe
            .send_command(
                "a new attempt",
                saga_id,
                target.command(Action::Forward, &key, 2)?,
            )
            .await?;
        self.reply_to(&again, self.timeout).await;
        run.judge(
            "new_attempt_gets_the_same_outcome",
            name,
            checks::new_attempt_gets_the_same_outcome(&first, &again, &self.probe.seen()),
        );
        run.sent.extend([first, again]);
        Ok(run)
    }

    /// A compensation with no forward step before it, then the forward command.
    async fn compensation_first(&self, target: &Target) -> anyhow::Result<Run> {
        let mut run = Run::default();
        let name = &target.step.name;
        if target.step.compensation.is_none() {
            let why = "the step has no compensation (a pivot or a step after it)";
            run.judge(
                "compensation_before_forward_succeeds_empty",
                name,
                Verdict::NotApplicable(why.into()),
            );
            run.judge(
                "forward_after_compensation_is_refused",
                name,
                Verdict::NotApplicable(why.into()),
            );
            return Ok(run);
        }
        let key = fresh_key();
        let saga_id = Uuid::new_v4();
        let undo = self
            .probe
            .send_command(
                "a compensation before its forward command",
                saga_id,
                target.command(Action::Compensate, &key, 1)?,
            )
            .await?;
        self.reply_to(&undo, self.timeout).await;
        run.judge(
            "compensation_before_forward_succeeds_empty",
            name,
            checks::compensation_before_forward_succeeds_empty(&undo, &self.probe.seen()),
        );
        let late = self
            .probe
            .send_command(
                "a forward command after its compensation",
                saga_id,
                target.command(Action::Forward, &key, 1)?,
            )
            .await?;
        self.reply_or_dead_letter(&late).await;
        run.judge(
            "forward_after_compensation_is_refused",
            name,
            checks::forward_after_compensation_is_refused(&late, &self.probe.seen()),
        );
        run.sent.extend([undo, late]);
        Ok(run)
    }

    /// A command whose payload breaks the step's schema: every field of it left out.
    async fn schema_breaking_payload(&self, target: &Target) -> anyhow::Result<Run> {
        let mut run = Run::default();
        let mut command = target.command(Action::Forward, &fresh_key(), 1)?;
        command.payload.clear();
        command
            .payload
            .insert("not_in_the_schema".into(), Value::Bool(true));
        let sent = self
            .probe
            .send_command("a payload that breaks the schema", Uuid::new_v4(), command)
            .await?;
        let landed = sent.landed.clone();
        self.probe
            .wait_until(self.timeout, |seen| {
                !checks::dead_letters_of(seen, &landed).is_empty()
            })
            .await;
        tokio::time::sleep(self.quiet).await;
        run.judge(
            "schema_breaking_payload_is_dead_lettered",
            &target.step.name,
            checks::schema_breaking_payload_is_dead_lettered(&sent, &self.probe.seen()),
        );
        run.keys.push(sent.key().to_owned());
        Ok(run)
    }

    /// Records with odd keys, headers and bodies, then a command that must still be answered.
    async fn odd_records(&self, target: &Target) -> anyhow::Result<Run> {
        let mut run = Run::default();
        let name = &target.step.name;
        let valid = |key: &str| -> anyhow::Result<Value> {
            let envelope = events::Envelope::new(
                Uuid::new_v4(),
                Some(Uuid::new_v4()),
                chrono::Utc::now(),
                target.command(Action::Forward, key, 1)?,
            );
            Ok(serde_json::to_value(envelope)?)
        };
        let mut odd = vec![
            Odd::new(
                "a key with a NUL and a value that is not JSON",
                Some(b"odd\0key".to_vec()),
                Some(b"not JSON \0 at all".to_vec()),
            ),
            Odd::new(
                "a key and a value that are not UTF-8",
                Some(vec![0xff, 0xfe, 0xc3, 0x28]),
                Some(vec![0xff, 0xfe, 0x00, 0xc3, 0x28]),
            ),
            Odd {
                headers: vec![(b"tracestate".to_vec(), Some(vec![b'x'; 200 * 1024]))],
                ..Odd::new(
                    "a 64 KiB key and a 200 KiB header on an empty object",
                    Some(vec![b'k'; 64 * 1024]),
                    Some(b"{}".to_vec()),
                )
            },
            Odd::new("a record with no key and no value", None, None),
        ];
        // Commands whose body's key breaks the contract's bounds.
        for (label, body_key) in [
            (
                "a command whose key holds a NUL",
                format!("conformance\0{}", Uuid::new_v4()),
            ),
            (
                "a command whose key is longer than 256 bytes",
                format!("{}-{}", Uuid::new_v4(), "k".repeat(300)),
            ),
        ] {
            let mut body = valid(&fresh_key())?;
            body["key"] = body_key.clone().into();
            odd.push(Odd {
                body_key: Some(body_key.clone()),
                ..Odd::new(
                    label,
                    Some(body_key.into_bytes()),
                    Some(serde_json::to_vec(&body)?),
                )
            });
        }
        let mut records = Vec::new();
        for record in odd {
            let landed = self
                .probe
                .send_raw(
                    record.key.as_deref(),
                    record.payload.as_deref(),
                    &record.headers,
                )
                .await?;
            if let Some(key) = &record.body_key {
                run.keys.push(key.clone());
            }
            let label = record.label.to_owned();
            records.push((SentRecord { label, landed }, record.body_key));
        }
        // A valid command with headers of any bytes: its traceparent unreadable on purpose.
        let key = fresh_key();
        let envelope = events::Envelope::new(
            Uuid::new_v4(),
            Some(Uuid::new_v4()),
            chrono::Utc::now(),
            target.command(Action::Forward, &key, 1)?,
        );
        let bytes = serde_json::to_vec(&envelope)?;
        let headers: Headers = vec![
            (vec![0xc3, 0x28], Some(b"a name that is not UTF-8".to_vec())),
            (b"traceparent".to_vec(), Some(vec![0xff, 0xfe])),
            (b"tracestate".to_vec(), Some(b"\0\0".to_vec())),
            (b"nul\0inside".to_vec(), None),
            (Vec::new(), Some(Vec::new())),
        ];
        let landed = self
            .probe
            .send_raw(Some(key.as_bytes()), Some(&bytes), &headers)
            .await?;
        let odd_headers = SentCommand {
            label: "a command with headers of any bytes".into(),
            envelope,
            trace_id: String::new(),
            bytes,
            traceparent: String::new(),
            landed,
        };
        // Then a command on every partition: each one's consumer must have got past them.
        let mut next = Vec::new();
        for key in self.probe.key_per_partition() {
            next.push(
                self.probe
                    .send_command(
                        "a command after the odd records",
                        Uuid::new_v4(),
                        target.command(Action::Forward, &key, 1)?,
                    )
                    .await?,
            );
        }
        for sent in &next {
            self.reply_to(sent, self.timeout).await;
        }
        tokio::time::sleep(self.quiet).await;
        let seen = self.probe.seen();
        for (record, body_key) in &records {
            run.judge(
                "odd_record_is_dead_lettered_or_ignored",
                name,
                checks::odd_record_is_dead_lettered_or_ignored(record, body_key.as_deref(), &seen),
            );
        }
        run.judge(
            "odd_headers_leave_a_command_answered_or_dead_lettered",
            name,
            checks::odd_headers_leave_a_command_answered_or_dead_lettered(&odd_headers, &seen),
        );
        run.judge(
            "participant_still_answers_after_odd_records",
            name,
            checks::every_command_is_answered(&next, &seen),
        );
        run.sent.push(odd_headers);
        run.sent.extend(next);
        Ok(run)
    }

    /// A forward command, the participant restarted right after it, then a new attempt.
    async fn across_a_restart(&self, target: &Target, restart: &str) -> anyhow::Result<Run> {
        let mut run = Run::default();
        let key = fresh_key();
        let saga_id = Uuid::new_v4();
        let first = self
            .probe
            .send_command(
                "a forward command, then a restart",
                saga_id,
                target.command(Action::Forward, &key, 1)?,
            )
            .await?;
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(restart)
            .status()
            .await
            .with_context(|| format!("running the restart command {restart:?}"))?;
        anyhow::ensure!(
            status.success(),
            "the restart command {restart:?} exited with {status}"
        );
        self.reply_to(&first, self.timeout * 2).await;
        tokio::time::sleep(self.quiet).await;
        let again = self
            .probe
            .send_command(
                "a new attempt after the restart",
                saga_id,
                target.command(Action::Forward, &key, 2)?,
            )
            .await?;
        self.reply_to(&again, self.timeout * 2).await;
        run.judge(
            "restart_mid_command_gives_one_outcome",
            &target.step.name,
            checks::restart_mid_command_gives_one_outcome(&first, &again, &self.probe.seen()),
        );
        run.sent.extend([first, again]);
        Ok(run)
    }

    async fn step(&self, target: &Target) -> anyhow::Result<Run> {
        let (a, b, c, d) = tokio::try_join!(
            self.answers_and_repeats(target),
            self.compensation_first(target),
            self.schema_breaking_payload(target),
            self.odd_records(target),
        )?;
        let mut run = Run::default();
        for part in [a, b, c, d] {
            run.merge(part);
        }
        Ok(run)
    }
}

type Headers = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// An odd record: what it is, its key, value and headers as bytes, and its body's key when it
/// has one (no reply may carry it).
struct Odd {
    label: &'static str,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Headers,
    body_key: Option<String>,
}

impl Odd {
    fn new(label: &'static str, key: Option<Vec<u8>>, payload: Option<Vec<u8>>) -> Self {
        Self {
            label,
            key,
            payload,
            headers: Vec::new(),
            body_key: None,
        }
    }
}

pub async fn run(args: ConformanceArgs) -> anyhow::Result<()> {
    let deployment = Deployment::load(&args.sagas_dir)?;
    let participant = deployment
        .participants
        .iter()
        .find(|p| p.name == args.participant)
        .with_context(|| {
            format!(
                "the saga definitions name no participant {} (they name: {})",
                args.participant,
                deployment.participant_names()
            )
        })?;
    let targets: Vec<Target> = deployment
        .sagas()
        .flat_map(|saga| {
            saga.steps
                .iter()
                .filter(|s| s.participant == args.participant)
                .map(|step| Target {
                    saga: saga.clone(),
                    step: step.clone(),
                })
        })
        .collect();
    let schemas = schemas::Schemas::load(&args.contract_dir)?;
    let (producer, topics): (_, Topics) = args.deployment.publisher()?;
    let probe = Probe::open(
        args.deployment.kafka(),
        producer,
        topics.named(&participant.topic),
        topics.replies(),
        topics.dead_letters(),
    )?;
    let kit = Kit {
        probe,
        timeout: Duration::from_secs(args.reply_timeout_secs),
        quiet: Duration::from_millis(args.quiet_ms),
    };
    println!(
        "conformance of {} on {} (steps: {})",
        args.participant,
        kit.probe.command_topic,
        targets
            .iter()
            .map(|t| format!("{}.{}", t.saga.name, t.step.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut all = Run::default();
    // One step after another: each step's own rules already run side by side.
    for target in &targets {
        all.merge(kit.step(target).await?);
    }
    match (&args.restart, targets.first()) {
        (Some(restart), Some(target)) => all.merge(kit.across_a_restart(target, restart).await?),
        _ => all.judge(
            "restart_mid_command_gives_one_outcome",
            "*",
            Verdict::NotApplicable("no --restart command given".into()),
        ),
    }
    // Late repeats (a redelivery answered again) are judged with the rest.
    tokio::time::sleep(kit.quiet).await;
    let seen = kit.probe.seen();
    let by_id: HashMap<Uuid, &SentCommand> = all.sent.iter().map(|s| (s.message_id(), s)).collect();
    let keys: BTreeSet<String> = all
        .sent
        .iter()
        .map(|s| s.key().to_owned())
        .chain(all.keys.iter().cloned())
        .collect();
    let replies = checks::our_replies(&seen, &by_id, &keys);
    let global = [
        (
            "replies_match_their_schemas",
            checks::replies_match_their_schemas(&replies, &schemas),
        ),
        (
            "replies_answer_their_command",
            checks::replies_answer_their_command(&replies, &by_id),
        ),
        (
            "replies_keyed_and_partitioned_by_saga_key",
            checks::replies_keyed_and_partitioned_by_saga_key(&replies, kit.probe.reply_partitions),
        ),
        (
            "replies_carry_the_command_trace",
            checks::replies_carry_the_command_trace(&replies, &by_id),
        ),
    ];
    let mut lines = all.lines;
    lines.extend(global.into_iter().map(|(rule, verdict)| Line {
        rule,
        step: "*".into(),
        verdict,
    }));
    report(&args.participant, &lines)
}

/// Prints one line per rule and fails when any rule failed.
fn report(participant: &str, lines: &[Line]) -> anyhow::Result<()> {
    let failed = lines.iter().filter(|l| l.verdict.failed()).count();
    let (mut passed, mut na) = (0, 0);
    for line in lines {
        let (word, detail) = match &line.verdict {
            Verdict::Pass(d) => {
                passed += 1;
                ("PASS", d)
            }
            Verdict::Fail(d) => ("FAIL", d),
            Verdict::NotApplicable(d) => {
                na += 1;
                ("n/a ", d)
            }
        };
        println!("{word}  {:<55} {:<18} {detail}", line.rule, line.step);
    }
    println!("{participant}: {passed} passed, {failed} failed, {na} not applicable");
    anyhow::ensure!(
        failed == 0,
        "{participant} broke {failed} rule(s) of the contract"
    );
    Ok(())
}
