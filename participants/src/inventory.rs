//! Inventory: reserves stock for an order (all lines or none) and releases it, and puts
//! returned items back in stock and takes them out again. It serves the order saga's
//! `reserve_stock` step and the return saga's `restock` step.

use std::collections::BTreeMap;
use std::fmt;

use events::Line;
use messaging::db::column;
use participant_sdk::{Participant, Request, Step, StepError};
use serde::Deserialize;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use uuid::Uuid;

static MIGRATIONS: Migrator = sqlx::migrate!("../migrations/inventory");

/// The inventory participant: its tables and its steps.
pub fn participant() -> Participant {
    Participant::new("inventory", &MIGRATIONS)
        .metrics_port(9181)
        .step(ReserveStock)
        .step(Restock)
}

/// `reserve_stock`: takes every line of an order from stock, or none.
pub struct ReserveStock;

/// What `ReserveStock` carries.
#[derive(Debug, Deserialize)]
pub struct Reservation {
    pub order_id: Uuid,
    pub items: Vec<Line>,
}

/// What `ReleaseStock` carries.
#[derive(Debug, Deserialize)]
pub struct Release {
    pub order_id: Uuid,
}

/// Why stock was not reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockRefusal {
    UnknownSku(String),
    Insufficient {
        sku: String,
        requested: i64,
        available: i64,
    },
}

impl fmt::Display for StockRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownSku(sku) => write!(f, "unknown SKU {sku}"),
            Self::Insufficient {
                sku,
                requested,
                available,
            } => write!(
                f,
                "insufficient stock for {sku}: {requested} requested, {available} available"
            ),
        }
    }
}

impl Step for ReserveStock {
    const STEP: &'static str = "reserve_stock";
    type Forward = Reservation;
    type Compensation = Release;
    type Failure = StockRefusal;

