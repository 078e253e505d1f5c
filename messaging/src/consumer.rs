//! The at-least-once consume loop.
//!
//! For each batch of records that have arrived: begin a transaction, let the [`Handler`] do
//! their work in it (inbox rows, state changes, outbox rows), commit, wake the relay, and only
//! then store the records' offsets for the next automatic commit. A crash anywhere before the
//! store means the records are delivered again and the inbox absorbs them. A record the handler rejects goes to the dead-letter topic (through the
//! outbox) with the reason and its original bytes, and the loop moves on. A passing failure is
//! retried with backoff: a failure of the record's own (deadlock, version conflict) at most
//! [`MAX_RETRIES`] times; an unavailable database until it answers again.
//!
//! No call waits for the database for ever: each transaction (and the wait for its connection)
//! has a deadline, `DATABASE_CALL_TIMEOUT_MS`, and one that runs out counts as the database
//! being unavailable; its connection is closed, not put back in the pool (sqlx would test it
//! with a ping that waits as long as the lost answers). Once the database has been unavailable
//! for `DATABASE_GIVE_UP_AFTER_MS`, the loop gives up its partitions: it leaves the group
//! without storing the offsets of the batch in hand, so the group hands them to the other
//! instances (whose inbox absorbs whatever of that batch did commit), and [`run`] returns
//! [`Ended::GaveUp`]; the pipeline then waits until the database answers
//! ([`wait_for_database`]) and joins the group again with a new consumer.

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use kafka_record::dead_letter::DeadLetterCopy;
use kafka_record::headers::HeaderList;
use kafka_record::trace_headers;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::Message;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::access::Refusal;
use crate::backoff::Backoff;
use crate::config::FaultConfig;
use crate::db::{Kept, KeptConnection};
use crate::health::Health;
use crate::kafka::Consumer as KafkaConsumer;
use crate::metrics;
use crate::outbox::{Outbox, OutgoingMessage, Wake};
use crate::stall::StallWatch;
use crate::telemetry;
use crate::{chain, BoxError, Chain, Error, Result};

/// A consumed record: what a [`Handler`] handles. Read by [`kafka_record`], which also serves
/// the fuzz crate.
pub use kafka_record::Record;

/// Fault injection never crashes a process younger than this, so that every life commits some
/// offsets (they are committed every second) and a crash loop still makes progress.
const FAULT_MIN_LIFETIME: Duration = Duration::from_secs(3);

