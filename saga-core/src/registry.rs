//! The saga definitions one orchestrator runs: the newest version of each saga type, which new
//! sagas start on, and every older version a saga may still run on. Pure; the catalogue in
//! `crate::definitions` fills it from the files and the database.

use std::collections::BTreeMap;
use std::sync::Arc;

use events::{Command, Envelope};

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

    /// The definition that a record on `topic` (without the prefix) starts a saga of.
    pub fn for_topic(&self, topic: &str) -> Option<&Arc<SagaDefinition>> {
        self.newest.iter().find_map(|(name, version)| {
            self.get(name, *version)
                .filter(|d| d.trigger.topic == topic)
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

    /// The topics the sagas run on, without the prefix, each sorted and once: the trigger
    /// topics of the definitions new sagas start on, and the command topics of every known
    /// definition (a saga of an older version still sends its commands).
    pub fn topics(&self) -> (Vec<String>, Vec<String>) {
        let mut triggers: Vec<String> =
            self.newest_all().map(|d| d.trigger.topic.clone()).collect();
        let mut commands: Vec<String> = self
            .all()
            .flat_map(|d| d.steps.iter().map(|s| s.topic.clone()))
            .collect();
        for list in [&mut triggers, &mut commands] {
            list.sort();
            list.dedup();
        }
        (triggers, commands)
    }
}

/// Checks that every command of `definition` goes on the wire as the participants will read
/// it: each action's command, built from a sample trigger, must survive the participants'
/// decoder (names, key and replies within the wire's bounds). The definitions' own rules are
/// stricter today, so this guards the two against drifting apart; which steps and commands
/// exist is the definition's to say, and a participant refuses (dead-letters) a step it does
/// not serve.
fn check_wire(definition: &SagaDefinition) -> Result<(), DefinitionError> {
    for sample in definition.sample_commands()? {
        let sent = Envelope::new(
            uuid::Uuid::nil(),
            None,
            chrono::DateTime::UNIX_EPOCH,
            sample.command,
        )
        .to_json();
        Envelope::<Command>::from_json(&sent).map_err(|e| DefinitionError::Invalid {
            file: definition.file.clone(),
            field: sample.field,
            problem: Box::new(Problem::NotOnTheWire {
                detail: format!("a participant cannot read it: {e}"),
            }),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definitions::parse;

    const ORDER: &str = include_str!("../../sagas/order.toml");

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
    fn a_step_of_a_new_participant_needs_no_change_to_the_engine() {
        let registry = order_with(
            "[[steps]]\nname = \"schedule_shipment\"",
            "[[steps]]\nname = \"notify_customer\"\nparticipant = \"notifier\"\n\
             topic = \"notifier.commands\"\n\n[steps.forward]\naction = \"NotifyCustomer\"\n\
             payload = { customer = \"$.customer_id\" }\nsuccess = \"CustomerNotified\"\n\
             failure = \"NotificationRefused\"\n\
             retry = { timeout_ms = 1_000, max_attempts = 3, max_timeout_ms = 1_000 }\n\
             [steps.compensation]\naction = \"UnnotifyCustomer\"\npayload = {}\n\
             success = \"CustomerUnnotified\"\n\
             retry = { timeout_ms = 1_000, max_attempts = 3, max_timeout_ms = 1_000 }\n\n\
             [[steps]]\nname = \"schedule_shipment\"",
        )
        .expect("a fourth step with its own participant, commands and replies loads");
        let order = registry.newest("order").expect("order");
        let names: Vec<&str> = order.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "reserve_stock",
                "charge_payment",
                "notify_customer",
                "schedule_shipment"
            ]
        );
        let sample = crate::definitions::trigger_message("OrderPlaced")
            .and_then(|m| m.sample().ok())
            .expect("sample");
        let command = order
            .sample_commands()
            .expect("commands")
            .into_iter()
            .find(|c| c.step == 2 && c.command.action == events::Action::Forward)
            .expect("the third step's command")
            .command;
        assert_eq!(
            (command.name.as_str(), command.step.as_str()),
            ("NotifyCustomer", "notify_customer")
        );
        assert_eq!(command.replies.success, "CustomerNotified");
        assert_eq!(command.payload.get("customer"), sample.get("customer_id"));
    }

    #[test]
    fn a_command_the_participants_cannot_read_is_named() {
        // The definitions' rules keep names within the wire's bounds; a definition changed
        // after its validation (as one built in code could be) is still refused by name.
        let mut definition = parse("order.toml", ORDER).expect("parses");
        definition.steps[1].compensation =
            definition.steps[1].compensation.take().map(|mut action| {
                action.success = "Payment-Refunded".into();
                action
            });
        let error = Registry::new(vec![definition]).expect_err("refused");
        assert_eq!(error.field(), Some("steps[1].compensation"), "{error}");
        assert!(
            matches!(error.problem(), Some(Problem::NotOnTheWire { .. })),
            "{error}"
        );
        assert!(error.to_string().contains("replies.success"), "{error}");
    }
}
