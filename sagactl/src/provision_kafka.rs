//! `sagactl provision kafka`: the admin step of a secured cluster. With the admin identity it
//! creates the deployment's topics (the services then find them and need no create rights) and
//! works out the ACLs each identity needs, from the same sources the services name their topics
//! and groups from: the saga definitions read as the chaos suite reads them ([`Deployment`]:
//! trigger topics, each participant and its command topic), [`Topics`] (the engine's topics)
//! and the group naming of the orchestrator and the participant runtime
//! (`<prefix><service>`).
//!
//! rdkafka has no ACL API, so the ACLs are written as a plan (JSON, one binding per entry) that
//! `scripts/kafka-acls.py` applies through confluent-kafka's Admin API and waits for until every
//! broker enforces it; `scripts/provision-kafka.sh` runs both.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use events::Topics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;

use crate::deployment::{Deployment, ORCHESTRATOR};

#[derive(clap::Args)]
pub struct ProvisionKafkaArgs {
    /// The cluster, with the admin identity's client properties (a super user, or one allowed
    /// to create topics).
    #[command(flatten)]
    kafka: messaging::config::KafkaConnection,
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
    /// Where to write the ACL plan; `-` for standard output. Without it only the topics are
    /// created and the plan is printed as a table.
    #[arg(long)]
    acl_plan: Option<PathBuf>,
    /// The plan's format: `json` (scripts/kafka-acls.py applies it) or `kafka-acls` (one line
    /// of `kafka-acls.sh` arguments per binding, for Kafka's own tool).
    #[arg(long, value_enum, default_value_t = PlanFormat::Json)]
    acl_plan_format: PlanFormat,
    /// Work out the plan only: create no topic.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PlanFormat {
    Json,
    KafkaAcls,
}

/// The identity of the public client (orders in, saga events out).
pub const CLIENT_IDENTITY: &str = "client";

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
    /// Seeing a group's committed offsets without joining it.
    Describe,
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

/// The plan for `deployment` under `topics`' prefix:
/// - the orchestrator writes the command topics, `saga.events`, the trigger topics (its API
///   publishes orders there) and the DLQ; reads the trigger topics and `saga.replies`; and
///   reads (joins) its group `<prefix>orchestrator`; and sees (describes) the participants'
///   groups, for their committed offsets;
/// - each participant reads only its command topic, and its group
///   `<prefix><participant>`; writes only `saga.replies` and the DLQ;
/// - the public client writes only the trigger topics and reads only `saga.events`, with any
///   group whose name starts with `<prefix>client.` (no service's group can: service names have
///   no dot).
pub fn plan(deployment: &Deployment, topics: &Topics) -> Plan {
    let (triggers, commands) = deployment.registry.topics();
    let triggers: Vec<String> = triggers.iter().map(|t| topics.named(t)).collect();
    let commands: Vec<String> = commands.iter().map(|t| topics.named(t)).collect();

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
    use Operation::{Describe, Read, Write};
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

    for participant in &deployment.participants {
        let name = participant.name.as_str();
        allow(
            name,
            Topic,
            &topics.named(&participant.topic),
            Literal,
            Read,
        );
        allow(name, Group, &topics.named(name), Literal, Read);
        // How far the participant has come on its commands: a deadline passing while it works
        // through a backlog waits instead of sending again (orchestrator/src/backlog.rs).
        allow(ORCHESTRATOR, Group, &topics.named(name), Literal, Describe);
        for topic in [topics.replies(), topics.dead_letters()] {
            allow(name, Topic, &topic, Literal, Write);
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

pub async fn run(args: ProvisionKafkaArgs) -> anyhow::Result<()> {
    let deployment = Deployment::load(&args.sagas_dir)?;
    let topics = Topics::new(args.topic_prefix.clone());
    let plan = plan(&deployment, &topics);
    if !args.dry_run {
        create_topics(&args, &plan.topics).await?;
    }
    let text = match args.acl_plan_format {
        PlanFormat::Json => serde_json::to_string_pretty(&plan)?,
        PlanFormat::KafkaAcls => kafka_acls_lines(&plan),
    };
    match &args.acl_plan {
        Some(path) if path.as_os_str() == "-" => println!("{text}"),
        Some(path) => std::fs::write(path, text)
            .with_context(|| format!("writing the ACL plan to {}", path.display()))?,
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

/// The plan as `kafka-acls.sh` arguments, one binding a line (`--add --allow-principal User:x
/// --operation Read --topic t --resource-pattern-type literal`; any host). No word needs
/// quoting: identities and topic names have no blanks or shell patterns.
fn kafka_acls_lines(plan: &Plan) -> String {
    plan.acls
        .iter()
        .map(|b| {
            let resource = match b.resource_type {
                Resource::Topic => "--topic",
                Resource::Group => "--group",
            };
            let pattern = match b.pattern_type {
                Pattern::Literal => "literal",
                Pattern::Prefixed => "prefixed",
            };
            let operation = match b.operation {
                Operation::Read => "Read",
                Operation::Write => "Write",
                Operation::Describe => "Describe",
            };
            format!(
                "--add --allow-principal {} --operation {operation} {resource} {} \
                 --resource-pattern-type {pattern}\n",
                b.principal, b.resource_name
            )
        })
        .collect()
}

/// Creates the topics that do not exist yet; one that exists is left as it is.
async fn create_topics(args: &ProvisionKafkaArgs, names: &BTreeSet<String>) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        messaging::kafka::connection_settings(&args.kafka)?
            .create()
            .with_context(|| format!("creating the admin client ({})", args.kafka.describe()))?;
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
        .with_context(|| format!("creating the topics ({})", args.kafka.describe()))?;
    for result in results {
        match result {
            Ok(topic) => eprintln!("created {topic}"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                anyhow::bail!("creating topic {topic}: {code} ({})", args.kafka.describe())
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::tests::repository;

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
        let plan = plan(&repository(), &Topics::new("t."));
        use Operation::{Describe, Read, Write};
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
        // ... and sees the participants' offsets, without joining their groups.
        assert!(has(&plan, "orchestrator", Describe, Group, "t.payment"));
        assert!(!has(&plan, "orchestrator", Read, Group, "t.payment"));
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
        let deployment = repository();
        let plan = plan(&deployment, &Topics::new(""));
        for definition in deployment.registry.all() {
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
