//! The SQL of the orchestrator: sagas and their history. Every function that changes a saga
//! takes the handler's transaction.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use messaging::db::column;
use messaging::outbox::{Outbox, Wake};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::saga::{Saga, SagaState, StepState};
use crate::{CorruptColumn, Error, Result};

/// The orchestrator's migrations and the extensions they need live in their own crate, which
/// the admin step (`sagactl provision database`) uses without this server.
pub use orchestrator_schema::{EXTENSIONS, MIGRATIONS};

/// A saga's state as its column holds it (`saga_state`, orchestrator migration 1008): the
/// machine's [`SagaState`], which knows no SQL, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredState(pub SagaState);

impl sqlx::Type<sqlx::Postgres> for StoredState {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_name("saga_state")
    }
}

impl sqlx::postgres::PgHasArrayType for StoredState {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        sqlx::postgres::PgTypeInfo::with_name("_saga_state")
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for StoredState {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.0.as_str(), buf)
    }
}

impl sqlx::Decode<'_, sqlx::Postgres> for StoredState {
    fn decode(
        value: sqlx::postgres::PgValueRef<'_>,
    ) -> std::result::Result<Self, sqlx::error::BoxDynError> {
        let name = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        SagaState::parse(name)
            .map(Self)
            .ok_or_else(|| format!("{name:?} is no saga state").into())
    }
}

#[derive(sqlx::FromRow)]
struct SagaRow {
    id: Uuid,
    state: StoredState,
    /// The trigger message (the column kept its name from when every saga was an order's).
    order_data: serde_json::Value,
    saga_key: String,
    steps: serde_json::Value,
    failure_reason: Option<String>,
    definition_name: String,
    definition_version: i32,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    deadline_at: Option<DateTime<Utc>>,
    /// The database's clock (`now()`: when the transaction began), read by the statements that
    /// lock sagas to move them: every time a saga's move writes comes from that one clock.
    db_now: Option<DateTime<Utc>>,
}

/// `SagaRow`'s columns, for the one statement that is built at run time ([`list`]); the
/// checked statements (`query_as!`) name them in their own text.
const SAGA_COLUMNS: &str = "id, state, order_data, saga_key, steps, failure_reason, \
                            definition_name, definition_version, version, created_at, \
                            updated_at, finished_at, deadline_at, \
                            NULL::timestamptz AS db_now";

impl SagaRow {
    /// The saga, for code that moves it: refused when a column does not hold what this build
    /// reads.
    fn into_saga(self) -> Result<(Saga, i64)> {
        let steps = self.readable_steps()?;
        Ok(self.with_steps(steps))
    }

    /// The saga as far as it can be read, for code that only shows it: a row whose steps or
    /// trigger this build cannot read is shown without steps, with why as its failure reason
    /// (unless it has one: a parked row says so already), so that one such row fails no page of
    /// the status API. Nothing moves a saga read this way.
    fn into_view(self) -> (Saga, i64) {
        match self.readable_steps() {
            Ok(steps) => self.with_steps(steps),
            Err(e) => {
                let mut row = self;
                row.failure_reason
                    .get_or_insert_with(|| messaging::chain(&e));
                row.with_steps(Vec::new())
            }
        }
    }

    fn readable_steps(&self) -> Result<Vec<StepState>> {
        if !self.order_data.is_object() {
            return Err(Error::CorruptRow {
                saga_id: self.id,
                column: "order_data",
                source: CorruptColumn::NotAnObject,
            });
        }
        serde_json::from_value(self.steps.clone()).map_err(|e| Error::CorruptRow {
            saga_id: self.id,
            column: "steps",
            source: e.into(),
        })
    }

    fn with_steps(self, steps: Vec<StepState>) -> (Saga, i64) {
        let saga = Saga {
            id: self.id,
            trigger: self.order_data,
            key: self.saga_key,
            state: self.state.0,
            steps,
            failure_reason: self.failure_reason,
            definition_name: self.definition_name,
            definition_version: self.definition_version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
            deadline_at: self.deadline_at,
        };
        (saga, self.version)
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    // Plain data with string keys always serialises.
    serde_json::to_value(value).unwrap_or_default()
}

/// Stores a new saga and its first history line (`started`) unless a saga of its type and key
/// started already (even one swept since: `saga_dedup`), with the trace context of its trigger
/// (`trace_parent`), and its key's hash (`key_hash`: which partition its messages take, for the
/// deadline scanners' split). Returns whether it was stored. One statement: the saga costs one round trip, whatever it has to touch.
pub async fn insert_saga(
    tx: &mut PgConnection,
    saga: &Saga,
    trace_parent: Option<&str>,
    started: &HistoryEntry,
) -> Result<bool> {
    let inserted = sqlx::query_scalar!(
        r#"WITH first AS (
             INSERT INTO saga_dedup (saga_type, saga_key, saga_id) VALUES ($20, $2, $1)
             ON CONFLICT DO NOTHING RETURNING saga_id
         ), saga AS (
             INSERT INTO sagas (id, saga_key, state, order_data, steps, failure_reason,
                                definition_version, version, created_at, updated_at, finished_at,
                                deadline_at, current_step, trace_parent, definition_name,
                                key_hash)
             SELECT saga_id, $2, $3, $4, $5, $6, $7, 0, $8, $9, $10, $11, $12, $13, $20, $21
             FROM first
             ON CONFLICT (definition_name, saga_key) DO NOTHING RETURNING id
         ), noted AS (
             INSERT INTO saga_history (saga_id, at, message_id, message_type, decision, detail,
                                       state_after)
             SELECT id, $14, $15, $16, $17, $18, $19 FROM saga
         ) SELECT count(*) AS "inserted!" FROM saga"#,
        saga.id,
        saga.key,
        StoredState(saga.state) as StoredState,
        saga.trigger,
        to_json(&saga.steps),
        saga.failure_reason,
        saga.definition_version,
        saga.created_at,
        saga.updated_at,
        saga.finished_at,
        saga.deadline_at,
        saga.step_in_focus(),
        trace_parent,
        started.at,
        started.message_id,
        started.message_type,
        started.decision as HistoryDecision,
        started.detail,
        StoredState(started.state_after) as StoredState,
        saga.definition_name,
        messaging::partitioner::key_hash(saga.key.as_bytes()),
    )
    .fetch_one(tx)
    .await?;
    Ok(inserted == 1)
}

