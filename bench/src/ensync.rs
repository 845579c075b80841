//! ensync-server: start it, load it over the text protocol, measure.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ceiling::Ceiling;
use crate::common::{self, payload, Cfg, Pacer, Sampler, Seeker, LIMIT_COUNT, POOL, WINDOW};
use crate::lineconn::{LineConn, SMALL_BUF};
use crate::procs::{self, RssSampler, Server};
use crate::redis::{self, Redis};
use crate::report::{self, Memory, Names, Rate, Replay, Results, Seek};
use crate::stats::percentile;

/// A place in the log a seek can start from.
type Position = (String, u64);

/// Starts an ensync-server with its data in `dir`; returns it and its
/// port.
fn start(cfg: &Cfg, bin: &Path, dir: &Path) -> Result<(Server, u16)> {
    std::fs::create_dir_all(dir)?;
    let port = procs::free_port()?;
    let config = dir.join("ensync.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nhttp_listen = \"127.0.0.1:{}\"\n\
             data_dir = \"{}\"\n\
             # The bench measures capacity: no per-connection command rate.\n\
             [limits]\nmax_replay_limit = {}\ncommands_per_second = 0\n",
            procs::free_port()?,
            dir.join("data").display(),
            cfg.n.max(cfg.seek_n).max(100_000),
        ),
    )?;
    let args = ["--config".to_owned(), config.display().to_string()];
    let server = Server::spawn("ensync-server", bin, &args, &dir.join("log"), port)?;
    Ok((server, port))
}

/// The systems ensync-server's run takes turns with where a target
/// compares them ([`common::in_turns`]); what it measures of them goes to
/// their `measured`.
pub struct Peers<'a> {
    /// For full replays, seeks and LIMIT replays.
    pub ceiling: Option<&'a mut Ceiling>,
    /// For publishing.
    pub redis: Option<&'a mut Redis>,
}

