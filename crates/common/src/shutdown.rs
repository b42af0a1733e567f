//! The shutdown supervisor: named tasks share one cancellation token; SIGINT/SIGTERM or
//! any task failing cancels it; the rest then have a drain deadline to flush, wait for
//! acknowledgements and commit, after which they are aborted.
//!
//! Exit codes: 0 stopped by signal or a task finished, 1 a task failed,
//! 2 bad configuration or start-up failure (set by the binaries), 3 drain deadline passed.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

/// Why the supervisor stopped.
#[derive(Debug)]
pub enum Exit {
    /// A task returned on its own before any stop was asked; the rest were drained.
    Completed,
    /// The stop future (a signal) fired, and every task drained in time.
    Stopped,
    /// `task` failed and the rest drained in time.
    TaskFailed { task: String, error: String },
    /// Tasks still running at the drain deadline, aborted.
    DrainTimeout { pending: Vec<String> },
}

pub const EXIT_OK: i32 = 0;
pub const EXIT_TASK_FAILED: i32 = 1;
pub const EXIT_CONFIG: i32 = 2;
pub const EXIT_DRAIN_TIMEOUT: i32 = 3;

impl Exit {
    pub fn code(&self) -> i32 {
        match self {
            Exit::Completed | Exit::Stopped => EXIT_OK,
            Exit::TaskFailed { .. } => EXIT_TASK_FAILED,
            Exit::DrainTimeout { .. } => EXIT_DRAIN_TIMEOUT,
        }
    }
}

pub struct Supervisor {
    token: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
    names: HashMap<Id, String>,
    drain: Duration,
}

impl Supervisor {
    pub fn new(drain: Duration) -> Self {
        Self::with_token(CancellationToken::new(), drain)
    }

    /// A supervisor whose tasks stop when `token` (e.g. a parent's) is cancelled.
    pub fn with_token(token: CancellationToken, drain: Duration) -> Self {
        Self {
            token,
            tasks: JoinSet::new(),
            names: HashMap::new(),
            drain,
        }
    }

    /// The token every task must watch; cancelled when shutdown begins.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    pub fn spawn<F>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name.into());
    }

    fn name(&mut self, id: Id) -> String {
        self.names
            .remove(&id)
            .unwrap_or_else(|| format!("task {id}"))
    }

    /// Runs until `stop` resolves, the token is cancelled, or a task fails; then drains.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Exit {
        let mut stop = std::pin::pin!(stop);
        let outcome = tokio::select! {
            _ = &mut stop => {
                tracing::info!("shutdown requested");
                Exit::Stopped
            }
            _ = self.token.cancelled() => Exit::Stopped,
            next = self.tasks.join_next_with_id() => match next {
                None => return Exit::Completed,
                Some(Ok((id, Ok(())))) => {
                    // Services run until told to stop; one that returns early ends the run.
                    let task = self.name(id);
                    tracing::info!(%task, "task finished, stopping the rest");
                    Exit::Completed
                }
                Some(Ok((id, Err(e)))) => {
                    let task = self.name(id);
                    tracing::error!(%task, error = format!("{e:#}"), "task failed, stopping the service");
                    Exit::TaskFailed { task, error: format!("{e:#}") }
                }
                Some(Err(join)) => {
                    let task = self.name(join.id());
                    tracing::error!(%task, error = %join, "task panicked, stopping the service");
                    Exit::TaskFailed { task, error: join.to_string() }
                }
            }
        };
        self.token.cancel();
        self.drain(outcome).await
    }

    async fn drain(mut self, outcome: Exit) -> Exit {
        let deadline = tokio::time::sleep(self.drain);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => {
                    let mut pending: Vec<String> = self.names.values().cloned().collect();
                    pending.sort();
                    tracing::error!(?pending, drain = ?self.drain, "drain deadline passed, aborting");
                    self.tasks.abort_all();
                    return Exit::DrainTimeout { pending };
                }
                next = self.tasks.join_next_with_id() => match next {
                    None => return outcome,
                    Some(Ok((id, result))) => {
                        let task = self.name(id);
                        match result {
                            Ok(()) => tracing::debug!(%task, "task drained"),
                            Err(e) => tracing::warn!(%task, error = format!("{e:#}"), "task failed while draining"),
                        }
                    }
                    Some(Err(join)) => {
                        let task = self.name(join.id());
                        tracing::warn!(%task, error = %join, "task panicked while draining");
                    }
                }
            }
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::time::Instant;

    /// A task that waits for cancellation, then takes `cleanup` to finish.
    async fn polite(
        token: CancellationToken,
        drained: Arc<AtomicUsize>,
        cleanup: Duration,
    ) -> anyhow::Result<()> {
        token.cancelled().await;
        tokio::time::sleep(cleanup).await;
        drained.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_task_stops_all_others() {
        let mut sup = Supervisor::new(Duration::from_secs(5));
        let drained = Arc::new(AtomicUsize::new(0));
        for name in ["consumer", "admin"] {
            sup.spawn(
                name,
                polite(sup.token(), drained.clone(), Duration::from_millis(100)),
            );
        }
        sup.spawn("producer", async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            anyhow::bail!("broker gone")
        });
        let started = Instant::now();
        let exit = sup.run(std::future::pending()).await;
        match &exit {
            Exit::TaskFailed { task, error } => {
                assert_eq!(task, "producer");
                assert!(error.contains("broker gone"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(exit.code(), EXIT_TASK_FAILED);
        assert_eq!(drained.load(Ordering::SeqCst), 2, "both others drained");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_drains_and_exits_zero() {
        let mut sup = Supervisor::new(Duration::from_secs(5));
        let drained = Arc::new(AtomicUsize::new(0));
        sup.spawn(
            "a",
            polite(sup.token(), drained.clone(), Duration::from_millis(300)),
        );
        sup.spawn(
            "b",
            polite(sup.token(), drained.clone(), Duration::from_millis(10)),
        );
        let exit = sup.run(tokio::time::sleep(Duration::from_secs(1))).await;
        assert!(matches!(exit, Exit::Stopped), "{exit:?}");
        assert_eq!(exit.code(), EXIT_OK);
        assert_eq!(drained.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_task_is_aborted_at_the_drain_deadline() {
        let drain = Duration::from_millis(500);
        let mut sup = Supervisor::new(drain);
        let drained = Arc::new(AtomicUsize::new(0));
        sup.spawn(
            "quick",
            polite(sup.token(), drained.clone(), Duration::ZERO),
        );
        sup.spawn("stuck", async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let started = Instant::now();
        let exit = sup.run(async {}).await;
        let elapsed = started.elapsed();
        match &exit {
            Exit::DrainTimeout { pending } => assert_eq!(pending, &vec!["stuck".to_string()]),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(exit.code(), EXIT_DRAIN_TIMEOUT);
        assert!(
            elapsed >= drain && elapsed < drain + Duration::from_millis(50),
            "{elapsed:?}"
        );
        assert_eq!(drained.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_that_finish_on_their_own_complete_the_run() {
        let mut sup = Supervisor::new(Duration::from_secs(1));
        sup.spawn("one-shot", async { Ok(()) });
        let exit = sup.run(std::future::pending()).await;
        assert!(matches!(exit, Exit::Completed), "{exit:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_counts_as_failure() {
        let mut sup = Supervisor::new(Duration::from_secs(1));
        sup.spawn("boom", async { panic!("bug") });
        let exit = sup.run(std::future::pending()).await;
        assert!(
            matches!(&exit, Exit::TaskFailed { task, .. } if task == "boom"),
            "{exit:?}"
        );
    }
}