/// Sagas locked to be moved, and the database's time ([`database_now`]), the one clock
/// whatever the move writes is reckoned on.
pub struct Locked<T> {
    pub sagas: T,
    /// `None` only when nothing was locked.
    pub now: Option<DateTime<Utc>>,
}

/// The database's clock: `now()`, when the transaction `db` runs in began. Deadlines, and
/// every time a saga's row and history hold, are reckoned on it rather than on the clock of
/// the instance that writes them, so instances whose clocks disagree still agree on what is
/// due.
pub async fn database_now(db: impl PgExecutor<'_>) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(db)
        .await?)
}

/// Loads a saga and locks its row until the transaction ends. Returns it with its version and
/// the database's time.
pub async fn load_for_update(
    tx: &mut PgConnection,
    saga_id: Uuid,
) -> Result<Option<(Saga, i64, DateTime<Utc>)>> {
    let row = sqlx::query_as!(
        SagaRow,
        r#"SELECT id, state AS "state: StoredState", order_data, saga_key, steps, failure_reason,
                  definition_name, definition_version, version, created_at, updated_at,
                  finished_at, deadline_at, now() AS "db_now?"
           FROM sagas WHERE id = $1 FOR UPDATE"#,
        saga_id
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let now = match row.db_now {
        Some(now) => now,
        None => database_now(&mut *tx).await?,
    };
    let (saga, version) = row.into_saga()?;
    Ok(Some((saga, version, now)))
}

/// Loads the sagas `saga_ids` and locks their rows until the transaction ends, in id order
/// (so two transactions locking overlapping sets cannot deadlock). Returns the readable ones
/// with their versions, and the ids of those whose row this build cannot read, with why.
pub async fn lock_sagas(
    tx: &mut PgConnection,
    saga_ids: &[Uuid],
) -> Result<Locked<(HashMap<Uuid, (Saga, i64)>, Vec<(Uuid, Error)>)>> {
    let rows = sqlx::query_as!(
        SagaRow,
        r#"SELECT id, state AS "state: StoredState", order_data, saga_key, steps, failure_reason,
                  definition_name, definition_version, version, created_at, updated_at,
                  finished_at, deadline_at, now() AS "db_now?"
           FROM sagas WHERE id = ANY($1) ORDER BY id FOR UPDATE"#,
        saga_ids
    )
    .fetch_all(tx)
    .await?;
    let now = rows.first().and_then(|row| row.db_now);
    let mut sagas = HashMap::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for row in rows {
        let saga_id = row.id;
        match row.into_saga() {
            Ok(saga) => {
                sagas.insert(saga_id, saga);
            }
            Err(e) => unreadable.push((saga_id, e)),
        }
    }
    Ok(Locked {
        sagas: (sagas, unreadable),
        now,
    })
}

/// Who writes a saga: the consume loop (a reply), the deadline scanner or an operator's action.
/// A write its row's version refuses is counted by it ([`crate::metrics::STALE_WRITES_REFUSED`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    Consume,
    Deadline,
    Operator,
}

impl Writer {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Consume => "consume",
            Self::Deadline => "deadline",
            Self::Operator => "operator",
        }
    }

    /// How the relays learn of the messages it writes: the consume loop wakes its own, the
    /// others `NOTIFY`.
    fn wake(self) -> Wake {
        match self {
            Self::Consume => Wake::InProcess,
            Self::Deadline | Self::Operator => Wake::Notify,
        }
    }
}

/// A saga's new state for [`save_transitions`]: written if its row is still at `expected_version`.
pub struct SagaUpdate<'a> {
    pub saga: &'a Saga,
    pub expected_version: i64,
    pub new_version: i64,
}

