//! Network hosts on this machine, for chaos runs whose faults are the network's: every host a
//! Linux network namespace of its own, joined to the others by one bridge, with addresses that
//! exist only inside this machine (`10.231.<subnet>.0/24`; the bridge itself is `.1`, so that
//! the process that made the network reaches every host). Nothing is routed anywhere else.
//!
//! The faults are packet rules in a host's namespace, so that they hit whatever runs there (a
//! broker, PostgreSQL, a service) without its knowing:
//! - [`Network::cut`] drops what one host sends another (one direction; [`Network::partition`]
//!   both), with nftables;
//! - [`Network::lossy`] drops a share of what a host receives, at random (nftables' `numgen`;
//!   on arrival, because a packet dropped on its way out fails the sender's call with `EPERM`,
//!   which no lossy link does);
//! - [`Network::slow`] holds each packet a host sends for a delay with jitter: this kernel has
//!   no `netem` queueing discipline (`CONFIG_NET_SCH_NETEM` is not set, and no modules load), so
//!   the packets go through an NFQUEUE to a thread of this process that lets each one pass when
//!   its time has come ([`delay`]).
//!
//! [`Network::heal`] removes every fault; dropping the [`Network`] removes the namespaces, their
//! links and the bridge, also when a run fails (a run killed with SIGKILL leaves them: `ip netns
//! list` shows them by their prefix, and [`Network::sweep`] removes them).
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` (iproute2), `nft` and `iptables`.

mod delay;
pub mod stack;
#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use delay::Delay;

/// Why the network, or a fault on it, could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("no host named `{0}` in this network")]
    UnknownHost(String),
    #[error("a network's prefix is 1 to 6 lowercase letters and digits, not `{0}`")]
    Prefix(String),
    #[error("a network has at most 200 hosts")]
    TooManyHosts,
    #[error("every subnet of 10.231.100-250.0/24 is taken on this machine")]
    NoFreeSubnet,
    #[error("entering the network namespace {netns}")]
    Enter {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the delay queue of host {host}")]
    Delay {
        host: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = NetworkError> = std::result::Result<T, E>;

/// One host: a network namespace with one link to the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// The namespace's name (`ip netns`), `<prefix>-<name>`.
    pub netns: String,
    /// Its address on the bridge.
    pub addr: Ipv4Addr,
}

impl Host {
    /// The namespace's file, which `setns` enters.
    fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }
}

/// Hosts joined by one bridge; see the module's documentation.
pub struct Network {
    prefix: String,
    bridge: String,
    subnet: u8,
    hosts: Vec<Host>,
    /// The delay threads of the hosts [`Network::slow`] slowed, by host index.
    delays: Vec<(usize, Delay)>,
}

/// The NFQUEUE number a slowed host's packets go to (queues are per namespace).
///
/// Each slowing takes the next number: a queue stays bound while any process holds the socket
/// that bound it, and a process started elsewhere in this process at the moment a queue's
/// socket was opened (before it was marked close-on-exec: `delay.rs`) inherits it, so binding
/// the same number again could fail with EPERM until that process ends.
fn next_delay_queue() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(7);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .max(1)
}

impl Network {
    /// A bridge `<prefix>br` with `10.231.<subnet>.1/24`, and for each name a namespace
    /// `<prefix>-<name>` whose `eth0` has `10.231.<subnet>.<10 + i>` (`lo` up too), with an
    /// empty nftables table `inet chaos` (chains `input` and `output`) for the faults.
    ///
    /// # Errors
    /// When a command fails (not root, a name taken); what was made so far is removed.
    pub fn create(prefix: &str, subnet: u8, names: &[&str]) -> Result<Self> {
        let valid = (1..=6).contains(&prefix.len())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid {
            return Err(NetworkError::Prefix(prefix.to_owned()));
        }
        if names.len() > 200 {
            return Err(NetworkError::TooManyHosts);
        }
        let mut network = Self {
            prefix: prefix.to_owned(),
            bridge: bridge_of(prefix),
            subnet,
            hosts: Vec::new(),
            delays: Vec::new(),
        };
        // Dropped on an error: what exists so far is removed.
        let bridge = network.bridge.clone();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", network.gateway()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for (i, name) in names.iter().enumerate() {
            network.add_host(i, name)?;
        }
        Ok(network)
    }

    fn add_host(&mut self, i: usize, name: &str) -> Result<()> {
        let index = u8::try_from(10 + i).map_err(|_| NetworkError::TooManyHosts)?;
        let host = Host {
            name: name.to_owned(),
            netns: format!("{}-{name}", self.prefix),
            addr: Ipv4Addr::new(10, 231, self.subnet, index),
        };
        ip(&["netns", "add", &host.netns])?;
        self.hosts.push(host.clone());
        let link = host_link(&self.prefix, i);
        ip(&[
            "link",
            "add",
            &link,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &host.netns,
        ])?;
        ip(&["link", "set", &link, "master", &self.bridge, "up"])?;
        let addr = format!("{}/24", host.addr);
        ip(&["-n", &host.netns, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", &host.netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &host.netns, "link", "set", "lo", "up"])?;
        nft(&host, "add table inet chaos")?;
        nft(
            &host,
            "add chain inet chaos input { type filter hook input priority 0; }",
        )?;
        nft(
            &host,
            "add chain inet chaos output { type filter hook output priority 0; }",
        )
    }

    /// The bridge's own address: how the process that made the network reaches its hosts.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.subnet, 1)
    }

    /// # Errors
    /// [`NetworkError::UnknownHost`].
    pub fn host(&self, name: &str) -> Result<&Host> {
        self.index(name).map(|i| &self.hosts[i])
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.hosts
            .iter()
            .position(|h| h.name == name)
            .ok_or_else(|| NetworkError::UnknownHost(name.to_owned()))
    }

    /// `program` to be run on host `name` (`ip netns exec`); add its arguments and spawn it.
    ///
    /// # Errors
    /// [`NetworkError::UnknownHost`].
    #[cfg(test)]
    pub fn command(&self, name: &str, program: impl AsRef<OsStr>) -> Result<Command> {
        Ok(on_host(&self.host(name)?.netns, program))
    }

    /// Runs `work` on a thread of this process that lives on host `name`: the sockets it opens
    /// are the host's. (The tests' clients and servers; a run's processes are programs.)
    ///
    /// # Errors
    /// [`NetworkError::UnknownHost`]; entering the namespace fails in the thread, and is its
    /// result's error.
    #[cfg(test)]
    pub fn spawn_on<T: Send + 'static>(
        &self,
        name: &str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let host = self.host(name)?.clone();
        Ok(std::thread::spawn(move || {
            enter(&host)?;
            Ok(work())
        }))
    }

    /// Drops every packet host `from` sends host `to` (at `to`, as it arrives). TCP needs both
    /// directions, so a connection between them stalls either way; a datagram from `to` to
    /// `from` still arrives.
    ///
    /// # Errors
    /// [`NetworkError::UnknownHost`], or the rule is refused.
    pub fn cut(&self, from: &str, to: &str) -> Result<()> {
        let from = self.host(from)?;
        let to = self.host(to)?;
        nft(
            to,
            &format!("add rule inet chaos input ip saddr {} drop", from.addr),
        )
    }

    /// Cuts every host of `side` from every host of `other`, both ways.
    ///
    /// # Errors
    /// As [`Network::cut`].
    pub fn partition(&self, side: &[&str], other: &[&str]) -> Result<()> {
        for a in side {
            for b in other {
                self.cut(a, b)?;
                self.cut(b, a)?;
            }
        }
        Ok(())
    }

    /// Drops `percent` of what host `name` receives, each packet at random (to a tenth of a
    /// percent), silently as a lossy link does.
    ///
    /// # Errors
    /// As [`Network::cut`].
    pub fn lossy(&self, name: &str, percent: f64) -> Result<()> {
        let host = self.host(name)?;
        // Whole tenths of a percent, within 0..=1000: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let permille = (percent.clamp(0.0, 100.0) * 10.0).round() as u32;
        nft(
            host,
            &format!("add rule inet chaos input numgen random mod 1000 < {permille} drop"),
        )
    }

    /// Holds every packet host `name` sends for `delay`, give or take up to `jitter` (uniform),
    /// until [`Network::heal`]. Slowing a slowed host again changes its delay.
    ///
    /// # Errors
    /// As [`Network::cut`], or the delay queue cannot be opened.
    pub fn slow(&mut self, name: &str, delay: Duration, jitter: Duration) -> Result<()> {
        let i = self.index(name)?;
        let host = self.hosts[i].clone();
        if let Some(at) = self.delays.iter().position(|(h, _)| *h == i) {
            // Only the delay's rule is in the host's iptables.
            iptables(&host, &["-F", "OUTPUT"])?;
            self.delays.remove(at);
        }
        // The queue is bound before packets are sent to it. `--queue-bypass`: should the thread
        // end, the host's packets pass undelayed rather than not at all.
        let number = next_delay_queue();
        let queue = Delay::start(&host, number, delay, jitter)?;
        self.delays.push((i, queue));
        iptables(
            &host,
            &[
                "-A",
                "OUTPUT",
                "-j",
                "NFQUEUE",
                "--queue-num",
                &number.to_string(),
                "--queue-bypass",
            ],
        )
    }

    /// Removes every fault: the rules of every host, and the delays (what they hold is let
    /// through at once).
    ///
    /// # Errors
    /// When a host's rules cannot be flushed.
    pub fn heal(&mut self) -> Result<()> {
        for host in &self.hosts {
            nft(host, "flush table inet chaos")?;
            iptables(host, &["-F", "OUTPUT"])?;
        }
        self.delays.clear();
        Ok(())
    }

    /// Removes what a network with `prefix` left behind (a run killed before its drop): the
    /// processes still running on its hosts (SIGKILL), its namespaces, its links and its bridge.
    pub fn sweep(prefix: &str) {
        for netns in namespaces().filter(|netns| netns.starts_with(&format!("{prefix}-"))) {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &netns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = ip(&["netns", "del", &netns]);
        }
        for link in links().filter(|link| network_of_link(link) == Some(prefix)) {
            let _ = ip(&["link", "del", &link]);
        }
    }

    /// A prefix that names the process making the network (`n` and its pid in base 36), so
    /// that [`Network::sweep_orphans`] can tell a network whose maker is gone.
    pub fn prefix_of_this_process() -> String {
        format!("n{}", base36(std::process::id()))
    }

    /// Sweeps every network a run made with [`Network::prefix_of_this_process`] and left
    /// behind when it was killed: those whose maker no longer runs.
    pub fn sweep_orphans() {
        // Found by their namespaces (`<prefix>-<host>`) or, once those are gone, their links.
        let orphans: std::collections::BTreeSet<String> = namespaces()
            .filter_map(|netns| netns.split_once('-').map(|(prefix, _)| prefix.to_owned()))
            .chain(links().filter_map(|link| network_of_link(&link).map(str::to_owned)))
            .filter(|prefix| {
                let Some(pid) = prefix
                    .strip_prefix('n')
                    .and_then(|digits| u32::from_str_radix(digits, 36).ok())
                else {
                    return false;
                };
                let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
                gone && *prefix == format!("n{}", base36(pid))
            })
            .collect();
        for prefix in orphans {
            eprintln!("removing network {prefix}, left by a run that was killed");
            Self::sweep(&prefix);
        }
    }
}

/// The bridge of the network `prefix`.
fn bridge_of(prefix: &str) -> String {
    format!("{prefix}br")
}

/// The host end of the link of the network `prefix`'s host `i`.
fn host_link(prefix: &str, i: usize) -> String {
    format!("{prefix}h{i}")
}

/// The network a link belongs to, when it is one of [`bridge_of`] or [`host_link`]: the
/// prefix before the `br`, or before the last `h` when only digits follow it (base 36 digits
/// are letters too, `h` among them).
fn network_of_link(link: &str) -> Option<&str> {
    if let Some(prefix) = link.strip_suffix("br") {
        return Some(prefix);
    }
    let (prefix, n) = link.rsplit_once('h')?;
    (!n.is_empty() && n.chars().all(|c| c.is_ascii_digit())).then_some(prefix)
}

/// What `ip args` prints (nothing when it fails).
fn ip_listing(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

/// The names of this machine's network interfaces (without a veth's `@peer`).
fn links() -> impl Iterator<Item = String> {
    ip_listing(&["-o", "link", "show"])
        .lines()
        .filter_map(|line| {
            let name = line.split(": ").nth(1)?;
            Some(name.split('@').next().unwrap_or(name).to_owned())
        })
        .collect::<Vec<_>>()
        .into_iter()
}

/// The names of this machine's network namespaces.
fn namespaces() -> impl Iterator<Item = String> {
    ip_listing(&["netns", "list"])
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect::<Vec<_>>()
        .into_iter()
}

/// `n` in base 36, lowercase: at most 7 digits for a `u32`, 5 for any Linux pid (below 2^22).
fn base36(mut n: u32) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(char::from_digit(n % 36, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.iter().rev().collect()
}

impl Drop for Network {
    /// The delays end first (their threads are in the namespaces), then every namespace goes
    /// (with its end of its link, which takes the other end along), then the bridge.
    fn drop(&mut self) {
        self.delays.clear();
        for (i, host) in self.hosts.iter().enumerate() {
            if let Err(e) = ip(&["netns", "del", &host.netns]) {
                tracing::warn!(error.message = %messaging::Chain(&e), netns = %host.netns, "removing a host");
            }
            // The namespace's end of the link takes this end along only once the kernel frees
            // the namespace, which sockets its killed processes left behind can hold for
            // minutes (seen after a run stopped by a signal): remove this end now.
            let _ = ip(&["link", "del", &host_link(&self.prefix, i)]);
        }
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            tracing::warn!(error.message = %messaging::Chain(&e), bridge = %self.bridge, "removing the bridge");
        }
    }
}

/// `program` to be run in network namespace `netns` (`ip netns exec`, which execs it: the
/// child's pid is the program's).
pub fn on_host(netns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns]).arg(program);
    command
}

/// The first of `10.231.100-250.0/24` that no interface of this machine has an address in, for
/// a network of a run that was given none.
///
/// # Errors
/// When `ip` fails, or every one is taken.
pub fn free_subnet() -> Result<u8> {
    let mut list = Command::new("ip");
    list.args(["-4", "-o", "addr", "show"]);
    let shown = format!("{list:?}");
    let out = list.output().map_err(|source| NetworkError::Spawn {
        command: shown,
        source,
    })?;
    let taken = String::from_utf8_lossy(&out.stdout);
    (100..=250)
        .find(|subnet| !taken.contains(&format!(" 10.231.{subnet}.")))
        .ok_or(NetworkError::NoFreeSubnet)
}

/// Moves the calling thread onto `host`'s network.
fn enter(host: &Host) -> Result<()> {
    let entered = File::open(host.netns_path())
        .and_then(|file| setns(file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
    entered.map_err(|source| NetworkError::Enter {
        netns: host.netns.clone(),
        source,
    })
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn nft(host: &Host, rule: &str) -> Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", &host.netns, "nft"])
        .arg(rule))
}

fn iptables(host: &Host, args: &[&str]) -> Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", &host.netns, "iptables"])
        .args(args))
}

fn run(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let out = command.output().map_err(|source| NetworkError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Failed {
            command: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}
