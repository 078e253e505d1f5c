//! Every transition of the state machine, including duplicates, stale attempts and replies
//! that arrive out of order.

use chrono::{DateTime, TimeZone, Utc};
use events::{Address, LineItem, OrderPlaced, SagaEvent};
use uuid::Uuid;

use chrono::TimeDelta;

use super::order_messages::{Command, CompensationFailed, Reply, StepDone, StepRefused};
use super::{Decision, Effect, OperatorAction, Saga, SagaDefinition, SagaState, StepStatus};
use crate::RetryPolicy;

fn at(second: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, second)
        .single()
        .expect("valid time")
}

/// The order every state-machine test (and the property tests) runs.
pub(super) fn order() -> OrderPlaced {
    OrderPlaced {
        order_id: Uuid::from_u128(7),
        customer_id: "alice".into(),
        items: vec![LineItem {
            sku: "WIDGET".into(),
            quantity: 2,
            unit_price_cents: 1_000,
        }],
        total_cents: 2_000,
        currency: "EUR".into(),
        shipping_address: Address {
            country: "DE".into(),
            city: "Berlin".into(),
            line1: "Unter den Linden 1".into(),
            postal_code: "10117".into(),
        },
    }
}

fn done(attempt: u32) -> StepDone {
    StepDone {
        order_id: Uuid::from_u128(7),
        attempt,
    }
}

fn refused(reason: &str) -> StepRefused {
    StepRefused {
        order_id: Uuid::from_u128(7),
        attempt: 1,
        reason: reason.into(),
    }
}

/// The order saga of `sagas/order.toml`, with 1 s for the first reply (doubling, at most
/// 8 s), 3 forward attempts and 2 compensation attempts.
pub(super) fn definition() -> SagaDefinition {
    let mut definition =
        super::definitions::parse("sagas/order.toml", include_str!("../../sagas/order.toml"))
            .expect("the order saga parses");
    // Short waits and few attempts (what STEP_TIMEOUT_MS=1000, STEP_MAX_ATTEMPTS=3,
    // COMPENSATION_MAX_ATTEMPTS=2 and RETRY_MAX_TIMEOUT_MS=8000 make of it).
    let policy = |max_attempts| RetryPolicy {
        timeout: TimeDelta::seconds(1),
        max_attempts,
        max_timeout: TimeDelta::seconds(8),
    };
    for step in &mut definition.steps {
        step.set_retry(policy(3), policy(2));
    }
    definition
}

/// [`order`] as the saga keeps it: the message as JSON.
pub(super) fn trigger() -> serde_json::Value {
    serde_json::to_value(order()).expect("an order serialises")
}

fn started() -> Saga {
    Saga::start(Uuid::from_u128(1), trigger(), at(0), &definition())
        .expect("the order has a key")
        .0
}

/// Applies `reply`, failing the test if it is ignored.
fn apply(saga: &Saga, reply: Reply, second: u32) -> (Saga, Vec<Effect>) {
    match saga.on_reply(&reply.wire(), at(second), &definition()) {
        Decision::Applied { saga, effects } => (*saga, effects),
        Decision::Ignored { reason } => panic!("{} was ignored: {reason}", reply.wire().name),
    }
}

fn assert_ignored(saga: &Saga, reply: Reply, reason_contains: &str) {
    match saga.on_reply(&reply.wire(), at(59), &definition()) {
        Decision::Ignored { reason } => assert!(
            reason.contains(reason_contains),
            "reason {reason:?} does not mention {reason_contains:?}"
        ),
        Decision::Applied { .. } => panic!("{} should have been ignored", reply.wire().name),
    }
}

fn sent(effects: &[Effect]) -> Vec<&str> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { command, .. } => Some(command.name.as_str()),
            Effect::Publish(_) => None,
        })
        .collect()
}

/// A command for the participant on `topic`.
fn send(topic: &str, command: Command) -> Effect {
    Effect::Send {
        topic: topic.into(),
        command: command.wire(),
    }
}

fn statuses(saga: &Saga) -> Vec<StepStatus> {
    saga.steps.iter().map(|s| s.status).collect()
}

