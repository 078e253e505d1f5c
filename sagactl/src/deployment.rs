//! What a chaos run deploys, read from the saga definitions (`sagas/*.toml`, by the
//! orchestrator's own parser): the services it starts and kills, the topics it fills with
//! garbage, and the step each participant's ledger answers for. A saga type or participant
//! added to the definitions is in the next run without a change here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use saga_core::definitions::{self, SagaDefinition};
use saga_core::Registry;

/// The orchestrator's service name: its binary, consumer group and schema.
pub const ORCHESTRATOR: &str = "orchestrator";

/// One participant a definition names: its name is its binary, its consumer group (after the
/// topic prefix) and its database schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    pub name: String,
    /// Its command topic, without the prefix (one per participant: the loader checks it).
    pub topic: String,
}

#[derive(Debug, Clone)]
pub struct Deployment {
    pub registry: Registry,
    /// Every participant some definition names, by name.
    pub participants: Vec<Participant>,
}

impl Deployment {
    /// The participants' names, comma-separated, for a message that names them.
    pub fn participant_names(&self) -> String {
        self.participants
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The definitions in `dir`, validated as the orchestrator validates them at start-up.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let files = definitions::load_dir(dir)
            .with_context(|| format!("reading the saga definitions in {}", dir.display()))?;
        let registry = Registry::new(files)
            .with_context(|| format!("checking the saga definitions in {}", dir.display()))?;
        let participants: BTreeMap<&str, &str> = registry
            .all()
            .flat_map(|d| &d.steps)
            .map(|s| (s.participant.as_str(), s.topic.as_str()))
            .collect();
        let participants = participants
            .into_iter()
            .map(|(name, topic)| Participant {
                name: name.to_owned(),
                topic: topic.to_owned(),
            })
            .collect();
        Ok(Self {
            registry,
            participants,
        })
    }

    /// The definitions new sagas start on, by name.
    pub fn sagas(&self) -> impl Iterator<Item = &Arc<SagaDefinition>> {
        self.registry.newest_all()
    }

    /// The newest definition of the saga type `name`, which the run's workload needs.
    pub fn saga(&self, name: &str) -> anyhow::Result<&Arc<SagaDefinition>> {
        self.registry
            .newest(name)
            .with_context(|| format!("the saga definitions have no saga type {name}"))
    }

    /// Every service: the orchestrator, then the participants. Each is a binary, a consumer
    /// group and a schema of that name.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        std::iter::once(ORCHESTRATOR).chain(self.participants.iter().map(|p| p.name.as_str()))
    }

    /// The topics the sagas run on, without the prefix: every trigger topic and every
    /// participant's command topic.
    pub fn saga_topics(&self) -> Vec<String> {
        let (triggers, commands) = self.registry.topics();
        triggers.into_iter().chain(commands).collect()
    }

    /// The message types that start a saga.
    pub fn trigger_messages(&self) -> Vec<String> {
        self.sagas().map(|d| d.trigger.message.clone()).collect()
    }
}

/// A valid trigger of `saga` whose key is `key`: its trigger message's sample (its schema's
/// first example) with `key` at the definition's `trigger.key`. What the chaos suite's garbage
/// and the conformance kit build their commands from, as the orchestrator builds them.
pub fn keyed_trigger(saga: &SagaDefinition, key: &str) -> serde_json::Value {
    let mut message = saga_core::definitions::trigger_message(&saga.trigger.message)
        .and_then(|m| m.sample().ok())
        .unwrap_or_default();
    let segments: Vec<&str> = saga.trigger.key.segments().collect();
    if let Some((last, parents)) = segments.split_last() {
        let parent = parents
            .iter()
            .try_fold(&mut message, |value, segment| value.get_mut(*segment));
        if let Some(serde_json::Value::Object(fields)) = parent {
            fields.insert((*last).to_owned(), key.into());
        }
    }
    message
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// The repository's definitions.
    pub fn repository() -> Deployment {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sagas");
        match Deployment::load(&dir) {
            Ok(deployment) => deployment,
            Err(e) => panic!("{e:#}"),
        }
    }

    #[test]
    fn the_repository_deploys_what_its_definitions_name() {
        let deployment = repository();
        let services: Vec<&str> = deployment.services().collect();
        assert_eq!(
            services,
            [
                "orchestrator",
                "inventory",
                "payment",
                "returns",
                "shipping"
            ]
        );
        assert_eq!(
            deployment.saga_topics(),
            [
                "orders",
                "returns",
                "inventory.commands",
                "payment.commands",
                "returns.commands",
                "shipping.commands"
            ]
        );
        assert_eq!(
            deployment.trigger_messages(),
            ["OrderPlaced", "ReturnRequested"]
        );
    }
}
