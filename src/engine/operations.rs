//! Operator replays: a time slice of the log re-delivered to the current
//! subscribers, run in the background and tracked as an async operation.
//!
//! An operation walks its slice in steps. Each step finds, for every
//! event, the clients whose subscriptions cover it and to whom it is
//! addressed, and stores those deliveries in the clients' replay queues
//! together with the operation's progress, in one commit. A restart
//! therefore resumes exactly where the last step ended, and a delivery,
//! once queued, reaches its client whenever it is connected, until the
//! client settles it.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, MutexGuard};

use ensync_protocol::field::{ClientId, Pattern};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::retention::Pin;
use super::{now_ms, Engine};
use crate::store::{
    Applied, EventLog, Queued, Resolved, Settlement, Side, StoreError, Subscription, WriteOp,
};

/// Events of the slice one step handles at most.
const STEP_EVENTS: usize = 1024;
/// Deliveries one step queues at most.
const STEP_DELIVERIES: usize = 8192;
/// Finished operations kept for GET; older ones are forgotten.
const KEEP_FINISHED: usize = 1000;
/// The only task an operation runs.
const TASK_TYPE: &str = "Replay";

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OpState {
    /// Still queueing deliveries.
    Running,
    /// Every event of the slice was handled.
    Succeeded,
    /// Stopped by an error (see `error`).
    Failed,
    /// Stopped by DELETE.
    Cancelled,
}

impl OpState {
    /// The status as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Running => "RUNNING",
            OpState::Succeeded => "SUCCEEDED",
            OpState::Failed => "FAILED",
            OpState::Cancelled => "CANCELLED",
        }
    }
}

/// An operation as `GET /asyncOperations/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    /// `op_<n>`.
    pub id: String,
    /// Where it is.
    pub status: OpState,
    /// Always `Replay`.
    pub task_type: String,
    /// The pattern replayed.
    pub event_name: String,
    /// Only this client's subscriptions, when given.
    pub client_id: Option<String>,
    /// Whether events the subscriber acknowledged were left out.
    pub only_unacked: bool,
    /// The slice's start as asked (ms), if given.
    pub start_timestamp: Option<u64>,
    /// The slice's end as asked (ms), if given.
    pub end_timestamp: Option<u64>,
    /// The pace asked for, in events of the slice per second; `None` runs
    /// as fast as the store allows.
    #[serde(default)]
    pub events_per_second: Option<u32>,
    /// Events in the slice.
    pub total: u64,
    /// Events handled so far.
    pub processed: u64,
    /// Deliveries queued so far (event × subscriber).
    pub deliveries: u64,
    /// When it was asked for (ms).
    pub created_at: u64,
    /// When it last changed (ms).
    pub updated_at: u64,
    /// Why it failed.
    pub error: Option<String>,
}

/// An operation as stored: its status and where its walk is.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    status: OperationStatus,
    /// The slice, as sequence numbers (`first > last` for an empty one).
    first: u64,
    last: u64,
    /// Every event up to here has been handled.
    cursor: u64,
    /// Whether `total` is known.
    counted: bool,
}

/// A validated `POST /replays`.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// Which events.
    pub pattern: Pattern,
    /// From when (ms, inclusive); the oldest event when `None`.
    pub start: Option<u64>,
    /// Until when (ms, inclusive); the head when `None`.
    pub end: Option<u64>,
    /// Only this client's subscriptions.
    pub client: Option<ClientId>,
    /// Leave out what the subscriber acknowledged.
    pub only_unacked: bool,
    /// Events of the slice per second at most.
    pub events_per_second: Option<u32>,
}

/// Why an operation request was refused.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// No such operation.
    #[error("there is no async operation {0}")]
    NotFound(String),
    /// DELETE of an operation that has finished.
    #[error("{} has already finished ({}); only a RUNNING operation can be cancelled", .0.id, .0.status.as_str())]
    Finished(Box<OperationStatus>),
    /// The request contradicts itself.
    #[error("{0}")]
    Invalid(String),
    /// The store failed or the server is stopping.
    #[error("{0}")]
    Internal(String),
}

/// Every operation, and the running ones' controls.
#[derive(Default)]
pub struct Operations {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    ops: BTreeMap<u64, Stored>,
    running: HashMap<u64, Running>,
    next: u64,
}

