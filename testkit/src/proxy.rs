//! A TCP proxy that can cut a link the way a network partition does, without root: it
//! forwards every connection to its upstream until [`CutProxy::cut`], then stops forwarding
//! in both directions while keeping every socket open, so that nothing is refused or reset and
//! both ends wait for answers that do not come (as when packets are dropped), until
//! [`CutProxy::heal`], when what waited goes through. A connection made while the link is cut
//! is accepted (by the kernel) but not connected upstream until it heals.
//! [`CutProxy::strand`] cuts only the connections open at that moment, for good: as a server
//! that forgot a connection (its side ended it) while the reset it sent was lost, so that the
//! client's socket stays open and hears nothing, ever; new connections go through.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The proxy, listening on a port of its own on 127.0.0.1; dropping it stops it and closes
/// every connection through it.
#[derive(Debug)]
pub struct CutProxy {
    addr: SocketAddr,
    cut: watch::Sender<Link>,
    accept: JoinHandle<()>,
    /// How many connections the proxy accepted so far.
    accepted: Arc<AtomicU64>,
}

/// What the proxy forwards: nothing while `cut`; never anything of the connections numbered
/// below `stranded_below` (in the order they were accepted).
#[derive(Debug, Clone, Copy, Default)]
struct Link {
    cut: bool,
    stranded_below: u64,
}

impl Link {
    fn forwards(self, connection: u64) -> bool {
        !self.cut && connection >= self.stranded_below
    }
}

impl CutProxy {
    /// A proxy to `upstream`, not cut.
    ///
    /// # Panics
    /// When no port can be bound: the test cannot run.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (cut, watch) = watch::channel(Link::default());
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let accept = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let number = counter.fetch_add(1, Ordering::SeqCst);
                connections.spawn(forward(client, upstream, (watch.clone(), number)));
                // Reap the finished ones so the set does not grow.
                while connections.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            cut,
            accept,
            accepted,
        }
    }

    /// A proxy to the PostgreSQL server of `database_url` (a `postgres://user@host:port/db` URL,
    /// no password), and the same URL through the proxy.
    ///
    /// # Panics
    /// When the URL does not parse: the test cannot run.
    pub async fn to_database(database_url: &str) -> (Self, String) {
        let options: sqlx::postgres::PgConnectOptions =
            database_url.parse().expect("a PostgreSQL URL");
        let upstream: SocketAddr = format!("{}:{}", options.get_host(), options.get_port())
            .parse()
            .expect("the server's address");
        let proxy = Self::start(upstream).await;
        let url = format!(
            "postgres://{}@{}/{}",
            options.get_username(),
            proxy.addr(),
            options.get_database().unwrap_or_default()
        );
        (proxy, url)
    }

    /// Where to connect instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding, both ways, on every connection (the sockets stay open).
    pub fn cut(&self) {
        self.cut.send_modify(|link| link.cut = true);
    }

    /// Forwards again, what waited first (not on stranded connections).
    pub fn heal(&self) {
        self.cut.send_modify(|link| link.cut = false);
    }

    /// Stops forwarding for good, both ways, on every connection accepted so far (their sockets
    /// stay open); connections accepted later are forwarded.
    pub fn strand(&self) {
        let accepted = self.accepted.load(Ordering::SeqCst);
        self.cut.send_modify(|link| link.stranded_below = accepted);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        // The connections' tasks are the accept task's JoinSet's: aborted with it.
        self.accept.abort();
    }
}

/// The link as one connection sees it: the proxy's state, and the connection's number.
type Watch = (watch::Receiver<Link>, u64);

/// Forwards one connection through `cut`, once the link is whole.
async fn forward(client: TcpStream, upstream: SocketAddr, mut cut: Watch) {
    if !whole(&mut cut).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, cut.clone()),
        pump(server_read, client_write, cut),
    );
}

/// Waits until the link is not cut for this connection (never, once it is stranded); `false`
/// when the proxy is gone.
async fn whole((cut, connection): &mut Watch) -> bool {
    let connection = *connection;
    cut.wait_for(|link| link.forwards(connection)).await.is_ok()
}

/// Copies `from` to `to` while the link is whole. Nothing is read while it is cut, so the
/// sender's data waits in the kernel's buffers (and its writes block once they are full); a
/// chunk read just before a cut waits for the heal.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: Watch,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if !whole(&mut cut).await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            // Cut while waiting to read: stop reading.
            changed = cut.0.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if !whole(&mut cut).await || to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A server that sends back what it gets, on every connection.
    async fn echo_server() -> SocketAddr {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        upstream
    }

    /// An echo server's answers stop at the cut, the socket staying open, and come after the
    /// heal.
    #[tokio::test]
    async fn a_cut_link_stays_open_and_silent_until_healed() {
        let proxy = CutProxy::start(echo_server().await).await;
        let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
        let mut answer = [0u8; 4];
        client.write_all(b"ping").await.expect("write");
        client.read_exact(&mut answer).await.expect("echo");
        assert_eq!(&answer, b"ping");

        proxy.cut();
        client.write_all(b"pong").await.expect("write while cut");
        let silent =
            tokio::time::timeout(Duration::from_millis(300), client.read_exact(&mut answer)).await;
        assert!(silent.is_err(), "no answer through a cut link");

        proxy.heal();
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut answer))
            .await
            .expect("the answer after the heal")
            .expect("read");
        assert_eq!(&answer, b"pong");
    }

    /// A stranded connection hears nothing, for good; one made after it is forwarded.
    #[tokio::test]
    async fn a_stranded_connection_stays_silent_and_a_new_one_goes_through() {
        let proxy = CutProxy::start(echo_server().await).await;
        let mut old = TcpStream::connect(proxy.addr()).await.expect("connect");
        let mut answer = [0u8; 4];
        old.write_all(b"ping").await.expect("write");
        old.read_exact(&mut answer).await.expect("echo");

        proxy.strand();
        old.write_all(b"pong").await.expect("write while stranded");
        let silent =
            tokio::time::timeout(Duration::from_millis(300), old.read_exact(&mut answer)).await;
        assert!(silent.is_err(), "no answer on a stranded connection");
        proxy.heal();
        let silent =
            tokio::time::timeout(Duration::from_millis(300), old.read_exact(&mut answer)).await;
        assert!(
            silent.is_err(),
            "a heal does not revive a stranded connection"
        );

        let mut new = TcpStream::connect(proxy.addr())
            .await
            .expect("connect again");
        new.write_all(b"ping").await.expect("write");
        tokio::time::timeout(Duration::from_secs(5), new.read_exact(&mut answer))
            .await
            .expect("the new connection's echo")
            .expect("read");
        assert_eq!(&answer, b"ping");
    }
}
