//! Broker faults of the chaos suite on the three-node cluster (`--broker-nodes 3`): one node
//! SIGKILLed at a time and started again (`BROKER_NODES=3 scripts/broker.sh kill-node N` and
//! `start-node N`), and, once, two of the three at the same time.
//!
//! Which node goes is chosen, not random, so that a run meets the two kills that cost most:
//! the leader of the busiest partitions (the most records written to the run's topics since
//! the previous kill; its partitions' clients must find a new leader) and the active
//! controller (the KRaft quorum's leader; its loss adds a Raft election before any leader
//! moves). Kills alternate between the two; the report says which node each was and why.
//!
//! Before each kill the run waits until every partition of its topics has all its replicas in
//! sync again: a node that is back but still catching up is not in the ISR, and killing another
//! then would leave one replica in sync, below `min.insync.replicas` 2, which is the two-down
//! fault, not the one-down one. An operator's rolling restart waits the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};

/// The cluster's node ids (scripts/broker.sh).
const NODES: [i32; 3] = [1, 2, 3];
/// How long a kill waits at most for every replica of the run's topics to be in sync.
const IN_SYNC_WAIT: Duration = Duration::from_secs(90);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It led the partitions of the run's topics that took the most records since the last
    /// look (the share of them is given).
    BusiestLeader { share_percent: u32 },
    /// The KRaft quorum's leader.
    Controller,
    /// Neither: the second node of a two-down fault when the first was both.
    Other,
}

/// One fault: the nodes killed together, why each, and when.
#[derive(Debug, Clone)]
pub struct NodeOutage {
    pub nodes: Vec<(i32, Vec<Role>)>,
    pub killed_at: DateTime<Utc>,
    pub back_at: DateTime<Utc>,
    /// Waiting for every replica to be in sync before the kill.
    pub in_sync_wait: Duration,
    /// From the kill until the last node's start had returned.
    pub length: Duration,
    /// How long `start-node` took (the slowest, when two were started).
    pub starting: Duration,
}

impl NodeOutage {
    pub fn describe(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|(node, roles)| {
                let why: Vec<String> = roles
                    .iter()
                    .map(|role| match role {
                        Role::BusiestLeader { share_percent } => format!(
                            "leader of the busiest partitions ({share_percent}% of the records)"
                        ),
                        Role::Controller => "active controller".into(),
                        Role::Other => "another node".into(),
                    })
                    .collect();
                format!("node {node} ({})", why.join(", "))
            })
            .collect();
        format!(
            "{} at {}: down {:.1} s (starting {:.1} s; waited {:.1} s for replicas in sync before)",
            nodes.join(" + "),
            self.killed_at.format("%H:%M:%S%.3f"),
            self.length.as_secs_f64(),
            self.starting.as_secs_f64(),
            self.in_sync_wait.as_secs_f64()
        )
    }
}

#[derive(Debug, Default)]
pub struct NodeOutages {
    pub faults: Vec<NodeOutage>,
}

impl NodeOutages {
    pub fn add(&mut self, more: NodeOutages) {
        self.faults.extend(more.faults);
    }

    /// The windows (kill until back) of the faults that took `down` nodes down.
    pub fn windows(&self, down: usize) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        self.faults
            .iter()
            .filter(|f| f.nodes.len() == down)
            .map(|f| (f.killed_at, f.back_at))
            .collect()
    }

    pub fn summary(&self) -> String {
        let one = self.faults.iter().filter(|f| f.nodes.len() == 1).count();
        let two = self.faults.len() - one;
        format!("{one} one-node kills, {two} two-node outages")
    }
}

/// How the faults are run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub script: PathBuf,
    pub every: Duration,
    pub down: Duration,
    /// After this many one-node kills, the next fault takes two nodes down (0: never).
    pub two_down_after: usize,
    pub two_down: Duration,
    /// The cluster's directory (scripts/broker.sh's .run/cluster): each node's quorum state.
    pub cluster_dir: PathBuf,
    /// The run's topic prefix: the partitions watched for traffic and replicas in sync.
    pub topic_prefix: String,
}

/// The faults running in the background.
pub struct NodeFaults {
    stop: mpsc::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<NodeOutages>>,
}

