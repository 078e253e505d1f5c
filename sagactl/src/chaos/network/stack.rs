//! The network run's servers on their own hosts: a [`Network`] with a host for PostgreSQL, one
//! per broker node and one per service instance; a PostgreSQL of the run's own on its host
//! (and, for the participants on a database of their own, a second one on host `pg2`), and
//! the secured three-node cluster (`BROKER_NODES=3 scripts/broker.sh`, told each node's address
//! and namespace) on the broker hosts. Nothing of it is shared with another run or with the
//! machine's own servers; dropping the [`Stack`] stops the servers and removes the hosts.
//!
//! PostgreSQL trusts the run's subnet: the network exists only inside this machine and only
//! for the run, and what the run tests is the network, not the logins (the secured setups'
//! tests do those).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;

use super::Network;

/// The hosts of the servers.
pub const POSTGRES_HOST: &str = "pg";
/// The second PostgreSQL's host: the --own-database participants' databases are there, so that
/// a link fault cuts such a participant from its database while the others keep theirs.
pub const OWN_POSTGRES_HOST: &str = "pg2";
pub const BROKER_HOSTS: [&str; 3] = ["k1", "k2", "k3"];
/// The port PostgreSQL listens on, on its host.
const POSTGRES_PORT: u16 = 5432;

/// Where the servers are, for the run's settings.
pub struct Endpoints {
    /// `postgres://postgres@<address>:5432`, without a database.
    pub database_server: String,
    /// The cluster's SASL_SSL bootstrap list.
    pub kafka_brokers: String,
    /// The cluster's folder: `clients/<identity>.properties`, the nodes' quorum state.
    pub cluster_dir: PathBuf,
    /// PostgreSQL's folder (`scripts/postgres.sh`'s PG_RUN_DIR): its data and log.
    pub postgres_dir: PathBuf,
    /// The second PostgreSQL, on [`OWN_POSTGRES_HOST`], when the run asked for it: its URL
    /// without a database, and its folder.
    pub own_postgres: Option<(String, PathBuf)>,
}

/// The network and the servers on it, stopped and removed on drop.
pub struct Stack {
    pub network: Arc<Mutex<Network>>,
    pub endpoints: Endpoints,
    postgres_script: PathBuf,
    broker_script: PathBuf,
    /// The run's server folders (PostgreSQL's data, the cluster's), removed on drop unless
    /// [`Stack::keep`] was called.
    dirs: Vec<PathBuf>,
    keep: bool,
}

impl Stack {
    /// Creates the network (`prefix`, `subnet`: see [`Network::create`]) with the servers'
    /// hosts and `service_hosts`, and starts PostgreSQL and the cluster on it; with
    /// `own_postgres`, a second PostgreSQL on [`OWN_POSTGRES_HOST`] too.
    ///
    /// # Errors
    /// Not root, a command missing, a server that does not start; what was made is removed.
    pub fn start(
        prefix: &str,
        subnet: u8,
        service_hosts: &[String],
        (postgres_script, broker_script): (&Path, &Path),
        own_postgres: bool,
    ) -> anyhow::Result<Self> {
        let mut names: Vec<&str> = vec![POSTGRES_HOST];
        if own_postgres {
            names.push(OWN_POSTGRES_HOST);
        }
        names.extend(BROKER_HOSTS);
        names.extend(service_hosts.iter().map(String::as_str));
        let network = Network::create(prefix, subnet, &names)?;
        let pg_dir = std::env::temp_dir().join(format!("saga-chaos-{prefix}-postgres"));
        let servers_dir = std::path::absolute(format!(".run/chaos-network-{prefix}"))?;
        let cluster_dir = servers_dir.join("cluster");
        let mut stack = Self {
            endpoints: Endpoints {
                database_server: String::new(),
                kafka_brokers: String::new(),
                cluster_dir: cluster_dir.clone(),
                postgres_dir: pg_dir.clone(),
                own_postgres: None,
            },
            postgres_script: postgres_script.to_owned(),
            broker_script: broker_script.to_owned(),
            dirs: vec![pg_dir.clone(), servers_dir],
            keep: false,
            network: Arc::new(Mutex::new(network)),
        };
        let began = Instant::now();
        stack.endpoints.database_server = stack.start_postgres(POSTGRES_HOST, &pg_dir, subnet)?;
        eprintln!(
            "network run: PostgreSQL on {} in {:.1} s",
            stack.endpoints.database_server,
            began.elapsed().as_secs_f64()
        );
        if own_postgres {
            let dir = std::env::temp_dir().join(format!("saga-chaos-{prefix}-postgres2"));
            // Stopped and removed on drop from here on, also when it does not start.
            stack.dirs.push(dir.clone());
            stack.endpoints.own_postgres = Some((String::new(), dir.clone()));
            let server = stack.start_postgres(OWN_POSTGRES_HOST, &dir, subnet)?;
            eprintln!("network run: the second PostgreSQL on {server}");
            stack.endpoints.own_postgres = Some((server, dir));
        }
        stack.endpoints.kafka_brokers = stack.start_cluster(&cluster_dir)?;
        eprintln!(
            "network run: the three-node cluster on {} ({:.1} s in all)",
            stack.endpoints.kafka_brokers,
            began.elapsed().as_secs_f64()
        );
        Ok(stack)
    }

