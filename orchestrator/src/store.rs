//! The SQL of the orchestrator: sagas and their history. Every function that changes a saga
//! takes the handler's transaction.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use messaging::db::column;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::saga::{Saga, SagaState, StepState};
use crate::{Error, Result};

/// Binds a history entry to a statement's next six parameters, in `saga_history`'s column
/// order after `saga_id` (at, message_id, message_type, decision, detail, state_after). A
/// macro, so that it serves a `Query` and a `QueryScalar` alike.
macro_rules! bind_history {
    ($query:expr, $entry:expr) => {{
        let entry: &HistoryEntry = $entry;
        $query
            .bind(entry.at)
            .bind(entry.message_id)
            .bind(&entry.message_type)
            .bind(&entry.decision)
            .bind(&entry.detail)
            .bind(&entry.state_after)
    }};
}

/// The orchestrator's own migrations (on top of the messaging tables).
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/orchestrator");

#[derive(sqlx::FromRow)]
struct SagaRow {
    id: Uuid,
    state: String,
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
}

const SAGA_COLUMNS: &str =
    "id, state, order_data, saga_key, steps, failure_reason, definition_name, \
                            definition_version, version, created_at, updated_at, finished_at, \
                            deadline_at";

impl SagaRow {
    fn into_saga(self) -> Result<(Saga, i64)> {
        let corrupt = |column: &'static str| {
            let saga_id = self.id;
            move |e: serde_json::Error| Error::CorruptRow {
                saga_id,
                column,
                reason: e.to_string(),
            }
        };
        if !self.order_data.is_object() {
            return Err(Error::CorruptRow {
                saga_id: self.id,
                column: "order_data",
                reason: "the trigger message is not a JSON object".into(),
            });
        }
        let steps: Vec<StepState> =
            serde_json::from_value(self.steps.clone()).map_err(corrupt("steps"))?;
        let state = SagaState::parse(&self.state).ok_or_else(|| Error::CorruptRow {
            saga_id: self.id,
            column: "state",
            reason: format!("unknown state {:?}", self.state),
        })?;
        let saga = Saga {
            id: self.id,
            trigger: self.order_data,
            key: self.saga_key,
            state,
            steps,
            failure_reason: self.failure_reason,
            definition_name: self.definition_name,
            definition_version: self.definition_version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
            deadline_at: self.deadline_at,
        };
        Ok((saga, self.version))
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    // Plain data with string keys always serialises.
    serde_json::to_value(value).unwrap_or_default()
}

/// Stores a new saga and its first history line (`started`) unless a saga of its type and key
/// started already (even one swept since: `saga_dedup`), with the trace context of its trigger
/// (`trace_parent`). Returns whether it was stored. One statement: the saga costs one round trip, whatever it has to touch.
pub async fn insert_saga(
    tx: &mut PgConnection,
    saga: &Saga,
    trace_parent: Option<&str>,
    started: &HistoryEntry,
) -> Result<bool> {
    let statement = sqlx::query_scalar(
        "WITH first AS ( \
             INSERT INTO saga_dedup (saga_type, saga_key, saga_id) VALUES ($20, $2, $1) \
             ON CONFLICT DO NOTHING RETURNING saga_id \
         ), saga AS ( \
             INSERT INTO sagas (id, saga_key, state, order_data, steps, failure_reason, \
                                definition_version, version, created_at, updated_at, finished_at, \
                                deadline_at, current_step, trace_parent, definition_name) \
             SELECT saga_id, $2, $3, $4, $5, $6, $7, 0, $8, $9, $10, $11, $12, $13, $20 FROM first \
             ON CONFLICT (definition_name, saga_key) DO NOTHING RETURNING id \
         ), noted AS ( \
             INSERT INTO saga_history (saga_id, at, message_id, message_type, decision, detail, state_after) \
             SELECT id, $14, $15, $16, $17, $18, $19 FROM saga \
         ) SELECT count(*) FROM saga",
    )
    .bind(saga.id)
    .bind(&saga.key)
    .bind(saga.state.as_str())
    .bind(&saga.trigger)
    .bind(to_json(&saga.steps))
    .bind(&saga.failure_reason)
    .bind(saga.definition_version)
    .bind(saga.created_at)
    .bind(saga.updated_at)
    .bind(saga.finished_at)
    .bind(saga.deadline_at)
    .bind(saga.step_in_focus())
    .bind(trace_parent)
    ;
    let inserted: i64 = bind_history!(statement, started)
        .bind(&saga.definition_name)
        .fetch_one(tx)
        .await?;
    Ok(inserted == 1)
}

