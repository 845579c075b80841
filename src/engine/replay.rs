//! REPLAY: range replays and single-event replays.
//!
//! A range replay runs on a blocking thread in two passes over the same
//! snapshot: the first counts matching events up to LIMIT (so the header's
//! COUNT is exact), the second encodes them into chunks and hands them to
//! the connection through a small bounded channel. A reader that stops
//! reading stalls only its own replay thread, and a replay holds at most
//! `REPLAY_CHUNKS_AHEAD` chunks in memory whatever its size. A pin keeps
//! retention from removing what the replay has counted and not yet sent.

use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ensync_protocol::command::{Replay, ReplayEvent};
use ensync_protocol::field::{ClientId, Limit, Pattern};
use ensync_protocol::{ErrorCode, Marks, Pass, ReplayInfo, Reply};
use tokio::sync::{mpsc, oneshot};

use super::retention::Pin;
use super::{internal, now_ms, Engine};
use crate::config::{REPLAY_CHUNKS_AHEAD, REPLAY_CHUNK_BYTES};
use crate::store::{EventLog, EventView, Resolved, Settlement, Side, StoreError};

/// Encoded record lines, or why the stream broke off.
pub type Chunk = Result<Bytes, String>;

/// A replay's header and the records that follow it.
#[derive(Debug)]
pub struct ReplayStream {
    /// `+PASS:REPLAY_STARTED...` or the `-FAIL` that ends the replay.
    pub header: Reply,
    /// Exactly COUNT records, in chunks, after a successful header.
    pub chunks: Option<mpsc::Receiver<Chunk>>,
}

impl ReplayStream {
    fn refused(header: Reply) -> Self {
        Self {
            header,
            chunks: None,
        }
    }
}

fn invalid_position() -> Reply {
    Reply::fail(
        ErrorCode::InvalidPosition,
        "Invalid or expired position marker",
    )
}

/// Accumulates record lines and hands them to the connection in chunks.
struct ChunkWriter {
    buf: BytesMut,
    tx: mpsc::Sender<Chunk>,
}

impl ChunkWriter {
    fn new(tx: mpsc::Sender<Chunk>) -> Self {
        Self {
            buf: BytesMut::with_capacity(REPLAY_CHUNK_BYTES * 2),
            tx,
        }
    }

    /// Writes one record; breaks when the connection has gone away.
    fn write(&mut self, event: &EventView<'_>, marks: &Marks) -> ControlFlow<()> {
        event.record.write_line(&mut self.buf, marks);
        if self.buf.len() >= REPLAY_CHUNK_BYTES {
            return self.send();
        }
        ControlFlow::Continue(())
    }

    fn send(&mut self) -> ControlFlow<()> {
        let chunk = std::mem::replace(
            &mut self.buf,
            BytesMut::with_capacity(REPLAY_CHUNK_BYTES * 2),
        );
        match self.tx.blocking_send(Ok(chunk.freeze())) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    fn finish(mut self) {
        if !self.buf.is_empty() {
            let _ = self.send();
        }
    }

    fn fail(self, message: String) {
        let _ = self.tx.blocking_send(Err(message));
    }
}

/// The request as the replay thread needs it.
struct RangeJob {
    client: ClientId,
    pattern: Pattern,
    from: ensync_protocol::field::Position,
    to: Option<ensync_protocol::field::Position>,
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
    fn marks(&self, was_acknowledged: bool) -> Marks {
        Marks {
            include_payload: self.include_payload,
            replay: Some(ReplayInfo {
                replay_timestamp: self.replay_timestamp,
                was_acknowledged,
            }),
        }
    }

