//! Redis Streams (XADD / XRANGE) with a lean zero-copy RESP reader: array
//! headers are parsed, bulk strings skipped by their length.

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::common::{self, payload, pick, Cfg, Pacer, Sampler, LIMIT_COUNT, POOL, WINDOW};
use crate::lineconn::{Received, Socket, SMALL_BUF};
use crate::procs::{self, RssSampler, Server};
use crate::report::{self, Memory, Results, Seek};

/// XRANGE page size of a full replay.
const PAGE: usize = 1000;
/// The stream the `publish` workload publishes to.
pub const PUB: &str = "bench:pub";
/// The stream the `crowd` workload publishes to: one of its own.
pub const CROWDED: &str = "bench:crowded";

/// The end of the `\r\n`-terminated line starting at `at`, and the start
/// of the next; `None` if incomplete.
fn line(buf: &[u8], at: usize) -> Option<(usize, usize)> {
    let rel = memchr::memchr(b'\n', buf.get(at..)?)?;
    Some(((at + rel).saturating_sub(1).max(at), at + rel + 1))
}

/// The integer of a `<type><int>\r\n` header at `at`, and where its body
/// starts; an error reply fails.
fn header(buf: &[u8], at: usize, kind: u8) -> Result<Option<(i64, usize)>> {
    let Some((end, next)) = line(buf, at) else {
        return Ok(None);
    };
    let text = &buf[at..end];
    if text.first() == Some(&b'-') {
        bail!("redis: {}", String::from_utf8_lossy(text));
    }
    if text.first() != Some(&kind) {
        bail!(
            "redis: expected {}, got {}",
            kind as char,
            String::from_utf8_lossy(text)
        );
    }
    let n = std::str::from_utf8(&text[1..])?.parse()?;
    Ok(Some((n, next)))
}

/// A bulk string at `at`: its bytes and where the next value starts.
fn bulk(buf: &[u8], at: usize) -> Result<Option<(Range<usize>, usize)>> {
    let Some((len, body)) = header(buf, at, b'$')? else {
        return Ok(None);
    };
    let end = body + len.max(0) as usize;
    Ok((buf.len() >= end + 2).then_some((body..end, end + 2)))
}

/// Skips one value of any type at `at`; where the next starts.
pub fn skip(buf: &[u8], at: usize) -> Result<Option<usize>> {
    let Some(kind) = buf.get(at) else {
        return Ok(None);
    };
    match kind {
        b'$' => Ok(bulk(buf, at)?.map(|(_, next)| next)),
        b'*' => {
            let Some((count, mut next)) = header(buf, at, b'*')? else {
                return Ok(None);
            };
            for _ in 0..count.max(0) {
                match skip(buf, next)? {
                    Some(n) => next = n,
                    None => return Ok(None),
                }
            }
            Ok(Some(next))
        }
        b'-' => header(buf, at, b'+').map(|_| None),
        _ => Ok(line(buf, at).map(|(_, next)| next)),
    }
}

/// A parsed XRANGE reply.
#[derive(Debug, PartialEq)]
pub struct XRange {
    /// Bytes the reply took.
    pub len: usize,
    pub entries: usize,
    /// The last entry's id, as a range of the buffer.
    pub last_id: Option<Range<usize>>,
}

/// Parses a whole XRANGE reply (array of [id, fields]) at the start of
/// `buf`; `None` if incomplete.
pub fn xrange(buf: &[u8]) -> Result<Option<XRange>> {
    let Some((count, mut at)) = header(buf, 0, b'*')? else {
        return Ok(None);
    };
    let mut last_id = None;
    for _ in 0..count.max(0) {
        let Some((2, body)) = header(buf, at, b'*')? else {
            return Ok(None);
        };
        let Some((id, fields)) = bulk(buf, body)? else {
            return Ok(None);
        };
        let Some(next) = skip(buf, fields)? else {
            return Ok(None);
        };
        last_id = Some(id);
        at = next;
    }
    Ok(Some(XRange {
        len: at,
        entries: count.max(0) as usize,
        last_id,
    }))
}