/// Loads a saga and locks its row until the transaction ends. Returns it with its version.
pub async fn load_for_update(tx: &mut PgConnection, saga_id: Uuid) -> Result<Option<(Saga, i64)>> {
    let row: Option<SagaRow> = sqlx::query_as(&format!(
        "SELECT {SAGA_COLUMNS} FROM sagas WHERE id = $1 FOR UPDATE"
    ))
    .bind(saga_id)
    .fetch_optional(tx)
    .await?;
    row.map(SagaRow::into_saga).transpose()
}

/// Loads the sagas `saga_ids` and locks their rows until the transaction ends, in id order
/// (so two transactions locking overlapping sets cannot deadlock). Returns the readable ones
/// with their versions, and the ids of those whose row this build cannot read, with why.
pub async fn lock_sagas(
    tx: &mut PgConnection,
    saga_ids: &[Uuid],
) -> Result<(HashMap<Uuid, (Saga, i64)>, Vec<(Uuid, Error)>)> {
    let rows: Vec<SagaRow> = sqlx::query_as(&format!(
        "SELECT {SAGA_COLUMNS} FROM sagas WHERE id = ANY($1) ORDER BY id FOR UPDATE"
    ))
    .bind(saga_ids)
    .fetch_all(tx)
    .await?;
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
    Ok((sagas, unreadable))
}

/// A saga's new state for [`save_transitions`]: written if its row is still at `expected_version`.
pub struct SagaUpdate<'a> {
    pub saga: &'a Saga,
    pub expected_version: i64,
    pub new_version: i64,
}

