//! A tiny HTTP/1.1 client for the HTTP listener (one request per
//! connection, `Connection: close`), the admin API on top of it, a reader
//! of the Prometheus text format, and a WebSocket line client for
//! `/message`. Every wait has a timeout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{is_replayed, parse_record, LINE_TIMEOUT};

/// How long one HTTP exchange may take before the test fails.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an operation may take to finish before the test fails.
pub const OP_TIMEOUT: Duration = Duration::from_secs(15);

/// One HTTP response, read to the end.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("response body is UTF-8")
    }

    /// The body as JSON; panics (showing it) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): {} {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts the status is `status`, showing the body when it is not.
    pub fn assert_status(&self, status: u16) -> &Self {
        assert_eq!(
            self.status,
            status,
            "HTTP status; body {:?}",
            String::from_utf8_lossy(&self.body)
        );
        self
    }

    /// Asserts this is an error response of `status` whose body is JSON,
    /// exactly `{"error": <non-empty string>}`; returns the message.
    pub fn error(&self, status: u16) -> String {
        self.assert_status(status);
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "error response of {status} is not JSON but {content_type:?}: {:?}",
            self.text()
        );
        let body = self.json();
        let object = body
            .as_object()
            .unwrap_or_else(|| panic!("error body is not an object: {body}"));
        assert_eq!(
            object.keys().collect::<Vec<_>>(),
            vec!["error"],
            "error body has other keys: {body}"
        );
        let message = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("error is not a string: {body}"));
        assert!(!message.trim().is_empty(), "empty error message: {body}");
        message.to_string()
    }
}

/// Sends one request and reads the whole response. `body` goes with a
/// `Content-Length` (and `Content-Type: application/json`).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    tokio::time::timeout(HTTP_TIMEOUT, exchange(addr, method, path, headers, body))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no whole response within {HTTP_TIMEOUT:?}"))
}

async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connect to HTTP");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str("Content-Type: application/json\r\n");
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.unwrap_or_default());
    stream.write_all(&out).await.expect("write request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .expect("read response to EOF");
    parse_response(&raw, method == "HEAD")
}

/// Parses a whole HTTP/1.1 response (Content-Length, chunked, or to EOF);
/// a response to HEAD has no body whatever its headers say.
fn parse_response(raw: &[u8], head_only: bool) -> Response {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..end]).expect("headers are UTF-8");
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(
        parts.next(),
        Some("HTTP/1.1"),
        "status line {status_line:?}"
    );
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            (name.trim().to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let body = if head_only {
        Vec::new()
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().expect("numeric Content-Length");
        assert!(
            rest.len() >= len,
            "body shorter ({}) than its Content-Length {len}",
            rest.len()
        );
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&rest[..line_end]).expect("chunk size is text");
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).expect("hex chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// `GET path`.
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], None).await
}

/// The operator API of one server, with or without a bearer token.
#[derive(Debug, Clone)]
pub struct Admin {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

impl Admin {
    /// The admin API at `addr`, without a token.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, token: None }
    }

    /// The admin API at `addr`, sending `Authorization: Bearer <token>`.
    pub fn with_token(addr: SocketAddr, token: &str) -> Self {
        Self {
            addr,
            token: Some(token.to_string()),
        }
    }