    /// Keeps the servers' folders (logs, data) after the drop: the run failed.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Host `name`'s namespace, for the processes started on it.
    pub fn netns(&self, name: &str) -> anyhow::Result<String> {
        Ok(self.network()?.host(name)?.netns.clone())
    }

    pub fn address(&self, name: &str) -> anyhow::Result<Ipv4Addr> {
        Ok(self.network()?.host(name)?.addr)
    }

    fn network(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Network>> {
        self.network
            .lock()
            .map_err(|_| anyhow::anyhow!("the network's lock is poisoned"))
    }

    /// A PostgreSQL of the run's own in `dir` (`scripts/postgres.sh` with PG_RUN_DIR),
    /// listening on `host`'s address only, trusting the run's subnet; started on `host`.
    fn start_postgres(&self, host: &str, dir: &Path, subnet: u8) -> anyhow::Result<String> {
        let address = self.address(host)?;
        let _ = std::fs::remove_dir_all(dir);
        super::run(
            Command::new(&self.postgres_script)
                .arg("start")
                .env("PG_RUN_DIR", dir)
                .env("PG_HOST", address.to_string())
                .env("PG_NETNS", self.netns(host)?)
                .env("PG_TRUST_NET", format!("10.231.{subnet}.0/24"))
                .env("PGPORT", POSTGRES_PORT.to_string()),
        )?;
        Ok(format!("postgres://postgres@{address}:{POSTGRES_PORT}"))
    }

    /// The three-node cluster in `dir`, each node on its host; returns its bootstrap list.
    fn start_cluster(&self, dir: &Path) -> anyhow::Result<String> {
        let mut hosts = Vec::new();
        let mut namespaces = Vec::new();
        for name in BROKER_HOSTS {
            hosts.push(self.address(name)?.to_string());
            namespaces.push(self.netns(name)?);
        }
        super::run(
            Command::new(&self.broker_script)
                .arg("start")
                .env("BROKER_NODES", "3")
                .env("BROKER_RUN_DIR", dir)
                .env("KAFKA_CLUSTER_HOSTS", hosts.join(" "))
                .env("KAFKA_CLUSTER_NETNS", namespaces.join(" ")),
        )?;
        let env = std::fs::read_to_string(dir.join("cluster.env"))?;
        env.lines()
            .find_map(|line| line.strip_prefix("KAFKA_BROKERS="))
            .map(str::to_owned)
            .context("the cluster's cluster.env names no KAFKA_BROKERS")
    }
}

impl Drop for Stack {
    /// The servers stop first (SIGKILL: nothing of theirs is kept), then the network goes with
    /// the [`Network`]'s own drop.
    fn drop(&mut self) {
        let own = self.endpoints.own_postgres.as_ref().map(|(_, dir)| dir);
        for dir in std::iter::once(&self.endpoints.postgres_dir).chain(own) {
            let stopped = Command::new(&self.postgres_script)
                .arg("stop")
                .env("PG_RUN_DIR", dir)
                .stdout(Stdio::null())
                .status();
            if let Err(e) = stopped {
                eprintln!(
                    "stopping the network run's PostgreSQL in {}: {e}",
                    dir.display()
                );
            }
        }
        let killed = Command::new(&self.broker_script)
            .arg("kill")
            .env("BROKER_NODES", "3")
            .env("BROKER_RUN_DIR", &self.endpoints.cluster_dir)
            .stdout(Stdio::null())
            .status();
        if let Err(e) = killed {
            eprintln!("stopping the network run's cluster: {e}");
        }
        if !self.keep {
            for dir in &self.dirs {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}