/// Writes a batch's transitions: every saga of `updates` and every history line of `history`.
/// One saga moved once, with its one line (what a quiet system's batches hold), goes through
/// the one-row [`update_saga`], which costs PostgreSQL about a third of the set-wise `UPDATE`
/// for one row; anything else through the set-wise statements.
///
/// # Errors
/// [`Error::VersionConflict`] when a saga changed since it was loaded; nothing should then be
/// committed.
pub async fn save_transitions(
    tx: &mut PgConnection,
    updates: &[SagaUpdate<'_>],
    history: &[(Uuid, HistoryEntry)],
) -> Result<()> {
    match (updates, history) {
        ([update], [(saga_id, entry)])
            if *saga_id == update.saga.id && update.new_version == update.expected_version + 1 =>
        {
            update_saga(tx, update.saga, update.expected_version, entry).await
        }
        _ => {
            update_sagas(tx, updates).await?;
            append_history_lines(tx, history).await
        }
    }
}

/// Writes every saga of `updates` over its stored row in one statement, each if its row is
/// still at its expected version.
///
/// # Errors
/// [`Error::VersionConflict`] (naming the first saga) when any row changed since it was
/// loaded; nothing should then be committed.
async fn update_sagas(tx: &mut PgConnection, updates: &[SagaUpdate<'_>]) -> Result<()> {
    let Some(first) = updates.first() else {
        return Ok(());
    };
    let updated = sqlx::query(
        "UPDATE sagas SET state = u.state, steps = u.steps, failure_reason = u.failure_reason, \
                          updated_at = u.updated_at, finished_at = u.finished_at, \
                          deadline_at = u.deadline_at, current_step = u.current_step, \
                          version = u.new_version \
         FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::text[], $5::jsonb[], $6::text[], \
                     $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::text[]) \
              AS u(id, expected_version, new_version, state, steps, failure_reason, updated_at, \
                   finished_at, deadline_at, current_step) \
         WHERE sagas.id = u.id AND sagas.version = u.expected_version",
    )
    .bind(column(updates, |u| u.saga.id))
    .bind(column(updates, |u| u.expected_version))
    .bind(column(updates, |u| u.new_version))
    .bind(column(updates, |u| u.saga.state.as_str()))
    .bind(column(updates, |u| to_json(&u.saga.steps)))
    .bind(column(updates, |u| u.saga.failure_reason.as_deref()))
    .bind(column(updates, |u| u.saga.updated_at))
    .bind(column(updates, |u| u.saga.finished_at))
    .bind(column(updates, |u| u.saga.deadline_at))
    .bind(column(updates, |u| u.saga.step_in_focus()))
    .execute(tx)
    .await?
    .rows_affected();
    if updated == updates.len() as u64 {
        Ok(())
    } else {
        Err(Error::VersionConflict {
            saga_id: first.saga.id,
            expected: first.expected_version,
        })
    }
}

/// Appends history lines, each `(saga id, entry)`, in one statement.
async fn append_history_lines(tx: &mut PgConnection, lines: &[(Uuid, HistoryEntry)]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO saga_history (saga_id, at, message_id, message_type, decision, detail, state_after) \
         SELECT saga_id, at, message_id, message_type, decision, detail, state_after \
         FROM UNNEST($1::uuid[], $2::timestamptz[], $3::uuid[], $4::text[], $5::text[], \
                     $6::text[], $7::text[]) WITH ORDINALITY \
              AS h(saga_id, at, message_id, message_type, decision, detail, state_after, n) \
         ORDER BY n",
    )
    .bind(column(lines, |(id, _)| *id))
    .bind(column(lines, |(_, e)| e.at))
    .bind(column(lines, |(_, e)| e.message_id))
    .bind(column(lines, |(_, e)| e.message_type.as_str()))
    .bind(column(lines, |(_, e)| e.decision.as_str()))
    .bind(column(lines, |(_, e)| e.detail.as_deref()))
    .bind(column(lines, |(_, e)| e.state_after.as_str()))
    .execute(tx)
    .await?;
    Ok(())
}

/// Writes `saga` over the stored row if that row is still at `expected_version`, and the
/// history line `entry` of that transition, in one round trip.
///
/// # Errors
/// [`Error::VersionConflict`] when another writer got there first.
pub async fn update_saga(
    tx: &mut PgConnection,
    saga: &Saga,
    expected_version: i64,
    entry: &HistoryEntry,
) -> Result<()> {
    let statement = sqlx::query_scalar(
        "WITH updated AS ( \
             UPDATE sagas SET state = $3, steps = $4, failure_reason = $5, updated_at = $6, \
                              finished_at = $7, deadline_at = $8, current_step = $9, \
                              version = version + 1 \
             WHERE id = $1 AND version = $2 RETURNING id \
         ), noted AS ( \
             INSERT INTO saga_history (saga_id, at, message_id, message_type, decision, detail, state_after) \
             SELECT id, $10, $11, $12, $13, $14, $15 FROM updated \
         ) SELECT count(*) FROM updated",
    )
    .bind(saga.id)
    .bind(expected_version)
    .bind(saga.state.as_str())
    .bind(to_json(&saga.steps))
    .bind(&saga.failure_reason)
    .bind(saga.updated_at)
    .bind(saga.finished_at)
    .bind(saga.deadline_at)
    .bind(saga.step_in_focus())
    ;
    let updated: i64 = bind_history!(statement, entry).fetch_one(tx).await?;
    if updated == 1 {
        Ok(())
    } else {
        Err(Error::VersionConflict {
            saga_id: saga.id,
            expected: expected_version,
        })
    }
}

/// Locks up to `limit` sagas whose deadline has passed, skipping those another transaction
/// (another orchestrator instance, or a reply being handled) holds, oldest deadline first.
pub async fn lock_due(
    tx: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(Saga, i64)>> {
    let rows: Vec<SagaRow> = sqlx::query_as(&format!(
        "SELECT {SAGA_COLUMNS} FROM sagas WHERE deadline_at <= $1 \
         ORDER BY deadline_at LIMIT $2 FOR UPDATE SKIP LOCKED"
    ))
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut due = Vec::with_capacity(rows.len());
    for row in rows {
        let saga_id = row.id;
        match row.into_saga() {
            Ok(saga) => due.push(saga),
            // One unreadable row must not stop every other saga's deadline.
            Err(e) => park_unreadable(tx, saga_id, &e).await?,
        }
    }
    Ok(due)
}

/// Parks a saga whose row this build cannot read (`error`): `failed`, without a deadline, with
/// the reason, for an operator. Nothing else reads it again, so it stops no other saga.
///
/// # Errors
/// Database errors.
pub async fn park_unreadable(tx: &mut PgConnection, saga_id: Uuid, error: &Error) -> Result<()> {
    let reason = format!("parked: {error}");
    tracing::error!(%saga_id, %reason, "unreadable saga row parked as failed");
    sqlx::query(
        "UPDATE sagas SET state = 'failed', failure_reason = $2, deadline_at = NULL, \
                          finished_at = coalesce(finished_at, now()), version = version + 1 \
         WHERE id = $1",
    )
    .bind(saga_id)
    .bind(&reason)
    .execute(&mut *tx)
    .await?;
    let entry = HistoryEntry {
        at: Utc::now(),
        message_id: None,
        message_type: "UnreadableRow".into(),
        decision: "parked".into(),
        detail: Some(reason),
        state_after: SagaState::Failed.as_str().into(),
    };
    append_history(tx, saga_id, &entry).await
}

/// One line of a saga's history.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub message_id: Option<Uuid>,
    pub message_type: String,
    /// `started`, `applied`, `ignored`, `deadline` or `operator`.
    pub decision: String,
    pub detail: Option<String>,
    pub state_after: String,
}

pub async fn append_history(
    tx: &mut PgConnection,
    saga_id: Uuid,
    entry: &HistoryEntry,
) -> Result<()> {
    let statement = sqlx::query(
        "INSERT INTO saga_history (saga_id, at, message_id, message_type, decision, detail, state_after) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(saga_id);
    bind_history!(statement, entry).execute(tx).await?;
    Ok(())
}

/// The saga of type `saga_type` for `key`, if there is one.
pub async fn saga_id_for_key<'e>(
    db: impl PgExecutor<'e>,
    saga_type: &str,
    key: &str,
) -> Result<Option<Uuid>> {
    saga_id_for_key_of(db, &[saga_type], key).await
}

/// The saga for `key` of any of `saga_types` (the oldest when several have one), if there is
/// one.
pub async fn saga_id_for_key_of<'e>(
    db: impl PgExecutor<'e>,
    saga_types: &[&str],
    key: &str,
) -> Result<Option<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM sagas WHERE definition_name = ANY($1) AND saga_key = $2 \
         ORDER BY created_at LIMIT 1",
    )
    .bind(saga_types)
    .bind(key)
    .fetch_optional(db)
    .await?)
}

