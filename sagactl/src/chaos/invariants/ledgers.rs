//! The definition-driven invariant of a chaos run: each finished saga's steps agree with the
//! participants' step ledgers. The definitions say which participant (whose schema holds its
//! `step_ledger`) serves each step and which steps can be undone; nothing here names a saga
//! type, a step or a participant. The sagas and a participant's ledger may be in two
//! databases (--own-database): each is read with its own query, and they are joined here.

use std::collections::BTreeMap;

use saga_core::definitions::Step;
use saga_core::{SagaDefinition, SagaState, StepStatus};

use super::Databases;
use crate::deployment::{Deployment, ORCHESTRATOR};

/// What a participant's ledger remembers of one step of one saga (its row, when it has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The forward command's outcome: `Some(true)` succeeded, `Some(false)` refused, `None`
    /// when only the compensation arrived.
    pub succeeded: Option<bool>,
    pub compensated: bool,
}

impl LedgerEntry {
    /// The step acted and nothing undid it.
    fn standing(entry: Option<Self>) -> bool {
        entry.is_some_and(|e| e.succeeded == Some(true) && !e.compensated)
    }
}

/// Why one step of a `completed` or `compensated` saga disagrees with its participant's
/// ledger (`entry`), or `None` when it agrees. `compensable`: whether its definition gives it
/// a compensation.
///
/// The rules follow the state machine: a step marked succeeded got its participant's success,
/// which the ledger keeps; compensated, a compensation's success, which leaves a tombstone
/// (also for a step whose forward command never arrived: it compensates "nothing"); failed, in
/// a finished saga, a refusal (a step that timed out or was aborted is compensated, not left
/// failed); pending, no command at all. A compensated saga leaves no compensable step done and
/// standing; a completed one has every step done and standing. A step an operator skipped is
/// left as it is.
pub fn disagreement(
    state: SagaState,
    status: StepStatus,
    compensable: bool,
    entry: Option<LedgerEntry>,
) -> Option<&'static str> {
    let standing = LedgerEntry::standing(entry);
    if state == SagaState::Completed && status != StepStatus::Succeeded {
        return Some("a step of a completed saga did not succeed");
    }
    if state == SagaState::Compensated
        && compensable
        && standing
        && status != StepStatus::CompensationSkipped
    {
        return Some("done and never undone in a compensated saga");
    }
    match status {
        StepStatus::Succeeded if !standing => {
            Some("succeeded, but the ledger has no standing success")
        }
        StepStatus::Compensated if entry.is_none_or(|e| !e.compensated) => {
            Some("compensated, but the ledger has no compensation")
        }
        StepStatus::Failed if entry.is_none_or(|e| e.succeeded != Some(false)) => {
            Some("failed, but the ledger has no refusal")
        }
        StepStatus::Pending if entry.is_some() => Some("never sent, but the ledger has it"),
        StepStatus::Running | StepStatus::Compensating | StepStatus::CompensationFailed => {
            Some("still waited on in a finished saga")
        }
        _ => None,
    }
}

/// One saga's step: saga key, the step's name and status in the saga.
type StepRow = (String, Option<String>, Option<String>);

/// The outcome of the check over a whole run.
#[derive(Debug, Default)]
pub struct LedgerCheck {
    pub sagas: i64,
    pub steps: i64,
    /// Sagas with at least one step that disagrees (or that run on no known definition).
    pub broken: i64,
    /// Failed sagas, left to an operator: not checked.
    pub skipped: i64,
    /// A few of the disagreements, for the report.
    pub examples: Vec<String>,
}

impl LedgerCheck {
    const EXAMPLES: usize = 3;

    pub fn passed(&self) -> bool {
        self.broken == 0
    }

    pub fn describe(&self) -> String {
        let mut text = format!(
            "{} sagas checked over {} steps, {} break it ({} failed sagas left to an operator, not checked)",
            self.sagas, self.steps, self.broken, self.skipped
        );
        if !self.examples.is_empty() {
            text.push_str(&format!(": {}", self.examples.join("; ")));
        }
        text
    }

