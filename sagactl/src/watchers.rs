//! `sagactl watchers`: many people watching the engine at once. Keeps N Server-Sent Events
//! streams open on `GET /sagas/{id}/watch`, spread over the sagas of one state, and emulates M
//! open operations pages, each doing what `orchestrator/web/app.js` does while it is open:
//! `/stats` every second, the saga list every two seconds, one watch stream. Run it beside
//! `sagactl load` to see what watchers cost the sagas (`scripts/watch-bench.sh`).
//!
//! A stream that ends or fails is opened again after a short pause; a `429` (the server's
//! cap on watch streams) is counted, not an error, and retried after the same pause.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rand::Rng;
use reqwest::header::{ACCEPT, CACHE_CONTROL};
use reqwest::StatusCode;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::load::percentile_ms;
use crate::ops::{json_or_error, ApiArgs};
use crate::sse::{SseParser, KEEP_ALIVE};

/// What the operations page sends (app.js: `STATS_INTERVAL_MS`, `LIST_INTERVAL_MS`, and the
/// list's default refresh, `/sagas?limit=50` with no filter set).
const TAB_STATS_EVERY: Duration = Duration::from_secs(1);
const TAB_LIST_EVERY: Duration = Duration::from_secs(2);
const TAB_LIST_LIMIT: &str = "50";
/// The largest page `GET /sagas` gives.
const LIST_PAGE: &str = "500";
/// A tab's `/stats` or list request that takes longer counts as a timeout.
const TAB_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The server sends a keep-alive comment every 15 s; a stream silent for this long is dead.
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Args)]
pub struct WatchersArgs {
    /// The API and its token (a viewer's is enough).
    #[command(flatten)]
    api: ApiArgs,
    /// Watch streams to keep open, spread round-robin over the sagas.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Operations pages to emulate: each polls `/stats` every second and the saga list every
    /// two seconds, and watches one saga.
    #[arg(long, default_value_t = 20)]
    tabs: usize,
    /// Stop after this many seconds; without it, on Ctrl-C or SIGTERM. Either way the report
    /// is printed (and written with `--json`).
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Which sagas to watch, by state (`GET /sagas?state=`).
    #[arg(long, default_value = "failed")]
    saga_state: String,
    /// Spread the first opens of streams and tabs over this many seconds.
    #[arg(long, default_value_t = 5.0)]
    ramp_secs: f64,
    /// Pause before opening again a stream that ended, failed or was refused (plus up to
    /// half as much again, at random, so that streams do not come back in lockstep).
    #[arg(long, default_value_t = 1000)]
    retry_pause_ms: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn run(args: WatchersArgs) -> anyhow::Result<()> {
    let Ok(ramp) = Duration::try_from_secs_f64(args.ramp_secs) else {
        bail!("--ramp-secs must be a number of seconds ≥ 0");
    };
    let duration = match args.duration_secs.map(Duration::try_from_secs_f64) {
        Some(Ok(duration)) if !duration.is_zero() => Some(duration),
        Some(_) => bail!("--duration-secs must be a number of seconds > 0"),
        None => None,
    };
    let api = args.api.base().to_owned();
    let streams_client = client(&args.api)?;
    let wanted = args.streams.max(args.tabs).max(1);
    let sagas = list_sagas(&streams_client, &api, &args.saga_state, wanted).await?;
    if sagas.is_empty() {
        bail!("there are no {} sagas to watch", args.saga_state);
    }
    eprintln!(
        "watching {} {} sagas with {} streams and {} tabs",
        sagas.len(),
        args.saga_state,
        args.streams,
        args.tabs
    );

    let streams = Arc::new(StreamTally::default());
    let tabs = Arc::new(TabTally::default());
    let samples = Arc::new(Mutex::new(Vec::<i64>::new()));
    let pause = Duration::from_millis(args.retry_pause_ms);
    let mut tasks = JoinSet::new();
    let watched = Watched {
        api: &api,
        sagas: &sagas,
        ramp,
        pause,
    };
    spawn_streams(
        &mut tasks,
        &watched,
        args.streams,
        &streams_client,
        &streams,
    );
    spawn_tabs(&mut tasks, &watched, &args.api, args.tabs, &tabs)?;
    spawn_progress(
        &mut tasks,
        ramp + Duration::from_secs(1),
        args.streams,
        &streams,
        &tabs,
        &samples,
    );

    let started = Instant::now();
    let stopped_by = stop_signal(duration).await?;
    let elapsed = started.elapsed();
    // Read the gauges before the tasks go: "open at the end" is what was open when stopped.
    let streams_open = streams.open_now.load(Ordering::Relaxed);
    let tab_streams_open = tabs.watch.open_now.load(Ordering::Relaxed);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}