/// The trace context of the order that started the saga.
pub async fn trace_parent<'e>(db: impl PgExecutor<'e>, saga_id: Uuid) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT trace_parent FROM sagas WHERE id = $1")
            .bind(saga_id)
            .fetch_optional(db)
            .await?
            .flatten(),
    )
}

/// Deletes up to `limit` completed or compensated sagas that finished more than
/// `retention_secs` ago, with their history. Failed sagas stay until an operator moves them.
/// Returns how many sagas it deleted.
pub async fn sweep_finished(
    db: &sqlx::PgPool,
    retention_secs: u64,
    limit: i64,
) -> sqlx::Result<u64> {
    delete_older(
        db,
        "WITH doomed AS ( \
             SELECT id FROM sagas \
             WHERE finished_at < now() - make_interval(secs => $1) \
               AND state IN ('completed', 'compensated') \
             ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
         history AS (DELETE FROM saga_history h USING doomed d WHERE h.saga_id = d.id) \
         DELETE FROM sagas s USING doomed d WHERE s.id = d.id",
        retention_secs,
        limit,
    )
    .await
}

/// Deletes up to `limit` (saga type, key) pairs that arrived more than `retention_secs` ago
/// from the dedup table (never one whose saga still exists); returns how many.
///
/// # Errors
/// Database errors.
pub async fn sweep_saga_dedup(
    db: &sqlx::PgPool,
    retention_secs: u64,
    limit: i64,
) -> sqlx::Result<u64> {
    delete_older(
        db,
        "DELETE FROM saga_dedup WHERE (saga_type, saga_key) IN ( \
             SELECT d.saga_type, d.saga_key FROM saga_dedup d \
             WHERE d.seen_at < now() - make_interval(secs => $1) \
               AND NOT EXISTS (SELECT 1 FROM sagas s \
                               WHERE s.definition_name = d.saga_type AND s.saga_key = d.saga_key) \
             ORDER BY d.seen_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        retention_secs,
        limit,
    )
    .await
}

