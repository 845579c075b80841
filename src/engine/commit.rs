//! The commit thread: every durable change goes through it, in order.
//!
//! Connections send operations over a bounded queue. The thread takes
//! whatever has queued up (group commit), applies it as one batch, syncs
//! it to disk once, then publishes the new head, hands the batch to live
//! delivery, and answers each operation. A publish is therefore answered
//! only once it is durable, and one sync serves every publisher that was
//! waiting, so durability costs latency, not throughput.

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{broadcast, mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{error, info};

use super::subs::Registry;
use crate::config::{
    COMMIT_BYTES_IN_FLIGHT, COMMIT_QUEUE, LIVE_BATCHES, MAX_COMMIT_BATCH, MAX_COMMIT_BATCH_BYTES,
};
use crate::store::{Appended, Applied, EventLog, WriteOp};

/// What an operation comes back with: its result, or why the store failed.
pub type Committed = Result<Applied, String>;

/// Committed events, as live delivery sees them.
pub type LiveBatch = Arc<[Appended]>;

struct Job {
    op: WriteOp,
    done: oneshot::Sender<Committed>,
    /// This job's share of `COMMIT_BYTES_IN_FLIGHT`, given back once it is
    /// committed.
    budget: OwnedSemaphorePermit,
}

/// The handle connections commit through.
pub struct Committer {
    /// `None` asks the thread to stop once what came before is committed.
    queue: mpsc::Sender<Option<Job>>,
    head: watch::Receiver<u64>,
    live: broadcast::Sender<LiveBatch>,
    budget: Arc<Semaphore>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// The commit thread has stopped (server shutting down or store failed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the server is shutting down")]
pub struct Stopped;

impl Committer {
    /// Starts the commit thread over `store`.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start(store: Arc<dyn EventLog>, registry: Arc<Registry>) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::channel(COMMIT_QUEUE);
        let (head_tx, head) = watch::channel(store.last_seq());
        let (live, _) = broadcast::channel(LIVE_BATCHES);
        let live_tx = live.clone();
        let thread = std::thread::Builder::new()
            .name("ensync-commit".into())
            .spawn(move || run(store.as_ref(), jobs, &head_tx, &live_tx, &registry))?;
        Ok(Self {
            queue,
            head,
            live,
            budget: Arc::new(Semaphore::new(COMMIT_BYTES_IN_FLIGHT)),
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Queues `op`; the receiver resolves once it is durable.
    ///
    /// # Errors
    /// [`Stopped`] when the commit thread is gone.
    pub async fn submit(&self, op: WriteOp) -> Result<oneshot::Receiver<Committed>, Stopped> {
        let weight = op.weight().min(COMMIT_BYTES_IN_FLIGHT);
        let weight = u32::try_from(weight).expect("the budget fits in u32");
        let budget = Arc::clone(&self.budget)
            .acquire_many_owned(weight)
            .await
            .map_err(|_| Stopped)?;
        let (done, rx) = oneshot::channel();
        self.queue
            .send(Some(Job { op, done, budget }))
            .await
            .map_err(|_| Stopped)?;
        Ok(rx)
    }

    /// The last durable sequence number: what a replay's snapshot covers.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Committed batches from now on.
    pub fn follow(&self) -> broadcast::Receiver<LiveBatch> {
        self.live.subscribe()
    }

    /// Commits what is queued, stops the thread and waits for its final
    /// flush. Later submissions fail with [`Stopped`].
    pub async fn stop(&self) {
        let _ = self.queue.send(None).await;
        let thread = self.thread.lock().map(|mut t| t.take()).unwrap_or_default();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn run(
    store: &dyn EventLog,
    mut jobs: mpsc::Receiver<Option<Job>>,
    head: &watch::Sender<u64>,
    live: &broadcast::Sender<LiveBatch>,
    registry: &Registry,
) {
    let mut ops = Vec::with_capacity(MAX_COMMIT_BATCH);
    let mut waiters = Vec::with_capacity(MAX_COMMIT_BATCH);
    let mut stopping = false;
    while !stopping {
        let Some(first) = jobs.blocking_recv().flatten() else {
            break;
        };
        // The budget permit already holds each job's weight.
        let mut bytes = first.budget.num_permits();
        ops.push(first.op);
        waiters.push((first.done, first.budget));
        while ops.len() < MAX_COMMIT_BATCH && bytes < MAX_COMMIT_BATCH_BYTES {
            match jobs.try_recv() {
                Ok(Some(job)) => {
                    bytes += job.budget.num_permits();
                    ops.push(job.op);
                    waiters.push((job.done, job.budget));
                }
                Ok(None) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let result = store
            .apply(&ops, now_ms())
            .and_then(|applied| store.flush().map(|()| applied));
        ops.clear();
        match result {
            Ok(applied) => {
                let mut events = Vec::new();
                for item in &applied {
                    match item {
                        Applied::Published(event) => events.push(event.clone()),
                        Applied::Subscribed(sub) => registry.add(sub.clone()),
                    }
                }
                if let Some(last) = events.last() {
                    head.send_replace(last.seq);
                    if live.receiver_count() > 0 {
                        let _ = live.send(events.into());
                    }
                }
                for ((done, _budget), item) in waiters.drain(..).zip(applied) {
                    let _ = done.send(Ok(item));
                }
            }
            Err(e) => {
                error!(error = %e, "commit failed; its operations are answered with an error");
                for (done, _budget) in waiters.drain(..) {
                    let _ = done.send(Err(e.to_string()));
                }
            }
        }
    }
    match store.flush() {
        Ok(()) => info!("commit thread stopped, store flushed"),
        Err(e) => error!(error = %e, "final flush failed"),
    }
}