struct Running {
    cancel: CancellationToken,
    /// Turns true once the operation has stored its final state.
    done: watch::Receiver<bool>,
}

impl Operations {
    /// The operations stored in `store`.
    ///
    /// # Errors
    /// When the store fails or a record is damaged.
    pub fn load(store: &dyn EventLog) -> Result<Self, StoreError> {
        let mut table = Table::default();
        for (id, record) in store.operations()? {
            let stored: Stored = serde_json::from_slice(&record).map_err(|e| {
                StoreError::Damaged(format!("async operation {id} does not decode: {e}"))
            })?;
            table.ops.insert(id, stored);
            table.next = table.next.max(id);
        }
        Ok(Self {
            table: Mutex::new(table),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table
            .lock()
            .expect("operations lock is never poisoned")
    }

    /// How many operations are in each state.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        let table = self.lock();
        [
            OpState::Running,
            OpState::Succeeded,
            OpState::Failed,
            OpState::Cancelled,
        ]
        .into_iter()
        .map(|state| {
            let n = table
                .ops
                .values()
                .filter(|op| op.status.status == state)
                .count();
            (state.as_str(), n as u64)
        })
        .collect()
    }
}

fn op_id(n: u64) -> String {
    format!("op_{n}")
}

/// The number of an id written exactly as `op_id` writes it, so that
/// `op_01` or `op_+1` name no operation.
fn parse_op_id(id: &str) -> Option<u64> {
    let n = id.strip_prefix("op_")?.parse().ok()?;
    (op_id(n) == id).then_some(n)
}

fn encode(stored: &Stored) -> Vec<u8> {
    serde_json::to_vec(stored).unwrap_or_default()
}

impl Engine {
    /// Starts an operator replay. Answers once the operation is stored;
    /// the deliveries are queued in the background.
    ///
    /// # Errors
    /// `Invalid` for a slice that ends before it starts; `Internal` when
    /// the store fails.
    pub async fn start_replay(
        self: &Arc<Self>,
        req: ReplayRequest,
    ) -> Result<OperationStatus, OpError> {
        if let (Some(start), Some(end)) = (req.start, req.end) {
            if start > end {
                return Err(OpError::Invalid(format!(
                    "startTimestamp {start} is after endTimestamp {end}"
                )));
            }
        }
        // Pinned before the slice is resolved, so retention cannot remove
        // its start under it.
        let pin = self.pins.pin();
        let (first, last) = self.resolve_slice(&req).map_err(|e| internal_op(&e))?;
        let now = now_ms();
        let id = {
            let mut table = self.ops.lock();
            table.next += 1;
            table.next
        };
        let stored = Stored {
            status: OperationStatus {
                id: op_id(id),
                status: OpState::Running,
                task_type: TASK_TYPE.into(),
                event_name: req.pattern.to_string(),
                client_id: req.client.as_ref().map(ToString::to_string),
                only_unacked: req.only_unacked,
                start_timestamp: req.start,
                end_timestamp: req.end,
                events_per_second: req.events_per_second,
                total: 0,
                processed: 0,
                deliveries: 0,
                created_at: now,
                updated_at: now,
                error: None,
            },
            first,
            last,
            cursor: first.saturating_sub(1),
            counted: false,
        };
        self.store_op(id, &stored, Vec::new()).await?;
        let status = stored.status.clone();
        let forgotten = {
            let mut table = self.ops.lock();
            table.ops.insert(id, stored);
            forget_oldest(&mut table)
        };
        for old in forgotten {
            if let Err(e) = self.submit_op(old, None, Vec::new()).await {
                warn!(error = %e, "cannot forget an old async operation");
            }
        }
        info!(id = %status.id, pattern = %status.event_name, first, last, "operator replay started");
        self.spawn_operation(id, pin);
        Ok(status)
    }

    /// Resumes the operations a stop interrupted.
    pub fn resume_operations(self: &Arc<Self>) {
        let interrupted: Vec<(u64, u64)> = self
            .ops
            .lock()
            .ops
            .iter()
            .filter(|(_, op)| op.status.status == OpState::Running)
            .map(|(id, op)| (*id, op.cursor))
            .collect();
        for (id, cursor) in interrupted {
            info!(id = %op_id(id), cursor, "resuming an interrupted operator replay");
            let pin = self.pins.pin();
            self.spawn_operation(id, pin);
        }
    }

