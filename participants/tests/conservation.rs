//! Conservation across an order, its returns and their compensations (issue 20, finding 4): in
//! any order the commands arrive (interleaved, duplicated, redelivered, in batches, a return
//! before or after its order's compensation, a restock undone before or after), no SKU's stock
//! is ever higher, and no account richer, than before the order; and once every order saga is
//! undone, stock and money are exactly where they started.
//!
//! The tests drive the participants' `Step` implementations against a real PostgreSQL (one
//! database per test, the test kit's; fresh SKUs and customers per case), without
//! Kafka: each batch of commands is one transaction per participant, handled as the runtime
//! handles it (its step ledger modelled here: one forward outcome per saga key and step, the
//! compensation once, a forward command after its compensation refused; runs split at a
//! repeated key; the due forward requests of a step together, a compensation in its turn).
//!
//! Environment: `TEST_DATABASE_URL`, a server URL without a database name (default
//! postgres://postgres@127.0.0.1:5432).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Display;

use participant_sdk::{Request, Step};
use participants::inventory::{Release, Reservation, ReserveStock, Restock, Returned, UndoRestock};
use participants::payment::{Charge, ChargePayment, IssueRefund, Refund, ReturnRefund};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, PgPool};
use testkit::TestDatabase;
use uuid::Uuid;

static INVENTORY: Migrator = sqlx::migrate!("../migrations/inventory");
static PAYMENT: Migrator = sqlx::migrate!("../migrations/payment");

/// A database of this test's own with the inventory and payment schemas, dropped at the end
/// (also when the test fails).
struct TestDb {
    inventory: PgPool,
    payment: PgPool,
    _database: TestDatabase,
}

impl TestDb {
    async fn create() -> Self {
        let database = TestDatabase::create("conservation").await;
        let url = database.url();
        let open = |schema: &'static str, own: &'static Migrator| {
            let url = url.clone();
            async move {
                let pool = messaging::db::connect(&url, schema, 8)
                    .await
                    .expect("connect to the test database");
                messaging::db::migrate(&pool, schema, &[&participant_sdk::RUNTIME_MIGRATIONS, own])
                    .await
                    .expect("migrate");
                pool
            }
        };
        Self {
            inventory: open("inventory", &INVENTORY).await,
            payment: open("payment", &PAYMENT).await,
            _database: database,
        }
    }
}

/// How many SKUs and customers a case has (fresh ones, named after the case).
const SKUS: usize = 3;

fn decode<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a payload the step decodes")
}

fn lines(items: &[(usize, i32)], skus: &[String]) -> Value {
    items
        .iter()
        .map(|(sku, quantity)| json!({ "sku": skus[*sku % SKUS], "quantity": quantity }))
        .collect()
}

/// An order of the case: its lines (SKU index, quantity) and its charge.
#[derive(Debug, Clone)]
struct OrderSpec {
    lines: Vec<(usize, i32)>,
    total_cents: i64,
}

/// A return of the case: the order it names (an index past the orders is an order never
/// placed), what comes back and the refund asked.
#[derive(Debug, Clone)]
struct ReturnSpec {
    order: usize,
    lines: Vec<ReturnLine>,
    refund_cents: i64,
}

/// A returned line: mostly a SKU of the order (as many as it took, fewer, or more), sometimes
/// any SKU.
#[derive(Debug, Clone, Copy)]
enum ReturnLine {
    /// The SKU of the order's line `line` (modulo its lines).
    Of {
        line: usize,
        quantity: i32,
    },
    Any {
        sku: usize,
        quantity: i32,
    },
}

/// One command delivered to a participant; the index names the order or return (modulo their
/// number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Reserve(usize),
    Release(usize),
    Charge(usize),
    RefundPayment(usize),
    Restock(usize),
    UndoRestock(usize),
    IssueRefund(usize),
    /// Every return's restock, in one batch (several returns of one order among them).
    RestockAll,
}

