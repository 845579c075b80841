//! One client session, whatever carries it: frames in, lines out.
//!
//! A session runs two halves side by side. The reader takes frames in
//! order, parses them, checks them against the connection's client and
//! hands the engine's outcome to the writer through a bounded queue. The
//! writer answers those outcomes strictly in order (waiting for a commit,
//! streaming a replay), and between them writes live deliveries. Because
//! the reader does not wait for commits, a pipelining publisher keeps many
//! publishes in flight, group-committed while the reader reads on; because
//! the writer keeps order, every command gets exactly one reply, in the
//! order sent.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use ensync_protocol::command::ConnAuth;
use ensync_protocol::field::ClientId;
use ensync_protocol::{parse_command, Command, ErrorCode, Frame, LineLimit, Pass, Reply};
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::access::{
    Grants, NOT_AUTHORIZED_TO_PUBLISH, NOT_AUTHORIZED_TO_REPLAY, NOT_AUTHORIZED_TO_SUBSCRIBE,
};
use crate::config::{Limits, MAX_IN_FLIGHT, MAX_LINE_BEFORE_CONN};
use crate::engine::{Attachment, Delivered, Engine, Outcome, RecordSource, Records};
use crate::limits::{Bucket, ClientSlot, Pacer, Stalled};
use crate::metrics::Closed;

mod handoff;

use handoff::{handoff, reader_then_writer, Receiver, Sender};

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

/// CONNs with unknown access keys a connection may make before it is
/// closed.
const MAX_FAILED_LOGINS: u32 = 3;

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
        connection: Box<Connection>,
        reply: Reply,
    },
    Outcome(Outcome),
}

/// What the writer needs of the client once CONN succeeded.
struct Connection {
    /// Shared with the writer's pending wait for deliveries.
    attachment: Arc<Attachment>,
    grants: Arc<Grants>,
    pacer: Arc<Pacer>,
}

/// The client a connection is connected as, on the reading side.
struct Client {
    id: ClientId,
    grants: Arc<Grants>,
}

/// Why the reader stopped waiting for the next line.
enum Wake {
    Frame(Option<io::Result<Frame>>),
    Deadline,
    Cancelled,
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

    fn touch(&self, now: Instant) {
        let nanos =
            u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        self.nanos.store(nanos, Ordering::Relaxed);
    }

