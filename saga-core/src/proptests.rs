//! Property tests of the state machine: random interleavings of replies (right and wrong step,
//! direction and attempt; done, refused, compensation failed), duplicates, stale attempts,
//! deadlines (early, on time, with jitter and clock advances) and operator actions never break
//! the saga's rules. Every decision is held against [`super::oracle`], the reference model the
//! fuzz target `orchestrator_records` shares: the next state, step statuses, attempt counts,
//! command, event and deadline it expects, and the invariants below.
//!
//! - completed and compensated are final; failed moves only by an operator's retry or skip;
//! - a reply moves the saga exactly when it answers the current step, in the current
//!   direction, from an attempt of the current round; a deadline exactly when it passed;
//! - every applied decision bumps the version and `updated_at` (the clock only moves forward);
//! - every command sent targets the step the saga then waits on, with a new attempt number,
//!   and at most one command is in flight;
//! - no step is both done and undone, and no forward command follows a compensation;
//! - compensations run in reverse order of the forward steps, and a compensated saga undid
//!   every step it did;
//! - and nothing wedges a saga: answering what it waits for (and an operator for a failed
//!   one) always ends it.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use events::{Action, Command, Reply, SagaEvent};
use proptest::prelude::*;
use uuid::Uuid;

use super::oracle::{self, Cause};
use super::order_messages::{CompensationFailed, Reply as OrderReply, StepDone, StepRefused};
use super::tests::trigger;
use super::{
    Decision, Effect, OperatorAction, RetryPolicy, Saga, SagaDefinition, SagaState, StepStatus,
};

const ORDER: Uuid = Uuid::from_u128(7);

/// The order saga's steps, which forged replies name.
const STEPS: [&str; 3] = ["reserve_stock", "charge_payment", "schedule_shipment"];

fn start_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0)
        .single()
        .expect("a valid time")
}

/// Something that can happen to a saga.
#[derive(Debug, Clone)]
enum Event {
    /// A participant answers a command the saga sent; `back` counts from the latest, so
    /// older ones are stale attempts or commands the saga moved past.
    Answer {
        back: usize,
        ok: bool,
    },
    /// The last reply delivered again (a participant answering a repeat from its ledger).
    Duplicate,
    /// A reply of any type for any step, with an attempt near the current one or anywhere.
    Forged {
        kind: usize,
        step: usize,
        attempt: Attempt,
        ok_order: bool,
    },
    /// The deadline scanner at the saga's deadline (or `early`, before it), with jitter.
    Deadline {
        jitter: f64,
        early: bool,
    },
    /// The clock moves on.
    Advance {
        ms: i64,
    },
    Operator(OperatorAction),
}

#[derive(Debug, Clone, Copy)]
enum Attempt {
    Current,
    Previous,
    Next,
    Any(u32),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0..4usize, prop::bool::weighted(0.7)).prop_map(|(back, ok)| Event::Answer { back, ok }),
        1 => Just(Event::Duplicate),
        2 => (
            0..9usize,
            0..3usize,
            prop_oneof![
                Just(Attempt::Current),
                Just(Attempt::Previous),
                Just(Attempt::Next),
                any::<u32>().prop_map(Attempt::Any),
            ],
            prop::bool::weighted(0.9),
        )
            .prop_map(|(kind, step, attempt, ok_order)| Event::Forged {
                kind,
                step,
                attempt,
                ok_order,
            }),
        3 => (0.0..1.0f64, prop::bool::weighted(0.2))
            .prop_map(|(jitter, early)| Event::Deadline { jitter, early }),
        2 => (0..600_000i64).prop_map(|ms| Event::Advance { ms }),
        1 => prop_oneof![
            Just(OperatorAction::Retry),
            Just(OperatorAction::Skip),
            "[a-z ]{0,12}".prop_map(|reason| OperatorAction::Abort { reason }),
        ]
        .prop_map(Event::Operator),
    ]
}

/// The order saga with small budgets, so that retries run out within a test case: each
/// action its own wait and attempts (a step that cannot be undone keeps no attempt limit).
fn definitions() -> impl Strategy<Value = SagaDefinition> {
    let policy = |attempts: std::ops::RangeInclusive<u32>| {
        (1..20_000i64, 1..=8i64, attempts).prop_map(|(timeout_ms, cap, max_attempts)| RetryPolicy {
            timeout: TimeDelta::milliseconds(timeout_ms),
            max_attempts,
            max_timeout: TimeDelta::milliseconds(timeout_ms * cap),
        })
    };
    let steps = order_definition().steps.len();
    prop::collection::vec((policy(1..=4), policy(1..=4)), steps).prop_map(|policies| {
        let mut definition = order_definition();
        for (step, (forward, compensation)) in definition.steps.iter_mut().zip(policies) {
            step.set_retry(forward, compensation);
        }
        definition
    })
}

