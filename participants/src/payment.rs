//! Payment: charges the customer's balance for the order total and refunds it, and credits a
//! return's refund out of what its order was charged. It serves the order saga's
//! `charge_payment` step and the return saga's `refund` step.

use std::collections::BTreeMap;
use std::fmt;

use events::{Cents, Currency};
use messaging::db::column;
use participant_sdk::{Participant, Request, Step, StepError};
use serde::Deserialize;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use uuid::Uuid;

static MIGRATIONS: Migrator = sqlx::migrate!("../migrations/payment");

/// The payment participant: its tables and its steps.
pub fn participant() -> Participant {
    Participant::new("payment", &MIGRATIONS)
        .metrics_port(9182)
        .step(ChargePayment)
        .step(IssueRefund)
}

/// `charge_payment`: debits the customer's balance by the order total.
pub struct ChargePayment;

/// What `ChargePayment` carries.
#[derive(Debug, Deserialize)]
pub struct Charge {
    pub order_id: Uuid,
    pub customer_id: String,
    pub amount_cents: Cents,
    pub currency: Currency,
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

/// Debits `amount_cents` in `currency` from `customer_id`'s balance in `accounts` (each
/// customer's balance and currency), or says why the charge is declined.
fn debit(
    accounts: &mut BTreeMap<String, (i64, String)>,
    customer_id: &str,
    amount_cents: i64,
    currency: &str,
) -> Result<(), Declined> {
    match accounts.get_mut(customer_id) {
        None => Err(Declined::UnknownCustomer(customer_id.to_owned())),
        Some((_, account_currency)) if account_currency != currency => {
            Err(Declined::OtherCurrency {
                account: account_currency.clone(),
                order: currency.to_owned(),
            })
        }
        Some((balance, _)) if *balance < amount_cents => Err(Declined::InsufficientFunds {
            balance: *balance,
            amount: amount_cents,
        }),
        Some((balance, _)) => {
            *balance -= amount_cents;
            Ok(())
        }
    }
}

impl Step for ChargePayment {
    const STEP: &'static str = "charge_payment";
    type Forward = Charge;
    type Compensation = Refund;
    type Failure = Declined;

    /// All charges of a batch in two statements: lock every account they name, check and
    /// debit the balances in memory in the commands' order, then write the balances and the
    /// payments together.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, Charge>],
    ) -> Result<Vec<Result<(), Declined>>, StepError> {
        let charges: Vec<(Uuid, Uuid, &String, i64, &str)> = requests
            .iter()
            .map(|r| {
                let charge = r.payload;
                (
                    r.saga_id,
                    charge.order_id,
                    &charge.customer_id,
                    charge.amount_cents.get(),
                    charge.currency.as_str(),
                )
            })
            .collect();
        let customers: Vec<&str> = charges
            .iter()
            .map(|c| c.2.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let rows = sqlx::query!(
            "SELECT customer_id, balance_cents, currency FROM accounts
             WHERE customer_id = ANY($1) ORDER BY customer_id FOR UPDATE",
            &customers as &[&str],
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut accounts: BTreeMap<String, (i64, String)> = rows
            .into_iter()
            .map(|row| (row.customer_id, (row.balance_cents, row.currency)))
            .collect();
        let mut outcomes = Vec::with_capacity(charges.len());
        let mut charged = Vec::new();
        for (saga_id, order_id, customer_id, amount_cents, currency) in &charges {
            let outcome = debit(&mut accounts, customer_id, *amount_cents, currency);
            if outcome.is_ok() {
                charged.push((*order_id, *saga_id, *customer_id, *amount_cents, *currency));
            }
            outcomes.push(outcome);
        }
        if charged.is_empty() {
            return Ok(outcomes);
        }
        // The rows are locked: each balance can be written as it stands, with the payments,
        // in one statement.
        let (names, now_have): (Vec<&String>, Vec<i64>) = accounts
            .iter()
            .map(|(customer, (balance, _))| (customer, *balance))
            .unzip();
        sqlx::query!(
            "WITH debited AS (
                 UPDATE accounts SET balance_cents = now_has.balance
                 FROM UNNEST($1::text[], $2::bigint[]) AS now_has (customer_id, balance)
                 WHERE accounts.customer_id = now_has.customer_id
                   AND accounts.balance_cents <> now_has.balance
             )
             INSERT INTO payments (order_id, saga_id, customer_id, amount_cents, currency, status)
             SELECT order_id, saga_id, customer_id, amount_cents, currency, 'charged'
             FROM UNNEST($3::uuid[], $4::uuid[], $5::text[], $6::bigint[], $7::text[])
                  AS p (order_id, saga_id, customer_id, amount_cents, currency)",
            &names as &[&String],
            &now_have,
            &column(&charged, |c| c.0),
            &column(&charged, |c| c.1),
            &column(&charged, |c| c.2.as_str()) as &[&str],
            &column(&charged, |c| c.3),
            &column(&charged, |c| c.4) as &[&str],
        )
        .execute(&mut *tx)
        .await?;
        Ok(outcomes)
    }

    async fn compensate(
        &self,
        tx: &mut PgConnection,
        request: Request<'_, Refund>,
    ) -> Result<Result<(), Declined>, StepError> {
        let order_id = request.payload.order_id;
        let refunded = sqlx::query!(
            "UPDATE payments SET status = 'refunded', refunded_at = now()
             WHERE order_id = $1 AND status = 'charged' RETURNING customer_id, amount_cents",
            order_id,
        )
        .fetch_optional(&mut *tx)
        .await?;
        // What returns of this order got back already is not paid twice: the charge is paid
        // back once, whichever saga pays it. Read after the row is locked (a statement of its
        // own, so it sees a refund committed while this one waited for the lock).
        let refunded = match refunded {
            Some(charge) => {
                let returned = sqlx::query_scalar!(
                    r#"SELECT coalesce(sum(amount_cents), 0)::bigint AS "returned!"
                       FROM return_refunds WHERE order_id = $1"#,
                    order_id,
                )
                .fetch_one(&mut *tx)
                .await?;
                Some((charge.customer_id, charge.amount_cents - returned))
            }
            None => None,
        };
        if let Some((customer_id, amount)) = refunded {
            sqlx::query!(
                "UPDATE accounts SET balance_cents = balance_cents + $2 WHERE customer_id = $1",
                customer_id,
                amount,
            )
            .execute(&mut *tx)
            .await?;
        }
        // No charge (it never happened here): nothing to refund.
        Ok(Ok(()))
    }
}

/// `refund`: credits a return's refund to the customer, out of what the order was charged.
/// The return saga's pivot: once done it is not undone.
pub struct IssueRefund;

/// What `IssueRefund` carries.
#[derive(Debug, Deserialize)]
pub struct ReturnRefund {
    pub return_id: Uuid,
    pub order_id: Uuid,
    pub customer_id: String,
    pub amount_cents: Cents,
    pub currency: Currency,
}

/// Why a refund was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundRefused {
    /// The order has no charge here (never charged, or paid back when its saga was undone).
    NoCharge {
        order_id: Uuid,
    },
    /// The order was charged to another customer.
    OtherCustomer {
        order_id: Uuid,
    },
    OtherCurrency {
        charged: String,
        refund: String,
    },
    /// More than what is left of the charge after the order's earlier refunds.
    MoreThanCharged {
        amount: i64,
        left: i64,
    },
}

