//! `sagactl start <saga_type>`: starts a saga of any type as a client does, by publishing its
//! trigger message (JSON from a file or standard input) to the trigger topic the type's newest
//! definition names, keyed by the saga's key as the definition reads it. The message is first
//! checked by its own contract rules (`Trigger::accept`, as `POST /definitions/{saga_type}/sagas`
//! checks it), so a message the orchestrator would dead-letter is refused here instead. Prints
//! the saga's key, alone, on standard output.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

use crate::deployment::Deployment;
use crate::load::TriggerRecord;
use crate::ops::DeploymentArgs;

#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    /// The saga type: a definition's `name` (order, return, ...).
    saga_type: String,
    /// A file holding the trigger message as JSON (its `type` may be left out); without it, the
    /// message is read from standard input.
    #[arg(long)]
    file: Option<PathBuf>,
    /// The saga definitions: the type's newest one names the topic and the key.
    #[arg(long, env = "SAGAS_DIR", default_value = "sagas")]
    sagas_dir: PathBuf,
    #[command(flatten)]
    deployment: DeploymentArgs,
}

pub async fn run(args: StartArgs) -> anyhow::Result<()> {
    let text = match &args.file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the trigger message from standard input")?;
            text
        }
    };
    let message: Value = serde_json::from_str(&text).context("the trigger message is not JSON")?;
    let deployment = Deployment::load(&args.sagas_dir)?;
    let definition = deployment.saga(&args.saga_type)?;
    let trigger = &definition.trigger;
    let accepted = trigger.accept(message).with_context(|| {
        format!(
            "the {} saga's trigger message ({}) is refused",
            args.saga_type, trigger.message
        )
    })?;
    let (producer, topics) = args.deployment.publisher()?;
    // Each saga starts its own trace; every command and reply of it joins it.
    let traceparent = messaging::telemetry::new_traceparent();
    TriggerRecord {
        message: &trigger.message,
        key: &accepted.key,
        payload: &serde_json::to_vec(&accepted.message)?,
        traceparent: Some(&traceparent),
    }
    .publish(&producer, &topics.named(&trigger.topic))
    .await?;
    println!("{}", accepted.key);
    Ok(())
}
