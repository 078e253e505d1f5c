//! What each process of a deployment did during a `sagactl load` run, read from its `/metrics`
//! page at the start and at the end: the records its consume loop handled (by partition), the
//! outbox rows its relay published, the overdue sagas its deadline scanner handled, and the
//! means of its hops. With several instances of a service (`BENCH_INSTANCES`), the report shows
//! whether they shared the work and how evenly.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use serde::Serialize;

/// Records consumed, by `topic`, `partition` (services since issue 23) and `outcome`.
const MESSAGES_CONSUMED: &str = "messages_consumed_total";
const OUTBOX_PUBLISHED: &str = "outbox_published_total";
/// The orchestrator's deadline scanner: overdue sagas handled, by `partition`.
const DEADLINES_HANDLED: &str = "saga_deadlines_handled_total";
/// The orchestrator's deadline scanner: how many partitions it scans now.
const DEADLINE_SCAN_PARTITIONS: &str = "saga_deadline_scan_partitions";

/// One series of a page: its name, labels and value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A `/metrics` page in Prometheus text format.
#[derive(Debug, Clone, Default)]
pub(crate) struct Page {
    samples: Vec<Sample>,
}

impl Page {
    /// Reads `url`'s page.
    pub(crate) async fn fetch(url: &str) -> anyhow::Result<Self> {
        let text = reqwest::get(url)
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("reading {url}"))?
            .text()
            .await
            .with_context(|| format!("reading {url}"))?;
        Ok(Self::parse(&text))
    }

    /// The samples of `text`; comments and lines that are no sample are passed over.
    pub(crate) fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(parse_sample)
            .collect();
        Self { samples }
    }

    /// The sum of every series of the metric `name` (0 without any; not `Iterator::sum`,
    /// whose empty sum is -0, printed so).
    pub(crate) fn sum(&self, name: &str) -> f64 {
        self.of(name).fold(0.0, |sum, s| sum + s.value)
    }

    fn of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// Whether the page has the metric `name` at all.
    fn has(&self, name: &str) -> bool {
        self.of(name).next().is_some()
    }

    /// This page's counters less `before`'s (the same process read earlier): what happened
    /// between the two. A series `before` lacks started at 0.
    pub(crate) fn since(&self, before: &Page) -> Page {
        let samples = self
            .samples
            .iter()
            .map(|sample| {
                let earlier = before
                    .samples
                    .iter()
                    .find(|b| b.name == sample.name && b.labels == sample.labels)
                    .map_or(0.0, |b| b.value);
                Sample {
                    value: sample.value - earlier,
                    ..sample.clone()
                }
            })
            .collect();
        Page { samples }
    }
}

/// `name{label="value",...} value`, or `name value` (a timestamp after the value is ignored).
fn parse_sample(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, rest) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, rest)
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

/// The labels of a sample, from after its `{`; returns them and what follows the `}`.
fn parse_labels(text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after_key) = rest.split_once('=')?;
        let mut value = String::new();
        let mut chars = after_key.strip_prefix('"')?.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = &after_key[end + 2..];
    }
}

/// What one process did during the run.
#[derive(Debug, Serialize)]
pub(crate) struct InstanceWork {
    /// The process's name in the report (`orchestrator-2`, or `inventory` when alone).
    pub name: String,
    /// Its service: the name without an instance number.
    pub service: String,
    /// Records its consume loop handled or dead-lettered.
    pub records: f64,
    /// Its part of its service's records (1 when it is the service's only instance).
    pub share: f64,
    /// Records by `topic[partition]`; empty for a build whose counter has no partition.
    pub records_by_partition: BTreeMap<String, f64>,
    /// The partition numbers its records came from, over all its topics.
    pub partitions: Vec<i32>,
    /// Outbox rows its relay published.
    pub outbox_published: f64,
    /// Overdue sagas its deadline scanner handled (orchestrators).
    pub deadlines_handled: Option<f64>,
    /// How many partitions its deadline scanner scanned at the end (orchestrators).
    pub deadline_scan_partitions: Option<f64>,
}

