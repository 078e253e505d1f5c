//! The orchestrator's consumer path over an in-memory store: records decoded with the
//! functions `orchestrator/src/handler.rs` uses and handled by the handler's rules (one saga per
//! saga type and key, an inbox per message id, a reply for an unknown saga or with another
//! saga's key is rejected, an applied decision replaces the saga and bumps its version), every
//! decision of the machine held against the oracle (`saga_core::oracle`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use events::{Action, Command, Envelope, Outcome, Reply, SCHEMA_VERSION};
use saga_core::definitions::{trigger_message, TriggerMessage};
use saga_core::oracle::{self, Cause};
use saga_core::{Decision, Effect, Registry, Saga, SagaDefinition};
use serde_json::Value;
use uuid::Uuid;

use super::generate::{self, forged_reply, named_replies, subject_uuid, Made, Named};
use super::input::{AttemptChoice, Op, PolicyInput, ReplyChoice, Target, Topic};

const REPLIES: &str = "saga.replies";

/// One saga row, with what the fake store remembers of what the saga sent.
#[derive(Clone)]
pub struct Row {
    pub saga: Saga,
    pub version: i64,
    /// Every command the saga sent, in order.
    pub sent: Vec<Command>,
}

impl Row {
    /// Holds `decision` against the oracle, then stores it (`commit_decision`).
    pub fn commit(
        &mut self,
        decision: Decision,
        cause: &Cause<'_>,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) {
        oracle::check_decision(&self.saga, &decision, cause, now, definition, &self.sent);
        if let Decision::Applied { saga, effects } = decision {
            self.sent.extend(commands(&effects));
            self.saga = *saga;
            self.version += 1;
        }
    }
}

pub struct World {
    registry: Registry,
    /// The definitions new sagas start on, by name: what operations pick by index.
    definitions: Vec<Arc<SagaDefinition>>,
    /// [`named_replies`] of each of [`Self::definitions`].
    replies: Vec<Vec<Named>>,
    /// Every step's command topic, of every definition.
    command_topics: Vec<String>,
    pub now: DateTime<Utc>,
    pub rows: HashMap<Uuid, Row>,
    /// Saga ids in creation order, for picking one.
    pub order_of_creation: Vec<Uuid>,
    /// One saga per saga type and key.
    pub by_key: HashMap<(String, String), Uuid>,
    inbox: HashSet<Uuid>,
    records: Vec<(String, Vec<u8>)>,
    next_id: u128,
    last_message_id: Option<Uuid>,
}

impl World {
    pub fn new(policies: &PolicyInput) -> Self {
        let registry = policies.registry();
        let definitions: Vec<Arc<SagaDefinition>> = registry.newest_all().cloned().collect();
        Self {
            replies: definitions.iter().map(|d| named_replies(d)).collect(),
            command_topics: definitions
                .iter()
                .flat_map(|d| d.steps.iter().map(|s| s.topic.clone()))
                .collect(),
            definitions,
            registry,
            now: Utc
                .with_ymd_and_hms(2026, 11, 26, 12, 0, 0)
                .single()
                .expect("a valid time"),
            rows: HashMap::new(),
            order_of_creation: Vec::new(),
            by_key: HashMap::new(),
            inbox: HashSet::new(),
            records: Vec::new(),
            next_id: 1,
            last_message_id: None,
        }
    }

    fn fresh_id(&mut self) -> Uuid {
        self.next_id += 1;
        Uuid::from_u128((0x5a6a << 64) | self.next_id)
    }

    fn pick(&self, index: u8) -> Option<Uuid> {
        if self.order_of_creation.is_empty() {
            return None;
        }
        Some(self.order_of_creation[usize::from(index) % self.order_of_creation.len()])
    }

    /// The definition `saga` runs on, as the handler finds it (by name and version).
    pub fn definition_of(&self, saga: &Saga) -> Arc<SagaDefinition> {
        let definition = self
            .registry
            .get(&saga.definition_name, saga.definition_version)
            .expect("a saga runs on a known definition");
        Arc::clone(definition)
    }