    fn get(&self) -> Instant {
        self.start + std::time::Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// The line limit a transport frames with until its client has connected:
/// a CONN line is short, so a stranger cannot make the server buffer
/// `limits.max_line_len` for every connection it opens.
pub fn line_limit_before_conn(engine: &Engine) -> LineLimit {
    LineLimit::new(MAX_LINE_BEFORE_CONN.min(engine.config().limits.max_line_len))
}

/// Serves one session until the client leaves, the transport fails, or
/// `cancel` fires (checked between lines, never mid-reply). `frames` come
/// from a codec held to `line_limit`, which the session raises to
/// `limits.max_line_len` once the client has connected.
///
/// # Errors
/// The transport's I/O error, if any.
pub async fn serve<R, W>(
    engine: Arc<Engine>,
    frames: R,
    sink: W,
    line_limit: LineLimit,
    cancel: CancellationToken,
) -> io::Result<()>
where
    R: Stream<Item = io::Result<Frame>> + Unpin,
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    let (tx, rx) = handoff(MAX_IN_FLIGHT);
    let seen = LastSeen::new();
    // Replays asked for and not yet answered in full.
    let replays = AtomicUsize::new(0);
    // One of the client's connection slots, held until both halves end:
    // a client that closes its sending side may still be receiving.
    let mut slot: Option<ClientSlot> = None;
    // Stops the reader when the writer ends (the transport failed, or the
    // client did not answer a heartbeat).
    let stop = cancel.child_token();
    let reader = read_loop(
        &engine,
        frames,
        &line_limit,
        &mut slot,
        tx,
        &stop,
        &seen,
        &replays,
    );
    let writer = async {
        let result = write_loop(&engine, rx, sink, &seen, &replays).await;
        stop.cancel();
        result
    };
    let (read, write) = reader_then_writer(reader, writer).await;
    drop(slot);
    if let Err(e) = &write {
        if Stalled::is(e) {
            engine.metrics().closed(Closed::SendTimeout);
            warn!("{e}; closing the connection");
        }
    }
    read.and(write)
}

#[allow(clippy::too_many_arguments)]
async fn read_loop<R>(
    engine: &Engine,
    mut frames: R,
    line_limit: &LineLimit,
    slot: &mut Option<ClientSlot>,
    tx: Sender<Owed>,
    cancel: &CancellationToken,
    seen: &LastSeen,
    replays: &AtomicUsize,
) -> io::Result<()>
where
    R: Stream<Item = io::Result<Frame>> + Unpin,
{
    let limits = engine.config().limits;
    let mut client: Option<Client> = None;
    let mut rate = (limits.commands_per_second > 0).then(|| {
        let rate = u64::from(limits.commands_per_second);
        Bucket::new(rate, rate)
    });
    let tx = &tx;
    let send = |verb, read_at, pending| async move {
        let owed = Owed {
            verb,
            read_at,
            pending,
        };
        tx.send(owed).await
    };
    let opened = Instant::now();
    let mut last_command = opened;
    let mut failed_logins = 0;
    // One timer, moved on only when it fires: resetting it for every
    // command would cost a timer-wheel update per line.
    let timer = tokio::time::sleep_until(opened + limits.login_timeout);
    tokio::pin!(timer);
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let wake = tokio::select! {
            () = &mut cancelled => Wake::Cancelled,
            () = &mut timer => Wake::Deadline,
            frame = frames.next() => Wake::Frame(frame),
        };
        let frame = match wake {
            Wake::Cancelled => return Ok(()),
            Wake::Frame(frame) => frame,
            Wake::Deadline => {
                let deadline = match &client {
                    None => opened + limits.login_timeout,
                    Some(_) => last_command + limits.idle_timeout,
                };
                if deadline > Instant::now() {
                    timer.as_mut().reset(deadline);
                    continue;
                }
                if client
                    .as_ref()
                    .is_some_and(|c| engine.has_subscriptions(&c.id))
                {
                    // A subscriber waiting for events is not idle.
                    timer.as_mut().reset(Instant::now() + limits.idle_timeout);
                    continue;
                }
                let (why, message) = timed_out(client.is_some(), &limits);
                engine.metrics().closed(why);
                info!("{message}");
                send(
                    "UNKNOWN",
                    Instant::now(),
                    Pending::Ready(Reply::fail(ErrorCode::Timeout, message)),
                )
                .await;
                return Ok(());
            }
        };
        // One clock read serves everything this line needs timed.
        let now = Instant::now();
        seen.touch(now);
        let frame = match frame {
            None => return Ok(()),
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => frame,
        };
        let is_pong =
            matches!(&frame, Frame::Line(line) if line.trim().eq_ignore_ascii_case("PONG"));
        if !is_pong {
            last_command = now;
        }
        let limited = !is_pong && rate.as_mut().is_some_and(|bucket| !bucket.try_take(now));
        let (verb, pending) = match frame {
            _ if limited => ("UNKNOWN", Some(Pending::Ready(rate_limited(&limits)))),
            Frame::Line(line) => {
                let was_connected = client.is_some();
                let handled = handle_line(engine, &mut client, slot, replays, &line).await;
                if !was_connected && client.is_some() {
                    line_limit.set(limits.max_line_len);
                    timer.as_mut().reset(last_command + limits.idle_timeout);
                }
                handled
            }
            Frame::TooLong { max } => (
                "UNKNOWN",
                Some(Pending::Ready(too_long(max, client.is_some(), &limits))),
            ),
            Frame::InvalidEncoding => (
                "UNKNOWN",
                Some(Pending::Ready(Reply::fail(
                    ErrorCode::InvalidEncoding,
                    "the line is not valid UTF-8 text",
                ))),
            ),
        };
        let wrong_key = matches!(
            &pending,
            Some(Pending::Ready(Reply::Fail {
                code: ErrorCode::ClientNotFound,
                ..
            }))
        );
        if let Some(pending) = pending {
            if !send(verb, now, pending).await {
                // The writer has stopped: the transport is gone.
                return Ok(());
            }
        }
        if wrong_key {
            failed_logins += 1;
            if failed_logins >= MAX_FAILED_LOGINS {
                // A guesser must open a connection per few guesses.
                engine.metrics().closed(Closed::FailedLogins);
                info!("{failed_logins} CONNs with unknown access keys; closing the connection");
                return Ok(());
            }
        }
    }
}