/// Runs the chosen workloads against a fresh ensync-server, in turns
/// with `peers`.
pub fn run(cfg: &Cfg, bin: &Path, tmp: &Path, peers: Peers<'_>) -> Result<Results> {
    let Peers {
        mut ceiling,
        mut redis,
    } = peers;
    let (server, port) = start(cfg, bin, &tmp.join("ensync"))?;
    let mut res = Results::default();
    let mut rng = fastrand::Rng::new();
    let n = cfg.n;

    if cfg.runs("publish") {
        let pub_name = ["bench/pub".to_owned()];
        // In turns, each round starts once what the last one wrote is on
        // disk.
        let settle = redis.is_some();
        let ours = |conns| {
            if settle {
                procs::settle();
            }
            publish(port, conns, &pub_name, n, cfg.payload)
        };
        let theirs = redis.as_deref().map(|redis| {
            move |conns| {
                procs::settle();
                redis.publish(cfg, conns, redis::PUB)
            }
        });
        let ([ours_1, ours_8], theirs) = common::rates_1_and_8(cfg.rounds, ours, theirs)?;
        (res.publish_1, res.publish_8) = (Some(ours_1), Some(ours_8));
        if let (Some(redis), Some([theirs_1, theirs_8])) = (redis.as_deref_mut(), theirs) {
            (redis.measured.publish_1, redis.measured.publish_8) = (Some(theirs_1), Some(theirs_8));
        }
    }

    if cfg.runs("crowd") {
        res.crowd = Some(crowd(cfg, bin, tmp, redis)?);
    }

    let e0 = ["bench/e0".to_owned()];
    let mut pool = Sampler::new(n, POOL, &mut rng);
    if cfg.runs("replay") || cfg.runs("limit") || cfg.runs("memory") {
        load(port, "bench", &e0, 0..n, cfg.payload, Some(&mut pool))?;
    }
    let full =
        format!("REPLAY;CLIENT_ID=reader;EVENT_NAME=bench/e0;FROM_POSITION=earliest;LIMIT={n}\n");
    if cfg.runs("replay") {
        let mut conn = reader(port, "reader", "bench/e0")?;
        let replay = || timed(|| conn.replay(full.as_bytes(), None));
        res.replay = Some(match ceiling.as_deref_mut() {
            Some(ceiling) => {
                let mut to_ceiling = ceiling.connect()?;
                let (ours, its) =
                    common::in_turns(cfg.rounds, replay, || ceiling.replay(&mut to_ceiling, n))?;
                ceiling.measured.replay = Some(Replay::of(n as u64, &its)?);
                Replay::of(n as u64, &ours)?
            }
            None => report::replay_rounds(cfg, n as u64, replay)?,
        });
    }

    if cfg.runs("mixed") {
        let names: Vec<String> = (0..10).map(|k| format!("bench/m{k}")).collect();
        load(port, "bench", &names, 0..n, cfg.payload, None)?;
        let mut conn = reader(port, "reader", "bench/m0")?;
        let req = format!(
            "REPLAY;CLIENT_ID=reader;EVENT_NAME=bench/m0;FROM_POSITION=earliest;LIMIT={n}\n"
        );
        res.mixed = Some(report::replay_rounds(cfg, n.div_ceil(10) as u64, || {
            timed(|| conn.replay(req.as_bytes(), None))
        })?);
    }

    if cfg.runs("trickle") {
        // A name published the way services often publish: a few events
        // at a time, each acknowledged before the next, so every commit
        // holds a few of them.
        let count = n.div_ceil(10);
        trickle(port, "bench/t0", TRICKLERS, count, cfg.payload)?;
        let mut conn = reader(port, "reader", "bench/t0")?;
        let req = format!(
            "REPLAY;CLIENT_ID=reader;EVENT_NAME=bench/t0;FROM_POSITION=earliest;LIMIT={count}\n"
        );
        res.trickle = Some(report::replay_rounds(cfg, count as u64, || {
            timed(|| conn.replay(req.as_bytes(), None))
        })?);
    }

    if cfg.runs("seek") {
        res.seek = Some(seek(
            cfg,
            bin,
            tmp,
            (&server, port),
            ceiling.as_deref_mut(),
        )?);
    }

    if cfg.runs("limit") {
        let ids = &pool.got;
        let op = |conn: &mut LineConn, rng: &mut fastrand::Rng| -> Result<()> {
            let (id, _) = &ids[rng.usize(0..ids.len())];
            let req = format!("REPLAY;CLIENT_ID=reader;EVENT_NAME=bench/e0;FROM_POSITION={id};LIMIT={LIMIT_COUNT}\n");
            conn.replay(req.as_bytes(), None).map(drop)
        };
        let connect = |_| reader(port, "reader", "bench/e0");
        let d = cfg.limit_duration();
        let limit = |clients| common::rate(clients, d, connect, op);
        let theirs = ceiling
            .as_deref()
            .map(|ceiling| move |clients| ceiling.limit(clients, d));
        let read_before = storage_read(&server);
        let ([ours_1, ours_8], theirs) = common::rates_1_and_8(cfg.rounds, limit, theirs)?;
        (res.limit_1, res.limit_8) = (Some(ours_1), Some(ours_8));
        res.limit_storage_read_kib = kib_read(storage_read(&server), read_before);
        if let (Some(ceiling), Some([theirs_1, theirs_8])) = (ceiling, theirs) {
            (ceiling.measured.limit_1, ceiling.measured.limit_8) = (Some(theirs_1), Some(theirs_8));
        }
    }

    if cfg.runs("memory") {
        res.memory = Some(memory(cfg, &server, port, &full)?);
    }

    if cfg.runs("names") {
        res.names = Some(names(cfg, &server, port, &mut rng)?);
    }
    Ok(res)
}

/// Runs `f`, returning its result and how long it took.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let start = Instant::now();
    let t = f()?;
    Ok((t, start.elapsed()))
}

/// A connection logged in as `client`.
fn connect(port: u16, client: &str) -> Result<LineConn> {
    let mut conn = LineConn::connect(port)?;
    conn.command(&format!("CONN;CLIENT_ID={client}\n"), "+PASS:CONNECTED")?;
    Ok(conn)
}

/// A connection logged in as `client`, subscribed to `name` (REPLAY needs
/// a covering subscription).
fn reader(port: u16, client: &str, name: &str) -> Result<LineConn> {
    let mut conn = connect(port, client)?;
    conn.command(
        &format!("SUB;CLIENT_ID={client};EVENT_NAME={name}\n"),
        "+PASS:SUBSCRIBED",
    )?;
    Ok(conn)
}