#[test]
fn start_announces_the_saga_and_reserves_stock() {
    let (saga, effects) =
        Saga::start(Uuid::from_u128(1), trigger(), at(0), &definition()).expect("starts");
    assert_eq!(saga.state, SagaState::Running);
    assert_eq!(saga.key, Uuid::from_u128(7).to_string());
    assert_eq!(saga.current_step(), Some(0));
    assert_eq!(saga.steps[0].attempts, 1);
    assert_eq!(saga.steps[0].started_at, Some(at(0)));
    // The order saga's SagaStarted says what it always said, beside the saga's type and key.
    let Effect::Publish(SagaEvent::SagaStarted {
        saga_type,
        key,
        subject,
    }) = &effects[0]
    else {
        panic!("SagaStarted first: {effects:?}")
    };
    assert_eq!(
        (saga_type.as_str(), key.as_str()),
        ("order", saga.key.as_str())
    );
    assert_eq!(
        serde_json::Value::Object(subject.clone()),
        serde_json::json!({
            "order_id": Uuid::from_u128(7),
            "customer_id": "alice",
            "total_cents": 2_000,
            "currency": "EUR",
        })
    );
    assert_eq!(
        effects[1],
        send(
            "inventory.commands",
            Command::ReserveStock {
                order_id: Uuid::from_u128(7),
                attempt: 1,
                items: order().items,
            }
        )
    );
}

#[test]
fn happy_path_runs_every_step_then_completes() {
    let (saga, effects) = apply(&started(), Reply::StockReserved(done(1)), 1);
    assert_eq!(sent(&effects), ["ChargePayment"]);
    assert!(matches!(
        &effects[0],
        Effect::Send { topic, command } if topic == "payment.commands" && matches!(
            Command::from_wire(command),
            Some(Command::ChargePayment { amount_cents: 2_000, ref customer_id, .. })
                if customer_id == "alice"
        )
    ));
    let (saga, effects) = apply(&saga, Reply::PaymentCharged(done(1)), 2);
    assert_eq!(sent(&effects), ["ScheduleShipment"]);
    let (saga, effects) = apply(&saga, Reply::ShipmentScheduled(done(1)), 3);
    assert_eq!(saga.state, SagaState::Completed);
    assert_eq!(saga.finished_at, Some(at(3)));
    assert_eq!(saga.current_step(), None);
    assert_eq!(statuses(&saga), [StepStatus::Succeeded; 3]);
    assert_eq!(
        effects,
        [Effect::Publish(SagaEvent::SagaCompleted {
            saga_type: "order".into(),
            key: Uuid::from_u128(7).to_string(),
            subject: serde_json::json!({ "order_id": Uuid::from_u128(7) })
                .as_object()
                .cloned()
                .unwrap_or_default(),
        })]
    );
}

#[test]
fn stock_unavailable_compensates_with_nothing_to_undo() {
    let (saga, effects) = apply(&started(), Reply::StockUnavailable(refused("no GADGET")), 1);
    assert_eq!(saga.state, SagaState::Compensated);
    assert_eq!(
        saga.failure_reason.as_deref(),
        Some("reserve_stock failed: no GADGET")
    );
    assert_eq!(
        statuses(&saga),
        [StepStatus::Failed, StepStatus::Pending, StepStatus::Pending]
    );
    assert!(sent(&effects).is_empty());
    assert!(
        matches!(&effects[0], Effect::Publish(SagaEvent::SagaCompensated { reason, .. }) if reason.contains("no GADGET"))
    );
}

#[test]
fn payment_declined_releases_the_stock() {
    let (saga, _) = apply(&started(), Reply::StockReserved(done(1)), 1);
    let (saga, effects) = apply(&saga, Reply::PaymentDeclined(refused("balance too low")), 2);
    assert_eq!(saga.state, SagaState::Compensating);
    assert_eq!(sent(&effects), ["ReleaseStock"]);
    assert_eq!(saga.current_step(), Some(0));
    let (saga, effects) = apply(&saga, Reply::StockReleased(done(1)), 3);
    assert_eq!(saga.state, SagaState::Compensated);
    assert_eq!(
        statuses(&saga),
        [
            StepStatus::Compensated,
            StepStatus::Failed,
            StepStatus::Pending
        ]
    );
    assert_eq!(saga.steps[0].compensated_at, Some(at(3)));
    assert!(matches!(
        &effects[0],
        Effect::Publish(SagaEvent::SagaCompensated { .. })
    ));
}

