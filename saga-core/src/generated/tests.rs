//! The generator against the repository's files: a step with a new participant, a saga type
//! taken away, and what it refuses.

use std::path::Path;

use super::json::Json;
use super::{GenerateError, GeneratedFile, GENERATED_FILES};
use crate::definitions::{load_dir, parse, SagaDefinition};

fn repository_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn repository_definitions() -> Vec<SagaDefinition> {
    load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../sagas")).expect("sagas/ loads")
}

fn file(path: &str) -> GeneratedFile {
    GENERATED_FILES
        .into_iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("no generated file {path}"))
}

/// `file` rendered from `definitions`, and rendered once more from its own output: the same.
fn render(path: &str, definitions: &[SagaDefinition], current: &str) -> String {
    let rendered = file(path)
        .render(definitions, current)
        .unwrap_or_else(|e| panic!("{path}: {e:?}"));
    let again = file(path)
        .render(definitions, &rendered)
        .unwrap_or_else(|e| panic!("{path} again: {e:?}"));
    assert_eq!(rendered, again, "{path} is not stable");
    rendered
}

/// The repository's definitions and version 2 of the order saga, which inserts a
/// `loyalty_points` step of a new participant before the shipment (README's "Add a step").
fn with_loyalty_step() -> Vec<SagaDefinition> {
    let step = r#"[[steps]]
name = "loyalty_points"
participant = "loyalty"
topic = "loyalty.commands"

[steps.forward]
action = "AwardPoints"
payload = { customer_id = "$.customer_id", points = "$.total_cents" }
success = "PointsAwarded"
retry = { timeout_ms = 30_000, max_attempts = 8, max_timeout_ms = 300_000 }

[steps.compensation]
action = "RevokePoints"
payload = {}
success = "PointsRevoked"
retry = { timeout_ms = 30_000, max_attempts = 20, max_timeout_ms = 300_000 }

[[steps]]
name = "schedule_shipment""#;
    let text = repository_file("sagas/order.toml")
        .replace("version = 1", "version = 2")
        .replace("[[steps]]\nname = \"schedule_shipment\"", step);
    let mut definitions = repository_definitions();
    definitions.push(parse("order.toml", &text).expect("version 2 is valid"));
    definitions.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
    definitions
}

/// The AsyncAPI document with an entry under components.messages for each of `names`, as its
/// author writes them beside their schemas.
fn with_messages(names: &[&str]) -> String {
    let mut document: Json =
        serde_json::from_str(&repository_file("events/contract/asyncapi.json")).expect("JSON");
    let mut components = document.get("components").cloned().expect("components");
    let mut messages = components.get("messages").cloned().expect("messages");
    for name in names {
        messages.set(name, Json::object([("name", Json::string(*name))]));
    }
    components.set("messages", messages);
    document.set("components", components);
    serde_json::to_string_pretty(&document).expect("written")
}

fn channel_messages(document: &Json, channel: &str) -> Vec<String> {
    document
        .get("channels")
        .and_then(|c| c.get(channel))
        .and_then(|c| c.get("messages"))
        .and_then(Json::entries)
        .unwrap_or_else(|| panic!("no channel {channel}"))
        .iter()
        .map(|(name, _)| name.clone())
        .collect()
}

fn keys(document: &Json, at: &str) -> Vec<String> {
    document
        .get(at)
        .and_then(Json::entries)
        .expect("an object")
        .iter()
        .map(|(name, _)| name.clone())
        .collect()
}

#[test]
fn a_step_of_a_new_participant_gets_its_channel_operations_and_services() {
    let definitions = with_loyalty_step();
    let current = with_messages(&[
        "AwardPoints",
        "PointsAwarded",
        "RevokePoints",
        "PointsRevoked",
    ]);
    let rendered = render("events/contract/asyncapi.json", &definitions, &current);
    let document: Json = serde_json::from_str(&rendered).expect("JSON");
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
    let operations = keys(&document, "operations");
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
        ("docker-compose.yml", "      - \"9184:9184\""),
        (
            "docker-compose.secured.yml",
            "      - ./.run/compose-secured/clients/loyalty:/run/kafka-client:ro",
        ),
    ] {
        let rendered = render(path, &definitions, &repository_file(path));
        let service = rendered
            .split("\n\n")
            .find(|block| block.starts_with("  loyalty:\n"))
            .unwrap_or_else(|| panic!("{path} has no loyalty service:\n{rendered}"));
        assert!(service.contains("    command: loyalty\n"), "{service}");
        // The fourth participant the definitions name: 9181 is the first's.
        assert!(
            service.contains("METRICS_ADDR: 0.0.0.0:9184\n"),
            "{service}"
        );
        assert!(service.contains(own_line), "{path}: {service}");
    }
}

#[test]
fn a_message_without_its_entry_in_the_contract_is_refused_naming_it() {
    let error = file("events/contract/asyncapi.json")
        .render(
            &with_loyalty_step(),
            &repository_file("events/contract/asyncapi.json"),
        )
        .expect_err("AwardPoints has no entry");
    let GenerateError::In { file, error } = error else {
        panic!("not named by its file: {error:?}")
    };
    assert_eq!(file, "events/contract/asyncapi.json");
    assert!(
        matches!(&*error, GenerateError::MissingMessage { message, topic }
            if message == "AwardPoints" && topic == "loyalty.commands"),
        "{error:?}"
    );
}

#[test]
fn a_saga_type_taken_away_takes_its_channels_operations_and_services() {
    let orders_only: Vec<SagaDefinition> = repository_definitions()
        .into_iter()
        .filter(|d| d.name == "order")
        .collect();
    let rendered = render(
        "events/contract/asyncapi.json",
        &orders_only,
        &repository_file("events/contract/asyncapi.json"),
    );
    let document: Json = serde_json::from_str(&rendered).expect("JSON");
    assert_eq!(
        keys(&document, "channels"),
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
    let operations = keys(&document, "operations");
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
        let rendered = render(path, &orders_only, &repository_file(path));
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
    let text = repository_file("docker-compose.yml").replace("# END participants", "# END");
    let error = file("docker-compose.yml")
        .render(&repository_definitions(), &text)
        .expect_err("no END marker");
    let GenerateError::In { error, .. } = error else {
        panic!("not named by its file: {error:?}")
    };
    assert!(
        matches!(*error, GenerateError::MissingMarker { .. }),
        "{error:?}"
    );
}