/// Publishes `n` events over `conns` connections; returns events/s.
fn publish(port: u16, conns: usize, names: &[String], n: usize, size: usize) -> Result<f64> {
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|k| {
                let range = n * k / conns..n * (k + 1) / conns;
                let client = if k == 0 {
                    "bench".to_owned()
                } else {
                    format!("bench{k}")
                };
                s.spawn(move || load(port, &client, names, range, size, None))
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("publisher panicked"))
    })?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The name the `crowd` workload publishes: one of its own, so that its
/// events do not mix with other logs.
const CROWDED: &str = "bench/crowded";

/// The `crowd` workload: events/s of publishing from 1 pipelined
/// connection, as the 1-connection `publish`, while `cfg.crowd_clients`
/// [`Idle`] subscribers are connected; in turns with `redis`'s (with as
/// many [`redis::Blocked`] clients) when it runs, as `publish` is. On a
/// server of its own, which starts empty as `publish`'s does, so that
/// its events and subscriptions stay out of the other workloads.
fn crowd(cfg: &Cfg, bin: &Path, tmp: &Path, redis: Option<&mut Redis>) -> Result<Rate> {
    let (_server, port) = start(cfg, bin, &tmp.join("ensync-crowd"))?;
    let mut idle = Idle::open(port, cfg.crowd_clients)?;
    let names = [CROWDED.to_owned()];
    let settle = redis.is_some();
    let mut ours = || {
        idle.ping()?;
        if settle {
            procs::settle();
        }
        publish(port, 1, &names, cfg.n, cfg.payload)
    };
    let rate = match redis {
        Some(redis) => {
            let blocked = redis.blocked(cfg.crowd_clients)?;
            let theirs = || {
                procs::settle();
                redis.publish(cfg, 1, redis::CROWDED)
            };
            let (ours, theirs) = common::in_turns(cfg.rounds, ours, theirs)?;
            blocked.close()?;
            redis.measured.crowd = Some(Rate::of(theirs));
            Rate::of(ours)
        }
        None => report::rounds(cfg, |_| ours())?,
    };
    drop(idle);
    Ok(rate)
}

/// Connections each subscribed, as client `crowd{i}`, to a name of its
/// own that nobody publishes (`bench/crowd/{i}`): the `crowd` workload's
/// idle subscribers. They are not read while a round runs.
struct Idle {
    port: u16,
    conns: Vec<LineConn>,
}

impl Idle {
    /// `clients` idle subscribers.
    fn open(port: u16, clients: usize) -> Result<Self> {
        let conns = (0..clients)
            .map(|i| Self::subscriber(port, i))
            .collect::<Result<_>>()?;
        Ok(Self { port, conns })
    }

    /// The client id and name of subscriber `i`.
    fn names(i: usize) -> (String, String) {
        (format!("crowd{i}"), format!("bench/crowd/{i}"))
    }

    /// Subscriber `i`, connected and subscribed.
    fn subscriber(port: u16, i: usize) -> Result<LineConn> {
        let (client, name) = Self::names(i);
        let mut conn = LineConn::with_buffer(port, SMALL_BUF)?;
        conn.command(&format!("CONN;CLIENT_ID={client}\n"), "+PASS:CONNECTED")?;
        conn.command(
            &format!("SUB;CLIENT_ID={client};EVENT_NAME={name}\n"),
            "+PASS:SUBSCRIBED",
        )?;
        Ok(conn)
    }

    /// Before a round, PINGs each and reads the answer: the server has
    /// nothing of theirs left to do when the round starts, and its
    /// heartbeat (a PING after 30 s of silence, the connection closed 20 s
    /// later without an answer) leaves them be through the round. One the
    /// server closed meanwhile, while other rounds ran, is opened again.
    fn ping(&mut self) -> Result<()> {
        for (i, conn) in self.conns.iter_mut().enumerate() {
            if answer(conn, "PING\n", "+PASS:PONG").is_err() {
                *conn = Self::subscriber(self.port, i)?;
            }
        }
        Ok(())
    }
}

/// Sends `request` on a connection left unread for a while and reads its
/// reply, which must start with `expect`, skipping the server's PINGs
/// before it.
fn answer(conn: &mut LineConn, request: &str, expect: &str) -> Result<()> {
    conn.send(request.as_bytes())?;
    loop {
        let line = conn.read_line()?;
        if line.starts_with(expect.as_bytes()) {
            return Ok(());
        }
        if line != b"PING" {
            bail!(
                "{}: expected {expect}, got {}",
                request.trim_end(),
                String::from_utf8_lossy(line)
            );
        }
    }
}

