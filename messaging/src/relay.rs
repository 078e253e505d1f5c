//! The outbox relay: publishes outbox rows in id order and deletes them only after the broker
//! acknowledged them.
//!
//! Rows are claimed with `FOR UPDATE SKIP LOCKED` inside the transaction that later deletes
//! them, so several relays (several instances of one service) never publish the same row at
//! the same time, and a relay that dies mid-batch leaves its rows for the next one. A batch is
//! bounded by rows (`OUTBOX_BATCH_SIZE`) and by bytes (`OUTBOX_BATCH_MAX_BYTES`; its first row
//! goes whatever its size), so a run of large rows (dead-letter copies of up to 900 KiB) cannot
//! take hundreds of megabytes.
//!
//! **Progress per destination.** A row that is acknowledged is deleted; a row the broker
//! refuses for good (too large, invalid) is moved to `outbox_parked`; a row that fails for a
//! passing reason (its topic deleted or not created yet, not enough replicas, no
//! acknowledgement within `OUTBOX_ACK_WAIT_MS`, or within a quarter of it once the broker
//! acknowledged the batch's other records) stays, and its topic counts as *failing*: the
//! relay claims no more rows for it while the others go on, and retries it alone with a
//! backoff of its own (100 ms doubling to `OUTBOX_DESTINATION_BACKOFF_MAX_MS`) by publishing
//! a copy of its oldest row (a probe; the row itself goes out again in order once the
//! destination answers, and consumers drop the copy by message id). Once it answers, its rows
//! are claimed again from the oldest.
//!
//! **Order per key.** Rows of one (topic, key) go out in id order and never overtake each
//! other: in a batch, a row is handed to the producer only after the previous row of its
//! (topic, key) was acknowledged (rows of distinct keys go together, so a batch with one row
//! per key is one round trip, as before), and a row whose predecessor did not go out waits
//! with it. A failing destination's rows all wait, so when it comes back they start from the
//! oldest. A producer that failed fatally is replaced, and blames no destination.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureRecord, Producer as _};

use crate::access::Refusal;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{FaultConfig, KafkaConfig, RelayConfig};
use crate::db::KeptConnection;
use crate::outbox::NOTIFY_CHANNEL;
use crate::Result;
use crate::{kafka, telemetry};

/// The first retry of a failing destination comes within this; each one after doubles it, up
/// to `OUTBOX_DESTINATION_BACKOFF_MAX_MS`.
const DESTINATION_BACKOFF_BASE: Duration = Duration::from_millis(100);

pub struct Relay {
    pool: PgPool,
    /// The connection of the last batch that ended well, for the next.
    connection: KeptConnection,
    kafka: KafkaConfig,
    producer: kafka::Producer,
    schema: String,
    config: RelayConfig,
    faults: FaultConfig,
    /// Rows published by this relay so far (for fault injection).
    published: u64,
    fatal_error_injected: bool,
    /// Notified by this process's consumer after each commit, and by a probe that finished.
    outbox_written: Arc<Notify>,
    /// The destinations that failed and wait for their next try.
    destinations: Destinations,
    /// The probe of one failing destination, when one runs.
    probe: Option<JoinHandle<(String, ProbeOutcome)>>,
    /// The longest wait for one database call (`DATABASE_CALL_TIMEOUT_MS`).
    call_timeout: Duration,
}

/// An outbox row claimed for publishing.
struct OutboxRow {
    id: i64,
    topic: String,
    message_key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: serde_json::Value,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// A claimed row, and how many rows its claim locked (more than it returned when the byte
/// bound cut the batch short).
struct ClaimedRow {
    id: i64,
    topic: String,
    message_key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: serde_json::Value,
    created_at: chrono::DateTime<chrono::Utc>,
    claimed: i64,
}

impl From<ClaimedRow> for OutboxRow {
    fn from(row: ClaimedRow) -> Self {
        Self {
            id: row.id,
            topic: row.topic,
            message_key: row.message_key,
            payload: row.payload,
            headers: row.headers,
            created_at: row.created_at,
        }
    }
}

/// What became of a batch's rows at the broker.
#[derive(Debug, Default)]
struct Published {
    acknowledged: Vec<i64>,
    /// Rows refused for good, with the broker's reason.
    refused: Vec<(i64, KafkaError)>,
    /// Destinations that failed for a passing reason, with the first reason; their rows that
    /// were not acknowledged stay in the outbox.
    failed: BTreeMap<String, DestinationFailure>,
}

/// Why a destination failed for a passing reason: its rows wait and are retried.
#[derive(Debug, thiserror::Error)]
enum DestinationFailure {
    /// The producer would not take the record (its queue full, say).
    #[error("enqueueing")]
    Enqueueing(#[source] KafkaError),
    /// The broker answered with an error.
    #[error(transparent)]
    Delivery(KafkaError),
    #[error("the producer dropped the delivery report")]
    ReportDropped,
    #[error("no acknowledgement within {} ms", .0.as_millis())]
    NoAcknowledgement(Duration),
    /// The broker answered the batch's other records and not this one (see
    /// [`Relay::await_wave`]).
    #[error("no acknowledgement within {} ms of the broker acknowledging the batch's other records", .0.as_millis())]
    Straggler(Duration),
}

/// Why a probe could not tell whether its destination answers.
#[derive(Debug, thiserror::Error)]
enum ProbeInconclusive {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("the producer dropped the delivery report")]
    ReportDropped,
}

/// What a probe of a failing destination found.
#[derive(Debug)]
enum ProbeOutcome {
    /// The broker answered for the destination (acknowledged the copy, or refused that row for
    /// good, which says nothing against the destination), or nothing waits for it any more.
    Answered,
    /// It still fails, for this reason.
    Failing(DestinationFailure),
    /// The probe could not tell (the database failed): the destination stays as it was.
    Inconclusive(ProbeInconclusive),
}

/// What ended the relay's wait for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Woken {
    /// The poll interval ran out with no notification.
    ByPoll,
    /// A commit in this process, a `NOTIFY`, the listener's state, or the relay's own state
    /// (its start, a full batch, stopping).
    ByWork,
}

