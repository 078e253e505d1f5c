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
//! offset, with that offset the same on two checks in a row, mean nobody in the group reads
//! them, and the consumer is replaced too (a new member gets an assignment afresh).

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
    /// What the last check of an unassigned consumer saw waiting: (topic, partition, the
    /// group's committed offset).
    unread_before: Vec<(String, i32, Option<i64>)>,
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
    /// unreachable, no assignment, a current-thread runtime that cannot block) clears the
    /// suspicion.
    pub fn check(&mut self, consumer: &KafkaConsumer) -> Option<String> {
        // The next check is `after` from now, whatever this one finds.
        self.last_progress = tokio::time::Instant::now();
        let timeout = self.after.min(Duration::from_secs(5));
        let stuck = match probe(consumer, timeout) {
            Some(Probed::Assigned(views)) => {
                self.unread_before.clear();
                stuck(&views)
            }
            Some(Probed::Unassigned(views)) => {
                let unread = unread(&views);
                let still = unread_still(&self.unread_before, &unread);
                self.unread_before = unread;
                if still.is_empty() {
                    self.suspected = false;
                    return None;
                }
                // Seen unread on two checks: this is the second.
                return Some(format!(
                    "no partition assigned, while the group reads none of {}",
                    still.join("; ")
                ));
            }
            None => Vec::new(),
        };
        if stuck.is_empty() {
            self.suspected = false;
            return None;
        }
        if !self.suspected {
            self.suspected = true;
            tracing::warn!(partitions = ?stuck, "the consumer received nothing while its partitions have records to read; checking again");
            return None;
        }
        Some(stuck.join("; "))
    }
}

/// The partitions of `views` (an unassigned consumer's view of its topics, `next` being the
/// group's committed offset) whose records wait to be read.
fn unread(views: &[PartitionView]) -> Vec<(String, i32, Option<i64>)> {
    views
        .iter()
        .filter(|view| view.behind_or_beyond())
        .map(|view| (view.topic.clone(), view.partition, view.next))
        .collect()
}

/// The partitions unread now at the same committed offset as on the check before (nobody in
/// the group moved them on), described.
pub fn unread_still(
    before: &[(String, i32, Option<i64>)],
    now: &[(String, i32, Option<i64>)],
) -> Vec<String> {
    now.iter()
        .filter(|partition| before.contains(partition))
        .map(|(topic, partition, next)| {
            format!(
                "{topic} [{partition}] (committed {})",
                next.map_or_else(|| "none".to_owned(), |n| n.to_string())
            )
        })
        .collect()
}

/// What [`probe`] found.
enum Probed {
    /// The consumer's assigned partitions.
    Assigned(Vec<PartitionView>),
    /// It holds none: every partition of its topics, with the group's committed offsets.
    Unassigned(Vec<PartitionView>),
}

/// The consumer's assigned partitions against the broker's offsets, or, when it holds none,
/// every partition of the topics it subscribes to. `None` when it cannot tell.
fn probe(consumer: &KafkaConsumer, timeout: Duration) -> Option<Probed> {
    // These calls wait on the broker; only a multi-thread runtime can let a worker block.
    if tokio::runtime::Handle::try_current().ok()?.runtime_flavor()
        != tokio::runtime::RuntimeFlavor::MultiThread
    {
        return None;
    }
    tokio::task::block_in_place(|| {
        let positions = consumer.position().ok()?;
        if positions.count() > 0 {
            let committed = consumer.committed(timeout).ok()?;
            return views(consumer, &positions, Some(&committed), timeout).map(Probed::Assigned);
        }
        let mut all = TopicPartitionList::new();
        for element in consumer.subscription().ok()?.elements() {
            let metadata = consumer
                .fetch_metadata(Some(element.topic()), timeout)
                .ok()?;
            for topic in metadata.topics() {
                for partition in topic.partitions() {
                    all.add_partition(topic.name(), partition.id());
                }
            }
        }
        if all.count() == 0 {
            return None;
        }
        let committed = consumer.committed_offsets(all, timeout).ok()?;
        views(consumer, &committed, None, timeout).map(Probed::Unassigned)
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

    #[test]
    fn an_unassigned_consumer_counts_only_partitions_nobody_moved_on() {
        let before = unread(&[view(Some(3), 0, 9)]);
        // The group read on meanwhile: someone owns it.
        assert!(unread_still(&before, &unread(&[view(Some(5), 0, 12)])).is_empty());
        // New records, the same committed offset: nobody reads it.
        let still = unread_still(&before, &unread(&[view(Some(3), 0, 12)]));
        assert_eq!(still, vec!["t [0] (committed 3)".to_owned()]);
        // Caught up: nothing waits.
        assert!(unread_still(&before, &unread(&[view(Some(9), 0, 9)])).is_empty());
    }
}