/// Connections that publish the trickled log, each an event at a time.
const TRICKLERS: usize = 4;

/// Publishes `count` events of `name` over `conns` connections, each
/// waiting for an event's ack before it sends the next.
fn trickle(port: u16, name: &str, conns: usize, count: usize, size: usize) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|k| {
                s.spawn(move || -> Result<()> {
                    let client = format!("trickle{k}");
                    let mut conn = connect(port, &client)?;
                    for i in (k..count).step_by(conns) {
                        let body = payload(i, size);
                        conn.command(
                            &format!("PUB;CLIENT_ID={client};EVENT_NAME={name};PAYLOAD={body};DELIVERY_TO=*\n"),
                            "+PASS:PUBLISHED",
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("publisher panicked"))
    })
}

/// Publishes events `range` (event `i` named `names[i % len]`) over one
/// pipelined connection, with up to [`WINDOW`] awaiting their acks;
/// `sampler` gets (id, timestamp) of the events it wants.
fn load(
    port: u16,
    client: &str,
    names: &[String],
    range: Range<usize>,
    size: usize,
    mut sampler: Option<&mut Sampler<Position>>,
) -> Result<()> {
    let mut conn = connect(port, client)?;
    let (mut sent, mut acked) = (range.start, range.start);
    let mut out = String::new();
    while acked < range.end {
        if sent < range.end && (sent - acked <= WINDOW * 3 / 4 || sent == acked) {
            out.clear();
            while sent < range.end && sent - acked < WINDOW {
                let name = &names[sent % names.len()];
                let body = payload(sent, size);
                writeln!(
                    out,
                    "PUB;CLIENT_ID={client};EVENT_NAME={name};PAYLOAD={body};DELIVERY_TO=*"
                )?;
                sent += 1;
            }
            conn.send(out.as_bytes())?;
        }
        conn.wait_line()?;
        while let Some(line) = conn.buffered_line() {
            let Some(rest) = line.strip_prefix(b"+PASS:PUBLISHED;IDEM=") else {
                bail!("publish failed: {}", String::from_utf8_lossy(line));
            };
            if let Some(s) = sampler.as_deref_mut() {
                s.offer(acked - range.start, || parse_ack(rest));
            }
            acked += 1;
        }
    }
    Ok(())
}

/// (id, timestamp) from the rest of a publish ack after `IDEM=`.
fn parse_ack(rest: &[u8]) -> Position {
    let text = String::from_utf8_lossy(rest);
    let (id, ts) = text.split_once(";TIMESTAMP=").unwrap_or((&text, "0"));
    (id.to_owned(), ts.trim().parse().unwrap_or(0))
}

/// Seek latency (first record of a LIMIT=1 replay from a random id or
/// timestamp) in a log of `seek_small` events, on a server of its own
/// started for it, and in one of `seek_n` on the server at `port`; taken
/// in turns, with the `ceiling`'s seeks if it runs.
fn seek(
    cfg: &Cfg,
    bin: &Path,
    tmp: &Path,
    (server, port): (&Server, u16),
    ceiling: Option<&mut Ceiling>,
) -> Result<Seek> {
    let (small_server, small_port) = start(cfg, bin, &tmp.join("ensync-small"))?;
    let small = Positions::load(cfg, small_port, cfg.seek_small)?;
    let large = Positions::load(cfg, port, cfg.seek_n)?;
    procs::settle();
    // Connected now: a connection idle while the other log loads gets
    // the server's PING.
    let (mut small, mut large) = (small.connect(small_port)?, large.connect(port)?);
    let mut rng = fastrand::Rng::new();
    let samples = cfg.seek_samples;
    // Not every kernel keeps /proc/PID/io (task I/O accounting); without
    // it the rows stay empty and the seeks are timed all the same.
    let read_before = [storage_read(&small_server), storage_read(server)];
    let us = match ceiling {
        Some(ceiling) => {
            let mut its = ceiling.seeker()?;
            let mut us =
                common::seeks_in_turns(&mut [&mut small, &mut large, &mut its], samples, &mut rng)?;
            let its = us.pop().expect("three seekers");
            ceiling.measured.seek = Some(Seek::new(cfg.seek_small, cfg.seek_n, &its, &its));
            us
        }
        None => common::seeks_in_turns(&mut [&mut small, &mut large], samples, &mut rng)?,
    };
    let mut seek = Seek::new(cfg.seek_small, cfg.seek_n, &us[0], &us[1]);
    seek.storage_read_small_kib = kib_read(storage_read(&small_server), read_before[0]);
    seek.storage_read_large_kib = kib_read(storage_read(server), read_before[1]);
    Ok(seek)
}

/// Bytes `server` has read from storage, where the kernel keeps count.
fn storage_read(server: &Server) -> Option<u64> {
    procs::storage_read_bytes(server.pid()).ok()
}

/// KiB read between two [`storage_read`]s, if both were taken.
fn kib_read(after: Option<u64>, before: Option<u64>) -> Option<f64> {
    Some(after?.saturating_sub(before?) as f64 / 1024.0)
}

/// Places to seek to in a log of `bench/s0`, picked as it loaded.
struct Positions(Vec<Position>);

impl Positions {
    /// Loads `len` events of `bench/s0` into the server at `port`.
    fn load(cfg: &Cfg, port: u16, len: usize) -> Result<Self> {
        let mut pool = Sampler::new(len, POOL, &mut fastrand::Rng::new());
        let s0 = ["bench/s0".to_owned()];
        load(port, "bench", &s0, 0..len, cfg.payload, Some(&mut pool))?;
        Ok(Self(pool.got))
    }

    fn connect(self, port: u16) -> Result<Seeks> {
        Ok(Seeks {
            conn: reader(port, "seeker", "bench/s0")?,
            positions: self.0,
            by_time: false,
        })
    }
}

/// A connection that times seeks into a log of `bench/s0`, alternating
/// from an event's id and from its timestamp.
struct Seeks {
    conn: LineConn,
    positions: Vec<Position>,
    /// Whether the next seek is from a timestamp.
    by_time: bool,
}

impl Seeker for Seeks {
    fn seek(&mut self, rng: &mut fastrand::Rng) -> Result<f64> {
        let (id, ts) = &self.positions[rng.usize(0..self.positions.len())];
        let from = if self.by_time {
            ts.to_string()
        } else {
            id.clone()
        };
        self.by_time = !self.by_time;
        let req =
            format!("REPLAY;CLIENT_ID=seeker;EVENT_NAME=bench/s0;FROM_POSITION={from};LIMIT=1\n");
        let took = self
            .conn
            .first_record(req.as_bytes())
            .with_context(|| format!("seek from {from}"))?;
        Ok(took.as_secs_f64() * 1e6)
    }
}

/// The pattern of the `names` workload.
const NAMES_PATTERN: &str = "bench/n/*";

/// A pattern over `cfg.names` names, an event each, as a service that
/// names its events by entity has: LIMIT-50 replays of it from random
/// events, full replays of it, and live deliveries to a subscription to
/// it, with the server's RSS meanwhile.
fn names(cfg: &Cfg, server: &Server, port: u16, rng: &mut fastrand::Rng) -> Result<Names> {
    let names: Vec<String> = (0..cfg.names).map(|k| format!("bench/n/{k}")).collect();
    let mut pool = Sampler::new(cfg.names, POOL, rng);
    load(
        port,
        "bench",
        &names,
        0..cfg.names,
        cfg.payload,
        Some(&mut pool),
    )?;
    procs::settle();
    let before = procs::Rss::of(server.pid())?;
    let rss = RssSampler::start(server.pid());
    let ids = &pool.got;
    let op = |conn: &mut LineConn, rng: &mut fastrand::Rng| -> Result<()> {
        let (id, _) = &ids[rng.usize(0..ids.len())];
        let req = format!(
            "REPLAY;CLIENT_ID=nreader;EVENT_NAME={NAMES_PATTERN};FROM_POSITION={id};LIMIT={LIMIT_COUNT}\n"
        );
        conn.replay(req.as_bytes(), None).map(drop)
    };
    let connect = |_| reader(port, "nreader", NAMES_PATTERN);
    let limit_1 = report::rounds(cfg, |_| common::rate(1, cfg.limit_duration(), connect, op))?;
    let mut conn = reader(port, "nreader", NAMES_PATTERN)?;
    let full = format!(
        "REPLAY;CLIENT_ID=nreader;EVENT_NAME={NAMES_PATTERN};FROM_POSITION=earliest;LIMIT={}\n",
        cfg.names
    );
    let replay = report::replay_rounds(cfg, cfg.names as u64, || {
        timed(|| conn.replay(full.as_bytes(), None))
    })?;
    // No live deliveries to this subscription from here on.
    conn.command(
        &format!("UNSUB;CLIENT_ID=nreader;EVENT_NAME={NAMES_PATTERN}\n"),
        "+PASS:UNSUBSCRIBED",
    )?;
    let live = live_deliveries(port, &names, cfg.live_samples, rng)?;
    let peak = rss.finish();
    Ok(Names {
        names: cfg.names,
        limit_1,
        replay,
        live_samples: live.len(),
        live_p50_us: percentile(&live, 50.0).unwrap_or(f64::NAN),
        live_p99_us: percentile(&live, 99.0).unwrap_or(f64::NAN),
        rss_before_mib: report::mib(before.all_kib),
        rss_growth_mib: report::growth_mib(before.all_kib, peak.all_kib),
        anon_growth_mib: report::growth_mib(before.anon_kib, peak.anon_kib),
    })
}

/// `samples` times (µs) from publishing an event to a random one of
/// `names` to its record reaching a subscriber of [`NAMES_PATTERN`], which
/// acknowledges each.
fn live_deliveries(
    port: u16,
    names: &[String],
    samples: usize,
    rng: &mut fastrand::Rng,
) -> Result<Vec<f64>> {
    let mut sub = reader(port, "nlive", NAMES_PATTERN)?;
    let mut publisher = connect(port, "npub")?;
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let name = &names[rng.usize(0..names.len())];
        let start = Instant::now();
        publisher.send(
            format!("PUB;CLIENT_ID=npub;EVENT_NAME={name};PAYLOAD={{}};DELIVERY_TO=*\n").as_bytes(),
        )?;
        let line = sub.read_line()?;
        let took = start.elapsed();
        let idem = record_idem(line)
            .with_context(|| format!("not a record: {}", String::from_utf8_lossy(line)))?;
        out.push(took.as_secs_f64() * 1e6);
        let ack = format!("ACK;CLIENT_ID=nlive;EVENT_IDEM={idem}\n");
        let line = publisher.read_line()?;
        if !line.starts_with(b"+PASS:PUBLISHED") {
            bail!("publish failed: {}", String::from_utf8_lossy(line));
        }
        sub.command(&ack, "+PASS:ACKNOWLEDGED")?;
    }
    sub.command(
        &format!("UNSUB;CLIENT_ID=nlive;EVENT_NAME={NAMES_PATTERN}\n"),
        "+PASS:UNSUBSCRIBED",
    )?;
    Ok(out)
}