/// Why a connection is closed when its timer fires: idle with a client,
/// or never connected.
fn timed_out(connected: bool, limits: &Limits) -> (Closed, String) {
    if connected {
        let idle = humantime::format_duration(limits.idle_timeout);
        (
            Closed::IdleTimeout,
            format!("no command for {idle} and no subscription (limits.idle_timeout), closing the connection"),
        )
    } else {
        let login = humantime::format_duration(limits.login_timeout);
        (
            Closed::LoginTimeout,
            format!("no CONN within {login} of connecting (limits.login_timeout), closing the connection"),
        )
    }
}

fn rate_limited(limits: &Limits) -> Reply {
    Reply::fail(
        ErrorCode::RateLimited,
        format!(
            "more than {} commands a second on this connection (limits.commands_per_second): this one was not carried out, slow down and send it again",
            limits.commands_per_second
        ),
    )
}

/// The answer to a line over `max` bytes.
fn too_long(max: usize, connected: bool, limits: &Limits) -> Reply {
    let before_conn = if !connected && max < limits.max_line_len {
        ", the most before CONN,"
    } else {
        ""
    };
    Reply::fail(
        ErrorCode::LineTooLong,
        format!("the line is longer than {max} bytes{before_conn} and was dropped up to the next newline"),
    )
}

async fn handle_line(
    engine: &Engine,
    client: &mut Option<Client>,
    slot: &mut Option<ClientSlot>,
    replays: &AtomicUsize,
    line: &str,
) -> (&'static str, Option<Pending>) {
    let cmd = match parse_command(line) {
        Ok(cmd) => cmd,
        Err(e) => {
            debug!(error = %e, "command refused");
            let reply = e.to_reply(engine.config().limits.max_replay_limit);
            return (verb_label(line), Some(Pending::Ready(reply)));
        }
    };
    let verb = cmd.verb();
    debug!(verb, "command");
    (verb, command(engine, client, slot, replays, cmd).await)
}

async fn command(
    engine: &Engine,
    client: &mut Option<Client>,
    slot: &mut Option<ClientSlot>,
    replays: &AtomicUsize,
    cmd: Command,
) -> Option<Pending> {
    match cmd {
        Command::Pong => None,
        Command::Ping => Some(Pending::Ready(Reply::Pass(Pass::Pong))),
        Command::Conn(conn) => Some(connect(engine, client, slot, &conn.auth)),
        cmd => {
            let Some(current) = client.as_ref() else {
                return Some(Pending::Ready(Reply::fail(
                    ErrorCode::NotConnected,
                    format!(
                        "{} needs a connected client: connect first with CONN and your CLIENT_ID",
                        cmd.verb()
                    ),
                )));
            };
            if let Some(claimed) = cmd.client_id().filter(|id| *id != &current.id) {
                return Some(Pending::Ready(Reply::fail(
                    ErrorCode::PermissionDenied,
                    format!(
                        "this connection is connected as {}, not {claimed}",
                        current.id
                    ),
                )));
            }
            let grants = &current.grants;
            let refused = match &cmd {
                Command::Pub(p) if !grants.may_publish(p.event_name.as_str()) => {
                    Some(NOT_AUTHORIZED_TO_PUBLISH)
                }
                Command::Sub(s) if !grants.may_subscribe(&s.event_name) => {
                    Some(NOT_AUTHORIZED_TO_SUBSCRIBE)
                }
                Command::Replay(r) if !grants.may_replay(&r.event_name) => {
                    Some(NOT_AUTHORIZED_TO_REPLAY)
                }
                _ => None,
            };
            if let Some(message) = refused {
                return Some(Pending::Ready(Reply::fail(
                    ErrorCode::PermissionDenied,
                    message,
                )));
            }
            let is_replay = matches!(cmd, Command::Replay(_) | Command::ReplayEvent(_));
            let max = engine.config().limits.max_replays_in_flight;
            if is_replay && replays.load(Ordering::Acquire) >= max {
                return Some(Pending::Ready(Reply::fail(
                    ErrorCode::RateLimited,
                    format!("{max} replays are already waiting on this connection (limits.max_replays_in_flight): read their records before asking for more"),
                )));
            }
            let outcome = engine.execute(&current.id, cmd).await;
            if matches!(outcome, Outcome::Replay(_) | Outcome::ReplayEvent(_)) {
                replays.fetch_add(1, Ordering::AcqRel);
            }
            Some(Pending::Outcome(outcome))
        }
    }
}

