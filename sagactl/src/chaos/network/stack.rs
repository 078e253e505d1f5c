//! The network run's servers on their own hosts: a [`Network`] with a host for PostgreSQL, one
//! per broker node and one per service instance; a PostgreSQL of the run's own on its host, and
//! the secured three-node cluster (`BROKER_NODES=3 scripts/broker.sh`, told each node's address
//! and namespace) on the broker hosts. Nothing of it is shared with another run or with the
//! machine's own servers; dropping the [`Stack`] stops the servers and removes the hosts.
//!
//! PostgreSQL trusts the run's subnet: the network exists only inside this machine and only
//! for the run, and what the run tests is the network, not the logins (the secured setups'
//! tests do those).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::Network;

/// The hosts of the servers.
pub const POSTGRES_HOST: &str = "pg";
pub const BROKER_HOSTS: [&str; 3] = ["k1", "k2", "k3"];
/// The port PostgreSQL listens on, on its host.
const POSTGRES_PORT: u16 = 5432;
/// How long PostgreSQL may take to answer after its start.
const POSTGRES_START: Duration = Duration::from_secs(30);

/// Where the servers are, for the run's settings.
pub struct Endpoints {
    /// `postgres://postgres@<address>:5432`, without a database.
    pub database_server: String,
    /// The cluster's SASL_SSL bootstrap list.
    pub kafka_brokers: String,
    /// The cluster's folder: `clients/<identity>.properties`, the nodes' quorum state.
    pub cluster_dir: PathBuf,
}

/// The network and the servers on it, stopped and removed on drop.
pub struct Stack {
    pub network: Arc<Mutex<Network>>,
    pub endpoints: Endpoints,
    postgres: Option<Child>,
    broker_script: PathBuf,
    /// The run's server folders (PostgreSQL's data, the cluster's), removed on drop unless
    /// [`Stack::keep`] was called.
    dirs: Vec<PathBuf>,
    keep: bool,
}

impl Stack {
    /// Creates the network (`prefix`, `subnet`: see [`Network::create`]) with the servers'
    /// hosts and `service_hosts`, and starts PostgreSQL and the cluster on it.
    ///
    /// # Errors
    /// Not root, a command missing, a server that does not start; what was made is removed.
    pub fn start(
        prefix: &str,
        subnet: u8,
        service_hosts: &[String],
        broker_script: &Path,
    ) -> anyhow::Result<Self> {
        let mut names: Vec<&str> = vec![POSTGRES_HOST];
        names.extend(BROKER_HOSTS);
        names.extend(service_hosts.iter().map(String::as_str));
        let network = Network::create(prefix, subnet, &names)?;
        let pg_dir = std::env::temp_dir().join(format!("saga-chaos-{prefix}-postgres"));
        let cluster_dir = std::path::absolute(format!(".run/chaos-network-{prefix}/cluster"))?;
        let mut stack = Self {
            endpoints: Endpoints {
                database_server: String::new(),
                kafka_brokers: String::new(),
                cluster_dir: cluster_dir.clone(),
            },
            postgres: None,
            broker_script: broker_script.to_owned(),
            dirs: vec![pg_dir.clone(), cluster_dir.clone()],
            keep: false,
            network: Arc::new(Mutex::new(network)),
        };
        let began = Instant::now();
        let (postgres, database_server) = stack.start_postgres(&pg_dir, subnet)?;
        stack.postgres = Some(postgres);
        stack.endpoints.database_server = database_server;
        eprintln!(
            "network run: PostgreSQL on {} in {:.1} s",
            stack.endpoints.database_server,
            began.elapsed().as_secs_f64()
        );
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

    /// A fresh cluster of PostgreSQL's installed version in `dir` (owned by `postgres`),
    /// listening on its host's address only, trusting the run's subnet; started on its host.
    fn start_postgres(&self, dir: &Path, subnet: u8) -> anyhow::Result<(Child, String)> {
        let bin = postgres_bin()?;
        let address = self.address(POSTGRES_HOST)?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        run(Command::new("chown").args(["postgres:postgres"]).arg(dir))?;
        run(as_postgres(&mut Command::new("setpriv"))
            .arg(bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(dir.join("data")))?;
        let data = dir.join("data");
        append(
            &data.join("postgresql.conf"),
            &format!(
                "\n# The network chaos run's server (sagactl chaos --network).\n\
                 listen_addresses = '{address}'\nport = {POSTGRES_PORT}\n\
                 unix_socket_directories = '{}'\nmax_connections = 300\n",
                dir.display()
            ),
        )?;
        append(
            &data.join("pg_hba.conf"),
            &format!("host all all 10.231.{subnet}.0/24 trust\n"),
        )?;
        let log = std::fs::File::create(dir.join("postgres.log"))?;
        let mut on_host = self.network()?.command(POSTGRES_HOST, "setpriv")?;
        let child = as_postgres(&mut on_host)
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting PostgreSQL on its host")?;
        let addr = std::net::SocketAddr::from((address, POSTGRES_PORT));
        let began = Instant::now();
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if began.elapsed() > POSTGRES_START {
                bail!(
                    "PostgreSQL did not listen on {addr} in {POSTGRES_START:?}; see {}/postgres.log",
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok((child, format!("postgres://postgres@{addr}")))
    }

    /// The three-node cluster in `dir`, each node on its host; returns its bootstrap list.
    fn start_cluster(&self, dir: &Path) -> anyhow::Result<String> {
        let mut hosts = Vec::new();
        let mut namespaces = Vec::new();
        for name in BROKER_HOSTS {
            hosts.push(self.address(name)?.to_string());
            namespaces.push(self.netns(name)?);
        }
        run(Command::new(&self.broker_script)
            .arg("start")
            .env("BROKER_NODES", "3")
            .env("BROKER_RUN_DIR", dir)
            .env("KAFKA_CLUSTER_HOSTS", hosts.join(" "))
            .env("KAFKA_CLUSTER_NETNS", namespaces.join(" ")))?;
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
        if let Some(mut postgres) = self.postgres.take() {
            let _ = postgres.kill();
            let _ = postgres.wait();
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

/// `setpriv` set up to run what follows as the `postgres` user (it execs, so the pid is the
/// program's: PostgreSQL refuses to run as root).
fn as_postgres(command: &mut Command) -> &mut Command {
    command.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--reset-env",
    ])
}

/// The newest installed PostgreSQL's programs (Debian's layout, as scripts/postgres.sh
/// installs it).
fn postgres_bin() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .with_context(|| {
            format!(
                "no PostgreSQL in {} (scripts/postgres.sh install)",
                root.display()
            )
        })?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .with_context(|| format!("no PostgreSQL version in {}", root.display()))?;
    Ok(root.join(newest.to_string()).join("bin"))
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