/// Writes a batch's transitions: every saga of `updates` and every history line of `history`,
/// and the messages queued in `outbox` with the last statement (the transaction's last before
/// its commit). One saga moved once, with its one line (what a quiet system's batches hold),
/// goes through the one-row [`update_saga`], which costs PostgreSQL about a third of the
/// set-wise `UPDATE` for one row; anything else through the set-wise statements.
///
/// # Errors
/// [`Error::VersionConflict`] when a saga changed since it was loaded; nothing should then be
/// committed.
pub async fn save_transitions(
    tx: &mut PgConnection,
    updates: &[SagaUpdate<'_>],
    history: &[(Uuid, HistoryEntry)],
    writer: Writer,
    outbox: &mut Outbox,
) -> Result<()> {
    match (updates, history) {
        ([update], [(saga_id, entry)])
            if *saga_id == update.saga.id && update.new_version == update.expected_version + 1 =>
        {
            update_saga(
                tx,
                update.saga,
                update.expected_version,
                entry,
                writer,
                outbox,
            )
            .await
        }
        _ => {
            update_sagas(tx, updates, writer).await?;
            append_history_lines(tx, history, writer, outbox).await
        }
    }
}

/// Writes every saga of `updates` over its stored row in one statement, each if its row is
/// still at its expected version.
///
/// # Errors
/// [`Error::VersionConflict`] (naming the first saga) when any row changed since it was
/// loaded; nothing should then be committed.
async fn update_sagas(
    tx: &mut PgConnection,
    updates: &[SagaUpdate<'_>],
    writer: Writer,
) -> Result<()> {
    let Some(first) = updates.first() else {
        return Ok(());
    };
    let updated = sqlx::query!(
        r#"UPDATE sagas SET state = u.state, steps = u.steps, failure_reason = u.failure_reason,
                            updated_at = u.updated_at, finished_at = u.finished_at,
                            deadline_at = u.deadline_at, current_step = u.current_step,
                            version = u.new_version
           FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::saga_state[], $5::jsonb[],
                       $6::text[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[],
                       $10::text[])
                AS u(id, expected_version, new_version, state, steps, failure_reason, updated_at,
                     finished_at, deadline_at, current_step)
           WHERE sagas.id = u.id AND sagas.version = u.expected_version"#,
        &column(updates, |u| u.saga.id),
        &column(updates, |u| u.expected_version),
        &column(updates, |u| u.new_version),
        column(updates, |u| StoredState(u.saga.state)) as Vec<StoredState>,
        &column(updates, |u| to_json(&u.saga.steps)),
        &column(updates, |u| u.saga.failure_reason.clone()) as &[Option<String>],
        &column(updates, |u| u.saga.updated_at),
        &column(updates, |u| u.saga.finished_at) as &[Option<DateTime<Utc>>],
        &column(updates, |u| u.saga.deadline_at) as &[Option<DateTime<Utc>>],
        &column(updates, |u| u.saga.step_in_focus()) as &[Option<&str>],
    )
    .execute(tx)
    .await?
    .rows_affected();
    if updated == updates.len() as u64 {
        Ok(())
    } else {
        crate::metrics::stale_writes_refused(writer, updates.len() as u64 - updated);
        Err(Error::VersionConflict {
            saga_id: first.saga.id,
            expected: first.expected_version,
        })
    }
}

/// Appends history lines, each `(saga id, entry)`, and writes the messages queued in `outbox`,
/// in one statement.
async fn append_history_lines(
    tx: &mut PgConnection,
    lines: &[(Uuid, HistoryEntry)],
    writer: Writer,
    outbox: &mut Outbox,
) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let queued = outbox.take();
    sqlx::query!(
        r#"WITH noted AS (
             INSERT INTO saga_history (saga_id, at, message_id, message_type, decision, detail,
                                       state_after)
             SELECT saga_id, at, message_id, message_type, decision, detail, state_after
             FROM UNNEST($1::uuid[], $2::timestamptz[], $3::uuid[], $4::text[],
                         $5::saga_decision[], $6::text[], $7::saga_state[]) WITH ORDINALITY
                  AS h(saga_id, at, message_id, message_type, decision, detail, state_after, n)
             ORDER BY n
         )
         SELECT outbox_enqueue($8, $9, $10, $11, $12)"#,
        &column(lines, |(id, _)| *id),
        &column(lines, |(_, e)| e.at),
        &column(lines, |(_, e)| e.message_id) as &[Option<Uuid>],
        &column(lines, |(_, e)| e.message_type.as_str()) as &[&str],
        column(lines, |(_, e)| e.decision) as Vec<HistoryDecision>,
        &column(lines, |(_, e)| e.detail.as_deref()) as &[Option<&str>],
        column(lines, |(_, e)| StoredState(e.state_after)) as Vec<StoredState>,
        &queued.topics,
        &queued.keys as &[Option<Vec<u8>>],
        &queued.payloads,
        &queued.headers,
        writer.wake().channel(),
    )
    .fetch_one(tx)
    .await?;
    Ok(())
}

