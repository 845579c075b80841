//! The sled implementation of [`EventLog`]: the only file that names sled.
//!
//! The bytes of event chunks live in append-only segment files
//! ([`super::segments`]); everything else lives in one sled tree, so that
//! one commit is one atomic batch. Keys start with a table byte; numbers
//! are big-endian so byte order is numeric order:
//!
//! | key                         | value                                    |
//! |-----------------------------|------------------------------------------|
//! | `e` name `\0` first seq     | where the chunk lies: events of one name |
//! |                             | in seq order, in a segment file; then    |
//! |                             | where every 8th entry starts (offsets)   |
//! | `g` segment                 | the last seq the segment holds, and where |
//! |                             | the bytes sled references in it end      |
//! | `r` name `\0` recipient     | the first seq of name addressed to the   |
//! |                             | recipient by id or key (not by `*`)      |
//! | `c` name `\0` first seq     | the chunk's summary: last seq, count, and |
//! |                             | the recipients all its events share      |
//! | `b` first seq               | the commit's chunks: (first seq, name)*  |
//! | `t` loggedAt                | first seq logged at that millisecond     |
//! | `n` name                    | empty (the names in the log)             |
//! | `u` client `\0` pattern     | since seq, paused flag, delivery floor   |
//! | `k` seq client              | how the client settled the event         |
//! | `d` seq client              | when the client's deferred event is due  |
//! | `s` client                  | empty (the client has settled something) |
//! | `m` `epoch` / `last` / `size` | store epoch (`u32`) / last seq / bytes |
//! | `m` `redo`                  | where the frame of the last commit in   |
//! |                             | the tree ends: segment, offset          |
//!
//! Settlements and deferrals are keyed by seq first, so retention removes
//! them with the events, by one range.
//!
//! A commit is durable once its frame in the segments is: its chunks and
//! the writes it makes to the tree, synced together. The tree is synced
//! by the first commit [`INDEX_SYNC`] after the last; opening the store
//! applies the frames after `m` `redo` again, so one sync per commit is
//! all a reply waits for. Retention's trims are not framed: each is
//! synced on its own.
//!
//! A group commit stores its events of one name as one chunk (split at
//! `MAX_CHUNK_BYTES`), appended to the newest segment: one write per chunk,
//! one small sled insert per chunk (sled copies a leaf on every insert, so
//! leaves of 16-byte locations keep that cheap), and a scan reads many
//! records per positioned read. A chunk is a run of
//! entries `seq: u64 BE, len: u32 LE, value`, where value is the encoded
//! recipients followed by the stored record.
//!
//! A read takes only the part of a chunk it needs: it starts at the last
//! offset at or before its first seq and, for a caller that expects few
//! events (a LIMIT replay, a lookup by id), stops at the first offset past
//! them, reading on only if the caller goes on.
//!
//! A name whose events are published one or a few at a time has a small
//! chunk per commit, and its next chunks (or, for names published side by
//! side, theirs) often lie right after it in the segment: a scan that
//! reads a small chunk to its end takes the segment bytes after it too,
//! as many as the entries it still wants would fill (at most 64 KiB in
//! all), and copies the chunks it finds there from memory. The names a
//! scan merges share one such buffer. After its first 16 chunks a name's
//! cursor walks the name's chunk keys in order instead of looking each
//! up.
//!
//! A replay counts its events (for the header's COUNT) from the summaries
//! where it can: a chunk inside the range whose events share their
//! recipients counts all or none of them without being read.
//!
//! A replay of a name seeks to the chunk holding its start and reads
//! forward; a pattern merges the scans of its names by seq. A pattern of
//! more names than a merge takes ([`MERGE_NAMES`]), or a range of fewer
//! seqs than the pattern has names, walks the `b` table instead, commit
//! by commit, reading the chunks of the names it matches. `loggedAt`
//! never decreases along the log, which makes the `t` table a seek from any
//! timestamp to a seq; the `b` table finds the chunk holding any seq.
//! The newest chunks and milliseconds are listed in memory as well
//! ([`Directory`]): a seek or scan into them finds its chunk, and the next
//! ones, without sled's range lookups.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::ops::{ControlFlow, RangeInclusive};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ensync_protocol::field::{ClientId, EventId, Pattern, Position, Recipient};
use ensync_protocol::{encode_record_into, RecordFields};
use sled::{Batch, Db, Tree};
use tracing::{error, info, warn};

use super::directory::{Directory, Found};
use super::segments::{Frame, Loc, MappedBytes, ReadBuf, Segments, View};
use super::{
    addressing_of, count_by_scan, encode_recipients, recipients_of, Addressing, Appended, Applied,
    Counted, EventLog, EventView, OwnedEvent, PauseRefused, Queued, Reads, Resolved, Result,
    Settlement, Side, StoreError, Subscription, Trim, Trimmed, UnknownPosition, WriteOp,
};

const CHUNK: u8 = b'e';
const SUMMARY: u8 = b'c';
const COMMIT: u8 = b'b';
const TIME: u8 = b't';
const NAME: u8 = b'n';
const SUB: u8 = b'u';
const SETTLED: u8 = b'k';
const DEFERRED: u8 = b'd';
const SETTLER: u8 = b's';
const OPERATION: u8 = b'o';
const SEGMENT: u8 = b'g';
const DIRECT: u8 = b'r';
const REPLAY_QUEUE: u8 = b'q';
const EPOCH_KEY: &[u8] = b"mepoch";
const LAST_KEY: &[u8] = b"mlast";
const SIZE_KEY: &[u8] = b"msize";
/// Present once every chunk has its summary.
const SUMMARIES_KEY: &[u8] = b"msummaries";
/// Present once every chunk's bytes are in segment files.
const SEGMENTS_KEY: &[u8] = b"msegments";
/// Present once the `r` table covers every event.
const DIRECTS_KEY: &[u8] = b"mdirects";
/// The bytes a commit of one small chunk adds to the segment besides it:
/// the frame's head and the commit's writes to the tree (about 160 bytes
/// for an event to a name already in the log).
const FRAME_ROOM: u64 = 160;
/// Where the frame of the last commit the tree holds ends
/// ([`Segments::redo_from`]).
const REDO_KEY: &[u8] = b"mredo";
/// How often the tree is synced: a reopen applies again at most this
/// long's commits from their frames.
const INDEX_SYNC: Duration = Duration::from_millis(500);
/// Settlement values: the first byte says which.
const ACKED: u8 = 0;
const DISCARDED: u8 = 1;
/// A chunk is closed once it holds this many bytes: large enough that a
/// scan reads many records per positioned read and a replay of a few
/// dozen usually finds them in one chunk. Its size does not slow finding
/// one event: the chunk's offsets bound what is read.
const MAX_CHUNK_BYTES: usize = 64 * 1024;
/// The most a read of a chunk's last part takes in all, with the segment
/// bytes after it ([`ahead_of`]).
const READ_AHEAD: u32 = 64 * 1024;
/// A cursor looks up this many chunks by key before it walks them in key
/// order. A look costs a descent of sled's tree; a walk's first step
/// copies a leaf, and its next steps cost less than a descent. A LIMIT
/// replay, or a slice of a replay of large chunks, needs a few chunks and
/// never walks; a replay of a name published a few events at a time
/// crosses hundreds of small chunks, and walks.
const LOOKS_BEFORE_WALK: u32 = 16;
/// A scan that reads a chunk under this many bytes to its end reads the
/// segment bytes after it too ([`ahead_of`]).
const SMALL_CHUNK: u32 = 8 * 1024;
/// The directory of the newest chunks and milliseconds takes this part of
/// the index's memory (`store.index_cache`): an eighth, 32 MiB by default,
/// lists the chunks of about 24 million events published in bulk, or
/// about 450,000 chunks of an event or a few (a name published an event
/// at a time).
const DIRECTORY_SHARE: u64 = 8;
/// Bytes before each value in a chunk: seq and length.
const ENTRY_HEAD: usize = 12;
/// A chunk's location is followed by the offset of every this many
/// entries: `seq - first: u32 BE, byte offset: u32 BE`, so that a read
/// from the middle of a chunk skips what it does not need. (Chunks stored
/// before offsets were kept have none, and are read whole.)
const OFFSET_EVERY: usize = 8;
/// The most entries a scan that merges several names reads of each at a
/// time: what it holds in memory per name.
const MERGE_READ: u64 = 64;
/// Entries a scan that merges several names reads at a time over all of
/// them: shared among the names, down to one offset's worth each
/// ([`OFFSET_EVERY`]), so a merge over hundreds of names holds about as
/// much as one over a few.
const MERGE_READS: u64 = 4096;
/// The most names a scan merges, a cursor each. A pattern that matches
/// more is scanned commit by commit ([`SledLog::walk`]): a merge looks up
/// every name, and holds a read of each, whether or not it has events in
/// the range, so over thousands of names a live delivery took hundreds
/// of milliseconds and a replay hundreds of megabytes.
const MERGE_NAMES: usize = 64;
/// Commits a walk steps through per name its pattern matches before it
/// merges the names instead ([`SledLog::walk`]): about what a step costs
/// against a name's lookup.
const STEPS_PER_NAME: u64 = 32;
/// The most names a walk merges instead: a merge holds a read of each
/// ([`MERGE_READS`], down to [`OFFSET_EVERY`] entries a name).
const MERGE_NAMES_AFTER_WALK: usize = 1024;
/// Most chunk summaries one look for directly addressed events reads per
/// name: bounds the time it takes.
const SKIP_SUMMARIES: usize = 256;
/// The most `r` entries a new subscription's skip reads under its
/// pattern's prefix before it looks each name up instead.
const DIRECTS_SCANNED: usize = 4096;

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
    /// Bytes of event chunks stored.
    bytes: u64,
    names: HashSet<String>,
    /// Chunk buffers the last commit wrote out, kept for the next one.
    spare_chunks: Vec<Vec<u8>>,
    /// When the tree was last synced by a commit.
    synced: Instant,
    /// Why a commit failed after its frame was written, if one did.
    failed: Option<String>,
}

/// An event log in a sled database directory.
#[derive(Debug)]
pub struct SledLog {
    /// Declared first, so that it ends before the tree closes.
    #[allow(dead_code, reason = "held for its drop, which stops the thread")]
    filling: Filling,
    db: Db,
    tree: Tree,
    segments: Segments,
    epoch: u32,
    tail: Mutex<Tail>,
    /// Mirrors `Tail::bytes` for readers that must not wait on a commit.
    bytes: AtomicU64,
    /// The oldest stored seq, 0 when the log is empty: every replay needs
    /// it, so it is kept rather than looked up.
    oldest: AtomicU64,
    /// Clients with at least one settlement.
    settlers: RwLock<HashSet<String>>,
    /// The newest chunks and milliseconds, found without sled.
    directory: Arc<Directory<sled::IVec>>,
    /// How often commits sync the tree ([`INDEX_SYNC`]).
    sync_every: Option<Duration>,
    /// Patterns known to match more names than the number each has:
    /// [`SledLog::names_within`] counts them in sled's table of names, a
    /// step of sled's iterator per name.
    crowded: RwLock<HashMap<String, usize>>,
}

/// The most patterns [`SledLog::crowded`] holds; past it, it starts over.
const CROWDED_PATTERNS: usize = 1024;

fn chunk_key(name: &str, first_seq: u64) -> Vec<u8> {
    name_seq_key(CHUNK, name, first_seq)
}

fn summary_key(name: &str, first_seq: u64) -> Vec<u8> {
    name_seq_key(SUMMARY, name, first_seq)
}

fn name_seq_key(table: u8, name: &str, first_seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 10);
    key.push(table);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(&first_seq.to_be_bytes());
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

/// The entry of `chunk` at `pos`: its seq, its value, and where the next
/// entry starts.
fn entry_at(chunk: &[u8], pos: usize) -> Result<(u64, &[u8], usize)> {
    let damaged = || StoreError::Damaged(format!("chunk entry at byte {pos} is cut short"));
    let head = chunk.get(pos..pos + ENTRY_HEAD).ok_or_else(damaged)?;
    let seq = be_u64(&head[..8])?;
    let len = u32::from_le_bytes(head[8..].try_into().map_err(|_| damaged())?) as usize;
    let start = pos + ENTRY_HEAD;
    let value = chunk.get(start..start + len).ok_or_else(damaged)?;
    Ok((seq, value, start + len))
}

/// A chunk's entries in order, `(seq, value)`, until the end or the
/// damage that stops them.
fn entries(chunk: &[u8]) -> impl Iterator<Item = Result<(u64, &[u8])>> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= chunk.len() {
            return None;
        }
        Some(match entry_at(chunk, pos) {
            Ok((seq, value, next)) => {
                pos = next;
                Ok((seq, value))
            }
            Err(e) => {
                pos = chunk.len();
                Err(e)
            }
        })
    })
}

/// An entry of a chunk whose start the chunk's offsets give: every
/// [`OFFSET_EVERY`]th entry, and the first.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The entry's position in the chunk, from 0.
    index: u64,
    seq: u64,
    /// Where the entry starts in the chunk.
    offset: u32,
}

/// How many marks a chunk (location and offsets in `value`) has after its
/// first entry.
fn mark_count(value: &[u8]) -> u64 {
    (value.len().saturating_sub(16) / 8) as u64
}

/// Mark `k` (from 1) of a chunk (location and offsets in `value`, first
/// seq `first`), if it has one.
fn mark(value: &[u8], first: u64, k: u64) -> Option<Mark> {
    let at = usize::try_from(k.checked_sub(1)?)
        .ok()?
        .checked_mul(8)?
        .checked_add(16)?;
    let mark = value.get(at..at.checked_add(8)?)?;
    Some(Mark {
        index: k.saturating_mul(OFFSET_EVERY as u64),
        seq: first.saturating_add(u64::from(u32::from_be_bytes([
            mark[0], mark[1], mark[2], mark[3],
        ]))),
        offset: u32::from_be_bytes([mark[4], mark[5], mark[6], mark[7]]),
    })
}

/// Where a read of a chunk for its entries from seq `from` on starts: the
/// last mark at or before `from`, and the position of the first entry
/// with seq `from` or later (or a bound on it: when the seqs between two
/// marks have no gap, the position is known).
fn start_mark(value: &[u8], first: u64, from: u64) -> (Mark, u64) {
    // The marks' seqs rise, so the first past `from` is found by halving:
    // a chunk of a large commit has hundreds.
    let past = |k| mark(value, first, k).map_or(true, |mark| mark.seq > from);
    let (mut low, mut high) = (1, mark_count(value) + 1);
    while low < high {
        let middle = low + (high - low) / 2;
        if past(middle) {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    let start = mark(value, first, low - 1).unwrap_or(Mark {
        index: 0,
        seq: first,
        offset: 0,
    });
    let Some(next) = mark(value, first, low) else {
        // Past the last mark: the entries after it are read to the end.
        return (start, start.index);
    };
    let gapless = next.seq - start.seq == next.index - start.index;
    let index = if gapless {
        start.index + from.saturating_sub(start.seq)
    } else {
        next.index
    };
    (start, index)
}

/// The first mark at or past position `index`: where a read that needs
/// the entries before `index` may stop (`None`: at the chunk's end).
fn mark_at_or_past(value: &[u8], first: u64, index: u64) -> Option<Mark> {
    mark(value, first, index.div_ceil(OFFSET_EVERY as u64).max(1))
}

/// `true` once a read of the chunk under `key` went well, `false` when it
/// failed because retention removed the chunk.
fn or_gone(tree: &Tree, key: &[u8], read: Result<()>) -> Result<bool> {
    match read {
        Ok(()) => Ok(true),
        Err(_) if !tree.contains_key(key)? => Ok(false),
        Err(e) => Err(e),
    }
}

/// How many bytes past the end of `part`, the last part of the small
/// chunk at `whole` (offsets in `value`), a cursor that wants `entries`
/// entries from the part's start on reads along with it: what those
/// entries take at the chunk's bytes per entry, up to [`READ_AHEAD`] in
/// all.
///
/// A name published an event or a few at a time has a small chunk per
/// commit, often side by side in the segment; reading ahead copies those
/// that follow from memory instead of reading each on its own. A large
/// chunk (one of many events published together) is read alone: the
/// chunk after it is as large, and would be read again in full. Each
/// small chunk is taken to come with its commit's frame ([`FRAME_ROOM`]).
fn ahead_of(whole: Loc, value: &[u8], part: Loc, entries: u64) -> u32 {
    if whole.len >= SMALL_CHUNK {
        return 0;
    }
    // A chunk with k offsets holds at least 8k + 1 entries.
    let held = mark_count(value) * OFFSET_EVERY as u64 + 1;
    let per_entry = (u64::from(whole.len) + FRAME_ROOM) / held;
    let wanted = entries.saturating_mul(per_entry).min(u64::from(READ_AHEAD));
    u32::try_from(wanted.saturating_sub(u64::from(part.len))).unwrap_or(0)
}

/// The bytes of a chunk at `loc` from mark `from` to mark `to` (to the
/// end without one).
fn between(loc: Loc, from: Mark, to: Option<Mark>) -> Loc {
    loc.part(from.offset, to.map_or(loc.len, |to| to.offset))
}

/// The number the hex digits spell (either case; 16 digits at most), or
/// `None` for anything else: a loop the compiler keeps small, where
/// `from_str_radix` (signs, any radix) cost a seek from an id twice over.
fn from_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        let nibble = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return None,
        };
        Some(n << 4 | u64::from(nibble))
    })
}

/// Appends the low `digits` hex digits of `n`, lower case.
fn push_hex(out: &mut String, n: u64, digits: u32) {
    for i in (0..digits).rev() {
        let nibble = (n >> (i * 4)) & 0xf;
        out.push(char::from(b"0123456789abcdef"[nibble as usize]));
    }
}

fn put_entry(chunk: &mut Vec<u8>, seq: u64, value: &[u8]) {
    chunk.extend_from_slice(&seq.to_be_bytes());
    // Values are bounded by the line length limit, far below 4 GiB.
    let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
    chunk.extend_from_slice(&len.to_le_bytes());
    chunk.extend_from_slice(value);
}

/// The chunks one commit wrote: `(first seq, name)` pairs.
fn decode_commit(value: &[u8]) -> Result<Vec<(u64, &str)>> {
    // An entry takes 11 bytes at least: room for all without growing (a
    // commit to thousands of names grew and copied this list ten times).
    let mut chunks = Vec::with_capacity(value.len() / 11);
    let mut pos = 0;
    while pos < value.len() {
        let damaged = || StoreError::Damaged("commit index entry is cut short".into());
        let first = be_u64(value.get(pos..pos + 8).ok_or_else(damaged)?)?;
        let len_bytes = value.get(pos + 8..pos + 10).ok_or_else(damaged)?;
        let len = u16::from_le_bytes([len_bytes[0], len_bytes[1]]) as usize;
        let name = utf8(value.get(pos + 10..pos + 10 + len).ok_or_else(damaged)?)?;
        chunks.push((first, name));
        pos += 10 + len;
    }
    Ok(chunks)
}

