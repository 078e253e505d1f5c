//! The published wire contract (`contract/asyncapi.json` and the JSON Schemas it names) against
//! the golden files: every JSON message of the document has a golden example that its schema
//! accepts, and every golden file is a message of the document. So a participant written in
//! another language from the document reads and writes what this code reads and writes.

use std::path::{Path, PathBuf};

use serde_json::Value;

fn contract_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contract")
}

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn validator(schema_file: &str) -> events::schemas::Validator {
    let schema = read_json(&contract_dir().join(schema_file));
    events::schemas::compile(&schema, |name| {
        Ok(std::fs::read_to_string(
            contract_dir().join("schemas").join(name),
        )?)
    })
    .unwrap_or_else(|e| panic!("{schema_file} does not compile: {e}"))
}

/// The document's JSON messages: (name, schema file relative to `contract/`).
fn json_messages(doc: &Value) -> Vec<(String, String)> {
    doc["components"]["messages"]
        .as_object()
        .expect("components.messages")
        .iter()
        .filter(|(_, message)| message["contentType"] == "application/json")
        .map(|(name, message)| {
            let schema = message["payload"]["schema"]["$ref"]
                .as_str()
                .unwrap_or_else(|| panic!("message {name} has no payload schema"));
            (name.clone(), schema.to_owned())
        })
        .collect()
}

fn golden_names() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("events/golden")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".json").map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

#[test]
fn the_document_is_asyncapi_3_and_every_channel_names_known_messages() {
    let doc = read_json(&contract_dir().join("asyncapi.json"));
    assert_eq!(doc["asyncapi"], "3.0.0");
    let messages = doc["components"]["messages"].as_object().expect("messages");
    for (id, channel) in doc["channels"].as_object().expect("channels") {
        let address = channel["address"].as_str().unwrap_or_default();
        assert!(address.starts_with("{prefix}"), "channel {id}: {address}");
        for (name, message) in channel["messages"].as_object().expect("channel messages") {
            let target = format!("#/components/messages/{name}");
            assert_eq!(message["$ref"], target.as_str(), "channel {id}");
            assert!(messages.contains_key(name), "channel {id} names {name}");
        }
    }
    for (id, operation) in doc["operations"].as_object().expect("operations") {
        let channel = operation["channel"]["$ref"].as_str().unwrap_or_default();
        let channel_id = channel.trim_start_matches("#/channels/");
        assert!(
            doc["channels"].get(channel_id).is_some(),
            "operation {id}: {channel}"
        );
    }
}

#[test]
fn every_golden_file_is_a_message_of_the_document_and_its_schema_accepts_it() {
    let doc = read_json(&contract_dir().join("asyncapi.json"));
    let messages = json_messages(&doc);
    let golden = golden_names();
    for name in &golden {
        // A golden file is named by its message, or by its message and a variant:
        // `Reply.failed` is an example of `Reply`.
        let message = name.split('.').next().unwrap_or(name);
        let Some((_, schema)) = messages.iter().find(|(m, _)| m == message) else {
            panic!("golden file {name}.json is no message of contract/asyncapi.json");
        };
        let example = read_json(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("golden")
                .join(format!("{name}.json")),
        );
        let errors: Vec<String> = validator(schema)
            .iter_errors(&example)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{name}.json against {schema}: {errors:?}"
        );
    }
    for (message, _) in &messages {
        assert!(
            golden
                .iter()
                .any(|g| g == message || g.starts_with(&format!("{message}."))),
            "message {message} has no golden example"
        );
    }
}

