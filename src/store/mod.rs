//! The storage the engine sees: an ordered event log with name, time and id
//! seeks, and the durable per-client state (subscriptions). The engine
//! knows this trait and these types; only `sled.rs` knows sled.

use std::ops::{ControlFlow, RangeInclusive};

use ensync_protocol::field::{ClientId, EventId, EventName, Metadata, Pattern, Payload, Recipient};
use ensync_protocol::StoredRecord;

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
            WriteOp::Subscribe { .. } => 128,
        }
    }
}

/// What applying one [`WriteOp`] produced.
#[derive(Debug, Clone)]
pub enum Applied {
    /// The event's place in the log.
    Published(Appended),
    /// The subscription, new or existing.
    Subscribed(Subscription),
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
    /// Its name.
    pub name: EventName,
    /// Its recipients.
    pub recipients: Vec<Recipient>,
    /// Its stored record (see `ensync_protocol::record`).
    pub record: bytes::Bytes,
}

/// A durable subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The subscriber.
    pub client: ClientId,
    /// What it covers.
    pub pattern: Pattern,
    /// Live delivery covers events after this sequence number.
    pub since: u64,
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
    pub fn is_addressed_to(&self, identities: &[&str]) -> bool {
        recipients_iter(self.recipients)
            .any(|r| r == "*" || identities.iter().any(|id| id.as_bytes() == r.as_bytes()))
    }
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

fn recipients_iter(encoded: &[u8]) -> impl Iterator<Item = &str> {
    encoded
        .split(|b| *b == 0)
        .filter_map(|r| std::str::from_utf8(r).ok())
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
    /// (`loggedAt` never decreases). Not durable until [`EventLog::flush`].
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
    ) -> Result<()>;

    /// Looks one event up by id.
    ///
    /// # Errors
    /// When the database fails.
    fn event(&self, id: &EventId) -> Result<Option<OwnedEvent>>;

    /// Every stored subscription.
    ///
    /// # Errors
    /// When the database fails or a value is damaged.
    fn subscriptions(&self) -> Result<Vec<Subscription>>;
}
