//! The contract's rules, one function each, judging what the kit sent against what it read
//! back. They do no I/O, so that their logic is tested here on records made up for the purpose
//! (the tests below), and each names the rule the report prints.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;
use uuid::Uuid;

use super::schemas::Schemas;
use super::wire::{Seen, SentCommand, SentRecord, Stream};

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass(String),
    Fail(String),
    /// The rule does not apply to this step (a step without a compensation, a run without
    /// `--restart`).
    NotApplicable(String),
}

impl Verdict {
    pub fn failed(&self) -> bool {
        matches!(self, Self::Fail(_))
    }
}

/// A reply's answer: its `type` and `outcome`.
pub type Outcome = (String, String);

/// The replies whose `causation_id` is `message_id`.
pub fn replies_to(seen: &[Seen], message_id: Uuid) -> Vec<&Seen> {
    let id = message_id.to_string();
    seen.iter()
        .filter(|s| s.stream == Stream::Reply && s.field("causation_id").as_deref() == Some(&id))
        .collect()
}

/// The replies whose body's `key` is `key`.
pub fn replies_for_key<'a>(seen: &'a [Seen], key: &str) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| s.stream == Stream::Reply && s.field("key").as_deref() == Some(key))
        .collect()
}

/// The dead letters that copy the record at `landed`.
pub fn dead_letters_of<'a>(seen: &'a [Seen], record: &super::wire::Landed) -> Vec<&'a Seen> {
    let want = (record.topic.clone(), record.partition, record.offset);
    seen.iter()
        .filter(|s| s.stream == Stream::DeadLetter && s.source().as_ref() == Some(&want))
        .collect()
}

fn outcome(reply: &Seen) -> Option<Outcome> {
    Some((reply.field("type")?, reply.field("outcome")?))
}

/// A record in a few words, for a FAIL's report.
pub fn describe(seen: &Seen) -> String {
    let value = seen
        .payload
        .as_deref()
        .map(|v| {
            String::from_utf8_lossy(v)
                .chars()
                .take(400)
                .collect::<String>()
        })
        .unwrap_or_else(|| "(null)".into());
    let stream = match seen.stream {
        Stream::Reply => "reply",
        Stream::DeadLetter => "dead letter",
    };
    format!(
        "seen {stream} [{}]@{}: {value}",
        seen.partition, seen.offset
    )
}