#[derive(Debug, Clone)]
struct Case {
    stock: [i32; SKUS],
    balance: i64,
    orders: Vec<OrderSpec>,
    returns: Vec<ReturnSpec>,
    /// The deliveries, each inner list one batch (one transaction per participant).
    batches: Vec<Vec<Op>>,
}

fn case() -> impl Strategy<Value = Case> {
    let line = (0..SKUS, 1..=3i32);
    let order = (prop::collection::vec(line.clone(), 1..=2), 100..=2_000i64)
        .prop_map(|(lines, total_cents)| OrderSpec { lines, total_cents });
    let back = prop_oneof![
        4 => (0..2usize, 1..=4i32).prop_map(|(line, quantity)| ReturnLine::Of { line, quantity }),
        1 => (0..SKUS, 1..=4i32).prop_map(|(sku, quantity)| ReturnLine::Any { sku, quantity }),
    ];
    let ret = (0..=2usize, prop::collection::vec(back, 1..=2), 1..=1_500i64).prop_map(
        |(order, lines, refund_cents)| ReturnSpec {
            order,
            lines,
            refund_cents,
        },
    );
    let op = prop_oneof![
        3 => (0..3usize).prop_map(Op::Reserve),
        2 => (0..3usize).prop_map(Op::Release),
        3 => (0..3usize).prop_map(Op::Charge),
        2 => (0..3usize).prop_map(Op::RefundPayment),
        6 => (0..5usize).prop_map(Op::Restock),
        2 => (0..5usize).prop_map(Op::UndoRestock),
        3 => (0..5usize).prop_map(Op::IssueRefund),
        1 => Just(Op::RestockAll),
    ];
    (
        [0..=10i32, 0..=10i32, 0..=10i32],
        0..=4_000i64,
        prop::collection::vec(order, 1..=3),
        prop::collection::vec(ret, 0..=5),
        prop::collection::vec(prop::collection::vec(op, 1..=6), 1..=12),
    )
        .prop_map(|(stock, balance, orders, returns, batches)| Case {
            stock,
            balance,
            orders,
            returns,
            batches,
        })
}

/// What the step ledger remembers of one (saga key, step), as the runtime keeps it.
#[derive(Debug, Clone, Default)]
struct Entry {
    forward: Option<Result<(), String>>,
    compensated: bool,
}

/// A case's keys, tables and ledgers.
struct World<'a> {
    db: &'a TestDb,
    case: &'a Case,
    skus: Vec<String>,
    customer: String,
    order_ids: Vec<Uuid>,
    return_ids: Vec<Uuid>,
    /// An order id no order has: returns of it name an order never placed.
    never_placed: Uuid,
    ledger: HashMap<(Uuid, &'static str), Entry>,
}

/// Which participant serves a command, and the ledger key (saga key, step) it is answered by.
fn ledger_key(world: &World<'_>, op: Op) -> Option<(bool, (Uuid, &'static str))> {
    let order = |i: usize| world.order_ids[i % world.order_ids.len()];
    let ret = |i: usize| {
        (!world.return_ids.is_empty()).then(|| world.return_ids[i % world.return_ids.len()])
    };
    Some(match op {
        Op::Reserve(i) | Op::Release(i) => (true, (order(i), ReserveStock::STEP)),
        Op::Charge(i) | Op::RefundPayment(i) => (false, (order(i), ChargePayment::STEP)),
        Op::Restock(i) | Op::UndoRestock(i) => (true, (ret(i)?, Restock::STEP)),
        Op::IssueRefund(i) => (false, (ret(i)?, IssueRefund::STEP)),
        Op::RestockAll => return None,
    })
}

fn is_compensation(op: Op) -> bool {
    matches!(
        op,
        Op::Release(_) | Op::RefundPayment(_) | Op::UndoRestock(_)
    )
}

fn outcomes<F: Display>(outcomes: Vec<Result<(), F>>) -> Vec<Result<(), String>> {
    outcomes
        .into_iter()
        .map(|o| o.map_err(|f| f.to_string()))
        .collect()
}

