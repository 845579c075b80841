//! Hostile and broken clients over real sockets: a client that sends
//! oversized, malformed or random lines, trickles bytes, goes silent,
//! stops reading, or opens connections up to the limit slows down nobody
//! else, cannot take the server's memory, and every error line it gets
//! names its problem.
//!
//! Already proven elsewhere, so only the new angle is here:
//! - `session.rs`: a line a few KiB over a 1 KiB limit, a few invalid
//!   UTF-8 lines, malformed pairs, on one connection and one at a time.
//!   Here: 16 times the default 1 MiB limit in one write and trickled,
//!   NUL bytes anywhere, a seeded random blast, huge key lists, all
//!   with another client timed meanwhile.
//! - `heartbeat.rs`: an idle connection, connected or not, is closed when
//!   it does not answer `PING`. Here: connections that keep trickling
//!   bytes of a line that never ends, and ones that never read either,
//!   many at once, while a well-behaved client is served.
//! - `backpressure.rs`: a reader stalled mid-replay of 100,000 events
//!   holds up only itself and then gets every record. Here: 1,000,000
//!   events on the real binary, with its memory measured during the stall.
//! - `replay.rs`: pipelined commands get one reply each, in order.
//! - `websocket.rs`: the same framing limits over WebSocket.
//!
//! Random lines come from a seeded generator whose seed is printed; set
//! `HOSTILE_SEED` to repeat a run.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::http::scrape;
use common::rng::Rng;
use common::*;
use ensync_protocol::{parse_command, Command};
use ensync_server::config::Config;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a well-behaved client may wait for any one answer while
/// hostile clients are at work: generous, as the machine is shared.
const PROMPT: Duration = Duration::from_secs(5);
/// The smallest line limit the config allows, for cheap oversized lines.
const SMALL_LINE: usize = 1024;

// ------------------------------------------------------------- harness

/// A well-behaved client that sends `PING` at a steady pace and times each
/// answer until it is stopped.
struct Bystander {
    stop: CancellationToken,
    answered: Arc<AtomicUsize>,
    handle: JoinHandle<(usize, Duration)>,
}

impl Bystander {
    /// Connects as `bystander` and starts pinging every `every`.
    async fn start(addr: SocketAddr, every: Duration) -> Self {
        let mut client = Client::connect(addr).await;
        client.conn("bystander").await;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let answered_so_far = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&answered_so_far);
        let handle = tokio::spawn(async move {
            let (mut answered, mut worst) = (0usize, Duration::ZERO);
            while !token.is_cancelled() {
                let asked = Instant::now();
                client.send("PING").await;
                match client.try_line(PROMPT * 2).await {
                    Some(line) if line == "+PASS:PONG" => {}
                    other => panic!(
                        "the well-behaved client's PING {answered} was not answered \
                         +PASS:PONG within {:?}: got {other:?}",
                        PROMPT * 2
                    ),
                }
                worst = worst.max(asked.elapsed());
                answered += 1;
                count.store(answered, Ordering::Relaxed);
                tokio::select! {
                    () = token.cancelled() => break,
                    () = tokio::time::sleep(every) => {}
                }
            }
            (answered, worst)
        });
        Self {
            stop,
            answered: answered_so_far,
            handle,
        }
    }

    /// Stops pinging once at least `min` answers came (however quickly
    /// the hostile work ended); asserts every answer came within `PROMPT`.
    async fn finish(self, min: usize) {
        let deadline = Instant::now() + PROMPT * 2;
        while self.answered.load(Ordering::Relaxed) < min && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stop.cancel();
        let (answered, worst) = self
            .handle
            .await
            .unwrap_or_else(|e| panic!("the well-behaved client failed: {e}"));
        eprintln!("bystander: {answered} PINGs answered, slowest in {worst:?}");
        assert!(
            answered >= min,
            "the well-behaved client got only {answered} answers (wanted {min})"
        );
        assert!(
            worst < PROMPT,
            "the well-behaved client waited {worst:?} for a PONG (bound {PROMPT:?})"
        );
    }
}

/// What the server must answer to one line sent before CONN.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// No reply (an empty line, or a client `PONG`).
    Nothing,
    /// Exactly this line.
    Exact(String),
    /// A line starting with this.
    Prefix(&'static str),
}

/// The reply the server owes `line` (without its LF) on a connection that
/// has not connected, following SPEC.md §2 for framing and the parser for
/// the rest. `None` for lines a blast must not contain (a valid CONN would
/// change the session).
fn want_before_conn(line: &[u8], max_line_len: usize) -> Option<Want> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Some(Want::Nothing);
    }
    if line.len() > max_line_len {
        return Some(Want::Prefix("-FAIL:LINE_TOO_LONG;MESSAGE="));
    }
    let Ok(text) = std::str::from_utf8(line) else {
        return Some(Want::Prefix("-FAIL:INVALID_ENCODING;MESSAGE="));
    };
    Some(match parse_command(text) {
        Err(e) => {
            let mut wire = BytesMut::new();
            e.to_reply(Config::default().limits.max_replay_limit)
                .encode(&mut wire);
            Want::Exact(String::from_utf8(wire.to_vec()).expect("replies are UTF-8"))
        }
        Ok(Command::Ping) => Want::Exact("+PASS:PONG".into()),
        Ok(Command::Pong) => Want::Nothing,
        Ok(Command::Conn(_)) => return None,
        Ok(_) => Want::Prefix("-FAIL:NOT_CONNECTED;MESSAGE="),
    })
}

/// Pieces of the protocol a random line is stitched from.
const TOKENS: &[&[u8]] = &[
    b"CONN",
    b"PUB",
    b"SUB",
    b"REPLAY",
    b"ACK",
    b"DEFER",
    b"PING",
    b"pong",
    b"CLIENT_ID",
    b"EVENT_NAME",
    b"PAYLOAD",
    b"DELIVERY_TO",
    b"METADATA",
    b"FROM_POSITION",
    b"LIMIT",
    b"EVENT_IDEM",
    b"=",
    b"=:",
    b";",
    b";",
    b";",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b"\0",
    b"\r",
    b" ",
    b"*",
    b"/",
    b",",
    b"a",
    b"x/y",
    b"evt_1",
    b"earliest",
    b"0",
    b"99999999999999999999",
    b"\xff",
    b"\xc3\xa9",
    b"\xe2\x82",
    b"\xed\xa0\x80",
    b"{\"k\":\"",
    b"true",
];

/// Well-formed commands a random line may be a mutation of.
const TEMPLATES: &[&str] = &[
    "PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={\"k\":[1,2,{\"s\":\";\"}]};DELIVERY_TO=*;METADATA={\"m\":1}",
    "SUB;CLIENT_ID=a;EVENT_NAME=x/*",
    "REPLAY;CLIENT_ID=a;EVENT_NAME=x/*;FROM_POSITION=earliest;LIMIT=10;INCLUDE_PAYLOADS=false",
    "REPLAY;CLIENT_ID=a;EVENT_IDEM=evt_0000000a0000000000000007",
    "DEFER;CLIENT_ID=a;EVENT_IDEM=evt_1;DELAY_MS=1000;REASON=later",
    "DISCARD;CLIENT_ID=a;EVENT_IDEM=evt_1;REASON=bad",
    "CONN;CLIENT_ID=a",
    "PING",
];

