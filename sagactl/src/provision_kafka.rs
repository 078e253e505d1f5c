//! `sagactl provision-kafka`: the admin step of a secured cluster. With the admin identity it
//! creates the deployment's topics (the services then find them and need no create rights) and
//! works out the ACLs each identity needs, from the same sources the services name their topics
//! and groups from: the saga definitions (trigger topics, each participant's command topics),
//! [`Topics`] (the engine's topics) and the group naming of the orchestrator and the
//! participant runtime (`<prefix><service>`).
//!
//! rdkafka has no ACL API, so the ACLs are written as a plan (JSON, one binding per entry) that
//! `scripts/kafka-acls.py` applies through confluent-kafka's Admin API and waits for until every
//! broker enforces it; `scripts/provision-kafka.sh` runs both.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use events::Topics;
use orchestrator::saga::{definitions, Registry};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;

#[derive(clap::Args)]
pub struct ProvisionKafkaArgs {
    /// Bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The admin identity's librdkafka client properties (`security.protocol`, `sasl.*`,
    /// `ssl.*`, ...), one `name=value` a line. Without it: a plaintext connection.
    #[arg(long, env = "KAFKA_CLIENT_PROPERTIES")]
    kafka_client_properties: Option<PathBuf>,
    /// The deployment's topic prefix (TOPIC_PREFIX of its services).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// The saga definitions the orchestrator runs.
    #[arg(long, env = "SAGAS_DIR", default_value = "sagas")]
    sagas_dir: PathBuf,
    /// Partitions of each topic created.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Replication factor of each topic created; -1: the broker's default.replication.factor
    /// (3 on the three-node cluster, 1 on the one-node broker).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    replication_factor: i32,
    /// Where to write the ACL plan (JSON); `-` for standard output. Without it only the topics
    /// are created and the plan is printed as a table.
    #[arg(long)]
    acl_plan: Option<PathBuf>,
    /// Work out the plan only: create no topic.
    #[arg(long)]
    dry_run: bool,
}

/// The identity of the public client (orders in, saga events out).
pub const CLIENT_IDENTITY: &str = "client";
/// The orchestrator's identity and default consumer group suffix.
pub const ORCHESTRATOR: &str = "orchestrator";

/// Kafka's ACL resource types this plan uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resource {
    Topic,
    Group,
}

/// Kafka's ACL pattern types this plan uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Pattern {
    Literal,
    Prefixed,
}

/// Kafka's ACL operations this plan uses (READ and WRITE imply DESCRIBE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Operation {
    Read,
    Write,
}

/// One ALLOW binding for any host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Binding {
    /// `User:<identity>`: the SASL user name, or the CN of a client certificate.
    pub principal: String,
    pub resource_type: Resource,
    pub resource_name: String,
    pub pattern_type: Pattern,
    pub operation: Operation,
}

/// What one deployment (one topic prefix) needs on the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub topics: BTreeSet<String>,
    pub acls: BTreeSet<Binding>,
}

/// The plan for the definitions in `registry` under `topics`' prefix:
/// - the orchestrator writes the command topics, `saga.events`, the trigger topics (its API
///   publishes orders there) and the DLQ; reads the trigger topics and `saga.replies`; and
///   reads (joins) its group `<prefix>orchestrator`;
/// - each participant reads only the command topics its steps name, and its group
///   `<prefix><participant>`; writes only `saga.replies` and the DLQ;
/// - the public client writes only the trigger topics and reads only `saga.events`, with any
///   group whose name starts with `<prefix>client.` (no service's group can: service names have
///   no dot).
pub fn plan(registry: &Registry, topics: &Topics) -> Plan {
    let (triggers, commands) = registry.topics();
    let triggers: Vec<String> = triggers.iter().map(|t| topics.named(t)).collect();
    let commands: Vec<String> = commands.iter().map(|t| topics.named(t)).collect();
    let mut by_participant: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for definition in registry.all() {
        for step in &definition.steps {
            by_participant
                .entry(step.participant.as_str())
                .or_default()
                .insert(topics.named(&step.topic));
        }
    }

    let mut acls = BTreeSet::new();
    let mut allow = |who: &str, resource_type, name: &str, pattern_type, operation| {
        acls.insert(Binding {
            principal: format!("User:{who}"),
            resource_type,
            resource_name: name.to_owned(),
            pattern_type,
            operation,
        });
    };
    use Operation::{Read, Write};
    use Pattern::{Literal, Prefixed};
    use Resource::{Group, Topic};

    for topic in commands
        .iter()
        .chain(&triggers)
        .chain([&topics.saga_events(), &topics.dead_letters()])
    {
        allow(ORCHESTRATOR, Topic, topic, Literal, Write);
    }
    for topic in triggers.iter().chain([&topics.replies()]) {
        allow(ORCHESTRATOR, Topic, topic, Literal, Read);
    }
    allow(
        ORCHESTRATOR,
        Group,
        &topics.named(ORCHESTRATOR),
        Literal,
        Read,
    );

    for (participant, own) in &by_participant {
        for topic in own {
            allow(participant, Topic, topic, Literal, Read);
        }
        allow(
            participant,
            Group,
            &topics.named(participant),
            Literal,
            Read,
        );
        for topic in [topics.replies(), topics.dead_letters()] {
            allow(participant, Topic, &topic, Literal, Write);
        }
    }

    for topic in &triggers {
        allow(CLIENT_IDENTITY, Topic, topic, Literal, Write);
    }
    allow(CLIENT_IDENTITY, Topic, &topics.saga_events(), Literal, Read);
    allow(
        CLIENT_IDENTITY,
        Group,
        &client_group_prefix(topics),
        Prefixed,
        Read,
    );

    let mut all_topics: BTreeSet<String> = topics.engine().into_iter().collect();
    all_topics.extend(triggers);
    all_topics.extend(commands);
    Plan {
        topics: all_topics,
        acls,
    }
}

