//! The workload of a chaos run: a warm-up saga, then orders at --rate (some built to be
//! compensated, one in ten published twice) and returns of earlier ones beside them, open
//! loop: they go out on time whatever the faults do.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::producer::FutureProducer;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::args::ChaosArgs;
use super::setup::Setup;
use crate::load::{publish_order, publish_return, random_order};

/// The saga types the run's workload starts (orders, and returns of them); the definitions
/// must have both.
pub(super) const SAGAS: [&str; 2] = ["order", "return"];

/// Every how many orders a return of an earlier one is requested.
const RETURN_EVERY: usize = 4;
/// How many orders back the returned one was placed (so that most are finished by then).
const RETURN_LAG: usize = 8;

/// A return of `order`: one item of it, one more than it took for one return in five (refused
/// at the restock), and asking more than its charge (so refused at the refund) for one return in
/// three. A SOLDOUT order's item comes back as a WIDGET, which it did not take either.
fn return_of(order: &events::OrderPlaced, n: usize) -> events::ReturnRequested {
    let (sku, took) = match order.items.first() {
        Some(item) if item.sku != "SOLDOUT" => (item.sku.as_str(), item.quantity),
        _ => ("WIDGET", 1),
    };
    events::ReturnRequested {
        return_id: Uuid::new_v4(),
        order_id: order.order_id,
        customer_id: order.customer_id.clone(),
        items: vec![events::ReturnItem {
            sku: sku.into(),
            quantity: if n % 5 == 1 { took + 1 } else { 1 },
        }],
        refund_cents: if n % 3 == 2 {
            order.total_cents + 1
        } else {
            order.total_cents / 2
        },
        currency: order.currency.clone(),
    }
}

/// Which of `placed` (every order so far) the `n`-th return names: mostly the one placed
/// RETURN_LAG before the latest; one in five the latest of those built to be undone after they
/// reserved stock (declined at payment: carol; refused at shipping: AQ; as
/// `load::random_order_failing_at` builds them), so returns meet released
/// reservations (or reach one before its release); one in seven the order the return before it
/// named, so several returns of one order add up.
fn returned_order(placed: &[events::OrderPlaced], n: usize) -> &events::OrderPlaced {
    let lagged = placed.len().saturating_sub(RETURN_LAG + 1);
    let earlier = placed.len().saturating_sub(RETURN_EVERY);
    if n % 7 == 6 && earlier > RETURN_LAG {
        return returned_order(&placed[..earlier], n - 1);
    }
    let undone_after_reserving = |order: &&events::OrderPlaced| {
        order.customer_id == "carol" || order.shipping_address.country == "AQ"
    };
    if n % 5 == 3 {
        if let Some(undone) = placed[..=lagged].iter().rev().find(undone_after_reserving) {
            return undone;
        }
    }
    &placed[lagged]
}

/// What the workload placed, and the placing still in flight.
pub(super) struct Workload {
    producer: FutureProducer,
    failure_percent: u8,
    /// Every order placed, the warm-up's first.
    pub(super) order_ids: Vec<Uuid>,
    /// Every return requested.
    pub(super) return_ids: Vec<Uuid>,
    /// When each order and return was published (its first copy): the broker fault windows'
    /// latencies count from here, so a trigger held in the producer during an outage counts.
    pub(super) placed_at: Vec<(Uuid, DateTime<Utc>)>,
    /// The orders placed after the warm-up, which returns name.
    placed_orders: Vec<events::OrderPlaced>,
    publishing: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Workload {
    /// Runs one saga through every service before the clock starts, so that the first half of
    /// the run does not pay for the consumers' first group joins.
    pub(super) async fn warm_up(
        args: &ChaosArgs,
        setup: &Setup,
        db: &PgPool,
    ) -> anyhow::Result<Self> {
        let producer: FutureProducer =
            messaging::kafka::producer_settings(&args.kafka, 0)?.create()?;
        let warmup = random_order(0);
        publish_order(&producer, &setup.topics, &warmup).await?;
        wait_until_finished(db, warmup.order_id).await;
        let mut order_ids = Vec::with_capacity(args.sagas + 1);
        order_ids.push(warmup.order_id);
        Ok(Self {
            producer,
            failure_percent: args.failure_percent,
            order_ids,
            return_ids: Vec::with_capacity(args.sagas / RETURN_EVERY + 1),
            placed_at: Vec::with_capacity(args.sagas * 2),
            placed_orders: Vec::with_capacity(args.sagas),
            publishing: Vec::with_capacity(args.sagas),
        })
    }

    /// Places the `placed`-th order (counting from 0) and, every RETURN_EVERY of them, a
    /// return of an earlier one; publishing goes on in the background.
    pub(super) fn place(&mut self, setup: &Setup, placed: usize) {
        let order = random_order(self.failure_percent);
        // One order in ten is published twice: clients retry, and the engine must absorb it.
        // Open loop: orders go out at --rate whether or not the broker is up (the producer
        // queues them meanwhile), so both halves of a run last as long and get the same faults.
        for _ in 0..if placed.is_multiple_of(10) { 2 } else { 1 } {
            let (producer, topics, order) =
                (self.producer.clone(), setup.topics.clone(), order.clone());
            self.publishing.push(tokio::spawn(async move {
                publish_order(&producer, &topics, &order).await
            }));
        }
        self.order_ids.push(order.order_id);
        self.placed_at.push((order.order_id, Utc::now()));
        self.placed_orders.push(order);
        // Returns of earlier orders go out beside the orders, one for every RETURN_EVERY of them.
        if placed % RETURN_EVERY == RETURN_EVERY - 1 && placed >= RETURN_LAG {
            let n = self.return_ids.len();
            let request = return_of(returned_order(&self.placed_orders, n), n);
            // Like orders, one return in ten is requested twice.
            for _ in 0..if n.is_multiple_of(10) { 2 } else { 1 } {
                let (producer, topics, request) =
                    (self.producer.clone(), setup.topics.clone(), request.clone());
                self.publishing.push(tokio::spawn(async move {
                    publish_return(&producer, &topics, &request).await
                }));
            }
            self.return_ids.push(request.return_id);
            self.placed_at.push((request.return_id, Utc::now()));
        }
    }

    /// Waits until everything placed has been published.
    pub(super) async fn published(&mut self) -> anyhow::Result<()> {
        for published in std::mem::take(&mut self.publishing) {
            published.await??;
        }
        Ok(())
    }

    /// The keys of every saga the workload started: the orders', then the returns'.
    pub(super) fn saga_keys(&self) -> Vec<Uuid> {
        self.order_ids
            .iter()
            .chain(&self.return_ids)
            .copied()
            .collect()
    }

    /// The keys of the sagas the workload started, by saga type.
    pub(super) fn started(&self) -> BTreeMap<&'static str, &[Uuid]> {
        let [order, request] = SAGAS;
        BTreeMap::from([
            (order, self.order_ids.as_slice()),
            (request, self.return_ids.as_slice()),
        ])
    }
}

/// Waits (at most a minute) until the saga of `order_id` has finished.
async fn wait_until_finished(db: &PgPool, order_id: Uuid) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let finished: Option<bool> = sqlx::query_scalar(
            "SELECT finished_at IS NOT NULL FROM orchestrator.sagas \
             WHERE definition_name = 'order' AND saga_key = $1::text",
        )
        .bind(order_id)
        .fetch_optional(db)
        .await
        .ok()
        .flatten();
        if finished == Some(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the warm-up saga did not finish within a minute; going on");
}