/// Why a handler did not handle a record. Each variant keeps the typed cause: its text (with
/// its own causes, [`HandlerError::reason`]) is what the dead-letter copy's `dlq.reason` says,
/// and the error's own text is the kind, then the cause (`rejected: ...`).
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The record can never be handled (malformed, unknown, against the contract, or an error
    /// that would repeat on every try): it goes to the dead-letter topic with this reason.
    #[error("rejected")]
    Reject(#[source] BoxError),
    /// Handling failed for a reason that may pass with this record (a serialization failure,
    /// a deadlock, a concurrent update). Retried, at most [`MAX_RETRIES`] times in a row; then
    /// the record is dead-lettered with the last error.
    #[error("retryable")]
    Retry(#[source] BoxError),
    /// The database cannot be reached or is unwell (read-only, shutting down, out of
    /// resources, failing I/O): nothing can be handled, and nothing can be dead-lettered either
    /// (the dead-letter copy goes through the outbox). Retried with backoff for as long as it
    /// lasts, without counting against the record; the service says it is not ready meanwhile
    /// ([`crate::health::Health`]).
    #[error("database unavailable")]
    Unavailable(#[source] BoxError),
}

impl HandlerError {
    /// [`HandlerError::Reject`] for `cause` (a typed error, or a text).
    pub fn reject(cause: impl Into<BoxError>) -> Self {
        Self::Reject(cause.into())
    }

    /// [`HandlerError::Retry`] for `cause`.
    pub fn retry(cause: impl Into<BoxError>) -> Self {
        Self::Retry(cause.into())
    }

    /// [`HandlerError::Unavailable`] for `cause`.
    pub fn unavailable(cause: impl Into<BoxError>) -> Self {
        Self::Unavailable(cause.into())
    }

    /// The cause, whatever the kind.
    pub fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match self {
            Self::Reject(cause) | Self::Retry(cause) | Self::Unavailable(cause) => cause.as_ref(),
        }
    }

    /// The cause with its own causes, on one line ([`chain`]): the dead-letter reason, and
    /// what `/healthz` says while the database is unavailable.
    pub fn reason(&self) -> String {
        chain(self.cause())
    }
}

pub use crate::db::DeadlineExceeded;

/// How long the consume loop waits for its database (`DATABASE_CALL_TIMEOUT_MS`,
/// `DATABASE_GIVE_UP_AFTER_MS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// The longest wait for one call: a connection and a transaction to its commit.
    pub call: Duration,
    /// How long the database may be unavailable before the loop gives up its partitions;
    /// `None`: never.
    pub give_up_after: Option<Duration>,
}

impl Deadlines {
    /// The settings' ([`crate::config::DatabaseConfig`]).
    pub fn of(config: &crate::config::DatabaseConfig) -> Self {
        Self {
            call: config.call_timeout(),
            give_up_after: config.give_up_after(),
        }
    }
}

/// Transient failures in a row after which a record is dead-lettered. With the backoff's 5 s
/// cap that is over a minute of retrying one record while the database answers.
pub const MAX_RETRIES: u32 = 20;

/// A database error caused by the record itself: the cause of a [`HandlerError::Reject`].
#[derive(Debug, thiserror::Error)]
pub enum DatabaseRefusal {
    /// PostgreSQL refused the record's data (a constraint, a data exception, a size limit).
    #[error("database refused the message")]
    Refused(#[source] sqlx::Error),
    /// Any other error that no retry changes (a row that does not read back, say).
    #[error("database error handling the message")]
    Failed(#[source] sqlx::Error),
}

impl From<sqlx::Error> for HandlerError {
    /// Sorts database errors by what they say about the record. Only what the record itself
    /// causes rejects it: a data exception (SQLSTATE class 22: a NUL in text, a number out of
    /// range), a violated constraint (23), a program limit its size hits (54), a row that does
    /// not read back. A serialization failure, deadlock, lock or statement timeout may pass on
    /// another try ([`HandlerError::Retry`]). Everything else says the database is unwell or
    /// unreachable, not that the record is bad: no connection, read-only (25006, during a
    /// failover or on a full disk), shutting down or starting up (57P), out of resources (53),
    /// I/O errors (58), internal errors (XX), a missing privilege or table (42): it is waited
    /// out ([`HandlerError::Unavailable`]), since a trigger dead-lettered meanwhile is an
    /// order lost.
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &e {
            E::Io(_)
            | E::Tls(_)
            | E::Protocol(_)
            | E::PoolTimedOut
            | E::PoolClosed
            | E::WorkerCrashed => Self::unavailable(e),
            E::Database(db) => {
                let code = db.code().unwrap_or_default();
                match SqlState::of(&code) {
                    SqlState::CausedByTheRecord => Self::reject(DatabaseRefusal::Refused(e)),
                    SqlState::Contention => Self::retry(e),
                    SqlState::DatabaseUnwell => Self::unavailable(e),
                }
            }
            _ => Self::reject(DatabaseRefusal::Failed(e)),
        }
    }
}

/// What a SQLSTATE says about the record whose handling failed with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SqlState {
    /// The record's own data: another try fails alike.
    CausedByTheRecord,
    /// Other transactions got in the way: another try may pass.
    Contention,
    /// The database (or its connection, configuration or schema) is not as it should be.
    DatabaseUnwell,
}

impl SqlState {
    fn of(code: &str) -> Self {
        match code {
            // Serialization failure, deadlock (class 40), lock not available, statement
            // timeout.
            _ if code.starts_with("40") || code == "55P03" || code == "57014" => Self::Contention,
            // Data exception, integrity constraint violation, program limit exceeded.
            _ if ["22", "23", "54"]
                .iter()
                .any(|class| code.starts_with(class)) =>
            {
                Self::CausedByTheRecord
            }
            _ => Self::DatabaseUnwell,
        }
    }
}

/// The application's part of consuming: what to do with a batch of records, inside the
/// transaction the loop opened. Everything the handler wants to send goes into `outbox`, which
/// the loop writes in that transaction before it commits.
pub trait Handler: Send + Sync {
    /// Handles `records` in order, all of them or none: the loop's first try at a batch, in
    /// one transaction. Any error rolls the whole batch back, and the loop then hands its
    /// records over one by one (and dead-letters the one that fails). A handler does set-wise
    /// what each record would do alone: one statement for many rows.
    fn handle_batch(
        &self,
        tx: &mut PgConnection,
        outbox: &mut Outbox,
        records: &[Record],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Handles one record: a batch of one, in the record's span.
    fn handle(
        &self,
        tx: &mut PgConnection,
        outbox: &mut Outbox,
        record: &Record,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self.handle_batch(tx, outbox, std::slice::from_ref(record))
            .instrument(record.span.clone())
    }
}

/// Where rejected records go, and who rejected them.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    pub topic: String,
    /// The consumer group that read the record, written to the `dlq.consumer` header: whose
    /// offsets passed it, and so where a replay must send it.
    pub consumer: String,
}

/// What a consume loop reads and how.
#[derive(Debug, Clone, Copy)]
pub struct ConsumeSettings<'a> {
    pub topics: &'a [String],
    pub dead_letters: &'a DeadLetters,
    /// Most records handled in one transaction.
    pub batch_max: usize,
    pub faults: &'a FaultConfig,
    /// Notified after each commit: the relay's wake-up.
    pub outbox_written: &'a tokio::sync::Notify,
    /// Told when the database is unwell and when it works again.
    pub health: &'a Health,
    /// How long without a record before the loop checks whether it is stuck (zero: never).
    pub stall_after: Duration,
    /// How long it waits for the database.
    pub deadlines: Deadlines,
}

/// Why [`run`] returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Told to shut down.
    ShutDown,
    /// The database was unavailable for longer than [`Deadlines::give_up_after`]: the consumer
    /// left the group. `outage_since`: when the first failed call began.
    GaveUp { outage_since: Instant },
}

