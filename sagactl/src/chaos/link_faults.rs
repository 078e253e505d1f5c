//! The network run's link faults (`--network`): one at a time, every --link-fault-every-ms, a
//! fault of the next class is put on the network for --link-fault-ms and healed. The classes
//! come in a shuffled round, so that every class the run asks for comes once before any comes
//! again; the class's target (which instance, which broker node) and a slow link's delay and
//! loss are drawn from the run's seed, so that a run replays its faults with `--seed`.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::ValueEnum;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::broker_nodes;
use super::network::stack::{BROKER_HOSTS, POSTGRES_HOST};
use super::network::Network;
use crate::deployment::ORCHESTRATOR;

/// A class of link fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LinkFault {
    /// An orchestrator instance cut off from every broker, both ways (it still reaches
    /// PostgreSQL): its partitions must move to the other instance, and nothing it decides
    /// meanwhile may stick.
    OrchestratorBrokers,
    /// An orchestrator instance cut off from PostgreSQL (it still reaches the brokers).
    OrchestratorDatabase,
    /// A participant instance cut off from its PostgreSQL (the second one, `pg2`, for a
    /// participant on a database of its own; it still reaches the brokers): after a bounded
    /// time it must give up its partitions to the other instance.
    ParticipantDatabase,
    /// A broker node cut off from the other two (the active controller, when one is known):
    /// the clients still reach it.
    BrokerPeers,
    /// A broker node cut off from every service instance (it still reaches its peers): a
    /// minority of one on the clients' side.
    BrokerClients,
    /// Every host's outgoing packets delayed (a data centre: 0.5-2 ms; a bad day: 40-60 ms)
    /// and 1-5% of its incoming packets lost.
    SlowLossy,
}

/// One fault put on the network, and when it was healed.
#[derive(Debug, Clone)]
pub struct LinkOutage {
    pub fault: LinkFault,
    /// What it hit, in words.
    pub target: String,
    /// The service instance it cut off, when it cut one off.
    pub cut_off: Option<String>,
    pub began: DateTime<Utc>,
    pub healed: DateTime<Utc>,
}

impl LinkOutage {
    pub fn describe(&self) -> String {
        format!(
            "{} ({}) at {} for {:.1} s",
            super::args::value_name(self.fault),
            self.target,
            self.began.format("%H:%M:%S%.3f"),
            (self.healed - self.began).num_milliseconds() as f64 / 1000.0
        )
    }
}

/// How the faults run.
pub struct Plan {
    pub faults: Vec<LinkFault>,
    pub every: Duration,
    pub hold: Duration,
    pub seed: u64,
    /// The service instances, by host name (the orchestrators' start with
    /// [`ORCHESTRATOR`]).
    pub services: Vec<String>,
    /// The host of the PostgreSQL an instance uses, for those not on [`POSTGRES_HOST`] (the
    /// --own-database participants'), by instance.
    pub database_hosts: BTreeMap<String, &'static str>,
    /// The cluster's folder: the active controller, for [`LinkFault::BrokerPeers`].
    pub cluster_dir: std::path::PathBuf,
}

impl Plan {
    /// The host of the PostgreSQL `instance` uses.
    fn database_host(&self, instance: &str) -> &'static str {
        self.database_hosts
            .get(instance)
            .copied()
            .unwrap_or(POSTGRES_HOST)
    }

    /// Every PostgreSQL's host.
    fn database_servers(&self) -> Vec<&'static str> {
        let mut hosts = vec![POSTGRES_HOST];
        for host in self.database_hosts.values() {
            if !hosts.contains(host) {
                hosts.push(host);
            }
        }
        hosts
    }
}

/// The faults running in the background.
pub struct LinkFaults {
    stop: mpsc::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<Vec<LinkOutage>>>,
}

impl LinkFaults {
    pub fn spawn(plan: Plan, network: Arc<Mutex<Network>>) -> Self {
        let (stop, stopping) = mpsc::channel();
        // The rules are made by commands that block: a thread of its own.
        let task = tokio::task::spawn_blocking(move || run(&plan, &network, &stopping));
        Self { stop, task }
    }

    /// Stops the faults; returns once the one in progress has been healed.
    pub async fn stop(self) -> anyhow::Result<Vec<LinkOutage>> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

fn run(
    plan: &Plan,
    network: &Mutex<Network>,
    stopping: &mpsc::Receiver<()>,
) -> anyhow::Result<Vec<LinkOutage>> {
    let mut rng: StdRng = rand::SeedableRng::seed_from_u64(plan.seed);
    let mut outages = Vec::new();
    let mut round: Vec<LinkFault> = Vec::new();
    loop {
        if waited_out(stopping, plan.every) {
            return Ok(outages);
        }
        if round.is_empty() {
            round = plan.faults.clone();
            round.shuffle(&mut rng);
        }
        let Some(fault) = round.pop() else {
            return Ok(outages);
        };
        let began = Utc::now();
        let (target, cut_off) = {
            let mut network = lock(network)?;
            put(&mut network, fault, plan, &mut rng)?
        };
        eprintln!("link fault: {} ({target})", super::args::value_name(fault));
        // A stop ends the fault early; it is healed either way.
        let stopped = waited_out(stopping, plan.hold);
        lock(network)?.heal()?;
        let outage = LinkOutage {
            fault,
            target,
            cut_off,
            began,
            healed: Utc::now(),
        };
        eprintln!("link fault healed: {}", outage.describe());
        outages.push(outage);
        if stopped {
            return Ok(outages);
        }
    }
}

/// `true` when the run stopped the faults (or dropped their handle) within `time`.
fn waited_out(stopping: &mpsc::Receiver<()>, time: Duration) -> bool {
    !matches!(
        stopping.recv_timeout(time),
        Err(mpsc::RecvTimeoutError::Timeout)
    )
}

fn lock(network: &Mutex<Network>) -> anyhow::Result<std::sync::MutexGuard<'_, Network>> {
    network
        .lock()
        .map_err(|_| anyhow::anyhow!("the network's lock is poisoned"))
}