fn describe_all(seen: &[&Seen]) -> String {
    if seen.is_empty() {
        "seen nothing".into()
    } else {
        seen.iter()
            .map(|s| describe(s))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The outcomes `replies` give, each checked to be one the command allows: its success name
/// with `succeeded`, its failure name with `failed`.
fn outcomes(sent: &SentCommand, replies: &[&Seen]) -> Result<BTreeSet<Outcome>, String> {
    let names = &sent.envelope.body.replies;
    let mut found = BTreeSet::new();
    for reply in replies {
        let answer = outcome(reply)
            .ok_or_else(|| format!("a reply without type or outcome: {}", describe(reply)))?;
        let allowed = (answer.0 == names.success && answer.1 == "succeeded")
            || (names.failure.as_deref() == Some(answer.0.as_str()) && answer.1 == "failed");
        if !allowed {
            return Err(format!(
                "{} answers with {} / {}, not {} / succeeded or {:?} / failed",
                describe(reply),
                answer.0,
                answer.1,
                names.success,
                names.failure
            ));
        }
        found.insert(answer);
    }
    Ok(found)
}

/// One outcome, from at least one reply: what a command must get.
fn one_outcome(sent: &SentCommand, seen: &[Seen]) -> Result<Outcome, String> {
    let replies = replies_to(seen, sent.message_id());
    let found = outcomes(sent, &replies).map_err(|e| format!("{}; {e}", sent.describe()))?;
    let mut found = found.into_iter();
    match (found.next(), found.next()) {
        (Some(answer), None) => Ok(answer),
        (None, _) => Err(format!("{}; no reply", sent.describe())),
        (Some(_), Some(_)) => Err(format!(
            "{}; replies with different outcomes: {}",
            sent.describe(),
            describe_all(&replies)
        )),
    }
}

/// A forward command (attempt 1, a new key) gets one answer: its success or failure reply.
pub fn forward_command_is_answered(sent: &SentCommand, seen: &[Seen]) -> Verdict {
    match one_outcome(sent, seen) {
        Ok((name, outcome)) => Verdict::Pass(format!("answered {name} ({outcome})")),
        Err(e) => Verdict::Fail(e),
    }
}

/// Every command of `sent` (one on each partition of the command topic, after the odd
/// records) is answered: no partition's consumer stopped at an odd record.
pub fn every_command_is_answered(sent: &[SentCommand], seen: &[Seen]) -> Verdict {
    let failures: Vec<String> = sent
        .iter()
        .filter_map(|s| match forward_command_is_answered(s, seen) {
            Verdict::Fail(e) => Some(e),
            _ => None,
        })
        .collect();
    if failures.is_empty() {
        Verdict::Pass(format!(
            "a command on each of the {} partitions answered",
            sent.len()
        ))
    } else {
        Verdict::Fail(failures.join("; "))
    }
}

/// The same command again (the same `message_id`, the same bytes) is not acted on twice: it
/// may be answered again, with the same outcome, or not at all.
pub fn redelivered_command_is_not_acted_on_twice(sent: &SentCommand, seen: &[Seen]) -> Verdict {
    let replies = replies_to(seen, sent.message_id());
    match outcomes(sent, &replies) {
        Ok(found) if found.len() == 1 => Verdict::Pass(if replies.len() > 1 {
            format!(
                "answered again, the same outcome ({} replies)",
                replies.len()
            )
        } else {
            "not answered again (the first reply stands)".into()
        }),
        Ok(found) if found.is_empty() => {
            Verdict::Fail(format!("{}; no reply at all", sent.describe()))
        }
        Ok(_) => Verdict::Fail(format!(
            "{} twice; replies with different outcomes: {}",
            sent.describe(),
            describe_all(&replies)
        )),
        Err(e) => Verdict::Fail(format!("{}; {e}", sent.describe())),
    }
}

/// A new attempt of a finished step (a new `message_id`) is answered, from the ledger, with
/// the first attempt's outcome.
pub fn new_attempt_gets_the_same_outcome(
    first: &SentCommand,
    again: &SentCommand,
    seen: &[Seen],
) -> Verdict {
    let before = match one_outcome(first, seen) {
        Ok(answer) => answer,
        Err(e) => return Verdict::Fail(format!("the first attempt: {e}")),
    };
    match one_outcome(again, seen) {
        Ok(after) if after.1 == before.1 => Verdict::Pass(format!(
            "attempt {} answered {} like attempt {}",
            again.envelope.body.attempt, after.0, first.envelope.body.attempt
        )),
        Ok(after) => Verdict::Fail(format!(
            "{}; answered {} / {} where the first attempt got {} / {}",
            again.describe(),
            after.0,
            after.1,
            before.0,
            before.1
        )),
        Err(e) => Verdict::Fail(e),
    }
}

/// A compensation with no forward step before it succeeds, doing nothing.
pub fn compensation_before_forward_succeeds_empty(sent: &SentCommand, seen: &[Seen]) -> Verdict {
    match one_outcome(sent, seen) {
        Ok((name, outcome)) if outcome == "succeeded" => Verdict::Pass(format!("answered {name}")),
        Ok((name, outcome)) => Verdict::Fail(format!(
            "{}; answered {name} ({outcome}), not its success reply {}",
            sent.describe(),
            sent.envelope.body.replies.success
        )),
        Err(e) => Verdict::Fail(e),
    }
}

/// A forward command after its step's compensation is refused: its failure reply; when the
/// command names none, it cannot be refused by a reply, and a dead letter (no success) is the
/// refusal.
pub fn forward_after_compensation_is_refused(sent: &SentCommand, seen: &[Seen]) -> Verdict {
    if sent.envelope.body.replies.failure.is_none() {
        let replies = replies_to(seen, sent.message_id());
        let dead = dead_letters_of(seen, &sent.landed);
        return if replies.is_empty() && !dead.is_empty() {
            Verdict::Pass("dead-lettered (the command names no failure reply)".into())
        } else {
            Verdict::Fail(format!(
                "{}; the command names no failure reply, so it must be dead-lettered, not answered: {}",
                sent.describe(),
                describe_all(&replies.into_iter().chain(dead).collect::<Vec<_>>())
            ))
        };
    }
    match one_outcome(sent, seen) {
        Ok((name, outcome)) if outcome == "failed" => Verdict::Pass(format!("refused: {name}")),
        Ok((name, outcome)) => Verdict::Fail(format!(
            "{}; after its compensation, answered {name} ({outcome}): the step acted after it was undone",
            sent.describe()
        )),
        Err(e) => Verdict::Fail(e),
    }
}

/// A command whose payload breaks its schema is dead-lettered with a reason, and not answered.
pub fn schema_breaking_payload_is_dead_lettered(sent: &SentCommand, seen: &[Seen]) -> Verdict {
    let replies = replies_for_key(seen, sent.key());
    let dead = dead_letters_of(seen, &sent.landed);
    let reason = dead.first().and_then(|d| d.header("dlq.reason"));
    match (replies.is_empty(), reason) {
        (true, Some(reason)) if !reason.is_empty() => {
            Verdict::Pass(format!("dead-lettered: {reason}"))
        }
        (true, _) if !dead.is_empty() => Verdict::Fail(format!(
            "{}; dead-lettered without a dlq.reason header",
            sent.describe()
        )),
        (true, _) => Verdict::Fail(format!("{}; no dead letter", sent.describe())),
        (false, _) => Verdict::Fail(format!(
            "{}; answered instead of dead-lettered: {}",
            sent.describe(),
            describe_all(&replies)
        )),
    }
}

/// An odd record (NUL, invalid UTF-8, huge keys and headers, a body no participant may take)
/// is dead-lettered or ignored: no reply carries its body's key.
pub fn odd_record_is_dead_lettered_or_ignored(
    record: &SentRecord,
    body_key: Option<&str>,
    seen: &[Seen],
) -> Verdict {
    let replies = body_key
        .map(|key| replies_for_key(seen, key))
        .unwrap_or_default();
    if !replies.is_empty() {
        return Verdict::Fail(format!(
            "sent {} to {}[{}]@{}; answered: {}",
            record.label,
            record.landed.topic,
            record.landed.partition,
            record.landed.offset,
            describe_all(&replies)
        ));
    }
    match dead_letters_of(seen, &record.landed).first() {
        Some(dead) => Verdict::Pass(format!(
            "{}: dead-lettered ({})",
            record.label,
            dead.header("dlq.reason").unwrap_or_default()
        )),
        None => Verdict::Pass(format!("{}: ignored", record.label)),
    }
}

/// A valid command carrying odd headers may be answered (rightly: the reply checks below
/// judge it), dead-lettered or ignored; it must not be answered twice with different outcomes.
pub fn odd_headers_leave_a_command_answered_or_dead_lettered(
    sent: &SentCommand,
    seen: &[Seen],
) -> Verdict {
    let replies = replies_to(seen, sent.message_id());
    if replies.is_empty() {
        return if dead_letters_of(seen, &sent.landed).is_empty() {
            Verdict::Pass("ignored".into())
        } else {
            Verdict::Pass("dead-lettered".into())
        };
    }
    match one_outcome(sent, seen) {
        Ok((name, _)) => Verdict::Pass(format!("answered {name}")),
        Err(e) => Verdict::Fail(e),
    }
}

/// The command sent across a restart of the participant gets exactly one outcome, and a new
/// attempt after the restart the same one.
pub fn restart_mid_command_gives_one_outcome(
    first: &SentCommand,
    again: &SentCommand,
    seen: &[Seen],
) -> Verdict {
    let replies = replies_for_key(seen, first.key());
    let mut all = BTreeSet::new();
    for reply in &replies {
        if let Some((_, outcome)) = outcome(reply) {
            all.insert(outcome);
        }
    }
    if all.len() > 1 {
        return Verdict::Fail(format!(
            "{}; then the restart; then {}; the key got more than one outcome: {}",
            first.describe(),
            again.describe(),
            describe_all(&replies)
        ));
    }
    match new_attempt_gets_the_same_outcome(first, again, seen) {
        Verdict::Pass(_) => Verdict::Pass(format!(
            "one outcome ({}) across the restart, {} replies",
            all.into_iter().next().unwrap_or_default(),
            replies.len()
        )),
        other => other,
    }
}

/// The replies to the kit's commands: those that answer a command it sent or carry a key it used.
pub fn our_replies<'a>(
    seen: &'a [Seen],
    sent: &HashMap<Uuid, &SentCommand>,
    keys: &BTreeSet<String>,
) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| s.stream == Stream::Reply)
        .filter(|s| {
            s.field("causation_id")
                .and_then(|c| c.parse::<Uuid>().ok())
                .is_some_and(|c| sent.contains_key(&c))
                || s.field("key").is_some_and(|k| keys.contains(&k))
        })
        .collect()
}

