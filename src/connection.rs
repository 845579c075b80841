//! The TCP transport: a socket framed by the EnSync line codec, served by
//! the shared session.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use ensync_protocol::EnsyncCodec;
use tokio::net::TcpStream;
use tokio_util::codec::{Encoder, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::engine::Engine;
use crate::metrics::Transport;
use crate::session::{self, Outbound};

/// Writes session output as LF-terminated lines.
#[derive(Debug, Default)]
struct LineEncoder;

impl Encoder<Outbound> for LineEncoder {
    type Error = io::Error;

    fn encode(&mut self, item: Outbound, dst: &mut BytesMut) -> io::Result<()> {
        match item {
            Outbound::Reply(reply) => {
                reply.encode(dst);
                dst.put_u8(b'\n');
            }
            Outbound::Lines(lines) => dst.extend_from_slice(&lines),
            Outbound::Ping => dst.extend_from_slice(b"PING\n"),
        }
        Ok(())
    }
}

/// Serves one TCP connection until it closes or `cancel` fires.
pub async fn serve(
    engine: Arc<Engine>,
    stream: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let _open = engine.metrics().connection(Transport::Tcp);
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let (read, write) = stream.into_split();
    let frames = FramedRead::new(read, EnsyncCodec::new(engine.config().max_line_len));
    let sink = FramedWrite::new(write, LineEncoder);
    match session::serve(engine, frames, sink, cancel).await {
        Ok(()) => debug!("connection closed"),
        Err(e) => debug!(error = %e, "connection ended by an I/O error"),
    }
}