#[test]
fn shipping_rejected_refunds_then_releases_in_reverse_order() {
    let (saga, _) = apply(&started(), Reply::StockReserved(done(1)), 1);
    let (saga, _) = apply(&saga, Reply::PaymentCharged(done(1)), 2);
    let (saga, effects) = apply(&saga, Reply::ShipmentRejected(refused("AQ is denied")), 3);
    assert_eq!(sent(&effects), ["RefundPayment"]);
    // The release must wait for the refund: a stock reply now is out of order.
    assert_ignored(
        &saga,
        Reply::StockReleased(done(1)),
        "waits on charge_payment",
    );
    let (saga, effects) = apply(&saga, Reply::PaymentRefunded(done(1)), 4);
    assert_eq!(sent(&effects), ["ReleaseStock"]);
    let (saga, _) = apply(&saga, Reply::StockReleased(done(1)), 5);
    assert_eq!(saga.state, SagaState::Compensated);
    assert_eq!(
        statuses(&saga),
        [
            StepStatus::Compensated,
            StepStatus::Compensated,
            StepStatus::Failed
        ]
    );
    assert_eq!(
        saga.failure_reason.as_deref(),
        Some("schedule_shipment failed: AQ is denied")
    );
}

fn compensation_failed(attempt: u32) -> Reply {
    Reply::CompensationFailed(CompensationFailed {
        order_id: Uuid::from_u128(7),
        attempt,
        step: "reserve_stock",
        reason: "warehouse offline".into(),
    })
}

fn at_deadline(saga: &Saga) -> (Saga, Vec<Effect>) {
    let due = saga.deadline_at.expect("a deadline is armed");
    match saga.on_deadline(due, 0.0, &definition()) {
        Decision::Applied { saga, effects } => (*saga, effects),
        Decision::Ignored { reason } => panic!("deadline ignored: {reason}"),
    }
}

/// A saga whose payment was declined and whose stock release keeps failing.
fn compensating_stock() -> Saga {
    let (saga, _) = apply(&started(), Reply::StockReserved(done(1)), 1);
    apply(&saga, Reply::PaymentDeclined(refused("declined")), 2).0
}

#[test]
fn a_refused_compensation_is_retried_then_fails_the_saga_for_an_operator() {
    let saga = compensating_stock();
    let (saga, effects) = apply(&saga, compensation_failed(1), 3);
    assert_eq!(
        saga.state,
        SagaState::Compensating,
        "one failure is retried"
    );
    assert!(effects.is_empty(), "the retry waits for the deadline");
    assert_eq!(saga.deadline_at, Some(at(4)));
    let (saga, effects) = at_deadline(&saga);
    assert_eq!(
        effects,
        [send(
            "inventory.commands",
            Command::ReleaseStock {
                order_id: Uuid::from_u128(7),
                attempt: 2
            }
        )]
    );
    let (saga, effects) = apply(&saga, compensation_failed(2), 5);
    assert_eq!(saga.state, SagaState::Failed);
    assert_eq!(saga.deadline_at, None);
    assert_eq!(saga.steps[0].status, StepStatus::CompensationFailed);
    let reason = saga.failure_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("declined") && reason.contains("warehouse offline"),
        "{reason}"
    );
    assert!(matches!(
        &effects[0],
        Effect::Publish(SagaEvent::SagaFailed { .. })
    ));
}

#[test]
fn an_operator_retry_gives_a_fresh_budget_and_can_complete_the_compensation() {
    let (saga, _) = apply(&compensating_stock(), compensation_failed(1), 3);
    let (saga, _) = apply(&at_deadline(&saga).0, compensation_failed(2), 5);
    assert_eq!(saga.state, SagaState::Failed);
    let Decision::Applied { saga, effects } =
        saga.on_operator(&OperatorAction::Retry, at(10), &definition())
    else {
        panic!("retry refused");
    };
    assert_eq!(saga.state, SagaState::Compensating);
    assert_eq!(saga.finished_at, None);
    assert_eq!(
        effects,
        [send(
            "inventory.commands",
            Command::ReleaseStock {
                order_id: Uuid::from_u128(7),
                attempt: 3
            }
        )]
    );
    assert_first_wait(&saga, at(10), "a fresh budget starts with the first wait");
    let (saga, _) = apply(&saga, Reply::StockReleased(done(3)), 11);
    assert_eq!(saga.state, SagaState::Compensated);
}

