//! `sagas/order.toml` against today's order saga in code, and one test per validation rule.

use std::path::{Path, PathBuf};

use events::{Action, OrderPlaced, Reply, Topics};
use serde_json::Value as Json;
use toml::Value;
use uuid::Uuid;

use chrono::TimeDelta;

use super::*;
use crate::order_messages::Command as OrderCommand;
use crate::policy::RetryPolicy;

const ORDER: &str = include_str!("../../../sagas/order.toml");

/// The order the state machine's tests run.
fn order() -> OrderPlaced {
    crate::tests::order()
}

fn order_definition() -> SagaDefinition {
    parse("sagas/order.toml", ORDER).expect("sagas/order.toml is valid")
}

// ---------------------------------------------------------------------------------------------
// sagas/order.toml is the order saga of the public contract: its steps, participants, topics,
// commands and replies are those of the golden files (`events/golden/`).

/// The order saga's steps and the participant of each.
const ORDER_STEPS: [(&str, &str); 3] = [
    ("reserve_stock", "inventory"),
    ("charge_payment", "payment"),
    ("schedule_shipment", "shipping"),
];

#[test]
fn the_order_file_has_the_order_sagas_steps_in_order() {
    let definition = order_definition();
    assert_eq!((definition.name.as_str(), definition.version), ("order", 1));
    let names: Vec<&str> = definition.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ORDER_STEPS.map(|(step, _)| step));
    let compensable: Vec<bool> = definition.steps.iter().map(Step::compensable).collect();
    assert_eq!(compensable, [true, true, false]);
    for step in &definition.steps {
        assert_eq!(
            step.compensation.is_some(),
            step.compensable(),
            "{}",
            step.name
        );
    }
    assert_eq!(definition.pivot(), Some(2));
    assert_eq!(definition.steps[2].kind, StepKind::Pivot);
}

#[test]
fn the_order_file_is_triggered_and_routed_as_the_contract_says() {
    let definition = order_definition();
    let topics = Topics::default();
    assert_eq!(definition.trigger.topic, topics.orders());
    assert_eq!(definition.trigger.message, "OrderPlaced");
    assert_eq!(definition.trigger.key.to_string(), "$.order_id");
    let trigger = serde_json::to_value(order()).expect("serialises");
    assert_eq!(
        definition.trigger.key.resolve(&trigger),
        Some(&Json::from(order().order_id.to_string()))
    );
    for (step, (_, participant)) in definition.steps.iter().zip(ORDER_STEPS) {
        assert_eq!(step.participant, participant);
        // The participants' default COMMAND_TOPIC.
        assert_eq!(step.topic, format!("{participant}.commands"));
    }
}

#[test]
fn the_order_file_makes_the_contracts_commands_and_reads_its_replies() {
    let definition = order_definition();
    let order = order();
    let trigger = serde_json::to_value(&order).expect("serialises");
    for step in &definition.steps {
        let actions = [(Action::Forward, Some(&step.forward))]
            .into_iter()
            .chain([(Action::Compensate, step.compensation.as_ref())]);
        for (direction, action) in actions {
            let Some(action) = action else { continue };
            for attempt in [1, 5] {
                let command = action
                    .command(&definition, step, direction, &trigger, attempt)
                    .expect("a command");
                assert_eq!(command.name, action.name);
                assert_eq!(
                    (command.step.as_str(), command.action),
                    (step.name.as_str(), direction)
                );
                assert_eq!(
                    (command.saga_type.as_str(), command.saga_version),
                    ("order", 1)
                );
                assert_eq!(
                    (command.key.clone(), command.attempt),
                    (order.order_id.to_string(), attempt)
                );
                // Field for field the command of the golden files.
                let known = OrderCommand::from_wire(&command).expect("an order saga command");
                assert_eq!(known.wire(), command);
                assert_eq!(Reply::succeeded(&command).name, action.success);
                assert_eq!(
                    Reply::failed(&command, "no").map(|r| r.name),
                    action.failure
                );
            }
        }
    }
    let charge_payment = &definition.steps[1];
    let charge = charge_payment
        .forward
        .command(&definition, charge_payment, Action::Forward, &trigger, 1)
        .expect("a command");
    assert_eq!(
        OrderCommand::from_wire(&charge),
        Some(OrderCommand::ChargePayment {
            order_id: order.order_id,
            attempt: 1,
            customer_id: order.customer_id.clone(),
            amount_cents: order.total_cents,
            currency: order.currency.clone(),
        })
    );
}

#[test]
fn the_key_is_text_or_a_number_as_text() {
    let definition = order_definition();
    let key = |value: Json| {
        definition
            .trigger
            .key_of(&serde_json::json!({ "order_id": value }))
    };
    assert_eq!(key(Json::from("o-1")), Ok("o-1".to_owned()));
    assert_eq!(key(Json::from(42)), Ok("42".to_owned()));
    assert_eq!(
        key(serde_json::json!({"a": 1})),
        Err(PayloadError::KeyNotScalar {
            path: "$.order_id".into(),
            found: "an object"
        })
    );
    assert_eq!(
        definition.trigger.key_of(&serde_json::json!({})),
        Err(PayloadError::Missing {
            path: "$.order_id".into()
        })
    );
}