/// The relay's session that LISTENs for the outbox's notifications ([`Relay::wait_for_work`]).
enum Listening {
    /// Listening; `heard` is when its connection last proved alive (a notification, or an
    /// answer to [`Relay::still_listening`]).
    Ready {
        listener: PgListener,
        heard: Instant,
    },
    /// An attempt to listen ([`Relay::start_listening`]).
    Starting(JoinHandle<std::result::Result<PgListener, ListenError>>),
    /// Not listening: the next wait starts an attempt.
    Down,
}

/// What ended a wait on the [`Listening`].
enum Heard {
    Notification(sqlx::Result<sqlx::postgres::PgNotification>),
    Attempt(
        std::result::Result<std::result::Result<PgListener, ListenError>, tokio::task::JoinError>,
    ),
}

/// Why the relay could not LISTEN, or why its listener is taken for deaf.
#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Deadline(#[from] crate::db::DeadlineExceeded),
}

impl Relay {
    /// A relay for the outbox of `schema`, with a producer of its own.
    ///
    /// # Errors
    /// [`Error::Kafka`] when the producer cannot be created.
    pub fn new(
        pool: PgPool,
        kafka: KafkaConfig,
        schema: &str,
        config: RelayConfig,
        faults: FaultConfig,
    ) -> Result<Self> {
        Ok(Self {
            pool,
            connection: KeptConnection::default(),
            producer: kafka::producer(&kafka)?,
            kafka,
            schema: schema.to_owned(),
            destinations: Destinations::new(
                DESTINATION_BACKOFF_BASE,
                config.destination_backoff_max(),
            ),
            config,
            faults,
            published: 0,
            fatal_error_injected: false,
            outbox_written: Arc::new(Notify::new()),
            probe: None,
            call_timeout: Duration::from_millis(crate::config::DATABASE_CALL_TIMEOUT_MS),
        })
    }

    /// Bounds each of its database calls by `call_timeout` (`DATABASE_CALL_TIMEOUT_MS`).
    pub fn with_call_timeout(mut self, call_timeout: Duration) -> Self {
        self.call_timeout = call_timeout;
        self
    }

    /// Also wakes up when `outbox_written` is notified (by a writer in this process), besides
    /// the outbox's `NOTIFY` and the poll.
    pub fn woken_by(mut self, outbox_written: Arc<Notify>) -> Self {
        self.outbox_written = outbox_written;
        self
    }

