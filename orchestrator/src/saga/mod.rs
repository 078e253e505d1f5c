//! The order saga: its definition (which steps, in which order, with which compensations) and
//! its state machine. Pure: no Kafka, no SQL, no clock; time is passed in.

mod definition;
mod machine;

pub use definition::{StepDefinition, DEFINITION_VERSION, STEPS};
#[cfg(test)]
mod tests;

pub use machine::{Decision, Effect, Saga, SagaState, StepState, StepStatus};