/// Runs a retention `statement` whose `$1` is an age in seconds and `$2` a row limit; returns
/// the rows it deleted.
async fn delete_older(
    db: &sqlx::PgPool,
    statement: &str,
    retention_secs: u64,
    limit: i64,
) -> sqlx::Result<u64> {
    Ok(sqlx::query(statement)
        .bind(retention_secs as f64)
        .bind(limit)
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

/// One page of sagas, newest first, with the version each row is at.
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
        query.push(" AND state = ").push_bind(state.as_str());
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
    rows.into_iter().map(SagaRow::into_saga).collect()
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

/// A saga and the version its row is at, without locking it.
pub async fn get<'e>(db: impl PgExecutor<'e>, saga_id: Uuid) -> Result<Option<(Saga, i64)>> {
    let row: Option<SagaRow> =
        sqlx::query_as(&format!("SELECT {SAGA_COLUMNS} FROM sagas WHERE id = $1"))
            .bind(saga_id)
            .fetch_optional(db)
            .await?;
    row.map(SagaRow::into_saga).transpose()
}

/// A stored history line with its position.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct HistoryRecord {
    pub id: i64,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub entry: HistoryEntry,
}

/// Up to `limit` of a saga's history lines after `after_id` (from the first for 0), oldest
/// first.
pub async fn history<'e>(
    db: impl PgExecutor<'e>,
    saga_id: Uuid,
    after_id: i64,
    limit: i64,
) -> Result<Vec<HistoryRecord>> {
    Ok(sqlx::query_as(
        "SELECT id, at, message_id, message_type, decision, detail, state_after \
         FROM saga_history WHERE saga_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(saga_id)
    .bind(after_id)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Of the sagas `seen` lists as `(id, version, last history id)`, those whose version moved,
/// as they are now. One statement for every watched saga.
pub async fn changed_since<'e>(
    db: impl PgExecutor<'e>,
    seen: &[(Uuid, i64, i64)],
) -> Result<Vec<(Saga, i64)>> {
    let rows: Vec<SagaRow> = sqlx::query_as(&format!(
        "SELECT {SAGA_COLUMNS} FROM sagas \
         JOIN UNNEST($1::uuid[], $2::bigint[]) AS w(watched_id, seen_version) \
           ON id = watched_id \
         WHERE version <> seen_version"
    ))
    .bind(column(seen, |(id, _, _)| *id))
    .bind(column(seen, |(_, version, _)| *version))
    .fetch_all(db)
    .await?;
    rows.into_iter().map(SagaRow::into_saga).collect()
}

/// The history lines of each saga in `after` (`(id, last line seen)`) written since, oldest
/// first, in one statement.
pub async fn history_since<'e>(
    db: impl PgExecutor<'e>,
    after: &[(Uuid, i64)],
) -> Result<std::collections::HashMap<Uuid, Vec<HistoryRecord>>> {
    #[derive(sqlx::FromRow)]
    struct Line {
        saga_id: Uuid,
        #[sqlx(flatten)]
        record: HistoryRecord,
    }
    let lines: Vec<Line> = sqlx::query_as(
        "SELECT h.saga_id, h.id, h.at, h.message_id, h.message_type, h.decision, h.detail, \
                h.state_after \
         FROM UNNEST($1::uuid[], $2::bigint[]) AS w(saga_id, after_id) \
         JOIN saga_history h ON h.saga_id = w.saga_id AND h.id > w.after_id \
         ORDER BY h.id",
    )
    .bind(column(after, |(id, _)| *id))
    .bind(column(after, |(_, after_id)| *after_id))
    .fetch_all(db)
    .await?;
    let mut by_saga: std::collections::HashMap<Uuid, Vec<HistoryRecord>> =
        std::collections::HashMap::new();
    for line in lines {
        by_saga.entry(line.saga_id).or_default().push(line.record);
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
    let now = Utc::now();
    let since = now - chrono::Duration::seconds(window_secs);
    let counted: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, sum(sagas)::bigint FROM saga_state_counts GROUP BY state")
            .fetch_all(db)
            .await?;
    let (started, completed, compensated, failed, oldest_running): (
        i64,
        i64,
        i64,
        i64,
        Option<DateTime<Utc>>,
    ) = sqlx::query_as(
        "SELECT \
           (SELECT count(*) FROM sagas WHERE created_at > $1), \
           (SELECT count(*) FROM sagas WHERE finished_at > $1 AND state = 'completed'), \
           (SELECT count(*) FROM sagas WHERE finished_at > $1 AND state = 'compensated'), \
           (SELECT count(*) FROM sagas WHERE finished_at > $1 AND state = 'failed'), \
           (SELECT min(created_at) FROM sagas WHERE state IN ('running', 'compensating'))",
    )
    .bind(since)
    .fetch_one(db)
    .await?;
    let mut counts: std::collections::BTreeMap<&'static str, i64> =
        SagaState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for (state, count) in counted {
        if let Some(known) = SagaState::parse(&state) {
            counts.insert(known.as_str(), count);
        }
    }
    let per_sec = |n: i64| n as f64 / window_secs as f64;
    Ok(Stats {
        total: counts.values().sum(),
        counts,
        window_secs,
        started_per_sec: per_sec(started),
        completed_per_sec: per_sec(completed),
        compensated_per_sec: per_sec(compensated),
        failed_per_sec: per_sec(failed),
        oldest_running_secs: oldest_running
            .map(|at| (now - at).num_milliseconds().max(0) as f64 / 1000.0),
        at: now,
    })
}

/// Stores `definition` (name, version, digest, canonical form) unless that version is stored
/// already. Returns the digest stored for the version: the one given, or an earlier one that
/// differs when the file changed without a new version.
pub async fn register_definition(
    executor: impl PgExecutor<'_>,
    definition: &crate::saga::SagaDefinition,
) -> Result<String> {
    let stored = sqlx::query_scalar(
        "WITH added AS ( \
             INSERT INTO saga_definitions (name, version, digest, canonical) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (name, version) DO NOTHING RETURNING digest \
         ) SELECT digest FROM added \
           UNION ALL SELECT digest FROM saga_definitions WHERE name = $1 AND version = $2 \
           LIMIT 1",
    )
    .bind(&definition.name)
    .bind(definition.version)
    .bind(definition.digest())
    .bind(&definition.canonical)
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
    Ok(sqlx::query_as(
        "SELECT name, version, canonical, first_seen_at FROM saga_definitions \
         WHERE $1::text IS NULL OR (name = $1 AND version = $2) ORDER BY name, version",
    )
    .bind(only.map(|(name, _)| name))
    .bind(only.map(|(_, version)| version))
    .fetch_all(executor)
    .await?)
}
