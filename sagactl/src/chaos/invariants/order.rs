//! The order saga's invariant: one saga per order placed, and what a completed and a
//! compensated one left in the inventory's, payment's and shipping's tables.

use super::{count, sagas_per_key, Books, Check, Checking, Invariant};

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
            let (missing, total) = sagas_per_key(db, SAGA, order_ids, garbage_orders).await?;
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
            let completed_wrong = count(
                db,
                "SELECT count(*) FROM orchestrator.sagas s WHERE s.definition_name = 'order' AND s.state = 'completed' AND NOT ( \
                   (SELECT count(*) FROM inventory.reservations r WHERE r.order_id::text = s.saga_key AND r.status = 'reserved') = 1 \
                   AND (SELECT count(*) FROM payment.payments p WHERE p.order_id::text = s.saga_key AND p.status = 'charged' \
                        AND p.amount_cents = (s.order_data->>'total_cents')::bigint) = 1 \
                   AND (SELECT count(*) FROM shipping.shipments h WHERE h.order_id::text = s.saga_key) = 1)",
            )
            .await?;
            results.push(Check::new(
                "completed: one reservation, one charge of the total, one shipment",
                completed_wrong == 0,
                format!("{completed_wrong} completed sagas break it"),
            ));
            let compensated_wrong = count(
                db,
                "SELECT count(*) FROM orchestrator.sagas s WHERE s.definition_name = 'order' AND s.state = 'compensated' AND ( \
                   EXISTS (SELECT 1 FROM inventory.reservations r WHERE r.order_id::text = s.saga_key AND r.status = 'reserved') \
                   OR EXISTS (SELECT 1 FROM payment.payments p WHERE p.order_id::text = s.saga_key AND p.status = 'charged') \
                   OR EXISTS (SELECT 1 FROM shipping.shipments h WHERE h.order_id::text = s.saga_key))",
            )
            .await?;
            results.push(Check::new(
                "compensated: no reservation held, no net charge, no shipment",
                compensated_wrong == 0,
                format!("{compensated_wrong} compensated sagas break it"),
            ));
            Ok(results)
        })
    }

    /// Orders with more than one reservation, payment or shipment.
    fn done_twice<'a>(&'a self, db: &'a sqlx::PgPool) -> Checking<'a, i64> {
        Box::pin(count(
            db,
            "SELECT (SELECT count(*) FROM (SELECT order_id FROM inventory.reservations GROUP BY order_id HAVING count(*) > 1) a) \
                  + (SELECT count(*) FROM (SELECT order_id FROM payment.payments GROUP BY order_id HAVING count(*) > 1) b) \
                  + (SELECT count(*) FROM (SELECT order_id FROM shipping.shipments GROUP BY order_id HAVING count(*) > 1) c)",
        ))
    }
}
