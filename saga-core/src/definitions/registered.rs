//! What the repository says of its saga types outside `sagas/`, checked against the
//! definitions: the published wire contract (`events/contract/asyncapi.json`) and the compose
//! files. A saga type or a step added to `sagas/` without them fails here, naming the file to
//! change and what it lacks. (The scripts, the Dockerfile and the ACL plan derive their lists
//! of services and topics from the definitions, so they need no check.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{load_dir, SagaDefinition, ENGINE_TOPICS};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn definitions() -> Vec<SagaDefinition> {
    load_dir(&repository().join("sagas")).expect("sagas/ loads")
}

/// Every message the document puts on the topic `topic` (without the prefix).
fn documented_messages(asyncapi: &Value, topic: &str) -> BTreeSet<String> {
    let address = format!("{{prefix}}{topic}");
    asyncapi["channels"]
        .as_object()
        .expect("the document's channels")
        .values()
        .filter(|channel| channel["address"] == address.as_str())
        .filter_map(|channel| channel["messages"].as_object())
        .flat_map(|messages| messages.keys().cloned())
        .collect()
}

#[test]
fn the_asyncapi_document_has_every_topic_and_message_of_the_definitions() {
    let path = repository().join("events/contract/asyncapi.json");
    let text = std::fs::read_to_string(&path).expect("reading asyncapi.json");
    let asyncapi: Value = serde_json::from_str(&text).expect("asyncapi.json is JSON");
    let components = asyncapi["components"]["messages"]
        .as_object()
        .expect("components.messages");

    // (topic, message) pairs the definitions put on the wire.
    let mut expected: Vec<(String, String)> = Vec::new();
    for definition in definitions() {
        let trigger = &definition.trigger;
        expected.push((trigger.topic.clone(), trigger.message.clone()));
        for step in &definition.steps {
            for action in std::iter::once(&step.forward).chain(&step.compensation) {
                expected.push((step.topic.clone(), action.name.clone()));
                let replies = std::iter::once(&action.success).chain(&action.failure);
                expected.extend(replies.map(|reply| (ENGINE_TOPICS[0].to_owned(), reply.clone())));
            }
        }
    }
    let missing: Vec<String> = expected
        .iter()
        .filter(|(topic, message)| {
            !documented_messages(&asyncapi, topic).contains(message)
                || !components.contains_key(message)
        })
        .map(|(topic, message)| format!("{message} on {topic}"))
        .collect();
    assert!(
        missing.is_empty(),
        "events/contract/asyncapi.json lacks what sagas/ puts on the wire (a channel with the \
         message, and the message under components.messages): {missing:?}"
    );
}

#[test]
fn each_compose_file_runs_every_participant_of_the_definitions() {
    let definitions = definitions();
    let services: BTreeSet<&str> = definitions
        .iter()
        .flat_map(|d| d.steps.iter().map(|s| s.participant.as_str()))
        .chain(["orchestrator"])
        .collect();
    for file in ["docker-compose.yml", "docker-compose.secured.yml"] {
        let text = std::fs::read_to_string(repository().join(file)).expect("a compose file");
        let commands: BTreeSet<&str> = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("command:"))
            .map(str::trim)
            .collect();
        let missing: Vec<&&str> = services
            .iter()
            .filter(|service| !commands.contains(**service))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} runs no service with `command: NAME` for {missing:?}"
        );
    }
}