impl NodeFaults {
    pub fn spawn(
        plan: Plan,
        connection: &messaging::config::KafkaConnection,
    ) -> anyhow::Result<Self> {
        let client: BaseConsumer = messaging::kafka::connection_settings(connection)?
            .create()
            .context("creating the metadata client of the broker faults")?;
        let (stop, stopping) = mpsc::channel();
        // Scripts, metadata and watermarks all block: one thread of its own.
        let task = tokio::task::spawn_blocking(move || run(&plan, &client, &stopping));
        Ok(Self { stop, task })
    }

    /// Stops the faults; returns once the nodes down are up again.
    pub async fn stop(self) -> anyhow::Result<NodeOutages> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

fn run(
    plan: &Plan,
    client: &BaseConsumer,
    stopping: &mpsc::Receiver<()>,
) -> anyhow::Result<NodeOutages> {
    let mut outages = NodeOutages::default();
    let mut traffic = Traffic::default();
    let mut singles = 0usize;
    let mut two_down_done = false;
    loop {
        // Stopped, or the run dropped its handle.
        let stopped = !matches!(
            stopping.recv_timeout(plan.every),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        // A planned two-down fault that has not happened yet happens when the run stops the
        // faults (the orders are placed, their sagas still in flight), so that every run that
        // asks for it meets it, however slowly the nodes restarted before.
        let two_pending = plan.two_down_after > 0 && !two_down_done;
        if stopped && !two_pending {
            return Ok(outages);
        }
        let waited = Instant::now();
        let in_sync = wait_in_sync(client, &plan.topic_prefix, stopping)?;
        if !in_sync {
            return Ok(outages);
        }
        let in_sync_wait = waited.elapsed();
        let busiest = traffic.busiest_leader(client, &plan.topic_prefix)?;
        let controller = controller(&plan.cluster_dir);
        let two = two_pending && (stopped || singles == plan.two_down_after);
        let victims = choose_victims(busiest, controller, two, singles);
        let outage = take_down(plan, victims, two, in_sync_wait)?;
        eprintln!("broker fault: {}", outage.describe());
        outages.faults.push(outage);
        // One two-down fault per run; single kills go on after it until the run stops them.
        if two {
            two_down_done = true;
        } else {
            singles += 1;
        }
        if stopped {
            return Ok(outages);
        }
    }
}

/// The nodes the next fault kills (two when `two`), with why each: `busiest` is the busiest
/// partitions' leader with its share of the records, `controller` the active controller,
/// `singles` the one-node kills so far (they alternate between the two roles).
fn choose_victims(
    busiest: Option<(i32, u32)>,
    controller: Option<i32>,
    two: bool,
    singles: usize,
) -> BTreeMap<i32, Vec<Role>> {
    let mut victims: BTreeMap<i32, Vec<Role>> = BTreeMap::new();
    let mut mark = |node: i32, role: Role| victims.entry(node).or_default().push(role);
    if two {
        if let Some((node, share_percent)) = busiest {
            mark(node, Role::BusiestLeader { share_percent });
        }
        if let Some(node) = controller {
            mark(node, Role::Controller);
        }
    } else if singles.is_multiple_of(2) {
        // Even kills: the busiest leader (the controller when nothing leads yet).
        match (busiest, controller) {
            (Some((node, share_percent)), _) => mark(node, Role::BusiestLeader { share_percent }),
            (None, Some(node)) => mark(node, Role::Controller),
            (None, None) => mark(NODES[singles % NODES.len()], Role::Other),
        }
    } else {
        match (controller, busiest) {
            (Some(node), _) => mark(node, Role::Controller),
            (None, Some((node, share_percent))) => {
                mark(node, Role::BusiestLeader { share_percent })
            }
            (None, None) => mark(NODES[singles % NODES.len()], Role::Other),
        }
    }
    // A role the chosen node holds too is named as well (a busiest leader that is also the
    // controller is a harder kill).
    if let Some(node) = controller {
        if let Some(roles) = victims.get_mut(&node) {
            if !roles.contains(&Role::Controller) {
                roles.push(Role::Controller);
            }
        }
    }
    if let Some((node, share_percent)) = busiest {
        if let Some(roles) = victims.get_mut(&node) {
            if !roles
                .iter()
                .any(|r| matches!(r, Role::BusiestLeader { .. }))
            {
                roles.push(Role::BusiestLeader { share_percent });
            }
        }
    }
    let wanted = if two { 2 } else { 1 };
    for node in NODES {
        if victims.len() >= wanted {
            break;
        }
        victims.entry(node).or_insert_with(|| vec![Role::Other]);
    }
    victims
}

/// Kills `victims`, waits the plan's down time (the two-down one when `two`) and starts them
/// again, in parallel; returns the outage once every node's start has returned.
fn take_down(
    plan: &Plan,
    victims: BTreeMap<i32, Vec<Role>>,
    two: bool,
    in_sync_wait: Duration,
) -> anyhow::Result<NodeOutage> {
    let nodes: Vec<i32> = victims.keys().copied().collect();
    eprintln!(
        "broker fault: killing node{} {nodes:?} ({victims:?})",
        if nodes.len() > 1 { "s" } else { "" }
    );
    let killed_at = Utc::now();
    let began = Instant::now();
    for node in &nodes {
        script(&plan.script, &plan.cluster_dir, "kill-node", *node)?;
    }
    // The down time passes even when the run stops meanwhile: the nodes come back first.
    std::thread::sleep(if two { plan.two_down } else { plan.down });
    let starting = Instant::now();
    let starts: Vec<std::thread::JoinHandle<anyhow::Result<()>>> = nodes
        .iter()
        .map(|node| {
            let (path, dir, node) = (plan.script.clone(), plan.cluster_dir.clone(), *node);
            std::thread::spawn(move || script(&path, &dir, "start-node", node))
        })
        .collect();
    for start in starts {
        match start.join() {
            Ok(result) => result?,
            Err(_) => bail!("starting a node panicked"),
        }
    }
    let starting = starting.elapsed();
    Ok(NodeOutage {
        nodes: victims.into_iter().collect(),
        killed_at,
        back_at: Utc::now(),
        in_sync_wait,
        length: began.elapsed(),
        starting,
    })
}

/// `script action node` with BROKER_NODES=3 and BROKER_RUN_DIR the cluster's folder (the rest
/// of the environment, such as KAFKA_CLUSTER_PORT_BASE, is the run's).
fn script(path: &Path, cluster_dir: &Path, action: &str, node: i32) -> anyhow::Result<()> {
    let status = Command::new(path)
        .args([action, &node.to_string()])
        .env("BROKER_NODES", "3")
        .env("BROKER_RUN_DIR", cluster_dir)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {} {action} {node}", path.display()))?;
    if !status.success() {
        bail!("{} {action} {node} failed: {status}", path.display());
    }
    Ok(())
}

/// The active controller: the KRaft quorum's leader of the newest epoch any node has written
/// to its quorum state (`<node>/data/__cluster_metadata-0/quorum-state`). Client metadata does
/// not tell it: a KRaft broker names a random live broker as the controller.
pub fn controller(cluster_dir: &Path) -> Option<i32> {
    NODES
        .iter()
        .filter_map(|node| {
            let path = cluster_dir
                .join(format!("node-{node}"))
                .join("data/__cluster_metadata-0/quorum-state");
            let text = std::fs::read_to_string(path).ok()?;
            let state: serde_json::Value = serde_json::from_str(&text).ok()?;
            let leader = i32::try_from(state.get("leaderId")?.as_i64()?).ok()?;
            let epoch = state.get("leaderEpoch")?.as_i64()?;
            (leader > 0).then_some((epoch, leader))
        })
        .max()
        .map(|(_, leader)| leader)
}

/// Waits until every partition of the run's topics has all its replicas in sync (false: the
/// run stopped meanwhile). Gives up with an error after [`IN_SYNC_WAIT`].
fn wait_in_sync(
    client: &BaseConsumer,
    prefix: &str,
    stopping: &mpsc::Receiver<()>,
) -> anyhow::Result<bool> {
    let began = Instant::now();
    loop {
        let lagging = match client.fetch_metadata(None, METADATA_TIMEOUT) {
            Ok(metadata) => metadata
                .topics()
                .iter()
                .filter(|t| t.name().starts_with(prefix))
                .flat_map(|t| t.partitions())
                .filter(|p| p.isr().len() < p.replicas().len())
                .count(),
            Err(e) => {
                eprintln!("broker fault: reading the metadata: {e}");
                usize::MAX
            }
        };
        if lagging == 0 {
            return Ok(true);
        }
        if began.elapsed() > IN_SYNC_WAIT {
            bail!(
                "{lagging} partitions of the run's topics not fully in sync after {IN_SYNC_WAIT:?}"
            );
        }
        if stopping.recv_timeout(Duration::from_millis(500)).is_ok() {
            return Ok(false);
        }
    }
}

/// Records written per partition of the run's topics, as last seen.
#[derive(Debug, Default)]
struct Traffic {
    high: BTreeMap<(String, i32), i64>,
}

impl Traffic {
    /// The node leading the partitions that took the most records since the last call, and
    /// its share of them in percent (None: no record yet, or no metadata).
    fn busiest_leader(
        &mut self,
        client: &BaseConsumer,
        prefix: &str,
    ) -> anyhow::Result<Option<(i32, u32)>> {
        let metadata = match client.fetch_metadata(None, METADATA_TIMEOUT) {
            Ok(metadata) => metadata,
            Err(e) => {
                eprintln!("broker fault: reading the metadata: {e}");
                return Ok(None);
            }
        };
        let mut by_leader: BTreeMap<i32, i64> = BTreeMap::new();
        for topic in metadata
            .topics()
            .iter()
            .filter(|t| t.name().starts_with(prefix))
        {
            for partition in topic.partitions() {
                let Ok((_, high)) =
                    client.fetch_watermarks(topic.name(), partition.id(), METADATA_TIMEOUT)
                else {
                    continue;
                };
                let before = self
                    .high
                    .insert((topic.name().to_owned(), partition.id()), high)
                    .unwrap_or(0);
                if partition.leader() >= 0 {
                    *by_leader.entry(partition.leader()).or_default() += (high - before).max(0);
                }
            }
        }
        let total: i64 = by_leader.values().sum();
        Ok(by_leader
            .into_iter()
            .max_by_key(|(_, records)| *records)
            .filter(|_| total > 0)
            .map(|(node, records)| (node, u32::try_from(records * 100 / total).unwrap_or(100))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_state(dir: &Path, node: i32, text: &str) {
        let path = dir
            .join(format!("node-{node}"))
            .join("data/__cluster_metadata-0");
        std::fs::create_dir_all(&path).expect("a directory for the quorum state");
        std::fs::write(path.join("quorum-state"), text).expect("the quorum state written");
    }

    #[test]
    fn the_controller_is_the_leader_of_the_newest_epoch_any_node_knows() {
        let dir = std::env::temp_dir().join(format!("chaos-quorum-{}", uuid::Uuid::new_v4()));
        assert_eq!(controller(&dir), None, "no node has a quorum state yet");
        // Node 1 was the leader of epoch 5 and died: its file still says so. Node 3, a voter
        // of the next election, knows node 2 leads epoch 6; node 2 voted for itself.
        write_state(
            &dir,
            1,
            r#"{"clusterId":"","leaderId":1,"leaderEpoch":5,"votedId":-1,"appliedOffset":0,"currentVoters":[{"voterId":1},{"voterId":2},{"voterId":3}],"data_version":0}"#,
        );
        write_state(
            &dir,
            2,
            r#"{"clusterId":"","leaderId":2,"leaderEpoch":6,"votedId":2,"appliedOffset":0,"data_version":0}"#,
        );
        write_state(
            &dir,
            3,
            r#"{"clusterId":"","leaderId":2,"leaderEpoch":6,"votedId":2,"appliedOffset":0,"data_version":0}"#,
        );
        assert_eq!(controller(&dir), Some(2));
        // During an election no leader is known in the newest epoch (-1): the last known
        // leader is still named, not a node without one.
        write_state(
            &dir,
            3,
            r#"{"clusterId":"","leaderId":-1,"leaderEpoch":7,"votedId":3,"appliedOffset":0,"data_version":0}"#,
        );
        assert_eq!(controller(&dir), Some(2));
        std::fs::remove_dir_all(&dir).expect("the test's directory removed");
    }
}
