//! The one tracing set-up of every binary, and trace context across Kafka.
//!
//! - Logs: `RUST_LOG` filters (default `info`); `LOG_FORMAT=json` switches to one JSON object
//!   per line. Log lines carry the fields of the spans they are in (topic, offset, saga id,
//!   step, message id).
//! - Traces: every span also becomes an OpenTelemetry span, so that its W3C trace context can
//!   travel in Kafka headers ([`inject`], [`extract`]): the order, each command, each reply
//!   and each saga event of one order belong to one trace. Spans are exported over OTLP/HTTP
//!   (protobuf) only when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; otherwise they are dropped when they end.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Flushes exported spans when dropped; keep it alive for the life of `main`.
#[must_use = "dropping the guard flushes and stops trace export"]
pub struct Telemetry {
    _private: (),
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = PROVIDER.get() {
            // The exporter blocks on HTTP; keep that off the async runtime's threads.
            let provider = provider.clone();
            let flushed = std::thread::spawn(move || provider.shutdown());
            let _ = flushed.join();
        }
    }
}

/// Installs the global subscriber for the service `service`, logging to stdout. Calling it
/// again is harmless (tests run several services in one process); the first call wins.
pub fn init(service: &str) -> Telemetry {
    install(service, LogOutput::Stdout)
}

/// Installs the global subscriber for the command-line tool `tool`, logging to stderr: its
/// stdout is its answer (an order id, JSON) that scripts read, and a log line there (a
/// librdkafka warning while the cluster elects a coordinator, say) would corrupt it.
pub fn init_tool(tool: &str) -> Telemetry {
    install(tool, LogOutput::Stderr)
}

enum LogOutput {
    Stdout,
    Stderr,
}

fn install(service: &str, output: LogOutput) -> Telemetry {
    let provider = PROVIDER.get_or_init(|| tracer_provider(service));
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,sqlx=warn"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let writer = match output {
        LogOutput::Stdout => BoxMakeWriter::new(std::io::stdout),
        LogOutput::Stderr => BoxMakeWriter::new(std::io::stderr),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("saga-engine"));
    let _already_set = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Telemetry { _private: () }
}

fn otlp_endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

fn tracer_provider(service: &str) -> SdkTracerProvider {
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let Some(endpoint) = otlp_endpoint() else {
        return builder.build();
    };
    // The blocking HTTP client must be built (and dropped) outside the async runtime.
    let exporter = std::thread::spawn(move || {
        use opentelemetry_otlp::WithExportConfig;
        let endpoint = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
            endpoint
        } else {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        };
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()
    })
    .join();
    match exporter {
        Ok(Ok(exporter)) => builder.with_batch_exporter(exporter).build(),
        Ok(Err(e)) => {
            eprintln!("OTLP export disabled: {e}");
            builder.build()
        }
        Err(_) => builder.build(),
    }
}

struct HeaderMap<'a>(&'a mut BTreeMap<String, String>);

impl Injector for HeaderMap<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct HeaderView<'a>(&'a BTreeMap<String, String>);

impl Extractor for HeaderView<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes the trace context of `span` into `headers`: `traceparent`, and `tracestate` only
/// when there is one. The propagator writes an empty `tracestate` for a trace without one;
/// W3C Trace Context and the contract (AsyncAPI `TraceHeaders`) say to leave it out, and a
/// stored or received empty one is dropped too.
pub fn inject(span: &tracing::Span, headers: &mut BTreeMap<String, String>) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderMap(headers));
    if headers.get("tracestate").is_some_and(String::is_empty) {
        headers.remove("tracestate");
    }
}

/// Makes `span` a child of the trace context in `headers`, if they carry one.
pub fn extract(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&HeaderView(headers));
        let _ = span.set_parent(parent);
    }
}

/// The `traceparent` of `span`, to store or send where only that one value fits.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut headers = BTreeMap::new();
    inject(span, &mut headers);
    headers.remove("traceparent")
}

/// Makes `span` a child of `traceparent` (a stored or received W3C value).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    extract(
        span,
        &BTreeMap::from([("traceparent".to_owned(), traceparent.to_owned())]),
    );
}

/// A new root `traceparent` for a client outside any trace (the load generator, the CLI):
/// version 00, random trace and span ids, sampled.
pub fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string();
    format!("00-{trace}-{}-01", &span[..16])
}