    /// One operation's status.
    pub fn operation(&self, id: &str) -> Option<OperationStatus> {
        let n = parse_op_id(id)?;
        self.ops.lock().ops.get(&n).map(|op| op.status.clone())
    }

    /// Every kept operation, newest first.
    pub fn operations(&self) -> Vec<OperationStatus> {
        self.ops
            .lock()
            .ops
            .values()
            .rev()
            .map(|op| op.status.clone())
            .collect()
    }

    /// Cancels a running operation; answers with its final status once it
    /// is stored. Deliveries it already queued stay queued.
    ///
    /// # Errors
    /// `NotFound`, or `Finished` for an operation that is not running.
    pub async fn cancel_operation(&self, id: &str) -> Result<OperationStatus, OpError> {
        let n = parse_op_id(id).ok_or_else(|| OpError::NotFound(id.to_owned()))?;
        let mut done = {
            let table = self.ops.lock();
            let op = table
                .ops
                .get(&n)
                .ok_or_else(|| OpError::NotFound(id.to_owned()))?;
            match table.running.get(&n) {
                Some(running) => {
                    running.cancel.cancel();
                    running.done.clone()
                }
                None => return Err(OpError::Finished(Box::new(op.status.clone()))),
            }
        };
        if done.wait_for(|done| *done).await.is_err() {
            return Err(OpError::Internal("the server is stopping".into()));
        }
        let status = self
            .operation(id)
            .ok_or_else(|| OpError::NotFound(id.to_owned()))?;
        match status.status {
            OpState::Cancelled => Ok(status),
            // It finished before the cancel took effect.
            _ => Err(OpError::Finished(Box::new(status))),
        }
    }

    /// The slice as sequence numbers.
    fn resolve_slice(&self, req: &ReplayRequest) -> Result<(u64, u64), StoreError> {
        use ensync_protocol::field::Position;
        let start = match req.start {
            Some(ms) => Position::Timestamp(ms),
            None => Position::Earliest,
        };
        let first = match self.store.resolve(&start, Side::Start)? {
            Ok(Resolved::Seq(seq)) => seq,
            _ => return Ok((1, 0)),
        };
        let last = match req.end {
            Some(ms) => match self.store.resolve(&Position::Timestamp(ms), Side::End)? {
                Ok(Resolved::Seq(seq)) => seq,
                _ => return Ok((1, 0)),
            },
            None => self.head(),
        };
        Ok((first, last))
    }

    fn spawn_operation(self: &Arc<Self>, id: u64, pin: Pin) {
        let cancel = CancellationToken::new();
        let (done_tx, done_rx) = watch::channel(false);
        self.ops.lock().running.insert(
            id,
            Running {
                cancel: cancel.clone(),
                done: done_rx,
            },
        );
        let engine = Arc::clone(self);
        self.tracker.spawn(async move {
            let outcome = tokio::select! {
                outcome = engine.walk(id, &cancel, pin) => outcome,
                () = engine.stopping.cancelled() => {
                    // Stays RUNNING in the store: resumed at the next start.
                    engine.ops.lock().running.remove(&id);
                    return;
                }
            };
            let (state, error) = match outcome {
                Ok(true) => (OpState::Succeeded, None),
                Ok(false) => (OpState::Cancelled, None),
                Err(e) => {
                    error!(id = %op_id(id), error = %e, "operator replay failed");
                    (OpState::Failed, Some(e.to_string()))
                }
            };
            if let Err(e) = engine.finish(id, state, error).await {
                error!(id = %op_id(id), error = %e, "cannot store the end of an operator replay");
            }
            engine.ops.lock().running.remove(&id);
            let _ = done_tx.send(true);
        });
    }