/// One random line (no LF): raw bytes, protocol tokens, a mutated command,
/// now and then one over `max_line_len`, or a plain `PING`.
fn random_line(rng: &mut Rng, max_line_len: usize) -> Vec<u8> {
    match rng.below(100) {
        0..=29 => {
            let n = rng.below(200);
            rng.bytes(n)
        }
        30..=64 => {
            let mut line = Vec::new();
            for _ in 0..1 + rng.below(24) {
                line.extend_from_slice(TOKENS[rng.below(TOKENS.len())]);
            }
            line
        }
        65..=94 => {
            let mut line = TEMPLATES[rng.below(TEMPLATES.len())].as_bytes().to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(line.len() + 1);
                match rng.below(4) {
                    0 if at < line.len() => line[at] = rng.byte(),
                    1 => line.insert(at, rng.byte()),
                    2 if at < line.len() => {
                        line.remove(at);
                    }
                    _ => line.truncate(at),
                }
            }
            line
        }
        95..=97 => {
            let n = max_line_len + 1 + rng.below(3 * max_line_len);
            rng.bytes(n)
        }
        _ => b"PING".to_vec(),
    }
}

/// `n` random lines for a connection that never connects, each with the
/// reply it is owed.
fn random_lines(rng: &mut Rng, n: usize, max_line_len: usize) -> Vec<(Vec<u8>, Want)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let line = random_line(rng, max_line_len);
        if let Some(want) = want_before_conn(&line, max_line_len) {
            out.push((line, want));
        }
    }
    out
}

/// Checks `reply` against `want`; `line` is shown when it does not match.
fn check_reply(i: usize, line: &[u8], want: &Want, reply: &str) {
    let shown = String::from_utf8_lossy(&line[..line.len().min(120)]);
    match want {
        Want::Nothing => unreachable!("lines owed nothing are not counted"),
        Want::Exact(exact) => assert_eq!(reply, exact, "reply {i} to {shown:?}"),
        Want::Prefix(prefix) => assert!(
            reply.starts_with(prefix),
            "reply {i} to {shown:?}: expected {prefix}..., got {reply:?}"
        ),
    }
    if reply.starts_with("-FAIL:") {
        assert_fail_shape(reply);
    }
    assert!(
        !reply.chars().any(char::is_control),
        "reply {i} holds a control character: {reply:?}"
    );
}

/// A server on a fresh temporary directory, with `adjust` applied to its
/// config first.
async fn server_with(adjust: impl FnOnce(&mut Config)) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_in(dir.path());
    adjust(&mut config);
    let srv = start_server_with(config).await;
    (dir, srv)
}

/// Open TCP connections the server counts right now.
async fn tcp_connections(srv: &TestServer) -> usize {
    scrape(srv.http_addr)
        .await
        .value("ensync_connections", &[("transport", "tcp")]) as usize
}

/// Waits until the server counts exactly `n` open TCP connections; returns
/// how long that took, or `None` if it did not happen within `within`.
async fn await_tcp_connections(srv: &TestServer, n: usize, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if tcp_connections(srv).await == n {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A raw connection's view of the server closing it.
#[derive(Debug)]
struct Closed {
    /// Lines read before the close.
    lines: Vec<String>,
    /// From the start of the silence to the close; `None` if it stayed open
    /// for `wait`.
    after: Option<Duration>,
    /// Bytes trickled meanwhile.
    trickled: usize,
}

/// Opens a connection, sends `preamble` (whole lines, each answered before
/// going on), then sends one byte of a never-ending line every `period`
/// (nothing at all when `None`) until the server closes the connection or
/// `wait` passes.
async fn trickle(
    addr: SocketAddr,
    preamble: &[&str],
    period: Option<Duration>,
    wait: Duration,
) -> Closed {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut lines = Vec::new();
    for line in preamble {
        write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
        let mut reply = Vec::new();
        tokio::time::timeout(LINE_TIMEOUT, read.read_until(b'\n', &mut reply))
            .await
            .expect("preamble reply timed out")
            .expect("read");
        lines.push(String::from_utf8_lossy(&reply).trim_end().to_string());
    }
    let start = Instant::now();
    let stop = CancellationToken::new();
    let writer = async {
        let endless = b"PUB;CLIENT_ID=slow;EVENT_NAME=slow/e/x;PAYLOAD={\"k\":\"";
        let mut sent = 0;
        let Some(period) = period else {
            stop.cancelled().await;
            return sent;
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return sent,
                () = tokio::time::sleep(period) => {}
            }
            let byte = endless.get(sent).copied().unwrap_or(b'x');
            if write.write_all(&[byte]).await.is_err() {
                return sent;
            }
            sent += 1;
        }
    };
    let reader = async {
        let mut buf = Vec::new();
        let after = loop {
            let left = wait.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, read.read_until(b'\n', &mut buf)).await {
                Err(_) => break None,
                Ok(Ok(0) | Err(_)) => break Some(start.elapsed()),
                Ok(Ok(_)) => lines.push(String::from_utf8_lossy(&buf).trim_end().to_string()),
            }
            buf.clear();
        };
        stop.cancel();
        after
    };
    let (trickled, after) = tokio::join!(writer, reader);
    Closed {
        lines,
        after,
        trickled,
    }
}

// -------------------------------------------------- the real binary

