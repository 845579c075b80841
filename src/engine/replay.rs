//! REPLAY: range replays and single-event replays.
//!
//! A range replay makes two passes over the same snapshot: the count pass
//! counts matching events up to LIMIT (so the header's COUNT is exact),
//! the stream pass encodes them into chunks that grow from
//! `REPLAY_FIRST_CHUNK_BYTES` to `REPLAY_CHUNK_BYTES`. The stream pass
//! runs in slices that each end after one chunk and resume after the last
//! event they encoded.
//!
//! A small replay (LIMIT at most `INLINE_REPLAY_LIMIT`) first tries one
//! pass on the connection's own task that counts as it encodes: no thread
//! hand-offs, so a seek costs one store lookup and one write. It gives up
//! when the records outgrow `INLINE_REPLAY_BYTES`, the search grows long,
//! or a read would wait for the disk; then, as for a larger replay, a
//! blocking thread makes the two passes and hands its chunks to the
//! connection through a channel of `REPLAY_CHUNKS_AHEAD`. Either way a
//! replay holds a bounded number of chunks in memory, whatever its size
//! and however slowly the client reads. A pin keeps retention from removing what the replay has
//! counted and not yet sent.

use std::ops::{ControlFlow, RangeInclusive};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ensync_protocol::command::{Replay, ReplayEvent};
use ensync_protocol::field::{ClientId, Limit, Pattern, Position};
use ensync_protocol::{ErrorCode, Marks, Pass, RenderedMarks, ReplayInfo, Reply};
use tokio::sync::{mpsc, oneshot};

use super::retention::Pin;
use super::{internal, now_ms, Engine};
use crate::access::{Grants, NOT_AUTHORIZED_TO_REPLAY};
use crate::config::{
    INLINE_REPLAY_BYTES, INLINE_REPLAY_LIMIT, REPLAY_CHUNKS_AHEAD, REPLAY_CHUNK_BYTES,
    REPLAY_FIRST_CHUNK_BYTES,
};
use crate::store::{Counted, EventLog, Reads, Resolved, Settlement, Side, StoreError};

/// Encoded record lines, or why the stream broke off.
pub type Chunk = Result<Records, String>;

/// Record lines, each ending in LF, and how many there are.
#[derive(Debug)]
pub struct Records {
    /// The lines.
    pub lines: Bytes,
    /// How many lines.
    pub count: u64,
}

/// A replay's header and the records that follow it.
#[derive(Debug)]
pub struct ReplayStream {
    /// `+PASS:REPLAY_STARTED...` or the `-FAIL` that ends the replay.
    pub header: Reply,
    /// Exactly COUNT records, in chunks, after a successful header.
    pub records: Option<RecordSource>,
}

impl ReplayStream {
    fn refused(header: Reply) -> Self {
        Self {
            header,
            records: None,
        }
    }
}

/// Where a replay's records come from.
#[derive(Debug)]
pub enum RecordSource {
    /// Encoded by a blocking thread, a chunk at a time.
    Channel(mpsc::Receiver<Chunk>),
    /// Encoded already: the whole replay in one chunk.
    Ready(Option<Records>),
}

impl RecordSource {
    /// The next chunk, or `None` once every record was handed out.
    pub async fn next(&mut self) -> Option<Chunk> {
        match self {
            RecordSource::Channel(rx) => rx.recv().await,
            RecordSource::Ready(records) => records.take().map(Ok),
        }
    }
}

fn invalid_position() -> Reply {
    Reply::fail(
        ErrorCode::InvalidPosition,
        "Invalid or expired position marker",
    )
}

/// The request as the replay's passes need it.
struct RangeJob {
    client: ClientId,
    pattern: Pattern,
    from: Position,
    to: Option<Position>,
    snapshot: u64,
    limit: u64,
    identities: Vec<String>,
    /// Skip what the client acknowledged.
    only_unacked: bool,
    /// Whether the client ever settled anything (else no lookups).
    check_acks: bool,
    include_payload: bool,
    replay_timestamp: u64,
}