/// Gathers the failures of one rule over every reply into one verdict.
fn over_replies(
    replies: &[&Seen],
    what: &str,
    mut check: impl FnMut(&Seen) -> Result<(), String>,
) -> Verdict {
    let failures: Vec<String> = replies
        .iter()
        .filter_map(|reply| {
            check(reply)
                .err()
                .map(|e| format!("{e} ({})", describe(reply)))
        })
        .collect();
    if failures.is_empty() {
        Verdict::Pass(format!("{} replies {what}", replies.len()))
    } else {
        Verdict::Fail(failures.join("; "))
    }
}

/// Every reply is valid under the contract's schema of its type (`Reply` for a type without
/// one).
pub fn replies_match_their_schemas(replies: &[&Seen], schemas: &Schemas) -> Verdict {
    over_replies(replies, "valid under their schemas", |reply| {
        let value = reply.json().ok_or("not JSON")?;
        schemas.validate(&value)
    })
}

/// Every reply answers a command: its `causation_id` is the command's `message_id`, and it
/// copies `saga_id`, `saga_type`, `step`, `action`, `attempt` and `key`. Its `message_id` is
/// its own: shared only with another reply to the same command (a repeat for a redelivery).
pub fn replies_answer_their_command(
    replies: &[&Seen],
    sent: &HashMap<Uuid, &SentCommand>,
) -> Verdict {
    let mut causes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let verdict = over_replies(replies, "answer their command", |reply| {
        let body = reply.json().ok_or("not JSON")?;
        let causation = body["causation_id"]
            .as_str()
            .and_then(|c| c.parse::<Uuid>().ok())
            .ok_or("causation_id is not a message id the kit sent")?;
        let command = sent
            .get(&causation)
            .ok_or_else(|| format!("causation_id {causation} is not a command the kit sent"))?;
        let c = &command.envelope.body;
        let expect: [(&str, Value); 6] = [
            ("saga_id", command.envelope.saga_id.to_string().into()),
            ("saga_type", c.saga_type.clone().into()),
            ("step", c.step.clone().into()),
            ("action", c.action.as_str().into()),
            ("attempt", c.attempt.into()),
            ("key", c.key.clone().into()),
        ];
        for (field, want) in expect {
            if body[field] != want {
                return Err(format!(
                    "{field} is {}, the command's is {want}",
                    body[field]
                ));
            }
        }
        if let Some(id) = body["message_id"].as_str() {
            causes
                .entry(id.to_owned())
                .or_default()
                .insert(causation.to_string());
        }
        Ok(())
    });
    let reused: Vec<String> = causes
        .iter()
        .filter(|(_, causes)| causes.len() > 1)
        .map(|(id, causes)| {
            format!(
                "message_id {id} answers {} commands: {causes:?}",
                causes.len()
            )
        })
        .collect();
    match verdict {
        Verdict::Pass(_) if !reused.is_empty() => Verdict::Fail(reused.join("; ")),
        other => other,
    }
}

