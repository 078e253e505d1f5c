//! What a chaos run measures for its report, beside the invariants: the sagas' outcomes, the
//! duplicates the engine absorbed, how long the failures stalled the sagas, the throughput,
//! and how the sagas fared while broker nodes were down.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::broker_nodes::{NodeOutage, NodeOutages};
use super::invariants::count;
use super::link_faults::LinkOutage;
use super::setup::Databases;
use super::takeovers::{Assignments, Takeover};
use crate::deployment::{Deployment, ORCHESTRATOR};

/// How many sagas ended in each state, as the report prints it.
pub(super) async fn outcomes(db: &PgPool) -> anyhow::Result<String> {
    let by_state: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state::text, count(*) FROM orchestrator.sagas GROUP BY state ORDER BY state::text",
    )
    .fetch_all(db)
    .await?;
    Ok(by_state
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect::<Vec<_>>()
        .join(", "))
}

/// What every fault window is measured from, read once: each placed saga's publication and
/// finish, and each service's pauses (two messages it handled further apart than
/// [`Timeline::PAUSE_MS`], or the start or end of placing and the message next to it). A long
/// run has dozens of windows and tens of thousands of sagas: measured in memory, not by a query
/// per window.
pub(super) struct Timeline {
    /// Placed at, and finished at when the saga finished.
    sagas: Vec<(DateTime<Utc>, Option<DateTime<Utc>>)>,
    /// Per service, its pauses.
    pauses: Vec<(String, Vec<Span>)>,
}

/// From, until.
type Span = (DateTime<Utc>, DateTime<Utc>);

impl Timeline {
    /// Shorter pauses are no stall worth naming.
    const PAUSE_MS: f64 = 100.0;

    pub(super) async fn load(
        db: &Databases,
        deployment: &Deployment,
        placed_at: &[(Uuid, DateTime<Utc>)],
        (from, until): (DateTime<Utc>, DateTime<Utc>),
    ) -> anyhow::Result<Self> {
        let keys: Vec<String> = placed_at.iter().map(|(id, _)| id.to_string()).collect();
        let at: Vec<DateTime<Utc>> = placed_at.iter().map(|(_, at)| *at).collect();
        let sagas: Vec<(DateTime<Utc>, Option<DateTime<Utc>>)> = sqlx::query_as(
            "WITH placed AS (SELECT * FROM unnest($1::text[], $2::timestamptz[]) AS p(key, at)) \
             SELECT p.at, s.finished_at \
             FROM placed p JOIN orchestrator.sagas s ON s.saga_key = p.key",
        )
        .bind(&keys)
        .bind(&at)
        .fetch_all(db.orchestrator())
        .await?;
        let mut pauses = Vec::new();
        for service in deployment.services() {
            let found: Vec<Span> = sqlx::query_as(&format!(
                "SELECT previous, at FROM ( \
                   SELECT at, lag(at) OVER (ORDER BY at) AS previous \
                   FROM (SELECT received_at AS at FROM {service}.inbox WHERE received_at BETWEEN $1 AND $2 \
                         UNION ALL SELECT $1 UNION ALL SELECT $2) handled) g \
                 WHERE previous IS NOT NULL \
                   AND extract(epoch FROM at - previous) * 1000 > $3"
            ))
            .bind(from)
            .bind(until)
            .bind(Self::PAUSE_MS)
            .fetch_all(db.of(service))
            .await?;
            pauses.push((service.to_owned(), found));
        }
        Ok(Self { sagas, pauses })
    }
}

/// The broker node faults' windows, measured: each fault's, one and two nodes down, and the
/// sagas that met none, to compare with.
pub(super) struct NodeWindows<'a> {
    pub(super) faults: Vec<(&'a NodeOutage, FaultWindow)>,
    pub(super) nodes_down: Vec<(usize, FaultWindow)>,
    pub(super) unfaulted: Option<FaultWindow>,
}

