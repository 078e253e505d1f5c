//! The AsyncAPI document's channels and operations, from the definitions. The generator owns
//! which channels and operations there are and which messages each channel carries: a channel
//! per trigger topic, per command topic and for `saga.replies`, each with a `send` and a
//! `receive` operation. A channel or operation the document already has for a topic keeps its
//! name, description and summary (they are written for people); a new one gets them from the
//! templates below, to be reworded by hand if wished. The engine's other channels
//! (`saga.events`, `saga.dlq`) and their operations stay as written; a channel of a topic no
//! definition uses any more is removed with its operations. Under `components.messages` the
//! generator writes the entries of the messages whose schemas it writes (`contract`): one it
//! has already written keeps its place and its summary (reworded by hand if wished), a new one
//! goes after the last message of the definitions there is; an entry of a message no
//! definition names any more whose schema was generated goes. A trigger message without an
//! entry gets a first one (after the other trigger messages'), which is the document's from
//! then on. Every other entry is hand-written: a message the definitions use with a
//! hand-written schema but no entry is an error.

use super::contract::Plan;
use super::json::Json;
use super::{GenerateError, Topic, Wire};
use crate::definitions::ENGINE_TOPICS;

/// The document's path from the repository's root.
pub(super) const PATH: &str = "events/contract/asyncapi.json";

/// The replies' topic, written by every participant.
const REPLIES: &str = ENGINE_TOPICS[0];

/// What a channel of the definitions is for.
enum Kind<'a> {
    Trigger { saga: &'a str },
    Commands { participant: &'a str },
    Replies,
}

pub(super) fn render(wire: &Wire, plan: &Plan, current: &str) -> Result<String, GenerateError> {
    let mut document: Json = serde_json::from_str(current).map_err(GenerateError::NotJson)?;
    let mut components = document
        .get("components")
        .cloned()
        .ok_or(GenerateError::NotAnObject("components"))?;
    let mut messages = components
        .get("messages")
        .and_then(Json::entries)
        .ok_or(GenerateError::NotAnObject("components.messages"))?
        .to_vec();
    with_generated_entries(&mut messages, wire, plan);
    components.set("messages", Json::Object(messages));
    document.set("components", components);
    let components = document
        .get("components")
        .and_then(|c| c.get("messages"))
        .and_then(Json::entries)
        .ok_or(GenerateError::NotAnObject("components.messages"))?;
    let old_channels = document
        .get("channels")
        .and_then(Json::entries)
        .ok_or(GenerateError::NotAnObject("channels"))?;
    let old_operations = document
        .get("operations")
        .and_then(Json::entries)
        .ok_or(GenerateError::NotAnObject("operations"))?;

    let replies = Topic {
        topic: REPLIES.to_owned(),
        owner: String::new(),
        messages: wire.replies.clone(),
    };
    let derived = (wire
        .triggers
        .iter()
        .map(|t| (t, Kind::Trigger { saga: &t.owner })))
    .chain(wire.commands.iter().map(|t| {
        let participant = &t.owner;
        (t, Kind::Commands { participant })
    }))
    .chain(std::iter::once((&replies, Kind::Replies)));

    let mut channels: Vec<(String, Json)> = Vec::new();
    let mut operations: Vec<(String, Json)> = Vec::new();
    let old = Written {
        messages: components,
        channels: old_channels,
        operations: old_operations,
    };
    for (topic, kind) in derived {
        channels.push(derived_channel(topic, &kind, &old, &mut operations)?);
    }
    with_engine_channels(old_channels, old_operations, &mut channels, &mut operations);
    document.set("channels", Json::Object(channels));
    document.set("operations", Json::Object(operations));
    let mut text = serde_json::to_string_pretty(&document).map_err(GenerateError::NotJson)?;
    text.push('\n');
    Ok(text)
}

/// What the document held before: its messages, channels and operations.
struct Written<'a> {
    messages: &'a [(String, Json)],
    channels: &'a [(String, Json)],
    operations: &'a [(String, Json)],
}

/// The channel of `topic` (the one written for its address, or a new one) with the messages
/// the definitions derive for it; its send and receive operations go to `operations`.
fn derived_channel(
    topic: &Topic,
    kind: &Kind<'_>,
    old: &Written<'_>,
    operations: &mut Vec<(String, Json)>,
) -> Result<(String, Json), GenerateError> {
    for message in &topic.messages {
        if !old.messages.iter().any(|(name, _)| name == message) {
            return Err(GenerateError::MissingMessage {
                message: message.clone(),
                topic: topic.topic.clone(),
            });
        }
    }
    let address = address(&topic.topic);
    let messages = Json::Object(
        topic
            .messages
            .iter()
            .map(|m| {
                (
                    m.clone(),
                    Json::reference(format!("#/components/messages/{m}")),
                )
            })
            .collect(),
    );
    let (name, mut channel) = match old.channels.iter().find(|(_, c)| has_address(c, &address)) {
        Some((name, channel)) => (name.clone(), channel.clone()),
        None => (camel(&topic.topic), new_channel(&address, kind)),
    };
    channel.set("messages", messages);
    for action in ["send", "receive"] {
        let mut found = false;
        for (op_name, operation) in old.operations {
            if is_operation(operation, &name, action) {
                found = true;
                operations.push((op_name.clone(), with_messages(operation, &name, topic)));
            }
        }
        if !found {
            let summary = summary(kind, action, &topic.topic);
            operations.push((
                operation_name(action, &name),
                new_operation(action, &name, summary),
            ));
        }
    }
    Ok((name, channel))
}