/// Consumes `settings.topics` until `shutdown` is cancelled, finishing the batch in hand, then
/// commits the stored offsets before leaving the group; or until the database has been
/// unavailable for [`Deadlines::give_up_after`], when it leaves the group the same way without
/// the batch in hand ([`Ended::GaveUp`]).
///
/// # Errors
/// [`Error::Kafka`] when the subscription fails or the consumer fails fatally;
/// [`Error::ConsumerStuck`] when the stall check finds it reads nothing while records wait;
/// [`Error::InjectedCrash`] from fault injection in process.
pub async fn run<H: Handler>(
    consumer: KafkaConsumer,
    pool: PgPool,
    handler: &H,
    settings: ConsumeSettings<'_>,
    shutdown: CancellationToken,
) -> Result<Ended> {
    let mut stall = StallWatch::new(settings.stall_after);
    let mut crash = CrashFault::new(settings.faults);
    let names: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(Error::kafka(format!(
        "subscribing to {:?}",
        settings.topics
    )))?;
    let batch_max = settings.batch_max.max(1);
    let mut database = Database::new(&pool, settings.deadlines, settings.health);
    let ended = loop {
        let first = match next_message(&consumer, &mut stall, &shutdown).await? {
            Some(message) => to_record(&message),
            None => break Ended::ShutDown,
        };
        stall.progressed();
        let batch = take_arrived(&consumer, first, batch_max);
        let dead_letters = settings.dead_letters;
        match process_batch(&mut database, handler, &batch, dead_letters, &shutdown).await {
            Finished::Committed => {}
            // Shut down while a record was still failing, or gave up on the database: leave
            // the offsets unstored so the next owner of the partition handles the records
            // again (the inbox absorbs those whose transaction did commit after all, its
            // answer lost).
            Finished::ShutDown => break Ended::ShutDown,
            Finished::GaveUp { outage_since } => break Ended::GaveUp { outage_since },
        }
        settings.outbox_written.notify_one();
        crash.after_commit(&consumer, batch.len())?;
        store_offsets(&consumer, &batch);
    };
    if let Ended::GaveUp { outage_since } = ended {
        let partitions = assigned_partitions(&consumer);
        tracing::error!(
            outage_ms = outage_since.elapsed().as_millis() as u64,
            partitions = %partitions,
            "the database has been unavailable too long: giving up the partitions to the \
             other instances until it answers again"
        );
        ::metrics::counter!(metrics::PARTITIONS_GIVEN_UP).increment(1);
        settings.health.gave_up_partitions();
    }
    leave(&consumer);
    Ok(ended)
}

/// The partitions assigned to `consumer`, for the log (`topic[partition]`, comma-separated).
fn assigned_partitions(consumer: &KafkaConsumer) -> String {
    consumer.assignment().map_or_else(
        |e| format!("unknown ({e})"),
        |list| {
            list.elements()
                .iter()
                .map(|p| format!("{}[{}]", p.topic(), p.partition()))
                .collect::<Vec<_>>()
                .join(",")
        },
    )
}

/// Waits until the database answers a probe (is it writable? each within the call deadline),
/// with backoff, after the consume loop gave up its partitions at `outage_since`; logs the outage's
/// length and says the database works again. `false` when told to shut down first.
pub async fn wait_for_database(
    pool: &PgPool,
    deadlines: Deadlines,
    health: &Health,
    outage_since: Instant,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut database = Database::new(pool, deadlines, health);
    loop {
        let probe = async {
            let (mut connection, call) = database.acquire().await?;
            // Answering is not enough: a database that is read-only (a failover, a full disk)
            // answers too, and would refuse the first transaction again.
            let writable = sqlx::query_scalar!(
                r#"SELECT current_setting('transaction_read_only') = 'off' AS "writable!""#
            )
            .fetch_one(&mut *connection);
            let outcome = tokio::time::timeout_at(call.until, writable).await;
            match outcome {
                Ok(Ok(true)) => Ok(()),
                Ok(Ok(false)) => Err(HandlerError::unavailable("the database is read-only")),
                Ok(Err(e)) => Err(HandlerError::from(e)),
                Err(_) => Err(Database::ran_out(connection, call)),
            }
        };
        let failure = tokio::select! {
            probed = probe => match probed {
                Ok(()) => {
                    tracing::warn!(
                        outage_ms = outage_since.elapsed().as_millis() as u64,
                        "the database answers again: joining the group again"
                    );
                    health.database_well();
                    return true;
                }
                Err(e) => e,
            },
            _ = shutdown.cancelled() => return false,
        };
        tracing::debug!(error.message = %Chain(&failure), "the database does not answer yet");
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => return false,
        }
    }
}

/// How a batch (or one record of it) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finished {
    /// Committed: its offsets may be stored.
    Committed,
    /// Told to shut down while it kept failing.
    ShutDown,
    /// The database was unavailable too long ([`Deadlines::give_up_after`]).
    GaveUp { outage_since: Instant },
}

/// One database call's deadline.
#[derive(Debug, Clone, Copy)]
struct Call {
    until: tokio::time::Instant,
    limit: Duration,
}

/// The consume loop's database: its pool, its deadlines, and since when it has been failing.
struct Database<'a> {
    pool: &'a PgPool,
    deadlines: Deadlines,
    health: &'a Health,
    /// When the first call of the failures that have not ended yet began.
    unavailable_since: Option<Instant>,
    /// The connection of the last call that ended well, for the next.
    kept: KeptConnection,
}

impl<'a> Database<'a> {
    fn new(pool: &'a PgPool, deadlines: Deadlines, health: &'a Health) -> Self {
        Self {
            pool,
            deadlines,
            health,
            unavailable_since: None,
            kept: KeptConnection::default(),
        }
    }

    /// The deadline of the next call: the call deadline, or while the database is failing, no
    /// later than when the loop gives up (so that it gives up on time, not a whole call
    /// later), but half a second at least.
    fn next_deadline(&self) -> Duration {
        let call = self.deadlines.call;
        match (self.unavailable_since, self.deadlines.give_up_after) {
            (Some(since), Some(give_up_after)) => give_up_after
                .saturating_sub(since.elapsed())
                .clamp(Duration::from_millis(500).min(call), call),
            _ => call,
        }
    }

    /// A connection for the next call (the last call's, when it ended well), and the call's
    /// deadline.
    async fn acquire(&mut self) -> Result<(Kept, Call), HandlerError> {
        let limit = self.next_deadline();
        let call = Call {
            until: tokio::time::Instant::now() + limit,
            limit,
        };
        match tokio::time::timeout_at(call.until, self.kept.take(self.pool)).await {
            Ok(connection) => Ok((connection?, call)),
            Err(_) => Err(HandlerError::unavailable(DeadlineExceeded { limit })),
        }
    }