    fn example(&mut self, text: String) {
        if self.examples.len() < Self::EXAMPLES {
            self.examples.push(text);
        }
    }
}

/// Checks every completed and compensated saga of every type in `db`, step by step, against
/// the ledger of the participant its definition names for that step.
pub async fn check(db: &Databases, deployment: &Deployment) -> anyhow::Result<LedgerCheck> {
    let mut result = LedgerCheck::default();
    // Sagas run on the version they started on: read each version's own definition.
    let versions: Vec<(String, i32, String, i64)> = sqlx::query_as(&format!(
        "SELECT definition_name, definition_version, state::text, count(*) \
         FROM {ORCHESTRATOR}.sagas GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ))
    .fetch_all(db.orchestrator())
    .await?;
    let mut broken_keys = BrokenKeys::new();
    for (name, version, state, sagas) in versions {
        let Some(state) = SagaState::parse(&state) else {
            anyhow::bail!("orchestrator.sagas has a state this build does not know: {state}");
        };
        match state {
            SagaState::Completed | SagaState::Compensated => {}
            SagaState::Failed => {
                result.skipped += sagas;
                continue;
            }
            // The other checks report unfinished sagas.
            SagaState::Running | SagaState::Compensating => continue,
        }
        result.sagas += sagas;
        let Some(definition) = deployment.registry.get(&name, version) else {
            result.broken += sagas;
            result.example(format!(
                "{sagas} {} sagas of {name} v{version}, which the definitions do not have",
                state.as_str()
            ));
            continue;
        };
        let group = Group {
            name: &name,
            version,
            state,
        };
        group
            .check(db, definition, &mut result, &mut broken_keys)
            .await?;
    }
    result.broken += i64::try_from(broken_keys.len())?;
    Ok(result)
}

/// The sagas of one definition version in one finished state.
struct Group<'a> {
    name: &'a str,
    version: i32,
    state: SagaState,
}

/// A saga broken (by its type and key), counted once however many of its steps disagree.
type BrokenKeys = std::collections::BTreeSet<(String, String)>;

impl Group<'_> {
    /// Checks the group's sagas against `definition`: their steps are its steps, and each
    /// step agrees with its participant's ledger.
    async fn check(
        &self,
        db: &Databases,
        definition: &SagaDefinition,
        result: &mut LedgerCheck,
        broken_keys: &mut BrokenKeys,
    ) -> anyhow::Result<()> {
        let steps_differ: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT saga_key FROM {ORCHESTRATOR}.sagas \
             WHERE definition_name = $1 AND definition_version = $2 AND state::text = $3 \
               AND (jsonb_typeof(steps) IS DISTINCT FROM 'array' OR jsonb_array_length(steps) <> $4)"
        ))
        .bind(self.name)
        .bind(self.version)
        .bind(self.state.as_str())
        .bind(i32::try_from(definition.steps.len())?)
        .fetch_all(db.orchestrator())
        .await?;
        for key in steps_differ {
            result.example(format!(
                "{} {key}: its steps are not its definition's",
                self.name
            ));
            broken_keys.insert((self.name.to_owned(), key));
        }
        for (index, step) in definition.steps.iter().enumerate() {
            self.check_step(db, index, step, result, broken_keys)
                .await?;
        }
        Ok(())
    }

    /// Checks step `index` of the group's sagas against the ledger of its participant.
    async fn check_step(
        &self,
        db: &Databases,
        index: usize,
        step: &Step,
        result: &mut LedgerCheck,
        broken_keys: &mut BrokenKeys,
    ) -> anyhow::Result<()> {
        let (name, state) = (self.name, self.state);
        let rows: Vec<StepRow> = sqlx::query_as(&format!(
            "SELECT saga_key, steps -> $4 ->> 'name', steps -> $4 ->> 'status' \
             FROM {ORCHESTRATOR}.sagas \
             WHERE definition_name = $1 AND definition_version = $2 AND state::text = $3"
        ))
        .bind(name)
        .bind(self.version)
        .bind(state.as_str())
        .bind(i32::try_from(index)?)
        .fetch_all(db.orchestrator())
        .await?;
        let keys: Vec<&str> = rows.iter().map(|(key, _, _)| key.as_str()).collect();
        // The participant's schema, in its database, holds its ledger: one row per saga and
        // step at most (its primary key).
        let ledger: Vec<(String, Option<String>, bool)> = sqlx::query_as(&format!(
            "SELECT saga_key, forward_outcome::text, compensated_at IS NOT NULL \
             FROM {participant}.step_ledger WHERE step = $1 AND saga_key = ANY($2)",
            participant = step.participant
        ))
        .bind(&step.name)
        .bind(&keys)
        .fetch_all(db.of(&step.participant))
        .await?;
        let ledger: BTreeMap<String, LedgerEntry> = ledger
            .into_iter()
            .map(|(key, outcome, compensated)| {
                let entry = LedgerEntry {
                    succeeded: outcome.map(|o| o == "succeeded"),
                    compensated,
                };
                (key, entry)
            })
            .collect();
        for (key, step_name, status) in rows {
            result.steps += 1;
            let status = status.and_then(|s| serde_json::from_value(s.into()).ok());
            let why = match (step_name, status) {
                (Some(n), Some(status)) if n == step.name => {
                    let entry = ledger.get(&key).copied();
                    disagreement(state, status, step.compensable(), entry)
                }
                _ => Some("the saga's step is not its definition's, or has no status"),
            };
            if let Some(why) = why {
                result.example(format!(
                    "{} {name} {key}, step {} ({}): {why}",
                    state.as_str(),
                    step.name,
                    step.participant
                ));
                broken_keys.insert((name.to_owned(), key));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DONE: Option<LedgerEntry> = Some(LedgerEntry {
        succeeded: Some(true),
        compensated: false,
    });
    const UNDONE: Option<LedgerEntry> = Some(LedgerEntry {
        succeeded: Some(true),
        compensated: true,
    });
    const REFUSED: Option<LedgerEntry> = Some(LedgerEntry {
        succeeded: Some(false),
        compensated: false,
    });
    /// The compensation arrived before (or instead of) the forward command.
    const TOMBSTONE: Option<LedgerEntry> = Some(LedgerEntry {
        succeeded: None,
        compensated: true,
    });

    #[test]
    fn a_completed_saga_has_every_step_done_and_standing() {
        let completed = |status, entry| disagreement(SagaState::Completed, status, true, entry);
        assert_eq!(completed(StepStatus::Succeeded, DONE), None);
        assert!(completed(StepStatus::Succeeded, UNDONE).is_some());
        assert!(completed(StepStatus::Succeeded, REFUSED).is_some());
        assert!(completed(StepStatus::Succeeded, None).is_some());
        assert!(completed(StepStatus::Compensated, UNDONE).is_some());
    }

    #[test]
    fn a_compensated_saga_leaves_nothing_compensable_standing() {
        let compensated = |status, compensable, entry| {
            disagreement(SagaState::Compensated, status, compensable, entry)
        };
        // Undone, whether the step had acted, was refused late, or never arrived.
        assert_eq!(compensated(StepStatus::Compensated, true, UNDONE), None);
        assert_eq!(compensated(StepStatus::Compensated, true, TOMBSTONE), None);
        assert!(compensated(StepStatus::Compensated, true, DONE).is_some());
        assert!(compensated(StepStatus::Compensated, true, None).is_some());
        // The refused step, and the steps never sent.
        assert_eq!(compensated(StepStatus::Failed, false, REFUSED), None);
        assert!(compensated(StepStatus::Failed, true, DONE).is_some());
        assert_eq!(compensated(StepStatus::Pending, true, None), None);
        assert!(compensated(StepStatus::Pending, false, DONE).is_some());
        // A step that cannot be undone may stand; one that can may not.
        assert_eq!(compensated(StepStatus::Succeeded, false, DONE), None);
        assert!(compensated(StepStatus::Succeeded, true, DONE).is_some());
        // What an operator skipped stays as it is.
        assert_eq!(
            compensated(StepStatus::CompensationSkipped, true, DONE),
            None
        );
        assert!(compensated(StepStatus::Compensating, true, UNDONE).is_some());
    }
}
