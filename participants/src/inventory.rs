//! Inventory: reserves stock for an order (all lines or none) and releases it, and puts
//! returned items back in stock and takes them out again. It serves the order saga's
//! `reserve_stock` step and the return saga's `restock` step.

use std::collections::BTreeMap;
use std::fmt;

use events::Line;
use messaging::consumer::HandlerError;
use messaging::db::column;
use serde::Deserialize;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::sdk::{Participant, Request, Step};

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

    /// All reservations of a batch in four statements: lock every SKU they name, check and
    /// take stock in memory in the commands' order, then write the stock, the reservations
    /// and their lines.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, Reservation>],
    ) -> Result<Vec<Result<(), StockRefusal>>, HandlerError> {
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
        write_stock(tx, &available).await?;
        sqlx::query!(
            "INSERT INTO reservations (order_id, saga_id, status)
             SELECT order_id, saga_id, 'reserved' FROM UNNEST($1::uuid[], $2::uuid[])
                  AS r (order_id, saga_id)",
            &column(&reservations, |r| r.0),
            &column(&reservations, |r| r.1),
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "INSERT INTO reservation_lines (order_id, sku, quantity)
             SELECT order_id, sku, quantity FROM UNNEST($1::uuid[], $2::text[], $3::int[])
                  AS l (order_id, sku, quantity)",
            &column(&lines, |l| l.0),
            &column(&lines, |l| l.1.as_str()) as &[&str],
            &column(&lines, |l| l.2),
        )
        .execute(&mut *tx)
        .await?;
        Ok(outcomes)
    }

    async fn compensate(
        &self,
        tx: &mut PgConnection,
        request: Request<'_, Release>,
    ) -> Result<Result<(), StockRefusal>, HandlerError> {
        let order_id = request.payload.order_id;
        let released = sqlx::query!(
            "UPDATE reservations SET status = 'released', released_at = now()
             WHERE order_id = $1 AND status = 'reserved'",
            order_id,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if released == 1 {
            sqlx::query!(
                "UPDATE stock SET available = available + l.quantity
                 FROM reservation_lines l WHERE l.order_id = $1 AND stock.sku = l.sku",
                order_id,
            )
            .execute(&mut *tx)
            .await?;
        }
        // Nothing reserved (the reservation never happened here): nothing to release.
        Ok(Ok(()))
    }
}

/// `restock`: puts a return's items back in stock (all lines or none), and takes them out
/// again when the return saga undoes it.
pub struct Restock;

/// What `Restock` carries.
#[derive(Debug, Deserialize)]
pub struct Returned {
    pub return_id: Uuid,
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
fn by_sku<'a>(items: impl Iterator<Item = (&'a str, i32)>) -> BTreeMap<&'a str, i64> {
    let mut total: BTreeMap<&str, i64> = BTreeMap::new();
    for (sku, quantity) in items {
        *total.entry(sku).or_default() += i64::from(quantity);
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
) -> Result<BTreeMap<String, i64>, HandlerError> {
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
) -> Result<(), HandlerError> {
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

impl Step for Restock {
    const STEP: &'static str = "restock";
    type Forward = Returned;
    type Compensation = UndoRestock;
    type Failure = RestockRefusal;

    /// Every restock of a batch in four statements: lock every SKU they name, add to stock in
    /// memory in the commands' order, then write the stock, the restocks and their lines.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, Returned>],
    ) -> Result<Vec<Result<(), RestockRefusal>>, HandlerError> {
        let requests: Vec<(Uuid, Uuid, BTreeMap<&str, i64>)> = requests
            .iter()
            .map(|request| {
                let items = request.payload.items.iter();
                let back = by_sku(items.map(|i| (i.sku(), i.quantity())));
                (request.saga_id, request.payload.return_id, back)
            })
            .collect();
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
        let mut restocks: Vec<(Uuid, Uuid)> = Vec::new();
        let mut lines: Vec<(Uuid, &str, i64)> = Vec::new();
        for (saga_id, return_id, back) in &requests {
            let outcome = move_all(&mut available, back, Move::PutBack, refusal);
            if outcome.is_ok() {
                lines.extend(
                    back.iter()
                        .map(|(sku, quantity)| (*return_id, *sku, *quantity)),
                );
                restocks.push((*return_id, *saga_id));
            }
            outcomes.push(outcome);
        }
        if restocks.is_empty() {
            return Ok(outcomes);
        }
        write_stock(tx, &available).await?;
        sqlx::query!(
            "INSERT INTO restocks (return_id, saga_id, status)
             SELECT return_id, saga_id, 'restocked' FROM UNNEST($1::uuid[], $2::uuid[])
                  AS r (return_id, saga_id)",
            &column(&restocks, |r| r.0),
            &column(&restocks, |r| r.1),
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

    /// Takes the restocked items out again, all or none: when orders took some of them since,
    /// the undo is refused this time (the saga retries it, and an operator decides when it
    /// keeps failing) rather than letting stock go negative.
    async fn compensate(
        &self,
        tx: &mut PgConnection,
        request: Request<'_, UndoRestock>,
    ) -> Result<Result<(), RestockRefusal>, HandlerError> {
        let return_id = request.payload.return_id;
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

    use super::{by_sku, move_all, Move};

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
}
