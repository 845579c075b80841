//! The storage the engine sees: an ordered event log with name, time and id
//! seeks, and the durable per-client state (subscriptions with their
//! paused flag and delivery floor, settled and deferred events). The
//! engine knows this trait and these types; only `sled.rs` knows sled.

use std::ops::{ControlFlow, RangeInclusive};

use ensync_protocol::field::{ClientId, EventId, EventName, Metadata, Pattern, Payload, Recipient};
use ensync_protocol::StoredRecord;

mod directory;
#[cfg(target_os = "linux")]
mod mapped;
mod segments;
mod sled;

pub use self::sled::SledLog;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed (I/O, corruption).
    #[error("storage failure: {0}")]
    Backend(String),
    /// A stored value does not decode.
    #[error("stored data is damaged: {0}")]
    Damaged(String),
    /// A read that was not to wait for the disk ([`Reads::Cached`]) found
    /// bytes the page cache does not hold.
    #[error("the events are not in memory, and this read was not to wait for the disk")]
    Uncached,
}

/// Whether a scan's reads of event bytes may wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// They wait for what the page cache does not hold.
    Waiting,
    /// They take only what the page cache holds, and the scan fails with
    /// [`StoreError::Uncached`] where a read would wait: for a
    /// connection's task, whose thread serves other connections too.
    Cached,
    /// As `Cached`, with the bytes read from a map of the segment where
    /// its pages are known to be in memory (a scan reads them where they
    /// lie, without a copy): for replays served on a connection's task,
    /// which read the same pages again and again (subscribers' deliveries
    /// mostly read the newest bytes, once).
    Mapped,
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Its name.
    pub name: EventName,
    /// Who published it.
    pub sender: ClientId,
    /// Its payload.
    pub payload: Payload,
    /// Its metadata.
    pub metadata: Option<Metadata>,
    /// Who may receive it.
    pub recipients: Vec<Recipient>,
}

/// One durable change, applied in submission order by the commit thread.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Append an event.
    Publish(NewEvent),
    /// Create a subscription (a no-op when it exists).
    Subscribe {
        /// The subscriber.
        client: ClientId,
        /// What it subscribes to.
        pattern: Pattern,
    },
    /// Remove a subscription.
    Unsubscribe {
        /// The subscriber.
        client: ClientId,
        /// The subscription's pattern.
        pattern: Pattern,
    },
    /// Pause or continue a subscription.
    SetPaused {
        /// The subscriber.
        client: ClientId,
        /// The subscription's pattern.
        pattern: Pattern,
        /// Paused (`true`) or running.
        paused: bool,
    },
    /// Settle a delivered event for good (ACK or DISCARD); it also stops
    /// being deferred, and a replayed delivery of it leaves the queue. `floors` carries the delivery floors that moved.
    Settle {
        /// The client.
        client: ClientId,
        /// The event.
        seq: u64,
        /// How.
        settlement: Settlement,
        /// Subscriptions whose floor moved, with the new floor.
        floors: Vec<(Pattern, u64)>,
    },
    /// Hold a delivered event back until `due_ms` (DEFER), or, with
    /// `None`, release it (ROLLBACK of a deferred event).
    Defer {
        /// The client.
        client: ClientId,
        /// The event.
        seq: u64,
        /// When it is due again.
        due_ms: Option<u64>,
    },
    /// Moves delivery floors forward (never back).
    SetFloors {
        /// The client.
        client: ClientId,
        /// Subscriptions and their new floors.
        floors: Vec<(Pattern, u64)>,
    },
    /// Removes the oldest commits that retention no longer keeps.
    Trim(Trim),
    /// Stores an operator replay's state (`None` forgets it) and queues
    /// the replayed deliveries of one of its steps.
    Operation {
        /// The operation.
        id: u64,
        /// Its state, opaque to the store.
        record: Option<Vec<u8>>,
        /// Deliveries to queue.
        queue: Vec<Queued>,
    },
    /// Drops replayed deliveries that can no longer be made (the event
    /// expired, or the client no longer subscribes to it).
    Unqueue {
        /// The client.
        client: ClientId,
        /// The events.
        seqs: Vec<u64>,
    },
}

