//! The return saga's invariant: one saga per return requested, and what a completed and a
//! compensated one left in the returns', inventory's and payment's tables.

use super::{count, sagas_per_key, Books, Check, Checking, Invariant};

const SAGA: &str = "return";

pub struct ReturnSaga;

impl Invariant for ReturnSaga {
    fn check<'a>(&'a self, books: &'a Books<'a>) -> Checking<'a, Vec<Check>> {
        Box::pin(async move {
            let db = books.db;
            let return_ids = books.started(SAGA);
            // Return ids of garbage records that started a saga (the garbage check counts them).
            let garbage_returns = books.garbage_sagas(SAGA);
            let (missing, total) = sagas_per_key(db, SAGA, return_ids, garbage_returns).await?;
            let mut results = vec![Check::new(
                "one saga per return, none lost",
                missing == 0 && total == i64::try_from(return_ids.len())?,
                format!(
                    "{} returns requested, {total} return sagas, {missing} returns without a saga",
                    return_ids.len()
                ),
            )];
            let completed_wrong = count(
                db,
                "SELECT count(*) FROM orchestrator.sagas s WHERE s.definition_name = 'return' AND s.state = 'completed' AND NOT ( \
                   (SELECT count(*) FROM returns.returns t WHERE t.return_id::text = s.saga_key AND t.status = 'received') = 1 \
                   AND (SELECT count(*) FROM inventory.restocks r WHERE r.return_id::text = s.saga_key AND r.status = 'restocked') = 1 \
                   AND (SELECT count(*) FROM payment.return_refunds f WHERE f.return_id::text = s.saga_key \
                        AND f.amount_cents = (s.order_data->>'refund_cents')::bigint) = 1)",
            )
            .await?;
            results.push(Check::new(
                "completed returns: received, restocked, refunded once in full",
                completed_wrong == 0,
                format!("{completed_wrong} completed return sagas break it"),
            ));
            let compensated_wrong = count(
                db,
                "SELECT count(*) FROM orchestrator.sagas s WHERE s.definition_name = 'return' AND s.state = 'compensated' AND ( \
                   EXISTS (SELECT 1 FROM returns.returns t WHERE t.return_id::text = s.saga_key AND t.status = 'received') \
                   OR EXISTS (SELECT 1 FROM inventory.restocks r WHERE r.return_id::text = s.saga_key AND r.status = 'restocked') \
                   OR EXISTS (SELECT 1 FROM payment.return_refunds f WHERE f.return_id::text = s.saga_key))",
            )
            .await?;
            results.push(Check::new(
                "compensated returns: not received, nothing restocked, nothing refunded",
                compensated_wrong == 0,
                format!("{compensated_wrong} compensated return sagas break it"),
            ));
            Ok(results)
        })
    }
}
