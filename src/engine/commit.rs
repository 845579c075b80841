//! The commit thread: every durable change goes through it, in order.
//!
//! Connections send operations over a bounded queue. The thread takes
//! whatever has queued up (group commit), applies it as one batch, syncs
//! it to disk once, then publishes the new head, wakes delivery, and
//! answers each operation. A publish is therefore answered only once it
//! is durable, and one sync serves every publisher that was waiting, so
//! durability costs latency, not throughput. A retention trim runs as a
//! batch of its own, so it never removes what a running replay reads.
//!
//! How much a batch takes depends on who is sending. Jobs of several
//! tasks (connections) are gathered while they keep coming: each sync
//! then serves as many as it can. Jobs of one task are committed as they
//! are, and that task hands the CPU over every [`YIELD_EVERY`] jobs: a
//! client pipelining a long burst gets the answers to its first part
//! while the server reads the rest, and can send more meanwhile, instead
//! of waiting out the sync of its whole burst at once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ensync_protocol::field::ClientId;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task;
use tracing::{debug, error, info};

use super::delivery::Attached;
use super::now_ms;
use super::retention::Pins;
use super::subs::Registry;
use crate::config::{
    COMMIT_BYTES_IN_FLIGHT, COMMIT_QUEUE, MAX_COMMIT_BATCH, MAX_COMMIT_BATCH_BYTES,
};
use crate::store::{Applied, EventLog, WriteOp};

/// What an operation comes back with: its result, or why the store failed.
pub type Committed = Result<Applied, String>;

struct Job {
    op: WriteOp,
    done: oneshot::Sender<Committed>,
    /// This job's share of `COMMIT_BYTES_IN_FLIGHT`, given back once it is
    /// committed.
    budget: OwnedSemaphorePermit,
    /// The task that submitted it (`None` outside a task).
    submitter: Option<task::Id>,
}

/// A submitting thread yields the CPU after every this many jobs (all
/// submitters together), so that the commit thread, when it shares a
/// core with them, takes what has queued and syncs it while they go on.
/// Without it, the commit thread, woken when its sync ended, often got
/// the core back only once the connections had nothing left to read, and
/// a single connection's burst went into one commit either way. A
/// commit's sync can cost the core as much as 30 publishes do, so the
/// yields come every 512 jobs: every 256 made more, smaller commits
/// (bench/RUNS.md, "Run 48, and fewer yields to the commit thread").
const YIELD_EVERY: usize = 512;