/// Writes `saga` over the stored row if that row is still at `expected_version`, the history
/// line `entry` of that transition and the messages queued in `outbox` (none when the row
/// refused the write), in one round trip. `writer` counts a refusal and says how the relays
/// are woken.
///
/// # Errors
/// [`Error::VersionConflict`] when another writer got there first.
pub async fn update_saga(
    tx: &mut PgConnection,
    saga: &Saga,
    expected_version: i64,
    entry: &HistoryEntry,
    writer: Writer,
    outbox: &mut Outbox,
) -> Result<()> {
    let queued = outbox.take();
    let updated = sqlx::query!(
        r#"WITH updated AS (
             UPDATE sagas SET state = $3, steps = $4, failure_reason = $5, updated_at = $6,
                              finished_at = $7, deadline_at = $8, current_step = $9,
                              version = version + 1
             WHERE id = $1 AND version = $2 RETURNING id
         ), noted AS (
             INSERT INTO saga_history (saga_id, at, message_id, message_type, decision, detail,
                                       state_after)
             SELECT id, $10, $11, $12, $13, $14, $15 FROM updated
         ), counted AS (
             SELECT count(*) AS n FROM updated
         )
         SELECT n AS "updated!", CASE WHEN n = 1 THEN outbox_enqueue($16, $17, $18, $19, $20) END
         FROM counted"#,
        saga.id,
        expected_version,
        StoredState(saga.state) as StoredState,
        to_json(&saga.steps),
        saga.failure_reason,
        saga.updated_at,
        saga.finished_at,
        saga.deadline_at,
        saga.step_in_focus(),
        entry.at,
        entry.message_id,
        entry.message_type,
        entry.decision as HistoryDecision,
        entry.detail,
        StoredState(entry.state_after) as StoredState,
        &queued.topics,
        &queued.keys as &[Option<Vec<u8>>],
        &queued.payloads,
        &queued.headers,
        writer.wake().channel(),
    )
    .fetch_one(tx)
    .await?
    .updated;
    if updated == 1 {
        Ok(())
    } else {
        crate::metrics::stale_writes_refused(writer, 1);
        Err(Error::VersionConflict {
            saga_id: saga.id,
            expected: expected_version,
        })
    }
}

/// Which sagas a deadline scan takes: those whose key lands on one of `owned`, the partitions
/// of a topic of `partitions` partitions this instance's consumer holds (a saga's `key_hash`
/// modulo `partitions`), and those stored without a hash (before orchestrator migration 1011),
/// which every instance takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub partitions: i32,
    pub owned: Vec<i32>,
}

/// Locks up to `limit` sagas of `share` whose deadline has passed, skipping those another
/// transaction (another orchestrator instance, or a reply being handled) holds, oldest
/// deadline first. Due means due by the database's clock, the one every deadline was written
/// on.
pub async fn lock_due(
    tx: &mut PgConnection,
    share: &Share,
    limit: i64,
) -> Result<Locked<Vec<(Saga, i64)>>> {
    let rows = sqlx::query_as!(
        SagaRow,
        r#"SELECT id, state AS "state: StoredState", order_data, saga_key, steps, failure_reason,
                  definition_name, definition_version, version, created_at, updated_at,
                  finished_at, deadline_at, now() AS "db_now?"
           FROM sagas
           WHERE deadline_at <= now()
             AND (key_hash IS NULL OR key_hash % $2 = ANY($3))
           ORDER BY deadline_at LIMIT $1 FOR UPDATE SKIP LOCKED"#,
        limit,
        share.partitions.max(1),
        &share.owned,
    )
    .fetch_all(&mut *tx)
    .await?;
    let now = rows.first().and_then(|row| row.db_now);
    let mut due = Vec::with_capacity(rows.len());
    for row in rows {
        let saga_id = row.id;
        match row.into_saga() {
            Ok(saga) => due.push(saga),
            // One unreadable row must not stop every other saga's deadline.
            Err(e) => park_unreadable(tx, saga_id, &e).await?,
        }
    }
    Ok(Locked { sagas: due, now })
}

/// Parks a saga whose row this build cannot read (`error`): `failed`, without a deadline, with
/// the reason, for an operator. Nothing else reads it again, so it stops no other saga.
///
/// # Errors
/// Database errors.
pub async fn park_unreadable(tx: &mut PgConnection, saga_id: Uuid, error: &Error) -> Result<()> {
    let reason = format!("parked: {}", messaging::chain(error));
    tracing::error!(%saga_id, %reason, "unreadable saga row parked as failed");
    sqlx::query!(
        "UPDATE sagas SET state = $3, failure_reason = $2, deadline_at = NULL,
                          finished_at = coalesce(finished_at, now()), version = version + 1
         WHERE id = $1",
        saga_id,
        reason,
        StoredState(SagaState::Failed) as StoredState,
    )
    .execute(&mut *tx)
    .await?;
    let entry = HistoryEntry {
        at: database_now(&mut *tx).await?,
        message_id: None,
        message_type: "UnreadableRow".into(),
        decision: HistoryDecision::Parked,
        detail: Some(reason),
        state_after: SagaState::Failed,
    };
    append_history(tx, saga_id, &entry).await
}

/// What the engine did with what reached a saga; PostgreSQL's `saga_decision` (orchestrator
/// migration 1008).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "saga_decision", rename_all = "snake_case")]
pub enum HistoryDecision {
    /// The trigger started the saga.
    Started,
    /// A reply moved the saga.
    Applied,
    /// A message that moved nothing (a duplicate, a stale attempt, a reply out of order).
    Ignored,
    /// A deadline passed: the command was sent again, or the step given up.
    Deadline,
    /// An operator's retry, skip or abort.
    Operator,
    /// The saga's row could not be read, so it was set aside as `failed`.
    Parked,
}