    /// Keeps `connection`, whose call ended well, for the next call.
    fn keep(&mut self, connection: Kept) {
        self.kept.keep(connection);
    }

    /// The error of a call that ran out of time on `connection`. The connection is closed, not
    /// kept, and its transaction is rolled back by the server when the session ends (or when
    /// it stays idle in it: [`crate::db::session_settings`]).
    fn ran_out(connection: Kept, call: Call) -> HandlerError {
        drop(connection);
        HandlerError::unavailable(DeadlineExceeded { limit: call.limit })
    }

    /// A call committed: the database works.
    fn works(&mut self) {
        self.unavailable_since = None;
        self.health.database_well();
    }

    /// A call that began at `began` failed with `e`, an [`HandlerError::Unavailable`]: says
    /// so, and whether the loop should give up its partitions now.
    fn failed(&mut self, e: &HandlerError, began: Instant) -> Option<Finished> {
        let since = *self.unavailable_since.get_or_insert(began);
        self.health.database_unwell(&e.reason());
        ::metrics::counter!(metrics::HANDLER_ERRORS, "kind" => "unavailable").increment(1);
        let give_up = self
            .deadlines
            .give_up_after
            .is_some_and(|after| since.elapsed() >= after);
        give_up.then_some(Finished::GaveUp {
            outage_since: since,
        })
    }
}

/// Waits for the next record. `None` when told to shut down; an error when the consumer can
/// read no more (failed fatally, or stuck: [`crate::stall`]).
async fn next_message<'c>(
    consumer: &'c KafkaConsumer,
    stall: &mut StallWatch,
    shutdown: &CancellationToken,
) -> Result<Option<rdkafka::message::BorrowedMessage<'c>>> {
    loop {
        let stall_check = stall.next_check();
        let received = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(None),
            received = consumer.recv() => received,
            () = sleep_until(stall_check), if stall_check.is_some() => {
                if let Some(why) = stall.check(consumer) {
                    consumer.unsubscribe();
                    return Err(Error::ConsumerStuck(why));
                }
                continue;
            }
        };
        match received {
            Ok(message) => return Ok(Some(message)),
            // A fatal error (e.g. a static member whose instance id the group still holds)
            // leaves the consumer unusable for good: stop, so that the process exits and its
            // supervisor starts a fresh one, instead of a service that looks alive and reads
            // nothing.
            Err(e @ KafkaError::MessageConsumptionFatal(_)) => {
                return Err(Error::Kafka {
                    context: "consumer failed fatally".into(),
                    source: e,
                });
            }
            // Anything else (broker down, transport failure) is librdkafka telling us what it
            // is recovering from by itself. No pause here: errors, rebalances and messages
            // share one queue, and a consumer that slept after each error fell ever further
            // behind the errors a down broker produces, so it never reached the assignment
            // waiting behind them and read nothing again after the broker came back (the
            // chaos suite's broker kills found this).
            // Except what the cluster refuses: an ACL missing (to read the topic, to join the
            // group), which retrying does not grant, and a failed login or TLS handshake (a
            // consumer gets librdkafka's errors here, not in the error callback). The access
            // watch stops the service with the first, and confirms the second with fresh
            // clients.
            Err(e) => {
                if let Some(refusal) = Refusal::of(&e) {
                    consumer.context().access.saw(refusal);
                }
                tracing::warn!(error.message = %e, "kafka receive failed; librdkafka retries");
            }
        }
    }
}

/// `first` and whatever else has already arrived, up to `batch_max` records, without waiting
/// for more.
fn take_arrived(consumer: &KafkaConsumer, first: Record, batch_max: usize) -> Vec<Record> {
    let mut batch = vec![first];
    while batch.len() < batch_max {
        match consumer.recv().now_or_never() {
            Some(Ok(message)) => batch.push(to_record(&message)),
            Some(Err(e)) => {
                tracing::warn!(error.message = %e, "kafka receive failed");
                break;
            }
            None => break,
        }
    }
    batch
}

/// Fault injection: a crash right after a commit, before the offsets are stored, every
/// `crash_after_commit_every` records.
struct CrashFault<'a> {
    faults: &'a FaultConfig,
    handled: u64,
    started: std::time::Instant,
}

impl<'a> CrashFault<'a> {
    fn new(faults: &'a FaultConfig) -> Self {
        Self {
            faults,
            handled: 0,
            started: std::time::Instant::now(),
        }
    }

    /// Counts `records` just committed, and crashes when the count passes a multiple of the
    /// setting (not in a process's first [`FAULT_MIN_LIFETIME`]).
    fn after_commit(&mut self, consumer: &KafkaConsumer, records: usize) -> Result<()> {
        let before = self.handled;
        self.handled += records as u64;
        let every = self.faults.crash_after_commit_every;
        if every == 0
            || before / every == self.handled / every
            || self.started.elapsed() < FAULT_MIN_LIFETIME
        {
            return Ok(());
        }
        tracing::error!(records, "fault injection: crashing after commit");
        if !self.faults.crash_in_process {
            std::process::abort();
        }
        // In-process services (tests) stop dead instead: no offset stored, no commit. The
        // group is left at once, as the broker would notice a dead process's session end, so
        // the record's partition moves to the next owner and is delivered again.
        consumer.unsubscribe();
        Err(Error::InjectedCrash)
    }
}

