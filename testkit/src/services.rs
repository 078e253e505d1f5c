//! Services running as tasks of the test's process.

use std::future::Future;
use std::time::Duration;

use participant_sdk::{Participant, ParticipantConfig, Readiness};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One service running as a task.
struct Running {
    name: &'static str,
    /// A child token of the deployment's, so a test can stop the service alone.
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// A participant's; other services have none.
    readiness: Option<Readiness>,
}

/// The services of a test deployment, each a task of this process under a shutdown token of
/// the deployment's; dropping it cancels that token. A service that fails panics its task with
/// its error, which [`Services::wait_for_exit`] returns and [`Services::stop_all`] reports.
pub struct Services {
    shutdown: CancellationToken,
    running: Vec<Running>,
}

impl Default for Services {
    fn default() -> Self {
        Self::new()
    }
}

impl Services {
    pub fn new() -> Self {
        Self {
            shutdown: CancellationToken::new(),
            running: Vec::new(),
        }
    }

    /// Starts the service `name`: `run` is given the token that stops it.
    pub fn start<F, E>(&mut self, name: &'static str, run: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.start_with_readiness(name, None, run);
    }

    /// Starts `participant` with `config` ([`participant_sdk::run`]).
    pub fn start_participant(&mut self, participant: Participant, config: ParticipantConfig) {
        let (name, readiness) = (participant.name(), participant.readiness());
        self.start_with_readiness(name, Some(readiness), |stop| {
            participant_sdk::run(participant, config, stop)
        });
    }

    fn start_with_readiness<F, E>(
        &mut self,
        name: &'static str,
        readiness: Option<Readiness>,
        run: impl FnOnce(CancellationToken) -> F,
    ) where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let stop = self.shutdown.child_token();
        let service = run(stop.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = service.await {
                panic!("{name} failed: {e}");
            }
        });
        self.running.push(Running {
            name,
            stop,
            task,
            readiness,
        });
    }

    /// Whether `name` was started and not stopped (it may have ended by itself).
    pub fn contains(&self, name: &str) -> bool {
        self.running.iter().any(|s| s.name == name)
    }

    /// The services started and not stopped, by name.
    pub fn names(&self) -> Vec<&'static str> {
        self.running.iter().map(|s| s.name).collect()
    }

    /// The services that ended by themselves (a crash).
    pub fn ended(&self) -> Vec<&'static str> {
        self.running
            .iter()
            .filter(|s| s.task.is_finished())
            .map(|s| s.name)
            .collect()
    }

    /// The participants started, each with how to tell that it is ready.
    pub fn readiness(&self) -> impl Iterator<Item = (&'static str, Readiness)> + '_ {
        self.running
            .iter()
            .filter_map(|s| Some((s.name, s.readiness?)))
    }

    /// Waits (30 s at most) until the service `name` ends by itself (a crash) and returns why.
    ///
    /// # Panics
    /// When it is not running or does not end.
    pub async fn wait_for_exit(&mut self, name: &str) -> String {
        let Running { task, .. } = self.remove(name);
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(())) => "stopped cleanly".into(),
            Ok(Err(e)) if e.is_panic() => e
                .into_panic()
                .downcast::<String>()
                .map(|m| *m)
                .unwrap_or_else(|_| "panicked".into()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => panic!("{name} did not end within 30 s"),
        }
    }

    /// Stops the service `name` gracefully and waits (30 s at most) for it.
    ///
    /// # Panics
    /// When it is not running, does not stop, or failed.
    pub async fn stop(&mut self, name: &str) {
        let Running { stop, task, .. } = self.remove(name);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the service stops within 30 s")
            .expect("service task");
    }

    /// Stops every service gracefully and waits (30 s at most each) for them.
    ///
    /// # Panics
    /// When one does not stop, or failed.
    pub async fn stop_all(&mut self) {
        self.shutdown.cancel();
        for Running { task, .. } in self.running.drain(..) {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("services stop within 30 s")
                .expect("service task");
        }
    }

    fn remove(&mut self, name: &str) -> Running {
        let index = self
            .running
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        self.running.remove(index)
    }
}

impl Drop for Services {
    /// A test that failed before stopping its services stops them now.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
