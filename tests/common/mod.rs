//! Shared harness for the TCP integration tests: a server on a temporary
//! data directory, and a line client that fails (never hangs) when a reply
//! does not come.
#![allow(dead_code)]

pub mod http;
pub mod rng;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ensync_server::config::Config;
use ensync_server::server;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a test waits for any one line before it fails.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits for `server::run` to return.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The exact MISSING_PARAMETERS reply of a range REPLAY (the seed's text).
pub const REPLAY_MISSING: &str = "-FAIL:MISSING_PARAMETERS;MESSAGE=Missing required replay data. Ensure CLIENT_ID, EVENT_NAME, and FROM_POSITION are passed";
/// The exact INVALID_POSITION reply.
pub const INVALID_POSITION: &str =
    "-FAIL:INVALID_POSITION;MESSAGE=Invalid or expired position marker";

/// A running server; `stop` shuts it down and waits until it released the
/// data directory.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The HTTP listener: WebSocket at `/message`, the admin API, health
    /// and metrics.
    pub http_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), server::ServerError>>,
}

impl TestServer {
    /// Triggers shutdown and awaits `server::run`; panics if it fails or
    /// takes longer than `STOP_TIMEOUT`.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let joined = tokio::time::timeout(STOP_TIMEOUT, &mut self.handle)
            .await
            .expect("server::run did not return within the stop timeout");
        joined
            .expect("server task panicked")
            .expect("server::run returned an error");
    }

    /// Opens a client connection to this server.
    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }
}

/// Starts a server with the default config on `data_dir`.
pub async fn start_server(data_dir: &Path) -> TestServer {
    start_server_with(Config {
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    })
    .await
}

/// Starts a server with `config` (its `data_dir` must be set by the caller).
pub async fn start_server_with(config: Config) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = rx.await;
    };
    let http = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let http_addr = http.local_addr().expect("local addr");
    let listeners = server::Listeners {
        tcp: listener,
        http: Some(http),
    };
    let handle = tokio::spawn(server::run(listeners, config, shutdown));
    TestServer {
        addr,
        http_addr,
        shutdown: Some(tx),
        handle,
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Formats `ms` since the epoch as an RFC 3339 date-time, shifted to the
/// UTC offset `offset_min` (minutes east), with milliseconds.
pub fn rfc3339(ms: u64, offset_min: i64) -> String {
    let local_ms = ms as i64 + offset_min * 60_000;
    let secs = local_ms.div_euclid(1000);
    let millis = local_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let zone = if offset_min == 0 {
        "Z".to_string()
    } else {
        let sign = if offset_min < 0 { '-' } else { '+' };
        let a = offset_min.abs();
        format!("{sign}{:02}:{:02}", a / 60, a % 60)
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}{zone}",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// Howard Hinnant's days-since-epoch to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A published event as the PUB reply described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub idem: String,
    pub timestamp: u64,
}

/// Parses `+PASS:PUBLISHED;IDEM=evt_<24 hex>;TIMESTAMP=<ms>`; panics with
/// the line otherwise.
pub fn parse_published(line: &str) -> Published {
    let rest = line
        .strip_prefix("+PASS:PUBLISHED;IDEM=")
        .unwrap_or_else(|| panic!("not a PUB reply: {line:?}"));
    let (idem, ts) = rest
        .split_once(";TIMESTAMP=")
        .unwrap_or_else(|| panic!("PUB reply without TIMESTAMP: {line:?}"));
    let hex = idem
        .strip_prefix("evt_")
        .unwrap_or_else(|| panic!("IDEM is not evt_...: {line:?}"));
    assert!(
        hex.len() == 24
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "IDEM is not evt_<24 lowercase hex>: {line:?}"
    );
    let timestamp = ts
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("TIMESTAMP is not a u64: {line:?}"));
    Published {
        idem: idem.to_string(),
        timestamp,
    }
}

/// One range replay as read off the wire.
#[derive(Debug)]
pub struct Replayed {
    /// The `+PASS:REPLAY_STARTED;...` line.
    pub header: String,
    /// COUNT from the header.
    pub count: usize,
    /// The replayed `+RECORD:` lines, as received.
    pub lines: Vec<String>,
    /// The same records, parsed.
    pub records: Vec<Value>,
    /// Unmarked (live) `+RECORD:` lines seen while reading the replay.
    pub live: Vec<String>,
}

impl Replayed {
    /// The records' `idem`s in order.
    pub fn idems(&self) -> Vec<String> {
        self.records
            .iter()
            .map(|r| r["idem"].as_str().expect("idem is a string").to_string())
            .collect()
    }