    /// Walks the operation's slice from its cursor. `Ok(true)` when it
    /// reached the end, `Ok(false)` when cancelled.
    async fn walk(
        self: &Arc<Self>,
        id: u64,
        cancel: &CancellationToken,
        mut pin: Pin,
    ) -> Result<bool, OpError> {
        let mut op = self
            .ops
            .lock()
            .ops
            .get(&id)
            .cloned()
            .ok_or_else(|| OpError::NotFound(op_id(id)))?;
        let pattern: Pattern = op
            .status
            .event_name
            .parse()
            .map_err(|e| OpError::Internal(format!("stored pattern does not parse: {e}")))?;
        pin.move_to(op.cursor + 1);
        let oldest = self.store.oldest().map_err(|e| internal_op(&e))?;
        if op.cursor < op.last && oldest.is_some_and(|oldest| oldest > op.cursor + 1) {
            return Err(OpError::Internal(format!(
                "retention removed events of the slice before they were replayed (the oldest event is now {}, the replay had reached {})",
                oldest.unwrap_or_default(),
                op.cursor
            )));
        }
        if !op.counted {
            let engine = Arc::clone(self);
            let (range, pattern) = (op.first..=op.last, pattern.clone());
            op.status.total = tokio::task::spawn_blocking(move || {
                let mut n = 0u64;
                engine.store.scan(&pattern, range, &mut |_| {
                    n += 1;
                    ControlFlow::Continue(())
                })?;
                Ok::<_, StoreError>(n)
            })
            .await
            .map_err(|e| OpError::Internal(e.to_string()))?
            .map_err(|e| internal_op(&e))?;
            op.counted = true;
            op.status.updated_at = now_ms();
            self.store_op(id, &op, Vec::new()).await?;
            self.ops.lock().ops.insert(id, op.clone());
        }
        let pace = op.status.events_per_second.map(|rate| Pace {
            rate: u64::from(rate.max(1)),
            started: tokio::time::Instant::now(),
            events: 0,
        });
        let step_events = pace.as_ref().map_or(STEP_EVENTS, Pace::step);
        let mut pace = pace;
        while op.cursor < op.last {
            if cancel.is_cancelled() {
                return Ok(false);
            }
            let engine = Arc::clone(self);
            let (from, to) = (op.cursor + 1, op.last);
            let (pattern, only_unacked) = (pattern.clone(), op.status.only_unacked);
            let client = op.status.client_id.clone();
            let created_at = op.status.created_at;
            let step = tokio::task::spawn_blocking(move || {
                engine.replay_step(
                    &pattern,
                    from..=to,
                    client.as_deref(),
                    only_unacked,
                    created_at,
                    step_events,
                )
            })
            .await
            .map_err(|e| OpError::Internal(e.to_string()))?
            .map_err(|e| internal_op(&e))?;
            op.cursor = step.cursor;
            op.status.processed += step.events;
            op.status.deliveries += step.queue.len() as u64;
            op.status.updated_at = now_ms();
            let mut lowest: HashMap<ClientId, u64> = HashMap::new();
            for queued in &step.queue {
                lowest.entry(queued.client.clone()).or_insert(queued.seq);
            }
            let delivered = step.queue.len() as u64;
            self.store_op(id, &op, step.queue).await?;
            self.ops.lock().ops.insert(id, op.clone());
            self.metrics.replayed(delivered);
            for (client, from) in lowest {
                self.hub.replays_queued(&client, from);
            }
            pin.move_to(op.cursor + 1);
            if let Some(pace) = pace.as_mut() {
                pace.events += step.events;
                tokio::select! {
                    () = tokio::time::sleep_until(pace.due()) => {}
                    () = cancel.cancelled() => return Ok(false),
                }
            }
        }
        Ok(true)
    }