impl HistoryDecision {
    pub const ALL: [Self; 6] = [
        Self::Started,
        Self::Applied,
        Self::Ignored,
        Self::Deadline,
        Self::Operator,
        Self::Parked,
    ];
}

/// One line of a saga's history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub message_id: Option<Uuid>,
    pub message_type: String,
    pub decision: HistoryDecision,
    pub detail: Option<String>,
    pub state_after: SagaState,
}

pub async fn append_history(
    tx: &mut PgConnection,
    saga_id: Uuid,
    entry: &HistoryEntry,
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO saga_history (saga_id, at, message_id, message_type, decision, detail,
                                   state_after)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        saga_id,
        entry.at,
        entry.message_id,
        entry.message_type,
        entry.decision as HistoryDecision,
        entry.detail,
        StoredState(entry.state_after) as StoredState,
    )
    .execute(tx)
    .await?;
    Ok(())
}

/// Notes a trigger for a subject that has its saga already (`saga_type`, `key`) on that saga's
/// history, as ignored, with the state the saga is in: the first repeat gets a line of its
/// own, every later one only counts on that line (`duplicates`, with its time and `detail` as
/// the last one's), so that no number of replays makes a saga's history longer than one line.
pub async fn note_duplicate(
    tx: &mut PgConnection,
    saga_type: &str,
    key: &str,
    message_type: &str,
    detail: &str,
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO saga_history (saga_id, at, message_id, message_type, decision, detail,
                                   state_after, duplicates, last_duplicate_at,
                                   last_duplicate_detail)
         SELECT id, now(), NULL, $3, $4, $5, state, 1, now(), $5 FROM sagas
         WHERE definition_name = $1 AND saga_key = $2
         ON CONFLICT (saga_id) WHERE duplicates IS NOT NULL DO UPDATE
         SET duplicates = saga_history.duplicates + 1,
             last_duplicate_at = excluded.last_duplicate_at,
             last_duplicate_detail = excluded.last_duplicate_detail",
        saga_type,
        key,
        message_type,
        HistoryDecision::Ignored as HistoryDecision,
        detail,
    )
    .execute(tx)
    .await?;
    Ok(())
}

/// How often a saga's trigger arrived again after it started it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DuplicatesSeen {
    /// Repeats of the trigger, all absorbed.
    pub count: i64,
    /// When the first and the last repeat arrived.
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
}

/// The repeats of `saga_id`'s trigger, if there were any (its counting history line).
pub async fn duplicates_seen<'e>(
    db: impl PgExecutor<'e>,
    saga_id: Uuid,
) -> Result<Option<DuplicatesSeen>> {
    Ok(sqlx::query_as!(
        DuplicatesSeen,
        r#"SELECT duplicates AS "count!", at AS first_at,
                  coalesce(last_duplicate_at, at) AS "last_at!"
           FROM saga_history WHERE saga_id = $1 AND duplicates IS NOT NULL"#,
        saga_id
    )
    .fetch_optional(db)
    .await?)
}

/// The saga for `key` of any of `saga_types` (the oldest when several have one), if there is
/// one.
pub async fn saga_id_for_key_of<'e>(
    db: impl PgExecutor<'e>,
    saga_types: &[&str],
    key: &str,
) -> Result<Option<Uuid>> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM sagas WHERE definition_name = ANY($1) AND saga_key = $2
         ORDER BY created_at LIMIT 1",
        saga_types as &[&str],
        key
    )
    .fetch_optional(db)
    .await?)
}

/// The trace context of the order that started the saga.
pub async fn trace_parent<'e>(db: impl PgExecutor<'e>, saga_id: Uuid) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar!("SELECT trace_parent FROM sagas WHERE id = $1", saga_id)
            .fetch_optional(db)
            .await?
            .flatten(),
    )
}

/// Deletes up to `limit` sagas, with their history: completed or compensated ones that
/// finished more than `retention_secs` ago, and failed ones that failed more than
/// `failed_retention_secs` ago (an operator's retry or skip moves a saga out of `failed`
/// first). Returns how many sagas it deleted.
pub async fn sweep_finished(
    db: &sqlx::PgPool,
    retention_secs: u64,
    failed_retention_secs: u64,
    limit: i64,
) -> sqlx::Result<u64> {
    Ok(sqlx::query!(
        "WITH doomed AS (
             SELECT id FROM sagas
             WHERE finished_at < now() - make_interval(secs => least($1::float8, $4::float8))
               AND CASE WHEN state = $5 THEN finished_at < now() - make_interval(secs => $4)
                        ELSE state = ANY($3) AND finished_at < now() - make_interval(secs => $1)
                   END
             ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED),
         history AS (DELETE FROM saga_history h USING doomed d WHERE h.saga_id = d.id)
         DELETE FROM sagas s USING doomed d WHERE s.id = d.id",
        retention_secs as f64,
        limit,
        &[
            StoredState(SagaState::Completed),
            StoredState(SagaState::Compensated)
        ] as &[StoredState],
        failed_retention_secs as f64,
        StoredState(SagaState::Failed) as StoredState,
    )
    .execute(db)
    .await?
    .rows_affected())
}

