//! Delivery: each client's processing queue, shared by its connections.
//!
//! While a client has connections, the hub keeps its delivery state in
//! memory: for each subscription a cursor (events up to it have been
//! considered) and the events it delivered that are not settled yet, each
//! in flight on one connection, waiting to be redelivered, or deferred.
//! Connections pull: a connection's writer, when it is free to write,
//! takes the next events from the shared state and marks them in flight
//! on itself. That is what makes several connections of one client
//! compete for events (whoever is ready takes the next ones, nobody takes
//! an event another holds) and what keeps a slow connection from being
//! handed more than it can write.
//!
//! Only settlements, deferrals, paused flags and floors are stored. An
//! event delivered and not settled when the server stops, or when the
//! client's last connection leaves, is above its subscription's floor and
//! unsettled in the store, so it is delivered again: at-least-once without
//! writing anything per delivery.
//!
//! Operator replays are the exception: each replayed delivery is stored in
//! the client's replay queue until the client settles it, since the event
//! may be long settled. The hub reads that queue lazily, in seq order, and
//! delivers its events marked replayed ahead of new events.
//!
//! A pull runs on its connection's task, and reads events (new ones,
//! replayed ones, ones delivered again) only as far as the page cache
//! holds them. Where a read would wait for the disk (a subscriber catching
//! up on history the kernel has paged out, an operator replay of old
//! events), a blocking thread reads them into the page cache, with no lock
//! held, and the pull is made again: the wait holds up neither the other
//! connections that task's thread serves nor the client's own
//! settlements.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::{ControlFlow, RangeInclusive};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ensync_protocol::field::{ClientId, Pattern};
use ensync_protocol::{Marks, ReplayInfo};
use tokio::sync::Notify;
use tracing::{debug, error};

use super::commit::Committer;
use super::now_ms;
use super::subs::Registry;
use crate::store::{
    Addressing, EventLog, EventView, Reads, Result, Settlement, StoreError, Subscription, WriteOp,
};

/// Bytes of records one pull hands a connection.
const PULL_BYTES: usize = 64 * 1024;
/// Events one subscription examines per pull, delivered or not: bounds
/// the time a pull holds the client's lock.
const PULL_VISITS: usize = 4096;
/// Seqs the log moves on between the settlements that store every moved
/// floor. In between, a settlement stores only its own subscription's
/// floor: the others moved over events they do not deliver, and a floor
/// stored late only means more to look through after a crash.
const FLOOR_SWEEP_SEQS: u64 = 65_536;
/// A pull whose subscriptions outnumber the seqs they have not yet looked
/// at by this factor reads the names of those events once, and scans only
/// the subscriptions that match one of them.
const NAMES_FIRST_RATIO: u64 = 4;
/// Fewer active subscriptions than this are scanned one by one.
const NAMES_FIRST_SUBS: usize = 32;

/// Delivery settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long a delivered event may stay unsettled before it is
    /// delivered again.
    pub ack_wait: Duration,
    /// Most unsettled events per subscription.
    pub max_unsettled: usize,
}

/// Every attached client's delivery state.
pub struct Hub {
    store: Arc<dyn EventLog>,
    registry: Arc<Registry>,
    commit: Arc<Committer>,
    settings: Settings,
    attached: Arc<Attached>,
    next_conn: std::sync::atomic::AtomicU64,
}

/// The clients with connections attached, each with the signal that
/// wakes its waiting connections. The commit thread rings it for the
/// clients a commit concerns, so that a commit wakes its subscribers, not
/// every connection.
#[derive(Default)]
pub struct Attached {
    clients: Mutex<HashMap<ClientId, Arc<Client>>>,
}

impl Attached {
    fn lock(&self) -> MutexGuard<'_, HashMap<ClientId, Arc<Client>>> {
        self.clients.lock().expect("hub lock is never poisoned")
    }

    /// Wakes the waiting connections of those of `clients` attached.
    pub fn wake(&self, clients: &HashSet<ClientId>) {
        if clients.is_empty() {
            return;
        }
        let attached = self.lock();
        for client in clients.iter().filter_map(|id| attached.get(id)) {
            client.wake.notify_waiters();
        }
    }
}

/// One client's shared state and the signal that it changed.
struct Client {
    id: ClientId,
    identities: Vec<String>,
    state: Mutex<State>,
    wake: Notify,
}

type SubId = u64;