    /// Finds the deliveries of the slice's next events.
    fn replay_step(
        &self,
        pattern: &Pattern,
        seqs: std::ops::RangeInclusive<u64>,
        only_client: Option<&str>,
        only_unacked: bool,
        replayed_at: u64,
        max_events: usize,
    ) -> Result<Step, StoreError> {
        let subscribers: Vec<(ClientId, Arc<[Subscription]>, Vec<String>)> = self
            .subs
            .all()
            .into_iter()
            .filter_map(|subs| {
                let client = subs.first()?.client.clone();
                if only_client.is_some_and(|only| only != client.as_str()) {
                    return None;
                }
                let identities = self.identities(&client);
                Some((client, subs, identities))
            })
            .collect();
        let mut step = Step {
            cursor: *seqs.end(),
            events: 0,
            queue: Vec::new(),
        };
        let mut failed = None;
        self.store.scan(pattern, seqs, &mut |event| {
            step.events += 1;
            for (client, subs, identities) in &subscribers {
                if !subs.iter().any(|s| s.pattern.matches(event.name)) {
                    continue;
                }
                let ids: Vec<&str> = identities.iter().map(String::as_str).collect();
                if event.addressing(&ids).is_none() {
                    continue;
                }
                if only_unacked && self.store.has_settlements(client) {
                    match self.store.settlement(client, event.seq) {
                        Ok(Some(Settlement::Acked)) => continue,
                        Ok(_) => {}
                        Err(e) => {
                            failed = Some(e);
                            return ControlFlow::Break(());
                        }
                    }
                }
                step.queue.push(Queued {
                    client: client.clone(),
                    seq: event.seq,
                    replayed_at,
                });
            }
            if step.events as usize >= max_events || step.queue.len() >= STEP_DELIVERIES {
                step.cursor = event.seq;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(step),
        }
    }

    /// Stores the operation's final state.
    async fn finish(&self, id: u64, state: OpState, error: Option<String>) -> Result<(), OpError> {
        let Some(mut op) = self.ops.lock().ops.get(&id).cloned() else {
            return Ok(());
        };
        op.status.status = state;
        op.status.error = error;
        op.status.updated_at = now_ms();
        self.store_op(id, &op, Vec::new()).await?;
        self.ops.lock().ops.insert(id, op);
        Ok(())
    }

    async fn store_op(&self, id: u64, op: &Stored, queue: Vec<Queued>) -> Result<(), OpError> {
        self.submit_op(id, Some(encode(op)), queue).await
    }

    async fn submit_op(
        &self,
        id: u64,
        record: Option<Vec<u8>>,
        queue: Vec<Queued>,
    ) -> Result<(), OpError> {
        let stopping = || OpError::Internal("the server is stopping".into());
        let done = self
            .commit
            .submit(WriteOp::Operation { id, record, queue })
            .await
            .map_err(|_| stopping())?;
        match done.await {
            Ok(Ok(Applied::Stored)) => Ok(()),
            Ok(Ok(other)) => Err(OpError::Internal(format!(
                "the store answered with {other:?}"
            ))),
            Ok(Err(e)) => Err(OpError::Internal(format!(
                "the operation could not be stored: {e}"
            ))),
            Err(_) => Err(stopping()),
        }
    }
}

/// Keeps a paced operation at its rate.
struct Pace {
    rate: u64,
    started: tokio::time::Instant,
    events: u64,
}

impl Pace {
    /// Events per step: about ten steps a second.
    fn step(&self) -> usize {
        usize::try_from(self.rate / 10)
            .unwrap_or(STEP_EVENTS)
            .clamp(1, STEP_EVENTS)
    }

    /// When the events handled so far are due at the rate.
    fn due(&self) -> tokio::time::Instant {
        let millis = self.events.saturating_mul(1000) / self.rate;
        self.started + std::time::Duration::from_millis(millis)
    }
}

/// What one step found.
struct Step {
    /// Every event up to here is handled.
    cursor: u64,
    /// Events of the slice it handled.
    events: u64,
    /// Deliveries to queue.
    queue: Vec<Queued>,
}

/// Drops the oldest finished operations beyond `KEEP_FINISHED`; returns
/// their ids so the store forgets them too.
fn forget_oldest(table: &mut Table) -> Vec<u64> {
    let finished: Vec<u64> = table
        .ops
        .iter()
        .filter(|(_, op)| op.status.status != OpState::Running)
        .map(|(id, _)| *id)
        .collect();
    let excess = finished.len().saturating_sub(KEEP_FINISHED);
    let old: Vec<u64> = finished.into_iter().take(excess).collect();
    for id in &old {
        table.ops.remove(id);
    }
    old
}

fn internal_op(e: &StoreError) -> OpError {
    error!(error = %e, "store failure in an operator replay");
    OpError::Internal(format!("the event log failed: {e}"))
}