    let samples = lock(&samples).clone();
    let report = Report {
        api,
        saga_state: args.saga_state.clone(),
        sagas_watched: sagas.len(),
        duration_secs: elapsed.as_secs_f64(),
        stopped_by: stopped_by.into(),
        streams: streams.report(args.streams, streams_open, &samples),
        tabs: tabs.report(args.tabs, tab_streams_open),
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// What the streams and tabs watch, and how they pace their opens.
struct Watched<'a> {
    api: &'a str,
    sagas: &'a [String],
    /// The first opens are spread over this.
    ramp: Duration,
    /// Before opening again a stream that ended.
    pause: Duration,
}

/// `count` watch streams, spread round-robin over the sagas, sharing one client.
fn spawn_streams(
    tasks: &mut JoinSet<()>,
    watched: &Watched<'_>,
    count: usize,
    client: &reqwest::Client,
    tally: &Arc<StreamTally>,
) {
    for i in 0..count {
        let url = watch_url(watched.api, &watched.sagas[i % watched.sagas.len()]);
        let (client, tally) = (client.clone(), Arc::clone(tally));
        let delay = watched.ramp.mul_f64(i as f64 / count as f64);
        let pause = watched.pause;
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            keep_watching(&client, &url, &tally, pause).await;
        });
    }
}

/// `count` operations pages, each polling `/stats` and the saga list and watching one saga.
fn spawn_tabs(
    tasks: &mut JoinSet<()>,
    watched: &Watched<'_>,
    api_args: &ApiArgs,
    count: usize,
    tabs: &Arc<TabTally>,
) -> anyhow::Result<()> {
    let api = watched.api;
    for tab in 0..count {
        // Each tab has its own connections, as separate browsers would.
        let client = client(api_args)?;
        let delay = watched.ramp.mul_f64(tab as f64 / count as f64);
        let watch = watch_url(api, &watched.sagas[tab % watched.sagas.len()]);
        let stats = format!("{api}/stats");
        let list = format!("{api}/sagas");
        let (c, t) = (client.clone(), Arc::clone(tabs));
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            every(TAB_STATS_EVERY, || tab_request(&c, &stats, &[], &t.stats)).await;
        });
        let (c, t) = (client.clone(), Arc::clone(tabs));
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let query = [("limit", TAB_LIST_LIMIT)];
            every(TAB_LIST_EVERY, || tab_request(&c, &list, &query, &t.list)).await;
        });
        let t = Arc::clone(tabs);
        let pause = watched.pause;
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            keep_watching(&client, &watch, &t.watch, pause).await;
        });
    }
    Ok(())
}

/// Every second: samples the streams open (once `settled_after` has passed since the start),
/// and every five prints a progress line.
fn spawn_progress(
    tasks: &mut JoinSet<()>,
    settled_after: Duration,
    wanted_streams: usize,
    streams: &Arc<StreamTally>,
    tabs: &Arc<TabTally>,
    samples: &Arc<Mutex<Vec<i64>>>,
) {
    let (streams, tabs, samples) = (Arc::clone(streams), Arc::clone(tabs), Arc::clone(samples));
    tasks.spawn(async move {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut seconds = 0u64;
        loop {
            tick.tick().await;
            let open = streams.open_now.load(Ordering::Relaxed);
            if started.elapsed() >= settled_after {
                lock(&samples).push(open);
            }
            if seconds.is_multiple_of(5) {
                eprintln!(
                    "{:>4} s  streams open {open}/{wanted_streams}, opens {}, 429s {}, errors {}, events {}; tab requests {}",
                    seconds,
                    streams.opens.load(Ordering::Relaxed),
                    streams.too_many.load(Ordering::Relaxed),
                    streams.error_count(),
                    streams.event_count(),
                    tabs.stats.requests() + tabs.list.requests(),
                );
            }
            seconds += 1;
        }
    });
}

fn client(api: &ApiArgs) -> anyhow::Result<reqwest::Client> {
    api.client_builder()?
        .read_timeout(STREAM_READ_TIMEOUT)
        .build()
        .context("building the HTTP client")
}

fn watch_url(api: &str, saga_id: &str) -> String {
    format!("{api}/sagas/{saga_id}/watch")
}

