//! The generator against the repository's files: a step with a new participant (its channel,
//! operations and services, and its messages' schemas, golden examples and entries, checked as
//! events' contract test checks the committed ones), the step taken away again, a saga type
//! taken away, and what it refuses.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::json::Json;
use super::{generate, Change, Files, GenerateError, Generated, GOLDEN_DIR, SCHEMAS_DIR};
use crate::definitions::{load_dir, parse, SagaDefinition};

const ASYNCAPI: &str = "events/contract/asyncapi.json";

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn repository_files() -> Files {
    Files::read(&repository()).expect("the repository's files read")
}

fn repository_definitions() -> Vec<SagaDefinition> {
    load_dir(&repository().join("sagas")).expect("sagas/ loads")
}

/// The files as the generator leaves them, which it then leaves as they are.
fn generated(definitions: &[SagaDefinition], mut files: Files) -> (Files, Vec<Change>) {
    let Generated { changes, refused } = generate(definitions, &files);
    assert!(refused.is_empty(), "{refused:?}");
    for change in &changes {
        files.apply(change);
    }
    let again = generate(definitions, &files);
    assert!(again.refused.is_empty(), "{:?}", again.refused);
    let paths: Vec<&str> = again.changes.iter().map(Change::path).collect();
    assert!(paths.is_empty(), "not stable: {paths:?}");
    (files, changes)
}

/// Version 2 of the order saga as README's "Add a step" makes it: a `loyalty_points` step of a
/// new participant before the shipment, `AwardPoints` mapping `points` from `$.{points}`.
fn order_with_loyalty_step(version: i32, points: &str) -> SagaDefinition {
    let step = format!(
        r#"[[steps]]
name = "loyalty_points"
participant = "loyalty"
topic = "loyalty.commands"

[steps.forward]
action = "AwardPoints"
payload = {{ customer_id = "$.customer_id", points = "$.{points}" }}
success = "PointsAwarded"
retry = {{ timeout_ms = 30_000, max_attempts = 8, max_timeout_ms = 300_000 }}

[steps.compensation]
action = "RevokePoints"
payload = {{}}
success = "PointsRevoked"
retry = {{ timeout_ms = 30_000, max_attempts = 20, max_timeout_ms = 300_000 }}

[[steps]]
name = "schedule_shipment""#
    );
    let text = std::fs::read_to_string(repository().join("sagas/order.toml"))
        .expect("sagas/order.toml")
        .replace("version = 1", &format!("version = {version}"))
        .replace("[[steps]]\nname = \"schedule_shipment\"", &step);
    parse("order.toml", &text).expect("the new version is valid")
}

/// The repository's definitions and the order saga's `versions` beside its own.
fn with_order(versions: Vec<SagaDefinition>) -> Vec<SagaDefinition> {
    let mut definitions: Vec<SagaDefinition> = repository_definitions()
        .into_iter()
        .chain(versions)
        .collect();
    definitions.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
    definitions
}

fn with_loyalty_step() -> Vec<SagaDefinition> {
    with_order(vec![order_with_loyalty_step(2, "total_cents")])
}

