//! The orchestrator's consumer path, record → decoder → state machine, against an in-memory
//! store.
//!
//! The input is a sequence of operations: records on the orders or replies topic (raw bytes,
//! well-formed orders, answers to commands the saga really sent, forged replies), redeliveries,
//! deadline scans, operator actions and clock advances. Each record is decoded with the
//! functions `orchestrator/src/handler.rs` uses and handled by the handler's rules (one saga
//! per order id, an inbox per message id, a reply for an unknown saga or with another saga's
//! key is rejected, an applied decision replaces the saga and bumps its version). After every
//! step the saga's shape and the transition are checked against the rules of
//! `orchestrator/src/saga/machine.rs`; at the end every saga is driven to its end, once by
//! answering every command and once by deadlines alone: nothing may wedge it.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use arbitrary::Arbitrary;
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use events::{
    Action, Address, Command, Envelope, LineItem, OrderPlaced, Reply, SagaEvent, SCHEMA_VERSION,
};
use libfuzzer_sys::fuzz_target;
use orchestrator::saga::{
    definitions, Decision, Effect, OperatorAction, RetryPolicy, Saga, SagaDefinition, SagaState,
    StepStatus,
};
use uuid::Uuid;

/// The order saga's messages in the shapes the orchestrator's tests write them.
#[path = "../../orchestrator/src/saga/order_messages.rs"]
#[allow(dead_code)] // The orchestrator's tests use the rest of it.
mod order_messages;

use order_messages::{
    Command as OrderCommand, CompensationFailed, Reply as OrderReply, StepDone, StepRefused,
};

/// The order saga's steps, which forged replies name.
const STEPS: [&str; 3] = ["reserve_stock", "charge_payment", "schedule_shipment"];

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

/// The order saga as `sagas/order.toml` defines it, parsed once: every input starts from a
/// clone of it.
static ORDER_SAGA: LazyLock<SagaDefinition> = LazyLock::new(|| {
    definitions::parse("sagas/order.toml", include_str!("../../sagas/order.toml"))
        .expect("the order saga parses")
});