    /// Publishes until `stop` is cancelled, then drains what is left (bounded by the
    /// producer's message timeout; a failing destination's rows stay for the next start) and
    /// flushes the producer.
    pub async fn run(mut self, stop: CancellationToken) {
        // The first LISTEN goes in the background like every later one: bounded by the call
        // deadline, and the relay publishes meanwhile.
        let mut listening = Listening::Starting(self.start_listening());
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        // Whether the last batch found the database silent (its call ran out of time).
        let mut unanswered = false;
        let mut woken = Woken::ByWork;
        loop {
            let stopping = stop.is_cancelled();
            if stopping && unanswered {
                // The drain would only wait another deadline for a database that does not
                // answer: the rows stay for the next start, or for another instance's relay.
                break;
            }
            self.settle_probe().await;
            if !stopping {
                self.start_probe();
            }
            let published = self
                .publish_batch(std::mem::replace(&mut woken, Woken::ByWork))
                .await;
            unanswered = matches!(published, Err(crate::Error::Deadline(_)));
            match published {
                Ok(true) => continue,
                Ok(false) => backoff.reset(),
                Err(e) => {
                    tracing::warn!(error.message = %crate::Chain(&e), schema = %self.schema, "outbox relay failed; retrying");
                    if stopping {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = stop.cancelled() => {}
                    }
                    continue;
                }
            }
            if stopping {
                break;
            }
            let poll = self.next_wake();
            woken = self.wait_for_work(&mut listening, &stop, poll).await;
        }
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
        if let Listening::Starting(attempt) = listening {
            attempt.abort();
        }
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(error.message = %crate::Chain(&e), "flushing producer on shutdown failed");
        }
    }

    /// How long to wait at most for a notification: the poll interval, or less when a failing
    /// destination's next try comes sooner (a running probe wakes the relay when it ends).
    fn next_wake(&self) -> Duration {
        let poll = self.config.poll_interval();
        if self.probe.is_some() {
            return poll;
        }
        match self.destinations.next_retry() {
            Some(at) => poll.min(at.saturating_duration_since(Instant::now())),
            None => poll,
        }
    }

    /// Starts an attempt to LISTEN, in a task of its own so that the relay's wake-ups (the
    /// poll, the in-process notifications) do not cancel it half-way (an attempt that took
    /// longer than the poll interval was cancelled at every wait, and never listened while the
    /// relay was busy); it ends within the call deadline.
    ///
    /// Each listener has a one-connection pool of its own, on the service pool's settings: a
    /// listener found deaf is dropped, and sqlx's drop of it sends `UNLISTEN *` on its
    /// connection and waits for the answer, which on a silent connection does not come until
    /// TCP gives up. That wait holds this connection, not one of the service pool's.
    fn start_listening(&self) -> JoinHandle<std::result::Result<PgListener, ListenError>> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.call_timeout)
            .connect_lazy_with((*self.pool.connect_options()).clone());
        let limit = self.call_timeout;
        tokio::spawn(async move {
            let listen = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                listener.listen(NOTIFY_CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            Ok(within(limit, listen).await??)
        })
    }

    /// Whether the listener's connection still answers: `LISTEN` again on it (a no-op for the
    /// server, and the session's last statement stays a `LISTEN`), within the call deadline.
    ///
    /// A listener only reads, so nothing tells it when its session is gone without a word
    /// reaching it: the server ended the session (after a partition, its keepalive bounds end
    /// a silent client's sessions in a few seconds) and the reset it sent was dropped, or
    /// PostgreSQL restarted while the link was cut. Its socket then stays open and silent for
    /// good (sqlx 0.8 sets no keepalive on the client's side), and the relay would poll forever
    /// without knowing it does not listen.
    async fn still_listening(
        &self,
        listener: &mut PgListener,
    ) -> std::result::Result<(), ListenError> {
        let query = format!(r#"LISTEN "{NOTIFY_CHANNEL}""#);
        within(
            self.call_timeout,
            sqlx::query(&query).execute(&mut *listener),
        )
        .await??;
        Ok(())
    }

    /// Returns when a notification for this schema arrives, `poll` passes, the relay is told
    /// to stop, or it starts listening (rows may have come while it did not listen).
    ///
    /// A listener that failed is replaced by a new one in the next wait: after a PostgreSQL
    /// restart its connection is gone (sqlx does not reconnect after every kind of error, e.g.
    /// a connection reset). Dropping it for good, as this once did, left the relay polling
    /// forever, so after one database restart every hop waited for the poll interval. A
    /// listener that heard nothing for a call deadline is checked first
    /// ([`Relay::still_listening`]), so a deaf one is replaced within two call deadlines. The
    /// wait in which a listener failed, and any wait in which listening again fails, is a
    /// plain poll, so a failing listener cannot spin the loop.
    async fn wait_for_work(
        &self,
        listening: &mut Listening,
        stop: &CancellationToken,
        poll: Duration,
    ) -> Woken {
        if matches!(listening, Listening::Down) {
            *listening = Listening::Starting(self.start_listening());
        }
        let poll = tokio::time::sleep(poll);
        tokio::pin!(poll);
        loop {
            // When a listener that heard nothing for a call deadline is checked.
            let check_at = match listening {
                Listening::Ready { heard, .. } => Some(*heard + self.call_timeout),
                _ => None,
            };
            let check = async {
                match check_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let heard = async {
                match listening {
                    Listening::Ready { listener, .. } => Heard::Notification(listener.recv().await),
                    Listening::Starting(attempt) => Heard::Attempt(attempt.await),
                    Listening::Down => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut poll => return Woken::ByPoll,
                _ = stop.cancelled() => return Woken::ByWork,
                _ = self.outbox_written.notified() => return Woken::ByWork,
                _ = check => {
                    let Listening::Ready { listener, heard } = listening else {
                        continue;
                    };
                    match self.still_listening(listener).await {
                        Ok(()) => *heard = Instant::now(),
                        Err(e) => {
                            tracing::warn!(error.message = %crate::Chain(&e), schema = %self.schema, "outbox listener does not answer; polling until it listens again");
                            *listening = Listening::Down;
                            self.pause(poll.deadline(), stop).await;
                            return Woken::ByWork;
                        }
                    }
                }
                heard = heard => match heard {
                    Heard::Notification(Ok(notification)) => {
                        if let Listening::Ready { heard, .. } = listening {
                            *heard = Instant::now();
                        }
                        if notification.payload() == self.schema {
                            return Woken::ByWork;
                        }
                    }
                    Heard::Notification(Err(e)) => {
                        tracing::warn!(error.message = %crate::Chain(&e), schema = %self.schema, "outbox listener failed; polling until it listens again");
                        *listening = Listening::Down;
                        self.pause(poll.deadline(), stop).await;
                        return Woken::ByWork;
                    }
                    Heard::Attempt(Ok(Ok(listener))) => {
                        tracing::info!(schema = %self.schema, "listening for outbox notifications");
                        *listening = Listening::Ready { listener, heard: Instant::now() };
                        return Woken::ByWork;
                    }
                    Heard::Attempt(Ok(Err(e))) => {
                        tracing::warn!(error.message = %crate::Chain(&e), schema = %self.schema, "cannot LISTEN for outbox notifications; polling until it can");
                        *listening = Listening::Down;
                        self.pause(poll.deadline(), stop).await;
                        return Woken::ByWork;
                    }
                    Heard::Attempt(Err(e)) => {
                        tracing::warn!(error.message = %crate::Chain(&e), schema = %self.schema, "the attempt to LISTEN ended abnormally; polling until one listens");
                        *listening = Listening::Down;
                        self.pause(poll.deadline(), stop).await;
                        return Woken::ByWork;
                    }
                },
            }
        }
    }

    /// After a listener failed: waits until `poll_at`, or a call deadline if that is sooner
    /// (a long poll must not keep the relay deaf for long), or until told to stop.
    async fn pause(&self, poll_at: tokio::time::Instant, stop: &CancellationToken) {
        let until = poll_at.min(tokio::time::Instant::now() + self.call_timeout);
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = stop.cancelled() => {}
        }
    }

    /// Publishes up to one batch of the destinations that are not failing; returns whether the
    /// batch was full (more rows may be waiting). Its database calls (the claim; the deletes
    /// and the commit) each end within `DATABASE_CALL_TIMEOUT_MS`; the wait for the broker
    /// between them is bounded by `OUTBOX_ACK_WAIT_MS` per wave. The relay keeps its connection
    /// from batch to batch ([`KeptConnection`]) and closes it after one that failed (a call that
    /// ran out of time among them: see [`crate::consumer`]).
    async fn publish_batch(&mut self, woken: Woken) -> Result<bool> {
        let limit = self.call_timeout;
        let mut connection = tokio::time::timeout(limit, self.connection.take(&self.pool))
            .await
            .map_err(|_| crate::db::DeadlineExceeded { limit })??;
        let published = self.publish_batch_on(&mut connection, woken).await;
        // After a failure the connection is closed (dropped), its transaction with it.
        if published.is_ok() {
            self.connection.keep(connection);
        }
        published
    }

    /// [`Relay::publish_batch`] on `connection`. Woken by the poll alone, it first asks
    /// whether any row waits, in one autocommit statement: at rest that is all a poll costs,
    /// where the claim's transaction is three round trips that find nothing.
    async fn publish_batch_on(
        &mut self,
        connection: &mut PgConnection,
        woken: Woken,
    ) -> Result<bool> {
        self.inject_fatal_error();
        let limit = self.call_timeout;
        let failing = self.destinations.failing_topics();
        if woken == Woken::ByPoll && !within(limit, rows_waiting(connection, &failing)).await?? {
            return Ok(false);
        }
        // The transaction waits for the broker's acknowledgements (up to OUTBOX_ACK_WAIT_MS a
        // wave): the sessions' bound on idling in a transaction (`db::session_settings`) is
        // lifted for it. A relay cut off from the database keeps its rows locked until the
        // server ends its session (TCP keepalive), and the other instances' relays skip them.
        let mut tx = within(
            limit,
            connection.begin_with("BEGIN; SET LOCAL idle_in_transaction_session_timeout = 0"),
        )
        .await??;
        let claimed = within(
            limit,
            claim(
                &mut tx,
                self.config.outbox_batch_size,
                &failing,
                self.config.outbox_batch_max_bytes,
            ),
        )
        .await??;
        let Some(first) = claimed.first() else {
            // The connection is kept: it must not wait in a transaction until the next wake.
            within(limit, tx.rollback()).await??;
            return Ok(false);
        };
        let locked = first.claimed;
        let full = locked >= self.config.outbox_batch_size
            || i64::try_from(claimed.len()).unwrap_or(i64::MAX) < locked;
        let rows: Vec<OutboxRow> = claimed.into_iter().map(OutboxRow::from).collect();
        let now = chrono::Utc::now();
        for row in &rows {
            let waited = (now - row.created_at).to_std().unwrap_or_default();
            ::metrics::histogram!(crate::metrics::OUTBOX_PICKUP_SECONDS)
                .record(waited.as_secs_f64());
        }
        let mut published = self.publish(&rows).await;
        if let Some(producer) = self.renewed_if_fatal() {
            // The producer failed, not the destinations: the rows it did not publish stay, and
            // the new producer takes them at once.
            self.producer = producer;
            published.failed.clear();
        }
        for (topic, error) in std::mem::take(&mut published.failed) {
            self.destination_failed(&topic, error);
        }
        let done: Vec<i64> = published
            .acknowledged
            .iter()
            .copied()
            .chain(published.refused.iter().map(|(id, _)| *id))
            .collect();
        let schema = &self.schema;
        within(limit, async {
            for (id, error) in &published.refused {
                // Retrying cannot help, and the rows behind it must go out: keep it aside,
                // whole, with the broker's reason, for an operator.
                tracing::error!(outbox_id = id, error.message = %crate::Chain(error), schema = %schema, "the broker refuses an outbox row for good; parked in outbox_parked");
                // The column holds the broker's text: convert at this edge only.
                let error = error.to_string();
                sqlx::query!(
                    "INSERT INTO outbox_parked (id, topic, message_key, payload, headers, created_at, error)
                 SELECT id, topic, message_key, payload, headers, created_at, $2 FROM outbox WHERE id = $1",
                    id,
                    error,
                )
                .execute(&mut *tx)
                .await?;
            }
            if !done.is_empty() {
                sqlx::query!("DELETE FROM outbox WHERE id = ANY($1)", &done)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        })
        .await??;
        ::metrics::counter!(crate::metrics::OUTBOX_PUBLISHED)
            .increment(published.acknowledged.len() as u64);
        ::metrics::counter!(crate::metrics::OUTBOX_PARKED)
            .increment(published.refused.len() as u64);
        self.published += done.len() as u64;
        Ok(full)
    }

    /// Hands `rows` to the producer and waits for the broker's answers, a wave at a time: the
    /// first row of every (topic, key), then the second of each whose first was acknowledged,
    /// and so on. A destination that fails for a passing reason gets no more rows of this
    /// batch, and a row whose predecessor did not go out waits with it.
    async fn publish(&self, rows: &[OutboxRow]) -> Published {
        let waves = waves(
            rows.iter()
                .map(|row| (row.topic.as_str(), row.message_key.as_deref())),
        );
        let mut published = Published::default();
        // The (topic, key)s one of whose rows did not go out: the later rows wait.
        let mut held: HashSet<(&str, &[u8])> = HashSet::new();
        let last_wave = waves.iter().copied().max().unwrap_or(0);
        for wave in 0..=last_wave {
            let enqueued = Instant::now();
            let mut deliveries = Vec::new();
            for (row, _) in rows.iter().zip(&waves).filter(|(_, w)| **w == wave) {
                let key = row
                    .message_key
                    .as_deref()
                    .map(|key| (row.topic.as_str(), key));
                if published.failed.contains_key(&row.topic)
                    || key.is_some_and(|key| held.contains(&key))
                {
                    held.extend(key);
                    continue;
                }
                match send(&self.producer, row) {
                    Ok(delivery) => deliveries.push((row, delivery)),
                    Err(e) if refused_for_good(&e) => published.refused.push((row.id, e)),
                    Err(e) => {
                        held.extend(key);
                        published.fail(&row.topic, DestinationFailure::Enqueueing(e));
                    }
                }
            }
            self.await_wave(deliveries, enqueued, &mut published, &mut held)
                .await;
        }
        published
    }

    /// Waits for the broker's answers to one wave. A delivery not answered within
    /// `OUTBOX_ACK_WAIT_MS`, or a quarter of it after the broker last answered one of the
    /// wave's other records (with one broker, healthy topics are answered together: a topic
    /// that lags that far behind them is the one failing, and the rest of the outbox should
    /// not wait the whole time for it), fails its destination. Its record stays queued in the
    /// producer and may still arrive: a duplicate of what the row publishes later, in order.
    async fn await_wave<'a>(
        &self,
        deliveries: Vec<(&'a OutboxRow, (kafka::DeliveryFuture, tracing::Span))>,
        enqueued: Instant,
        published: &mut Published,
        held: &mut HashSet<(&'a str, &'a [u8])>,
    ) {
        let ack_wait = self.config.ack_wait();
        let straggler_wait = ack_wait / 4;
        let ack_deadline = enqueued + ack_wait;
        let mut outstanding: BTreeMap<i64, &OutboxRow> =
            deliveries.iter().map(|(row, _)| (row.id, *row)).collect();
        let mut answers: FuturesUnordered<_> = deliveries
            .into_iter()
            .map(|(row, (delivery, span))| async move { (row, delivery.await, span) })
            .collect();
        let mut last_answer: Option<Instant> = None;
        let timed_out = loop {
            let deadline =
                last_answer.map_or(ack_deadline, |at| (at + straggler_wait).min(ack_deadline));
            let (row, answer, _span) =
                match tokio::time::timeout_at(deadline.into(), answers.next()).await {
                    Ok(Some(answered)) => answered,
                    Ok(None) => break None,
                    Err(_elapsed) => break Some(deadline),
                };
            last_answer = Some(Instant::now());
            outstanding.remove(&row.id);
            let error = match answer {
                Ok(Ok(_)) => {
                    ::metrics::histogram!(crate::metrics::OUTBOX_PUBLISH_SECONDS)
                        .record(enqueued.elapsed().as_secs_f64());
                    published.acknowledged.push(row.id);
                    continue;
                }
                Ok(Err((e, _))) if refused_for_good(&e) => {
                    published.refused.push((row.id, e));
                    continue;
                }
                Ok(Err((e, _))) => {
                    self.report_refusal(&e);
                    DestinationFailure::Delivery(e)
                }
                Err(_cancelled) => DestinationFailure::ReportDropped,
            };
            if let Some(key) = row.message_key.as_deref() {
                held.insert((row.topic.as_str(), key));
            }
            published.fail(&row.topic, error);
        };
        let Some(deadline) = timed_out else {
            return;
        };
        let error = || {
            if deadline < ack_deadline {
                DestinationFailure::Straggler(straggler_wait)
            } else {
                DestinationFailure::NoAcknowledgement(ack_wait)
            }
        };
        for row in outstanding.into_values() {
            if let Some(key) = row.message_key.as_deref() {
                held.insert((row.topic.as_str(), key));
            }
            published.fail(&row.topic, error());
        }
    }

    /// A fresh producer when this one failed fatally (an idempotent producer that lost its
    /// sequence, say).
    fn renewed_if_fatal(&self) -> Option<kafka::Producer> {
        match kafka::renewed_if_fatal(&self.producer, &self.kafka) {
            Ok(renewed) => renewed,
            Err(e) => {
                tracing::error!(error.message = %crate::Chain(&e), "cannot create a producer to replace the failed one; trying again with the next batch");
                None
            }
        }
    }

    /// Notes that `topic` failed: the first failure of a run of them is logged and counted,
    /// the retries after it only at debug level.
    fn destination_failed(&mut self, topic: &str, error: DestinationFailure) {
        let started = self.destinations.failed(topic, Instant::now());
        if started {
            tracing::warn!(topic, error.message = %crate::Chain(&error), schema = %self.schema, "outbox destination failing; its rows wait and are retried with backoff, the other destinations go on");
            ::metrics::counter!(crate::metrics::OUTBOX_DESTINATION_FAILURES, "topic" => topic.to_owned())
                .increment(1);
            ::metrics::gauge!(crate::metrics::OUTBOX_DESTINATION_FAILING, "topic" => topic.to_owned())
                .set(1.0);
        } else {
            tracing::debug!(topic, error.message = %crate::Chain(&error), "outbox destination still failing");
        }
    }

    /// Starts the probe of the failing destination whose try is due, if no probe runs.
    fn start_probe(&mut self) {
        if self.probe.is_some() {
            return;
        }
        let Some(topic) = self.destinations.due(Instant::now()).map(str::to_owned) else {
            return;
        };
        let pool = self.pool.clone();
        let producer = self.producer.clone();
        let wake = Arc::clone(&self.outbox_written);
        let ack_wait = self.config.ack_wait();
        self.probe = Some(tokio::spawn(async move {
            let outcome = probe(&pool, &producer, &topic, ack_wait).await;
            wake.notify_one();
            (topic, outcome)
        }));
    }

    /// Takes in the outcome of a probe that has finished.
    async fn settle_probe(&mut self) {
        if !self.probe.as_ref().is_some_and(JoinHandle::is_finished) {
            return;
        }
        let Some(probe) = self.probe.take() else {
            return;
        };
        let now = Instant::now();
        match probe.await {
            Ok((topic, ProbeOutcome::Answered)) => {
                if let Some((failed_for, retries)) = self.destinations.recovered(&topic, now) {
                    tracing::info!(topic, failed_for_ms = failed_for.as_millis() as u64, retries, schema = %self.schema, "outbox destination answers again; its rows go out from the oldest");
                    ::metrics::gauge!(crate::metrics::OUTBOX_DESTINATION_FAILING, "topic" => topic)
                        .set(0.0);
                }
                // Whatever failed with it (the broker away) may be back too: try the others now.
                self.destinations.retry_all_now(now);
            }
            Ok((topic, ProbeOutcome::Failing(error))) => self.destination_failed(&topic, error),
            Ok((topic, ProbeOutcome::Inconclusive(error))) => {
                tracing::debug!(topic, error.message = %crate::Chain(&error), "probing an outbox destination failed; trying again later");
                self.destinations.postpone(&topic, now);
            }
            Err(e) => {
                tracing::warn!(error.message = %crate::Chain(&e), "a probe of an outbox destination ended abnormally; trying again later")
            }
        }
    }
}

/// `call`, or [`crate::db::DeadlineExceeded`] when it has not ended within `limit`.
async fn within<F: std::future::Future>(
    limit: Duration,
    call: F,
) -> std::result::Result<F::Output, crate::db::DeadlineExceeded> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| crate::db::DeadlineExceeded { limit })
}

