//! The fleet: the orchestrators and the participants the saga definitions name, each run as
//! its own OS process with its own log, started, SIGKILLed, restarted after a crash, and
//! stopped gracefully at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use messaging::config::GroupProtocol;
use tokio::process::{Child, Command};

use super::args::{value_name, ChaosArgs};
use super::setup::Setup;
use crate::deployment::{Deployment, ORCHESTRATOR};

/// One process of the fleet: its name in reports (and its network host's, in a network
/// run), its binary, and its own settings.
struct Instance {
    name: String,
    binary: String,
    env: Vec<(String, String)>,
}

pub(super) struct Fleet {
    bin_dir: PathBuf,
    /// Settings every process gets.
    pub(super) env: Vec<(String, String)>,
    instances: Vec<Instance>,
    /// In a network run, the namespace each instance runs in, by its name.
    netns: BTreeMap<String, String>,
    /// In a network run, each instance's address, by its name.
    pub(super) addresses: BTreeMap<String, String>,
    children: BTreeMap<String, Child>,
    /// SIGKILLs per process, for the report.
    pub(super) kills: BTreeMap<String, u32>,
    log_dir: PathBuf,
}

impl Fleet {
    /// The run's processes and their settings: --orchestrators orchestrators in one consumer
    /// group, and one process per participant the definitions name, on the run's topic prefix
    /// and database (a participant's own with --own-database); none started yet.
    /// In a network run, `netns` names each instance's namespace.
    pub(super) fn plan(
        args: &ChaosArgs,
        setup: &Setup,
        netns: BTreeMap<String, String>,
    ) -> anyhow::Result<Self> {
        let mut instances = instances(args, setup)?;
        let fleet_env = kafka_identities(args, &mut instances)?;
        Ok(Self {
            bin_dir: args.bin_dir.clone(),
            env: vec![
                ("KAFKA_BROKERS".into(), args.kafka.kafka_brokers.clone()),
                ("TOPIC_PREFIX".into(), setup.prefix.clone()),
                ("DATABASE_MAX_CONNECTIONS".into(), "4".into()),
                ("KAFKA_SESSION_TIMEOUT_MS".into(), "6000".into()),
                (
                    "KAFKA_GROUP_PROTOCOL".into(),
                    value_name(args.group_protocol),
                ),
                (
                    "FAULT_CRASH_AFTER_COMMIT_EVERY".into(),
                    args.crash_after_commit_every.to_string(),
                ),
            ]
            .into_iter()
            .chain(fleet_env)
            .chain(network_env(args))
            .collect(),
            instances,
            netns,
            addresses: BTreeMap::new(),
            children: BTreeMap::new(),
            kills: BTreeMap::new(),
            log_dir: setup.log_dir.clone(),
        })
    }

    /// The instances whose address is none of `addresses` (in a network run; none on one
    /// host, where every instance has the same).
    pub(super) fn not_from(&self, addresses: &[String]) -> Vec<String> {
        self.addresses
            .iter()
            .filter(|(_, address)| !addresses.contains(address))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// How many processes the fleet runs.
    pub(super) fn len(&self) -> usize {
        self.instances.len()
    }

    /// Starts every process.
    pub(super) async fn start_all(&mut self) -> anyhow::Result<()> {
        for index in 0..self.instances.len() {
            self.start(index).await?;
        }
        Ok(())
    }

    pub(super) async fn start(&mut self, index: usize) -> anyhow::Result<()> {
        let instance = &self.instances[index];
        let binary = self.bin_dir.join(&instance.binary);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("{}.log", instance.name)))?;
        let mut command = match self.netns.get(&instance.name) {
            Some(netns) => Command::from(super::network::on_host(netns, &binary)),
            None => Command::new(&binary),
        };
        let child = command
            .envs(
                self.env
                    .iter()
                    .chain(&instance.env)
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        self.children.insert(instance.name.clone(), child);
        Ok(())
    }