impl<'a> NodeWindows<'a> {
    pub(super) fn measure(timeline: &Timeline, outages: &'a NodeOutages) -> Self {
        let faults = outages
            .faults
            .iter()
            .map(|fault| {
                let window = (fault.killed_at, fault.back_at);
                (fault, FaultWindow::measure(timeline, &[window], true))
            })
            .collect();
        let nodes_down = [1, 2]
            .into_iter()
            .filter_map(|down| {
                let windows = outages.windows(down);
                (!windows.is_empty())
                    .then(|| (down, FaultWindow::measure(timeline, &windows, true)))
            })
            .collect();
        // The same measures for the sagas that met no broker fault, to compare with.
        let unfaulted = (!outages.faults.is_empty()).then(|| {
            let all: Vec<_> = outages
                .faults
                .iter()
                .map(|f| (f.killed_at, f.back_at))
                .collect();
            FaultWindow::measure(timeline, &all, false)
        });
        Self {
            faults,
            nodes_down,
            unfaulted,
        }
    }
}

/// How the sagas fared under each link fault of a network run.
pub(super) struct LinkWindows<'a> {
    pub(super) faults: Vec<LinkWindow<'a>>,
}

pub(super) struct LinkWindow<'a> {
    pub(super) outage: &'a LinkOutage,
    /// The fault's window measured (as a broker node fault's).
    pub(super) window: FaultWindow,
    /// How long after the heal the last saga that was in flight during it finished (seconds;
    /// 0 when they had all finished by the heal).
    pub(super) caught_up: Option<f64>,
    /// What became of the partitions of the instance it cut off, if it cut one off.
    pub(super) takeover: Option<Takeover>,
}

impl<'a> LinkWindows<'a> {
    pub(super) fn measure(
        timeline: &Timeline,
        outages: &'a [LinkOutage],
        assignments: &Assignments,
    ) -> Self {
        let faults = outages
            .iter()
            .map(|outage| {
                let window = (outage.began, outage.healed);
                let measured = FaultWindow::measure(timeline, &[window], true);
                let caught_up = timeline
                    .sagas
                    .iter()
                    .filter_map(|(at, finished)| {
                        finished.filter(|f| *at <= outage.healed && *f >= outage.began)
                    })
                    .max()
                    .map(|last| seconds(last - outage.healed).max(0.0));
                LinkWindow {
                    outage,
                    window: measured,
                    caught_up,
                    takeover: assignments.takeover(outage),
                }
            })
            .collect();
        Self { faults }
    }
}

fn seconds(span: chrono::TimeDelta) -> f64 {
    span.num_microseconds()
        .map_or(span.num_milliseconds() as f64 / 1000.0, |us| {
            us as f64 / 1e6
        })
}

/// `sorted`'s `p` quantile, interpolated between neighbours as PostgreSQL's `percentile_cont`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let rank = p.clamp(0.0, 1.0) * last as f64;
    let below = rank.floor() as usize;
    let above = rank.ceil() as usize;
    let (Some(low), Some(high)) = (sorted.get(below), sorted.get(above)) else {
        return 0.0;
    };
    low + (high - low) * (rank - below as f64)
}

/// Seconds from the later of the last link fault's heal and the last order's publication
/// until the last saga finished: the time the engine needed to catch up once the network was
/// whole again. `None` without link faults or without a finished saga.
pub(super) async fn caught_up_after_heal(
    db: &PgPool,
    outages: &[LinkOutage],
    last_placed: DateTime<Utc>,
) -> anyhow::Result<Option<f64>> {
    let Some(healed) = outages.iter().map(|o| o.healed).max() else {
        return Ok(None);
    };
    let whole = healed.max(last_placed);
    Ok(sqlx::query_scalar(
        "SELECT greatest(extract(epoch FROM max(finished_at) - $1)::float8, 0) \
         FROM orchestrator.sagas",
    )
    .bind(whole)
    .fetch_one(db)
    .await?)
}

pub(super) struct Duplicates {
    /// Repeated orders and returns (a saga's history counts them on one line: `duplicates`).
    pub(super) triggers: i64,
    pub(super) ignored_replies: i64,
    pub(super) redelivered: i64,
    /// Saga writes the row's version refused, by writer (`consume`, `deadline`, `operator`).
    pub(super) stale_writes: BTreeMap<String, u64>,
}

/// The line each refused saga write leaves in an orchestrator's log (`saga_stale_writes_refused_total`
/// counts them too, but a process's counters die with it, and the run kills them).
const STALE_WRITES_LOGGED: &str = "saga writes refused: the row moved on since it was read";

