//! The chaos suite: runs the orchestrator and the participants as separate OS processes, places
//! orders and returns of them while SIGKILLing and restarting random services, waits for every
//! saga to settle, then checks from the services' own tables that nothing was lost or done twice.
//! It can SIGKILL and restart the broker too, restart PostgreSQL, and mix garbage into every
//! consumed topic (then checking the dead-letter topic and the throughput), and reports how
//! long the failures stalled the sagas (the time a group needs to move a dead member's
//! partitions shows there). The services, their topics and the steps each ledger answers for
//! come from the saga definitions (`deployment.rs`).
//!
//! [`run`] reads as the run's plan; each step is a module:
//! - `args.rs`: the command line;
//! - `setup.rs`: the run's database, topic prefix and log folder, and their clean-up;
//! - `fleet.rs`: the service processes, started, killed, revived, stopped;
//! - `faults.rs`: what is injected while the orders are placed, with `servers.rs` (broker and
//!   PostgreSQL outages), `broker_nodes.rs` (three-node cluster faults), `topic_faults.rs`
//!   (a command topic deleted) and `garbage/` (hostile records, and their audit);
//! - `workload.rs`: the orders and returns placed;
//! - `settle.rs`: waiting for the sagas to settle, and stopping the fleet;
//! - `invariants/`: the checks of the books: the engine's, each saga type's and each
//!   participant's (one [`invariants::Invariant`] each), and those the faults add;
//! - `measures.rs` and `report.rs`: what the run measured, and the report;
//! - `network/` and `link_faults.rs`: the network run (`--network`): every server and service
//!   instance on a network host of its own, and the link faults put between them.

mod args;
mod broker_nodes;
mod faults;
mod fleet;
mod garbage;
mod invariants;
mod link_faults;
mod measures;
mod network;
mod report;
mod servers;
mod settle;
mod setup;
mod takeovers;
mod topic_faults;
mod workload;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

pub use args::ChaosArgs;
use faults::{FaultLog, Faults, ProcessKills};
use fleet::Fleet;
use garbage::Audit;
use invariants::{under_faults, Books, Check, Invariants};
use link_faults::LinkFaults;
use measures::{Duplicates, LinkWindows, NodeWindows, Stalls, Throughput, Timeline};
use network::stack::Stack;
use settle::Settled;
use setup::{Databases, Setup};
use workload::Workload;

/// Runs the chaos suite; fails when an invariant does not hold or the sagas did not settle.
pub async fn run(mut args: ChaosArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("chaos run seed {seed} (--seed {seed} makes the same choices again)");
    let mut stack = if args.network {
        Some(network_stack(&mut args)?)
    } else {
        None
    };
    // A signal ends the run where it stands: dropping it kills the fleet (its processes are
    // killed on drop), and the network run's servers and hosts are removed below, as when the
    // run fails.
    let stop = messaging::shutdown::on_signals();
    let result = tokio::select! {
        result = run_with(&args, seed, stack.as_ref()) => result,
        () = stop.cancelled() => Err(anyhow::anyhow!(
            "stopped by a signal: the fleet was killed, the run's servers and hosts are removed, \
             its database and topics kept"
        )),
    };
    if let Some(mut stack) = stack.take() {
        if result.is_err() {
            stack.keep();
        }
        // Stopping the servers and removing the hosts runs commands, and waits for them.
        tokio::task::block_in_place(|| drop(stack));
    }
    result
}

/// Starts the network run's hosts and servers, and points the run's settings at them.
fn network_stack(args: &mut ChaosArgs) -> anyhow::Result<Stack> {
    let deployment = crate::deployment::Deployment::load(&args.sagas_dir)?;
    let hosts: Vec<String> = fleet::instance_names(args, &deployment)?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    network::Network::sweep_orphans();
    let prefix = network::Network::prefix_of_this_process();
    let subnet = match args.network_subnet {
        0 => network::free_subnet()?,
        chosen => chosen,
    };
    let stack = tokio::task::block_in_place(|| {
        let scripts = (args.postgres_script.as_path(), args.broker_script.as_path());
        let own_postgres = !args.own_database.is_empty();
        Stack::start(&prefix, subnet, &hosts, scripts, own_postgres)
    })?;
    let servers = &stack.endpoints;
    args.database_server = servers.database_server.clone();
    if let Some((server, _)) = &servers.own_postgres {
        args.own_database_server = Some(server.clone());
    }
    args.kafka.kafka_brokers = servers.kafka_brokers.clone();
    let clients = servers.cluster_dir.join("clients");
    args.kafka.kafka_client_properties = Some(clients.join("admin.properties"));
    args.kafka_identities = Some(clients);
    args.broker_nodes = 3;
    args.broker_cluster_dir = servers.cluster_dir.clone();
    args.postgres_run_dir = Some(servers.postgres_dir.clone());
    Ok(stack)
}

