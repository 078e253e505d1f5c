//! The checks some faults add to the invariants: the outbox relays listen again after
//! PostgreSQL restarts; without garbage, nothing reached the dead-letter topic; with garbage,
//! every garbage record is there exactly once and the garbage did not halve the throughput.

use chrono::{DateTime, Utc};
use events::Topics;
use sqlx::PgPool;
use uuid::Uuid;

use super::Check;
use crate::chaos::garbage::Audit;
use crate::chaos::measures::Throughput;
use crate::chaos::settle::Listening;
use crate::chaos::topic_faults::{self, TopicOutages};

/// Whether every service's outbox relay listens for notifications again after `restarts`
/// PostgreSQL restarts: `listening` of `services` do (in a network run, the detail names the
/// instances that do not).
pub fn relays_listening(
    listening: &Listening,
    services: usize,
    restarts: usize,
) -> anyhow::Result<Check> {
    let silent = if listening.silent.is_empty() {
        String::new()
    } else {
        format!(" (not: {})", listening.silent.join(", "))
    };
    Ok(Check::new(
        "every outbox relay LISTENs again after the PostgreSQL restarts",
        listening.count >= i64::try_from(services)?,
        format!(
            "{} of {services} services listen for outbox notifications after {restarts} restarts{silent}",
            listening.count
        ),
    ))
}

/// Without garbage every record the run sends is valid, so the dead-letter topic must stay
/// empty whatever the faults: a trigger or command dead-lettered because its topic was deleted
/// or PostgreSQL was read-only would show there. (With garbage, the garbage audit checks that
/// it holds nothing else.)
pub fn empty_dead_letters(
    kafka: &messaging::config::KafkaConnection,
    topics: &Topics,
    topic_outages: Option<&TopicOutages>,
) -> Check {
    let check = "no garbage sent: nothing reached the dead-letter topic";
    let faults = match topic_outages {
        Some(outages) => format!(
            " after {} deletions of {}",
            outages.lengths.len(),
            outages.topic
        ),
        None => String::new(),
    };
    match topic_faults::records_in(kafka, &topics.dead_letters()) {
        Ok(records) => Check::new(
            check,
            records == 0,
            format!("{records} records in {}{faults}", topics.dead_letters()),
        ),
        Err(e) => Check::new(check, false, format!("cannot count them: {e:#}")),
    }
}

/// The garbage audit's verdict, and the throughput of the orders placed with garbage
/// (`with_garbage`, from `garbage_from` on) against those placed before (`baseline`, from
/// `placing_from` on), at `rate` offered.
pub async fn garbage(
    db: &PgPool,
    audit: &Audit,
    (baseline, placing_from): (&[Uuid], DateTime<Utc>),
    (with_garbage, garbage_from): (&[Uuid], DateTime<Utc>),
    rate: f64,
) -> anyhow::Result<[Check; 2]> {
    let audited = Check::new(
        "garbage: every record in the DLQ exactly once, nothing else there",
        audit.passed,
        audit.detail.clone(),
    );
    let now = Utc::now();
    let baseline = Throughput::phase(db, baseline, placing_from, now).await?;
    let with_garbage = Throughput::phase(db, with_garbage, garbage_from, now).await?;
    let ratio = with_garbage.rate / baseline.rate.max(f64::MIN_POSITIVE);
    Ok([
        audited,
        Check::new(
            "throughput with garbage at least half the baseline",
            with_garbage.reached && ratio >= 0.5,
            format!(
                "baseline {}, with garbage {}: {ratio:.2} of the baseline; offered {rate:.1}/s",
                baseline.describe(),
                with_garbage.describe(),
            ),
        ),
    ])
}

/// After the last link fault healed (and the last order was placed), every saga finished within
/// `within_secs`: `caught_up_secs` is how long the last one took
/// ([`crate::chaos::measures::caught_up_after_heal`]).
pub fn caught_up_after_heal(caught_up_secs: Option<f64>, within_secs: u64) -> Check {
    let name = "every saga finished within the bound after the network healed";
    match caught_up_secs {
        Some(secs) => Check::new(
            name,
            secs <= within_secs as f64,
            format!(
                "the last saga finished {secs:.1} s after the last heal (bound {within_secs} s)"
            ),
        ),
        None => Check::new(name, false, "no saga finished".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check names the instances whose relay does not listen, so that a failing run says
    /// where to look.
    #[test]
    fn the_relays_check_names_the_instances_that_do_not_listen() {
        let short = Listening {
            count: 8,
            silent: vec!["orchestrator-1".into(), "inventory-2".into()],
        };
        let check = relays_listening(&short, 10, 3).expect("check");
        assert!(!check.passed);
        assert!(
            check
                .detail
                .ends_with("after 3 restarts (not: orchestrator-1, inventory-2)"),
            "{}",
            check.detail
        );
        let all = Listening {
            count: 10,
            silent: Vec::new(),
        };
        let check = relays_listening(&all, 10, 3).expect("check");
        assert!(check.passed);
        assert!(
            check.detail.ends_with("after 3 restarts"),
            "{}",
            check.detail
        );
    }
}
