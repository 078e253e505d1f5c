//! Topic names. Every name is `{prefix}{base}`, so several deployments (or tests) can share one
//! broker without seeing each other's messages. Command topics come from the saga definitions
//! (a participant's is a setting of its own), so only the engine's topics and the order
//! saga's trigger topic are named here.

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix() {
        let topics = Topics::new("t1.");
        assert_eq!(topics.orders(), "t1.orders");
        assert_eq!(topics.named("payment.commands"), "t1.payment.commands");
        assert_eq!(topics.replies(), "t1.saga.replies");
        assert_eq!(topics.saga_events(), "t1.saga.events");
        assert_eq!(topics.dead_letters(), "t1.saga.dlq");
        assert_eq!(topics.engine().len(), 3);
        assert_eq!(Topics::default().orders(), "orders");
    }
}