/// The thread that lists in the directory what was logged before the
/// store opened; stopped and waited for when dropped.
#[derive(Debug)]
struct Filling {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Filling {
    /// Starts listing the commits up to seq `last_seq` and the
    /// milliseconds up to `last_ts`, the newest first.
    fn start(
        tree: &Tree,
        directory: &Arc<Directory<sled::IVec>>,
        last_seq: u64,
        last_ts: u64,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = (last_seq > 0)
            .then(|| {
                let (tree, directory, stop) =
                    (tree.clone(), Arc::clone(directory), Arc::clone(&stop));
                std::thread::Builder::new()
                    .name("ensync-directory".into())
                    .spawn(move || {
                        let started = Instant::now();
                        match fill(&tree, &directory, last_seq, last_ts, &stop) {
                            Ok(commits) => info!(
                                commits,
                                ms = started.elapsed().as_millis(),
                                "listed the newest commits logged before the start"
                            ),
                            Err(e) => warn!(
                                "listing the commits logged before the start stopped: {e}; seeks into the rest look them up in the index"
                            ),
                        }
                    })
            })
            .transpose()
            .map_err(|e| StoreError::Backend(format!("cannot start a thread: {e}")))?;
        Ok(Self { stop, thread })
    }

    /// Waits for the thread to end.
    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.join();
    }
}

/// Lists the commits up to seq `last_seq` in `directory`, a commit at a
/// time from the newest back, with the milliseconds up to `last_ts` their
/// events were logged at, until the directory takes no more (its budget
/// is reached, retention removed the rest) or `stop` is set; says how
/// many it listed.
fn fill(
    tree: &Tree,
    directory: &Directory<sled::IVec>,
    last_seq: u64,
    last_ts: u64,
    stop: &AtomicBool,
) -> Result<u64> {
    let mut listed = 0;
    let mut times = tree
        .range(num_key(TIME, 0)..=num_key(TIME, last_ts))
        .rev()
        .peekable();
    let commits = tree.range(num_key(COMMIT, 0)..=num_key(COMMIT, last_seq));
    for entry in commits.rev() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (key, index) = entry?;
        let commit_first = be_u64(&key[1..])?;
        let mut chunks = Vec::new();
        for (first, name) in decode_commit(&index)? {
            let (Some(value), Some(summary)) = (
                tree.get(chunk_key(name, first))?,
                tree.get(summary_key(name, first))?,
            ) else {
                // Retention removed it since.
                return Ok(listed);
            };
            chunks.push((name, first, Summary::decode(&summary)?.last, value));
        }
        let mut ms = Vec::new();
        while let Some(entry) = times.peek() {
            let (key, seq) = entry.as_ref().map_err(|e| StoreError::from(e.clone()))?;
            let seq = be_u64(seq)?;
            if seq < commit_first {
                break;
            }
            ms.push((be_u64(&key[1..])?, seq));
            times.next();
        }
        if !directory.add_older(&chunks, &ms) {
            break;
        }
        listed += 1;
    }
    Ok(listed)
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

/// What a chunk's summary says: enough to count its events for a client
/// without reading them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Summary {
    /// The seq of its last event.
    last: u64,
    /// How many events it holds.
    count: u32,
    /// The encoded recipients every event in it has, or `None` when they
    /// differ.
    shared: Option<Vec<u8>>,
}

impl Summary {
    /// The summary of a chunk that starts with event `seq` for `recipients`,
    /// before that event is counted in.
    fn starting(seq: u64, recipients: &[u8]) -> Self {
        Self {
            last: seq,
            count: 0,
            shared: Some(recipients.to_vec()),
        }
    }

    /// Counts event `seq` for `recipients` in.
    fn add(&mut self, seq: u64, recipients: &[u8]) {
        self.last = seq;
        self.count += 1;
        if self.shared.as_deref().is_some_and(|r| r != recipients) {
            self.shared = None;
        }
    }

    /// `last: u64 BE`, `count: u32 LE`, then, if the events share their
    /// recipients, `1` and the encoded list, else `0`.
    fn encode(&self) -> Vec<u8> {
        let shared_len = self.shared.as_ref().map_or(0, Vec::len);
        let mut out = Vec::with_capacity(13 + shared_len);
        out.extend_from_slice(&self.last.to_be_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        match &self.shared {
            Some(recipients) => {
                out.push(1);
                out.extend_from_slice(recipients);
            }
            None => out.push(0),
        }
        out
    }

    fn decode(value: &[u8]) -> Result<Self> {
        let damaged = || StoreError::Damaged("a chunk summary is cut short".into());
        let head = value.get(..13).ok_or_else(damaged)?;
        let last = be_u64(&head[..8])?;
        let count = u32::from_le_bytes(head[8..12].try_into().map_err(|_| damaged())?);
        let shared = (head[12] == 1).then(|| value[13..].to_vec());
        Ok(Self {
            last,
            count,
            shared,
        })
    }
}

/// Writes to sled's tree: a sled batch, counted so that applying it can
/// free what its writes replaced ([`reclaim`]), or a commit's writes as
/// its frame holds them ([`Writes::framed`]).
#[derive(Default)]
struct Writes {
    batch: Batch,
    /// The batch's writes.
    count: usize,
    /// A commit's writes, encoded instead of batched: `+` key value, or
    /// `-` key; each of key and value its length (LEB128) and its bytes.
    redo: Option<Vec<u8>>,
}

/// An insert in [`Writes::redo`].
const REDO_INSERT: u8 = b'+';
/// A remove in [`Writes::redo`].
const REDO_REMOVE: u8 = b'-';

impl Writes {
    /// A commit's writes: encoded for its frame, then applied one by one
    /// ([`apply_framed`]).
    fn framed() -> Self {
        Self {
            redo: Some(Vec::new()),
            ..Self::default()
        }
    }

    fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let (key, value) = (key.as_ref(), value.as_ref());
        match &mut self.redo {
            Some(redo) => {
                redo.push(REDO_INSERT);
                put_bytes(redo, key);
                put_bytes(redo, value);
            }
            None => {
                self.count += 1;
                self.batch.insert(key, value);
            }
        }
    }

    fn remove(&mut self, key: impl AsRef<[u8]>) {
        let key = key.as_ref();
        match &mut self.redo {
            Some(redo) => {
                redo.push(REDO_REMOVE);
                put_bytes(redo, key);
            }
            None => {
                self.count += 1;
                self.batch.remove(key);
            }
        }
    }

    /// Applies a batch to `tree` atomically, then frees as many of the
    /// nodes sled's writes replaced as they add ([`reclaim`]).
    fn apply(self, tree: &Tree) -> Result<()> {
        tree.apply_batch(self.batch)?;
        reclaim(self.count);
        Ok(())
    }
}

/// Applies a commit's writes, as its frame holds them, to `tree` one by
/// one, then marks the frame's `end` as the last the tree holds; frees
/// what they replaced ([`reclaim`]).
///
/// Not a sled batch: sled writes out its log buffer (and waits on
/// `sync_file_range`) before and after every batch, and those writes and
/// the wake-ups of sled's I/O threads cost a publishing core more than
/// the commit's own sync. sled recovers a prefix of its writes, and the
/// mark comes last, so after a crash the tree holds every commit up to
/// the mark whole and perhaps part of the next; the redo writes that
/// one whole again (each write sets or removes a key outright). Readers
/// never look past the tail's last seq, which moves only once the
/// commit's writes are in.
fn apply_framed(tree: &Tree, mut redo: &[u8], end: (u32, u64)) -> Result<()> {
    let damaged = || StoreError::Damaged("a commit frame's writes are cut short".into());
    let take = |redo: &mut &[u8]| -> Result<sled::IVec> {
        let mut len = 0usize;
        for shift in (0..32).step_by(7) {
            let (&byte, rest) = redo.split_first().ok_or_else(damaged)?;
            *redo = rest;
            len |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                let bytes = redo.get(..len).ok_or_else(damaged)?;
                *redo = &redo[len..];
                return Ok(bytes.into());
            }
        }
        Err(damaged())
    };
    let mut count = 0;
    while let Some((&op, rest)) = redo.split_first() {
        redo = rest;
        match op {
            REDO_INSERT => {
                let key = take(&mut redo)?;
                let value = take(&mut redo)?;
                tree.insert(key, value)?;
            }
            REDO_REMOVE => {
                tree.remove(take(&mut redo)?)?;
            }
            other => {
                return Err(StoreError::Damaged(format!(
                    "a commit frame holds an unknown write {other:#04x}"
                )))
            }
        }
        count += 1;
    }
    tree.insert(REDO_KEY, &encode_redo(end))?;
    reclaim(count + 1);
    Ok(())
}

/// Appends `bytes`, after their length (LEB128: one byte for the
/// lengths of most keys and values).
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut len = bytes.len();
    while len >= 0x80 {
        out.push(0x80 | (len & 0x7f) as u8);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(bytes);
}

/// `m` `redo`: segment `u32` BE, offset `u64` BE.
fn encode_redo((segment, offset): (u32, u64)) -> [u8; 12] {
    let mut out = [0; 12];
    out[..4].copy_from_slice(&segment.to_be_bytes());
    out[4..].copy_from_slice(&offset.to_be_bytes());
    out
}

fn decode_redo(value: &[u8]) -> Result<(u32, u64)> {
    let value: &[u8; 12] = value
        .try_into()
        .map_err(|_| StoreError::Damaged("the redo mark is not 12 bytes".into()))?;
    let (segment, offset) = value.split_at(4);
    Ok((
        u32::from_be_bytes(segment.try_into().expect("4 bytes")),
        u64::from_be_bytes(offset.try_into().expect("8 bytes")),
    ))
}

/// Applies to `tree` the commits framed in the segments after the last
/// one it holds: sled had not written them to disk when the server
/// stopped. (A store from before the frames has no `m` `redo`: nothing to
/// apply.)
fn redo(tree: &Tree, segments: &Segments) -> Result<()> {
    let Some(at) = tree.get(REDO_KEY)? else {
        return Ok(());
    };
    let (segment, offset) = decode_redo(&at)?;
    let mut bytes = 0;
    let frames = segments.redo_from(segment, offset, |writes, end| {
        bytes += writes.len();
        apply_framed(tree, writes, end)
    })?;
    if frames > 0 {
        info!(
            commits = frames,
            index_bytes = bytes,
            "applied again the commits the index had not written to disk"
        );
    }
    Ok(())
}

/// Writes whose replaced nodes one [`reclaim`] pass can free: a pass
/// frees up to 8 bags of 64 (crossbeam-epoch's `COLLECT_STEPS` and bag
/// size), and a write to sled's tree leaves one node or a few.
const WRITES_PER_RECLAIM: usize = 64;

/// Frees, of the tree nodes sled's writes replaced, about as many as
/// `writes` writes add.
///
/// sled replaces a node on every write to it and frees the old one
/// through crossbeam-epoch: the free waits in a queue until no reader can
/// still see the node (two advances of crossbeam's epoch, so a pass
/// mostly frees what earlier commits queued). crossbeam collects from
/// that queue on its own only every 128 pins of a thread, at most 512
/// frees at a time, and a group commit queues thousands in one pin (a
/// commit of 2,000 events to 2,000 names writes 6,000 keys across the
/// tree). The queue outgrew what was collected, and the nodes it held
/// stayed in memory: 2.2 GB of RSS after 300,000 events to as many names,
/// against an index of 155 MB on disk, whatever sled's cache was set to.
/// Collecting as much as each commit queues, right after it, leaves the
/// tree's memory to sled's cache and its table of pages: 380 MB after
/// those 300,000 names, about 220 MB with a cache of 16 MiB.
fn reclaim(writes: usize) {
    for _ in 0..=writes / WRITES_PER_RECLAIM {
        // sled re-exports the crossbeam-epoch it pins, so this reaches the
        // same collector (a crossbeam-epoch of our own might not).
        sled::crossbeam_pin().flush();
    }
}

/// Writes the summaries of a store from before they were kept.
fn summarize_chunks(tree: &Tree, segments: &Segments) -> Result<()> {
    let mut batch = Writes::default();
    let mut chunk = Vec::new();
    for entry in tree.scan_prefix([CHUNK]) {
        let (key, loc) = entry?;
        segments.read(Loc::decode(&loc)?, &mut chunk)?;
        let (name, first) = split_chunk_key(&key)?;
        let mut summary: Option<Summary> = None;
        for entry in entries(&chunk) {
            let (seq, value) = entry?;
            let recipients = recipients_of(value);
            summary
                .get_or_insert_with(|| Summary::starting(seq, recipients))
                .add(seq, recipients);
        }
        if let Some(summary) = summary {
            batch.insert(summary_key(name, first), summary.encode());
        }
    }
    batch.insert(SUMMARIES_KEY, []);
    batch.apply(tree)?;
    Ok(())
}

/// Moves the chunks of a store from before segment files (kept in sled
/// itself) into segments.
fn move_chunks_to_segments(tree: &Tree, segments: &Segments) -> Result<()> {
    let mut batch = Writes::default();
    let mut marks = Marks::default();
    // Commit by commit, so that segments hold the log in seq order and
    // retention frees them oldest first.
    for entry in tree.scan_prefix([COMMIT]) {
        let (_, index) = entry?;
        for (first, name) in decode_commit(&index)? {
            let key = chunk_key(name, first);
            let Some(chunk) = tree.get(&key)? else {
                continue;
            };
            let mut last = first;
            for entry in entries(&chunk) {
                last = entry?.0;
            }
            let loc = segments.append(&chunk)?;
            marks.add(loc, last);
            batch.insert(key, loc.encode());
        }
    }
    marks.write(&mut batch);
    batch.insert(SEGMENTS_KEY, []);
    segments.sync()?;
    batch.apply(tree)?;
    Ok(())
}

/// What the `g` table keeps of a segment: the last seq it holds and where
/// its referenced bytes end.
#[derive(Debug, Default)]
struct Marks(Vec<(u32, u64, u64)>);

impl Marks {
    /// Notes a chunk of events up to `last` stored at `loc`.
    fn add(&mut self, loc: Loc, last: u64) {
        let end = loc.offset + u64::from(loc.len);
        match self.0.iter_mut().find(|(s, _, _)| *s == loc.segment) {
            Some((_, l, e)) => {
                *l = (*l).max(last);
                *e = (*e).max(end);
            }
            None => self.0.push((loc.segment, last, end)),
        }
    }

    fn write(self, batch: &mut Writes) {
        for (segment, last, end) in self.0 {
            let mut value = [0; 16];
            value[..8].copy_from_slice(&last.to_be_bytes());
            value[8..].copy_from_slice(&end.to_be_bytes());
            batch.insert(segment_key(segment), value);
        }
    }
}

/// A `g` value: the segment's last seq and the end of its referenced bytes.
fn decode_mark(value: &[u8]) -> Result<(u64, u64)> {
    match value.get(..8).zip(value.get(8..16)) {
        Some((last, end)) => Ok((be_u64(last)?, be_u64(end)?)),
        None => Err(StoreError::Damaged("a segment mark is cut short".into())),
    }
}

fn segment_key(segment: u32) -> [u8; 5] {
    let mut key = [SEGMENT; 5];
    key[1..].copy_from_slice(&segment.to_be_bytes());
    key
}

fn segment_of_key(key: &[u8]) -> Result<u32> {
    key.get(1..5)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StoreError::Damaged("a segment key is cut short".into()))
}

/// The first seq a chunk (or summary) key ends with.
fn key_first_seq(key: &[u8]) -> Result<u64> {
    match key.len().checked_sub(8) {
        Some(at) if at > 1 => be_u64(&key[at..]),
        _ => Err(StoreError::Damaged("a chunk key is cut short".into())),
    }
}

/// A chunk's entry in sled as its first seq, and its location and
/// offsets.
fn chunk_entry((key, value): (sled::IVec, sled::IVec)) -> Result<(u64, sled::IVec)> {
    Ok((key_first_seq(&key)?, value))
}

/// The name and first seq a chunk (or summary) key holds.
fn split_chunk_key(key: &[u8]) -> Result<(&str, u64)> {
    let split = key
        .len()
        .checked_sub(9)
        .filter(|at| *at >= 1)
        .ok_or_else(|| StoreError::Damaged("a chunk key is cut short".into()))?;
    Ok((utf8(&key[1..split])?, be_u64(&key[split + 1..])?))
}

fn name_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1);
    key.push(NAME);
    key.extend_from_slice(name.as_bytes());
    key
}

fn direct_key(name: &str, recipient: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + recipient.len() + 2);
    key.push(DIRECT);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(recipient);
    key
}

/// The name and recipient of an `r` key.
fn split_direct_key(key: &[u8]) -> Result<(&str, &[u8])> {
    let rest = key.get(1..).unwrap_or_default();
    let at = memchr::memchr(0, rest)
        .ok_or_else(|| StoreError::Damaged("direct key without recipient".into()))?;
    Ok((utf8(&rest[..at])?, &rest[at + 1..]))
}

/// Writes the `r` table of a store from before it was kept.
fn index_direct_events(tree: &Tree, segments: &Segments) -> Result<()> {
    let mut firsts: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut chunk = Vec::new();
    for entry in tree.scan_prefix([CHUNK]) {
        let (key, loc) = entry?;
        let (name, _) = split_chunk_key(&key)?;
        segments.read(Loc::decode(&loc)?, &mut chunk)?;
        for entry in entries(&chunk) {
            let (seq, value) = entry?;
            for recipient in recipients_of(value).split(|b| *b == 0) {
                if recipient != b"*" && !recipient.is_empty() {
                    let first = firsts.entry(direct_key(name, recipient)).or_insert(seq);
                    *first = (*first).min(seq);
                }
            }
        }
    }
    let mut batch = Writes::default();
    for (key, first) in firsts {
        batch.insert(key, first.to_be_bytes());
    }
    batch.insert(DIRECTS_KEY, []);
    batch.apply(tree)?;
    Ok(())
}

/// A chunk being built.
struct Building {
    name: String,
    first: u64,
    entries: Vec<u8>,
    /// The offsets that follow the chunk's location ([`OFFSET_EVERY`]).
    offsets: Vec<u8>,
    summary: Summary,
}

/// One group commit's chunks, being built.
#[derive(Default)]
struct Chunks {
    /// The chunks, in the order opened.
    built: Vec<Building>,
    /// Empty buffers for the chunks this commit opens: those the last
    /// commit wrote out. A chunk's buffer doubled its way up from 4 KiB,
    /// and copying what it held at each step copied a full chunk's bytes
    /// once more (2.7% of a publish's instructions).
    spares: Vec<Vec<u8>>,
    /// The open chunk of each name.
    open: HashMap<String, usize>,
    /// The chunk the last event went to: a commit's events mostly come in
    /// runs of one name, and comparing the name costs less than hashing it.
    last: Option<usize>,
}

