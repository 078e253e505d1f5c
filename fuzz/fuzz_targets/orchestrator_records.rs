//! The orchestrator's consumer path, record → decoder → state machine, against an in-memory
//! store, for every saga type `sagas/` defines (the order saga, started by `OrderPlaced` on
//! `orders`, and the return saga, started by `ReturnRequested` on `returns`).
//!
//! The definitions are loaded as the orchestrator loads them (`definitions::load_dir`), given
//! the input's retry policies, and put in a [`Registry`]: a record on a definition's trigger
//! topic starts a saga of it, and each saga moves by its own definition. Steps, trigger topics,
//! trigger messages, command topics and reply names all come from the definitions.
//!
//! The input is a sequence of operations: records on a trigger topic, the replies topic or a
//! topic the orchestrator does not read (raw bytes), well-formed orders and returns (now and
//! then on the other saga's trigger topic, which refuses them), answers to commands a saga
//! really sent, forged replies (any reply a definition names, or one mislabelled, for any step,
//! direction and attempt, naming the saga's own type or another), redeliveries, deadline
//! scans, operator actions and clock advances. Each record is decoded with the functions
//! `orchestrator/src/handler.rs` uses and handled by the handler's rules (one saga per saga
//! type and key, an inbox per message id, a reply for an unknown saga or with another saga's
//! key is rejected, an applied decision replaces the saga and bumps its version). After every
//! step the saga's shape, the transition and the commands it sent (checked against the typed
//! trigger message, independently of the definition's payload mapping) are checked against the
//! rules of `orchestrator/src/saga/machine.rs`; at the end every saga, of every type, is driven
//! to its end, once by answering every command and once by deadlines alone: nothing may wedge
//! it.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, LazyLock};