/// Stores the offsets of `batch`, handled and committed, for the next automatic commit.
fn store_offsets(consumer: &KafkaConsumer, batch: &[Record]) {
    for record in batch {
        // librdkafka stores `offset + 1` itself, the next record to read. (Passing
        // `offset + 1` here skipped a record at every restart; the chaos suite caught it.)
        if let Err(e) = consumer.store_offset(&record.topic, record.partition, record.offset) {
            // The partition was revoked meanwhile; its next owner re-reads the record and
            // the inbox absorbs it.
            tracing::warn!(error.message = %e, topic = %record.topic, partition = record.partition, offset = record.offset, "could not store offset");
        }
    }
}

/// Commits the stored offsets and leaves the group, on shutdown.
fn leave(consumer: &KafkaConsumer) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error.message = %e, "committing offsets on shutdown failed"),
    }
    consumer.unsubscribe();
}

/// Copies a record out of the consumer's buffer ([`kafka_record::to_record`]), makes its span a
/// child of the trace context in its headers ([`trace_headers`]), and counts how long it took
/// to arrive. Every part of it (key, payload, each header's name and value) may hold any bytes.
pub fn to_record<M: Message>(message: &M) -> Record
where
    M::Headers: HeaderList,
{
    let record = kafka_record::to_record(message);
    telemetry::extract(&record.span, &trace_headers(message));
    if let Some(produced_ms) = message.timestamp().to_millis() {
        let now_ms = chrono::Utc::now().timestamp_millis();
        // Clocks of other hosts may run ahead; a negative delay says nothing.
        if now_ms >= produced_ms {
            ::metrics::histogram!(metrics::RECORD_DELIVERY_SECONDS, "topic" => message.topic().to_owned())
                .record((now_ms - produced_ms) as f64 / 1_000.0);
        }
    }
    record
}

/// Waits until `at` (the stall check's time; the `select!` arm is off without one).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Handles `batch` in as few transactions as it can. First all of it in one transaction
/// without savepoints: nearly every batch holds only good records, and a savepoint costs two
/// round trips per record. When a record fails, that transaction is rolled back and the batch
/// is handled carefully: one transaction with a savepoint per record, so a record the handler
/// rejects is rolled back alone and dead-lettered in the same transaction while the others
/// commit. A record that fails transiently ends the careful transaction there: what came
/// before it commits, the record is retried alone, and the rest of the batch goes on after it.
/// Records of one partition keep their order. Returns `false` only when told to shut down
/// while a record kept failing.
async fn process_batch<H: Handler>(
    database: &mut Database<'_>,
    handler: &H,
    batch: &[Record],
    dead_letters: &DeadLetters,
    shutdown: &CancellationToken,
) -> Finished {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let began = Instant::now();
        let failure = match handle_in_one_transaction(
            database,
            handler,
            batch,
            dead_letters,
            Savepoints::None,
        )
        .await
        {
            Ok(Handled { count, .. }) if count == batch.len() => {
                database.works();
                return Finished::Committed;
            }
            Ok(Handled { stopped_by, .. }) => stopped_by,
            Err(e) => Some(e),
        };
        match failure {
            // The database, not a record: the whole batch waits for it (or is given up), and
            // no record is tried alone for nothing.
            Some(e @ HandlerError::Unavailable(_)) => {
                tracing::warn!(error.message = %Chain(&e), records = batch.len(), "database unavailable; retrying");
                if let Some(finished) = database.failed(&e, began) {
                    return finished;
                }
                if !pause(&mut backoff, shutdown).await {
                    return Finished::ShutDown;
                }
            }
            Some(e) => {
                tracing::debug!(error.message = %Chain(&e), records = batch.len(), "a record failed; handling the batch with a savepoint per record");
                break;
            }
            None => break,
        }
    }
    let mut rest = batch;
    while !rest.is_empty() {
        let failed_at = match handle_in_one_transaction(
            database,
            handler,
            rest,
            dead_letters,
            Savepoints::PerRecord,
        )
        .await
        {
            Ok(Handled { count, .. }) if count == rest.len() => {
                database.works();
                return Finished::Committed;
            }
            Ok(Handled { count, stopped_by }) => {
                if let Some(e) = stopped_by {
                    tracing::debug!(error.message = %Chain(&e), handled = count, "a record failed; retrying it alone");
                }
                count
            }
            // The transaction itself failed (begin, savepoint or commit): nothing of it stayed.
            Err(e) => {
                tracing::debug!(error.message = %Chain(&e), records = rest.len(), "transaction failed; retrying its first record alone");
                0
            }
        };
        let record = &rest[failed_at];
        match process(database, handler, record, dead_letters, shutdown).await {
            Finished::Committed => {}
            other => return other,
        }
        rest = &rest[failed_at + 1..];
    }
    Finished::Committed
}

/// Waits for the backoff's next delay; `false` when told to shut down meanwhile.
async fn pause(backoff: &mut Backoff, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(backoff.next_delay()) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// How [`handle_in_one_transaction`] guards one record's work from the others'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Savepoints {
    /// None: the first failing record stops the transaction, and nothing of it commits.
    None,
    /// One per record: a rejected record is rolled back alone and dead-lettered.
    PerRecord,
}

/// How far [`handle_in_one_transaction`] got.
struct Handled {
    /// Records handled or dead-lettered, from the start; all committed.
    count: usize,
    /// The error that stopped it before the end.
    stopped_by: Option<HandlerError>,
}

