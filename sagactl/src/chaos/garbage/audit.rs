//! The garbage invariant: the dead-letter topic against the garbage log, and for every record
//! without exactly one copy there, what became of it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Context;
use events::Topics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use uuid::Uuid;

use super::dead_letters::{DeadLetter, DeadLetterReader};
use super::{GarbageKind, GarbageLog, Target};
use crate::chaos::setup::Databases;
use crate::deployment::{Deployment, ORCHESTRATOR};

/// The garbage invariant, with a line per kind.
pub struct Audit {
    pub passed: bool,
    pub detail: String,
    pub per_kind: Vec<String>,
    /// Per saga type, the keys of garbage records on its trigger topic that started a saga
    /// (left out of the saga invariants).
    garbage_sagas: BTreeMap<String, Vec<Uuid>>,
}

impl Audit {
    /// The keys of the sagas of type `saga` that garbage records started.
    pub fn garbage_sagas(&self, saga: &str) -> &[Uuid] {
        self.garbage_sagas.get(saga).map_or(&[], Vec::as_slice)
    }
}

#[derive(Default)]
struct KindCount {
    sent: u32,
    once: u32,
    /// One copy (one `dlq.id`) published more than once, by a relay that crashed between the
    /// broker's acknowledgement and deleting the row: at-least-once publishing, which readers
    /// undo by the id. Reported, not a failure.
    republished: u32,
    /// Copied more than once under different ids: a record dead-lettered again (a failure).
    redelivered: u32,
    /// No copy: its consumer group never committed past it, its copy is still in an outbox,
    /// or it was consumed and is gone (handled as if valid, or lost).
    not_consumed: u32,
    in_outbox: u32,
    consumed_no_copy: u32,
    started_saga: u32,
    acted_on: u32,
    unconfirmed: u32,
}

impl KindCount {
    fn ok(&self) -> bool {
        self.once == self.sent && self.unconfirmed == 0
    }

    /// The report's line for `kind`: ok or BAD, and what became of its records.
    fn line(&self, kind: GarbageKind) -> String {
        let mut parts = vec![format!("{} sent, {} in the DLQ once", self.sent, self.once)];
        let mut add = |n: u32, what: &str| {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        };
        add(
            self.redelivered,
            "copied twice or more (dead-lettered again on redelivery)",
        );
        add(
            self.republished,
            "of those published again by a relay after a crash (one dlq.id; readers drop the repeat)",
        );
        add(
            self.not_consumed,
            "missing: their consumer group never committed past them",
        );
        add(self.in_outbox, "missing: copy still in an outbox");
        add(self.consumed_no_copy, "missing: consumed, no copy anywhere");
        add(self.started_saga, "started a saga");
        add(self.acted_on, "acted on by a participant");
        add(self.unconfirmed, "not acknowledged by the broker");
        format!(
            "{:<4} {:<15} {}",
            if self.ok() { "ok" } else { "BAD" },
            kind.name(),
            parts.join(", ")
        )
    }
}

