//! Shipping: schedules the shipment unless the destination country is on the deny-list. It is
//! the saga's last step, so it is never compensated.

use std::collections::BTreeSet;

use clap::Args;
use events::{Command, Participant};
use messaging::consumer::HandlerError;
use messaging::db::column;
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

    /// All shipments of a batch in one statement, but those to a denied country.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        commands: &[(Uuid, &Command)],
    ) -> Result<Vec<StepOutcome>, HandlerError> {
        let mut outcomes = Vec::with_capacity(commands.len());
        let mut shipments = Vec::new();
        for (saga_id, command) in commands {
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
                outcomes.push(StepOutcome::Refused(format!(
                    "destination country {} is on the deny-list",
                    address.country
                )));
                continue;
            }
            shipments.push((*order_id, *saga_id, address, items));
            outcomes.push(StepOutcome::Done);
        }
        if shipments.is_empty() {
            return Ok(outcomes);
        }
        sqlx::query(
            "INSERT INTO shipments (order_id, saga_id, country, city, line1, postal_code, items) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
                                  $6::text[], $7::jsonb[])",
        )
        .bind(column(&shipments, |s| s.0))
        .bind(column(&shipments, |s| s.1))
        .bind(column(&shipments, |s| s.2.country.as_str()))
        .bind(column(&shipments, |s| s.2.city.as_str()))
        .bind(column(&shipments, |s| s.2.line1.as_str()))
        .bind(column(&shipments, |s| s.2.postal_code.as_str()))
        .bind(column(&shipments, |s| {
            serde_json::to_value(s.3).unwrap_or_default()
        }))
        .execute(tx)
        .await?;
        Ok(outcomes)
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