impl World<'_> {
    /// The order return `i` names, and what it sends back (SKU index, quantity).
    fn order_of_return(&self, i: usize) -> (Uuid, &ReturnSpec, Vec<(usize, i32)>) {
        let spec = &self.case.returns[i % self.case.returns.len()];
        let order_id = self
            .order_ids
            .get(spec.order)
            .copied()
            .unwrap_or(self.never_placed);
        // A return of an order never placed sends back what the first order took.
        let order = &self.case.orders[spec.order % self.case.orders.len()];
        let lines = spec
            .lines
            .iter()
            .map(|line| match *line {
                ReturnLine::Of { line, quantity } => {
                    (order.lines[line % order.lines.len()].0, quantity)
                }
                ReturnLine::Any { sku, quantity } => (sku, quantity),
            })
            .collect();
        (order_id, spec, lines)
    }

    /// Runs the forward requests `ops` (all of one step, keys distinct) in one call.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        ops: &[Op],
    ) -> Result<Vec<Result<(), String>>, String> {
        let saga_id = Uuid::from_u128(1);
        let err = |e: participant_sdk::StepError| format!("{e:?}");
        let Some(first) = ops.first() else {
            return Ok(Vec::new());
        };
        let keys: Vec<String> = ops
            .iter()
            .map(|op| ledger_key(self, *op).map(|(_, (k, _))| k.to_string()))
            .collect::<Option<_>>()
            .ok_or("a return op without returns")?;
        macro_rules! run {
            ($step:expr, $payloads:expr) => {{
                let payloads = $payloads;
                let requests: Vec<_> = payloads
                    .iter()
                    .zip(&keys)
                    .map(|(payload, key)| Request {
                        saga_id,
                        key: key.as_str(),
                        attempt: 1,
                        payload,
                    })
                    .collect();
                Ok(outcomes(
                    $step.forward_all(tx, &requests).await.map_err(err)?,
                ))
            }};
        }
        match first {
            Op::Reserve(_) => run!(
                ReserveStock,
                ops.iter()
                    .map(|op| {
                        let Op::Reserve(i) = op else { unreachable!() };
                        let i = i % self.order_ids.len();
                        decode::<Reservation>(json!({
                            "order_id": self.order_ids[i],
                            "items": lines(&self.case.orders[i].lines, &self.skus),
                        }))
                    })
                    .collect::<Vec<_>>()
            ),
            Op::Charge(_) => run!(
                ChargePayment,
                ops.iter()
                    .map(|op| {
                        let Op::Charge(i) = op else { unreachable!() };
                        let i = i % self.order_ids.len();
                        decode::<Charge>(json!({
                            "order_id": self.order_ids[i],
                            "customer_id": self.customer,
                            "amount_cents": self.case.orders[i].total_cents,
                            "currency": "EUR",
                        }))
                    })
                    .collect::<Vec<_>>()
            ),
            Op::Restock(_) => run!(
                Restock,
                ops.iter()
                    .map(|op| {
                        let Op::Restock(i) = op else { unreachable!() };
                        let (order_id, _, back) = self.order_of_return(*i);
                        decode::<Returned>(json!({
                            "return_id": self.return_ids[i % self.return_ids.len()],
                            "order_id": order_id,
                            "items": lines(&back, &self.skus),
                        }))
                    })
                    .collect::<Vec<_>>()
            ),
            Op::IssueRefund(_) => run!(
                IssueRefund,
                ops.iter()
                    .map(|op| {
                        let Op::IssueRefund(i) = op else {
                            unreachable!()
                        };
                        let (order_id, spec, _) = self.order_of_return(*i);
                        decode::<ReturnRefund>(json!({
                            "return_id": self.return_ids[i % self.return_ids.len()],
                            "order_id": order_id,
                            "customer_id": self.customer,
                            "amount_cents": spec.refund_cents,
                            "currency": "EUR",
                        }))
                    })
                    .collect::<Vec<_>>()
            ),
            other => Err(format!("{other:?} is no forward command")),
        }
    }

    async fn compensate(
        &self,
        tx: &mut PgConnection,
        op: Op,
    ) -> Result<Result<(), String>, String> {
        let err = |e: participant_sdk::StepError| format!("{e:?}");
        let (_, (key, _)) = ledger_key(self, op).ok_or("a return op without returns")?;
        let key_text = key.to_string();
        fn request<'a, T>(key: &'a str, payload: &'a T) -> Request<'a, T> {
            Request {
                saga_id: Uuid::from_u128(1),
                key,
                attempt: 1,
                payload,
            }
        }
        Ok(match op {
            Op::Release(_) => {
                let payload: Release = decode(json!({ "order_id": key }));
                ReserveStock
                    .compensate(tx, request(&key_text, &payload))
                    .await
                    .map_err(err)?
                    .map_err(|f| f.to_string())
            }
            Op::RefundPayment(_) => {
                let payload: Refund = decode(json!({ "order_id": key }));
                ChargePayment
                    .compensate(tx, request(&key_text, &payload))
                    .await
                    .map_err(err)?
                    .map_err(|f| f.to_string())
            }
            Op::UndoRestock(_) => {
                let payload: UndoRestock = decode(json!({ "return_id": key }));
                Restock
                    .compensate(tx, request(&key_text, &payload))
                    .await
                    .map_err(err)?
                    .map_err(|f| f.to_string())
            }
            other => return Err(format!("{other:?} is no compensation")),
        })
    }

    /// Handles one participant's commands of a batch in one transaction, as the runtime does:
    /// runs split where a (saga key, step) repeats; in a run, the ledger decides each command,
    /// the due forward requests of a step go together (each step's in the order of its first),
    /// a compensation runs in its turn after the forwards before it; the ledger is written
    /// with the transaction.
    async fn deliver(&mut self, pool: &PgPool, ops: &[Op]) -> Result<(), String> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
        let mut ledger = self.ledger.clone();
        let mut start = 0;
        while start < ops.len() {
            let mut seen = HashSet::new();
            let mut end = start;
            while end < ops.len() {
                let Some((_, key)) = ledger_key(self, ops[end]) else {
                    break;
                };
                if !seen.insert(key) {
                    break;
                }
                end += 1;
            }
            let run = &ops[start..end.max(start + 1)];
            start = end.max(start + 1);
            let mut due: Vec<Op> = Vec::new();
            for &op in run {
                let Some((_, key)) = ledger_key(self, op) else {
                    continue;
                };
                let entry = ledger.entry(key).or_default();
                if !is_compensation(op) {
                    if entry.compensated {
                        if entry.forward.is_none() {
                            entry.forward = Some(Err("compensated before".into()));
                        }
                    } else if entry.forward.is_none() {
                        due.push(op);
                    }
                    continue;
                }
                if entry.compensated {
                    continue;
                }
                self.run_due(&mut tx, &mut due, &mut ledger).await?;
                if self.compensate(&mut tx, op).await?.is_ok() {
                    ledger.entry(key).or_default().compensated = true;
                }
            }
            self.run_due(&mut tx, &mut due, &mut ledger).await?;
        }
        tx.commit().await.map_err(|e| e.to_string())?;
        self.ledger = ledger;
        Ok(())
    }

    async fn run_due(
        &self,
        tx: &mut PgConnection,
        due: &mut Vec<Op>,
        ledger: &mut HashMap<(Uuid, &'static str), Entry>,
    ) -> Result<(), String> {
        let mut by_step: Vec<(std::mem::Discriminant<Op>, Vec<Op>)> = Vec::new();
        for op in due.drain(..) {
            let step = std::mem::discriminant(&op);
            match by_step.iter_mut().find(|(s, _)| *s == step) {
                Some((_, ops)) => ops.push(op),
                None => by_step.push((step, vec![op])),
            }
        }
        for (_, ops) in by_step {
            let results = self.forward_all(tx, &ops).await?;
            for (op, result) in ops.into_iter().zip(results) {
                if let Some((_, key)) = ledger_key(self, op) {
                    ledger.entry(key).or_default().forward = Some(result);
                }
            }
        }
        Ok(())
    }

    /// Delivers a batch: each participant's share in its own transaction.
    async fn batch(&mut self, ops: &[Op]) -> Result<(), String> {
        let every_return = 0..self.return_ids.len();
        let ops: Vec<Op> = ops
            .iter()
            .flat_map(|op| match op {
                Op::RestockAll => every_return.clone().map(Op::Restock).collect(),
                other => vec![*other],
            })
            .collect();
        let (inventory, payment): (Vec<Op>, Vec<Op>) = ops
            .iter()
            .filter(|op| ledger_key(self, **op).is_some())
            .partition(|op| ledger_key(self, **op).is_some_and(|(inv, _)| inv));
        let (inventory_pool, payment_pool) = (self.db.inventory.clone(), self.db.payment.clone());
        self.deliver(&inventory_pool, &inventory).await?;
        self.deliver(&payment_pool, &payment).await
    }

    async fn stock(&self) -> Result<Vec<i64>, String> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT sku, available::bigint FROM stock WHERE sku = ANY($1)")
                .bind(&self.skus)
                .fetch_all(&self.db.inventory)
                .await
                .map_err(|e| e.to_string())?;
        let rows: BTreeMap<String, i64> = rows.into_iter().collect();
        Ok(self
            .skus
            .iter()
            .map(|sku| rows.get(sku).copied().unwrap_or(0))
            .collect())
    }

    async fn balance(&self) -> Result<i64, String> {
        sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE customer_id = $1")
            .bind(&self.customer)
            .fetch_one(&self.db.payment)
            .await
            .map_err(|e| e.to_string())
    }

    /// Stock and money as the tables have them, and what broke conservation: more of a SKU,
    /// or more money, than before the orders.
    async fn excess(&self) -> Result<Option<String>, String> {
        let stock = self.stock().await?;
        let balance = self.balance().await?;
        let mut excess = Vec::new();
        for (i, (now, before)) in stock.iter().zip(self.case.stock).enumerate() {
            if *now > i64::from(before) {
                excess.push(format!("SKU {i}: {now} in stock, {before} before"));
            }
        }
        if balance > self.case.balance {
            excess.push(format!("balance {balance}, {} before", self.case.balance));
        }
        Ok((!excess.is_empty()).then(|| excess.join("; ")))
    }
}