/// Where an unsettled event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Delivered on `conn`; delivered again at `deadline` (ms).
    InFlight { conn: u64, deadline: u64 },
    /// Waiting to be delivered again.
    Retry,
    /// Held back until `due` (ms).
    Deferred { due: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Unsettled {
    sub: SubId,
    status: Status,
    /// For a replayed delivery, when the replay was asked for (ms).
    replayed_at: Option<u64>,
}

#[derive(Debug)]
struct SubState {
    id: SubId,
    pattern: Pattern,
    since: u64,
    paused: bool,
    /// Every event up to here has been considered for delivery.
    cursor: u64,
    /// The floor the store has.
    stored_floor: u64,
    /// Events up to here may have been settled before this state took the
    /// subscription up (through an earlier subscription of the client, or
    /// before a reconnect or restart): delivering one checks the store.
    settled_mark: u64,
    /// Unsettled events this subscription delivered.
    owned: BTreeSet<u64>,
    /// Another subscription of the client matches a name this one
    /// matches, so an event it delivers may have been settled through
    /// that one.
    overlapped: bool,
}

impl SubState {
    /// Everything up to the floor is settled or delivered by another
    /// subscription.
    fn floor(&self) -> u64 {
        self.owned
            .first()
            .map_or(self.cursor, |first| first - 1)
            .min(self.cursor)
    }

    /// Adds the floor to `moved` if it moved since it was last stored, and
    /// takes it as stored.
    fn floor_moved(&mut self, moved: &mut Vec<(Pattern, u64)>) {
        let floor = self.floor();
        if floor > self.stored_floor {
            self.stored_floor = floor;
            moved.push((self.pattern.clone(), floor));
        }
    }
}

#[derive(Debug, Default)]
struct State {
    connections: usize,
    /// The registry's subscriptions this state was built from.
    source: Option<Arc<[Subscription]>>,
    subs: Vec<SubState>,
    next_sub: SubId,
    queue: BTreeMap<u64, Unsettled>,
    /// In-flight deadlines and deferral due times: `(ms, seq)`.
    timers: BTreeSet<(u64, u64)>,
    retry: BTreeSet<u64>,
    /// Events up to here may have been delivered, or settled, before this
    /// state existed: delivering one checks the store first.
    rescan_mark: u64,
    /// Whether the stored replay queue may hold deliveries after
    /// `replay_from` that are not in `queue` yet.
    replay_more: bool,
    replay_from: u64,
    /// The log's head when the floors were last all looked at.
    floors_swept_at: u64,
    /// Where the subscription to each exact name is in `subs`.
    by_name: HashMap<String, usize>,
    /// Where the subscriptions to wider patterns are in `subs`.
    wide: Vec<usize>,
}

/// Record lines for a connection.
#[derive(Debug)]
pub struct Delivered {
    pub lines: Bytes,
    /// They were read on a thread that may wait for the disk, as the page
    /// cache no longer held them all.
    pub from_disk: bool,
}

/// What a pull produced.
#[derive(Debug, Default)]
pub struct Pulled {
    /// Record lines to write.
    pub lines: Option<Bytes>,
    /// Whether more is ready right away.
    pub more: bool,
    /// Events the page cache did not hold: the pull stopped before the
    /// first read that would wait.
    pub cold: Option<Cold>,
}

/// Events a pull needed that the page cache did not hold, for a blocking
/// thread to read in.
#[derive(Debug)]
pub enum Cold {
    /// A pattern's new events in a range of seqs.
    Scan(Pattern, RangeInclusive<u64>),
    /// Events to deliver again or replayed, by seq, in order.
    Events(Vec<u64>),
}

/// Events a blocking thread reads into the page cache at a time for
/// redeliveries and replayed deliveries: about what one pull sends.
const WARM_EVENTS: usize = 256;

/// `Ok(None)` for a read that would wait for the disk, so that the caller
/// can set the event aside for a blocking thread.
fn unless_uncached<T>(read: Result<T>) -> Result<Option<T>> {
    match read {
        Ok(value) => Ok(Some(value)),
        Err(StoreError::Uncached) => Ok(None),
        Err(e) => Err(e),
    }
}

impl State {
    /// `subs` is in the order of `id`: a state is added with the next id,
    /// at the end, and removing one keeps the order.
    fn sub(&self, id: SubId) -> Option<&SubState> {
        let at = self.subs.binary_search_by_key(&id, |s| s.id).ok()?;
        self.subs.get(at)
    }

    fn sub_mut(&mut self, id: SubId) -> Option<&mut SubState> {
        let at = self.subs.binary_search_by_key(&id, |s| s.id).ok()?;
        self.subs.get_mut(at)
    }

    /// Where the subscriptions matching `name` are in `subs`, in order:
    /// the name's own and the wider patterns', not a look at each.
    fn matching(&self, name: &str) -> Vec<usize> {
        let mut at: Vec<usize> = (self.wide.iter().copied())
            .filter(|&i| self.subs[i].pattern.matches(name))
            .chain(self.by_name.get(name).copied())
            .collect();
        at.sort_unstable();
        at
    }

    /// Brings the subscriptions in line with the registry's `current`
    /// ones; `head` is the log's head now, `floor` the registry's floor of
    /// a pattern. Patterns are matched up by hashing, so a client with
    /// thousands of subscriptions is brought in line in one pass over
    /// them.
    fn sync(
        &mut self,
        current: Arc<[Subscription]>,
        head: u64,
        floor: impl Fn(&Pattern) -> Option<u64>,
    ) {
        if self
            .source
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &current))
        {
            return;
        }
        let by_pattern: HashMap<&Pattern, &Subscription> =
            current.iter().map(|sub| (&sub.pattern, sub)).collect();
        // Whether a subscription came or continued: replayed deliveries
        // passed over for want of one can go now.
        let mut opened = false;
        let mut held = HashSet::with_capacity(self.subs.len());
        self.subs
            .retain_mut(|state| match by_pattern.get_key_value(&state.pattern) {
                Some((&pattern, sub)) => {
                    opened |= state.paused && !sub.paused;
                    state.paused = sub.paused;
                    held.insert(pattern);
                    true
                }
                None => false,
            });
        for sub in current.iter().filter(|sub| !held.contains(&sub.pattern)) {
            opened = true;
            self.next_sub += 1;
            let floor = floor(&sub.pattern).unwrap_or(sub.floor);
            self.subs.push(SubState {
                id: self.next_sub,
                pattern: sub.pattern.clone(),
                since: sub.since,
                paused: sub.paused,
                cursor: floor,
                stored_floor: floor,
                settled_mark: head,
                owned: BTreeSet::new(),
                overlapped: false,
            });
        }
        self.by_name.clear();
        self.wide.clear();
        for (at, sub) in self.subs.iter().enumerate() {
            match &sub.pattern {
                Pattern::Exact(name) => {
                    self.by_name.insert(name.as_str().to_owned(), at);
                }
                _ => self.wide.push(at),
            }
        }
        mark_overlaps(&mut self.subs, &self.wide);
        self.source = Some(current);
        if opened {
            self.replay_more = true;
            self.replay_from = 0;
        }
    }

    fn set_status(&mut self, seq: u64, status: Status) {
        let Some(entry) = self.queue.get_mut(&seq) else {
            return;
        };
        match std::mem::replace(&mut entry.status, status) {
            Status::InFlight { deadline: at, .. } | Status::Deferred { due: at } => {
                self.timers.remove(&(at, seq));
            }
            Status::Retry => {
                self.retry.remove(&seq);
            }
        }
        match status {
            Status::InFlight { deadline: at, .. } | Status::Deferred { due: at } => {
                self.timers.insert((at, seq));
            }
            Status::Retry => {
                self.retry.insert(seq);
            }
        }
    }

    fn insert(&mut self, seq: u64, sub: SubId, status: Status, replayed_at: Option<u64>) {
        self.queue.insert(
            seq,
            Unsettled {
                sub,
                status: Status::Retry,
                replayed_at,
            },
        );
        self.retry.insert(seq);
        self.set_status(seq, status);
        if let Some(state) = self.sub_mut(sub) {
            state.owned.insert(seq);
        }
    }

    fn remove(&mut self, seq: u64) -> Option<Unsettled> {
        let entry = self.queue.remove(&seq)?;
        match entry.status {
            Status::InFlight { deadline: at, .. } | Status::Deferred { due: at } => {
                self.timers.remove(&(at, seq));
            }
            Status::Retry => {
                self.retry.remove(&seq);
            }
        }
        if let Some(state) = self.sub_mut(entry.sub) {
            state.owned.remove(&seq);
        }
        Some(entry)
    }

    /// Moves what timed out or fell due back to delivery.
    fn fire_timers(&mut self, now: u64) {
        while let Some(&(at, seq)) = self.timers.first() {
            if at > now {
                break;
            }
            self.set_status(seq, Status::Retry);
        }
    }

    /// The floors that moved since they were last stored.
    fn moved_floors(&mut self) -> Vec<(Pattern, u64)> {
        let mut moved = Vec::new();
        for sub in &mut self.subs {
            sub.floor_moved(&mut moved);
        }
        moved
    }

    /// The floors to store after a settlement of `settled`'s: its own if
    /// it moved, and every moved one once the log has gone
    /// [`FLOOR_SWEEP_SEQS`] past the last look at all of them. A client
    /// with many subscriptions moves all their cursors with each pull;
    /// storing every floor at every settlement wrote each subscription
    /// again per pull.
    fn settled_floors(&mut self, settled: SubId, head: u64) -> Vec<(Pattern, u64)> {
        if head >= self.floors_swept_at.saturating_add(FLOOR_SWEEP_SEQS) {
            self.floors_swept_at = head;
            return self.moved_floors();
        }
        let mut moved = Vec::new();
        if let Some(sub) = self.sub_mut(settled) {
            sub.floor_moved(&mut moved);
        }
        moved
    }

    fn next_timer(&self) -> Option<u64> {
        self.timers.first().map(|(at, _)| *at)
    }
}