impl RangeJob {
    /// The marks of a record the client did or did not acknowledge.
    fn marks(&self, was_acknowledged: bool) -> RenderedMarks {
        Marks {
            include_payload: self.include_payload,
            replay: Some(ReplayInfo {
                replay_timestamp: self.replay_timestamp,
                was_acknowledged,
            }),
        }
        .render()
    }

    /// The marks of an acknowledged record, if the client ever settled
    /// anything (else none is acknowledged, and they are not rendered).
    fn acked_marks(&self) -> Option<RenderedMarks> {
        self.check_acks.then(|| self.marks(true))
    }

    /// Whether the client acknowledged event `seq`.
    fn acked(&self, store: &dyn EventLog, seq: u64) -> Result<bool, StoreError> {
        Ok(self.check_acks && store.settlement(&self.client, seq)? == Some(Settlement::Acked))
    }

    /// [`RangeJob::acked`] for a scan's visitor: `None` when the store
    /// cannot tell, with the error kept in `failed` (the scan then stops).
    fn acked_or_keep(
        &self,
        store: &dyn EventLog,
        seq: u64,
        failed: &mut Option<StoreError>,
    ) -> Option<bool> {
        match self.acked(store, seq) {
            Ok(acked) => Some(acked),
            Err(e) => {
                *failed = Some(e);
                None
            }
        }
    }

    /// Whether only the events the count pass took are sent.
    fn filtering(&self) -> bool {
        self.only_unacked && self.check_acks
    }

    fn ids(&self) -> Vec<&str> {
        self.identities.iter().map(String::as_str).collect()
    }
}

/// What the count pass announced, and how far the stream pass has come.
struct Stream {
    job: RangeJob,
    /// The next seq to look at.
    from: u64,
    /// The last seq to send.
    last: u64,
    /// Records announced.
    count: u64,
    /// Records encoded so far.
    sent: u64,
    /// Bytes the next chunk holds, about: it doubles up to
    /// `REPLAY_CHUNK_BYTES`.
    chunk_bytes: usize,
    /// With ONLY_UNACKED, the events the count pass took (sorted).
    taken: Vec<u64>,
    /// Rendered only for a client that settled something.
    acked_marks: Option<RenderedMarks>,
    unacked_marks: RenderedMarks,
    /// Keeps retention off what is left to send.
    pin: Pin,
}