/// A replayed delivery waiting in a client's processing queue until the
/// client settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// The client it is for.
    pub client: ClientId,
    /// The event.
    pub seq: u64,
    /// When the replay was asked for (ms), the record's `replayTimestamp`.
    pub replayed_at: u64,
}

/// How far one trim step may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trim {
    /// Commits whose events were all logged before this are removed.
    pub before_ms: Option<u64>,
    /// Oldest commits are removed while the log holds more bytes.
    pub max_bytes: Option<u64>,
    /// Nothing at or after this seq is removed (a replay is reading it).
    pub keep_from: u64,
    /// Most commits removed in this step.
    pub max_commits: usize,
}

/// How a client settled an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// ACK: processed.
    Acked,
    /// DISCARD, with its reason: never delivered to the client again.
    Discarded(String),
}

impl WriteOp {
    /// Roughly the bytes this operation holds while it waits.
    pub fn weight(&self) -> usize {
        match self {
            WriteOp::Publish(event) => {
                128 + event.payload.as_str().len()
                    + event.metadata.as_ref().map_or(0, |m| m.as_str().len())
                    + event.name.as_str().len()
                    + event.recipients.len() * 32
            }
            WriteOp::Settle {
                settlement: Settlement::Discarded(reason),
                floors,
                ..
            } => 128 + reason.len() + floors.len() * 64,
            WriteOp::Settle { floors, .. } | WriteOp::SetFloors { floors, .. } => {
                128 + floors.len() * 64
            }
            WriteOp::Operation { record, queue, .. } => {
                128 + record.as_ref().map_or(0, Vec::len) + queue.len() * 64
            }
            WriteOp::Unqueue { seqs, .. } => 128 + seqs.len() * 8,
            _ => 128,
        }
    }

    /// Whether the commit thread must apply this operation on its own
    /// (it reads other state while it runs).
    pub fn runs_alone(&self) -> bool {
        matches!(self, WriteOp::Trim(_))
    }
}

/// What applying one [`WriteOp`] produced.
#[derive(Debug, Clone)]
pub enum Applied {
    /// The event's place in the log.
    Published(Appended),
    /// The subscription, new or existing.
    Subscribed(Subscription),
    /// The subscription removed, or `None` when there was none.
    Unsubscribed(Option<Subscription>),
    /// The subscription with its new paused flag, or why it was refused.
    PausedSet(Result<Subscription, PauseRefused>),
    /// A settlement, a deferral or floors were stored.
    Stored,
    /// What one trim step removed.
    Trimmed(Trimmed),
}

/// Why PAUSE or CONTINUE changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseRefused {
    /// The client has no subscription with that pattern.
    NotSubscribed,
    /// CONTINUE of a subscription that is running.
    NotPaused,
}

/// What a trim step removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Events removed.
    pub events: u64,
    /// Their stored bytes.
    pub bytes: u64,
    /// Whether retention would remove more (the step hit `max_commits`).
    pub more: bool,
}

/// Where an appended event landed.
#[derive(Debug, Clone)]
pub struct Appended {
    /// Its sequence number (`block`).
    pub seq: u64,
    /// Its id.
    pub idem: String,
    /// Its `loggedAt`.
    pub logged_at: u64,
}

/// A durable subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The subscriber.
    pub client: ClientId,
    /// What it covers.
    pub pattern: Pattern,
    /// Events addressed to everyone (`*`) are delivered after this
    /// sequence number: the head when the subscription was made. Events
    /// addressed to the client itself are delivered whenever published.
    pub since: u64,
    /// Whether delivery is paused.
    pub paused: bool,
    /// Every event up to here that this subscription delivers is settled
    /// (or was delivered by another subscription): delivery resumes after
    /// it after a restart.
    pub floor: u64,
}