/// Every reply's record key is its body's `key`, and its partition the one Kafka's default
/// partitioner (murmur2) gives that key on `saga.replies`.
pub fn replies_keyed_and_partitioned_by_saga_key(replies: &[&Seen], partitions: i32) -> Verdict {
    over_replies(
        replies,
        "keyed and partitioned by the saga's key",
        |reply| {
            let key = reply.field("key").ok_or("no key in the body")?;
            if reply.key.as_deref() != Some(key.as_bytes()) {
                return Err(format!(
                    "record key {:?}, the body's key is {key:?}",
                    reply.key.as_deref().map(String::from_utf8_lossy)
                ));
            }
            let want = messaging::partitioner::partition_of(
                messaging::partitioner::key_hash(key.as_bytes()),
                partitions,
            );
            if reply.partition != want {
                return Err(format!(
                    "partition {}, murmur2 of its key modulo {partitions} is {want}",
                    reply.partition
                ));
            }
            Ok(())
        },
    )
}

/// Every reply carries a `traceparent` of its command's trace.
pub fn replies_carry_the_command_trace(
    replies: &[&Seen],
    sent: &HashMap<Uuid, &SentCommand>,
) -> Verdict {
    over_replies(replies, "in their command's trace", |reply| {
        let Some(command) = reply
            .field("causation_id")
            .and_then(|c| c.parse::<Uuid>().ok())
            .and_then(|c| sent.get(&c))
        else {
            return Err("answers no command the kit sent".into());
        };
        if command.trace_id.is_empty() {
            // Sent with an unreadable traceparent on purpose: no trace to join.
            return Ok(());
        }
        let header = reply.header("traceparent").ok_or("no traceparent header")?;
        match header.split('-').nth(1) {
            Some(trace) if trace == command.trace_id => Ok(()),
            _ => Err(format!(
                "traceparent {header}, the command's trace is {}",
                command.trace_id
            )),
        }
    })
}