/// Deletes up to `limit` (saga type, key) pairs that arrived more than `retention_secs` ago
/// from the dedup table (never one whose saga still exists); returns how many.
///
/// The saga check is a subquery per row (`NOT (SELECT EXISTS …)`, an index probe), and the
/// batch is named by row address: written as `NOT EXISTS` and `IN (…)`, PostgreSQL planned it
/// as hash joins over sequential scans of `sagas` and `saga_dedup` (0.67 s a batch with
/// 300,000 sagas, growing with the table; 21 ms this way, measured by the retention work of
/// issue 20).
///
/// # Errors
/// Database errors.
pub async fn sweep_saga_dedup(
    db: &sqlx::PgPool,
    retention_secs: u64,
    limit: i64,
) -> sqlx::Result<u64> {
    Ok(sqlx::query!(
        "DELETE FROM saga_dedup WHERE ctid = ANY(ARRAY(
             SELECT d.ctid FROM saga_dedup d
             WHERE d.seen_at < now() - make_interval(secs => $1)
               AND NOT (SELECT EXISTS (
                   SELECT 1 FROM sagas s
                   WHERE s.definition_name = d.saga_type AND s.saga_key = d.saga_key))
             ORDER BY d.seen_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
        retention_secs as f64,
        limit,
    )
    .execute(db)
    .await?
    .rows_affected())
}

/// What `GET /sagas` asks for. Every filter is optional.
#[derive(Debug, Clone, Default)]
pub struct SagaFilter {
    pub state: Option<SagaState>,
    /// Only sagas created at or before this time.
    pub created_before: Option<DateTime<Utc>>,
    pub step: Option<String>,
    /// A case-insensitive substring of the failure reason.
    pub reason: Option<String>,
    /// Continue after this (created_at, id), the last row of the previous page.
    pub after: Option<(DateTime<Utc>, Uuid)>,
}

/// One page of sagas, newest first, with the version each row is at (each as far as its row
/// can be read: [`SagaRow::into_view`]).
///
/// The statement names only the filters given, so that each can use its index: state and
/// step their `(…, created_at, id)` indexes, the reason its trigram index.
pub async fn list<'e>(
    db: impl PgExecutor<'e>,
    filter: &SagaFilter,
    limit: i64,
) -> Result<Vec<(Saga, i64)>> {
    let mut query = sqlx::QueryBuilder::new(format!("SELECT {SAGA_COLUMNS} FROM sagas WHERE true"));
    if let Some(state) = filter.state {
        query.push(" AND state = ").push_bind(StoredState(state));
    }
    if let Some(before) = filter.created_before {
        query.push(" AND created_at <= ").push_bind(before);
    }
    if let Some(step) = &filter.step {
        query.push(" AND current_step = ").push_bind(step.as_str());
    }
    if let Some(reason) = &filter.reason {
        query
            .push(" AND failure_reason ILIKE ")
            .push_bind(format!("%{}%", escape_like(reason)));
    }
    if let Some((at, id)) = filter.after {
        query
            .push(" AND (created_at, id) < (")
            .push_bind(at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    query
        .push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(limit);
    let rows: Vec<SagaRow> = query.build_query_as().fetch_all(db).await?;
    Ok(rows.into_iter().map(SagaRow::into_view).collect())
}

/// Makes `text` match literally inside an ILIKE pattern.
fn escape_like(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A saga and the version its row is at, without locking it, as far as its row can be read
/// ([`SagaRow::into_view`]).
pub async fn get<'e>(db: impl PgExecutor<'e>, saga_id: Uuid) -> Result<Option<(Saga, i64)>> {
    let row = sqlx::query_as!(
        SagaRow,
        r#"SELECT id, state AS "state: StoredState", order_data, saga_key, steps, failure_reason,
                  definition_name, definition_version, version, created_at, updated_at,
                  finished_at, deadline_at, NULL::timestamptz AS "db_now?"
           FROM sagas WHERE id = $1"#,
        saga_id
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(SagaRow::into_view))
}

/// A stored history line with its position.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryRecord {
    pub id: i64,
    #[serde(flatten)]
    pub entry: HistoryEntry,
    /// On the line of a repeated trigger: how many repeats it counts, and the last one's.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub repeats: Option<Repeats>,
}

/// The repeats a repeated trigger's history line counts (the line itself is the first one).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Repeats {
    pub duplicates: i64,
    pub last_duplicate_at: DateTime<Utc>,
    pub last_duplicate_detail: Option<String>,
}

/// A `saga_history` row as the checked statements read it.
struct HistoryRow {
    saga_id: Uuid,
    id: i64,
    at: DateTime<Utc>,
    message_id: Option<Uuid>,
    message_type: String,
    decision: HistoryDecision,
    detail: Option<String>,
    state_after: StoredState,
    duplicates: Option<i64>,
    last_duplicate_at: Option<DateTime<Utc>>,
    last_duplicate_detail: Option<String>,
}