    /// All reservations of a batch in two statements: lock every SKU they name, check and
    /// take stock in memory in the commands' order, then write the stock, the reservations
    /// and their lines together.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, Reservation>],
    ) -> Result<Vec<Result<(), StockRefusal>>, StepError> {
        let requests: Vec<(Uuid, Uuid, BTreeMap<&str, i64>)> = requests
            .iter()
            .map(|request| {
                let items = request.payload.items.iter();
                let wanted = by_sku(items.map(|i| (i.sku(), i.quantity())));
                (request.saga_id, request.payload.order_id, wanted)
            })
            .collect();
        let skus = skus_of(requests.iter().map(|(_, _, wanted)| wanted));
        let mut available = lock_stock(tx, &skus).await?;
        let refusal = |sku: &str, have: Option<i64>, quantity: i64| match have {
            None => Some(StockRefusal::UnknownSku(sku.to_owned())),
            Some(have) if have < quantity => Some(StockRefusal::Insufficient {
                sku: sku.to_owned(),
                requested: quantity,
                available: have,
            }),
            Some(_) => None,
        };
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut reservations: Vec<(Uuid, Uuid)> = Vec::new();
        let mut lines: Vec<(Uuid, String, i32)> = Vec::new();
        for (saga_id, order_id, wanted) in &requests {
            let outcome = move_all(&mut available, wanted, Move::Take, refusal);
            if outcome.is_ok() {
                lines.extend(wanted.iter().map(|(sku, quantity)| {
                    let quantity = i32::try_from(*quantity).unwrap_or(i32::MAX);
                    (*order_id, (*sku).to_owned(), quantity)
                }));
                reservations.push((*order_id, *saga_id));
            }
            outcomes.push(outcome);
        }
        if reservations.is_empty() {
            return Ok(outcomes);
        }
        // One statement: the stock, the reservations and their lines (the lines' foreign keys
        // are checked at its end, when the reservations are in).
        let (skus, left): (Vec<&String>, Vec<i64>) =
            available.iter().map(|(sku, n)| (sku, *n)).unzip();
        sqlx::query!(
            "WITH stocked AS (
                 UPDATE stock SET available = now_has.available
                 FROM UNNEST($1::text[], $2::bigint[]) AS now_has (sku, available)
                 WHERE stock.sku = now_has.sku AND stock.available <> now_has.available
             ), reserved AS (
                 INSERT INTO reservations (order_id, saga_id, status)
                 SELECT order_id, saga_id, 'reserved' FROM UNNEST($3::uuid[], $4::uuid[])
                      AS r (order_id, saga_id)
             )
             INSERT INTO reservation_lines (order_id, sku, quantity)
             SELECT order_id, sku, quantity FROM UNNEST($5::uuid[], $6::text[], $7::int[])
                  AS l (order_id, sku, quantity)",
            &skus as &[&String],
            &left,
            &column(&reservations, |r| r.0),
            &column(&reservations, |r| r.1),
            &column(&lines, |l| l.0),
            &column(&lines, |l| l.1.as_str()) as &[&str],
            &column(&lines, |l| l.2),
        )
        .execute(&mut *tx)
        .await?;
        Ok(outcomes)
    }

    /// Gives the order's reservation back to stock, less what returns of the order restocked
    /// already (those items are back on the shelf: releasing them again would count them
    /// twice). Locks the reservation row first, like a restock of the order, so that the two
    /// take turns.
    async fn compensate(
        &self,
        tx: &mut PgConnection,
        request: Request<'_, Release>,
    ) -> Result<Result<(), StockRefusal>, StepError> {
        let order_id = request.payload.order_id;
        let released = sqlx::query!(
            "UPDATE reservations SET status = 'released', released_at = now()
             WHERE order_id = $1 AND status = 'reserved'",
            order_id,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if released == 0 {
            // Nothing reserved (the reservation never happened here): nothing to release.
            return Ok(Ok(()));
        }
        // A statement of its own after the lock, so it sees every restock of the order that
        // committed while this one waited. `greatest`: the restock's check keeps the returns
        // within the quantity; should that ever not hold, nothing is released rather than
        // more than was taken. One statement records what each line gives back and puts it
        // back in stock (putting back cannot be refused), as the release was one statement
        // before returns were bounded.
        sqlx::query!(
            r#"WITH lines AS (
                   UPDATE reservation_lines l
                   SET released = greatest(l.quantity - coalesce(
                       (SELECT sum(rl.quantity) FROM restocks r JOIN restock_lines rl USING (return_id)
                        WHERE r.order_id = l.order_id AND r.status = 'restocked' AND rl.sku = l.sku),
                       0), 0)
                   WHERE l.order_id = $1
                   RETURNING l.sku, l.released)
               UPDATE stock SET available = stock.available + lines.released
               FROM lines WHERE stock.sku = lines.sku AND lines.released > 0"#,
            order_id,
        )
        .execute(&mut *tx)
        .await?;
        Ok(Ok(()))
    }
}

/// `restock`: puts a return's items back in stock (all lines or none), at most what the
/// return's order took and has not had back yet, and takes them out again when the return saga
/// undoes it.
pub struct Restock;

/// What `Restock` carries.
#[derive(Debug, Deserialize)]
pub struct Returned {
    pub return_id: Uuid,
    /// The order the items came from, whose reservation bounds what may come back. Return
    /// sagas of definition version 1 did not send it: their restocks are refused
    /// ([`RestockRefusal::NoOrder`]), since nothing would bound them.
    #[serde(default)]
    pub order_id: Option<Uuid>,
    pub items: Vec<Line>,
}

/// What `UndoRestock` carries.
#[derive(Debug, Deserialize)]
pub struct UndoRestock {
    pub return_id: Uuid,
}

/// Why a restock was refused, or could not be undone this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestockRefusal {
    /// The command names no order (a return saga of definition version 1).
    NoOrder,
    /// The order reserved nothing here (it was refused, never placed, or undone before it
    /// reserved): nothing of it can come back.
    UnknownOrder { order_id: Uuid },
    /// The order's saga was undone and its reservation released: its items are in stock
    /// already.
    OrderReleased { order_id: Uuid },
    /// The order did not take this SKU.
    NotInOrder { order_id: Uuid, sku: String },
    /// More of a SKU than the order took less what it had back already (its other returns).
    MoreThanLeft {
        order_id: Uuid,
        sku: String,
        returned: i64,
        left: i64,
    },
    /// The inventory does not carry the SKU: nothing of it can go back on a shelf here.
    UnknownSku(String),
    /// Stock would pass what a stock row holds.
    Overflow { sku: String },
    /// Undoing: the restocked items were taken since (by orders); retried until they are back.
    AlreadyTaken {
        sku: String,
        restocked: i64,
        available: i64,
    },
}

