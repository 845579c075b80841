//! Line framing for TCP: LF-terminated lines in, reply and record lines out.
//!
//! The decoder never returns an error for what a client sends: an over-long
//! line or invalid UTF-8 comes out as a [`Frame`] the session answers with
//! `-FAIL`, because tokio-util's framed stream stops for good after a
//! decoder error. Only I/O errors end a connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::reply::Reply;

/// Default longest line a client may send: 1 MiB, room for large JSON
/// payloads while bounding what one connection can make the server buffer.
pub const DEFAULT_MAX_LINE_LEN: usize = 1024 * 1024;

/// One framed input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A non-empty line, line ending removed.
    Line(String),
    /// A line longer than the maximum; the rest of it up to the next LF is
    /// dropped.
    TooLong {
        /// The maximum it exceeded.
        max: usize,
    },
    /// A line that is not valid UTF-8.
    InvalidEncoding,
}

/// The longest line a codec accepts, shared with whoever may change it
/// while the codec runs (a session raises it once its client is known).
#[derive(Debug, Clone)]
pub struct LineLimit(Arc<AtomicUsize>);

impl LineLimit {
    /// A limit of `max_line_len` bytes, line ending excluded.
    pub fn new(max_line_len: usize) -> Self {
        Self(Arc::new(AtomicUsize::new(max_line_len)))
    }

    /// The limit now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Changes the limit for the lines not yet framed.
    pub fn set(&self, max_line_len: usize) {
        self.0.store(max_line_len, Ordering::Relaxed);
    }
}

/// The EnSync line codec.
#[derive(Debug, Clone)]
pub struct EnsyncCodec {
    limit: LineLimit,
    /// Where to resume the search for LF in the buffer.
    next_index: usize,
    /// Inside an over-long line, dropping bytes up to its LF.
    discarding: bool,
}

impl EnsyncCodec {
    /// A codec that accepts lines of up to `max_line_len` bytes (line ending
    /// excluded).
    pub fn new(max_line_len: usize) -> Self {
        Self::with_limit(LineLimit::new(max_line_len))
    }

    /// A codec held to `limit`, which may change while it runs.
    pub fn with_limit(limit: LineLimit) -> Self {
        Self {
            limit,
            next_index: 0,
            discarding: false,
        }
    }

    fn frame(&self, mut line: &[u8]) -> Option<Frame> {
        let max_line_len = self.limit.get();
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        if line.is_empty() {
            return None;
        }
        if line.len() > max_line_len {
            return Some(Frame::TooLong { max: max_line_len });
        }
        Some(match std::str::from_utf8(line) {
            Ok(text) => Frame::Line(text.to_owned()),
            Err(_) => Frame::InvalidEncoding,
        })
    }
}

impl Default for EnsyncCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE_LEN)
    }
}

impl Decoder for EnsyncCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        loop {
            let newline =
                memchr::memchr(b'\n', &buf[self.next_index..]).map(|i| self.next_index + i);
            match (newline, self.discarding) {
                (Some(end), true) => {
                    buf.advance(end + 1);
                    self.discarding = false;
                    self.next_index = 0;
                }
                (None, true) => {
                    buf.clear();
                    self.next_index = 0;
                    return Ok(None);
                }
                (Some(end), false) => {
                    let line = buf.split_to(end + 1);
                    self.next_index = 0;
                    if let Some(frame) = self.frame(&line[..end]) {
                        return Ok(Some(frame));
                    }
                }
                (None, false) => {
                    let max_line_len = self.limit.get();
                    // One byte of slack for the CR of a CRLF.
                    if buf.len() > max_line_len.saturating_add(1) {
                        buf.clear();
                        self.next_index = 0;
                        self.discarding = true;
                        return Ok(Some(Frame::TooLong { max: max_line_len }));
                    }
                    self.next_index = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        // A last line without LF still counts as a line.
        let rest = buf.split();
        self.next_index = 0;
        if self.discarding {
            self.discarding = false;
            return Ok(None);
        }
        Ok(self.frame(&rest))
    }
}

impl Encoder<Reply> for EnsyncCodec {
    type Error = std::io::Error;

    fn encode(&mut self, reply: Reply, dst: &mut BytesMut) -> Result<(), Self::Error> {
        reply.encode(dst);
        dst.put_u8(b'\n');
        Ok(())
    }
}

impl Encoder<Bytes> for EnsyncCodec {
    type Error = std::io::Error;

    /// Writes pre-encoded lines, each already ending in LF.
    fn encode(&mut self, lines: Bytes, dst: &mut BytesMut) -> Result<(), Self::Error> {
        dst.extend_from_slice(&lines);
        Ok(())
    }
}

#[cfg(test)]
mod decode_lines {
    use super::*;

    fn frames(codec: &mut EnsyncCodec, input: &[u8]) -> Vec<Frame> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(frame) = codec.decode(&mut buf).expect("decoder never fails") {
            out.push(frame);
        }
        out
    }

    #[test]
    fn drops_cr_and_empty_lines() {
        let mut codec = EnsyncCodec::default();
        assert_eq!(
            frames(&mut codec, b"PING\r\n\r\n\nPONG\n"),
            vec![Frame::Line("PING".into()), Frame::Line("PONG".into())]
        );
    }

    #[test]
    fn too_long_line_is_answered_once_and_the_next_line_survives() {
        let mut codec = EnsyncCodec::new(8);
        let mut buf = BytesMut::from(&b"0123456789abcdef"[..]);
        assert_eq!(
            codec.decode(&mut buf).ok(),
            Some(Some(Frame::TooLong { max: 8 }))
        );
        buf.extend_from_slice(b"still the long line\nPING\n");
        assert_eq!(
            codec.decode(&mut buf).ok(),
            Some(Some(Frame::Line("PING".into())))
        );
    }

    #[test]
    fn invalid_utf8_is_a_frame_not_an_error() {
        let mut codec = EnsyncCodec::default();
        assert_eq!(
            frames(&mut codec, b"\xff\xfe\nPING\n"),
            vec![Frame::InvalidEncoding, Frame::Line("PING".into())]
        );
    }

    #[test]
    fn line_split_across_reads_is_joined() {
        let mut codec = EnsyncCodec::default();
        let mut buf = BytesMut::from(&b"PI"[..]);
        assert_eq!(codec.decode(&mut buf).ok(), Some(None));
        buf.extend_from_slice(b"NG\n");
        assert_eq!(
            codec.decode(&mut buf).ok(),
            Some(Some(Frame::Line("PING".into())))
        );
    }
}