/// The ids of up to `wanted` sagas in `state`, newest first, following the cursor.
async fn list_sagas(
    http: &reqwest::Client,
    api: &str,
    state: &str,
    wanted: usize,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("state", state.to_owned()), ("limit", LIST_PAGE.to_owned())];
        if let Some(cursor) = cursor.take() {
            query.push(("cursor", cursor));
        }
        let response = http
            .get(format!("{api}/sagas"))
            .query(&query)
            .timeout(TAB_REQUEST_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("listing the {state} sagas at {api}"))?;
        let body = json_or_error(response)
            .await
            .with_context(|| format!("listing the {state} sagas"))?;
        let Some(page) = body["sagas"].as_array() else {
            bail!("listing the {state} sagas: the answer has no `sagas` array");
        };
        for saga in page {
            let Some(id) = saga["saga_id"].as_str() else {
                bail!("listing the {state} sagas: a saga without `saga_id`");
            };
            ids.push(id.to_owned());
            if ids.len() >= wanted {
                return Ok(ids);
            }
        }
        match body["next_cursor"].as_str() {
            Some(next) if !page.is_empty() => cursor = Some(next.to_owned()),
            _ => return Ok(ids),
        }
    }
}

/// Keeps one watch stream on `url` open: opens it, reads it until it ends or fails, pauses,
/// and opens it again, forever (the caller aborts the task).
async fn keep_watching(http: &reqwest::Client, url: &str, tally: &StreamTally, pause: Duration) {
    loop {
        watch_once(http, url, tally).await;
        let jitter = rand::thread_rng().gen_range(0.0..=0.5);
        tokio::time::sleep(pause.mul_f64(1.0 + jitter)).await;
    }
}

/// One watch stream, from the request to its end, counted in `tally`.
async fn watch_once(http: &reqwest::Client, url: &str, tally: &StreamTally) {
    tally.attempts.fetch_add(1, Ordering::Relaxed);
    let asked = Instant::now();
    let response = match http
        .get(url)
        .header(ACCEPT, "text/event-stream")
        .header(CACHE_CONTROL, "no-cache")
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => return tally.error(request_error_kind(&e), &messaging::chain(&e)),
    };
    match response.status() {
        StatusCode::OK => {}
        StatusCode::TOO_MANY_REQUESTS => {
            tally.too_many.fetch_add(1, Ordering::Relaxed);
            return;
        }
        status => {
            let detail = response.text().await.unwrap_or_default();
            return tally.error(format!("http_{}", status.as_u16()), &detail);
        }
    }
    tally.opens.fetch_add(1, Ordering::Relaxed);
    lock(&tally.open_latencies).push(asked.elapsed());
    let _open = tally.open();
    let mut response = response;
    let mut parser = SseParser::default();
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => match parser.feed(&bytes) {
                Ok(received) => {
                    if !received.is_empty() {
                        let mut events = lock(&tally.events);
                        for event in received {
                            *events.entry(event.name).or_default() += 1;
                        }
                    }
                }
                Err(e) => return tally.error("oversized_event".into(), &e),
            },
            Ok(None) => {
                tally.ended.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => return tally.error(request_error_kind(&e), &messaging::chain(&e)),
        }
    }
}

/// Runs `task` now and then every `period`, never two at once: a tick that comes while the
/// last run is still going is skipped, as the page's pollers skip while busy.
async fn every<F, Fut>(period: Duration, mut task: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        task().await;
    }
}

/// One of a tab's JSON requests, timed from sending to the last byte of the answer.
async fn tab_request(http: &reqwest::Client, url: &str, query: &[(&str, &str)], tally: &Endpoint) {
    let asked = Instant::now();
    let sent = http
        .get(url)
        .query(query)
        .header(ACCEPT, "application/json")
        .timeout(TAB_REQUEST_TIMEOUT)
        .send()
        .await;
    let outcome = match sent {
        Ok(response) => {
            let status = response.status();
            match response.bytes().await {
                Ok(_) if status.is_success() => Ok(()),
                Ok(body) => Err((
                    format!("http_{}", status.as_u16()),
                    String::from_utf8_lossy(&body).into_owned(),
                )),
                Err(e) => Err((request_error_kind(&e), messaging::chain(&e))),
            }
        }
        Err(e) => Err((request_error_kind(&e), messaging::chain(&e))),
    };
    let took = asked.elapsed();
    let mut endpoint = lock(&tally.inner);
    endpoint.requests += 1;
    match outcome {
        Ok(()) => {
            drop(endpoint);
            lock(&tally.latencies).push(took);
        }
        Err((kind, detail)) => {
            count_error(&mut endpoint.errors, kind, &detail);
        }
    }
}