/// Handles `records` in order in one transaction until one fails (with
/// [`Savepoints::PerRecord`], until one fails transiently; a rejected one is dead-lettered),
/// writes their outgoing messages to the outbox and commits what was handled. Without
/// savepoints a failure commits nothing.
/// The whole call (a connection, the transaction, its commit) has the database's next deadline
/// ([`Database::next_deadline`]).
async fn handle_in_one_transaction<H: Handler>(
    database: &mut Database<'_>,
    handler: &H,
    records: &[Record],
    dead_letters: &DeadLetters,
    savepoints: Savepoints,
) -> Result<Handled, HandlerError> {
    let received = std::time::Instant::now();
    let (mut connection, call) = database.acquire().await?;
    let work = transaction(&mut connection, handler, records, dead_letters, savepoints);
    let outcome = tokio::time::timeout_at(call.until, work).await;
    let handled = match outcome {
        Ok(handled) => handled?,
        Err(_) => return Err(Database::ran_out(connection, call)),
    };
    database.keep(connection);
    let elapsed = received.elapsed().as_secs_f64();
    for (record, outcome) in records.iter().zip(&handled.outcomes) {
        count_handled(record, outcome, elapsed);
    }
    Ok(Handled {
        count: handled.outcomes.len(),
        stopped_by: handled.stopped_by,
    })
}

/// What [`transaction`] committed.
struct Committed {
    /// What became of each record handled, from the start.
    outcomes: Vec<&'static str>,
    stopped_by: Option<HandlerError>,
}

/// [`handle_in_one_transaction`]'s transaction on `connection`.
async fn transaction<H: Handler>(
    connection: &mut PgConnection,
    handler: &H,
    records: &[Record],
    dead_letters: &DeadLetters,
    savepoints: Savepoints,
) -> Result<Committed, HandlerError> {
    let mut outcomes = Vec::with_capacity(records.len());
    let mut stopped_by = None;
    async {
        let mut tx = sqlx::Connection::begin(&mut *connection).await?;
        let mut outbox = Outbox::default();
        if savepoints == Savepoints::None {
            if let Err(e) = handler.handle_batch(&mut tx, &mut outbox, records).await {
                stopped_by = Some(e);
                // Rolled back now, not when the connection is next used: it is kept, and the
                // next try may come only after a pause (its locks must not wait with it).
                tx.rollback().await?;
                return Ok(());
            }
            outcomes.resize(records.len(), "handled");
        } else {
            for record in records {
                let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
                let mut messages = Outbox::default();
                match handler
                    .handle(&mut savepoint, &mut messages, record)
                    .instrument(record.span.clone())
                    .await
                {
                    Ok(()) => {
                        savepoint.commit().await?;
                        outbox.append(&mut messages);
                        outcomes.push("handled");
                    }
                    Err(rejected @ HandlerError::Reject(_)) => {
                        savepoint.rollback().await?;
                        ::metrics::counter!(metrics::HANDLER_ERRORS, "kind" => "reject").increment(1);
                        let reason = rejected.reason();
                        record.span.in_scope(|| tracing::warn!(reason = %reason, "message rejected; sending it to the dead-letter topic"));
                        enqueue_dead_letter(&mut tx, &mut outbox, record, dead_letters, &reason)
                            .instrument(record.span.clone())
                            .await?;
                        outcomes.push("dead_lettered");
                    }
                    Err(e) => {
                        savepoint.rollback().await?;
                        stopped_by = Some(e);
                        break;
                    }
                }
            }
        }
        outbox.write(&mut tx, Wake::InProcess).await?;
        tx.commit().await?;
        Ok::<_, HandlerError>(())
    }
    .instrument(tracing::info_span!("db.transaction", records = records.len()))
    .await?;
    Ok(Committed {
        outcomes,
        stopped_by,
    })
}

fn count_handled(record: &Record, outcome: &'static str, seconds: f64) {
    if outcome == "dead_lettered" {
        ::metrics::counter!(metrics::DEAD_LETTERS, "topic" => record.topic.clone()).increment(1);
    }
    // By partition too: the instances of a service share its work by partition, and how much
    // each one did (`sagactl load`'s report per instance) is read off this counter.
    ::metrics::counter!(
        metrics::MESSAGES_CONSUMED,
        "topic" => record.topic.clone(),
        "partition" => record.partition.to_string(),
        "outcome" => outcome
    )
    .increment(1);
    ::metrics::histogram!(metrics::HANDLE_SECONDS, "topic" => record.topic.clone()).record(seconds);
}

/// Handles `record` alone until it is committed or dead-lettered: transient failures are
/// retried with backoff, at most [`MAX_RETRIES`] times in a row while the database answers.
/// Ends otherwise only when told to shut down, or when the database has been unavailable too
/// long, while the record kept failing.
async fn process<H: Handler>(
    database: &mut Database<'_>,
    handler: &H,
    record: &Record,
    dead_letters: &DeadLetters,
    shutdown: &CancellationToken,
) -> Finished {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut retries = 0;
    let mut give_up: Option<String> = None;
    loop {
        let began = Instant::now();
        let failure = match &give_up {
            None => match handle_in_one_transaction(
                database,
                handler,
                std::slice::from_ref(record),
                dead_letters,
                Savepoints::PerRecord,
            )
            .await
            {
                Ok(Handled { count: 1, .. }) => {
                    database.works();
                    return Finished::Committed;
                }
                Ok(Handled { stopped_by, .. }) => stopped_by,
                Err(e) => Some(e),
            },
            Some(reason) => match dead_letter(database, record, dead_letters, reason).await {
                Ok(()) => {
                    database.works();
                    count_handled(record, "dead_lettered", 0.0);
                    return Finished::Committed;
                }
                Err(e) => Some(e),
            },
        };
        let Some(e) = failure else {
            return Finished::Committed;
        };
        match &e {
            HandlerError::Unavailable(_) => {
                record.span.in_scope(
                    || tracing::warn!(error.message = %Chain(&e), "database unavailable; retrying"),
                );
                if let Some(finished) = database.failed(&e, began) {
                    return finished;
                }
            }
            // Only the transaction around the record can be rejected here (a deferred
            // constraint at commit, say): the record goes to the dead-letter topic.
            HandlerError::Reject(_) | HandlerError::Retry(_) if give_up.is_none() => {
                retries += 1;
                if matches!(e, HandlerError::Reject(_)) || retries >= MAX_RETRIES {
                    let why = format!("gave up after {retries} attempts: {}", e.reason());
                    record.span.in_scope(|| tracing::error!(reason = %why, "sending the message to the dead-letter topic"));
                    give_up = Some(why);
                    continue;
                }
                ::metrics::counter!(metrics::HANDLER_ERRORS, "kind" => "retry").increment(1);
                record.span.in_scope(
                    || tracing::warn!(error.message = %Chain(&e), retries, "handling failed; retrying"),
                );
            }
            _ => {
                record.span.in_scope(
                    || tracing::warn!(error.message = %Chain(&e), "dead-lettering failed; retrying"),
                );
            }
        }
        if !pause(&mut backoff, shutdown).await {
            return Finished::ShutDown;
        }
    }
}

