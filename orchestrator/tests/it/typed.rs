//! The enums the services store are PostgreSQL enum types with the same labels: what sqlx
//! sends for each variant is a label of its type, and every label is a variant's.

use orchestrator::saga::SagaState;
use orchestrator::store::{HistoryDecision, StoredState};
use participant_sdk::LedgerOutcome;
use sqlx::postgres::{PgHasArrayType, Postgres};
use sqlx::{Encode, PgPool, Type};

use crate::helpers::TestSystem;

/// The labels of PostgreSQL's `type_name`, in their order, and the label sqlx sends for each of
/// `variants`, in theirs.
async fn labels_and_encodings<T>(
    db: &PgPool,
    type_name: &str,
    variants: &[T],
) -> (Vec<String>, Vec<String>)
where
    T: for<'q> Encode<'q, Postgres> + Type<Postgres> + PgHasArrayType + Copy + Send + Sync,
{
    let labels: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT unnest(enum_range(NULL::{type_name}))::text"
    ))
    .fetch_all(db)
    .await
    .expect("labels");
    let mut encoded = Vec::new();
    for variant in variants {
        // Not prepared once for the connection: the statement's parameter is of another type
        // on each call.
        let label: String = sqlx::query_scalar("SELECT $1::text")
            .persistent(false)
            .bind(*variant)
            .fetch_one(db)
            .await
            .expect("encode");
        encoded.push(label);
    }
    (labels, encoded)
}

#[tokio::test]
async fn stored_enums_are_their_postgresql_types() {
    let system = TestSystem::start().await;
    let orchestrator = system.schema("orchestrator").await;
    // The machine's states know no SQL; the store writes each by its name.
    let stored = SagaState::ALL.map(StoredState);
    let (labels, encoded) = labels_and_encodings(&orchestrator, "saga_state", &stored).await;
    assert_eq!(labels, encoded, "saga_state");
    let names: Vec<&str> = SagaState::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(labels, names, "the API's state names are the stored ones");

    let (labels, encoded) =
        labels_and_encodings(&orchestrator, "saga_decision", &HistoryDecision::ALL).await;
    assert_eq!(labels, encoded, "saga_decision");

    let inventory = system.schema("inventory").await;
    let (labels, encoded) =
        labels_and_encodings(&inventory, "ledger_outcome", &LedgerOutcome::ALL).await;
    assert_eq!(labels, encoded, "ledger_outcome");

    orchestrator.close().await;
    inventory.close().await;
    system.stop().await;
}