impl Stream {
    /// Encodes the next chunk of records (about `chunk_bytes`), or says
    /// why the stream broke off; `None` once all are sent.
    fn next_chunk(&mut self, store: &dyn EventLog) -> Option<Chunk> {
        if self.sent == self.count {
            return None;
        }
        let left = self.count - self.sent;
        let chunk_bytes = self.chunk_bytes;
        self.chunk_bytes = (chunk_bytes * 2).min(REPLAY_CHUNK_BYTES);
        let mut buf = BytesMut::with_capacity(small_buffer(left, chunk_bytes));
        let (mut in_chunk, mut resume) = (0u64, None);
        let mut failed = None;
        let ids = self.job.ids();
        let (job, taken) = (&self.job, &self.taken);
        let (acked_marks, unacked_marks) = (&self.acked_marks, &self.unacked_marks);
        let seqs = self.from..=self.last;
        let scanned =
            store.scan_expecting(&job.pattern, seqs, left, Reads::Waiting, &mut |event| {
                if !event.is_addressed_to(&ids) {
                    return ControlFlow::Continue(());
                }
                if job.filtering() && taken.binary_search(&event.seq).is_err() {
                    return ControlFlow::Continue(());
                }
                let Some(acked) = job.acked_or_keep(store, event.seq, &mut failed) else {
                    return ControlFlow::Break(());
                };
                let marks = match acked_marks {
                    Some(marks) if acked => marks,
                    _ => unacked_marks,
                };
                event.record.write_rendered_line(&mut buf, marks);
                in_chunk += 1;
                if in_chunk == left || buf.len() >= chunk_bytes {
                    resume = Some(event.seq + 1);
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            });
        if let Some(e) = scanned.err().or(failed) {
            self.sent = self.count;
            return Some(Err(format!("replay broke off: {e}")));
        }
        self.sent += in_chunk;
        match resume {
            Some(next) if next <= self.last || self.sent == self.count => {
                self.from = next;
                self.pin.move_to(next);
            }
            _ => {
                let (sent, count) = (self.sent, self.count);
                self.sent = self.count;
                return Some(Err(format!(
                    "replay found {sent} of the {count} events it announced"
                )));
            }
        }
        Some(Ok(Records {
            lines: buf.freeze(),
            count: in_chunk,
        }))
    }
}

/// Starts a range replay for `client`.
pub async fn range(engine: &Engine, client: &ClientId, req: Replay) -> ReplayStream {
    let max = engine.config.limits.max_replay_limit;
    let limit = req.limit.unwrap_or(Limit::DEFAULT).get();
    if limit > max {
        return ReplayStream::refused(Reply::fail(
            ErrorCode::InvalidParameters,
            format!("LIMIT must be an integer from 1 to {max}"),
        ));
    }
    if !engine.subs.covers(client, &req.event_name) {
        return ReplayStream::refused(not_subscribed(client, &req.event_name));
    }
    let event_name = req.event_name.to_string();
    let job = RangeJob {
        snapshot: engine.commit.head(),
        limit: u64::from(limit),
        identities: engine.identities(client),
        only_unacked: req.only_unacked == Some(true),
        check_acks: engine.store.has_settlements(client),
        include_payload: req.include_payloads.unwrap_or(true),
        replay_timestamp: now_ms(),
        // The session checked that it is `client`.
        client: req.client_id,
        pattern: req.event_name,
        from: req.from_position,
        to: req.to_position,
    };
    let started = |count| Reply::Pass(Pass::ReplayStarted { event_name, count });
    // Pinned before the start is resolved: a trim either finished before
    // (and the start is resolved in what it left) or waits.
    let pin = engine.pins.pin();
    if limit <= INLINE_REPLAY_LIMIT {
        let store = Arc::clone(&engine.store);
        match one_pass(store.as_ref(), &job) {
            Ok(OnePass::Done(records)) => {
                return ReplayStream {
                    header: started(records.count),
                    records: (records.count > 0).then_some(RecordSource::Ready(Some(records))),
                }
            }
            // A blocking thread takes it.
            Ok(OnePass::TooLarge) => {}
            Ok(OnePass::Uncached) => engine.metrics.replay_read_from_disk(),
            Err(reply) => return ReplayStream::refused(reply),
        }
    }
    let (header_tx, header_rx) = oneshot::channel();
    let (tx, rx) = mpsc::channel(REPLAY_CHUNKS_AHEAD);
    let store = Arc::clone(&engine.store);
    engine.tracker.spawn_blocking(move || {
        let stream = match count_pass(store.as_ref(), job, pin) {
            Ok(Some(stream)) => stream,
            Ok(None) => {
                let _ = header_tx.send(Ok(0));
                return;
            }
            Err(reply) => {
                let _ = header_tx.send(Err(reply));
                return;
            }
        };
        if header_tx.send(Ok(stream.count)).is_ok() {
            stream_to(store.as_ref(), stream, &tx);
        }
    });
    match header_rx.await {
        Ok(Ok(count)) => ReplayStream {
            header: started(count),
            records: (count > 0).then_some(RecordSource::Channel(rx)),
        },
        Ok(Err(reply)) => ReplayStream::refused(reply),
        Err(_) => ReplayStream::refused(Reply::fail(
            ErrorCode::Internal,
            "the replay stopped before it started; see the server log",
        )),
    }
}

/// Hands a stream's chunks to the connection until all are sent or the
/// connection goes away.
fn stream_to(store: &dyn EventLog, mut stream: Stream, tx: &mpsc::Sender<Chunk>) {
    while let Some(chunk) = stream.next_chunk(store) {
        if tx.blocking_send(chunk).is_err() {
            return;
        }
    }
}

fn not_subscribed(client: &ClientId, pattern: &Pattern) -> Reply {
    Reply::fail(
        ErrorCode::NotSubscribed,
        format!("{client} has no subscription covering {pattern} (subscribe with SUB first)"),
    )
}

/// The first and last sequence numbers a replay covers, or the reply that
/// refuses it.
fn bounds(store: &dyn EventLog, job: &RangeJob) -> Result<Option<(u64, u64)>, Reply> {
    let start = match store.resolve(&job.from, Side::Start) {
        Ok(Ok(Resolved::Seq(seq))) => seq,
        Ok(Ok(Resolved::Nothing)) => return Ok(None),
        Ok(Err(_)) => return Err(invalid_position()),
        Err(e) => return Err(internal(&e)),
    };
    let end = match &job.to {
        None => job.snapshot,
        Some(to) => match store.resolve(to, Side::End) {
            Ok(Ok(Resolved::Seq(seq))) => seq.min(job.snapshot),
            Ok(Ok(Resolved::Nothing)) => return Ok(None),
            Ok(Err(_)) => return Err(invalid_position()),
            Err(e) => return Err(internal(&e)),
        },
    };
    Ok((start <= end).then_some((start, end)))
}

/// A small replay in one pass on the connection's task, counted as it is
/// encoded: its records when they fit in `INLINE_REPLAY_BYTES`, were
/// found within `ONE_PASS_VISITS` events and were all in memory; else the
/// count pass and the stream pass take it on a blocking thread. The
/// bound keeps a replay whose matches are sparse (ONLY_UNACKED over
/// acknowledged history, events mostly addressed to others) from holding
/// the connection's thread, and so does reading only what the page cache
/// holds: a read from the disk would hold up every connection the thread
/// serves (all of them, on a server given one CPU).
fn one_pass(store: &dyn EventLog, job: &RangeJob) -> Result<OnePass, Reply> {
    let Some((start, end)) = bounds(store, job)? else {
        return Ok(OnePass::Done(Records {
            lines: Bytes::new(),
            count: 0,
        }));
    };
    let (acked_marks, unacked_marks) = (job.acked_marks(), job.marks(false));
    let ids = job.ids();
    let mut buf = BytesMut::with_capacity(small_buffer(job.limit, INLINE_REPLAY_BYTES));
    let (mut count, mut visited, mut fits, mut failed) = (0, 0, true, None);
    let scanned = store.scan_expecting(
        &job.pattern,
        start..=end,
        job.limit,
        Reads::Mapped,
        &mut |event| {
            visited += 1;
            if visited > ONE_PASS_VISITS {
                fits = false;
                return ControlFlow::Break(());
            }
            if !event.is_addressed_to(&ids) {
                return ControlFlow::Continue(());
            }
            let Some(acked) = job.acked_or_keep(store, event.seq, &mut failed) else {
                return ControlFlow::Break(());
            };
            if acked && job.only_unacked {
                return ControlFlow::Continue(());
            }
            let marks = match &acked_marks {
                Some(marks) if acked => marks,
                _ => &unacked_marks,
            };
            event.record.write_rendered_line(&mut buf, marks);
            count += 1;
            if buf.len() > INLINE_REPLAY_BYTES {
                fits = false;
                return ControlFlow::Break(());
            }
            if count == job.limit {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        },
    );
    match scanned.err().or(failed) {
        Some(StoreError::Uncached) => Ok(OnePass::Uncached),
        Some(e) => Err(internal(&e)),
        None if fits => Ok(OnePass::Done(Records {
            lines: buf.freeze(),
            count,
        })),
        None => Ok(OnePass::TooLarge),
    }
}

/// What one pass on a connection's task came to.
enum OnePass {
    /// Every record the replay sends.
    Done(Records),
    /// Too large, or too long a search, for one pass.
    TooLarge,
    /// A read would have waited for the disk, holding up the other
    /// connections the task's thread serves.
    Uncached,
}

/// Events one pass on a connection's task looks at, at most.
const ONE_PASS_VISITS: usize = 2048;

/// A buffer for `records` records: ~1 KiB each, up to a chunk of
/// `chunk_bytes`; it grows if that is not enough.
fn small_buffer(records: u64, chunk_bytes: usize) -> usize {
    let guess = usize::try_from(records.saturating_mul(1024)).unwrap_or(usize::MAX);
    guess.min(chunk_bytes + 8 * 1024)
}

/// Resolves the range and counts what the replay sends: the stream to
/// send, `None` when there is nothing, or the reply that refuses it.
fn count_pass(store: &dyn EventLog, job: RangeJob, mut pin: Pin) -> Result<Option<Stream>, Reply> {
    let Some((start, end)) = bounds(store, &job)? else {
        return Ok(None);
    };
    pin.move_to(start);
    let ids = job.ids();
    let counted = if job.filtering() {
        count_unacked(store, &job, start..=end, &ids)
    } else {
        store
            .count(&job.pattern, start..=end, &ids, job.limit)
            .map(|counted| (counted, Vec::new()))
    };
    let (Counted { count, last }, taken) = counted.map_err(|e| internal(&e))?;
    drop(ids);
    if count == 0 {
        return Ok(None);
    }
    Ok(Some(Stream {
        acked_marks: job.acked_marks(),
        unacked_marks: job.marks(false),
        job,
        from: start,
        last,
        count,
        sent: 0,
        chunk_bytes: REPLAY_FIRST_CHUNK_BYTES,
        taken,
        pin,
    }))
}

/// The count pass of an ONLY_UNACKED replay: the count, and the events it
/// took (at most LIMIT), so that an ACK landing before the stream pass
/// reaches its event does not change what was announced.
fn count_unacked(
    store: &dyn EventLog,
    job: &RangeJob,
    seqs: RangeInclusive<u64>,
    ids: &[&str],
) -> Result<(Counted, Vec<u64>), StoreError> {
    let mut taken = Vec::new();
    let mut failed = None;
    store.scan_expecting(
        &job.pattern,
        seqs,
        job.limit,
        Reads::Waiting,
        &mut |event| {
            if !event.is_addressed_to(ids) {
                return ControlFlow::Continue(());
            }
            match job.acked_or_keep(store, event.seq, &mut failed) {
                Some(true) => return ControlFlow::Continue(()),
                Some(false) => taken.push(event.seq),
                None => return ControlFlow::Break(()),
            }
            if taken.len() as u64 == job.limit {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    let counted = Counted {
        count: taken.len() as u64,
        last: taken.last().copied().unwrap_or(0),
    };
    Ok((counted, taken))
}

/// Replays one event to `client` as `+REPLAY:{record}`.
pub async fn event(engine: &Engine, client: &ClientId, grants: &Grants, req: ReplayEvent) -> Reply {
    let store = Arc::clone(&engine.store);
    let id = req.event_idem.clone();
    let found = engine
        .tracker
        .spawn_blocking(move || store.event(&id))
        .await;
    let not_found = || {
        Reply::fail(
            ErrorCode::NotFound,
            format!("no event {} addressed to {client}", req.event_idem),
        )
    };
    let owned = match found {
        Ok(Ok(Some(owned))) => owned,
        Ok(Ok(None)) => return not_found(),
        Ok(Err(e)) => return internal(&e),
        Err(_) => {
            return Reply::fail(
                ErrorCode::Internal,
                "the event lookup failed; see the server log",
            )
        }
    };
    let view = match owned.view() {
        Ok(view) => view,
        Err(e) => return internal(&e),
    };
    let identities = engine.identities(client);
    let ids: Vec<&str> = identities.iter().map(String::as_str).collect();
    let name_differs = req
        .event_name
        .as_ref()
        .is_some_and(|name| name.as_str() != view.name);
    if name_differs || !view.is_addressed_to(&ids) {
        return not_found();
    }
    let name: Pattern = match view.name.parse() {
        Ok(pattern) => pattern,
        Err(_) => return not_found(),
    };
    if !engine.subs.covers(client, &name) {
        return not_subscribed(client, &name);
    }
    if !grants.may_replay_name(view.name) {
        return Reply::fail(ErrorCode::PermissionDenied, NOT_AUTHORIZED_TO_REPLAY);
    }
    let was_acknowledged = match engine.store.settlement(client, view.seq) {
        Ok(settled) => settled == Some(Settlement::Acked),
        Err(e) => return internal(&e),
    };
    let mut buf = BytesMut::new();
    view.record.write(
        &mut buf,
        &Marks {
            include_payload: true,
            replay: Some(ReplayInfo {
                replay_timestamp: now_ms(),
                was_acknowledged,
            }),
        },
    );
    Reply::Event(buf.freeze())
}
