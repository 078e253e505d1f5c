//! Consumer-driven contract tests: the orchestrator's expectations of a participant and a
//! participant's of the orchestrator, both checked against the one published contract
//! (`events/contract/asyncapi.json` and its JSON Schemas), so that a change to either side
//! that would break the other fails here.
//!
//! - The orchestrator as producer: every command the saga definitions (`sagas/*.toml`) can
//!   make, found by driving the saga state machine through every reply and deadline, is a
//!   message of its step's command channel that its schema accepts.
//! - A participant as consumer: every command the contract allows (the document's examples,
//!   with fields added that a reader must ignore) and every command the definitions make is
//!   one its Rust participant reads (`Participant::read_command`, the runtime's own decoding).
//! - A participant as producer: every reply the runtime can answer those commands with
//!   (`participant_sdk::reply_envelope` around `events::Reply::succeeded`/`failed`) is a
//!   message of `saga.replies` that its schema accepts, answering its command.
//! - The orchestrator as consumer: every reply the contract allows (the examples, with added
//!   fields) is one its decoder reads (`Envelope::<Reply>::from_json`, which the orchestrator's
//!   reply handler calls).
//!
//! This lives in `participants` (not `events`) because it needs both sides: the saga core's
//! definitions and state machine, and the participants' decoders; `events` is below both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use events::{Command, Envelope, Reply};
use participant_sdk::Participant;
use participants::shipping::ShippingConfig;
use participants::{inventory, payment, returns, shipping};
use saga_core::definitions::{load_dir, trigger_message};
use saga_core::{Decision, Effect, Saga, SagaDefinition};
use serde_json::Value;
use uuid::Uuid;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn contract_dir() -> PathBuf {
    repository().join("events/contract")
}

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The published contract: the AsyncAPI document and a validator per schema it names.
struct Contract {
    document: Value,
    validators: BTreeMap<String, events::schemas::Validator>,
}

impl Contract {
    fn load() -> Self {
        Self {
            document: read_json(&contract_dir().join("asyncapi.json")),
            validators: BTreeMap::new(),
        }
    }

    /// The problems `message` has against the schema file `schema` (relative to `contract/`).
    fn problems(&mut self, schema: &str, message: &Value) -> Vec<String> {
        let validator = self.validators.entry(schema.to_owned()).or_insert_with(|| {
            events::schemas::compile(&read_json(&contract_dir().join(schema)), |name| {
                Ok(std::fs::read_to_string(
                    contract_dir().join("schemas").join(name),
                )?)
            })
            .unwrap_or_else(|e| panic!("{schema} does not compile: {e}"))
        });
        validator
            .iter_errors(message)
            .map(|e| format!("{schema}: {e} at {}", e.instance_path()))
            .collect()
    }

    /// The channel whose address is `topic` (without the prefix).
    fn channel(&self, topic: &str) -> Option<(&str, &Value)> {
        let address = format!("{{prefix}}{topic}");
        self.document["channels"]
            .as_object()?
            .iter()
            .find(|(_, c)| c["address"] == address.as_str())
            .map(|(name, c)| (name.as_str(), c))
    }