impl Chunks {
    /// Adds an event; `value` is its encoded recipients, then its record.
    fn push(&mut self, name: &str, seq: u64, value: &[u8]) {
        let recipients = recipients_of(value);
        let open = match self.last {
            Some(i) if self.built[i].name == name => Some(i),
            _ => self.open.get(name).copied(),
        };
        let slot = match open {
            Some(i) if self.built[i].entries.len() + value.len() <= MAX_CHUNK_BYTES => i,
            _ => {
                let entries = self
                    .spares
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(4096));
                self.built.push(Building {
                    name: name.to_owned(),
                    first: seq,
                    entries,
                    offsets: Vec::new(),
                    summary: Summary::starting(seq, recipients),
                });
                let i = self.built.len() - 1;
                self.open.insert(name.to_owned(), i);
                i
            }
        };
        self.last = Some(slot);
        let chunk = &mut self.built[slot];
        let count = chunk.summary.count as usize;
        if count > 0 && count % OFFSET_EVERY == 0 {
            // An offset that does not fit is left out: reads start earlier.
            if let (Ok(delta), Ok(offset)) = (
                u32::try_from(seq - chunk.first),
                u32::try_from(chunk.entries.len()),
            ) {
                chunk.offsets.extend_from_slice(&delta.to_be_bytes());
                chunk.offsets.extend_from_slice(&offset.to_be_bytes());
            }
        }
        put_entry(&mut chunk.entries, seq, value);
        chunk.summary.add(seq, recipients);
    }

    /// The bytes of the chunks built.
    fn bytes(&self) -> u64 {
        self.built.iter().map(|c| c.entries.len() as u64).sum()
    }

    /// Puts the chunks into the commit's `frame` and where they lie into
    /// `batch`, with the commit's index entry; says how many bytes they
    /// hold, and gives each chunk's name, first seq and value. Keeps up to
    /// [`KEPT_CHUNK_BUFFERS`] of the written buffers in `spares`.
    fn write(
        self,
        batch: &mut Writes,
        frame: &mut Frame,
        spares: &mut Vec<Vec<u8>>,
    ) -> Result<(u64, Vec<Written>)> {
        *spares = self.spares;
        let Some(commit_first) = self.built.iter().map(|c| c.first).min() else {
            return Ok((0, Vec::new()));
        };
        let mut written = Vec::with_capacity(self.built.len());
        let mut index = Vec::new();
        let mut bytes = 0;
        let mut marks = Marks::default();
        for chunk in self.built {
            let Building {
                name,
                first,
                entries,
                offsets,
                summary,
            } = chunk;
            bytes += entries.len() as u64;
            index.extend_from_slice(&first.to_be_bytes());
            let len = u16::try_from(name.len()).expect("names are at most 255 bytes");
            index.extend_from_slice(&len.to_le_bytes());
            index.extend_from_slice(name.as_bytes());
            let loc = frame.put(&entries)?;
            keep_chunk_buffer(spares, entries);
            marks.add(loc, summary.last);
            let mut value = Vec::with_capacity(16 + offsets.len());
            value.extend_from_slice(&loc.encode());
            value.extend_from_slice(&offsets);
            let value = sled::IVec::from(value);
            batch.insert(chunk_key(&name, first), &value);
            batch.insert(summary_key(&name, first), summary.encode());
            written.push((name, first, summary.last, value));
        }
        batch.insert(num_key(COMMIT, commit_first), index);
        marks.write(batch);
        Ok((bytes, written))
    }
}

/// Chunk buffers kept from one commit for the next.
const KEPT_CHUNK_BUFFERS: usize = 4;

/// Keeps a written chunk's buffer for the next commit, unless enough are
/// kept or it grew past a chunk (an event larger than a chunk has one of
/// its own).
fn keep_chunk_buffer(spares: &mut Vec<Vec<u8>>, mut buffer: Vec<u8>) {
    if spares.len() < KEPT_CHUNK_BUFFERS && buffer.capacity() <= 2 * MAX_CHUNK_BYTES {
        buffer.clear();
        spares.push(buffer);
    }
}

/// A chunk a commit wrote: its name, first and last seq, and location and
/// offsets.
type Written = (String, u64, u64, sled::IVec);

/// Segment bytes a scan read past the end of a chunk: the chunks after it
/// are often among them. The cursors of a merge share one.
#[derive(Default)]
struct Ahead {
    /// The segment and offset where `bytes` start, once read.
    at: Option<(u32, u64)>,
    bytes: ReadBuf,
}

impl Ahead {
    /// The buffer to read ahead into: one this thread kept, if it has
    /// one, the first time (a seek never reads ahead, and takes none).
    fn buffer(&mut self) -> &mut ReadBuf {
        if self.bytes.capacity() == 0 {
            self.bytes = spare_buffer();
        }
        &mut self.bytes
    }

    /// The bytes at `loc`, if they were read ahead.
    fn get(&self, loc: Loc) -> Option<&[u8]> {
        let (segment, offset) = self.at?;
        if segment != loc.segment || loc.offset < offset {
            return None;
        }
        let start = usize::try_from(loc.offset - offset).ok()?;
        self.bytes.get(start..start.checked_add(loc.len as usize)?)
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        keep_buffer(std::mem::take(&mut self.bytes));
    }
}

/// What a cursor reads: sled's tree, the segments, and the directory of
/// recent chunks; and whether its reads of the segments may wait.
#[derive(Clone, Copy)]
struct Store<'n> {
    tree: &'n Tree,
    segments: &'n Segments,
    directory: &'n Directory<sled::IVec>,
    reads: Reads,
}

/// The most entries each of `cursors` cursors reads at a time: a merge
/// holds a read of every name at once, so the more names, the smaller.
fn merge_batch(cursors: usize) -> u64 {
    match cursors as u64 {
        0 | 1 => u64::MAX,
        n => (MERGE_READS / n).clamp(OFFSET_EVERY as u64, MERGE_READ),
    }
}