    /// A request with the token, when there is one.
    pub async fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        request(self.addr, method, path, &headers, body).await
    }

    /// `POST /replays` with `body` as it is.
    pub async fn post_replay_raw(&self, body: &[u8]) -> Response {
        self.call("POST", "/replays", Some(body)).await
    }

    /// `POST /replays` with a JSON body.
    pub async fn post_replay(&self, body: &Value) -> Response {
        self.post_replay_raw(body.to_string().as_bytes()).await
    }

    /// `POST /replays`, asserting 202, the body `{"asyncOperationId":id}`
    /// and a `Location` naming the operation; returns the id.
    pub async fn start(&self, body: &Value) -> String {
        let response = self.post_replay(body).await;
        response.assert_status(202);
        assert!(
            response
                .header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "202 content type: {response:?}"
        );
        let json = response.json();
        let object = json.as_object().expect("202 body is an object");
        assert_eq!(object.len(), 1, "202 body has other keys: {json}");
        let id = json["asyncOperationId"]
            .as_str()
            .unwrap_or_else(|| panic!("no asyncOperationId in {json}"))
            .to_string();
        assert!(
            id.strip_prefix("op_")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
            "asyncOperationId is not op_<n>: {id:?}"
        );
        assert_eq!(
            response.header("location"),
            Some(format!("/asyncOperations/{id}").as_str()),
            "Location of {id}"
        );
        id
    }

    /// `GET /asyncOperations/{id}`, asserting 200.
    pub async fn op(&self, id: &str) -> Value {
        let response = self
            .call("GET", &format!("/asyncOperations/{id}"), None)
            .await;
        response.assert_status(200);
        response.json()
    }

    /// `GET /asyncOperations`, asserting 200; the list.
    pub async fn ops(&self) -> Vec<Value> {
        let response = self.call("GET", "/asyncOperations", None).await;
        response.assert_status(200);
        let json = response.json();
        assert_eq!(
            json.as_object().map(|o| o.len()),
            Some(1),
            "list body has other keys: {json}"
        );
        json["asyncOperations"]
            .as_array()
            .unwrap_or_else(|| panic!("no asyncOperations array in {json}"))
            .clone()
    }

    /// `DELETE /asyncOperations/{id}`.
    pub async fn cancel(&self, id: &str) -> Response {
        self.call("DELETE", &format!("/asyncOperations/{id}"), None)
            .await
    }

    /// Polls the operation until it is no longer RUNNING; returns it.
    pub async fn finished(&self, id: &str) -> Value {
        let deadline = Instant::now() + OP_TIMEOUT;
        loop {
            let op = self.op(id).await;
            if op["status"] != "RUNNING" {
                return op;
            }
            assert!(
                Instant::now() < deadline,
                "{id} still RUNNING after {OP_TIMEOUT:?}: {op}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls the operation until it is SUCCEEDED (any other end fails).
    pub async fn succeeded(&self, id: &str) -> Value {
        let op = self.finished(id).await;
        assert_eq!(op["status"], "SUCCEEDED", "{id} did not succeed: {op}");
        op
    }

    /// Starts a replay and waits for it to succeed.
    pub async fn run(&self, body: &Value) -> Value {
        let id = self.start(body).await;
        self.succeeded(&id).await
    }
}

/// The keys of an operation's status, in the documented order.
pub const OP_KEYS: [&str; 15] = [
    "id",
    "status",
    "taskType",
    "eventName",
    "clientId",
    "onlyUnacked",
    "startTimestamp",
    "endTimestamp",
    "eventsPerSecond",
    "total",
    "processed",
    "deliveries",
    "createdAt",
    "updatedAt",
    "error",
];

/// Asserts `op` has exactly the documented keys.
pub fn assert_op_shape(op: &Value) {
    let mut keys: Vec<&str> = op
        .as_object()
        .unwrap_or_else(|| panic!("operation is not an object: {op}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let mut want = OP_KEYS.to_vec();
    want.sort_unstable();
    assert_eq!(keys, want, "operation keys: {op}");
}

/// A number field of a JSON value, as u64.
pub fn num(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a u64 in {value}"))
}

/// A replay body for `event_name` from `start` to `end` (ms), both given.
pub fn slice(event_name: &str, start: u64, end: u64) -> Value {
    json!({"type": "ensync", "eventName": event_name, "startTimestamp": start, "endTimestamp": end})
}

// ------------------------------------------------------------ metrics

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of a Prometheus text exposition (comments skipped).
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample without value: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("sample value not a number: {line:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                    let labels = inner
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair
                                .split_once('=')
                                .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                            let v = v
                                .strip_prefix('"')
                                .and_then(|v| v.strip_suffix('"'))
                                .unwrap_or_else(|| panic!("unquoted label {pair:?}"));
                            (k.to_string(), v.to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
            };
            Sample {
                name,
                labels,
                value,
            }
        })
        .collect()
}

/// A scrape of `/metrics`, parsed.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the sample `name` with exactly `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like `get`, but 0 when the series is absent (a counter never
    /// incremented has no labelled series yet).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Like `get`, panicking (with the scrape) when absent.
    pub fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{}", self.text))
    }

    /// `commands_total` for `verb` and `outcome`.
    pub fn commands(&self, verb: &str, outcome: &str) -> f64 {
        self.value(
            "ensync_commands_total",
            &[("verb", verb), ("outcome", outcome)],
        )
    }
}

/// `GET /metrics`, asserting 200 and the Prometheus content type.
pub async fn scrape(addr: SocketAddr) -> Scrape {
    let response = get(addr, "/metrics").await;
    response.assert_status(200);
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "metrics content type {content_type:?}"
    );
    let text = response.text().to_string();
    Scrape {
        samples: samples(&text),
        text,
    }
}

// ---------------------------------------------------------- WebSocket

/// What one read from a WebSocket gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsRead {
    /// A text frame.
    Text(String),
    /// A binary frame (the server never sends one).
    Binary(Vec<u8>),
    /// A WebSocket-level pong.
    Pong(Vec<u8>),
    /// The server sent a close frame, with its code if it gave one.
    Closed(Option<u16>),
    /// The connection ended without a close frame (EOF or an error).
    Gone,
    /// Nothing within the wait.
    Nothing,
}