/// Adds the engine's other channels, as written, with their operations.
fn with_engine_channels(
    old_channels: &[(String, Json)],
    old_operations: &[(String, Json)],
    channels: &mut Vec<(String, Json)>,
    operations: &mut Vec<(String, Json)>,
) {
    for (name, channel) in old_channels {
        let engine = ENGINE_TOPICS[1..]
            .iter()
            .any(|topic| has_address(channel, &address(topic)));
        if engine && !channels.iter().any(|(n, _)| n == name) {
            channels.push((name.clone(), channel.clone()));
            for (op_name, operation) in old_operations {
                if ["send", "receive"]
                    .iter()
                    .any(|action| is_operation(operation, name, action))
                {
                    operations.push((op_name.clone(), operation.clone()));
                }
            }
        }
    }
}

/// `messages` (the document's `components.messages`) with the generator's entries of `plan`
/// in place and its orphans gone.
fn with_generated_entries(messages: &mut Vec<(String, Json)>, wire: &Wire, plan: &Plan) {
    messages.retain(|(name, _)| !plan.orphans.contains(name));
    for (name, entry) in &plan.entries {
        let mut entry = entry.clone();
        match messages.iter_mut().find(|(n, _)| n == name) {
            Some((_, old)) => {
                if let Some(summary) = old.get("summary") {
                    entry.set("summary", summary.clone());
                }
                *old = entry;
            }
            None => {
                let of_definitions = |n: &str| {
                    wire.triggers
                        .iter()
                        .chain(&wire.commands)
                        .any(|t| t.messages.iter().any(|m| m == n))
                        || wire.replies.iter().any(|m| m == n)
                };
                let at = messages
                    .iter()
                    .rposition(|(n, _)| of_definitions(n))
                    .map_or(messages.len(), |last| last + 1);
                messages.insert(at, (name.clone(), entry));
            }
        }
    }
    for (name, entry) in &plan.trigger_entries {
        if messages.iter().any(|(n, _)| n == name) {
            continue;
        }
        let is_trigger = |n: &str| {
            wire.triggers
                .iter()
                .any(|t| t.messages.iter().any(|m| m == n))
        };
        let at = messages
            .iter()
            .rposition(|(n, _)| is_trigger(n))
            .map_or(0, |last| last + 1);
        messages.insert(at, (name.clone(), entry.clone()));
    }
}

fn address(topic: &str) -> String {
    format!("{{prefix}}{topic}")
}

fn has_address(channel: &Json, address: &str) -> bool {
    channel.get("address").and_then(Json::as_str) == Some(address)
}

fn is_operation(operation: &Json, channel: &str, action: &str) -> bool {
    let target = format!("#/channels/{channel}");
    operation.get("action").and_then(Json::as_str) == Some(action)
        && operation
            .get("channel")
            .and_then(|c| c.get("$ref"))
            .and_then(Json::as_str)
            == Some(target.as_str())
}

/// An operation as written, its list of messages (where it has one) naming the channel's.
fn with_messages(operation: &Json, channel: &str, topic: &Topic) -> Json {
    let mut operation = operation.clone();
    if operation.get("messages").is_some() {
        let references = topic
            .messages
            .iter()
            .map(|m| Json::reference(format!("#/channels/{channel}/messages/{m}")))
            .collect();
        operation.set("messages", Json::Array(references));
    }
    operation
}

/// `inventory.commands` → `inventoryCommands`.
fn camel(topic: &str) -> String {
    let mut name = String::new();
    for (i, word) in topic
        .split(['.', '_', '-'])
        .filter(|w| !w.is_empty())
        .enumerate()
    {
        if i == 0 {
            name.push_str(word);
        } else {
            name.push_str(&capitalized(word));
        }
    }
    name
}

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn operation_name(action: &str, channel: &str) -> String {
    format!("{action}{}", capitalized(channel))
}

fn new_channel(address: &str, kind: &Kind) -> Json {
    let description = match kind {
        Kind::Trigger { saga } => {
            format!("Triggers of the {saga} saga (sagas/*.toml); read by the orchestrator.")
        }
        Kind::Commands { participant } => format!(
            "Commands for the {participant} participant (its steps in sagas/*.toml name this topic)."
        ),
        Kind::Replies => "Every participant's replies; read by the orchestrator.".to_owned(),
    };
    Json::object([
        ("address", Json::string(address)),
        ("description", Json::String(description)),
        (
            "parameters",
            Json::object([("prefix", Json::reference("#/components/parameters/prefix"))]),
        ),
    ])
}

fn summary(kind: &Kind, action: &str, topic: &str) -> String {
    match (kind, action) {
        (Kind::Trigger { saga }, "send") => format!("A client starts a {saga} saga."),
        (Kind::Trigger { .. }, _) => format!("The orchestrator reads {topic}."),
        (Kind::Commands { participant }, "send") => {
            format!("The orchestrator sends the {participant} participant its commands.")
        }
        (Kind::Commands { participant }, _) => {
            format!("The {participant} participant does (or undoes) its steps.")
        }
        (Kind::Replies, "send") => "A participant answers each command.".to_owned(),
        (Kind::Replies, _) => "The orchestrator moves each saga on its replies.".to_owned(),
    }
}

fn new_operation(action: &str, channel: &str, summary: String) -> Json {
    Json::object([
        ("action", Json::string(action)),
        ("channel", Json::reference(format!("#/channels/{channel}"))),
        ("summary", Json::String(summary)),
    ])
}
