//! The order saga's invariant: one saga per order placed, and what a completed and a
//! compensated one left in the inventory's, payment's and shipping's tables.

use super::{
    count, finished_sagas, finished_wrong, rows_by_key, sagas_per_key, Books, Check, Checking,
    Databases, Invariant, Side,
};

const SAGA: &str = "order";

pub struct OrderSaga;

impl Invariant for OrderSaga {
    fn check<'a>(&'a self, books: &'a Books<'a>) -> Checking<'a, Vec<Check>> {
        Box::pin(async move {
            let db = books.db;
            let order_ids = books.started(SAGA);
            // Orders of garbage records that started a saga: the garbage check counts them;
            // here they are neither placed orders nor strays.
            let garbage_orders = books.garbage_sagas(SAGA);
            let (missing, total) =
                sagas_per_key(db.orchestrator(), SAGA, order_ids, garbage_orders).await?;
            let mut results = vec![Check::new(
                "one saga per order, none lost",
                missing == 0 && total == i64::try_from(order_ids.len())?,
                format!(
                    "{} orders placed, {total} sagas, {missing} orders without a saga{}",
                    order_ids.len(),
                    if garbage_orders.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (and {} sagas started by garbage records: see the garbage check)",
                            garbage_orders.len()
                        )
                    }
                ),
            )];
            // Each participant's side read from its own database, joined here by the order id.
            let sagas = finished_sagas(db, SAGA, "total_cents").await?;
            let sides = [
                Side {
                    rows: rows_by_key(
                        db,
                        "inventory",
                        "SELECT order_id::text, 0::bigint FROM inventory.reservations WHERE status = 'reserved'",
                    )
                    .await?,
                    of_the_amount: false,
                },
                Side {
                    rows: rows_by_key(
                        db,
                        "payment",
                        "SELECT order_id::text, amount_cents FROM payment.payments WHERE status = 'charged'",
                    )
                    .await?,
                    of_the_amount: true,
                },
                Side {
                    rows: rows_by_key(
                        db,
                        "shipping",
                        "SELECT order_id::text, 0::bigint FROM shipping.shipments",
                    )
                    .await?,
                    of_the_amount: false,
                },
            ];
            let (completed_wrong, compensated_wrong) = finished_wrong(&sagas, &sides);
            results.push(Check::new(
                "completed: one reservation, one charge of the total, one shipment",
                completed_wrong == 0,
                format!("{completed_wrong} completed sagas break it"),
            ));
            results.push(Check::new(
                "compensated: no reservation held, no net charge, no shipment",
                compensated_wrong == 0,
                format!("{compensated_wrong} compensated sagas break it"),
            ));
            Ok(results)
        })
    }

    /// Orders with more than one reservation, payment or shipment.
    fn done_twice<'a>(&'a self, db: &'a Databases) -> Checking<'a, i64> {
        Box::pin(async move {
            let mut twice = 0;
            for (service, table) in [
                ("inventory", "reservations"),
                ("payment", "payments"),
                ("shipping", "shipments"),
            ] {
                twice += count(
                    db.of(service),
                    &format!(
                        "SELECT count(*) FROM (SELECT order_id FROM {service}.{table} \
                         GROUP BY order_id HAVING count(*) > 1) twice"
                    ),
                )
                .await?;
            }
            Ok(twice)
        })
    }
}