/// A stored event as a scan visits it.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    /// Its sequence number.
    pub seq: u64,
    /// Its name.
    pub name: &'a str,
    /// Its recipients, encoded; ask with [`EventView::is_addressed_to`].
    recipients: &'a [u8],
    /// Its record, ready to write.
    pub record: StoredRecord<'a>,
}

impl<'a> EventView<'a> {
    /// Splits a stored value into recipients and record.
    ///
    /// # Errors
    /// When the value is damaged.
    // Inlined, a scan's view never makes a round trip through memory
    // (the copy out of the returned view was 2% of a LIMIT-50 profile);
    // a plain `#[inline]` left it out of line.
    #[inline(always)]
    pub(crate) fn decode(seq: u64, name: &'a str, value: &'a [u8]) -> Result<Self> {
        let damaged = || StoreError::Damaged(format!("event {seq} has a bad recipient list"));
        let len_bytes = value.get(..4).ok_or_else(damaged)?;
        let len = u32::from_le_bytes(len_bytes.try_into().map_err(|_| damaged())?) as usize;
        let recipients = value.get(4..4 + len).ok_or_else(damaged)?;
        let record = StoredRecord::new(&value[4 + len..])
            .map_err(|e| StoreError::Damaged(format!("event {seq}: {e}")))?;
        Ok(Self {
            seq,
            name,
            recipients,
            record,
        })
    }

    /// Whether the event is addressed to `client` (by `*`, or by one of the
    /// client's identities: its id and public keys).
    #[inline]
    pub fn is_addressed_to(&self, identities: &[&str]) -> bool {
        self.addressing(identities).is_some()
    }

    /// How the event is addressed to a client with these identities, if
    /// at all.
    #[inline]
    pub fn addressing(&self, identities: &[&str]) -> Option<Addressing> {
        addressing_of(self.recipients, identities)
    }
}

/// How an event with these encoded recipients reaches a client with these
/// identities, if at all.
#[inline]
pub(crate) fn addressing_of(recipients: &[u8], identities: &[&str]) -> Option<Addressing> {
    // NOTE: `*` is never an identity, so an event for everyone only is
    // settled without looking at the identities.
    if recipients == b"*" {
        return Some(Addressing::Everyone);
    }
    addressing_among(recipients, identities)
}

/// [`addressing_of`] for recipients other than `*` alone: a look at each.
fn addressing_among(recipients: &[u8], identities: &[&str]) -> Option<Addressing> {
    let mut everyone = false;
    for r in recipients.split(|b| *b == 0) {
        if identities.iter().any(|id| id.as_bytes() == r) {
            return Some(Addressing::Direct);
        }
        everyone |= r == b"*";
    }
    everyone.then_some(Addressing::Everyone)
}