impl fmt::Display for RefundRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoCharge { order_id } => write!(f, "order {order_id} has no charge to refund"),
            Self::OtherCustomer { order_id } => {
                write!(f, "order {order_id} was charged to another customer")
            }
            Self::OtherCurrency { charged, refund } => {
                write!(
                    f,
                    "the order was charged in {charged}, the refund is in {refund}"
                )
            }
            Self::MoreThanCharged { amount, left } => write!(
                f,
                "refund of {amount} is more than the {left} left of the order's charge"
            ),
        }
    }
}

impl Step for IssueRefund {
    const STEP: &'static str = "refund";
    type Forward = ReturnRefund;
    type Compensation = serde::de::IgnoredAny;
    type Failure = RefundRefused;

    /// Every refund of a batch in six statements: lock the charges of the orders they name, read
    /// what was refunded of each so far, lock the customers' accounts, check in memory
    /// in the commands' order, then write the balances and the refunds. Locking the charge
    /// row orders a refund against the order saga's own refund of it (its compensation).
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, ReturnRefund>],
    ) -> Result<Vec<Result<(), RefundRefused>>, StepError> {
        let orders: Vec<Uuid> = requests
            .iter()
            .map(|r| r.payload.order_id)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut charges = refundable_charges(tx, &orders).await?;
        let customers: Vec<&str> = charges
            .values()
            .map(|charge| charge.customer_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut balances = locked_balances(tx, &customers).await?;
        let (outcomes, refunds) = refund_in_order(requests, &mut charges, &mut balances);
        if refunds.is_empty() {
            return Ok(outcomes);
        }
        write_balances(tx, balances.iter().map(|(customer, n)| (customer, *n))).await?;
        insert_refunds(tx, &refunds).await?;
        Ok(outcomes)
    }

    /// The pivot has no compensation in the return saga; should a command ask for one anyway,
    /// there is nothing this step can undo.
    async fn compensate(
        &self,
        _tx: &mut PgConnection,
        _request: Request<'_, serde::de::IgnoredAny>,
    ) -> Result<Result<(), RefundRefused>, StepError> {
        Ok(Ok(()))
    }
}

/// Writes the balances (customer, balance) of account rows the transaction has locked, where
/// they changed.
/// A refund granted: the saga that asked, and what it asked.
type TakenRefund<'r> = (Uuid, &'r ReturnRefund);

/// What is left to refund of an order's charge, and whose it is.
struct RefundableCharge {
    customer_id: String,
    currency: String,
    left_cents: i64,
}