    /// Whether the client acknowledged event `seq`.
    fn acked(&self, store: &dyn EventLog, seq: u64) -> Result<bool, StoreError> {
        Ok(self.check_acks && store.settlement(&self.client, seq)? == Some(Settlement::Acked))
    }
}

/// Starts a range replay for `client`.
pub async fn range(engine: &Engine, client: &ClientId, req: Replay) -> ReplayStream {
    let max = engine.config.max_replay_limit;
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
    let job = RangeJob {
        snapshot: engine.commit.head(),
        limit: u64::from(limit),
        identities: engine.identities(client),
        only_unacked: req.only_unacked == Some(true),
        check_acks: engine.store.has_settlements(client),
        include_payload: req.include_payloads.unwrap_or(true),
        replay_timestamp: now_ms(),
        client: client.clone(),
        pattern: req.event_name.clone(),
        from: req.from_position,
        to: req.to_position,
    };
    let (header_tx, header_rx) = oneshot::channel();
    let (tx, rx) = mpsc::channel(REPLAY_CHUNKS_AHEAD);
    let store = Arc::clone(&engine.store);
    let pins = Arc::clone(&engine.pins);
    engine.tracker.spawn_blocking(move || {
        // Pinned before the start is resolved: a trim either finished
        // before (and the start is resolved in what it left) or waits.
        let pin = pins.pin();
        run_range(store.as_ref(), &job, pin, header_tx, tx);
    });
    match header_rx.await {
        Ok(Ok(count)) => ReplayStream {
            header: Reply::Pass(Pass::ReplayStarted {
                event_name: req.event_name.to_string(),
                count,
            }),
            chunks: (count > 0).then_some(rx),
        },
        Ok(Err(reply)) => ReplayStream::refused(reply),
        Err(_) => ReplayStream::refused(Reply::fail(
            ErrorCode::Internal,
            "the replay stopped before it started; see the server log",
        )),
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

fn run_range(
    store: &dyn EventLog,
    job: &RangeJob,
    mut pin: Pin,
    header: oneshot::Sender<Result<u64, Reply>>,
    tx: mpsc::Sender<Chunk>,
) {
    let (start, end) = match bounds(store, job) {
        Ok(Some(range)) => range,
        Ok(None) => {
            let _ = header.send(Ok(0));
            return;
        }
        Err(reply) => {
            let _ = header.send(Err(reply));
            return;
        }
    };
    pin.move_to(start);
    let ids: Vec<&str> = job.identities.iter().map(String::as_str).collect();
    let (mut count, mut last) = (0u64, start);
    let mut failed = None;
    // With ONLY_UNACKED, the events the count pass took: an ACK that lands
    // before the stream pass reaches its event must not change what was
    // announced. At most LIMIT entries.
    let mut taken: Vec<u64> = Vec::new();
    let filtering = job.only_unacked && job.check_acks;
    let counted = store.scan(&job.pattern, start..=end, &mut |event| {
        if !event.is_addressed_to(&ids) {
            return ControlFlow::Continue(());
        }
        if filtering {
            match job.acked(store, event.seq) {
                Ok(true) => return ControlFlow::Continue(()),
                Ok(false) => taken.push(event.seq),
                Err(e) => {
                    failed = Some(e);
                    return ControlFlow::Break(());
                }
            }
        }
        count += 1;
        last = event.seq;
        if count == job.limit {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    if let Some(e) = counted.err().or(failed) {
        let _ = header.send(Err(internal(&e)));
        return;
    }
    if header.send(Ok(count)).is_err() || count == 0 {
        return;
    }
    let (acked_marks, unacked_marks) = (job.marks(true), job.marks(false));
    let mut out = ChunkWriter::new(tx);
    let mut sent = 0u64;
    let mut failed = None;
    let streamed = store.scan(&job.pattern, start..=last, &mut |event| {
        if !event.is_addressed_to(&ids) {
            return ControlFlow::Continue(());
        }
        let acked = match job.acked(store, event.seq) {
            Ok(acked) => acked,
            Err(e) => {
                failed = Some(e);
                return ControlFlow::Break(());
            }
        };
        if filtering && taken.binary_search(&event.seq).is_err() {
            return ControlFlow::Continue(());
        }
        sent += 1;
        out.write(&event, if acked { &acked_marks } else { &unacked_marks })
    });
    match streamed.err().or(failed) {
        None if sent == count => out.finish(),
        None => out.fail(format!(
            "replay found {sent} of the {count} events it announced"
        )),
        Some(e) => out.fail(format!("replay broke off: {e}")),
    }
}

/// Replays one event to `client` as `+REPLAY:{record}`.
pub async fn event(engine: &Engine, client: &ClientId, req: ReplayEvent) -> Reply {
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
