//! Who may call the API, what it accepts, and what a crowd of readers may take: each role
//! against each endpoint, the limits at the edge, the watch-stream cap, and a service that
//! refuses to start without tokens.

use std::time::Duration;

use orchestrator::config::ApiConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use orchestrator::auth::{token_line, Role};

use crate::helpers::{
    eventually, order, Options, TestSystem, CLIENT_TOKEN, OPERATOR_NAME, OPERATOR_TOKEN,
    VIEWER_TOKEN,
};

/// Who calls: no token, a token nobody issued, or one per role.
const CALLERS: [(&str, Option<&str>); 5] = [
    ("nobody", None),
    ("stranger", Some("a-token-nobody-issued")),
    ("viewer", Some(VIEWER_TOKEN)),
    ("client", Some(CLIENT_TOKEN)),
    ("operator", Some(OPERATOR_TOKEN)),
];

/// What each caller gets from each endpoint, in the order of [`CALLERS`]. Written out rather
/// than derived from the server's route table, so that a change to either shows here.
/// `ok` is the status a permitted call gets on the saga at hand (a completed one, which no
/// operator action can move: 409).
const TABLE: &[(&str, &str, [u16; 5])] = &[
    ("GET", "/", [200, 200, 200, 200, 200]),
    ("GET", "/ui/app.js", [200, 200, 200, 200, 200]),
    ("GET", "/openapi.json", [200, 200, 200, 200, 200]),
    ("GET", "/healthz", [401, 401, 200, 403, 200]),
    ("GET", "/metrics", [401, 401, 200, 403, 200]),
    ("GET", "/stats", [401, 401, 200, 403, 200]),
    ("GET", "/definitions", [401, 401, 200, 403, 200]),
    ("GET", "/sagas", [401, 401, 200, 403, 200]),
    ("GET", "/sagas/{saga_id}", [401, 401, 200, 403, 200]),
    ("GET", "/sagas/{saga_id}/history", [401, 401, 200, 403, 200]),
    ("GET", "/sagas/{saga_id}/watch", [401, 401, 200, 403, 200]),
    ("GET", "/orders/{order_id}/saga", [401, 401, 200, 403, 200]),
    ("POST", "/orders", [401, 401, 403, 202, 403]),
    (
        "GET",
        "/definitions/{saga_type}/sagas/{key}",
        [401, 401, 200, 403, 200],
    ),
    (
        "POST",
        "/definitions/{saga_type}/sagas",
        [401, 401, 403, 202, 403],
    ),
    ("POST", "/sagas/{saga_id}/retry", [401, 401, 403, 403, 409]),
    ("POST", "/sagas/{saga_id}/skip", [401, 401, 403, 403, 409]),
    ("POST", "/sagas/{saga_id}/abort", [401, 401, 403, 403, 409]),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_use_exactly_its_endpoints() {
    let system = TestSystem::start().await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    let saga_id = saga["saga_id"].as_str().unwrap_or_default().to_owned();

    // Every served route is in the table, with the access the server gives it.
    for (method, path, _) in orchestrator::api::ROUTES {
        assert!(
            TABLE
                .iter()
                .any(|(m, p, _)| m.eq_ignore_ascii_case(method) && p == path)
                || path.starts_with("/ui/"),
            "{method} {path} is missing from the role table"
        );
    }

    let mut new_order = serde_json::to_value(order("alice", "WIDGET", 1, "DE")).expect("json");
    if let Some(fields) = new_order.as_object_mut() {
        fields.remove("order_id");
    }
    let operator_body = json!({ "reason": "checking the role table" }).to_string();
    for (method, template, expected) in TABLE {
        let path = template
            .replace("{saga_id}", &saga_id)
            .replace("{order_id}", &placed.order_id.to_string())
            .replace("{saga_type}", "order")
            .replace("{key}", &placed.order_id.to_string());
        let body = match (*method, *template) {
            ("POST", "/orders") => Some(new_order.to_string()),
            // The placed order again: the same key, so no second saga.
            ("POST", "/definitions/{saga_type}/sagas") => {
                Some(serde_json::to_string(&placed).expect("json"))
            }
            ("POST", _) => Some(operator_body.clone()),
            _ => None,
        };
        for ((who, token), expected) in CALLERS.iter().zip(expected) {
            let response = system
                .request_as(method, &path, *token, body.as_deref())
                .await
                .expect("HTTP request");
            let status = response.status().as_u16();
            let challenge = response.headers().get("www-authenticate").cloned();
            let text = response.text().await.unwrap_or_default();
            assert_eq!(status, *expected, "{who}: {method} {path}: {text}");
            if status == 401 || status == 403 {
                let error: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let code = if status == 401 {
                    "unauthorized"
                } else {
                    "forbidden"
                };
                assert_eq!(
                    error["error"]["code"], code,
                    "{who}: {method} {path}: {text}"
                );
                assert!(
                    !text.contains(token.unwrap_or("no token at all")),
                    "an error never echoes the token"
                );
            }
            if status == 401 {
                assert_eq!(
                    challenge.as_ref().and_then(|v| v.to_str().ok()),
                    Some("Bearer"),
                    "{method} {path}"
                );
            }
        }
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_at_the_edge_refuse_big_bodies_long_fields_big_pages_and_foreign_origins() {
    let system = TestSystem::start().await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    let saga_id = saga["saga_id"].as_str().unwrap_or_default().to_owned();

    // A body over 64 KiB, before it is parsed.
    let mut big = serde_json::to_value(order("alice", "WIDGET", 1, "DE")).expect("json");
    big["customer_id"] = json!("x".repeat(70 * 1024));
    let (status, body) = system.post("/orders", &big.to_string()).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (413, &json!("body_too_large")),
        "{body}"
    );
    // Under it, every text field has its own bound, and no control characters.
    for customer in [
        "x".repeat(201),
        "al\u{0}ice".to_owned(),
        "al\u{7}ice".to_owned(),
    ] {
        let mut long = serde_json::to_value(order("alice", "WIDGET", 1, "DE")).expect("json");
        long["customer_id"] = json!(customer);
        let (status, body) = system.post("/orders", &long.to_string()).await;
        assert_eq!(status, 422, "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("customer_id"));
    }
    // A traceparent far longer than any real one is ignored, not stored.
    let response = system
        .request_as("POST", "/orders", Some(CLIENT_TOKEN), None)
        .await
        .expect("HTTP request");
    assert_eq!(response.status(), 415, "no JSON body");
    let mut traced = serde_json::to_value(order("alice", "WIDGET", 1, "DE")).expect("json");
    if let Some(fields) = traced.as_object_mut() {
        fields.remove("order_id");
    }
    let response = reqwest::Client::new()
        .post(format!("{}/orders", system.http))
        .bearer_auth(CLIENT_TOKEN)
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{}-01", "a".repeat(8000)))
        .body(traced.to_string())
        .send()
        .await
        .expect("HTTP request");
    assert_eq!(response.status(), 202);

    // Bounded pages and filters.
    for path in [
        "/sagas?limit=501".to_owned(),
        "/sagas?reason=ab".to_owned(),
        format!("/sagas?reason={}", "x".repeat(201)),
        format!("/sagas/{saga_id}/history?limit=1001"),
        format!("/sagas/{saga_id}/history?limit=0"),
        format!("/sagas/{saga_id}/history?after=-1"),
    ] {
        let (status, body) = system.get(&path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{path}: {body}");
    }
    // History pages: two lines at a time, continued with `next_after`.
    let (status, first) = system
        .get(&format!("/sagas/{saga_id}/history?limit=2"))
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["history"].as_array().map(Vec::len), Some(2));
    let after = first["next_after"].as_i64().expect("a next page");
    let (_, rest) = system
        .get(&format!("/sagas/{saga_id}/history?after={after}"))
        .await;
    let all = system.history(&saga_id).await;
    assert_eq!(
        rest["history"].as_array().map(Vec::len),
        Some(all.len() - 2),
        "{rest}"
    );
    assert!(rest["next_after"].is_null());

    // A page elsewhere cannot drive the API through a browser: not by sending its Origin...
    let from = |origin: &str| {
        reqwest::Client::new()
            .post(format!("{}/orders", system.http))
            .bearer_auth(CLIENT_TOKEN)
            .header("content-type", "application/json")
            .header("origin", origin.to_owned())
            .body(traced.to_string())
    };
    let refused = from("https://attacker.example").send().await.expect("HTTP");
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap_or(Value::Null);
    assert_eq!(body["error"]["code"], "origin_not_allowed", "{body}");
    let own = from(&system.http).send().await.expect("HTTP");
    assert_eq!(own.status(), 202, "the API's own page may");
    // ...nor by rebinding a name of its own to this loopback address.
    let rebound = reqwest::Client::new()
        .get(format!("{}/stats", system.http))
        .bearer_auth(VIEWER_TOKEN)
        .header("host", "attacker.example")
        .send()
        .await
        .expect("HTTP");
    assert_eq!(rebound.status(), 403);
    let body: Value = rebound.json().await.unwrap_or(Value::Null);
    assert_eq!(body["error"]["code"], "host_not_allowed", "{body}");
    system.stop().await;
}

/// A deployment with `api` whose payment service is down, and the id of a saga that therefore
/// stays running (its streams stay open; it can be aborted).
async fn start_with_a_saga_waiting_on_payment(api: ApiConfig) -> (TestSystem, String) {
    let system = TestSystem::start_with(Options {
        without: vec!["payment"],
        api,
        ..Default::default()
    })
    .await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga_id = system.saga_id_of(placed.order_id).await;
    (system, saga_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_beyond_the_cap_get_429_and_a_closed_one_frees_its_place() {
    let (mut system, saga_id) = start_with_a_saga_waiting_on_payment(ApiConfig {
        watch_max_streams: 3,
        ..Default::default()
    })
    .await;
    let path = format!("/sagas/{saga_id}/watch");
    let mut open = Vec::new();
    for _ in 0..3 {
        let stream = system.get_response(&path).await;
        assert_eq!(stream.status(), 200);
        open.push(stream);
    }
    let (status, body) = system.get(&path).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_streams");
    drop(open.pop());
    let reopened = crate::helpers::eventually("a freed place", || async {
        let stream = system.get_response(&path).await;
        (stream.status() == 200).then_some(stream)
    })
    .await;
    open.push(reopened);

    // All three streams see the saga finish, from the one shared feed.
    system.start_participant("payment", 0);
    for mut stream in open {
        let mut text = String::new();
        crate::helpers::read_to_end(&mut stream, &mut text).await;
        assert!(
            text.contains("event: end") && text.contains("\"state\":\"completed\""),
            "{text}"
        );
    }
    system.stop().await;
}

/// Starts the orchestrator binary with `env` and no token settings of its own, and returns
/// how it ended and what it wrote to stderr, if it ended within 10 s.
async fn start_binary(env: &[(&str, &str)]) -> Option<(bool, String)> {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .env_remove("API_TOKENS")
        .env_remove("API_TOKENS_FILE")
        .env_remove("API_OPEN_ON_LOOPBACK")
        // Nothing answers there: a service that gets past its token check fails later, with
        // another message.
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the orchestrator binary");
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .ok()?
        .expect("wait");
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    Some((output.status.success(), text))
}

#[tokio::test]
async fn without_tokens_the_service_refuses_to_start_unless_told_to_run_open_on_loopback() {
    let port = |()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
            .to_string()
    };
    let loopback = format!("127.0.0.1:{}", port(()));
    let (ok, text) = start_binary(&[("HTTP_ADDR", &loopback)])
        .await
        .expect("it stops at once");
    assert!(!ok && text.contains("no API tokens configured"), "{text}");

    let everywhere = format!("0.0.0.0:{}", port(()));
    let (ok, text) = start_binary(&[("HTTP_ADDR", &everywhere), ("API_OPEN_ON_LOOPBACK", "true")])
        .await
        .expect("it stops at once");
    assert!(!ok && text.contains("not on loopback"), "{text}");

    let (ok, text) = start_binary(&[
        ("HTTP_ADDR", &loopback),
        ("API_TOKENS", "ops operator sha256:not-a-hash"),
    ])
    .await
    .expect("it stops at once");
    assert!(!ok && text.contains("line 1"), "{text}");
    assert!(
        !text.contains("not-a-hash"),
        "the error names the line, not the token: {text}"
    );

    // Open on loopback gets past the check (and then fails on the unreachable database).
    let (ok, text) = start_binary(&[("HTTP_ADDR", &loopback), ("API_OPEN_ON_LOOPBACK", "true")])
        .await
        .unwrap_or((false, "still running after 10 s".into()));
    assert!(!ok && !text.contains("no API tokens"), "{text}");
}

/// The error that stops the binary is printed once, with each of its causes once: an
/// unreadable token file says which file, then why, and the why is not repeated under it.
#[tokio::test]
async fn a_start_up_error_prints_each_cause_once() {
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let missing = std::env::temp_dir().join(format!("no-tokens-{}", uuid::Uuid::new_v4()));
    let (ok, text) = start_binary(&[
        ("HTTP_ADDR", &free_port.to_string()),
        ("API_TOKENS_FILE", &missing.display().to_string()),
    ])
    .await
    .expect("it stops at once");
    assert!(!ok, "{text}");
    let file = format!("cannot read the API token file {}", missing.display());
    assert_eq!(text.matches(&file).count(), 1, "{text}");
    assert_eq!(
        text.matches("No such file or directory").count(),
        1,
        "the cause once: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_on_loopback_needs_no_token_and_records_the_operator_as_loopback() {
    let (system, saga_id) = start_with_a_saga_waiting_on_payment(ApiConfig {
        api_open_on_loopback: true,
        ..Default::default()
    })
    .await;
    let response = system
        .request_as(
            "POST",
            &format!("/sagas/{saga_id}/abort"),
            None,
            Some(r#"{"reason":"no token needed"}"#),
        )
        .await
        .expect("HTTP request");
    assert_eq!(response.status(), 200);
    let history = system.history(&saga_id).await;
    assert!(
        history.iter().any(|h| h["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("abort by loopback: no token needed")),
        "{history:?}"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_token_file_takes_effect_without_a_restart_and_a_broken_one_changes_nothing() {
    let file = std::env::temp_dir().join(format!("api-tokens-{}", uuid::Uuid::new_v4().simple()));
    let viewer_only = token_line("dashboards", &[Role::Viewer], VIEWER_TOKEN);
    std::fs::write(&file, &viewer_only).expect("write the token file");
    let system = TestSystem::start_with(Options {
        api: ApiConfig {
            api_tokens_file: Some(file.clone()),
            api_tokens_reload_ms: 50,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    let status_for = |token: &'static str| {
        let system = &system;
        async move {
            system
                .request_as("GET", "/stats", Some(token), None)
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or_default()
        }
    };
    assert_eq!(status_for(VIEWER_TOKEN).await, 200);
    assert_eq!(status_for(OPERATOR_TOKEN).await, 401);

    // The viewer's token revoked, an operator's issued.
    let operator_only = token_line(OPERATOR_NAME, &[Role::Operator], OPERATOR_TOKEN);
    std::fs::write(&file, &operator_only).expect("rewrite the token file");
    eventually("the edited token list to take effect", || async {
        (status_for(OPERATOR_TOKEN).await == 200 && status_for(VIEWER_TOKEN).await == 401)
            .then_some(())
    })
    .await;

    // A broken edit, then no file at all: the last good list stays.
    std::fs::write(&file, "dashboards viewer sha256:not-hex").expect("break the token file");
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::remove_file(&file).expect("remove the token file");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status_for(OPERATOR_TOKEN).await, 200);
    assert_eq!(status_for(VIEWER_TOKEN).await, 401);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_past_its_rate_is_answered_429_and_others_are_not() {
    let system = TestSystem::start_with(Options {
        api: ApiConfig {
            api_rate_limit_per_sec: 1,
            api_rate_limit_burst: 3,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    // The deployment's own start-up checks spent some of the viewer's burst; wait it back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let get = |token: &'static str| system.request_as("GET", "/stats", Some(token), None);
    for _ in 0..3 {
        let response = get(VIEWER_TOKEN).await.expect("request");
        assert_eq!(response.status().as_u16(), 200);
    }
    let limited = get(VIEWER_TOKEN).await.expect("request");
    assert_eq!(limited.status().as_u16(), 429);
    let retry_after: u64 = limited
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = limited.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    // Another token has its own rate.
    let response = get(OPERATOR_TOKEN).await.expect("request");
    assert_eq!(response.status().as_u16(), 200);
    // And the limited one gets a request again once a second passed.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let response = get(VIEWER_TOKEN).await.expect("request");
    assert_eq!(response.status().as_u16(), 200);
    system.stop().await;
}

/// The value of the sample `name{labels}` in a `/metrics` text, if it is there.
fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_token_file_revokes_every_token_and_a_broken_one_is_reported() {
    let file = std::env::temp_dir().join(format!("api-tokens-{}", uuid::Uuid::new_v4().simple()));
    let both = [
        token_line("dashboards", &[Role::Viewer], VIEWER_TOKEN),
        token_line(OPERATOR_NAME, &[Role::Operator], OPERATOR_TOKEN),
    ]
    .join("\n");
    std::fs::write(&file, &both).expect("write the token file");
    let system = TestSystem::start_with(Options {
        api: ApiConfig {
            api_tokens_file: Some(file.clone()),
            api_tokens_reload_ms: 50,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    let status_for = |token: &'static str, path: &'static str| {
        let system = &system;
        async move {
            system
                .request_as("GET", path, Some(token), None)
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or_default()
        }
    };
    let labels = format!("file=\"{}\"", file.display());
    let metric = |name: &'static str| {
        let system = &system;
        let labels = labels.clone();
        async move {
            let response = system
                .request_as("GET", "/metrics", Some(OPERATOR_TOKEN), None)
                .await
                .expect("HTTP request");
            sample(&response.text().await.unwrap_or_default(), name, &labels)
        }
    };

    // A file that is readable and names no token revokes every token, the operator's too.
    std::fs::write(&file, "# every token revoked\n").expect("empty the token file");
    eventually("the emptied token list to take effect", || async {
        (status_for(OPERATOR_TOKEN, "/stats").await == 401
            && status_for(VIEWER_TOKEN, "/sagas").await == 401
            && status_for(CLIENT_TOKEN, "/healthz").await == 401)
            .then_some(())
    })
    .await;
    // Until tokens are issued again.
    std::fs::write(&file, &both).expect("restore the token file");
    eventually("the restored token list to take effect", || async {
        (status_for(OPERATOR_TOKEN, "/stats").await == 200).then_some(())
    })
    .await;
    assert_eq!(metric("api_tokens_stale").await, Some(0.0));

    // A broken edit keeps the list in force, and says so: a failure counted at each reload,
    // and the list marked stale.
    std::fs::write(&file, "dashboards viewer sha256:not-hex").expect("break the token file");
    let failures = eventually("failed reloads to be counted", || async {
        let stale = metric("api_tokens_stale").await;
        let failures = metric("api_token_reload_failures_total").await;
        (stale == Some(1.0) && failures >= Some(2.0)).then_some(failures)
    })
    .await;
    assert_eq!(status_for(VIEWER_TOKEN, "/stats").await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        metric("api_token_reload_failures_total").await > failures,
        "every reload of a broken file counts"
    );
    std::fs::write(&file, &both).expect("repair the token file");
    eventually("the repaired list to be in force again", || async {
        (metric("api_tokens_stale").await == Some(0.0)).then_some(())
    })
    .await;
    system.stop().await;
    let _ = std::fs::remove_file(&file);
}

/// The API's address, for raw connections.
fn api_addr(system: &TestSystem) -> String {
    system.http.trim_start_matches("http://").to_owned()
}

/// How long until the server closes `stream` (a read gives end-of-file or an error), writing
/// one byte of `trickle` every 200 ms meanwhile when given; `None` if it is still open after
/// `within`.
async fn closed_by_server(
    mut stream: TcpStream,
    trickle: bool,
    within: Duration,
) -> Option<Duration> {
    let began = Instant::now();
    let mut buffer = [0u8; 4096];
    let watching = async {
        loop {
            tokio::select! {
                read = stream.read(&mut buffer) => match read {
                    Ok(0) | Err(_) => return began.elapsed(),
                    Ok(_) => {}
                },
                () = tokio::time::sleep(Duration::from_millis(200)), if trickle => {
                    if stream.write_all(b"a").await.is_err() {
                        return began.elapsed();
                    }
                }
            }
        }
    };
    tokio::time::timeout(within, watching).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_their_headers_are_closed_while_the_api_answers() {
    let system = TestSystem::start_with(Options {
        api: ApiConfig {
            http_header_read_timeout_ms: 1_000,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    let addr = api_addr(&system);
    // 200 slow clients: each sends part of a request line and headers and never the end;
    // a fifth of them keep sending a byte every 200 ms, which must not keep them open.
    let mut slow = Vec::new();
    for i in 0..200 {
        let mut stream = TcpStream::connect(&addr).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .await
            .expect("send a partial head");
        slow.push(tokio::spawn(closed_by_server(
            stream,
            i % 5 == 0,
            Duration::from_secs(8),
        )));
    }
    // Meanwhile the API answers everyone else.
    for _ in 0..5 {
        let response = system
            .request_as("GET", "/stats", Some(VIEWER_TOKEN), None)
            .await
            .expect("HTTP request");
        assert_eq!(response.status(), 200);
    }
    for (i, closed) in slow.into_iter().enumerate() {
        let closed = closed.await.expect("watcher task");
        let after = closed.unwrap_or_else(|| {
            panic!("slow connection {i} was still open 8 s later (header timeout 1 s)")
        });
        assert!(
            after < Duration::from_secs(4),
            "slow connection {i} closed only after {after:?}"
        );
    }
    let (status, _) = system.get("/stats").await;
    assert_eq!(status, 200);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_that_sends_nothing_more_is_closed_once_idle() {
    let system = TestSystem::start_with(Options {
        api: ApiConfig {
            http_idle_timeout_ms: 500,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    let addr = api_addr(&system);

    // A kept-alive connection that sends nothing after its answer is closed once idle.
    let mut kept = TcpStream::connect(&addr).await.expect("connect");
    kept.write_all(b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("send a request");
    let mut first = [0u8; 12];
    kept.read_exact(&mut first).await.expect("an answer");
    assert_eq!(&first, b"HTTP/1.1 200");
    let idle_closed = closed_by_server(kept, false, Duration::from_secs(5))
        .await
        .expect("an idle connection is closed within 5 s (idle timeout 0.5 s)");
    assert!(idle_closed >= Duration::from_millis(300), "{idle_closed:?}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_a_connection_is_closed_at_once() {
    let cap = 16;
    let system = TestSystem::start_with(Options {
        api: ApiConfig {
            http_max_connections: cap,
            // The test client's own pooled connections go soon.
            http_idle_timeout_ms: 500,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    let addr = api_addr(&system);

    // Once the test client's own pooled connections timed out, `cap` silent connections
    // take every place, and the next one is closed at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(TcpStream::connect(&addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let extra = TcpStream::connect(&addr)
        .await
        .expect("the kernel accepts it");
    let refused_after = closed_by_server(extra, false, Duration::from_secs(3))
        .await
        .expect("a connection past HTTP_MAX_CONNECTIONS is closed at once");
    assert!(refused_after < Duration::from_secs(1), "{refused_after:?}");

    // Places come back when connections close.
    drop(held);
    eventually("a place for a new connection", || async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let response = client
            .get(format!("{}/stats", system.http))
            .bearer_auth(VIEWER_TOKEN)
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holds_at_most_its_share_of_watch_streams_and_each_stream_ends_in_time() {
    let (system, saga_id) = start_with_a_saga_waiting_on_payment(ApiConfig {
        watch_max_streams_per_token: 2,
        watch_stream_max_ms: 1_500,
        ..Default::default()
    })
    .await;
    let path = format!("/sagas/{saga_id}/watch");
    let open = |token: &'static str| system.request_as("GET", &path, Some(token), None);
    let mut first = open(VIEWER_TOKEN).await.expect("HTTP request");
    let opened = Instant::now();
    assert_eq!(first.status(), 200);
    let second = open(VIEWER_TOKEN).await.expect("HTTP request");
    assert_eq!(second.status(), 200);
    let third = open(VIEWER_TOKEN).await.expect("HTTP request");
    assert_eq!(third.status(), 429);
    let body: Value = third.json().await.unwrap_or(Value::Null);
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("WATCH_MAX_STREAMS_PER_TOKEN"),
        "{body}"
    );
    // Another token has its own share.
    let other = open(OPERATOR_TOKEN).await.expect("HTTP request");
    assert_eq!(other.status(), 200);

    // The saga is still running, yet the stream ends after its lifetime, having told the
    // client to reconnect a second later.
    let mut text = String::new();
    crate::helpers::read_to_end(&mut first, &mut text).await;
    let lived = opened.elapsed();
    assert!(
        lived >= Duration::from_millis(1_400) && lived < Duration::from_secs(6),
        "the stream lived {lived:?} (WATCH_STREAM_MAX_MS 1500)"
    );
    assert!(
        text.starts_with("retry: 1000\n") || text.contains("\nretry: 1000\n"),
        "{text}"
    );
    assert!(
        text.contains("event: saga") && !text.contains("event: end"),
        "{text}"
    );
    drop(second);
    drop(other);
    // And its place is the token's again.
    let reopened = eventually("a freed place", || async {
        let stream = open(VIEWER_TOKEN).await.ok()?;
        (stream.status() == 200).then_some(stream)
    })
    .await;
    drop(reopened);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_snapshot_sends_the_latest_history_lines_and_where_to_page_the_rest() {
    let system = TestSystem::start_with(Options {
        api: ApiConfig {
            watch_snapshot_history_lines: 2,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    let saga_id = saga["saga_id"].as_str().unwrap_or_default().to_owned();
    let history = system.history(&saga_id).await;
    assert!(history.len() > 2, "{history:?}");

    let mut stream = system
        .get_response(&format!("/sagas/{saga_id}/watch"))
        .await;
    let mut text = String::new();
    crate::helpers::read_to_end(&mut stream, &mut text).await;
    let events = sse_events(&text);
    let sent: Vec<i64> = events
        .iter()
        .filter(|(name, _)| name == "history")
        .filter_map(|(_, data)| data["id"].as_i64())
        .collect();
    let latest: Vec<i64> = history[history.len() - 2..]
        .iter()
        .filter_map(|line| line["id"].as_i64())
        .collect();
    assert_eq!(sent, latest, "{text}");
    let truncated = events
        .iter()
        .find(|(name, _)| name == "history_truncated")
        .map(|(_, data)| data.clone())
        .unwrap_or_else(|| panic!("no history_truncated event: {text}"));
    assert_eq!(truncated["through"], history[history.len() - 3]["id"]);
    // The rest is on the history API's pages, from where the event says.
    let url = truncated["history_url"].as_str().unwrap_or_default();
    let (status, page) = system.get(url).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["history"][0]["id"], history[0]["id"], "{page}");
    system.stop().await;
}

/// The events of a Server-Sent Events text: name and JSON data.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(value).ok();
                }
            }
            Some((name?, data?))
        })
        .collect()
}

/// The page and every answer carry what browsers use to protect them: a strict
/// Content-Security-Policy (no inline script or style, requests only to this server, no site
/// may frame the page), no framing for older browsers either, no content-type sniffing, no
/// referrer, and no copy kept of an answer (most hold saga data). The page's own test in
/// Chromium fails on any console error, which is where a violation of the policy shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_every_answer_carry_the_browsers_protections() {
    let system = TestSystem::start().await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    system.saga_id_of(placed.order_id).await;
    let saga_path = format!("/orders/{}/saga", placed.order_id);
    for (path, token, status) in [
        ("/", None, 200),
        ("/ui/app.js", None, 200),
        ("/ui/style.css", None, 200),
        (saga_path.as_str(), Some(VIEWER_TOKEN), 200),
        ("/sagas", None, 401),
        ("/no-such-route", Some(VIEWER_TOKEN), 404),
    ] {
        let response = system
            .request_as("GET", path, token, None)
            .await
            .expect("HTTP request");
        assert_eq!(response.status(), status, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let policy = header("content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(
                policy.contains(directive),
                "{path}: {directive} in {policy:?}"
            );
        }
        assert!(!policy.contains("unsafe-inline"), "{path}: {policy}");
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("referrer-policy"), "no-referrer", "{path}");
        assert_eq!(header("cache-control"), "no-store", "{path}");
    }
    // The page itself keeps to the policy: its script and style are files, nothing inline.
    let page = system
        .request_as("GET", "/", None, None)
        .await
        .expect("HTTP request")
        .text()
        .await
        .expect("the page");
    assert!(!page.contains("<style"), "an inline style block");
    assert!(!page.contains(" style="), "an inline style attribute");
    for script in page.split("<script").skip(1) {
        assert!(
            script.trim_start().starts_with("src="),
            "an inline script: <script{script}"
        );
    }
    system.stop().await;
}
