//! The one thread that forks task processes.
//!
//! Linux ties the parent-death signal to the *thread* that forked the child,
//! not to the process: a child spawned from a tokio blocking-pool thread would
//! be killed when that thread retires. So every task is spawned here, on a
//! thread that never ends before the daemon does.

use std::io;
use std::sync::mpsc;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

type SpawnRequest = (Command, oneshot::Sender<io::Result<Child>>);

/// A handle to the spawning thread; cheap to clone.
#[derive(Clone)]
pub struct Spawner {
    requests: mpsc::Sender<SpawnRequest>,
}

impl Spawner {
    /// Starts the thread. Call from inside the tokio runtime whose reactor
    /// will wait for the children.
    pub fn start() -> io::Result<Spawner> {
        let runtime = tokio::runtime::Handle::current();
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("taskrunner-spawner".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
                // Every handle is gone, but children spawned here may still
                // run: this thread must outlive them, or they get SIGKILL.
                loop {
                    std::thread::park();
                }
            })?;
        Ok(Spawner { requests })
    }

    /// Spawns `command` on the spawner thread.
    pub async fn spawn(&self, command: Command) -> io::Result<Child> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((command, reply))
            .map_err(|_| io::Error::other("the spawner thread is gone"))?;
        answer
            .await
            .map_err(|_| io::Error::other("the spawner thread dropped a request"))?
    }
}
