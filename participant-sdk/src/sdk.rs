//! What a participant author writes ([`Step`], [`Participant`]) and the entry points that run
//! it ([`main`], [`run`]); the crate root re-exports them and says how they fit together.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use clap::{Args, CommandFactory, FromArgMatches, Parser};
use messaging::consumer::HandlerError;
use messaging::BoxError;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ParticipantConfig;

/// One saga step a participant serves: how to do it for a batch of requests, and how to undo
/// it. Both run inside the runtime's transaction (with the inbox row, the ledger and the
/// reply) and must touch only the participant's own tables.
pub trait Step: Send + Sync + 'static {
    /// The step name as the saga definitions name it, e.g. `"reserve_stock"`.
    const STEP: &'static str;
    /// The forward command's payload, as the definition maps it. Fields it does not name are
    /// ignored (unless it says otherwise), so a definition may send more. Fields whose range
    /// matters take a type that checks it while decoding (`events::Line`, `Cents`,
    /// `Currency`): a command out of range is dead-lettered with the reason, and the step
    /// never sees it.
    type Forward: DeserializeOwned + Send + Sync + 'static;
    /// The compensation's payload.
    type Compensation: DeserializeOwned + Send + Sync + 'static;
    /// A business refusal: the participant changed nothing. Its text is the reply's reason.
    type Failure: fmt::Display + Send;

    /// Does the forward step of every request, as if one after the other in this order (a
    /// later one sees what an earlier one took), and returns their outcomes in the same order.
    /// The runtime hands over every forward request of a batch that is due at once (none of
    /// them answered from the ledger), so a step can do them in a few statements.
    fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, Self::Forward>],
    ) -> impl Future<Output = Result<Vec<Result<(), Self::Failure>>, StepError>> + Send;

    /// Undoes the step of `request`. Must succeed, doing nothing, when there is nothing to
    /// undo (the forward step never ran here). A `Failure` means it cannot be undone this time
    /// (the orchestrator retries).
    fn compensate(
        &self,
        tx: &mut PgConnection,
        request: Request<'_, Self::Compensation>,
    ) -> impl Future<Output = Result<Result<(), Self::Failure>, StepError>> + Send;
}

