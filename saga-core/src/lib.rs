//! Sagas: their definitions (data, loaded from `sagas/*.toml`), the registry of the versions
//! an orchestrator runs, retry policies and the state machine. Pure: no Kafka, no SQL, no
//! clock; time is passed in.

pub mod definitions;
pub mod generated;
mod machine;
#[cfg(any(test, feature = "oracle"))]
pub mod oracle;
// Not behind a feature: the end-to-end tests use it, and a feature only their build turned on
// would give the saga core, and every crate above it, a second build in the test command
// (.ci/run checks the test and service builds agree).
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