/// One RESP connection.
struct Conn(Socket);

impl Conn {
    fn connect(port: u16) -> Result<Self> {
        Socket::connect(port).map(Self)
    }

    /// A connection that reads little (see [`SMALL_BUF`]).
    fn small(port: u16) -> Result<Self> {
        Socket::with_buffer(port, SMALL_BUF).map(Self)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.0.send(bytes)
    }

    /// Sends a command whose reply is an integer (`:<n>`) and returns it.
    fn integer(&mut self, args: &[&str]) -> Result<i64> {
        self.send(&command(args))?;
        loop {
            if let Some((n, next)) = header(self.0.data(), 0, b':')? {
                self.0.consume(next);
                return Ok(n);
            }
            self.0.fill()?;
        }
    }

    /// The text of `INFO section`.
    fn info(&mut self, section: &str) -> Result<String> {
        self.send(&command(&["INFO", section]))?;
        loop {
            if let Some((text, next)) = bulk(self.0.data(), 0)? {
                let info = String::from_utf8_lossy(&self.0.data()[text]).into_owned();
                self.0.consume(next);
                return Ok(info);
            }
            self.0.fill()?;
        }
    }

    /// Reads a whole XRANGE reply; returns it with its last id copied out.
    fn read_xrange(&mut self, mut pacer: Option<&mut Pacer>) -> Result<(XRange, Option<String>)> {
        loop {
            if let Some(x) = xrange(self.0.data())? {
                let id = x
                    .last_id
                    .clone()
                    .map(|r| String::from_utf8_lossy(&self.0.data()[r]).into_owned());
                self.0.consume(x.len);
                return Ok((x, id));
            }
            let read = self.0.fill()?;
            if let Some(p) = pacer.as_deref_mut() {
                p.read(read);
            }
        }
    }
}

/// A RESP command from its arguments.
fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

/// A redis-server (AOF, fsync every second) in a temp dir. It is started
/// before ensync-server's run when both run, so that their publishing can
/// be measured in turns ([`common::in_turns`]); what was measured so is
/// kept in `measured`.
pub struct Redis {
    server: Server,
    port: u16,
    pub measured: Results,
}

impl Redis {
    pub fn start(bin: &Path, tmp: &Path) -> Result<Self> {
        let dir = tmp.join("redis");
        std::fs::create_dir_all(&dir)?;
        let port = procs::free_port()?;
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir.display().to_string(),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ]
        .map(str::to_owned)
        .into();
        let server = Server::spawn("redis-server", bin, &args, &dir.join("log"), port)?;
        Ok(Self {
            server,
            port,
            measured: Results::default(),
        })
    }

    /// Publishes `cfg.n` events to stream `key` ([`PUB`], [`CROWDED`])
    /// over `conns` connections; returns events/s. Then waits out any
    /// rewrite of the AOF the publishing set off, which would otherwise
    /// run on into what is measured next (in turns, another system's
    /// round).
    pub fn publish(&self, cfg: &Cfg, conns: usize, key: &str) -> Result<f64> {
        let rate = publish(self.port, conns, &[key.to_owned()], cfg.n, cfg.payload)?;
        wait_for_info(
            self.port,
            "persistence",
            (Duration::from_millis(50), Duration::from_secs(300)),
            "to end the rewrite of its AOF publishing set off",
            |info| {
                !["aof_rewrite_in_progress:1", "aof_rewrite_scheduled:1"]
                    .iter()
                    .any(|flag| has_line(info, flag))
            },
        )?;
        Ok(rate)
    }

    /// `clients` [`Blocked`] connections, once the server counts them all
    /// blocked.
    pub fn blocked(&self, clients: usize) -> Result<Blocked> {
        let conns = (0..clients)
            .map(|i| -> Result<Conn> {
                let mut conn = Conn::small(self.port)?;
                let key = format!("crowd:{i}");
                conn.send(&command(&["XREAD", "BLOCK", "0", "STREAMS", &key, "$"]))?;
                Ok(conn)
            })
            .collect::<Result<_>>()?;
        wait_blocked(self.port, clients)?;
        Ok(Blocked {
            port: self.port,
            conns,
        })
    }
}

