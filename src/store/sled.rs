//! The sled implementation of [`EventLog`]: the only file that names sled.
//!
//! Everything lives in one tree so that one commit is one atomic batch.
//! Keys start with a table byte; numbers are big-endian so byte order is
//! numeric order:
//!
//! | key                               | value                         |
//! |-----------------------------------|-------------------------------|
//! | `e` name `\0` seq                 | recipients + stored record    |
//! | `s` seq                           | name (id lookups, oldest)     |
//! | `t` loggedAt                      | first seq logged at that ms   |
//! | `n` name                          | empty (the names in the log)  |
//! | `u` client `\0` pattern           | `since` seq                   |
//! | `m` `epoch`                       | store epoch (`u32`)           |
//!
//! Events of one name are contiguous and in sequence order, so a replay of
//! a name is one seek and an in-order scan; a pattern merges the scans of
//! its names. `loggedAt` never decreases along the log, which makes the
//! `t` table a seek from any timestamp to a sequence number.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::ops::{ControlFlow, RangeInclusive};
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use ensync_protocol::field::{ClientId, EventId, Pattern, Position};
use ensync_protocol::{encode_record, RecordFields};
use sled::{Batch, Db, IVec, Tree};

use super::{
    encode_recipients, Appended, Applied, EventLog, EventView, OwnedEvent, Resolved, Result, Side,
    StoreError, Subscription, UnknownPosition, WriteOp,
};

const EVENT: u8 = b'e';
const SEQ: u8 = b's';
const TIME: u8 = b't';
const NAME: u8 = b'n';
const SUB: u8 = b'u';
const EPOCH_KEY: &[u8] = b"mepoch";

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// Counters the commit thread advances.
#[derive(Debug)]
struct Tail {
    last_seq: u64,
    last_ts: u64,
    names: HashSet<String>,
}

/// An event log in a sled database directory.
#[derive(Debug)]
pub struct SledLog {
    db: Db,
    tree: Tree,
    epoch: u32,
    tail: Mutex<Tail>,
}

fn event_key(name: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 10);
    key.push(EVENT);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn num_key(table: u8, n: u64) -> [u8; 9] {
    let mut key = [table; 9];
    key[1..].copy_from_slice(&n.to_be_bytes());
    key
}

fn be_u64(bytes: &[u8]) -> Result<u64> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Damaged(format!("expected 8 bytes, found {}", bytes.len())))
}

fn utf8(bytes: &[u8]) -> Result<&str> {
    std::str::from_utf8(bytes).map_err(|_| StoreError::Damaged("a name is not UTF-8".into()))
}

/// A fresh store's epoch: makes ids of a wiped and recreated store differ
/// from the old ones.
fn new_epoch() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mixed = (nanos as u64) ^ (u64::from(std::process::id()) << 32);
    (mixed ^ (mixed >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15) as u32
}