    /// The names of the messages `channel` carries.
    fn messages_of(channel: &Value) -> Vec<String> {
        channel["messages"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The problems of `message` (a JSON message named by its `type`) on the channel of
    /// `topic`: it must be one of the channel's messages, and the generic schema (`Command` or
    /// `Reply`) and its own must accept it.
    fn check_on(&mut self, topic: &str, generic: &str, message: &Value) -> Vec<String> {
        let name = message["type"].as_str().unwrap_or_default().to_owned();
        let Some((channel_name, channel)) = self.channel(topic) else {
            return vec![format!("no channel for topic {topic}")];
        };
        if !Self::messages_of(channel).contains(&name) {
            return vec![format!("{name} is no message of channel {channel_name}")];
        }
        let schema = self.document["components"]["messages"][&name]["payload"]["schema"]["$ref"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut problems = self.problems(&format!("schemas/{generic}.schema.json"), message);
        problems.extend(self.problems(&schema, message));
        problems
    }
}

/// The repository's Rust participant that reads `topic` (`<participant>.commands`).
fn participant_of(topic: &str) -> Option<Participant> {
    match topic.strip_suffix(".commands")? {
        "inventory" => Some(inventory::participant()),
        "payment" => Some(payment::participant()),
        "shipping" => Some(shipping::participant(&ShippingConfig::default())),
        "returns" => Some(returns::participant()),
        _ => None,
    }
}

fn definitions() -> Vec<SagaDefinition> {
    load_dir(&repository().join("sagas")).expect("sagas/ loads")
}

/// One command as the orchestrator puts it on the wire, with the topic it goes to.
struct Sent {
    topic: String,
    envelope: Envelope<Command>,
}

/// Every command the saga state machine makes for `definition`, started by the trigger
/// message's sample: it answers each command it sends with its success and its failure reply
/// (where it names one), and lets each deadline pass once per path, until every saga ends.
fn commands_of(definition: &SagaDefinition) -> Vec<Sent> {
    let now = DateTime::<Utc>::from_timestamp(1_795_694_400, 0).unwrap_or_default();
    let trigger = trigger_message(&definition.trigger.message)
        .and_then(|m| m.sample().ok())
        .unwrap_or_else(|| panic!("no sample of {}", definition.trigger.message));
    let (saga, effects) =
        Saga::start(Uuid::new_v4(), trigger, now, definition).expect("the sample starts a saga");
    let mut sent = Vec::new();
    let mut seen: Vec<Saga> = Vec::new();
    // (saga, the commands it just sent, whether a deadline passed on this path)
    let mut queue = vec![(saga, effects, None::<Uuid>, false)];
    while let Some((saga, effects, causation, deadline_passed)) = queue.pop() {
        if seen.contains(&saga) || seen.len() > 5_000 {
            continue;
        }
        seen.push(saga.clone());
        let mut moves: Vec<(Decision, Option<Uuid>, bool)> = Vec::new();
        for effect in effects {
            let Effect::Send { topic, command } = effect else {
                continue;
            };
            // As the orchestrator's handler wraps it (`emit`).
            let envelope = Envelope::new(saga.id, causation, saga.updated_at, command);
            let command = &envelope.body;
            let mut replies = vec![Reply::succeeded(command)];
            replies.extend(Reply::failed(command, "refused by the contract test"));
            for reply in replies {
                let id = Uuid::new_v4();
                moves.push((saga.on_reply(&reply, now, definition), Some(id), false));
            }
            sent.push(Sent { topic, envelope });
        }
        if !deadline_passed {
            let later = now + chrono::Duration::days(1);
            moves.push((saga.on_deadline(later, 0.5, definition), None, true));
        }
        for (decision, causation, by_deadline) in moves {
            if let Decision::Applied {
                saga: next,
                effects,
            } = decision
            {
                queue.push((*next, effects, causation, deadline_passed || by_deadline));
            }
        }
    }
    sent
}

/// Every command of every definition, checked to reach a participant at all.
fn every_command() -> Vec<Sent> {
    let sent: Vec<Sent> = definitions().iter().flat_map(commands_of).collect();
    assert!(
        sent.iter().any(|s| s.envelope.body.attempt > 1),
        "no re-sent command was made"
    );
    assert!(
        sent.iter()
            .any(|s| s.envelope.body.action == events::Action::Compensate),
        "no compensation was made"
    );
    sent
}

/// `message` with fields a reader must ignore: beside the envelope's, and inside `payload`
/// and `replies` where it has them (the contract's tolerant reader).
fn with_unknown_fields(message: &Value) -> Value {
    let mut more = message.clone();
    more["added_by_a_later_version"] = serde_json::json!({ "any": ["thing", 1] });
    for inner in ["payload", "replies"] {
        if let Some(object) = more.get_mut(inner).and_then(Value::as_object_mut) {
            object.insert("added_later".into(), Value::from(true));
        }
    }
    more
}

/// An error with its causes, as a dead-letter reason has them.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

fn golden(name: &str) -> Value {
    read_json(&repository().join(format!("events/golden/{name}.json")))
}

/// The messages of the document's channels: (topic, message name), for `kind` "Commands" or the
/// replies' channel.
fn channel_messages(contract: &Contract, replies: bool) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for channel in contract.document["channels"]
        .as_object()
        .expect("channels")
        .values()
    {
        let address = channel["address"].as_str().unwrap_or_default();
        let topic = address.trim_start_matches("{prefix}");
        let wanted = if replies {
            topic == "saga.replies"
        } else {
            topic.ends_with(".commands")
        };
        if wanted {
            for name in Contract::messages_of(channel) {
                found.push((topic.to_owned(), name));
            }
        }
    }
    found
}

/// The orchestrator's side as producer: its commands are what the contract says a participant
/// reads.
#[test]
fn every_command_the_saga_definitions_can_make_is_one_the_contract_allows() {
    let mut contract = Contract::load();
    let mut problems = Vec::new();
    let sent = every_command();
    for Sent { topic, envelope } in &sent {
        let json: Value = serde_json::from_slice(&envelope.to_json()).expect("JSON");
        for problem in contract.check_on(topic, "Command", &json) {
            let command = &envelope.body;
            problems.push(format!(
                "{} ({} {} attempt {}) on {topic}: {problem}",
                command.name,
                command.action.as_str(),
                command.step,
                command.attempt
            ));
        }
    }
    // And every command the document lists is one the definitions make: a command left in
    // the document after its definition dropped it would be tested against nothing.
    for (topic, name) in channel_messages(&contract, false) {
        if !sent
            .iter()
            .any(|s| s.topic == topic && s.envelope.body.name == name)
        {
            problems.push(format!("no definition makes {name} on {topic}"));
        }
    }
    problems.dedup();
    assert!(problems.is_empty(), "{problems:#?}");
}

/// A participant's side as consumer: what the contract allows on its command channel, and what
/// the orchestrator sends, is what it reads.
#[test]
fn every_command_the_contract_allows_is_one_its_participant_reads() {
    let mut contract = Contract::load();
    let mut problems = Vec::new();
    for (topic, name) in channel_messages(&contract, false) {
        let Some(participant) = participant_of(&topic) else {
            continue;
        };
        for example in [golden(&name), with_unknown_fields(&golden(&name))] {
            // The document accepts it (a reader must ignore added fields) ...
            problems.extend(contract.check_on(&topic, "Command", &example));
            // ... and so does the participant.
            let bytes = serde_json::to_vec(&example).expect("JSON");
            if let Err(e) = participant.read_command(&bytes) {
                problems.push(format!(
                    "{} does not read {name}: {}",
                    participant.name(),
                    chain(&*e)
                ));
            }
        }
    }
    for Sent { topic, envelope } in every_command() {
        let Some(participant) = participant_of(&topic) else {
            continue;
        };
        if let Err(e) = participant.read_command(&envelope.to_json()) {
            problems.push(format!(
                "{} does not read the orchestrator's {}: {}",
                participant.name(),
                envelope.body.name,
                chain(&*e)
            ));
        }
    }
    problems.dedup();
    assert!(problems.is_empty(), "{problems:#?}");
}

/// A participant's side as producer: every reply its runtime can answer a command with is a
/// message of `saga.replies` that the contract allows, answering that command.
#[test]
fn every_reply_a_participant_can_make_is_one_the_contract_allows() {
    let mut contract = Contract::load();
    let mut problems = Vec::new();
    let mut commands: Vec<Envelope<Command>> = channel_messages(&contract, false)
        .iter()
        .map(|(_, name)| {
            serde_json::from_value(golden(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
        })
        .collect();
    commands.extend(every_command().into_iter().map(|s| s.envelope));
    // The reasons the runtime refuses with beside a step's own (its `Failure` text), one of
    // them longer than a reply may carry.
    let reasons = [
        "out of stock".to_owned(),
        "the step was already compensated; a forward command after its compensation is refused"
            .to_owned(),
        "\u{0}".repeat(3) + &"é".repeat(3_000),
    ];
    for command in &commands {
        let body = &command.body;
        let mut replies = vec![Reply::succeeded(body)];
        for reason in &reasons {
            replies.extend(Reply::failed(body, reason));
        }
        for reply in replies {
            let envelope = participant_sdk::reply_envelope(command, reply);
            let json: Value = serde_json::from_slice(&envelope.to_json()).expect("JSON");
            let what = format!("{}'s {}", body.name, envelope.body.name);
            for problem in contract.check_on("saga.replies", "Reply", &json) {
                problems.push(format!("{what}: {problem}"));
            }
            // It answers its command (the contract's "Causation").
            let answers = envelope.causation_id == Some(command.message_id)
                && envelope.saga_id == command.saga_id
                && envelope.message_id != command.message_id
                && (json["saga_type"] == body.saga_type.as_str())
                && (json["step"] == body.step.as_str())
                && (json["action"] == body.action.as_str())
                && (json["attempt"] == body.attempt)
                && (json["key"] == body.key.as_str());
            if !answers {
                problems.push(format!("{what} does not answer its command: {json}"));
            }
        }
    }
    problems.dedup();
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The orchestrator's side as consumer: every reply the contract allows is one its decoder
/// reads, added fields and all.
#[test]
fn every_reply_the_contract_allows_is_one_the_orchestrator_reads() {
    let mut contract = Contract::load();
    let mut problems = Vec::new();
    let replies = channel_messages(&contract, true);
    assert!(!replies.is_empty(), "saga.replies carries no message");
    for (topic, name) in replies {
        for example in [golden(&name), with_unknown_fields(&golden(&name))] {
            problems.extend(contract.check_on(&topic, "Reply", &example));
            let bytes = serde_json::to_vec(&example).expect("JSON");
            // What the orchestrator's reply handler decodes each record with.
            if let Err(e) = Envelope::<Reply>::from_json(&bytes) {
                problems.push(format!("the orchestrator does not read {name}: {e}"));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
