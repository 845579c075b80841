//! A blocking client for line protocols (ensync and the ceiling): send a
//! request, read the header line, count the record lines with memchr.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::common::Pacer;

/// Read buffer size.
const BUF: usize = 512 * 1024;
/// Read buffer size of a connection that reads a few short replies (it
/// grows if a reply is longer): one of the `crowd` workload's many idle
/// connections.
pub const SMALL_BUF: usize = 4096;

/// A TCP connection with a large, growable read buffer: what the line
/// client here and the RESP client read through.
pub struct Socket {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Socket {
    pub fn connect(port: u16) -> Result<Self> {
        Self::with_buffer(port, BUF)
    }

    /// A connection whose read buffer starts at `size` bytes.
    pub fn with_buffer(port: u16, size: usize) -> Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: vec![0; size.max(1)],
            start: 0,
            end: 0,
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads more bytes after what is buffered, compacting or growing the
    /// buffer first; fails on end of stream.
    pub fn fill(&mut self) -> Result<usize> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let read = self.stream.read(&mut self.buf[self.end..])?;
        if read == 0 {
            bail!("connection closed by the server");
        }
        self.end += read;
        Ok(read)
    }

    /// What is buffered and not consumed.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drops the first `n` buffered bytes.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
    }
}

/// One line-protocol connection.
pub struct LineConn {
    sock: Socket,
}

/// Lines and bytes received by a replay.
#[derive(Debug, Clone, Copy, Default)]
pub struct Received {
    pub lines: u64,
    pub bytes: u64,
}

impl LineConn {
    pub fn connect(port: u16) -> Result<Self> {
        Ok(Self {
            sock: Socket::connect(port)?,
        })
    }

    /// A connection whose read buffer starts at `size` bytes.
    pub fn with_buffer(port: u16, size: usize) -> Result<Self> {
        Ok(Self {
            sock: Socket::with_buffer(port, size)?,
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.sock.send(bytes)
    }

    /// Sends `request` and returns its one reply line, which must start
    /// with `expect`.
    pub fn command(&mut self, request: &str, expect: &str) -> Result<()> {
        self.send(request.as_bytes())?;
        let line = self.read_line()?;
        if !line.starts_with(expect.as_bytes()) {
            bail!(
                "{}: expected {expect}, got {}",
                request.trim_end(),
                String::from_utf8_lossy(line)
            );
        }
        Ok(())
    }

    /// The next complete line already in the buffer (without `\n`).
    pub fn buffered_line(&mut self) -> Option<&[u8]> {
        let at = memchr::memchr(b'\n', self.sock.data())?;
        let line = self.sock.start..self.sock.start + at;
        self.sock.consume(at + 1);
        Some(&self.sock.buf[line])
    }

    /// Reads until at least one complete line is buffered.
    pub fn wait_line(&mut self) -> Result<()> {
        while memchr::memchr(b'\n', self.sock.data()).is_none() {
            self.sock.fill()?;
        }
        Ok(())
    }

    /// The next line (without `\n`), reading as needed.
    pub fn read_line(&mut self) -> Result<&[u8]> {
        self.wait_line()?;
        Ok(self.buffered_line().expect("a line is buffered"))
    }

    /// Reads a replay header (`...;COUNT=c`) and returns `c`.
    pub fn read_header(&mut self) -> Result<u64> {
        let line = self.read_line()?;
        let text = std::str::from_utf8(line)?;
        text.strip_prefix("+PASS:REPLAY_STARTED")
            .and_then(|rest| rest.rsplit_once("COUNT="))
            .and_then(|(_, c)| c.trim().parse().ok())
            .with_context(|| format!("bad replay header: {text}"))
    }

    /// Skips `count` lines without parsing them; with a pacer, stops early
    /// when it says so.
    pub fn skip_lines(&mut self, count: u64, mut pacer: Option<&mut Pacer>) -> Result<Received> {
        let mut got = Received::default();
        if count == 0 {
            return Ok(got);
        }
        loop {
            let data = self.sock.data();
            for at in memchr::memchr_iter(b'\n', data) {
                got.lines += 1;
                if got.lines == count {
                    got.bytes += at as u64 + 1;
                    self.sock.consume(at + 1);
                    return Ok(got);
                }
            }
            got.bytes += data.len() as u64;
            self.sock.consume(data.len());
            let read = self.sock.fill()?;
            if let Some(p) = pacer.as_deref_mut() {
                if !p.read(read) {
                    return Ok(got);
                }
            }
        }
    }

    /// Sends a replay request and reads it all: header, then its records.
    pub fn replay(&mut self, request: &[u8], pacer: Option<&mut Pacer>) -> Result<Received> {
        self.send(request)?;
        let count = self.read_header()?;
        self.skip_lines(count, pacer)
    }

    /// Time from sending `request` to having its first record line; the
    /// rest of the reply is read too. Fails if the replay is empty.
    pub fn first_record(&mut self, request: &[u8]) -> Result<Duration> {
        let start = Instant::now();
        self.send(request)?;
        let count = self.read_header()?;
        if count == 0 {
            bail!("seek replay returned no record");
        }
        self.skip_lines(1, None)?;
        let took = start.elapsed();
        self.skip_lines(count - 1, None)?;
        Ok(took)
    }
}
