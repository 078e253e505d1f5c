//! Payment: charges the customer's balance for the order total and refunds it.

use std::collections::BTreeMap;

use events::{Command, Participant};
use messaging::consumer::HandlerError;
use messaging::db::column;
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

    /// All charges of a batch in three statements: lock every account they name, check and
    /// debit the balances in memory in the commands' order, then write the balances and the
    /// payments.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        commands: &[(Uuid, &Command)],
    ) -> Result<Vec<StepOutcome>, HandlerError> {
        let mut charges = Vec::with_capacity(commands.len());
        for (saga_id, command) in commands {
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
            charges.push((*saga_id, *order_id, customer_id, *amount_cents, currency));
        }
        let customers: Vec<&str> = charges
            .iter()
            .map(|c| c.2.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let rows: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT customer_id, balance_cents, currency FROM accounts \
             WHERE customer_id = ANY($1) ORDER BY customer_id FOR UPDATE",
        )
        .bind(&customers)
        .fetch_all(&mut *tx)
        .await?;
        let mut accounts: BTreeMap<String, (i64, String)> = rows
            .into_iter()
            .map(|(customer, balance, currency)| (customer, (balance, currency)))
            .collect();
        let mut outcomes = Vec::with_capacity(charges.len());
        let mut charged = Vec::new();
        for (saga_id, order_id, customer_id, amount_cents, currency) in &charges {
            let outcome = match accounts.get_mut(customer_id.as_str()) {
                None => StepOutcome::Refused(format!("unknown customer {customer_id}")),
                Some((_, account_currency)) if account_currency != *currency => {
                    StepOutcome::Refused(format!(
                        "the account is in {account_currency}, the order in {currency}"
                    ))
                }
                Some((balance, _)) if *balance < *amount_cents => StepOutcome::Refused(format!(
                    "insufficient funds: balance {balance}, amount {amount_cents}"
                )),
                Some((balance, _)) => {
                    *balance -= amount_cents;
                    charged.push((*order_id, *saga_id, *customer_id, *amount_cents, *currency));
                    StepOutcome::Done
                }
            };
            outcomes.push(outcome);
        }
        if charged.is_empty() {
            return Ok(outcomes);
        }
        // The rows are locked: each balance can be written as it stands.
        let (names, balances): (Vec<&String>, Vec<i64>) = accounts
            .iter()
            .map(|(customer, (balance, _))| (customer, *balance))
            .unzip();
        sqlx::query(
            "UPDATE accounts SET balance_cents = now_has.balance \
             FROM UNNEST($1::text[], $2::bigint[]) AS now_has (customer_id, balance) \
             WHERE accounts.customer_id = now_has.customer_id \
               AND accounts.balance_cents <> now_has.balance",
        )
        .bind(names)
        .bind(balances)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO payments (order_id, saga_id, customer_id, amount_cents, currency, status) \
             SELECT order_id, saga_id, customer_id, amount_cents, currency, 'charged' \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::text[]) \
                  AS p (order_id, saga_id, customer_id, amount_cents, currency)",
        )
        .bind(column(&charged, |c| c.0))
        .bind(column(&charged, |c| c.1))
        .bind(column(&charged, |c| c.2.as_str()))
        .bind(column(&charged, |c| c.3))
        .bind(column(&charged, |c| c.4.as_str()))
        .execute(&mut *tx)
        .await?;
        Ok(outcomes)
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