/// Whether the outbox holds a row for a destination that is not failing (locked by another
/// instance's relay or not).
async fn rows_waiting(conn: &mut PgConnection, failing: &[String]) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM outbox WHERE topic <> ALL($1)) AS "waiting!""#,
        failing,
    )
    .fetch_one(conn)
    .await
}

/// Locks the lowest `batch_size` rows of the destinations not in `failing` and returns the
/// longest run of them, from the first, whose bytes (payload, key, headers) fit `max_bytes`;
/// the first row always goes. The rows after the run stay locked until the transaction ends
/// but are not sent to the relay (one read of each row: a second lookup per row by id cost
/// twice as much).
async fn claim(
    conn: &mut PgConnection,
    batch_size: i64,
    failing: &[String],
    max_bytes: i64,
) -> sqlx::Result<Vec<ClaimedRow>> {
    sqlx::query_as!(
        ClaimedRow,
        r#"WITH claimed AS (
                   SELECT id, topic, message_key, payload, headers, created_at,
                          octet_length(payload)::bigint + coalesce(octet_length(message_key), 0)
                              + pg_column_size(headers) AS size
                   FROM outbox WHERE topic <> ALL($2)
                   ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
               ), sized AS (
                   SELECT *, (sum(size) OVER (ORDER BY id))::bigint - size AS before,
                          count(*) OVER () AS claimed
                   FROM claimed
               )
               SELECT id AS "id!", topic AS "topic!", message_key, payload AS "payload!",
                      headers AS "headers!", created_at AS "created_at!", claimed AS "claimed!"
               FROM sized
               WHERE before = 0 OR before + size <= $3
               ORDER BY id"#,
        batch_size,
        failing,
        max_bytes,
    )
    .fetch_all(conn)
    .await
}