#[test]
fn an_operator_skip_leaves_the_stuck_step_and_finishes_compensating() {
    let (saga, _) = apply(&compensating_stock(), compensation_failed(1), 3);
    let (saga, _) = apply(&at_deadline(&saga).0, compensation_failed(2), 5);
    let Decision::Applied { saga, effects } =
        saga.on_operator(&OperatorAction::Skip, at(10), &definition())
    else {
        panic!("skip refused");
    };
    assert_eq!(saga.steps[0].status, StepStatus::CompensationSkipped);
    assert_eq!(saga.state, SagaState::Compensated);
    assert!(matches!(
        &effects[0],
        Effect::Publish(SagaEvent::SagaCompensated { .. })
    ));
}

#[test]
fn operator_actions_that_do_not_fit_the_state_are_refused() {
    let running = started();
    for action in [OperatorAction::Retry, OperatorAction::Skip] {
        assert!(matches!(
            running.on_operator(&action, at(1), &definition()),
            Decision::Ignored { .. }
        ));
    }
    let (completed, _) = apply(
        &apply(
            &apply(&running, Reply::StockReserved(done(1)), 1).0,
            Reply::PaymentCharged(done(1)),
            2,
        )
        .0,
        Reply::ShipmentScheduled(done(1)),
        3,
    );
    let abort = OperatorAction::Abort {
        reason: "customer called".into(),
    };
    assert!(matches!(
        completed.on_operator(&abort, at(4), &definition()),
        Decision::Ignored { .. }
    ));
    // The last step cannot be undone, so a saga waiting on it cannot be aborted.
    let (shipping, _) = apply(
        &apply(&running, Reply::StockReserved(done(1)), 1).0,
        Reply::PaymentCharged(done(1)),
        2,
    );
    match shipping.on_operator(&abort, at(3), &definition()) {
        Decision::Ignored { reason } => assert!(reason.contains("cannot be undone"), "{reason}"),
        Decision::Applied { .. } => panic!("aborting the last step must be refused"),
    }
}

#[test]
fn an_operator_abort_compensates_the_running_step_and_those_below() {
    let (saga, _) = apply(&started(), Reply::StockReserved(done(1)), 1);
    let abort = OperatorAction::Abort {
        reason: "customer called".into(),
    };
    let Decision::Applied { saga, effects } = saga.on_operator(&abort, at(2), &definition()) else {
        panic!("abort refused");
    };
    assert_eq!(saga.state, SagaState::Compensating);
    assert_eq!(
        saga.failure_reason.as_deref(),
        Some("charge_payment failed: aborted by operator: customer called")
    );
    // The charge may have happened: refund it (a no-op if it did not), then release.
    assert_eq!(sent(&effects), ["RefundPayment"]);
    let (saga, effects) = apply(&saga, Reply::PaymentRefunded(done(1)), 3);
    assert_eq!(sent(&effects), ["ReleaseStock"]);
    let (saga, _) = apply(&saga, Reply::StockReleased(done(1)), 4);
    assert_eq!(saga.state, SagaState::Compensated);
    assert_eq!(
        statuses(&saga),
        [
            StepStatus::Compensated,
            StepStatus::Compensated,
            StepStatus::Pending
        ]
    );
}

