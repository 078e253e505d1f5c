//! The HTTP server of the API and of the ops address: hyper's HTTP/1 with bounds on what one
//! client may hold, which `axum::serve` does not set.
//!
//! - A request's head must arrive within [`Limits::header_read_timeout`], counted from the
//!   connection's start for its first request and from the first byte of each later one: a
//!   client that never finishes its headers (a slowloris) is disconnected. (Not hyper's own
//!   header timer: it runs between requests too, which would make it the idle timeout.)
//! - A request must be answered within [`Limits::request_timeout`] (reading its body
//!   included), or it is answered 503 `timeout`. A watch stream's answer is its first
//!   snapshot; its stream is bounded by the watch feed, not here.
//! - A kept-alive connection that is idle (no request in progress, nothing received since
//!   its last answer) for [`Limits::idle_timeout`] is closed, and so is one whose client has
//!   not read its answer for as long (a slow reader: its socket buffer stays full).
//! - At most [`Limits::max_connections`] connections are open at once; one more is closed as
//!   soon as it is accepted, never queued, so that sockets and file descriptors stay for the
//!   database pools and the broker connections.
//! - With TLS ([`super::tls`]), a connection's handshake is part of its first request's head:
//!   it must end within [`Limits::header_read_timeout`]. Every answer over TLS carries
//!   `Strict-Transport-Security`; answers over plain HTTP never do (a browser ignores it there,
//!   and it would promise HTTPS that this address does not serve).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use super::tls::Tls;
use super::ApiError;

/// Connections open now, by `server` (`api`, `ops`).
pub const CONNECTIONS_OPEN: &str = "http_connections_open";
/// Connections closed at once because `HTTP_MAX_CONNECTIONS` were open, by `server`.
pub const CONNECTIONS_REFUSED: &str = "http_connections_refused_total";
/// Connections closed by a timeout, by `server` and `reason` (`header`, `idle`, `stalled`: a
/// client that left its answer unread).
pub const CONNECTIONS_TIMED_OUT: &str = "http_connections_timed_out_total";
/// Requests answered 503 because they took longer than `HTTP_REQUEST_TIMEOUT_MS`, by `server`.
pub const REQUESTS_TIMED_OUT: &str = "http_requests_timed_out_total";
/// TLS handshakes that failed (a client that does not trust the certificate, speaks plain
/// HTTP to the TLS port, or shows no client certificate where one is required), by `server`.
pub const TLS_HANDSHAKES_FAILED: &str = "http_tls_handshakes_failed_total";

pub fn describe_metrics() {
    metrics::describe_gauge!(CONNECTIONS_OPEN, "HTTP connections open now.");
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "HTTP connections closed at once because HTTP_MAX_CONNECTIONS were open."
    );
    metrics::describe_counter!(
        CONNECTIONS_TIMED_OUT,
        "HTTP connections closed by the header-read or idle timeout."
    );
    metrics::describe_counter!(
        REQUESTS_TIMED_OUT,
        "HTTP requests answered 503 after HTTP_REQUEST_TIMEOUT_MS."
    );
    metrics::describe_counter!(
        TLS_HANDSHAKES_FAILED,
        "TLS handshakes of the API that failed or timed out."
    );
}

/// What one client may hold (see the module's documentation).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: u32,
}

/// A refused connection is logged at most this often (each one is counted).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long to wait before accepting again after the listener failed (out of file
/// descriptors, say): a busy loop would only take the CPU from the connections that are open.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `shutdown`, over TLS with `tls`'s certificate in force
/// when each connection starts (else plain HTTP); then stops accepting, asks every open
/// connection to close after the request it serves, and waits for them. `server` names it in
/// logs and metrics.
///
/// # Errors
/// None today: a failed accept is logged and retried; kept as `io::Result` for the caller's
/// one error path.
pub async fn serve(
    server: &'static str,
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    let mut builder = http1::Builder::new();
    // No timer: the header and idle timeouts are this module's (see its documentation).
    builder.keep_alive(true);
    let mut last_refusal_logged: Option<Instant> = None;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error.message = %e, server, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(CONNECTIONS_REFUSED, "server" => server).increment(1);
            if last_refusal_logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
                last_refusal_logged = Some(Instant::now());
                tracing::warn!(
                    server,
                    max = limits.max_connections,
                    "HTTP_MAX_CONNECTIONS connections are open; closing new ones at once"
                );
            }
            // Closed without reading anything: a request on it would cost what the cap saves.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let served = Served {
            server,
            app: app.clone(),
            builder: builder.clone(),
            limits,
            shutdown: shutdown.clone(),
        };
        tokio::spawn(served.connection(stream, tls.as_ref().map(|tls| tls.acceptor()), slot));
    }
    // Every connection gives its slot back when it ends; each was told to close after the
    // request it serves (watch streams end on the shutdown themselves).
    let _ = slots.acquire_many(limits.max_connections).await;
    Ok(())
}