    pub(super) async fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        let name = self.instances[index].name.clone();
        if let Some(mut child) = self.children.remove(&name) {
            child.start_kill()?;
            child.wait().await?;
            *self.kills.entry(name).or_default() += 1;
        }
        Ok(())
    }

    /// Restarts every service that exited by itself (a crash, not one of our kills).
    pub(super) async fn revive(&mut self) -> anyhow::Result<u32> {
        let mut revived = 0;
        for index in 0..self.instances.len() {
            let name = &self.instances[index].name;
            let exited = match self.children.get_mut(name) {
                Some(child) => child.try_wait()?.is_some(),
                None => true,
            };
            if exited {
                eprintln!("{name} had exited; restarting it");
                self.start(index).await?;
                revived += 1;
            }
        }
        Ok(revived)
    }

    pub(super) async fn stop_all(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.children) {
            if let Some(pid) = child.id() {
                // SIGTERM first: the graceful path is part of what a run exercises.
                let _ = std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// What a network run gives every service besides: shorter database bounds than the defaults
/// (10 s a call, giving up its partitions after 15 s), so that a link fault of a few seconds
/// makes an instance cut off from PostgreSQL give its partitions up and join again.
fn network_env(args: &ChaosArgs) -> Vec<(String, String)> {
    if !args.network {
        return Vec::new();
    }
    vec![
        ("DATABASE_CALL_TIMEOUT_MS".into(), "2000".into()),
        ("DATABASE_GIVE_UP_AFTER_MS".into(), "4000".into()),
    ]
}

/// The names of the run's processes, with their binaries: --orchestrators orchestrators
/// (`orchestrator-N`), and --participant-instances of each participant the definitions name
/// (its name, or `<name>-N` when there are several).
pub(super) fn instance_names(
    args: &ChaosArgs,
    deployment: &Deployment,
) -> anyhow::Result<Vec<(String, String)>> {
    if args.participant_instances > 1 && !args.network {
        bail!("--participant-instances above 1 needs --network: each instance on its own host, with its own metrics port");
    }
    let mut names: Vec<(String, String)> = (1..=args.orchestrators.max(1))
        .map(|n| (format!("{ORCHESTRATOR}-{n}"), ORCHESTRATOR.to_owned()))
        .collect();
    let each = args.participant_instances.max(1);
    for participant in &deployment.participants {
        for n in 1..=each {
            let name = if each == 1 {
                participant.name.clone()
            } else {
                format!("{}-{n}", participant.name)
            };
            names.push((name, participant.name.clone()));
        }
    }
    Ok(names)
}

/// The run's processes: orchestrators in one consumer group (they divide the partitions
/// between them), and each participant's instances in its group; each on the database its
/// service uses (every instance of a service on the same).
fn instances(args: &ChaosArgs, setup: &Setup) -> anyhow::Result<Vec<Instance>> {
    let mut instances = Vec::new();
    for (name, binary) in instance_names(args, &setup.deployment)? {
        let database = (
            "DATABASE_URL".to_owned(),
            setup.database_url(&binary).to_owned(),
        );
        let mut env = if binary == ORCHESTRATOR {
            // The chaos run reads the tables, not the API: open, on loopback only, on any free
            // port the orchestrator binds itself (a port found free here and then released
            // could be taken by another run before the orchestrator binds it).
            vec![
                (
                    "SAGAS_DIR".into(),
                    args.sagas_dir.to_string_lossy().into_owned(),
                ),
                ("HTTP_ADDR".into(), "127.0.0.1:0".into()),
                ("API_OPEN_ON_LOOPBACK".into(), "true".into()),
                ("API_DATABASE_CONNECTIONS".into(), "1".into()),
            ]
        } else if args.network {
            // Each instance on a host of its own: its participant's own metrics port.
            Vec::new()
        } else {
            // On one host, a participant's fixed metrics port (9181, ...) is taken while another
            // run or test on this machine runs the same participant, and a participant that
            // cannot serve it stops, again at every restart: any free port (the run reads no
            // metrics, only tables and logs).
            vec![("METRICS_ADDR".into(), "127.0.0.1:0".into())]
        };
        env.push(database);
        instances.push(Instance { name, binary, env });
    }
    if !args.clock_skew.is_empty() {
        let library = write_clock_shift(&setup.log_dir)?;
        for (name, secs) in &args.clock_skew {
            let Some(instance) = instances.iter_mut().find(|i| &i.name == name) else {
                bail!("--clock-skew {name}: the run has no process of that name");
            };
            instance.env.extend([
                ("LD_PRELOAD".into(), library.display().to_string()),
                ("CLOCK_SHIFT_SECS".into(), secs.to_string()),
            ]);
        }
    }
    // Static membership lets a restarted member of a classic group take its partitions back
    // at once. KIP-848 groups refuse a restarted member whose instance id the broker still
    // holds (until the dead one's session expires) with a fatal error, so they run dynamic.
    if !args.dynamic_membership && args.group_protocol == GroupProtocol::Classic {
        for instance in &mut instances {
            instance
                .env
                .push(("KAFKA_GROUP_INSTANCE_ID".into(), instance.name.clone()));
        }
    }
    Ok(instances)
}

/// The library that moves a process's wall clock, and every wait until a wall-clock time, by
/// `CLOCK_SHIFT_SECS` (`sagactl/clock-shift/clock_shift.c`, built by build.rs).
const CLOCK_SHIFT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libclock_shift.so"));

/// Writes the clock-shift library into the run's folder, for the skewed processes to preload.
fn write_clock_shift(run_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = std::fs::canonicalize(run_dir)?.join("libclock_shift.so");
    std::fs::write(&path, CLOCK_SHIFT).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Who each process is to the Kafka cluster: with --kafka-identities, each service's own
/// client properties (added to its settings); otherwise the settings every process gets, if
/// any (the run's --kafka-client-properties).
fn kafka_identities(
    args: &ChaosArgs,
    instances: &mut [Instance],
) -> anyhow::Result<Vec<(String, String)>> {
    let mut fleet_env: Vec<(String, String)> = Vec::new();
    match &args.kafka_identities {
        // Each service as itself: the orchestrators share the orchestrator's identity.
        Some(dir) => {
            for instance in instances.iter_mut() {
                let properties = dir.join(format!("{}.properties", instance.binary));
                if !properties.is_file() {
                    bail!(
                        "--kafka-identities: no client properties for {} at {}",
                        instance.binary,
                        properties.display()
                    );
                }
                instance.env.push((
                    messaging::access::CLIENT_PROPERTIES_SETTING.into(),
                    properties.display().to_string(),
                ));
            }
        }
        None => {
            if let Some(properties) = &args.kafka.kafka_client_properties {
                fleet_env.push((
                    messaging::access::CLIENT_PROPERTIES_SETTING.into(),
                    properties.display().to_string(),
                ));
            }
        }
    }
    Ok(fleet_env)
}
