//! The operator's commands: place orders, watch a saga live, list and filter sagas, and move
//! a stuck one (retry, skip, abort). Orders go to Kafka as any client's would; everything
//! else talks to the orchestrator's HTTP API.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use events::{Address, LineItem, OrderPlaced, ReturnItem, ReturnRequested, Topics};
use rdkafka::producer::FutureProducer;
use serde_json::Value;
use uuid::Uuid;

use crate::load::{publish_order, publish_return, random_order};
use crate::sse::SseParser;

#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Base URL of the orchestrator's HTTP API.
    #[arg(long, env = "SAGA_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Bearer token for the API (`scripts/run.sh` prints some): a viewer's to read, an
    /// operator's to retry, skip or abort.
    #[arg(long, env = "SAGA_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificates (PEM) to trust for an `https://` API instead of the system's: the
    /// local CA of `scripts/pki.sh` (`.run/pki/ca.crt`), say.
    #[arg(long, env = "SAGA_API_CA_FILE")]
    api_ca_file: Option<PathBuf>,
    /// A client certificate (PEM) to show an API that asks for one (mutual TLS,
    /// `HTTP_TLS_CLIENT_CA_FILE`), with `--api-client-key`.
    #[arg(long, env = "SAGA_API_CLIENT_CERT", requires = "api_client_key")]
    api_client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM, PKCS#8: what `scripts/pki.sh issue` writes).
    #[arg(long, env = "SAGA_API_CLIENT_KEY", requires = "api_client_cert")]
    api_client_key: Option<PathBuf>,
}

impl ApiArgs {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// The base URL, without a trailing `/`.
    pub(crate) fn base(&self) -> &str {
        self.api.trim_end_matches('/')
    }

    /// An HTTP client builder whose requests send the token.
    pub(crate) fn client_builder(&self) -> anyhow::Result<reqwest::ClientBuilder> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = &self.token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("SAGA_API_TOKEN holds characters a header cannot")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .default_headers(headers);
        let read = |path: &Path, setting: &str| {
            std::fs::read(path).with_context(|| format!("reading {setting} {}", path.display()))
        };
        if let Some(path) = &self.api_ca_file {
            let certificates =
                reqwest::Certificate::from_pem_bundle(&read(path, "SAGA_API_CA_FILE")?)
                    .with_context(|| {
                        format!(
                            "SAGA_API_CA_FILE {} holds no PEM certificate",
                            path.display()
                        )
                    })?;
            builder = builder.tls_certs_only(certificates);
        }
        if let (Some(cert), Some(key)) = (&self.api_client_cert, &self.api_client_key) {
            let identity = reqwest::Identity::from_pkcs8_pem(
                &read(cert, "SAGA_API_CLIENT_CERT")?,
                &read(key, "SAGA_API_CLIENT_KEY")?,
            )
            .context(
                "SAGA_API_CLIENT_CERT and SAGA_API_CLIENT_KEY are no certificate and PKCS#8 key",
            )?;
            builder = builder.identity(identity);
        }
        Ok(builder)
    }

    /// An HTTP client that sends the token with every request.
    fn client(&self) -> anyhow::Result<reqwest::Client> {
        self.client_builder()?
            .build()
            .context("building the HTTP client")
    }
}

/// Where a trigger is published: the deployment's broker and topic prefix.
#[derive(Debug, Clone, Args)]
pub struct DeploymentArgs {
    #[command(flatten)]
    kafka: messaging::config::KafkaConnection,
    /// Topic prefix of the deployment.
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
}

impl DeploymentArgs {
    /// How to reach the deployment's broker.
    pub(crate) fn kafka(&self) -> &messaging::config::KafkaConnection {
        &self.kafka
    }

    /// A producer for the deployment's broker, and its topics.
    pub(crate) fn publisher(&self) -> anyhow::Result<(FutureProducer, Topics)> {
        let producer = messaging::kafka::producer_settings(&self.kafka, 5)?
            .create()
            .context("creating producer")?;
        Ok((producer, Topics::new(self.topic_prefix.clone())))
    }
}

