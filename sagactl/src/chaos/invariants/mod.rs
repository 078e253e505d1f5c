//! The invariants a chaos run checks once every saga settled: what the books must show however
//! the services were killed, whatever the broker and PostgreSQL went through.
//!
//! Two kinds. The engine's hold for every saga type and need nothing but the definitions:
//! every saga terminal, no message applied twice, each saga's steps against the participants'
//! step ledgers (`ledgers.rs`). The business invariants read a saga type's or a participant's
//! own tables (stock conserved, money conserved, one charge per completed order...): each is
//! one implementation of [`Invariant`], in its own file, registered below by the name the saga
//! definitions give its saga type or participant. A run checks those of the saga types and
//! participants its definitions name; a new saga type (or participant) brings its invariant
//! here, and nothing in the runner changes.
//!
//! A service's tables are read from the database that service uses ([`Databases::of`]): a
//! participant may run on a database of its own (--own-database), so a check that compares
//! two services' tables reads each side with its own query and joins them in Rust.

mod inventory;
mod ledgers;
mod order;
mod payment;
mod return_saga;
mod returns;
mod shipping;
pub mod under_faults;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::bail;
use sqlx::PgPool;
use uuid::Uuid;

use super::garbage::Audit;
pub use super::setup::Databases;
use crate::deployment::{Deployment, ORCHESTRATOR};

/// One invariant's outcome: a PASS or FAIL line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What must hold; the line's name, stable across runs.
    pub name: &'static str,
    pub passed: bool,
    /// What was seen.
    pub detail: String,
}

impl Check {
    pub fn new(name: &'static str, passed: bool, detail: String) -> Self {
        Self {
            name,
            passed,
            detail,
        }
    }
}

/// What an invariant's check is given once the run settled.
pub struct Books<'a> {
    /// The databases of the run's services: [`Databases::of`] a service holds its schema.
    pub db: &'a Databases,
    /// Per saga type, the keys of the sagas the workload started.
    pub started: BTreeMap<&'static str, &'a [Uuid]>,
    /// What the garbage did, with garbage in the run.
    pub garbage: Option<&'a Audit>,
}

impl Books<'_> {
    /// The keys of the sagas of type `saga` the workload started.
    pub fn started(&self, saga: &str) -> &[Uuid] {
        self.started.get(saga).copied().unwrap_or_default()
    }

    /// The keys of the sagas of type `saga` that garbage records started: neither the
    /// workload's sagas nor strays (the garbage check counts them).
    pub fn garbage_sagas(&self, saga: &str) -> &[Uuid] {
        self.garbage.map_or(&[][..], |a| a.garbage_sagas(saga))
    }
}

/// What an invariant's asynchronous steps return.
pub type Checking<'a, T> = Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send + 'a>>;

/// The business invariant of one saga type or one participant, over the tables it knows.
pub trait Invariant: Send + Sync {
    /// An SQL condition its tables meet once their service created them and put its seed data
    /// in (`None`: nothing to wait for beyond the step ledger); the run starts its sagas when
    /// every one holds. A participant's condition is over its own tables and is evaluated in
    /// its database; a saga type's in the orchestrators'.
    fn ready(&self) -> Option<&'static str> {
        None
    }

    /// Takes what its checks compare the end with, before the first saga runs.
    fn before<'a>(&'a mut self, _db: &'a Databases) -> Checking<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Its checks, one report line each, in the order the report prints them.
    fn check<'a>(&'a self, books: &'a Books<'a>) -> Checking<'a, Vec<Check>>;

    /// How many times its tables show one saga's step done more than once (`no message
    /// applied twice` adds them up).
    fn done_twice<'a>(&'a self, _db: &'a Databases) -> Checking<'a, i64> {
        Box::pin(async { Ok(0) })
    }
}

/// Builds one invariant.
type Build = fn() -> Box<dyn Invariant>;

/// Each saga type's invariant, by the name its definition gives it.
const SAGAS: [(&str, Build); 2] = [
    ("order", || Box::new(order::OrderSaga)),
    ("return", || Box::new(return_saga::ReturnSaga)),
];

