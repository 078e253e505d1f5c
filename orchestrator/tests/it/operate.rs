//! Operating the engine: the OpenAPI document against the live server, filters and cursor
//! pagination, `/stats`, the live SSE stream, `/metrics` in Prometheus format, and one trace
//! per order across Kafka.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::message::Headers;
use rdkafka::Message;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{definition, eventually, order, TestSystem};

/// The OpenAPI document the server serves.
pub(crate) fn openapi() -> Value {
    serde_json::from_str(orchestrator::api::OPENAPI_JSON).expect("openapi.json is JSON")
}

/// Checks `body` against the schema the document gives for `method path` answering `status`.
pub(crate) fn assert_documented(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let escaped = path.replace('~', "~0").replace('/', "~1");
    let mut pointer = format!("/paths/{escaped}/{method}/responses/{status}");
    // A shared response (`#/components/responses/...`) is a reference.
    while let Some(target) = doc
        .pointer(&pointer)
        .unwrap_or_else(|| {
            panic!("{method} {path} answered {status}, which the document does not list")
        })
        .get("$ref")
        .and_then(Value::as_str)
    {
        pointer = target.trim_start_matches('#').to_owned();
    }
    let schema_pointer = format!("{pointer}/content/application~1json/schema");
    assert!(
        doc.pointer(&schema_pointer).is_some(),
        "{method} {path} {status} has no JSON schema in the document"
    );
    // The whole document is the root, so `#/components/...` references resolve.
    let mut root = doc.clone();
    // As a URI fragment, the path template's braces must be percent-encoded.
    let fragment = schema_pointer.replace('{', "%7B").replace('}', "%7D");
    root["$ref"] = json!(format!("#{fragment}"));
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .expect("the document's schemas compile");
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status} does not match the document: {errors:?}\nbody: {body}"
    );
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let doc = openapi();
    assert!(doc["openapi"]
        .as_str()
        .unwrap_or_default()
        .starts_with("3."));
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flatten()
                .filter(|(method, _)| {
                    ["get", "post", "put", "patch", "delete"].contains(&method.as_str())
                })
                .map(move |(method, _)| (method.clone(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = orchestrator::api::ROUTES
        .iter()
        .map(|(method, path, _)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    assert_eq!(documented, served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_as_its_openapi_document_says() {
    let system = TestSystem::start().await;
    let doc = openapi();

    // The check is not vacuous: a body that breaks the schema fails it.
    let wrong = json!({ "saga_id": "not a uuid", "state": "lost" });
    assert!(std::panic::catch_unwind(|| {
        assert_documented(&doc, "get", "/sagas/{saga_id}", 200, &wrong);
    })
    .is_err());

    // The served document is the file with this deployment's step names filled in.
    let (status, served_doc) = system.get("/openapi.json").await;
    assert_eq!(status, 200);
    // The repository's sagas: the order saga's steps and the return saga's.
    let steps = [
        "charge_payment",
        "receive_return",
        "refund",
        "reserve_stock",
        "restock",
        "schedule_shipment",
    ]
    .map(String::from);
    let saga_types = ["order", "return"].map(String::from);
    let expected = orchestrator::api::openapi_for(&steps, &saga_types).expect("the file is JSON");
    assert_eq!(
        served_doc, expected,
        "the served document is the checked one"
    );
    assert_eq!(
        served_doc["components"]["schemas"]["StepName"]["enum"],
        json!(steps)
    );
    assert_eq!(
        served_doc["paths"]["/definitions/{saga_type}/sagas"]["post"]["parameters"][0]["schema"]
            ["enum"],
        json!(saga_types)
    );
    let doc = expected;

    let mut body = serde_json::to_value(order("alice", "WIDGET", 1, "DE")).expect("json");
    if let Some(fields) = body.as_object_mut() {
        fields.remove("order_id");
    }
    let (status, accepted) = system.post("/orders", &body.to_string()).await;
    assert_documented(&doc, "post", "/orders", status, &accepted);
    let order_id: Uuid = accepted["order_id"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .expect("uuid");
    let saga = system.finished_saga(order_id).await;
    let saga_id = saga["saga_id"].as_str().unwrap_or_default().to_owned();
    let failing = order("carol", "WIDGET", 1, "DE");
    system.place(&failing).await;
    system.finished_saga(failing.order_id).await;

    let unknown = Uuid::new_v4();
    for (template, path) in [
        ("/healthz", "/healthz".to_owned()),
        ("/stats", "/stats".to_owned()),
        ("/sagas", "/sagas".to_owned()),
        (
            "/sagas",
            "/sagas?state=compensated&step=&limit=1".to_owned(),
        ),
        ("/sagas", "/sagas?state=nope".to_owned()),
        ("/sagas", "/sagas?cursor=garbage".to_owned()),
        ("/sagas/{saga_id}", format!("/sagas/{saga_id}")),
        ("/sagas/{saga_id}", format!("/sagas/{unknown}")),
        ("/sagas/{saga_id}", "/sagas/not-a-uuid".to_owned()),
        (
            "/sagas/{saga_id}/history",
            format!("/sagas/{saga_id}/history"),
        ),
        (
            "/sagas/{saga_id}/history",
            format!("/sagas/{unknown}/history"),
        ),
        ("/sagas/{saga_id}/watch", format!("/sagas/{unknown}/watch")),
        ("/sagas/{saga_id}/watch", "/sagas/x/watch".to_owned()),
        (
            "/orders/{order_id}/saga",
            format!("/orders/{order_id}/saga"),
        ),
        ("/orders/{order_id}/saga", format!("/orders/{unknown}/saga")),
    ] {
        let (status, body) = system.get(&path).await;
        assert_documented(&doc, "get", template, status, &body);
    }
    let operator = json!({ "reason": "checking the document" }).to_string();
    for (template, path, body) in [
        (
            "/sagas/{saga_id}/retry",
            format!("/sagas/{saga_id}/retry"),
            operator.clone(),
        ),
        (
            "/sagas/{saga_id}/skip",
            format!("/sagas/{unknown}/skip"),
            operator.clone(),
        ),
        (
            "/sagas/{saga_id}/abort",
            format!("/sagas/{saga_id}/abort"),
            "{}".to_owned(),
        ),
        (
            "/orders",
            "/orders".to_owned(),
            "{\"customer_id\": 1}".to_owned(),
        ),
    ] {
        let (status, response) = system.post(&path, &body).await;
        assert_documented(&doc, "post", template, status, &response);
    }
    let (status, page, content_type) = {
        let (status, content_type, text) = system.get_text("/").await;
        (status, text, content_type)
    };
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(page.contains("/ui/app.js"), "the page loads its script");
    for asset in ["/ui/app.js", "/ui/style.css"] {
        let (status, _, text) = system.get_text(asset).await;
        assert_eq!(status, 200, "{asset}");
        assert!(!text.is_empty(), "{asset}");
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_filter_by_state_age_step_and_reason_and_page_with_a_cursor() {
    let system = TestSystem::start().await;
    let mut placed = Vec::new();
    for customer in ["alice", "alice", "alice", "carol", "carol"] {
        let next = order(customer, "WIDGET", 1, "DE");
        system.place(&next).await;
        placed.push(next.order_id);
    }
    for order_id in &placed {
        system.finished_saga(*order_id).await;
    }

    // A page that holds the last saga says so: no cursor to an empty page.
    let (_, all) = system.get("/sagas?limit=5").await;
    assert_eq!(all["sagas"].as_array().map(Vec::len), Some(5));
    assert!(all["next_cursor"].is_null(), "{all}");

    // Two per page: 5 sagas take three pages, and no saga shows up twice.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for page_number in 0.. {
        assert!(page_number < 5, "pagination does not end");
        let path = match &cursor {
            Some(c) => format!("/sagas?limit=2&cursor={c}"),
            None => "/sagas?limit=2".to_owned(),
        };
        let (status, page) = system.get(&path).await;
        assert_eq!(status, 200, "{page}");
        for saga in page["sagas"].as_array().expect("sagas") {
            seen.push(saga["order_id"].as_str().unwrap_or_default().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut expected: Vec<String> = placed.iter().map(Uuid::to_string).collect();
    expected.sort();
    let mut listed = seen.clone();
    listed.sort();
    assert_eq!(listed, expected, "every saga exactly once across the pages");

    // carol cannot pay: "insufficient funds"; the match ignores case.
    let (_, compensated) = system
        .get("/sagas?state=compensated&reason=Insufficient%20FUNDS")
        .await;
    let compensated = compensated["sagas"].as_array().cloned().unwrap_or_default();
    assert_eq!(compensated.len(), 2, "{compensated:?}");
    assert!(compensated.iter().all(|s| s["failure_reason"]
        .as_str()
        .unwrap_or_default()
        .contains("insufficient funds")));
    let (_, none) = system.get("/sagas?reason=no%20such%20reason").await;
    assert_eq!(none["sagas"].as_array().map(Vec::len), Some(0));
    let (_, old) = system.get("/sagas?min_age_secs=3600").await;
    assert_eq!(
        old["sagas"].as_array().map(Vec::len),
        Some(0),
        "nothing is an hour old"
    );
    let (_, young) = system.get("/sagas?min_age_secs=0").await;
    assert_eq!(young["sagas"].as_array().map(Vec::len), Some(5));
    // Finished sagas wait on no step.
    let (_, waiting) = system.get("/sagas?step=charge_payment").await;
    assert_eq!(waiting["sagas"].as_array().map(Vec::len), Some(0));
    let (status, _) = system.get("/sagas?step=fly").await;
    assert_eq!(status, 400);
    // No text in PostgreSQL holds NUL; the query must not reach it.
    let (status, _) = system.get("/sagas?reason=a%00b").await;
    assert_eq!(status, 400);
    // A cursor the server did not write, here a time before PostgreSQL's first (4713 BC).
    let (status, _) = system
        .get("/sagas?cursor=-999999999999999999_00000000000000000000000000000000")
        .await;
    assert_eq!(status, 400);

    let (status, stats) = system.get("/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["counts"]["completed"], 3, "{stats}");
    assert_eq!(stats["counts"]["compensated"], 2, "{stats}");
    assert_eq!(stats["total"], 5);
    assert!(
        stats["completed_per_sec"].as_f64().unwrap_or_default() > 0.0,
        "{stats}"
    );
    assert!(stats["oldest_running_secs"].is_null(), "{stats}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_saga_can_be_filtered_by_its_step_and_watched_live_until_it_ends() {
    // Payment is down, so the saga waits on charge_payment until it is started.
    let mut system = TestSystem::start_with(crate::helpers::Options {
        without: vec!["payment"],
        ..Default::default()
    })
    .await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let waiting = eventually("the saga to wait on charge_payment", || async {
        let (_, page) = system.get("/sagas?state=running&step=charge_payment").await;
        page["sagas"].as_array().and_then(|s| s.first().cloned())
    })
    .await;
    assert_eq!(waiting["current_step"], "charge_payment");
    let saga_id = waiting["saga_id"].as_str().unwrap_or_default().to_owned();
    let (_, stats) = system.get("/stats").await;
    assert_eq!(stats["counts"]["running"], 1, "{stats}");
    assert!(stats["oldest_running_secs"].as_f64().is_some(), "{stats}");

    let mut stream = system
        .get_response(&format!("/sagas/{saga_id}/watch"))
        .await;
    assert_eq!(stream.status(), 200);
    let content_type = crate::helpers::content_type(&stream);
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );

    // Read what the stream has so far, then let the saga finish while it is open.
    let mut text = String::new();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
        .await
        .expect("a first event within 10 s")
        .expect("stream")
        .expect("a chunk");
    text.push_str(&String::from_utf8_lossy(&first));
    system.start_participant("payment", 0);
    crate::helpers::read_to_end(&mut stream, &mut text).await;

    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter_map(|raw| {
            let name = raw.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = raw.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name.to_owned(), serde_json::from_str(data).ok()?))
        })
        .collect();
    let states: Vec<&str> = events
        .iter()
        .filter(|(name, _)| name == "saga")
        .filter_map(|(_, saga)| saga["state"].as_str())
        .collect();
    assert_eq!(states.first(), Some(&"running"), "{text}");
    assert_eq!(states.last(), Some(&"completed"), "{text}");
    let versions: Vec<i64> = events
        .iter()
        .filter(|(name, _)| name == "saga")
        .filter_map(|(_, saga)| saga["version"].as_i64())
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    let history_ids: Vec<i64> = events
        .iter()
        .filter(|(name, _)| name == "history")
        .filter_map(|(_, entry)| entry["id"].as_i64())
        .collect();
    assert!(history_ids.len() >= 4, "started + three replies: {text}");
    assert!(
        history_ids.windows(2).all(|w| w[0] < w[1]),
        "each history line once, in order"
    );
    assert_eq!(
        events
            .last()
            .map(|(name, data)| (name.as_str(), data["state"].clone())),
        Some(("end", json!("completed")))
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text_and_count_sagas() {
    let system = TestSystem::start().await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    system.finished_saga(placed.order_id).await;
    // Metrics are process-wide and tests share the process, so check presence and shape, not
    // exact counts.
    let (status, content_type, text) = eventually("sagas_finished_total on /metrics", || async {
        let answer = system.get_text("/metrics").await;
        answer.2.contains("sagas_finished_total").then_some(answer)
    })
    .await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let names: BTreeSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for expected in [
        "sagas_started_total",
        "sagas_finished_total",
        "messages_consumed_total",
        "outbox_published_total",
    ] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
    // Latencies are histograms (with buckets), which Prometheus can aggregate across
    // instances, not summaries.
    for histogram in [
        "saga_duration_seconds",
        "saga_step_duration_seconds",
        "message_handle_duration_seconds",
    ] {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == histogram)
            .unwrap_or_else(|| panic!("{histogram} missing from {names:?}"));
        assert!(
            matches!(sample.value, prometheus_parse::Value::Histogram(ref buckets) if !buckets.is_empty()),
            "{histogram} is a histogram: {:?}",
            sample.value
        );
    }
    let completed = scrape
        .samples
        .iter()
        .find(|s| s.metric == "sagas_finished_total" && s.labels.get("state") == Some("completed"))
        .expect("completed sagas counted");
    match completed.value {
        prometheus_parse::Value::Counter(n) => assert!(n >= 1.0),
        ref other => panic!("sagas_finished_total is a counter, got {other:?}"),
    }
    for (name, help) in &scrape.docs {
        assert!(!help.is_empty(), "{name} has HELP text");
    }
    lint_metric_names(&text);
    system.stop().await;
}

/// What `promtool check metrics` insists on: counters end in `_total`, every family has HELP
/// and TYPE, names are snake case.
fn lint_metric_names(text: &str) {
    let mut typed = BTreeSet::new();
    let mut helped = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("#"), Some("TYPE"), Some(name), Some(kind)) => {
                assert!(
                    name.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                    "{name} is snake case"
                );
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter {name} ends in _total");
                }
                typed.insert(name.to_owned());
            }
            (Some("#"), Some("HELP"), Some(name), Some(_)) => {
                helped.insert(name.to_owned());
            }
            _ => {}
        }
    }
    assert!(!typed.is_empty());
    assert_eq!(typed, helped, "every family has both TYPE and HELP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_every_command_reply_and_event() {
    let system = TestSystem::start().await;
    let trace_id = Uuid::new_v4().simple().to_string();
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place_traced(&placed, &traceparent).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");

    // A command and a reply per step (3 of each), plus the saga's events.
    let steps = &definition("order").steps;
    let mut topics = vec![system.topics.replies(), system.topics.saga_events()];
    topics.extend(steps.iter().map(|step| system.topics.named(&step.topic)));
    let mut span_ids = BTreeSet::new();
    for topic in &topics {
        let expected = if *topic == system.topics.replies() {
            steps.len()
        } else {
            1
        };
        for record in system.read_topic(topic, expected).await {
            let header = record
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "traceparent"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| panic!("a record on {topic} without traceparent"));
            let parts: Vec<&str> = header.split('-').collect();
            assert_eq!(parts.len(), 4, "{header}");
            assert_eq!(
                parts[1], trace_id,
                "{topic} carries the order's trace: {header}"
            );
            assert_ne!(parts[2], client_span, "each hop has a span of its own");
            span_ids.insert(parts[2].to_owned());
            // The order's trace has no tracestate: none is written (W3C, and the contract's
            // TraceHeaders: only when not empty).
            let tracestate = record
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "tracestate"));
            assert!(
                tracestate.is_none_or(|h| h.value.is_some_and(|v| !v.is_empty())),
                "an empty tracestate on {topic}"
            );
        }
    }
    assert!(
        span_ids.len() >= topics.len(),
        "distinct publish spans: {span_ids:?}"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_finished_sagas_their_history_and_old_inbox_rows_but_keeps_failed_ones() {
    let system = TestSystem::start_with(crate::helpers::Options {
        retention_secs: Some(1),
        ..Default::default()
    })
    .await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    let saga_id = saga["saga_id"].as_str().unwrap_or_default().to_owned();
    // A failed saga (as if its compensation had run out of attempts) must stay.
    let orchestrator = system.schema("orchestrator").await;
    let failed_id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO sagas (id, saga_key, state, order_data, steps, definition_version, version, \
                            created_at, updated_at, finished_at) \
         SELECT $1, $2::text, 'failed', order_data, steps, definition_version, 0, created_at, \
                updated_at, now() - interval '1 day' FROM sagas WHERE id = $3::uuid",
    )
    .bind(failed_id)
    .bind(Uuid::new_v4())
    .bind(&saga_id)
    .execute(&orchestrator)
    .await
    .expect("insert a failed saga");

    eventually("the finished saga to be swept", || async {
        let (status, _) = system.get(&format!("/sagas/{saga_id}")).await;
        (status == 404).then_some(())
    })
    .await;
    let history: i64 =
        sqlx::query_scalar("SELECT count(*) FROM saga_history WHERE saga_id = $1::uuid")
            .bind(&saga_id)
            .fetch_one(&orchestrator)
            .await
            .expect("count history");
    assert_eq!(history, 0, "its history went with it");
    let (status, kept) = system.get(&format!("/sagas/{failed_id}")).await;
    assert_eq!(status, 200, "failed sagas wait for an operator: {kept}");
    // The counts /stats shows are kept with every insert, update and sweep: they match the
    // table (one failed saga left).
    let (_, stats) = system.get("/stats").await;
    let counted: Vec<(String, i64)> =
        sqlx::query_as("SELECT state::text, count(*) FROM sagas GROUP BY state")
            .fetch_all(&orchestrator)
            .await
            .expect("count sagas");
    assert_eq!(counted, [("failed".to_owned(), 1)]);
    assert_eq!(stats["counts"]["failed"], 1, "{stats}");
    assert_eq!(stats["total"], 1, "{stats}");
    for schema in system.running_services() {
        let pool = system.schema(schema).await;
        eventually(&format!("the {schema} inbox to be swept"), || async {
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
                .fetch_one(&pool)
                .await
                .ok()?;
            (rows == 0).then_some(())
        })
        .await;
    }
    system.stop().await;
}

/// Failed sagas (with their history), parked outbox rows and the participants' step ledger
/// entries are swept after their own retentions, like everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sagas_parked_rows_and_step_ledgers_are_swept_after_their_retention() {
    let system = TestSystem::start_with(crate::helpers::Options {
        retention_secs: Some(1),
        everything_retention_secs: Some(1),
        ..Default::default()
    })
    .await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let saga_id = saga["saga_id"].as_str().unwrap_or_default().to_owned();
    let orchestrator = system.schema("orchestrator").await;
    // A saga that failed a day ago (its compensation out of attempts), with a history line.
    let failed_id = Uuid::new_v4();
    sqlx::query(
        "WITH failed AS (
             INSERT INTO sagas (id, saga_key, state, order_data, steps, definition_version,
                                version, created_at, updated_at, finished_at, definition_name)
             SELECT $1, $2::text, 'failed', order_data, steps, definition_version, 0,
                    created_at, updated_at, now() - interval '1 day', definition_name
             FROM sagas WHERE id = $3::uuid RETURNING id)
         INSERT INTO saga_history (saga_id, at, message_type, decision, state_after)
         SELECT id, now() - interval '1 day', 'CompensationFailed', 'applied', 'failed'
         FROM failed",
    )
    .bind(failed_id)
    .bind(Uuid::new_v4())
    .bind(&saga_id)
    .execute(&orchestrator)
    .await
    .expect("insert a failed saga");
    // Rows the broker refused for good, parked a day ago, in every service.
    for schema in system.running_services() {
        sqlx::query(
            "INSERT INTO outbox_parked (id, topic, payload, headers, created_at, error, parked_at)
             SELECT g, 'orders', '\\x00', '{}', now(), 'too large', now() - interval '1 day'
             FROM generate_series(1, 3) g",
        )
        .execute(&system.schema(schema).await)
        .await
        .expect("park rows");
    }

    eventually("the failed saga and its history to be swept", || async {
        let left: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM sagas WHERE id = $1)
                  + (SELECT count(*) FROM saga_history WHERE saga_id = $1)",
        )
        .bind(failed_id)
        .fetch_one(&orchestrator)
        .await
        .ok()?;
        (left == 0).then_some(())
    })
    .await;
    for schema in system.running_services() {
        let pool = system.schema(schema).await;
        eventually(&format!("the {schema} parked rows to be swept"), || async {
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_parked")
                .fetch_one(&pool)
                .await
                .ok()?;
            (rows == 0).then_some(())
        })
        .await;
        if schema == "orchestrator" {
            continue;
        }
        eventually(&format!("the {schema} step ledger to be swept"), || async {
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM step_ledger")
                .fetch_one(&pool)
                .await
                .ok()?;
            (rows == 0).then_some(())
        })
        .await;
    }
    system.stop().await;
}

/// A flood of dead letters is swept as fast as it came: a sweep that filled its batch of
/// dead-letter marks runs again at once, not after the next interval (it waited for a full
/// batch of inbox rows, so 5,000 marks a minute were swept at most).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_marks_are_swept_as_fast_as_they_fill() {
    use messaging::config::{DatabaseConfig, RetentionConfig};

    let system = TestSystem::start_with(crate::helpers::Options {
        without: vec!["orchestrator", "inventory", "payment", "shipping"],
        ..Default::default()
    })
    .await;
    let database = DatabaseConfig {
        database_url: system.database_url().to_owned(),
        database_schema: Some("sweep_check".into()),
        database_max_connections: 1,
        ..DatabaseConfig::to("")
    };
    let (pool, _) = messaging::db::open(&database, "sweep_check", &[])
        .await
        .expect("a schema with the runtime tables");
    sqlx::query(
        "INSERT INTO dead_lettered (source_topic, source_partition, source_offset,
                                    dead_lettered_at)
         SELECT 'orders', 0, g, now() - interval '8 days' FROM generate_series(1, 12000) g",
    )
    .execute(&pool)
    .await
    .expect("dead-letter marks");
    let config = RetentionConfig {
        retention_sweep_interval_ms: 60_000,
        ..RetentionConfig::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let sweeping = tokio::spawn(messaging::retention::every(
        "test retention",
        config.sweep_interval(),
        stop.clone(),
        messaging::retention::Lease::new(pool.clone(), "test retention", config.sweep_interval()),
        {
            let pool = pool.clone();
            move || {
                let pool = pool.clone();
                let config = config.clone();
                async move { messaging::retention::sweep_inbox(&pool, &config).await }
            }
        },
    ));
    let started = std::time::Instant::now();
    let mut left = i64::MAX;
    while left > 0 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = sqlx::query_scalar("SELECT count(*) FROM dead_lettered")
            .fetch_one(&pool)
            .await
            .expect("count");
    }
    stop.cancel();
    sweeping.await.expect("the sweep stops");
    assert_eq!(
        left, 0,
        "dead-letter marks left after 10 s of a 60 s interval"
    );
    pool.close().await;
    system.stop().await;
}