/// A pivot whose command never arrives (parked by the relay, dead-lettered, its participant
/// gone) is re-sent for ever. An operator may abandon it once a wait passed without an answer:
/// the saga is failed with who and why, and nothing is undone, since the pivot may have acted.
#[test]
fn an_unanswered_pivot_can_be_abandoned_by_an_operator_and_nothing_is_undone() {
    let (shipping, _) = apply(
        &apply(&started(), Reply::StockReserved(done(1)), 1).0,
        Reply::PaymentCharged(done(1)),
        2,
    );
    let abort = OperatorAction::Abort {
        reason: "shipping.commands was deleted".into(),
    };
    // Its first command may still be answered.
    match shipping.on_operator(&abort, at(3), &definition()) {
        Decision::Ignored { reason } => assert!(reason.contains("cannot be undone"), "{reason}"),
        Decision::Applied { .. } => panic!("a pivot within its first wait must not be abandoned"),
    }
    let (resent, effects) = at_deadline(&shipping);
    assert_eq!(sent(&effects), ["ScheduleShipment"]);
    assert_eq!(resent.steps[2].attempts, 2);

    let now = resent.deadline_at.expect("armed") - TimeDelta::milliseconds(1);
    let Decision::Applied { saga, effects } = resent.on_operator(&abort, now, &definition()) else {
        panic!("abandoning an unanswered pivot refused");
    };
    assert_eq!(saga.state, SagaState::Failed);
    assert_eq!(
        statuses(&saga),
        [
            StepStatus::Succeeded,
            StepStatus::Succeeded,
            StepStatus::Failed
        ],
        "nothing undone"
    );
    assert!(sent(&effects).is_empty(), "{effects:?}");
    let reason = saga.failure_reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("schedule_shipment abandoned by operator after 2 unanswered attempts")
            && reason.contains("shipping.commands was deleted")
            && reason.contains("outcome is unknown"),
        "{reason}"
    );
    assert!(matches!(
        &effects[..],
        [Effect::Publish(SagaEvent::SagaFailed { reason: published, .. })] if *published == reason
    ));
    assert_eq!((saga.deadline_at, saga.finished_at), (None, Some(now)));
    assert_eq!(saga.step_in_focus(), Some("schedule_shipment"));
    // A late answer moves nothing, but is what the operator settles by.
    assert_ignored(&saga, Reply::ShipmentScheduled(done(1)), "already failed");
    // Retry and skip are for stuck compensations; a deadline finds nothing to wait for.
    for action in [OperatorAction::Retry, OperatorAction::Skip, abort] {
        assert!(matches!(
            saga.on_operator(&action, at(59), &definition()),
            Decision::Ignored { .. }
        ));
    }
    assert!(matches!(
        saga.on_deadline(at(59), 0.0, &definition()),
        Decision::Ignored { .. }
    ));
}

#[test]
fn a_deadline_resends_the_command_with_the_next_attempt() {
    let saga = started();
    assert_first_wait(&saga, at(0), "the first wait");
    let first_deadline = saga.deadline_at.expect("armed");
    assert!(
        matches!(
            saga.on_deadline(at(0), 0.0, &definition()),
            Decision::Ignored { .. }
        ),
        "not due yet"
    );
    let (saga, effects) = at_deadline(&saga);
    assert_eq!(
        effects,
        [send(
            "inventory.commands",
            Command::ReserveStock {
                order_id: Uuid::from_u128(7),
                attempt: 2,
                items: order().items
            }
        )]
    );
    assert_eq!(saga.steps[0].attempts, 2);
    assert_eq!(
        saga.deadline_at,
        Some(first_deadline + TimeDelta::seconds(2)),
        "the second wait is twice the first (jitter 0 here)"
    );
    let (saga, _) = apply(&saga, Reply::StockReserved(done(2)), 2);
    assert_eq!(saga.steps[1].status, StepStatus::Running);
    assert_first_wait(&saga, at(2), "the next step arms its own deadline");
}

