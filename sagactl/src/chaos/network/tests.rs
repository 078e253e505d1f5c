//! The network's hosts and faults, on real namespaces (root only: the suite runs as root).
//! Each test makes a network of its own: a random prefix and subnet, so that tests run side by
//! side.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::Network;

const PORT: u16 = 7_000;

fn network() -> Network {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the network tests make namespaces: run them as root"
    );
    // Apart from the other tests of this process (a counter) and from other processes (the
    // pid); subnets 10.231.0.0/24 and 10.231.1.0/24 are left to other users of the range, 96
    // to 99 to the tests that choose theirs, and 100 and up to the chaos runs (`free_subnet`),
    // which may run beside the tests.
    static MADE: AtomicU32 = AtomicU32::new(0);
    let n = std::process::id().wrapping_mul(7) + MADE.fetch_add(1, Ordering::Relaxed);
    let prefix = format!("t{:05x}", n % 0x10_0000);
    let subnet = u8::try_from(2 + n % 94).expect("below 96");
    Network::create(&prefix, subnet, &["a", "b"]).expect("a network of two hosts")
}

/// An echo server on host `b`: answers each byte it reads with the same byte, one
/// connection after another.
fn echo_on_b(network: &Network) -> SocketAddr {
    let addr = SocketAddr::from((network.host("b").expect("host b").addr, PORT));
    let (ready, listening) = std::sync::mpsc::channel();
    let _server = network
        .spawn_on("b", move || {
            let listener = TcpListener::bind(addr).expect("listen on b");
            ready.send(()).expect("the test waits");
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || echo(stream));
            }
        })
        .expect("host b");
    listening.recv().expect("the server listens");
    addr
}

fn echo(mut stream: TcpStream) {
    let mut byte = [0u8; 1];
    while matches!(stream.read(&mut byte), Ok(1)) {
        if stream.write_all(&byte).is_err() {
            return;
        }
    }
}

/// From host `a`: connects to `addr` (within `timeout`) and times `rounds` one-byte round
/// trips; `None` when it cannot connect.
fn round_trips_from_a(
    network: &Network,
    addr: SocketAddr,
    timeout: Duration,
    rounds: usize,
) -> Option<Vec<Duration>> {
    network
        .spawn_on("a", move || {
            let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
            stream.set_nodelay(true).ok()?;
            let mut times = Vec::with_capacity(rounds);
            let mut byte = [7u8; 1];
            for _ in 0..rounds {
                let started = Instant::now();
                stream.write_all(&byte).ok()?;
                stream.read_exact(&mut byte).ok()?;
                times.push(started.elapsed());
            }
            Some(times)
        })
        .expect("host a")
        .join()
        .expect("the client thread")
        .expect("entered host a")
}

#[test]
fn hosts_reach_each_other_only_on_the_bridge_and_not_across_a_cut_until_healed() {
    let mut network = network();
    let addr = echo_on_b(&network);
    let second = Duration::from_secs(1);
    assert!(round_trips_from_a(&network, addr, second, 3).is_some());
    // The address is b's alone: this process's own network does not have it, the bridge
    // takes it there.
    assert!(TcpStream::connect_timeout(&addr, second).is_ok());

    network.cut("a", "b").expect("cut a from b");
    assert_eq!(round_trips_from_a(&network, addr, second, 1), None);
    network.heal().expect("heal");
    assert!(round_trips_from_a(&network, addr, second, 1).is_some());

    network.partition(&["a"], &["b"]).expect("partition");
    assert_eq!(round_trips_from_a(&network, addr, second, 1), None);
    network.heal().expect("heal");
    assert!(round_trips_from_a(&network, addr, second, 1).is_some());
}

#[test]
fn a_slow_host_holds_what_it_sends_for_the_delay_and_a_healed_one_does_not() {
    let mut network = network();
    let addr = echo_on_b(&network);
    let second = Duration::from_secs(2);
    network
        .slow("a", Duration::from_millis(40), Duration::from_millis(5))
        .expect("slow a");
    let slow = round_trips_from_a(&network, addr, second, 20).expect("connects while slow");
    // Only a's packets wait: a round trip is the delay, give or take the jitter.
    let fastest = slow.iter().min().expect("round trips");
    assert!(
        *fastest >= Duration::from_millis(34),
        "fastest round trip {fastest:?}"
    );
    network.heal().expect("heal");
    let fast = round_trips_from_a(&network, addr, second, 20).expect("connects once healed");
    let median = {
        let mut fast = fast;
        fast.sort();
        fast[fast.len() / 2]
    };
    assert!(
        median < Duration::from_millis(20),
        "median round trip once healed {median:?}"
    );
}

