//! The loyalty participant of the walkthrough "Add a step" (README.md): a point per cent of
//! the order's total, taken back when a later step fails. Business logic and a migration
//! (`loyalty/1000_points.sql`) are all it has; the SDK does the rest.

use std::convert::Infallible;

use messaging::db::column;
use participant_sdk::{Participant, Request, Step, StepError};
use serde::de::IgnoredAny;
use serde::Deserialize;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;

static MIGRATIONS: Migrator = sqlx::migrate!("tests/it/loyalty");

/// The loyalty participant: its table and its one step.
pub fn participant() -> Participant {
    Participant::new("loyalty", &MIGRATIONS).step(LoyaltyPoints)
}

/// `loyalty_points`: awards the customer points for the order.
pub struct LoyaltyPoints;

/// What `AwardPoints` carries (the definition maps it from the order).
#[derive(Debug, Deserialize)]
pub struct Award {
    pub customer_id: String,
    pub points: i64,
}

impl Step for LoyaltyPoints {
    const STEP: &'static str = "loyalty_points";
    type Forward = Award;
    /// `RevokePoints` carries nothing: the saga's key names the points to take back.
    type Compensation = IgnoredAny;
    /// Points are never refused.
    type Failure = Infallible;

    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, Award>],
    ) -> Result<Vec<Result<(), Infallible>>, StepError> {
        sqlx::query(
            "INSERT INTO points_awarded (saga_key, customer_id, points) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[])",
        )
        .bind(column(requests, |r| r.key))
        .bind(column(requests, |r| r.payload.customer_id.as_str()))
        .bind(column(requests, |r| r.payload.points.max(0)))
        .execute(&mut *tx)
        .await?;
        Ok(requests.iter().map(|_| Ok(())).collect())
    }

    async fn compensate(
        &self,
        tx: &mut PgConnection,
        request: Request<'_, IgnoredAny>,
    ) -> Result<Result<(), Infallible>, StepError> {
        // Nothing awarded (the step never ran here): nothing to take back.
        sqlx::query("DELETE FROM points_awarded WHERE saga_key = $1")
            .bind(request.key)
            .execute(&mut *tx)
            .await?;
        Ok(Ok(()))
    }
}