/// The `ensync-server` binary on a data directory, for tests that measure
/// the process's memory. Killed if the test ends without `stop`.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts the binary on `data_dir` with `extra` appended to its config
    /// file, and waits until it listens.
    async fn start(data_dir: &Path, extra: &str) -> Self {
        for _ in 0..5 {
            // NOTE: ports are picked by binding port 0 and letting go, so
            // another process may take one first; the server then exits
            // and the next round picks again.
            let ports: Vec<u16> = (0..2)
                .map(|_| {
                    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                    l.local_addr().expect("addr").port()
                })
                .collect();
            let config = data_dir.join("hostile.toml");
            std::fs::write(
                &config,
                format!(
                    "listen = \"127.0.0.1:{}\"\nhttp_listen = \"127.0.0.1:{}\"\ndata_dir = {:?}\n{extra}",
                    ports[0],
                    ports[1],
                    data_dir.join("data").display().to_string(),
                ),
            )
            .expect("write config");
            let log = data_dir.join("server.log");
            let file = std::fs::File::create(&log).expect("log file");
            // NOTE: the log goes to stdout; stderr is kept for panics.
            let child = Process::new(env!("CARGO_BIN_EXE_ensync-server"))
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(file.try_clone().expect("log file"))
                .stderr(file)
                .spawn()
                .expect("start ensync-server");
            let mut server = ServerProcess {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], ports[0])),
                log,
            };
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(30) {
                if let Some(status) = server.child.try_wait().expect("try_wait") {
                    eprintln!(
                        "ensync-server exited at start ({status}): {}",
                        server.log_text()
                    );
                    break;
                }
                if server.log_text().contains("ensync-server listening") {
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!("ensync-server not listening yet: {}", server.log_text());
        }
        panic!("ensync-server did not start listening in 5 tries");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process's resident memory (VmRSS), in bytes.
    fn rss(&self) -> u64 {
        rss_of(self.child.id())
    }

    /// Samples the process's resident memory every 20 ms until the
    /// returned sampler is finished; it gives the peak.
    fn sample_rss(&self) -> RssPeak {
        let pid = self.child.id();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let sampler = std::thread::spawn(move || {
            let mut peak = rss_of(pid);
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                peak = peak.max(rss_of(pid));
            }
            peak
        });
        RssPeak { stop, sampler }
    }

    /// SIGTERM, then waits for a clean exit.
    async fn stop(mut self) {
        let pid = self.child.id().to_string();
        let sent = Process::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let started = Instant::now();
        while started.elapsed() < STOP_TIMEOUT {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "ensync-server exited with {status}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("ensync-server did not stop within {STOP_TIMEOUT:?} of SIGTERM");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// The resident memory (VmRSS) of process `pid`, in bytes.
fn rss_of(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kib * 1024
}

/// A thread sampling a process's resident memory ([`ServerProcess::sample_rss`]).
struct RssPeak {
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<u64>,
}

impl RssPeak {
    /// Stops sampling; the peak seen, in bytes.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().expect("RSS sampler")
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

// --------------------------------------------------- 1. oversized lines

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_sixteen_times_the_default_limit_get_one_line_too_long_each() {
    let (_dir, srv) = server_with(|_| {}).await;
    let max = Config::default().limits.max_line_len;
    let bystander = Bystander::start(srv.addr, Duration::from_millis(50)).await;
    let mut c = srv.client().await;
    c.conn("big").await;

    // Three 16 MiB lines and a PING in one write. The first is one long
    // token, the second hides NULs, CRs and invalid UTF-8, the third holds
    // command text after the limit: all of it is dropped up to the LF.
    let mut blast = Vec::with_capacity(3 * 16 * max + 64);
    for k in 0..3 {
        blast.extend_from_slice(b"PUB;CLIENT_ID=big;EVENT_NAME=x/y;PAYLOAD={\"k\":\"");
        let start = blast.len();
        blast.resize(start + 16 * max, b'x');
        if k == 1 {
            for i in (start..blast.len()).step_by(4099) {
                blast[i] = [0u8, b'\r', 0xff][i % 3];
            }
        }
        if k == 2 {
            blast.extend_from_slice(b"\"};DELIVERY_TO=*;PING;PING");
        }
        blast.push(b'\n');
    }
    blast.extend_from_slice(b"PING\n");
    let started = Instant::now();
    let replies = c.pipeline_raw(&blast, 4).await;
    eprintln!("3 x 16 MiB lines answered in {:?}", started.elapsed());
    for reply in &replies[..3] {
        assert!(reply.starts_with("-FAIL:LINE_TOO_LONG;MESSAGE="), "{reply}");
        assert_fail_shape(reply);
        assert!(reply.contains(&max.to_string()), "names the limit: {reply}");
    }
    assert_eq!(replies[3], "+PASS:PONG", "exactly one reply per long line");

    // The connection is a working session: nothing of the long lines was
    // published, and a normal PUB is.
    c.sub("big", "x/*").await;
    let rep = c.replay("big", "x/*", "FROM_POSITION=earliest").await;
    assert_eq!(rep.count, 0, "nothing of an oversized line was published");
    let (reply, _) = c
        .call("PUB;CLIENT_ID=big;EVENT_NAME=x/y;PAYLOAD={};DELIVERY_TO=big")
        .await;
    parse_published(&reply);
    bystander.finish(1).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_oversized_line_is_refused_once_the_limit_passes_not_at_its_end() {
    let (_dir, srv) = server_with(|c| c.limits.max_line_len = SMALL_LINE).await;
    let bystander = Bystander::start(srv.addr, Duration::from_millis(50)).await;
    let mut c = srv.client().await;
    c.conn("slow").await;

    // 16 KiB in 256-byte pieces, 40 ms apart: about 2.6 s for the line.
    const PIECE: usize = 256;
    let total = 16 * SMALL_LINE;
    let mut line = b"PUB;CLIENT_ID=slow;EVENT_NAME=x/y;PAYLOAD={\"k\":\"".to_vec();
    line.resize(total, b'y');
    let mut sent = 0;
    let mut refused_at = None;
    while sent < total {
        let end = (sent + PIECE).min(total);
        c.send_raw(&line[sent..end]).await;
        sent = end;
        if let Some(reply) = c.try_line(Duration::from_millis(40)).await {
            assert!(refused_at.is_none(), "a second reply to one line: {reply}");
            assert!(reply.starts_with("-FAIL:LINE_TOO_LONG;MESSAGE="), "{reply}");
            assert_fail_shape(&reply);
            assert!(reply.contains("1024"), "names the limit: {reply}");
            refused_at = Some(sent);
        }
    }
    let refused_at = refused_at.unwrap_or_else(|| {
        panic!("no LINE_TOO_LONG while {total} bytes of one line were trickled")
    });
    eprintln!("refused after {refused_at} of {total} bytes");
    assert!(
        refused_at > SMALL_LINE,
        "refused after {refused_at} bytes, before the limit was passed"
    );
    assert!(
        refused_at < total,
        "refused only when the line was complete ({refused_at} bytes)"
    );
    // The rest of the line is dropped; the next command is answered.
    c.send_raw(b"\"};DELIVERY_TO=*\nPING\n").await;
    assert_eq!(c.line().await, "+PASS:PONG");
    c.sub("slow", "x/*").await;
    let rep = c.replay("slow", "x/*", "FROM_POSITION=earliest").await;
    assert_eq!(rep.count, 0, "nothing of the trickled line was published");
    bystander.finish(10).await;
    srv.stop().await;
}

// --------------------------------------- 2. invalid UTF-8 and NUL bytes

/// One hostile line and what its `-FAIL` must say.
struct Case {
    line: &'static [u8],
    code: &'static str,
    /// Texts the message must contain: what is wrong, and where.
    names: &'static [&'static str],
}

const ENCODING_AND_NUL_CASES: &[Case] = &[
    // Invalid UTF-8: framing answers before anything else looks.
    Case {
        line: b"P\xffB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={};DELIVERY_TO=*",
        code: "INVALID_ENCODING",
        names: &["UTF-8"],
    },
    Case {
        line: b"PUB;CLIENT\xc0_ID=a;EVENT_NAME=x/y;PAYLOAD={};DELIVERY_TO=*",
        code: "INVALID_ENCODING",
        names: &["UTF-8"],
    },
    Case {
        line: b"PUB;CLIENT_ID=a;EVENT_NAME=x/\xfe;PAYLOAD={};DELIVERY_TO=*",
        code: "INVALID_ENCODING",
        names: &["UTF-8"],
    },
    Case {
        line: b"PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={\"k\":\"\xff\"};DELIVERY_TO=*",
        code: "INVALID_ENCODING",
        names: &["UTF-8"],
    },
    Case {
        line:
            b"PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={};DELIVERY_TO=*;METADATA={\"\xed\xa0\x80\":1}",
        code: "INVALID_ENCODING",
        names: &["UTF-8"],
    },
    Case {
        line: b"SUB;CLIENT_ID=a;EVENT_NAME=x\xc0\xafy",
        code: "INVALID_ENCODING",
        names: &["UTF-8"],
    },
    Case {
        line: b"PING\xe2\x82",
        code: "INVALID_ENCODING",
        names: &["UTF-8"],
    },
    Case {
        line: b"\0\xff\0",
        code: "INVALID_ENCODING",
        names: &["UTF-8"],
    },
    // NUL in the verb: echoed escaped, never raw.
    Case {
        line: b"PI\0NG",
        code: "UNKNOWN_COMMAND",
        names: &["\"PI\\0NG\""],
    },
    Case {
        line: b"\0",
        code: "UNKNOWN_COMMAND",
        names: &["\"\\0\""],
    },
    // NUL in a key.
    Case {
        line: b"SUB;CLIENT_ID=a;EVENT\0_NAME=x/y",
        code: "INVALID_PARAMETERS",
        names: &["KEY=VALUE", "EVENT\\0_NAME"],
    },
    Case {
        line: b"SUB;\0CLIENT_ID=a;EVENT_NAME=x/y",
        code: "INVALID_PARAMETERS",
        names: &["KEY=VALUE", "\\0CLIENT_ID"],
    },
    // NUL in values.
    Case {
        line: b"SUB;CLIENT_ID=a\0;EVENT_NAME=x/y",
        code: "INVALID_PARAMETERS",
        names: &["CLIENT_ID", "'\\0'"],
    },
    Case {
        line: b"CONN;CLIENT_ID=\0",
        code: "INVALID_PARAMETERS",
        names: &["CLIENT_ID", "'\\0'"],
    },
    Case {
        line: b"SUB;CLIENT_ID=a;EVENT_NAME=x/\0y",
        code: "INVALID_PARAMETERS",
        names: &["EVENT_NAME", "'\\0'"],
    },
    Case {
        line: b"PUB;CLIENT_ID=a;EVENT_NAME=x/y\0;PAYLOAD={};DELIVERY_TO=*",
        code: "INVALID_PARAMETERS",
        names: &["EVENT_NAME", "'\\0'"],
    },
    Case {
        line: b"PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={};DELIVERY_TO=b\0",
        code: "INVALID_PARAMETERS",
        names: &["DELIVERY_TO", "'\\0'"],
    },
    Case {
        line: b"ACK;CLIENT_ID=a;EVENT_IDEM=evt_1\0",
        code: "INVALID_PARAMETERS",
        names: &["EVENT_IDEM"],
    },
    Case {
        line: b"REPLAY;CLIENT_ID=a;EVENT_NAME=x/*;FROM_POSITION=earliest;LIMIT=5\0",
        code: "INVALID_PARAMETERS",
        names: &["LIMIT"],
    },
    Case {
        line: b"REPLAY;CLIENT_ID=a;EVENT_NAME=x/*;FROM_POSITION=earliest;INCLUDE_PAYLOADS=true\0",
        code: "INVALID_PARAMETERS",
        names: &["INCLUDE_PAYLOADS"],
    },
    Case {
        line: b"REPLAY;CLIENT_ID=a;EVENT_NAME=x/*;FROM_POSITION=earliest\0",
        code: "INVALID_POSITION",
        names: &["Invalid or expired position marker"],
    },
    // NUL in JSON: a raw control character is not JSON.
    Case {
        line: b"PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={\"k\":\"a\0b\"};DELIVERY_TO=*",
        code: "INVALID_PAYLOAD",
        names: &["PAYLOAD", "JSON"],
    },
    Case {
        line: b"PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD=QUJD\0;DELIVERY_TO=*",
        code: "INVALID_PAYLOAD",
        names: &["PAYLOAD", "base64"],
    },
    Case {
        line: b"PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={};DELIVERY_TO=*;METADATA={\"k\":\"\0\"}",
        code: "INVALID_PARAMETERS",
        names: &["METADATA", "JSON object"],
    },
    Case {
        line: b"PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={};DELIVERY_TO=*;METADATA={\"\0\":1}",
        code: "INVALID_PARAMETERS",
        names: &["METADATA", "JSON object"],
    },
];

/// Sends `case` and checks its one reply.
async fn check_case(c: &mut Client, case: &Case) -> String {
    let mut line = case.line.to_vec();
    line.push(b'\n');
    c.send_raw(&line).await;
    let reply = c.line().await;
    check_case_reply(case, &reply);
    reply
}

fn check_case_reply(case: &Case, reply: &str) {
    let shown = String::from_utf8_lossy(case.line);
    let prefix = format!("-FAIL:{};MESSAGE=", case.code);
    assert!(
        reply.starts_with(&prefix),
        "reply to {shown:?}: expected {prefix}..., got {reply:?}"
    );
    assert_fail_shape(reply);
    for name in case.names {
        assert!(
            reply.contains(name),
            "reply to {shown:?} does not say {name:?}: {reply:?}"
        );
    }
    assert!(
        !reply.chars().any(char::is_control),
        "reply to {shown:?} holds a control character: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_and_invalid_utf8_anywhere_get_one_clear_fail_each() {
    let (_dir, srv) = server_with(|_| {}).await;
    let mut c = srv.client().await;
    c.conn("a").await;
    c.sub("a", "x/*").await;

    // One at a time: each gets its one reply, and the next is answered.
    let mut first = Vec::new();
    for case in ENCODING_AND_NUL_CASES {
        first.push(check_case(&mut c, case).await);
    }
    c.ping().await;

    // All again in one write: the same replies, in order, and no more.
    let mut all = Vec::new();
    for case in ENCODING_AND_NUL_CASES {
        all.extend_from_slice(case.line);
        all.push(b'\n');
    }
    all.extend_from_slice(b"PING\n");
    let replies = c.pipeline_raw(&all, ENCODING_AND_NUL_CASES.len() + 1).await;
    assert_eq!(replies[..first.len()], first[..]);
    assert_eq!(replies[first.len()], "+PASS:PONG");

    // Where the grammar allows any text, NUL is text: a REASON with one
    // is accepted.
    c.expect(
        "PAUSE;CLIENT_ID=a;EVENT_NAME=x/*;REASON=a\0b",
        "+PASS:PAUSED;EVENT_NAME=x/*",
    )
    .await;
    // An escaped NUL is valid JSON, stored and replayed byte for byte.
    let payload = r#"{"k":"a\u0000b"}"#;
    let (idem, _) = c.publish_to("a", "x/y", payload, "a").await;
    let rep = c.replay("a", "x/*", "FROM_POSITION=earliest").await;
    assert_eq!(rep.idems(), vec![idem]);
    assert!(
        rep.lines[0].contains(&format!("\"payload\":{payload},")),
        "{}",
        rep.lines[0]
    );
    c.expect_silence(Duration::from_millis(100)).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_byte_blast_gets_one_reply_per_line_and_the_connection_survives() {
    let (_dir, srv) = server_with(|c| c.limits.max_line_len = SMALL_LINE).await;
    let mut rng = Rng::seeded("HOSTILE_SEED", "random byte blast");
    let bystander = Bystander::start(srv.addr, Duration::from_millis(50)).await;
    let mut c = srv.client().await;
    for round in 0..3 {
        let lines = random_lines(&mut rng, 5000, SMALL_LINE);
        let mut bytes = Vec::new();
        for (line, _) in &lines {
            bytes.extend_from_slice(line);
            bytes.push(b'\n');
        }
        let owed: Vec<&(Vec<u8>, Want)> =
            lines.iter().filter(|(_, w)| *w != Want::Nothing).collect();
        let started = Instant::now();
        let replies = c.pipeline_raw(&bytes, owed.len()).await;
        eprintln!(
            "round {round}: {} lines ({} bytes), {} replies in {:?}",
            lines.len(),
            bytes.len(),
            replies.len(),
            started.elapsed()
        );
        for (i, ((line, want), reply)) in owed.iter().zip(&replies).enumerate() {
            check_reply(i, line, want, reply);
        }
        // Nothing more was owed: the next reply is PING's.
        c.ping().await;
    }
    c.expect_silence(Duration::from_millis(100)).await;
    bystander.finish(1).await;
    srv.stop().await;
}

// ------------------------------- 3. unterminated JSON, huge key lists

/// `n` copies of `piece(i)` joined by `;`.
fn pairs(n: usize, piece: impl Fn(usize) -> String) -> String {
    (0..n).map(piece).collect::<Vec<_>>().join(";")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unterminated_json_and_huge_key_lists_get_a_clear_fail_promptly() {
    let (_dir, srv) = server_with(|_| {}).await;
    let bystander = Bystander::start(srv.addr, Duration::from_millis(50)).await;
    let mut c = srv.client().await;
    c.conn("a").await;
    const PUB: &str = "PUB;CLIENT_ID=a;EVENT_NAME=x/y";
    // Deep enough to overflow any parser that recurses per bracket, and
    // still under the 1 MiB line limit.
    let deep = 400_000;
    let cases: Vec<(String, &str, Vec<&str>)> = vec![
        // Unterminated JSON.
        (
            format!("{PUB};PAYLOAD={{\"k\":\"never closed;DELIVERY_TO=*"),
            "INVALID_PARAMETERS",
            vec!["PAYLOAD", "not closed"],
        ),
        (
            format!("{PUB};DELIVERY_TO=*;PAYLOAD={{\"k\":\"v\\\"}}"),
            "INVALID_PARAMETERS",
            vec!["PAYLOAD", "not closed"],
        ),
        (
            format!("{PUB};DELIVERY_TO=*;PAYLOAD={}", "[".repeat(2 * deep)),
            "INVALID_PARAMETERS",
            vec!["PAYLOAD", "not closed"],
        ),
        (
            format!("{PUB};PAYLOAD={{}};DELIVERY_TO=*;METADATA={{\"k\":1"),
            "INVALID_PARAMETERS",
            vec!["METADATA", "not closed"],
        ),
        (
            format!(
                "{PUB};PAYLOAD={{}};DELIVERY_TO=*;METADATA={{\"k\":{}",
                "{\"k\":".repeat(deep / 4)
            ),
            "INVALID_PARAMETERS",
            vec!["METADATA", "not closed"],
        ),
        // Closed, but nested 400,000 deep: the metadata is refused (the
        // payload is valid JSON, see below).
        (
            format!(
                "{PUB};PAYLOAD={{}};DELIVERY_TO=*;METADATA={{\"k\":{}{}}}",
                "[".repeat(deep),
                "]".repeat(deep)
            ),
            "INVALID_PARAMETERS",
            vec!["METADATA", "JSON object"],
        ),
        // 10,000 pairs: unknown keys, one unknown key repeated, a known key
        // repeated, empty pairs, pairs without a key.
        (
            format!(
                "{PUB};PAYLOAD={{}};DELIVERY_TO=*;{}",
                pairs(10_000, |i| format!("K{i}=V"))
            ),
            "INVALID_PARAMETERS",
            vec!["K0", "PUB does not take"],
        ),
        (
            format!("{PUB};{}", pairs(10_000, |_| "COLOR=red".into())),
            "INVALID_PARAMETERS",
            vec!["COLOR"],
        ),
        (
            format!("{PUB};{}", pairs(10_000, |_| "CLIENT_ID=a".into())),
            "INVALID_PARAMETERS",
            vec!["CLIENT_ID", "more than once"],
        ),
        (
            format!(
                "REPLAY;CLIENT_ID=a;EVENT_NAME=x/*;FROM_POSITION=earliest;{}",
                pairs(10_000, |_| "LIMIT=1".into())
            ),
            "INVALID_PARAMETERS",
            vec!["LIMIT", "more than once"],
        ),
        (
            format!("{PUB};{}", ";".repeat(10_000)),
            "INVALID_PARAMETERS",
            vec!["KEY=VALUE"],
        ),
        (
            format!("{PUB};{}", pairs(10_000, |_| "=".into())),
            "INVALID_PARAMETERS",
            vec!["KEY=VALUE"],
        ),
        // 10,000 distinct recipients: ten times the limit.
        (
            format!(
                "{PUB};PAYLOAD={{}};DELIVERY_TO={}",
                (0..10_000)
                    .map(|i| format!("r{i}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            "INVALID_PARAMETERS",
            vec!["DELIVERY_TO", "1000"],
        ),
        // A verb the server does not know wins over all of it.
        (
            format!("BOGUS;{}", pairs(10_000, |i| format!("K{i}=V"))),
            "UNKNOWN_COMMAND",
            vec!["BOGUS"],
        ),
    ];
    for (line, code, names) in &cases {
        let started = Instant::now();
        let reply = c.cmd(line).await;
        let took = started.elapsed();
        let shown = &line[..line.len().min(80)];
        let prefix = format!("-FAIL:{code};MESSAGE=");
        assert!(
            reply.starts_with(&prefix),
            "reply to {shown:?}...: expected {prefix}..., got {:?}",
            &reply[..reply.len().min(300)]
        );
        assert_fail_shape(&reply);
        for name in names {
            assert!(
                reply.contains(name),
                "reply to {shown:?}... lacks {name:?}: {reply}"
            );
        }
        assert!(took < PROMPT, "{shown:?}... answered after {took:?}");
    }

    // Valid, if large: a payload nested 400,000 deep (any JSON value is a
    // payload, and checking it must not take the server's stack), 10,000
    // copies of one recipient, and metadata of 10,000 members (then of one
    // member given 10,000 times).
    let started = Instant::now();
    parse_published(
        &c.cmd(&format!(
            "{PUB};DELIVERY_TO=b;PAYLOAD={}{}",
            "[".repeat(deep),
            "]".repeat(deep)
        ))
        .await,
    );
    let many_same = format!(
        "{PUB};PAYLOAD={{}};DELIVERY_TO={}",
        vec!["b"; 10_000].join(",")
    );
    parse_published(&c.cmd(&many_same).await);
    let members = (0..10_000)
        .map(|i| format!("\"m{i}\":{i}"))
        .collect::<Vec<_>>()
        .join(",");
    parse_published(
        &c.cmd(&format!(
            "{PUB};PAYLOAD={{}};DELIVERY_TO=b;METADATA={{{members}}}"
        ))
        .await,
    );
    let repeated = vec!["\"m\":1"; 10_000].join(",");
    parse_published(
        &c.cmd(&format!(
            "{PUB};PAYLOAD={{}};DELIVERY_TO=b;METADATA={{{repeated}}}"
        ))
        .await,
    );
    assert!(started.elapsed() < 3 * PROMPT, "{:?}", started.elapsed());

    // 200 lines of 10,000 unknown keys each (about 20 MB) in one write:
    // 200 replies and the PING's, while the other client is answered.
    let heavy = format!("{PUB};{}", pairs(10_000, |i| format!("K{i}=V")));
    let mut flood = Vec::with_capacity(200 * (heavy.len() + 1) + 5);
    for _ in 0..200 {
        flood.extend_from_slice(heavy.as_bytes());
        flood.push(b'\n');
    }
    flood.extend_from_slice(b"PING\n");
    let started = Instant::now();
    let replies = c.pipeline_raw(&flood, 201).await;
    eprintln!(
        "200 lines of 10,000 keys answered in {:?}",
        started.elapsed()
    );
    assert!(replies[..200]
        .iter()
        .all(|r| r.starts_with("-FAIL:INVALID_PARAMETERS;MESSAGE=PUB does not take the key K0 ")));
    assert_eq!(replies[200], "+PASS:PONG");
    bystander.finish(5).await;
    srv.stop().await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_full_of_distinct_recipients_are_refused_promptly() {
    // The real binary: a server thread stuck in a parse cannot be stopped
    // from inside the test, a process can.
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), "").await;
    // As many distinct recipients as fit in the default 1 MiB line.
    let mut line = String::from("PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={};DELIVERY_TO=");
    let mut n = 0;
    while line.len() < Config::default().limits.max_line_len - 16 {
        line.push_str(&format!("r{n},"));
        n += 1;
    }
    line.push_str("last");
    let bystander = Bystander::start(server.addr, Duration::from_millis(50)).await;
    // One line per runtime thread of a 2-core machine.
    let mut hostile = Vec::new();
    for k in 0..2 {
        let (addr, line) = (server.addr, line.clone());
        hostile.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.conn(&format!("h{k}")).await;
            c.send(&line).await;
            let started = Instant::now();
            (c.try_line(PROMPT).await, started.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    bystander.finish(1).await;
    for task in hostile {
        let (reply, took) = task.await.expect("hostile client");
        let reply = reply.unwrap_or_else(|| {
            panic!(
                "{} distinct recipients not refused within {PROMPT:?}",
                n + 1
            )
        });
        eprintln!("{} distinct recipients refused in {took:?}", n + 1);
        assert!(
            reply.starts_with("-FAIL:INVALID_PARAMETERS;MESSAGE=DELIVERY_TO "),
            "{reply}"
        );
        assert!(reply.contains("1000"), "names the limit: {reply}");
    }
    server.stop().await;
}

// ----------------------------------------------- 4. slowloris, silence

const INTERVAL: Duration = Duration::from_millis(300);
const TIMEOUT: Duration = Duration::from_millis(500);
/// Slack on top of interval + timeout before a close counts as late.
const CLOSE_SLACK: Duration = Duration::from_secs(4);

/// A server whose heartbeat runs on `INTERVAL` and `TIMEOUT`.
async fn heartbeat_server(adjust: impl FnOnce(&mut Config)) -> (tempfile::TempDir, TestServer) {
    server_with(|c| {
        c.heartbeat.interval = INTERVAL;
        c.heartbeat.timeout = TIMEOUT;
        adjust(c);
    })
    .await
}

/// Asserts the server sent `PING` and then closed the connection between
/// interval + timeout and that plus `CLOSE_SLACK` after it fell silent.
fn assert_closed_by_heartbeat(what: &str, closed: &Closed) {
    let after = closed.after.unwrap_or_else(|| {
        panic!(
            "{what}: still open after {:?} ({} bytes trickled, lines {:?})",
            INTERVAL + TIMEOUT + CLOSE_SLACK,
            closed.trickled,
            closed.lines
        )
    });
    assert!(
        closed.lines.iter().any(|l| l == "PING"),
        "{what}: closed without a PING first: {:?}",
        closed.lines
    );
    assert!(
        after >= INTERVAL + TIMEOUT - Duration::from_millis(20),
        "{what}: closed {after:?} after falling silent, before interval + timeout"
    );
    assert!(
        after <= INTERVAL + TIMEOUT + CLOSE_SLACK,
        "{what}: closed only {after:?} after falling silent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_silent_connections_are_closed_by_the_heartbeat() {
    let (_dir, srv) = heartbeat_server(|_| {}).await;
    // Every 100 ms, so never idle for the interval itself.
    let bystander = Bystander::start(srv.addr, Duration::from_millis(100)).await;
    let wait = INTERVAL + TIMEOUT + CLOSE_SLACK;
    let addr = srv.addr;
    let mut hostile: Vec<(&str, JoinHandle<Closed>)> = Vec::new();
    for _ in 0..6 {
        // One byte a second, as a classic slowloris does.
        hostile.push((
            "one byte a second",
            tokio::spawn(trickle(addr, &[], Some(Duration::from_secs(1)), wait)),
        ));
        // Bytes far more often than the heartbeat interval: bytes that
        // never finish a line are not an answer.
        hostile.push((
            "one byte every 20 ms",
            tokio::spawn(trickle(addr, &[], Some(Duration::from_millis(20)), wait)),
        ));
        hostile.push((
            "connected, then one byte every 20 ms",
            tokio::spawn(trickle(
                addr,
                &["CONN;CLIENT_ID=slow"],
                Some(Duration::from_millis(20)),
                wait,
            )),
        ));
        hostile.push((
            "connects and sends nothing",
            tokio::spawn(trickle(addr, &[], None, wait)),
        ));
    }
    for (what, task) in hostile {
        let closed = task.await.expect("hostile client task");
        if what.starts_with("connected") {
            assert_eq!(closed.lines[0], "+PASS:CONNECTED;CLIENT_ID=slow");
        }
        if what.contains("20 ms") {
            assert!(
                closed.trickled >= 20,
                "{what}: only {} bytes",
                closed.trickled
            );
        }
        assert_closed_by_heartbeat(what, &closed);
    }
    // The server let go of them all: only the well-behaved client is left.
    assert!(
        await_tcp_connections(&srv, 1, PROMPT).await.is_some(),
        "hostile connections still counted: {}",
        tcp_connections(&srv).await
    );
    bystander.finish(5).await;
    srv.stop().await;
}

// ------------------------------------------ 5. half-open connections

/// Opens a connection, sends `lines` and then neither reads nor writes,
/// like a peer that vanished. The stream is returned to keep it open.
async fn vanish_after(addr: SocketAddr, lines: &[&str]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut bytes = Vec::new();
    for line in lines {
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
    }
    stream.write_all(&bytes).await.expect("write");
    stream
}

/// Reads everything the server sent on `stream` up to its close; panics if
/// it does not close within `PROMPT`.
async fn read_to_close(stream: TcpStream) -> Vec<String> {
    let mut read = BufReader::new(stream);
    let mut lines = Vec::new();
    loop {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(PROMPT, read.read_until(b'\n', &mut buf))
            .await
            .expect("the server did not close the connection")
            .unwrap_or(0);
        if n == 0 {
            return lines;
        }
        lines.push(String::from_utf8_lossy(&buf).trim_end().to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_client_that_vanishes_is_closed_after_interval_plus_timeout() {
    let (_dir, srv) = heartbeat_server(|_| {}).await;
    let bystander = Bystander::start(srv.addr, Duration::from_millis(100)).await;
    let stream = vanish_after(
        srv.addr,
        &["CONN;CLIENT_ID=gone", "SUB;CLIENT_ID=gone;EVENT_NAME=x/*"],
    )
    .await;
    let silent = Instant::now();
    assert!(
        await_tcp_connections(&srv, 2, PROMPT).await.is_some(),
        "the vanishing client was never counted"
    );
    // Seen from the server: its count drops once the connection is closed.
    let closed = await_tcp_connections(&srv, 1, INTERVAL + TIMEOUT + CLOSE_SLACK)
        .await
        .map(|_| silent.elapsed())
        .unwrap_or_else(|| panic!("still open {:?} after it vanished", silent.elapsed()));
    eprintln!("vanished client closed {closed:?} after its last line");
    assert!(
        closed >= INTERVAL + TIMEOUT,
        "closed {closed:?} after its last line, before interval + timeout"
    );
    // What it would have read: its replies, one PING, then the close.
    assert_eq!(
        read_to_close(stream).await,
        [
            "+PASS:CONNECTED;CLIENT_ID=gone",
            "+PASS:SUBSCRIBED;EVENT_NAME=x/*",
            "PING"
        ]
    );
    bystander.finish(5).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_subscriber_with_deliveries_pending_is_closed_by_the_send_timeout() {
    const EVENTS: usize = 2000;
    // The heartbeat cannot help here: its PING would wait behind the
    // stuck writes. The send timeout ends a connection whose client reads
    // nothing.
    let (_dir, srv) = heartbeat_server(|c| {
        c.delivery.max_unsettled = EVENTS + 1;
        c.limits.send_timeout = TIMEOUT;
    })
    .await;
    let bystander = Bystander::start(srv.addr, Duration::from_millis(100)).await;
    let stream = vanish_after(
        srv.addr,
        &["CONN;CLIENT_ID=gone", "SUB;CLIENT_ID=gone;EVENT_NAME=x/*"],
    )
    .await;
    assert!(await_tcp_connections(&srv, 2, PROMPT).await.is_some());
    // About 16 MB of deliveries: more than the socket buffers hold, so the
    // server's writes to the vanished subscriber stop midway.
    let mut publisher = srv.client().await;
    publisher.conn("pub").await;
    let pad = "p".repeat(8 * 1024);
    let published = publisher
        .publish_many("pub", EVENTS, |i| {
            ("x/y".into(), format!("{{\"i\":{i},\"pad\":\"{pad}\"}}"))
        })
        .await;
    assert_eq!(published.len(), EVENTS);
    drop(publisher);
    let published_at = Instant::now();
    // Left: the well-behaved client, and the vanished one until closed.
    let bound = INTERVAL + TIMEOUT + CLOSE_SLACK;
    let closed = await_tcp_connections(&srv, 1, bound).await;
    assert!(
        closed.is_some(),
        "the vanished subscriber is still open {:?} after the last publish (bound {bound:?})",
        published_at.elapsed()
    );
    bystander.finish(5).await;
    drop(stream);
    srv.stop().await;
}

// ----------------------------------- 6. a stalled reader of 1M events

/// Publishes `total` small events over `conns` connections, each keeping
/// about `window` publishes in flight; `name(k, i)` names the `i`th event
/// of connection `k`.
async fn load(
    addr: SocketAddr,
    total: usize,
    conns: usize,
    window: usize,
    name: fn(usize, usize) -> String,
) {
    const BATCH: usize = 100;
    let per = total / conns;
    assert_eq!(per * conns, total, "an even split");
    let mut tasks = Vec::new();
    for k in 0..conns {
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::with_capacity(256 * 1024, read);
            let id = format!("loader{k}");
            write
                .write_all(format!("CONN;CLIENT_ID={id}\n").as_bytes())
                .await
                .expect("write");
            let mut line = Vec::new();
            read.read_until(b'\n', &mut line).await.expect("read");
            assert_eq!(line, format!("+PASS:CONNECTED;CLIENT_ID={id}\n").as_bytes());
            let room = Arc::new(Semaphore::new(window));
            let writer = {
                let room = Arc::clone(&room);
                async move {
                    let mut buf = Vec::with_capacity(BATCH * 80);
                    for start in (0..per).step_by(BATCH) {
                        let n = BATCH.min(per - start);
                        room.acquire_many(n as u32)
                            .await
                            .expect("semaphore open")
                            .forget();
                        buf.clear();
                        for i in start..start + n {
                            buf.extend_from_slice(
                                format!(
                                    "PUB;CLIENT_ID={id};EVENT_NAME={};PAYLOAD={{\"i\":{i}}};DELIVERY_TO=*\n",
                                    name(k, i)
                                )
                                .as_bytes(),
                            );
                        }
                        write.write_all(&buf).await.expect("write");
                    }
                    write
                }
            };
            let reader = async {
                for i in 0..per {
                    line.clear();
                    tokio::time::timeout(LINE_TIMEOUT, read.read_until(b'\n', &mut line))
                        .await
                        .expect("a PUB reply within 10 s")
                        .expect("read");
                    assert!(
                        line.starts_with(b"+PASS:PUBLISHED;"),
                        "PUB {i}: {:?}",
                        String::from_utf8_lossy(&line)
                    );
                    room.add_permits(1);
                }
            };
            let (write, ()) = tokio::join!(writer, reader);
            drop(write);
        }));
    }
    for task in tasks {
        task.await.expect("loader");
    }
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_stalled_in_a_replay_of_a_million_events_keeps_server_memory_flat() {
    const EVENTS: usize = 1_000_000;
    const STALL: Duration = Duration::from_secs(6);
    const BOUND: u64 = 64 * MIB;
    let dir = tempfile::tempdir().expect("tempdir");
    // The LIMIT ceiling raised, so one REPLAY asks for every event.
    let server = ServerProcess::start(dir.path(), "[limits]\nmax_replay_limit = 1000000\n").await;
    let started = Instant::now();
    load(server.addr, EVENTS, 4, 1000, |_, _| "big/e/x".into()).await;
    eprintln!("loaded {EVENTS} events in {:?}", started.elapsed());

    let mut reader = Client::connect(server.addr).await;
    reader.conn("reader").await;
    reader.sub("reader", "big/*").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss();
    reader
        .send(&format!(
            "REPLAY;CLIENT_ID=reader;EVENT_NAME=big/*;FROM_POSITION=earliest;LIMIT={EVENTS}"
        ))
        .await;
    assert_eq!(
        reader.line().await,
        format!("+PASS:REPLAY_STARTED;EVENT_NAME=big/*;COUNT={EVENTS}")
    );
    for _ in 0..5 {
        let line = reader.line().await;
        assert!(line.starts_with("+RECORD:"), "{line}");
    }

    // The reader stops reading. Another client is served meanwhile, and
    // the server's memory is sampled all along.
    let stalled = Instant::now();
    let mut other = Client::connect(server.addr).await;
    let asked = Instant::now();
    other.conn("other").await;
    other.sub("other", "big/*").await;
    other.ping().await;
    let rep = other
        .replay("other", "big/*", "FROM_POSITION=earliest;LIMIT=5")
        .await;
    assert_eq!(rep.count, 5);
    let (reply, _) = other
        .call("PUB;CLIENT_ID=other;EVENT_NAME=calm/e/x;PAYLOAD={};DELIVERY_TO=other")
        .await;
    parse_published(&reply);
    let answered = asked.elapsed();
    assert!(
        answered < PROMPT,
        "the other client waited {answered:?} behind the stalled replay"
    );
    let mut peak = before;
    while stalled.elapsed() < STALL {
        peak = peak.max(server.rss());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stall_growth = peak.saturating_sub(before);
    eprintln!(
        "server RSS before the replay {}, peak during the {STALL:?} stall {} (+{}); \
         the other client was answered in {answered:?}",
        mib(before),
        mib(peak),
        mib(stall_growth)
    );
    assert!(
        stall_growth < BOUND,
        "server RSS grew {} while a reader stalled (bound {})",
        mib(stall_growth),
        mib(BOUND)
    );

    // The reader goes on: exactly the announced records, then its PONG.
    let resumed = Instant::now();
    let mut stream_peak = peak;
    for i in 5..EVENTS {
        let line = reader.line().await;
        assert!(line.starts_with("+RECORD:"), "record {i}: {line}");
        if i % 50_000 == 0 {
            stream_peak = stream_peak.max(server.rss());
        }
    }
    reader.ping().await;
    eprintln!(
        "read the other {} records in {:?}; RSS peak while streaming {} (+{})",
        EVENTS - 5,
        resumed.elapsed(),
        mib(stream_peak),
        mib(stream_peak.saturating_sub(before))
    );
    assert!(
        stream_peak.saturating_sub(before) < BOUND,
        "server RSS grew {} while streaming the replay (bound {})",
        mib(stream_peak.saturating_sub(before)),
        mib(BOUND)
    );
    drop((reader, other));
    server.stop().await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_owed_to_a_client_that_does_not_read_keep_server_memory_flat() {
    const LINES: usize = 128;
    const BOUND: u64 = 64 * MIB;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), "").await;
    let max = Config::default().limits.max_line_len;
    let mut line = b"PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={};DELIVERY_TO=".to_vec();
    line.resize(max - 1, 0x01);
    line.push(b'\n');
    let mut hostile = TcpStream::connect(server.addr).await.expect("connect");
    let before = server.rss();
    // 128 lines of 1 MiB, never reading a reply (and well under the 1024
    // owed replies after which the server stops reading).
    for _ in 0..LINES {
        tokio::time::timeout(PROMPT, hostile.write_all(&line))
            .await
            .expect("the server stopped reading")
            .expect("write");
    }
    let mut peak = before;
    let sampling = Instant::now();
    while sampling.elapsed() < Duration::from_secs(3) {
        peak = peak.max(server.rss());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let growth = peak.saturating_sub(before);
    eprintln!(
        "server RSS before {}, peak {} (+{}) with {LINES} error replies owed",
        mib(before),
        mib(peak),
        mib(growth)
    );
    let mut other = Client::connect(server.addr).await;
    other.ping().await;
    assert!(
        growth < BOUND,
        "server RSS grew {} for {LINES} refused lines owed to one client (bound {})",
        mib(growth),
        mib(BOUND)
    );
    drop(hostile);
    server.stop().await;
}

// ------------------------------------ 7. events to a new name each

/// Events to many names, one each, with a small index cache: a commit of
/// a few thousand such events writes keys all over the store's index.
/// Each name still costs the server some memory (the set of names, and
/// sled's table of its pages): 38–88 MiB over these 80,000, in four runs
/// of this test. When the nodes sled replaced were left uncollected, it
/// was 823 MiB.
///
/// Then a subscription to all of them, replays of all of them, and a live
/// delivery, in publication order: 11.8 MiB more at their peak. When a
/// scan held a read of every name the pattern matched, it was 304 MiB.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_to_a_new_name_each_keep_server_memory_bounded() {
    const NAMES: usize = 40_000;
    const BOUND: u64 = 160 * MIB;
    const READ_BOUND: u64 = 64 * MIB;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(
        dir.path(),
        "[store]\nindex_cache = \"16MiB\"\n[limits]\nmax_replay_limit = 1000000\n",
    )
    .await;
    // The first names fill the index's cache; the server's memory is
    // measured from there.
    let started = Instant::now();
    load(server.addr, NAMES, 4, 1000, |k, i| format!("many/a{k}/{i}")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss();
    load(server.addr, NAMES, 4, 1000, |k, i| format!("many/b{k}/{i}")).await;
    load(server.addr, NAMES, 4, 1000, |k, i| format!("many/c{k}/{i}")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss();
    eprintln!(
        "published to {} names in {:?}; server RSS {} after the first {NAMES}, {} after the rest (+{})",
        3 * NAMES,
        started.elapsed(),
        mib(before),
        mib(after),
        mib(after.saturating_sub(before))
    );
    assert!(
        after.saturating_sub(before) < BOUND,
        "server RSS grew {} over {} more names (bound {})",
        mib(after.saturating_sub(before)),
        2 * NAMES,
        mib(BOUND)
    );

    let total = 3 * NAMES as u64;
    let mut reader = Client::connect(server.addr).await;
    reader.conn("reader").await;
    reader.sub("reader", "many/*").await;
    reader.ping().await;
    let before = server.rss();
    let sampling = server.sample_rss();
    let first = reader
        .replay("reader", "many/*", "FROM_POSITION=earliest;LIMIT=50")
        .await;
    assert_eq!(first.blocks(), (1..=50).collect::<Vec<u64>>());
    let all = reader
        .replay(
            "reader",
            "many/*",
            &format!("FROM_POSITION=earliest;LIMIT={total}"),
        )
        .await;
    assert!(
        all.blocks().into_iter().eq(1..=total),
        "a replay of all {total} events out of order or incomplete"
    );
    let mut publisher = Client::connect(server.addr).await;
    publisher.conn("publisher").await;
    let (idem, _) = publisher
        .publish("publisher", "many/b0/7", "{\"late\":1}")
        .await;
    let live = parse_record(&reader.line().await);
    assert_eq!(live["idem"], idem.as_str());
    let peak = sampling.finish();
    eprintln!(
        "server RSS {} before the replays over {total} names, peak {} (+{})",
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before))
    );
    assert!(
        peak.saturating_sub(before) < READ_BOUND,
        "server RSS grew {} in replays over {total} names (bound {})",
        mib(peak.saturating_sub(before)),
        mib(READ_BOUND)
    );
    drop((reader, publisher));
    server.stop().await;
}

// ------------------------------- 8. a flood up to max_connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_up_to_max_connections_leaves_a_well_behaved_client_served() {
    const MAX: usize = 64;
    let (_dir, srv) = server_with(|c| {
        c.limits.max_connections = MAX;
        c.limits.max_line_len = SMALL_LINE;
    })
    .await;
    let mut good = srv.client().await;
    good.conn("good").await;
    good.sub("good", "calm/*").await;
    // The store's first write opens its files: done before the flood, so
    // the rounds below time only what the flood costs.
    let (reply, _) = good
        .call("PUB;CLIENT_ID=good;EVENT_NAME=warm/e/x;PAYLOAD={};DELIVERY_TO=good")
        .await;
    parse_published(&reply);

    let stop = CancellationToken::new();
    let answered = Arc::new(AtomicUsize::new(0));
    let mut rng = Rng::seeded("HOSTILE_SEED", "connection flood");
    let mut flood: Vec<JoinHandle<()>> = Vec::new();
    for i in 0..MAX - 1 {
        let (addr, stop) = (srv.addr, stop.clone());
        let (answered, seed) = (Arc::clone(&answered), rng.next());
        flood.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let mut rng = Rng(seed);
            match i % 3 {
                // Idle: connects and waits.
                0 => stop.cancelled().await,
                // Garbage, reading every reply.
                1 => {
                    let (read, mut write) = stream.split();
                    let mut read = BufReader::new(read);
                    while !stop.is_cancelled() {
                        let lines = random_lines(&mut rng, 50, SMALL_LINE);
                        let owed = lines.iter().filter(|(_, w)| *w != Want::Nothing).count();
                        let mut bytes = Vec::new();
                        for (line, _) in &lines {
                            bytes.extend_from_slice(line);
                            bytes.push(b'\n');
                        }
                        let read_all = async {
                            let mut buf = Vec::new();
                            for _ in 0..owed {
                                buf.clear();
                                let n =
                                    tokio::time::timeout(PROMPT, read.read_until(b'\n', &mut buf))
                                        .await
                                        .expect("a garbage sender got no reply within PROMPT")
                                        .expect("read");
                                assert!(n > 0, "a garbage sender was closed");
                            }
                        };
                        let (written, ()) = tokio::join!(write.write_all(&bytes), read_all);
                        written.expect("write");
                        answered.fetch_add(owed, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                // Mostly endless lines, some garbage, never reading: the
                // server stops reading it once its replies back up.
                _ => {
                    while !stop.is_cancelled() {
                        let mut bytes = Vec::new();
                        for (line, _) in random_lines(&mut rng, 5, SMALL_LINE) {
                            bytes.extend_from_slice(&line);
                            bytes.push(b'\n');
                        }
                        bytes.resize(bytes.len() + 64 * SMALL_LINE, b'z');
                        tokio::select! {
                            () = stop.cancelled() => break,
                            written = stream.write_all(&bytes) => {
                                if written.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }));
    }
    assert!(
        await_tcp_connections(&srv, MAX, PROMPT).await.is_some(),
        "the flood did not reach {MAX} connections: {}",
        tcp_connections(&srv).await
    );

    // The well-behaved client publishes, replays and pings; every answer
    // comes within PROMPT.
    let mut worst = Duration::ZERO;
    for round in 0..20 {
        let asked = Instant::now();
        let (reply, _) = good
            .call(&format!(
                "PUB;CLIENT_ID=good;EVENT_NAME=calm/e/x;PAYLOAD={{\"round\":{round}}};DELIVERY_TO=good"
            ))
            .await;
        parse_published(&reply);
        let rep = good
            .replay_line(
                "REPLAY;CLIENT_ID=good;EVENT_NAME=calm/*;FROM_POSITION=earliest;LIMIT=3",
                "calm/*",
                true,
            )
            .await;
        assert_eq!(rep.count, 3.min(round + 1));
        good.ping_collecting_live().await;
        worst = worst.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let garbage_answered = answered.load(Ordering::Relaxed);
    eprintln!(
        "{MAX} connections; slowest round of the well-behaved client {worst:?}; \
         {garbage_answered} garbage lines answered meanwhile"
    );
    assert!(worst < PROMPT, "a round took {worst:?} (bound {PROMPT:?})");
    assert!(
        garbage_answered > 0,
        "the garbage senders were not served at all"
    );
    assert_eq!(tcp_connections(&srv).await, MAX);
    stop.cancel();
    for task in flood {
        task.await.expect("flood connection");
    }
    assert!(
        await_tcp_connections(&srv, 1, PROMPT).await.is_some(),
        "flood connections still counted after they closed"
    );
    good.ping_collecting_live().await;
    srv.stop().await;
}
