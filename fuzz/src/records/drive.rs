//! The end of every input: each saga, of every type, is driven to its end twice, once by
//! participants that answer every command (and an operator for a failed one), once by deadlines
//! alone. Nothing may wedge a saga.

use events::Reply;
use saga_core::oracle::{self, Cause};
use saga_core::{OperatorAction, SagaState, StepStatus};
use uuid::Uuid;

use super::world::World;

impl World {
    /// The stored row of `id` is a saga of its type and key, its version at least one per
    /// command sent after the first.
    pub fn check_row(&self, id: Uuid) {
        let row = &self.rows[&id];
        oracle::check_saga(&row.saga, &self.definition_of(&row.saga));
        let key = (row.saga.definition_name.clone(), row.saga.key.clone());
        assert_eq!(self.by_key.get(&key), Some(&id));
        assert!(row.version >= i64::try_from(row.sent.len()).unwrap_or(i64::MAX) - 1);
    }

    /// Participants that answer every command: every saga ends completed or compensated,
    /// failed ones after an operator's retry or skip.
    pub fn drive_by_answers(&self, id: Uuid) {
        let mut row = self.rows[&id].clone();
        let definition = self.definition_of(&row.saga);
        let now = self.now;
        for round in 0..32 {
            let saga = &row.saga;
            let (decision, action, reply);
            let cause = match saga.state {
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
                    action = if round % 2 == 0 {
                        OperatorAction::Retry
                    } else {
                        OperatorAction::Skip
                    };
                    decision = saga.on_operator(&action, now, &definition);
                    Cause::Operator(&action)
                }
                SagaState::Running | SagaState::Compensating => {
                    // The last command sent is the one the saga waits for.
                    let command = row.sent.last().expect("a saga sent something");
                    reply = Reply::succeeded(command);
                    decision = saga.on_reply(&reply, now, &definition);
                    Cause::Reply(&reply)
                }
            };
            assert!(
                oracle::applies(saga, &cause, now, &definition),
                "{cause:?} does not move {saga:#?}"
            );
            row.commit(decision, &cause, now, &definition);
        }
        panic!(
            "answering every command did not end the saga: {:#?}",
            row.saga
        );
    }

    /// Participants that never answer: deadlines alone end every saga (compensated or
    /// failed), except one waiting on a step that cannot be undone, which is retried forever.
    pub fn drive_by_deadlines(&self, id: Uuid) {
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
            let Some((i, _)) = oracle::waiting_on(saga) else {
                return;
            };
            if saga.state == SagaState::Running
                && !definition.steps[i].compensable()
                && saga.steps[i].attempts > budget + 2
            {
                return;
            }
            now = now.max(saga.deadline_at.expect("a waiting saga has a deadline"));
            let decision = saga.on_deadline(now, 0.5, &definition);
            assert!(oracle::applies(saga, &Cause::Deadline, now, &definition));
            row.commit(decision, &Cause::Deadline, now, &definition);
        }
        panic!("deadlines did not end the saga: {:#?}", row.saga);
    }
}