#[test]
fn the_order_file_retries_as_the_engine_did_before_it() {
    let definition = order_definition();
    let policy = |max_attempts| RetryPolicy {
        timeout: TimeDelta::seconds(30),
        max_attempts,
        max_timeout: TimeDelta::minutes(5),
    };
    for step in &definition.steps {
        // A step that cannot be undone is never given up on: no attempt limit.
        let forward = if step.compensable() { 8 } else { u32::MAX };
        assert_eq!(step.forward.retry, policy(forward), "{}", step.name);
        if let Some(compensation) = &step.compensation {
            assert_eq!(compensation.retry, policy(20), "{}", step.name);
        }
    }
}

#[test]
fn the_canonical_form_ignores_comments_and_layout_and_reads_back() {
    let definition = order_definition();
    let reformatted = ORDER
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n\n");
    let again = parse("elsewhere.toml", &reformatted).expect("still valid");
    assert_eq!(again.digest(), definition.digest());
    assert!(definition.digest().starts_with("sha256:") && definition.digest().len() == 71);
    let stored = parse_stored("stored order v1", &definition.canonical).expect("reads back");
    assert_eq!(
        SagaDefinition {
            file: definition.file.clone(),
            ..stored
        },
        definition
    );
    let changed = parse(
        "x.toml",
        &ORDER.replacen("timeout_ms = 30_000", "timeout_ms = 31_000", 1),
    )
    .expect("valid");
    assert_ne!(changed.digest(), definition.digest());
    assert!(matches!(
        parse_stored("stored", "{}"),
        Err(DefinitionError::Stored { .. })
    ));
}

/// The shape paths are checked against, read from each trigger message's JSON Schema, is what
/// the typed message serialises to, field for field; the sample (the schema's example) has
/// every field and passes the message's own contract checks.
#[test]
fn the_trigger_shapes_are_the_messages() {
    fn check(value: &Json, shape: &Shape, at: &str) {
        match shape {
            Shape::Text => assert!(value.is_string(), "{at} is text"),
            Shape::Integer => assert!(value.is_i64(), "{at} is an integer"),
            Shape::List(item) => {
                let list = value.as_array().expect("a list");
                assert!(!list.is_empty(), "{at}: the sample has items");
                for value in list {
                    check(value, item, &format!("{at}[]"));
                }
            }
            Shape::Object(fields) => {
                let object = value.as_object().expect("an object");
                let mut names: Vec<&str> = object
                    .keys()
                    .map(String::as_str)
                    .filter(|name| at != "$" || *name != "type")
                    .collect();
                names.sort_unstable();
                let mut expected: Vec<&str> =
                    fields.iter().map(|(name, _)| name.as_str()).collect();
                expected.sort_unstable();
                assert_eq!(names, expected, "{at}");
                for (name, shape) in fields {
                    check(&object[name.as_str()], shape, &format!("{at}.{name}"));
                }
            }
        }
    }
    let json = serde_json::to_value(order()).expect("serialises");
    let message = &TRIGGER_MESSAGES[0];
    assert_eq!(json["type"], message.name);
    let shape = message.shape().expect("OrderPlaced's schema is read");
    check(&json, shape, "$");
    // What a saga keeps is what the message's decoder makes of it, and the sample used to
    // build commands at load time has every field of the shape.
    let bytes = serde_json::to_vec(&order()).expect("serialises");
    assert_eq!((message.decode)(&bytes), Ok(json));
    check(&message.sample().expect("a sample"), shape, "$");

    // The return saga's trigger likewise.
    let request = events::ReturnRequested {
        return_id: uuid::Uuid::from_u128(9),
        order_id: uuid::Uuid::from_u128(7),
        customer_id: "alice".into(),
        items: vec![events::ReturnItem {
            sku: "WIDGET".into(),
            quantity: 1,
        }],
        refund_cents: 1_000,
        currency: "EUR".into(),
    };
    let json = serde_json::to_value(&request).expect("serialises");
    let message = trigger_message("ReturnRequested").expect("a trigger message");
    assert_eq!(json["type"], message.name);
    let shape = message.shape().expect("ReturnRequested's schema is read");
    check(&json, shape, "$");
    check(&message.sample().expect("a sample"), shape, "$");
    let bytes = serde_json::to_vec(&request).expect("serialises");
    assert_eq!((message.decode)(&bytes), Ok(json));
    for message in TRIGGER_MESSAGES.iter() {
        let sample = message
            .sample()
            .expect("every trigger message has a sample");
        let bytes = serde_json::to_vec(&sample).expect("serialises");
        assert_eq!((message.decode)(&bytes), Ok(sample), "{}", message.name);
    }
    // Whatever the bytes, a decoder answers with a reason, never a panic.
    for garbage in [&b""[..], b"\xff", b"[]", br#"{"type":"OrderPlaced"}"#] {
        assert!((message.decode)(garbage).is_err(), "{garbage:?}");
    }
}