/// Publishes a copy of the oldest row for `topic` and waits for the broker's answer, at most
/// `ack_wait`. The row stays: the relay publishes it in order once the destination answers.
async fn probe(
    pool: &PgPool,
    producer: &kafka::Producer,
    topic: &str,
    ack_wait: Duration,
) -> ProbeOutcome {
    let oldest = sqlx::query_as!(
        OutboxRow,
        "SELECT id, topic, message_key, payload, headers, created_at FROM outbox
         WHERE topic = $1 ORDER BY id LIMIT 1",
        topic,
    )
    .fetch_optional(pool)
    .await;
    let row = match oldest {
        Ok(Some(row)) => row,
        Ok(None) => return ProbeOutcome::Answered,
        Err(e) => return ProbeOutcome::Inconclusive(e.into()),
    };
    let (delivery, _span) = match send(producer, &row) {
        Ok(delivery) => delivery,
        Err(e) if refused_for_good(&e) => return ProbeOutcome::Answered,
        Err(e) => return ProbeOutcome::Failing(DestinationFailure::Enqueueing(e)),
    };
    match tokio::time::timeout(ack_wait, delivery).await {
        Ok(Ok(Ok(_))) => ProbeOutcome::Answered,
        Ok(Ok(Err((e, _)))) if refused_for_good(&e) => ProbeOutcome::Answered,
        Ok(Ok(Err((e, _)))) => ProbeOutcome::Failing(DestinationFailure::Delivery(e)),
        Ok(Err(_cancelled)) => ProbeOutcome::Inconclusive(ProbeInconclusive::ReportDropped),
        Err(_elapsed) => ProbeOutcome::Failing(DestinationFailure::NoAcknowledgement(ack_wait)),
    }
}