/// Why a step could not do its work this time, for a reason that is no business refusal (that
/// is [`Step::Failure`], which the saga hears as the step's failure reply). The runtime rolls
/// the command's transaction back and then, as the variant says, dead-letters the command,
/// tries it again, or waits for the database. `?` on a database error sorts it as the runtime
/// would (its `From<sqlx::Error>`).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The command can never be done (what it asks is against the step's own rules): it goes
    /// to the dead-letter topic, with this cause as its reason.
    #[error("rejected")]
    Reject(#[source] BoxError),
    /// It may pass on another try (a deadlock, a concurrent update): tried again, a bounded
    /// number of times, then dead-lettered with this cause.
    #[error("retryable")]
    Retry(#[source] BoxError),
    /// The database is unreachable or unwell: tried again for as long as that lasts, and the
    /// participant says it is not ready meanwhile.
    #[error("database unavailable")]
    Unavailable(#[source] BoxError),
}

impl StepError {
    /// [`StepError::Reject`] for `reason` (a typed error, or a text).
    pub fn reject(reason: impl Into<BoxError>) -> Self {
        Self::Reject(reason.into())
    }

    /// [`StepError::Retry`] for `cause`.
    pub fn retry(cause: impl Into<BoxError>) -> Self {
        Self::Retry(cause.into())
    }
}

impl From<sqlx::Error> for StepError {
    /// As the runtime sorts database errors: what the command's own data causes rejects it, a
    /// conflict with other transactions is retried, anything else is the database unavailable
    /// (`messaging::consumer::HandlerError`'s `From<sqlx::Error>`).
    fn from(e: sqlx::Error) -> Self {
        match HandlerError::from(e) {
            HandlerError::Reject(cause) => Self::Reject(cause),
            HandlerError::Retry(cause) => Self::Retry(cause),
            HandlerError::Unavailable(cause) => Self::Unavailable(cause),
        }
    }
}

/// A step's error as the consume loop takes it: the runtime's edge.
pub(crate) fn to_handler_error(e: StepError) -> HandlerError {
    match e {
        StepError::Reject(cause) => HandlerError::Reject(cause),
        StepError::Retry(cause) => HandlerError::Retry(cause),
        StepError::Unavailable(cause) => HandlerError::Unavailable(cause),
    }
}

/// One command for a step: the saga it belongs to and its typed payload.
#[derive(Debug)]
pub struct Request<'a, T> {
    pub saga_id: Uuid,
    /// The saga's key (the order saga: the order id), as the command carried it.
    pub key: &'a str,
    /// 1 for the first command, one more for each re-send.
    pub attempt: u32,
    pub payload: &'a T,
}

// By hand: a derive would ask `T: Copy`, and a request only holds a reference to it.
impl<T> Clone for Request<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Request<'_, T> {}

/// No settings of the participant's own, for [`main`].
#[derive(Debug, Clone, Default, Args)]
pub struct NoSettings {}

/// A participant: its name (its schema, consumer group, default command topic and log name),
/// its migrations and the steps it serves.
pub struct Participant {
    pub(crate) name: &'static str,
    pub(crate) migrations: &'static Migrator,
    pub(crate) steps: Vec<Box<dyn ServedStep>>,
    pub(crate) metrics_port: Option<u16>,
}

impl Participant {
    /// `name`: lower-case letters, digits and `_`; `migrations`: its own tables (and demo
    /// data), applied after the runtime's.
    pub fn new(name: &'static str, migrations: &'static Migrator) -> Self {
        Self {
            name,
            migrations,
            steps: Vec::new(),
            metrics_port: None,
        }
    }

    /// Serves `step` too. A step name served twice stops the start.
    #[must_use]
    pub fn step<S: Step>(mut self, step: S) -> Self {
        self.steps.push(Box::new(step));
        self
    }

    /// [`main`] serves `/metrics` on `127.0.0.1:port` unless `METRICS_ADDR` says otherwise.
    #[must_use]
    pub fn metrics_port(mut self, port: u16) -> Self {
        self.metrics_port = Some(port);
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The steps it serves, in the order they were added.
    pub fn step_names(&self) -> Vec<&'static str> {
        self.steps.iter().map(|s| s.name()).collect()
    }

    /// Reads `payload` (a command record's bytes) as the runtime does before it touches the
    /// database: the envelope, a step this participant serves, and that step's typed request.
    /// An error is the reason the runtime would dead-letter the record with. The contract tests
    /// check with it that every command the saga definitions make, and every one the contract
    /// allows, is one the participant reads.
    ///
    /// # Errors
    /// An invalid command, a step it does not serve, a payload that does not fit the step.
    pub fn read_command(
        &self,
        payload: &[u8],
    ) -> Result<events::Envelope<events::Command>, messaging::BoxError> {
        crate::runtime::read_command(self.name, &self.steps, payload)
            .map(|(envelope, _, _)| envelope)
            .map_err(|e| match e {
                messaging::consumer::HandlerError::Reject(cause)
                | messaging::consumer::HandlerError::Retry(cause)
                | messaging::consumer::HandlerError::Unavailable(cause) => cause,
            })
    }

    /// What the runtime migrates its schema with (after the messaging tables): the runtime's
    /// tables, then its own.
    pub(crate) fn schema_migrations(&self) -> [&'static Migrator; 2] {
        [&crate::RUNTIME_MIGRATIONS, self.migrations]
    }

    /// How to tell that it is ready, for whoever starts it and waits before sending it work.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            migrations: self.schema_migrations(),
        }
    }

    /// Refuses a participant the runtime could not serve: no step, a step name that is no
    /// name on the wire, or one served twice.
    pub fn check(&self) -> messaging::Result<()> {
        let config = |problem: String| Err(messaging::Error::Config(problem));
        let valid_name = !self.name.is_empty()
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid_name {
            return config(format!("{:?} is not a participant name", self.name));
        }
        if self.steps.is_empty() {
            return config(format!("participant {} serves no step", self.name));
        }
        for (i, step) in self.steps.iter().enumerate() {
            if !events::is_name(step.name()) {
                return config(format!("{:?} is not a step name", step.name()));
            }
            if self.steps[..i].iter().any(|s| s.name() == step.name()) {
                return config(format!("step {} is served twice", step.name()));
            }
        }
        Ok(())
    }
}

