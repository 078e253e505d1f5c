//! Faults of the servers the fleet depends on, brought about and undone by a script on a
//! schedule: the broker SIGKILLed and started again (one node; three nodes are
//! `broker_nodes.rs`), PostgreSQL stopped and started, or turned read-only and writable again.

use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::postgres::PgConnectOptions;
use tokio::process::Command;

use super::args::ChaosArgs;

/// SIGKILLs the broker every --broker-kill-every-ms, if set (one broker; three nodes:
/// `faults::spawn_node_faults`).
pub(super) fn spawn_broker_faults(args: &ChaosArgs) -> Option<ServerFaults> {
    (args.broker_kill_every_ms > 0 && args.broker_nodes == 1).then(|| {
        ServerFaults::spawn(
            "the broker (SIGKILL)",
            Control {
                script: args.broker_script.clone(),
                env: vec![(
                    "BROKER_ADDR".into(),
                    args.kafka
                        .kafka_brokers
                        .split(',')
                        .next()
                        .unwrap_or_default()
                        .into(),
                )],
                down_action: "kill",
                up_action: "start",
            },
            Duration::from_millis(args.broker_kill_every_ms),
            Duration::from_millis(args.broker_down_ms),
        )
    })
}

/// Stops and starts PostgreSQL every --postgres-restart-every-ms, if set.
pub(super) fn spawn_postgres_faults(args: &ChaosArgs) -> anyhow::Result<Option<ServerFaults>> {
    let fault = PostgresFault {
        what: "PostgreSQL (fast stop)",
        down_action: "stop",
        up_action: "start",
    };
    fault.spawn(args, args.postgres_restart_every_ms, args.postgres_down_ms)
}

/// Turns PostgreSQL read-only and writable again every --postgres-read-only-every-ms, if set.
pub(super) fn spawn_read_only_faults(args: &ChaosArgs) -> anyhow::Result<Option<ServerFaults>> {
    let fault = PostgresFault {
        what: "PostgreSQL (read-only)",
        down_action: "read-only",
        up_action: "writable",
    };
    fault.spawn(
        args,
        args.postgres_read_only_every_ms,
        args.postgres_read_only_ms,
    )
}

/// A fault of the PostgreSQL server that --postgres-script brings about and undoes.
struct PostgresFault {
    what: &'static str,
    down_action: &'static str,
    up_action: &'static str,
}

impl PostgresFault {
    /// Runs the fault every `every_ms` for `down_ms` (never when `every_ms` is 0).
    fn spawn(
        self,
        args: &ChaosArgs,
        every_ms: u64,
        down_ms: u64,
    ) -> anyhow::Result<Option<ServerFaults>> {
        if every_ms == 0 {
            return Ok(None);
        }
        let port = PgConnectOptions::from_str(&args.database_server)?.get_port();
        let mut env = vec![("PGPORT".into(), port.to_string())];
        if let Some(dir) = &args.postgres_run_dir {
            env.push(("PG_RUN_DIR".into(), dir.display().to_string()));
        }
        Ok(Some(ServerFaults::spawn(
            self.what,
            Control {
                script: args.postgres_script.clone(),
                env,
                down_action: self.down_action,
                up_action: self.up_action,
            },
            Duration::from_millis(every_ms),
            Duration::from_millis(down_ms),
        )))
    }
}

/// How a server is taken down and brought back: `script down_action` and `script up_action`,
/// with `env`.
struct Control {
    script: PathBuf,
    env: Vec<(String, String)>,
    down_action: &'static str,
    up_action: &'static str,
}

impl Control {
    async fn run(&self, action: &str) -> anyhow::Result<()> {
        let status = Command::new(&self.script)
            .arg(action)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .status()
            .await
            .with_context(|| format!("running {} {action}", self.script.display()))?;
        if !status.success() {
            bail!("{} {action} failed: {status}", self.script.display());
        }
        Ok(())
    }
}

/// A server's outages: how many, and how long each lasted from the moment it was taken down
/// until its start had returned.
#[derive(Debug, Default)]
pub(super) struct Outages {
    pub(super) lengths: Vec<Duration>,
    /// How long the script took to take the server down, and to start it.
    stopping: Vec<Duration>,
    starting: Vec<Duration>,
}

impl Outages {
    pub(super) fn add(&mut self, more: Outages) {
        self.lengths.extend(more.lengths);
        self.stopping.extend(more.stopping);
        self.starting.extend(more.starting);
    }

    pub(super) fn describe(&self) -> String {
        let Some(longest) = self.lengths.iter().max() else {
            return "0".into();
        };
        let mean = |times: &[Duration]| {
            times.iter().sum::<Duration>().as_secs_f64() / times.len().max(1) as f64
        };
        format!(
            "{} (down {:.1} s on average, {:.1} s at most; taking it down {:.1} s, starting it {:.1} s on average)",
            self.lengths.len(),
            mean(&self.lengths),
            longest.as_secs_f64(),
            mean(&self.stopping),
            mean(&self.starting),
        )
    }
}

/// Takes a server (the broker, PostgreSQL) down and up again in the background while orders
/// are placed.
pub(super) struct ServerFaults {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<Outages>>,
}

impl ServerFaults {
    fn spawn(what: &'static str, control: Control, every: Duration, down: Duration) -> Self {
        let (stop, mut stopping) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut outages = Outages::default();
            loop {
                // A stop ends the wait at once; an outage in progress finishes with the start.
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopping.changed() => return Ok(outages),
                }
                eprintln!("taking down {what}");
                let began = Instant::now();
                control.run(control.down_action).await?;
                outages.stopping.push(began.elapsed());
                tokio::time::sleep(down).await;
                let starting = Instant::now();
                control.run(control.up_action).await?;
                outages.starting.push(starting.elapsed());
                outages.lengths.push(began.elapsed());
            }
        });
        Self { stop, task }
    }

    /// Stops the faults; returns once the server is up again, with its outages.
    pub(super) async fn stop(self) -> anyhow::Result<Outages> {
        // The task may have ended with an error already; its result says so.
        let _ = self.stop.send(true);
        self.task.await?
    }
}