    pub fn step(&mut self, op: &Op) {
        match op {
            Op::Raw { topic, payload } => {
                let topic = match *topic {
                    Topic::Trigger(i) => {
                        let i = usize::from(i) % self.definitions.len();
                        self.definitions[i].trigger.topic.clone()
                    }
                    Topic::Replies => REPLIES.to_owned(),
                    Topic::Command(i) => {
                        self.command_topics[usize::from(i) % self.command_topics.len()].clone()
                    }
                };
                self.deliver(topic, payload.clone());
            }
            Op::Trigger {
                saga,
                key,
                ids,
                misrouted,
            } => {
                let own = usize::from(*saga) % self.definitions.len();
                let made = generate::well_formed(&self.definitions[own], *key, ids);
                self.deliver_trigger(own, &made, *misrouted, true);
            }
            Op::EditedTrigger {
                saga,
                key,
                ids,
                edits,
                misrouted,
            } => {
                let own = usize::from(*saga) % self.definitions.len();
                let made = generate::edited(&self.definitions[own], *key, ids, edits);
                self.deliver_trigger(own, &made, *misrouted, false);
            }
            Op::Answer {
                saga,
                back,
                ok,
                reason,
                reuse_message_id,
            } => {
                let Some(id) = self.pick(*saga) else { return };
                let sent = &self.rows[&id].sent;
                let command = &sent[sent.len() - 1 - usize::from(*back) % sent.len()];
                // A command that names no failure reply (the return saga's `ReceiveReturn`)
                // is never refused: its participant answers that it was done.
                let reply = if *ok {
                    Reply::succeeded(command)
                } else {
                    Reply::failed(command, reason).unwrap_or_else(|| Reply::succeeded(command))
                };
                self.deliver_reply(id, reply, *reuse_message_id);
            }
            Op::Forged {
                saga,
                target,
                reply,
                attempt,
                reuse_message_id,
            } => self.forge(*saga, *target, *reply, *attempt, *reuse_message_id),
            Op::Redeliver { back } => {
                if self.records.is_empty() {
                    return;
                }
                let (topic, bytes) = self.records
                    [self.records.len() - 1 - usize::from(*back) % self.records.len()]
                .clone();
                self.deliver(topic, bytes);
            }
            Op::Scan { jitter } => {
                // `lock_due`: every saga whose deadline is not after now, earliest first.
                let mut due: Vec<(DateTime<Utc>, Uuid)> = self
                    .rows
                    .values()
                    .filter_map(|r| r.saga.deadline_at.map(|d| (d, r.saga.id)))
                    .filter(|(d, _)| *d <= self.now)
                    .collect();
                due.sort();
                for (_, id) in due {
                    self.deadline(id, *jitter);
                }
            }
            Op::Deadline { saga, jitter } => {
                if let Some(id) = self.pick(*saga) {
                    self.deadline(id, *jitter);
                }
            }
            Op::Operator { saga, action } => {
                if let Some(id) = self.pick(*saga) {
                    let action = action.to_action();
                    let saga = &self.rows[&id].saga;
                    let decision = saga.on_operator(&action, self.now, &self.definition_of(saga));
                    self.commit(id, decision, Cause::Operator(&action));
                }
            }
            Op::Advance { ms } => self.now += TimeDelta::milliseconds(i64::from(*ms)),
            Op::AdvanceToDeadline { saga } => {
                if let Some(deadline) = self
                    .pick(*saga)
                    .and_then(|id| self.rows[&id].saga.deadline_at)
                {
                    self.now = self.now.max(deadline);
                }
            }
        }
    }

    fn deadline(&mut self, id: Uuid, jitter: u16) {
        let jitter = f64::from(jitter) / 65_536.0;
        let saga = &self.rows[&id].saga;
        let decision = saga.on_deadline(self.now, jitter, &self.definition_of(saga));
        self.commit(id, decision, Cause::Deadline);
    }

