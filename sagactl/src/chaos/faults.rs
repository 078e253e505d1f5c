//! The faults a run injects while its orders are placed, and what they did: SIGKILLs of the
//! fleet's processes ([`ProcessKills`]), and in the background ([`Faults`]) broker and
//! PostgreSQL outages (`servers.rs`), broker node faults (`broker_nodes.rs`), a command topic
//! deleted and created again (`topic_faults.rs`) and garbage on every consumed topic in the
//! run's second half (`garbage/`).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::Rng;

use super::args::ChaosArgs;
use super::broker_nodes::{NodeFaults, NodeOutages, Plan};
use super::fleet::Fleet;
use super::garbage::{self, GarbageFaults, GarbageLog, Target};
use super::link_faults::{LinkFaults, LinkOutage};
use super::servers::{
    spawn_broker_faults, spawn_postgres_faults, spawn_read_only_faults, Outages, ServerFaults,
};
use super::setup::Setup;
use super::topic_faults::{self, TopicFaults, TopicOutages};
use crate::deployment::Deployment;

/// SIGKILLs a random process of the fleet every --kill-every-ms, and starts it again after
/// up to --down-ms.
pub(super) struct ProcessKills {
    every: Option<Duration>,
    next: Option<Instant>,
    down_ms: u64,
    /// Chooses the victims and their down times, from the run's seed.
    rng: StdRng,
    /// Processes started again after a kill.
    pub(super) restarts: u32,
}

impl ProcessKills {
    /// The first kill comes --kill-every-ms from now.
    pub(super) fn start(args: &ChaosArgs, seed: u64) -> Self {
        let every = (args.kill_every_ms > 0).then(|| Duration::from_millis(args.kill_every_ms));
        Self {
            every,
            next: every.map(|k| Instant::now() + k),
            down_ms: args.down_ms,
            rng: rand::SeedableRng::seed_from_u64(seed),
            restarts: 0,
        }
    }

    /// Kills a random process and starts it again, when a kill is due.
    pub(super) async fn when_due(&mut self, fleet: &mut Fleet) -> anyhow::Result<()> {
        let (Some(at), Some(every)) = (self.next, self.every) else {
            return Ok(());
        };
        if Instant::now() >= at {
            let victim = self.rng.gen_range(0..fleet.len());
            fleet.kill(victim).await?;
            tokio::time::sleep(Duration::from_millis(self.rng.gen_range(0..=self.down_ms))).await;
            fleet.start(victim).await?;
            self.restarts += 1;
            self.next = Some(Instant::now() + every);
        }
        Ok(())
    }
}

/// The faults that run in the background while the orders are placed.
pub(super) struct Faults {
    broker: Option<ServerFaults>,
    nodes: Option<NodeFaults>,
    postgres: Option<ServerFaults>,
    read_only: Option<ServerFaults>,
    topic: Option<TopicFaults>,
    /// The command topic the topic fault deletes (without the prefix).
    deleted_topic: Option<String>,
    garbage: Option<GarbageFaults>,
    links: Option<LinkFaults>,
    /// The outages of the schedules already stopped.
    log: FaultLog,
}

/// What the faults did, for the checks and the report.
#[derive(Default)]
pub(super) struct FaultLog {
    pub(super) broker: Outages,
    pub(super) nodes: NodeOutages,
    pub(super) postgres: Outages,
    pub(super) read_only: Outages,
    pub(super) topic: Option<TopicOutages>,
    pub(super) garbage: Option<GarbageLog>,
    /// When the garbage began.
    pub(super) garbage_from: Option<DateTime<Utc>>,
    /// The link faults of a network run.
    pub(super) links: Vec<LinkOutage>,
}

impl Faults {
    /// Starts the schedules of the faults the arguments ask for. `deleted_topic`: the topic
    /// fault's topic, from [`deleted_topic`]; `links`: a network run's link faults, started.
    pub(super) fn spawn(
        args: &ChaosArgs,
        setup: &Setup,
        deleted_topic: Option<String>,
        links: Option<LinkFaults>,
    ) -> anyhow::Result<Self> {
        let broker = spawn_broker_faults(args);
        let nodes = spawn_node_faults(args, &setup.prefix)?;
        let postgres = spawn_postgres_faults(args)?;
        let read_only = spawn_read_only_faults(args)?;
        let topic = match &deleted_topic {
            Some(topic) => Some(TopicFaults::spawn(
                &args.kafka,
                setup.topics.named(topic),
                Duration::from_millis(args.topic_delete_every_ms),
                Duration::from_millis(args.topic_down_ms),
            )?),
            None => None,
        };
        Ok(Self {
            broker,
            nodes,
            postgres,
            read_only,
            topic,
            deleted_topic,
            garbage: None,
            links,
            log: FaultLog::default(),
        })
    }