/// Each participant's invariant, by the name the definitions give it.
const PARTICIPANTS: [(&str, Build); 4] = [
    ("inventory", || Box::<inventory::Inventory>::default()),
    ("payment", || Box::<payment::Payment>::default()),
    ("returns", || Box::new(returns::Returns)),
    ("shipping", || Box::new(shipping::Shipping)),
];

/// The invariants of a run: those of the saga types and participants its definitions name.
pub struct Invariants {
    /// Each with the service whose database its [`Invariant::ready`] condition is evaluated
    /// in: the participant's own, the orchestrator for a saga type.
    chosen: Vec<(String, Box<dyn Invariant>)>,
}

impl Invariants {
    /// The invariants of `deployment`'s saga types, then of its participants, in the
    /// definitions' order (one without an invariant gets the engine's checks only).
    pub fn choose(deployment: &Deployment) -> Self {
        let find = |registry: &[(&str, Build)], name: &str, service: &str| {
            registry
                .iter()
                .find(|(registered, _)| *registered == name)
                .map(|(_, build)| (service.to_owned(), build()))
        };
        let sagas = deployment
            .sagas()
            .filter_map(|d| find(&SAGAS, &d.name, ORCHESTRATOR));
        let participants = deployment
            .participants
            .iter()
            .filter_map(|p| find(&PARTICIPANTS, &p.name, &p.name));
        Self {
            chosen: sagas.chain(participants).collect(),
        }
    }

    /// Waits until every service has created its tables, and every invariant's are
    /// [ready](Invariant::ready).
    pub async fn wait_until_ready(
        &self,
        db: &Databases,
        deployment: &Deployment,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        // Per service, the conditions on its tables, evaluated in its database.
        let mut conditions: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        conditions
            .entry(ORCHESTRATOR)
            .or_default()
            .push(format!("to_regclass('{ORCHESTRATOR}.sagas') IS NOT NULL"));
        for p in &deployment.participants {
            conditions
                .entry(&p.name)
                .or_default()
                .push(format!("to_regclass('{}.step_ledger') IS NOT NULL", p.name));
        }
        for (service, invariant) in &self.chosen {
            if let Some(ready) = invariant.ready() {
                conditions
                    .entry(service)
                    .or_default()
                    .push(ready.to_owned());
            }
        }
        let queries: Vec<(&str, String)> = conditions
            .into_iter()
            .map(|(service, all)| (service, format!("SELECT {}", all.join(" AND "))))
            .collect();
        loop {
            let mut ready = true;
            for (service, sql) in &queries {
                // (Before the services' migrations, the query fails on a missing table.)
                let holds: Option<bool> =
                    sqlx::query_scalar(sql).fetch_one(db.of(service)).await.ok();
                ready &= holds == Some(true);
            }
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the services did not create their tables within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes what every invariant compares the end with.
    pub async fn before(&mut self, db: &Databases) -> anyhow::Result<()> {
        for (_, invariant) in &mut self.chosen {
            invariant.before(db).await?;
        }
        Ok(())
    }

    /// Checks the books: each saga type's and participant's invariants, then the engine's.
    pub async fn check(
        &self,
        books: &Books<'_>,
        deployment: &Deployment,
    ) -> anyhow::Result<Vec<Check>> {
        let mut checks = Vec::new();
        for (_, invariant) in &self.chosen {
            checks.extend(invariant.check(books).await?);
        }
        checks.push(every_saga_terminal(books.db.orchestrator()).await?);
        let mut steps_twice = 0;
        for (_, invariant) in &self.chosen {
            steps_twice += invariant.done_twice(books.db).await?;
        }
        checks.push(nothing_applied_twice(books.db.orchestrator(), steps_twice).await?);
        let ledgers = ledgers::check(books.db, deployment).await?;
        checks.push(Check::new(
            "each saga's steps agree with the participants' ledgers (every saga type, every step)",
            ledgers.passed(),
            ledgers.describe(),
        ));
        Ok(checks)
    }
}

/// Every saga completed, compensated or failed (a failed one saying why).
async fn every_saga_terminal(db: &PgPool) -> anyhow::Result<Check> {
    let unfinished = count(
        db,
        "SELECT count(*) FROM orchestrator.sagas WHERE state NOT IN ('completed', 'compensated', 'failed')",
    )
    .await?;
    let failed_without_reason = count(
        db,
        "SELECT count(*) FROM orchestrator.sagas WHERE state = 'failed' AND failure_reason IS NULL",
    )
    .await?;
    Ok(Check::new(
        "every saga terminal",
        unfinished == 0 && failed_without_reason == 0,
        format!("{unfinished} not terminal, {failed_without_reason} failed without a reason"),
    ))
}

/// No reply applied twice by the orchestrator, and no step done twice by a participant
/// (`steps_twice`, from the business invariants).
async fn nothing_applied_twice(db: &PgPool, steps_twice: i64) -> anyhow::Result<Check> {
    let applied_twice = count(
        db,
        "SELECT count(*) FROM (SELECT message_id FROM orchestrator.saga_history \
         WHERE decision = 'applied' GROUP BY message_id HAVING count(*) > 1) twice",
    )
    .await?;
    Ok(Check::new(
        "no message applied twice",
        applied_twice == 0 && steps_twice == 0,
        format!("{applied_twice} replies applied twice, {steps_twice} steps done twice"),
    ))
}

/// The one number `sql` selects.
pub async fn count(db: &PgPool, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(db).await?)
}

/// One finished saga of a type, from the orchestrators' table: the one side of a check that
/// compares it with the participants' tables (the other side: [`rows_by_key`]).
pub struct Finished {
    pub key: String,
    pub state: String,
    /// The amount its trigger names (`order_data`'s field the query asks for), if any.
    pub amount: Option<i64>,
}

/// The completed and compensated sagas of type `saga`, each with `order_data`'s `amount`
/// field.
pub async fn finished_sagas(
    db: &Databases,
    saga: &str,
    amount: &str,
) -> anyhow::Result<Vec<Finished>> {
    let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(&format!(
        "SELECT saga_key, state::text, (order_data->>$2)::bigint FROM {ORCHESTRATOR}.sagas \
         WHERE definition_name = $1 AND state IN ('completed', 'compensated')"
    ))
    .bind(saga)
    .bind(amount)
    .fetch_all(db.orchestrator())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(key, state, amount)| Finished { key, state, amount })
        .collect())
}

