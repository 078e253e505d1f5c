//! Shipping: schedules the shipment unless the destination country is on the deny-list. It is
//! the saga's last step, so it is never compensated.

use std::collections::BTreeSet;

use clap::Args;
use events::{Command, Participant};
use messaging::consumer::HandlerError;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::inventory::unexpected;
use crate::{StepOutcome, StepService};

static MIGRATIONS: Migrator = sqlx::migrate!("../migrations/shipping");

#[derive(Debug, Clone, Args)]
pub struct ShippingConfig {
    /// Destination countries (ISO 3166 alpha-2, comma separated) that are never shipped to.
    #[arg(
        long,
        env = "SHIPPING_DENIED_COUNTRIES",
        default_value = "AQ,BV",
        value_delimiter = ','
    )]
    pub denied_countries: Vec<String>,
}

pub struct Shipping {
    denied: BTreeSet<String>,
}

impl Shipping {
    pub fn new(config: &ShippingConfig) -> Self {
        Self {
            denied: config
                .denied_countries
                .iter()
                .map(|c| c.trim().to_ascii_uppercase())
                .filter(|c| !c.is_empty())
                .collect(),
        }
    }
}

impl StepService for Shipping {
    const PARTICIPANT: Participant = Participant::Shipping;

    fn migrations() -> &'static Migrator {
        &MIGRATIONS
    }

    async fn forward(
        &self,
        tx: &mut PgConnection,
        saga_id: Uuid,
        command: &Command,
    ) -> Result<StepOutcome, HandlerError> {
        let Command::ScheduleShipment {
            order_id,
            address,
            items,
            ..
        } = command
        else {
            return Err(unexpected(command));
        };
        if self.denied.contains(&address.country) {
            return Ok(StepOutcome::Refused(format!(
                "destination country {} is on the deny-list",
                address.country
            )));
        }
        sqlx::query(
            "INSERT INTO shipments (order_id, saga_id, country, city, line1, postal_code, items) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(order_id)
        .bind(saga_id)
        .bind(&address.country)
        .bind(&address.city)
        .bind(&address.line1)
        .bind(&address.postal_code)
        .bind(serde_json::to_value(items).unwrap_or_default())
        .execute(tx)
        .await?;
        Ok(StepOutcome::Done)
    }

    async fn compensate(
        &self,
        _tx: &mut PgConnection,
        _saga_id: Uuid,
        command: &Command,
    ) -> Result<StepOutcome, HandlerError> {
        Ok(StepOutcome::Refused(format!(
            "{} has no compensation: shipping is the last step",
            command.type_name()
        )))
    }
}