/// The schemas refuse what the decoders refuse (a sample of broken messages), and accept what
/// they accept: fields a consumer does not know are ignored.
#[test]
fn the_schemas_refuse_broken_messages() {
    let golden = |name: &str| {
        read_json(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("golden")
                .join(format!("{name}.json")),
        )
    };
    let order = validator("schemas/OrderPlaced.schema.json");
    let mut broken = golden("OrderPlaced");
    broken["items"] = Value::Array(Vec::new());
    assert!(!order.is_valid(&broken), "an order without items");
    let mut broken = golden("OrderPlaced");
    broken["customer_id"] = "al\u{0}ice".into();
    assert!(!order.is_valid(&broken), "a NUL in a text");
    let mut broken = golden("OrderPlaced");
    broken["shipping_address"]["country"] = "Germany".into();
    assert!(!order.is_valid(&broken), "a country that is not ISO 3166");
    // Tolerant reader: the orchestrator ignores fields it does not know, so the schema
    // accepts them (a client may send more than the engine reads).
    let mut more = golden("OrderPlaced");
    more["extra"] = true.into();
    more["shipping_address"]["floor"] = 3.into();
    assert!(order.is_valid(&more), "unknown fields are ignored");

    let request = validator("schemas/ReturnRequested.schema.json");
    for (field, value, why) in [
        ("items", Value::Array(Vec::new()), "a return without items"),
        ("refund_cents", Value::from(0), "nothing to refund"),
        (
            "currency",
            Value::from("euro"),
            "a currency that is not ISO 4217",
        ),
        (
            "return_id",
            Value::from("r-1"),
            "a return id that is no UUID",
        ),
    ] {
        let mut broken = golden("ReturnRequested");
        broken[field] = value;
        assert!(!request.is_valid(&broken), "{why}");
    }

    let completed = validator("schemas/SagaCompleted.schema.json");
    let mut broken = golden("SagaCompleted");
    broken["schema_version"] = 99.into();
    assert!(
        !completed.is_valid(&broken),
        "a schema version from the future"
    );
    let mut more = golden("SagaCompleted");
    more["unknown"] = 1.into();
    assert!(
        completed.is_valid(&more),
        "an unknown envelope field is ignored"
    );
    let mut broken = golden("SagaCompleted");
    broken["saga_id"] = "not-a-uuid".into();
    assert!(!completed.is_valid(&broken), "a saga id that is no UUID");

    let reserve = validator("schemas/ReserveStock.schema.json");
    for (field, value, why) in [
        ("attempt", Value::from(0), "attempt 0"),
        ("key", Value::from(""), "an empty key"),
        ("step", Value::from("charge payment"), "a name with a space"),
        ("action", Value::from("undo"), "an unknown action"),
        (
            "replies",
            serde_json::json!({ "success": "StockReserved" }),
            "a reply name missing",
        ),
        (
            "payload",
            serde_json::json!({ "order_id": "x" }),
            "a payload without items",
        ),
    ] {
        let mut broken = golden("ReserveStock");
        broken[field] = value;
        assert!(!reserve.is_valid(&broken), "{why}");
    }
    // Any saga's command: the generic schema takes another saga's step and payload.
    let command = validator("schemas/Command.schema.json");
    let mut other = golden("ReserveStock");
    other["saga_type"] = "returns".into();
    other["step"] = "restock".into();
    other["payload"] = serde_json::json!({ "anything": [1, 2] });
    assert!(command.is_valid(&other), "another saga's command");

    // The envelope's `type` is the same rule as Command's: a definition may name a command
    // `award_points` (it once had to be UpperCamelCase there, and the two contradicted).
    let mut snake = golden("ReserveStock");
    snake["type"] = "reserve_stock_v2".into();
    assert!(command.is_valid(&snake), "a lower_snake_case command name");
    let mut more = golden("ReserveStock");
    more["routing_hint"] = "eu".into();
    more["payload"]["gift_wrap"] = true.into();
    more["replies"]["timeout"] = "PointsLate".into();
    assert!(
        reserve.is_valid(&more),
        "unknown command fields are ignored"
    );

    let reply = validator("schemas/Reply.schema.json");
    let mut more = golden("StockReserved");
    more["payload"] = serde_json::json!({ "reservation": 7 });
    more["warehouse"] = "north".into();
    assert!(reply.is_valid(&more), "unknown reply fields are ignored");
    let mut snake = golden("StockReserved");
    snake["type"] = "stock_reserved".into();
    assert!(reply.is_valid(&snake), "a lower_snake_case reply name");

    let mut broken = golden("StockReserved");
    broken["reason"] = "a reason on a success".into();
    assert!(!reply.is_valid(&broken), "a reason without a failure");
    let mut broken = golden("StockUnavailable");
    if let Some(fields) = broken.as_object_mut() {
        fields.remove("reason");
    }
    assert!(!reply.is_valid(&broken), "a failure without a reason");
    let mut broken = golden("StockUnavailable");
    broken["reason"] = "x".repeat(2_001).into();
    assert!(!reply.is_valid(&broken), "a reason over 2000 characters");
    let mut broken = golden("StockReserved");
    broken["outcome"] = "failed".into();
    let reserved = validator("schemas/StockReserved.schema.json");
    assert!(!reserved.is_valid(&broken), "StockReserved is a success");
}

/// Every example a schema gives (the orchestrator takes a trigger message's first one as its
/// sample) is a message the schema accepts.
#[test]
fn every_schema_accepts_its_examples() {
    let mut seen = 0;
    for entry in std::fs::read_dir(contract_dir().join("schemas")).expect("contract/schemas") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).expect("a name");
        let schema = read_json(&path);
        let Some(examples) = schema.get("examples").and_then(Value::as_array) else {
            continue;
        };
        let validator = validator(&format!("schemas/{name}"));
        for example in examples {
            let errors: Vec<String> = validator
                .iter_errors(example)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{name}'s example: {errors:?}");
            seen += 1;
        }
    }
    // At least the two trigger messages'.
    assert!(seen >= 2, "{seen} examples");
}

/// The document declares the headers consumers may meet: W3C trace context on every JSON
/// message, and every `dlq.*` header of a dead letter (the ones kafka-record writes).
#[test]
fn every_message_declares_its_headers() {
    let doc = read_json(&contract_dir().join("asyncapi.json"));
    let trace = &doc["components"]["schemas"]["TraceHeaders"]["properties"];
    for name in ["traceparent", "tracestate"] {
        assert!(trace.get(name).is_some(), "TraceHeaders lacks {name}");
    }
    for (name, message) in doc["components"]["messages"].as_object().expect("messages") {
        if message["contentType"] == "application/json" {
            assert_eq!(
                message["headers"]["$ref"], "#/components/schemas/TraceHeaders",
                "{name}"
            );
            let key = message["bindings"]["kafka"]["key"]["description"]
                .as_str()
                .unwrap_or_default();
            assert!(key.contains("murmur2"), "{name}'s key names no partitioner");
        }
    }
    let dead = &doc["components"]["messages"]["DeadLetter"]["headers"];
    for name in [
        "dlq.id",
        "dlq.reason",
        "dlq.source.topic",
        "dlq.source.partition",
        "dlq.source.offset",
        "dlq.consumer",
        "dlq.failed_at",
    ] {
        assert!(
            dead["required"]
                .as_array()
                .is_some_and(|r| r.iter().any(|h| h == name)),
            "DeadLetter does not require {name}"
        );
        assert!(
            dead["properties"][name]["description"].is_string(),
            "DeadLetter does not describe {name}"
        );
    }
}