/// The dead-letter copy of `record` ([`kafka_record::dead_letter::dead_letter_copy`]: bounded
/// so that it can always be stored and sent), to `dead_letters.topic`.
pub fn dead_letter_copy(
    record: &Record,
    dead_letters: &DeadLetters,
    reason: &str,
) -> OutgoingMessage {
    let DeadLetterCopy {
        key,
        payload,
        headers,
    } = kafka_record::dead_letter::dead_letter_copy(record, &dead_letters.consumer, reason);
    OutgoingMessage {
        topic: dead_letters.topic.clone(),
        key,
        payload,
        headers,
    }
}

/// Dead-letters `record` in a transaction of its own, within the database's next deadline.
async fn dead_letter(
    database: &mut Database<'_>,
    record: &Record,
    dead_letters: &DeadLetters,
    reason: &str,
) -> Result<(), HandlerError> {
    let (mut connection, call) = database.acquire().await?;
    let work = async {
        let mut tx = sqlx::Connection::begin(&mut *connection).await?;
        let mut outbox = Outbox::default();
        enqueue_dead_letter(&mut tx, &mut outbox, record, dead_letters, reason).await?;
        outbox.write(&mut tx, Wake::InProcess).await?;
        tx.commit().await?;
        Ok(())
    };
    // Bound first: the timed-out call's borrow of the connection ends with the statement.
    let outcome = tokio::time::timeout_at(call.until, work).await;
    match outcome {
        Ok(Ok(())) => {
            database.keep(connection);
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Database::ran_out(connection, call)),
    }
}

