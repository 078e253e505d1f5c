//! Shipping: schedules the shipment unless the destination country is on the deny-list. It
//! serves the order saga's `schedule_shipment` step, the saga's pivot, so it is never
//! compensated.

use std::collections::BTreeSet;

use clap::Args;
use events::{Address, LineItem};
use messaging::db::column;
use participant_sdk::{Participant, Request, Step, StepError};
use serde::de::IgnoredAny;
use serde::Deserialize;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use uuid::Uuid;

static MIGRATIONS: Migrator = sqlx::migrate!("../migrations/shipping");

/// The shipping participant: its tables and its one step, with its deny-list from `config`.
pub fn participant(config: &ShippingConfig) -> Participant {
    Participant::new("shipping", &MIGRATIONS)
        .metrics_port(9183)
        .step(ScheduleShipment::new(config))
}

/// The deny-list unless `SHIPPING_DENIED_COUNTRIES` says otherwise.
const DEFAULT_DENIED_COUNTRIES: &str = "AQ,BV";

#[derive(Debug, Clone, Args)]
pub struct ShippingConfig {
    /// Destination countries (ISO 3166 alpha-2, comma separated) that are never shipped to.
    #[arg(
        long,
        env = "SHIPPING_DENIED_COUNTRIES",
        default_value = DEFAULT_DENIED_COUNTRIES,
        value_delimiter = ','
    )]
    pub denied_countries: Vec<String>,
}

impl Default for ShippingConfig {
    /// The command line's defaults (without reading the environment).
    fn default() -> Self {
        Self {
            denied_countries: DEFAULT_DENIED_COUNTRIES
                .split(',')
                .map(str::to_owned)
                .collect(),
        }
    }
}

/// `schedule_shipment`: records the shipment.
pub struct ScheduleShipment {
    denied: BTreeSet<String>,
}

impl ScheduleShipment {
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

/// What `ScheduleShipment` carries.
#[derive(Debug, Deserialize)]
pub struct Shipment {
    pub order_id: Uuid,
    pub address: Address,
    pub items: Vec<LineItem>,
}

/// Why a shipment was not scheduled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShipmentRefusal {
    DeniedCountry(String),
    /// Asked to undo a shipment, which cannot be undone.
    NoCompensation,
}

impl std::fmt::Display for ShipmentRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DeniedCountry(country) => {
                write!(f, "destination country {country} is on the deny-list")
            }
            Self::NoCompensation => f.write_str(
                "schedule_shipment has no compensation: a scheduled shipment cannot be undone",
            ),
        }
    }
}

impl Step for ScheduleShipment {
    const STEP: &'static str = "schedule_shipment";
    type Forward = Shipment;
    /// Whatever it is: there is nothing to undo with it.
    type Compensation = IgnoredAny;
    type Failure = ShipmentRefusal;

    /// All shipments of a batch in one statement, but those to a denied country.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, Shipment>],
    ) -> Result<Vec<Result<(), ShipmentRefusal>>, StepError> {
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut shipments = Vec::new();
        for request in requests {
            let Shipment {
                order_id,
                address,
                items,
            } = request.payload;
            if self.denied.contains(&address.country) {
                outcomes.push(Err(ShipmentRefusal::DeniedCountry(address.country.clone())));
                continue;
            }
            shipments.push((*order_id, request.saga_id, address, items));
            outcomes.push(Ok(()));
        }
        if shipments.is_empty() {
            return Ok(outcomes);
        }
        sqlx::query!(
            "INSERT INTO shipments (order_id, saga_id, country, city, line1, postal_code, items)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                                  $6::text[], $7::jsonb[])",
            &column(&shipments, |s| s.0),
            &column(&shipments, |s| s.1),
            &column(&shipments, |s| s.2.country.as_str()) as &[&str],
            &column(&shipments, |s| s.2.city.as_str()) as &[&str],
            &column(&shipments, |s| s.2.line1.as_str()) as &[&str],
            &column(&shipments, |s| s.2.postal_code.as_str()) as &[&str],
            &column(&shipments, |s| serde_json::to_value(s.3)
                .unwrap_or_default()),
        )
        .execute(tx)
        .await?;
        Ok(outcomes)
    }

    async fn compensate(
        &self,
        _tx: &mut PgConnection,
        _request: Request<'_, IgnoredAny>,
    ) -> Result<Result<(), ShipmentRefusal>, StepError> {
        Ok(Err(ShipmentRefusal::NoCompensation))
    }
}