/// Answers a CONN: the connection takes the client it names, once.
fn connect(
    engine: &Engine,
    client: &mut Option<Client>,
    slot: &mut Option<ClientSlot>,
    auth: &ConnAuth,
) -> Pending {
    let (id, grants, reply) = match engine.connect(auth) {
        Ok(connected) => connected,
        Err(reply) => return Pending::Ready(reply),
    };
    match client {
        Some(current) if current.id == id => Pending::Ready(reply),
        Some(current) => Pending::Ready(Reply::fail(
            ErrorCode::AlreadyConnected,
            format!(
                "this connection is connected as {} (open another connection for {id})",
                current.id
            ),
        )),
        None => {
            let claimed = match engine.claim_slot(&id) {
                Ok(claimed) => claimed,
                Err(reply) => return Pending::Ready(reply),
            };
            tracing::Span::current().record("client_id", id.as_str());
            let connection = Connection {
                attachment: Arc::new(engine.attach(&id)),
                grants: Arc::clone(&grants),
                pacer: Arc::clone(claimed.pacer()),
            };
            *slot = Some(claimed);
            *client = Some(Client { id, grants });
            Pending::Connected {
                connection: Box::new(connection),
                reply,
            }
        }
    }
}

/// A wait for the next live delivery of a connection, kept across the
/// writer's turns: made anew for every command, it cost a pull from the
/// hub per command (2% of a profile of LIMIT-50 replays).
type Delivery = Pin<Box<dyn Future<Output = Delivered> + Send>>;

fn next_delivery(connection: Option<&Connection>) -> Option<Delivery> {
    let attachment = Arc::clone(&connection?.attachment);
    Some(Box::pin(async move { attachment.next().await }))
}

/// Waits for `delivery`, or forever without one.
async fn delivered(delivery: &mut Option<Delivery>) -> Delivered {
    match delivery {
        Some(delivery) => delivery.await,
        None => std::future::pending().await,
    }
}