/// Visits in seq order, until `visit` breaks, the events of the names in
/// `pending`, each given with the least seq its events can have there (in
/// that order); says whether `visit` broke. `open(from, name)` makes a
/// name's cursor from `from` on, once the merge has reached `from`, so a
/// merge that stops early opens only the names it needed.
fn merge<'n>(
    pending: impl IntoIterator<Item = (u64, &'n str)>,
    mut open: impl FnMut(u64, &'n str) -> Result<Cursor<'n>>,
    visit: &mut dyn FnMut(EventView<'_>) -> ControlFlow<()>,
) -> Result<ControlFlow<()>> {
    let mut pending = pending.into_iter().peekable();
    // Room for the cursors a LIMIT replay of many names opens: a cursor is
    // large, and growing the list copied them all each time.
    let mut cursors = Vec::with_capacity(pending.size_hint().0.min(64));
    // Each open cursor's next seq.
    let mut heap = BinaryHeap::new();
    loop {
        while let Some(&(from, name)) = pending.peek() {
            if heap.peek().is_some_and(|Reverse((seq, _))| *seq < from) {
                break;
            }
            pending.next();
            let cursor = open(from, name)?;
            if let Some(seq) = cursor.seq() {
                heap.push(Reverse((seq, cursors.len())));
            }
            cursors.push(cursor);
        }
        let Some(Reverse((_, i))) = heap.pop() else {
            return Ok(ControlFlow::Continue(()));
        };
        let cursor: &mut Cursor<'n> = &mut cursors[i];
        if heap.is_empty() && pending.peek().is_none() {
            // The last name left: no heap to keep.
            return cursor.visit_rest(visit);
        }
        if cursor.visit(visit)?.is_break() {
            return Ok(ControlFlow::Break(()));
        }
        if let Some(seq) = cursor.seq() {
            heap.push(Reverse((seq, i)));
        }
    }
}

/// Reads the events of one name in seq order, chunk by chunk.
///
/// Finding a chunk by a range of keys costs sled a copy of a whole leaf,
/// so the cursor finds its chunks in the directory where it lists them,
/// else looks the next chunk up by its key where it can: the events of a
/// name published on its own are contiguous, and its next chunk starts at
/// the seq after the last one read. When that look misses, or after
/// [`LOOKS_BEFORE_WALK`] looks, it walks the chunks in key order.
struct Cursor<'n> {
    name: &'n str,
    tree: &'n Tree,
    segments: &'n Segments,
    directory: &'n Directory<sled::IVec>,
    reads: Reads,
    /// The chunks in key order, once a look by key missed or the cursor
    /// went past [`LOOKS_BEFORE_WALK`] chunks.
    chunks: Option<sled::Iter>,
    /// Chunks looked up by key so far.
    looked_up: u32,
    /// The chunk the cursor is in.
    held: Option<Held>,
    /// What has been read of it, when copied.
    chunk: ReadBuf,
    /// What has been read of it, when read where it lies in the
    /// segment's map instead ([`Reads::Mapped`]).
    mapped: Option<MappedBytes>,
    ahead: &'n RefCell<Ahead>,
    /// How many more entries the caller expects to take.
    want: u64,
    /// The most entries one read takes.
    batch: u64,
    /// The seq after the last entry the cursor has passed: where the next
    /// chunk starts when the name's events are contiguous.
    next_seq: u64,
    /// The current entry, decoded once: its seq, where its value lies in
    /// `chunk`, and where the next entry starts.
    current: Option<(u64, std::ops::Range<usize>, usize)>,
    start: u64,
    end: u64,
}

/// The chunk a cursor is in: its first seq, its location and offsets, and
/// the mark where what is still unread of it starts.
struct Held {
    first: u64,
    value: sled::IVec,
    unread: Option<Mark>,
}

impl<'n> Cursor<'n> {
    /// A cursor at the first event of `name` with seq in `seqs`, for a
    /// caller that expects to take about `want` of them; it reads at most
    /// `batch` entries at a time, and reads ahead into `ahead`.
    fn new(
        Store {
            tree,
            segments,
            directory,
            reads,
        }: Store<'n>,
        ahead: &'n RefCell<Ahead>,
        name: &'n str,
        seqs: &RangeInclusive<u64>,
        (want, batch): (u64, u64),
    ) -> Result<Self> {
        let (start, end) = (*seqs.start(), *seqs.end());
        let mut cursor = Self {
            name,
            tree,
            segments,
            directory,
            reads,
            chunks: None,
            looked_up: 0,
            held: None,
            chunk: spare_buffer(),
            mapped: None,
            ahead,
            want,
            batch,
            next_seq: start,
            current: None,
            start,
            end,
        };
        // The chunk holding `start` is the last one opened at or before it.
        // A name with nothing from `start` on (a subscription's with
        // nothing new, at every pull) is answered without a look in sled.
        let holding = match directory.events_from(name, start) {
            Found::Chunk(first, value) => Some((first, value)),
            Found::Nowhere => return Ok(cursor),
            Found::Unknown => tree
                .range(chunk_key(name, 0)..=chunk_key(name, start))
                .next_back()
                .transpose()?
                .map(chunk_entry)
                .transpose()?,
        };
        if let Some((first, value)) = holding {
            cursor.load(first, value)?;
        }
        cursor.settle(0)?;
        Ok(cursor)
    }

    /// Makes the chunk starting at `first` (location and offsets in
    /// `value`) the current one, and reads the first of what the cursor
    /// wants of it.
    fn load(&mut self, first: u64, value: sled::IVec) -> Result<()> {
        let (from, index) = start_mark(&value, first, self.start.max(self.next_seq));
        self.held = Some(Held {
            first,
            value,
            unread: None,
        });
        self.read(first, from, index)?;
        self.next_seq = self.next_seq.max(first.saturating_add(1));
        Ok(())
    }

    /// Reads the held chunk from mark `from` on, as far as the entries up
    /// to position `index` and those the cursor wants after it need.
    fn read(&mut self, first: u64, from: Mark, index: u64) -> Result<()> {
        let Some(held) = &mut self.held else {
            return Ok(());
        };
        let more = self.want.min(self.batch).max(1);
        let to = mark_at_or_past(&held.value, held.first, index.saturating_add(more));
        let whole = Loc::decode(&held.value)?;
        let loc = between(whole, from, to);
        held.unread = to;
        let ahead = match to {
            None => ahead_of(
                whole,
                &held.value,
                loc,
                more.saturating_add(index.saturating_sub(from.index)),
            ),
            Some(_) => 0,
        };
        let read = self.fill(loc, ahead);
        // The key is built only when the read failed, to see why.
        if read.is_err() && !or_gone(self.tree, &chunk_key(self.name, first), read)? {
            self.chunk.clear();
            self.mapped = None;
            if let Some(held) = &mut self.held {
                held.unread = None;
            }
        }
        Ok(())
    }

    /// Puts the bytes at `loc` into `chunk`: from what was read ahead if
    /// they are there, else read, with `ahead` bytes more; or, with
    /// [`Reads::Mapped`], into `mapped` where the segment's map holds them
    /// in memory. Read where they lie, they are copied once, into the
    /// answer, instead of twice: a LIMIT-50 replay copied 24 KiB out of the
    /// map before it copied them again.
    fn fill(&mut self, loc: Loc, ahead: u32) -> Result<()> {
        self.mapped = None;
        let mut read_ahead = self.ahead.borrow_mut();
        if let Some(bytes) = read_ahead.get(loc) {
            self.chunk.copy_from(bytes);
            return Ok(());
        }
        let mut reads = self.reads;
        if reads == Reads::Mapped {
            match self.segments.view(loc)? {
                View::Mapped(bytes) => {
                    self.chunk.clear();
                    self.mapped = Some(bytes);
                    return Ok(());
                }
                View::Uncached => {
                    self.chunk.clear();
                    return Err(StoreError::Uncached);
                }
                // The map counted this read: asked again, it would take
                // it for the block's second.
                View::Unmapped => reads = Reads::Cached,
            }
        }
        if ahead == 0 {
            // Over what `chunk` held: the read replaces all of it.
            return self.segments.read_ahead(loc, 0, &mut self.chunk, reads);
        }
        self.chunk.clear();
        read_ahead.at = None;
        self.segments
            .read_ahead(loc, ahead, read_ahead.buffer(), reads)?;
        read_ahead.at = Some((loc.segment, loc.offset));
        self.chunk.copy_from(&read_ahead.bytes[..loc.len as usize]);
        Ok(())
    }

    /// Reads on in the held chunk; `false` when it was read to its end.
    fn read_on(&mut self) -> Result<bool> {
        let Some((first, unread)) = self
            .held
            .as_ref()
            .and_then(|held| Some((held.first, held.unread?)))
        else {
            return Ok(false);
        };
        self.read(first, unread, unread.index)?;
        Ok(true)
    }

    /// The chunk after the current one: its first seq, and its location
    /// and offsets.
    fn next_chunk(&mut self) -> Result<Option<(u64, sled::IVec)>> {
        if let Some(chunks) = &mut self.chunks {
            return chunks.next().transpose()?.map(chunk_entry).transpose();
        }
        if self.next_seq > self.end {
            return Ok(None);
        }
        let listed = match &self.held {
            Some(held) => self.directory.chunk_after(self.name, held.first),
            None => Found::Unknown,
        };
        match listed {
            Found::Chunk(first, value) => return Ok((first <= self.end).then_some((first, value))),
            // A name of one event, or whose last chunk this is, costs no
            // look in sled (which copies a leaf) to learn it has no more.
            Found::Nowhere => return Ok(None),
            Found::Unknown => {}
        }
        let key = chunk_key(self.name, self.next_seq);
        if self.looked_up < LOOKS_BEFORE_WALK {
            self.looked_up += 1;
            if let Some(value) = self.tree.get(&key)? {
                return Ok(Some((self.next_seq, value)));
            }
        }
        let mut chunks = self.tree.range(key..=chunk_key(self.name, self.end));
        let next = chunks.next().transpose()?;
        self.chunks = Some(chunks);
        next.map(chunk_entry).transpose()
    }

    /// Moves to the first entry at or after byte `pos` with seq >= start,
    /// loading chunks as needed.
    #[inline(always)]
    fn settle(&mut self, pos: usize) -> Result<()> {
        // Most often the next entry is in what was read, and in range:
        // that is decided here, inline, and the loop is left out.
        if pos < self.bytes().len() {
            return match self.step(pos)? {
                None => Ok(()),
                Some(next) => self.settle_on(next),
            };
        }
        self.settle_on(pos)
    }

    /// Makes the entry at byte `pos` of what was read the current one if
    /// it is in range (`None`), or says where the entry after it starts.
    #[inline(always)]
    fn step(&mut self, pos: usize) -> Result<Option<usize>> {
        let (seq, value, next) = entry_at(self.bytes(), pos)?;
        let value_start = next - value.len();
        self.next_seq = self.next_seq.max(seq.saturating_add(1));
        if seq < self.start {
            return Ok(Some(next));
        }
        self.current = Some((seq, value_start..next, next));
        Ok(None)
    }

    /// [`Cursor::settle`] past entries before the start and the end of what
    /// was read.
    #[inline(never)]
    fn settle_on(&mut self, mut pos: usize) -> Result<()> {
        loop {
            while pos < self.bytes().len() {
                match self.step(pos)? {
                    None => return Ok(()),
                    Some(next) => pos = next,
                }
            }
            if self.read_on()? {
                pos = 0;
                continue;
            }
            match self.next_chunk()? {
                Some((first, value)) => {
                    self.load(first, value)?;
                    pos = 0;
                }
                None => {
                    self.current = None;
                    return Ok(());
                }
            }
        }
    }

    /// What has been read of the chunk the cursor is in.
    #[inline(always)]
    fn bytes(&self) -> &[u8] {
        match &self.mapped {
            Some(bytes) => bytes,
            None => &self.chunk,
        }
    }

    /// The seq of the current entry, if one is left in range.
    fn seq(&self) -> Option<u64> {
        self.current
            .as_ref()
            .map(|(seq, _, _)| *seq)
            .filter(|seq| *seq <= self.end)
    }

    /// Hands the current entry to `visit` and moves past it; once `visit`
    /// breaks, the cursor is done (and reads no further chunk).
    fn visit(
        &mut self,
        visit: &mut dyn FnMut(EventView<'_>) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>> {
        let Some((seq, value, next)) = self.current.clone() else {
            return Ok(ControlFlow::Break(()));
        };
        let flow = visit(EventView::decode(seq, self.name, &self.bytes()[value])?);
        self.want = self.want.saturating_sub(1);
        if flow.is_break() {
            self.current = None;
        } else {
            self.settle(next)?;
        }
        Ok(flow)
    }

    /// Hands each entry left in range to `visit`, until it breaks; says
    /// whether it did.
    fn visit_rest(
        &mut self,
        visit: &mut dyn FnMut(EventView<'_>) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>> {
        while self.seq().is_some() {
            if self.visit(visit)?.is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }
}

impl Drop for Cursor<'_> {
    fn drop(&mut self) {
        keep_buffer(std::mem::take(&mut self.chunk));
    }
}

/// The largest buffer a thread keeps for its next scan: twice what a
/// chunk's last part is read with ([`READ_AHEAD`]), far more than a LIMIT
/// replay or a seek reads.
const KEPT_BUFFER_BYTES: usize = 2 * READ_AHEAD as usize;

/// Buffers a thread keeps: a cursor's and its scan's read-ahead.
const KEPT_BUFFERS: usize = 2;

thread_local! {
    /// Read buffers of cursors and of read-ahead, kept for the next scan
    /// on this thread, so that a LIMIT replay or a seek neither allocates
    /// them nor zeroes them ([`ReadBuf`]): a read-ahead buffer made anew
    /// for each scan cost a LIMIT-50 replay 8% of its instructions in
    /// zeroing.
    static SPARE_BUFFERS: RefCell<Vec<ReadBuf>> = const { RefCell::new(Vec::new()) };
}

/// A buffer this thread kept (holding nothing), or a new one.
fn spare_buffer() -> ReadBuf {
    let mut buffer = SPARE_BUFFERS.with_borrow_mut(Vec::pop).unwrap_or_default();
    buffer.clear();
    buffer
}

/// Keeps `buffer` for this thread's next scan, unless it is large, or
/// smaller than every buffer kept when [`KEPT_BUFFERS`] are.
fn keep_buffer(buffer: ReadBuf) {
    if buffer.capacity() > KEPT_BUFFER_BYTES || buffer.capacity() == 0 {
        return;
    }
    SPARE_BUFFERS.with_borrow_mut(|spares| {
        if spares.len() < KEPT_BUFFERS {
            spares.push(buffer);
        } else if let Some(smallest) = spares.iter_mut().min_by_key(|spare| spare.capacity()) {
            if smallest.capacity() < buffer.capacity() {
                *smallest = buffer;
            }
        }
    });
}

/// How long opening waits for the data directory's lock.
///
/// Dropping a `Db` does not release the lock at once: sled's background
/// threads hold the database until they notice, so a store closed and
/// reopened in one process (a restart in place, the tests) can find it
/// still taken for a moment. Another process holding it is not waited out
/// for long.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Opens the sled database in `dir`, with `cache` bytes of cache. It
/// holds no event bytes, only where they lie and the rest of the state.
fn open_db(dir: &Path, cache: u64) -> Result<Db> {
    let config = sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .cache_capacity(cache);
    // sled reports a taken lock only in its message (kind `Other`).
    let locked = |e: &std::io::Error| e.to_string().starts_with("could not acquire lock");
    let started = Instant::now();
    loop {
        match config.open() {
            Err(sled::Error::Io(e)) if locked(&e) && started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(sled::Error::Io(e)) if locked(&e) => {
                return Err(StoreError::Backend(format!(
                    "{} is in use by another process (is another ensync-server running on this data directory?): {e}",
                    dir.display()
                )))
            }
            opened => return Ok(opened?),
        }
    }
}

impl SledLog {
    /// Opens (or creates) the log in `dir`.
    ///
    /// # Errors
    /// When the directory cannot be opened (missing permissions, another
    /// process holding it) or its contents are damaged.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(
            Self::open_with_cache(dir, crate::config::DEFAULT_INDEX_CACHE)?
                .with_mapped_reads(crate::config::DEFAULT_MAPPED_READS),
        )
    }

    /// Lets replays served on a connection's task copy their bytes out of
    /// maps of the segments, holding up to `budget` bytes mapped at once
    /// (`store.mapped_reads`; 0, as opened: never).
    #[must_use]
    pub fn with_mapped_reads(mut self, budget: u64) -> Self {
        self.segments.map_reads(budget);
        self
    }

    /// Opens (or creates) the log in `dir`, with `cache` bytes of memory
    /// for its index (`store.index_cache`): an eighth of it for the
    /// directory of the newest chunks and milliseconds, the rest for
    /// sled's cache.
    ///
    /// # Errors
    /// As [`SledLog::open`].
    pub fn open_with_cache(dir: &Path, cache: u64) -> Result<Self> {
        let listed = cache / DIRECTORY_SHARE;
        Self::open_with_budgets(dir, cache - listed, listed)
    }

    /// Opens (or creates) the log in `dir`, with `cache` bytes for sled's
    /// cache and `listed` for the directory.
    fn open_with_budgets(dir: &Path, cache: u64, listed: u64) -> Result<Self> {
        Self::open_syncing(dir, cache, listed, Some(INDEX_SYNC))
    }

    /// As [`SledLog::open_with_budgets`], with the tree synced by the
    /// first commit `sync_every` after the last sync (`None`: only when
    /// flushed).
    fn open_syncing(
        dir: &Path,
        cache: u64,
        listed: u64,
        sync_every: Option<Duration>,
    ) -> Result<Self> {
        let db = open_db(dir, cache)?;
        let tree = db.open_tree("log")?;
        let segments = Segments::open(dir)?;
        if tree.get(SEGMENTS_KEY)?.is_none() {
            move_chunks_to_segments(&tree, &segments)?;
            db.flush()?;
        }
        redo(&tree, &segments)?;
        let mut referenced = BTreeMap::new();
        for entry in tree.scan_prefix([SEGMENT]) {
            let (key, mark) = entry?;
            referenced.insert(segment_of_key(&key)?, decode_mark(&mark)?.1);
        }
        segments.reconcile(&referenced)?;
        // The next redo starts where the next frame goes: past what a
        // crash left half-written, which never landed.
        tree.insert(REDO_KEY, &encode_redo(segments.end()))?;
        db.flush()?;
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
        let last_seq = match tree.get(LAST_KEY)? {
            Some(v) => be_u64(&v)?,
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
        let oldest = match tree.scan_prefix([COMMIT]).next() {
            Some(entry) => be_u64(&entry?.0[1..])?,
            None => 0,
        };
        let bytes = match tree.get(SIZE_KEY)? {
            Some(v) => be_u64(&v)?,
            // A store from before the size was kept: count it once.
            None => {
                let mut bytes = 0;
                for entry in tree.scan_prefix([CHUNK]) {
                    bytes += u64::from(Loc::decode(&entry?.1)?.len);
                }
                bytes
            }
        };
        if tree.get(SUMMARIES_KEY)?.is_none() {
            summarize_chunks(&tree, &segments)?;
            db.flush()?;
        }
        if tree.get(DIRECTS_KEY)?.is_none() {
            index_direct_events(&tree, &segments)?;
            db.flush()?;
        }

        let mut settlers = HashSet::new();
        for entry in tree.scan_prefix([SETTLER]) {
            settlers.insert(utf8(&entry?.0[1..])?.to_owned());
        }
        let directory = Arc::new(Directory::new(
            usize::try_from(listed).unwrap_or(usize::MAX),
            last_seq,
        ));
        let filling = Filling::start(&tree, &directory, last_seq, last_ts)?;
        Ok(Self {
            filling,
            db,
            tree,
            segments,
            epoch,
            tail: Mutex::new(Tail {
                last_seq,
                last_ts,
                bytes,
                names,
                spare_chunks: Vec::new(),
                synced: Instant::now(),
                failed: None,
            }),
            bytes: AtomicU64::new(bytes),
            oldest: AtomicU64::new(oldest),
            settlers: RwLock::new(settlers),
            directory,
            sync_every,
            crowded: RwLock::new(HashMap::new()),
        })
    }

    /// The bytes of the chunk of `name` that starts at `first`, from its
    /// last entry with an offset at or before `from`, as far as its first
    /// `want` entries from `from` on need (`u64::MAX`: to its end).
    fn chunk(
        &self,
        name: &str,
        first: u64,
        from: u64,
        want: u64,
        reads: Reads,
    ) -> Result<Option<Vec<u8>>> {
        let key = chunk_key(name, first);
        let Some(value) = self.tree.get(&key)? else {
            return Ok(None);
        };
        let (start, index) = start_mark(&value, first, from);
        let to = mark_at_or_past(&value, first, index.saturating_add(want));
        let loc = between(Loc::decode(&value)?, start, to);
        let mut chunk = Vec::new();
        let kept = or_gone(
            &self.tree,
            &key,
            self.segments.read_with(loc, &mut chunk, reads),
        )?;
        Ok(kept.then_some(chunk))
    }

    /// `evt_`, the epoch in 8 hex digits, then the seq in 16: written
    /// digit by digit, as this runs for every event published.
    fn idem(&self, seq: u64) -> String {
        let mut id = String::with_capacity(28);
        id.push_str("evt_");
        push_hex(&mut id, u64::from(self.epoch), 8);
        push_hex(&mut id, seq, 16);
        id
    }

    /// The seq an id of this store names.
    fn seq_of(&self, id: &EventId) -> Option<u64> {
        let hex = id.as_str().strip_prefix("evt_")?;
        if hex.len() != 24 {
            return None;
        }
        let (epoch, seq) = hex.as_bytes().split_at(8);
        if from_hex(epoch)? != u64::from(self.epoch) {
            return None;
        }
        from_hex(seq)
    }

    /// The subscription under `key`, as this batch has left it so far.
    fn sub_in(
        &self,
        pending: &HashMap<Vec<u8>, Option<Subscription>>,
        key: &[u8],
        client: &ClientId,
        pattern: &Pattern,
    ) -> Result<Option<Subscription>> {
        if let Some(sub) = pending.get(key) {
            return Ok(sub.clone());
        }
        match self.tree.get(key)? {
            Some(value) => Ok(Some(decode_sub(client.clone(), pattern.clone(), &value)?)),
            None => Ok(None),
        }
    }

    /// Moves the floors of the client's subscriptions forward.
    fn raise_floors(
        &self,
        pending: &mut HashMap<Vec<u8>, Option<Subscription>>,
        client: &ClientId,
        floors: &[(Pattern, u64)],
    ) -> Result<()> {
        for (pattern, floor) in floors {
            let key = sub_key(client, pattern);
            if let Some(mut sub) = self.sub_in(pending, &key, client, pattern)? {
                if *floor > sub.floor {
                    sub.floor = *floor;
                    pending.insert(key, Some(sub));
                }
            }
        }
        Ok(())
    }

    /// One retention step: removes the oldest commits `trim` allows.
    fn trim(&self, tail: &mut Tail, trim: &Trim) -> Result<Trimmed> {
        let cutoff = match trim.before_ms {
            Some(ms) => self
                .tree
                .range(num_key(TIME, ms)..=num_key(TIME, u64::MAX))
                .next()
                .transpose()?
                .map(|(_, seq)| be_u64(&seq))
                .transpose()?
                .unwrap_or(tail.last_seq + 1),
            None => 0,
        };
        let mut commits = self.tree.scan_prefix([COMMIT]);
        let mut next = commits.next().transpose()?;
        let mut batch = Writes::default();
        let mut done = Trimmed::default();
        let mut through = None;
        let mut removed = 0;
        // The names whose chunks this step removes, with the first seq of
        // the last one removed.
        let mut touched: HashMap<String, u64> = HashMap::new();
        while let Some((key, index)) = next.take() {
            let first = be_u64(&key[1..])?;
            next = commits.next().transpose()?;
            let end = match &next {
                Some((key, _)) => be_u64(&key[1..])?,
                None => tail.last_seq + 1,
            };
            let too_big = trim
                .max_bytes
                .is_some_and(|max| tail.bytes - done.bytes > max);
            if end > trim.keep_from || !(end <= cutoff || too_big) {
                break;
            }
            if removed == trim.max_commits {
                done.more = true;
                break;
            }
            for (chunk_first, name) in decode_commit(&index)? {
                let chunk = chunk_key(name, chunk_first);
                if let Some(loc) = self.tree.get(&chunk)? {
                    done.bytes += u64::from(Loc::decode(&loc)?.len);
                }
                batch.remove(chunk);
                batch.remove(summary_key(name, chunk_first));
                match touched.get_mut(name) {
                    Some(last) => *last = chunk_first,
                    None => {
                        touched.insert(name.to_owned(), chunk_first);
                    }
                }
            }
            batch.remove(key);
            done.events += end - first;
            through = Some(end - 1);
            removed += 1;
        }
        let Some(through) = through else {
            return Ok(done);
        };
        // Names left with no events are forgotten, with their index of
        // direct recipients: names that come and go (an id in the name)
        // would otherwise pile up in memory and in the store for good.
        let mut forgotten = Vec::new();
        for (name, last_removed) in touched {
            let later = chunk_key(&name, last_removed.saturating_add(1));
            if self
                .tree
                .range(later..=chunk_key(&name, u64::MAX))
                .next()
                .is_none()
            {
                batch.remove(name_key(&name));
                for entry in self.tree.scan_prefix(direct_key(&name, b"")) {
                    batch.remove(entry?.0);
                }
                forgotten.push(name);
            }
        }
        // Time entries whose events are all gone, and the settlements and
        // deferrals of removed events.
        let mut times = self.tree.scan_prefix([TIME]).peekable();
        while let Some(entry) = times.next() {
            let (key, _) = entry?;
            let next_first = match times.peek() {
                Some(Ok((_, seq))) => be_u64(seq)?,
                Some(Err(e)) => return Err(e.clone().into()),
                None => tail.last_seq + 1,
            };
            if next_first > through + 1 {
                break;
            }
            batch.remove(key);
        }
        for table in [SETTLED, DEFERRED] {
            for entry in self
                .tree
                .range(num_key(table, 0)..num_key(table, through + 1))
            {
                batch.remove(entry?.0);
            }
        }
        // Segments that hold only removed chunks go after the next sync.
        let current = self.segments.current();
        let mut retired = Vec::new();
        for entry in self.tree.scan_prefix([SEGMENT]) {
            let (key, mark) = entry?;
            let segment = segment_of_key(&key)?;
            if decode_mark(&mark)?.0 <= through && segment != current {
                batch.remove(key);
                retired.push(segment);
            }
        }
        tail.bytes -= done.bytes.min(tail.bytes);
        batch.insert(SIZE_KEY, tail.bytes.to_be_bytes());
        batch.apply(&self.tree)?;
        self.directory.forget_through(through, tail.last_seq);
        for name in &forgotten {
            tail.names.remove(name);
        }
        if !forgotten.is_empty() {
            // A pattern may match fewer names now. (Were a look counting
            // before this to note a pattern after it, the pattern would
            // be walked where a merge might cost less, with the same
            // events either way.)
            self.crowded
                .write()
                .expect("crowded lock is never poisoned")
                .clear();
        }
        for segment in retired {
            self.segments.retire(segment);
        }
        self.bytes.store(tail.bytes, Ordering::Release);
        // Commits are removed whole and their seqs have no gaps: the next
        // commit starts right after, unless none is left.
        let oldest = if through < tail.last_seq {
            through + 1
        } else {
            0
        };
        self.oldest.store(oldest, Ordering::Release);
        Ok(done)
    }

    /// Finds the stored event `seq`: its name and value.
    fn locate(&self, seq: u64, reads: Reads) -> Result<Option<(String, Vec<u8>)>> {
        let Some(entry) = self
            .tree
            .range(num_key(COMMIT, 0)..=num_key(COMMIT, seq))
            .next_back()
        else {
            return Ok(None);
        };
        let (_, index) = entry?;
        for (first, name) in decode_commit(&index)? {
            if first > seq {
                continue;
            }
            let Some(chunk) = self.chunk(name, first, seq, 1, reads)? else {
                continue;
            };
            for entry in entries(&chunk) {
                let (at, value) = entry?;
                if at == seq {
                    return Ok(Some((name.to_owned(), value.to_vec())));
                }
                if at > seq {
                    break;
                }
            }
        }
        Ok(None)
    }

    /// Adds the events of `name` in `seqs` addressed to `identities` to
    /// `counted`, up to `limit`, from the chunks' summaries where they
    /// settle it.
    fn count_name(
        &self,
        name: &str,
        seqs: &RangeInclusive<u64>,
        identities: &[&str],
        limit: u64,
        counted: &mut Counted,
    ) -> Result<()> {
        let (start, end) = (*seqs.start(), *seqs.end());
        let from = self.summary_at_or_before(name, start)?;
        for entry in self.tree.range(from..=summary_key(name, end)) {
            let (key, value) = entry?;
            let first = key_first_seq(&key)?;
            let summary = Summary::decode(&value)?;
            if summary.last < start {
                continue;
            }
            if let Some(shared) = &summary.shared {
                // Events that share recipients count all or none; when the
                // chunk's seqs have no gaps, the part of it in range is
                // counted without reading it too.
                let inside = first >= start && summary.last <= end;
                let gapless = summary.last - first + 1 == u64::from(summary.count);
                if inside || gapless {
                    if addressing_of(shared, identities).is_none() {
                        continue;
                    }
                    let (from, to) = (first.max(start), summary.last.min(end));
                    let n = if inside {
                        u64::from(summary.count)
                    } else {
                        to - from + 1
                    };
                    if counted.count + n <= limit {
                        counted.count += n;
                        counted.last = to;
                        if counted.count == limit {
                            return Ok(());
                        }
                        continue;
                    }
                    if gapless {
                        counted.last = from + (limit - counted.count) - 1;
                        counted.count = limit;
                        return Ok(());
                    }
                }
            }
            let Some(chunk) = self.chunk(name, first, start, u64::MAX, Reads::Waiting)? else {
                return Err(StoreError::Damaged(format!(
                    "the chunk of {name} from {first} has a summary but no events"
                )));
            };
            for entry in entries(&chunk) {
                let (seq, value) = entry?;
                if seq < start {
                    continue;
                }
                if seq > end {
                    return Ok(());
                }
                if addressing_of(recipients_of(value), identities).is_some() {
                    counted.count += 1;
                    counted.last = seq;
                    if counted.count == limit {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Each name `pattern` matches that has events addressed directly to
    /// one of `identities`, with the first such seq. Most events go to
    /// `*`, so the `r` entries under the pattern's prefix are usually far
    /// fewer than its names: they are read first, up to `most` of them.
    /// Past that, each name is looked up instead.
    fn first_directs(
        &self,
        pattern: &Pattern,
        identities: &[&str],
        most: usize,
    ) -> Result<Vec<(String, u64)>> {
        let mut prefix = vec![DIRECT];
        prefix.extend_from_slice(pattern.prefix().as_bytes());
        let mut found: Vec<(String, u64)> = Vec::new();
        for (read, entry) in self.tree.scan_prefix(&prefix).enumerate() {
            if read == most {
                return self.first_directs_by_name(pattern, identities);
            }
            let (key, value) = entry?;
            let (name, recipient) = split_direct_key(&key)?;
            if !pattern.matches(name) || !identities.iter().any(|id| id.as_bytes() == recipient) {
                continue;
            }
            let first = be_u64(&value)?;
            // A name's entries lie together: its recipients follow `\0`.
            match found.last_mut() {
                Some((last, at)) if last == name => *at = (*at).min(first),
                _ => found.push((name.to_owned(), first)),
            }
        }
        Ok(found)
    }

    /// [`Self::first_directs`], looking each name up.
    fn first_directs_by_name(
        &self,
        pattern: &Pattern,
        identities: &[&str],
    ) -> Result<Vec<(String, u64)>> {
        let mut found = Vec::new();
        for name in self.names(pattern)? {
            let mut first_direct = None;
            for id in identities {
                if let Some(first) = self.tree.get(direct_key(&name, id.as_bytes()))? {
                    let first = be_u64(&first)?;
                    first_direct = Some(first_direct.map_or(first, |at: u64| at.min(first)));
                }
            }
            if let Some(first) = first_direct {
                found.push((name, first));
            }
        }
        Ok(found)
    }

    /// [`EventLog::undirected_until`] for one name whose direct events for
    /// the identities begin at `first_direct`, reading at most
    /// [`SKIP_SUMMARIES`] summaries.
    fn undirected_in(
        &self,
        name: &str,
        first_direct: u64,
        seqs: &RangeInclusive<u64>,
        identities: &[&str],
    ) -> Result<u64> {
        let (start, end) = (*seqs.start(), *seqs.end());
        if first_direct > end {
            return Ok(end);
        }
        if first_direct >= start {
            return Ok(first_direct - 1);
        }
        // They began before `start`: the summaries tell where more lie.
        let from = self.summary_at_or_before(name, start)?;
        let mut reached = end;
        for (read, entry) in self.tree.range(from..=summary_key(name, end)).enumerate() {
            let (key, value) = entry?;
            let first = key_first_seq(&key)?;
            if read == SKIP_SUMMARIES {
                reached = first.saturating_sub(1);
                break;
            }
            let summary = Summary::decode(&value)?;
            if summary.last < start {
                continue;
            }
            let direct = match &summary.shared {
                Some(shared) => addressing_of(shared, identities) == Some(Addressing::Direct),
                None => true,
            };
            if direct {
                reached = first.max(start).saturating_sub(1);
                break;
            }
        }
        Ok(reached)
    }

    /// The key of the summary of the chunk that holds `seq` of `name`, or
    /// where one would start.
    fn summary_at_or_before(&self, name: &str, seq: u64) -> Result<Vec<u8>> {
        Ok(
            match self
                .tree
                .range(summary_key(name, 0)..=summary_key(name, seq))
                .next_back()
            {
                Some(entry) => entry?.0.to_vec(),
                None => summary_key(name, seq),
            },
        )
    }

    /// The names `pattern` matches.
    fn names(&self, pattern: &Pattern) -> Result<Vec<String>> {
        Ok(self.names_within(pattern, usize::MAX)?.unwrap_or_default())
    }

    /// The names in the log that `pattern` matches, if there are at most
    /// `most` of them.
    fn names_within(&self, pattern: &Pattern, most: usize) -> Result<Option<Vec<String>>> {
        if let Pattern::Exact(name) = pattern {
            return Ok(Some(vec![name.as_str().to_owned()]));
        }
        let text = pattern.to_string();
        let noted = (self.crowded.read())
            .expect("crowded lock is never poisoned")
            .get(&text)
            .is_some_and(|&over| over >= most);
        if noted {
            return Ok(None);
        }
        let mut prefix = vec![NAME];
        prefix.extend_from_slice(pattern.prefix().as_bytes());
        let mut names = Vec::new();
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, _) = entry?;
            let name = utf8(&key[1..])?;
            if pattern.matches(name) {
                if names.len() == most {
                    // Names leave the log only with retention, which
                    // forgets what is noted here.
                    let mut noted = self
                        .crowded
                        .write()
                        .expect("crowded lock is never poisoned");
                    if noted.len() >= CROWDED_PATTERNS && !noted.contains_key(&text) {
                        noted.clear();
                    }
                    let over = noted.entry(text).or_insert(most);
                    *over = (*over).max(most);
                    return Ok(None);
                }
                names.push(name.to_owned());
            }
        }
        Ok(Some(names))
    }

    /// A scan that walks the `b` table: each commit's chunks of the names
    /// `pattern` matches, merged by seq, one commit at a time. It looks up
    /// only the names with events in each commit, and holds one commit's
    /// cursors at most; it costs a step per commit in `seqs`, which suits
    /// many names, or a range that holds fewer commits than the pattern
    /// has names. In the commit holding the range's start, the chunks the
    /// directory lists as ending before it get no cursor.
    ///
    /// A step costs far less than looking a name up, but a long log can
    /// hold many commits between a pattern's events. Once the walk has
    /// taken [`STEPS_PER_NAME`] steps per name the pattern matches, it
    /// merges the names for the rest of the range instead, if they are at
    /// most [`MERGE_NAMES_AFTER_WALK`]: at most about twice the cost of
    /// the cheaper way, whichever it is.
    fn walk(
        &self,
        pattern: &Pattern,
        seqs: RangeInclusive<u64>,
        (want, reads): (u64, Reads),
        visit: &mut dyn FnMut(EventView<'_>) -> ControlFlow<()>,
    ) -> Result<()> {
        let (start, end) = (*seqs.start(), *seqs.end());
        // From the commit holding `start`: the last one that began at or
        // before it.
        let from = match self
            .tree
            .range(num_key(COMMIT, 0)..=num_key(COMMIT, start))
            .next_back()
        {
            Some(entry) => entry?.0.to_vec(),
            None => num_key(COMMIT, start).to_vec(),
        };
        let mut commits = self
            .tree
            .range(from..=num_key(COMMIT, end).to_vec())
            .peekable();
        let ahead = RefCell::new(Ahead::default());
        let store = self.store(reads);
        let visited = Cell::new(0);
        let mut counting = |event: EventView<'_>| {
            visited.set(visited.get() + 1);
            visit(event)
        };
        // What the caller still expects: at least one more.
        let left = || want.saturating_sub(visited.get()).max(1);
        let mut steps = 0;
        // The names to merge instead, once looked up (`None`: too many).
        let mut merge_instead: Option<Option<Vec<String>>> = None;
        while let Some(entry) = commits.next() {
            let (key, index) = entry?;
            let lo = start.max(be_u64(&key[1..])?);
            steps += 1;
            // Only a pattern of more names than a merge takes walks this
            // far: one of fewer walks only ranges of fewer seqs.
            if steps > STEPS_PER_NAME * MERGE_NAMES as u64 {
                if merge_instead.is_none() {
                    merge_instead = Some(self.names_within(pattern, MERGE_NAMES_AFTER_WALK)?);
                }
                if let Some(Some(names)) = &merge_instead {
                    if steps > STEPS_PER_NAME * names.len() as u64 {
                        let rest = (left(), reads);
                        return self.merge_names(names, lo..=end, rest, &mut counting);
                    }
                }
            }
            // The commit's seqs end where the next one begins.
            let next = match commits.peek() {
                Some(Ok((next, _))) => Some(be_u64(&next[1..])?),
                None => None,
                // Where this commit ends is unknown: fail before reading
                // past it.
                Some(Err(_)) => {
                    commits.next().transpose()?;
                    None
                }
            };
            let hi = next.map_or(end, |next| end.min(next.saturating_sub(1)));
            if lo > hi {
                continue;
            }
            let mut chunks: Vec<(u64, &str)> = decode_commit(&index)?
                .into_iter()
                .filter(|&(_, name)| pattern.matches(name))
                .collect();
            chunks.sort_unstable();
            // A chunk that starts before the range and ends before it too
            // (as far as the directory tells) has nothing in it to read.
            let before = chunks.partition_point(|&(first, _)| first < lo);
            if before > 0 {
                let firsts: Vec<u64> = chunks[..before].iter().map(|&(first, _)| first).collect();
                let mut lasts = self.directory.chunk_lasts(&firsts).into_iter();
                chunks.retain(|_| lasts.next().flatten().map_or(true, |last| last >= lo));
            }
            // A name's cursor reads on through its later chunks in the
            // commit: one cursor per name, from its first chunk left.
            chunks.sort_unstable_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(&b.0)));
            chunks.dedup_by(|later, earlier| later.1 == earlier.1);
            chunks.sort_unstable();
            let sizes = (left(), merge_batch(chunks.len()));
            let flow = merge(
                chunks
                    .into_iter()
                    .map(|(first, name)| (lo.max(first), name)),
                |from, name| Cursor::new(store, &ahead, name, &(from..=hi), sizes),
                &mut counting,
            )?;
            if flow.is_break() {
                break;
            }
        }
        Ok(())
    }

    /// A scan that merges `names` by seq, a cursor each.
    fn merge_names(
        &self,
        names: &[String],
        seqs: RangeInclusive<u64>,
        (want, reads): (u64, Reads),
        visit: &mut dyn FnMut(EventView<'_>) -> ControlFlow<()>,
    ) -> Result<()> {
        let ahead = RefCell::new(Ahead::default());
        let store = self.store(reads);
        let sizes = (want, merge_batch(names.len()));
        let (start, end) = (*seqs.start(), *seqs.end());
        // Whether the visitor stopped it or not, the scan is done.
        merge(
            names.iter().map(|name| (start, name.as_str())),
            |from, name| Cursor::new(store, &ahead, name, &(from..=end), sizes),
            visit,
        )
        .map(drop)
    }

    /// A scan of one name: one cursor, without a merge's heap.
    fn scan_name(
        &self,
        name: &str,
        seqs: RangeInclusive<u64>,
        (want, reads): (u64, Reads),
        visit: &mut dyn FnMut(EventView<'_>) -> ControlFlow<()>,
    ) -> Result<()> {
        let ahead = RefCell::new(Ahead::default());
        let sizes = (want, merge_batch(1));
        let mut cursor = Cursor::new(self.store(reads), &ahead, name, &seqs, sizes)?;
        // Whether the visitor stopped it or not, the scan is done.
        cursor.visit_rest(visit).map(drop)
    }

    /// What a cursor reads, and how.
    fn store(&self, reads: Reads) -> Store<'_> {
        Store {
            tree: &self.tree,
            segments: &self.segments,
            directory: &self.directory,
            reads,
        }
    }
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
        if let Some(failed) = &tail.failed {
            return Err(StoreError::Backend(format!(
                "the store stopped committing after a write failed ({failed}); restart the server to recover what was written"
            )));
        }
        if let [WriteOp::Trim(trim)] = ops {
            let trimmed = self.trim(&mut tail, trim)?;
            return Ok(vec![Applied::Trimmed(trimmed)]);
        }
        let (mut seq, mut ts) = (tail.last_seq, tail.last_ts);
        let mut new_names: Vec<&str> = Vec::new();
        let mut checked_name: Option<&str> = None;
        // The milliseconds this batch logs first, with their first seqs.
        let mut new_times: Vec<(u64, u64)> = Vec::new();
        let mut new_directs: Vec<Vec<u8>> = Vec::new();
        let mut new_settlers: Vec<&str> = Vec::new();
        let mut batch = Writes::framed();
        let mut chunks = Chunks {
            spares: std::mem::take(&mut tail.spare_chunks),
            ..Chunks::default()
        };
        // Subscriptions this batch changed, as they will be once applied.
        let mut subs: HashMap<Vec<u8>, Option<Subscription>> = HashMap::new();
        let mut value = Vec::new();
        let mut applied = Vec::with_capacity(ops.len());
        for op in ops {
            let result = match op {
                WriteOp::Publish(event) => {
                    seq += 1;
                    // NOTE: a clock that steps back keeps the last
                    // timestamp, so `loggedAt` never decreases along the log.
                    if now_ms > ts {
                        ts = now_ms;
                        batch.insert(num_key(TIME, ts), seq.to_be_bytes());
                        new_times.push((ts, seq));
                    }
                    let name = event.name.as_str();
                    // A run of one name is looked up once.
                    if checked_name != Some(name) {
                        if !tail.names.contains(name) && !new_names.contains(&name) {
                            new_names.push(name);
                            batch.insert(name_key(name), []);
                        }
                        checked_name = Some(name);
                    }
                    for recipient in &event.recipients {
                        if let Recipient::Client(id) = recipient {
                            let key = direct_key(name, id.as_str().as_bytes());
                            // NOTE: looked up rather than kept in memory: one
                            // key per name and recipient ever seen.
                            if !new_directs.contains(&key) && !self.tree.contains_key(&key)? {
                                batch.insert(key.as_slice(), seq.to_be_bytes());
                                new_directs.push(key);
                            }
                        }
                    }
                    let idem = self.idem(seq);
                    value.clear();
                    encode_recipients(&event.recipients, &mut value);
                    let fields = RecordFields {
                        idem: &idem,
                        block: seq,
                        name,
                        logged_at: ts,
                        sender: event.sender.as_str(),
                        payload: &event.payload,
                        metadata: event.metadata.as_ref(),
                    };
                    encode_record_into(&fields, &mut value);
                    chunks.push(name, seq, &value);
                    Applied::Published(Appended {
                        seq,
                        idem,
                        logged_at: ts,
                    })
                }
                WriteOp::Subscribe { client, pattern } => {
                    let key = sub_key(client, pattern);
                    let sub = match self.sub_in(&subs, &key, client, pattern)? {
                        Some(existing) => existing,
                        None => {
                            let sub = Subscription {
                                client: client.clone(),
                                pattern: pattern.clone(),
                                since: seq,
                                paused: false,
                                floor: 0,
                            };
                            subs.insert(key, Some(sub.clone()));
                            sub
                        }
                    };
                    Applied::Subscribed(sub)
                }
                WriteOp::Unsubscribe { client, pattern } => {
                    let key = sub_key(client, pattern);
                    let existing = self.sub_in(&subs, &key, client, pattern)?;
                    if existing.is_some() {
                        subs.insert(key, None);
                    }
                    Applied::Unsubscribed(existing)
                }
                WriteOp::SetPaused {
                    client,
                    pattern,
                    paused,
                } => {
                    let key = sub_key(client, pattern);
                    Applied::PausedSet(match self.sub_in(&subs, &key, client, pattern)? {
                        None => Err(PauseRefused::NotSubscribed),
                        Some(sub) if !*paused && !sub.paused => Err(PauseRefused::NotPaused),
                        Some(mut sub) => {
                            sub.paused = *paused;
                            subs.insert(key, Some(sub.clone()));
                            Ok(sub)
                        }
                    })
                }
                WriteOp::Settle {
                    client,
                    seq: event,
                    settlement,
                    floors,
                } => {
                    let key = client_seq_key(SETTLED, *event, client);
                    match settlement {
                        Settlement::Acked => batch.insert(key, [ACKED]),
                        Settlement::Discarded(reason) => {
                            let mut value = vec![DISCARDED];
                            value.extend_from_slice(reason.as_bytes());
                            batch.insert(key, value);
                        }
                    }
                    batch.remove(client_seq_key(DEFERRED, *event, client));
                    batch.remove(queue_key(client, *event));
                    let known = self
                        .settlers
                        .read()
                        .expect("settlers lock is never poisoned")
                        .contains(client.as_str());
                    if !known && !new_settlers.contains(&client.as_str()) {
                        new_settlers.push(client.as_str());
                        let mut key = vec![SETTLER];
                        key.extend_from_slice(client.as_str().as_bytes());
                        batch.insert(key, []);
                    }
                    self.raise_floors(&mut subs, client, floors)?;
                    Applied::Stored
                }
                WriteOp::Defer {
                    client,
                    seq: event,
                    due_ms,
                } => {
                    let key = client_seq_key(DEFERRED, *event, client);
                    match due_ms {
                        Some(due) => batch.insert(key, due.to_be_bytes()),
                        None => batch.remove(key),
                    }
                    Applied::Stored
                }
                WriteOp::SetFloors { client, floors } => {
                    self.raise_floors(&mut subs, client, floors)?;
                    Applied::Stored
                }
                WriteOp::Operation { id, record, queue } => {
                    match record {
                        Some(record) => batch.insert(num_key(OPERATION, *id), record.as_slice()),
                        None => batch.remove(num_key(OPERATION, *id)),
                    }
                    for Queued {
                        client,
                        seq,
                        replayed_at,
                    } in queue
                    {
                        batch.insert(queue_key(client, *seq), replayed_at.to_be_bytes());
                    }
                    Applied::Stored
                }
                WriteOp::Unqueue { client, seqs } => {
                    for seq in seqs {
                        batch.remove(queue_key(client, *seq));
                    }
                    Applied::Stored
                }
                WriteOp::Trim(_) => {
                    return Err(StoreError::Backend(
                        "a trim must be applied on its own".into(),
                    ))
                }
            };
            applied.push(result);
        }
        let mut frame = self.segments.begin(chunks.bytes())?;
        let (added, written) = chunks.write(&mut batch, &mut frame, &mut tail.spare_chunks)?;
        if seq != tail.last_seq {
            batch.insert(LAST_KEY, seq.to_be_bytes());
        }
        if added > 0 {
            batch.insert(SIZE_KEY, (tail.bytes + added).to_be_bytes());
        }
        for (key, sub) in &subs {
            match sub {
                Some(sub) => batch.insert(key.as_slice(), encode_sub(sub).as_slice()),
                None => batch.remove(key.as_slice()),
            }
        }
        let redo = batch.redo.take().unwrap_or_default();
        let end = self.segments.finish(frame, &redo)?;
        // The frame is on disk before sled holds the commit: sled may
        // write its log at any time, and after a power loss a location it
        // kept must point at bytes that were kept too.
        let landed = self
            .segments
            .sync()
            .and_then(|()| apply_framed(&self.tree, &redo, end));
        if let Err(e) = landed {
            // The frame may be on disk and the tree may hold part of it:
            // a commit after it would take its seqs. A restart applies it
            // again from the frame, or leaves it out if it was not kept.
            tail.failed = Some(e.to_string());
            return Err(e);
        }
        // Listed before the seqs become visible (`last_seq`), so that the
        // directory holds every chunk a reader can be looking for.
        if !written.is_empty() || !new_times.is_empty() {
            self.directory.add(
                written.iter().map(|(name, first, last, value)| {
                    (name.as_str(), *first, *last, value.clone())
                }),
                new_times,
            );
        }
        if seq > tail.last_seq && self.oldest.load(Ordering::Acquire) == 0 {
            self.oldest.store(tail.last_seq + 1, Ordering::Release);
        }
        tail.last_seq = seq;
        tail.last_ts = ts;
        tail.bytes += added;
        self.bytes.store(tail.bytes, Ordering::Release);
        let new_names: Vec<String> = new_names.into_iter().map(str::to_owned).collect();
        tail.names.extend(new_names);
        if !new_settlers.is_empty() {
            self.settlers
                .write()
                .expect("settlers lock is never poisoned")
                .extend(new_settlers.into_iter().map(str::to_owned));
        }
        let sync = self
            .sync_every
            .is_some_and(|every| tail.synced.elapsed() >= every);
        if sync {
            tail.synced = Instant::now();
        }
        // Readers take the tail's lock for the last seq: not held while
        // sled syncs.
        drop(tail);
        if sync {
            // The commit is durable in its frame whatever this gives: it
            // only bounds what a reopen applies again.
            if let Err(e) = self.db.flush() {
                error!(error = %e, "the store's index could not be synced");
            }
        }
        Ok(applied)
    }

    fn flush(&self) -> Result<()> {
        // The frames first (`apply` synced those it wrote): a location
        // sled keeps must point at bytes that were kept.
        self.segments.sync()?;
        self.db.flush()?;
        self.segments.remove_retired()
    }

    fn resolve(
        &self,
        position: &Position,
        side: Side,
    ) -> Result<Result<Resolved, UnknownPosition>> {
        let last = self.last_seq();
        let Some(oldest) = EventLog::oldest(self)? else {
            return Ok(match position {
                Position::Event(_) => Err(UnknownPosition),
                _ => Ok(Resolved::Nothing),
            });
        };
        let first_at_or_after = |ms: u64| -> Result<Option<u64>> {
            if let Some(seq) = self.directory.first_seq_from(ms) {
                return Ok(Some(seq));
            }
            match self
                .tree
                .range(num_key(TIME, ms)..=num_key(TIME, u64::MAX))
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
            // NOTE: seqs are handed out without gaps and retention removes
            // the oldest commits whole, so every seq from the oldest to the
            // last is stored.
            (Position::Event(id), _) => match self.seq_of(id) {
                Some(seq) if (oldest..=last).contains(&seq) => Resolved::Seq(seq),
                _ => return Ok(Err(UnknownPosition)),
            },
        };
        Ok(Ok(resolved))
    }

    fn scan_expecting(
        &self,
        pattern: &Pattern,
        seqs: RangeInclusive<u64>,
        want: u64,
        reads: Reads,
        visit: &mut dyn FnMut(EventView<'_>) -> ControlFlow<()>,
    ) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        if let Pattern::Exact(name) = pattern {
            return self.scan_name(name.as_str(), seqs, (want, reads), visit);
        }
        let len = (seqs.end() - seqs.start()).saturating_add(1);
        let names = match self.names_within(pattern, MERGE_NAMES)? {
            Some(names) if names.is_empty() => return Ok(()),
            // A merge looks up each name: a walk takes fewer steps when
            // the range holds fewer seqs (so fewer commits) than that.
            Some(names) if len >= names.len() as u64 => names,
            _ => return self.walk(pattern, seqs, (want, reads), visit),
        };
        self.merge_names(&names, seqs, (want, reads), visit)
    }

    fn count(
        &self,
        pattern: &Pattern,
        seqs: RangeInclusive<u64>,
        identities: &[&str],
        limit: u64,
    ) -> Result<Counted> {
        let mut counted = Counted { count: 0, last: 0 };
        if seqs.is_empty() || limit == 0 {
            return Ok(counted);
        }
        let Some(names) = self.names_within(pattern, MERGE_NAMES)? else {
            return count_by_scan(self, pattern, seqs, identities, limit);
        };
        if let [name] = names.as_slice() {
            self.count_name(name, &seqs, identities, limit, &mut counted)?;
            return Ok(counted);
        }
        // Several names: their counts add up unless the limit falls among
        // them, and then only a merge by seq finds where it falls.
        for name in &names {
            let mut of_name = Counted { count: 0, last: 0 };
            let room = limit - counted.count + 1;
            self.count_name(name, &seqs, identities, room, &mut of_name)?;
            counted.count += of_name.count;
            if of_name.count > 0 {
                counted.last = counted.last.max(of_name.last);
            }
            if counted.count > limit {
                return count_by_scan(self, pattern, seqs, identities, limit);
            }
        }
        Ok(counted)
    }

    fn undirected_until(
        &self,
        pattern: &Pattern,
        seqs: RangeInclusive<u64>,
        identities: &[&str],
    ) -> Result<u64> {
        if seqs.is_empty() {
            return Ok(seqs.start().saturating_sub(1));
        }
        let directs = match pattern {
            Pattern::Exact(_) => self.first_directs_by_name(pattern, identities)?,
            _ => self.first_directs(pattern, identities, DIRECTS_SCANNED)?,
        };
        let mut reached = *seqs.end();
        for (name, first_direct) in directs {
            reached = reached.min(self.undirected_in(&name, first_direct, &seqs, identities)?);
        }
        Ok(reached)
    }

    fn event(&self, id: &EventId) -> Result<Option<OwnedEvent>> {
        let Some(seq) = self.seq_of(id) else {
            return Ok(None);
        };
        Ok(self
            .locate(seq, Reads::Waiting)?
            .map(|(name, value)| OwnedEvent { seq, name, value }))
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
            subs.push(decode_sub(
                client.parse::<ClientId>().map_err(damaged)?,
                pattern.parse::<Pattern>().map_err(damaged)?,
                &value,
            )?);
        }
        Ok(subs)
    }

    fn event_at(&self, seq: u64, reads: Reads) -> Result<Option<OwnedEvent>> {
        Ok(self
            .locate(seq, reads)?
            .map(|(name, value)| OwnedEvent { seq, name, value }))
    }

    fn seq_of(&self, id: &EventId) -> Option<u64> {
        SledLog::seq_of(self, id)
    }

    fn oldest(&self) -> Result<Option<u64>> {
        Ok(Some(self.oldest.load(Ordering::Acquire)).filter(|seq| *seq > 0))
    }

    fn stored_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    fn mapped_bytes(&self) -> u64 {
        self.segments.mapped_bytes()
    }

    fn has_settlements(&self, client: &ClientId) -> bool {
        self.settlers
            .read()
            .expect("settlers lock is never poisoned")
            .contains(client.as_str())
    }

    fn settlement(&self, client: &ClientId, seq: u64) -> Result<Option<Settlement>> {
        let Some(value) = self.tree.get(client_seq_key(SETTLED, seq, client))? else {
            return Ok(None);
        };
        match value.split_first() {
            Some((&ACKED, _)) => Ok(Some(Settlement::Acked)),
            Some((&DISCARDED, reason)) => Ok(Some(Settlement::Discarded(
                String::from_utf8_lossy(reason).into_owned(),
            ))),
            _ => Err(StoreError::Damaged(format!(
                "settlement of event {seq} by {client} is unreadable"
            ))),
        }
    }

    fn deferred(&self, client: &ClientId) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix([DEFERRED]) {
            let (key, value) = entry?;
            if key.get(9..) == Some(client.as_str().as_bytes()) {
                out.push((be_u64(&key[1..9])?, be_u64(&value)?));
            }
        }
        Ok(out)
    }

    fn operations(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix([OPERATION]) {
            let (key, value) = entry?;
            out.push((be_u64(&key[1..])?, value.to_vec()));
        }
        Ok(out)
    }

    fn replay_queue(&self, client: &ClientId, after: u64, max: usize) -> Result<Vec<(u64, u64)>> {
        let prefix = queue_prefix(client);
        let start = queue_key(client, after.saturating_add(1));
        let mut out = Vec::new();
        for entry in self.tree.range(start..) {
            let (key, value) = entry?;
            let Some(seq) = key.strip_prefix(prefix.as_slice()) else {
                break;
            };
            out.push((be_u64(seq)?, be_u64(&value)?));
            if out.len() == max {
                break;
            }
        }
        Ok(out)
    }

    fn queued_replay(&self, client: &ClientId, seq: u64) -> Result<Option<u64>> {
        self.tree
            .get(queue_key(client, seq))?
            .map(|v| be_u64(&v))
            .transpose()
    }
}

/// A replayed delivery's key: client, NUL, seq (so a client's queue is one
/// range, in seq order).
fn queue_key(client: &ClientId, seq: u64) -> Vec<u8> {
    let mut key = queue_prefix(client);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn queue_prefix(client: &ClientId) -> Vec<u8> {
    let mut key = Vec::with_capacity(10 + client.as_str().len());
    key.push(REPLAY_QUEUE);
    key.extend_from_slice(client.as_str().as_bytes());
    key.push(0);
    key
}

/// A key of a table keyed by seq, then client.
fn client_seq_key(table: u8, seq: u64, client: &ClientId) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + client.as_str().len());
    key.push(table);
    key.extend_from_slice(&seq.to_be_bytes());
    key.extend_from_slice(client.as_str().as_bytes());
    key
}