    /// The records' `block`s in order, parsed from their JSON strings.
    pub fn blocks(&self) -> Vec<u64> {
        self.records.iter().map(block_of).collect()
    }
}

/// A record's block: a JSON string holding a decimal u64.
pub fn block_of(record: &Value) -> u64 {
    record["block"]
        .as_str()
        .unwrap_or_else(|| panic!("block is not a JSON string: {record}"))
        .parse()
        .unwrap_or_else(|_| panic!("block is not a decimal u64: {record}"))
}

/// Parses a `+RECORD:{json}` (or `+REPLAY:{json}`) line.
pub fn parse_record(line: &str) -> Value {
    let json = line
        .strip_prefix("+RECORD:")
        .or_else(|| line.strip_prefix("+REPLAY:"))
        .unwrap_or_else(|| panic!("not a record line: {line:?}"));
    serde_json::from_str(json).unwrap_or_else(|e| panic!("record is not JSON ({e}): {line:?}"))
}

/// Whether a record carries the replay mark.
pub fn is_replayed(record: &Value) -> bool {
    record["metadata"]["REPLAYED"] == Value::Bool(true)
}

/// The line with `"replayTimestamp":<digits>` replaced by a fixed token,
/// so two replays of the same events compare equal.
pub fn without_replay_timestamp(line: &str) -> String {
    let key = "\"replayTimestamp\":";
    let Some(start) = line.find(key) else {
        return line.to_string();
    };
    let digits_at = start + key.len();
    let end = line[digits_at..]
        .find(|c: char| !c.is_ascii_digit())
        .map_or(line.len(), |i| digits_at + i);
    format!("{}{}<T>{}", &line[..start], key, &line[end..])
}

/// The `replayTimestamp` a replayed record carries.
pub fn replay_timestamp(record: &Value) -> u64 {
    record["metadata"]["$internal"]["replay_info"]["replayTimestamp"]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric replayTimestamp: {record}"))
}

/// The exact text a record should have on the wire: keys in order, compact.
/// `payload: None` means the key is absent. `metadata` is the raw JSON text.
// One argument per record field, in wire order: written independently of
// the server's own encoder so the tests check it rather than echo it.
#[allow(clippy::too_many_arguments)]
pub fn record_line(
    prefix: &str,
    idem: &str,
    block: u64,
    name: &str,
    logged_at: u64,
    sender: &str,
    payload: Option<&str>,
    metadata: &str,
) -> String {
    let payload = payload.map_or(String::new(), |p| format!("\"payload\":{p},"));
    format!(
        "{prefix}{{\"idem\":\"{idem}\",\"block\":\"{block}\",\"name\":\"{name}\",\"loggedAt\":{logged_at},\"sender\":\"{sender}\",{payload}\"metadata\":{metadata}}}"
    )
}

/// The metadata text of a replayed record: `published` (an object's JSON
/// text, `{}` when none) plus the replay marks at its end.
pub fn replayed_metadata(published: &str, replay_ts: u64) -> String {
    let inner = published
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .expect("published metadata is an object");
    let sep = if inner.is_empty() { "" } else { "," };
    format!(
        "{{{inner}{sep}\"REPLAYED\":true,\"$internal\":{{\"replay_info\":{{\"isReplayed\":true,\"replayTimestamp\":{replay_ts},\"wasAcknowledged\":false}}}}}}"
    )
}

/// A line client over a real TCP connection.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Bytes of a line read only in part when a timeout fired.
    partial: Vec<u8>,
}

impl Client {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::time::timeout(LINE_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (r, w) = stream.into_split();
        Client {
            reader: BufReader::with_capacity(256 * 1024, r),
            writer: w,
            partial: Vec::new(),
        }
    }

    /// Sends `line` followed by LF.
    pub async fn send(&mut self, line: &str) {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.send_raw(&buf).await;
    }