    /// The second half of a run with garbage: the server faults' schedules start over (once
    /// an outage in progress has ended), so each half sees its broker kills and PostgreSQL
    /// restarts at the same times from its start, and the garbage begins.
    pub(super) async fn begin_garbage(
        &mut self,
        args: &ChaosArgs,
        setup: &Setup,
        placed: usize,
    ) -> anyhow::Result<()> {
        if let Some(faults) = self.broker.take() {
            self.log.broker.add(faults.stop().await?);
            self.broker = spawn_broker_faults(args);
        }
        if let Some(faults) = self.nodes.take() {
            self.log.nodes.add(faults.stop().await?);
            self.nodes = spawn_node_faults(args, &setup.prefix)?;
        }
        if let Some(faults) = self.postgres.take() {
            self.log.postgres.add(faults.stop().await?);
            self.postgres = spawn_postgres_faults(args)?;
        }
        if let Some(faults) = self.read_only.take() {
            self.log.read_only.add(faults.stop().await?);
            self.read_only = spawn_read_only_faults(args)?;
        }
        eprintln!(
            "baseline done ({placed} orders); publishing garbage every {} ms from now",
            args.garbage_every_ms
        );
        self.log.garbage_from = Some(Utc::now());
        self.garbage = Some(GarbageFaults::spawn(
            garbage::producer(&args.kafka)?,
            setup.topics.clone(),
            garbage_targets(&setup.deployment, self.deleted_topic.as_deref()),
            args.garbage_kinds(),
            Duration::from_millis(args.garbage_every_ms),
        ));
        Ok(())
    }

    /// Stops every fault; returns once the servers are up again, with what the faults did.
    pub(super) async fn stop(self) -> anyhow::Result<FaultLog> {
        let mut log = self.log;
        // The servers come back before the garbage stops: a send in flight waits for the broker.
        if let Some(faults) = self.broker {
            log.broker.add(faults.stop().await?);
        }
        if let Some(faults) = self.nodes {
            log.nodes.add(faults.stop().await?);
        }
        if let Some(faults) = self.postgres {
            log.postgres.add(faults.stop().await?);
        }
        if let Some(faults) = self.read_only {
            log.read_only.add(faults.stop().await?);
        }
        if let Some(faults) = self.topic {
            log.topic = Some(faults.stop().await?);
        }
        if let Some(faults) = self.links {
            log.links = faults.stop().await?;
        }
        if let Some(garbage) = self.garbage {
            log.garbage = Some(garbage.stop().await?);
        }
        Ok(log)
    }
}

/// SIGKILLs one node of the three-node cluster at a time (and two once) every
/// --broker-kill-every-ms, if set with --broker-nodes 3.
fn spawn_node_faults(args: &ChaosArgs, prefix: &str) -> anyhow::Result<Option<NodeFaults>> {
    if args.broker_kill_every_ms == 0 || args.broker_nodes != 3 {
        return Ok(None);
    }
    NodeFaults::spawn(
        Plan {
            script: args.broker_script.clone(),
            every: Duration::from_millis(args.broker_kill_every_ms),
            down: Duration::from_millis(args.broker_down_ms),
            two_down_after: args.broker_two_down_after,
            two_down: Duration::from_millis(args.broker_two_down_ms),
            cluster_dir: args.broker_cluster_dir.clone(),
            topic_prefix: prefix.to_owned(),
        },
        &args.kafka,
    )
    .map(Some)
}

/// The command topic --topic-delete-every-ms deletes (without the prefix), chosen for this run;
/// while it is, the services get the shorter step deadlines the fault needs.
pub(super) fn deleted_topic(
    args: &ChaosArgs,
    deployment: &Deployment,
    fleet: &mut Fleet,
) -> Option<String> {
    if args.topic_delete_every_ms == 0 {
        return None;
    }
    let topic = topic_faults::choose(deployment)?;
    fleet.env.extend(topic_faults::service_env());
    Some(topic)
}

/// Where garbage goes: every consumed topic but the one the topic fault deletes.
fn garbage_targets(deployment: &Deployment, deleted_topic: Option<&str>) -> Vec<Target> {
    match deleted_topic {
        Some(topic) => topic_faults::spare(Target::all(deployment), topic),
        None => Target::all(deployment),
    }
}