/// The saga writes the orchestrators' logs in `log_dir` say the row's version refused, by
/// writer: the fence that keeps an instance which lost its partitions (or raced another) from
/// applying a decision.
pub(super) fn stale_writes(log_dir: &std::path::Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut refused = BTreeMap::new();
    for (_, line) in logged_lines(log_dir, STALE_WRITES_LOGGED)?
        .into_iter()
        .filter(|(instance, _)| instance.starts_with(ORCHESTRATOR))
    {
        let count = log_field(&line, "count")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(1);
        let source = log_field(&line, "source").unwrap_or("unknown").to_owned();
        *refused.entry(source).or_default() += count;
    }
    Ok(refused)
}

/// The lines holding `marker` of every `<instance>.log` in `log_dir` (a run's service logs),
/// with their instance, colours taken off, in each log's order.
pub(super) fn logged_lines(
    log_dir: &std::path::Path,
    marker: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(log_dir)? {
        let path = entry?.path();
        let (Some(instance), Some("log")) = (
            path.file_stem().and_then(|stem| stem.to_str()),
            path.extension().and_then(|ext| ext.to_str()),
        ) else {
            continue;
        };
        let log = String::from_utf8_lossy(&std::fs::read(&path)?).into_owned();
        lines.extend(
            log.lines()
                .filter(|line| line.contains(marker))
                .map(|line| (instance.to_owned(), strip_ansi(line))),
        );
    }
    Ok(lines)
}

/// The value of field `name` (`name=value`, quotes taken off) of a plain log line.
pub(super) fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
        .map(|value| value.trim_matches('"'))
}

/// `line` without its terminal colour codes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for code in chars.by_ref() {
                if code == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

impl Duplicates {
    pub(super) async fn count(
        db: &Databases,
        deployment: &Deployment,
        log_dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let (triggers, ignored_replies): (i64, i64) = sqlx::query_as(&format!(
            "SELECT coalesce(sum(coalesce(duplicates, 1)) FILTER (WHERE message_type = ANY($1)), 0)::bigint, \
                    count(*) FILTER (WHERE NOT message_type = ANY($1)) \
             FROM {ORCHESTRATOR}.saga_history WHERE decision = 'ignored'"
        ))
        .bind(deployment.trigger_messages())
        .fetch_one(db.orchestrator())
        .await?;
        // Every inbox row counts its deliveries; all but the first were absorbed. Each
        // service's inbox is in its database.
        let mut redelivered = 0;
        for service in deployment.services() {
            redelivered += count(
                db.of(service),
                &format!("SELECT coalesce(sum(deliveries - 1), 0)::bigint FROM {service}.inbox"),
            )
            .await?;
        }
        Ok(Self {
            triggers,
            ignored_replies,
            redelivered,
            stale_writes: stale_writes(log_dir)?,
        })
    }
}

/// Sagas finished per second: of one phase of the run, and over time.
pub(super) struct Throughput {
    sagas: usize,
    finished: i64,
    /// Whether [`Self::SHARE`] of the phase's sagas finished.
    pub(super) reached: bool,
    /// From the phase's first order until that share had finished (or the end of the run).
    secs: f64,
    pub(super) rate: f64,
}

impl Throughput {
    pub(super) const BUCKET_SECS: i64 = 5;
    /// The share of a phase's sagas whose finishing times its throughput: the last ones are
    /// left out, so that one saga waiting out a step deadline does not decide it.
    const SHARE: f64 = 0.9;

