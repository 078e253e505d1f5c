//! The saga definitions one orchestrator runs: the newest version of each saga type, which new
//! sagas start on, and every older version a saga may still run on. Pure; the catalogue in
//! `crate::definitions` fills it from the files and the database.

use std::collections::BTreeMap;
use std::sync::Arc;

use events::{Action, Command, Reply, StepName};
use serde_json::Value;

use super::definitions::{DefinitionError, Problem, SagaDefinition};

/// Definitions by name and version.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    by_version: BTreeMap<(String, i32), Arc<SagaDefinition>>,
    /// The version new sagas of each type start on: the newest one a file holds.
    newest: BTreeMap<String, i32>,
}

impl Registry {
    /// `files`, the definitions deployed now; the newest version of each name is the one new
    /// sagas start on. Each is checked against the wire contract.
    ///
    /// # Errors
    /// The first definition that the participants could not follow, naming its file and field.
    pub fn new(files: Vec<SagaDefinition>) -> Result<Self, DefinitionError> {
        let mut registry = Self::default();
        for definition in files {
            let newest = registry
                .newest
                .entry(definition.name.clone())
                .or_insert(definition.version);
            *newest = (*newest).max(definition.version);
            registry.add(definition)?;
        }
        Ok(registry)
    }

    /// Adds a version that sagas may still run on (read back from the database). A version
    /// already known stays as it is.
    ///
    /// # Errors
    /// As [`Registry::new`].
    pub fn add(
        &mut self,
        definition: SagaDefinition,
    ) -> Result<Arc<SagaDefinition>, DefinitionError> {
        let key = (definition.name.clone(), definition.version);
        if let Some(known) = self.by_version.get(&key) {
            return Ok(Arc::clone(known));
        }
        check_wire(&definition)?;
        let definition = Arc::new(definition);
        self.by_version.insert(key, Arc::clone(&definition));
        Ok(definition)
    }

    pub fn get(&self, name: &str, version: i32) -> Option<&Arc<SagaDefinition>> {
        self.by_version.get(&(name.to_owned(), version))
    }

    /// The definition that a `message` on `topic` (without the prefix) starts a saga of.
    pub fn for_trigger(&self, topic: &str, message: &str) -> Option<&Arc<SagaDefinition>> {
        self.newest.iter().find_map(|(name, version)| {
            self.get(name, *version)
                .filter(|d| d.trigger.topic == topic && d.trigger.message == message)
        })
    }

    /// The version new sagas of `name` start on.
    pub fn newest(&self, name: &str) -> Option<&Arc<SagaDefinition>> {
        self.newest.get(name).and_then(|v| self.get(name, *v))
    }

    /// Every known definition, by name and version.
    pub fn all(&self) -> impl Iterator<Item = &Arc<SagaDefinition>> {
        self.by_version.values()
    }

    /// The definitions new sagas start on.
    pub fn newest_all(&self) -> impl Iterator<Item = &Arc<SagaDefinition>> {
        self.newest
            .iter()
            .filter_map(|(name, v)| self.get(name, *v))
    }
}

/// A trigger message with every field the trigger shapes know, for building each command once
/// at load time.
fn sample_trigger(message: &str) -> Option<Value> {
    (message == events::OrderPlaced::TYPE_NAME).then(|| {
        serde_json::json!({
            "order_id": "00000000-0000-4000-8000-000000000001",
            "customer_id": "c",
            "items": [{ "sku": "s", "quantity": 1, "unit_price_cents": 1 }],
            "total_cents": 1,
            "currency": "EUR",
            "shipping_address": { "country": "DE", "city": "c", "line1": "l", "postal_code": "p" }
        })
    })
}