#[cfg(test)]
mod tests {
    use events::{Action, Command, Envelope, ReplyNames};
    use serde_json::{json, Map};

    use super::super::wire::Landed;
    use super::*;

    fn command(action: Action, attempt: u32, failure: Option<&str>) -> SentCommand {
        let body = Command {
            name: "ReserveStock".into(),
            saga_type: "order".into(),
            saga_version: 1,
            step: "reserve_stock".into(),
            action,
            attempt,
            key: "k-1".into(),
            replies: ReplyNames {
                success: "StockReserved".into(),
                failure: failure.map(str::to_owned),
            },
            payload: Map::new(),
        };
        SentCommand {
            label: "test".into(),
            envelope: Envelope::new(Uuid::new_v4(), None, chrono::Utc::now(), body),
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            bytes: Vec::new(),
            traceparent: String::new(),
            landed: Landed {
                topic: "inventory.commands".into(),
                partition: 0,
                offset: 7,
            },
        }
    }

    /// The reply a participant keeping the contract sends for `sent`, on the right partition.
    fn reply(sent: &SentCommand, name: &str, outcome: &str) -> Seen {
        let c = &sent.envelope.body;
        let body = json!({
            "message_id": Uuid::new_v4(), "saga_id": sent.envelope.saga_id,
            "causation_id": sent.envelope.message_id, "schema_version": 2,
            "occurred_at": "2026-12-07T00:00:00Z", "type": name, "saga_type": c.saga_type,
            "step": c.step, "action": c.action.as_str(), "attempt": c.attempt, "key": c.key,
            "outcome": outcome,
        });
        let partition = messaging::partitioner::partition_of(
            messaging::partitioner::key_hash(c.key.as_bytes()),
            4,
        );
        Seen {
            stream: Stream::Reply,
            partition,
            offset: 0,
            key: Some(c.key.clone().into_bytes()),
            headers: vec![(
                b"traceparent".to_vec(),
                Some(format!("00-{}-00f067aa0ba902b7-01", sent.trace_id).into_bytes()),
            )],
            payload: Some(serde_json::to_vec(&body).unwrap_or_default()),
        }
    }