/// Connections each blocked in `XREAD BLOCK 0` on a stream of its own
/// that nobody writes (`crowd:{i}`, from its end): the `crowd` workload's
/// idle clients. A blocked XREAD has no reply: they are never read.
pub struct Blocked {
    port: u16,
    conns: Vec<Conn>,
}

impl Blocked {
    /// Closes the connections, returns once the server counts none
    /// blocked, and deletes the stream the crowd workload published
    /// ([`CROWDED`]), so that it adds nothing to what later workloads
    /// measure (the server's RSS).
    pub fn close(self) -> Result<()> {
        drop(self.conns);
        wait_blocked(self.port, 0)?;
        Conn::connect(self.port)?.integer(&["DEL", CROWDED])?;
        Ok(())
    }
}

/// Waits, up to a minute, until the server at `port` counts `clients`
/// blocked clients.
fn wait_blocked(port: u16, clients: usize) -> Result<()> {
    let want = format!("blocked_clients:{clients}");
    wait_for_info(
        port,
        "clients",
        (Duration::from_millis(10), Duration::from_secs(60)),
        &format!("to count {clients} blocked clients"),
        |info| has_line(info, &want),
    )
}

/// Reads `INFO section` of the server at `port` every `every` until
/// `done` holds for it; fails once `limit` has passed, saying what redis
/// did not get `to` do.
fn wait_for_info(
    port: u16,
    section: &str,
    (every, limit): (Duration, Duration),
    to: &str,
    done: impl Fn(&str) -> bool,
) -> Result<()> {
    let mut conn = Conn::connect(port)?;
    let deadline = Instant::now() + limit;
    loop {
        if done(&conn.info(section)?) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("redis failed {to} within {} s", limit.as_secs());
        }
        std::thread::sleep(every);
    }
}

/// Whether `info` holds the line `line`.
fn has_line(info: &str, line: &str) -> bool {
    info.lines().any(|l| l.trim() == line)
}

