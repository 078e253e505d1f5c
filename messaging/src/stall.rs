//! Telling a consumer that silently reads nothing from one that has nothing to read.
//!
//! librdkafka can stop fetching a partition for good without telling the application: after a
//! topic was deleted and created again while its leader epoch had grown (a broker restart
//! bumps it), librdkafka 2.12 ignores the new topic's metadata as "outdated" (epoch 0 is older
//! than the cached one), fetches with the old topic id, gets `UNKNOWN_TOPIC_ID`, asks for
//! metadata, ignores it again, and so on, for ever; `recv` just never returns a record. The
//! chaos suite found it (a broker kill, then a command topic deleted and created again): the
//! participant read nothing for the rest of the run while its commands waited on the broker.
//!
//! So the consume loop checks, whenever it has received nothing for a while, whether the
//! broker holds records for its partitions that it should have read: the offset it would read
//! next (its position, else the group's committed offset, else the partition's start) differs
//! from the partition's end. Records waiting that long, or a position beyond the end (a topic
//! created again, whose old offsets the group kept), mean the consumer is stuck; seen twice in
//! a row, the pipeline replaces the consumer with a new one, whose fresh metadata reads the
//! topic as it is now.
//!
//! A consumer can also hold no partition while its group counts it as their owner: a KIP-848
//! member restarted while two of three brokers were down (the group coordinator loading) got
//! no assignment and logged nothing, while the group kept its partitions from the other
//! members (the three-node chaos runs found it). So a consumer without partitions looks at
//! every partition of the topics it subscribes to: records waiting beyond the group's committed
//! offset, with that offset the same on three checks in a row, mean nobody in the group reads
//! them, and the consumer is replaced too (a new member gets an assignment afresh).
//!
//! The same holds for part of an assignment: a KIP-848 member restarted while two of three
//! brokers were down got one of the four partitions its share would have been and nothing more,
//! the other live member kept its one, and the group read the other two for nobody until the
//! run ended (the three-node chaos suite in CI: 115 orders waited 176 s, every service
//! otherwise healthy). So a consumer whose own partitions are read looks at the rest of its
//! topics' partitions the same way, and one unread by the group on as many checks replaces it
//! too.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::Consumer as KafkaConsumer;

/// What the consumer and the broker say of one assigned partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    pub topic: String,
    pub partition: i32,
    /// The offset the consumer would read next, if it knows one: its position, else the
    /// group's committed offset.
    pub next: Option<i64>,
    /// The partition's first and next-to-be-written offsets on the broker.
    pub low: i64,
    pub high: i64,
}

impl PartitionView {
    /// The broker holds records this consumer should have read by now, or the consumer stands
    /// beyond the partition's end. A consumer that knows no offset starts at the beginning
    /// (`auto.offset.reset=earliest`).
    fn behind_or_beyond(&self) -> bool {
        self.next.unwrap_or(self.low).max(self.low) != self.high
    }
}

/// The partitions of `views` a consumer that received nothing lately is stuck on, described.
pub fn stuck(views: &[PartitionView]) -> Vec<String> {
    views
        .iter()
        .filter(|view| view.behind_or_beyond())
        .map(|view| {
            format!(
                "{} [{}]: reads at {} of {}..{}",
                view.topic,
                view.partition,
                view.next
                    .map_or_else(|| "its start".to_owned(), |n| n.to_string()),
                view.low,
                view.high
            )
        })
        .collect()
}

/// Watches one consume loop: when it last received a record, and what the last check saw.
#[derive(Debug)]
pub struct StallWatch {
    after: Duration,
    last_progress: tokio::time::Instant,
    suspected: bool,
    /// What the last check saw waiting in the partitions this consumer does not hold.
    unread_before: Vec<Unread>,
}

impl StallWatch {
    /// Checks after `after` without a record (never when it is zero).
    pub fn new(after: Duration) -> Self {
        Self {
            after,
            last_progress: tokio::time::Instant::now(),
            suspected: false,
            unread_before: Vec::new(),
        }
    }

    /// A record arrived (or the assignment is fresh): the consumer works.
    pub fn progressed(&mut self) {
        self.last_progress = tokio::time::Instant::now();
        self.suspected = false;
    }

    /// When the next check is due: `after` since the last record, or since the last check.
    pub fn next_check(&self) -> Option<tokio::time::Instant> {
        (!self.after.is_zero()).then(|| self.last_progress + self.after)
    }

    /// Looks at the consumer's partitions against the broker's. `Some(why)` when the consumer
    /// was seen stuck on this check and the one before; a check that cannot tell (broker
    /// unreachable, a current-thread runtime that cannot block) clears the suspicion.
    pub fn check(&mut self, consumer: &KafkaConsumer) -> Option<String> {
        // The next check is `after` from now, whatever this one finds.
        self.last_progress = tokio::time::Instant::now();
        let timeout = self.after.min(Duration::from_secs(5));
        let probed = probe(consumer, timeout);
        self.judge(probed)
    }