/// The start of every consumer group name the public client may use.
pub fn client_group_prefix(topics: &Topics) -> String {
    topics.named(&format!("{CLIENT_IDENTITY}."))
}

/// Reads a `client.properties` file: `name=value` lines; blank lines and lines starting with
/// `#` or `!` are skipped.
fn client_properties(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the Kafka client properties {}", path.display()))?;
    let mut properties = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let (name, value) = line.split_once('=').with_context(|| {
            format!(
                "{}:{}: expected name=value (a librdkafka property)",
                path.display(),
                number + 1
            )
        })?;
        properties.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(properties)
}

pub async fn run(args: ProvisionKafkaArgs) -> anyhow::Result<()> {
    let registry = Registry::new(definitions::load_dir(&args.sagas_dir)?)?;
    let topics = Topics::new(args.topic_prefix.clone());
    let plan = plan(&registry, &topics);
    if !args.dry_run {
        create_topics(&args, &plan.topics).await?;
    }
    match &args.acl_plan {
        Some(path) if path.as_os_str() == "-" => {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        }
        Some(path) => {
            std::fs::write(path, serde_json::to_string_pretty(&plan)?)
                .with_context(|| format!("writing the ACL plan to {}", path.display()))?;
        }
        None => {
            for binding in &plan.acls {
                println!(
                    "{:<24} {:<6} {:<5} {:<8} {}",
                    binding.principal,
                    format!("{:?}", binding.operation).to_uppercase(),
                    format!("{:?}", binding.resource_type).to_uppercase(),
                    format!("{:?}", binding.pattern_type).to_uppercase(),
                    binding.resource_name
                );
            }
        }
    }
    Ok(())
}

/// Creates the topics that do not exist yet; one that exists is left as it is.
async fn create_topics(args: &ProvisionKafkaArgs, names: &BTreeSet<String>) -> anyhow::Result<()> {
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", &args.brokers);
    if let Some(path) = &args.kafka_client_properties {
        for (name, value) in client_properties(path)? {
            config.set(name, value);
        }
    }
    let admin: AdminClient<DefaultClientContext> =
        config.create().context("creating the admin client")?;
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                args.partitions,
                TopicReplication::Fixed(args.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .context("creating the topics (is the admin identity's client.properties right?)")?;
    for result in results {
        match result {
            Ok(topic) => eprintln!("created {topic}"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sagas");
        Registry::new(definitions::load_dir(&dir).expect("the repository's definitions load"))
            .expect("they form a registry")
    }

    fn has(plan: &Plan, who: &str, op: Operation, resource: Resource, name: &str) -> bool {
        plan.acls.iter().any(|b| {
            b.principal == format!("User:{who}")
                && b.operation == op
                && b.resource_type == resource
                && b.resource_name == name
        })
    }

    #[test]
    fn each_identity_gets_only_what_its_role_needs() {
        let plan = plan(&registry(), &Topics::new("t."));
        use Operation::{Read, Write};
        use Resource::{Group, Topic};
        // The orchestrator: commands, events, triggers and DLQ out; triggers and replies in.
        assert!(has(
            &plan,
            "orchestrator",
            Write,
            Topic,
            "t.payment.commands"
        ));
        assert!(has(&plan, "orchestrator", Write, Topic, "t.saga.events"));
        assert!(has(&plan, "orchestrator", Write, Topic, "t.orders"));
        assert!(has(&plan, "orchestrator", Read, Topic, "t.saga.replies"));
        assert!(has(&plan, "orchestrator", Read, Group, "t.orchestrator"));
        assert!(!has(&plan, "orchestrator", Write, Topic, "t.saga.replies"));
        // A participant: its own commands in, replies and DLQ out, nothing else.
        assert!(has(&plan, "payment", Read, Topic, "t.payment.commands"));
        assert!(has(&plan, "payment", Read, Group, "t.payment"));
        assert!(has(&plan, "payment", Write, Topic, "t.saga.replies"));
        assert!(!has(&plan, "payment", Read, Topic, "t.inventory.commands"));
        assert!(!has(&plan, "payment", Write, Topic, "t.saga.events"));
        let payment: Vec<_> = plan
            .acls
            .iter()
            .filter(|b| b.principal == "User:payment")
            .collect();
        assert_eq!(payment.len(), 4, "{payment:?}");
        // The client: triggers out, saga events in, nothing of the engine's inside.
        assert!(has(&plan, "client", Write, Topic, "t.orders"));
        assert!(has(&plan, "client", Write, Topic, "t.returns"));
        assert!(has(&plan, "client", Read, Topic, "t.saga.events"));
        assert!(!has(&plan, "client", Write, Topic, "t.saga.replies"));
        assert!(plan.acls.iter().any(|b| b.principal == "User:client"
            && b.resource_type == Group
            && b.pattern_type == Pattern::Prefixed
            && b.resource_name == "t.client."));
    }

    #[test]
    fn every_participant_a_definition_names_is_provisioned_with_every_topic() {
        let registry = registry();
        let plan = plan(&registry, &Topics::new(""));
        for definition in registry.all() {
            for step in &definition.steps {
                assert!(plan.topics.contains(&step.topic));
                assert!(has(
                    &plan,
                    &step.participant,
                    Operation::Read,
                    Resource::Topic,
                    &step.topic
                ));
            }
        }
        for topic in [
            "saga.replies",
            "saga.events",
            "saga.dlq",
            "orders",
            "returns",
        ] {
            assert!(plan.topics.contains(topic), "{topic}");
        }
    }
}
