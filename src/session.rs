//! One client session, whatever carries it: frames in, lines out.
//!
//! A session runs two halves side by side. The reader takes frames in
//! order, parses them, checks them against the connection's client and
//! hands the engine's outcome to the writer through a bounded queue. The
//! writer answers those outcomes strictly in order (waiting for a commit,
//! streaming a replay), and between them writes live deliveries. Because
//! the reader does not wait for commits, a pipelining publisher keeps many
//! publishes in one group commit; because the writer keeps order, every
//! command gets exactly one reply, in the order sent.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use ensync_protocol::field::ClientId;
use ensync_protocol::{parse_command, Command, ErrorCode, Frame, Pass, Reply};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::MAX_IN_FLIGHT;
use crate::engine::{Attachment, Engine, Outcome, RecordSource, Records};

/// What a session writes: a reply, pre-encoded record lines (each ending
/// in LF; a WebSocket transport sends one frame per line), or a heartbeat.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// One reply line.
    Reply(Reply),
    /// Record lines.
    Lines(Bytes),
    /// The server's `PING`.
    Ping,
}

/// An answer owed to the client, in command order, with what the metrics
/// need to know about its command.
struct Owed {
    verb: &'static str,
    read_at: Instant,
    pending: Pending,
}

/// The verbs metrics are labelled with; anything else is `UNKNOWN`.
const VERBS: [&str; 13] = [
    "CONN", "PUB", "SUB", "UNSUB", "PAUSE", "CONTINUE", "ACK", "DEFER", "DISCARD", "ROLLBACK",
    "REPLAY", "PING", "PONG",
];

/// The verb of a line that did not parse, for the metrics' label.
fn verb_label(line: &str) -> &'static str {
    let verb = line.split(';').next().unwrap_or_default().trim();
    VERBS
        .iter()
        .find(|v| v.eq_ignore_ascii_case(verb))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// What the answer to a command was, for the metrics' label.
fn outcome_label(reply: &Reply) -> &'static str {
    match reply {
        Reply::Fail { code, .. } => code.as_str(),
        _ => "PASS",
    }
}

/// An answer owed to the client, in command order.
enum Pending {
    Ready(Reply),
    Connected {
        attachment: Box<Attachment>,
        reply: Reply,
    },
    Outcome(Outcome),
}

/// When the client last sent anything, in nanoseconds since the session
/// started (exact, so an answer in the same millisecond as a PING counts).
struct LastSeen {
    start: Instant,
    nanos: AtomicU64,
}

impl LastSeen {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            nanos: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.store(nanos, Ordering::Relaxed);
    }

    fn get(&self) -> Instant {
        self.start + std::time::Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// Serves one session until the client leaves, the transport fails, or
/// `cancel` fires (checked between lines, never mid-reply).
///
/// # Errors
/// The transport's I/O error, if any.
pub async fn serve<R, W>(
    engine: Arc<Engine>,
    frames: R,
    sink: W,
    cancel: CancellationToken,
) -> io::Result<()>
where
    R: Stream<Item = io::Result<Frame>> + Unpin,
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    let seen = LastSeen::new();
    // Stops the reader when the writer ends (the transport failed, or the
    // client did not answer a heartbeat).
    let stop = cancel.child_token();
    let reader = read_loop(&engine, frames, tx, &stop, &seen);
    let writer = async {
        let result = write_loop(&engine, rx, sink, &seen).await;
        stop.cancel();
        result
    };
    let (read, write) = tokio::join!(reader, writer);
    read.and(write)
}

async fn read_loop<R>(
    engine: &Engine,
    mut frames: R,
    tx: mpsc::Sender<Owed>,
    cancel: &CancellationToken,
    seen: &LastSeen,
) -> io::Result<()>
where
    R: Stream<Item = io::Result<Frame>> + Unpin,
{
    let mut client: Option<ClientId> = None;
    let tx = &tx;
    let send = |verb, pending| async move {
        let owed = Owed {
            verb,
            read_at: Instant::now(),
            pending,
        };
        tx.send(owed).await.is_ok()
    };
    loop {
        let frame = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            frame = frames.next() => frame,
        };
        seen.touch();
        let (verb, pending) = match frame {
            None => return Ok(()),
            Some(Err(e)) => return Err(e),
            Some(Ok(Frame::Line(line))) => handle_line(engine, &mut client, &line).await,
            Some(Ok(Frame::TooLong { max })) => (
                "UNKNOWN",
                Some(Pending::Ready(Reply::fail(
                    ErrorCode::LineTooLong,
                    format!(
                    "the line is longer than {max} bytes and was dropped up to the next newline"
                ),
                ))),
            ),
            Some(Ok(Frame::InvalidEncoding)) => (
                "UNKNOWN",
                Some(Pending::Ready(Reply::fail(
                    ErrorCode::InvalidEncoding,
                    "the line is not valid UTF-8 text",
                ))),
            ),
        };
        if let Some(pending) = pending {
            if !send(verb, pending).await {
                // The writer has stopped: the transport is gone.
                return Ok(());
            }
        }
    }
}

async fn handle_line(
    engine: &Engine,
    client: &mut Option<ClientId>,
    line: &str,
) -> (&'static str, Option<Pending>) {
    let cmd = match parse_command(line) {
        Ok(cmd) => cmd,
        Err(e) => {
            debug!(error = %e, "command refused");
            let reply = e.to_reply(engine.config().max_replay_limit);
            return (verb_label(line), Some(Pending::Ready(reply)));
        }
    };
    let verb = cmd.verb();
    debug!(verb, "command");
    (verb, command(engine, client, cmd).await)
}