    /// What a check makes of what [`probe`] found (`None`: it could not tell).
    fn judge(&mut self, probed: Option<Probed>) -> Option<String> {
        let Some(Probed { assigned, others }) = probed else {
            self.suspected = false;
            self.unread_before.clear();
            return None;
        };
        let stuck = stuck(&assigned);
        if !stuck.is_empty() {
            self.unread_before.clear();
            if !self.suspected {
                self.suspected = true;
                tracing::warn!(partitions = ?stuck, "the consumer received nothing while its partitions have records to read; checking again");
                return None;
            }
            return Some(stuck.join("; "));
        }
        self.suspected = false;
        // Its own partitions are read (or it holds none): does the group read the others?
        self.unread_before = unread(&self.unread_before, &others);
        let still = unread_still(&self.unread_before);
        if still.is_empty() {
            return None;
        }
        let held = if assigned.is_empty() {
            "no partition assigned".to_owned()
        } else {
            format!("{} partitions assigned and read", assigned.len())
        };
        Some(format!(
            "{held}, while the group reads none of {}",
            still.join("; ")
        ))
    }
}

/// How many checks in a row a partition this consumer does not hold must stand still, records
/// waiting beyond the group's same committed offset, before the consumer is replaced: three
/// checks span two stall intervals (20 s by default), more than a killed member's partitions
/// wait for its session to lapse (10 s on this project's brokers) and the next owner to
/// commit, so a takeover in progress does not count.
const UNREAD_CHECKS: u32 = 3;

/// A partition this consumer does not hold with records waiting beyond the group's committed
/// offset, and on how many checks in a row it was seen so at that offset.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unread {
    topic: String,
    partition: i32,
    committed: Option<i64>,
    checks: u32,
}

/// The partitions of `views` (the consumer's view of the partitions it does not hold, `next`
/// being the group's committed offset) whose records wait to be read, each counted against
/// `before` (the check before's): one more check when it stood still at the same offset.
fn unread(before: &[Unread], views: &[PartitionView]) -> Vec<Unread> {
    views
        .iter()
        .filter(|view| view.behind_or_beyond())
        .map(|view| {
            let checks = before
                .iter()
                .find(|b| {
                    b.topic == view.topic
                        && b.partition == view.partition
                        && b.committed == view.next
                })
                .map_or(1, |b| b.checks + 1);
            Unread {
                topic: view.topic.clone(),
                partition: view.partition,
                committed: view.next,
                checks,
            }
        })
        .collect()
}

/// The partitions of `unread` that stood still on [`UNREAD_CHECKS`] checks in a row (nobody in
/// the group moved them on), described.
fn unread_still(unread: &[Unread]) -> Vec<String> {
    unread
        .iter()
        .filter(|u| u.checks >= UNREAD_CHECKS)
        .map(|u| {
            format!(
                "{} [{}] (committed {})",
                u.topic,
                u.partition,
                u.committed
                    .map_or_else(|| "none".to_owned(), |n| n.to_string())
            )
        })
        .collect()
}

/// What [`probe`] found.
struct Probed {
    /// The consumer's assigned partitions (none, possibly).
    assigned: Vec<PartitionView>,
    /// Every other partition of the topics it subscribes to, with the group's committed
    /// offsets.
    others: Vec<PartitionView>,
}

/// The consumer's assigned partitions against the broker's offsets, and every other partition
/// of the topics it subscribes to against the group's committed offsets. `None` when it
/// cannot tell.
fn probe(consumer: &KafkaConsumer, timeout: Duration) -> Option<Probed> {
    // These calls wait on the broker; only a multi-thread runtime can let a worker block.
    if tokio::runtime::Handle::try_current().ok()?.runtime_flavor()
        != tokio::runtime::RuntimeFlavor::MultiThread
    {
        return None;
    }
    tokio::task::block_in_place(|| {
        let positions = consumer.position().ok()?;
        let assigned = if positions.count() > 0 {
            let committed = consumer.committed(timeout).ok()?;
            views(consumer, &positions, Some(&committed), timeout)?
        } else {
            Vec::new()
        };
        let mut others = TopicPartitionList::new();
        for element in consumer.subscription().ok()?.elements() {
            let metadata = consumer
                .fetch_metadata(Some(element.topic()), timeout)
                .ok()?;
            for topic in metadata.topics() {
                for partition in topic.partitions() {
                    if positions
                        .find_partition(topic.name(), partition.id())
                        .is_none()
                    {
                        others.add_partition(topic.name(), partition.id());
                    }
                }
            }
        }
        if assigned.is_empty() && others.count() == 0 {
            return None;
        }
        let others = if others.count() == 0 {
            Vec::new()
        } else {
            let committed = consumer.committed_offsets(others, timeout).ok()?;
            views(consumer, &committed, None, timeout)?
        };
        Some(Probed { assigned, others })
    })
}