impl PolicyInput {
    /// The order saga with these policies: every forward action one, every compensation the
    /// other. A step that cannot be undone keeps no attempt limit (`u32::MAX`), as its
    /// definition says.
    fn definition(&self) -> SagaDefinition {
        let timeout_ms = 1 + i64::from(self.timeout_ms);
        let max_timeout_ms = timeout_ms.max(i64::from(self.max_timeout_ms % 600_000));
        let policy = |attempts: u8, modulo: u8| RetryPolicy {
            timeout: TimeDelta::milliseconds(timeout_ms),
            max_attempts: 1 + u32::from(attempts % modulo),
            max_timeout: TimeDelta::milliseconds(max_timeout_ms),
        };
        let forward = policy(self.forward_attempts, 8);
        let compensation = policy(self.compensation_attempts, 20);
        let mut definition = ORDER_SAGA.clone();
        for step in &mut definition.steps {
            step.set_retry(forward, compensation);
        }
        definition
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Topic {
    Orders,
    Replies,
    Other,
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A record of arbitrary bytes.
    Raw {
        topic: Topic,
        payload: Vec<u8>,
    },
    /// A valid `OrderPlaced`; order ids come from a small set, so duplicates happen.
    Order {
        order: u8,
        customer: u8,
        lines: Vec<(u8, u16, u16)>,
    },
    /// A participant's answer to a command the saga sent (`back` counts from the latest).
    Answer {
        saga: u8,
        back: u8,
        ok: bool,
        reason: String,
        reuse_message_id: bool,
    },
    /// A reply of any type, for any step, direction and attempt.
    Forged {
        saga: u8,
        unknown_saga: bool,
        wrong_order: bool,
        kind: u8,
        step: u8,
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

const ORDERS: &str = "orders";
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

struct World {
    definition: SagaDefinition,
    now: DateTime<Utc>,
    rows: HashMap<Uuid, Row>,
    /// Saga ids in creation order, for picking one.
    order_of_creation: Vec<Uuid>,
    by_order: HashMap<Uuid, Uuid>,
    inbox: HashSet<Uuid>,
    records: Vec<(&'static str, Vec<u8>)>,
    next_id: u128,
    last_message_id: Option<Uuid>,
}

fuzz_target!(|input: Input| {
    let mut world = World {
        definition: input.policies.definition(),
        now: Utc
            .with_ymd_and_hms(2026, 11, 26, 12, 0, 0)
            .single()
            .expect("a valid time"),
        rows: HashMap::new(),
        order_of_creation: Vec::new(),
        by_order: HashMap::new(),
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

    fn step(&mut self, op: &Op) {
        match op {
            Op::Raw { topic, payload } => {
                let topic = match topic {
                    Topic::Orders => ORDERS,
                    Topic::Replies => REPLIES,
                    Topic::Other => "inventory.commands",
                };
                self.deliver(topic, payload.clone());
            }
            Op::Order {
                order,
                customer,
                lines,
            } => {
                let order = valid_order(*order, *customer, lines);
                let bytes = serde_json::to_vec(&order).expect("an order serialises");
                let decoded = OrderPlaced::from_json(&bytes);
                assert_eq!(decoded.as_ref(), Ok(&order), "a valid order was refused");
                self.deliver(ORDERS, bytes);
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
                let reply = if *ok {
                    Reply::succeeded(command)
                } else {
                    Reply::failed(command, reason).expect("every order saga command may fail")
                };
                self.deliver_reply(id, reply, *reuse_message_id);
            }
            Op::Forged {
                saga,
                unknown_saga,
                wrong_order,
                kind,
                step,
                attempt,
                reuse_message_id,
            } => self.forge(
                *saga,
                *unknown_saga,
                *wrong_order,
                *kind,
                *step,
                *attempt,
                *reuse_message_id,
            ),
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
                    let decision =
                        self.rows[&id]
                            .saga
                            .on_operator(&action, self.now, &self.definition);
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
        let decision = self.rows[&id]
            .saga
            .on_deadline(self.now, jitter, &self.definition);
        self.commit(id, decision, Cause::Deadline);
    }

    #[allow(clippy::too_many_arguments)]
    fn forge(
        &mut self,
        saga: u8,
        unknown_saga: bool,
        wrong_order: bool,
        kind: u8,
        step: u8,
        attempt: AttemptChoice,
        reuse_message_id: bool,
    ) {
        let (saga_id, order_id, current) = match self.pick(saga) {
            Some(id) if !unknown_saga => {
                let saga = &self.rows[&id].saga;
                let current = saga.current_step().map_or(0, |i| {
                    let step = &saga.steps[i];
                    match saga.state {
                        SagaState::Compensating => step.compensation_attempts,
                        _ => step.attempts,
                    }
                });
                let order_id =
                    Uuid::parse_str(&saga.key).expect("an order saga's key is its order id");
                (id, order_id, current)
            }
            _ => (Uuid::from_u128(u128::from(saga) << 8), order_uuid(saga), 1),
        };
        let order_id = if wrong_order {
            order_uuid(saga.wrapping_add(1))
        } else {
            order_id
        };
        let attempt = match attempt {
            AttemptChoice::Current => current,
            AttemptChoice::Previous => current.wrapping_sub(1),
            AttemptChoice::Next => current.wrapping_add(1),
            AttemptChoice::Exact(n) => n,
        };
        let done = StepDone { order_id, attempt };
        let refused = StepRefused {
            order_id,
            attempt,
            reason: "refused".into(),
        };
        let reply = match kind % 9 {
            0 => OrderReply::StockReserved(done),
            1 => OrderReply::StockUnavailable(refused),
            2 => OrderReply::StockReleased(done),
            3 => OrderReply::PaymentCharged(done),
            4 => OrderReply::PaymentDeclined(refused),
            5 => OrderReply::PaymentRefunded(done),
            6 => OrderReply::ShipmentScheduled(done),
            7 => OrderReply::ShipmentRejected(refused),
            _ => OrderReply::CompensationFailed(CompensationFailed {
                order_id,
                attempt,
                step: STEPS[usize::from(step) % 3],
                reason: "cannot".into(),
            }),
        };
        self.deliver_reply(saga_id, reply.wire(), reuse_message_id);
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
        self.deliver(REPLIES, bytes);
    }

    /// One record through the handler. A rejection rolls the record's transaction back
    /// (its inbox row too) and dead-letters it.
    fn deliver(&mut self, topic: &'static str, payload: Vec<u8>) {
        let outcome = match topic {
            ORDERS => self.on_order(&payload),
            REPLIES => self.on_reply(&payload),
            other => Err(format!("the orchestrator does not read topic {other}")),
        };
        if let Err(reason) = outcome {
            assert!(!reason.is_empty());
        }
        self.records.push((topic, payload));
    }

    /// `OrchestratorHandler::on_order`.
    fn on_order(&mut self, payload: &[u8]) -> Result<(), String> {
        let order = OrderPlaced::from_json(payload).map_err(|e| format!("invalid order: {e}"))?;
        assert_eq!(order.validate(), Ok(()));
        let id = self.fresh_id();
        let order_id = order.order_id;
        let trigger = serde_json::to_value(&order).map_err(|e| e.to_string())?;
        let (saga, effects) = Saga::start(id, trigger, self.now, &self.definition)
            .map_err(|e| format!("no key: {e}"))?;
        assert_eq!(saga.key, order_id.to_string());
        check_start(&saga, &effects, self.now, &self.definition);
        check_saga(&saga, &self.definition);
        if self.by_order.contains_key(&order_id) {
            // One order, one saga: the insert does nothing.
            return Ok(());
        }
        let sent = commands(&effects);
        self.by_order.insert(order_id, id);
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

    /// `OrchestratorHandler::on_reply`.
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
        let decision = row.saga.on_reply(reply, self.now, &self.definition);
        self.inbox.insert(envelope.message_id);
        self.commit(envelope.saga_id, decision, Cause::Reply(reply));
        Ok(())
    }

    /// `commit_decision`: checks the decision against the rules, then stores it.
    fn commit(&mut self, id: Uuid, decision: Decision, cause: Cause<'_>) {
        let row = self.rows.get_mut(&id).expect("a stored saga");
        let old = &row.saga;
        let should_apply = should_apply(old, &cause, self.now, &self.definition);
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
                check_saga(&saga, &self.definition);
                check_transition(
                    old,
                    &saga,
                    &effects,
                    &cause,
                    &row.sent,
                    self.now,
                    &self.definition,
                );
                row.sent.extend(commands(&effects));
                row.saga = *saga;
                row.version += 1;
            }
        }
    }

    fn check_row(&self, id: Uuid) {
        let row = &self.rows[&id];
        check_saga(&row.saga, &self.definition);
        let order_id = Uuid::parse_str(&row.saga.key).expect("an order saga's key is its order id");
        assert_eq!(self.by_order.get(&order_id), Some(&id));
        // The version counts the applied decisions: at least one per command sent after the
        // first.
        assert!(row.version >= i64::try_from(row.sent.len()).unwrap_or(i64::MAX) - 1);
    }

    /// Participants that answer every command: every saga ends completed or compensated,
    /// failed ones after an operator's retry or skip.
    fn drive_by_answers(&self, id: Uuid) {
        let mut row = self.rows[&id].clone();
        let now = self.now;
        for round in 0..32 {
            let saga = &row.saga;
            match saga.state {
                SagaState::Completed | SagaState::Compensated => return,
                SagaState::Failed => {
                    let action = if round % 2 == 0 {
                        OperatorAction::Retry
                    } else {
                        OperatorAction::Skip
                    };
                    let decision = saga.on_operator(&action, now, &self.definition);
                    apply_checked(&mut row, decision, &Cause::Operator(&action), self, now);
                }
                SagaState::Running | SagaState::Compensating => {
                    // The last command sent is the one the saga waits for.
                    let command = row.sent.last().expect("a saga sent something");
                    let reply = Reply::succeeded(command);
                    let decision = saga.on_reply(&reply, now, &self.definition);
                    apply_checked(&mut row, decision, &Cause::Reply(&reply), self, now);
                }
            }
        }
        panic!(
            "answering every command did not end the saga: {:#?}",
            row.saga
        );
    }

    /// Participants that never answer: deadlines alone end every saga (compensated or
    /// failed), except one waiting on the step that cannot be undone, which is retried
    /// forever.
    fn drive_by_deadlines(&self, id: Uuid) {
        let mut row = self.rows[&id].clone();
        let mut now = self.now;
        // The step that cannot be undone has no attempt limit (`u32::MAX`): retried well past
        // the budget of the steps that can be, it is clearly never given up on.
        let budget = self
            .definition
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
                    && !self.definition.steps[i].compensable()
                    && saga.steps[i].attempts > budget + 2
                {
                    return;
                }
            }
            now = now.max(saga.deadline_at.expect("a waiting saga has a deadline"));
            let decision = saga.on_deadline(now, 0.5, &self.definition);
            apply_checked(&mut row, decision, &Cause::Deadline, self, now);
        }
        panic!("deadlines did not end the saga: {:#?}", row.saga);
    }
}

/// Applies a decision that must apply, with every check.
fn apply_checked(
    row: &mut Row,
    decision: Decision,
    cause: &Cause<'_>,
    world: &World,
    now: DateTime<Utc>,
) {
    let definition = &world.definition;
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

fn order_uuid(n: u8) -> Uuid {
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
        order_id: order_uuid(order),
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
        // Only a reply to the current step, in the current direction, from an attempt of the
        // current round.
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
            reply.step == step.name && reply.action == action && attempts.contains(&reply.attempt)
        }
        // A deadline that passed, on a saga that waits on a step.
        Cause::Deadline => {
            saga.deadline_at.is_some_and(|d| d <= now) && saga.current_step().is_some()
        }
        // Retry and skip: a failed saga. Abort: a running saga whose current step can be
        // undone.
        Cause::Operator(action) => match action {
            OperatorAction::Retry | OperatorAction::Skip => saga.state == SagaState::Failed,
            OperatorAction::Abort { .. } => {
                saga.state == SagaState::Running
                    && saga
                        .current_step()
                        .is_some_and(|i| definition.steps[i].compensable())
            }
        },
    }
}

fn check_start(saga: &Saga, effects: &[Effect], now: DateTime<Utc>, definition: &SagaDefinition) {
    assert_eq!(saga.state, SagaState::Running);
    assert_eq!(saga.created_at, now);
    assert_eq!(saga.updated_at, now);
    assert_eq!(effects.len(), 2, "{effects:?}");
    match &effects[0] {
        Effect::Publish(SagaEvent::SagaStarted {
            saga_type,
            key,
            subject,
        }) => {
            assert_eq!(*saga_type, definition.name);
            assert_eq!(*key, saga.key);
            for field in ["order_id", "customer_id", "total_cents", "currency"] {
                assert_eq!(subject.get(field), saga.trigger.get(field), "{field}");
            }
        }
        other => panic!("a saga starts by announcing itself, not {other:?}"),
    }
    match &effects[1] {
        Effect::Send { topic, command }
            if command.name == "ReserveStock" && command.attempt == 1 =>
        {
            assert_eq!(*topic, definition.steps[0].topic);
            check_command_content(saga, command);
        }
        other => panic!("a saga starts by reserving stock, not {other:?}"),
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

/// A command carries what its step needs of the order.
fn check_command_content(saga: &Saga, command: &Command) {
    let order: OrderPlaced =
        serde_json::from_value(saga.trigger.clone()).expect("an order saga's trigger is an order");
    let order = &order;
    assert_eq!(command.key, order.order_id.to_string());
    assert_eq!(command.key, saga.key);
    assert_eq!(
        (command.saga_type.as_str(), command.saga_version),
        ("order", 1)
    );
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
        check_command_content(new, command);
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
