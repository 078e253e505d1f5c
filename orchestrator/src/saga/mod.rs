//! The order saga: its definition (which steps, in which order, with which compensations), its
//! retry policies and its state machine. Pure: no Kafka, no SQL, no clock; time is passed in.

mod definition;
pub mod definitions;
mod machine;
mod policy;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use definition::{StepDefinition, DEFINITION_VERSION, STEPS};
pub use machine::{Decision, Effect, OperatorAction, Saga, SagaState, StepState, StepStatus};
pub use policy::{Policies, RetryPolicy};