    /// A trigger message made for definition `own` on its trigger topic, or (`misrouted`) on
    /// the next definition's, which refuses another message than its own (and starts its own
    /// saga of one it shares). A `well_formed` one is accepted where it belongs, and its saga,
    /// new or not, is the one of its type and key.
    fn deliver_trigger(&mut self, own: usize, made: &Made, misrouted: bool, well_formed: bool) {
        let message = self.definitions[own].trigger.message.clone();
        let target_index = (own + usize::from(misrouted)) % self.definitions.len();
        let target = Arc::clone(&self.definitions[target_index]);
        let refused = target.trigger.message != message;
        let bytes = serde_json::to_vec(&made.message).expect("a message serialises");
        let sagas = self.rows.len();
        let accepted = self.deliver(target.trigger.topic.clone(), bytes);
        if refused {
            assert!(!accepted, "{message} accepted on {}", target.trigger.topic);
            assert_eq!(
                self.rows.len(),
                sagas,
                "a misrouted {message} started a saga"
            );
            return;
        }
        if !well_formed {
            return;
        }
        assert!(
            accepted,
            "a well-formed {message} was refused: {}",
            made.message
        );
        // The saga of its type and key: the key it was made with, or on the topic of another
        // definition started by the same message, that definition's key field of it.
        let key = generate::key_of(&target, &made.message)
            .unwrap_or_else(|| panic!("{} has no key for {}", made.message, target.name));
        if target_index == own {
            assert_eq!(key, made.key);
        }
        let id = self.by_key.get(&(target.name.clone(), key.clone()));
        let id = id.unwrap_or_else(|| panic!("no {} saga keyed {key}", target.name));
        if self.rows.len() > sagas {
            // A new saga keeps the message as it was sent, every field of it.
            let trigger = &self.rows[id].saga.trigger;
            for pointer in generate::leaves(&made.message) {
                assert_eq!(
                    trigger.pointer(&pointer),
                    made.message.pointer(&pointer),
                    "{pointer} of {trigger}"
                );
            }
        }
    }

    fn forge(
        &mut self,
        saga: u8,
        target: Target,
        choice: ReplyChoice,
        attempt: AttemptChoice,
        reuse_message_id: bool,
    ) {
        // The saga, its key, its current attempt, the definition it runs on and the step and
        // direction it waits on.
        let (saga_id, key, current, own, waits_on) = match self.pick(saga) {
            Some(id) if !matches!(target, Target::UnknownSaga) => {
                let saga = &self.rows[&id].saga;
                let waits_on = oracle::waiting_on(saga);
                let current = waits_on.map_or(0, |(i, action)| {
                    let step = &saga.steps[i];
                    match action {
                        Action::Compensate => step.compensation_attempts,
                        Action::Forward => step.attempts,
                    }
                });
                let own = self
                    .definitions
                    .iter()
                    .position(|d| d.name == saga.definition_name)
                    .expect("a saga of a loaded definition");
                (id, saga.key.clone(), current, own, waits_on)
            }
            _ => (
                Uuid::from_u128(u128::from(saga) << 8),
                subject_uuid(saga).to_string(),
                1,
                usize::from(saga),
                None,
            ),
        };
        let key = if matches!(target, Target::WrongKey) {
            subject_uuid(saga.wrapping_add(1)).to_string()
        } else {
            key
        };
        let attempt = match attempt {
            AttemptChoice::Current => current,
            AttemptChoice::Previous => current.wrapping_sub(1),
            AttemptChoice::Next => current.wrapping_add(1),
            AttemptChoice::Exact(n) => n,
        };
        let other_type = matches!(target, Target::OtherType);
        let d = (own + usize::from(other_type)) % self.definitions.len();
        let (named, succeeded) =
            forged_reply(&self.definitions[d], &self.replies[d], choice, waits_on);
        let reply = Reply {
            name: named.name.clone(),
            saga_type: self.definitions[d].name.clone(),
            step: named.step.clone(),
            action: named.action,
            attempt,
            key,
            outcome: if succeeded {
                Outcome::Succeeded
            } else {
                Outcome::Failed {
                    reason: "refused".into(),
                }
            },
        };
        self.deliver_reply(saga_id, reply, reuse_message_id);
    }

    fn deliver_reply(&mut self, saga_id: Uuid, reply: Reply, reuse_message_id: bool) {
        let message_id = match self.last_message_id {
            Some(id) if reuse_message_id => id,
            _ => self.fresh_id(),
        };
        self.last_message_id = Some(message_id);
        let envelope = Envelope {
            message_id,
            saga_id,
            causation_id: None,
            schema_version: SCHEMA_VERSION,
            occurred_at: self.now,
            sequence: None,
            body: reply,
        };
        let bytes = envelope.to_json();
        // What the participant writes, the orchestrator reads; a forged reply out of the
        // wire's bounds (attempt 0) it refuses while decoding, and dead-letters.
        let decoded = Envelope::<Reply>::from_json(&bytes);
        if envelope.body.validate().is_ok() {
            assert_eq!(decoded.as_ref(), Ok(&envelope));
        } else {
            assert!(
                decoded.is_err(),
                "an out-of-bounds reply decoded: {envelope:?}"
            );
        }
        self.deliver(REPLIES.to_owned(), bytes);
    }