/// The charges of `orders`, locked (in order id order, like every other locker of them), with
/// what their refunds so far left of each.
async fn refundable_charges(
    tx: &mut PgConnection,
    orders: &[Uuid],
) -> Result<BTreeMap<Uuid, RefundableCharge>, sqlx::Error> {
    let charges = sqlx::query!(
        "SELECT order_id, customer_id, amount_cents, currency FROM payments
             WHERE order_id = ANY($1) AND status = 'charged' ORDER BY order_id FOR UPDATE",
        orders,
    )
    .fetch_all(&mut *tx)
    .await?;
    // Read after the charges are locked (a statement of its own, so it sees a refund of
    // another transaction that committed while this one waited for the locks).
    let refunded: BTreeMap<Uuid, i64> = sqlx::query!(
        r#"SELECT order_id, sum(amount_cents)::bigint AS "refunded!" FROM return_refunds
               WHERE order_id = ANY($1) GROUP BY order_id"#,
        orders,
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|row| (row.order_id, row.refunded))
    .collect();
    Ok(charges
        .into_iter()
        .map(|charge| {
            let back = refunded.get(&charge.order_id).copied().unwrap_or(0);
            let refundable = RefundableCharge {
                customer_id: charge.customer_id,
                currency: charge.currency,
                left_cents: charge.amount_cents - back,
            };
            (charge.order_id, refundable)
        })
        .collect())
}

/// The balances of `customers`' accounts, locked in customer order like the charges'.
async fn locked_balances(
    tx: &mut PgConnection,
    customers: &[&str],
) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows = sqlx::query!(
        "SELECT customer_id, balance_cents FROM accounts
             WHERE customer_id = ANY($1) ORDER BY customer_id FOR UPDATE",
        customers as &[&str],
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.customer_id, row.balance_cents))
        .collect())
}

/// Decides each refund of `requests` in their order, in memory: refused when its order has no
/// charge, is another customer's or in another currency, or has less left than it asks;
/// otherwise taken from what is left and credited to the balance. The outcomes, and the
/// refunds to write with the saga of each.
fn refund_in_order<'r>(
    requests: &'r [Request<'_, ReturnRefund>],
    charges: &mut BTreeMap<Uuid, RefundableCharge>,
    balances: &mut BTreeMap<String, i64>,
) -> (Vec<Result<(), RefundRefused>>, Vec<TakenRefund<'r>>) {
    let mut outcomes = Vec::with_capacity(requests.len());
    let mut refunds = Vec::new();
    for request in requests {
        let refund = request.payload;
        let amount = refund.amount_cents.get();
        let outcome = match charges.get_mut(&refund.order_id) {
            None => Err(RefundRefused::NoCharge {
                order_id: refund.order_id,
            }),
            Some(charge) if charge.customer_id != refund.customer_id => {
                Err(RefundRefused::OtherCustomer {
                    order_id: refund.order_id,
                })
            }
            Some(charge) if charge.currency != refund.currency.as_str() => {
                Err(RefundRefused::OtherCurrency {
                    charged: charge.currency.clone(),
                    refund: refund.currency.as_str().to_owned(),
                })
            }
            Some(charge) if charge.left_cents < amount => Err(RefundRefused::MoreThanCharged {
                amount,
                left: charge.left_cents,
            }),
            Some(charge) => {
                charge.left_cents -= amount;
                if let Some(balance) = balances.get_mut(charge.customer_id.as_str()) {
                    *balance += amount;
                }
                refunds.push((request.saga_id, refund));
                Ok(())
            }
        };
        outcomes.push(outcome);
    }
    (outcomes, refunds)
}

/// Writes the refunds taken, each with its saga.
async fn insert_refunds(
    tx: &mut PgConnection,
    refunds: &[TakenRefund<'_>],
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO return_refunds (return_id, saga_id, order_id, customer_id, amount_cents,
                                         currency)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::bigint[],
                                  $6::text[])",
        &column(refunds, |(_, r)| r.return_id),
        &column(refunds, |(saga_id, _)| *saga_id),
        &column(refunds, |(_, r)| r.order_id),
        &column(refunds, |(_, r)| r.customer_id.as_str()) as &[&str],
        &column(refunds, |(_, r)| r.amount_cents.get()),
        &column(refunds, |(_, r)| r.currency.as_str()) as &[&str],
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn write_balances<'a>(
    tx: &mut PgConnection,
    balances: impl Iterator<Item = (&'a String, i64)>,
) -> Result<(), StepError> {
    let (names, now_have): (Vec<&String>, Vec<i64>) = balances.unzip();
    sqlx::query!(
        "UPDATE accounts SET balance_cents = now_has.balance
         FROM UNNEST($1::text[], $2::bigint[]) AS now_has (customer_id, balance)
         WHERE accounts.customer_id = now_has.customer_id
           AND accounts.balance_cents <> now_has.balance",
        &names as &[&String],
        &now_have,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}