async fn write_loop<W>(
    engine: &Engine,
    mut rx: Receiver<Owed>,
    mut sink: W,
    seen: &LastSeen,
    replays: &AtomicUsize,
) -> io::Result<()>
where
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    let heartbeat = engine.config().heartbeat;
    let mut connection: Option<Box<Connection>> = None;
    let mut delivery: Option<Delivery> = None;
    let mut ping_sent: Option<Instant> = None;
    // One timer, moved on when it fires or a PING is answered: resetting
    // it for every command would cost a timer-wheel update per line.
    let timer = tokio::time::sleep_until(seen.get() + heartbeat.interval);
    tokio::pin!(timer);
    loop {
        if ping_sent.is_some_and(|sent| seen.get() >= sent) {
            // Answered: the next PING is due an interval after the answer.
            ping_sent = None;
            timer.as_mut().reset(seen.get() + heartbeat.interval);
        }
        tokio::select! {
            biased;
            pending = rx.recv() => match pending {
                None => break,
                Some(pending) => {
                    let connected = connection.is_some();
                    answer(engine, pending, &mut connection, replays, &mut sink).await?;
                    if !connected {
                        delivery = next_delivery(connection.as_deref());
                    }
                }
            },
            Delivered { lines, from_disk } = delivered(&mut delivery) => {
                delivery = next_delivery(connection.as_deref());
                engine.metrics().delivered(count_lines(&lines), from_disk);
                sink.send(Outbound::Lines(lines)).await?;
            }
            () = &mut timer => {
                let (last, now) = (seen.get(), Instant::now());
                match ping_sent {
                    Some(sent) if last >= sent => ping_sent = None,
                    Some(sent) if now >= sent + heartbeat.timeout => {
                        engine.metrics().closed(Closed::Heartbeat);
                        info!(timeout = ?heartbeat.timeout, "no answer to PING; closing the connection");
                        break;
                    }
                    Some(_) => {}
                    None if last + heartbeat.interval <= now => {
                        sink.feed(Outbound::Ping).await?;
                        ping_sent = Some(now);
                    }
                    None => {}
                }
                timer.as_mut().reset(match ping_sent {
                    Some(sent) => sent + heartbeat.timeout,
                    None => seen.get() + heartbeat.interval,
                });
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
    connection: &mut Option<Box<Connection>>,
    replays: &AtomicUsize,
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
            connection: connected,
            reply,
        } => {
            *connection = Some(connected);
            reply
        }
        Pending::Outcome(outcome) => {
            let current = connection
                .as_deref()
                .expect("commands reach the engine only after CONN");
            let client = current.attachment.client().clone();
            match outcome {
                Outcome::Reply(reply) => reply,
                Outcome::Later(mut reply) => {
                    let reply = match (&mut reply).now_or_never() {
                        Some(reply) => reply,
                        None => {
                            // The replies before it go out before this one
                            // is waited for: a client that pipelines sends
                            // more as its answers come.
                            sink.flush().await?;
                            reply.await
                        }
                    };
                    if verb == "PUB" && !reply.is_fail() {
                        metrics.published(read_at.elapsed());
                    }
                    reply
                }
                Outcome::ReplayEvent(req) => {
                    let reply = engine.replay_event(&client, &current.grants, req).await;
                    if matches!(reply, Reply::Event(_)) {
                        current.pacer.take(1).await;
                        metrics.replayed(1);
                    }
                    replays.fetch_sub(1, Ordering::AcqRel);
                    reply
                }
                Outcome::Replay(req) => {
                    let started = Instant::now();
                    let stream = engine.replay(&client, req).await;
                    metrics.command(verb, outcome_label(&stream.header));
                    let sent = async {
                        sink.feed(Outbound::Reply(stream.header)).await?;
                        if let Some(records) = stream.records {
                            forward(engine, records, &current.pacer, sink).await?;
                            metrics.replay_finished(started.elapsed());
                        }
                        Ok(())
                    }
                    .await;
                    replays.fetch_sub(1, Ordering::AcqRel);
                    return sent;
                }
            }
        }
    };
    metrics.command(verb, outcome_label(&reply));
    sink.feed(Outbound::Reply(reply)).await
}

/// Writes streamed record chunks as they come, at the client's pace.
async fn forward<W>(
    engine: &Engine,
    mut records: RecordSource,
    pacer: &Pacer,
    sink: &mut W,
) -> io::Result<()>
where
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    while let Some(chunk) = records.next().await {
        match chunk {
            Ok(Records { lines, count }) => {
                engine.metrics().replayed(count);
                if pacer.is_paced() {
                    send_paced(lines, pacer, sink).await?;
                } else {
                    sink.send(Outbound::Lines(lines)).await?;
                }
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

/// Writes `lines` a pacer's step at a time, waiting for each.
async fn send_paced<W>(mut lines: Bytes, pacer: &Pacer, sink: &mut W) -> io::Result<()>
where
    W: Sink<Outbound, Error = io::Error> + Unpin,
{
    let step = pacer.step();
    while !lines.is_empty() {
        let (end, count) = memchr::memchr_iter(b'\n', &lines)
            .take(step)
            .enumerate()
            .last()
            .map_or((lines.len(), 1), |(i, at)| (at + 1, i + 1));
        let piece = lines.split_to(end);
        pacer.take(count as u64).await;
        sink.send(Outbound::Lines(piece)).await?;
    }
    Ok(())
}
