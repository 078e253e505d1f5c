//! Tells a participant that is behind from one that is gone, for the deadline scanner.
//!
//! A deadline measures the time since the command was written, not since its participant
//! reached it. Under a backlog (a burst, a slow database, a participant restarting while
//! records pile up) every command waits behind the ones queued before it, deadlines pass by
//! the thousand, and each re-send queues one more copy behind the first: the participant
//! answers every copy from its ledger, the orchestrator ignores every extra answer, and the
//! backlog deepens. (The long network-chaos run saw it: 6,200 re-sends and 10,549 ignored
//! replies in one minute, against 3,037 replies that moved a saga.)
//!
//! So before a due saga's command is sent again, the scanner asks here whether it is still
//! on its way: whether the consumer group of the command's topic has records left on the
//! saga's partition (committed offset short of the end) *and* has moved in the last
//! `DEADLINE_BACKLOG_STALL_MS`. If so the participant is working towards it: the deadline
//! waits for about the time that group needs to reach the partition's end (its recent rate),
//! without a new attempt ([`saga::Saga::postpone_deadline`]). The orchestrator's own group on
//! `saga.replies` is asked the same way, for a reply that has arrived but is queued here. A
//! group that stands still (its participant gone, cut off, or wedged) or has nothing left
//! (the command or its reply was lost) is not behind: the deadline counts as ever, and gives
//! up after the definition's attempts.
//!
//! The offsets are read from outside the groups ([`messaging::lag`]), once a second, only for
//! the topics the scanner asked about in the last minute: an idle engine reads nothing.
//! Nothing here decides a saga's outcome; knowing nothing (a read failed, a group never
//! committed, the first second after a topic is asked for) means the deadline counts.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use messaging::config::KafkaConfig;
use messaging::lag::{GroupReader, Position};
use tokio_util::sync::CancellationToken;

/// How often the asked-for topics' offsets are read (consumers commit every second).
const READ_EVERY: Duration = Duration::from_secs(1);
/// A topic not asked about for this long is no longer read.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Offsets older than this are not trusted (reads have been failing).
const TRUST_FOR: Duration = Duration::from_secs(5);
/// The longest wait for one read.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The span over which a group's rate is measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// The shortest postponement.
const MIN_WAIT: Duration = Duration::from_secs(1);
/// The postponement while a group has moved but no rate is measured yet.
const NO_RATE_WAIT: Duration = Duration::from_secs(5);
/// The longest drain time reckoned (the scanner caps it further, by the step's longest wait).
const LONGEST_ETA: Duration = Duration::from_secs(24 * 3600);

/// How far the group reading one partition is from its end, and whether it moves.
#[derive(Debug, Clone, Default)]
pub struct PartitionProgress {
    /// The last positions read, oldest first, within [`RATE_WINDOW`] (plus one before it).
    samples: VecDeque<(Instant, Position)>,
    /// When the committed offset was last seen to change.
    moved_at: Option<Instant>,
}

/// A partition whose group has records left and moves: the saga's command (or reply) is
/// still on its way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Behind {
    /// Records the group has not committed past.
    pub records: i64,
    /// Records a second the group committed over the last [`RATE_WINDOW`].
    pub per_second: f64,
    /// About when it reaches the partition's end at that rate (at least [`MIN_WAIT`]).
    pub eta: Duration,
}