impl From<HistoryRow> for HistoryRecord {
    fn from(row: HistoryRow) -> Self {
        Self {
            id: row.id,
            repeats: row.duplicates.map(|duplicates| Repeats {
                duplicates,
                last_duplicate_at: row.last_duplicate_at.unwrap_or(row.at),
                last_duplicate_detail: row.last_duplicate_detail,
            }),
            entry: HistoryEntry {
                at: row.at,
                message_id: row.message_id,
                message_type: row.message_type,
                decision: row.decision,
                detail: row.detail,
                state_after: row.state_after.0,
            },
        }
    }
}

/// Up to `limit` of a saga's history lines after `after_id` (from the first for 0), oldest
/// first.
pub async fn history<'e>(
    db: impl PgExecutor<'e>,
    saga_id: Uuid,
    after_id: i64,
    limit: i64,
) -> Result<Vec<HistoryRecord>> {
    let lines = sqlx::query_as!(
        HistoryRow,
        r#"SELECT saga_id, id, at, message_id, message_type,
                  decision AS "decision: HistoryDecision", detail,
                  state_after AS "state_after: StoredState", duplicates, last_duplicate_at,
                  last_duplicate_detail
           FROM saga_history WHERE saga_id = $1 AND id > $2 ORDER BY id LIMIT $3"#,
        saga_id,
        after_id,
        limit
    )
    .fetch_all(db)
    .await?;
    Ok(lines.into_iter().map(HistoryRecord::from).collect())
}

/// Of the sagas `seen` lists as `(id, version, last history id)`, those whose version moved
/// (as far as their rows can be read: [`SagaRow::into_view`]),
/// as they are now. One statement for every watched saga.
pub async fn changed_since<'e>(
    db: impl PgExecutor<'e>,
    seen: &[(Uuid, i64, i64)],
) -> Result<Vec<(Saga, i64)>> {
    let rows = sqlx::query_as!(
        SagaRow,
        r#"SELECT id, state AS "state: StoredState", order_data, saga_key, steps, failure_reason,
                  definition_name, definition_version, version, created_at, updated_at,
                  finished_at, deadline_at, NULL::timestamptz AS "db_now?"
           FROM sagas
           JOIN UNNEST($1::uuid[], $2::bigint[]) AS w(watched_id, seen_version)
             ON id = watched_id
           WHERE version <> seen_version"#,
        &column(seen, |(id, _, _)| *id),
        &column(seen, |(_, version, _)| *version),
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(SagaRow::into_view).collect())
}

/// The history lines of each saga in `after` (`(id, last line seen)`) written since, oldest
/// first, in one statement.
pub async fn history_since<'e>(
    db: impl PgExecutor<'e>,
    after: &[(Uuid, i64)],
) -> Result<std::collections::HashMap<Uuid, Vec<HistoryRecord>>> {
    let lines = sqlx::query_as!(
        HistoryRow,
        r#"SELECT h.saga_id, h.id, h.at, h.message_id, h.message_type,
                  h.decision AS "decision: HistoryDecision", h.detail,
                  h.state_after AS "state_after: StoredState", h.duplicates,
                  h.last_duplicate_at, h.last_duplicate_detail
           FROM UNNEST($1::uuid[], $2::bigint[]) AS w(saga_id, after_id)
           JOIN saga_history h ON h.saga_id = w.saga_id AND h.id > w.after_id
           ORDER BY h.id"#,
        &column(after, |(id, _)| *id),
        &column(after, |(_, after_id)| *after_id),
    )
    .fetch_all(db)
    .await?;
    let mut by_saga: std::collections::HashMap<Uuid, Vec<HistoryRecord>> =
        std::collections::HashMap::new();
    for line in lines {
        by_saga
            .entry(line.saga_id)
            .or_default()
            .push(HistoryRecord::from(line));
    }
    Ok(by_saga)
}

/// Counts and rates for `GET /stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub counts: std::collections::BTreeMap<&'static str, i64>,
    pub total: i64,
    pub window_secs: i64,
    pub started_per_sec: f64,
    pub completed_per_sec: f64,
    pub compensated_per_sec: f64,
    pub failed_per_sec: f64,
    pub oldest_running_secs: Option<f64>,
    pub at: DateTime<Utc>,
}