fn request_error_kind(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else if e.is_request() {
        "request"
    } else {
        "other"
    };
    kind.into()
}

async fn stop_signal(duration: Option<Duration>) -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let timer = async {
        match duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = timer => Ok("duration"),
        interrupted = tokio::signal::ctrl_c() => {
            interrupted.context("listening for Ctrl-C")?;
            Ok("interrupt")
        }
        _ = terminate.recv() => Ok("SIGTERM"),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves counts that are still counts.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many errors of one kind, and the first one's text.
#[derive(Debug, Clone, Serialize)]
struct ErrorCount {
    count: u64,
    first: String,
}

fn count_error(errors: &mut BTreeMap<String, ErrorCount>, kind: String, detail: &str) {
    errors
        .entry(kind)
        .or_insert_with(|| ErrorCount {
            count: 0,
            first: detail.chars().take(300).collect(),
        })
        .count += 1;
}

/// Counts of a set of watch streams.
#[derive(Default)]
struct StreamTally {
    attempts: AtomicU64,
    opens: AtomicU64,
    open_now: AtomicI64,
    peak_open: AtomicI64,
    too_many: AtomicU64,
    /// Streams the server closed (after `end`, or without it).
    ended: AtomicU64,
    errors: Mutex<BTreeMap<String, ErrorCount>>,
    /// Events by SSE event name; comment-only blocks (the server's keep-alives) as
    /// `keep-alive`.
    events: Mutex<BTreeMap<String, u64>>,
    /// From sending the request to the response's head (status 200).
    open_latencies: Mutex<Vec<Duration>>,
}

/// Counts a stream as open while it lives.
struct OpenStream<'a>(&'a StreamTally);

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.open_now.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StreamTally {
    fn open(&self) -> OpenStream<'_> {
        let now = self.open_now.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_open.fetch_max(now, Ordering::Relaxed);
        OpenStream(self)
    }

    fn error(&self, kind: String, detail: &dyn std::fmt::Display) {
        count_error(&mut lock(&self.errors), kind, &detail.to_string());
    }

    fn error_count(&self) -> u64 {
        lock(&self.errors).values().map(|e| e.count).sum()
    }

    fn event_count(&self) -> u64 {
        lock(&self.events)
            .iter()
            .filter(|(name, _)| *name != KEEP_ALIVE)
            .map(|(_, n)| n)
            .sum()
    }

    fn report(&self, wanted: usize, open_at_end: i64, samples: &[i64]) -> StreamReport {
        StreamReport {
            wanted,
            open_at_end,
            peak_open: self.peak_open.load(Ordering::Relaxed),
            mean_open: (!samples.is_empty())
                .then(|| samples.iter().sum::<i64>() as f64 / samples.len() as f64),
            min_open: samples.iter().min().copied(),
            attempts: self.attempts.load(Ordering::Relaxed),
            opens: self.opens.load(Ordering::Relaxed),
            too_many_streams: self.too_many.load(Ordering::Relaxed),
            ended_by_server: self.ended.load(Ordering::Relaxed),
            errors: lock(&self.errors).clone(),
            events_total: self.event_count(),
            events: lock(&self.events).clone(),
            open_latency_ms: Latency::of(lock(&self.open_latencies).clone()),
        }
    }
}

/// The tabs' requests, per kind, and their watch streams.
#[derive(Default)]
struct TabTally {
    stats: Endpoint,
    list: Endpoint,
    watch: StreamTally,
}

impl TabTally {
    /// The report of `tabs` pages, `streams_open` of whose watch streams were open at the end.
    fn report(&self, tabs: usize, streams_open: i64) -> TabsReport {
        TabsReport {
            tabs,
            requests: self.stats.requests() + self.list.requests(),
            latency_ms: {
                let mut all = lock(&self.stats.latencies).clone();
                all.extend(lock(&self.list.latencies).iter());
                Latency::of(all)
            },
            stats: self.stats.report(),
            list: self.list.report(),
            watch: self.watch.report(tabs, streams_open, &[]),
        }
    }
}

#[derive(Default)]
struct Endpoint {
    inner: Mutex<EndpointCounts>,
    /// Of the requests answered with a 2xx, whole body read.
    latencies: Mutex<Vec<Duration>>,
}

#[derive(Default)]
struct EndpointCounts {
    requests: u64,
    errors: BTreeMap<String, ErrorCount>,
}

impl Endpoint {
    fn requests(&self) -> u64 {
        lock(&self.inner).requests
    }