/// The handle connections commit through.
pub struct Committer {
    /// `None` asks the thread to stop once what came before is committed.
    queue: mpsc::Sender<Option<Job>>,
    /// Jobs submitted so far, for [`YIELD_EVERY`].
    submitted: AtomicUsize,
    head: watch::Receiver<u64>,
    budget: Arc<Semaphore>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// The commit thread has stopped (server shutting down or store failed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the server is shutting down")]
pub struct Stopped;

impl Committer {
    /// Starts the commit thread over `store`. After each commit it wakes
    /// the `attached` clients the commit concerns.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start(
        store: Arc<dyn EventLog>,
        registry: Arc<Registry>,
        attached: Arc<Attached>,
        pins: Arc<Pins>,
    ) -> std::io::Result<Self> {
        let (queue, jobs) = mpsc::channel(COMMIT_QUEUE);
        let (head_tx, head) = watch::channel(store.last_seq());
        let signals = Signals {
            head: head_tx,
            attached,
        };
        let thread = std::thread::Builder::new()
            .name("ensync-commit".into())
            .spawn(move || run(store.as_ref(), jobs, &signals, &registry, &pins))?;
        Ok(Self {
            queue,
            submitted: AtomicUsize::new(0),
            head,
            budget: Arc::new(Semaphore::new(COMMIT_BYTES_IN_FLIGHT)),
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Queues `op`; the receiver resolves once it is durable.
    ///
    /// # Errors
    /// [`Stopped`] when the commit thread is gone.
    pub async fn submit(&self, op: WriteOp) -> Result<oneshot::Receiver<Committed>, Stopped> {
        let budget = Arc::clone(&self.budget)
            .acquire_many_owned(permits(&op))
            .await
            .map_err(|_| Stopped)?;
        let (done, rx) = oneshot::channel();
        self.queue
            .send(Some(Job::new(op, done, budget)))
            .await
            .map_err(|_| Stopped)?;
        if self.submitted.fetch_add(1, Ordering::Relaxed) % YIELD_EVERY == YIELD_EVERY - 1 {
            // The operating system's yield, not tokio's: it is the commit
            // thread that should run, not another task of this one.
            std::thread::yield_now();
        }
        Ok(rx)
    }

    /// Queues `op` if there is room right now, without waiting for it:
    /// for changes nobody waits on. Says whether it was queued.
    pub fn try_submit(&self, op: WriteOp) -> bool {
        let Ok(budget) = Arc::clone(&self.budget).try_acquire_many_owned(permits(&op)) else {
            return false;
        };
        let (done, _) = oneshot::channel();
        self.queue
            .try_send(Some(Job::new(op, done, budget)))
            .is_ok()
    }

    /// The last durable sequence number: what a replay's snapshot covers.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
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

impl Job {
    fn new(op: WriteOp, done: oneshot::Sender<Committed>, budget: OwnedSemaphorePermit) -> Self {
        Self {
            op,
            done,
            budget,
            submitter: task::try_id(),
        }
    }
}

/// The share of `COMMIT_BYTES_IN_FLIGHT` an operation holds while it waits.
fn permits(op: &WriteOp) -> u32 {
    let weight = op.weight().min(COMMIT_BYTES_IN_FLIGHT);
    u32::try_from(weight).expect("the budget fits in u32")
}

/// What the commit thread tells the rest of the server.
struct Signals {
    head: watch::Sender<u64>,
    /// The clients to wake after a commit that concerns them.
    attached: Arc<Attached>,
}

fn run(
    store: &dyn EventLog,
    mut jobs: mpsc::Receiver<Option<Job>>,
    signals: &Signals,
    registry: &Registry,
    pins: &Pins,
) {
    let mut ops = Vec::with_capacity(MAX_COMMIT_BATCH);
    let mut waiters = Vec::with_capacity(MAX_COMMIT_BATCH);
    let mut concerned = HashSet::new();
    // A job taken from the queue that must start the next batch.
    let mut carried: Option<Job> = None;
    let mut stopping = false;
    while !stopping {
        let first = match carried.take() {
            Some(job) => job,
            None => match jobs.blocking_recv().flatten() {
                Some(job) => job,
                None => break,
            },
        };
        // The budget permit already holds each job's weight. The batch's
        // permits are merged and given back at once, after its answers:
        // one lock of the semaphore, not one per job.
        let mut budget = first.budget;
        let submitter = first.submitter;
        // Whether the batch holds jobs of more than one task.
        let mut shared = false;
        let alone = first.op.runs_alone();
        ops.push(first.op);
        waiters.push(first.done);
        // Jobs taken since the last yield: while several connections keep
        // adding, give them the CPU once more before committing. Woken by
        // the first job, this thread would otherwise preempt them
        // mid-burst and commit (and sync) a few jobs at a time. One
        // connection's jobs are committed as they are (see the module's
        // docs).
        let mut taken_since_yield = 0;
        while !alone
            && ops.len() < MAX_COMMIT_BATCH
            && budget.num_permits() < MAX_COMMIT_BATCH_BYTES
        {
            match jobs.try_recv() {
                Ok(Some(job)) if job.op.runs_alone() => {
                    carried = Some(job);
                    break;
                }
                Ok(Some(job)) => {
                    shared |= job.submitter != submitter;
                    budget.merge(job.budget);
                    ops.push(job.op);
                    waiters.push(job.done);
                    taken_since_yield += 1;
                }
                Ok(None) => {
                    stopping = true;
                    break;
                }
                Err(_) if taken_since_yield > 0 && shared => {
                    taken_since_yield = 0;
                    std::thread::yield_now();
                }
                Err(_) => break,
            }
        }
        // A commit is durable once applied; a trim once flushed, which
        // also removes the segments it emptied.
        let result = if alone {
            trim(store, &mut ops, pins).and_then(|applied| store.flush().map(|()| applied))
        } else {
            store.apply(&ops, now_ms())
        };
        match result {
            Ok(applied) => {
                let mut last = None;
                for (op, item) in ops.iter().zip(&applied) {
                    share(op, item, registry, &mut concerned);
                    if let Applied::Published(event) = item {
                        last = Some(event.seq);
                    }
                }
                if let Some(last) = last {
                    signals.head.send_replace(last);
                }
                let published =
                    ops.iter()
                        .zip(&applied)
                        .filter_map(|(op, item)| match (op, item) {
                            (WriteOp::Publish(event), Applied::Published(_)) => {
                                Some(event.name.as_str())
                            }
                            _ => None,
                        });
                registry.subscribers_of(published, &mut concerned);
                signals.attached.wake(&concerned);
                concerned.clear();
                for (done, item) in waiters.drain(..).zip(applied) {
                    let _ = done.send(Ok(item));
                }
            }
            Err(e) => {
                error!(error = %e, "commit failed; its operations are answered with an error");
                for done in waiters.drain(..) {
                    let _ = done.send(Err(e.to_string()));
                }
            }
        }
        drop(budget);
        ops.clear();
    }
    match store.flush() {
        Ok(()) => info!("commit thread stopped, store flushed"),
        Err(e) => error!(error = %e, "final flush failed"),
    }
}

/// Applies a trim step, keeping what running replays read.
fn trim(
    store: &dyn EventLog,
    ops: &mut [WriteOp],
    pins: &Pins,
) -> crate::store::Result<Vec<Applied>> {
    let [WriteOp::Trim(step)] = ops else {
        return Err(crate::store::StoreError::Backend(
            "a trim must be applied on its own".into(),
        ));
    };
    // Holding the pins while the trim applies: a replay that starts now
    // waits, then resolves its start in the trimmed log.
    let held = pins.hold();
    step.keep_from = step.keep_from.min(held.lowest());
    let applied = store.apply(ops, now_ms())?;
    drop(held);
    if let [Applied::Trimmed(done)] = applied.as_slice() {
        if done.events > 0 {
            debug!(
                events = done.events,
                bytes = done.bytes,
                "retention removed old events"
            );
        }
    }
    Ok(applied)
}

/// Makes a committed change visible to the in-memory views; a client
/// whose subscriptions changed goes in `concerned`.
fn share(op: &WriteOp, applied: &Applied, registry: &Registry, concerned: &mut HashSet<ClientId>) {
    match (op, applied) {
        (_, Applied::Subscribed(sub) | Applied::PausedSet(Ok(sub))) => {
            registry.put(sub.clone());
            concerned.insert(sub.client.clone());
        }
        (_, Applied::Unsubscribed(Some(sub))) => {
            registry.remove(&sub.client, &sub.pattern);
            concerned.insert(sub.client.clone());
        }
        (
            WriteOp::Settle { client, floors, .. } | WriteOp::SetFloors { client, floors },
            Applied::Stored,
        ) if !floors.is_empty() => registry.raise_floors(client, floors),
        _ => {}
    }
}
