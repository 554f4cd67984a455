//! The one shutdown of a running server: a signal every long-lived task awaits, and the set of
//! tasks it owns.
//!
//! [`Shutdown`] pairs a [`CancellationToken`] (cancelled once, when a graceful shutdown starts:
//! see [`crate::RunningServer::shutdown`]) with a [`TaskTracker`]: every task of a running server
//! is spawned through [`Shutdown::spawn`], selects on [`Shutdown::stopped`] (or ends with the
//! stream it serves) and is awaited by [`Shutdown::wait`], so no task outlives the server.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The shutdown signal and the tasks that must end before a server has stopped. Cheap to clone:
/// clones share the signal and the task set.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A signal not yet given, with no task.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `task` on the current runtime as one of the tasks [`Shutdown::wait`] awaits.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Gives the signal: a graceful shutdown starts. Idempotent.
    pub fn start(&self) {
        self.token.cancel();
    }

    /// Whether the signal has been given.
    pub fn is_started(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once a graceful shutdown has started (at once if it has).
    pub async fn stopped(&self) {
        self.token.cancelled().await;
    }

    /// [`Shutdown::stopped`] as a `'static` future, for APIs that take one by value.
    pub fn stopped_owned(&self) -> impl Future<Output = ()> + Send + 'static {
        self.token.clone().cancelled_owned()
    }

    /// Stops taking tasks and waits until every task spawned through [`Shutdown::spawn`] has
    /// ended (those spawned after this call started are awaited too).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}
