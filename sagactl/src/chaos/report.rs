//! The report of a chaos run: what it ran and injected, what it measured, and a PASS or FAIL
//! line per invariant; its last line counts them.

use super::args::{value_name, ChaosArgs};
use super::fleet::Fleet;
use super::measures::{LinkWindows, NodeWindows, Throughput};
use super::setup::Setup;
use super::{Findings, Placed};

/// Prints the report; returns whether the run failed (an invariant broken, or the sagas not
/// settled).
pub(super) fn print(
    args: &ChaosArgs,
    setup: &Setup,
    fleet: &Fleet,
    placed: &Placed,
    findings: &Findings<'_>,
    seed: u64,
) -> bool {
    println!("chaos run {} (seed {seed})", setup.id);
    if args.network {
        println!(
            "network hosts      {} service instances, 3 broker nodes and {}, each on its own",
            fleet.len(),
            if args.own_database.is_empty() {
                "PostgreSQL"
            } else {
                "two PostgreSQL servers"
            }
        );
    }
    println!(
        "sagas run          {} orders (and one warm-up saga before them), {} returns of them",
        args.sagas,
        placed.workload.return_ids.len()
    );
    println!("databases          {}", setup.describe_databases());
    println!("group protocol     {}", value_name(args.group_protocol));
    println!("kills              {:?}", fleet.kills);
    print_faults(args, placed, &findings.windows);
    print_links(&findings.links);
    print_measures(args, placed, findings);
    print_checks(findings)
}

/// The link faults of a network run, each with its window's measures.
fn print_links(links: &LinkWindows<'_>) {
    if links.faults.is_empty() {
        return;
    }
    println!("link faults        {}", links.faults.len());
    for link in &links.faults {
        let takeover = link
            .takeover
            .as_ref()
            .map(|takeover| format!("; {}", takeover.describe()))
            .unwrap_or_default();
        println!(
            "  {}; {}; caught up {} after the heal{takeover}",
            link.outage.describe(),
            link.window.describe(),
            link.caught_up
                .map(|secs| format!("{secs:.1} s"))
                .unwrap_or_else(|| "-".into())
        );
    }
}

/// The faults injected besides the kills, and (three nodes) the windows around each.
fn print_faults(args: &ChaosArgs, placed: &Placed, windows: &NodeWindows<'_>) {
    let faults = &placed.faults;
    println!("broker kills       {}", faults.broker.describe());
    if args.broker_nodes == 3 {
        println!("broker node faults {}", faults.nodes.summary());
        for (fault, window) in &windows.faults {
            println!("  {}; {}", fault.describe(), window.describe());
        }
        for (down, window) in &windows.nodes_down {
            println!(
                "{:<18} {}",
                if *down == 1 {
                    "one node down"
                } else {
                    "two nodes down"
                },
                window.describe()
            );
        }
        if let Some(window) = &windows.unfaulted {
            println!("{:<18} {}", "no node down", window.describe());
        }
    }
    println!("postgres restarts  {}", faults.postgres.describe());
    println!("postgres read-only {}", faults.read_only.describe());
    if let Some(outages) = &faults.topic {
        println!("topic deletions    {}", outages.describe());
    }
    if let Some(log) = &faults.garbage {
        println!(
            "garbage            {} records ({} kinds) from {:.1} s on, every {} ms",
            log.sent.len() + log.unconfirmed.len(),
            args.garbage_kinds().len(),
            faults
                .garbage_from
                .map(|at| (at - placed.placing.0).num_milliseconds() as f64 / 1000.0)
                .unwrap_or_default(),
            args.garbage_every_ms
        );
    }
}

/// What the run measured: restarts, settling, outcomes, duplicates, durations, stalls,
/// throughput, and the garbage per kind.
fn print_measures(args: &ChaosArgs, placed: &Placed, findings: &Findings<'_>) {
    let settled = &findings.settled;
    let (duplicates, stalls) = (&findings.duplicates, &findings.stalls);
    println!(
        "restarts           {} after kills, {} after crashes",
        placed.restarts,
        placed.crashes + settled.crashes
    );
    println!(
        "settled            {} ({:.1} s after the last kill)",
        settled.settled,
        settled.time.as_secs_f64()
    );
    println!("outcomes           {}", findings.outcomes);
    println!(
        "duplicates         {} duplicate orders and returns absorbed, {} replies ignored by fencing, {} messages redelivered into an inbox",
        duplicates.triggers, duplicates.ignored_replies, duplicates.redelivered
    );
    let stale: Vec<String> = duplicates
        .stale_writes
        .iter()
        .map(|(source, n)| format!("{source} {n}"))
        .collect();
    println!(
        "stale writes       {} saga writes refused by the row's version ({}; from the orchestrators' logs)",
        duplicates.stale_writes.values().sum::<u64>(),
        if stale.is_empty() { "none".into() } else { stale.join(", ") }
    );
    println!(
        "saga duration      p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (placed to finished)",
        stalls.saga_p50_ms, stalls.saga_p99_ms, stalls.saga_max_ms
    );
    println!(
        "longest stall      {} (the longest a service handled nothing while orders were placed)",
        stalls
            .longest_gap_secs
            .iter()
            .map(|(service, secs)| format!("{service} {secs:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "finished per s     {} (per {} s from the first order; offered {:.1}/s)",
        findings.timeline.join(" "),
        Throughput::BUCKET_SECS,
        args.rate
    );
    if let Some(audit) = &findings.audit {
        for line in &audit.per_kind {
            println!("garbage kind       {line}");
        }
    }
}

/// A PASS or FAIL line per invariant and the count of them; whether the run failed (an
/// invariant broken, or the sagas not settled).
fn print_checks(findings: &Findings<'_>) -> bool {
    let mut failed = !findings.settled.settled;
    let mut passes = 0;
    for check in &findings.checks {
        println!(
            "{:<6} {}: {}",
            if check.passed { "PASS" } else { "FAIL" },
            check.name,
            check.detail
        );
        failed |= !check.passed;
        passes += usize::from(check.passed);
    }
    println!(
        "chaos: {passes} passed, {} failed",
        findings.checks.len() - passes
    );
    failed
}