    /// The throughput of the sagas of `order_ids`, placed from `from` on: [`Self::SHARE`] of
    /// them over the time from `from` until that many had finished, or, when fewer finished,
    /// those over the time until `now`.
    pub(super) async fn phase(
        db: &PgPool,
        order_ids: &[Uuid],
        from: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Self> {
        let share = ((order_ids.len() as f64 * Self::SHARE).ceil() as i64).max(1);
        let finished: i64 = sqlx::query_scalar(
            "SELECT count(finished_at) FROM orchestrator.sagas WHERE saga_key = ANY($1::uuid[]::text[])",
        )
        .bind(order_ids)
        .fetch_one(db)
        .await?;
        let at: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT finished_at FROM orchestrator.sagas \
             WHERE saga_key = ANY($1::uuid[]::text[]) AND finished_at IS NOT NULL \
             ORDER BY finished_at OFFSET $2 LIMIT 1",
        )
        .bind(order_ids)
        .bind(share - 1)
        .fetch_optional(db)
        .await?;
        let until = at.unwrap_or(now);
        let secs = (until - from).num_milliseconds().max(1) as f64 / 1000.0;
        let counted = if at.is_some() { share } else { finished };
        Ok(Self {
            sagas: order_ids.len(),
            finished,
            reached: at.is_some(),
            secs,
            rate: counted as f64 / secs,
        })
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "{:.1}/s ({} of {} sagas finished; {:.1} s from its first order until {})",
            self.rate,
            self.finished,
            self.sagas,
            self.secs,
            if self.reached {
                format!("{:.0}% had finished", Self::SHARE * 100.0)
            } else {
                "the end of the run".into()
            }
        )
    }

    /// Sagas of `order_ids` finished per second, in buckets of [`Self::BUCKET_SECS`] from
    /// `from` on.
    pub(super) async fn timeline(
        db: &PgPool,
        order_ids: &[Uuid],
        from: DateTime<Utc>,
    ) -> anyhow::Result<Vec<String>> {
        let buckets: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT greatest(floor(extract(epoch FROM finished_at - $2) / $3), 0)::int AS bucket, \
                    count(*) \
             FROM orchestrator.sagas WHERE saga_key = ANY($1::uuid[]::text[]) AND finished_at IS NOT NULL \
             GROUP BY bucket ORDER BY bucket",
        )
        .bind(order_ids)
        .bind(from)
        .bind(Self::BUCKET_SECS as f64)
        .fetch_all(db)
        .await?;
        let counts: BTreeMap<i32, i64> = buckets.into_iter().collect();
        let last = counts.keys().last().copied().unwrap_or(0);
        Ok((0..=last)
            .map(|bucket| {
                let n = counts.get(&bucket).copied().unwrap_or(0);
                format!("{:.1}", n as f64 / Self::BUCKET_SECS as f64)
            })
            .collect())
    }
}

