//! Topic names. Every name is `{prefix}{base}`, so several deployments (or tests) can share one
//! broker without seeing each other's messages.

use crate::StepName;

/// The services that do the saga's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Participant {
    Inventory,
    Payment,
    Shipping,
}

impl Participant {
    pub const ALL: [Self; 3] = [Self::Inventory, Self::Payment, Self::Shipping];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inventory => "inventory",
            Self::Payment => "payment",
            Self::Shipping => "shipping",
        }
    }

    /// The participant that does (and undoes) `step`.
    pub fn for_step(step: StepName) -> Self {
        match step {
            StepName::ReserveStock => Self::Inventory,
            StepName::ChargePayment => Self::Payment,
            StepName::ScheduleShipment => Self::Shipping,
        }
    }
}

/// The topics of one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `base` with the deployment's prefix: a topic a saga definition names.
    pub fn named(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    /// Where clients publish `OrderPlaced`.
    pub fn orders(&self) -> String {
        self.named("orders")
    }

    /// Where `participant` receives its commands.
    pub fn commands(&self, participant: Participant) -> String {
        self.named(&format!("{}.commands", participant.as_str()))
    }

    /// Where every participant publishes its replies.
    pub fn replies(&self) -> String {
        self.named("saga.replies")
    }

    /// Saga lifecycle events.
    pub fn saga_events(&self) -> String {
        self.named("saga.events")
    }

    /// Unprocessable messages, with the reason in the record headers.
    pub fn dead_letters(&self) -> String {
        self.named("saga.dlq")
    }

    /// The engine's own topics: replies, saga events and dead letters.
    pub fn engine(&self) -> Vec<String> {
        vec![self.replies(), self.saga_events(), self.dead_letters()]
    }

    /// Every topic of the deployment, for creating them at start-up.
    pub fn all(&self) -> Vec<String> {
        let mut topics = vec![
            self.orders(),
            self.replies(),
            self.saga_events(),
            self.dead_letters(),
        ];
        topics.extend(Participant::ALL.map(|p| self.commands(p)));
        topics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix() {
        let topics = Topics::new("t1.");
        assert_eq!(topics.orders(), "t1.orders");
        assert_eq!(topics.commands(Participant::Payment), "t1.payment.commands");
        assert_eq!(topics.replies(), "t1.saga.replies");
        assert_eq!(topics.saga_events(), "t1.saga.events");
        assert_eq!(topics.dead_letters(), "t1.saga.dlq");
        assert_eq!(topics.all().len(), 7);
        assert_eq!(Topics::default().orders(), "orders");
    }
}