/// The structure of the saga under test (its policies aside), parsed once.
fn order_definition() -> SagaDefinition {
    static ORDER_SAGA: std::sync::LazyLock<SagaDefinition> =
        std::sync::LazyLock::new(super::tests::definition);
    ORDER_SAGA.clone()
}

fn compensable(i: usize) -> bool {
    order_definition()
        .steps
        .get(i)
        .is_some_and(|s| s.compensable())
}

/// A saga with what the store keeps of it (the version) and what it sent.
struct Model {
    saga: Saga,
    version: i64,
    now: DateTime<Utc>,
    sent: Vec<Command>,
    last_reply: Option<Reply>,
    definition: SagaDefinition,
}

impl Model {
    fn start(definition: SagaDefinition) -> Self {
        let now = start_time();
        let (saga, effects) =
            Saga::start(Uuid::from_u128(1), trigger(), now, &definition).expect("starts");
        assert!(matches!(
            effects.as_slice(),
            [
                Effect::Publish(SagaEvent::SagaStarted { .. }),
                Effect::Send { command, .. }
            ] if command.name == "ReserveStock" && command.attempt == 1
        ));
        oracle::check_start(&saga, &effects, now, &definition);
        Self {
            sent: sends(&effects).into_iter().cloned().collect(),
            saga,
            version: 0,
            now,
            last_reply: None,
            definition,
        }
    }

    /// The clock moves by at least a millisecond per event, so every change is later.
    fn tick(&mut self, ms: i64) {
        self.now += TimeDelta::milliseconds(ms.max(1));
    }

    fn current_attempt(&self) -> u32 {
        self.saga.current_step().map_or(1, |i| {
            let step = &self.saga.steps[i];
            match self.saga.state {
                SagaState::Compensating => step.compensation_attempts,
                _ => step.attempts,
            }
        })
    }

    fn apply(&mut self, event: &Event) {
        match event {
            Event::Advance { ms } => self.tick(*ms),
            Event::Answer { back, ok } => {
                let command = self.sent[self.sent.len() - 1 - back % self.sent.len()].clone();
                let reply = if *ok {
                    Reply::succeeded(&command)
                } else {
                    Reply::failed(&command, "no").expect("every order saga command may fail")
                };
                self.reply(reply);
            }
            Event::Duplicate => {
                if let Some(reply) = self.last_reply.clone() {
                    self.reply(reply);
                }
            }
            Event::Forged {
                kind,
                step,
                attempt,
                ok_order,
            } => {
                let current = self.current_attempt();
                let attempt = match attempt {
                    Attempt::Current => current,
                    Attempt::Previous => current.wrapping_sub(1),
                    Attempt::Next => current.wrapping_add(1),
                    Attempt::Any(n) => *n,
                };
                let order_id = if *ok_order { ORDER } else { Uuid::from_u128(8) };
                if order_id.to_string() != self.saga.key {
                    // The handler rejects a reply with another saga's key before the machine
                    // sees it.
                    return;
                }
                self.reply(forged(*kind, *step, attempt, order_id));
            }
            Event::Deadline { jitter, early } => {
                self.tick(1);
                let due = self.saga.deadline_at;
                match (due, early) {
                    (Some(deadline), true) if deadline > self.now => {
                        // Before the deadline: `deadline - 1 ms` is still before it.
                        let before = (deadline - TimeDelta::milliseconds(1)).max(self.now);
                        let decision = self.saga.on_deadline(before, *jitter, &self.definition);
                        assert!(
                            matches!(decision, Decision::Ignored { .. }),
                            "a deadline fired before it passed: {decision:?}"
                        );
                        self.now = before;
                        return;
                    }
                    (Some(deadline), _) => self.now = self.now.max(deadline),
                    (None, _) => {}
                }
                let decision = self.saga.on_deadline(self.now, *jitter, &self.definition);
                self.commit(decision, &Cause::Deadline);
            }
            Event::Operator(action) => {
                self.tick(1);
                let decision = self.saga.on_operator(action, self.now, &self.definition);
                self.commit(decision, &Cause::Operator(action));
            }
        }
    }

    fn reply(&mut self, reply: Reply) {
        self.tick(1);
        let decision = self.saga.on_reply(&reply, self.now, &self.definition);
        self.commit(decision, &Cause::Reply(&reply));
        self.last_reply = Some(reply);
    }

