//! Failover times of a network run: when a link fault cut a service instance off, how long
//! until the other instances of its service held every partition it had held, and how long
//! after the heal it held partitions again.
//!
//! Read from the line every instance logs after each rebalance (`messaging::access`: "the
//! consumer's assignment changed", with `partitions=` in [`Owned`]'s one-word form), each on
//! the real clock: an instance run with `--clock-skew` logs its own wrong time, which is taken
//! off again here.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use messaging::assignment::Owned;

use super::link_faults::LinkOutage;
use super::measures::{log_field, logged_lines};

/// The line a consumer logs after every rebalance, with what it holds then.
const ASSIGNMENT_LOGGED: &str = "the consumer's assignment changed";

/// A takeover that comes later than this after the heal is not counted as the fault's: by
/// then the cut-off instance is back, and a later rebalance has another cause.
const AFTER_THE_HEAL: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

/// What one instance held, and from when, in the order it logged them.
type History = Vec<(DateTime<Utc>, Owned)>;

/// Each instance's [`History`], by instance name.
#[derive(Debug, Default)]
pub(super) struct Assignments(BTreeMap<String, History>);

/// What became of the partitions of an instance a link fault cut off.
#[derive(Debug, PartialEq)]
pub(super) enum Takeover {
    /// It held no partition when the fault began.
    HeldNothing,
    /// The other instances held `taken` of its `held` partitions `after` seconds from the
    /// fault's start (the last of them), by these instances; it held partitions again `back`
    /// seconds after the heal (0 when already before it; `None`: not in the log).
    Taken {
        held: usize,
        taken: usize,
        after: f64,
        by: Vec<String>,
        back: Option<f64>,
    },
}

impl Takeover {
    pub(super) fn describe(&self) -> String {
        match self {
            Self::HeldNothing => "it held no partition".into(),
            Self::Taken { held, taken: 0, .. } => {
                format!("it kept its {held} partitions (none taken over)")
            }
            Self::Taken {
                held,
                taken,
                after,
                by,
                back,
            } => {
                let how_many = if taken == held {
                    "all".to_owned()
                } else {
                    taken.to_string()
                };
                let again = back.map_or_else(
                    || "never (in its log)".to_owned(),
                    |secs| format!("{secs:.1} s after the heal"),
                );
                format!(
                    "{how_many} of its {held} partitions taken over by {} {after:.1} s after \
                     the fault began; it held partitions again {again}",
                    by.join(" and ")
                )
            }
        }
    }
}

impl Assignments {
    /// Reads the assignment lines of every `<instance>.log` in `log_dir`; `skews` are the
    /// run's `--clock-skew`s (instance, seconds ahead).
    pub(super) fn read(log_dir: &Path, skews: &[(String, i64)]) -> anyhow::Result<Self> {
        let mut assignments = Self::default();
        for (instance, line) in logged_lines(log_dir, ASSIGNMENT_LOGGED)? {
            let Some((at, owned)) = assignment_line(&line) else {
                continue;
            };
            let skew = skews
                .iter()
                .find(|(name, _)| *name == instance)
                .map_or(0, |(_, secs)| *secs);
            assignments
                .0
                .entry(instance)
                .or_default()
                .push((at - chrono::TimeDelta::seconds(skew), owned));
        }
        Ok(assignments)
    }

    /// The takeover of the partitions `outage` cut off, when it cut an instance off.
    pub(super) fn takeover(&self, outage: &LinkOutage) -> Option<Takeover> {
        let cut_off = outage.cut_off.as_deref()?;
        // An instance that logged no assignment held nothing.
        let own: &[(DateTime<Utc>, Owned)] = self.0.get(cut_off).map_or(&[], Vec::as_slice);
        let held = own
            .iter()
            .take_while(|(at, _)| *at <= outage.began)
            .last()
            .map(|(_, owned)| owned.clone())
            .unwrap_or_default();
        if held.is_empty() {
            return Some(Takeover::HeldNothing);
        }
        let service = service_of(cut_off);
        let horizon = outage.healed + AFTER_THE_HEAL;
        let peers: Vec<(&String, &History)> = self
            .0
            .iter()
            .filter(|(name, _)| name.as_str() != cut_off && service_of(name) == service)
            .collect();
        let mut last_taken: Option<DateTime<Utc>> = None;
        let mut by: Vec<String> = Vec::new();
        let mut taken = 0;
        let pairs: Vec<(&str, i32)> = held.pairs().collect();
        for (topic, partition) in &pairs {
            let first = peers
                .iter()
                .filter_map(|(peer, history)| {
                    history
                        .iter()
                        .find(|(at, owned)| {
                            *at >= outage.began
                                && *at <= horizon
                                && owned.partitions_of(topic).contains(partition)
                        })
                        .map(|(at, _)| (*at, *peer))
                })
                .min();
            if let Some((at, peer)) = first {
                taken += 1;
                last_taken = last_taken.max(Some(at));
                if !by.contains(peer) {
                    by.push(peer.clone());
                }
            }
        }
        let after = last_taken.map_or(0.0, |at| seconds(at - outage.began));
        // Back: the first time after it lost them that it held partitions again.
        let lost = own
            .iter()
            .find(|(at, owned)| *at >= outage.began && owned.is_empty())
            .map(|(at, _)| *at);
        let back = lost.and_then(|lost| {
            own.iter()
                .find(|(at, owned)| *at > lost && !owned.is_empty())
                .map(|(at, _)| seconds(*at - outage.healed).max(0.0))
        });
        Some(Takeover::Taken {
            held: pairs.len(),
            taken,
            after,
            by,
            back,
        })
    }
}