    /// Sends raw bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        tokio::time::timeout(LINE_TIMEOUT, self.writer.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write");
    }

    /// Reads one line (without its LF), or `None` if nothing complete came
    /// within `wait`. Panics on EOF or invalid UTF-8.
    pub async fn try_line(&mut self, wait: Duration) -> Option<String> {
        loop {
            let read =
                tokio::time::timeout(wait, self.reader.read_until(b'\n', &mut self.partial)).await;
            let n = match read {
                Err(_) => return None,
                Ok(r) => r.expect("read"),
            };
            if n == 0 || self.partial.last() != Some(&b'\n') {
                panic!(
                    "connection closed by the server (unterminated: {:?})",
                    String::from_utf8_lossy(&self.partial)
                );
            }
            self.partial.pop();
            let bytes = std::mem::take(&mut self.partial);
            let line = String::from_utf8(bytes).expect("server sent invalid UTF-8");
            // Server heartbeats are not replies; skip them.
            if line == "PING" {
                continue;
            }
            return Some(line);
        }
    }

    /// Reads one line; fails the test after `LINE_TIMEOUT`.
    pub async fn line(&mut self) -> String {
        self.try_line(LINE_TIMEOUT)
            .await
            .expect("no line from the server within 10 s")
    }

    /// Asserts that no line arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(line) = self.try_line(wait).await {
            panic!("expected nothing from the server, got {line:?}");
        }
    }

    /// Sends `line` and returns the next line.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(line).await;
        self.line().await
    }

    /// Sends `line` and asserts the next line is exactly `expected`.
    pub async fn expect(&mut self, line: &str, expected: &str) {
        let got = self.cmd(line).await;
        assert_eq!(got, expected, "reply to {line:?}");
    }

    /// Sends `line` and asserts the reply starts with `prefix` and carries
    /// a non-empty MESSAGE when it is a -FAIL.
    pub async fn expect_prefix(&mut self, line: &str, prefix: &str) -> String {
        let got = self.cmd(line).await;
        assert!(
            got.starts_with(prefix),
            "reply to {line:?}: expected {prefix:?}..., got {got:?}"
        );
        if got.starts_with("-FAIL:") {
            assert_fail_shape(&got);
        }
        got
    }

    /// CONN as `id`, asserting `+PASS:CONNECTED;CLIENT_ID=id`.
    pub async fn conn(&mut self, id: &str) {
        self.expect(
            &format!("CONN;CLIENT_ID={id}"),
            &format!("+PASS:CONNECTED;CLIENT_ID={id}"),
        )
        .await;
    }

    /// SUB `id` to `pattern`, asserting `+PASS:SUBSCRIBED;EVENT_NAME=pattern`.
    pub async fn sub(&mut self, id: &str, pattern: &str) {
        self.expect(
            &format!("SUB;CLIENT_ID={id};EVENT_NAME={pattern}"),
            &format!("+PASS:SUBSCRIBED;EVENT_NAME={pattern}"),
        )
        .await;
    }

    /// PUB addressed to `*`; returns (idem, timestamp).
    pub async fn publish(&mut self, id: &str, name: &str, payload_json: &str) -> (String, u64) {
        self.publish_to(id, name, payload_json, "*").await
    }

    /// PUB addressed to `delivery_to`; returns (idem, timestamp).
    pub async fn publish_to(
        &mut self,
        id: &str,
        name: &str,
        payload: &str,
        delivery_to: &str,
    ) -> (String, u64) {
        let line = format!(
            "PUB;CLIENT_ID={id};EVENT_NAME={name};PAYLOAD={payload};DELIVERY_TO={delivery_to}"
        );
        let reply = self.cmd(&line).await;
        let p = parse_published(&reply);
        (p.idem, p.timestamp)
    }

    /// Writes all `lines` in one `write_all` while reading `replies` lines
    /// back concurrently (the server holds back reading when too many
    /// replies are owed); returns the lines read.
    pub async fn pipeline(&mut self, lines: &[String], replies: usize) -> Vec<String> {
        let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines {
            buf.extend_from_slice(l.as_bytes());
            buf.push(b'\n');
        }
        self.pipeline_raw(&buf, replies).await
    }

    /// `pipeline` over raw bytes.
    pub async fn pipeline_raw(&mut self, bytes: &[u8], replies: usize) -> Vec<String> {
        let Client {
            reader,
            writer,
            partial,
        } = self;
        let write = async {
            writer.write_all(bytes).await.expect("pipelined write");
        };
        let read = async {
            let mut out = Vec::with_capacity(replies);
            while out.len() < replies {
                let n = tokio::time::timeout(LINE_TIMEOUT, reader.read_until(b'\n', partial))
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "pipeline: only {} of {replies} replies within 10 s of each other",
                            out.len()
                        )
                    })
                    .expect("read");
                assert!(
                    n > 0 && partial.last() == Some(&b'\n'),
                    "connection closed after {} replies",
                    out.len()
                );
                partial.pop();
                let line = String::from_utf8(std::mem::take(partial)).expect("utf-8 reply");
                if line != "PING" {
                    out.push(line);
                }
            }
            out
        };
        let ((), out) = tokio::join!(write, read);
        out
    }

    /// Publishes `n` events pipelined: names and payloads from `make(i)`,
    /// addressed to `*`; returns the PUB replies parsed, in order.
    pub async fn publish_many(
        &mut self,
        id: &str,
        n: usize,
        mut make: impl FnMut(usize) -> (String, String),
    ) -> Vec<Published> {
        let lines: Vec<String> = (0..n)
            .map(|i| {
                let (name, payload) = make(i);
                format!("PUB;CLIENT_ID={id};EVENT_NAME={name};PAYLOAD={payload};DELIVERY_TO=*")
            })
            .collect();
        self.pipeline(&lines, n)
            .await
            .iter()
            .map(|l| parse_published(l))
            .collect()
    }

    /// Subscribes `id` to `event_name` and asserts that nothing is stored
    /// under it (`why` says what must not have published).
    pub async fn assert_nothing_stored(&mut self, id: &str, event_name: &str, why: &str) {
        self.sub(id, event_name).await;
        let rep = self.replay(id, event_name, "FROM_POSITION=earliest").await;
        assert_eq!(rep.count, 0, "{why}");
    }

    /// Sends a range REPLAY and reads its header and records; panics if the
    /// reply is not a REPLAY_STARTED for `event_name`. `rest` holds the
    /// other keys, e.g. `FROM_POSITION=earliest;LIMIT=10`.
    pub async fn replay(&mut self, id: &str, event_name: &str, rest: &str) -> Replayed {
        let line = format!("REPLAY;CLIENT_ID={id};EVENT_NAME={event_name};{rest}");
        self.replay_line(&line, event_name, false).await
    }

    /// Sends `line` (a range REPLAY) and reads its header and records.
    /// Unmarked (live) records are collected in `live` (before the header
    /// always; after it only when `allow_live`, else they fail the test).
    pub async fn replay_line(
        &mut self,
        line: &str,
        event_name: &str,
        allow_live: bool,
    ) -> Replayed {
        self.send(line).await;
        self.read_replay(event_name, allow_live).await
    }

    /// Reads a replay's header and records (the command already sent).
    pub async fn read_replay(&mut self, event_name: &str, allow_live: bool) -> Replayed {
        let mut live = Vec::new();
        let header = loop {
            let l = self.line().await;
            if l.starts_with("+RECORD:") && !is_replayed(&parse_record(&l)) {
                live.push(l);
                continue;
            }
            break l;
        };
        let prefix = format!("+PASS:REPLAY_STARTED;EVENT_NAME={event_name};COUNT=");
        let count: usize = header
            .strip_prefix(&prefix)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("expected {prefix}<n>, got {header:?}"));
        let mut lines = Vec::with_capacity(count);
        let mut records = Vec::with_capacity(count);
        while records.len() < count {
            let l = self.line().await;
            assert!(
                l.starts_with("+RECORD:"),
                "expected record {} of {count} after {header:?}, got {l:?}",
                records.len() + 1
            );
            let r = parse_record(&l);
            if !is_replayed(&r) {
                assert!(
                    allow_live,
                    "replayed record {} of {count} lacks REPLAYED:true: {l}",
                    records.len() + 1
                );
                live.push(l);
                continue;
            }
            records.push(r);
            lines.push(l);
        }
        Replayed {
            header,
            count,
            lines,
            records,
            live,
        }
    }

    /// Sends PING and asserts the next line is `+PASS:PONG`: nothing else
    /// was owed on this connection.
    pub async fn ping(&mut self) {
        self.expect("PING", "+PASS:PONG").await;
    }
}