impl SledLog {
    /// Opens (or creates) the log in `dir`.
    ///
    /// # Errors
    /// When the directory cannot be opened (missing permissions, another
    /// process holding it) or its contents are damaged.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .cache_capacity(256 * 1024 * 1024)
            .open()?;
        let tree = db.open_tree("log")?;
        let epoch = match tree.get(EPOCH_KEY)? {
            Some(v) => u32::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Damaged("bad epoch".into()))?,
            ),
            None => {
                let epoch = new_epoch();
                tree.insert(EPOCH_KEY, &epoch.to_be_bytes())?;
                db.flush()?;
                epoch
            }
        };
        let last_seq = match tree.scan_prefix([SEQ]).next_back() {
            Some(entry) => be_u64(&entry?.0[1..])?,
            None => 0,
        };
        let last_ts = match tree.scan_prefix([TIME]).next_back() {
            Some(entry) => be_u64(&entry?.0[1..])?,
            None => 0,
        };
        let mut names = HashSet::new();
        for entry in tree.scan_prefix([NAME]) {
            names.insert(utf8(&entry?.0[1..])?.to_owned());
        }
        Ok(Self {
            db,
            tree,
            epoch,
            tail: Mutex::new(Tail {
                last_seq,
                last_ts,
                names,
            }),
        })
    }

    fn idem(&self, seq: u64) -> String {
        format!("evt_{:08x}{seq:016x}", self.epoch)
    }

    /// The sequence number an id of this store names.
    fn seq_of(&self, id: &EventId) -> Option<u64> {
        let hex = id.as_str().strip_prefix("evt_")?;
        if hex.len() != 24 {
            return None;
        }
        let epoch = u32::from_str_radix(hex.get(..8)?, 16).ok()?;
        let seq = u64::from_str_radix(hex.get(8..)?, 16).ok()?;
        (epoch == self.epoch).then_some(seq)
    }

    fn oldest_seq(&self) -> Result<Option<u64>> {
        match self.tree.scan_prefix([SEQ]).next() {
            Some(entry) => Ok(Some(be_u64(&entry?.0[1..])?)),
            None => Ok(None),
        }
    }

    /// The names `pattern` matches.
    fn names(&self, pattern: &Pattern) -> Result<Vec<String>> {
        if let Pattern::Exact(name) = pattern {
            return Ok(vec![name.as_str().to_owned()]);
        }
        let mut prefix = vec![NAME];
        prefix.extend_from_slice(pattern.prefix().as_bytes());
        let mut names = Vec::new();
        for entry in self.tree.scan_prefix(&prefix) {
            let name = utf8(&entry?.0[1..])?.to_owned();
            if pattern.matches(&name) {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn name_range(
        &self,
        name: &str,
        seqs: &RangeInclusive<u64>,
    ) -> impl Iterator<Item = sled::Result<(IVec, IVec)>> {
        self.tree
            .range(event_key(name, *seqs.start())..=event_key(name, *seqs.end()))
    }
}

fn visit_entry(
    name: &str,
    entry: sled::Result<(IVec, IVec)>,
    visit: &mut dyn FnMut(EventView<'_>) -> ControlFlow<()>,
) -> Result<ControlFlow<()>> {
    let (key, value) = entry?;
    let seq = be_u64(&key[key.len() - 8..])?;
    Ok(visit(EventView::decode(seq, name, &value)?))
}

impl EventLog for SledLog {
    fn last_seq(&self) -> u64 {
        self.tail
            .lock()
            .expect("tail lock is never poisoned")
            .last_seq
    }

    fn apply(&self, ops: &[WriteOp], now_ms: u64) -> Result<Vec<Applied>> {
        let mut tail = self.tail.lock().expect("tail lock is never poisoned");
        let (mut seq, mut ts) = (tail.last_seq, tail.last_ts);
        let mut new_names = Vec::new();
        let mut batch = Batch::default();
        let mut applied = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                WriteOp::Publish(event) => {
                    seq += 1;
                    // NOTE: a clock that steps back keeps the last
                    // timestamp, so `loggedAt` never decreases along the log.
                    if now_ms > ts {
                        ts = now_ms;
                        batch.insert(&num_key(TIME, ts), &seq.to_be_bytes());
                    }
                    let name = event.name.as_str();
                    if !tail.names.contains(name) && !new_names.iter().any(|n: &String| n == name) {
                        new_names.push(name.to_owned());
                        let mut key = vec![NAME];
                        key.extend_from_slice(name.as_bytes());
                        batch.insert(key, &[]);
                    }
                    let idem = self.idem(seq);
                    let record = encode_record(&RecordFields {
                        idem: &idem,
                        block: seq,
                        name,
                        logged_at: ts,
                        sender: event.sender.as_str(),
                        payload: &event.payload,
                        metadata: event.metadata.as_ref(),
                    });
                    let mut value = Vec::with_capacity(record.len() + 64);
                    encode_recipients(&event.recipients, &mut value);
                    value.extend_from_slice(&record);
                    batch.insert(event_key(name, seq), value);
                    batch.insert(&num_key(SEQ, seq), name.as_bytes());
                    applied.push(Applied::Published(Appended {
                        seq,
                        idem,
                        logged_at: ts,
                        name: event.name.clone(),
                        recipients: event.recipients.clone(),
                        record: Bytes::from(record),
                    }));
                }
                WriteOp::Subscribe { client, pattern } => {
                    let key = sub_key(client, pattern);
                    let since = match self.tree.get(&key)? {
                        Some(existing) => be_u64(&existing)?,
                        None => {
                            batch.insert(key, &seq.to_be_bytes());
                            seq
                        }
                    };
                    applied.push(Applied::Subscribed(Subscription {
                        client: client.clone(),
                        pattern: pattern.clone(),
                        since,
                    }));
                }
            }
        }
        self.tree.apply_batch(batch)?;
        tail.last_seq = seq;
        tail.last_ts = ts;
        tail.names.extend(new_names);
        Ok(applied)
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn resolve(
        &self,
        position: &Position,
        side: Side,
    ) -> Result<Result<Resolved, UnknownPosition>> {
        let last = self.last_seq();
        let Some(oldest) = self.oldest_seq()? else {
            return Ok(match position {
                Position::Event(_) => Err(UnknownPosition),
                _ => Ok(Resolved::Nothing),
            });
        };
        let first_at_or_after = |ms: u64| -> Result<Option<u64>> {
            match self
                .tree
                .range(num_key(TIME, ms)..num_key(TIME, u64::MAX))
                .next()
            {
                Some(entry) => Ok(Some(be_u64(&entry?.1)?)),
                None => Ok(None),
            }
        };
        let resolved = match (position, side) {
            (Position::Earliest, _) => Resolved::Seq(oldest),
            (Position::Timestamp(ms), Side::Start) => match first_at_or_after(*ms)? {
                Some(seq) => Resolved::Seq(seq.max(oldest)),
                None => Resolved::Nothing,
            },
            (Position::Timestamp(ms), Side::End) => {
                let after = match ms.checked_add(1) {
                    Some(next) => first_at_or_after(next)?,
                    None => None,
                };
                match after {
                    Some(seq) if seq > oldest => Resolved::Seq(seq - 1),
                    Some(_) => Resolved::Nothing,
                    None => Resolved::Seq(last),
                }
            }
            (Position::Event(id), _) => match self.seq_of(id) {
                Some(seq) if self.tree.contains_key(num_key(SEQ, seq))? => Resolved::Seq(seq),
                _ => return Ok(Err(UnknownPosition)),
            },
        };
        Ok(Ok(resolved))
    }

    fn scan(
        &self,
        pattern: &Pattern,
        seqs: RangeInclusive<u64>,
        visit: &mut dyn FnMut(EventView<'_>) -> ControlFlow<()>,
    ) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let names = self.names(pattern)?;
        if let [name] = names.as_slice() {
            for entry in self.name_range(name, &seqs) {
                if visit_entry(name, entry, visit)?.is_break() {
                    break;
                }
            }
            return Ok(());
        }
        // Merge the names' runs by sequence number: a heap of each run's
        // next entry.
        let mut runs: Vec<_> = names.iter().map(|n| self.name_range(n, &seqs)).collect();
        let mut heads: Vec<Option<(IVec, IVec)>> = Vec::with_capacity(runs.len());
        let mut heap = BinaryHeap::with_capacity(runs.len());
        for (i, run) in runs.iter_mut().enumerate() {
            let head = run.next().transpose()?;
            if let Some((key, _)) = &head {
                heap.push(Reverse((be_u64(&key[key.len() - 8..])?, i)));
            }
            heads.push(head);
        }
        while let Some(Reverse((_, i))) = heap.pop() {
            let entry = heads[i].take().expect("a heap entry has a head");
            if visit_entry(&names[i], Ok(entry), visit)?.is_break() {
                break;
            }
            if let Some((key, value)) = runs[i].next().transpose()? {
                heap.push(Reverse((be_u64(&key[key.len() - 8..])?, i)));
                heads[i] = Some((key, value));
            }
        }
        Ok(())
    }

    fn event(&self, id: &EventId) -> Result<Option<OwnedEvent>> {
        let Some(seq) = self.seq_of(id) else {
            return Ok(None);
        };
        let Some(name) = self.tree.get(num_key(SEQ, seq))? else {
            return Ok(None);
        };
        let name = utf8(&name)?.to_owned();
        Ok(self
            .tree
            .get(event_key(&name, seq))?
            .map(|value| OwnedEvent {
                seq,
                name,
                value: value.to_vec(),
            }))
    }

    fn subscriptions(&self) -> Result<Vec<Subscription>> {
        let mut subs = Vec::new();
        for entry in self.tree.scan_prefix([SUB]) {
            let (key, value) = entry?;
            let text = utf8(&key[1..])?;
            let (client, pattern) = text
                .split_once('\0')
                .ok_or_else(|| StoreError::Damaged("subscription key without pattern".into()))?;
            let damaged = |e| StoreError::Damaged(format!("subscription {text:?}: {e}"));
            subs.push(Subscription {
                client: client.parse::<ClientId>().map_err(damaged)?,
                pattern: pattern.parse::<Pattern>().map_err(damaged)?,
                since: be_u64(&value)?,
            });
        }
        Ok(subs)
    }
}

fn sub_key(client: &ClientId, pattern: &Pattern) -> Vec<u8> {
    let mut key = vec![SUB];
    key.extend_from_slice(client.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(pattern.to_string().as_bytes());
    key
}