/// The service an instance belongs to: `inventory-2` → `inventory` (an instance that is its
/// service's only one has its service's name).
fn service_of(instance: &str) -> &str {
    match instance.rsplit_once('-') {
        Some((service, n)) if n.chars().all(|c| c.is_ascii_digit()) => service,
        _ => instance,
    }
}

/// The time and the partitions of one assignment line (colours taken off).
fn assignment_line(line: &str) -> Option<(DateTime<Utc>, Owned)> {
    let at = DateTime::parse_from_rfc3339(line.split_whitespace().next()?).ok()?;
    let owned = log_field(line, "partitions")?.parse().ok()?;
    Some((at.with_timezone(&Utc), owned))
}

fn seconds(span: chrono::TimeDelta) -> f64 {
    span.num_milliseconds() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::link_faults::LinkFault;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("a time")
    }

    fn owned(word: &str) -> Owned {
        word.parse().expect("an assignment word")
    }

    fn outage(cut_off: &str, began: i64, healed: i64) -> LinkOutage {
        LinkOutage {
            fault: LinkFault::ParticipantDatabase,
            target: format!("{cut_off} from PostgreSQL"),
            cut_off: Some(cut_off.into()),
            began: at(began),
            healed: at(healed),
        }
    }

    #[test]
    fn an_assignment_line_reads_its_time_and_partitions() {
        let line = "2026-12-07T05:43:17.669234Z  INFO messaging::access: the consumer's \
                    assignment changed partitions=p.inventory.commands:0,1 rebalance=Assign([])";
        let (when, held) = assignment_line(line).expect("an assignment line");
        assert_eq!(when.to_rfc3339(), "2026-12-07T05:43:17.669234+00:00");
        assert_eq!(held, owned("p.inventory.commands:0,1"));
        assert!(assignment_line("garbage partitions=x").is_none());
    }

    #[test]
    fn the_takeover_is_when_the_last_partition_reached_another_instance() {
        let assignments = Assignments(BTreeMap::from([
            (
                "inventory-1".to_owned(),
                vec![
                    (at(0), owned("t:0,1")),
                    (at(14), owned("none")),
                    (at(25), owned("t:0")),
                ],
            ),
            (
                "inventory-2".to_owned(),
                vec![
                    (at(0), owned("t:2,3")),
                    (at(15), owned("t:1,2,3")),
                    (at(16), owned("t:0,1,2,3")),
                ],
            ),
            // Another service's instance holding the same partition number is no takeover.
            ("payment-1".to_owned(), vec![(at(11), owned("t:0,1"))]),
        ]));
        assert_eq!(
            assignments.takeover(&outage("inventory-1", 10, 20)),
            Some(Takeover::Taken {
                held: 2,
                taken: 2,
                after: 6.0,
                by: vec!["inventory-2".into()],
                back: Some(5.0),
            })
        );
    }

    #[test]
    fn partitions_kept_or_none_held_say_so() {
        let assignments = Assignments(BTreeMap::from([
            ("orchestrator-1".to_owned(), vec![(at(0), owned("r:0,1"))]),
            ("orchestrator-2".to_owned(), vec![(at(0), owned("none"))]),
        ]));
        let kept = assignments
            .takeover(&outage("orchestrator-1", 10, 20))
            .expect("a takeover");
        assert_eq!(
            kept.describe(),
            "it kept its 2 partitions (none taken over)"
        );
        assert_eq!(
            assignments.takeover(&outage("orchestrator-2", 10, 20)),
            Some(Takeover::HeldNothing)
        );
        // A takeover long after the heal has another cause.
        let late = Assignments(BTreeMap::from([
            ("shipping-1".to_owned(), vec![(at(0), owned("s:0"))]),
            ("shipping-2".to_owned(), vec![(at(100), owned("s:0"))]),
        ]));
        assert!(matches!(
            late.takeover(&outage("shipping-1", 10, 20)),
            Some(Takeover::Taken { taken: 0, .. })
        ));
    }

    #[test]
    fn a_skewed_instance_s_log_is_read_on_the_real_clock() {
        let dir = std::env::temp_dir().join(format!("takeovers-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        std::fs::write(
            dir.join("orchestrator-2.log"),
            "\u{1b}[2m2026-12-07T05:53:14.809659Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \
             messaging::access: the consumer's assignment changed \
             \u{1b}[3mpartitions\u{1b}[0m\u{1b}[2m=\u{1b}[0mp.saga.replies:2,3 rebalance=Assign([])\n\
             unrelated line\n",
        )
        .expect("write a log");
        let read =
            Assignments::read(&dir, &[("orchestrator-2".into(), 600)]).expect("read the logs");
        std::fs::remove_dir_all(&dir).expect("remove the scratch folder");
        let history = &read.0["orchestrator-2"];
        assert_eq!(history.len(), 1);
        assert_eq!(
            history[0].0.to_rfc3339(),
            "2026-12-07T05:43:14.809659+00:00"
        );
        assert_eq!(history[0].1, owned("p.saga.replies:2,3"));
    }
}