/// Puts `fault` on the network; returns what it hit, and the service instance it cut off.
fn put(
    network: &mut Network,
    fault: LinkFault,
    plan: &Plan,
    rng: &mut StdRng,
) -> anyhow::Result<(String, Option<String>)> {
    let services: Vec<&str> = plan.services.iter().map(String::as_str).collect();
    let (orchestrators, participants): (Vec<&str>, Vec<&str>) = services
        .iter()
        .partition(|name| name.starts_with(ORCHESTRATOR));
    let pick = |rng: &mut StdRng, among: &[&str]| -> anyhow::Result<String> {
        among
            .choose(rng)
            .map(|name| (*name).to_owned())
            .ok_or_else(|| anyhow::anyhow!("no host to put a {fault:?} fault on"))
    };
    let (target, cut_off) = match fault {
        LinkFault::OrchestratorBrokers => {
            let victim = pick(rng, &orchestrators)?;
            network.partition(&[&victim], &BROKER_HOSTS)?;
            (format!("{victim} from every broker"), Some(victim))
        }
        // Each instance is cut from the PostgreSQL its service uses: the fault that matters.
        LinkFault::OrchestratorDatabase | LinkFault::ParticipantDatabase => {
            let among = if fault == LinkFault::OrchestratorDatabase {
                &orchestrators
            } else {
                &participants
            };
            let victim = pick(rng, among)?;
            let database = plan.database_host(&victim);
            network.partition(&[&victim], &[database])?;
            let target = if database == POSTGRES_HOST {
                format!("{victim} from PostgreSQL")
            } else {
                format!("{victim} from its own PostgreSQL ({database})")
            };
            (target, Some(victim))
        }
        LinkFault::BrokerPeers => {
            let (node, why) = match broker_nodes::controller(&plan.cluster_dir) {
                Some(node) => (node, "the active controller"),
                None => (rng.gen_range(1..=3), "a random node"),
            };
            let victim = broker_host(node)?;
            let peers: Vec<&str> = BROKER_HOSTS.into_iter().filter(|h| *h != victim).collect();
            network.partition(&[victim], &peers)?;
            (format!("node {node} ({why}) from its two peers"), None)
        }
        LinkFault::BrokerClients => {
            let node = rng.gen_range(1..=3);
            network.partition(&[broker_host(node)?], &services)?;
            (format!("node {node} from every service instance"), None)
        }
        LinkFault::SlowLossy => {
            let bad_day = rng.gen_bool(0.5);
            let (delay, jitter) = if bad_day {
                (Duration::from_millis(50), Duration::from_millis(10))
            } else {
                (Duration::from_micros(1250), Duration::from_micros(750))
            };
            let loss = rng.gen_range(1.0..=5.0);
            let hosts: Vec<String> = plan
                .database_servers()
                .into_iter()
                .chain(BROKER_HOSTS)
                .chain(services.iter().copied())
                .map(str::to_owned)
                .collect();
            for host in &hosts {
                network.slow(host, delay, jitter)?;
                network.lossy(host, loss)?;
            }
            let target = format!(
                "every host: {:.2} ms ± {:.2} ms out, {loss:.1}% lost in",
                delay.as_secs_f64() * 1000.0,
                jitter.as_secs_f64() * 1000.0
            );
            (target, None)
        }
    };
    Ok((target, cut_off))
}

fn broker_host(node: i32) -> anyhow::Result<&'static str> {
    usize::try_from(node - 1)
        .ok()
        .and_then(|i| BROKER_HOSTS.get(i).copied())
        .ok_or_else(|| anyhow::anyhow!("no broker node {node}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::network::stack::OWN_POSTGRES_HOST;

    /// A fault that cuts an instance from PostgreSQL cuts it from the one its service uses: an
    /// --own-database participant's from `pg2`, every other instance's from `pg`; a slow
    /// network slows both servers.
    #[test]
    fn an_instance_is_cut_from_the_postgresql_its_service_uses() {
        let plan = Plan {
            faults: vec![LinkFault::ParticipantDatabase],
            every: Duration::from_secs(1),
            hold: Duration::from_secs(1),
            seed: 1,
            services: vec![
                "orchestrator-1".into(),
                "payment-1".into(),
                "inventory-1".into(),
            ],
            database_hosts: BTreeMap::from([("payment-1".to_owned(), OWN_POSTGRES_HOST)]),
            cluster_dir: std::path::PathBuf::new(),
        };
        assert_eq!(plan.database_host("payment-1"), OWN_POSTGRES_HOST);
        assert_eq!(plan.database_host("inventory-1"), POSTGRES_HOST);
        assert_eq!(plan.database_host("orchestrator-1"), POSTGRES_HOST);
        assert_eq!(plan.database_servers(), [POSTGRES_HOST, OWN_POSTGRES_HOST]);
    }
}