/// A subscription's value: since, paused, floor.
fn encode_sub(sub: &Subscription) -> [u8; 17] {
    let mut value = [0; 17];
    value[..8].copy_from_slice(&sub.since.to_be_bytes());
    value[8] = u8::from(sub.paused);
    value[9..].copy_from_slice(&sub.floor.to_be_bytes());
    value
}

fn decode_sub(client: ClientId, pattern: Pattern, value: &[u8]) -> Result<Subscription> {
    let since = be_u64(value.get(..8).unwrap_or(value))?;
    // Older stores kept only `since`.
    let (paused, floor) = match value.len() {
        8 => (false, 0),
        17 => (value[8] != 0, be_u64(&value[9..])?),
        n => {
            return Err(StoreError::Damaged(format!(
                "subscription value of {n} bytes"
            )))
        }
    };
    Ok(Subscription {
        client,
        pattern,
        since,
        paused,
        floor,
    })
}

fn sub_key(client: &ClientId, pattern: &Pattern) -> Vec<u8> {
    let mut key = vec![SUB];
    key.extend_from_slice(client.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(pattern.to_string().as_bytes());
    key
}

#[cfg(test)]
mod chunked_log {
    use super::*;
    use ensync_protocol::field::{Payload, Recipient};

    use crate::store::NewEvent;

    fn event(name: &str, n: usize) -> WriteOp {
        // About 18 events to a chunk, whatever its size.
        let pad = "x".repeat(MAX_CHUNK_BYTES / 18);
        let payload: Payload = format!("{{\"n\":{n},\"pad\":\"{pad}\"}}")
            .parse()
            .expect("json");
        WriteOp::Publish(NewEvent {
            name: name.parse().expect("name"),
            sender: "tester".parse().expect("id"),
            payload,
            metadata: None,
            recipients: vec![Recipient::All],
        })
    }

    /// Directory budgets a scan test runs with: none (every chunk found in
    /// sled), room for some of the newest chunks, and room for all.
    const LISTINGS: [u64; 3] = [0, 2 * 1024, 32 << 20];

    fn open_listing(dir: &Path, listed: u64) -> Result<SledLog> {
        SledLog::open_with_budgets(dir, crate::config::DEFAULT_INDEX_CACHE, listed)
    }

    fn seqs(log: &SledLog, pattern: &str, range: RangeInclusive<u64>) -> Vec<u64> {
        let mut out = Vec::new();
        log.scan(&pattern.parse().expect("pattern"), range, &mut |e| {
            out.push(e.seq);
            ControlFlow::Continue(())
        })
        .expect("scan");
        out
    }

    /// 300 events of ~1/18 chunk over two names in one commit and two more
    /// commits: many chunks per name, chunks interleaved in seq space.
    fn fill(log: &SledLog) {
        let ops: Vec<WriteOp> = (0..300)
            .map(|i| event(if i % 3 == 0 { "a/x" } else { "b/y" }, i))
            .collect();
        log.apply(&ops, 1_000).expect("apply");
        log.apply(&[event("a/x", 300)], 1_000).expect("apply");
        log.apply(&[event("b/y", 301), event("a/x", 302)], 2_000)
            .expect("apply");
        log.flush().expect("flush");
    }

    fn event_to(name: &str, n: usize, to: &[&str]) -> WriteOp {
        let WriteOp::Publish(mut event) = event(name, n) else {
            unreachable!("event() publishes")
        };
        event.recipients = to
            .iter()
            .map(|r| match *r {
                "*" => Recipient::All,
                id => Recipient::Client(id.parse().expect("id")),
            })
            .collect();
        WriteOp::Publish(event)
    }

    /// A log whose chunks are of every kind a count meets: gapless and
    /// interleaved, with shared and mixed recipients.
    fn fill_for_counts(log: &SledLog) {
        // Gapless chunks of one name, for everyone.
        let ops: Vec<WriteOp> = (0..200).map(|i| event("g/one", i)).collect();
        log.apply(&ops, 1_000).expect("apply");
        // Two names interleaved; one for alice only, one mixed.
        let ops: Vec<WriteOp> = (0..300)
            .map(|i| match i % 3 {
                0 => event_to("m/a", i, &["alice"]),
                1 => event_to("m/b", i, &["bob"]),
                _ => event_to("m/b", i, &["*"]),
            })
            .collect();
        log.apply(&ops, 2_000).expect("apply");
        // A gapless chunk for alice only.
        let ops: Vec<WriteOp> = (0..150).map(|i| event_to("g/one", i, &["alice"])).collect();
        log.apply(&ops, 3_000).expect("apply");
        log.flush().expect("flush");
    }

    fn assert_counts_match_a_scan(log: &SledLog) -> Result<()> {
        let last = log.last_seq();
        for pattern in ["g/one", "m/a", "m/b", "m/*", "*"] {
            let pattern: Pattern = pattern.parse().expect("pattern");
            for ids in [&["alice"][..], &["bob"], &["carol"], &["alice", "bob"]] {
                for (start, end) in [(1, last), (1, 150), (57, 333), (201, 500), (480, last)] {
                    for limit in [1, 7, 50, 120, 1000] {
                        let fast = log.count(&pattern, start..=end, ids, limit)?;
                        let slow = count_by_scan(log, &pattern, start..=end, ids, limit)?;
                        let fast = (fast.count, (fast.count > 0).then_some(fast.last));
                        let slow = (slow.count, (slow.count > 0).then_some(slow.last));
                        assert_eq!(
                            fast, slow,
                            "{pattern} {ids:?} {start}..={end} limit {limit}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn counts_from_summaries_match_counting_every_event() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SledLog::open(dir.path())?;
        fill_for_counts(&log);
        assert_counts_match_a_scan(&log)
    }

    /// The payload counter `n` of each event a scan of `pattern` in
    /// `range`, expecting `want` events, visits: what the records read say.
    fn counters(log: &SledLog, pattern: &str, range: RangeInclusive<u64>, want: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let pattern = pattern.parse().expect("pattern");
        log.scan_expecting(&pattern, range, want, Reads::Waiting, &mut |e| {
            let mut record = bytes::BytesMut::new();
            e.record.write(&mut record, &ensync_protocol::Marks::LIVE);
            let record: serde_json::Value = serde_json::from_slice(&record).expect("record json");
            out.push(record["payload"]["n"].as_u64().expect("n"));
            ControlFlow::Continue(())
        })
        .expect("scan");
        out
    }

    #[test]
    fn a_cursor_reads_nothing_the_last_one_on_its_thread_left() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SledLog::open(dir.path())?;
        let large: Vec<WriteOp> = (0..40).map(|i| event("t/large", i)).collect();
        log.apply(&large, 1_000)?;
        log.apply(
            &[small_event("t/small", 40), small_event("t/small", 41)],
            1_000,
        )?;
        log.flush()?;
        // Each scan reads into the buffer the one before it left, full of
        // larger records.
        assert_eq!(
            counters(&log, "t/large", 1..=40, 40),
            (0..40).collect::<Vec<_>>()
        );
        assert_eq!(counters(&log, "t/small", 1..=42, 2), [40, 41]);
        assert_eq!(
            counters(&log, "t/large", 20..=40, 1),
            (19..40).collect::<Vec<_>>()
        );
        assert_eq!(counters(&log, "t/small", 42..=42, 1), [41]);
        assert_eq!(counters(&log, "t/none", 1..=42, 1), Vec::<u64>::new());
        assert_eq!(counters(&log, "t/small", 1..=40, 1), Vec::<u64>::new());
        Ok(())
    }

    #[test]
    fn history_skips_only_chunks_without_direct_events() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SledLog::open(dir.path())?;
        fill_for_counts(&log);
        let last = log.last_seq();
        for pattern in ["g/one", "m/a", "m/b", "m/*", "*"] {
            let pattern: Pattern = pattern.parse().expect("pattern");
            for ids in [&["alice"][..], &["bob"], &["carol"], &["alice", "bob"]] {
                // Reading the `r` entries finds what looking each name up
                // finds, and so does giving up on them part way.
                let by_name = log.first_directs_by_name(&pattern, ids)?;
                assert_eq!(log.first_directs(&pattern, ids, usize::MAX)?, by_name);
                assert_eq!(log.first_directs(&pattern, ids, 1)?, by_name);
                for (start, end) in [(1, last), (57, 333), (201, 500), (480, last)] {
                    let until = log.undirected_until(&pattern, start..=end, ids)?;
                    assert!((start - 1..=end).contains(&until), "{pattern} {ids:?}");
                    let mut direct = None;
                    log.scan(&pattern, start..=until, &mut |e| {
                        if e.addressing(ids) == Some(Addressing::Direct) {
                            direct = Some(e.seq);
                            return ControlFlow::Break(());
                        }
                        ControlFlow::Continue(())
                    })?;
                    assert_eq!(
                        direct, None,
                        "{pattern} {ids:?} skipped past a direct event"
                    );
                }
            }
        }
        // The skips are whole: alice's first direct event on g/one is 501,
        // carol has none at all.
        let g_one: Pattern = "g/one".parse().expect("pattern");
        assert_eq!(log.undirected_until(&g_one, 1..=last, &["alice"])?, 500);
        assert_eq!(log.undirected_until(&g_one, 1..=last, &["carol"])?, last);
        Ok(())
    }

    /// Stores written before chunk offsets were kept have bare locations:
    /// scans from every start and lookups of every event read the same.
    #[test]
    fn chunks_without_offsets_read_the_same() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SledLog::open(dir.path())?;
        fill(&log);
        let read_all = |log: &SledLog| -> Result<Vec<Vec<u64>>> {
            let mut out = Vec::new();
            for name in ["a/x", "b/y", "*"] {
                for start in 1..=303 {
                    out.push(seqs(log, name, start..=303));
                    out.push(seqs(log, name, start..=(start + 20).min(303)));
                }
            }
            for seq in 1..=303 {
                let id: EventId = log.idem(seq).parse().expect("id");
                let found = log.event(&id)?.expect("stored");
                out.push(vec![found.seq, found.value.len() as u64]);
            }
            Ok(out)
        };
        let with_offsets = read_all(&log)?;
        let mut batch = Writes::default();
        let mut stripped = 0;
        for entry in log.tree.scan_prefix([CHUNK]) {
            let (key, value) = entry?;
            if value.len() > 16 {
                batch.insert(key, &value[..16]);
                stripped += 1;
            }
        }
        assert!(stripped > 10, "the filled log has chunks with offsets");
        batch.apply(&log.tree)?;
        log.flush()?;
        // Reopened: the directory lists the chunks as the index holds them
        // now, so every chunk is read as stored.
        drop(log);
        let log = SledLog::open(dir.path())?;
        assert_eq!(read_all(&log)?, with_offsets);
        Ok(())
    }

    #[test]
    fn a_store_with_chunks_in_sled_moves_them_to_segments_when_opened() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let before = {
            let log = SledLog::open(dir.path())?;
            fill(&log);
            let before = (seqs(&log, "*", 1..=303), log.stored_bytes());
            chunks_back_into_sled(&log)?;
            before
        };
        std::fs::remove_dir_all(dir.path().join("segments")).expect("remove segments");
        let log = SledLog::open(dir.path())?;
        assert_eq!(before.0.len(), 303);
        assert_eq!((seqs(&log, "*", 1..=303), log.stored_bytes()), before);
        for entry in log.tree.scan_prefix([CHUNK]) {
            Loc::decode(&entry?.1)?;
        }
        Ok(())
    }

    /// Makes `log` as a store written before segment files: chunks in
    /// sled (the segment files are left for the caller to remove).
    fn chunks_back_into_sled(log: &SledLog) -> Result<()> {
        let mut batch = Writes::default();
        for entry in log.tree.scan_prefix([CHUNK]) {
            let (key, loc) = entry?;
            let mut chunk = Vec::new();
            log.segments.read(Loc::decode(&loc)?, &mut chunk)?;
            batch.insert(key, chunk);
        }
        for entry in log.tree.scan_prefix([SEGMENT]) {
            batch.remove(entry?.0);
        }
        batch.remove(SEGMENTS_KEY);
        batch.apply(&log.tree)?;
        log.db.flush()?;
        Ok(())
    }

    /// An event of `name` with a 1 MiB payload.
    fn big(name: &str) -> WriteOp {
        let payload: Payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(1 << 20))
            .parse()
            .expect("json");
        WriteOp::Publish(NewEvent {
            name: name.parse().expect("name"),
            sender: "tester".parse().expect("id"),
            payload,
            metadata: None,
            recipients: vec![Recipient::All],
        })
    }

    /// 150 events of 1 MiB on `names` (by turns of ten) in commits of ten:
    /// three segments or more.
    fn fill_big(log: &SledLog, names: &[&str]) -> Result<()> {
        for i in 0..15 {
            let ops: Vec<WriteOp> = (0..10).map(|_| big(names[i % names.len()])).collect();
            log.apply(&ops, 1_000)?;
            log.flush()?;
        }
        Ok(())
    }

    fn segment_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("segments"))
            .expect("segments dir")
            .count()
    }

    /// Retention down to 20 MiB.
    fn trim_to_20_mib(log: &SledLog) -> Result<()> {
        let trim = Trim {
            before_ms: None,
            max_bytes: Some(20 << 20),
            keep_from: u64::MAX,
            max_commits: usize::MAX,
        };
        log.apply(&[WriteOp::Trim(trim)], 2_000)?;
        Ok(())
    }

    /// Names whose events retention removed are forgotten (in the store,
    /// in memory and in the index of direct recipients); names with
    /// events left are kept, and a forgotten name comes back when used.
    #[test]
    fn retention_forgets_names_it_emptied() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SledLog::open(dir.path())?;
        let gone: Vec<WriteOp> = (0..50)
            .map(|i| event_to(&format!("gone/{i}"), i, &["bob"]))
            .collect();
        log.apply(&gone, 1_000)?;
        log.apply(&[event_to("kept/x", 50, &["bob", "*"])], 1_000)?;
        log.apply(&[event_to("kept/x", 51, &["carol"])], 2_000)?;
        log.flush()?;
        let names_stored = |log: &SledLog| -> Result<Vec<String>> {
            let mut names = Vec::new();
            for entry in log.tree.scan_prefix([NAME]) {
                names.push(utf8(&entry?.0[1..])?.to_owned());
            }
            Ok(names)
        };
        let directs =
            |log: &SledLog| -> Result<usize> { Ok(log.tree.scan_prefix([DIRECT]).count()) };
        assert_eq!(names_stored(&log)?.len(), 51);
        assert_eq!(directs(&log)?, 52);
        let trim = Trim {
            before_ms: Some(2_000),
            max_bytes: None,
            keep_from: u64::MAX,
            max_commits: usize::MAX,
        };
        log.apply(&[WriteOp::Trim(trim)], 3_000)?;
        assert_eq!(names_stored(&log)?, ["kept/x"]);
        assert_eq!(log.tail.lock().expect("tail").names.len(), 1);
        assert_eq!(log.names(&"*".parse().expect("pattern"))?, ["kept/x"]);
        // kept/x keeps its index: bob (trimmed event) and carol.
        assert_eq!(directs(&log)?, 2);
        assert_eq!(seqs(&log, "*", 1..=52), [52]);

        log.apply(&[event_to("gone/3", 52, &["bob"])], 4_000)?;
        assert_eq!(seqs(&log, "gone/*", 1..=53), [53]);
        let first = log
            .tree
            .get(direct_key("gone/3", b"bob"))?
            .expect("indexed");
        assert_eq!(be_u64(&first)?, 53);
        drop(log);
        let log = SledLog::open(dir.path())?;
        assert_eq!(names_stored(&log)?, ["gone/3", "kept/x"]);
        assert_eq!(log.tail.lock().expect("tail").names.len(), 2);
        Ok(())
    }

    #[test]
    fn retention_removes_segments_it_emptied() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SledLog::open(dir.path())?;
        fill_big(&log, &["big/one"])?;
        let before = segment_files(dir.path());
        assert!(before >= 3, "{before} segments");
        trim_to_20_mib(&log)?;
        assert_eq!(
            segment_files(dir.path()),
            before,
            "nothing goes before the sync"
        );
        log.flush()?;
        let after = segment_files(dir.path());
        assert!(after < before, "{after} of {before} segments left");
        let left = seqs(&log, "big/one", 1..=150);
        assert!(!left.is_empty() && left.len() < 150);
        assert_eq!(*left.last().expect("some left"), 150);
        drop(log);
        let log = SledLog::open(dir.path())?;
        assert_eq!(seqs(&log, "big/one", 1..=150), left);
        Ok(())
    }

    #[test]
    fn segments_retired_before_a_crash_are_removed_when_opened() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (left, before) = {
            let log = SledLog::open(dir.path())?;
            fill_big(&log, &["big/one"])?;
            let before = segment_files(dir.path());
            trim_to_20_mib(&log)?;
            // Synced, then the crash: nothing removed.
            log.segments.sync()?;
            log.db.flush()?;
            (seqs(&log, "big/one", 1..=150), before)
        };
        assert_eq!(segment_files(dir.path()), before);
        let log = SledLog::open(dir.path())?;
        let after = segment_files(dir.path());
        assert!(after < before, "{after} of {before} segments left");
        assert_eq!(seqs(&log, "big/one", 1..=150), left);
        Ok(())
    }

    #[test]
    fn retention_frees_segments_of_a_migrated_store() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let log = SledLog::open(dir.path())?;
            // Names by turns: key order is not seq order.
            fill_big(&log, &["b/late", "a/early"])?;
            chunks_back_into_sled(&log)?;
        }
        std::fs::remove_dir_all(dir.path().join("segments")).expect("remove segments");
        let log = SledLog::open(dir.path())?;
        let before = segment_files(dir.path());
        assert!(before >= 3, "{before} segments");
        trim_to_20_mib(&log)?;
        log.flush()?;
        let left = seqs(&log, "*", 1..=150).len();
        // At most the segments the events left span, and the one being written.
        let after = segment_files(dir.path());
        assert!(
            after <= 2,
            "{after} of {before} segments left for {left} MiB"
        );
        Ok(())
    }

    #[test]
    fn a_store_without_the_direct_index_gets_it_when_opened() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let index = |log: &SledLog| -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            log.tree
                .scan_prefix([DIRECT])
                .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into))
                .collect()
        };
        let written = {
            let log = SledLog::open(dir.path())?;
            fill_for_counts(&log);
            let written = index(&log)?;
            let mut batch = Writes::default();
            for (key, _) in &written {
                batch.remove(key.as_slice());
            }
            batch.remove(DIRECTS_KEY);
            batch.apply(&log.tree)?;
            log.flush()?;
            written
        };
        // alice and bob, on m/a, m/b and g/one.
        assert_eq!(written.len(), 3, "{written:?}");
        let log = SledLog::open(dir.path())?;
        assert_eq!(index(&log)?, written);
        Ok(())
    }

    #[test]
    fn a_store_without_summaries_gets_them_when_opened() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let log = SledLog::open(dir.path())?;
            fill_for_counts(&log);
            // As a store written before summaries were kept.
            let mut batch = Writes::default();
            for entry in log.tree.scan_prefix([SUMMARY]) {
                batch.remove(entry?.0);
            }
            batch.remove(SUMMARIES_KEY);
            batch.apply(&log.tree)?;
            log.flush()?;
        }
        let log = SledLog::open(dir.path())?;
        assert!(log.tree.scan_prefix([SUMMARY]).next().is_some());
        assert_counts_match_a_scan(&log)
    }

    /// Scans of a name that runs alone for several chunks and commits (its
    /// next chunk is found by key), then mixes with another (found by
    /// walking the keys), from every start to several ends.
    #[test]
    fn scans_cross_chunks_found_by_key_and_by_walking() -> Result<()> {
        LISTINGS
            .into_iter()
            .try_for_each(scans_cross_chunks_listing)
    }

    fn scans_cross_chunks_listing(listed: u64) -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = open_listing(dir.path(), listed)?;
        let mut names = Vec::new();
        let mut commit = |ops: Vec<WriteOp>, names_of: Vec<&'static str>| {
            log.apply(&ops, 1_000).expect("apply");
            names.extend(names_of);
        };
        // 40 alone in one commit (3 chunks), 40 alone over 4 commits, then
        // 60 mixed, then 20 alone again.
        commit(
            (0..40).map(|i| event("solo", i)).collect(),
            vec!["solo"; 40],
        );
        for c in 0..4 {
            commit(
                (0..10).map(|i| event("solo", 40 + c * 10 + i)).collect(),
                vec!["solo"; 10],
            );
        }
        let mixed: Vec<&'static str> = (0..60)
            .map(|i| if i % 4 == 0 { "other" } else { "solo" })
            .collect();
        commit(
            mixed
                .iter()
                .enumerate()
                .map(|(i, n)| event(n, 80 + i))
                .collect(),
            mixed.clone(),
        );
        commit(
            (0..20).map(|i| event("solo", 140 + i)).collect(),
            vec!["solo"; 20],
        );
        log.flush()?;
        assert_eq!(log.last_seq(), 160);
        assert_scans(&log, &names, &["solo", "other", "*"]);
        Ok(())
    }

    /// Scans of `patterns` (a name of `names`, or `*`) from every start to
    /// several ends visit the events they should, whether they expect few
    /// (and stop, or read on) or all; `names[i]` is event i + 1's name.
    fn assert_scans(log: &SledLog, names: &[&str], patterns: &[&str]) {
        let last = log.last_seq();
        for &name in patterns {
            for start in 1..=last {
                for end in [start, start + 7, start + 33, last] {
                    let end = end.min(last);
                    let expected: Vec<u64> = (start..=end)
                        .filter(|seq| {
                            name == "*" || names[usize::try_from(*seq).expect("small") - 1] == name
                        })
                        .collect();
                    assert_eq!(
                        seqs(log, name, start..=end),
                        expected,
                        "{name} {start}..={end}"
                    );
                    // A scan told to expect few reads part of a chunk; it
                    // stops where asked, or reads on.
                    for want in [1, 5, 9, 50] {
                        let taken = expected.len().min(want);
                        let scan = |stop| seqs_expecting(log, name, start..=end, want, stop);
                        assert_eq!(
                            scan(true),
                            expected[..taken],
                            "{name} {start}..={end} {want}"
                        );
                        assert_eq!(scan(false), expected, "{name} {start}..={end} {want} on");
                    }
                }
            }
        }
    }

    /// Events published one or a few at a time make a small chunk per
    /// commit; a scan reads them many chunks at a time, and still visits
    /// exactly its events.
    #[test]
    fn scans_read_small_chunks_many_at_a_time() -> Result<()> {
        LISTINGS
            .into_iter()
            .try_for_each(scans_read_small_chunks_listing)
    }

    fn scans_read_small_chunks_listing(listed: u64) -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = open_listing(dir.path(), listed)?;
        let small = |name: &str, n: usize| {
            let WriteOp::Publish(mut event) = event(name, n) else {
                unreachable!("event() publishes")
            };
            event.payload = format!("{{\"n\":{n},\"pad\":\"{}\"}}", "y".repeat(n % 300))
                .parse()
                .expect("json");
            WriteOp::Publish(event)
        };
        let mut names = Vec::new();
        // One event a commit, the names taking turns unevenly; then a
        // commit of large events, t/a alone, and commits of three.
        for i in 0..150 {
            let name = ["t/a", "t/a", "t/b", "t/a", "t/c"][i % 5];
            log.apply(&[small(name, i)], 1_000)?;
            names.push(name);
        }
        let large: Vec<WriteOp> = (0..40).map(|i| event("t/a", 150 + i)).collect();
        log.apply(&large, 1_000)?;
        names.extend(["t/a"; 40]);
        // t/a alone, one event a commit: looked up by key, then walked.
        for i in 0..40 {
            log.apply(&[small("t/a", 280 + i)], 1_000)?;
            names.push("t/a");
        }
        for i in 0..30 {
            let batch = ["t/b", "t/a", "t/a"];
            let ops: Vec<WriteOp> = batch
                .iter()
                .enumerate()
                .map(|(k, name)| small(name, 190 + 3 * i + k))
                .collect();
            log.apply(&ops, 1_000)?;
            names.extend(batch);
        }
        log.flush()?;
        assert_eq!(log.last_seq(), 320);
        assert_scans(&log, &names, &["t/a", "t/b", "*"]);

        // The 90 single-event chunks of t/a: one read each without reading
        // ahead, a handful with it.
        let before = log.segments.reads();
        assert_eq!(seqs(&log, "t/a", 1..=150).len(), 90);
        let reads = log.segments.reads() - before;
        assert!(reads <= 5, "{reads} reads for 90 small chunks");
        // The names a merge reads share what one of them read ahead: the
        // 150 single-event chunks of the three lie side by side. (Each
        // name reading ahead for itself alone takes 9 reads.)
        let before = log.segments.reads();
        assert_eq!(seqs(&log, "*", 1..=150).len(), 150);
        let reads = log.segments.reads() - before;
        assert!(reads <= 6, "{reads} reads for 150 small chunks merged");
        Ok(())
    }

    /// What a log answers: the start and end every millisecond resolves
    /// to, and the seqs of scans of each name from every start, expecting
    /// few events and all.
    fn answers(log: &SledLog, names: &[&str]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let last = log.last_seq();
        for ms in 990..1_400 {
            for side in [Side::Start, Side::End] {
                let resolved = log.resolve(&Position::Timestamp(ms), side)?;
                out.push(format!("{ms} {side:?}: {resolved:?}"));
            }
        }
        for &name in names {
            let pattern: Pattern = name.parse().expect("pattern");
            for start in 1..=last {
                out.push(format!(
                    "{name} from {start}: {:?}",
                    seqs(log, name, start..=last)
                ));
                let mut few = Vec::new();
                log.scan_expecting(&pattern, start..=last, 3, Reads::Waiting, &mut |e| {
                    few.push(e.seq);
                    ControlFlow::Continue(())
                })?;
                out.push(format!("{name} from {start}, expecting 3: {few:?}"));
            }
        }
        Ok(out)
    }

    /// A log whose directory lists all, some or none of its chunks and
    /// milliseconds answers every seek and scan alike: as commits list
    /// them and drop the oldest past the budget, after retention trims,
    /// once reopened (while the lists are filled with what was logged
    /// before, and after) and committed to again.
    #[test]
    fn the_directory_answers_as_sled_does() -> Result<()> {
        let dirs: Vec<_> = LISTINGS
            .iter()
            .map(|_| tempfile::tempdir().expect("temp dir"))
            .collect();
        let logs = LISTINGS
            .iter()
            .zip(&dirs)
            .map(|(listed, dir)| open_listing(dir.path(), *listed))
            .collect::<Result<Vec<_>>>()?;
        // `d/z` is never published: a scan of it is answered from the
        // lists where they know it has nothing.
        let names = ["d/a", "d/b", "d/c", "d/z"];
        // Commits of one to four events, names taking turns unevenly, the
        // clock moving by 0, 1 or 7 ms between them; then a bulk commit.
        let mut ms = 1_000;
        for i in 0..120 {
            let ops: Vec<WriteOp> = (0..1 + i % 4)
                .map(|k| event(names[(i * 7 + k) % 5 % 3], i))
                .collect();
            ms += [0, 1, 7][i % 3];
            for log in &logs {
                log.apply(&ops, ms)?;
            }
        }
        let bulk: Vec<WriteOp> = (0..60).map(|i| event(names[i % 2], i)).collect();
        for log in &logs {
            log.apply(&bulk, ms + 3)?;
        }
        let every = |logs: &[SledLog]| -> Result<()> {
            let unlisted = answers(&logs[0], &names)?;
            for log in &logs[1..] {
                assert_eq!(answers(log, &names)?, unlisted, "{:?}", log.directory);
            }
            Ok(())
        };
        assert_eq!(logs[0].directory.bytes(), 0);
        assert!(
            logs[1].directory.bytes() < logs[2].directory.bytes() / 4,
            "some are listed: {:?}",
            logs[1].directory
        );
        every(&logs)?;

        let trim = Trim {
            before_ms: Some(1_150),
            max_bytes: None,
            keep_from: u64::MAX,
            max_commits: usize::MAX,
        };
        for log in &logs {
            log.apply(&[WriteOp::Trim(trim)], ms + 3)?;
            log.flush()?;
        }
        assert!(logs[0].oldest()? > Some(50), "retention removed events");
        every(&logs)?;

        drop(logs);
        let mut logs = LISTINGS
            .iter()
            .zip(&dirs)
            .map(|(listed, dir)| open_listing(dir.path(), *listed))
            .collect::<Result<Vec<_>>>()?;
        // Read as the directories are filled, and once they are.
        every(&logs)?;
        for log in &mut logs {
            log.filling.join();
        }
        let whole = &logs[2];
        let (key, index) = whole.tree.scan_prefix([COMMIT]).next().expect("a commit")?;
        let (first, _) = decode_commit(&index)?[0];
        assert!(
            whole.directory.chunk_lasts(&[first])[0].is_some(),
            "the fill lists the oldest commit left ({}): {:?}",
            be_u64(&key[1..])?,
            whole.directory
        );
        let (key, seq) = whole.tree.scan_prefix([TIME]).next().expect("a time")?;
        assert_eq!(
            whole.directory.first_seq_from(be_u64(&key[1..])?),
            Some(be_u64(&seq)?),
            "and the oldest millisecond left"
        );
        assert!(logs[1].directory.bytes() <= 2 * 1024);
        every(&logs)?;
        for i in 0..40 {
            let ops: Vec<WriteOp> = (0..1 + i % 3)
                .map(|k| event(names[(i + k) % 3], i))
                .collect();
            for log in &logs {
                log.apply(&ops, ms + 10 + i as u64)?;
            }
        }
        every(&logs)?;
        Ok(())
    }

    #[test]
    fn what_was_read_ahead_serves_only_locations_inside_it() {
        let ahead = Ahead {
            at: Some((2, 1_000)),
            bytes: ReadBuf::from((0..100).collect::<Vec<u8>>()),
        };
        let loc = |segment, offset, len| Loc {
            segment,
            offset,
            len,
        };
        assert_eq!(ahead.get(loc(2, 1_010, 3)), Some(&[10, 11, 12][..]));
        assert_eq!(ahead.get(loc(2, 1_000, 100)).map(<[u8]>::len), Some(100));
        assert_eq!(ahead.get(loc(2, 1_050, 51)), None, "runs past the end");
        assert_eq!(ahead.get(loc(2, 999, 5)), None, "starts before");
        assert_eq!(ahead.get(loc(3, 1_010, 3)), None, "another segment");
        assert_eq!(Ahead::default().get(loc(2, 1_010, 3)), None);
    }

    /// The seqs a scan expecting `want` events visits: only those, with
    /// `stop`, else all in `range`.
    fn seqs_expecting(
        log: &SledLog,
        pattern: &str,
        range: RangeInclusive<u64>,
        want: usize,
        stop: bool,
    ) -> Vec<u64> {
        let mut out = Vec::new();
        let pattern = pattern.parse().expect("pattern");
        log.scan_expecting(&pattern, range, want as u64, Reads::Waiting, &mut |e| {
            out.push(e.seq);
            if stop && out.len() == want {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })
        .expect("scan");
        out
    }

    /// A merge over hundreds of names reads a few entries of each at a
    /// time, and still visits every event once, in seq order.
    #[test]
    fn a_merge_over_many_names_reads_each_a_little_at_a_time() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SledLog::open(dir.path())?;
        let names: Vec<String> = (0..600).map(|k| format!("many/n{k:03}")).collect();
        // The names take turns: 30 events of each in every chunk.
        let ops: Vec<WriteOp> = (0..30 * names.len())
            .map(|i| {
                let WriteOp::Publish(mut event) = event("x", i) else {
                    unreachable!("event() publishes")
                };
                event.name = names[i % names.len()].parse().expect("name");
                event.payload = format!("{{\"n\":{i}}}").parse().expect("json");
                WriteOp::Publish(event)
            })
            .collect();
        log.apply(&ops, 1_000)?;
        log.flush()?;
        let last = log.last_seq();
        assert_eq!(last, 18_000);
        for (start, end) in [(1, last), (777, 9_000), (17_999, last)] {
            let expected: Vec<u64> = (start..=end).collect();
            assert_eq!(seqs(&log, "many/*", start..=end), expected);
            for want in [1, 50] {
                let stopped = seqs_expecting(&log, "many/*", start..=end, want, true);
                assert_eq!(stopped, expected[..want.min(expected.len())]);
                let went_on = seqs_expecting(&log, "many/*", start..=end, want, false);
                assert_eq!(went_on, expected);
            }
        }
        Ok(())
    }

    /// An event of a few bytes.
    fn small_event(name: &str, n: usize) -> WriteOp {
        let WriteOp::Publish(mut event) = event("x", n) else {
            unreachable!("event() publishes")
        };
        event.name = name.parse().expect("name");
        event.payload = format!("{{\"n\":{n}}}").parse().expect("json");
        WriteOp::Publish(event)
    }

    /// What scanning each of `names` on its own visits in `start..=end`,
    /// in seq order: seq and name.
    fn expected_visits(
        log: &SledLog,
        names: &[String],
        start: u64,
        end: u64,
    ) -> Vec<(u64, String)> {
        let mut expected: Vec<(u64, String)> = names
            .iter()
            .flat_map(|name| {
                seqs(log, name, start..=end)
                    .into_iter()
                    .map(move |seq| (seq, name.clone()))
            })
            .collect();
        expected.sort_unstable();
        expected
    }

    /// Asserts that scans of `pattern` over each of `ranges` visit what
    /// scanning each of `names` on its own visits, in seq order, whether
    /// they stop early or go on.
    fn assert_scans_visit_each_name(
        log: &SledLog,
        pattern: &str,
        names: &[String],
        ranges: &[(u64, u64)],
        what: &str,
    ) {
        for &(start, end) in ranges {
            let expected = expected_visits(log, names, start, end);
            let what = format!("{pattern} {start}..={end}, {what}");
            assert_eq!(visits(log, pattern, start..=end), expected, "{what}");
            let expected: Vec<u64> = expected.into_iter().map(|(seq, _)| seq).collect();
            for want in [1, 7, 50] {
                let stopped = seqs_expecting(log, pattern, start..=end, want, true);
                assert_eq!(stopped, expected[..want.min(expected.len())], "{what}");
                let went_on = seqs_expecting(log, pattern, start..=end, want, false);
                assert_eq!(went_on, expected, "{what} want {want}");
            }
        }
    }

    /// Each event of `pattern` in `range` a scan visits: seq and name.
    fn visits(log: &SledLog, pattern: &str, range: RangeInclusive<u64>) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        log.scan(&pattern.parse().expect("pattern"), range, &mut |e| {
            out.push((e.seq, e.name.to_owned()));
            ControlFlow::Continue(())
        })
        .expect("scan");
        out
    }

    /// Events of the 100 `names` (`w/n00` to `w/n99`), with `x/out` among
    /// them, in 23 commits: seqs 1 to 300 are every name three times in
    /// turn; 301 to 420 `w/n05`, `x/out` and `w/n50` in turn, in large
    /// events (three chunks of each); 421 to 440 commits of one event,
    /// every fourth to `x/out`; 441 to 540 every name again, last first.
    fn fill_names(log: &SledLog, names: &[String]) -> Result<()> {
        assert_eq!(names.len(), 100);
        let ops: Vec<WriteOp> = (0..300).map(|i| small_event(&names[i % 100], i)).collect();
        log.apply(&ops, 1_000)?;
        let ops: Vec<WriteOp> = (0..120)
            .map(|i| event(["w/n05", "x/out", "w/n50"][i % 3], i))
            .collect();
        log.apply(&ops, 1_000)?;
        for k in 0..20 {
            let name = if k % 4 == 0 {
                "x/out"
            } else {
                &names[k * 7 % 100]
            };
            log.apply(&[small_event(name, k)], 2_000 + k as u64)?;
        }
        let ops: Vec<WriteOp> = (0..100).map(|i| small_event(&names[99 - i], i)).collect();
        log.apply(&ops, 3_000)?;
        log.flush()?;
        assert_eq!(log.last_seq(), 540);
        Ok(())
    }

    /// A scan of a pattern that matches more names than a merge takes
    /// walks the commits instead, and so does one over fewer seqs than
    /// names. Either way it visits what scanning each name on its own
    /// visits, in seq order: from any start to any end, with names split
    /// over several chunks of a commit, names outside the pattern between,
    /// whether it stops early or goes on, and whatever the directory lists.
    #[test]
    fn scans_walking_the_commits_visit_what_each_name_holds() -> Result<()> {
        let names: Vec<String> = (0..100).map(|k| format!("w/n{k:02}")).collect();
        assert!(names.len() > MERGE_NAMES);
        for listed in LISTINGS {
            let dir = tempfile::tempdir().expect("temp dir");
            let log = open_listing(dir.path(), listed)?;
            fill_names(&log, &names)?;
            let last = log.last_seq();
            let mut ranges = vec![
                (1, last),
                (1, 1),
                (2, 3),
                (150, 150),
                (299, 302),
                (301, 420),
                (250, 330),
                (415, 445),
                (last - 5, last),
            ];
            ranges.extend(
                (1..=last)
                    .step_by(37)
                    .map(|start| (start, (start + 60).min(last))),
            );
            let what = format!("listing {listed}");
            assert_scans_visit_each_name(&log, "w/*", &names, &ranges, &what);
            let out = ["x/out".to_owned()];
            assert_scans_visit_each_name(&log, "x/*", &out, &ranges, &what);
        }
        Ok(())
    }

    /// A walk through a long stretch of commits without its pattern's
    /// events merges the pattern's names for the rest of its range, and
    /// visits what each name holds all the same.
    #[test]
    fn a_long_walk_merges_the_names_for_the_rest_of_its_range() -> Result<()> {
        let names: Vec<String> = (0..70).map(|k| format!("w/n{k:02}")).collect();
        assert!(names.len() > MERGE_NAMES && names.len() <= MERGE_NAMES_AFTER_WALK);
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SledLog::open(dir.path())?;
        let ops: Vec<WriteOp> = names.iter().map(|name| small_event(name, 0)).collect();
        log.apply(&ops, 1_000)?;
        // Commits of one event, one in 50 of them to the pattern: seq
        // 71 + k is the `k`th.
        for k in 0..2_400 {
            let name = if k % 50 == 0 { &names[k / 50] } else { "x/out" };
            log.apply(&[small_event(name, k)], 2_000 + k as u64)?;
        }
        let ops: Vec<WriteOp> = names.iter().map(|name| small_event(name, 1)).collect();
        log.apply(&ops, 9_000)?;
        log.flush()?;
        let last = log.last_seq();
        assert_eq!(last, 2_540);
        // Past 32 steps a name (2,240 commits), the walks from before
        // 300 merge for the rest, the one from 81 at an event of the
        // pattern (k = 2,250); the one to 2,300 ends before.
        let ranges = [
            (1, last),
            (2, last),
            (71, last),
            (81, last),
            (300, last),
            (2_000, last),
            (1, 2_300),
        ];
        assert_scans_visit_each_name(&log, "w/*", &names, &ranges, "one event a commit");
        Ok(())
    }

    /// Walks from seq 0, to `u64::MAX`, past the last event, and after
    /// retention removed the commits a walk would start in, visit what
    /// each name holds; counts over more names than a merge takes count
    /// what each name's count adds up to, up to their limit.
    #[test]
    fn walks_at_the_log_s_edges_and_after_retention_match_each_name() -> Result<()> {
        let names: Vec<String> = (0..100).map(|k| format!("w/n{k:02}")).collect();
        let w: Pattern = "w/*".parse().expect("pattern");
        let check = |log: &SledLog, what: &str| -> Result<()> {
            let last = log.last_seq();
            let ranges = [
                (0, u64::MAX),
                (0, 0),
                (0, 5),
                (1, last),
                (50, 150),
                (100, 101),
                (215, 235),
                (last, u64::MAX),
                (last + 1, u64::MAX),
            ];
            assert_scans_visit_each_name(log, "w/*", &names, &ranges, what);
            for (start, end) in ranges {
                let expected = expected_visits(log, &names, start, end);
                let (mut sum, mut last_counted) = (0, 0);
                for name in &names {
                    let name: Pattern = name.parse().expect("pattern");
                    let counted = log.count(&name, start..=end, &["someone"], u64::MAX)?;
                    sum += counted.count;
                    if counted.count > 0 {
                        last_counted = last_counted.max(counted.last);
                    }
                }
                assert_eq!(sum as usize, expected.len(), "{what} {start}..={end}");
                let all = log.count(&w, start..=end, &["someone"], u64::MAX)?;
                let all = (all.count, (all.count > 0).then_some(all.last));
                let by_name = (sum, (sum > 0).then_some(last_counted));
                assert_eq!(all, by_name, "{what} count {start}..={end}");
                let three = log.count(&w, start..=end, &["someone"], 3)?;
                assert_eq!(
                    three.count,
                    sum.min(3),
                    "{what} count to 3, {start}..={end}"
                );
                if sum >= 3 {
                    assert_eq!(three.last, expected[2].0, "{what} {start}..={end}");
                }
            }
            Ok(())
        };
        for listed in LISTINGS {
            let dir = tempfile::tempdir().expect("temp dir");
            let log = open_listing(dir.path(), listed)?;
            fill_names(&log, &names)?;
            check(&log, &format!("listing {listed}"))?;
            for (commits, oldest) in [(1, 301), (3, 423)] {
                let trim = Trim {
                    before_ms: None,
                    max_bytes: Some(0),
                    keep_from: u64::MAX,
                    max_commits: commits,
                };
                log.apply(&[WriteOp::Trim(trim)], 4_000)?;
                assert_eq!(log.oldest()?, Some(oldest), "listing {listed}");
                check(
                    &log,
                    &format!("after retention to {oldest}, listing {listed}"),
                )?;
            }
        }
        Ok(())
    }

    /// Every range of 1 to 11 seqs over a pattern of 10 names (so many of
    /// them walk, though a merge would take the names) visits what each
    /// name holds, whether it stops early or goes on.
    #[test]
    fn short_ranges_of_a_few_names_visit_what_each_name_holds() -> Result<()> {
        let names: Vec<String> = (0..10).map(|k| format!("s/n{k}")).collect();
        assert!(names.len() <= MERGE_NAMES);
        for listed in LISTINGS {
            let dir = tempfile::tempdir().expect("temp dir");
            let log = open_listing(dir.path(), listed)?;
            let ops: Vec<WriteOp> = (0..60)
                .map(|i| event(if i % 4 == 3 { "x/out" } else { &names[i % 3] }, i))
                .collect();
            log.apply(&ops, 1_000)?;
            for k in 0..30 {
                let name = if k % 3 == 0 { "x/out" } else { &names[k % 10] };
                log.apply(&[small_event(name, k)], 2_000 + k as u64)?;
            }
            let ops: Vec<WriteOp> = (0..20)
                .map(|i| small_event(&names[9 - i % 10], i))
                .collect();
            log.apply(&ops, 3_000)?;
            let last = log.last_seq();
            let ranges: Vec<(u64, u64)> = (0..=last + 1)
                .flat_map(|start| (1..12).map(move |len| (start, start + len - 1)))
                .collect();
            assert_scans_visit_each_name(
                &log,
                "s/*",
                &names,
                &ranges,
                &format!("listing {listed}"),
            );
        }
        Ok(())
    }

    #[test]
    fn every_event_is_found_by_id_and_scans_start_mid_chunk() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SledLog::open(dir.path())?;
        fill(&log);
        assert_eq!(log.last_seq(), 303);
        for seq in [1, 0xab, u64::from(u32::MAX) + 7, u64::MAX] {
            let id = log.idem(seq);
            assert_eq!(id, format!("evt_{:08x}{seq:016x}", log.epoch));
            assert_eq!(log.seq_of(&id.parse().expect("id")), Some(seq));
        }
        for seq in 1..=303 {
            let id: EventId = log.idem(seq).parse().expect("id");
            let owned = log.event(&id)?.expect("stored");
            let expected = if seq <= 300 {
                if (seq - 1) % 3 == 0 {
                    "a/x"
                } else {
                    "b/y"
                }
            } else if seq == 302 {
                "b/y"
            } else {
                "a/x"
            };
            assert_eq!((owned.seq, owned.name.as_str()), (seq, expected));
            assert_eq!(
                log.resolve(&Position::Event(id), Side::Start)?,
                Ok(Resolved::Seq(seq))
            );
        }
        let a: Vec<u64> = (1..=303)
            .filter(|s| (s - 1) % 3 == 0 && *s <= 300 || *s == 301 || *s == 303)
            .collect();
        assert_eq!(seqs(&log, "a/x", 1..=303), a);
        for start in [1, 2, 100, 151, 299, 301, 303] {
            let expected: Vec<u64> = a
                .iter()
                .copied()
                .filter(|s| *s >= start && *s <= 302)
                .collect();
            assert_eq!(seqs(&log, "a/x", start..=302), expected, "from {start}");
        }
        assert_eq!(seqs(&log, "*", 1..=303), (1..=303).collect::<Vec<_>>());
        assert_eq!(seqs(&log, "*", 150..=160), (150..=160).collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn reopened_log_keeps_seq_time_and_ids() -> Result<()> {
        let dir = tempfile::tempdir().expect("temp dir");
        let epoch = {
            let log = SledLog::open(dir.path())?;
            fill(&log);
            log.epoch
        };
        let log = SledLog::open(dir.path())?;
        assert_eq!((log.epoch, log.last_seq()), (epoch, 303));
        assert_eq!(
            log.resolve(&Position::Timestamp(1_500), Side::Start)?,
            Ok(Resolved::Seq(302))
        );
        assert_eq!(
            log.resolve(&Position::Timestamp(1_500), Side::End)?,
            Ok(Resolved::Seq(301))
        );
        assert_eq!(
            log.resolve(&Position::Earliest, Side::Start)?,
            Ok(Resolved::Seq(1))
        );
        log.apply(&[event("a/x", 304)], 500)?;
        // A clock behind the log keeps loggedAt from going back.
        assert_eq!(
            log.resolve(&Position::Timestamp(2_000), Side::End)?,
            Ok(Resolved::Seq(304))
        );
        let unknown: EventId = format!("evt_{:08x}{:016x}", epoch, 999)
            .parse()
            .expect("id");
        assert_eq!(
            log.resolve(&Position::Event(unknown), Side::Start)?,
            Err(UnknownPosition)
        );
        Ok(())
    }

    /// What [`a_crash_loses_no_commit_that_returned`] runs in a child
    /// process: commits, then exits with sled's tree never written.
    fn commit_and_crash(dir: &Path, phase: &str) -> Result<()> {
        let log = SledLog::open_syncing(dir, crate::config::DEFAULT_INDEX_CACHE, 32 << 20, None)?;
        match phase {
            "first" => {
                let ops: Vec<WriteOp> = (0..300)
                    .map(|i| event(if i % 3 == 0 { "a/x" } else { "b/y" }, i))
                    .collect();
                log.apply(&ops, 1_000)?;
                log.apply(&[event("a/x", 300)], 1_000)?;
                log.apply(
                    &[WriteOp::Subscribe {
                        client: "alice".parse().expect("id"),
                        pattern: "a/*".parse().expect("pattern"),
                    }],
                    1_500,
                )?;
                log.apply(&[event("b/y", 301), event("a/x", 302)], 2_000)?;
            }
            _ => {
                log.apply(&[small_event("a/x", 303)], 3_000)?;
                log.apply(&[small_event("c/z", 304)], 3_001)?;
            }
        }
        // No flush, no drop: what sled kept in memory is gone, as in a
        // crash. The segments were synced by each commit.
        std::process::exit(0)
    }

    /// Runs [`commit_and_crash`] in a child process.
    fn crash_child(dir: &Path, phase: &str) {
        let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "store::sled::chunked_log::a_crash_loses_no_commit_that_returned",
            ])
            .env("ENSYNC_CRASH_CHILD_DIR", dir)
            .env("ENSYNC_CRASH_CHILD_PHASE", phase)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run the child");
        assert!(status.success(), "child {phase}: {status}");
    }

    #[test]
    fn a_crash_loses_no_commit_that_returned() -> Result<()> {
        if let Some(dir) = std::env::var_os("ENSYNC_CRASH_CHILD_DIR") {
            let phase = std::env::var("ENSYNC_CRASH_CHILD_PHASE").unwrap_or_default();
            return commit_and_crash(Path::new(&dir), &phase);
        }
        let dir = tempfile::tempdir().expect("temp dir");
        crash_child(dir.path(), "first");
        {
            // sled's own tree lost the last commits (it writes what it
            // buffered on its own time: here, as far as the second).
            let db = sled::open(dir.path())?;
            let last = db.open_tree("log")?.get(LAST_KEY)?;
            let last = last.as_deref().map(be_u64).transpose()?.unwrap_or(0);
            assert!(last < 303, "sled kept up to {last}");
        }
        // A commit the crash cut short, after the last whole frame.
        let segment = dir.path().join("segments").join("0000000001.seg");
        let mut torn = b"EnCf".to_vec();
        torn.extend_from_slice(&4096u32.to_le_bytes());
        torn.extend_from_slice(&[7; 40]);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&segment)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &torn))
            .expect("append a torn frame");

        let log = SledLog::open(dir.path())?;
        assert_eq!(log.last_seq(), 303);
        let a: Vec<u64> = (0..300)
            .step_by(3)
            .chain([300, 302])
            .map(|n| n as u64)
            .collect();
        assert_eq!(counters(&log, "a/x", 1..=303, a.len() as u64), a);
        assert_eq!(seqs(&log, "b/y", 1..=303).len(), 201);
        let subs = log.subscriptions()?;
        assert_eq!(subs.len(), 1);
        assert_eq!((subs[0].client.as_str(), subs[0].since), ("alice", 301));
        assert_eq!(
            log.resolve(&Position::Timestamp(2_000), Side::Start)?,
            Ok(Resolved::Seq(302))
        );
        drop(log);

        // Commits after the torn bytes are found by the next redo.
        crash_child(dir.path(), "second");
        let log = SledLog::open(dir.path())?;
        assert_eq!(log.last_seq(), 305);
        assert_eq!(seqs(&log, "a/x", 300..=305), [301, 303, 304]);
        assert_eq!(seqs(&log, "c/z", 1..=305), [305]);
        Ok(())
    }
}