async fn command(engine: &Engine, client: &mut Option<ClientId>, cmd: Command) -> Option<Pending> {
    match cmd {
        Command::Pong => None,
        Command::Ping => Some(Pending::Ready(Reply::Pass(Pass::Pong))),
        Command::Conn(conn) => Some(match engine.connect(&conn.auth) {
            Err(reply) => Pending::Ready(reply),
            Ok((id, reply)) => match client {
                Some(current) if *current == id => Pending::Ready(reply),
                Some(current) => Pending::Ready(Reply::fail(
                    ErrorCode::AlreadyConnected,
                    format!("this connection is connected as {current} (open another connection for {id})"),
                )),
                None => {
                    tracing::Span::current().record("client_id", id.as_str());
                    let attachment = Box::new(engine.attach(&id));
                    *client = Some(id);
                    Pending::Connected { attachment, reply }
                }
            },
        }),
        cmd => {
            let Some(current) = client.as_ref() else {
                return Some(Pending::Ready(Reply::fail(
                    ErrorCode::NotConnected,
                    format!("{} needs a connected client: connect first with CONN and your CLIENT_ID", cmd.verb()),
                )));
            };
            if let Some(claimed) = cmd.client_id().filter(|id| *id != current) {
                return Some(Pending::Ready(Reply::fail(
                    ErrorCode::PermissionDenied,
                    format!("this connection is connected as {current}, not {claimed}"),
                )));
            }
            Some(Pending::Outcome(engine.execute(current, cmd).await))
        }
    }
}

async fn next_delivery(attachment: Option<&Attachment>) -> Bytes {
    match attachment {
        Some(attachment) => attachment.next().await,
        None => std::future::pending().await,
    }
}

async fn write_loop<W>(
    engine: &Engine,
    mut rx: mpsc::Receiver<Owed>,
    mut sink: W,
    seen: &LastSeen,
) -> io::Result<()>
where
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    let heartbeat = engine.config().heartbeat;
    let mut attachment: Option<Box<Attachment>> = None;
    let mut ping_sent: Option<Instant> = None;
    loop {
        if ping_sent.is_some_and(|sent| seen.get() >= sent) {
            // Answered: the next PING is due an interval after the answer.
            ping_sent = None;
        }
        let check_at = match ping_sent {
            Some(sent) => sent + heartbeat.timeout,
            None => seen.get() + heartbeat.interval,
        };
        tokio::select! {
            biased;
            pending = rx.recv() => match pending {
                None => break,
                Some(pending) => answer(engine, pending, &mut attachment, &mut sink).await?,
            },
            lines = next_delivery(attachment.as_deref()) => {
                engine.metrics().delivered(count_lines(&lines));
                sink.send(Outbound::Lines(lines)).await?;
            }
            () = tokio::time::sleep_until(check_at) => {
                let last = seen.get();
                match ping_sent {
                    Some(sent) if last >= sent => ping_sent = None,
                    Some(_) => {
                        info!(timeout = ?heartbeat.timeout, "no answer to PING; closing the connection");
                        break;
                    }
                    None if last + heartbeat.interval <= Instant::now() => {
                        sink.feed(Outbound::Ping).await?;
                        ping_sent = Some(Instant::now());
                    }
                    None => {}
                }
            }
        }
        if rx.is_empty() {
            sink.flush().await?;
        }
    }
    sink.flush().await?;
    sink.close().await
}

fn count_lines(lines: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', lines).count() as u64
}

async fn answer<W>(
    engine: &Engine,
    owed: Owed,
    attachment: &mut Option<Box<Attachment>>,
    sink: &mut W,
) -> io::Result<()>
where
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    let Owed {
        verb,
        read_at,
        pending,
    } = owed;
    let metrics = engine.metrics();
    let reply = match pending {
        Pending::Ready(reply) => reply,
        Pending::Connected {
            attachment: attached,
            reply,
        } => {
            *attachment = Some(attached);
            reply
        }
        Pending::Outcome(outcome) => {
            let client = attachment
                .as_ref()
                .map(|a| a.client().clone())
                .expect("commands reach the engine only after CONN");
            match outcome {
                Outcome::Reply(reply) => reply,
                Outcome::Later(reply) => {
                    let reply = reply.await;
                    if verb == "PUB" && !reply.is_fail() {
                        metrics.published(read_at.elapsed());
                    }
                    reply
                }
                Outcome::ReplayEvent(req) => {
                    let reply = engine.replay_event(&client, req).await;
                    if matches!(reply, Reply::Event(_)) {
                        metrics.replayed(1);
                    }
                    reply
                }
                Outcome::Replay(req) => {
                    let started = Instant::now();
                    let stream = engine.replay(&client, req).await;
                    metrics.command(verb, outcome_label(&stream.header));
                    sink.feed(Outbound::Reply(stream.header)).await?;
                    if let Some(records) = stream.records {
                        forward(engine, records, sink).await?;
                        metrics.replay_finished(started.elapsed());
                    }
                    return Ok(());
                }
            }
        }
    };
    metrics.command(verb, outcome_label(&reply));
    sink.feed(Outbound::Reply(reply)).await
}

/// Writes streamed record chunks as they come.
async fn forward<W>(engine: &Engine, mut records: RecordSource, sink: &mut W) -> io::Result<()>
where
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    while let Some(chunk) = records.next().await {
        match chunk {
            Ok(Records { lines, count }) => {
                engine.metrics().replayed(count);
                sink.send(Outbound::Lines(lines)).await?;
            }
            Err(message) => {
                // NOTE: the header promised a COUNT this stream cannot keep;
                // closing is the only way not to mislead the client.
                warn!(%message, "record stream broke off; closing the connection");
                return Err(io::Error::other(message));
            }
        }
    }
    Ok(())
}