/// When a participant is ready: once its schema has every one of its migrations. The runtime
/// migrates before it consumes a command, and a participant's data (demo data among it) comes
/// with its migrations, so a ready participant has what the commands it gets need.
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    migrations: [&'static Migrator; 2],
}

impl Readiness {
    /// Whether the participant whose schema `pool` uses (as its search path) is ready.
    ///
    /// # Errors
    /// When the schema cannot be read.
    pub async fn is_ready(&self, pool: &PgPool) -> messaging::Result<bool> {
        messaging::db::is_migrated(pool, &self.migrations).await
    }
}

#[derive(Parser)]
struct Cli<S: Args> {
    #[command(flatten)]
    config: ParticipantConfig,
    #[command(flatten)]
    settings: S,
}

/// The `main` of every participant binary: reads the settings (flags and environment; `S`,
/// the participant's own, beside the runtime's), builds the participant from them, and runs
/// it until SIGTERM or Ctrl-C, with logs and traces.
///
/// # Errors
/// Bad settings, and whatever stops the participant ([`run`]); `main` prints it with its
/// causes ([`messaging::Report`]).
pub fn main<S: Args>(
    about: &'static str,
    build: impl FnOnce(S) -> Participant,
) -> Result<(), messaging::Report> {
    let matches = Cli::<S>::command().about(about).get_matches();
    let cli = Cli::<S>::from_arg_matches(&matches)?;
    let participant = build(cli.settings);
    let mut config = cli.config;
    if let Some(port) = participant.metrics_port {
        config
            .metrics_addr
            .get_or_insert(crate::default_metrics_addr(port));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let _telemetry = messaging::telemetry::init(participant.name);
            let shutdown = messaging::shutdown::on_signals();
            let service = run(participant, config, shutdown.clone());
            messaging::shutdown::bounded(service, shutdown).await?;
            Ok(())
        })
}

/// Runs `participant` until `shutdown` is cancelled.
///
/// # Errors
/// Start-up failures: the participant's description, database, migrations, Kafka.
pub async fn run(
    participant: Participant,
    config: ParticipantConfig,
    shutdown: CancellationToken,
) -> messaging::Result<()> {
    participant.check()?;
    crate::runtime::run(participant, config, shutdown).await
}

// ---------------------------------------------------------------------------------------------
// The runtime's view of a step: object-safe, payloads decoded ahead and passed as `Any`.

/// A payload decoded into its step's type.
pub(crate) type Decoded = Box<dyn Any + Send + Sync>;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a step or compensation went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StepOutcome {
    Done,
    /// Refused for a business reason; the participant changed nothing.
    Refused(String),
}

/// A request whose payload was decoded by the step that gets it.
pub(crate) struct DecodedRequest<'a> {
    pub saga_id: Uuid,
    pub key: &'a str,
    pub attempt: u32,
    pub payload: &'a Decoded,
}

pub(crate) trait ServedStep: Send + Sync {
    fn name(&self) -> &'static str;

    /// The payload of a forward command (`compensation` false) or a compensation as this
    /// step's typed request, or why it does not fit.
    fn decode(
        &self,
        compensation: bool,
        payload: &Map<String, Value>,
    ) -> Result<Decoded, serde_json::Error>;

