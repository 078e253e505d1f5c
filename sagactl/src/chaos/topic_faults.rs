//! The chaos suite's destination fault (`--topic-delete-every-ms`, `--topic-down-ms`): one
//! command topic the saga definitions name, chosen at random per run, is deleted and created
//! again (with the partitions it had) while the sagas run.
//!
//! What it exercises: the outbox relay holds that topic's rows back while it is gone and keeps
//! every other destination flowing; the records on the topic when it was deleted are gone with
//! it, and its consumer, which keeps its position on the old topic, may skip the first records
//! of the new one (ARCHITECTURE.md, "Hostile input and failures"), so those commands are lost
//! and the orchestrator's step deadlines send them again (the run shortens the step timeouts
//! for that, [`service_env`]). The invariants must hold as without the fault, and no valid
//! trigger may reach the dead-letter topic.

use std::time::{Duration, Instant};

use anyhow::Context;
use rand::seq::SliceRandom;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;

use super::garbage::Target;
use crate::deployment::Deployment;

/// The first wait for a step's reply while topics are deleted, in milliseconds, and the
/// longest: a command lost with its topic is sent again after this, not after the
/// definitions' 30 s (which doubles to 300 s), so the run settles in its settle timeout.
const STEP_TIMEOUT_MS: &str = "3000";
const RETRY_MAX_TIMEOUT_MS: &str = "10000";

/// A command topic of the deployment, without the prefix, chosen at random.
pub fn choose(deployment: &Deployment) -> Option<String> {
    deployment
        .participants
        .choose(&mut rand::thread_rng())
        .map(|p| p.topic.clone())
}

/// The settings every service gets while the fault runs: shorter step deadlines (only the
/// orchestrator reads them).
pub fn service_env() -> Vec<(String, String)> {
    vec![
        ("STEP_TIMEOUT_MS".into(), STEP_TIMEOUT_MS.into()),
        ("RETRY_MAX_TIMEOUT_MS".into(), RETRY_MAX_TIMEOUT_MS.into()),
    ]
}

/// The garbage targets without the deleted topic's: a garbage record on it when it goes is
/// gone with it and never reaches the dead-letter topic, which the garbage audit would count
/// against the engine.
pub fn spare(targets: Vec<Target>, deleted: &str) -> Vec<Target> {
    targets
        .into_iter()
        .filter(|t| !matches!(t, Target::Commands { topic, .. } if topic == deleted))
        .collect()
}

/// How often the topic was deleted, and how long it was away each time (from the deletion
/// until it had been created again).
#[derive(Debug, Default)]
pub struct TopicOutages {
    pub topic: String,
    pub lengths: Vec<Duration>,
}

impl TopicOutages {
    pub fn describe(&self) -> String {
        let Some(longest) = self.lengths.iter().max() else {
            return format!("0 ({})", self.topic);
        };
        let mean = self.lengths.iter().sum::<Duration>().as_secs_f64() / self.lengths.len() as f64;
        format!(
            "{} of {} (gone {mean:.1} s on average, {:.1} s at most)",
            self.lengths.len(),
            self.topic,
            longest.as_secs_f64()
        )
    }
}

/// Deletes `topic` every `every` and creates it again after `down`, in the background.
pub struct TopicFaults {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<TopicOutages>>,
}