/// What every connection of one server shares.
struct Served {
    server: &'static str,
    app: Router,
    builder: http1::Builder,
    limits: Limits,
    shutdown: CancellationToken,
}

impl Served {
    /// Serves one connection (over TLS with `tls`) until it closes, the idle timeout closes
    /// it, or `shutdown`.
    async fn connection(
        self,
        stream: TcpStream,
        tls: Option<TlsAcceptor>,
        _slot: OwnedSemaphorePermit,
    ) {
        let server = self.server;
        metrics::gauge!(CONNECTIONS_OPEN, "server" => server).increment(1.0);
        let activity = Arc::new(Activity::new());
        let watched = Watched {
            inner: stream,
            activity: activity.clone(),
        };
        match tls {
            None => self.http(watched, activity, false).await,
            Some(acceptor) => {
                // The handshake counts as the first request's head: a client that connects
                // and never finishes it holds a socket as a slowloris does.
                let handshake = tokio::select! {
                    done = tokio::time::timeout(
                        self.limits.header_read_timeout,
                        acceptor.accept(watched),
                    ) => done,
                    () = self.shutdown.cancelled() => Ok(Err(io::ErrorKind::Interrupted.into())),
                };
                match handshake {
                    Ok(Ok(stream)) => self.http(stream, activity, true).await,
                    Ok(Err(e)) => {
                        metrics::counter!(TLS_HANDSHAKES_FAILED, "server" => server).increment(1);
                        tracing::debug!(error.message = %e, server, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics::counter!(TLS_HANDSHAKES_FAILED, "server" => server).increment(1);
                        metrics::counter!(CONNECTIONS_TIMED_OUT, "server" => server, "reason" => "header")
                            .increment(1);
                    }
                }
            }
        }
        metrics::gauge!(CONNECTIONS_OPEN, "server" => server).decrement(1.0);
    }

    /// Serves HTTP/1 on `io` (`tls`: it is a TLS stream) until it closes, the idle timeout
    /// closes it, or `shutdown`.
    async fn http<I>(self, io: I, activity: Arc<Activity>, tls: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            server,
            app,
            builder,
            limits,
            shutdown,
        } = self;
        let io = TokioIo::new(io);
        let service = {
            let activity = activity.clone();
            hyper::service::service_fn(move |request: Request<Incoming>| {
                let in_flight = activity.request_started();
                let app = app.clone();
                async move {
                    let mut response = answer(server, app, request, limits.request_timeout).await;
                    if tls {
                        response.headers_mut().insert(
                            header::STRICT_TRANSPORT_SECURITY,
                            HeaderValue::from_static(super::tls::HSTS),
                        );
                    }
                    // The request counts as in progress until its body is sent (or dropped): a
                    // watch stream is never idle.
                    Ok::<_, std::convert::Infallible>(response.map(|body| TrackedBody {
                        inner: body,
                        _in_flight: in_flight,
                    }))
                }
            })
        };
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let mut closing = false;
        loop {
            // While a request is in progress nothing times out here. A request's start or end
            // and a new head's first byte wake the loop (`changed`) to look again.
            let (at, reason) = activity
                .deadline(&limits)
                .unwrap_or((Instant::now() + limits.idle_timeout, ""));
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(error.message = %e, server, "connection ended with an error");
                    }
                    break;
                }
                () = shutdown.cancelled(), if !closing => {
                    // Between requests (or in the middle of a head) nothing is lost by closing
                    // now; a request in progress is answered first.
                    if activity.deadline(&limits).is_some() {
                        break;
                    }
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
                () = activity.changed.notified() => {}
                () = tokio::time::sleep_until(at) => {
                    let due = activity.deadline(&limits).filter(|(at, _)| *at <= Instant::now());
                    if due.is_some() && !reason.is_empty() {
                        // No request is in progress: closing loses nothing.
                        metrics::counter!(CONNECTIONS_TIMED_OUT, "server" => server, "reason" => reason)
                            .increment(1);
                        break;
                    }
                }
            }
        }
    }
}