    fn report(&self) -> EndpointReport {
        let counts = lock(&self.inner);
        let latencies = lock(&self.latencies).clone();
        EndpointReport {
            requests: counts.requests,
            ok: latencies.len() as u64,
            errors: counts.errors.clone(),
            latency_ms: Latency::of(latencies),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    api: String,
    saga_state: String,
    /// Distinct sagas the streams (and tabs) were spread over.
    sagas_watched: usize,
    duration_secs: f64,
    /// `duration`, `interrupt` or `SIGTERM`.
    stopped_by: String,
    streams: StreamReport,
    tabs: TabsReport,
}

#[derive(Debug, Serialize)]
struct StreamReport {
    wanted: usize,
    open_at_end: i64,
    peak_open: i64,
    /// Streams open, sampled every second after the ramp.
    mean_open: Option<f64>,
    min_open: Option<i64>,
    attempts: u64,
    /// Attempts answered 200 (the stream then read until it ended or failed).
    opens: u64,
    /// Attempts answered 429 `too_many_streams` (counted, not errors).
    too_many_streams: u64,
    ended_by_server: u64,
    errors: BTreeMap<String, ErrorCount>,
    /// SSE events received, keep-alives not counted.
    events_total: u64,
    events: BTreeMap<String, u64>,
    open_latency_ms: Latency,
}

#[derive(Debug, Serialize)]
struct TabsReport {
    tabs: usize,
    /// `/stats` and list requests made.
    requests: u64,
    /// Of both kinds of request together.
    latency_ms: Latency,
    stats: EndpointReport,
    list: EndpointReport,
    watch: StreamReport,
}

#[derive(Debug, Serialize)]
struct EndpointReport {
    requests: u64,
    ok: u64,
    errors: BTreeMap<String, ErrorCount>,
    latency_ms: Latency,
}

#[derive(Debug, Serialize)]
struct Latency {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort();
        Latency {
            count: samples.len(),
            p50: percentile_ms(&samples, 0.50),
            p99: percentile_ms(&samples, 0.99),
            max: percentile_ms(&samples, 1.0),
        }
    }
}

fn print_report(r: &Report) {
    println!(
        "watchers          {} streams and {} tabs on {} {} sagas, {:.1} s (stopped by {})",
        r.streams.wanted, r.tabs.tabs, r.sagas_watched, r.saga_state, r.duration_secs, r.stopped_by
    );
    print_streams("streams", &r.streams);
    let t = &r.tabs;
    println!(
        "tab requests      {} (stats {} ok {}, list {} ok {}); latency (ms) p50 {:.1}  p99 {:.1}  max {:.1}",
        t.requests,
        t.stats.requests,
        t.stats.ok,
        t.list.requests,
        t.list.ok,
        t.latency_ms.p50,
        t.latency_ms.p99,
        t.latency_ms.max
    );
    for (name, e) in [("stats", &t.stats), ("list", &t.list)] {
        println!(
            "  {name:<5} (ms)      p50 {:.1}  p99 {:.1}  max {:.1}{}",
            e.latency_ms.p50,
            e.latency_ms.p99,
            e.latency_ms.max,
            errors_text(&e.errors)
        );
    }
    print_streams("tab streams", &t.watch);
}

fn print_streams(label: &str, s: &StreamReport) {
    let sampled = match (s.mean_open, s.min_open) {
        (Some(mean), Some(min)) => format!(", mean {mean:.1}, min {min} after the ramp"),
        _ => String::new(),
    };
    println!(
        "{label:<17} open at end {}/{} (peak {}{sampled})",
        s.open_at_end, s.wanted, s.peak_open
    );
    println!(
        "{:<17} {} opened of {} attempts, 429 too_many_streams {}, ended by the server {}{}",
        "",
        s.opens,
        s.attempts,
        s.too_many_streams,
        s.ended_by_server,
        errors_text(&s.errors)
    );
    let events: Vec<String> = s.events.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "{:<17} {} events ({}); open (ms) p50 {:.1}  p99 {:.1}  max {:.1}",
        "",
        s.events_total,
        if events.is_empty() {
            "none".into()
        } else {
            events.join(", ")
        },
        s.open_latency_ms.p50,
        s.open_latency_ms.p99,
        s.open_latency_ms.max
    );
}

fn errors_text(errors: &BTreeMap<String, ErrorCount>) -> String {
    if errors.is_empty() {
        return ", no errors".into();
    }
    let parts: Vec<String> = errors
        .iter()
        .map(|(kind, e)| format!("{kind} {} (first: {})", e.count, e.first))
        .collect();
    format!(", errors: {}", parts.join("; "))
}