    fn forward_all<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        requests: &'a [DecodedRequest<'a>],
    ) -> BoxFuture<'a, Result<Vec<StepOutcome>, HandlerError>>;

    fn compensate<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        request: &'a DecodedRequest<'a>,
    ) -> BoxFuture<'a, Result<StepOutcome, HandlerError>>;
}

/// A payload decoded by another step than the one it is handed to: a bug in the runtime.
#[derive(Debug, thiserror::Error)]
#[error("a payload decoded for another step reached {step}")]
pub(crate) struct Misrouted {
    step: &'static str,
}

fn typed<'a, T: 'static>(
    request: &DecodedRequest<'a>,
    step: &'static str,
) -> Result<Request<'a, T>, HandlerError> {
    let payload = request
        .payload
        .downcast_ref::<T>()
        .ok_or_else(|| HandlerError::reject(Misrouted { step }))?;
    Ok(Request {
        saga_id: request.saga_id,
        key: request.key,
        attempt: request.attempt,
        payload,
    })
}

fn outcome<F: fmt::Display>(result: Result<(), F>) -> StepOutcome {
    match result {
        Ok(()) => StepOutcome::Done,
        Err(failure) => StepOutcome::Refused(failure.to_string()),
    }
}

impl<S: Step> ServedStep for S {
    fn name(&self) -> &'static str {
        S::STEP
    }

    fn decode(
        &self,
        compensation: bool,
        payload: &Map<String, Value>,
    ) -> Result<Decoded, serde_json::Error> {
        if compensation {
            S::Compensation::deserialize(payload).map(|p| Box::new(p) as Decoded)
        } else {
            S::Forward::deserialize(payload).map(|p| Box::new(p) as Decoded)
        }
    }

    fn forward_all<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        requests: &'a [DecodedRequest<'a>],
    ) -> BoxFuture<'a, Result<Vec<StepOutcome>, HandlerError>> {
        Box::pin(async move {
            let typed: Vec<Request<'a, S::Forward>> = requests
                .iter()
                .map(|r| typed(r, S::STEP))
                .collect::<Result<_, _>>()?;
            let outcomes = Step::forward_all(self, tx, &typed)
                .await
                .map_err(to_handler_error)?;
            Ok(outcomes.into_iter().map(outcome).collect())
        })
    }

    fn compensate<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        request: &'a DecodedRequest<'a>,
    ) -> BoxFuture<'a, Result<StepOutcome, HandlerError>> {
        Box::pin(async move {
            let request = typed::<S::Compensation>(request, S::STEP)?;
            let done = Step::compensate(self, tx, request)
                .await
                .map_err(to_handler_error)?;
            Ok(outcome(done))
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::de::IgnoredAny;

    use super::*;

    static NO_MIGRATIONS: Migrator = Migrator::DEFAULT;

    /// A step whose forward request needs a positive `n`.
    struct Count;

    #[derive(Debug, Deserialize)]
    struct Needs {
        n: u32,
    }

    impl Step for Count {
        const STEP: &'static str = "count";
        type Forward = Needs;
        type Compensation = IgnoredAny;
        type Failure = String;

        async fn forward_all(
            &self,
            _tx: &mut PgConnection,
            requests: &[Request<'_, Needs>],
        ) -> Result<Vec<Result<(), String>>, StepError> {
            Ok(requests
                .iter()
                .map(|r| (r.payload.n > 0).then_some(()).ok_or("zero".to_owned()))
                .collect())
        }

        async fn compensate(
            &self,
            _tx: &mut PgConnection,
            _request: Request<'_, IgnoredAny>,
        ) -> Result<Result<(), String>, StepError> {
            Ok(Ok(()))
        }
    }

    /// The same step name under another type.
    struct CountAgain;

    impl Step for CountAgain {
        const STEP: &'static str = "count";
        type Forward = IgnoredAny;
        type Compensation = IgnoredAny;
        type Failure = String;

        async fn forward_all(
            &self,
            _tx: &mut PgConnection,
            requests: &[Request<'_, IgnoredAny>],
        ) -> Result<Vec<Result<(), String>>, StepError> {
            Ok(requests.iter().map(|_| Ok(())).collect())
        }

        async fn compensate(
            &self,
            _tx: &mut PgConnection,
            _request: Request<'_, IgnoredAny>,
        ) -> Result<Result<(), String>, StepError> {
            Ok(Ok(()))
        }
    }

    fn payload(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(fields) => fields,
            _ => Map::new(),
        }
    }

    #[test]
    fn a_participant_serves_distinct_named_steps() {
        let serves = |participant: Participant| participant.check().map_err(|e| e.to_string());
        assert_eq!(
            serves(Participant::new("counter", &NO_MIGRATIONS).step(Count)),
            Ok(())
        );
        let none = serves(Participant::new("counter", &NO_MIGRATIONS));
        assert!(none.is_err_and(|e| e.contains("serves no step")));
        let twice = serves(
            Participant::new("counter", &NO_MIGRATIONS)
                .step(Count)
                .step(CountAgain),
        );
        assert!(twice.is_err_and(|e| e.contains("count is served twice")));
        let badly_named = serves(Participant::new("Counter!", &NO_MIGRATIONS).step(Count));
        assert!(badly_named.is_err_and(|e| e.contains("not a participant name")));
        assert_eq!(
            Participant::new("counter", &NO_MIGRATIONS)
                .step(Count)
                .step_names(),
            ["count"]
        );
    }

    #[test]
    fn a_step_error_sorts_database_errors_as_the_runtime_and_keeps_its_cause() {
        assert!(matches!(
            StepError::from(sqlx::Error::PoolTimedOut),
            StepError::Unavailable(_)
        ));
        let rejected = StepError::from(sqlx::Error::RowNotFound);
        assert!(matches!(rejected, StepError::Reject(_)));
        // At the runtime's edge: the same kind, the same cause, the same reason.
        let handled = to_handler_error(rejected);
        assert!(matches!(handled, HandlerError::Reject(_)));
        assert!(handled
            .cause()
            .downcast_ref::<messaging::consumer::DatabaseRefusal>()
            .is_some());
        assert_eq!(
            handled.reason(),
            format!(
                "database error handling the message: {}",
                sqlx::Error::RowNotFound
            )
        );
        let retried = to_handler_error(StepError::retry("a concurrent update"));
        assert_eq!(messaging::chain(&retried), "retryable: a concurrent update");
    }

    #[test]
    fn a_payload_is_decoded_into_its_steps_request_or_refused_with_the_reason() {
        let decoded = Count
            .decode(
                false,
                &payload(serde_json::json!({ "n": 3, "extra": true })),
            )
            .expect("fits, extra fields ignored");
        assert_eq!(decoded.downcast_ref::<Needs>().map(|r| r.n), Some(3));
        let missing = Count.decode(false, &Map::new()).map(|_| ());
        assert!(missing.is_err_and(|e| e.to_string().contains("missing field `n`")));
        let wrong = Count
            .decode(false, &payload(serde_json::json!({ "n": "three" })))
            .map(|_| ());
        assert!(wrong.is_err_and(|e| e.to_string().contains("invalid type")));
        assert!(Count.decode(true, &Map::new()).is_ok());
        // A payload decoded for one step's forward request is not another's.
        let request = DecodedRequest {
            saga_id: Uuid::nil(),
            key: "k",
            attempt: 1,
            payload: &decoded,
        };
        assert!(typed::<IgnoredAny>(&request, "count").is_err());
        assert_eq!(
            typed::<Needs>(&request, "count").map(|r| r.payload.n).ok(),
            Some(3)
        );
    }
}
