//! Sagas: their definitions (data, loaded from `sagas/*.toml`), the registry of the versions
//! an orchestrator runs, retry policies and the state machine. Pure: no Kafka, no SQL, no
//! clock; time is passed in.

pub mod definitions;
mod machine;
#[cfg(any(test, feature = "oracle"))]
pub mod oracle;
#[cfg(any(test, feature = "order-messages"))]
pub mod order_messages;
mod policy;
#[cfg(test)]
mod proptests;
mod registry;
#[cfg(test)]
mod tests;

pub use definitions::SagaDefinition;
pub use machine::{
    Decision, Effect, OperatorAction, Saga, SagaState, StepState, StepStatus,
    ABANDON_AFTER_ATTEMPTS,
};
pub use policy::RetryPolicy;
pub use registry::Registry;