/// Marks each subscription that shares a name with another. Two patterns
/// share a name only when one covers the other, and an exact name covers
/// no other pattern, so each subscription is compared with the wider ones
/// alone (at `wide` in `subs`, in order): a client's many subscriptions to
/// names cost a look at its few patterns each.
fn mark_overlaps(subs: &mut [SubState], wide: &[usize]) {
    for i in 0..subs.len() {
        let pattern = &subs[i].pattern;
        let shares = |j: usize| {
            j != i && (subs[j].pattern.covers(pattern) || pattern.covers(&subs[j].pattern))
        };
        let overlapped = if wide.binary_search(&i).is_ok() {
            (0..subs.len()).any(shares)
        } else {
            wide.iter().any(|&j| shares(j))
        };
        subs[i].overlapped = overlapped;
    }
}

/// A connection's place among its client's connections. Dropping it
/// hands the events in flight on it back to the others.
pub struct Attachment {
    hub: Arc<Hub>,
    client: Arc<Client>,
    conn: u64,
}

impl Hub {
    /// A hub delivering from `store`.
    pub fn new(
        store: Arc<dyn EventLog>,
        registry: Arc<Registry>,
        commit: Arc<Committer>,
        attached: Arc<Attached>,
        settings: Settings,
    ) -> Self {
        Self {
            store,
            registry,
            commit,
            settings,
            attached,
            next_conn: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn clients(&self) -> MutexGuard<'_, HashMap<ClientId, Arc<Client>>> {
        self.attached.lock()
    }

    /// Attaches a connection of `client`, creating its state (and loading
    /// its deferred events) if it is the first.
    pub fn attach(self: &Arc<Self>, client: &ClientId, identities: Vec<String>) -> Attachment {
        let conn = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut clients = self.clients();
        let shared = Arc::clone(clients.entry(client.clone()).or_insert_with(|| {
            Arc::new(Client {
                id: client.clone(),
                identities,
                state: Mutex::new(State::default()),
                wake: Notify::new(),
            })
        }));
        // Counted while the map is held, so a detach that empties the
        // client cannot remove it from the map under this attach.
        let mut state = shared.lock();
        drop(clients);
        state.connections += 1;
        if state.connections == 1 {
            self.load(&shared, &mut state);
        }
        drop(state);
        Attachment {
            hub: Arc::clone(self),
            client: shared,
            conn,
        }
    }

    /// Fresh state for a client's first connection.
    fn load(&self, client: &Client, state: &mut State) {
        *state = State {
            connections: state.connections,
            rescan_mark: self.commit.head(),
            floors_swept_at: self.commit.head(),
            replay_more: true,
            ..State::default()
        };
        let floor = |pattern: &Pattern| self.registry.floor(&client.id, pattern);
        state.sync(self.registry.of(&client.id), state.rescan_mark, floor);
        let deferred = match self.store.deferred(&client.id) {
            Ok(deferred) => deferred,
            Err(e) => {
                error!(client = %client.id, error = %e, "cannot load deferred events; they are delivered now");
                Vec::new()
            }
        };
        for (seq, due) in deferred {
            let owner = self.owner(client, state, seq).ok().flatten();
            if let Some(sub) = owner {
                let replayed_at = self.store.queued_replay(&client.id, seq).ok().flatten();
                state.insert(seq, sub, Status::Deferred { due }, replayed_at);
            }
        }
    }

    /// The subscription that delivers event `seq` to `client`, if one does
    /// and the event is not settled (or it is queued by a replay): for
    /// events this state has not delivered itself.
    fn owner(&self, client: &Client, state: &State, seq: u64) -> Result<Option<SubId>> {
        let queued = self.store.queued_replay(&client.id, seq)?.is_some();
        if !queued && seq > state.rescan_mark {
            // Neither queued by a replay nor delivered before this state
            // existed: it would be in the queue.
            return Ok(None);
        }
        let Some(event) = self.store.event_at(seq, Reads::Waiting)? else {
            return Ok(None);
        };
        let view = event.view()?;
        let ids: Vec<&str> = client.identities.iter().map(String::as_str).collect();
        let Some(addressing) = view.addressing(&ids) else {
            return Ok(None);
        };
        let sub = (state.matching(view.name).into_iter())
            .map(|at| &state.subs[at])
            .find(|s| queued || addressing == Addressing::Direct || seq > s.since);
        let Some(sub) = sub else {
            return Ok(None);
        };
        if !queued && self.is_settled(&client.id, seq)? {
            return Ok(None);
        }
        Ok(Some(sub.id))
    }

    fn is_settled(&self, client: &ClientId, seq: u64) -> Result<bool> {
        Ok(self.store.has_settlements(client) && self.store.settlement(client, seq)?.is_some())
    }

    /// Takes `seq` out of `client`'s processing queue to settle it (ACK,
    /// DISCARD), with the floors that moved and should be stored. `None`
    /// when it is not there.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn take(&self, client: &ClientId, seq: u64) -> Result<Option<Vec<(Pattern, u64)>>> {
        let Some(shared) = self.clients().get(client).cloned() else {
            return Ok(None);
        };
        let mut state = shared.lock();
        let owner = match state.remove(seq) {
            Some(entry) => Some(entry.sub),
            // Delivered before this state existed (an earlier connection,
            // or before a restart), and not settled; or queued by a replay.
            None => self.owner(&shared, &state, seq)?,
        };
        let Some(owner) = owner else {
            return Ok(None);
        };
        let floors = state.settled_floors(owner, self.commit.head());
        drop(state);
        shared.wake.notify_waiters();
        Ok(Some(floors))
    }