#[derive(Debug, Clone, Args)]
pub struct OrderArgs {
    #[command(flatten)]
    deployment: DeploymentArgs,
    /// How many orders to place. More than one are random demo orders.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Percentage of random orders built to fail (with --count above 1 or --random).
    #[arg(long, default_value_t = 0)]
    failure_percent: u8,
    /// A random demo order even when placing one.
    #[arg(long)]
    random: bool,
    #[arg(long, default_value = "alice")]
    customer: String,
    #[arg(long, default_value = "WIDGET")]
    sku: String,
    #[arg(long, default_value_t = 1)]
    quantity: i32,
    #[arg(long, default_value_t = 1000)]
    unit_price_cents: i64,
    /// Shipping country (AQ and BV are refused by the demo shipping service).
    #[arg(long, default_value = "DE")]
    country: String,
    /// Watch the (single) order's saga until it ends.
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ReturnArgs {
    #[command(flatten)]
    deployment: DeploymentArgs,
    /// The order the items came from.
    #[arg(long)]
    order_id: Uuid,
    #[arg(long, default_value = "alice")]
    customer: String,
    #[arg(long, default_value = "WIDGET")]
    sku: String,
    #[arg(long, default_value_t = 1)]
    quantity: i32,
    /// What to pay back; refused when more than is left of the order's charge.
    #[arg(long, default_value_t = 1000)]
    refund_cents: i64,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// A saga id or an order id.
    id: Uuid,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// running, compensating, completed, compensated or failed.
    #[arg(long)]
    state: Option<String>,
    /// Only sagas at least this old.
    #[arg(long)]
    min_age_secs: Option<u32>,
    /// The step the saga waits on (or is stuck at): reserve_stock, charge_payment,
    /// schedule_shipment.
    #[arg(long)]
    step: Option<String>,
    /// A substring of the failure reason.
    #[arg(long)]
    reason: Option<String>,
    /// Sagas per page.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Follow the cursor through every page.
    #[arg(long)]
    all: bool,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    saga_id: Uuid,
    /// Why; recorded in the saga's history with the name of the token (who).
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// Requests a return on Kafka (topic `returns`), as a client does, and prints its return id.
pub async fn request_return(args: ReturnArgs) -> anyhow::Result<()> {
    let request = ReturnRequested {
        return_id: Uuid::new_v4(),
        order_id: args.order_id,
        customer_id: args.customer,
        items: vec![ReturnItem {
            sku: args.sku,
            quantity: args.quantity,
        }],
        refund_cents: args.refund_cents,
        currency: "EUR".into(),
    };
    request.validate().context("the return is invalid")?;
    let (producer, topics) = args.deployment.publisher()?;
    publish_return(&producer, &topics, &request).await?;
    println!("{}", request.return_id);
    Ok(())
}

pub async fn order(args: OrderArgs) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let (producer, topics) = args.deployment.publisher()?;
    if args.count == 1 {
        let order = if args.random {
            random_order(args.failure_percent)
        } else {
            OrderPlaced {
                order_id: Uuid::new_v4(),
                customer_id: args.customer.clone(),
                items: vec![LineItem {
                    sku: args.sku.clone(),
                    quantity: args.quantity,
                    unit_price_cents: args.unit_price_cents,
                }],
                total_cents: args.unit_price_cents * i64::from(args.quantity),
                currency: "EUR".into(),
                shipping_address: Address {
                    country: args.country.clone(),
                    city: "Berlin".into(),
                    line1: "Unter den Linden 1".into(),
                    postal_code: "10117".into(),
                },
            }
        };
        order.validate().context("the order is invalid")?;
        publish_order(&producer, &topics, &order).await?;
        println!("{}", order.order_id);
        if args.watch {
            return watch(WatchArgs {
                id: order.order_id,
                api: args.api,
            })
            .await;
        }
        return Ok(());
    }
    let started = Instant::now();
    let mut last_progress = Instant::now();
    for placed in 1..=args.count {
        publish_order(&producer, &topics, &random_order(args.failure_percent)).await?;
        if last_progress.elapsed() >= Duration::from_secs(1) || placed == args.count {
            eprintln!(
                "placed {placed}/{} orders ({:.0}/s)",
                args.count,
                placed as f64 / started.elapsed().as_secs_f64().max(1e-3)
            );
            last_progress = Instant::now();
        }
    }
    Ok(())
}

/// Reads a JSON response, turning the API's error body into a message.
pub(crate) async fn json_or_error(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let message = body["error"]["message"].as_str().unwrap_or("no error body");
    bail!("{status}: {message}")
}

/// Finds the saga for `id`, a saga id or an order id, waiting up to `wait` for an order's
/// saga to appear (the orchestrator may not have read the order yet).
async fn resolve_saga(
    http: &reqwest::Client,
    api: &ApiArgs,
    id: Uuid,
    wait: Duration,
) -> anyhow::Result<Uuid> {
    let deadline = Instant::now() + wait;
    loop {
        for path in [format!("/sagas/{id}"), format!("/orders/{id}/saga")] {
            let response = http.get(api.url(&path)).send().await?;
            if response.status() != reqwest::StatusCode::NOT_FOUND {
                let saga = json_or_error(response).await?;
                return saga["saga_id"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .context("the API returned a saga without saga_id");
            }
        }
        if Instant::now() >= deadline {
            bail!("no saga and no order with id {id}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let http = args.api.client()?;
    let saga_id = resolve_saga(&http, &args.api, args.id, Duration::from_secs(30)).await?;
    println!("watching saga {saga_id}");
    let mut response = http
        .get(args.api.url(&format!("/sagas/{saga_id}/watch")))
        .send()
        .await?;
    if !response.status().is_success() {
        json_or_error(response).await?;
        bail!("the watch stream was refused");
    }
    let mut parser = SseParser::default();
    let mut last_steps = String::new();
    while let Some(chunk) = response.chunk().await? {
        for event in parser.feed(&chunk).map_err(anyhow::Error::msg)? {
            let Ok(value) = serde_json::from_str::<Value>(&event.data) else {
                continue;
            };
            match event.name.as_str() {
                "history" => println!(
                    "{}  {:<22} {:<8} {}{}",
                    short_time(&value["at"]),
                    value["message_type"].as_str().unwrap_or("?"),
                    value["decision"].as_str().unwrap_or("?"),
                    value["detail"].as_str().unwrap_or(""),
                    value["state_after"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .map(|s| format!("  → {s}"))
                        .unwrap_or_default(),
                ),
                "saga" => {
                    let steps = steps_line(&value);
                    if steps != last_steps {
                        println!(
                            "          [{}] {steps}",
                            value["state"].as_str().unwrap_or("?")
                        );
                        if value["state"] == "failed" {
                            println!(
                                "saga {saga_id} failed and waits for an operator \
                                 (sagactl retry/skip); still watching, Ctrl-C to stop"
                            );
                        }
                        last_steps = steps;
                    }
                }
                "end" => {
                    println!(
                        "saga {saga_id} ended: {}",
                        value["state"].as_str().unwrap_or("?")
                    );
                    return Ok(());
                }
                _ => {}
            }
        }
    }
    bail!("the stream closed before the saga ended")
}

fn short_time(value: &Value) -> String {
    value
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| "?".into())
}

fn steps_line(saga: &Value) -> String {
    saga["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| {
                    format!(
                        "{}={}",
                        s["name"].as_str().unwrap_or("?"),
                        s["status"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

pub async fn list(args: ListArgs) -> anyhow::Result<()> {
    let http = args.api.client()?;
    let mut cursor: Option<String> = None;
    let mut printed_header = false;
    loop {
        let mut query: Vec<(&str, String)> = vec![("limit", args.limit.to_string())];
        for (name, value) in [
            ("state", args.state.clone()),
            ("min_age_secs", args.min_age_secs.map(|s| s.to_string())),
            ("step", args.step.clone()),
            ("reason", args.reason.clone()),
            ("cursor", cursor.clone()),
        ] {
            if let Some(value) = value {
                query.push((name, value));
            }
        }
        let page = json_or_error(
            http.get(args.api.url("/sagas"))
                .query(&query)
                .send()
                .await?,
        )
        .await?;
        if args.json {
            println!("{page}");
        } else {
            if !printed_header {
                println!(
                    "{:<36}  {:<36}  {:<12}  {:<17}  {:<24}  REASON",
                    "SAGA", "ORDER", "STATE", "STEP", "CREATED"
                );
                printed_header = true;
            }
            for saga in page["sagas"].as_array().into_iter().flatten() {
                println!(
                    "{:<36}  {:<36}  {:<12}  {:<17}  {:<24}  {}",
                    saga["saga_id"].as_str().unwrap_or("?"),
                    saga["order_id"].as_str().unwrap_or("?"),
                    saga["state"].as_str().unwrap_or("?"),
                    saga["current_step"].as_str().unwrap_or("-"),
                    saga["created_at"].as_str().unwrap_or("?"),
                    saga["failure_reason"].as_str().unwrap_or(""),
                );
            }
        }
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if !args.all || cursor.is_none() {
            return Ok(());
        }
    }
}

pub async fn operate(action: &str, args: OperatorArgs) -> anyhow::Result<()> {
    let http = args.api.client()?;
    let saga = json_or_error(
        http.post(args.api.url(&format!("/sagas/{}/{action}", args.saga_id)))
            .json(&serde_json::json!({ "reason": args.reason }))
            .send()
            .await?,
    )
    .await
    .with_context(|| format!("{action} of saga {}", args.saga_id))?;
    println!(
        "saga {} is now {} [{}]",
        args.saga_id,
        saga["state"].as_str().unwrap_or("?"),
        steps_line(&saga)
    );
    Ok(())
}