    /// One record through the handler (`handle_batch`): a definition's trigger topic starts a
    /// saga, the replies topic moves one, any other topic is refused. A rejection rolls the
    /// record's transaction back (its inbox row too) and dead-letters it. Whether the record
    /// was accepted.
    fn deliver(&mut self, topic: String, payload: Vec<u8>) -> bool {
        let outcome = if let Some(definition) = self.registry.for_topic(&topic).cloned() {
            assert_eq!(definition.trigger.topic, topic);
            self.on_trigger(&definition, &payload)
        } else if topic == REPLIES {
            self.on_reply(&payload)
        } else {
            Err(format!("the orchestrator does not read topic {topic}"))
        };
        if let Err(reason) = &outcome {
            assert!(!reason.is_empty());
        }
        self.records.push((topic, payload));
        outcome.is_ok()
    }

    /// `OrchestratorHandler::on_trigger`.
    fn on_trigger(&mut self, definition: &SagaDefinition, payload: &[u8]) -> Result<(), String> {
        let message = &definition.trigger.message;
        let known = trigger_message(message).expect("a loaded definition's trigger is known");
        let trigger = (known.decode)(payload).map_err(|e| format!("invalid {message}: {e}"))?;
        check_decoded(known, &trigger);
        let id = self.fresh_id();
        let (saga, effects) = Saga::start(id, trigger, self.now, definition)
            .map_err(|e| format!("{message} makes no saga key: {e}"))?;
        oracle::check_start(&saga, &effects, self.now, definition);
        let key = (definition.name.clone(), saga.key.clone());
        if self.by_key.contains_key(&key) {
            // One saga per type and key: the insert does nothing.
            return Ok(());
        }
        let sent = commands(&effects);
        self.by_key.insert(key, id);
        self.order_of_creation.push(id);
        self.rows.insert(
            id,
            Row {
                saga,
                version: 0,
                sent,
            },
        );
        Ok(())
    }

    /// `OrchestratorHandler::on_replies`, one reply at a time.
    fn on_reply(&mut self, payload: &[u8]) -> Result<(), String> {
        let envelope = Envelope::<Reply>::from_json(payload)
            .and_then(|envelope| envelope.body.validate().map(|()| envelope))
            .map_err(|e| format!("invalid reply: {e}"))?;
        if self.inbox.contains(&envelope.message_id) {
            return Ok(());
        }
        let reply = &envelope.body;
        let Some(row) = self.rows.get(&envelope.saga_id) else {
            return Err(format!("{} for unknown saga", reply.name));
        };
        if row.saga.key != reply.key {
            return Err(format!("{} names another saga's key", reply.name));
        }
        let decision = row
            .saga
            .on_reply(reply, self.now, &self.definition_of(&row.saga));
        self.inbox.insert(envelope.message_id);
        self.commit(envelope.saga_id, decision, Cause::Reply(reply));
        Ok(())
    }

    /// `commit_decision`: the decision held against the oracle, then stored.
    fn commit(&mut self, id: Uuid, decision: Decision, cause: Cause<'_>) {
        let definition = self.definition_of(&self.rows[&id].saga);
        let row = self.rows.get_mut(&id).expect("a stored saga");
        row.commit(decision, &cause, self.now, &definition);
    }
}

/// What the handler decoded is the message as its type writes it: of its type, and read back
/// the same.
fn check_decoded(known: &TriggerMessage, trigger: &Value) {
    assert_eq!(trigger["type"], known.name, "{trigger}");
    let bytes = serde_json::to_vec(trigger).expect("JSON serialises");
    assert_eq!(
        (known.decode)(&bytes).as_ref(),
        Ok(trigger),
        "a decoded {} does not decode the same again",
        known.name
    );
}

/// The commands among `effects`.
pub fn commands(effects: &[Effect]) -> Vec<Command> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { command, .. } => Some(command.clone()),
            Effect::Publish(_) => None,
        })
        .collect()
}