impl fmt::Display for RestockRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoOrder => write!(
                f,
                "the restock names no order, and a return puts back at most what its order took"
            ),
            Self::UnknownOrder { order_id } => {
                write!(f, "order {order_id} reserved nothing here: nothing of it to put back")
            }
            Self::OrderReleased { order_id } => write!(
                f,
                "order {order_id} was undone and its reservation released: nothing of it to put back"
            ),
            Self::NotInOrder { order_id, sku } => write!(f, "order {order_id} did not take {sku}"),
            Self::MoreThanLeft {
                order_id,
                sku,
                returned,
                left,
            } => write!(
                f,
                "{returned} of {sku} returned, but only {left} of the order {order_id} took are not back yet"
            ),
            Self::UnknownSku(sku) => write!(f, "unknown SKU {sku}"),
            Self::Overflow { sku } => write!(f, "stock of {sku} would overflow"),
            Self::AlreadyTaken {
                sku,
                restocked,
                available,
            } => write!(
                f,
                "{restocked} of {sku} were restocked but only {available} are left in stock"
            ),
        }
    }
}

/// The quantities of `items` (SKU, quantity) added up per SKU.
fn by_sku<'a, Q: Into<i64>>(items: impl Iterator<Item = (&'a str, Q)>) -> BTreeMap<&'a str, i64> {
    let mut total: BTreeMap<&str, i64> = BTreeMap::new();
    for (sku, quantity) in items {
        *total.entry(sku).or_default() += quantity.into();
    }
    total
}

/// Every SKU the quantities name, once, sorted.
fn skus_of<'a, 'b: 'a>(
    quantities: impl Iterator<Item = &'a BTreeMap<&'b str, i64>>,
) -> Vec<String> {
    let skus: std::collections::BTreeSet<&str> =
        quantities.flat_map(|q| q.keys().copied()).collect();
    skus.into_iter().map(str::to_owned).collect()
}

/// Which way [`move_all`] moves stock.
#[derive(Debug, Clone, Copy)]
enum Move {
    /// Out of stock (a reservation).
    Take,
    /// Into stock (a restock).
    PutBack,
}

/// Moves every SKU of `quantities` (one request's) in `available`, or none of them:
/// `refusal(sku, stock, quantity)` says why a SKU cannot move (`stock` is `None` for a SKU the
/// inventory does not carry). A batch's requests call it one after the other, so each sees
/// what the earlier ones moved.
fn move_all<R>(
    available: &mut BTreeMap<String, i64>,
    quantities: &BTreeMap<&str, i64>,
    direction: Move,
    refusal: impl Fn(&str, Option<i64>, i64) -> Option<R>,
) -> Result<(), R> {
    if let Some(refused) = quantities
        .iter()
        .find_map(|(sku, quantity)| refusal(sku, available.get(*sku).copied(), *quantity))
    {
        return Err(refused);
    }
    for (sku, quantity) in quantities {
        if let Some(have) = available.get_mut(*sku) {
            match direction {
                Move::Take => *have -= quantity,
                Move::PutBack => *have += quantity,
            }
        }
    }
    Ok(())
}

/// The stock of `skus`, locked until the transaction ends (in SKU order, so that two
/// transactions cannot deadlock).
async fn lock_stock(
    tx: &mut PgConnection,
    skus: &[String],
) -> Result<BTreeMap<String, i64>, StepError> {
    let rows = sqlx::query!(
        "SELECT sku, available FROM stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
        skus,
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.sku, i64::from(row.available)))
        .collect())
}