/// Hands one row to the producer, in a publish span in the trace of the work that wrote it
/// (the consumer's span becomes its child).
fn send(
    producer: &kafka::Producer,
    row: &OutboxRow,
) -> Result<(kafka::DeliveryFuture, tracing::Span), KafkaError> {
    let mut headers = to_header_map(&row.headers);
    let span = tracing::info_span!("publish", otel.kind = "producer", topic = %row.topic);
    telemetry::extract(&span, &headers);
    telemetry::inject(&span, &mut headers);
    let mut record =
        FutureRecord::to(&row.topic)
            .payload(&row.payload)
            .headers(kafka::record_headers(
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ));
    if let Some(key) = &row.message_key {
        record = record.key(key);
    }
    producer
        .send_result(record)
        .map(|delivery| (delivery, span))
}

impl Published {
    /// Notes that `topic` failed; the first reason is the one kept.
    fn fail(&mut self, topic: &str, error: DestinationFailure) {
        self.failed.entry(topic.to_owned()).or_insert(error);
    }
}

/// For each row, in order, how many earlier rows have its topic and key: the wave it is
/// published in. Rows without a key have no order to keep and go in the first wave.
fn waves<'a>(rows: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>) -> Vec<usize> {
    let mut seen: HashMap<(&str, &[u8]), usize> = HashMap::new();
    rows.map(|(topic, key)| match key {
        Some(key) => {
            let count = seen.entry((topic, key)).or_default();
            *count += 1;
            *count - 1
        }
        None => 0,
    })
    .collect()
}

