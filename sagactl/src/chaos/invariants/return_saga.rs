//! The return saga's invariant: one saga per return requested, and what a completed and a
//! compensated one left in the returns', inventory's and payment's tables.

use super::{
    finished_sagas, finished_wrong, rows_by_key, sagas_per_key, Books, Check, Checking, Invariant,
    Side,
};

const SAGA: &str = "return";

pub struct ReturnSaga;

impl Invariant for ReturnSaga {
    fn check<'a>(&'a self, books: &'a Books<'a>) -> Checking<'a, Vec<Check>> {
        Box::pin(async move {
            let db = books.db;
            let return_ids = books.started(SAGA);
            // Return ids of garbage records that started a saga (the garbage check counts them).
            let garbage_returns = books.garbage_sagas(SAGA);
            let (missing, total) =
                sagas_per_key(db.orchestrator(), SAGA, return_ids, garbage_returns).await?;
            let mut results = vec![Check::new(
                "one saga per return, none lost",
                missing == 0 && total == i64::try_from(return_ids.len())?,
                format!(
                    "{} returns requested, {total} return sagas, {missing} returns without a saga",
                    return_ids.len()
                ),
            )];
            // Each participant's side read from its own database, joined here by the return id.
            let sagas = finished_sagas(db, SAGA, "refund_cents").await?;
            let sides = [
                Side {
                    rows: rows_by_key(
                        db,
                        "returns",
                        "SELECT return_id::text, 0::bigint FROM returns.returns WHERE status = 'received'",
                    )
                    .await?,
                    of_the_amount: false,
                },
                Side {
                    rows: rows_by_key(
                        db,
                        "inventory",
                        "SELECT return_id::text, 0::bigint FROM inventory.restocks WHERE status = 'restocked'",
                    )
                    .await?,
                    of_the_amount: false,
                },
                Side {
                    rows: rows_by_key(
                        db,
                        "payment",
                        "SELECT return_id::text, amount_cents FROM payment.return_refunds",
                    )
                    .await?,
                    of_the_amount: true,
                },
            ];
            let (completed_wrong, compensated_wrong) = finished_wrong(&sagas, &sides);
            results.push(Check::new(
                "completed returns: received, restocked, refunded once in full",
                completed_wrong == 0,
                format!("{completed_wrong} completed return sagas break it"),
            ));
            results.push(Check::new(
                "compensated returns: not received, nothing restocked, nothing refunded",
                compensated_wrong == 0,
                format!("{compensated_wrong} compensated return sagas break it"),
            ));
            Ok(results)
        })
    }
}
