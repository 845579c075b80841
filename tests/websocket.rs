//! The protocol over WebSocket (`GET /message` on the HTTP listener)
//! against a real server: the same session as TCP with one line per text
//! frame, framing limits and encodings, heartbeats, the connection limit,
//! TCP and WebSocket connections of one client sharing its deliveries,
//! and the conformance vectors replayed over a WebSocket.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::http::*;
use common::*;
use ensync_server::config::Config;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[path = "../protocol/tests/support/vectors.rs"]
mod vectors;

/// How long "nothing arrives" is watched for.
const SILENCE: Duration = Duration::from_millis(300);

/// A fresh data directory and its default config.
fn setup() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path());
    (dir, config)
}

/// A WebSocket of `id`, connected.
async fn ws_connected(srv: &TestServer, id: &str) -> WsClient {
    let mut ws = WsClient::connect(srv.http_addr).await;
    ws.conn(id).await;
    ws
}

/// A TCP connection of `id`, connected.
async fn tcp_connected(srv: &TestServer, id: &str) -> Client {
    let mut c = srv.client().await;
    c.conn(id).await;
    c
}

// ------------------------------------------------------------ session

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_runs_the_same_session_as_tcp_one_line_per_frame() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut w = WsClient::connect(srv.http_addr).await;
    // Parsing comes first, then the session check, as over TCP.
    w.expect(
        "HELLO",
        "-FAIL:UNKNOWN_COMMAND;MESSAGE=unknown command \"HELLO\" (the verbs are CONN, PUB, SUB, UNSUB, PAUSE, CONTINUE, ACK, DEFER, DISCARD, ROLLBACK, REPLAY, PING and PONG)",
    )
    .await;
    let reply = w.cmd("SUB;CLIENT_ID=w;EVENT_NAME=a/*").await;
    assert!(reply.starts_with("-FAIL:NOT_CONNECTED;MESSAGE="), "{reply}");
    assert_fail_shape(&reply);
    w.conn("w").await;
    w.sub("w", "a/*").await;
    let reply = w.cmd("SUB;CLIENT_ID=other;EVENT_NAME=a/*").await;
    assert!(reply.starts_with("-FAIL:PERMISSION_DENIED;"), "{reply}");

    // A TCP subscriber sees the same event: the frame is the TCP line
    // without its LF.
    let mut t = tcp_connected(&srv, "t").await;
    t.sub("t", "a/*").await;
    let mut p = tcp_connected(&srv, "p").await;
    let (e1, _) = p.publish("p", "a/x", "{\"k\":\"v;w\"}").await;
    let tcp_line = t.line().await;
    let frame = w.line().await;
    assert_eq!(frame, tcp_line);
    assert!(!frame.contains('\n') && !frame.contains('\r'), "{frame:?}");
    assert_eq!(idem_of(&parse_record(&frame)), e1);
    w.ack("w", &e1).await;

    // Publishing over the WebSocket reaches TCP subscribers.
    let reply = w
        .cmd("PUB;CLIENT_ID=w;EVENT_NAME=a/y;PAYLOAD={\"n\":2};DELIVERY_TO=t")
        .await;
    let e2 = parse_published(&reply).idem;
    let record = t.record().await;
    assert_eq!(idem_of(&record), e2);
    assert_eq!(record["sender"], "w");

    // A range replay: header, then one frame per record; then the
    // single-event form.
    w.send("REPLAY;CLIENT_ID=w;EVENT_NAME=a/*;FROM_POSITION=earliest")
        .await;
    assert_eq!(
        w.line().await,
        "+PASS:REPLAY_STARTED;EVENT_NAME=a/*;COUNT=1"
    );
    let replayed = parse_record(&w.line().await);
    assert!(is_replayed(&replayed) && was_acknowledged(&replayed));
    assert_eq!(idem_of(&replayed), e1);
    let reply = w.cmd(&format!("REPLAY;CLIENT_ID=w;EVENT_IDEM={e1}")).await;
    assert!(reply.starts_with("+REPLAY:{"), "{reply}");
    assert_eq!(idem_of(&parse_record(&reply)), e1);

    // PING gets PONG; PONG gets nothing (the next frame answers PING).
    w.ping().await;
    w.send("PONG").await;
    w.ping().await;
    w.expect_silence(SILENCE).await;
    t.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_several_lines_is_that_many_commands() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut w = WsClient::connect(srv.http_addr).await;
    w.send("PING\nPING\r\n\nCONN;CLIENT_ID=m\r\nSUB;CLIENT_ID=m;EVENT_NAME=a/*")
        .await;
    for want in [
        "+PASS:PONG",
        "+PASS:PONG",
        "+PASS:CONNECTED;CLIENT_ID=m",
        "+PASS:SUBSCRIBED;EVENT_NAME=a/*",
    ] {
        assert_eq!(w.line().await, want);
    }
    // Empty lines get no reply: an empty frame, a lone CRLF, a trailing LF.
    w.send("").await;
    w.send("\r\n").await;
    w.send("PING\n").await;
    assert_eq!(w.line().await, "+PASS:PONG");
    w.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_line_limit_gets_line_too_long_and_the_socket_stays_usable() {
    let (_dir, mut config) = setup();
    config.limits.max_line_len = 1024;
    let srv = start_server_with(config).await;
    let mut w = ws_connected(&srv, "w").await;
    // Exactly at the limit: accepted.
    let head = "PUB;CLIENT_ID=w;EVENT_NAME=a/x;DELIVERY_TO=*;PAYLOAD=\"";
    let at_limit = format!("{head}{}\"", "x".repeat(1024 - head.len() - 1));
    assert_eq!(at_limit.len(), 1024);
    let reply = w.cmd(&at_limit).await;
    parse_published(&reply);
    // One byte over, and well over (but under twice the limit).
    for len in [1025, 2000] {
        let reply = w.cmd(&"x".repeat(len)).await;
        assert!(reply.starts_with("-FAIL:LINE_TOO_LONG;MESSAGE="), "{reply}");
        assert_fail_shape(&reply);
    }
    // Only the long line is dropped, not what follows its LF.
    w.send(&format!("{}\nPING", "y".repeat(1500))).await;
    let reply = w.line().await;
    assert!(reply.starts_with("-FAIL:LINE_TOO_LONG;"), "{reply}");
    assert_eq!(w.line().await, "+PASS:PONG");
    w.ping().await;
    w.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_twice_the_line_limit_closes_that_socket_only() {
    let (_dir, mut config) = setup();
    config.limits.max_line_len = 1024;
    let srv = start_server_with(config).await;
    let mut other = ws_connected(&srv, "o").await;
    let mut w = ws_connected(&srv, "w").await;
    w.send(&"x".repeat(2 * 1024 + 100)).await;
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        match w.read(Duration::from_millis(200)).await {
            WsRead::Closed(_) | WsRead::Gone => break,
            WsRead::Nothing => {}
            got => panic!("expected the socket to close, got {got:?}"),
        }
        assert!(Instant::now() < deadline, "the socket stayed open");
    }
    other.ping().await;
    ws_connected(&srv, "w").await.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_twice_the_line_limit_closes_with_code_1009() {
    let (_dir, mut config) = setup();
    config.limits.max_line_len = 1024;
    let srv = start_server_with(config).await;
    let mut w = ws_connected(&srv, "w").await;
    w.send(&"x".repeat(2 * 1024 + 100)).await;
    assert_eq!(w.read(LINE_TIMEOUT).await, WsRead::Closed(Some(1009)));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_are_read_as_text_and_invalid_utf8_is_refused() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut w = WsClient::connect(srv.http_addr).await;
    w.send_binary(b"PING").await;
    assert_eq!(w.line().await, "+PASS:PONG");
    w.send_binary(b"CONN;CLIENT_ID=b").await;
    assert_eq!(w.line().await, "+PASS:CONNECTED;CLIENT_ID=b");
    w.send_binary(&[0xff, 0xfe, b'P']).await;
    let reply = w.line().await;
    assert!(
        reply.starts_with("-FAIL:INVALID_ENCODING;MESSAGE="),
        "{reply}"
    );
    assert_fail_shape(&reply);
    // The bad line alone is refused; the next line of the frame runs.
    w.send_binary(b"PI\xc3NG\nPING").await;
    assert!(w.line().await.starts_with("-FAIL:INVALID_ENCODING;"));
    assert_eq!(w.line().await, "+PASS:PONG");
    w.ping().await;
    w.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_level_pings_are_answered_by_the_websocket_layer() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut w = ws_connected(&srv, "w").await;
    w.send_message(Message::Ping(b"are you there".to_vec().into()))
        .await;
    assert_eq!(
        w.read(LINE_TIMEOUT).await,
        WsRead::Pong(b"are you there".to_vec())
    );
    // No protocol reply for it.
    w.ping().await;
    srv.stop().await;
}

// ---------------------------------------------------------- heartbeat

/// A server whose heartbeat runs on `interval` and `timeout` (ms).
async fn heartbeat_server(interval: u64, timeout: u64) -> (tempfile::TempDir, TestServer) {
    let (dir, mut config) = setup();
    config.heartbeat.interval = Duration::from_millis(interval);
    config.heartbeat.timeout = Duration::from_millis(timeout);
    let srv = start_server_with(config).await;
    (dir, srv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_gets_a_ping_frame_and_pong_answers_it() {
    let (_dir, srv) = heartbeat_server(200, 600).await;
    let mut w = ws_connected(&srv, "w").await;
    assert_eq!(w.read(LINE_TIMEOUT).await, WsRead::Text("PING".into()));
    // PONG answers it and gets no reply; the socket stays open.
    w.send("PONG").await;
    assert_eq!(w.read(Duration::from_millis(100)).await, WsRead::Nothing);
    w.ping().await;
    // Answered each time, it keeps coming and the socket stays open past
    // the timeout.
    for _ in 0..2 {
        assert_eq!(w.read(LINE_TIMEOUT).await, WsRead::Text("PING".into()));
        w.send("PONG").await;
    }
    w.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_ping_closes_the_websocket() {
    let (_dir, srv) = heartbeat_server(150, 300).await;
    let mut w = ws_connected(&srv, "w").await;
    assert_eq!(w.read(LINE_TIMEOUT).await, WsRead::Text("PING".into()));
    let closed = w.read(LINE_TIMEOUT).await;
    assert!(
        matches!(closed, WsRead::Closed(_) | WsRead::Gone),
        "expected the socket to close, got {closed:?}"
    );
    // Others are not affected.
    let mut other = WsClient::connect(srv.http_addr).await;
    other.ping().await;
    srv.stop().await;
}

// ------------------------------------------------- connection limit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_the_upgrade_is_refused_with_503() {
    let (_dir, mut config) = setup();
    config.limits.max_connections = 2;
    let srv = start_server_with(config).await;
    let mut held = vec![
        tcp_connected(&srv, "a").await,
        tcp_connected(&srv, "b").await,
    ];
    let refused = tokio::time::timeout(
        LINE_TIMEOUT,
        tokio_tungstenite::connect_async(format!("ws://{}/message", srv.http_addr)),
    )
    .await
    .expect("upgrade answered");
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                    .expect("JSON body");
            assert!(
                body["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{body}"
            );
        }
        Err(e) => panic!("expected a 503 answer, got {e}"),
        Ok(_) => panic!("upgraded past max_connections"),
    }
    for c in &mut held {
        c.ping().await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_accepted_below_max_connections() {
    let (_dir, mut config) = setup();
    config.limits.max_connections = 1;
    let srv = start_server_with(config).await;
    // No other connection is open.
    let mut w = WsClient::connect(srv.http_addr).await;
    w.ping().await;
    srv.stop().await;
}

// ------------------------------------ one client over both transports

/// Reads deliveries from a WebSocket and a TCP connection until `n`
/// arrived in all; returns the idems each received, in order.
async fn collect(ws: &mut WsClient, tcp: &mut Client, n: usize) -> (Vec<String>, Vec<String>) {
    let (mut on_ws, mut on_tcp) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while on_ws.len() + on_tcp.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} + {} of {n} arrived",
            on_ws.len(),
            on_tcp.len()
        );
        if let Some(line) = ws.try_line(Duration::from_millis(20)).await {
            let record = parse_record(&line);
            assert!(!is_replayed(&record), "{line}");
            on_ws.push(idem_of(&record));
        }
        if let Some(line) = tcp.try_line(Duration::from_millis(20)).await {
            let record = parse_record(&line);
            assert!(!is_replayed(&record), "{line}");
            on_tcp.push(idem_of(&record));
        }
    }
    (on_ws, on_tcp)
}

/// `ids` sorted into the order of `order`.
fn in_order_of(ids: &[String], order: &[String]) -> Vec<String> {
    let mut sorted = ids.to_vec();
    sorted.sort_by_key(|id| order.iter().position(|o| o == id));
    sorted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_websocket_connections_of_one_client_share_its_deliveries() {
    // The default ack wait (30 s): nothing here is redelivered by time.
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = tcp_connected(&srv, "p").await;
    let mut ws = ws_connected(&srv, "w").await;
    ws.sub("w", "order/*").await;
    // While the WebSocket is alone, it takes these.
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(p.publish("p", "order/x", &format!("{{\"h\":{i}}}")).await.0);
    }
    for id in &held {
        assert_eq!(&idem_of(&ws.record().await), id);
    }
    // A TCP connection of the same client gets none of what the other
    // holds ...
    let mut tcp = tcp_connected(&srv, "w").await;
    tcp.expect_silence(SILENCE).await;
    // ... and each new event goes to exactly one of them.
    let mut evs = Vec::new();
    for i in 0..30 {
        evs.push(p.publish("p", "order/x", &format!("{{\"i\":{i}}}")).await.0);
        if i % 5 == 4 {
            tokio::task::yield_now().await;
        }
    }
    let (on_ws, on_tcp) = collect(&mut ws, &mut tcp, evs.len()).await;
    ws.expect_silence(SILENCE).await;
    tcp.expect_silence(SILENCE).await;
    let a: HashSet<&String> = on_ws.iter().collect();
    let b: HashSet<&String> = on_tcp.iter().collect();
    assert_eq!(
        a.len() + b.len(),
        evs.len(),
        "a duplicate: {on_ws:?} {on_tcp:?}"
    );
    assert!(
        a.is_disjoint(&b),
        "both hold one event: {on_ws:?} {on_tcp:?}"
    );
    let all: HashSet<&String> = a.union(&b).copied().collect();
    assert_eq!(all, evs.iter().collect::<HashSet<_>>());
    assert_eq!(on_ws, in_order_of(&on_ws, &evs), "WebSocket order");
    assert_eq!(on_tcp, in_order_of(&on_tcp, &evs), "TCP order");
    // Settling works from either connection.
    if let Some(first) = on_tcp.first() {
        ws.ack("w", first).await;
    }

    // Closing the WebSocket hands what it held to the TCP connection:
    // exactly that, in publication order.
    ws.close().await;
    let mut order = held.clone();
    order.extend(evs.iter().cloned());
    let mut want = held.clone();
    want.extend(on_ws.iter().cloned());
    let handed = tcp.deliveries(want.len()).await;
    assert_eq!(in_order_of(&handed, &order), want);
    tcp.expect_silence(SILENCE).await;
    for id in handed.iter().chain(on_tcp.iter().skip(1)) {
        tcp.ack("w", id).await;
    }
    drop(tcp);
    // Everything is settled: a new connection gets nothing.
    let mut again = ws_connected(&srv, "w").await;
    again.expect_silence(SILENCE).await;
    again.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_replays_reach_a_websocket_subscriber() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = tcp_connected(&srv, "p").await;
    let (e1, _) = p.publish("p", "a/x", "{\"i\":1}").await;
    let mut w = ws_connected(&srv, "w").await;
    w.sub("w", "a/*").await;
    let op = Admin::new(srv.http_addr)
        .run(&json!({"eventName": "a/*"}))
        .await;
    assert_eq!(num(&op, "deliveries"), 1, "{op}");
    let line = w.line().await;
    let record = parse_record(&line);
    assert!(is_replayed(&record), "{line}");
    assert_eq!(idem_of(&record), e1);
    assert_eq!(replay_timestamp(&record), num(&op, "createdAt"));
    w.ack("w", &e1).await;
    w.expect_silence(SILENCE).await;
    srv.stop().await;
}

// ------------------------------------------------------------ vectors

/// Runs one vector file as one WebSocket session on a fresh server.
async fn run_vector_file(file: vectors::VectorFile) {
    let data = tempfile::tempdir().expect("temp dir");
    let server = start_server(data.path()).await;
    let mut ws = WsClient::connect(server.http_addr).await;
    let mut vars = HashMap::new();
    let mut checked = 0;
    for (lineno, step) in &file.steps {
        let at = format!("{}:{lineno}", file.name);
        match step {
            vectors::Step::Send(line) => ws.send(&vectors::substitute(line, &vars)).await,
            vectors::Step::Parses(_) => {}
            vectors::Step::Fails(reply) => {
                let got = ws.line().await;
                assert_eq!(got, vectors::substitute(reply, &vars), "{at}");
                checked += 1;
            }
            vectors::Step::Expect(pattern) => {
                let got = ws.line().await;
                if let Err(why) = vectors::matches(pattern, &got, &mut vars) {
                    panic!("{at}: {why}\n  expected {pattern}\n  got      {got}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "{}: no reply checked", file.name);
    ws.expect_silence(SILENCE).await;
    ws.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_hold_over_websocket() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/vectors");
    let files = vectors::load_all(&dir);
    assert!(files.len() >= 6, "vector files: {}", files.len());
    // One server per file, all at once.
    futures_util::future::join_all(files.into_iter().map(run_vector_file)).await;
}
