//! The WebSocket transport: the same session as TCP, one command per text
//! frame in, one line per text frame out.
//!
//! Incoming frames are fed through the protocol's line codec with an LF
//! after each, so framing rules (line length, UTF-8, CR, empty lines) are
//! exactly those of TCP. A frame holding several LF-separated lines counts
//! as several commands, as it would over TCP.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::{BufMut, Bytes, BytesMut};
use ensync_protocol::{EnsyncCodec, Frame};
use futures_util::{stream, Sink, SinkExt, Stream, StreamExt};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use crate::engine::Engine;
use crate::limits::StallTimer;
use crate::metrics::Transport;
use crate::session::{self, Outbound};

/// Serves one upgraded WebSocket until it closes or `cancel` fires.
pub async fn serve(engine: Arc<Engine>, socket: WebSocket, cancel: CancellationToken) {
    let _open = engine.metrics().connection(Transport::WebSocket);
    let (sink, incoming) = socket.split();
    let close = CloseSlot::default();
    let line_limit = session::line_limit_before_conn(&engine);
    let frames = frames(
        incoming,
        EnsyncCodec::with_limit(line_limit.clone()),
        Arc::clone(&close),
    );
    let sink = Closing {
        inner: sink,
        close,
        stall: StallTimer::new(engine.config().limits.send_timeout),
    }
    .with_flat_map(|out: Outbound| stream::iter(messages(out).into_iter().map(Ok)));
    match session::serve(
        Arc::clone(&engine),
        frames,
        Box::pin(sink),
        line_limit,
        cancel,
    )
    .await
    {
        Ok(()) => debug!("websocket closed"),
        Err(e) => debug!(error = %e, "websocket ended by an error"),
    }
}

/// The close frame to end the socket with, when the reading side chose
/// one (a frame was too large).
type CloseSlot = Arc<Mutex<Option<CloseFrame>>>;

/// The lines carried by the client's frames. A frame over the size limit
/// ends them, and leaves close code 1009 in `close`.
fn frames(
    incoming: impl Stream<Item = Result<Message, axum::Error>> + Send + Unpin + 'static,
    codec: EnsyncCodec,
    close: CloseSlot,
) -> impl Stream<Item = io::Result<Frame>> + Send + Unpin {
    let state = (incoming, codec, BytesMut::new());
    Box::pin(stream::unfold(
        state,
        move |(mut incoming, mut codec, mut buf)| {
            let close = Arc::clone(&close);
            async move {
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(frame)) => return Some((Ok(frame), (incoming, codec, buf))),
                        Ok(None) => {}
                        Err(e) => return Some((Err(e), (incoming, codec, buf))),
                    }
                    let data = match incoming.next().await? {
                        Ok(Message::Text(text)) => Bytes::from(text),
                        Ok(Message::Binary(data)) => data,
                        Ok(Message::Close(_)) => return None,
                        // Pings are answered by the WebSocket layer itself.
                        Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                        Err(e) => {
                            let e = e.into_inner();
                            if let Some(tungstenite::Error::Capacity(too_large)) = e.downcast_ref()
                            {
                                *close.lock().expect("close slot lock is never poisoned") =
                                    Some(CloseFrame {
                                        code: close_code::SIZE,
                                        reason: Utf8Bytes::from(too_large.to_string()),
                                    });
                            }
                            return Some((Err(io::Error::other(e)), (incoming, codec, buf)));
                        }
                    };
                    buf.reserve(data.len() + 1);
                    buf.put_slice(&data);
                    buf.put_u8(b'\n');
                }
            }
        },
    ))
}

/// The socket's sending half, which sends the close frame in `close`, if
/// any, when it is closed, and gives up on a client that reads nothing for
/// `send_timeout`.
struct Closing<S> {
    inner: S,
    close: CloseSlot,
    stall: StallTimer,
}

impl<S> Closing<S> {
    /// Passes on what the socket answered, and times how long it has
    /// been waiting on the client.
    fn progress<E>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<Result<(), E>>,
    ) -> Poll<io::Result<()>>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Poll::Ready(done) = poll {
            self.stall.progressed();
            return Poll::Ready(done.map_err(io::Error::other));
        }
        self.stall.poll_waiting(cx)
    }
}

impl<S> Sink<Message> for Closing<S>
where
    S: Sink<Message> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_ready(cx);
        self.progress(cx, poll)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> io::Result<()> {
        Pin::new(&mut self.inner)
            .start_send(item)
            .map_err(io::Error::other)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(cx, poll)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut slot = this
            .close
            .lock()
            .expect("close slot lock is never poisoned");
        if slot.is_some() {
            ready!(Pin::new(&mut this.inner).poll_ready(cx)).map_err(io::Error::other)?;
            if let Some(frame) = slot.take() {
                Pin::new(&mut this.inner)
                    .start_send(Message::Close(Some(frame)))
                    .map_err(io::Error::other)?;
            }
        }
        drop(slot);
        Pin::new(&mut this.inner)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}

/// The text frames for one piece of session output: one per line, without
/// the LF.
fn messages(out: Outbound) -> Vec<Message> {
    match out {
        Outbound::Reply(reply) => {
            let mut line = BytesMut::new();
            reply.encode(&mut line);
            text(line.freeze()).into_iter().collect()
        }
        Outbound::Lines(lines) => lines
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .filter_map(|line| text(lines.slice_ref(line)))
            .collect(),
        Outbound::Ping => vec![Message::Text(Utf8Bytes::from_static("PING"))],
    }
}

fn text(line: Bytes) -> Option<Message> {
    match Utf8Bytes::try_from(line) {
        Ok(text) => Some(Message::Text(text)),
        Err(e) => {
            // Records and replies are built from UTF-8 text; this would be a
            // damaged store.
            error!(error = %e, "an outgoing line is not UTF-8; it was not sent");
            None
        }
    }
}
