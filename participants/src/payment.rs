//! Payment: charges the customer's balance for the order total and refunds it. It serves the
//! order saga's `charge_payment` step.

use std::collections::BTreeMap;
use std::fmt;

use messaging::consumer::HandlerError;
use messaging::db::column;
use serde::Deserialize;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::sdk::{Participant, Request, Step};

static MIGRATIONS: Migrator = sqlx::migrate!("../migrations/payment");

/// The payment participant: its tables and its one step.
pub fn participant() -> Participant {
    Participant::new("payment", &MIGRATIONS)
        .metrics_port(9182)
        .step(ChargePayment)
}

/// `charge_payment`: debits the customer's balance by the order total.
pub struct ChargePayment;

/// What `ChargePayment` carries.
#[derive(Debug, Deserialize)]
pub struct Charge {
    pub order_id: Uuid,
    pub customer_id: String,
    pub amount_cents: i64,
    pub currency: String,
}

/// What `RefundPayment` carries.
#[derive(Debug, Deserialize)]
pub struct Refund {
    pub order_id: Uuid,
}

/// Why a payment was declined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Declined {
    UnknownCustomer(String),
    OtherCurrency { account: String, order: String },
    InsufficientFunds { balance: i64, amount: i64 },
}

impl fmt::Display for Declined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownCustomer(customer) => write!(f, "unknown customer {customer}"),
            Self::OtherCurrency { account, order } => {
                write!(f, "the account is in {account}, the order in {order}")
            }
            Self::InsufficientFunds { balance, amount } => {
                write!(f, "insufficient funds: balance {balance}, amount {amount}")
            }
        }
    }
}

impl Step for ChargePayment {
    const STEP: &'static str = "charge_payment";
    type Forward = Charge;
    type Compensation = Refund;
    type Failure = Declined;

    /// All charges of a batch in three statements: lock every account they name, check and
    /// debit the balances in memory in the commands' order, then write the balances and the
    /// payments.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, Charge>],
    ) -> Result<Vec<Result<(), Declined>>, HandlerError> {
        let charges: Vec<(Uuid, Uuid, &String, i64, &String)> = requests
            .iter()
            .map(|r| {
                let charge = r.payload;
                (
                    r.saga_id,
                    charge.order_id,
                    &charge.customer_id,
                    charge.amount_cents,
                    &charge.currency,
                )
            })
            .collect();
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
                None => Err(Declined::UnknownCustomer((*customer_id).clone())),
                Some((_, account_currency)) if account_currency != *currency => {
                    Err(Declined::OtherCurrency {
                        account: account_currency.clone(),
                        order: (*currency).clone(),
                    })
                }
                Some((balance, _)) if *balance < *amount_cents => {
                    Err(Declined::InsufficientFunds {
                        balance: *balance,
                        amount: *amount_cents,
                    })
                }
                Some((balance, _)) => {
                    *balance -= amount_cents;
                    charged.push((*order_id, *saga_id, *customer_id, *amount_cents, *currency));
                    Ok(())
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
        request: Request<'_, Refund>,
    ) -> Result<Result<(), Declined>, HandlerError> {
        let order_id = request.payload.order_id;
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
        Ok(Ok(()))
    }
}