/// A service's rows by saga key: `sql` selects the key (as text) and one number per row.
pub type ByKey = BTreeMap<String, Vec<i64>>;

/// The rows `sql` selects from `service`'s tables, in its database, by their key.
pub async fn rows_by_key(db: &Databases, service: &str, sql: &str) -> anyhow::Result<ByKey> {
    let rows: Vec<(String, i64)> = sqlx::query_as(sql).fetch_all(db.of(service)).await?;
    let mut by_key = ByKey::new();
    for (key, value) in rows {
        by_key.entry(key).or_default().push(value);
    }
    Ok(by_key)
}

/// How many rows `by_key` has for `key`, and how many of them hold `value`.
pub fn rows_of(by_key: &ByKey, key: &str, value: Option<i64>) -> (usize, usize) {
    let rows = by_key.get(key).map_or(&[][..], Vec::as_slice);
    let holding = rows.iter().filter(|v| Some(**v) == value).count();
    (rows.len(), holding)
}

/// What finished sagas leave in one participant's table: its rows by saga key, and whether a
/// completed saga's one row there must hold the saga's amount.
pub struct Side {
    pub rows: ByKey,
    pub of_the_amount: bool,
}

/// Of `sagas`: how many completed ones lack exactly one row on every side (one holding the
/// saga's amount where the side asks for it), and how many compensated ones left any row on
/// any side.
pub fn finished_wrong(sagas: &[Finished], sides: &[Side]) -> (usize, usize) {
    let (mut completed_wrong, mut compensated_wrong) = (0, 0);
    for saga in sagas {
        let counts = sides.iter().map(|side| {
            let (rows, holding) = rows_of(&side.rows, &saga.key, saga.amount);
            (if side.of_the_amount { holding } else { rows }, rows)
        });
        if saga.state == "completed" {
            completed_wrong += usize::from(!counts.clone().all(|(one, _)| one == 1));
        } else {
            compensated_wrong += usize::from(counts.clone().any(|(_, rows)| rows > 0));
        }
    }
    (completed_wrong, compensated_wrong)
}

