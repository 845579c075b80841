//! The "raw loopback" ceiling: an in-process server (pinned to the server
//! CPU) answering `R <start> <count>\n` with a header and a slice of
//! pre-encoded ensync replay lines, in one write from memory.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::common::{self, payload, Cfg, Seeker, LIMIT_COUNT};
use crate::lineconn::{LineConn, Received};
use crate::procs::{self, SERVER_CPU};
use crate::report::{self, Results, Seek};

/// `n` records encoded like ensync's replay lines, back to back.
struct Records {
    buf: Vec<u8>,
    /// Start of each line, plus the end of the last.
    offsets: Vec<usize>,
}

impl Records {
    fn new(n: usize, size: usize) -> Self {
        let mut buf = Vec::with_capacity(n * (size + 260));
        let mut offsets = Vec::with_capacity(n + 1);
        let logged = 1_795_319_485_842u64;
        for i in 0..n {
            offsets.push(buf.len());
            let _ = writeln!(
                buf,
                "+RECORD:{{\"idem\":\"evt_591d48dc{:016x}\",\"block\":\"{i}\",\"name\":\"bench/e0\",\
                 \"loggedAt\":{},\"sender\":\"bench\",\"payload\":{},\"metadata\":{{\"REPLAYED\":true,\
                 \"$internal\":{{\"replay_info\":{{\"isReplayed\":true,\"replayTimestamp\":1795319491332,\
                 \"wasAcknowledged\":false}}}}}}}}",
                i + 1,
                logged + i as u64 / 100,
                payload(i, size),
            );
        }
        offsets.push(buf.len());
        Self { buf, offsets }
    }

    /// Answers requests on one connection until it closes: each answer,
    /// header and records, in one vectored write, as ensync-server sends
    /// it, so that the client is woken once.
    fn serve(&self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let (mut line, mut header) = (String::new(), Vec::new());
        let n = self.offsets.len() - 1;
        while reader.read_line(&mut line)? > 0 {
            let mut parts = line
                .trim_end()
                .split(' ')
                .skip(1)
                .map(|p| p.parse::<usize>().unwrap_or(0));
            let start = parts.next().unwrap_or(0).min(n);
            let count = parts.next().unwrap_or(0).min(n - start);
            header.clear();
            writeln!(
                header,
                "+PASS:REPLAY_STARTED;EVENT_NAME=bench/e0;COUNT={count}"
            )?;
            let records = &self.buf[self.offsets[start]..self.offsets[start + count]];
            write_all_vectored(
                &mut writer,
                &mut [IoSlice::new(&header), IoSlice::new(records)],
            )?;
            line.clear();
        }
        Ok(())
    }
}

/// Writes all of `slices`, in as few system calls as the socket takes.
fn write_all_vectored(out: &mut impl Write, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match out.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut slices, written),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The ceiling server, started on a free port; its threads live as long
/// as the process (the listener thread is detached).
///
/// It is started before ensync-server's run, so that ensync's replays,
/// seeks and LIMIT replays can be measured in turns with the ceiling's
/// ([`crate::common::in_turns`]); what was measured so is kept in
/// `measured`.
pub struct Ceiling {
    port: u16,
    /// Records it serves.
    n: usize,
    pub measured: Results,
}

impl Ceiling {
    pub fn start(cfg: &Cfg) -> Result<Self> {
        let records = Arc::new(Records::new(cfg.n, cfg.payload));
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        std::thread::spawn(move || {
            if procs::pin_current_thread(SERVER_CPU).is_err() {
                eprintln!("ceiling: cannot pin to CPU {SERVER_CPU}");
            }
            for stream in listener.incoming().flatten() {
                let records = records.clone();
                // Connection threads inherit the server CPU.
                std::thread::spawn(move || records.serve(stream));
            }
        });
        Ok(Self {
            port,
            n: cfg.n,
            measured: Results::default(),
        })
    }

    pub fn connect(&self) -> Result<LineConn> {
        LineConn::connect(self.port)
    }

    /// A replay of the first `count` records, timed.
    pub fn replay(&self, conn: &mut LineConn, count: usize) -> Result<(Received, Duration)> {
        let req = format!("R 0 {count}\n");
        let start = Instant::now();
        let got = conn.replay(req.as_bytes(), None)?;
        Ok((got, start.elapsed()))
    }

    /// A connection that times seeks: a record from a random place.
    pub fn seeker(&self) -> Result<impl Seeker> {
        Ok(Seeks {
            conn: self.connect()?,
            n: self.n,
        })
    }

    /// LIMIT-50 replays per second from `clients` connections.
    pub fn limit(&self, clients: usize, d: Duration) -> Result<f64> {
        let n = self.n;
        let op = |conn: &mut LineConn, rng: &mut fastrand::Rng| {
            let req = format!("R {} {LIMIT_COUNT}\n", rng.usize(0..n));
            conn.replay(req.as_bytes(), None).map(drop)
        };
        common::rate(clients, d, |_| self.connect(), op)
    }
}

/// Seeks of the ceiling: finding a line is O(1) here whatever the log
/// size, so one set of samples over its records stands for both sizes.
struct Seeks {
    conn: LineConn,
    n: usize,
}

impl Seeker for Seeks {
    fn seek(&mut self, rng: &mut fastrand::Rng) -> Result<f64> {
        let req = format!("R {} 1\n", rng.usize(0..self.n));
        Ok(self.conn.first_record(req.as_bytes())?.as_secs_f64() * 1e6)
    }
}

/// Replay, mixed, seek and LIMIT against the ceiling: those not already
/// measured in turns with ensync-server.
pub fn run(cfg: &Cfg, ceiling: Ceiling) -> Result<Results> {
    let n = cfg.n;
    let mut res = ceiling.measured.clone();
    let mut conn = ceiling.connect()?;
    if cfg.runs("replay") && res.replay.is_none() {
        res.replay = Some(report::replay_rounds(cfg, n as u64, || {
            ceiling.replay(&mut conn, n)
        })?);
    }
    if cfg.runs("mixed") {
        let m = n.div_ceil(10);
        res.mixed = Some(report::replay_rounds(cfg, m as u64, || {
            ceiling.replay(&mut conn, m)
        })?);
    }
    if cfg.runs("seek") && res.seek.is_none() {
        let mut rng = fastrand::Rng::new();
        let mut seeks = ceiling.seeker()?;
        let us = (0..cfg.seek_samples)
            .map(|_| seeks.seek(&mut rng))
            .collect::<Result<Vec<_>>>()?;
        res.seek = Some(Seek::new(cfg.seek_small, cfg.seek_n, &us, &us));
    }
    if cfg.runs("limit") && res.limit_1.is_none() {
        let d = cfg.limit_duration();
        res.limit_1 = Some(report::rounds(cfg, |_| ceiling.limit(1, d))?);
        res.limit_8 = Some(report::rounds(cfg, |_| ceiling.limit(8, d))?);
    }
    Ok(res)
}