    /// Holds the decision against the oracle, then stores it.
    fn commit(&mut self, decision: Decision, cause: &Cause<'_>) {
        oracle::check_decision(
            &self.saga,
            &decision,
            cause,
            self.now,
            &self.definition,
            &self.sent,
        );
        if let Decision::Applied { saga, effects } = decision {
            // This model's clock moves on with every event: each change is later.
            assert!(saga.updated_at > self.saga.updated_at, "{saga:#?}");
            self.sent.extend(sends(&effects).into_iter().cloned());
            self.saga = *saga;
            self.version += 1;
        }
    }

    /// Answers what the saga waits for, and an operator retries or skips what fails, until
    /// the saga ends.
    fn drive_to_the_end(&mut self, skip: bool) {
        for _ in 0..16 {
            match self.saga.state {
                SagaState::Completed | SagaState::Compensated => return,
                // Abandoned by an operator: nothing moves it on, they settle it by hand.
                SagaState::Failed
                    if !self
                        .saga
                        .steps
                        .iter()
                        .any(|s| s.status == StepStatus::CompensationFailed) =>
                {
                    return
                }
                SagaState::Failed => {
                    let action = if skip {
                        OperatorAction::Skip
                    } else {
                        OperatorAction::Retry
                    };
                    self.apply(&Event::Operator(action));
                }
                SagaState::Running | SagaState::Compensating => {
                    let version = self.version;
                    self.apply(&Event::Answer { back: 0, ok: true });
                    assert_eq!(
                        self.version,
                        version + 1,
                        "the latest command's answer was ignored"
                    );
                }
            }
        }
        panic!("the saga did not end: {:#?}", self.saga);
    }
}

fn forged(kind: usize, step: usize, attempt: u32, order_id: Uuid) -> Reply {
    forged_in_order_terms(kind, step, attempt, order_id).wire()
}

fn forged_in_order_terms(kind: usize, step: usize, attempt: u32, order_id: Uuid) -> OrderReply {
    let done = StepDone { order_id, attempt };
    let refused = StepRefused {
        order_id,
        attempt,
        reason: "no".into(),
    };
    match kind {
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
            step: STEPS[step % 3],
            reason: "cannot".into(),
        }),
    }
}

fn sends(effects: &[Effect]) -> Vec<&Command> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { command, .. } => Some(command),
            Effect::Publish(_) => None,
        })
        .collect()
}

fn index_of(step: &str) -> usize {
    order_definition()
        .steps
        .iter()
        .position(|s| s.name == step)
        .expect("a defined step")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_interleaving_breaks_the_rules(
        definition in definitions(),
        events in prop::collection::vec(event(), 0..80),
        skip in any::<bool>(),
    ) {
        let mut model = Model::start(definition);
        for event in &events {
            model.apply(event);
        }
        model.drive_to_the_end(skip);
    }

    /// The compensation commands of a saga that fails at any point are exactly its done
    /// steps (and the step that did not answer, if it can be undone), from the top down.
    #[test]
    fn compensation_undoes_the_forward_steps_in_reverse_order(
        definition in definitions(),
        done in 0..3usize,
        how in 0..3u8,
    ) {
        let mut model = Model::start(definition);
        for _ in 0..done {
            model.apply(&Event::Answer { back: 0, ok: true });
        }
        let failing = done;
        match how {
            0 => model.apply(&Event::Answer { back: 0, ok: false }),
            1 => model.apply(&Event::Operator(OperatorAction::Abort { reason: "x".into() })),
            _ => {
                for _ in 0..16 {
                    if model.saga.state != SagaState::Running {
                        break;
                    }
                    model.apply(&Event::Deadline { jitter: 0.0, early: false });
                }
            }
        }
        let gave_up_on_it = how != 0 && compensable(failing);
        if how != 0 && !compensable(failing) {
            // The pivot is never given up on: abort is refused, deadlines retry it forever.
            prop_assert_eq!(model.saga.state, SagaState::Running);
            return Ok(());
        }
        model.drive_to_the_end(false);
        let mut forward: Vec<usize> = (0..failing).filter(|&i| compensable(i)).collect();
        if gave_up_on_it {
            forward.push(failing);
        }
        forward.reverse();
        let mut undone: Vec<usize> = model
            .sent
            .iter()
            .filter(|c| c.action == Action::Compensate)
            .map(|c| index_of(&c.step))
            .collect();
        undone.dedup();
        prop_assert_eq!(undone, forward);
        prop_assert_eq!(model.saga.state, SagaState::Compensated);
    }
}