/// Runs the chosen workloads against `redis`: those not already measured
/// in turns with ensync-server. Keys: bench:pub, bench:crowded (and the
/// crowd's crowd:0.., never written), bench:e0, one stream per mixed name
/// bench:m0..bench:m9, bench:s0.
pub fn run(cfg: &Cfg, redis: Redis) -> Result<Results> {
    let Redis {
        server,
        port,
        measured,
    } = &redis;
    let port = *port;
    let mut res = measured.clone();
    let mut rng = fastrand::Rng::new();
    let n = cfg.n;

    if cfg.runs("publish") && res.publish_1.is_none() {
        res.publish_1 = Some(report::rounds(cfg, |_| redis.publish(cfg, 1, PUB))?);
        res.publish_8 = Some(report::rounds(cfg, |_| redis.publish(cfg, 8, PUB))?);
    }
    if cfg.runs("crowd") && res.crowd.is_none() {
        let blocked = redis.blocked(cfg.crowd_clients)?;
        res.crowd = Some(report::rounds(cfg, |_| redis.publish(cfg, 1, CROWDED))?);
        blocked.close()?;
    }
    let mut pool = Sampler::new(n, POOL, &mut rng);
    if cfg.runs("replay") || cfg.runs("limit") || cfg.runs("memory") {
        load(
            port,
            &["bench:e0".to_owned()],
            0..n,
            cfg.payload,
            Some(&mut pool),
        )?;
    }
    if cfg.runs("replay") {
        let mut conn = Conn::connect(port)?;
        res.replay = Some(report::replay_rounds(cfg, n as u64, || {
            let start = Instant::now();
            Ok((replay(&mut conn, "bench:e0", None)?, start.elapsed()))
        })?);
    }
    if cfg.runs("mixed") {
        let keys: Vec<String> = (0..10).map(|k| format!("bench:m{k}")).collect();
        load(port, &keys, 0..n, cfg.payload, None)?;
        let mut conn = Conn::connect(port)?;
        res.mixed = Some(report::replay_rounds(cfg, n.div_ceil(10) as u64, || {
            let start = Instant::now();
            Ok((replay(&mut conn, "bench:m0", None)?, start.elapsed()))
        })?);
    }
    if cfg.runs("seek") {
        res.seek = Some(seek(cfg, port, &mut rng)?);
    }
    if cfg.runs("limit") {
        let ids = &pool.got;
        let op = |conn: &mut Conn, rng: &mut fastrand::Rng| -> Result<()> {
            let id = &ids[rng.usize(0..ids.len())];
            conn.send(&command(&[
                "XRANGE",
                "bench:e0",
                id,
                "+",
                "COUNT",
                &LIMIT_COUNT.to_string(),
            ]))?;
            conn.read_xrange(None).map(drop)
        };
        let d = cfg.limit_duration();
        let connect = |_| Conn::connect(port);
        res.limit_1 = Some(report::rounds(cfg, |_| common::rate(1, d, connect, op))?);
        res.limit_8 = Some(report::rounds(cfg, |_| common::rate(8, d, connect, op))?);
    }
    if cfg.runs("memory") {
        let pid = server.pid();
        let before = procs::Rss::of(pid)?;
        let rss = RssSampler::start(pid);
        replay(&mut Conn::connect(port)?, "bench:e0", None)?;
        let fast_peak = rss.finish();
        let slow_before = procs::Rss::of(pid)?;
        let rss = RssSampler::start(pid);
        let mut pacer = Pacer::new(Duration::from_secs_f64(cfg.slow_secs));
        let slow = replay(&mut Conn::connect(port)?, "bench:e0", Some(&mut pacer))?;
        let slow_peak = rss.finish();
        res.memory = Some(Memory::new(
            before,
            fast_peak,
            slow_before,
            slow_peak,
            slow.bytes,
        ));
    }
    Ok(res)
}

/// XADDs `n` events over `conns` connections; events/s.
fn publish(port: u16, conns: usize, keys: &[String], n: usize, size: usize) -> Result<f64> {
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|k| {
                let range = n * k / conns..n * (k + 1) / conns;
                s.spawn(move || load(port, keys, range, size, None))
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("publisher panicked"))
    })?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// XADDs events `range` (event `i` to `keys[i % len]`) pipelined over one
/// connection; `sampler` gets the ids of the events it wants.
fn load(
    port: u16,
    keys: &[String],
    range: Range<usize>,
    size: usize,
    mut sampler: Option<&mut Sampler<String>>,
) -> Result<()> {
    let mut conn = Conn::connect(port)?;
    let (mut sent, mut acked) = (range.start, range.start);
    let mut out = Vec::new();
    while acked < range.end {
        if sent < range.end && (sent - acked <= WINDOW * 3 / 4 || sent == acked) {
            out.clear();
            while sent < range.end && sent - acked < WINDOW {
                let body = payload(sent, size);
                out.extend(command(&[
                    "XADD",
                    &keys[sent % keys.len()],
                    "*",
                    "d",
                    &body,
                ]));
                sent += 1;
            }
            conn.send(&out)?;
        }
        conn.0.fill()?;
        while let Some((id, next)) = bulk(conn.0.data(), 0)? {
            if let Some(s) = sampler.as_deref_mut() {
                s.offer(acked - range.start, || {
                    String::from_utf8_lossy(&conn.0.data()[id]).into_owned()
                });
            }
            conn.0.consume(next);
            acked += 1;
        }
    }
    Ok(())
}