/// Writes the dead-letter copy of `record` to the outbox, unless the record was dead-lettered
/// before (it is delivered again when a crash came before its offset was committed).
async fn enqueue_dead_letter(
    tx: &mut PgConnection,
    outbox: &mut Outbox,
    record: &Record,
    dead_letters: &DeadLetters,
    reason: &str,
) -> Result<(), HandlerError> {
    let first = sqlx::query!(
        "INSERT INTO dead_lettered (source_topic, source_partition, source_offset)
         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        record.topic,
        record.partition,
        record.offset,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if first {
        outbox.push(dead_letter_copy(record, dead_letters, reason));
    } else {
        tracing::info!("record dead-lettered before; not copied again");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The batch path against a real PostgreSQL (`TEST_DATABASE_URL`), in a schema of its own.

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::config::DatabaseConfig;

    /// Counts its calls; rejects `bad`, fails `flaky` once with a transient error, and records
    /// every other record's offset in `handled`.
    #[derive(Default)]
    struct CountingHandler {
        calls: AtomicUsize,
        flaky_failed: AtomicBool,
    }

    impl Handler for CountingHandler {
        async fn handle_batch(
            &self,
            tx: &mut PgConnection,
            _outbox: &mut Outbox,
            records: &[Record],
        ) -> Result<(), HandlerError> {
            for record in records {
                self.calls.fetch_add(1, Ordering::SeqCst);
                match record.payload.as_slice() {
                    b"bad" => return Err(HandlerError::Reject("bad record".into())),
                    b"flaky" if !self.flaky_failed.swap(true, Ordering::SeqCst) => {
                        return Err(HandlerError::Retry("deadlock detected".into()))
                    }
                    _ => {}
                }
                sqlx::query("INSERT INTO handled (record_offset) VALUES ($1)")
                    .bind(record.offset)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(())
        }
    }

    fn record(offset: i64, payload: &[u8]) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset,
            key: Some(b"k\0\xff".to_vec()),
            payload: payload.to_vec(),
            span: tracing::Span::none(),
        }
    }

    #[tokio::test]
    async fn a_bad_record_costs_its_batch_one_rollback_then_a_savepoint_per_record() {
        let (pool, schema) = test_schema().await;
        let batch: Vec<Record> = (0..10)
            .map(|offset| match offset {
                3 => record(offset, b"bad"),
                6 => record(offset, b"flaky"),
                _ => record(offset, b"good"),
            })
            .collect();
        let handler = CountingHandler::default();
        let dead_letters = DeadLetters {
            topic: "dlq".into(),
            consumer: "test".into(),
        };
        let health = Health::default();
        let done = process_batch(
            &mut Database::new(&pool, deadlines(), &health),
            &handler,
            &batch,
            &dead_letters,
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(done, Finished::Committed);

        let handled: Vec<i64> =
            sqlx::query_scalar("SELECT record_offset FROM handled ORDER BY record_offset")
                .fetch_all(&pool)
                .await
                .expect("handled");
        assert_eq!(
            handled,
            [0, 1, 2, 4, 5, 6, 7, 8, 9],
            "every good record once"
        );
        let dead: Vec<(String, Option<Vec<u8>>)> =
            sqlx::query_as("SELECT topic, message_key FROM outbox")
                .fetch_all(&pool)
                .await
                .expect("outbox");
        assert_eq!(
            dead,
            [("dlq".to_owned(), Some(b"k\0\xff".to_vec()))],
            "the bad one dead-lettered once, key kept"
        );
        assert_eq!(
            handler.calls.load(Ordering::SeqCst),
            4 + 11,
            "the batch without savepoints up to the bad record, then with savepoints each \
             record once and the flaky one once more"
        );
        drop_schema(&pool, &schema).await;
    }

    #[tokio::test]
    async fn a_record_delivered_again_is_not_dead_lettered_again() {
        let (pool, schema) = test_schema().await;
        let dead_letters = DeadLetters {
            topic: "dlq".into(),
            consumer: "test".into(),
        };
        let handler = CountingHandler::default();
        let health = Health::default();
        // A crash between the commit and the offset commit delivers the record again.
        for _ in 0..2 {
            let batch = [record(41, b"bad"), record(42, b"bad")];
            assert_eq!(
                process_batch(
                    &mut Database::new(&pool, deadlines(), &health),
                    &handler,
                    &batch,
                    &dead_letters,
                    &CancellationToken::new()
                )
                .await,
                Finished::Committed
            );
        }
        let copies: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await
            .expect("outbox");
        assert_eq!(copies, 2, "one copy per record");
        drop_schema(&pool, &schema).await;
    }

    fn deadlines() -> Deadlines {
        Deadlines::of(&DatabaseConfig::to(""))
    }

    async fn test_schema() -> (PgPool, String) {
        let schema = format!(
            "consumer_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let config = DatabaseConfig {
            database_url: format!("{}/postgres", server()),
            database_schema: Some(schema.clone()),
            database_max_connections: 2,
            ..DatabaseConfig::to("")
        };
        let (pool, _) = crate::db::open(&config, "unused", &[])
            .await
            .expect("database");
        sqlx::query("CREATE TABLE handled (record_offset bigint PRIMARY KEY)")
            .execute(&pool)
            .await
            .expect("table");
        (pool, schema)
    }

    async fn drop_schema(pool: &PgPool, schema: &str) {
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(pool)
            .await
            .expect("drop schema");
    }

    #[tokio::test]
    async fn errors_are_sorted_by_what_another_try_can_change() {
        assert!(matches!(
            HandlerError::from(sqlx::Error::PoolTimedOut),
            HandlerError::Unavailable(_)
        ));
        assert!(matches!(
            HandlerError::from(sqlx::Error::RowNotFound),
            HandlerError::Reject(_)
        ));
        // Errors as PostgreSQL itself reports them.
        let pool = sqlx::PgPool::connect(&format!("{}/postgres", server()))
            .await
            .expect("database");
        for (code, expected) in [
            ("40P01", "retryable"),            // deadlock
            ("40001", "retryable"),            // serialization failure
            ("55P03", "retryable"),            // lock not available
            ("23505", "rejected"),             // unique violation
            ("22021", "rejected"),             // bad byte sequence (a NUL in text)
            ("23503", "rejected"),             // foreign key violation
            ("22003", "rejected"),             // numeric value out of range
            ("54000", "rejected"),             // program limit exceeded (index row too big)
            ("57014", "retryable"),            // query canceled (statement timeout)
            ("57P01", "database unavailable"), // admin shutdown
            ("57P03", "database unavailable"), // cannot connect now (starting up)
            ("08006", "database unavailable"), // connection failure
            ("25006", "database unavailable"), // read-only transaction (failover, full disk)
            ("53100", "database unavailable"), // disk full
            ("53300", "database unavailable"), // too many connections
            ("58030", "database unavailable"), // I/O error
            ("XX000", "database unavailable"), // internal error
            ("XX001", "database unavailable"), // data corrupted
            ("42501", "database unavailable"), // insufficient privilege (a revoked grant)
        ] {
            let raised = sqlx::query(&format!(
                "DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '{code}'; END $$"
            ))
            .execute(&pool)
            .await
            .expect_err("raised");
            let sorted = HandlerError::from(raised).to_string();
            assert!(sorted.starts_with(expected), "{code}: {sorted}");
        }
    }

    /// The dead-letter reason reads as it did when the variants held the cause's text, and the
    /// typed cause is still there.
    #[tokio::test]
    async fn a_rejection_keeps_its_typed_cause_and_reads_as_before() {
        let pool = sqlx::PgPool::connect(&format!("{}/postgres", server()))
            .await
            .expect("database");
        let raised =
            sqlx::query("DO $$ BEGIN RAISE EXCEPTION 'dup' USING ERRCODE = '23505'; END $$")
                .execute(&pool)
                .await
                .expect_err("raised");
        let text = raised.to_string();
        let rejected = HandlerError::from(raised);
        let reason = format!("database refused the message: {text}");
        assert_eq!(rejected.reason(), reason);
        assert_eq!(chain(&rejected), format!("rejected: {reason}"));
        let refusal = std::error::Error::source(&rejected)
            .and_then(|cause| cause.downcast_ref::<DatabaseRefusal>())
            .expect("the typed cause");
        assert!(
            matches!(refusal, DatabaseRefusal::Refused(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505")),
            "{refusal:?}"
        );
        let dead_letters = DeadLetters {
            topic: "dlq".into(),
            consumer: "test".into(),
        };
        let copy = dead_letter_copy(&record(1, b"x"), &dead_letters, &rejected.reason());
        assert_eq!(copy.headers["dlq.reason"], reason);
        // A text is a cause too, and reads as itself.
        assert_eq!(HandlerError::reject("bad record").reason(), "bad record");
    }

    fn server() -> String {
        std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
    }
}
