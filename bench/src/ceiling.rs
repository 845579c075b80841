//! The "raw loopback" ceiling: an in-process server (pinned to the server
//! CPU) answering `R <start> <count>\n` with a header and a slice of
//! pre-encoded ensync replay lines, in one write from memory.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::common::{self, payload, Cfg, LIMIT_COUNT};
use crate::lineconn::LineConn;
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

    /// Answers requests on one connection until it closes.
    fn serve(&self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        let mut writer = stream.try_clone()?;
        let mut lines = BufReader::new(stream).lines();
        let n = self.offsets.len() - 1;
        while let Some(line) = lines.next().transpose()? {
            let mut parts = line
                .split(' ')
                .skip(1)
                .map(|p| p.parse::<usize>().unwrap_or(0));
            let start = parts.next().unwrap_or(0).min(n);
            let count = parts.next().unwrap_or(0).min(n - start);
            let header = format!("+PASS:REPLAY_STARTED;EVENT_NAME=bench/e0;COUNT={count}\n");
            writer.write_all(header.as_bytes())?;
            writer.write_all(&self.buf[self.offsets[start]..self.offsets[start + count]])?;
        }
        Ok(())
    }
}

/// Starts the ceiling server on a free port; its threads live as long as
/// the process (the listener thread is detached).
fn start(n: usize, size: usize) -> Result<u16> {
    let records = Arc::new(Records::new(n, size));
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
    Ok(port)
}

/// Replay, mixed, seek and LIMIT against the ceiling.
pub fn run(cfg: &Cfg) -> Result<Results> {
    let n = cfg.n;
    let port = start(n, cfg.payload)?;
    let mut res = Results::default();
    let mut conn = LineConn::connect(port)?;
    let mut timed_replay = |count: usize| {
        let req = format!("R 0 {count}\n");
        let start = Instant::now();
        let got = conn.replay(req.as_bytes(), None)?;
        Ok((got, start.elapsed()))
    };
    if cfg.runs("replay") {
        res.replay = Some(report::replay_rounds(cfg, n as u64, || timed_replay(n))?);
    }
    if cfg.runs("mixed") {
        let m = n.div_ceil(10);
        res.mixed = Some(report::replay_rounds(cfg, m as u64, || timed_replay(m))?);
    }
    if cfg.runs("seek") {
        // Finding a line is O(1) here whatever the log size, so one set of
        // samples over the `n` records stands for both sizes.
        let mut rng = fastrand::Rng::new();
        let us = (0..cfg.seek_samples)
            .map(|_| {
                let req = format!("R {} 1\n", rng.usize(0..n));
                Ok(conn.first_record(req.as_bytes())?.as_secs_f64() * 1e6)
            })
            .collect::<Result<Vec<_>>>()?;
        res.seek = Some(Seek::new(cfg.seek_small, cfg.seek_n, &us, &us));
    }
    if cfg.runs("limit") {
        let op = |conn: &mut LineConn, rng: &mut fastrand::Rng| {
            let req = format!("R {} {LIMIT_COUNT}\n", rng.usize(0..n));
            conn.replay(req.as_bytes(), None).map(drop)
        };
        let connect = |_| LineConn::connect(port);
        let d: Duration = cfg.limit_duration();
        res.limit_1 = Some(report::rounds(cfg, |_| common::rate(1, d, connect, op))?);
        res.limit_8 = Some(report::rounds(cfg, |_| common::rate(8, d, connect, op))?);
    }
    Ok(res)
}