/// Reads all of stream `key` with XRANGE pages from the last id
/// (exclusive); with a pacer, stops when it says so.
fn replay(conn: &mut Conn, key: &str, mut pacer: Option<&mut Pacer>) -> Result<Received> {
    let mut got = Received::default();
    let mut from = "-".to_owned();
    let page = PAGE.to_string();
    loop {
        conn.send(&command(&["XRANGE", key, &from, "+", "COUNT", &page]))?;
        let (x, last) = conn.read_xrange(pacer.as_deref_mut())?;
        got.lines += x.entries as u64;
        got.bytes += x.len as u64;
        let more = pacer.as_deref_mut().map_or(true, |p| p.read(0));
        match last {
            Some(id) if x.entries == PAGE && more => from = format!("({id}"),
            _ => return Ok(got),
        }
    }
}

/// Seek latency (XRANGE key <id or ms> + COUNT 1) at two log sizes.
fn seek(cfg: &Cfg, port: u16, rng: &mut fastrand::Rng) -> Result<Seek> {
    let key = ["bench:s0".to_owned()];
    let small = cfg.seek_small;
    let mut pool1 = Sampler::new(small, POOL, rng);
    load(port, &key, 0..small, cfg.payload, Some(&mut pool1))?;
    procs::settle();
    let mut conn = Conn::connect(port)?;
    let mut sample = |rng: &mut fastrand::Rng, rest: &[String], total: usize| {
        (0..cfg.seek_samples)
            .map(|i| {
                let id = pick(rng, &pool1.got, rest, small, total);
                // Alternate a full id and its millisecond part.
                let from = if i % 2 == 0 {
                    id.as_str()
                } else {
                    id.split('-').next().unwrap_or(id)
                };
                let start = Instant::now();
                conn.send(&command(&["XRANGE", "bench:s0", from, "+", "COUNT", "1"]))?;
                let (x, _) = conn.read_xrange(None)?;
                if x.entries != 1 {
                    bail!("redis seek from {from}: {} entries", x.entries);
                }
                Ok(start.elapsed().as_secs_f64() * 1e6)
            })
            .collect::<Result<Vec<_>>>()
    };
    let small_us = sample(rng, &[], small).context("seek at small size")?;
    let mut pool2 = Sampler::new(cfg.seek_n - small, POOL, rng);
    load(port, &key, small..cfg.seek_n, cfg.payload, Some(&mut pool2))?;
    procs::settle();
    let large_us = sample(rng, &pool2.got, cfg.seek_n).context("seek at seek-n")?;
    Ok(Seek::new(small, cfg.seek_n, &small_us, &large_us))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLY: &[u8] = b"*2\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nd\r\n$5\r\nhello\r\n\
                           *2\r\n$3\r\n2-0\r\n*2\r\n$1\r\nd\r\n$0\r\n\r\n";

    #[test]
    fn xrange_whole_reply() {
        let x = xrange(REPLY).unwrap().unwrap();
        assert_eq!(x.len, REPLY.len());
        assert_eq!(x.entries, 2);
        assert_eq!(&REPLY[x.last_id.unwrap()], b"2-0");
    }

    #[test]
    fn xrange_incomplete_at_every_cut() {
        for cut in 0..REPLY.len() {
            assert_eq!(xrange(&REPLY[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn xrange_empty_and_error() {
        let x = xrange(b"*0\r\n").unwrap().unwrap();
        assert_eq!((x.len, x.entries, x.last_id), (4, 0, None));
        assert!(xrange(b"-ERR bad id\r\n").is_err());
    }

    #[test]
    fn bulk_and_skip() {
        let buf = b"$5\r\n1-234\r\n:12\r\n";
        let (id, next) = bulk(buf, 0).unwrap().unwrap();
        assert_eq!(&buf[id], b"1-234");
        assert_eq!(skip(buf, next).unwrap(), Some(buf.len()));
        assert_eq!(bulk(&buf[..8], 0).unwrap(), None);
        assert!(bulk(b"-ERR x\r\n", 0).is_err());
    }

    #[test]
    fn command_encoding() {
        assert_eq!(
            command(&["XRANGE", "k"]),
            b"*2\r\n$6\r\nXRANGE\r\n$1\r\nk\r\n"
        );
    }
}