/// Writes the stock of `available` (rows locked by [`lock_stock`]) where it changed.
async fn write_stock(
    tx: &mut PgConnection,
    available: &BTreeMap<String, i64>,
) -> Result<(), StepError> {
    let (skus, left): (Vec<&String>, Vec<i64>) = available.iter().map(|(sku, n)| (sku, *n)).unzip();
    sqlx::query!(
        "UPDATE stock SET available = now_has.available
         FROM UNNEST($1::text[], $2::bigint[]) AS now_has (sku, available)
         WHERE stock.sku = now_has.sku AND stock.available <> now_has.available",
        &skus as &[&String],
        &left,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// What the orders a batch of restocks names can still take back: whether each one's
/// reservation is held (`true`) or released, and per (order, SKU) what it took less what it had
/// back (released, or restocked by a standing return). The reservation rows are locked until
/// the transaction ends, in order id order (so that two batches cannot deadlock over them):
/// a restock, an undone restock and the order's release of one order take turns, and two
/// returns of one order cannot both count the same allowance.
struct Allowance {
    held: BTreeMap<Uuid, bool>,
    left: BTreeMap<(Uuid, String), i64>,
}

impl Allowance {
    async fn lock(tx: &mut PgConnection, orders: &[Uuid]) -> Result<Self, StepError> {
        if orders.is_empty() {
            return Ok(Self {
                held: BTreeMap::new(),
                left: BTreeMap::new(),
            });
        }
        let held = sqlx::query!(
            "SELECT order_id, status = 'reserved' AS \"held!\" FROM reservations
             WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
            orders,
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|row| (row.order_id, row.held))
        .collect();
        // A statement of its own after the locks, so it sees every restock and release of
        // these orders that committed while this one waited.
        let left = sqlx::query!(
            r#"SELECT l.order_id, l.sku,
                      (l.quantity - l.released - coalesce(
                          (SELECT sum(rl.quantity) FROM restocks r
                           JOIN restock_lines rl USING (return_id)
                           WHERE r.order_id = l.order_id AND r.status = 'restocked'
                             AND rl.sku = l.sku), 0))::bigint AS "left!"
               FROM reservation_lines l WHERE l.order_id = ANY($1)"#,
            orders,
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|row| ((row.order_id, row.sku), row.left))
        .collect();
        Ok(Self { held, left })
    }

    /// Why `back` (per SKU) cannot come back for `order`, if it cannot.
    fn refusal(&self, order: Option<Uuid>, back: &BTreeMap<&str, i64>) -> Option<RestockRefusal> {
        let Some(order_id) = order else {
            return Some(RestockRefusal::NoOrder);
        };
        match self.held.get(&order_id) {
            None => return Some(RestockRefusal::UnknownOrder { order_id }),
            Some(false) => return Some(RestockRefusal::OrderReleased { order_id }),
            Some(true) => {}
        }
        back.iter().find_map(|(sku, returned)| {
            match self.left.get(&(order_id, (*sku).to_owned())) {
                None => Some(RestockRefusal::NotInOrder {
                    order_id,
                    sku: (*sku).to_owned(),
                }),
                Some(left) if left < returned => Some(RestockRefusal::MoreThanLeft {
                    order_id,
                    sku: (*sku).to_owned(),
                    returned: *returned,
                    left: *left,
                }),
                Some(_) => None,
            }
        })
    }

    /// Counts `back` as returned of `order` (after [`Allowance::refusal`] let it).
    fn take(&mut self, order: Uuid, back: &BTreeMap<&str, i64>) {
        for (sku, returned) in back {
            if let Some(left) = self.left.get_mut(&(order, (*sku).to_owned())) {
                *left -= returned;
            }
        }
    }
}

impl Step for Restock {
    const STEP: &'static str = "restock";
    type Forward = Returned;
    type Compensation = UndoRestock;
    type Failure = RestockRefusal;

    /// Every restock of a batch in six statements: lock the reservations of the orders they
    /// name and read what each can still take back, lock every SKU they name, check and add
    /// to stock in memory in the commands' order (each sees what the earlier ones took of its
    /// order's allowance), then write the stock, the restocks and their lines.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, Returned>],
    ) -> Result<Vec<Result<(), RestockRefusal>>, StepError> {
        let requests: Vec<(Uuid, &Returned, BTreeMap<&str, i64>)> = requests
            .iter()
            .map(|request| {
                let items = request.payload.items.iter();
                let back = by_sku(items.map(|i| (i.sku(), i.quantity())));
                (request.saga_id, request.payload, back)
            })
            .collect();
        let orders: Vec<Uuid> = requests
            .iter()
            .filter_map(|(_, returned, _)| returned.order_id)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut allowance = Allowance::lock(tx, &orders).await?;
        let skus = skus_of(requests.iter().map(|(_, _, back)| back));
        let mut available = lock_stock(tx, &skus).await?;
        let refusal = |sku: &str, have: Option<i64>, quantity: i64| match have {
            None => Some(RestockRefusal::UnknownSku(sku.to_owned())),
            Some(have) if have + quantity > i64::from(i32::MAX) => Some(RestockRefusal::Overflow {
                sku: sku.to_owned(),
            }),
            Some(_) => None,
        };
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut restocks: Vec<(Uuid, Uuid, Option<Uuid>)> = Vec::new();
        let mut lines: Vec<(Uuid, &str, i64)> = Vec::new();
        for (saga_id, returned, back) in &requests {
            let outcome = match allowance.refusal(returned.order_id, back) {
                Some(refused) => Err(refused),
                None => move_all(&mut available, back, Move::PutBack, refusal),
            };
            if outcome.is_ok() {
                if let Some(order_id) = returned.order_id {
                    allowance.take(order_id, back);
                }
                lines.extend(
                    back.iter()
                        .map(|(sku, quantity)| (returned.return_id, *sku, *quantity)),
                );
                restocks.push((returned.return_id, *saga_id, returned.order_id));
            }
            outcomes.push(outcome);
        }
        if restocks.is_empty() {
            return Ok(outcomes);
        }
        write_stock(tx, &available).await?;
        sqlx::query!(
            "INSERT INTO restocks (return_id, saga_id, order_id, status)
             SELECT return_id, saga_id, order_id, 'restocked'
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[]) AS r (return_id, saga_id, order_id)",
            &column(&restocks, |r| r.0),
            &column(&restocks, |r| r.1),
            &column(&restocks, |r| r.2) as &[Option<Uuid>],
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "INSERT INTO restock_lines (return_id, sku, quantity)
             SELECT return_id, sku, quantity FROM UNNEST($1::uuid[], $2::text[], $3::bigint[])
                  AS l (return_id, sku, quantity)",
            &column(&lines, |l| l.0),
            &column(&lines, |l| l.1) as &[&str],
            &column(&lines, |l| l.2),
        )
        .execute(&mut *tx)
        .await?;
        Ok(outcomes)
    }

    /// Undoes a restock, which gives its order's allowance back. While the order's reservation
    /// is held, the restocked items are taken out again, all or none: when orders took some of
    /// them since, the undo is refused this time (the saga retries it, and an operator decides
    /// when it keeps failing) rather than letting stock go negative. Once the reservation was
    /// released (the order's saga undone), the release left these items in stock as returned;
    /// they now count as released instead, and stock does not move: the order keeps nothing
    /// either way.
    async fn compensate(
        &self,
        tx: &mut PgConnection,
        request: Request<'_, UndoRestock>,
    ) -> Result<Result<(), RestockRefusal>, StepError> {
        let return_id = request.payload.return_id;
        // The order's reservation row first, as a restock and a release lock it: the lock
        // order is reservation, restock, stock everywhere.
        let order = sqlx::query_scalar!(
            "SELECT order_id FROM restocks WHERE return_id = $1 AND status = 'restocked'",
            return_id,
        )
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
        let held = match order {
            Some(order_id) => Allowance::lock(tx, &[order_id])
                .await?
                .held
                .get(&order_id)
                .copied()
                .unwrap_or(false),
            // A restock made before restocks named their order: as it always was.
            None => true,
        };
        let lines = sqlx::query!(
            "SELECT l.sku, l.quantity FROM restocks r JOIN restock_lines l USING (return_id)
             WHERE r.return_id = $1 AND r.status = 'restocked' FOR UPDATE OF r",
            return_id,
        )
        .fetch_all(&mut *tx)
        .await?;
        if lines.is_empty() {
            // Nothing restocked (it never happened here, or it was undone): nothing to undo.
            return Ok(Ok(()));
        }
        if held {
            let restocked = by_sku(lines.iter().map(|line| (line.sku.as_str(), line.quantity)));
            let mut available = lock_stock(tx, &skus_of(std::iter::once(&restocked))).await?;
            let taken_since = |sku: &str, have: Option<i64>, restocked: i64| {
                let have = have.unwrap_or(0);
                (have < restocked).then(|| RestockRefusal::AlreadyTaken {
                    sku: sku.to_owned(),
                    restocked,
                    available: have,
                })
            };
            if let Err(refused) = move_all(&mut available, &restocked, Move::Take, taken_since) {
                return Ok(Err(refused));
            }
            write_stock(tx, &available).await?;
        } else {
            sqlx::query!(
                "UPDATE reservation_lines l SET released = l.released + rl.quantity
                 FROM restocks r JOIN restock_lines rl USING (return_id)
                 WHERE r.return_id = $1 AND l.order_id = r.order_id AND l.sku = rl.sku",
                return_id,
            )
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query!(
            "UPDATE restocks SET status = 'undone', undone_at = now() WHERE return_id = $1",
            return_id,
        )
        .execute(&mut *tx)
        .await?;
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use uuid::Uuid;

    use super::{by_sku, move_all, Allowance, Move, RestockRefusal};

    fn stock(levels: &[(&str, i64)]) -> BTreeMap<String, i64> {
        levels
            .iter()
            .map(|(sku, n)| ((*sku).to_owned(), *n))
            .collect()
    }

    /// Refuses a SKU the inventory does not carry (`None`) or has too little of.
    fn short(sku: &str, have: Option<i64>, quantity: i64) -> Option<String> {
        match have {
            None => Some(format!("unknown {sku}")),
            Some(have) if have < quantity => Some(format!("{sku}: {have} < {quantity}")),
            Some(_) => None,
        }
    }

    #[test]
    fn a_request_moves_every_sku_or_none() {
        let mut available = stock(&[("A", 5), ("B", 1)]);
        let wanted = by_sku([("A", 2), ("B", 2)].into_iter());
        assert_eq!(
            move_all(&mut available, &wanted, Move::Take, short),
            Err("B: 1 < 2".to_owned())
        );
        assert_eq!(available, stock(&[("A", 5), ("B", 1)]), "nothing taken");

        let wanted = by_sku([("A", 2), ("B", 1), ("A", 1)].into_iter());
        assert_eq!(move_all(&mut available, &wanted, Move::Take, short), Ok(()));
        assert_eq!(available, stock(&[("A", 2), ("B", 0)]));

        assert_eq!(
            move_all(&mut available, &wanted, Move::PutBack, |_, _, _| None::<
                String,
            >),
            Ok(())
        );
        assert_eq!(available, stock(&[("A", 5), ("B", 1)]));
    }

    #[test]
    fn an_unknown_sku_is_refused_with_nothing_moved() {
        let mut available = stock(&[("A", 5)]);
        let wanted = by_sku([("A", 1), ("Z", 1)].into_iter());
        assert_eq!(
            move_all(&mut available, &wanted, Move::Take, short),
            Err("unknown Z".to_owned())
        );
        assert_eq!(available, stock(&[("A", 5)]));
    }

    #[test]
    fn a_return_is_bounded_by_what_its_order_took_and_did_not_have_back() {
        let (held, released, unknown) =
            (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let mut allowance = Allowance {
            held: [(held, true), (released, false)].into_iter().collect(),
            left: [((held, "A".to_owned()), 2), ((released, "A".to_owned()), 0)]
                .into_iter()
                .collect(),
        };
        let two = by_sku([("A", 2)].into_iter());
        assert_eq!(allowance.refusal(None, &two), Some(RestockRefusal::NoOrder));
        assert_eq!(
            allowance.refusal(Some(unknown), &two),
            Some(RestockRefusal::UnknownOrder { order_id: unknown })
        );
        assert_eq!(
            allowance.refusal(Some(released), &two),
            Some(RestockRefusal::OrderReleased { order_id: released })
        );
        let other = by_sku([("A", 1), ("B", 1)].into_iter());
        assert_eq!(
            allowance.refusal(Some(held), &other),
            Some(RestockRefusal::NotInOrder {
                order_id: held,
                sku: "B".into()
            })
        );
        // Two returns of one each, then a third: the first two count against the allowance.
        let one = by_sku([("A", 1)].into_iter());
        for _ in 0..2 {
            assert_eq!(allowance.refusal(Some(held), &one), None);
            allowance.take(held, &one);
        }
        assert_eq!(
            allowance.refusal(Some(held), &one),
            Some(RestockRefusal::MoreThanLeft {
                order_id: held,
                sku: "A".into(),
                returned: 1,
                left: 0
            })
        );
    }
}