/// Checks that the participants can follow `definition`: every step and action is one the
/// wire contract (`events`) names, every payload makes that command, and every reply name is
/// a reply. Until commands and replies are generic (issue 13), a definition can only arrange
/// the steps the participants know.
fn check_wire(definition: &SagaDefinition) -> Result<(), DefinitionError> {
    let invalid = |field: String, detail: String| DefinitionError::Invalid {
        file: definition.file.clone(),
        field,
        problem: Box::new(Problem::NotOnTheWire { detail }),
    };
    let sample = sample_trigger(&definition.trigger.message).ok_or_else(|| {
        invalid(
            "trigger.message".into(),
            format!("no sample of {}", definition.trigger.message),
        )
    })?;
    for (i, step) in definition.steps.iter().enumerate() {
        let Some(step_name) = StepName::parse(&step.name) else {
            return Err(invalid(
                format!("steps[{i}].name"),
                format!(
                    "replies name their step, and no reply names {:?}; known: {}",
                    step.name,
                    StepName::ALL.map(StepName::as_str).join(", ")
                ),
            ));
        };
        let actions = [(Action::Forward, "forward", Some(&step.forward))]
            .into_iter()
            .chain([(
                Action::Compensate,
                "compensation",
                step.compensation.as_ref(),
            )]);
        for (direction, at, action) in actions {
            let Some(action) = action else { continue };
            let at = format!("steps[{i}].{at}");
            if !Command::TYPE_NAMES.contains(&action.name.as_str()) {
                return Err(invalid(
                    format!("{at}.action"),
                    format!(
                        "no participant knows the command {:?}; known: {}",
                        action.name,
                        Command::TYPE_NAMES.join(", ")
                    ),
                ));
            }
            let command = action
                .command(&sample, 1)
                .map_err(|e| invalid(format!("{at}.payload"), e.to_string()))?;
            if command.step() != step_name || command.action() != direction {
                return Err(invalid(
                    format!("{at}.action"),
                    format!(
                        "{} is the {:?} action of step {}, not the {direction:?} action of {}",
                        action.name,
                        command.action(),
                        command.step().as_str(),
                        step.name
                    ),
                ));
            }
            let replies = [
                ("success", Some(&action.success)),
                ("failure", action.failure.as_ref()),
            ];
            for (field, reply) in replies {
                if let Some(reply) = reply.filter(|r| !Reply::TYPE_NAMES.contains(&r.as_str())) {
                    return Err(invalid(
                        format!("{at}.{field}"),
                        format!(
                            "no participant sends the reply {reply:?}; known: {}",
                            Reply::TYPE_NAMES.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::definitions::parse;

    const ORDER: &str = include_str!("../../../sagas/order.toml");

    fn order_with(from: &str, to: &str) -> Result<Registry, DefinitionError> {
        Registry::new(vec![parse("order.toml", &ORDER.replacen(from, to, 1))?])
    }

    #[test]
    fn the_order_saga_is_on_the_wire() {
        let registry = order_with("", "").expect("loads");
        let order = registry
            .for_trigger("orders", "OrderPlaced")
            .expect("trigger");
        assert_eq!((order.name.as_str(), order.version), ("order", 1));
        assert!(registry.for_trigger("orders", "Other").is_none());
    }

    #[test]
    fn the_newest_file_version_starts_sagas_and_older_ones_stay() {
        let v1 = parse("v1.toml", ORDER).expect("v1");
        let v2 = parse("v2.toml", &ORDER.replacen("version = 1", "version = 2", 1)).expect("v2");
        let mut registry = Registry::new(vec![v2]).expect("v2 loads");
        registry.add(v1).expect("v1 loads");
        assert_eq!(registry.newest("order").map(|d| d.version), Some(2));
        assert!(registry.get("order", 1).is_some());
        assert_eq!(registry.all().count(), 2);
        assert_eq!(registry.newest_all().count(), 1);
    }

    #[test]
    fn what_the_participants_do_not_know_is_named() {
        for (from, to, field) in [
            (
                "name = \"reserve_stock\"",
                "name = \"reserve\"",
                "steps[0].name",
            ),
            (
                "action = \"ReserveStock\"",
                "action = \"ReserveStuff\"",
                "steps[0].forward.action",
            ),
            (
                "success = \"StockReserved\"",
                "success = \"StockHeld\"",
                "steps[0].forward.success",
            ),
            (
                "payload = { order_id = \"$.order_id\", items = \"$.items\" }",
                "payload = { order_id = \"$.order_id\" }",
                "steps[0].forward.payload",
            ),
        ] {
            let error = order_with(from, to).expect_err(to);
            assert_eq!(error.field(), Some(field), "{error}");
            assert!(
                matches!(error.problem(), Some(Problem::NotOnTheWire { .. })),
                "{error}"
            );
        }
    }
}
