//! The one supervisor of a service's long-running tasks (the pipeline, the HTTP servers, the
//! deadline scanner, the retention sweeps...), used by the orchestrator and every participant.
//!
//! Every task runs until the shutdown token is cancelled. The first task that fails (returns
//! an error, panics, or ends on its own before shutdown) stops the whole service: the token is
//! cancelled, so the others finish their in-flight work and end, and [`Supervisor::wait`]
//! returns that first task's error, unchanged, once all of them have ended. A stop signal
//! (SIGTERM, Ctrl-C: [`crate::shutdown::on_signals`]) cancels the same token, so in-flight work
//! is finished the same way; the binaries bound the wait with [`crate::shutdown::bounded`].

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::error::Chain;

/// Named tasks that live and die together (see the module header).
pub struct Supervisor<E> {
    tasks: JoinSet<Result<(), E>>,
    names: HashMap<Id, &'static str>,
    shutdown: CancellationToken,
}

impl<E> Supervisor<E>
where
    E: std::error::Error + From<crate::Error> + Send + 'static,
{
    /// A supervisor whose tasks stop when `shutdown` is cancelled, and which cancels it when
    /// one of them fails.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            shutdown,
        }
    }

    /// The token every task watches.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Runs `task` as `name`. It must run until the shutdown token is cancelled: an error, a
    /// panic or an end before that stops the service.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Runs `task`, which cannot fail, as `name` (a sweep, a feed, a sampler): it may only end
    /// once the shutdown token is cancelled.
    pub fn spawn_infallible<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, async move {
            task.await;
            Ok(())
        });
    }

    /// Waits until every task has ended. Returns the first failure (the error of the task
    /// that failed first, [`crate::Error::TaskFailed`] for a panic,
    /// [`crate::Error::TaskStopped`] for a task that ended before shutdown); later failures,
    /// which the first one's shutdown often causes, are logged.
    ///
    /// # Errors
    /// The first failure, as above.
    pub async fn wait(mut self) -> Result<(), E> {
        let mut first: Option<E> = None;
        while let Some(joined) = self.tasks.join_next_with_id().await {
            let (id, failure) = match joined {
                Ok((id, Ok(()))) if self.shutdown.is_cancelled() => (id, None),
                Ok((id, Ok(()))) => {
                    let task = self.name(id);
                    (id, Some(E::from(crate::Error::TaskStopped { task })))
                }
                Ok((id, Err(e))) => (id, Some(e)),
                Err(source) => {
                    let id = source.id();
                    let task = self.name(id);
                    (id, Some(E::from(crate::Error::TaskFailed { task, source })))
                }
            };
            let task = self.name(id);
            let Some(failure) = failure else { continue };
            if first.is_none() {
                tracing::error!(task, error.message = %Chain(&failure), "stopping the service");
                self.shutdown.cancel();
                first = Some(failure);
            } else {
                tracing::warn!(task, error.message = %Chain(&failure), "also failed while stopping");
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn name(&self, id: Id) -> &'static str {
        self.names.get(&id).copied().unwrap_or("a task")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::Error;

    /// A task that runs until shutdown, then notes that it finished its work.
    fn until_shutdown(
        shutdown: &CancellationToken,
        finished: &Arc<AtomicBool>,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let shutdown = shutdown.clone();
        let finished = Arc::clone(finished);
        async move {
            shutdown.cancelled().await;
            // In-flight work gets its grace.
            tokio::time::sleep(Duration::from_millis(20)).await;
            finished.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_first_failure_stops_the_others_which_finish_their_work() {
        let shutdown = CancellationToken::new();
        let mut supervisor = Supervisor::<Error>::new(shutdown.clone());
        let finished = Arc::new(AtomicBool::new(false));
        supervisor.spawn("server", until_shutdown(&shutdown, &finished));
        supervisor.spawn("pipeline", async { Err(Error::InjectedCrash) });
        let ended = tokio::time::timeout(Duration::from_secs(5), supervisor.wait())
            .await
            .expect("ends");
        assert!(matches!(ended, Err(Error::InjectedCrash)), "{ended:?}");
        assert!(shutdown.is_cancelled());
        assert!(finished.load(Ordering::SeqCst), "the server finished first");
    }

    #[tokio::test]
    async fn a_panic_or_an_early_end_stops_the_service_naming_the_task() {
        for (name, task) in [
            (
                "deadline scanner",
                Box::pin(async { panic!("boom") })
                    as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
            ),
            ("watch feed", Box::pin(async {})),
        ] {
            let shutdown = CancellationToken::new();
            let mut supervisor = Supervisor::<Error>::new(shutdown.clone());
            let finished = Arc::new(AtomicBool::new(false));
            supervisor.spawn("server", until_shutdown(&shutdown, &finished));
            supervisor.spawn_infallible(name, task);
            let ended = supervisor.wait().await.expect_err("stopped");
            let text = crate::chain(&ended);
            match ended {
                Error::TaskFailed { task, .. } => {
                    assert_eq!(task, name);
                    assert!(
                        text.contains("deadline scanner failed: ") && text.contains("boom"),
                        "{text}"
                    );
                }
                Error::TaskStopped { task } => {
                    assert_eq!(task, name);
                    assert_eq!(text, "watch feed stopped on its own");
                }
                other => panic!("{other:?}"),
            }
            assert!(finished.load(Ordering::SeqCst));
        }
    }

    #[tokio::test]
    async fn a_stop_signal_ends_every_task_cleanly() {
        let shutdown = CancellationToken::new();
        let mut supervisor = Supervisor::<Error>::new(shutdown.clone());
        let finished = Arc::new(AtomicBool::new(false));
        supervisor.spawn("server", until_shutdown(&shutdown, &finished));
        let stop = shutdown.clone();
        supervisor.spawn_infallible("sweep", async move { stop.cancelled().await });
        shutdown.cancel();
        supervisor.wait().await.expect("a clean stop");
        assert!(finished.load(Ordering::SeqCst));
    }
}