/// Asserts a -FAIL line has the shape `-FAIL:CODE;MESSAGE=<non-empty>`.
pub fn assert_fail_shape(line: &str) {
    let rest = line
        .strip_prefix("-FAIL:")
        .unwrap_or_else(|| panic!("not a -FAIL: {line:?}"));
    let (code, msg) = rest
        .split_once(";MESSAGE=")
        .unwrap_or_else(|| panic!("-FAIL without ;MESSAGE=: {line:?}"));
    assert!(
        !code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
        "bad error code in {line:?}"
    );
    assert!(!msg.trim().is_empty(), "empty MESSAGE in {line:?}");
    assert!(!msg.contains(';'), "MESSAGE contains ';' in {line:?}");
}

/// A fresh temporary data directory and a server on it. Keep the
/// `TempDir` alive for as long as the server runs.
pub async fn temp_server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_server(dir.path()).await;
    (dir, srv)
}

impl Client {
    /// Sends PING and reads up to its `+PASS:PONG`, returning the unmarked
    /// (live) `+RECORD:` lines met on the way; anything else fails.
    pub async fn ping_collecting_live(&mut self) -> Vec<String> {
        self.send("PING").await;
        let mut live = Vec::new();
        loop {
            let l = self.line().await;
            if l == "+PASS:PONG" {
                return live;
            }
            assert!(
                l.starts_with("+RECORD:") && !is_replayed(&parse_record(&l)),
                "expected +PASS:PONG or a live record, got {l:?}"
            );
            live.push(l);
        }
    }