/// How the sagas fared while broker nodes were down: those in flight at some time in the
/// windows (published before a window's end, finished after its start), timed from their
/// publication to their finish, and the longest any service handled nothing in a window.
pub(super) struct FaultWindow {
    sagas: i64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The service that waited longest, and how long (a gap between two messages it handled
    /// that overlaps a window).
    longest_stall: Option<(String, f64)>,
}

impl FaultWindow {
    /// The sagas in flight during some window of `windows` (with `inside`; those in flight
    /// during none without it) and the longest pause of a service that overlaps a window.
    fn measure(timeline: &Timeline, windows: &[Span], inside: bool) -> Self {
        let overlaps = |from: DateTime<Utc>, until: DateTime<Utc>| {
            windows
                .iter()
                .any(|(since, to)| from <= *to && until >= *since)
        };
        let mut ms: Vec<f64> = timeline
            .sagas
            .iter()
            .filter_map(|(at, finished)| {
                let finished = (*finished)?;
                (overlaps(*at, finished) == inside).then(|| seconds(finished - *at) * 1000.0)
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        // Outside the windows (the baseline): no stall to measure.
        let longest_stall = if inside {
            timeline
                .pauses
                .iter()
                .map(|(service, pauses)| {
                    let longest = pauses
                        .iter()
                        .filter(|(from, until)| overlaps(*from, *until))
                        .map(|(from, until)| seconds(*until - *from))
                        .fold(0.0, f64::max);
                    (service.clone(), longest)
                })
                .reduce(|a, b| if b.1 > a.1 { b } else { a })
        } else {
            None
        };
        Self {
            sagas: i64::try_from(ms.len()).unwrap_or(i64::MAX),
            p50_ms: percentile(&ms, 0.5),
            p99_ms: percentile(&ms, 0.99),
            max_ms: ms.last().copied().unwrap_or(0.0),
            longest_stall,
        }
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "{} sagas in flight: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (published to finished); longest stall {}",
            self.sagas,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.longest_stall
                .as_ref()
                .map(|(service, secs)| format!("{secs:.1} s ({service})"))
                .unwrap_or_else(|| "-".into())
        )
    }
}

/// How much the failures slowed the sagas down.
pub(super) struct Stalls {
    pub(super) saga_p50_ms: f64,
    pub(super) saga_p99_ms: f64,
    pub(super) saga_max_ms: f64,
    /// Per service: the longest time between two messages it handled (or the start or end of
    /// placing orders) while orders were being placed, so messages were waiting for it.
    pub(super) longest_gap_secs: Vec<(String, f64)>,
}

impl Stalls {
    pub(super) async fn measure(
        db: &Databases,
        deployment: &Deployment,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> anyhow::Result<Self> {
        let (saga_p50_ms, saga_p99_ms, saga_max_ms): (f64, f64, f64) = sqlx::query_as(
            "SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), 0), \
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), 0), \
                    coalesce(max(ms), 0) \
             FROM (SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000 AS ms \
                   FROM orchestrator.sagas WHERE finished_at IS NOT NULL) d",
        )
        .fetch_one(db.orchestrator())
        .await?;
        let mut longest_gap_secs = Vec::new();
        for service in deployment.services() {
            let gap: f64 = sqlx::query_scalar(&format!(
                "SELECT coalesce(max(gap), 0) FROM ( \
                   SELECT extract(epoch FROM at - lag(at) OVER (ORDER BY at))::float8 AS gap \
                   FROM (SELECT received_at AS at FROM {service}.inbox WHERE received_at BETWEEN $1 AND $2 \
                         UNION ALL SELECT $1 UNION ALL SELECT $2) handled) g"
            ))
            .bind(from)
            .bind(until)
            .fetch_one(db.of(service))
            .await?;
            longest_gap_secs.push((service.to_owned(), gap));
        }
        Ok(Self {
            saga_p50_ms,
            saga_p99_ms,
            saga_max_ms,
            longest_gap_secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_writes_are_summed_by_writer_from_orchestrator_logs_only() {
        let dir = std::env::temp_dir().join(format!("stale-writes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("folder");
        let logged = |source: &str, count: u64| {
            format!(
                "\u{1b}[2m2026-12-07T00:00:00Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m orchestrator::metrics: {STALE_WRITES_LOGGED} \u{1b}[3msource\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"{source}\" \u{1b}[3mcount\u{1b}[0m\u{1b}[2m=\u{1b}[0m{count}\n"
            )
        };
        std::fs::write(
            dir.join("orchestrator-1.log"),
            logged("deadline", 2) + "an unrelated line\n" + &logged("consume", 1),
        )
        .expect("log 1");
        std::fs::write(dir.join("orchestrator-2.log"), logged("deadline", 3)).expect("log 2");
        std::fs::write(dir.join("inventory-1.log"), logged("deadline", 100)).expect("not ours");
        let refused = stale_writes(&dir).expect("read");
        std::fs::remove_dir_all(&dir).expect("removed");
        assert_eq!(refused.get("deadline"), Some(&5));
        assert_eq!(refused.get("consume"), Some(&1));
        assert_eq!(refused.len(), 2);
    }

    fn at(second: i64) -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.timestamp_opt(1_800_000_000 + second, 0)
            .single()
            .expect("a time")
    }

    #[test]
    fn percentiles_interpolate_as_postgresqls_percentile_cont() {
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
        assert!((percentile(&[1.0, 2.0, 3.0, 4.0], 0.99) - 3.97).abs() < 1e-9);
    }

    #[test]
    fn a_window_measures_the_sagas_in_flight_during_it_and_the_pauses_it_overlaps() {
        let timeline = Timeline {
            sagas: vec![
                (at(0), Some(at(5))),   // before the window
                (at(8), Some(at(12))),  // in flight during it
                (at(9), Some(at(30))),  // in flight during it
                (at(20), Some(at(21))), // after it
                (at(9), None),          // never finished
            ],
            pauses: vec![
                ("inventory".into(), vec![(at(0), at(2)), (at(9), at(13))]),
                ("payment".into(), vec![(at(11), at(18))]),
            ],
        };
        let window = [(at(10), at(15))];
        let inside = FaultWindow::measure(&timeline, &window, true);
        assert_eq!(inside.sagas, 2);
        assert_eq!(inside.max_ms, 21_000.0);
        assert_eq!(inside.p50_ms, 12_500.0);
        assert_eq!(inside.longest_stall, Some(("payment".into(), 7.0)));
        let outside = FaultWindow::measure(&timeline, &window, false);
        assert_eq!(outside.sagas, 2);
        assert_eq!(outside.longest_stall, None);
        let outage = LinkOutage {
            fault: crate::chaos::link_faults::LinkFault::SlowLossy,
            target: "every link".into(),
            cut_off: None,
            began: at(10),
            healed: at(15),
        };
        let links = LinkWindows::measure(
            &timeline,
            std::slice::from_ref(&outage),
            &Assignments::default(),
        );
        assert_eq!(
            links.faults[0].caught_up,
            Some(15.0),
            "the last in flight finished at 30"
        );
    }
}