#[test]
fn a_lossy_host_loses_about_its_share_of_what_it_receives() {
    let network = network();
    let b = network.host("b").expect("host b").addr;
    network.lossy("b", 30.0).expect("lossy b");
    let (ready, bound) = std::sync::mpsc::channel();
    let receiver = network
        .spawn_on("b", move || {
            let socket = UdpSocket::bind((b, PORT)).expect("bind on b");
            socket
                .set_read_timeout(Some(Duration::from_millis(500)))
                .expect("a timeout");
            ready.send(()).expect("the test waits");
            let mut received = 0;
            let mut buffer = [0u8; 16];
            while socket.recv(&mut buffer).is_ok() {
                received += 1;
            }
            received
        })
        .expect("host b");
    bound.recv().expect("the receiver is bound");
    let sent = 2_000;
    network
        .spawn_on("a", move || {
            let socket = UdpSocket::bind(("0.0.0.0", 0)).expect("bind on a");
            for _ in 0..sent {
                socket.send_to(b"x", (b, PORT)).expect("send");
                std::thread::sleep(Duration::from_micros(50));
            }
        })
        .expect("host a")
        .join()
        .expect("the sender")
        .expect("entered host a");
    let received = receiver.join().expect("the receiver").expect("entered b");
    // 30% of 2,000: 600 lost, expected; 480 to 720 holds with overwhelming odds.
    let lost = sent - received;
    assert!((480..=720).contains(&lost), "lost {lost} of {sent}");
}

/// No namespace of a network with `prefix` is left, and no bridge.
fn assert_nothing_left(prefix: &str) {
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.contains(&format!("{prefix}-")),
        "left: {namespaces}"
    );
    let bridge = std::process::Command::new("ip")
        .args(["link", "show", &format!("{prefix}br")])
        .output()
        .expect("ip link show");
    assert!(!bridge.status.success(), "the bridge is left");
}

#[test]
fn a_dropped_network_leaves_no_namespace_and_no_bridge() {
    let network = network();
    let prefix = network.prefix.clone();
    drop(network);
    assert_nothing_left(&prefix);
}

#[test]
fn a_command_runs_on_its_host_and_sweep_removes_what_a_killed_run_left() {
    let network = network();
    let prefix = network.prefix.clone();
    let b = network.host("b").expect("host b").addr;
    let shown = network
        .command("b", "ip")
        .expect("host b")
        .args(["-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .expect("ip addr on b");
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!("inet {b}/24")), "{shown}");
    // As a SIGKILLed run leaves it: never dropped.
    std::mem::forget(network);
    Network::sweep(&prefix);
    assert_nothing_left(&prefix);
}

#[test]
fn a_host_slowed_again_binds_its_queue_though_a_process_started_meanwhile_still_runs() {
    let mut network = network();
    let delay = Duration::from_millis(1);
    network.slow("a", delay, Duration::ZERO).expect("slowed");
    // As a service restarted during a slow fault: it lives on after the heal.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    network.heal().expect("healed");
    let again = network.slow("a", delay, Duration::ZERO);
    let _ = child.kill();
    let _ = child.wait();
    again.expect("the queue bound again");
}

#[test]
fn a_network_whose_maker_is_gone_is_swept_and_this_process_s_is_not() {
    // A pid no process has: above the kernel's largest (2^22).
    let gone = 4_194_400_u32;
    assert!(!std::path::Path::new(&format!("/proc/{gone}")).exists());
    let orphan_prefix = format!("n{}", super::base36(gone));
    let orphan = Network::create(&orphan_prefix, 97, &["a"]).expect("the orphan");
    std::mem::forget(orphan);
    let mine = Network::create(&Network::prefix_of_this_process(), 98, &["a"]).expect("mine");
    Network::sweep_orphans();
    assert_nothing_left(&orphan_prefix);
    assert!(mine.host("a").is_ok());
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let mine_netns = &mine.host("a").expect("host a").netns;
    assert!(
        String::from_utf8_lossy(&namespaces.stdout).contains(mine_netns.as_str()),
        "this process's network was swept"
    );
    assert_eq!(super::base36(0), "0");
    assert_eq!(super::base36(36 * 36 + 35), "10z");
}

#[test]
fn a_bad_prefix_or_host_is_refused_with_its_name() {
    let error = Network::create("Bad-", 3, &["a"]).err().expect("refused");
    assert!(error.to_string().contains("`Bad-`"), "{error}");
    let network = network();
    let error = network.cut("a", "nowhere").expect_err("no such host");
    assert_eq!(error.to_string(), "no host named `nowhere` in this network");
}

#[test]
fn a_link_names_its_network_exactly() {
    use super::{bridge_of, host_link, network_of_link};
    // Base 36 prefixes hold an `h` of their own; the network is before the last one.
    for prefix in ["n1h", "nhh", "n5kq"] {
        assert_eq!(network_of_link(&bridge_of(prefix)), Some(prefix));
        assert_eq!(network_of_link(&host_link(prefix, 12)), Some(prefix));
    }
    // One network's links are not another's whose prefix starts like it.
    assert_ne!(network_of_link(&host_link("n1hh", 3)), Some("n1h"));
    for other in ["lo", "ifb0", "n1h", "n1hx"] {
        assert_eq!(network_of_link(other), None, "{other}");
    }
}