/// Runs one case: its deliveries, checking after each batch that nothing is above where it
/// started; then every order saga undone (its reservation released, its charge paid back),
/// after which stock and money are exactly where they started.
async fn run_case(db: &TestDb, case: &Case) -> Result<(), TestCaseError> {
    let fail = |e: String| TestCaseError::fail(e);
    let id = Uuid::new_v4().simple().to_string();
    let skus: Vec<String> = (0..SKUS).map(|i| format!("P{id}-{i}")).collect();
    let customer = format!("P{id}");
    sqlx::query("INSERT INTO stock (sku, available) SELECT * FROM UNNEST($1::text[], $2::int[])")
        .bind(&skus)
        .bind(case.stock.to_vec())
        .execute(&db.inventory)
        .await
        .map_err(|e| fail(e.to_string()))?;
    sqlx::query(
        "INSERT INTO accounts (customer_id, balance_cents, currency) VALUES ($1, $2, 'EUR')",
    )
    .bind(&customer)
    .bind(case.balance)
    .execute(&db.payment)
    .await
    .map_err(|e| fail(e.to_string()))?;
    let mut world = World {
        db,
        case,
        skus,
        customer,
        order_ids: case.orders.iter().map(|_| Uuid::new_v4()).collect(),
        return_ids: case.returns.iter().map(|_| Uuid::new_v4()).collect(),
        never_placed: Uuid::new_v4(),
        ledger: HashMap::new(),
    };
    for (n, batch) in case.batches.iter().enumerate() {
        world.batch(batch).await.map_err(fail)?;
        if let Some(excess) = world.excess().await.map_err(fail)? {
            return Err(fail(format!("after batch {n} ({batch:?}): {excess}")));
        }
    }
    // Every order saga undone, in the saga's order (the charge, then the reservation).
    for i in 0..case.orders.len() {
        world.batch(&[Op::RefundPayment(i)]).await.map_err(fail)?;
        world.batch(&[Op::Release(i)]).await.map_err(fail)?;
    }
    let stock = world.stock().await.map_err(fail)?;
    let balance = world.balance().await.map_err(fail)?;
    let started: Vec<i64> = case.stock.iter().map(|n| i64::from(*n)).collect();
    if stock != started || balance != case.balance {
        return Err(fail(format!(
            "every order undone: stock {stock:?} (started {started:?}), balance {balance} (started {})",
            case.balance
        )));
    }
    Ok(())
}