/// What a schema the shapes cannot be read from gets: an error naming where, never a guess.
#[test]
fn a_trigger_schema_that_is_not_a_shape_is_refused_with_where() {
    let read = |schema: &'static str| {
        let message = TriggerMessage::from(events::SagaTrigger {
            name: "M",
            schema,
            decode: |_| Ok(Json::Null),
            summary: &[],
        });
        message.shape().cloned().map_err(Clone::clone)
    };
    assert_eq!(
        read(r#"{"type":"object","properties":{"a":{"type":"boolean"}},"examples":[{}]}"#),
        Err(SchemaError::Unsupported { at: "$.a".into() })
    );
    assert_eq!(
        read(r#"{"type":"object","properties":{"a":{"$ref":"x.json#/y"}},"examples":[{}]}"#),
        Err(SchemaError::UnresolvedReference {
            at: "$.a".into(),
            reference: "x.json#/y".into()
        })
    );
    assert_eq!(
        read(r#"{"type":"object","properties":{}}"#),
        Err(SchemaError::NoExample)
    );
    assert!(matches!(read("{"), Err(SchemaError::NotJson { .. })));
    assert_eq!(
        read(
            r#"{"type":"object","properties":{"type":{"const":"M"},"l":{"type":"array","items":{"$ref":"common.schema.json#/$defs/uuid"}}},"examples":[{}]}"#
        ),
        Ok(Shape::Object(vec![(
            "l".into(),
            Shape::List(Box::new(Shape::Text))
        )]))
    );
}

#[test]
fn the_sagas_folder_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sagas");
    let definitions = load_dir(&dir).expect("sagas/ loads");
    assert_eq!(definitions.len(), 2);
    let expected = SagaDefinition {
        file: dir.join("order.toml").display().to_string(),
        ..order_definition()
    };
    assert_eq!(definitions[0], expected);
    // The return saga: its own trigger topic and message, its own step names, the refund its
    // pivot.
    let returns = &definitions[1];
    assert_eq!(returns.name, "return");
    assert_eq!(
        (
            returns.trigger.topic.as_str(),
            returns.trigger.message.as_str()
        ),
        ("returns", "ReturnRequested")
    );
    assert_eq!(returns.trigger.key.to_string(), "$.return_id");
    let steps: Vec<(&str, &str, StepKind)> = returns
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.participant.as_str(), s.kind))
        .collect();
    assert_eq!(
        steps,
        [
            ("receive_return", "returns", StepKind::Compensable),
            ("restock", "inventory", StepKind::Compensable),
            ("refund", "payment", StepKind::Pivot),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Paths and payloads.

#[test]
fn field_paths_are_dotted_fields_and_nothing_else() {
    for good in ["$.order_id", "$.shipping_address.country", "$._x.Y9"] {
        let path = FieldPath::parse(good).expect(good);
        assert_eq!(path.to_string(), good);
    }
    for bad in [
        "",
        "$",
        "$.",
        "order_id",
        ".order_id",
        "$order_id",
        "$.items[0]",
        "$.items.*",
        "$..sku",
        "$.a.",
        "$.9a",
        "$.a-b",
        "$.a b",
        "$['a']",
        "$.total_cents * 2",
    ] {
        assert_eq!(FieldPath::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn a_payload_copies_whole_values_and_names_the_first_missing_path() {
    let definition = order_definition();
    let shipping = &definition.steps[2].forward;
    let trigger = serde_json::json!({
        "order_id": "o-1", "items": [], "shipping_address": {"country": "DE"}
    });
    assert_eq!(
        Json::Object(shipping.payload(&trigger).expect("maps")),
        serde_json::json!({
            "order_id": "o-1", "items": [], "address": {"country": "DE"}
        })
    );
    let charge = &definition.steps[1].forward;
    assert_eq!(
        charge.payload(&trigger),
        Err(PayloadError::Missing {
            path: "$.total_cents".into()
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Validation: each rule refuses a changed copy of sagas/order.toml, naming the file and field.

/// `sagas/order.toml` with `change` applied, parsed as `bad.toml`.
fn refused(change: impl FnOnce(&mut Value)) -> DefinitionError {
    let mut document: Value = toml::from_str(ORDER).expect("order.toml is TOML");
    change(&mut document);
    let text = toml::to_string(&document).expect("serialises");
    parse("bad.toml", &text).expect_err("the changed definition is refused")
}

/// The table holding the last key of a dotted `path` (numbers index lists), and that key.
fn parent<'a>(document: &'a mut Value, path: &str) -> (&'a mut toml::Table, String) {
    let (parents, last) = path.rsplit_once('.').unwrap_or(("", path));
    let mut value = document;
    for segment in parents.split('.').filter(|s| !s.is_empty()) {
        value = match segment.parse::<usize>() {
            Ok(index) => &mut value[index],
            Err(_) => &mut value[segment],
        };
    }
    (value.as_table_mut().expect("a table"), last.to_owned())
}

fn set(document: &mut Value, path: &str, value: Value) {
    let (table, key) = parent(document, path);
    table.insert(key, value);
}

fn remove(document: &mut Value, path: &str) {
    let (table, key) = parent(document, path);
    assert!(table.remove(&key).is_some(), "{path} is in order.toml");
}

fn text(s: &str) -> Value {
    Value::String(s.into())
}

fn assert_invalid(error: DefinitionError, field: &str, problem: Problem) {
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("bad.toml: {field}: ")),
        "{message}"
    );
    assert_eq!(error.file(), Some("bad.toml"));
    assert_eq!(error.field(), Some(field), "{message}");
    assert_eq!(error.problem(), Some(&problem), "{message}");
}

#[test]
fn a_version_below_one_is_refused() {
    for version in [0, -1, i64::from(i32::MAX) + 1] {
        let error = refused(|d| set(d, "version", Value::Integer(version)));
        assert_invalid(error, "version", Problem::VersionOutOfRange { version });
    }
}

#[test]
fn a_saga_name_that_is_not_snake_case_is_refused() {
    let error = refused(|d| set(d, "name", text("Order")));
    assert_invalid(
        error,
        "name",
        Problem::InvalidName {
            name: "Order".into(),
        },
    );
}

#[test]
fn a_step_name_that_is_not_snake_case_is_refused() {
    let error = refused(|d| set(d, "steps.1.name", text("charge payment")));
    let name = "charge payment".to_owned();
    assert_invalid(error, "steps[1].name", Problem::InvalidName { name });
}

#[test]
fn an_invalid_topic_name_is_refused() {
    let error = refused(|d| set(d, "trigger.topic", text("orders/eu")));
    let topic = "orders/eu".to_owned();
    assert_invalid(error, "trigger.topic", Problem::InvalidTopic { topic });
}

#[test]
fn an_engine_topic_as_a_command_topic_is_refused() {
    let error = refused(|d| set(d, "steps.0.topic", text("saga.replies")));
    let topic = "saga.replies".to_owned();
    assert_invalid(error, "steps[0].topic", Problem::EngineTopic { topic });
}

#[test]
fn the_trigger_topic_as_a_command_topic_is_refused() {
    let error = refused(|d| set(d, "steps.1.topic", text("orders")));
    let topic = "orders".to_owned();
    assert_invalid(
        error,
        "steps[1].topic",
        Problem::CommandTopicIsTrigger { topic },
    );
}

#[test]
fn an_unknown_trigger_message_is_refused() {
    let error = refused(|d| set(d, "trigger.message", text("OrderCancelled")));
    let message = "OrderCancelled".to_owned();
    assert_invalid(
        error,
        "trigger.message",
        Problem::UnknownTriggerMessage { message },
    );
}

#[test]
fn a_key_that_is_not_a_scalar_is_refused() {
    let error = refused(|d| set(d, "trigger.key", text("$.shipping_address")));
    let path = "$.shipping_address".to_owned();
    assert_invalid(error, "trigger.key", Problem::KeyNotScalar { path });
}

#[test]
fn a_payload_path_with_bad_syntax_is_refused() {
    let field = "steps.1.forward.payload.amount_cents";
    let error = refused(|d| set(d, field, text("$.total_cents * 100")));
    let path = "$.total_cents * 100".to_owned();
    assert_invalid(
        error,
        "steps[1].forward.payload.amount_cents",
        Problem::PathSyntax { path },
    );
}

#[test]
fn a_payload_path_the_trigger_message_lacks_is_refused() {
    let error = refused(|d| set(d, "steps.1.forward.payload.amount_cents", text("$.total")));
    assert_invalid(
        error,
        "steps[1].forward.payload.amount_cents",
        Problem::UnknownField {
            path: "$.total".into(),
            message: "OrderPlaced".into(),
            segment: "total".into(),
        },
    );
    // Into a list: paths take whole lists, never their elements' fields.
    let error = refused(|d| set(d, "steps.0.forward.payload.items", text("$.items.sku")));
    assert_invalid(
        error,
        "steps[0].forward.payload.items",
        Problem::UnknownField {
            path: "$.items.sku".into(),
            message: "OrderPlaced".into(),
            segment: "sku".into(),
        },
    );
}

#[test]
fn attempt_is_the_commands_so_a_payload_may_name_it() {
    // Until schema version 2 the engine wrote `attempt` into every payload and refused a
    // mapping of it; now it is a field of the command beside the payload.
    let mut document: Value = toml::from_str(ORDER).expect("order.toml is TOML");
    set(
        &mut document,
        "steps.0.forward.payload.attempt",
        text("$.total_cents"),
    );
    let text = toml::to_string(&document).expect("serialises");
    let definition = parse("attempt.toml", &text).expect("valid");
    let step = &definition.steps[0];
    let trigger = serde_json::to_value(order()).expect("serialises");
    let command = step
        .forward
        .command(&definition, step, Action::Forward, &trigger, 3)
        .expect("a command");
    assert_eq!(command.attempt, 3);
    assert_eq!(
        command.payload.get("attempt"),
        Some(&Json::from(order().total_cents))
    );
}

#[test]
fn a_payload_field_name_that_is_not_a_field_name_is_refused() {
    let error = refused(|d| set(d, "steps.0.forward.payload.order-id", text("$.order_id")));
    let name = "order-id".to_owned();
    assert_invalid(
        error,
        "steps[0].forward.payload.order-id",
        Problem::InvalidFieldName { name },
    );
}

#[test]
fn a_saga_without_steps_is_refused() {
    let error = refused(|d| set(d, "steps", Value::Array(Vec::new())));
    assert_invalid(error, "steps", Problem::NoSteps);
    let error = refused(|d| remove(d, "steps"));
    assert_invalid(error, "steps", Problem::NoSteps);
}

#[test]
fn a_duplicate_step_name_is_refused() {
    let error = refused(|d| set(d, "steps.2.name", text("reserve_stock")));
    let name = "reserve_stock".to_owned();
    assert_invalid(
        error,
        "steps[2].name",
        Problem::DuplicateStep { name, first: 0 },
    );
}

#[test]
fn an_unknown_pivot_step_is_refused() {
    let error = refused(|d| set(d, "pivot", text("ship")));
    assert_invalid(
        error,
        "pivot",
        Problem::UnknownStep {
            name: "ship".into(),
        },
    );
}

#[test]
fn a_step_before_the_pivot_without_compensation_is_refused() {
    let error = refused(|d| remove(d, "steps.1.compensation"));
    assert_invalid(
        error,
        "steps[1].compensation",
        Problem::MissingCompensation {
            step: "charge_payment".into(),
            pivot: Some("schedule_shipment".into()),
        },
    );
}

#[test]
fn without_a_pivot_every_step_needs_a_compensation() {
    let error = refused(|d| remove(d, "pivot"));
    assert_invalid(
        error,
        "steps[2].compensation",
        Problem::MissingCompensation {
            step: "schedule_shipment".into(),
            pivot: None,
        },
    );
}

/// A compensation for schedule_shipment, which the order saga does not have.
fn cancel_shipment() -> Value {
    toml::from_str(
        r#"
        action = "CancelShipment"
        payload = { order_id = "$.order_id" }
        success = "ShipmentCancelled"
        retry = { timeout_ms = 30_000, max_attempts = 20, max_timeout_ms = 300_000 }
        "#,
    )
    .expect("TOML")
}

#[test]
fn a_compensation_on_the_pivot_is_refused() {
    let error = refused(|d| set(d, "steps.2.compensation", cancel_shipment()));
    let step = "schedule_shipment".to_owned();
    assert_invalid(
        error,
        "steps[2].compensation",
        Problem::CompensatedPivot { step },
    );
}

/// order.toml with charge_payment as the pivot (no compensation, no max_attempts), so that
/// schedule_shipment comes after it.
fn pivot_on_charge_payment(d: &mut Value) {
    set(d, "pivot", text("charge_payment"));
    remove(d, "steps.1.compensation");
    remove(d, "steps.1.forward.retry.max_attempts");
}

#[test]
fn a_compensable_step_after_the_pivot_is_refused() {
    let error = refused(|d| {
        pivot_on_charge_payment(d);
        remove(d, "steps.2.forward.failure");
        set(d, "steps.2.compensation", cancel_shipment());
    });
    assert_invalid(
        error,
        "steps[2].compensation",
        Problem::CompensationAfterPivot {
            step: "schedule_shipment".into(),
            pivot: "charge_payment".into(),
        },
    );
}

#[test]
fn a_step_after_the_pivot_that_can_fail_is_refused() {
    let error = refused(pivot_on_charge_payment);
    assert_invalid(
        error,
        "steps[2].forward.failure",
        Problem::FailureAfterPivot {
            step: "schedule_shipment".into(),
            pivot: "charge_payment".into(),
        },
    );
    // Without the failure reply it is a valid retriable step.
    let mut document: Value = toml::from_str(ORDER).expect("TOML");
    pivot_on_charge_payment(&mut document);
    remove(&mut document, "steps.2.forward.failure");
    let text = toml::to_string(&document).expect("serialises");
    let definition = parse("good.toml", &text).expect("valid");
    let kinds: Vec<StepKind> = definition.steps.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [StepKind::Compensable, StepKind::Pivot, StepKind::Retriable]
    );
}

#[test]
fn a_zero_timeout_is_refused() {
    let error = refused(|d| set(d, "steps.0.forward.retry.timeout_ms", Value::Integer(0)));
    assert_invalid(
        error,
        "steps[0].forward.retry.timeout_ms",
        Problem::ZeroTimeout,
    );
    let field = "steps.1.compensation.retry.max_timeout_ms";
    let error = refused(|d| set(d, field, Value::Integer(0)));
    assert_invalid(
        error,
        "steps[1].compensation.retry.max_timeout_ms",
        Problem::ZeroTimeout,
    );
}

#[test]
fn a_timeout_beyond_a_week_is_refused() {
    let ms = MAX_WAIT_MS + 1;
    let error = refused(|d| {
        let ms = i64::try_from(ms).expect("fits");
        set(
            d,
            "steps.2.forward.retry.max_timeout_ms",
            Value::Integer(ms),
        );
    });
    assert_invalid(
        error,
        "steps[2].forward.retry.max_timeout_ms",
        Problem::TimeoutTooLong { ms },
    );
}

#[test]
fn a_longest_wait_below_the_first_is_refused() {
    let error = refused(|d| {
        set(
            d,
            "steps.0.forward.retry.max_timeout_ms",
            Value::Integer(1_000),
        );
    });
    assert_invalid(
        error,
        "steps[0].forward.retry.max_timeout_ms",
        Problem::MaxTimeoutBelowTimeout {
            timeout_ms: 30_000,
            max_timeout_ms: 1_000,
        },
    );
}

#[test]
fn zero_attempts_are_refused() {
    let field = "steps.0.compensation.retry.max_attempts";
    let error = refused(|d| set(d, field, Value::Integer(0)));
    assert_invalid(
        error,
        "steps[0].compensation.retry.max_attempts",
        Problem::ZeroAttempts,
    );
}

#[test]
fn a_compensable_step_without_max_attempts_is_refused() {
    let error = refused(|d| remove(d, "steps.0.forward.retry.max_attempts"));
    assert_invalid(
        error,
        "steps[0].forward.retry.max_attempts",
        Problem::MissingAttempts,
    );
}

#[test]
fn max_attempts_on_the_pivot_is_refused() {
    let error = refused(|d| set(d, "steps.2.forward.retry.max_attempts", Value::Integer(8)));
    let step = "schedule_shipment".to_owned();
    assert_invalid(
        error,
        "steps[2].forward.retry.max_attempts",
        Problem::AttemptsNotApplicable { step },
    );
}

#[test]
fn a_message_name_that_is_not_upper_camel_case_is_refused() {
    let error = refused(|d| set(d, "steps.0.forward.action", text("reserve_stock")));
    let name = "reserve_stock".to_owned();
    assert_invalid(
        error,
        "steps[0].forward.action",
        Problem::InvalidMessageName { name },
    );
    let error = refused(|d| set(d, "steps.1.compensation.success", text("Payment Refunded")));
    let name = "Payment Refunded".to_owned();
    assert_invalid(
        error,
        "steps[1].compensation.success",
        Problem::InvalidMessageName { name },
    );
}

#[test]
fn a_command_sent_by_two_actions_is_refused() {
    let error = refused(|d| set(d, "steps.1.compensation.action", text("ReleaseStock")));
    assert_invalid(
        error,
        "steps[1].compensation.action",
        Problem::DuplicateAction {
            action: "ReleaseStock".into(),
            other: "steps[0].compensation.action".into(),
        },
    );
}

#[test]
fn a_reply_with_two_meanings_is_refused() {
    let error = refused(|d| set(d, "steps.0.forward.failure", text("StockReserved")));
    assert_invalid(
        error,
        "steps[0].forward.failure",
        Problem::ConflictingReply {
            reply: "StockReserved".into(),
            meaning: ReplyMeaning::ForwardSuccess,
            other: "steps[0].forward.success".into(),
        },
    );
    let error = refused(|d| set(d, "steps.2.forward.failure", text("CompensationFailed")));
    assert_invalid(
        error,
        "steps[2].forward.failure",
        Problem::ConflictingReply {
            reply: "CompensationFailed".into(),
            meaning: ReplyMeaning::CompensationFailure,
            other: "steps[0].compensation.failure".into(),
        },
    );
}

#[test]
fn a_participant_with_two_command_topics_is_refused() {
    let error = refused(|d| set(d, "steps.1.participant", text("inventory")));
    assert_invalid(
        error,
        "steps[1].topic",
        Problem::ParticipantTopicConflict {
            participant: "inventory".into(),
            other_topic: "inventory.commands".into(),
            other: "steps[0].topic".into(),
        },
    );
}

#[test]
fn a_command_topic_of_two_participants_is_refused() {
    let error = refused(|d| set(d, "steps.1.topic", text("inventory.commands")));
    assert_invalid(
        error,
        "steps[1].topic",
        Problem::TopicParticipantConflict {
            topic: "inventory.commands".into(),
            other_participant: "inventory".into(),
            other: "steps[0].topic".into(),
        },
    );
}

#[test]
fn unknown_and_missing_fields_are_named_with_the_file() {
    let error = refused(|d| {
        remove(d, "steps.0.forward.retry.timeout_ms");
        set(d, "steps.0.forward.retry.timout_ms", Value::Integer(1));
    });
    // toml's message, which names the field and the line, is the cause.
    let message = with_causes(&error);
    assert!(matches!(error, DefinitionError::Syntax { .. }), "{message}");
    assert!(message.starts_with("bad.toml: "), "{message}");
    assert!(message.contains("timout_ms"), "{message}");

    let error = refused(|d| remove(d, "trigger.topic"));
    let message = with_causes(&error);
    assert!(message.starts_with("bad.toml: "), "{message}");
    assert!(message.contains("missing field `topic`"), "{message}");

    let error = parse("bad.toml", "name = ").expect_err("not TOML");
    assert!(error.to_string().starts_with("bad.toml: "), "{error}");
}

// ---------------------------------------------------------------------------------------------
// The folder: files against each other.

/// A folder of its own under the system's temporary folder, removed when dropped.
struct Folder(PathBuf);

impl Folder {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("saga-definitions-{}", Uuid::new_v4()));
        std::fs::create_dir(&path).expect("creates a temporary folder");
        Self(path)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("writes");
        path.display().to_string()
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn order_with(change: impl FnOnce(&mut Value)) -> String {
    let mut document: Value = toml::from_str(ORDER).expect("TOML");
    change(&mut document);
    toml::to_string(&document).expect("serialises")
}

fn assert_invalid_in(error: DefinitionError, file: &str, field: &str, problem: Problem) {
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("{file}: {field}: ")),
        "{message}"
    );
    assert_eq!(error.problem(), Some(&problem), "{message}");
}

#[test]
fn the_same_saga_version_twice_is_refused_and_two_versions_load() {
    let folder = Folder::new();
    let first = folder.write("a.toml", ORDER);
    let second = folder.write("b.toml", ORDER);
    let error = load_dir(&folder.0).expect_err("refused");
    assert_invalid_in(
        error,
        &second,
        "version",
        Problem::DuplicateVersion {
            name: "order".into(),
            version: 1,
            other_file: first,
        },
    );

    folder.write(
        "b.toml",
        &order_with(|d| set(d, "version", Value::Integer(2))),
    );
    folder.write("README.md", "not a definition");
    let definitions = load_dir(&folder.0).expect("v1 and v2");
    let versions: Vec<(&str, i32)> = definitions
        .iter()
        .map(|d| (d.name.as_str(), d.version))
        .collect();
    assert_eq!(versions, [("order", 1), ("order", 2)]);
}

#[test]
fn two_saga_types_on_one_trigger_are_refused() {
    let folder = Folder::new();
    let first = folder.write("a.toml", ORDER);
    let second = folder.write(
        "b.toml",
        &order_with(|d| set(d, "name", text("order_copy"))),
    );
    let error = load_dir(&folder.0).expect_err("refused");
    assert_invalid_in(
        error,
        &second,
        "trigger",
        Problem::SharedTrigger {
            topic: "orders".into(),
            message: "OrderPlaced".into(),
            other_saga: "order".into(),
            other_file: first,
        },
    );
}

#[test]
fn a_participant_with_another_topic_in_another_file_is_refused() {
    let folder = Folder::new();
    let first = folder.write("a.toml", ORDER);
    let second = folder.write(
        "b.toml",
        &order_with(|d| {
            set(d, "name", text("order_copy"));
            set(d, "trigger.topic", text("orders.copy"));
            set(d, "steps.1.topic", text("payments.commands"));
        }),
    );
    let error = load_dir(&folder.0).expect_err("refused");
    assert_invalid_in(
        error,
        &second,
        "steps[1].topic",
        Problem::ParticipantTopicConflict {
            participant: "payment".into(),
            other_topic: "payment.commands".into(),
            other: format!("{first} steps[1].topic"),
        },
    );
}

#[test]
fn a_step_name_of_another_saga_type_is_refused() {
    // Participants route commands by step name and key their ledger by (saga key, step): a
    // step name shared by two saga types would mix their answers.
    let folder = Folder::new();
    let first = folder.write("a.toml", ORDER);
    let second = folder.write(
        "b.toml",
        &order_with(|d| {
            set(d, "name", text("order_copy"));
            set(d, "trigger.topic", text("orders.copy"));
        }),
    );
    let error = load_dir(&folder.0).expect_err("refused");
    assert_invalid_in(
        error,
        &second,
        "steps[0].name",
        Problem::StepOfAnotherSaga {
            step: "reserve_stock".into(),
            other_saga: "order".into(),
            other_file: first,
        },
    );
}

#[test]
fn a_folder_without_definitions_or_that_cannot_be_read_is_refused() {
    let folder = Folder::new();
    folder.write("README.md", "no definitions here");
    let error = load_dir(&folder.0).expect_err("refused");
    assert!(
        matches!(error, DefinitionError::NoDefinitions { .. }),
        "{error}"
    );
    assert!(error.to_string().contains(&folder.0.display().to_string()));

    let missing = folder.0.join("missing");
    let error = load_dir(&missing).expect_err("refused");
    assert!(matches!(error, DefinitionError::ReadDir { .. }), "{error}");
    assert!(error.to_string().contains(&missing.display().to_string()));
}

#[test]
fn an_invalid_file_in_the_folder_is_named_by_its_path() {
    let folder = Folder::new();
    folder.write("a.toml", ORDER);
    let bad = folder.write(
        "b.toml",
        &order_with(|d| set(d, "version", Value::Integer(0))),
    );
    let error = load_dir(&folder.0).expect_err("refused");
    assert_invalid_in(
        error,
        &bad,
        "version",
        Problem::VersionOutOfRange { version: 0 },
    );
}

/// The published wire contract (`events/contract/asyncapi.json`) describes the order saga as
/// its file defines it: each step's command topic is a channel carrying its commands, and
/// `saga.replies` carries every reply the definition names.
/// The return saga's golden commands and replies (`events/golden/`), by name.
const RETURN_GOLDEN: [(&str, &str); 12] = [
    (
        "ReceiveReturn",
        include_str!("../../../events/golden/ReceiveReturn.json"),
    ),
    (
        "RejectReturn",
        include_str!("../../../events/golden/RejectReturn.json"),
    ),
    (
        "Restock",
        include_str!("../../../events/golden/Restock.json"),
    ),
    (
        "UndoRestock",
        include_str!("../../../events/golden/UndoRestock.json"),
    ),
    (
        "IssueRefund",
        include_str!("../../../events/golden/IssueRefund.json"),
    ),
    (
        "ReturnReceived",
        include_str!("../../../events/golden/ReturnReceived.json"),
    ),
    (
        "ReturnRejected",
        include_str!("../../../events/golden/ReturnRejected.json"),
    ),
    (
        "Restocked",
        include_str!("../../../events/golden/Restocked.json"),
    ),
    (
        "RestockRefused",
        include_str!("../../../events/golden/RestockRefused.json"),
    ),
    (
        "RestockUndone",
        include_str!("../../../events/golden/RestockUndone.json"),
    ),
    (
        "RefundIssued",
        include_str!("../../../events/golden/RefundIssued.json"),
    ),
    (
        "RefundRefused",
        include_str!("../../../events/golden/RefundRefused.json"),
    ),
];

fn return_golden(name: &str) -> &'static str {
    RETURN_GOLDEN
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
        .unwrap_or_else(|| panic!("no golden file {name}"))
}

/// `sagas/return.toml` makes, from the golden `ReturnRequested`, exactly the golden commands
/// of the return saga, and each golden reply answers the step and direction it names.
#[test]
fn the_return_file_makes_the_golden_commands_and_reads_the_golden_replies() {
    let definition = parse(
        "sagas/return.toml",
        include_str!("../../../sagas/return.toml"),
    )
    .expect("sagas/return.toml is valid");
    let message = trigger_message(&definition.trigger.message).expect("a trigger message");
    let trigger =
        (message.decode)(include_str!("../../../events/golden/ReturnRequested.json").as_bytes())
            .expect("the golden ReturnRequested decodes");
    for step in &definition.steps {
        let actions = [(Action::Forward, Some(&step.forward))]
            .into_iter()
            .chain([(Action::Compensate, step.compensation.as_ref())]);
        for (direction, action) in actions {
            let Some(action) = action else { continue };
            let command = action
                .command(&definition, step, direction, &trigger, 1)
                .expect("a command");
            let golden = events::Envelope::<events::Command>::from_json(
                return_golden(&action.name).as_bytes(),
            )
            .expect("the golden command decodes");
            assert_eq!(golden.body, command, "{}", action.name);
            for (reply, failed) in std::iter::once((&action.success, false))
                .chain(action.failure.iter().map(|f| (f, true)))
            {
                if reply == "CompensationFailed" {
                    continue;
                }
                let golden = events::Envelope::<Reply>::from_json(return_golden(reply).as_bytes())
                    .expect("the golden reply decodes");
                assert_eq!(
                    (golden.body.step.as_str(), golden.body.action),
                    (step.name.as_str(), direction),
                    "{reply}"
                );
                assert_eq!(
                    matches!(golden.body.outcome, events::Outcome::Failed { .. }),
                    failed,
                    "{reply}"
                );
                assert_eq!(golden.body.key, command.key, "{reply}");
            }
        }
    }
}

#[test]
fn the_asyncapi_document_describes_the_order_file() {
    let doc: Json = serde_json::from_str(include_str!("../../../events/contract/asyncapi.json"))
        .expect("asyncapi.json is JSON");
    let channel_at = |topic: &str| {
        let address = format!("{{prefix}}{topic}");
        doc["channels"]
            .as_object()
            .and_then(|channels| channels.values().find(|c| c["address"] == address.as_str()))
            .unwrap_or_else(|| panic!("no channel for {topic}"))
            .clone()
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sagas");
    // Every saga of the repository, the return saga beside the order saga.
    for definition in load_dir(&dir).expect("sagas/ loads") {
        let trigger = channel_at(&definition.trigger.topic);
        assert!(trigger["messages"]
            .get(&definition.trigger.message)
            .is_some());
        let replies = channel_at(ENGINE_TOPICS[0]);
        for step in &definition.steps {
            let commands = channel_at(&step.topic);
            for action in std::iter::once(&step.forward).chain(&step.compensation) {
                assert!(
                    commands["messages"].get(&action.name).is_some(),
                    "{} is not on {}",
                    action.name,
                    step.topic
                );
                for reply in std::iter::once(&action.success).chain(&action.failure) {
                    assert!(replies["messages"].get(reply).is_some(), "{reply}");
                }
            }
        }
    }
}