/// The encoded recipients at the start of a stored value (empty when the
/// value is damaged: it then reaches no one).
pub(crate) fn recipients_of(value: &[u8]) -> &[u8] {
    let Some(len) = value.get(..4) else {
        return &[];
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    value.get(4..4 + len).unwrap_or(&[])
}

/// [`EventLog::count`] by visiting every event.
///
/// # Errors
/// When the database fails or a value is damaged.
pub(crate) fn count_by_scan<L: EventLog + ?Sized>(
    log: &L,
    pattern: &Pattern,
    seqs: RangeInclusive<u64>,
    identities: &[&str],
    limit: u64,
) -> Result<Counted> {
    let mut counted = Counted { count: 0, last: 0 };
    if limit == 0 {
        return Ok(counted);
    }
    log.scan_expecting(pattern, seqs, limit, Reads::Waiting, &mut |event| {
        if event.is_addressed_to(identities) {
            counted.count += 1;
            counted.last = event.seq;
            if counted.count == limit {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;
    Ok(counted)
}

/// What [`EventLog::count`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Events counted, at most the limit.
    pub count: u64,
    /// The seq of the last one (meaningless when `count` is 0).
    pub last: u64,
}

/// How an event reaches a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// By its id or public key: queued for it from publication on.
    Direct,
    /// By `*` only: delivered to subscriptions that existed at publication.
    Everyone,
}

/// One event read out of the log.
#[derive(Debug, Clone)]
pub struct OwnedEvent {
    /// Its sequence number.
    pub seq: u64,
    /// Its name.
    pub name: String,
    /// Its stored value.
    pub value: Vec<u8>,
}

impl OwnedEvent {
    /// The event as a scan would visit it.
    ///
    /// # Errors
    /// When the value is damaged.
    pub fn view(&self) -> Result<EventView<'_>> {
        EventView::decode(self.seq, &self.name, &self.value)
    }
}

/// Encodes a recipient list: `u32 LE` byte length, then the entries
/// separated by NUL (`*` for everyone).
pub(crate) fn encode_recipients(recipients: &[Recipient], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    for (i, recipient) in recipients.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        match recipient {
            Recipient::All => out.push(b'*'),
            Recipient::Client(id) => out.extend_from_slice(id.as_str().as_bytes()),
        }
    }
    let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Whether a live event's recipients include one of `identities`.
pub fn addressed_to(recipients: &[Recipient], identities: &[&str]) -> bool {
    recipients.iter().any(|r| match r {
        Recipient::All => true,
        Recipient::Client(id) => identities.contains(&id.as_str()),
    })
}

/// Where a position falls in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// This sequence number.
    Seq(u64),
    /// No event at or after (for a start) or at or before (for an end).
    Nothing,
}

/// Which side of a range a position bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first event at or after the position.
    Start,
    /// The last event at or before the position.
    End,
}

/// A position that names no retained event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Invalid or expired position marker")]
pub struct UnknownPosition;