/// How many cases the property runs: `CONSERVATION_CASES`, default 256.
fn cases() -> u32 {
    std::env::var("CONSERVATION_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

#[test]
fn no_interleaving_of_orders_returns_and_compensations_creates_stock_or_money() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let db = runtime.block_on(TestDb::create());
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(), |case| runtime.block_on(run_case(&db, &case)));
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// Returns of one order arriving at once, each in its own transaction on its own connection:
/// the order's reservation row, locked by each, lets only as many through as the order took.
#[test]
fn concurrent_returns_of_one_order_cannot_both_pass() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let db = TestDb::create().await;
        let sku = format!("C{}", Uuid::new_v4().simple());
        sqlx::query("INSERT INTO stock (sku, available) VALUES ($1, 10)")
            .bind(&sku)
            .execute(&db.inventory)
            .await
            .expect("stock");
        for round in 0..10 {
            let order_id = Uuid::new_v4();
            let mut tx = db.inventory.begin().await.expect("begin");
            let reservation: Reservation = decode(json!({
                "order_id": order_id,
                "items": [{ "sku": sku, "quantity": 3 }],
            }));
            let key = order_id.to_string();
            let request = Request {
                saga_id: order_id,
                key: &key,
                attempt: 1,
                payload: &reservation,
            };
            let reserved = ReserveStock
                .forward_all(&mut tx, &[request])
                .await
                .expect("reserve");
            assert!(reserved.iter().all(Result::is_ok), "round {round}");
            tx.commit().await.expect("commit");
            // Eight returns of 1 at once (and, every other round, the order undone among
            // them): at most 3 go back, and with the release exactly 3 in all.
            let mut tasks = Vec::new();
            for n in 0..8 {
                let (pool, sku) = (db.inventory.clone(), sku.clone());
                tasks.push(tokio::spawn(async move {
                    let mut tx = pool.begin().await.expect("begin");
                    if round % 2 == 1 && n == 4 {
                        let release: Release = decode(json!({ "order_id": order_id }));
                        let key = order_id.to_string();
                        let request = Request {
                            saga_id: order_id,
                            key: &key,
                            attempt: 1,
                            payload: &release,
                        };
                        let released = ReserveStock.compensate(&mut tx, request).await;
                        assert!(matches!(released, Ok(Ok(()))));
                    } else {
                        let return_id = Uuid::new_v4();
                        let returned: Returned = decode(json!({
                            "return_id": return_id,
                            "order_id": order_id,
                            "items": [{ "sku": sku, "quantity": 1 }],
                        }));
                        let key = return_id.to_string();
                        let request = Request {
                            saga_id: return_id,
                            key: &key,
                            attempt: 1,
                            payload: &returned,
                        };
                        let restocked = Restock.forward_all(&mut tx, &[request]).await;
                        assert!(restocked.is_ok(), "{restocked:?}");
                    }
                    tx.commit().await.expect("commit");
                }));
            }
            for task in tasks {
                task.await.expect("a return task");
            }
            let available: i32 = sqlx::query_scalar("SELECT available FROM stock WHERE sku = $1")
                .bind(&sku)
                .fetch_one(&db.inventory)
                .await
                .expect("stock");
            if round % 2 == 1 {
                assert_eq!(available, 10, "round {round}: the order undone, all 3 back");
            } else {
                assert_eq!(available, 10, "round {round}: 3 of the 8 returns went back");
            }
        }
    });
}
