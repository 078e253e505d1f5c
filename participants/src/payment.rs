//! Payment: charges the customer's balance for the order total and refunds it.

use events::{Command, Participant};
use messaging::consumer::HandlerError;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::inventory::unexpected;
use crate::{StepOutcome, StepService};

static MIGRATIONS: Migrator = sqlx::migrate!("../migrations/payment");

pub struct Payment;

impl StepService for Payment {
    const PARTICIPANT: Participant = Participant::Payment;

    fn migrations() -> &'static Migrator {
        &MIGRATIONS
    }

    async fn forward(
        &self,
        tx: &mut PgConnection,
        saga_id: Uuid,
        command: &Command,
    ) -> Result<StepOutcome, HandlerError> {
        let Command::ChargePayment {
            order_id,
            customer_id,
            amount_cents,
            currency,
            ..
        } = command
        else {
            return Err(unexpected(command));
        };
        let account: Option<(i64, String)> = sqlx::query_as(
            "SELECT balance_cents, currency FROM accounts WHERE customer_id = $1 FOR UPDATE",
        )
        .bind(customer_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((balance, account_currency)) = account else {
            return Ok(StepOutcome::Refused(format!(
                "unknown customer {customer_id}"
            )));
        };
        if &account_currency != currency {
            return Ok(StepOutcome::Refused(format!(
                "the account is in {account_currency}, the order in {currency}"
            )));
        }
        if balance < *amount_cents {
            return Ok(StepOutcome::Refused(format!(
                "insufficient funds: balance {balance}, amount {amount_cents}"
            )));
        }
        sqlx::query(
            "UPDATE accounts SET balance_cents = balance_cents - $2 WHERE customer_id = $1",
        )
        .bind(customer_id)
        .bind(amount_cents)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO payments (order_id, saga_id, customer_id, amount_cents, currency, status) \
             VALUES ($1, $2, $3, $4, $5, 'charged')",
        )
        .bind(order_id)
        .bind(saga_id)
        .bind(customer_id)
        .bind(amount_cents)
        .bind(currency)
        .execute(&mut *tx)
        .await?;
        Ok(StepOutcome::Done)
    }

    async fn compensate(
        &self,
        tx: &mut PgConnection,
        _saga_id: Uuid,
        command: &Command,
    ) -> Result<StepOutcome, HandlerError> {
        let Command::RefundPayment { order_id, .. } = command else {
            return Err(unexpected(command));
        };
        let refunded: Option<(String, i64)> = sqlx::query_as(
            "UPDATE payments SET status = 'refunded', refunded_at = now() \
             WHERE order_id = $1 AND status = 'charged' RETURNING customer_id, amount_cents",
        )
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((customer_id, amount)) = refunded {
            sqlx::query(
                "UPDATE accounts SET balance_cents = balance_cents + $2 WHERE customer_id = $1",
            )
            .bind(customer_id)
            .bind(amount)
            .execute(&mut *tx)
            .await?;
        }
        // No charge (it never happened here): nothing to refund.
        Ok(StepOutcome::Done)
    }
}