    fn dead_letter(sent: &SentCommand, reason: &str) -> Seen {
        Seen {
            stream: Stream::DeadLetter,
            partition: 0,
            offset: 0,
            key: None,
            headers: vec![
                (b"dlq.reason".to_vec(), Some(reason.as_bytes().to_vec())),
                (
                    b"dlq.source.topic".to_vec(),
                    Some(sent.landed.topic.clone().into_bytes()),
                ),
                (b"dlq.source.partition".to_vec(), Some(b"0".to_vec())),
                (b"dlq.source.offset".to_vec(), Some(b"7".to_vec())),
            ],
            payload: Some(sent.bytes.clone()),
        }
    }

    #[test]
    fn a_forward_command_needs_one_answer_of_its_own_names() {
        let sent = command(Action::Forward, 1, Some("StockUnavailable"));
        assert!(forward_command_is_answered(&sent, &[]).failed());
        let ok = [reply(&sent, "StockReserved", "succeeded")];
        assert!(!forward_command_is_answered(&sent, &ok).failed());
        let wrong_name = [reply(&sent, "PaymentCharged", "succeeded")];
        assert!(forward_command_is_answered(&sent, &wrong_name).failed());
        let mismatched = [reply(&sent, "StockReserved", "failed")];
        assert!(forward_command_is_answered(&sent, &mismatched).failed());
    }

    #[test]
    fn a_redelivery_may_be_answered_again_but_never_otherwise() {
        let sent = command(Action::Forward, 1, Some("StockUnavailable"));
        let once = [reply(&sent, "StockReserved", "succeeded")];
        assert!(!redelivered_command_is_not_acted_on_twice(&sent, &once).failed());
        let twice = [
            reply(&sent, "StockReserved", "succeeded"),
            reply(&sent, "StockReserved", "succeeded"),
        ];
        assert!(!redelivered_command_is_not_acted_on_twice(&sent, &twice).failed());
        let changed = [
            reply(&sent, "StockReserved", "succeeded"),
            reply(&sent, "StockUnavailable", "failed"),
        ];
        assert!(redelivered_command_is_not_acted_on_twice(&sent, &changed).failed());
    }

    #[test]
    fn a_new_attempt_must_repeat_the_first_outcome() {
        let first = command(Action::Forward, 1, Some("StockUnavailable"));
        let again = command(Action::Forward, 2, Some("StockUnavailable"));
        let same = [
            reply(&first, "StockUnavailable", "failed"),
            reply(&again, "StockUnavailable", "failed"),
        ];
        assert!(!new_attempt_gets_the_same_outcome(&first, &again, &same).failed());
        let acted = [
            reply(&first, "StockUnavailable", "failed"),
            reply(&again, "StockReserved", "succeeded"),
        ];
        assert!(new_attempt_gets_the_same_outcome(&first, &again, &acted).failed());
        let unanswered = [reply(&first, "StockUnavailable", "failed")];
        assert!(new_attempt_gets_the_same_outcome(&first, &again, &unanswered).failed());
    }