#[test]
fn a_postponed_deadline_waits_longer_without_a_new_attempt() {
    let saga = started();
    let due = saga.deadline_at.expect("armed");
    assert!(
        matches!(
            saga.postpone_deadline(at(0), TimeDelta::seconds(5), &definition()),
            Decision::Ignored { .. }
        ),
        "a deadline that has not passed is not postponed"
    );
    let Decision::Applied {
        saga: postponed,
        effects,
    } = saga.postpone_deadline(due, TimeDelta::seconds(5), &definition())
    else {
        panic!("a passed deadline is postponed");
    };
    assert!(effects.is_empty(), "nothing is sent again: {effects:?}");
    assert_eq!(postponed.deadline_at, Some(due + TimeDelta::seconds(5)));
    assert_eq!(postponed.steps, saga.steps, "no attempt is counted");
    assert_eq!(postponed.state, SagaState::Running);
    // The reply to the first attempt still answers the step.
    let (answered, effects) = apply(&postponed, Reply::StockReserved(done(1)), 2);
    assert_eq!(sent(&effects), ["ChargePayment"]);
    // When the wait runs out the deadline counts as ever: attempt 2.
    let (resent, effects) = at_deadline(&postponed);
    assert_eq!(sent(&effects), ["ReserveStock"]);
    assert_eq!(resent.steps[0].attempts, 2);
    // A saga that waits on nothing has nothing to postpone.
    let (done_saga, _) = apply(&answered, Reply::PaymentCharged(done(1)), 3);
    let (done_saga, _) = apply(&done_saga, Reply::ShipmentScheduled(done(1)), 4);
    assert!(matches!(
        done_saga.postpone_deadline(at(59), TimeDelta::seconds(5), &definition()),
        Decision::Ignored { .. }
    ));
}

#[test]
fn a_late_reply_to_an_earlier_attempt_answers_the_step() {
    // The reply to attempt 1 arrives after attempt 2 was sent: the ledger answers every attempt
    // alike, so it is the step's answer, and the reply to attempt 2 is then a duplicate.
    let (saga, _) = at_deadline(&started());
    let (saga, effects) = apply(&saga, Reply::StockReserved(done(1)), 2);
    assert_eq!(sent(&effects), ["ChargePayment"]);
    assert_ignored(
        &saga,
        Reply::StockReserved(done(2)),
        "waits on charge_payment",
    );
    // The same in the compensating direction.
    let (saga, _) = apply(&compensating_stock(), compensation_failed(1), 3);
    let (saga, _) = at_deadline(&saga);
    let (saga, _) = apply(&saga, Reply::StockReleased(done(1)), 6);
    assert_eq!(saga.state, SagaState::Compensated);
}

#[test]
fn sagas_started_together_do_not_time_out_together() {
    let deadlines: std::collections::BTreeSet<_> = (0..50)
        .map(|id| {
            let saga = Saga::start(Uuid::from_u128(id), trigger(), at(0), &definition())
                .expect("starts")
                .0;
            assert_first_wait(&saga, at(0), "every first wait is jittered");
            saga.deadline_at
        })
        .collect();
    assert!(
        deadlines.len() > 40,
        "{} distinct deadlines",
        deadlines.len()
    );
}

/// The first wait is one second (the policy's timeout) plus up to 25% jitter.
fn assert_first_wait(saga: &Saga, sent_at: DateTime<Utc>, why: &str) {
    let deadline = saga.deadline_at.expect("a deadline is armed");
    let waited = deadline - sent_at;
    assert!(
        waited >= TimeDelta::seconds(1) && waited <= TimeDelta::milliseconds(1_250),
        "{why}: waited {waited}"
    );
}

#[test]
fn a_step_that_never_answers_is_compensated_itself_then_the_steps_below() {
    let (mut saga, _) = apply(&started(), Reply::StockReserved(done(1)), 1);
    for attempt in 2..=3 {
        let (next, effects) = at_deadline(&saga);
        assert!(
            matches!(&effects[0], Effect::Send { command, .. } if matches!(
                Command::from_wire(command),
                Some(Command::ChargePayment { attempt: a, .. }) if a == attempt
            ))
        );
        saga = next;
    }
    let (saga, effects) = at_deadline(&saga);
    assert_eq!(saga.state, SagaState::Compensating);
    assert_eq!(saga.steps[1].status, StepStatus::Compensating);
    let reason = saga.failure_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("no reply after 3 attempts; outcome unknown"),
        "{reason}"
    );
    assert_eq!(
        sent(&effects),
        ["RefundPayment"],
        "the charge may have happened"
    );
    let (saga, effects) = apply(&saga, Reply::PaymentRefunded(done(1)), 30);
    assert_eq!(sent(&effects), ["ReleaseStock"]);
    let (saga, _) = apply(&saga, Reply::StockReleased(done(1)), 31);
    assert_eq!(saga.state, SagaState::Compensated);
}