/// A protocol client over a WebSocket to `/message`.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Wraps a WebSocket the test opened itself (over TLS, say).
    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> WsClient {
        WsClient { ws }
    }

    /// Opens `ws://<addr>/message`.
    pub async fn connect(addr: SocketAddr) -> WsClient {
        let url = format!("ws://{addr}/message");
        let (ws, response) =
            tokio::time::timeout(LINE_TIMEOUT, tokio_tungstenite::connect_async(url))
                .await
                .expect("WebSocket connect timed out")
                .expect("WebSocket connect");
        assert_eq!(response.status().as_u16(), 101, "upgrade status");
        WsClient { ws }
    }

    /// Sends one text frame.
    pub async fn send(&mut self, text: &str) {
        self.send_message(Message::text(text.to_string())).await;
    }

    /// Sends one binary frame.
    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.send_message(Message::binary(bytes.to_vec())).await;
    }

    /// Sends any message.
    pub async fn send_message(&mut self, message: Message) {
        tokio::time::timeout(LINE_TIMEOUT, self.ws.send(message))
            .await
            .expect("WebSocket send timed out")
            .expect("WebSocket send");
    }

    /// Reads the next frame as it is (server `PING` text included).
    pub async fn read(&mut self, wait: Duration) -> WsRead {
        loop {
            let next = match tokio::time::timeout(wait, self.ws.next()).await {
                Err(_) => return WsRead::Nothing,
                Ok(next) => next,
            };
            return match next {
                None | Some(Err(_)) => WsRead::Gone,
                Some(Ok(Message::Text(text))) => WsRead::Text(text.to_string()),
                Some(Ok(Message::Binary(data))) => WsRead::Binary(data.to_vec()),
                Some(Ok(Message::Pong(data))) => WsRead::Pong(data.to_vec()),
                Some(Ok(Message::Close(frame))) => {
                    WsRead::Closed(frame.map(|f: CloseFrame| u16::from(f.code)))
                }
                Some(Ok(Message::Ping(_) | Message::Frame(_))) => continue,
            };
        }
    }

    /// The next text frame, skipping server `PING`s, or `None` if none
    /// came within `wait`; panics when the socket closes or a non-text
    /// frame comes.
    pub async fn try_line(&mut self, wait: Duration) -> Option<String> {
        loop {
            match self.read(wait).await {
                WsRead::Text(text) if text == "PING" => continue,
                WsRead::Text(text) => return Some(text),
                WsRead::Nothing => return None,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next text frame; fails the test after `LINE_TIMEOUT`.
    pub async fn line(&mut self) -> String {
        self.try_line(LINE_TIMEOUT)
            .await
            .expect("no frame from the server within 10 s")
    }

    /// Sends `text` and returns the next frame.
    pub async fn cmd(&mut self, text: &str) -> String {
        self.send(text).await;
        self.line().await
    }

    /// Sends `text` and asserts the next frame is exactly `expected`.
    pub async fn expect(&mut self, text: &str, expected: &str) {
        let got = self.cmd(text).await;
        assert_eq!(got, expected, "reply to {text:?}");
    }

    /// Asserts no frame arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(line) = self.try_line(wait).await {
            panic!("expected nothing from the server, got {line:?}");
        }
    }

    /// CONN as `id`.
    pub async fn conn(&mut self, id: &str) {
        self.expect(
            &format!("CONN;CLIENT_ID={id}"),
            &format!("+PASS:CONNECTED;CLIENT_ID={id}"),
        )
        .await;
    }

    /// SUB `id` to `pattern`.
    pub async fn sub(&mut self, id: &str, pattern: &str) {
        self.expect(
            &format!("SUB;CLIENT_ID={id};EVENT_NAME={pattern}"),
            &format!("+PASS:SUBSCRIBED;EVENT_NAME={pattern}"),
        )
        .await;
    }

    /// ACK `idem` as `id`.
    pub async fn ack(&mut self, id: &str, idem: &str) {
        self.expect(
            &format!("ACK;CLIENT_ID={id};EVENT_IDEM={idem}"),
            &format!("+PASS:ACKNOWLEDGED;IDEM={idem}"),
        )
        .await;
    }

    /// PING, asserting `+PASS:PONG` is the next frame.
    pub async fn ping(&mut self) {
        self.expect("PING", "+PASS:PONG").await;
    }

    /// The next frame, which must be a live (unmarked) `+RECORD:`.
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

    /// Sends a close frame and waits for the server's close (or EOF).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            assert!(Instant::now() < deadline, "the server did not close");
            match self.read(Duration::from_millis(200)).await {
                WsRead::Closed(_) | WsRead::Gone => return,
                _ => continue,
            }
        }
    }
}