#[cfg(test)]
mod chunk_marks {
    use super::*;

    /// A chunk's value (a zeroed location, then its marks) for a chunk
    /// whose entry `i` has seq `first + seqs[i]`.
    fn chunk(seqs: &[u32]) -> Vec<u8> {
        let mut value = vec![0; 16];
        for (i, seq) in seqs
            .iter()
            .enumerate()
            .skip(OFFSET_EVERY)
            .step_by(OFFSET_EVERY)
        {
            value.extend_from_slice(&seq.to_be_bytes());
            value.extend_from_slice(&(i as u32 * 100).to_be_bytes());
        }
        value
    }

    /// `start_mark` as a walk through every mark in order.
    fn walked_start(value: &[u8], first: u64, from: u64) -> (u64, u64) {
        let mut start = (0, first);
        for k in 1..=mark_count(value) {
            let mark = mark(value, first, k).expect("mark");
            if mark.seq > from {
                let gapless = mark.seq - start.1 == mark.index - start.0;
                let index = if gapless {
                    start.0 + from.saturating_sub(start.1)
                } else {
                    mark.index
                };
                return (start.0, index);
            }
            start = (mark.index, mark.seq);
        }
        (start.0, start.0)
    }

    #[test]
    fn halving_finds_the_mark_a_walk_finds() {
        let gapless: Vec<u32> = (0..100).collect();
        // Gaps where other names' events fell between this one's.
        let gapped: Vec<u32> = (0..100).map(|i| i * 3 + i / 10).collect();
        let short: Vec<u32> = (0..5).collect();
        for seqs in [&gapless, &gapped, &short] {
            let value = chunk(seqs);
            let first = 1_000;
            let last = first + u64::from(*seqs.last().expect("entries"));
            for from in first.saturating_sub(3)..=last + 3 {
                let (start, index) = start_mark(&value, first, from);
                assert_eq!(
                    (start.index, index),
                    walked_start(&value, first, from),
                    "from {from} in {} entries",
                    seqs.len()
                );
                assert_eq!(u64::from(start.offset), start.index * 100);
            }
        }
    }

    #[test]
    fn a_read_stops_at_the_first_mark_at_or_past_its_last_entry() {
        let value = chunk(&(0..40).collect::<Vec<u32>>());
        let first = 7;
        for index in 0..45 {
            let walked = (1..=mark_count(&value))
                .filter_map(|k| mark(&value, first, k))
                .find(|mark| mark.index >= index)
                .map(|mark| mark.index);
            assert_eq!(
                mark_at_or_past(&value, first, index).map(|mark| mark.index),
                walked,
                "index {index}"
            );
        }
        assert_eq!(mark_count(&value), 4);
        // A read that wants every entry left reads to the chunk's end.
        assert!(mark_at_or_past(&value, first, u64::MAX).is_none());
    }
}