/// `partitions` (offsets: where the consumer, or the group, stands) against the broker's
/// watermarks; an unknown offset is looked up in `committed` when given.
fn views(
    consumer: &KafkaConsumer,
    partitions: &TopicPartitionList,
    committed: Option<&TopicPartitionList>,
    timeout: Duration,
) -> Option<Vec<PartitionView>> {
    let mut views = Vec::with_capacity(partitions.count());
    for element in partitions.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        let (low, high) = consumer.fetch_watermarks(topic, partition, timeout).ok()?;
        let next = match element.offset() {
            Offset::Offset(n) => Some(n),
            _ => match committed
                .and_then(|c| c.find_partition(topic, partition))
                .map(|c| c.offset())
            {
                Some(Offset::Offset(n)) => Some(n),
                _ => None,
            },
        };
        views.push(PartitionView {
            topic: topic.to_owned(),
            partition,
            next,
            low,
            high,
        });
    }
    Some(views)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(next: Option<i64>, low: i64, high: i64) -> PartitionView {
        PartitionView {
            topic: "t".into(),
            partition: 0,
            next,
            low,
            high,
        }
    }

    #[test]
    fn a_consumer_at_the_end_is_not_stuck() {
        assert!(stuck(&[view(Some(7), 0, 7), view(None, 0, 0), view(None, 5, 5)]).is_empty());
        // Records removed by retention below the position say nothing.
        assert!(stuck(&[view(Some(3), 5, 5)]).is_empty());
    }

    #[test]
    fn records_waiting_or_a_position_beyond_the_end_are_stuck() {
        let found = stuck(&[
            view(Some(3), 0, 9),
            view(Some(14), 0, 2),
            view(None, 0, 4),
            view(Some(5), 0, 5),
        ]);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[1].contains("reads at 14 of 0..2"), "{found:?}");
        assert!(found[2].contains("its start"), "{found:?}");
    }

    fn at(partition: i32, next: Option<i64>, high: i64) -> PartitionView {
        PartitionView {
            partition,
            ..view(next, 0, high)
        }
    }

    /// The CI failure this reads: a member holding partition 2 (read to its end) while the
    /// group leaves 0 and 1 unread. Partition 0 standing still at the same committed offset on
    /// three checks in a row replaces the consumer; 1, which the group moved on, does not count.
    #[test]
    fn a_consumer_whose_partitions_are_read_counts_the_ones_its_group_leaves_unread() {
        let mut watch = StallWatch::new(Duration::from_secs(10));
        let probed = |others: Vec<PartitionView>| {
            Some(Probed {
                assigned: vec![at(2, Some(40), 40)],
                others,
            })
        };
        assert_eq!(
            watch.judge(probed(vec![
                at(0, Some(3), 9),
                at(1, Some(5), 9),
                at(3, Some(9), 9)
            ])),
            None,
            "the first sighting only notes them"
        );
        assert_eq!(
            watch.judge(probed(vec![at(0, Some(3), 12), at(1, Some(7), 12)])),
            None,
            "two checks may be a takeover in progress"
        );
        let why = watch
            .judge(probed(vec![at(0, Some(3), 12), at(1, Some(8), 12)]))
            .expect("partition 0 stood still with records waiting");
        assert!(why.starts_with("1 partitions assigned and read"), "{why}");
        assert!(why.contains("t [0] (committed 3)"), "{why}");
        assert!(!why.contains("t [1]"), "{why}");
        // A check that cannot tell forgets what it saw.
        assert_eq!(watch.judge(None), None);
        assert_eq!(watch.judge(probed(vec![at(0, Some(3), 12)])), None);
    }

    /// Its own partition with records it did not read is the first suspicion, and the second
    /// check replaces it; the group's other partitions do not count meanwhile.
    #[test]
    fn a_consumer_stuck_on_its_own_partitions_is_replaced_on_the_second_check() {
        let mut watch = StallWatch::new(Duration::from_secs(10));
        let probed = || {
            Some(Probed {
                assigned: vec![at(2, Some(3), 9)],
                others: vec![at(0, Some(3), 9)],
            })
        };
        assert_eq!(watch.judge(probed()), None);
        let why = watch.judge(probed()).expect("stuck on its own partition");
        assert!(why.contains("reads at 3 of 0..9"), "{why}");
    }

    #[test]
    fn an_unassigned_consumer_counts_only_partitions_nobody_moved_on() {
        let first = unread(&[], &[view(Some(3), 0, 9)]);
        // The group read on meanwhile: someone owns it, and the count starts again.
        let moved = unread(&first, &[view(Some(5), 0, 12)]);
        assert_eq!(moved[0].checks, 1);
        // New records, the same committed offset, three checks: nobody reads it.
        let second = unread(&first, &[view(Some(3), 0, 12)]);
        assert!(unread_still(&second).is_empty());
        let third = unread(&second, &[view(Some(3), 0, 14)]);
        assert_eq!(unread_still(&third), vec!["t [0] (committed 3)".to_owned()]);
        // Caught up: nothing waits.
        assert!(unread(&third, &[view(Some(9), 0, 9)]).is_empty());
    }
}
