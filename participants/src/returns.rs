//! Returns: receives the items a customer sends back, and marks the return rejected when the
//! return saga undoes it. It serves the return saga's `receive_return` step.

use std::fmt;

use events::{Cents, Currency, Line};
use messaging::db::column;
use participant_sdk::{Participant, Request, Step, StepError};
use serde::Deserialize;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use uuid::Uuid;

static MIGRATIONS: Migrator = sqlx::migrate!("../migrations/returns");

/// The returns participant: its tables and its one step.
pub fn participant() -> Participant {
    Participant::new("returns", &MIGRATIONS)
        .metrics_port(9184)
        .step(ReceiveReturn)
}

/// `receive_return`: records the return and what came back.
pub struct ReceiveReturn;

/// What `ReceiveReturn` carries.
#[derive(Debug, Deserialize)]
pub struct Received {
    pub return_id: Uuid,
    pub order_id: Uuid,
    pub customer_id: String,
    pub items: Vec<Line>,
    pub refund_cents: Cents,
    pub currency: Currency,
}

/// What `RejectReturn` carries.
#[derive(Debug, Deserialize)]
pub struct Rejection {
    pub return_id: Uuid,
}

/// Receiving a return is never refused: the items are here. (The type says so: no value.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeverRefused {}

impl fmt::Display for NeverRefused {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {}
    }
}

impl Step for ReceiveReturn {
    const STEP: &'static str = "receive_return";
    type Forward = Received;
    type Compensation = Rejection;
    type Failure = NeverRefused;

    /// Every return of a batch in two statements: the returns, then their lines. A return id
    /// already here (one return is one saga, so only a hand-made repeat) keeps what it has.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, Received>],
    ) -> Result<Vec<Result<(), NeverRefused>>, StepError> {
        let mut lines: Vec<(Uuid, &str, i64)> = Vec::new();
        for request in requests {
            let received = request.payload;
            for item in &received.items {
                // One line per SKU: a SKU named twice in a return adds up.
                match lines
                    .iter_mut()
                    .find(|(id, sku, _)| *id == received.return_id && *sku == item.sku())
                {
                    Some(line) => line.2 += i64::from(item.quantity()),
                    None => {
                        lines.push((received.return_id, item.sku(), i64::from(item.quantity())))
                    }
                }
            }
        }
        let inserted = sqlx::query_scalar!(
            "INSERT INTO returns (return_id, saga_id, order_id, customer_id, refund_cents,
                                  currency, status)
             SELECT return_id, saga_id, order_id, customer_id, refund_cents, currency, 'received'
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::bigint[], $6::text[])
                  AS r (return_id, saga_id, order_id, customer_id, refund_cents, currency)
             ON CONFLICT (return_id) DO NOTHING RETURNING return_id",
            &column(requests, |r| r.payload.return_id),
            &column(requests, |r| r.saga_id),
            &column(requests, |r| r.payload.order_id),
            &column(requests, |r| r.payload.customer_id.as_str()) as &[&str],
            &column(requests, |r| r.payload.refund_cents.get()),
            &column(requests, |r| r.payload.currency.as_str()) as &[&str],
        )
        .fetch_all(&mut *tx)
        .await?;
        lines.retain(|(id, _, _)| inserted.contains(id));
        if !lines.is_empty() {
            sqlx::query!(
                "INSERT INTO return_lines (return_id, sku, quantity)
                 SELECT return_id, sku, quantity
                 FROM UNNEST($1::uuid[], $2::text[], $3::bigint[]) AS l (return_id, sku, quantity)",
                &column(&lines, |l| l.0),
                &column(&lines, |l| l.1) as &[&str],
                &column(&lines, |l| l.2),
            )
            .execute(&mut *tx)
            .await?;
        }
        Ok(requests.iter().map(|_| Ok(())).collect())
    }

    async fn compensate(
        &self,
        tx: &mut PgConnection,
        request: Request<'_, Rejection>,
    ) -> Result<Result<(), NeverRefused>, StepError> {
        sqlx::query!(
            "UPDATE returns SET status = 'rejected', rejected_at = now()
             WHERE return_id = $1 AND status = 'received'",
            request.payload.return_id,
        )
        .execute(&mut *tx)
        .await?;
        // Nothing received (the receipt never happened here): nothing to reject.
        Ok(Ok(()))
    }
}