impl PartitionProgress {
    /// Takes in a position read at `now`.
    pub fn observe(&mut self, position: Position, now: Instant) {
        if let Some((_, last)) = self.samples.back() {
            if last.committed != position.committed {
                self.moved_at = Some(now);
            }
        }
        self.samples.push_back((now, position));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(at, _)| now.duration_since(*at) >= RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Whether the group is behind on this partition at `now`: it has records left and moved
    /// within `stall_after`. `None` when it is caught up, stands still, never committed, or the
    /// last read is too old to go by.
    pub fn behind(&self, now: Instant, stall_after: Duration) -> Option<Behind> {
        let (read_at, last) = self.samples.back()?;
        if now.duration_since(*read_at) > TRUST_FOR {
            return None;
        }
        let moved_at = self.moved_at?;
        if now.duration_since(moved_at) > stall_after {
            return None;
        }
        let records = last.lag();
        if records <= 0 || last.committed.is_none() {
            return None;
        }
        let (first_at, first) = self.samples.front()?;
        let seconds = read_at.duration_since(*first_at).as_secs_f64();
        let moved = match (first.committed, last.committed) {
            (Some(first), Some(last)) => (last - first).max(0),
            _ => 0,
        };
        let per_second = if seconds > 0.0 {
            moved as f64 / seconds
        } else {
            0.0
        };
        // With no rate measured yet (it moved, but the window holds one move), a few reads
        // will tell.
        let eta = if per_second > 0.0 {
            Duration::from_secs_f64((records as f64 / per_second).min(LONGEST_ETA.as_secs_f64()))
        } else {
            NO_RATE_WAIT
        };
        Some(Behind {
            records,
            per_second,
            eta: eta.max(MIN_WAIT),
        })
    }
}

/// One topic as one group reads it.
struct Watched {
    group: String,
    /// When the scanner last asked about it.
    asked_at: Instant,
    partitions: Vec<PartitionProgress>,
}

/// The scanner's view of the backlogs; cheap to clone and to ask (it reads nothing itself).
#[derive(Clone)]
pub struct Backlogs {
    watched: Arc<Mutex<HashMap<String, Watched>>>,
    stall_after: Duration,
}

impl Backlogs {
    /// Not yet reading anything; [`Backlogs::read`] reads what [`Backlogs::behind`] is asked
    /// about. `stall_after` zero turns the whole thing off: every deadline counts.
    pub fn new(stall_after: Duration) -> Self {
        Self {
            watched: Arc::default(),
            stall_after,
        }
    }

    /// Whether `group` is behind on the partition of `topic` that a key of hash `key_hash`
    /// goes to. Starts reading the topic when it is not read yet.
    pub fn behind(&self, topic: &str, group: &str, key_hash: i32) -> Option<Behind> {
        if self.stall_after.is_zero() {
            return None;
        }
        let now = Instant::now();
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = watched.entry(topic.to_owned()).or_insert_with(|| Watched {
            group: group.to_owned(),
            asked_at: now,
            partitions: Vec::new(),
        });
        entry.asked_at = now;
        if entry.group != group {
            // The topic's group changed (a definition moved it): start over.
            entry.group = group.to_owned();
            entry.partitions.clear();
        }
        let count = i32::try_from(entry.partitions.len())
            .ok()
            .filter(|n| *n > 0)?;
        let partition = messaging::partitioner::partition_of(key_hash, count);
        entry
            .partitions
            .get(usize::try_from(partition).ok()?)?
            .behind(now, self.stall_after)
    }

    /// Reads the offsets of every topic asked about in the last minute, once a second, until
    /// `shutdown`. A read that fails leaves that topic unknown (its deadlines count).
    pub async fn read(self, kafka: KafkaConfig, shutdown: CancellationToken) {
        if self.stall_after.is_zero() {
            // Turned off: nothing to read, but a task that ended would stop the service.
            shutdown.cancelled().await;
            return;
        }
        let mut readers: HashMap<String, Arc<GroupReader>> = HashMap::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(READ_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
            let asked: Vec<(String, String)> = {
                let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
                watched.retain(|_, w| w.asked_at.elapsed() < FORGET_AFTER);
                watched
                    .iter()
                    .map(|(topic, w)| (topic.clone(), w.group.clone()))
                    .collect()
            };
            readers.retain(|group, _| asked.iter().any(|(_, g)| g == group));
            for (topic, group) in asked {
                let reader = match readers.get(&group) {
                    Some(reader) => Arc::clone(reader),
                    None => match GroupReader::new(&kafka, &group) {
                        Ok(reader) => {
                            Arc::clone(readers.entry(group.clone()).or_insert(Arc::new(reader)))
                        }
                        Err(e) => {
                            tracing::warn!(error.message = %messaging::Chain(&e), %group, "cannot read a group's offsets; its deadlines count as if it were gone");
                            continue;
                        }
                    },
                };
                let read_topic = topic.clone();
                let read = tokio::task::spawn_blocking(move || {
                    reader.positions(&read_topic, READ_TIMEOUT)
                });
                let positions = tokio::select! {
                    read = read => read,
                    _ = shutdown.cancelled() => return,
                };
                match positions {
                    Ok(Ok(positions)) => self.observe(&topic, &group, &positions),
                    Ok(Err(e)) => {
                        tracing::debug!(error.message = %messaging::Chain(&e), %topic, %group, "cannot read a group's offsets; its deadlines count as if it were gone")
                    }
                    Err(e) => {
                        tracing::warn!(error.message = %e, %topic, "reading a group's offsets stopped")
                    }
                }
            }
        }
    }