/// Whether the broker (or the client, before sending) refuses this record whatever happens:
/// too large, malformed, or a topic name that cannot exist. Everything else (a topic deleted or
/// not created yet, timeouts, a broker away, leadership moving, not enough replicas) passes,
/// and its row waits for its destination. A write the cluster's ACLs refuse is not the
/// record's fault but the deployment's: its row stays in the outbox and the service stops
/// ([`Relay::report_refusal`]).
fn refused_for_good(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    matches!(
        e.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidMessage
                | Code::InvalidRecord
                | Code::InvalidTopic
                | Code::MessageBatchTooLarge
                | Code::TopicAuthorizationFailed
        )
    )
}

impl Relay {
    /// Tells the connection's access watch about a delivery the cluster refused for lack of an
    /// ACL, which stops the service (retrying cannot grant it).
    fn report_refusal(&self, error: &KafkaError) {
        if let Some(refusal @ Refusal::Authorization(_)) = Refusal::of(error) {
            self.kafka.connection.access.saw(refusal);
        }
    }

    /// `FAULT_PRODUCER_FATAL_AFTER`: raises a fatal error in the producer the way librdkafka
    /// does for an idempotent producer that lost its sequence.
    fn inject_fatal_error(&mut self) {
        let after = self.faults.producer_fatal_after;
        if after == 0 || self.fatal_error_injected || self.published < after {
            return;
        }
        self.fatal_error_injected = true;
        kafka::inject_fatal_error(&self.producer);
    }
}

