//! Free local ports for the services and brokers a test starts as processes, which bind them
//! after the test chose them.
//!
//! A port from `bind(0)` lies in Linux's ephemeral range (32768–60999), and an outgoing
//! connection (to the broker, to PostgreSQL) may take it as its local port between the test's
//! choice and the process's bind: CI saw "Address already in use". These come from below that
//! range, tried in turn from a start of this process's own, each checked by binding it.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u16 = 20_000;
const COUNT: u32 = 12_000;

/// A free port on 127.0.0.1 for a process to bind.
///
/// # Panics
/// When none of the range is free.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// `127.0.0.1` with a [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A free port whose next one is free too (a broker's and its controller's).
///
/// # Panics
/// When no two neighbouring ports of the range are free.
pub fn free_port_pair() -> u16 {
    free_ports(2)
}

/// The first of `count` neighbouring free ports.
fn free_ports(count: u16) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(37);
    for _ in 0..1_000 {
        let n = start.wrapping_add(NEXT.fetch_add(u32::from(count), Ordering::Relaxed));
        let first = FIRST + u16::try_from(n % (COUNT - u32::from(count))).expect("below 12,000");
        if (first..first + count).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return first;
        }
    }
    panic!(
        "no {count} free neighbouring ports between {FIRST} and {}",
        u32::from(FIRST) + COUNT
    );
}