fn json(files: &Files, path: &str) -> Json {
    let text = files.get(path).unwrap_or_else(|| panic!("no file {path}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn value(files: &Files, path: &str) -> Value {
    let text = files.get(path).unwrap_or_else(|| panic!("no file {path}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn channel_messages(document: &Json, channel: &str) -> Vec<String> {
    keys(
        document
            .get("channels")
            .and_then(|c| c.get(channel))
            .and_then(|c| c.get("messages"))
            .unwrap_or_else(|| panic!("no channel {channel}")),
    )
}

fn keys(object: &Json) -> Vec<String> {
    object
        .entries()
        .expect("an object")
        .iter()
        .map(|(name, _)| name.clone())
        .collect()
}

fn check_contract(files: &Files) {
    let problems = contract_problems(files);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// What events/tests/contract.rs checks of the committed contract, of `files`: every channel
/// names messages of the document; every golden file is a message of the document that its
/// schema accepts; every JSON message of the document has a golden example.
fn contract_problems(files: &Files) -> Vec<String> {
    let mut problems = Vec::new();
    let document = value(files, ASYNCAPI);
    let messages = document["components"]["messages"]
        .as_object()
        .expect("components.messages");
    for (id, channel) in document["channels"].as_object().expect("channels") {
        for name in channel["messages"].as_object().expect("messages").keys() {
            if !messages.contains_key(name) {
                problems.push(format!("channel {id} names {name}"));
            }
        }
    }
    let golden: Vec<&str> = files
        .iter()
        .filter_map(|(path, _)| path.strip_prefix(GOLDEN_DIR)?.strip_prefix('/'))
        .filter_map(|name| name.strip_suffix(".json"))
        .collect();
    for name in &golden {
        let message = name.split('.').next().unwrap_or(name);
        let Some(schema) = messages
            .get(message)
            .and_then(|m| m["payload"]["schema"]["$ref"].as_str())
        else {
            problems.push(format!(
                "golden file {name}.json is no message of the document"
            ));
            continue;
        };
        let schemas = files.clone();
        let validator = events::schemas::compile(
            &value(files, &format!("events/contract/{schema}")),
            move |name| {
                let path = format!("{SCHEMAS_DIR}/{name}");
                let text = schemas
                    .get(&path)
                    .ok_or_else(|| format!("no schema {path}"))?;
                Ok(text.to_owned())
            },
        )
        .unwrap_or_else(|e| panic!("{schema} does not compile: {e}"));
        let example = value(files, &format!("{GOLDEN_DIR}/{name}.json"));
        problems.extend(
            validator
                .iter_errors(&example)
                .map(|e| format!("{name}.json against {schema}: {e} at {}", e.instance_path())),
        );
    }
    for (name, message) in messages {
        let has_golden = golden
            .iter()
            .any(|g| g == name || g.starts_with(&format!("{name}.")));
        if message["contentType"] == "application/json" && !has_golden {
            problems.push(format!("message {name} has no golden example"));
        }
    }
    problems
}

const LOYALTY_MESSAGES: [&str; 4] = [
    "AwardPoints",
    "PointsAwarded",
    "RevokePoints",
    "PointsRevoked",
];

#[test]
fn a_step_of_a_new_participant_gets_its_channel_operations_and_services() {
    let (files, _) = generated(&with_loyalty_step(), repository_files());
    let document = json(&files, ASYNCAPI);
    assert_eq!(
        channel_messages(&document, "loyaltyCommands"),
        ["AwardPoints", "RevokePoints"]
    );
    let replies = channel_messages(&document, "sagaReplies");
    assert!(replies.contains(&"PointsAwarded".to_owned()), "{replies:?}");
    assert!(replies.contains(&"PointsRevoked".to_owned()), "{replies:?}");
    let channel = document
        .get("channels")
        .and_then(|c| c.get("loyaltyCommands"));
    assert_eq!(
        channel
            .and_then(|c| c.get("address"))
            .and_then(Json::as_str),
        Some("{prefix}loyalty.commands")
    );
    let operations = keys(document.get("operations").expect("operations"));
    for name in ["sendLoyaltyCommands", "receiveLoyaltyCommands"] {
        assert!(operations.contains(&name.to_owned()), "{operations:?}");
    }
    // What was there keeps its place, its names and its words.
    assert_eq!(operations[..2], ["placeOrder", "readOrders"]);
    assert_eq!(
        operations[operations.len() - 2..],
        ["publishSagaEvents", "deadLetter"]
    );

    for (path, own_line) in [
        ("docker-compose.yml", "      - \"9185:9185\""),
        (
            "docker-compose.secured.yml",
            "      - ./.run/compose-secured/clients/loyalty:/run/kafka-client:ro",
        ),
    ] {
        let rendered = files.get(path).expect("the compose file");
        let service = rendered
            .split("\n\n")
            .find(|block| block.starts_with("  loyalty:\n"))
            .unwrap_or_else(|| panic!("{path} has no loyalty service:\n{rendered}"));
        assert!(service.contains("    command: loyalty\n"), "{service}");
        // The lowest port no service has: every participant already there keeps its own,
        // wherever the new one stands in the definitions (a published port that moved would
        // break whoever scrapes it).
        assert!(
            service.contains("METRICS_ADDR: 0.0.0.0:9185\n"),
            "{service}"
        );
        assert!(service.contains(own_line), "{path}: {service}");
        let before = std::fs::read_to_string(repository().join(path)).expect("the compose file");
        for (participant, port) in [
            ("inventory", 9181),
            ("payment", 9182),
            ("shipping", 9183),
            ("returns", 9184),
        ] {
            let addr = format!("METRICS_ADDR: 0.0.0.0:{port}\n");
            let block = |text: &str| {
                text.split("\n\n")
                    .find(|block| block.starts_with(&format!("  {participant}:\n")))
                    .map(str::to_owned)
            };
            assert!(
                block(&before).is_some_and(|b| b.contains(&addr)),
                "{path}: {participant} had {port}"
            );
            assert!(
                block(rendered).is_some_and(|b| b.contains(&addr)),
                "{path}: {participant} keeps {port}"
            );
        }
    }
}

#[test]
fn a_step_of_a_new_participant_gets_schemas_goldens_and_entries_the_contract_accepts() {
    let (files, changes) = generated(&with_loyalty_step(), repository_files());
    let mut expected: Vec<String> = vec![
        ASYNCAPI.to_owned(),
        "docker-compose.yml".to_owned(),
        "docker-compose.secured.yml".to_owned(),
    ];
    let mut contract: Vec<String> = LOYALTY_MESSAGES
        .iter()
        .flat_map(|m| {
            [
                format!("{SCHEMAS_DIR}/{m}.schema.json"),
                format!("{GOLDEN_DIR}/{m}.json"),
            ]
        })
        .collect();
    contract.sort();
    expected.extend(contract);
    // New files and the three with generated parts: every hand-written file stays as it is.
    let written: Vec<&str> = changes
        .iter()
        .map(|c| match c {
            Change::Write { path, .. } => path.as_str(),
            Change::Remove { path } => panic!("removed {path}"),
        })
        .collect();
    assert_eq!(written, expected);
    for (path, text) in repository_files().iter() {
        if !expected.iter().any(|p| p == path) {
            assert_eq!(files.get(path), Some(text), "{path} changed");
        }
    }
    check_contract(&files);

    // The command as the engine builds it from OrderPlaced's sample, a later step's (caused
    // by a reply); its schema's payload from OrderPlaced's schema.
    let award = value(&files, &format!("{GOLDEN_DIR}/AwardPoints.json"));
    assert_eq!(
        award["payload"],
        serde_json::json!({ "customer_id": "alice", "points": 2500 })
    );
    assert_eq!(
        (&award["saga_version"], &award["step"], &award["action"]),
        (
            &Value::from(2),
            &Value::from("loyalty_points"),
            &Value::from("forward")
        )
    );
    assert_eq!(
        award["causation_id"],
        "5d6e7f80-91a2-4b3c-8d4e-5f60718293a4"
    );
    assert_eq!(award["occurred_at"], "2026-11-26T12:00:00Z");
    assert_eq!(award["key"], "7f1d2c3b-4a5e-4f60-8a71-9b0c1d2e3f40");
    let schema = value(&files, &format!("{SCHEMAS_DIR}/AwardPoints.schema.json"));
    assert_eq!(
        schema["$comment"],
        "generated by sagactl generate from sagas/order.toml: change the definition, not this file"
    );
    assert_eq!(
        schema["properties"]["payload"]["properties"]["customer_id"],
        serde_json::json!({ "$ref": "common.schema.json#/$defs/text" })
    );
    assert_eq!(
        schema["properties"]["replies"]["properties"]["failure"],
        serde_json::json!({ "type": "null" })
    );
    let revoke = value(&files, &format!("{GOLDEN_DIR}/RevokePoints.json"));
    assert_eq!(revoke["payload"], serde_json::json!({}));
    let revoked = value(&files, &format!("{GOLDEN_DIR}/PointsRevoked.json"));
    assert_eq!(
        (&revoked["outcome"], &revoked["action"]),
        (&Value::from("succeeded"), &Value::from("compensate"))
    );
    let entry = value(&files, ASYNCAPI)["components"]["messages"]["AwardPoints"].clone();
    assert_eq!(
        entry["bindings"]["kafka"]["key"]["description"],
        "The body's `key`, as UTF-8 bytes (for the order saga, the order id). The partition is \
         murmur2 of these bytes (Kafka's default partitioner: the document's description, \
         \"Keys and partitions\")."
    );
    // Its headers and its payload as the hand-written entries and schemas have them: the
    // trace headers, and a payload that allows fields a participant does not read.
    assert_eq!(
        entry["headers"],
        serde_json::json!({ "$ref": "#/components/schemas/TraceHeaders" })
    );
    assert!(schema["properties"]["payload"]
        .get("additionalProperties")
        .is_none());
    assert_eq!(
        entry["summary"],
        "Asks the loyalty participant to do the loyalty_points step."
    );
    // A new entry stands after the definitions' other messages, before the engine's own.
    let names = keys(
        json(&files, ASYNCAPI)
            .get("components")
            .and_then(|c| c.get("messages"))
            .expect("messages"),
    );
    let at = |name: &str| names.iter().position(|n| n == name).expect(name);
    assert_eq!(at("AwardPoints"), at("RefundRefused") + 1);
    assert_eq!(at("SagaStarted"), at("PointsRevoked") + 1);
}

#[test]
fn a_failure_reply_gets_a_reason_and_a_first_command_no_causation() {
    let text = std::fs::read_to_string(repository().join("sagas/order.toml"))
        .expect("sagas/order.toml")
        .replace("version = 1", "version = 2")
        .replace("failure = \"StockUnavailable\"", "failure = \"StockShort\"")
        .replace("action = \"ReserveStock\"", "action = \"ReserveItems\"");
    let definitions = with_order(vec![parse("order.toml", &text).expect("valid")]);
    let (files, _) = generated(&definitions, repository_files());
    check_contract(&files);
    let short = value(&files, &format!("{GOLDEN_DIR}/StockShort.json"));
    assert_eq!(short["outcome"], "failed");
    assert_eq!(
        short["reason"],
        "The inventory participant refused the reserve_stock step."
    );
    // StockUnavailable's schema is hand-written: it stays, though no definition names it.
    assert_eq!(
        files.get(&format!("{SCHEMAS_DIR}/StockUnavailable.schema.json")),
        repository_files().get(&format!("{SCHEMAS_DIR}/StockUnavailable.schema.json"))
    );
    assert_eq!(
        short["causation_id"],
        "5d6e7f80-91a2-4b3c-8d4e-5f60718293a4"
    );
    // The saga's first command answers the trigger message, which has no id.
    let reserve = value(&files, &format!("{GOLDEN_DIR}/ReserveItems.json"));
    assert_eq!(reserve["causation_id"], Value::Null);
    assert_eq!(reserve["replies"]["failure"], "StockShort");
}

#[test]
fn the_generated_contract_goes_when_no_definition_names_its_messages_and_a_reworded_summary_stays()
{
    let (mut files, _) = generated(&with_loyalty_step(), repository_files());
    let reworded = files.get(ASYNCAPI).expect("the document").replace(
        "\"summary\": \"Asks the loyalty participant to do the loyalty_points step.\"",
        "\"summary\": \"Award the order's points.\"",
    );
    files.set(ASYNCAPI, reworded);
    let (files, changes) = generated(&with_loyalty_step(), files);
    assert_eq!(changes, []);
    assert!(files
        .get(ASYNCAPI)
        .is_some_and(|d| d.contains("Award the order's points.")));

    let (back, changes) = generated(&repository_definitions(), files);
    let removed: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Remove { path } => Some(path.as_str()),
            Change::Write { .. } => None,
        })
        .collect();
    assert_eq!(removed.len(), 8, "{removed:?}");
    // Byte for byte what the repository has.
    assert_eq!(back, repository_files());
}

#[test]
fn a_message_named_by_two_versions_that_map_it_differently_allows_both() {
    let definitions = with_order(vec![
        order_with_loyalty_step(2, "total_cents"),
        order_with_loyalty_step(3, "items"),
    ]);
    let (files, _) = generated(&definitions, repository_files());
    check_contract(&files);
    let schema = value(&files, &format!("{SCHEMAS_DIR}/AwardPoints.schema.json"));
    let variants = schema["anyOf"].as_array().expect("anyOf");
    assert_eq!(variants.len(), 2, "{schema}");
    // Both versions' commands (the golden example is version 2's).
    let mut award = value(&files, &format!("{GOLDEN_DIR}/AwardPoints.json"));
    award["saga_version"] = 3.into();
    award["payload"]["points"] =
        value(&files, &format!("{GOLDEN_DIR}/OrderPlaced.json"))["items"].clone();
    let mut with = files.clone();
    with.set(
        &format!("{GOLDEN_DIR}/AwardPoints.v3.json"),
        serde_json::to_string(&award).expect("JSON"),
    );
    check_contract(&with);
    award["payload"]["points"] = "many".into();
    with.set(
        &format!("{GOLDEN_DIR}/AwardPoints.v3.json"),
        serde_json::to_string(&award).expect("JSON"),
    );
    let problems = contract_problems(&with);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("AwardPoints.v3.json")),
        "points of neither version's schema: {problems:?}"
    );
}

#[test]
fn a_message_with_a_hand_written_schema_and_no_entry_is_refused_naming_it() {
    let mut files = repository_files();
    let (generated_files, _) = generated(&with_loyalty_step(), repository_files());
    // A person's schema: the generated one without the generator's comment.
    let path = format!("{SCHEMAS_DIR}/AwardPoints.schema.json");
    let own = generated_files
        .get(&path)
        .expect("generated")
        .replace("\"$comment\"", "\"$note\"");
    files.set(&path, own.clone());
    let Generated { changes, refused } = generate(&with_loyalty_step(), &files);
    assert!(
        !changes.iter().any(|c| c.path().contains("AwardPoints")),
        "{changes:?}"
    );
    let [GenerateError::In { file, error }] = refused.as_slice() else {
        panic!("{refused:?}")
    };
    assert_eq!(*file, ASYNCAPI);
    assert!(
        matches!(&**error, GenerateError::MissingMessage { message, topic }
            if message == "AwardPoints" && topic == "loyalty.commands"),
        "{error:?}"
    );
    // The other messages' files are written all the same.
    assert!(
        changes
            .iter()
            .any(|c| c.path() == format!("{SCHEMAS_DIR}/PointsAwarded.schema.json")),
        "{changes:?}"
    );
}

#[test]
fn a_saga_type_taken_away_takes_its_channels_operations_and_services() {
    let orders_only: Vec<SagaDefinition> = repository_definitions()
        .into_iter()
        .filter(|d| d.name == "order")
        .collect();
    let (files, _) = generated(&orders_only, repository_files());
    let document = json(&files, ASYNCAPI);
    assert_eq!(
        keys(document.get("channels").expect("channels")),
        [
            "orders",
            "inventoryCommands",
            "paymentCommands",
            "shippingCommands",
            "sagaReplies",
            "sagaEvents",
            "deadLetters"
        ]
    );
    let operations = keys(document.get("operations").expect("operations"));
    assert!(
        !operations.iter().any(|o| o.contains("Return")),
        "{operations:?}"
    );
    assert!(!channel_messages(&document, "sagaReplies").contains(&"Restocked".to_owned()));
    assert_eq!(
        channel_messages(&document, "inventoryCommands"),
        ["ReserveStock", "ReleaseStock"]
    );

    for path in ["docker-compose.yml", "docker-compose.secured.yml"] {
        let rendered = files.get(path).expect("the compose file");
        assert!(!rendered.contains("  returns:\n"), "{path}:\n{rendered}");
        assert!(rendered.contains("  shipping:\n"), "{path}:\n{rendered}");
        // The hand-written services stay.
        assert!(
            rendered.contains("  orchestrator:\n"),
            "{path}:\n{rendered}"
        );
    }
}

#[test]
fn a_compose_file_without_the_markers_is_refused() {
    let mut files = repository_files();
    let text = files
        .get("docker-compose.yml")
        .expect("the compose file")
        .replace("# END participants", "# END");
    files.set("docker-compose.yml", text);
    let refused = generate(&repository_definitions(), &files).refused;
    let [GenerateError::In { file, error }] = refused.as_slice() else {
        panic!("{refused:?}")
    };
    assert_eq!(*file, "docker-compose.yml");
    assert!(
        matches!(**error, GenerateError::MissingMarker { .. }),
        "{error:?}"
    );
}

#[test]
fn a_trigger_message_without_an_entry_gets_a_first_one_after_the_other_triggers() {
    let mut files = repository_files();
    let mut document = json(&files, ASYNCAPI);
    let mut components = document.get("components").expect("components").clone();
    let mut messages = components
        .get("messages")
        .and_then(Json::entries)
        .expect("messages")
        .to_vec();
    messages.retain(|(name, _)| name != "ReturnRequested");
    components.set("messages", Json::Object(messages));
    document.set("components", components);
    files.set(
        ASYNCAPI,
        serde_json::to_string_pretty(&document).expect("JSON") + "\n",
    );

    let (files, _) = generated(&repository_definitions(), files);
    let document = json(&files, ASYNCAPI);
    let messages = document
        .get("components")
        .and_then(|c| c.get("messages"))
        .expect("messages");
    assert_eq!(keys(messages)[..2], ["OrderPlaced", "ReturnRequested"]);
    let entry = messages.get("ReturnRequested").expect("its entry");
    assert_eq!(
        entry.get("summary").and_then(Json::as_str),
        Some("A client's ReturnRequested: starts a return saga.")
    );
    assert_eq!(
        entry
            .get("payload")
            .and_then(|p| p.get("schema"))
            .and_then(|s| s.get("$ref"))
            .and_then(Json::as_str),
        Some("schemas/ReturnRequested.schema.json")
    );
    assert_eq!(
        entry
            .get("bindings")
            .and_then(|b| b.get("kafka"))
            .and_then(|k| k.get("key"))
            .and_then(|k| k.get("description"))
            .and_then(Json::as_str),
        Some(
            "The return id. As UTF-8 bytes. The partition is murmur2 of these bytes (Kafka's \
             default partitioner: the document's description, \"Keys and partitions\")."
        )
    );
}
