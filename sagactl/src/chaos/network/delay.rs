//! A slow link without `netem`: the packets a host sends go to an NFQUEUE of its namespace,
//! and a thread of this process, living on that host, lets each one pass (`accept`) once its
//! delay is over. The kernel holds the packet meanwhile; the thread holds only its id.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;

use super::{enter, Host, NetworkError};

/// How many packets the kernel queues for the thread before it lets more pass undelayed
/// (`--queue-bypass` makes a full queue fail open): enough for seconds of a busy host.
const QUEUE_MAX_LEN: u32 = 65_536;

/// How long the thread sleeps when nothing has arrived and nothing is due.
const IDLE_SLEEP: Duration = Duration::from_micros(200);

/// A running delay; dropping it lets what it holds pass and ends its thread.
pub struct Delay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Delay {
    /// Binds queue `queue` on `host` and starts holding what arrives there for `delay`, give or
    /// take up to `jitter`. Returns once the queue is bound.
    pub fn start(
        host: &Host,
        queue: u16,
        delay: Duration,
        jitter: Duration,
    ) -> Result<Self, NetworkError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (bound, bound_rx) = mpsc::channel();
        let thread = {
            let host = host.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let opened = enter(&host).and_then(|()| {
                    open(queue).map_err(|source| NetworkError::Delay {
                        host: host.name.clone(),
                        source,
                    })
                });
                match opened {
                    Ok(nfq) => {
                        let _ = bound.send(Ok(()));
                        if let Err(e) = hold(nfq, &stop, delay, jitter) {
                            tracing::warn!(error.message = %messaging::Chain(&e), host = %host.name, "the delay queue ended; the host's packets now pass undelayed");
                        }
                    }
                    Err(e) => {
                        let _ = bound.send(Err(e));
                    }
                }
            })
        };
        let delay = Self {
            stop,
            thread: Some(thread),
        };
        match bound_rx.recv() {
            Ok(Ok(())) => Ok(delay),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NetworkError::Delay {
                host: host.name.clone(),
                source: std::io::Error::other("the delay thread ended before binding its queue"),
            }),
        }
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open(queue: u16) -> std::io::Result<nfq::Queue> {
    let mut nfq = nfq::Queue::open()?;
    keep_from_children()?;
    nfq.bind(queue)?;
    // The verdict needs only the packet's id: no payload is copied to this process.
    nfq.set_copy_range(queue, 0)?;
    nfq.set_queue_max_len(queue, QUEUE_MAX_LEN)?;
    nfq.set_fail_open(queue, true)?;
    nfq.set_nonblocking(true);
    Ok(nfq)
}

/// Marks every descriptor of this process but the standard three close-on-exec. The queue's
/// netlink socket is opened without the mark (the `nfq` crate does not set it, nor give the
/// descriptor out), so a process the run starts while a host is slow (a service restarted
/// after a kill, a broker node, PostgreSQL) would inherit it, keep the queue bound after the
/// delay ended, and make the next bind of that queue fail with EPERM (the long run met it at its
/// third slow fault). Everything else this process opens is close-on-exec already.
fn keep_from_children() -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
            .filter(|fd| *fd > 2)
        else {
            continue;
        };
        match fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
            // Closed meanwhile (the listing's own descriptor, among others).
            Ok(_) | Err(nix::errno::Errno::EBADF) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Until `stop`: takes what arrives, lets each packet pass when its time is due (in the order of
/// their times, so jitter reorders them as a real link's would), then lets the rest pass.
fn hold(
    mut nfq: nfq::Queue,
    stop: &AtomicBool,
    delay: Duration,
    jitter: Duration,
) -> std::io::Result<()> {
    let mut rng = rand::thread_rng();
    // By due time, then arrival (a sequence number keeps equal times apart).
    let mut held: BTreeMap<(Instant, u64), nfq::Message> = BTreeMap::new();
    let mut arrivals = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut idle = true;
        loop {
            match nfq.recv() {
                Ok(mut message) => {
                    idle = false;
                    arrivals += 1;
                    let spread = if jitter.is_zero() {
                        0.0
                    } else {
                        rng.gen_range(-1.0..=1.0)
                    };
                    let wait = delay.as_secs_f64() + spread * jitter.as_secs_f64();
                    let due = Instant::now() + Duration::from_secs_f64(wait.max(0.0));
                    message.set_verdict(nfq::Verdict::Accept);
                    held.insert((due, arrivals), message);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        while let Some(entry) = held.first_entry() {
            if entry.key().0 > now {
                break;
            }
            idle = false;
            nfq.verdict(entry.remove())?;
        }
        if idle {
            std::thread::sleep(IDLE_SLEEP);
        }
    }
    for (_, message) in held {
        nfq.verdict(message)?;
    }
    Ok(())
}