    /// Publishes `n` events one at a time, waiting between them so each
    /// gets a later loggedAt than the one before (asserted).
    pub async fn publish_spaced(&mut self, id: &str, name: &str, n: usize) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = Vec::with_capacity(n);
        for i in 0..n {
            if let Some(&(_, last)) = out.last() {
                while now_ms() <= last + 1 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            let e = self.publish(id, name, &format!("{{\"i\":{i}}}")).await;
            if let Some(&(_, last)) = out.last() {
                assert!(
                    e.1 > last,
                    "precondition: distinct loggedAt ({} then {})",
                    last,
                    e.1
                );
            }
            out.push(e);
        }
        out
    }
}

/// A default config on `data_dir`, for tests to adjust before
/// `start_server_with`.
pub fn config_in(data_dir: &Path) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    }
}

/// Stops `srv` and starts a server with `config` on the same data
/// directory (which `config` must name).
pub async fn restart(srv: TestServer, config: Config) -> TestServer {
    srv.stop().await;
    start_server_with(config).await
}

/// Asks the kernel to drop every file under `dir` from the page cache.
#[cfg(target_os = "linux")]
pub fn page_out(dir: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("listed") {
            let path = entry.expect("listed").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let file = std::fs::File::open(&path).expect("opened");
            // SAFETY: a plain system call on a descriptor `file` holds open.
            let rc =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0, "posix_fadvise {}", path.display());
        }
    }
}

/// A record's `idem`.
pub fn idem_of(record: &Value) -> String {
    record["idem"]
        .as_str()
        .unwrap_or_else(|| panic!("idem is not a string: {record}"))
        .to_string()
}

/// Whether a replayed record says the client acknowledged it.
pub fn was_acknowledged(record: &Value) -> bool {
    record["metadata"]["$internal"]["replay_info"]["wasAcknowledged"]
        .as_bool()
        .unwrap_or_else(|| panic!("no boolean wasAcknowledged: {record}"))
}

/// One read that may see the server close the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// A whole line, `PING` included.
    Line(String),
    /// The server closed the connection (EOF or reset).
    Closed,
    /// Nothing complete within the wait.
    Nothing,
}

impl Client {
    /// Reads one line as it is (server `PING`s included), or reports that
    /// the connection closed or nothing came within `wait`.
    pub async fn read_raw(&mut self, wait: Duration) -> Read {
        let read = tokio::time::timeout(wait, self.reader.read_until(b'\n', &mut self.partial));
        match read.await {
            Err(_) => Read::Nothing,
            Ok(Err(_)) => Read::Closed,
            Ok(Ok(_)) if self.partial.last() != Some(&b'\n') => Read::Closed,
            Ok(Ok(_)) => {
                self.partial.pop();
                let bytes = std::mem::take(&mut self.partial);
                Read::Line(String::from_utf8(bytes).expect("server sent invalid UTF-8"))
            }
        }
    }

    /// Reads the next line, which must be a live (unmarked) `+RECORD:`.
    pub async fn record(&mut self) -> Value {
        let line = self.line().await;
        assert!(
            line.starts_with("+RECORD:"),
            "expected a delivery, got {line:?}"
        );
        let record = parse_record(&line);
        assert!(!is_replayed(&record), "expected a live delivery: {line}");
        record
    }

    /// Reads the next `n` lines, which must be live deliveries; returns
    /// their idems in the order received.
    pub async fn deliveries(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(idem_of(&self.record().await));
        }
        out
    }

    /// Sends `line` and reads up to its reply, which is returned with the
    /// idems of the live deliveries written before it.
    pub async fn call(&mut self, line: &str) -> (String, Vec<String>) {
        self.send(line).await;
        let mut live = Vec::new();
        loop {
            let l = self.line().await;
            if !l.starts_with("+RECORD:") {
                return (l, live);
            }
            let record = parse_record(&l);
            assert!(!is_replayed(&record), "unexpected replayed record: {l}");
            live.push(idem_of(&record));
        }
    }

    /// ACKs `idem` as `id`, asserting `+PASS:ACKNOWLEDGED`; no delivery may
    /// come before the reply.
    pub async fn ack(&mut self, id: &str, idem: &str) {
        self.expect(
            &format!("ACK;CLIENT_ID={id};EVENT_IDEM={idem}"),
            &format!("+PASS:ACKNOWLEDGED;IDEM={idem}"),
        )
        .await;
    }
}