/// The run, on the machine's own servers or on a network run's `stack`.
async fn run_with(args: &ChaosArgs, seed: u64, stack: Option<&Stack>) -> anyhow::Result<()> {
    let setup = Setup::create(args).await?;
    let mut netns = BTreeMap::new();
    let mut addresses = BTreeMap::new();
    let mut links = None;
    if let Some(stack) = stack {
        let names = fleet::instance_names(args, &setup.deployment)?;
        let mut database_hosts = BTreeMap::new();
        for (name, service) in &names {
            netns.insert(name.clone(), stack.netns(name)?);
            addresses.insert(name.clone(), stack.address(name)?.to_string());
            if setup.has_own_database(service) {
                database_hosts.insert(name.clone(), network::stack::OWN_POSTGRES_HOST);
            }
        }
        if args.link_fault_every_ms > 0 {
            links = Some(link_faults::Plan {
                faults: args.link_faults(),
                every: Duration::from_millis(args.link_fault_every_ms),
                hold: Duration::from_millis(args.link_fault_ms),
                seed,
                services: names.into_iter().map(|(name, _)| name).collect(),
                database_hosts,
                cluster_dir: stack.endpoints.cluster_dir.clone(),
            });
        }
    }
    let mut fleet = Fleet::plan(args, &setup, netns)?;
    fleet.addresses = addresses;
    // Chosen before the fleet starts: the topic fault's shorter step deadlines are settings.
    let deleted_topic = faults::deleted_topic(args, &setup.deployment, &mut fleet);
    fleet.start_all().await?;
    let db = setup.connect().await?;
    // The books as they were before the first saga, once every service created its tables.
    let mut invariants = Invariants::choose(&setup.deployment);
    invariants.wait_until_ready(&db, &setup.deployment).await?;
    invariants.before(&db).await?;
    let workload = Workload::warm_up(args, &setup, db.orchestrator()).await?;
    let links = match (links, stack) {
        (Some(plan), Some(stack)) => Some(LinkFaults::spawn(plan, stack.network.clone())),
        _ => None,
    };
    let kills = ProcessKills::start(args, seed);
    let faults = Faults::spawn(args, &setup, deleted_topic, links)?;
    let placed = place_under_faults(args, &setup, &mut fleet, workload, faults, kills).await?;
    let settled = settle::settle(
        args,
        &setup,
        &db,
        &mut fleet,
        &placed.workload.saga_keys(),
        &placed.faults,
    )
    .await?;
    settle::stop(&mut fleet, &db).await?;
    let findings = check(
        args,
        &setup,
        &db,
        &invariants,
        &placed,
        settled,
        fleet.len(),
    )
    .await?;
    let failed = report::print(args, &setup, &fleet, &placed, &findings, seed);
    setup.clean_up(args, db, failed).await
}

/// What happened while the orders were placed.
struct Placed {
    workload: Workload,
    faults: FaultLog,
    /// Processes started again after a kill.
    restarts: u32,
    /// Processes that died by themselves (injected crashes), restarted by `Fleet::revive`.
    crashes: u32,
    /// From the first order until the last was placed.
    placing: (DateTime<Utc>, DateTime<Utc>),
    /// The orders of the first half, the baseline, without garbage (all, without garbage).
    baseline_orders: usize,
}