use arbitrary::Arbitrary;
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use events::{
    Action, Address, Command, Envelope, LineItem, OrderPlaced, Outcome, Reply, ReturnItem,
    ReturnRequested, SagaEvent, SCHEMA_VERSION,
};
use libfuzzer_sys::fuzz_target;
use orchestrator::saga::definitions::{self, trigger_message};
use orchestrator::saga::{
    Decision, Effect, OperatorAction, Registry, RetryPolicy, Saga, SagaDefinition, SagaState,
    StepStatus, ABANDON_AFTER_ATTEMPTS,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

/// The order saga's messages in the shapes the orchestrator's tests write them.
#[path = "../../orchestrator/src/saga/order_messages.rs"]
#[allow(dead_code)] // The orchestrator's tests use the rest of it.
mod order_messages;

use order_messages::Command as OrderCommand;

#[derive(Debug, Arbitrary)]
struct Input {
    policies: PolicyInput,
    ops: Vec<Op>,
}

/// Retry policies as `RetryConfig::apply` sets them on a definition: a positive timeout, a
/// cap no shorter than it, at least one attempt. Small, so that budgets run out.
#[derive(Debug, Arbitrary)]
struct PolicyInput {
    timeout_ms: u16,
    max_timeout_ms: u32,
    forward_attempts: u8,
    compensation_attempts: u8,
}

/// Every saga definition in `sagas/`, loaded once as the orchestrator loads them at start-up:
/// every input starts from clones of them.
static DEFINITIONS: LazyLock<Vec<SagaDefinition>> = LazyLock::new(|| {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../sagas"));
    let loaded = definitions::load_dir(dir).expect("the saga definitions load");
    // The operations make well-formed trigger messages of these types; a saga that starts on
    // neither still gets raw records and its definition's sample message.
    for message in [OrderPlaced::TYPE_NAME, ReturnRequested::TYPE_NAME] {
        assert!(
            loaded.iter().any(|d| d.trigger.message == message),
            "no saga starts on {message}"
        );
    }
    loaded
});

impl PolicyInput {
    /// Every definition with these policies: every forward action one, every compensation the
    /// other. A step that cannot be undone keeps no attempt limit (`u32::MAX`), as its
    /// definition says.
    fn registry(&self) -> Registry {
        let timeout_ms = 1 + i64::from(self.timeout_ms);
        let max_timeout_ms = timeout_ms.max(i64::from(self.max_timeout_ms % 600_000));
        let policy = |attempts: u8, modulo: u8| RetryPolicy {
            timeout: TimeDelta::milliseconds(timeout_ms),
            max_attempts: 1 + u32::from(attempts % modulo),
            max_timeout: TimeDelta::milliseconds(max_timeout_ms),
        };
        let forward = policy(self.forward_attempts, 8);
        let compensation = policy(self.compensation_attempts, 20);
        let definitions = DEFINITIONS
            .iter()
            .map(|definition| {
                let mut definition = definition.clone();
                for step in &mut definition.steps {
                    step.set_retry(forward, compensation);
                }
                definition
            })
            .collect();
        Registry::new(definitions).expect("the definitions with other retry policies load")
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Topic {
    /// A definition's trigger topic.
    Trigger(u8),
    Replies,
    /// A step's command topic, which the orchestrator writes but does not read.
    Command(u8),
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A record of arbitrary bytes.
    Raw {
        topic: Topic,
        payload: Vec<u8>,
    },
    /// A valid `OrderPlaced`; order ids come from a small set, so duplicates happen.
    /// `misrouted`: on another saga's trigger topic instead of its own.
    Order {
        order: u8,
        customer: u8,
        lines: Vec<(u8, u16, u16)>,
        misrouted: bool,
    },
    /// A valid `ReturnRequested`; return ids come from the same small set as order ids, so
    /// duplicates happen, and a return may share its key with an order saga.
    Return {
        request: u8,
        order: u8,
        customer: u8,
        lines: Vec<(u8, u16)>,
        refund_cents: u32,
        misrouted: bool,
    },
    /// A participant's answer to a command the saga sent (`back` counts from the latest).
    Answer {
        saga: u8,
        back: u8,
        ok: bool,
        reason: String,
        reuse_message_id: bool,
    },
    /// A reply for any step, direction and attempt, named as a definition names it or
    /// mislabelled.
    Forged {
        saga: u8,
        target: Target,
        reply: ReplyChoice,
        attempt: AttemptChoice,
        reuse_message_id: bool,
    },
    /// An earlier record, delivered again byte for byte.
    Redeliver {
        back: u8,
    },
    /// The deadline scanner's pass over every saga whose deadline passed.
    Scan {
        jitter: u16,
    },
    /// `on_deadline` on one saga, whether or not its deadline passed.
    Deadline {
        saga: u8,
        jitter: u16,
    },
    Operator {
        saga: u8,
        action: ActionInput,
    },
    Advance {
        ms: u32,
    },
    /// The clock moves to one saga's deadline.
    AdvanceToDeadline {
        saga: u8,
    },
}

/// Whom a forged reply is for.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Target {
    /// The picked saga, in its own definition's terms.
    Own,
    /// A saga that does not exist.
    UnknownSaga,
    /// The picked saga, with another key than its own.
    WrongKey,
    /// The picked saga, in the next definition's terms (its type, steps and reply names).
    OtherType,
}

/// Which reply a forged one is.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum ReplyChoice {
    /// An answer to what the saga waits on (the first step when it waits on nothing): its
    /// step and direction, saying `succeeded`, named as the definition names that outcome or
    /// (`mislabelled`, or when the definition names no such reply) as it names the other.
    Current { succeeded: bool, mislabelled: bool },
    /// Any reply the definition names ([`named_replies`]), by index; one index more is a
    /// reply named for one outcome that says the other.
    Named(u8),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum AttemptChoice {
    Current,
    Previous,
    Next,
    Exact(u32),
}

#[derive(Debug, Arbitrary)]
enum ActionInput {
    Retry,
    Skip,
    Abort(String),
}

impl ActionInput {
    fn to_action(&self) -> OperatorAction {
        match self {
            Self::Retry => OperatorAction::Retry,
            Self::Skip => OperatorAction::Skip,
            Self::Abort(reason) => OperatorAction::Abort {
                reason: reason.clone(),
            },
        }
    }
}

const REPLIES: &str = "saga.replies";

/// One saga row, with what the fake store remembers of what the saga sent.
#[derive(Clone)]
struct Row {
    saga: Saga,
    version: i64,
    /// Every command the saga sent, in order.
    sent: Vec<Command>,
}

/// What moved a saga.
enum Cause<'a> {
    Reply(&'a Reply),
    Deadline,
    Operator(&'a OperatorAction),
}

/// A reply a definition's participants may send: its step, direction, name and whether it
/// says the action was done.
struct Named {
    step: String,
    action: Action,
    name: String,
    succeeded: bool,
}

/// Every reply `definition` names, step by step: forward success and failure, then
/// compensation success and failure (the replies a definition does not name are left out).
fn named_replies(definition: &SagaDefinition) -> Vec<Named> {
    let mut named = Vec::new();
    for step in &definition.steps {
        let actions = [
            (Action::Forward, Some(&step.forward)),
            (Action::Compensate, step.compensation.as_ref()),
        ];
        for (action, defined) in actions {
            let Some(defined) = defined else { continue };
            let names = [(&defined.success, true)]
                .into_iter()
                .chain(defined.failure.as_ref().map(|f| (f, false)));
            for (name, succeeded) in names {
                named.push(Named {
                    step: step.name.clone(),
                    action,
                    name: name.clone(),
                    succeeded,
                });
            }
        }
    }
    named
}

struct World {
    registry: Registry,
    /// The definitions new sagas start on, by name: what operations pick by index.
    definitions: Vec<Arc<SagaDefinition>>,
    /// [`named_replies`] of each of [`Self::definitions`].
    replies: Vec<Vec<Named>>,
    /// Every step's command topic, of every definition.
    command_topics: Vec<String>,
    now: DateTime<Utc>,
    rows: HashMap<Uuid, Row>,
    /// Saga ids in creation order, for picking one.
    order_of_creation: Vec<Uuid>,
    /// One saga per saga type and key.
    by_key: HashMap<(String, String), Uuid>,
    inbox: HashSet<Uuid>,
    records: Vec<(String, Vec<u8>)>,
    next_id: u128,
    last_message_id: Option<Uuid>,
}

fuzz_target!(|input: Input| {
    let registry = input.policies.registry();
    let definitions: Vec<Arc<SagaDefinition>> = registry.newest_all().cloned().collect();
    let mut world = World {
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
    };
    for op in &input.ops {
        world.step(op);
    }
    for id in world.order_of_creation.clone() {
        world.check_row(id);
        world.drive_by_answers(id);
        world.drive_by_deadlines(id);
    }
});

impl World {
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
    fn definition_of(&self, saga: &Saga) -> Arc<SagaDefinition> {
        let definition = self
            .registry
            .get(&saga.definition_name, saga.definition_version)
            .expect("a saga runs on a known definition");
        Arc::clone(definition)
    }

    /// The index in [`Self::definitions`] of the one that starts on `message`.
    fn starting_on(&self, message: &str) -> usize {
        self.definitions
            .iter()
            .position(|d| d.trigger.message == message)
            .expect("a saga starts on it")
    }

    fn step(&mut self, op: &Op) {
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
            Op::Order {
                order,
                customer,
                lines,
                misrouted,
            } => {
                let order = valid_order(*order, *customer, lines);
                let bytes = serde_json::to_vec(&order).expect("an order serialises");
                let decoded = OrderPlaced::from_json(&bytes);
                assert_eq!(decoded.as_ref(), Ok(&order), "a valid order was refused");
                self.deliver_trigger(OrderPlaced::TYPE_NAME, bytes, *misrouted);
            }
            Op::Return {
                request,
                order,
                customer,
                lines,
                refund_cents,
                misrouted,
            } => {
                let request = valid_return(*request, *order, *customer, lines, *refund_cents);
                let bytes = serde_json::to_vec(&request).expect("a return serialises");
                let decoded = ReturnRequested::from_json(&bytes);
                assert_eq!(decoded.as_ref(), Ok(&request), "a valid return was refused");
                self.deliver_trigger(ReturnRequested::TYPE_NAME, bytes, *misrouted);
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

    /// A well-formed trigger `message` on the trigger topic of the saga that starts on it, or
    /// (`misrouted`) on the next definition's, which refuses another message than its own.
    fn deliver_trigger(&mut self, message: &str, bytes: Vec<u8>, misrouted: bool) {
        let own = self.starting_on(message);
        let target = &self.definitions[(own + usize::from(misrouted)) % self.definitions.len()];
        let refused = target.trigger.message != message;
        let topic = target.trigger.topic.clone();
        let sagas = self.rows.len();
        let accepted = self.deliver(topic.clone(), bytes);
        assert_eq!(accepted, !refused, "{message} on {topic}");
        if refused {
            assert_eq!(
                self.rows.len(),
                sagas,
                "a misrouted {message} started a saga"
            );
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
                let waits_on = saga.current_step().map(|i| {
                    let step = &saga.steps[i];
                    match saga.state {
                        SagaState::Compensating => {
                            (i, Action::Compensate, step.compensation_attempts)
                        }
                        _ => (i, Action::Forward, step.attempts),
                    }
                });
                let own = self
                    .definitions
                    .iter()
                    .position(|d| d.name == saga.definition_name)
                    .expect("a saga of a loaded definition");
                let current = waits_on.map_or(0, |(_, _, attempt)| attempt);
                let waits_on = waits_on.map(|(i, action, _)| (i, action));
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
        let named = &self.replies[d];
        let (named, succeeded) = match choice {
            ReplyChoice::Current {
                succeeded,
                mislabelled,
            } => {
                let (i, action) = waits_on.unwrap_or((0, Action::Forward));
                let step = &self.definitions[d].steps[i % self.definitions[d].steps.len()].name;
                // The step's replies in that direction; for a direction it has none in (the
                // compensation of a step that cannot be undone), its forward ones.
                let of_step: Vec<&Named> = named.iter().filter(|n| n.step == *step).collect();
                let candidates: Vec<&Named> = of_step
                    .iter()
                    .copied()
                    .filter(|n| n.action == action)
                    .collect();
                let candidates = if candidates.is_empty() {
                    of_step
                } else {
                    candidates
                };
                let labelled = succeeded != mislabelled;
                let named = candidates
                    .iter()
                    .find(|n| n.succeeded == labelled)
                    .unwrap_or(&candidates[0]);
                (*named, succeeded)
            }
            ReplyChoice::Named(kind) => {
                // One more than the definition names: a reply named for one outcome that says
                // the other (a success's name saying it failed, a failure's saying it
                // succeeded).
                let index = usize::from(kind) % (named.len() + 1);
                match named.get(index) {
                    Some(named) => (named, named.succeeded),
                    None => {
                        let named = &named[usize::from(kind) % named.len()];
                        (named, !named.succeeded)
                    }
                }
            }
        };
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
        check_trigger(message, payload, &trigger);
        let id = self.fresh_id();
        let (saga, effects) = Saga::start(id, trigger, self.now, definition)
            .map_err(|e| format!("{message} makes no saga key: {e}"))?;
        check_start(&saga, &effects, self.now, definition);
        check_saga(&saga, definition);
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

    /// `commit_decision`: checks the decision against the rules, then stores it.
    fn commit(&mut self, id: Uuid, decision: Decision, cause: Cause<'_>) {
        let definition = self.definition_of(&self.rows[&id].saga);
        let row = self.rows.get_mut(&id).expect("a stored saga");
        let old = &row.saga;
        let should_apply = should_apply(old, &cause, self.now, &definition);
        match decision {
            Decision::Ignored { reason } => {
                assert!(
                    !should_apply,
                    "ignored ({reason}) but it answers what the saga waits for: {old:#?}"
                );
            }
            Decision::Applied { saga, effects } => {
                assert!(
                    should_apply,
                    "applied but does not answer what the saga waits for: {old:#?}\n{saga:#?}"
                );
                check_saga(&saga, &definition);
                check_transition(
                    old,
                    &saga,
                    &effects,
                    &cause,
                    &row.sent,
                    self.now,
                    &definition,
                );
                row.sent.extend(commands(&effects));
                row.saga = *saga;
                row.version += 1;
            }
        }
    }

    fn check_row(&self, id: Uuid) {
        let row = &self.rows[&id];
        check_saga(&row.saga, &self.definition_of(&row.saga));
        let key = (row.saga.definition_name.clone(), row.saga.key.clone());
        assert_eq!(self.by_key.get(&key), Some(&id));
        // The version counts the applied decisions: at least one per command sent after the
        // first.
        assert!(row.version >= i64::try_from(row.sent.len()).unwrap_or(i64::MAX) - 1);
    }

    /// Participants that answer every command: every saga ends completed or compensated,
    /// failed ones after an operator's retry or skip.
    fn drive_by_answers(&self, id: Uuid) {
        let mut row = self.rows[&id].clone();
        let definition = self.definition_of(&row.saga);
        let now = self.now;
        for round in 0..32 {
            let saga = &row.saga;
            match saga.state {
                SagaState::Completed | SagaState::Compensated => return,
                // Abandoned by an operator: they settle it by hand.
                SagaState::Failed
                    if !saga
                        .steps
                        .iter()
                        .any(|s| s.status == StepStatus::CompensationFailed) =>
                {
                    return
                }
                SagaState::Failed => {
                    let action = if round % 2 == 0 {
                        OperatorAction::Retry
                    } else {
                        OperatorAction::Skip
                    };
                    let decision = saga.on_operator(&action, now, &definition);
                    let cause = Cause::Operator(&action);
                    apply_checked(&mut row, decision, &cause, &definition, now);
                }
                SagaState::Running | SagaState::Compensating => {
                    // The last command sent is the one the saga waits for.
                    let command = row.sent.last().expect("a saga sent something");
                    let reply = Reply::succeeded(command);
                    let decision = saga.on_reply(&reply, now, &definition);
                    apply_checked(&mut row, decision, &Cause::Reply(&reply), &definition, now);
                }
            }
        }
        panic!(
            "answering every command did not end the saga: {:#?}",
            row.saga
        );
    }

    /// Participants that never answer: deadlines alone end every saga (compensated or
    /// failed), except one waiting on a step that cannot be undone, which is retried forever.
    fn drive_by_deadlines(&self, id: Uuid) {
        let mut row = self.rows[&id].clone();
        let definition = self.definition_of(&row.saga);
        let mut now = self.now;
        // A step that cannot be undone has no attempt limit (`u32::MAX`): retried well past
        // the budget of the steps that can be, it is clearly never given up on.
        let budget = definition
            .steps
            .iter()
            .filter(|s| s.compensable())
            .map(|s| s.forward.retry.max_attempts)
            .max()
            .unwrap_or(1);
        for _ in 0..256 {
            let saga = &row.saga;
            if saga.state.is_terminal() {
                return;
            }
            if let Some(i) = saga.current_step() {
                if saga.state == SagaState::Running
                    && !definition.steps[i].compensable()
                    && saga.steps[i].attempts > budget + 2
                {
                    return;
                }
            }
            now = now.max(saga.deadline_at.expect("a waiting saga has a deadline"));
            let decision = saga.on_deadline(now, 0.5, &definition);
            apply_checked(&mut row, decision, &Cause::Deadline, &definition, now);
        }
        panic!("deadlines did not end the saga: {:#?}", row.saga);
    }
}

/// Applies a decision that must apply, with every check.
fn apply_checked(
    row: &mut Row,
    decision: Decision,
    cause: &Cause<'_>,
    definition: &SagaDefinition,
    now: DateTime<Utc>,
) {
    assert!(should_apply(&row.saga, cause, now, definition));
    let Decision::Applied { saga, effects } = decision else {
        panic!("{decision:?} for a saga that waits for it: {:#?}", row.saga);
    };
    check_saga(&saga, definition);
    check_transition(
        &row.saga, &saga, &effects, cause, &row.sent, now, definition,
    );
    row.sent.extend(commands(&effects));
    row.saga = *saga;
    row.version += 1;
}

/// Order ids and return ids alike: a small set, so that one id keys an order saga and a
/// return saga (one saga per type and key: both start).
fn subject_uuid(n: u8) -> Uuid {
    Uuid::from_u128(0x0bde_0000 + u128::from(n))
}

fn valid_order(order: u8, customer: u8, lines: &[(u8, u16, u16)]) -> OrderPlaced {
    let mut items: Vec<LineItem> = lines
        .iter()
        .take(100)
        .map(|&(sku, quantity, price)| LineItem {
            sku: format!("SKU-{sku}"),
            quantity: 1 + i32::from(quantity),
            unit_price_cents: i64::from(price),
        })
        .collect();
    if items.is_empty() {
        items.push(LineItem {
            sku: "WIDGET".into(),
            quantity: 1,
            unit_price_cents: 100,
        });
    }
    let total_cents = items
        .iter()
        .map(|i| i64::from(i.quantity) * i.unit_price_cents)
        .sum();
    OrderPlaced {
        order_id: subject_uuid(order),
        customer_id: format!("customer-{customer}"),
        items,
        total_cents,
        currency: "EUR".into(),
        shipping_address: Address {
            country: "DE".into(),
            city: "Berlin".into(),
            line1: "Unter den Linden 1".into(),
            postal_code: "10117".into(),
        },
    }
}

fn valid_return(
    request: u8,
    order: u8,
    customer: u8,
    lines: &[(u8, u16)],
    refund_cents: u32,
) -> ReturnRequested {
    let mut items: Vec<ReturnItem> = lines
        .iter()
        .take(100)
        .map(|&(sku, quantity)| ReturnItem {
            sku: format!("SKU-{sku}"),
            quantity: 1 + i32::from(quantity),
        })
        .collect();
    if items.is_empty() {
        items.push(ReturnItem {
            sku: "WIDGET".into(),
            quantity: 1,
        });
    }
    ReturnRequested {
        return_id: subject_uuid(request),
        order_id: subject_uuid(order),
        customer_id: format!("customer-{customer}"),
        items,
        refund_cents: 1 + i64::from(refund_cents),
        currency: "EUR".into(),
    }
}

/// A trigger message as its typed message, for checks that do not go through the
/// definitions' payload mappings.
enum Typed {
    Order(OrderPlaced),
    Return(ReturnRequested),
    /// A trigger message these checks do not know.
    Other,
}

impl Typed {
    /// `trigger` (as a saga keeps it) as the typed `message`.
    fn of(message: &str, trigger: &Value) -> Self {
        fn read<T: DeserializeOwned>(message: &str, trigger: &Value) -> T {
            serde_json::from_value(trigger.clone())
                .unwrap_or_else(|e| panic!("a saga's trigger does not read back as {message}: {e}"))
        }
        match message {
            OrderPlaced::TYPE_NAME => Self::Order(read(message, trigger)),
            ReturnRequested::TYPE_NAME => Self::Return(read(message, trigger)),
            _ => Self::Other,
        }
    }

    /// The id that keys the saga.
    fn key(&self) -> Option<String> {
        match self {
            Self::Order(order) => Some(order.order_id.to_string()),
            Self::Return(request) => Some(request.return_id.to_string()),
            Self::Other => None,
        }
    }
}

/// What the handler decoded is what the message's own decoder accepts, as JSON.
fn check_trigger(message: &str, payload: &[u8], trigger: &Value) {
    assert_eq!(trigger["type"], message, "{trigger}");
    let typed = match message {
        OrderPlaced::TYPE_NAME => OrderPlaced::from_json(payload)
            .map(|o| serde_json::to_value(o).expect("an order serialises")),
        ReturnRequested::TYPE_NAME => ReturnRequested::from_json(payload)
            .map(|r| serde_json::to_value(r).expect("a return serialises")),
        _ => return,
    };
    assert_eq!(typed.as_ref(), Ok(trigger));
}

fn commands(effects: &[Effect]) -> Vec<Command> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { command, .. } => Some(command.clone()),
            Effect::Publish(_) => None,
        })
        .collect()
}

fn direction(state: SagaState) -> Option<Action> {
    match state {
        SagaState::Running => Some(Action::Forward),
        SagaState::Compensating => Some(Action::Compensate),
        _ => None,
    }
}

/// Whether the machine's documented rules say the event moves the saga.
fn should_apply(
    saga: &Saga,
    cause: &Cause<'_>,
    now: DateTime<Utc>,
    definition: &SagaDefinition,
) -> bool {
    match cause {
        // Only a reply of the saga's type to the current step, in the current direction,
        // named as the definition names that outcome, from an attempt of the current round.
        Cause::Reply(reply) => {
            let (Some(action), Some(i)) = (direction(saga.state), saga.current_step()) else {
                return false;
            };
            let step = &saga.steps[i];
            // Any attempt of the current round: forward, every attempt so far; compensating,
            // the attempts since the last operator's retry.
            let attempts = match action {
                Action::Forward => 1..=step.attempts,
                Action::Compensate => {
                    step.compensation_budget_from + 1..=step.compensation_attempts
                }
            };
            let defined = match action {
                Action::Forward => Some(&definition.steps[i].forward),
                Action::Compensate => definition.steps[i].compensation.as_ref(),
            };
            let named = defined.is_some_and(|d| match reply.outcome {
                Outcome::Succeeded => reply.name == d.success,
                Outcome::Failed { .. } => d.failure.as_ref() == Some(&reply.name),
            });
            reply.saga_type == definition.name
                && reply.step == step.name
                && reply.action == action
                && named
                && attempts.contains(&reply.attempt)
        }
        // A deadline that passed, on a saga that waits on a step.
        Cause::Deadline => {
            saga.deadline_at.is_some_and(|d| d <= now) && saga.current_step().is_some()
        }
        // Retry and skip: a failed saga with a stuck compensation. Abort: a running saga
        // whose current step can be undone, or cannot but went unanswered past its first wait
        // (it is abandoned, nothing undone).
        Cause::Operator(action) => match action {
            OperatorAction::Retry | OperatorAction::Skip => {
                saga.state == SagaState::Failed
                    && saga
                        .steps
                        .iter()
                        .any(|s| s.status == StepStatus::CompensationFailed)
            }
            OperatorAction::Abort { .. } => {
                saga.state == SagaState::Running
                    && saga.current_step().is_some_and(|i| {
                        definition.steps[i].compensable()
                            || saga.steps[i].attempts >= ABANDON_AFTER_ATTEMPTS
                    })
            }
        },
    }
}

/// A saga starts running, announces itself with its trigger's summary and sends its first
/// step's command.
fn check_start(saga: &Saga, effects: &[Effect], now: DateTime<Utc>, definition: &SagaDefinition) {
    assert_eq!(saga.state, SagaState::Running);
    assert_eq!(saga.created_at, now);
    assert_eq!(saga.updated_at, now);
    assert_eq!(saga.definition_name, definition.name);
    assert_eq!(
        Some(saga.key.clone()),
        Typed::of(&definition.trigger.message, &saga.trigger).key()
    );
    assert_eq!(effects.len(), 2, "{effects:?}");
    match &effects[0] {
        Effect::Publish(SagaEvent::SagaStarted {
            saga_type,
            key,
            subject,
        }) => {
            assert_eq!(*saga_type, definition.name);
            assert_eq!(*key, saga.key);
            let summary = trigger_message(&definition.trigger.message)
                .expect("a known trigger")
                .summary;
            for field in summary {
                assert_eq!(subject.get(*field), saga.trigger.get(*field), "{field}");
            }
            assert_eq!(subject.len(), summary.len(), "{subject:?}");
        }
        other => panic!("a saga starts by announcing itself, not {other:?}"),
    }
    let first = &definition.steps[0];
    match &effects[1] {
        Effect::Send { topic, command }
            if command.name == first.forward.name
                && command.step == first.name
                && command.action == Action::Forward
                && command.attempt == 1 =>
        {
            assert_eq!(*topic, first.topic);
            check_command_content(saga, command, definition);
        }
        other => panic!("a saga starts with its first step, not {other:?}"),
    }
}

fn is_undone(status: StepStatus) -> bool {
    matches!(
        status,
        StepStatus::Compensated | StepStatus::CompensationSkipped
    )
}

fn is_compensation(status: StepStatus) -> bool {
    matches!(
        status,
        StepStatus::Compensating
            | StepStatus::Compensated
            | StepStatus::CompensationFailed
            | StepStatus::CompensationSkipped
    )
}

/// The shape every stored saga has.
fn check_saga(saga: &Saga, definition: &SagaDefinition) {
    let names: Vec<&str> = saga.steps.iter().map(|s| s.name.as_str()).collect();
    let defined: Vec<&str> = definition.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, defined);
    assert_eq!(saga.definition_name, definition.name);
    assert_eq!(saga.definition_version, definition.version);
    assert!(saga.created_at <= saga.updated_at);
    let statuses: Vec<StepStatus> = saga.steps.iter().map(|s| s.status).collect();

    // Terminal ⇔ finished, no deadline; waiting ⇔ a deadline after the last change, no
    // further than the longest wait.
    assert_eq!(
        saga.state.is_terminal(),
        saga.finished_at.is_some(),
        "{saga:#?}"
    );
    assert_eq!(
        saga.state.is_terminal(),
        saga.deadline_at.is_none(),
        "{saga:#?}"
    );
    if let Some(deadline) = saga.deadline_at {
        let wait = deadline - saga.updated_at;
        let longest = definition
            .steps
            .iter()
            .flat_map(|s| [Some(&s.forward), s.compensation.as_ref()])
            .flatten()
            .map(|a| a.retry.max_timeout + a.retry.max_timeout / 4)
            .max()
            .expect("a definition has steps");
        assert!(
            wait > TimeDelta::zero() && wait <= longest,
            "wait {wait}: {saga:#?}"
        );
    }
    if let Some(finished) = saga.finished_at {
        assert!(saga.created_at <= finished && finished <= saga.updated_at);
    }

    for (i, step) in saga.steps.iter().enumerate() {
        assert!(
            step.compensation_budget_from <= step.compensation_attempts,
            "{saga:#?}"
        );
        if step.status == StepStatus::Pending {
            assert_eq!(step.attempts, 0, "{saga:#?}");
            assert_eq!(step.compensation_attempts, 0, "{saga:#?}");
            assert!(step.started_at.is_none() && step.finished_at.is_none());
            continue;
        }
        assert!(step.attempts >= 1, "{saga:#?}");
        let started = step.started_at.expect("a started step has started_at");
        assert!(saga.created_at <= started && started <= saga.updated_at);
        let defined = &definition.steps[i];
        if defined.compensable() {
            assert!(
                step.attempts <= defined.forward.retry.max_attempts,
                "{saga:#?}"
            );
        }
        // A step is done or undone, never both.
        assert_eq!(
            step.status == StepStatus::Compensated,
            step.compensated_at.is_some(),
            "{saga:#?}"
        );
        if is_compensation(step.status) {
            assert!(defined.compensable(), "{saga:#?}");
            let policy = defined.compensation.as_ref().map(|c| c.retry);
            assert!(step.compensation_attempts >= 1, "{saga:#?}");
            assert!(step.compensation_started_at.is_some());
            assert!(step.finished_at.is_some(), "{saga:#?}");
            let round = step.compensation_attempts - step.compensation_budget_from;
            assert!(policy.is_some_and(|p| round <= p.max_attempts), "{saga:#?}");
            if step.status == StepStatus::Compensating {
                assert!(round >= 1, "{saga:#?}");
            }
        } else {
            assert_eq!(step.compensation_attempts, 0, "{saga:#?}");
            assert!(step.compensation_started_at.is_none());
        }
        match step.status {
            StepStatus::Running => assert!(step.finished_at.is_none()),
            StepStatus::Succeeded => assert!(step.finished_at.is_some()),
            StepStatus::Failed => {
                assert!(step.finished_at.is_some() && step.failure_reason.is_some());
            }
            _ => {}
        }
    }

    let count = |s: StepStatus| statuses.iter().filter(|&&x| x == s).count();
    match saga.state {
        SagaState::Running | SagaState::Completed => {
            assert!(saga.failure_reason.is_none(), "{saga:#?}");
            let done = statuses
                .iter()
                .take_while(|&&s| s == StepStatus::Succeeded)
                .count();
            if saga.state == SagaState::Completed {
                assert_eq!(done, statuses.len(), "{saga:#?}");
            } else {
                assert_eq!(statuses[done], StepStatus::Running, "{saga:#?}");
                assert!(
                    statuses[done + 1..]
                        .iter()
                        .all(|&s| s == StepStatus::Pending),
                    "{saga:#?}"
                );
            }
        }
        SagaState::Compensating | SagaState::Compensated | SagaState::Failed => {
            assert!(saga.failure_reason.is_some(), "{saga:#?}");
            assert_eq!(count(StepStatus::Running), 0, "{saga:#?}");
            // The step that failed is the last one that started; nothing after it started.
            let failed = statuses
                .iter()
                .rposition(|&s| s != StepStatus::Pending)
                .expect("a step failed");
            assert_ne!(statuses[failed], StepStatus::Succeeded, "{saga:#?}");
            assert!(count(StepStatus::Failed) <= 1, "{saga:#?}");
            // Below it, from the top down: undone steps, at most one compensation under way
            // or stuck, then steps still done. Compensation runs in reverse order.
            let mut phase = 0;
            for &s in statuses[..=failed].iter().rev() {
                let rank = match s {
                    StepStatus::Failed => continue,
                    s if is_undone(s) => 0,
                    StepStatus::Compensating | StepStatus::CompensationFailed => 1,
                    StepStatus::Succeeded => 2,
                    other => panic!("{other:?} in a compensating saga: {saga:#?}"),
                };
                assert!(rank >= phase, "compensation out of order: {saga:#?}");
                phase = rank;
            }
            let active = count(StepStatus::Compensating) + count(StepStatus::CompensationFailed);
            match saga.state {
                SagaState::Compensating => {
                    assert_eq!(count(StepStatus::Compensating), 1, "{saga:#?}");
                    assert_eq!(active, 1, "{saga:#?}");
                }
                // A step that cannot be undone, abandoned by an operator: nothing undone.
                SagaState::Failed if count(StepStatus::CompensationFailed) == 0 => {
                    assert_eq!(statuses[failed], StepStatus::Failed, "{saga:#?}");
                    assert_eq!(active, 0, "{saga:#?}");
                    assert!(
                        statuses[..failed]
                            .iter()
                            .all(|&s| s == StepStatus::Succeeded),
                        "{saga:#?}"
                    );
                }
                SagaState::Failed => {
                    assert_eq!(count(StepStatus::CompensationFailed), 1, "{saga:#?}");
                    assert_eq!(active, 1, "{saga:#?}");
                }
                _ => {
                    assert_eq!(active, 0, "{saga:#?}");
                    assert_eq!(
                        count(StepStatus::Succeeded),
                        0,
                        "left a step done: {saga:#?}"
                    );
                }
            }
        }
    }
    if let Some(i) = saga.current_step() {
        let waiting = match saga.state {
            SagaState::Running => StepStatus::Running,
            _ => StepStatus::Compensating,
        };
        assert_eq!(saga.steps[i].status, waiting);
    } else {
        assert!(saga.state.is_terminal(), "waits on nothing: {saga:#?}");
    }
}

/// A command is its definition's action for its step and direction, and carries what the step
/// needs of the trigger: checked against the definition's mapping, and for the trigger
/// messages these checks know, against the typed message field by field.
fn check_command_content(saga: &Saga, command: &Command, definition: &SagaDefinition) {
    assert_eq!(command.key, saga.key);
    assert_eq!(command.saga_type, definition.name);
    assert_eq!(
        i64::from(command.saga_version),
        i64::from(definition.version)
    );
    let step = definition.step(&command.step).expect("a defined step");
    let action = match command.action {
        Action::Forward => Some(&step.forward),
        Action::Compensate => step.compensation.as_ref(),
    }
    .expect("a command of a defined action");
    assert_eq!(command.name, action.name);
    assert_eq!(command.replies.success, action.success);
    assert_eq!(command.replies.failure, action.failure);
    assert_eq!(command.payload.len(), action.payload.fields().count());
    for (field, path) in action.payload.fields() {
        assert_eq!(
            command.payload.get(field),
            path.resolve(&saga.trigger),
            "{field}"
        );
    }
    match Typed::of(&definition.trigger.message, &saga.trigger) {
        Typed::Order(order) => {
            assert_eq!(command.key, order.order_id.to_string());
            assert_eq!(
                command.payload.get("order_id").and_then(|id| id.as_str()),
                Some(order.order_id.to_string().as_str())
            );
            let command = OrderCommand::from_wire(command).expect("an order saga command");
            match &command {
                OrderCommand::ReserveStock { items, .. } => assert_eq!(*items, order.items),
                OrderCommand::ChargePayment {
                    customer_id,
                    amount_cents,
                    currency,
                    ..
                } => {
                    assert_eq!(*customer_id, order.customer_id);
                    assert_eq!(*amount_cents, order.total_cents);
                    assert_eq!(*currency, order.currency);
                }
                OrderCommand::ScheduleShipment { address, items, .. } => {
                    assert_eq!(*address, order.shipping_address);
                    assert_eq!(*items, order.items);
                }
                OrderCommand::ReleaseStock { .. } | OrderCommand::RefundPayment { .. } => {}
            }
        }
        Typed::Return(request) => {
            assert_eq!(command.key, request.return_id.to_string());
            assert_eq!(
                command.payload.get("return_id").and_then(|id| id.as_str()),
                Some(request.return_id.to_string().as_str())
            );
            // Every field a return's command carries, from the request it was made of.
            for (field, value) in &command.payload {
                let expected = match field.as_str() {
                    "return_id" => serde_json::json!(request.return_id),
                    "order_id" => serde_json::json!(request.order_id),
                    "customer_id" => serde_json::json!(request.customer_id),
                    "items" => serde_json::json!(request.items),
                    "refund_cents" | "amount_cents" => serde_json::json!(request.refund_cents),
                    "currency" => serde_json::json!(request.currency),
                    other => {
                        panic!("{other} in a return saga's command (add it here): {command:?}")
                    }
                };
                assert_eq!(*value, expected, "{field}: {command:?}");
            }
        }
        Typed::Other => {}
    }
}

fn allowed(from: StepStatus, to: StepStatus) -> bool {
    use StepStatus::*;
    from == to
        || matches!(
            (from, to),
            (Pending, Running)
                | (Running, Succeeded | Failed | Compensating)
                | (Succeeded, Compensating)
                | (Failed, Compensating)
                | (Compensating, Compensated | CompensationFailed)
                | (CompensationFailed, Compensating | CompensationSkipped)
        )
}

/// What an applied decision may do to a saga.
fn check_transition(
    old: &Saga,
    new: &Saga,
    effects: &[Effect],
    cause: &Cause<'_>,
    sent_before: &[Command],
    now: DateTime<Utc>,
    definition: &SagaDefinition,
) {
    let context = || format!("{old:#?}\n→ {new:#?}\n{effects:?}");
    assert_eq!(new.id, old.id);
    assert_eq!((&new.trigger, &new.key), (&old.trigger, &old.key));
    assert_eq!(new.created_at, old.created_at);
    assert_eq!(new.definition_name, old.definition_name);
    assert_eq!(new.definition_version, old.definition_version);
    // The last change moves forward with the clock.
    assert!(old.updated_at <= now);
    assert_eq!(new.updated_at, now);

    // Completed and compensated are final; failed moves only by an operator's retry or skip.
    match old.state {
        SagaState::Completed | SagaState::Compensated => {
            panic!("moved a finished saga: {}", context())
        }
        SagaState::Failed => assert!(
            matches!(
                cause,
                Cause::Operator(OperatorAction::Retry | OperatorAction::Skip)
            ),
            "{}",
            context()
        ),
        SagaState::Running | SagaState::Compensating => {}
    }
    if old.state == SagaState::Compensating || old.state == SagaState::Failed {
        assert_ne!(new.state, SagaState::Running, "{}", context());
        assert_ne!(new.state, SagaState::Completed, "{}", context());
    }
    if let Some(reason) = &old.failure_reason {
        let new_reason = new.failure_reason.as_deref().unwrap_or_default();
        assert!(new_reason.starts_with(reason.as_str()), "{}", context());
    }

    for (a, b) in old.steps.iter().zip(&new.steps) {
        assert!(
            allowed(a.status, b.status),
            "{:?} → {:?}: {}",
            a.status,
            b.status,
            context()
        );
        assert!(b.attempts >= a.attempts && b.attempts <= a.attempts + 1);
        assert!(b.compensation_attempts >= a.compensation_attempts);
        assert!(b.compensation_attempts <= a.compensation_attempts + 1);
        assert!(b.compensation_budget_from >= a.compensation_budget_from);
    }

    // At most one command, and it is what the saga now waits for: its current step, in its
    // direction, to the step's topic, with a new attempt number.
    let sends: Vec<(&String, &Command)> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { topic, command } => Some((topic, command)),
            Effect::Publish(_) => None,
        })
        .collect();
    assert!(sends.len() <= 1, "{}", context());
    // A step's index in the definition, by its wire name.
    let index_of = |s: &str| definition.steps.iter().position(|d| d.name == s);
    for &(topic, command) in &sends {
        let i = index_of(&command.step).expect("a defined step");
        assert_eq!(new.current_step(), Some(i), "{}", context());
        assert_eq!(*topic, definition.steps[i].topic, "{}", context());
        assert_eq!(Some(command.action), direction(new.state), "{}", context());
        let (attempt, before) = match command.action {
            Action::Forward => (new.steps[i].attempts, old.steps[i].attempts),
            Action::Compensate => (
                new.steps[i].compensation_attempts,
                old.steps[i].compensation_attempts,
            ),
        };
        assert_eq!(command.attempt, attempt, "{}", context());
        assert_eq!(attempt, before + 1, "{}", context());
        check_command_content(new, command, definition);
        let compensated_before = sent_before
            .iter()
            .filter(|c| c.action == Action::Compensate)
            .map(|c| c.step.as_str());
        match command.action {
            // Forward only while nothing was undone, and only after the steps before it.
            Action::Forward => {
                assert_eq!(compensated_before.count(), 0, "{}", context());
                assert!(new.steps[..i]
                    .iter()
                    .all(|s| s.status == StepStatus::Succeeded));
            }
            // Compensations in reverse order: never a step above one already compensated,
            // and nothing above it still done.
            Action::Compensate => {
                for earlier in compensated_before {
                    assert!(index_of(earlier) >= Some(i), "{}", context());
                }
                assert!(
                    new.steps[i + 1..]
                        .iter()
                        .all(|s| s.status != StepStatus::Succeeded),
                    "{}",
                    context()
                );
            }
        }
    }
    if sends.is_empty() && !new.state.is_terminal() {
        // Only a refused compensation leaves the saga waiting without sending: the deadline
        // sends the next attempt.
        assert!(
            matches!(cause, Cause::Reply(reply) if reply.name == "CompensationFailed"),
            "{}",
            context()
        );
        assert_eq!(new.state, SagaState::Compensating);
        assert_eq!(new.current_step(), old.current_step());
    }

    // An event for each terminal state reached, and only then.
    let published: Vec<&SagaEvent> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish(p) => Some(p),
            Effect::Send { .. } => None,
        })
        .collect();
    assert!(published.len() <= 1, "{}", context());
    for event in &published {
        assert_eq!(event.key(), new.key);
        assert_eq!(event.saga_type(), new.definition_name);
        // The end of a saga names its subject by the key's field of the trigger.
        let subject = match event {
            SagaEvent::SagaStarted { .. } => panic!("started twice: {}", context()),
            SagaEvent::SagaCompleted { subject, .. }
            | SagaEvent::SagaCompensated { subject, .. }
            | SagaEvent::SagaFailed { subject, .. } => subject,
        };
        let key = &definition.trigger.key;
        let field = key.segments().last().expect("a key names a field");
        assert_eq!(subject.len(), 1, "{}", context());
        assert_eq!(
            subject.get(field),
            key.resolve(&new.trigger),
            "{}",
            context()
        );
    }
    let expected = match new.state {
        SagaState::Completed => Some("SagaCompleted"),
        SagaState::Compensated => Some("SagaCompensated"),
        SagaState::Failed => Some("SagaFailed"),
        SagaState::Running | SagaState::Compensating => None,
    };
    let got = published.first().map(|e| match e {
        SagaEvent::SagaStarted { .. } => "SagaStarted",
        SagaEvent::SagaCompleted { .. } => "SagaCompleted",
        SagaEvent::SagaCompensated { .. } => "SagaCompensated",
        SagaEvent::SagaFailed { .. } => "SagaFailed",
    });
    assert_eq!(got, expected, "{}", context());
    if let Some(SagaEvent::SagaFailed { reason, .. } | SagaEvent::SagaCompensated { reason, .. }) =
        published.first()
    {
        assert_eq!(Some(reason), new.failure_reason.as_ref(), "{}", context());
    }
}