/// The `idem` of a `+RECORD:` line.
fn record_idem(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line.strip_prefix(b"+RECORD:")?).ok()?;
    let (_, rest) = text.split_once("\"idem\":\"")?;
    let (idem, _) = rest.split_once('"')?;
    Some(idem.to_owned())
}

/// Server RSS growth during a full replay to a fast and to a slow reader.
fn memory(cfg: &Cfg, server: &Server, port: u16, full: &str) -> Result<Memory> {
    let pid = server.pid();
    let before = procs::Rss::of(pid)?;
    let rss = RssSampler::start(pid);
    let fast = reader(port, "reader", "bench/e0")?.replay(full.as_bytes(), None)?;
    let fast_peak = rss.finish();
    if fast.lines != cfg.n as u64 {
        bail!(
            "memory: fast replay got {} of {} records",
            fast.lines,
            cfg.n
        );
    }

    let slow_before = procs::Rss::of(pid)?;
    let rss = RssSampler::start(pid);
    let mut pacer = Pacer::new(Duration::from_secs_f64(cfg.slow_secs));
    let mut conn = reader(port, "reader", "bench/e0")?;
    let slow = conn.replay(full.as_bytes(), Some(&mut pacer))?;
    drop(conn);
    std::thread::sleep(Duration::from_millis(100));
    let slow_peak = rss.finish();
    Ok(Memory::new(
        before,
        fast_peak,
        slow_before,
        slow_peak,
        slow.bytes,
    ))
}