    #[test]
    fn a_forward_after_its_compensation_must_be_refused() {
        let sent = command(Action::Forward, 1, Some("StockUnavailable"));
        let refused = [reply(&sent, "StockUnavailable", "failed")];
        assert!(!forward_after_compensation_is_refused(&sent, &refused).failed());
        let acted = [reply(&sent, "StockReserved", "succeeded")];
        assert!(forward_after_compensation_is_refused(&sent, &acted).failed());
        let no_failure = command(Action::Forward, 1, None);
        let dead = [dead_letter(&no_failure, "no failure reply")];
        assert!(!forward_after_compensation_is_refused(&no_failure, &dead).failed());
        assert!(forward_after_compensation_is_refused(&no_failure, &[]).failed());
    }

    #[test]
    fn a_schema_breaking_payload_needs_a_dead_letter_with_a_reason_and_no_reply() {
        let sent = command(Action::Forward, 1, Some("StockUnavailable"));
        let dead = [dead_letter(&sent, "payload: missing field `items`")];
        assert!(!schema_breaking_payload_is_dead_lettered(&sent, &dead).failed());
        assert!(schema_breaking_payload_is_dead_lettered(&sent, &[]).failed());
        let no_reason = [dead_letter(&sent, "")];
        assert!(schema_breaking_payload_is_dead_lettered(&sent, &no_reason).failed());
        let answered = [
            dead_letter(&sent, "x"),
            reply(&sent, "StockUnavailable", "failed"),
        ];
        assert!(schema_breaking_payload_is_dead_lettered(&sent, &answered).failed());
    }

    #[test]
    fn replies_are_judged_on_key_partition_causation_and_trace() {
        let sent = command(Action::Forward, 1, Some("StockUnavailable"));
        let by_id: HashMap<Uuid, &SentCommand> = [(sent.message_id(), &sent)].into();
        let good = reply(&sent, "StockReserved", "succeeded");
        assert!(!replies_keyed_and_partitioned_by_saga_key(&[&good], 4).failed());
        assert!(!replies_answer_their_command(&[&good], &by_id).failed());
        assert!(!replies_carry_the_command_trace(&[&good], &by_id).failed());

        let mut elsewhere = good.clone();
        elsewhere.partition = (good.partition + 1) % 4;
        assert!(replies_keyed_and_partitioned_by_saga_key(&[&elsewhere], 4).failed());
        let mut unkeyed = good.clone();
        unkeyed.key = None;
        assert!(replies_keyed_and_partitioned_by_saga_key(&[&unkeyed], 4).failed());

        let mut other_attempt = good.clone();
        let mut body = good.json().unwrap_or_default();
        body["attempt"] = 2.into();
        other_attempt.payload = serde_json::to_vec(&body).ok();
        assert!(replies_answer_their_command(&[&other_attempt], &by_id).failed());

        let mut untraced = good.clone();
        untraced.headers.clear();
        assert!(replies_carry_the_command_trace(&[&untraced], &by_id).failed());
    }

    #[test]
    fn one_reply_id_may_not_answer_two_commands() {
        let first = command(Action::Forward, 1, Some("StockUnavailable"));
        let again = command(Action::Forward, 2, Some("StockUnavailable"));
        let by_id: HashMap<Uuid, &SentCommand> =
            [(first.message_id(), &first), (again.message_id(), &again)].into();
        let one = reply(&first, "StockReserved", "succeeded");
        let mut two = reply(&again, "StockReserved", "succeeded");
        let mut body = two.json().unwrap_or_default();
        body["message_id"] = one.json().unwrap_or_default()["message_id"].clone();
        two.payload = serde_json::to_vec(&body).ok();
        assert!(replies_answer_their_command(&[&one, &two], &by_id).failed());
        // The same reply again for a redelivery may keep its id.
        assert!(!replies_answer_their_command(&[&one, &one], &by_id).failed());
    }
}