#[test]
fn finished_sagas_have_no_deadline() {
    let (saga, _) = apply(&started(), Reply::StockUnavailable(refused("none")), 1);
    assert_eq!(saga.deadline_at, None);
    assert!(matches!(
        saga.on_deadline(at(59), 0.0, &definition()),
        Decision::Ignored { .. }
    ));
}

#[test]
fn a_duplicated_reply_moves_the_saga_once() {
    let (saga, _) = apply(&started(), Reply::StockReserved(done(1)), 1);
    assert_ignored(
        &saga,
        Reply::StockReserved(done(1)),
        "waits on charge_payment",
    );
}

#[test]
fn a_reply_to_another_attempt_is_fenced_off() {
    assert_ignored(&started(), Reply::StockReserved(done(2)), "attempt 2");
    assert_ignored(
        &started(),
        Reply::StockReserved(done(0)),
        "current attempts are 1 to 1",
    );
}

#[test]
fn replies_out_of_order_or_in_the_wrong_direction_are_ignored() {
    let saga = started();
    assert_ignored(
        &saga,
        Reply::PaymentCharged(done(1)),
        "waits on reserve_stock",
    );
    assert_ignored(&saga, Reply::StockReleased(done(1)), "Compensate");
    let (compensating, _) = apply(
        &apply(&saga, Reply::StockReserved(done(1)), 1).0,
        Reply::PaymentDeclined(refused("no")),
        2,
    );
    assert_ignored(&compensating, Reply::StockReserved(done(1)), "Forward");
}

#[test]
fn a_finished_saga_ignores_everything() {
    let (saga, _) = apply(&started(), Reply::StockUnavailable(refused("none")), 1);
    assert_ignored(&saga, Reply::StockReserved(done(1)), "already compensated");
    assert_ignored(&saga, Reply::StockReleased(done(1)), "already compensated");
}

#[test]
fn states_parse_from_their_names() {
    for state in SagaState::ALL {
        assert_eq!(SagaState::parse(state.as_str()), Some(state));
    }
    assert_eq!(SagaState::parse("Running"), None);
    assert!(SagaState::Failed.is_terminal() && !SagaState::Compensating.is_terminal());
}

#[test]
fn the_last_step_cannot_be_undone_so_it_is_retried_until_it_answers() {
    let (saga, _) = apply(&started(), Reply::StockReserved(done(1)), 1);
    let (mut saga, _) = apply(&saga, Reply::PaymentCharged(done(1)), 2);
    for _ in 0..6 {
        let (next, effects) = at_deadline(&saga);
        assert_eq!(sent(&effects), ["ScheduleShipment"]);
        saga = next;
    }
    assert_eq!(saga.state, SagaState::Running);
    assert_eq!(saga.steps[2].attempts, 7, "past the 3-attempt budget");
    let (saga, _) = apply(&saga, Reply::ShipmentScheduled(done(7)), 59);
    assert_eq!(saga.state, SagaState::Completed);
}

#[test]
fn a_reply_of_another_saga_type_or_under_another_name_is_ignored() {
    let ignored = |edit: fn(&mut events::Reply), reason_contains: &str| {
        let mut reply = Reply::StockReserved(done(1)).wire();
        edit(&mut reply);
        match started().on_reply(&reply, at(1), &definition()) {
            Decision::Ignored { reason } => assert!(
                reason.contains(reason_contains),
                "reason {reason:?} does not mention {reason_contains:?}"
            ),
            Decision::Applied { .. } => panic!("{reply:?} should have been ignored"),
        }
    };
    ignored(|r| r.saga_type = "loan".into(), "a loan saga");
    ignored(|r| r.name = "StockHeld".into(), "neither");
    // The success's name with a failed outcome, and the failure's with a success, answer
    // nothing.
    ignored(
        |r| {
            r.outcome = events::Outcome::Failed {
                reason: "no".into(),
            }
        },
        "StockReserved (failed)",
    );
    ignored(
        |r| r.name = "StockUnavailable".into(),
        "StockUnavailable (succeeded)",
    );
}