    fn observe(&self, topic: &str, group: &str, positions: &[Position]) {
        let now = Instant::now();
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = watched.get_mut(topic).filter(|w| w.group == group) else {
            return;
        };
        let count = positions
            .iter()
            .map(|p| usize::try_from(p.partition).unwrap_or(0) + 1)
            .max()
            .unwrap_or(0);
        if entry.partitions.len() != count {
            entry.partitions = vec![PartitionProgress::default(); count];
        }
        for position in positions {
            if let Some(progress) = usize::try_from(position.partition)
                .ok()
                .and_then(|index| entry.partitions.get_mut(index))
            {
                progress.observe(*position, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(30);

    fn at(committed: Option<i64>, end: i64) -> Position {
        Position {
            partition: 0,
            committed,
            end,
        }
    }

    fn seconds(start: Instant, s: u64) -> Instant {
        start + Duration::from_secs(s)
    }

    #[test]
    fn a_group_that_moves_with_records_left_is_behind_for_about_its_drain_time() {
        let start = Instant::now();
        let mut progress = PartitionProgress::default();
        progress.observe(at(Some(100), 1_100), start);
        assert_eq!(
            progress.behind(start, STALL),
            None,
            "one read shows no movement yet"
        );
        progress.observe(at(Some(150), 1_150), seconds(start, 1));
        progress.observe(at(Some(200), 1_200), seconds(start, 2));
        let behind = progress
            .behind(seconds(start, 2), STALL)
            .expect("moving with 1,000 records left");
        assert_eq!(behind.records, 1_000);
        assert!((behind.per_second - 50.0).abs() < 1e-9, "{behind:?}");
        assert_eq!(behind.eta, Duration::from_secs(20), "1,000 records at 50/s");
    }

    #[test]
    fn the_wait_is_the_drain_time_and_never_under_a_second() {
        let start = Instant::now();
        let mut progress = PartitionProgress::default();
        progress.observe(at(Some(0), 500), start);
        progress.observe(at(Some(100), 600), seconds(start, 1));
        let behind = progress.behind(seconds(start, 1), STALL).expect("behind");
        assert_eq!(behind.eta, Duration::from_secs(5), "500 records at 100/s");
        progress.observe(at(Some(595), 600), seconds(start, 2));
        let behind = progress.behind(seconds(start, 2), STALL).expect("behind");
        assert_eq!(behind.eta, MIN_WAIT);
    }

    #[test]
    fn a_group_that_stands_still_or_is_caught_up_is_not_behind() {
        let start = Instant::now();
        let mut progress = PartitionProgress::default();
        progress.observe(at(Some(0), 500), start);
        progress.observe(at(Some(100), 600), seconds(start, 1));
        // No move since second 1: behind until the stall window has passed.
        for s in 2..=31 {
            progress.observe(at(Some(100), 700), seconds(start, s));
        }
        assert!(progress.behind(seconds(start, 31), STALL).is_some());
        progress.observe(at(Some(100), 700), seconds(start, 32));
        assert_eq!(progress.behind(seconds(start, 32), STALL), None, "stalled");
        // Moving again, and then caught up.
        progress.observe(at(Some(700), 700), seconds(start, 33));
        assert_eq!(
            progress.behind(seconds(start, 33), STALL),
            None,
            "caught up"
        );
    }

    #[test]
    fn an_old_read_or_a_group_that_never_committed_tells_nothing() {
        let start = Instant::now();
        let mut progress = PartitionProgress::default();
        progress.observe(at(Some(0), 500), start);
        progress.observe(at(Some(100), 600), seconds(start, 1));
        assert!(progress.behind(seconds(start, 1), STALL).is_some());
        assert_eq!(progress.behind(seconds(start, 7), STALL), None, "stale");
        let mut never = PartitionProgress::default();
        never.observe(at(None, 500), start);
        never.observe(at(None, 600), seconds(start, 1));
        assert_eq!(never.behind(seconds(start, 1), STALL), None);
    }

    #[test]
    fn turned_off_nothing_is_behind() {
        let backlogs = Backlogs::new(Duration::ZERO);
        assert_eq!(
            backlogs.behind("t.inventory.commands", "t.inventory", 7),
            None
        );
        assert!(backlogs
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty());
    }
}
