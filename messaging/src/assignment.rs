//! Which partitions this service's consumer holds now, for work that is shared between the
//! instances of a service the way the consume loop shares the records: by partition.
//!
//! The consumer's context ([`crate::access::WatchedContext`]) keeps an [`Assignment`] up to
//! date from librdkafka's rebalance callbacks: partitions being revoked (or lost, when this
//! member's session lapsed because it was cut off from the brokers) are taken out *before*
//! librdkafka lets them go, and after every rebalance the set is read back from the consumer
//! itself (`rd_kafka_assignment`, whole under the eager and the incremental protocol alike).
//! The pipeline empties it when its consumer ends (replaced when stuck, or at shutdown). A
//! reader ([`Assignment::subscribe`]) so never holds a partition the consumer does not; for a
//! moment during a rebalance it may hold fewer (nobody works on those partitions until the
//! new owner has them, which is safe: it only delays the work).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rdkafka::TopicPartitionList;
use tokio::sync::watch;

/// Partitions by topic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owned(BTreeMap<String, BTreeSet<i32>>);

impl Owned {
    /// The partitions of `list`.
    pub fn of_list(list: &TopicPartitionList) -> Self {
        let mut owned = Self::default();
        for element in list.elements() {
            owned
                .0
                .entry(element.topic().to_owned())
                .or_default()
                .insert(element.partition());
        }
        owned
    }

    /// Those of `topic` (none when it holds none of them).
    pub fn partitions_of(&self, topic: &str) -> Vec<i32> {
        self.0
            .get(topic)
            .map(|partitions| partitions.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Every (topic, partition) held.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, i32)> {
        self.0
            .iter()
            .flat_map(|(topic, held)| held.iter().map(move |p| (topic.as_str(), *p)))
    }

    /// Whether it holds no partition at all.
    pub fn is_empty(&self) -> bool {
        self.0.values().all(BTreeSet::is_empty)
    }

    /// These partitions without those of `other`.
    fn without(&self, other: &Self) -> Self {
        let mut rest = self.clone();
        for (topic, partitions) in &other.0 {
            if let Some(held) = rest.0.get_mut(topic) {
                held.retain(|p| !partitions.contains(p));
            }
        }
        rest.0.retain(|_, held| !held.is_empty());
        rest
    }
}

/// `topic:0,1;other:3`, or `none`: one word, so that a log line's `partitions=` field reads
/// back whole with [`Owned::from_str`](std::str::FromStr) (`sagactl chaos` measures takeovers
/// from it).
impl std::fmt::Display for Owned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut topics = self
            .0
            .iter()
            .filter(|(_, held)| !held.is_empty())
            .peekable();
        if topics.peek().is_none() {
            return f.write_str("none");
        }
        for (n, (topic, held)) in topics.enumerate() {
            let partitions: Vec<String> = held.iter().map(i32::to_string).collect();
            write!(
                f,
                "{}{topic}:{}",
                if n > 0 { ";" } else { "" },
                partitions.join(",")
            )?;
        }
        Ok(())
    }
}

/// A word that is not what [`Owned`]'s `Display` writes.
#[derive(Debug, thiserror::Error)]
#[error("not a list of partitions (topic:0,1;other:3 or none): {0:?}")]
pub struct NotOwned(String);

impl std::str::FromStr for Owned {
    type Err = NotOwned;

    fn from_str(word: &str) -> Result<Self, Self::Err> {
        let mut owned = Self::default();
        if word == "none" {
            return Ok(owned);
        }
        for entry in word.split(';') {
            let (topic, partitions) = entry
                .rsplit_once(':')
                .ok_or_else(|| NotOwned(word.to_owned()))?;
            let held = owned.0.entry(topic.to_owned()).or_default();
            for partition in partitions.split(',') {
                held.insert(partition.parse().map_err(|_| NotOwned(word.to_owned()))?);
            }
        }
        Ok(owned)
    }
}

/// The consumer's current assignment, shared with whoever works by partition. Cloning it
/// shares it.
#[derive(Clone, Debug)]
pub struct Assignment(Arc<watch::Sender<Owned>>);

impl Default for Assignment {
    fn default() -> Self {
        Self(Arc::new(watch::channel(Owned::default()).0))
    }
}

impl Assignment {
    /// A receiver that sees every change from now on.
    pub fn subscribe(&self) -> watch::Receiver<Owned> {
        self.0.subscribe()
    }

    /// The partitions held now.
    pub fn current(&self) -> Owned {
        self.0.borrow().clone()
    }

    /// `revoked` are about to be given up (a rebalance, or a session that lapsed): no longer
    /// held from now on.
    pub(crate) fn revoking(&self, revoked: &TopicPartitionList) {
        let revoked = Owned::of_list(revoked);
        self.0.send_if_modified(|owned| {
            let rest = owned.without(&revoked);
            let changed = rest != *owned;
            *owned = rest;
            changed
        });
    }

    /// The consumer holds exactly `owned` now.
    pub(crate) fn set(&self, owned: Owned) {
        self.0.send_if_modified(|held| {
            let changed = *held != owned;
            *held = owned;
            changed
        });
    }

    /// The consumer ended: nothing is held.
    pub(crate) fn clear(&self) {
        self.set(Owned::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_reads_back_from_its_one_word() {
        for owned in [
            Owned::default(),
            Owned::of_list(&list(&[
                ("p.saga.replies", 3),
                ("p.saga.replies", 0),
                ("p.orders", 1),
            ])),
        ] {
            let word = owned.to_string();
            assert!(!word.contains(char::is_whitespace), "{word}");
            assert_eq!(word.parse::<Owned>().expect("its own word"), owned);
        }
        assert_eq!(
            Owned::of_list(&list(&[("a", 2), ("a", 0), ("b", 1)])).to_string(),
            "a:0,2;b:1"
        );
        assert!("a:x".parse::<Owned>().is_err());
        assert!("a".parse::<Owned>().is_err());
    }

    fn list(entries: &[(&str, i32)]) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (topic, partition) in entries {
            list.add_partition(topic, *partition);
        }
        list
    }

    #[test]
    fn revoked_partitions_leave_at_once_and_the_rest_stays() {
        let assignment = Assignment::default();
        let mut seen = assignment.subscribe();
        assignment.set(Owned::of_list(&list(&[("r", 0), ("r", 1), ("o", 1)])));
        assert!(seen.has_changed().expect("open"));
        assert_eq!(seen.borrow_and_update().partitions_of("r"), vec![0, 1]);
        assignment.revoking(&list(&[("r", 1), ("x", 3)]));
        assert_eq!(assignment.current().partitions_of("r"), vec![0]);
        assert_eq!(assignment.current().partitions_of("o"), vec![1]);
        assignment.clear();
        assert!(assignment.current().is_empty());
        assert!(assignment.current().partitions_of("r").is_empty());
    }
}