/// The event log and client state.
pub trait EventLog: Send + Sync + 'static {
    /// The highest sequence number stored (0 for an empty log).
    fn last_seq(&self) -> u64;

    /// Applies `ops` in order, assigning sequence numbers and timestamps
    /// (`loggedAt` never decreases). Durable when it returns, except a
    /// trim: that is durable after [`EventLog::flush`].
    ///
    /// # Errors
    /// When the database fails; nothing of `ops` is applied then.
    fn apply(&self, ops: &[WriteOp], now_ms: u64) -> Result<Vec<Applied>>;

    /// Makes everything applied so far durable.
    ///
    /// # Errors
    /// When the database cannot sync.
    fn flush(&self) -> Result<()>;

    /// Resolves a timestamp or event id to a sequence number. `Earliest`
    /// and old timestamps resolve to the oldest event.
    ///
    /// # Errors
    /// `Ok(Err(UnknownPosition))` for an event id that is not stored.
    fn resolve(
        &self,
        position: &ensync_protocol::field::Position,
        side: Side,
    ) -> Result<Result<Resolved, UnknownPosition>>;

    /// Visits the events whose name `pattern` matches and whose sequence
    /// number is in `seqs`, in sequence order, until `visit` breaks.
    ///
    /// # Errors
    /// When the database fails or a value is damaged.
    fn scan(
        &self,
        pattern: &Pattern,
        seqs: RangeInclusive<u64>,
        visit: &mut dyn FnMut(EventView<'_>) -> ControlFlow<()>,
    ) -> Result<()> {
        self.scan_expecting(pattern, seqs, u64::MAX, Reads::Waiting, visit)
    }

    /// [`EventLog::scan`] for a caller that expects to stop after about
    /// `want` events: the store then reads little past them. (It reads on
    /// as long as `visit` continues.) With [`Reads::Cached`] it stops at
    /// the first read that would wait for the disk, after visiting what
    /// came before.
    ///
    /// # Errors
    /// When the database fails or a value is damaged; with
    /// [`Reads::Cached`], [`StoreError::Uncached`] where a read would wait.
    fn scan_expecting(
        &self,
        pattern: &Pattern,
        seqs: RangeInclusive<u64>,
        want: u64,
        reads: Reads,
        visit: &mut dyn FnMut(EventView<'_>) -> ControlFlow<()>,
    ) -> Result<()>;

    /// Counts, in seq order, the events [`EventLog::scan`] would visit
    /// that are addressed to one of `identities` or to everyone, up to
    /// `limit`.
    ///
    /// # Errors
    /// When the database fails or a value is damaged.
    fn count(
        &self,
        pattern: &Pattern,
        seqs: RangeInclusive<u64>,
        identities: &[&str],
        limit: u64,
    ) -> Result<Counted> {
        count_by_scan(self, pattern, seqs, identities, limit)
    }

    /// The highest seq up to which no event in `seqs` that `pattern`
    /// matches is addressed to one of `identities` directly (by id or key
    /// rather than through `*`), as far as the store can tell without
    /// reading events; `seqs.start() - 1` when it cannot tell. A new
    /// subscription skips that far through history it would only scan for
    /// such events.
    ///
    /// # Errors
    /// When the database fails or a value is damaged.
    fn undirected_until(
        &self,
        pattern: &Pattern,
        seqs: RangeInclusive<u64>,
        identities: &[&str],
    ) -> Result<u64> {
        let _ = (pattern, identities);
        Ok(seqs.start().saturating_sub(1))
    }

    /// Looks one event up by id.
    ///
    /// # Errors
    /// When the database fails.
    fn event(&self, id: &EventId) -> Result<Option<OwnedEvent>>;

    /// Looks one event up by sequence number.
    ///
    /// # Errors
    /// When the database fails; with [`Reads::Cached`],
    /// [`StoreError::Uncached`] where a read would wait.
    fn event_at(&self, seq: u64, reads: Reads) -> Result<Option<OwnedEvent>>;

    /// The sequence number an id of this store names, if it names one.
    fn seq_of(&self, id: &EventId) -> Option<u64>;

    /// The oldest retained sequence number (`None` for an empty log).
    ///
    /// # Errors
    /// When the database fails.
    fn oldest(&self) -> Result<Option<u64>>;

    /// Bytes of events the log holds.
    fn stored_bytes(&self) -> u64;

    /// Bytes of the page cache that reads through maps may hold mapped
    /// ([`Reads::Mapped`]).
    fn mapped_bytes(&self) -> u64 {
        0
    }

    /// Every stored subscription.
    ///
    /// # Errors
    /// When the database fails or a value is damaged.
    fn subscriptions(&self) -> Result<Vec<Subscription>>;

    /// Whether `client` has ever settled an event (a cheap check that
    /// spares lookups for clients that never ACK).
    fn has_settlements(&self, client: &ClientId) -> bool;

    /// How `client` settled event `seq`, if it did.
    ///
    /// # Errors
    /// When the database fails or a value is damaged.
    fn settlement(&self, client: &ClientId, seq: u64) -> Result<Option<Settlement>>;

    /// The client's deferred events: `(seq, due ms)`.
    ///
    /// # Errors
    /// When the database fails or a value is damaged.
    fn deferred(&self, client: &ClientId) -> Result<Vec<(u64, u64)>>;

    /// Every stored operator replay: `(id, record)`.
    ///
    /// # Errors
    /// When the database fails.
    fn operations(&self) -> Result<Vec<(u64, Vec<u8>)>>;

    /// The client's queued replayed deliveries after `after`, in seq
    /// order, at most `max`: `(seq, replayed_at)`.
    ///
    /// # Errors
    /// When the database fails or a value is damaged.
    fn replay_queue(&self, client: &ClientId, after: u64, max: usize) -> Result<Vec<(u64, u64)>>;

    /// When the queued replayed delivery of `seq` to `client` was asked
    /// for, if one is queued.
    ///
    /// # Errors
    /// When the database fails or a value is damaged.
    fn queued_replay(&self, client: &ClientId, seq: u64) -> Result<Option<u64>>;
}