    /// Holds `seq` back until `due`, or with `None` puts it up for
    /// delivery again now (ROLLBACK). `None` when it is not in the queue;
    /// otherwise whether it was deferred before.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn hold(&self, client: &ClientId, seq: u64, due: Option<u64>) -> Result<Option<bool>> {
        let Some(shared) = self.clients().get(client).cloned() else {
            return Ok(None);
        };
        let mut state = shared.lock();
        let status = match due {
            Some(due) => Status::Deferred { due },
            None => Status::Retry,
        };
        let was_deferred = match state.queue.get(&seq) {
            Some(entry) => {
                let was = matches!(entry.status, Status::Deferred { .. });
                state.set_status(seq, status);
                was
            }
            None => match self.owner(&shared, &state, seq)? {
                Some(sub) => {
                    let replayed_at = self.store.queued_replay(&shared.id, seq)?;
                    state.insert(seq, sub, status, replayed_at);
                    // It may have been deferred before this state existed;
                    // clearing a deferral that is not there is harmless.
                    true
                }
                None => return Ok(None),
            },
        };
        drop(state);
        shared.wake.notify_waiters();
        Ok(Some(was_deferred))
    }

    /// Deliveries for the connection: the next events for `conn`, marked
    /// in flight on it. New events are read only as far as the page cache
    /// holds them (redeliveries and replayed deliveries, an event each,
    /// read as they must).
    fn pull(&self, client: &Client, conn: u64) -> Result<Pulled> {
        let now = now_ms();
        let head = self.commit.head();
        let mut state = client.lock();
        let floor = |pattern: &Pattern| self.registry.floor(&client.id, pattern);
        state.sync(self.registry.of(&client.id), head, floor);
        state.fire_timers(now);
        let deadline = now
            .saturating_add(u64::try_from(self.settings.ack_wait.as_millis()).unwrap_or(u64::MAX));
        let mut out = BytesMut::new();
        // Queued replays first: one may mark an event that is in flight to
        // be sent again, which the redelivery pass then does.
        let mut dropped = Vec::new();
        let mut cold = None;
        if state.replay_more {
            cold =
                self.deliver_replayed(client, &mut state, conn, deadline, &mut out, &mut dropped)?;
        }
        if cold.is_none() {
            cold = self.redeliver(client, &mut state, conn, deadline, &mut out)?;
        }
        // Past an older event the page cache did not hold, nothing newer
        // goes out before it.
        let mut more = out.len() >= PULL_BYTES;
        if !more && cold.is_none() {
            (more, cold) = self.deliver_new(client, &mut state, conn, deadline, head, &mut out)?;
        }
        drop(state);
        if !dropped.is_empty() {
            // Best effort: an entry left behind is dropped again next time.
            self.commit.try_submit(WriteOp::Unqueue {
                client: client.id.clone(),
                seqs: dropped,
            });
        }
        Ok(Pulled {
            lines: (!out.is_empty()).then(|| out.freeze()),
            more,
            cold,
        })
    }

    /// Delivers what operator replays queued for the client, in seq order,
    /// within the subscriptions' caps. Entries whose event expired or that
    /// no subscription covers any more go to `dropped`.
    fn deliver_replayed(
        &self,
        client: &Client,
        state: &mut State,
        conn: u64,
        deadline: u64,
        out: &mut BytesMut,
        dropped: &mut Vec<u64>,
    ) -> Result<Option<Cold>> {
        let cap = self.settings.max_unsettled;
        let entries = self
            .store
            .replay_queue(&client.id, state.replay_from, PULL_VISITS)?;
        let complete = entries.len() < PULL_VISITS;
        for (at, &(seq, replayed_at)) in entries.iter().enumerate() {
            if out.len() >= PULL_BYTES {
                return Ok(None);
            }
            if let Some(entry) = state.queue.get_mut(&seq) {
                // Already unsettled: one delivery stands for both. It is
                // sent again now, marked replayed, unless it is already
                // marked or deferred (it then comes, marked, when due).
                state.replay_from = seq;
                if entry.replayed_at.is_none() {
                    entry.replayed_at = Some(replayed_at);
                    if matches!(entry.status, Status::InFlight { .. }) {
                        state.set_status(seq, Status::Retry);
                    }
                }
                continue;
            }
            let Some(event) = unless_uncached(self.store.event_at(seq, Reads::Cached))? else {
                let seqs = entries[at..].iter().map(|(seq, _)| *seq);
                return Ok(Some(Cold::Events(seqs.take(WARM_EVENTS).collect())));
            };
            let Some(event) = event else {
                debug!(client = %client.id, seq, "replayed event expired by retention");
                dropped.push(seq);
                state.replay_from = seq;
                continue;
            };
            let view = event.view()?;
            let Some(sub) = state.matching(view.name).first().map(|&at| &state.subs[at]) else {
                dropped.push(seq);
                state.replay_from = seq;
                continue;
            };
            if sub.owned.len() >= cap {
                // Taken up again when the client settles something.
                return Ok(None);
            }
            state.replay_from = seq;
            if sub.paused {
                // Taken up again when the subscription continues.
                continue;
            }
            let sub = sub.id;
            let marks = self.replay_marks(&client.id, seq, replayed_at)?;
            view.record.write_line(out, &marks);
            state.insert(
                seq,
                sub,
                Status::InFlight { conn, deadline },
                Some(replayed_at),
            );
        }
        if complete {
            state.replay_more = false;
        }
        Ok(None)
    }

    /// The marks of a replayed delivery of `seq`.
    fn replay_marks(&self, client: &ClientId, seq: u64, replayed_at: u64) -> Result<Marks> {
        let was_acknowledged = self.store.has_settlements(client)
            && self.store.settlement(client, seq)? == Some(Settlement::Acked);
        Ok(Marks {
            include_payload: true,
            replay: Some(ReplayInfo {
                replay_timestamp: replayed_at,
                was_acknowledged,
            }),
        })
    }

    /// Operator replays queued deliveries for `client`, the lowest at
    /// `from`: the client's connections take them up.
    pub fn replays_queued(&self, client: &ClientId, from: u64) {
        let Some(shared) = self.clients().get(client).cloned() else {
            return;
        };
        let mut state = shared.lock();
        state.replay_more = true;
        state.replay_from = state.replay_from.min(from.saturating_sub(1));
        drop(state);
        shared.wake.notify_waiters();
    }

    /// Delivers events waiting to be delivered again, oldest first.
    fn redeliver(
        &self,
        client: &Client,
        state: &mut State,
        conn: u64,
        deadline: u64,
        out: &mut BytesMut,
    ) -> Result<Option<Cold>> {
        let waiting: Vec<u64> = state.retry.iter().copied().collect();
        for (at, &seq) in waiting.iter().enumerate() {
            if out.len() >= PULL_BYTES {
                break;
            }
            let Some(entry) = state.queue.get(&seq).copied() else {
                continue;
            };
            match state.sub(entry.sub) {
                // Unsubscribed meanwhile: nobody delivers it any more.
                None => {
                    state.remove(seq);
                    continue;
                }
                Some(sub) if sub.paused => continue,
                Some(_) => {}
            }
            let Some(event) = unless_uncached(self.store.event_at(seq, Reads::Cached))? else {
                let seqs = waiting[at..].iter().copied();
                return Ok(Some(Cold::Events(seqs.take(WARM_EVENTS).collect())));
            };
            match event {
                Some(event) => {
                    let marks = match entry.replayed_at {
                        Some(at) => self.replay_marks(&client.id, seq, at)?,
                        None => Marks::LIVE,
                    };
                    event.view()?.record.write_line(out, &marks);
                    state.set_status(seq, Status::InFlight { conn, deadline });
                }
                // Removed by retention.
                None => {
                    debug!(client = %client.id, seq, "unsettled event expired by retention");
                    state.remove(seq);
                }
            }
        }
        Ok(None)
    }

    /// Delivers new events of the running subscriptions, merged in
    /// publication order. Says whether more may be ready, and what a read
    /// that would have waited for the disk stopped short of.
    fn deliver_new(
        &self,
        client: &Client,
        state: &mut State,
        conn: u64,
        deadline: u64,
        head: u64,
        out: &mut BytesMut,
    ) -> Result<(bool, Option<Cold>)> {
        let cap = self.settings.max_unsettled;
        let mut active: Vec<usize> = (0..state.subs.len())
            .filter(|&i| {
                let s = &state.subs[i];
                !s.paused && s.cursor < head && s.owned.len() < cap
            })
            .collect();
        self.pass_over_quiet(state, &mut active, head)?;
        if active.is_empty() {
            return Ok((false, None));
        }
        let ids: Vec<&str> = client.identities.iter().map(String::as_str).collect();
        let check_settled = self.store.has_settlements(&client.id);
        // Candidates: (seq, subscription index, record bytes in `lines`).
        let mut candidates: Vec<(u64, usize, std::ops::Range<usize>)> = Vec::new();
        let mut cold = None;
        let mut lines = BytesMut::new();
        let mut ends = Vec::with_capacity(active.len());
        for &i in &active {
            // History before the subscription holds only events addressed
            // to the client directly: skip what the store knows has none.
            // Each look is bounded; while looks make progress, the scan
            // waits for the next pull, so a long history is skipped in
            // short steps between the connection's replies.
            let sub = &state.subs[i];
            if sub.cursor < sub.since {
                let history = sub.cursor + 1..=sub.since.min(head);
                let skip = self.store.undirected_until(&sub.pattern, history, &ids)?;
                if skip > sub.cursor {
                    state.subs[i].cursor = skip;
                    ends.push((i, skip));
                    continue;
                }
            }
            let sub = &state.subs[i];
            let room = cap - sub.owned.len();
            let (mut found, mut visited, mut end) = (0, 0, head);
            let (mut failed, mut seen) = (None, sub.cursor);
            let scanned = self.store.scan_expecting(
                &sub.pattern,
                sub.cursor + 1..=head,
                u64::MAX,
                Reads::Cached,
                &mut |event| {
                    visited += 1;
                    seen = event.seq;
                    match self.wanted(client, state, sub, &ids, check_settled, &event) {
                        Ok(true) => {
                            let start = lines.len();
                            event.record.write_line(&mut lines, &Marks::LIVE);
                            candidates.push((event.seq, i, start..lines.len()));
                            found += 1;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            failed = Some(e);
                            end = event.seq.saturating_sub(1);
                            return ControlFlow::Break(());
                        }
                    }
                    if found == room || visited == PULL_VISITS || lines.len() >= PULL_BYTES {
                        end = event.seq;
                        return ControlFlow::Break(());
                    }
                    ControlFlow::Continue(())
                },
            );
            match scanned {
                // What came before the read that would wait is delivered;
                // a blocking thread reads the rest in for the next pull.
                Err(StoreError::Uncached) => {
                    end = seen;
                    if seen < head {
                        cold.get_or_insert_with(|| {
                            Cold::Scan(sub.pattern.clone(), seen + 1..=head)
                        });
                    }
                }
                scanned => scanned?,
            }
            if let Some(e) = failed {
                return Err(e);
            }
            ends.push((i, end));
        }
        // Every subscription has been considered up to `cut`: delivering
        // the candidates up to it, in seq order, keeps publication order
        // across subscriptions.
        let cut = ends.iter().map(|(_, end)| *end).min().unwrap_or(head);
        candidates.sort_by_key(|(seq, i, _)| (*seq, *i));
        let mut stop = cut;
        let mut blocked: HashMap<usize, u64> = HashMap::new();
        for (seq, i, range) in candidates {
            if seq > stop {
                break;
            }
            if state.queue.contains_key(&seq) || blocked.contains_key(&i) {
                continue;
            }
            if state.subs[i].owned.len() >= cap {
                blocked.insert(i, seq - 1);
                continue;
            }
            if out.len() >= PULL_BYTES {
                stop = seq - 1;
                break;
            }
            out.extend_from_slice(&lines[range]);
            let id = state.subs[i].id;
            state.insert(seq, id, Status::InFlight { conn, deadline }, None);
        }
        let mut more = false;
        for (i, _) in ends {
            let sub = &mut state.subs[i];
            let to = blocked.get(&i).copied().unwrap_or(stop).min(stop);
            sub.cursor = sub.cursor.max(to);
            more |= sub.cursor < head && sub.owned.len() < cap && !blocked.contains_key(&i);
        }
        Ok((more, cold))
    }

    /// Moves the `active` subscriptions that no new event concerns to the
    /// head and drops them from `active`, when they outnumber the events
    /// to look at: a client subscribed to thousands of names, woken for
    /// one event, then scans the one subscription that matches it instead
    /// of every one. The names are read from the page cache; when a read
    /// would wait, every subscription is scanned as usual.
    fn pass_over_quiet(&self, state: &mut State, active: &mut Vec<usize>, head: u64) -> Result<()> {
        let Some(from) = active.iter().map(|&i| state.subs[i].cursor).min() else {
            return Ok(());
        };
        if active.len() < NAMES_FIRST_SUBS
            || (head - from).saturating_mul(NAMES_FIRST_RATIO) > active.len() as u64
        {
            return Ok(());
        }
        let mut names: HashSet<String> = HashSet::new();
        let scanned = self.store.scan_expecting(
            &Pattern::All,
            from + 1..=head,
            u64::MAX,
            Reads::Cached,
            &mut |event| {
                if !names.contains(event.name) {
                    names.insert(event.name.to_owned());
                }
                ControlFlow::Continue(())
            },
        );
        if unless_uncached(scanned)?.is_none() {
            return Ok(());
        }
        // The subscriptions one of the names concerns, found from the names.
        let mut concerned: Vec<usize> = names
            .iter()
            .filter_map(|name| state.by_name.get(name.as_str()).copied())
            .chain(state.wide.iter().copied().filter(|&at| {
                let pattern = &state.subs[at].pattern;
                names.iter().any(|name| pattern.matches(name))
            }))
            .collect();
        concerned.sort_unstable();
        active.retain(|&i| {
            let quiet = concerned.binary_search(&i).is_err();
            if quiet {
                state.subs[i].cursor = head;
            }
            !quiet
        });
        Ok(())
    }

    /// Reads what a pull stopped short of, as far as one pull reads,
    /// waiting for the disk: on a blocking thread, with no lock held, so
    /// that the next pull finds it in the page cache.
    fn warm(&self, cold: Cold) -> Result<()> {
        match cold {
            Cold::Scan(pattern, seqs) => {
                let mut visited = 0;
                self.store
                    .scan_expecting(&pattern, seqs, u64::MAX, Reads::Waiting, &mut |_| {
                        visited += 1;
                        if visited == PULL_VISITS {
                            return ControlFlow::Break(());
                        }
                        ControlFlow::Continue(())
                    })
            }
            Cold::Events(seqs) => {
                for seq in seqs {
                    self.store.event_at(seq, Reads::Waiting)?;
                }
                Ok(())
            }
        }
    }

    /// Whether `sub` should deliver `event` now.
    fn wanted(
        &self,
        client: &Client,
        state: &State,
        sub: &SubState,
        ids: &[&str],
        check_settled: bool,
        event: &EventView<'_>,
    ) -> Result<bool> {
        let Some(addressing) = event.addressing(ids) else {
            return Ok(false);
        };
        if addressing == Addressing::Everyone && event.seq <= sub.since {
            return Ok(false);
        }
        if state.queue.contains_key(&event.seq) {
            return Ok(false);
        }
        // Settled before: possible only for what an earlier state may have
        // delivered, or what another subscription also covers.
        let overlaps = || sub.overlapped && state.matching(event.name).len() > 1;
        if check_settled && (event.seq <= sub.settled_mark || overlaps()) {
            return Ok(!self.is_settled(&client.id, event.seq)?);
        }
        Ok(true)
    }

    fn detach(&self, client: &Arc<Client>, conn: u64) -> Option<Vec<(Pattern, u64)>> {
        let mut clients = self.clients();
        let mut state = client.lock();
        state.connections -= 1;
        let held: Vec<u64> = state
            .queue
            .iter()
            .filter(|(_, e)| matches!(e.status, Status::InFlight { conn: c, .. } if c == conn))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in held {
            state.set_status(seq, Status::Retry);
        }
        if state.connections > 0 {
            drop(state);
            client.wake.notify_waiters();
            return None;
        }
        let floors = state.moved_floors();
        drop(state);
        clients.remove(&client.id);
        Some(floors)
    }
}