fn to_header_map(headers: &serde_json::Value) -> BTreeMap<String, String> {
    headers
        .as_object()
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The destinations (topics) that failed for a passing reason, each with a backoff of its
/// own. The relay claims no rows for them; when one's next try is due, a probe tries it.
#[derive(Debug)]
struct Destinations {
    failing: BTreeMap<String, Failing>,
    base: Duration,
    max: Duration,
}

#[derive(Debug)]
struct Failing {
    since: Instant,
    backoff: Backoff,
    retry_at: Instant,
    /// Tries that failed after the first failure.
    retries: u32,
}

impl Destinations {
    fn new(base: Duration, max: Duration) -> Self {
        Self {
            failing: BTreeMap::new(),
            base,
            max,
        }
    }

    fn failing_topics(&self) -> Vec<String> {
        self.failing.keys().cloned().collect()
    }

    /// Notes a failure of `topic` and sets its next try; returns whether it starts failing
    /// with this one (it was working before).
    fn failed(&mut self, topic: &str, now: Instant) -> bool {
        match self.failing.get_mut(topic) {
            Some(failing) => {
                failing.retries = failing.retries.saturating_add(1);
                failing.retry_at = now + failing.backoff.next_delay();
                false
            }
            None => {
                let mut backoff = Backoff::new(self.base, self.max);
                let retry_at = now + backoff.next_delay();
                self.failing.insert(
                    topic.to_owned(),
                    Failing {
                        since: now,
                        backoff,
                        retry_at,
                        retries: 0,
                    },
                );
                true
            }
        }
    }

    /// `topic` works again; returns how long it had failed and how many tries failed after
    /// the first failure, when it was failing.
    fn recovered(&mut self, topic: &str, now: Instant) -> Option<(Duration, u32)> {
        self.failing
            .remove(topic)
            .map(|f| (now.saturating_duration_since(f.since), f.retries))
    }

    /// The failing destination whose try is due at `now` (the one due longest), if any.
    fn due(&self, now: Instant) -> Option<&str> {
        self.failing
            .iter()
            .filter(|(_, f)| f.retry_at <= now)
            .min_by_key(|(_, f)| f.retry_at)
            .map(|(topic, _)| topic.as_str())
    }

    /// When the next try of a failing destination is due.
    fn next_retry(&self) -> Option<Instant> {
        self.failing.values().map(|f| f.retry_at).min()
    }

    /// Makes every failing destination's try due now, keeping its backoff (one destination
    /// answered again, so what failed them all, the broker away, may be over).
    fn retry_all_now(&mut self, now: Instant) {
        for failing in self.failing.values_mut() {
            failing.retry_at = failing.retry_at.min(now);
        }
    }

    /// Tries `topic` again after its backoff, without counting a failure (the try could not
    /// tell).
    fn postpone(&mut self, topic: &str, now: Instant) {
        if let Some(failing) = self.failing.get_mut(topic) {
            failing.retry_at = now + failing.backoff.next_delay();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination's failure keeps the broker's error as its cause, and its printed chain
    /// reads as the text the relay logged when it kept a `String` (`enqueueing: ` and the
    /// broker's text, once).
    #[test]
    fn a_destinations_failure_keeps_the_brokers_error() {
        let kafka = || KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
        let mut published = Published::default();
        published.fail("shipping", DestinationFailure::Enqueueing(kafka()));
        published.fail("shipping", DestinationFailure::ReportDropped);
        let first = &published.failed["shipping"];
        let cause = std::error::Error::source(first).expect("the broker's error");
        assert!(matches!(
            cause.downcast_ref::<KafkaError>(),
            Some(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
        ));
        assert_eq!(crate::chain(first), format!("enqueueing: {}", kafka()));
        let delivery = DestinationFailure::Delivery(kafka());
        assert_eq!(crate::chain(&delivery), kafka().to_string());
        assert_eq!(
            crate::chain(&DestinationFailure::Straggler(Duration::from_millis(250))),
            "no acknowledgement within 250 ms of the broker acknowledging the batch's other records"
        );
    }

    #[test]
    fn a_failing_destination_backs_off_alone_up_to_its_cap_and_counts_one_start() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut destinations = Destinations::new(base, max);
        let start = Instant::now();
        assert!(
            destinations.failed("shipping", start),
            "the first failure starts it"
        );
        assert!(destinations.failed("payment", start));
        assert_eq!(destinations.failing_topics(), ["payment", "shipping"]);
        let mut now = start;
        for retry in 0..20u32 {
            assert!(
                !destinations.failed("shipping", now),
                "a retry that fails is no new start"
            );
            let ceiling = base.saturating_mul(2u32.saturating_pow(retry + 1)).min(max);
            let next = destinations.failing["shipping"].retry_at;
            assert!(next >= now && next - now <= ceiling, "retry {retry}");
            assert!(destinations.due(now + ceiling).is_some());
            now += ceiling;
        }
        // payment kept its own first, short backoff.
        assert!(destinations.failing["payment"].retry_at <= start + base);
        let (failed_for, retries) = destinations
            .recovered("shipping", now)
            .expect("it was failing");
        assert_eq!(retries, 20);
        assert_eq!(failed_for, now - start);
        assert_eq!(destinations.recovered("shipping", now), None);
        assert_eq!(destinations.failing_topics(), ["payment"]);
        // Failing again later starts over from the short backoff.
        assert!(destinations.failed("shipping", now));
        assert!(destinations.failing["shipping"].retry_at <= now + base);
    }

    #[test]
    fn the_longest_due_destination_is_tried_first_and_all_are_due_when_one_answers() {
        let mut destinations =
            Destinations::new(Duration::from_millis(100), Duration::from_secs(5));
        let start = Instant::now();
        assert_eq!(destinations.due(start), None);
        assert_eq!(destinations.next_retry(), None);
        destinations.failed("a", start);
        destinations.failed("b", start);
        for _ in 0..6 {
            destinations.failed("a", start);
        }
        let b_at = destinations.failing["b"].retry_at;
        assert_eq!(destinations.due(b_at), Some("b"));
        assert!(destinations.next_retry() <= Some(b_at));
        assert_eq!(destinations.due(start - Duration::from_millis(1)), None);
        destinations.retry_all_now(start);
        assert!(destinations.due(start).is_some());
        assert_eq!(destinations.next_retry(), Some(start));
        destinations.postpone("a", start);
        assert!(destinations.failing["a"].retry_at >= start);
        destinations.postpone("unknown", start);
        assert_eq!(destinations.failing_topics(), ["a", "b"]);
    }

    /// A schema of its own with the messaging tables, on `TEST_DATABASE_URL`.
    async fn test_schema() -> (PgPool, String) {
        let server = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let schema = format!(
            "relay_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let config = crate::config::DatabaseConfig {
            database_url: format!("{server}/postgres"),
            database_schema: Some(schema.clone()),
            database_max_connections: 2,
            ..crate::config::DatabaseConfig::to("")
        };
        let (pool, _) = crate::db::open(&config, "unused", &[])
            .await
            .expect("database");
        (pool, schema)
    }

    #[tokio::test]
    async fn a_batch_is_bounded_by_bytes_and_leaves_failing_destinations_out() {
        let (pool, schema) = test_schema().await;
        for (topic, size) in [
            ("a", 1_000),
            ("b", 1_000),
            ("a", 1_000),
            ("b", 5_000),
            ("b", 10),
        ] {
            sqlx::query("INSERT INTO outbox (topic, message_key, payload) VALUES ($1, 'k', $2)")
                .bind(topic)
                .bind(vec![b'x'; size])
                .execute(&pool)
                .await
                .expect("insert a row");
        }
        let sizes = |rows: &[ClaimedRow]| -> Vec<(String, usize)> {
            rows.iter()
                .map(|row| (row.topic.clone(), row.payload.len()))
                .collect()
        };
        let mut tx = pool.begin().await.expect("begin");
        // Two rows of 1,000 bytes with their keys and headers fit 2,500 bytes; a third does not.
        let rows = claim(&mut tx, 256, &[], 2_500).await.expect("claim");
        assert_eq!(sizes(&rows), [("a".into(), 1_000), ("b".into(), 1_000)]);
        assert_eq!(rows[0].claimed, 5, "every row locked, two read");
        let rows = claim(&mut tx, 256, &[], 1 << 20).await.expect("claim");
        assert_eq!(rows.len(), 5);
        let rows = claim(&mut tx, 2, &[], 1 << 20).await.expect("claim");
        assert_eq!(sizes(&rows), [("a".into(), 1_000), ("b".into(), 1_000)]);
        // A failing destination's rows are left out; a first row larger than the bound goes
        // alone, and the bound then holds back the rest.
        let failing = ["a".to_owned()];
        let rows = claim(&mut tx, 256, &failing, 1 << 20).await.expect("claim");
        assert_eq!(
            sizes(&rows),
            [("b".into(), 1_000), ("b".into(), 5_000), ("b".into(), 10)]
        );
        let rows = claim(&mut tx, 256, &failing, 500).await.expect("claim");
        assert_eq!(sizes(&rows), [("b".into(), 1_000)]);
        tx.rollback().await.expect("rollback");
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&pool)
            .await
            .expect("drop schema");
    }

    #[test]
    fn rows_of_one_topic_and_key_go_out_one_wave_after_another() {
        let rows: [(&str, Option<&[u8]>); 7] = [
            ("a", Some(b"k1")),
            ("a", Some(b"k1")),
            ("b", Some(b"k1")),
            ("a", Some(b"k2")),
            ("a", None),
            ("a", None),
            ("a", Some(b"k1")),
        ];
        assert_eq!(waves(rows.into_iter()), [0, 1, 0, 0, 0, 0, 2]);
    }
}