/// The service an instance belongs to: its name without a trailing `-N`.
fn service_of(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((service, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => service,
        _ => name,
    }
}

/// What each process did: `runs` holds each one's name, its page at the end and what the
/// page's counters grew by during the run.
pub(crate) fn instance_work(runs: &[(String, Page, Page)]) -> Vec<InstanceWork> {
    let mut work: Vec<InstanceWork> = runs
        .iter()
        .map(|(name, end, during)| {
            let records_by_partition: BTreeMap<String, f64> = during
                .of(MESSAGES_CONSUMED)
                .filter_map(|s| {
                    let partition = s.labels.get("partition")?;
                    let topic = s.labels.get("topic").map_or("", String::as_str);
                    Some((format!("{topic}[{partition}]"), s.value))
                })
                .fold(BTreeMap::new(), |mut sums, (key, value)| {
                    *sums.entry(key).or_default() += value;
                    sums
                });
            let partitions: BTreeSet<i32> = during
                .of(MESSAGES_CONSUMED)
                .filter(|s| s.value > 0.0)
                .filter_map(|s| s.labels.get("partition")?.parse().ok())
                .collect();
            let orchestrator = end.has(DEADLINE_SCAN_PARTITIONS);
            InstanceWork {
                name: name.clone(),
                service: service_of(name).to_owned(),
                records: during.sum(MESSAGES_CONSUMED),
                share: 0.0,
                records_by_partition,
                partitions: partitions.into_iter().collect(),
                outbox_published: during.sum(OUTBOX_PUBLISHED),
                deadlines_handled: orchestrator.then(|| during.sum(DEADLINES_HANDLED)),
                deadline_scan_partitions: orchestrator.then(|| end.sum(DEADLINE_SCAN_PARTITIONS)),
            }
        })
        .collect();
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    for w in &work {
        *totals.entry(w.service.clone()).or_default() += w.records;
    }
    for w in &mut work {
        let total = totals.get(&w.service).copied().unwrap_or(0.0);
        w.share = if total > 0.0 { w.records / total } else { 0.0 };
    }
    work
}

/// The report's lines for `work`: one per process, and a note when some of a service's
/// instances took no part in its work.
pub(crate) fn print(work: &[InstanceWork]) {
    if work.is_empty() {
        return;
    }
    println!(
        "work per instance (during the run): records consumed, their share of the service's, the partitions they came from; outbox rows published; deadlines fired"
    );
    for w in work {
        let partitions = if w.partitions.is_empty() {
            "-".to_owned()
        } else {
            w.partitions
                .iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let deadlines = match (w.deadlines_handled, w.deadline_scan_partitions) {
            (Some(handled), Some(scanned)) => {
                format!("  deadlines {handled:>5} (scans {scanned} partitions)")
            }
            _ => String::new(),
        };
        println!(
            "work              {:<15} records {:>7}  {:>5.1}%  partitions {:<12} published {:>7}{deadlines}",
            w.name,
            w.records,
            w.share * 100.0,
            partitions,
            w.outbox_published,
        );
    }
    let mut instances: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for w in work {
        let (all, idle) = instances.entry(&w.service).or_default();
        *all += 1;
        if w.records == 0.0 {
            *idle += 1;
        }
    }
    for (service, (all, idle)) in instances {
        if all > 1 && idle > 0 && idle < all {
            println!(
                "work              {service}: {idle} of {all} instances handled no record (more instances than partitions, or out of the group)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORCHESTRATOR_START: &str = r#"# HELP messages_consumed_total Kafka records consumed.
# TYPE messages_consumed_total counter
messages_consumed_total{topic="bench.orders",partition="0",outcome="handled"} 2
saga_deadline_scan_partitions 2
"#;

    const ORCHESTRATOR_END: &str = r#"# TYPE messages_consumed_total counter
messages_consumed_total{topic="bench.orders",partition="0",outcome="handled"} 12
messages_consumed_total{topic="bench.saga.replies",partition="1",outcome="handled"} 30
messages_consumed_total{topic="bench.saga.replies",partition="1",outcome="dead_lettered"} 1
outbox_published_total 44
saga_deadlines_handled_total{partition="1"} 3
saga_deadline_scan_partitions 2
message_handle_duration_seconds_bucket{topic="bench.orders",le="0.005"} 4
"#;

    fn page(text: &str) -> Page {
        Page::parse(text)
    }

    #[test]
    fn a_page_reads_labels_with_escapes_and_values_with_timestamps() {
        let page = page(
            "m{a=\"x\\\"y\",b=\"1,2\"} 3.5 1700000000\nplain 7\n# a comment\nbroken{a=\"1\" x\n",
        );
        assert_eq!(page.samples.len(), 2, "{page:?}");
        assert_eq!(page.samples[0].labels["a"], "x\"y");
        assert_eq!(page.samples[0].labels["b"], "1,2");
        assert_eq!(page.sum("m"), 3.5);
        assert_eq!(page.sum("plain"), 7.0);
        assert_eq!(format!("{}", page.sum("none")), "0", "not -0");
    }

    #[test]
    fn the_work_is_what_the_counters_grew_by_during_the_run() {
        let end = page(ORCHESTRATOR_END);
        let during = end.since(&page(ORCHESTRATOR_START));
        let work = instance_work(&[("orchestrator".into(), end, during)]);
        let w = &work[0];
        assert_eq!(w.service, "orchestrator");
        assert_eq!(w.records, 41.0, "10 new orders, 31 replies");
        assert_eq!(w.share, 1.0);
        assert_eq!(w.partitions, [0, 1]);
        assert_eq!(w.records_by_partition["bench.orders[0]"], 10.0);
        assert_eq!(w.records_by_partition["bench.saga.replies[1]"], 31.0);
        assert_eq!(w.outbox_published, 44.0);
        assert_eq!(w.deadlines_handled, Some(3.0));
        assert_eq!(w.deadline_scan_partitions, Some(2.0));
    }

    #[test]
    fn instances_share_their_services_records_and_a_participant_has_no_deadlines() {
        let inventory = |n: u32| {
            page(&format!(
                "messages_consumed_total{{topic=\"bench.inventory.commands\",partition=\"{n}\",outcome=\"handled\"}} {}\n",
                n * 10 + 10
            ))
        };
        let runs = [
            ("inventory-1".to_owned(), inventory(0), inventory(0)),
            ("inventory-2".to_owned(), inventory(2), inventory(2)),
            ("payment".to_owned(), Page::default(), Page::default()),
        ];
        let work = instance_work(&runs);
        assert_eq!(work[0].service, "inventory");
        assert_eq!(work[1].service, "inventory");
        assert_eq!((work[0].records, work[1].records), (10.0, 30.0));
        assert_eq!((work[0].share, work[1].share), (0.25, 0.75));
        assert_eq!(work[1].partitions, [2]);
        assert_eq!(work[0].deadlines_handled, None);
        assert_eq!(work[2].service, "payment");
        assert_eq!(work[2].share, 0.0, "no records: no share");
    }

    #[test]
    fn a_service_name_loses_only_an_instance_number() {
        assert_eq!(service_of("orchestrator-12"), "orchestrator");
        assert_eq!(service_of("orchestrator"), "orchestrator");
        assert_eq!(service_of("sagactl load"), "sagactl load");
        assert_eq!(service_of("broker-"), "broker-");
        assert_eq!(service_of("two-words"), "two-words");
    }
}