/// `app`'s answer to `request`, or `503` when it takes longer than `timeout`.
async fn answer(
    server: &'static str,
    mut app: Router,
    request: Request<Incoming>,
    timeout: Duration,
) -> Response {
    match tokio::time::timeout(timeout, app.call(request.map(Body::new))).await {
        Ok(Ok(response)) => response,
        Ok(Err(never)) => match never {},
        Err(_) => {
            metrics::counter!(REQUESTS_TIMED_OUT, "server" => server).increment(1);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!(
                    "the request took longer than {} ms (HTTP_REQUEST_TIMEOUT_MS)",
                    timeout.as_millis()
                ),
            )
            .into_response()
        }
    }
}

/// What one connection is doing, for its header and idle timeouts.
struct Activity {
    state: Mutex<ActivityState>,
    /// Wakes the connection's loop when its deadline may have moved.
    changed: tokio::sync::Notify,
}

struct ActivityState {
    /// Requests whose answer is not sent yet.
    in_flight: usize,
    /// Requests begun on this connection.
    requests: u64,
    /// Since when the connection waits for its next request: its start, or its last answer.
    waiting_since: Instant,
    /// When the first byte of the next request's head arrived.
    head_started: Option<Instant>,
    /// Since when a write has waited for the client to read (its socket buffer full).
    write_blocked_since: Option<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                requests: 0,
                waiting_since: Instant::now(),
                head_started: None,
                write_blocked_since: None,
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes arrived: between requests, the next head has begun.
    fn received(&self) {
        let mut state = self.state();
        if state.in_flight == 0 && state.head_started.is_none() {
            state.head_started = Some(Instant::now());
            self.changed.notify_one();
        }
    }

    /// A write went through (`true`) or waits for the client to read (`false`).
    fn wrote(&self, through: bool) {
        let mut state = self.state();
        match (through, state.write_blocked_since) {
            (true, Some(_)) => state.write_blocked_since = None,
            (false, None) => {
                state.write_blocked_since = Some(Instant::now());
                self.changed.notify_one();
            }
            _ => {}
        }
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        let mut state = self.state();
        state.in_flight += 1;
        state.requests += 1;
        state.head_started = None;
        self.changed.notify_one();
        InFlight(self.clone())
    }

    /// When the connection is to be closed if nothing happens before, and why (`header`,
    /// `idle` or `stalled`); `None` while a request is in progress and its answer goes out.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, &'static str)> {
        let state = self.state();
        // A client that stopped reading its answer (a watch stream's, say) holds the
        // connection as an idle one does.
        if let Some(blocked) = state.write_blocked_since {
            return Some((blocked + limits.idle_timeout, "stalled"));
        }
        if state.in_flight > 0 {
            return None;
        }
        Some(match state.head_started {
            Some(began) => (began + limits.header_read_timeout, "header"),
            // A new connection's first request is due like a head: a client that connects and
            // sends nothing holds a socket as a slow one does.
            None if state.requests == 0 => {
                (state.waiting_since + limits.header_read_timeout, "header")
            }
            None => (state.waiting_since + limits.idle_timeout, "idle"),
        })
    }
}

/// One request in progress, until its response body is sent or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.waiting_since = Instant::now();
            state.head_started = None;
            self.0.changed.notify_one();
        }
    }
}

/// A response body that holds its request's [`InFlight`].
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's socket that notes when bytes arrive (a head has begun).
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.received();
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.wrote(written.is_ready());
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.wrote(written.is_ready());
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
