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
use std::sync::Arc;

use bytes::Bytes;
use ensync_protocol::field::ClientId;
use ensync_protocol::{parse_command, Command, ErrorCode, Frame, Pass, Reply};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::MAX_IN_FLIGHT;
use crate::engine::{Chunk, Engine, LiveBatch, Outcome};

/// What a session writes: a reply, or pre-encoded record lines (each
/// ending in LF; a WebSocket transport sends one frame per line).
#[derive(Debug, Clone)]
pub enum Outbound {
    /// One reply line.
    Reply(Reply),
    /// Record lines.
    Lines(Bytes),
}

/// An answer owed to the client, in command order.
enum Pending {
    Ready(Reply),
    Connected { client: ClientId, reply: Reply },
    Outcome(Outcome),
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
    let reader = read_loop(&engine, frames, tx, &cancel);
    let writer = write_loop(&engine, rx, sink);
    let (read, write) = tokio::join!(reader, writer);
    read.and(write)
}

async fn read_loop<R>(
    engine: &Engine,
    mut frames: R,
    tx: mpsc::Sender<Pending>,
    cancel: &CancellationToken,
) -> io::Result<()>
where
    R: Stream<Item = io::Result<Frame>> + Unpin,
{
    let mut client: Option<ClientId> = None;
    loop {
        let frame = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            frame = frames.next() => frame,
        };
        let pending = match frame {
            None => return Ok(()),
            Some(Err(e)) => return Err(e),
            Some(Ok(Frame::Line(line))) => handle_line(engine, &mut client, &line).await,
            Some(Ok(Frame::TooLong { max })) => Some(Pending::Ready(Reply::fail(
                ErrorCode::LineTooLong,
                format!(
                    "the line is longer than {max} bytes and was dropped up to the next newline"
                ),
            ))),
            Some(Ok(Frame::InvalidEncoding)) => Some(Pending::Ready(Reply::fail(
                ErrorCode::InvalidEncoding,
                "the line is not valid UTF-8 text",
            ))),
        };
        if let Some(pending) = pending {
            if tx.send(pending).await.is_err() {
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
) -> Option<Pending> {
    let cmd = match parse_command(line) {
        Ok(cmd) => cmd,
        Err(e) => {
            debug!(error = %e, "command refused");
            return Some(Pending::Ready(e.to_reply(engine.config().max_replay_limit)));
        }
    };
    debug!(verb = cmd.verb(), "command");
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
                    *client = Some(id.clone());
                    Pending::Connected { client: id, reply }
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

/// The live feed of a connected client.
struct Live {
    client: ClientId,
    feed: broadcast::Receiver<LiveBatch>,
    /// Events up to here have been delivered (or were before the client
    /// connected).
    cursor: u64,
}

async fn next_batch(live: &mut Option<Live>) -> Result<LiveBatch, broadcast::error::RecvError> {
    match live {
        Some(live) => live.feed.recv().await,
        None => std::future::pending().await,
    }
}

async fn write_loop<W>(
    engine: &Engine,
    mut rx: mpsc::Receiver<Pending>,
    mut sink: W,
) -> io::Result<()>
where
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    let mut live: Option<Live> = None;
    loop {
        tokio::select! {
            biased;
            pending = rx.recv() => match pending {
                None => break,
                Some(pending) => answer(engine, pending, &mut live, &mut sink).await?,
            },
            batch = next_batch(&mut live) => deliver(engine, batch, &mut live, &mut sink).await?,
        }
        if rx.is_empty() {
            sink.flush().await?;
        }
    }
    sink.flush().await?;
    sink.close().await
}

async fn answer<W>(
    engine: &Engine,
    pending: Pending,
    live: &mut Option<Live>,
    sink: &mut W,
) -> io::Result<()>
where
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    let client = live.as_ref().map(|l| l.client.clone());
    match pending {
        Pending::Ready(reply) => sink.feed(Outbound::Reply(reply)).await,
        Pending::Connected { client, reply } => {
            let (feed, cursor) = engine.follow();
            *live = Some(Live {
                client,
                feed,
                cursor,
            });
            sink.feed(Outbound::Reply(reply)).await
        }
        Pending::Outcome(outcome) => {
            let client = client.expect("commands reach the engine only after CONN");
            match outcome {
                Outcome::Reply(reply) => sink.feed(Outbound::Reply(reply)).await,
                Outcome::Commit(done) => {
                    sink.feed(Outbound::Reply(Engine::committed_reply(done.await)))
                        .await
                }
                Outcome::ReplayEvent(req) => {
                    let reply = engine.replay_event(&client, req).await;
                    sink.feed(Outbound::Reply(reply)).await
                }
                Outcome::Replay(req) => {
                    let stream = engine.replay(&client, req).await;
                    sink.feed(Outbound::Reply(stream.header)).await?;
                    match stream.chunks {
                        Some(chunks) => forward(chunks, sink).await,
                        None => Ok(()),
                    }
                }
            }
        }
    }
}

/// Writes streamed record chunks as they come.
async fn forward<W>(mut chunks: mpsc::Receiver<Chunk>, sink: &mut W) -> io::Result<()>
where
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    while let Some(chunk) = chunks.recv().await {
        match chunk {
            Ok(lines) => sink.send(Outbound::Lines(lines)).await?,
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

async fn deliver<W>(
    engine: &Engine,
    batch: Result<LiveBatch, broadcast::error::RecvError>,
    live: &mut Option<Live>,
    sink: &mut W,
) -> io::Result<()>
where
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    let Some(state) = live.as_mut() else {
        return Ok(());
    };
    match batch {
        Ok(batch) => {
            if let Some(lines) = engine.live_lines(&state.client, &batch, state.cursor) {
                sink.feed(Outbound::Lines(lines)).await?;
            }
            if let Some(last) = batch.last() {
                state.cursor = state.cursor.max(last.seq);
            }
            Ok(())
        }
        Err(broadcast::error::RecvError::Lagged(missed)) => {
            let until = engine.head();
            debug!(missed, "live feed lagged; catching up from the log");
            let chunks = engine.catch_up(&state.client, state.cursor, until);
            state.cursor = until;
            match chunks {
                Some(chunks) => forward(chunks, sink).await,
                None => Ok(()),
            }
        }
        Err(broadcast::error::RecvError::Closed) => {
            *live = None;
            Ok(())
        }
    }
}