impl TopicFaults {
    /// # Errors
    /// When no admin client can be created.
    pub fn spawn(
        kafka: &messaging::config::KafkaConnection,
        topic: String,
        every: Duration,
        down: Duration,
    ) -> anyhow::Result<Self> {
        let admin: AdminClient<DefaultClientContext> =
            messaging::kafka::connection_settings(kafka)?
                .create()
                .context("creating an admin client")?;
        let (stop, mut stopping) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut outages = TopicOutages {
                topic: topic.clone(),
                lengths: Vec::new(),
            };
            loop {
                // A stop ends the wait at once; a deletion in progress ends with the topic back.
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopping.changed() => return Ok(outages),
                }
                let partitions = partitions_of(&admin, &topic)?;
                eprintln!("deleting topic {topic} ({partitions} partitions)");
                let began = Instant::now();
                delete(&admin, &topic).await?;
                tokio::time::sleep(down).await;
                create(&admin, &topic, partitions).await?;
                outages.lengths.push(began.elapsed());
                eprintln!("created topic {topic} again");
            }
        });
        Ok(Self { stop, task })
    }

    /// Stops the fault; returns once the topic exists again, with its outages.
    pub async fn stop(self) -> anyhow::Result<TopicOutages> {
        // The task may have ended with an error already; its result says so.
        let _ = self.stop.send(true);
        self.task.await?
    }
}

/// The partition count of `topic`, which it gets again when it is created again (the
/// services' TOPIC_PARTITIONS: every topic has as many, so one saga's messages share a
/// partition number).
fn partitions_of(admin: &AdminClient<DefaultClientContext>, topic: &str) -> anyhow::Result<i32> {
    let metadata = tokio::task::block_in_place(|| {
        admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
    })
    .with_context(|| format!("reading the metadata of {topic}"))?;
    let count = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    if count == 0 {
        anyhow::bail!("topic {topic} has no partitions to delete");
    }
    Ok(i32::try_from(count)?)
}

async fn delete(admin: &AdminClient<DefaultClientContext>, topic: &str) -> anyhow::Result<()> {
    let results = admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .with_context(|| format!("deleting {topic}"))?;
    for result in results {
        match result {
            // A service may not have created it yet after its own restart.
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((_, code)) => anyhow::bail!("deleting {topic}: {code}"),
        }
    }
    Ok(())
}

/// Creates `topic` again. The broker deletes a topic in the background, and refuses to create
/// it while that goes on, so this asks again for up to 30 s. A service that restarted
/// meanwhile may have created it already (its start-up creates its topics): that counts.
async fn create(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    loop {
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let results = admin
            .create_topics(&[new], &options)
            .await
            .with_context(|| format!("creating {topic} again"))?;
        let refused = results.into_iter().find_map(|r| r.err());
        match refused {
            None => return Ok(()),
            Some((_, RDKafkaErrorCode::TopicAlreadyExists))
                if partitions_of(admin, topic).is_ok() =>
            {
                return Ok(())
            }
            Some((_, code)) if Instant::now() > deadline => {
                anyhow::bail!("creating {topic} again: {code}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// How many records `topic` (the dead-letter topic) holds: the sum over its partitions of the
/// distance between the first and the next offset. While the fault runs without garbage, no
/// record of the run is unreadable, so it must be 0: a valid trigger or command dead-lettered
/// because its topic went away would count here.
pub fn records_in(kafka: &messaging::config::KafkaConnection, topic: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = messaging::kafka::connection_settings(kafka)?
        .create()
        .context("creating a client to count records")?;
    tokio::task::block_in_place(|| {
        let timeout = Duration::from_secs(10);
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .with_context(|| format!("reading the metadata of {topic}"))?;
        let mut records = 0;
        for partition in metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions())
        {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition.id(), timeout)
                .with_context(|| format!("reading the offsets of {topic} [{}]", partition.id()))?;
            records += high - low;
        }
        Ok(records)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deleted_topic_is_a_command_topic_and_gets_no_garbage() {
        let deployment = crate::deployment::tests::repository();
        let topic = choose(&deployment).expect("the definitions name command topics");
        assert!(deployment.participants.iter().any(|p| p.topic == topic));
        let all = Target::all(&deployment);
        let spared = spare(Target::all(&deployment), &topic);
        assert_eq!(
            spared.len(),
            all.len() - 1,
            "only the deleted topic's target goes"
        );
        assert!(!spared
            .iter()
            .any(|t| matches!(t, Target::Commands { topic: t, .. } if *t == topic)));
    }
}