/// Of the sagas of type `saga`: how many of `keys` have none, and how many there are in all
/// but those `garbage` started.
async fn sagas_per_key(
    db: &PgPool,
    saga: &str,
    keys: &[Uuid],
    garbage: &[Uuid],
) -> anyhow::Result<(i64, i64)> {
    let missing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM UNNEST($1::uuid[]) AS placed (id) \
         WHERE NOT EXISTS (SELECT 1 FROM orchestrator.sagas s \
                           WHERE s.definition_name = $2 AND s.saga_key = placed.id::text)",
    )
    .bind(keys)
    .bind(saga)
    .fetch_one(db)
    .await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orchestrator.sagas \
         WHERE definition_name = $2 AND NOT saga_key = ANY($1::uuid[]::text[])",
    )
    .bind(garbage)
    .bind(saga)
    .fetch_one(db)
    .await?;
    Ok((missing, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_saga_type_and_participant_of_the_repository_has_its_invariant() {
        let deployment = crate::deployment::tests::repository();
        let sagas: Vec<&str> = deployment.sagas().map(|d| d.name.as_str()).collect();
        let participants: Vec<&str> = deployment.services().skip(1).collect();
        fn registered(registry: &[(&'static str, Build)]) -> Vec<&'static str> {
            registry.iter().map(|(name, _)| *name).collect()
        }
        assert_eq!(sagas, registered(&SAGAS));
        assert_eq!(participants, registered(&PARTICIPANTS));
        assert_eq!(
            Invariants::choose(&deployment).chosen.len(),
            SAGAS.len() + PARTICIPANTS.len()
        );
    }

    /// The participants' side of a check joined in Rust: a key's rows, and those of them that
    /// hold the saga's amount (none when the saga names no amount).
    #[test]
    fn rows_by_key_count_a_keys_rows_and_those_holding_the_amount() {
        let charged = ByKey::from([
            ("a".to_owned(), vec![500]),
            ("b".to_owned(), vec![500, 700]),
        ]);
        assert_eq!(rows_of(&charged, "a", Some(500)), (1, 1));
        assert_eq!(rows_of(&charged, "a", Some(400)), (1, 0));
        assert_eq!(rows_of(&charged, "b", Some(700)), (2, 1));
        assert_eq!(rows_of(&charged, "b", None), (2, 0));
        assert_eq!(rows_of(&charged, "c", Some(500)), (0, 0));
    }

    /// A completed saga needs exactly one row on each side (the charge of its amount); a
    /// compensated one none anywhere.
    #[test]
    fn finished_sagas_are_checked_against_every_side() {
        let finished = |key: &str, state: &str| Finished {
            key: key.to_owned(),
            state: state.to_owned(),
            amount: Some(500),
        };
        let sides = [
            Side {
                rows: ByKey::from([("ok".to_owned(), vec![0]), ("kept".to_owned(), vec![0])]),
                of_the_amount: false,
            },
            Side {
                rows: ByKey::from([
                    ("ok".to_owned(), vec![500]),
                    ("short".to_owned(), vec![400]),
                ]),
                of_the_amount: true,
            },
        ];
        let sagas = [
            finished("ok", "completed"),
            finished("short", "completed"),
            finished("kept", "compensated"),
            finished("clean", "compensated"),
        ];
        assert_eq!(finished_wrong(&sagas, &sides), (1, 1));
    }

    #[test]
    fn the_run_waits_for_the_tables_the_business_invariants_read() {
        let deployment = crate::deployment::tests::repository();
        let ready: Vec<&str> = Invariants::choose(&deployment)
            .chosen
            .iter()
            .filter_map(|(_, i)| i.ready())
            .collect();
        assert_eq!(
            ready,
            [
                "EXISTS (SELECT 1 FROM inventory.stock)",
                "EXISTS (SELECT 1 FROM payment.accounts)",
                "to_regclass('returns.return_lines') IS NOT NULL",
                "to_regclass('shipping.shipments') IS NOT NULL",
            ]
        );
    }
}