/// Places --sagas orders (and returns of them) at --rate while the faults run, then stops the
/// faults and waits until everything placed was published.
///
/// With garbage, the first half of the orders is the baseline and the second half runs with
/// garbage; the throughput check compares the two.
async fn place_under_faults(
    args: &ChaosArgs,
    setup: &Setup,
    fleet: &mut Fleet,
    mut workload: Workload,
    mut faults: Faults,
    mut kills: ProcessKills,
) -> anyhow::Result<Placed> {
    let baseline_orders = if args.garbage_every_ms > 0 {
        args.sagas / 2
    } else {
        args.sagas
    };
    let placing_from = Utc::now();
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(0.01));
    let mut crashes = 0u32;
    for placed in 0..args.sagas {
        if placed == baseline_orders && args.garbage_every_ms > 0 {
            faults.begin_garbage(args, setup, placed).await?;
        }
        workload.place(setup, placed);
        kills.when_due(fleet).await?;
        crashes += fleet.revive().await?;
        if placed % 100 == 99 {
            eprintln!(
                "placed {}/{} orders, kills so far {:?}",
                placed + 1,
                args.sagas,
                fleet.kills
            );
        }
        tokio::time::sleep(interval).await;
    }
    let placing_until = Utc::now();
    let faults = faults.stop().await?;
    workload.published().await?;
    eprintln!(
        "all {} orders placed in {:.1} s; waiting for the sagas to settle",
        args.sagas,
        started.elapsed().as_secs_f64()
    );
    Ok(Placed {
        workload,
        faults,
        restarts: kills.restarts,
        crashes,
        placing: (placing_from, placing_until),
        baseline_orders,
    })
}

/// What the checks and the measures found, for the report.
struct Findings<'a> {
    settled: Settled,
    audit: Option<Audit>,
    checks: Vec<Check>,
    outcomes: String,
    duplicates: Duplicates,
    stalls: Stalls,
    timeline: Vec<String>,
    windows: NodeWindows<'a>,
    links: LinkWindows<'a>,
}

/// Audits the garbage, checks the invariants and measures the run, once the fleet stopped.
async fn check<'a>(
    args: &ChaosArgs,
    setup: &Setup,
    db: &Databases,
    invariants: &Invariants,
    placed: &'a Placed,
    mut settled: Settled,
    services: usize,
) -> anyhow::Result<Findings<'a>> {
    let deployment = &setup.deployment;
    let audit = match (&placed.faults.garbage, &mut settled.dead_letters) {
        (Some(log), Some(reader)) => {
            // What the services published while they stopped.
            tokio::task::block_in_place(|| reader.read_to_end(Duration::from_secs(60)))?;
            Some(garbage::audit(log, reader, db, &args.kafka, &setup.prefix, deployment).await?)
        }
        _ => None,
    };
    let outcomes = measures::outcomes(db.orchestrator()).await?;
    let books = Books {
        db,
        started: placed.workload.started(),
        garbage: audit.as_ref(),
    };
    let mut checks = invariants.check(&books, deployment).await?;
    let (from, until) = placed.placing;
    let order_ids = &placed.workload.order_ids;
    let duplicates = Duplicates::count(db, deployment, &setup.log_dir).await?;
    let stalls = Stalls::measure(db, deployment, from, until).await?;
    let timeline = Throughput::timeline(db.orchestrator(), order_ids, from).await?;
    let in_flight =
        Timeline::load(db, deployment, &placed.workload.placed_at, placed.placing).await?;
    let windows = NodeWindows::measure(&in_flight, &placed.faults.nodes);
    let assignments = takeovers::Assignments::read(&setup.log_dir, &args.clock_skew)?;
    let links = LinkWindows::measure(&in_flight, &placed.faults.links, &assignments);
    if !placed.faults.links.is_empty() {
        let caught_up = measures::caught_up_after_heal(
            db.orchestrator(),
            &placed.faults.links,
            placed.placing.1,
        )
        .await?;
        checks.push(under_faults::caught_up_after_heal(
            caught_up,
            args.caught_up_within_secs,
        ));
    }
    if let Some(listening) = &settled.listening {
        let restarts = placed.faults.postgres.lengths.len();
        checks.push(under_faults::relays_listening(
            listening, services, restarts,
        )?);
    }
    if placed.faults.garbage.is_none() {
        checks.push(under_faults::empty_dead_letters(
            &args.kafka,
            &setup.topics,
            placed.faults.topic.as_ref(),
        ));
    }
    if let (Some(audit), Some(garbage_from)) = (&audit, placed.faults.garbage_from) {
        let split = placed.baseline_orders + 1;
        checks.extend(
            under_faults::garbage(
                db.orchestrator(),
                audit,
                (&order_ids[1..split], from),
                (&order_ids[split..], garbage_from),
                args.rate,
            )
            .await?,
        );
    }
    Ok(Findings {
        settled,
        audit,
        checks,
        outcomes,
        duplicates,
        stalls,
        timeline,
        windows,
        links,
    })
}
