//! The TCP transport: a socket framed by the EnSync line codec, served by
//! the shared session.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ensync_protocol::EnsyncCodec;
use futures_util::Sink;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::engine::Engine;
use crate::limits::StallTimer;
use crate::metrics::{Closed, Transport};
use crate::session::{self, Outbound};

/// Record chunks at least this long are written from their own memory
/// instead of being copied into the write buffer.
const DIRECT_BYTES: usize = 4 * 1024;
/// Buffers handed to one vectored write.
const MAX_SLICES: usize = 64;

/// Writes session output to the socket as LF-terminated lines.
///
/// Replies are encoded into a buffer; a replay's record chunks are queued
/// as they are and written with vectored writes, so their bytes are copied
/// once, into the kernel. With `high_water` bytes waiting the session is
/// made to wait; a client that then reads nothing for `send_timeout` is
/// disconnected.
struct LineSink<W> {
    io: W,
    high_water: usize,
    stall: StallTimer,
    /// Encoded lines not yet queued.
    buf: BytesMut,
    /// What waits to be written, in order.
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`.
    queued: usize,
}

impl<W: AsyncWrite + Unpin> LineSink<W> {
    fn new(io: W, high_water: usize, send_timeout: Duration) -> Self {
        Self {
            io,
            high_water,
            stall: StallTimer::new(send_timeout),
            buf: BytesMut::with_capacity(8 * 1024),
            queue: VecDeque::new(),
            queued: 0,
        }
    }

    fn enqueue(&mut self, bytes: Bytes) {
        self.queued += bytes.len();
        self.queue.push_back(bytes);
    }

    /// Queues the encoded lines, keeping them ahead of what comes next.
    fn enqueue_buffered(&mut self) {
        if !self.buf.is_empty() {
            let lines = self.buf.split().freeze();
            self.enqueue(lines);
        }
    }

    /// Writes everything queued and buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.enqueue_buffered();
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut used = 0;
            for (slot, bytes) in slices.iter_mut().zip(&self.queue) {
                *slot = IoSlice::new(bytes);
                used += 1;
            }
            let written = match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..used]) {
                Poll::Ready(written) => written?,
                Poll::Pending => return self.stall.poll_waiting(cx),
            };
            self.stall.progressed();
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume(written);
        }
        Poll::Ready(Ok(()))
    }

    /// Drops the first `written` queued bytes.
    fn consume(&mut self, mut written: usize) {
        self.queued -= written;
        while let Some(front) = self.queue.front_mut() {
            if written < front.len() {
                front.advance(written);
                return;
            }
            written -= front.len();
            self.queue.pop_front();
        }
    }
}

impl<W: AsyncWrite + Unpin> Sink<Outbound> for LineSink<W> {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.queued + this.buf.len() >= this.high_water {
            ready!(this.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: Outbound) -> io::Result<()> {
        let this = self.get_mut();
        match item {
            Outbound::Reply(reply) => {
                reply.encode(&mut this.buf);
                this.buf.put_u8(b'\n');
            }
            Outbound::Lines(lines) if lines.len() >= DIRECT_BYTES => {
                this.enqueue_buffered();
                this.enqueue(lines);
            }
            Outbound::Lines(lines) => this.buf.extend_from_slice(&lines),
            Outbound::Ping => this.buf.extend_from_slice(b"PING\n"),
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        // TLS takes writes into its own buffer and waits on the socket
        // here, so the send timeout covers this wait too.
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(done) => {
                this.stall.progressed();
                Poll::Ready(done)
            }
            Poll::Pending => this.stall.poll_waiting(cx),
        }
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Ready(done) => Poll::Ready(done),
            Poll::Pending => this.stall.poll_waiting(cx),
        }
    }
}

/// Serves one TCP connection, over TLS when `tls` is set, until it closes
/// or `cancel` fires.
pub async fn serve(
    engine: Arc<Engine>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cancel: CancellationToken,
) {
    let _open = engine.metrics().connection(Transport::Tcp);
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let Some(acceptor) = tls else {
        let (read, write) = stream.into_split();
        return serve_halves(engine, read, write, cancel).await;
    };
    // IMPORTANT: the handshake runs here, on the connection's own task,
    // never in the accept loop: a client slow to finish it must not hold
    // up anyone else's connection.
    let handshake = tokio::select! {
        () = cancel.cancelled() => return,
        handshake = crate::tls::handshake(&acceptor, stream) => handshake,
    };
    match handshake {
        Ok(stream) => {
            let (read, write) = tokio::io::split(stream);
            serve_halves(engine, read, write, cancel).await;
        }
        Err(e) => {
            engine.metrics().closed(Closed::TlsHandshake);
            debug!(%peer, error = %e, "TLS handshake failed; connection closed");
        }
    }
}

/// Runs the session over a connection's two halves, plain or TLS alike.
async fn serve_halves<R, W>(engine: Arc<Engine>, read: R, write: W, cancel: CancellationToken)
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let line_limit = session::line_limit_before_conn(&engine);
    let frames = FramedRead::new(read, EnsyncCodec::with_limit(line_limit.clone()));
    let limits = engine.config().limits;
    let high_water = usize::try_from(limits.max_outbound_bytes).unwrap_or(usize::MAX);
    let sink = LineSink::new(write, high_water, limits.send_timeout);
    match session::serve(Arc::clone(&engine), frames, sink, line_limit, cancel).await {
        Ok(()) => debug!("connection closed"),
        Err(e) => debug!(error = %e, "connection ended by an I/O error"),
    }
}