/// What the stand-in collector received: content type and body of each request.
type Exports = std::sync::Arc<tokio::sync::Mutex<Vec<(String, Vec<u8>)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_when_an_endpoint_is_configured() {
    // A stand-in OTLP/HTTP collector that keeps what it receives.
    let received: Exports = Default::default();
    let collector = {
        let received = std::sync::Arc::clone(&received);
        axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let received = std::sync::Arc::clone(&received);
                    async move {
                        let content_type = headers
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        received.lock().await.push((content_type, body.to_vec()));
                        axum::http::StatusCode::OK
                    }
                },
            ),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let mut system = TestSystem::start_with(crate::helpers::Options {
        without: vec!["orchestrator"],
        ..Default::default()
    })
    .await;
    let mut orchestrator = system
        .spawn_orchestrator_process(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ])
        .await;
    let trace_id = Uuid::new_v4();
    let traceparent = format!("00-{}-00f067aa0ba902b7-01", trace_id.simple());
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place_traced(&placed, &traceparent).await;
    system.finished_saga(placed.order_id).await;

    // The export is protobuf: the trace id appears as its 16 raw bytes, the service name as
    // a string.
    let trace_bytes = trace_id.as_bytes().to_vec();
    eventually("the order's spans at the collector", || async {
        let received = received.lock().await;
        received
            .iter()
            .any(|(content_type, body)| {
                content_type == "application/x-protobuf"
                    && body.windows(16).any(|w| w == trace_bytes.as_slice())
                    && body.windows(12).any(|w| w == b"orchestrator")
            })
            .then_some(())
    })
    .await;
    // Stop the process before its topics and database go.
    orchestrator.kill().await.expect("stop the orchestrator");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_serves_metrics_and_health_on_its_own_address() {
    let system = TestSystem::start().await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    system.finished_saga(placed.order_id).await;
    // The server every participant binary starts on METRICS_ADDR.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(messaging::metrics::Metrics::install().serve(
        addr,
        messaging::health::Health::default(),
        stop.clone(),
    ));
    let client = reqwest::Client::new();
    let text = eventually("the metrics server to answer", || async {
        let response = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .ok()?;
        response.status().is_success().then_some(())?;
        response.text().await.ok()
    })
    .await;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text format");
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "messages_consumed_total"
                && s.labels.get("topic") == Some(&system.topics.named("payment.commands"))),
        "the payment participant's consumption is counted"
    );
    lint_metric_names(&text);
    let health = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert!(health.status().is_success());
    stop.cancel();
    server
        .await
        .expect("server task")
        .expect("server stops cleanly");
    system.stop().await;
}