/// Counts by state (kept by the `sagas` triggers, so this reads a few dozen rows whatever
/// the table's size) and the last `window_secs`' rates (index ranges as long as the window).
pub async fn stats(db: &sqlx::PgPool, window_secs: i64) -> Result<Stats> {
    // The window ends at the database's time, the clock `created_at` and `finished_at` are
    // written on.
    let now = database_now(db).await?;
    let since = now - chrono::Duration::seconds(window_secs);
    let counted = sqlx::query!(
        r#"SELECT state AS "state!: StoredState", sum(sagas)::bigint AS "sagas!"
           FROM saga_state_counts GROUP BY state"#
    )
    .fetch_all(db)
    .await?;
    let rates = sqlx::query!(
        r#"SELECT
             (SELECT count(*) FROM sagas WHERE created_at > $1) AS "started!",
             (SELECT count(*) FROM sagas WHERE finished_at > $1 AND state = $2) AS "completed!",
             (SELECT count(*) FROM sagas WHERE finished_at > $1 AND state = $3) AS "compensated!",
             (SELECT count(*) FROM sagas WHERE finished_at > $1 AND state = $4) AS "failed!",
             (SELECT min(created_at) FROM sagas WHERE state = ANY($5)) AS oldest_running"#,
        since,
        StoredState(SagaState::Completed) as StoredState,
        StoredState(SagaState::Compensated) as StoredState,
        StoredState(SagaState::Failed) as StoredState,
        &[
            StoredState(SagaState::Running),
            StoredState(SagaState::Compensating)
        ] as &[StoredState],
    )
    .fetch_one(db)
    .await?;
    let mut counts: std::collections::BTreeMap<&'static str, i64> =
        SagaState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for row in counted {
        counts.insert(row.state.0.as_str(), row.sagas);
    }
    let per_sec = |n: i64| n as f64 / window_secs as f64;
    Ok(Stats {
        total: counts.values().sum(),
        counts,
        window_secs,
        started_per_sec: per_sec(rates.started),
        completed_per_sec: per_sec(rates.completed),
        compensated_per_sec: per_sec(rates.compensated),
        failed_per_sec: per_sec(rates.failed),
        oldest_running_secs: rates
            .oldest_running
            .map(|at| (now - at).num_milliseconds().max(0) as f64 / 1000.0),
        at: now,
    })
}

/// Stores `definition` (name, version, digest, canonical form) unless that version is stored
/// already. Returns the digest stored for the version: the one given, or an earlier one that
/// differs when the file changed without a new version.
///
/// One statement that always returns the stored row: the conflict arm "updates" the row to
/// itself, which waits for and then reads an insert another orchestrator starting at the same
/// moment has not committed yet. (`DO NOTHING` returned no row then, and a lookup in the same
/// statement, on a snapshot older than that commit, found none either: `RowNotFound`.)
pub async fn register_definition(
    executor: impl PgExecutor<'_>,
    definition: &crate::saga::SagaDefinition,
) -> Result<String> {
    let stored = sqlx::query_scalar!(
        "INSERT INTO saga_definitions (name, version, digest, canonical)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (name, version) DO UPDATE SET digest = saga_definitions.digest
         RETURNING digest",
        definition.name,
        definition.version,
        definition.digest(),
        definition.canonical,
    )
    .fetch_one(executor)
    .await?;
    Ok(stored)
}

/// A definition as stored: name, version, canonical form and when it was first deployed.
#[derive(sqlx::FromRow)]
pub struct StoredDefinition {
    pub name: String,
    pub version: i32,
    pub canonical: String,
    pub first_seen_at: DateTime<Utc>,
}

/// Every stored definition version, or only `name` at `version`.
pub async fn stored_definitions(
    executor: impl PgExecutor<'_>,
    only: Option<(&str, i32)>,
) -> Result<Vec<StoredDefinition>> {
    Ok(sqlx::query_as!(
        StoredDefinition,
        "SELECT name, version, canonical, first_seen_at FROM saga_definitions
         WHERE $1::text IS NULL OR (name = $1 AND version = $2) ORDER BY name, version",
        only.map(|(name, _)| name),
        only.map(|(_, version)| version),
    )
    .fetch_all(executor)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(order_data: serde_json::Value, steps: serde_json::Value) -> SagaRow {
        let at = DateTime::<Utc>::UNIX_EPOCH;
        SagaRow {
            id: Uuid::from_u128(9),
            state: StoredState(SagaState::Running),
            order_data,
            saga_key: "k".into(),
            steps,
            failure_reason: None,
            definition_name: "order".into(),
            definition_version: 1,
            version: 1,
            created_at: at,
            updated_at: at,
            finished_at: None,
            deadline_at: None,
            db_now: None,
        }
    }

    /// An unreadable row keeps why as its error's cause, and reads as it did when the reason
    /// was formatted into the error: `saga ID has an unreadable COLUMN: WHY`.
    #[test]
    fn an_unreadable_row_keeps_its_cause_and_reads_as_before() {
        let bad_steps = serde_json::json!("not a list");
        let why = serde_json::from_value::<Vec<StepState>>(bad_steps.clone())
            .expect_err("not steps")
            .to_string();
        let error = row(serde_json::json!({}), bad_steps.clone())
            .readable_steps()
            .expect_err("unreadable");
        assert!(matches!(
            &error,
            Error::CorruptRow {
                source: CorruptColumn::Json(_),
                ..
            }
        ));
        let saga_id = Uuid::from_u128(9);
        let before = format!("saga {saga_id} has an unreadable steps: {why}");
        assert_eq!(messaging::chain(&error), before);
        let (saga, _) = row(serde_json::json!({}), bad_steps).into_view();
        assert_eq!(saga.failure_reason.as_deref(), Some(before.as_str()));

        let error = row(serde_json::json!([]), serde_json::json!([]))
            .readable_steps()
            .expect_err("not an object");
        assert_eq!(
            messaging::chain(&error),
            format!(
                "saga {saga_id} has an unreadable order_data: the trigger message is not a JSON \
                 object"
            )
        );
    }
}