/// The first three dead letters that are no garbage of the run: who dead-lettered them, from
/// where, and why.
fn foreign_detail(foreign: &[&DeadLetter]) -> String {
    foreign
        .iter()
        .take(3)
        .map(|r| {
            format!(
                "{} from {:?}: {}",
                r.consumer,
                r.source,
                r.reason.chars().take(120).collect::<String>()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Checks the dead-letter topic against the garbage log, and finds out what happened to
/// every record without exactly one copy there.
pub async fn audit(
    log: &GarbageLog,
    reader: &DeadLetterReader,
    db: &Databases,
    kafka: &messaging::config::KafkaConnection,
    prefix: &str,
    deployment: &Deployment,
) -> anyhow::Result<Audit> {
    let copies = Copies::sort(log, &reader.records);
    let whereabouts = Whereabouts::find(log, db, kafka, prefix, deployment).await?;
    Ok(Audit::of(log, &copies, &whereabouts))
}

/// The dead-letter topic's records: each garbage record's copies, and the records that copy
/// no garbage.
struct Copies<'a> {
    of: HashMap<(&'a str, i32, i64), Vec<&'a DeadLetter>>,
    foreign: Vec<&'a DeadLetter>,
}

impl<'a> Copies<'a> {
    fn sort(log: &GarbageLog, records: &'a [DeadLetter]) -> Self {
        let mut copies: HashMap<(&str, i32, i64), Vec<&DeadLetter>> = HashMap::new();
        let mut foreign: Vec<&DeadLetter> = Vec::new();
        let garbage: BTreeSet<(&str, i32, i64)> = log
            .sent
            .iter()
            .map(|s| (s.topic.as_str(), s.partition, s.offset))
            .collect();
        for record in records {
            match &record.source {
                Some((t, p, o)) if garbage.contains(&(t.as_str(), *p, *o)) => {
                    copies.entry((t.as_str(), *p, *o)).or_default().push(record);
                }
                _ => foreign.push(record),
            }
        }
        Self {
            of: copies,
            foreign,
        }
    }
}

/// Where the records without exactly one copy may be, and what the garbage started.
#[derive(Debug, Default)]
struct Whereabouts {
    /// Dead-letter rows not yet published, by their source (topic, partition, offset).
    in_outbox: BTreeSet<(String, i32, i64)>,
    /// The next offset each consuming group will read, per (topic, partition).
    committed: HashMap<(String, i32), i64>,
    /// The sagas (type and key) that garbage keys started.
    started: BTreeSet<(String, Uuid)>,
    /// The saga ids of garbage records a participant's ledger holds.
    acted_on: BTreeSet<Uuid>,
}

impl Whereabouts {
    async fn find(
        log: &GarbageLog,
        db: &Databases,
        kafka: &messaging::config::KafkaConnection,
        prefix: &str,
        deployment: &Deployment,
    ) -> anyhow::Result<Self> {
        // Where the missing ones are: dead-letter rows not yet published, group positions.
        let mut in_outbox = BTreeSet::new();
        for schema in deployment.services() {
            let rows: Vec<(Option<String>, Option<String>, Option<String>)> =
                sqlx::query_as(&format!(
                    "SELECT headers->>'dlq.source.topic', headers->>'dlq.source.partition', \
                     headers->>'dlq.source.offset' FROM {schema}.outbox WHERE topic = $1"
                ))
                .bind(Topics::new(prefix).dead_letters())
                .fetch_all(db.of(schema))
                .await?;
            for row in rows {
                if let (Some(t), Some(p), Some(o)) = row {
                    if let (Ok(p), Ok(o)) = (p.parse::<i32>(), o.parse::<i64>()) {
                        in_outbox.insert((t, p, o));
                    }
                }
            }
        }
        let committed = tokio::task::block_in_place(|| committed_offsets(log, kafka, prefix))?;
        let keys: Vec<Uuid> = log.sent.iter().map(|s| s.key).collect();
        let saga_ids: Vec<Uuid> = log.sent.iter().map(|s| s.saga_id).collect();
        let started: BTreeSet<(String, Uuid)> = sqlx::query_as(&format!(
            "SELECT definition_name, saga_key::uuid FROM {ORCHESTRATOR}.sagas \
             WHERE saga_key = ANY($1::uuid[]::text[])"
        ))
        .bind(&keys)
        .fetch_all(db.orchestrator())
        .await?
        .into_iter()
        .collect();
        // Each participant's ledger in its database.
        let mut acted_on = BTreeSet::new();
        for participant in &deployment.participants {
            let ids: Vec<Uuid> = sqlx::query_scalar(&format!(
                "SELECT saga_id FROM {}.step_ledger WHERE saga_id = ANY($1)",
                participant.name
            ))
            .bind(&saga_ids)
            .fetch_all(db.of(&participant.name))
            .await?;
            acted_on.extend(ids);
        }
        Ok(Self {
            in_outbox,
            committed,
            started,
            acted_on,
        })
    }
}

impl Audit {
    /// The verdict on `log`, given its `copies` in the dead-letter topic and the
    /// `whereabouts` of the others.
    fn of(log: &GarbageLog, copies: &Copies<'_>, whereabouts: &Whereabouts) -> Self {
        let (kinds, garbage_sagas) = count_kinds(log, copies, whereabouts);
        let foreign = &copies.foreign;
        let mut per_kind = Vec::new();
        let mut failing = Vec::new();
        let total = |f: fn(&KindCount) -> u32| kinds.values().map(f).sum::<u32>();
        for (kind, c) in &kinds {
            if !c.ok() {
                failing.push(kind.name());
            }
            per_kind.push(c.line(*kind));
        }
        let foreign_detail = foreign_detail(foreign);
        let passed = failing.is_empty() && foreign.is_empty();
        let detail = format!(
            "{} garbage records sent ({} kinds, {} topics): {} in the DLQ exactly once ({} of those \
             copies published again by a relay, same dlq.id), {} copied more than once, {} missing, \
             {} started a saga, {} acted on, {} unacknowledged; {} other records in the DLQ{}{}",
            total(|c| c.sent),
            kinds.len(),
            log.sent
                .iter()
                .map(|s| s.topic.as_str())
                .collect::<BTreeSet<_>>()
                .len(),
            total(|c| c.once),
            total(|c| c.republished),
            total(|c| c.redelivered),
            total(|c| c.not_consumed + c.in_outbox + c.consumed_no_copy),
            total(|c| c.started_saga),
            total(|c| c.acted_on),
            total(|c| c.unconfirmed),
            foreign.len(),
            if foreign.is_empty() {
                String::new()
            } else {
                format!(" ({foreign_detail})")
            },
            if failing.is_empty() {
                String::new()
            } else {
                format!("; failing kinds: {}", failing.join(", "))
            },
        );

        Self {
            passed,
            detail,
            per_kind,
            garbage_sagas,
        }
    }
}

/// Per kind, what became of its records; per saga type, the keys of those that started a saga.
fn count_kinds(
    log: &GarbageLog,
    copies: &Copies<'_>,
    whereabouts: &Whereabouts,
) -> (
    BTreeMap<GarbageKind, KindCount>,
    BTreeMap<String, Vec<Uuid>>,
) {
    let Whereabouts {
        in_outbox,
        committed,
        started,
        acted_on,
    } = whereabouts;
    let mut kinds: BTreeMap<GarbageKind, KindCount> = BTreeMap::new();
    let mut garbage_sagas: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for s in &log.sent {
        let count = kinds.entry(s.kind).or_default();
        count.sent += 1;
        let at = (s.topic.as_str(), s.partition, s.offset);
        match copies.of.get(&at).map(Vec::as_slice) {
            Some([_]) => count.once += 1,
            Some(several) if several.len() > 1 => {
                if several
                    .iter()
                    .all(|c| !c.id.is_empty() && c.id == several[0].id)
                {
                    count.once += 1;
                    count.republished += 1;
                } else {
                    count.redelivered += 1;
                }
            }
            _ => {
                let position = committed.get(&(s.topic.clone(), s.partition));
                if in_outbox.contains(&(s.topic.clone(), s.partition, s.offset)) {
                    count.in_outbox += 1;
                } else if position.is_none_or(|next| *next <= s.offset) {
                    count.not_consumed += 1;
                } else {
                    count.consumed_no_copy += 1;
                }
            }
        }
        // A garbage record on a trigger topic names the key of a saga of that type.
        if let Target::Trigger(saga) = &s.target {
            if started.contains(&(saga.name.clone(), s.key)) {
                count.started_saga += 1;
                garbage_sagas
                    .entry(saga.name.clone())
                    .or_default()
                    .push(s.key);
            }
        }
        if acted_on.contains(&s.saga_id) {
            count.acted_on += 1;
        }
    }
    for (kind, _, _) in &log.unconfirmed {
        let count = kinds.entry(*kind).or_default();
        count.sent += 1;
        count.unconfirmed += 1;
    }

    (kinds, garbage_sagas)
}

/// The next offset each consuming group will read, per (topic, partition) that got garbage.
fn committed_offsets(
    log: &GarbageLog,
    kafka: &messaging::config::KafkaConnection,
    prefix: &str,
) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let mut by_group: BTreeMap<String, TopicPartitionList> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for s in &log.sent {
        if seen.insert((s.topic.clone(), s.partition)) {
            by_group
                .entry(s.target.group(prefix))
                .or_default()
                .add_partition(&s.topic, s.partition);
        }
    }
    let mut positions = HashMap::new();
    for (group, partitions) in by_group {
        let consumer: BaseConsumer = messaging::kafka::connection_settings(kafka)?
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()?;
        let committed = consumer
            .committed_offsets(partitions, Duration::from_secs(10))
            .with_context(|| format!("reading the offsets of group {group}"))?;
        for element in committed.elements() {
            if let Offset::Offset(next) = element.offset() {
                positions.insert((element.topic().to_owned(), element.partition()), next);
            }
        }
    }
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::send::Sent;
    use super::*;

    const TOPIC: &str = "chaos.saga.replies";

    fn sent(kind: GarbageKind, offset: i64) -> Sent {
        Sent {
            kind,
            topic: TOPIC.into(),
            partition: 0,
            offset,
            target: Target::Replies,
            key: Uuid::new_v4(),
            saga_id: Uuid::new_v4(),
        }
    }

    fn copy(offset: i64, id: &str) -> DeadLetter {
        DeadLetter {
            source: Some((TOPIC.into(), 0, offset)),
            reason: "not a reply".into(),
            consumer: "orchestrator".into(),
            id: id.into(),
        }
    }

    fn audited(log: &GarbageLog, records: &[DeadLetter], whereabouts: &Whereabouts) -> Audit {
        Audit::of(log, &Copies::sort(log, records), whereabouts)
    }

    #[test]
    fn every_record_copied_once_passes() {
        let log = GarbageLog {
            sent: vec![sent(GarbageKind::NulBytes, 0), sent(GarbageKind::NoKey, 1)],
            unconfirmed: Vec::new(),
        };
        let audit = audited(&log, &[copy(0, "a"), copy(1, "b")], &Whereabouts::default());
        assert!(audit.passed, "{}", audit.detail);
        assert_eq!(
            audit.detail,
            "2 garbage records sent (2 kinds, 1 topics): 2 in the DLQ exactly once (0 of those \
             copies published again by a relay, same dlq.id), 0 copied more than once, 0 missing, \
             0 started a saga, 0 acted on, 0 unacknowledged; 0 other records in the DLQ"
        );
        assert_eq!(
            audit.per_kind,
            [
                "ok   nul-bytes       1 sent, 1 in the DLQ once",
                "ok   no-key          1 sent, 1 in the DLQ once"
            ]
        );
    }

    #[test]
    fn one_copy_published_twice_passes_and_a_record_dead_lettered_twice_fails() {
        let log = GarbageLog {
            sent: vec![sent(GarbageKind::NulBytes, 0), sent(GarbageKind::NoKey, 1)],
            unconfirmed: Vec::new(),
        };
        let records = [copy(0, "a"), copy(0, "a"), copy(1, "b"), copy(1, "c")];
        let audit = audited(&log, &records, &Whereabouts::default());
        assert!(!audit.passed);
        assert!(
            audit.detail.ends_with("; failing kinds: no-key"),
            "{}",
            audit.detail
        );
        assert_eq!(
            audit.per_kind,
            [
                "ok   nul-bytes       1 sent, 1 in the DLQ once, 1 of those published again by a relay after a crash (one dlq.id; readers drop the repeat)",
                "BAD  no-key          1 sent, 0 in the DLQ once, 1 copied twice or more (dead-lettered again on redelivery)"
            ]
        );
    }

    #[test]
    fn a_missing_record_is_found_in_an_outbox_unconsumed_or_consumed_without_a_copy() {
        let log = GarbageLog {
            sent: vec![
                sent(GarbageKind::NulBytes, 0),
                sent(GarbageKind::NulBytes, 1),
                sent(GarbageKind::NulBytes, 2),
            ],
            unconfirmed: vec![(GarbageKind::NulBytes, TOPIC.into(), "timed out".into())],
        };
        // Offset 0's copy waits in an outbox; the group read up to offset 1 (not 2).
        let whereabouts = Whereabouts {
            in_outbox: BTreeSet::from([(TOPIC.to_owned(), 0, 0)]),
            committed: HashMap::from([((TOPIC.to_owned(), 0), 2)]),
            ..Whereabouts::default()
        };
        let audit = audited(&log, &[], &whereabouts);
        assert!(!audit.passed);
        assert_eq!(
            audit.per_kind,
            [
                "BAD  nul-bytes       4 sent, 0 in the DLQ once, 1 missing: their consumer group \
              never committed past them, 1 missing: copy still in an outbox, 1 missing: consumed, \
              no copy anywhere, 1 not acknowledged by the broker"
            ]
        );
    }

    #[test]
    fn a_dead_letter_of_no_garbage_record_fails_the_audit() {
        let log = GarbageLog {
            sent: vec![sent(GarbageKind::NulBytes, 0)],
            unconfirmed: Vec::new(),
        };
        let audit = audited(&log, &[copy(0, "a"), copy(7, "b")], &Whereabouts::default());
        assert!(!audit.passed);
        assert!(
            audit.detail.ends_with(
                "1 other records in the DLQ (orchestrator from Some((\"chaos.saga.replies\", 0, 7)): not a reply)"
            ),
            "{}",
            audit.detail
        );
    }

    #[test]
    fn the_sagas_garbage_started_are_kept_by_saga_type() {
        let deployment = crate::deployment::tests::repository();
        let order = deployment
            .saga("order")
            .map(Arc::clone)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut trigger = sent(GarbageKind::MissingType, 0);
        trigger.target = Target::Trigger(order);
        let key = trigger.key;
        let log = GarbageLog {
            sent: vec![trigger],
            unconfirmed: Vec::new(),
        };
        let whereabouts = Whereabouts {
            started: BTreeSet::from([("order".to_owned(), key)]),
            ..Whereabouts::default()
        };
        let audit = audited(&log, &[copy(0, "a")], &whereabouts);
        assert_eq!(audit.garbage_sagas("order"), [key]);
        assert!(audit.garbage_sagas("return").is_empty());
        assert_eq!(
            audit.per_kind,
            ["ok   missing-type    1 sent, 1 in the DLQ once, 1 started a saga"]
        );
    }
}