impl Client {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("client lock is never poisoned")
    }
}

impl Attachment {
    /// The next record lines for this connection; waits until there are
    /// some. Cancel-safe: nothing is taken until it returns.
    ///
    /// It waits for its client's wake-up: rung by the commit thread after
    /// a commit of events its subscriptions match or of a change to them,
    /// and by settlements, deferrals, replays and the client's other
    /// connections. Enabled before the pull, it misses none that comes
    /// after what the pull saw.
    pub async fn next(&self) -> Delivered {
        let mut from_disk = false;
        loop {
            let woken = self.client.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let mut pulled = self.hub.pull(&self.client, self.conn);
            if let Ok(Pulled {
                lines: None,
                cold: Some(cold),
                ..
            }) = pulled
            {
                // A read from the disk here would hold up every connection
                // this thread serves: a blocking thread brings the events
                // into the page cache, and the pull is made again.
                let hub = Arc::clone(&self.hub);
                let warmed = tokio::task::spawn_blocking(move || hub.warm(cold)).await;
                from_disk = true;
                pulled = match warmed {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(StoreError::Backend(format!("the read thread failed: {e}"))),
                };
            }
            let pulled = match pulled {
                Ok(pulled) => pulled,
                Err(e) => {
                    error!(client = %self.client.id, error = %e, "delivery failed in the store; retrying in a second");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Some(lines) = pulled.lines {
                return Delivered { lines, from_disk };
            }
            if pulled.more {
                tokio::task::yield_now().await;
                continue;
            }
            let timer = self.client.lock().next_timer();
            let sleep = async {
                match timer {
                    Some(at) => {
                        let wait = at.saturating_sub(now_ms());
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = woken => {}
                () = sleep => {}
            }
        }
    }

    /// The client this connection delivers for.
    pub fn client(&self) -> &ClientId {
        &self.client.id
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Some(floors) = self.hub.detach(&self.client, self.conn) {
            if !floors.is_empty() {
                // Best effort: a floor that is not stored only means more
                // to look through after a restart.
                self.hub.commit.try_submit(WriteOp::SetFloors {
                    client: self.client.id.clone(),
                    floors,
                });
            }
        }
    }
}
