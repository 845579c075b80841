//! Heartbeat over TCP: the server's `PING` to idle connections, closing
//! the ones that do not answer, and the client's own `PING`/`PONG`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ensync_server::config::Config;

/// A server whose heartbeat runs on `interval` and `timeout`.
async fn heartbeat_server(interval: u64, timeout: u64) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config: Config = config_in(dir.path());
    config.heartbeat.interval = Duration::from_millis(interval);
    config.heartbeat.timeout = Duration::from_millis(timeout);
    let srv = start_server_with(config).await;
    (dir, srv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_gets_ping_after_the_interval() {
    let (_dir, srv) = heartbeat_server(300, 2000).await;
    let mut c = srv.client().await;
    c.conn("c").await;
    let idle = Instant::now();
    assert_eq!(
        c.read_raw(Duration::from_secs(2)).await,
        Read::Line("PING".into())
    );
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(280),
        "PING after {waited:?} idle, before the 300 ms interval"
    );
    // PONG answers it and gets no reply of its own.
    c.send("PONG").await;
    assert_eq!(c.read_raw(Duration::from_millis(150)).await, Read::Nothing);
    c.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_ping_closes_the_connection() {
    let (_dir, srv) = heartbeat_server(150, 300).await;
    let mut c = srv.client().await;
    c.conn("c").await;
    assert_eq!(
        c.read_raw(Duration::from_secs(2)).await,
        Read::Line("PING".into())
    );
    let pinged = Instant::now();
    assert_eq!(c.read_raw(Duration::from_secs(2)).await, Read::Closed);
    let waited = pinged.elapsed();
    assert!(
        waited >= Duration::from_millis(280),
        "closed {waited:?} after PING, before the 300 ms timeout"
    );
    // Other connections are not affected.
    let mut d = srv.client().await;
    d.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_ping_closes_a_connection_that_never_connected() {
    let (_dir, srv) = heartbeat_server(100, 100).await;
    let mut c = srv.client().await;
    assert_eq!(
        c.read_raw(Duration::from_secs(2)).await,
        Read::Line("PING".into())
    );
    assert_eq!(c.read_raw(Duration::from_secs(2)).await, Read::Closed);
    srv.stop().await;
}

/// Answers every server `PING` with `PONG` for `run`, as fast as it can;
/// returns how many came. Panics if the server closes the connection.
async fn answer_pings(c: &mut Client, run: Duration, delay: Duration) -> usize {
    let end = Instant::now() + run;
    let mut pings = 0;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match c.read_raw(left).await {
            Read::Line(line) => {
                assert_eq!(line, "PING", "unexpected line");
                pings += 1;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                c.send("PONG").await;
            }
            Read::Closed => panic!("closed after {pings} answered PINGs"),
            Read::Nothing => break,
        }
    }
    pings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_pings_keep_the_connection_open() {
    let (_dir, srv) = heartbeat_server(100, 200).await;
    let mut c = srv.client().await;
    c.conn("c").await;
    let pings = answer_pings(
        &mut c,
        Duration::from_millis(1500),
        Duration::from_millis(20),
    )
    .await;
    assert!(
        pings >= 5,
        "only {pings} PINGs in 1.5 s at a 100 ms interval"
    );
    c.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_answered_at_once_keep_the_connection_open() {
    let (_dir, srv) = heartbeat_server(50, 200).await;
    let mut c = srv.client().await;
    c.conn("c").await;
    let pings = answer_pings(&mut c, Duration::from_millis(1500), Duration::ZERO).await;
    assert!(
        pings >= 5,
        "only {pings} PINGs in 1.5 s at a 50 ms interval"
    );
    c.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_line_counts_as_an_answer_and_traffic_keeps_pings_away() {
    let (_dir, srv) = heartbeat_server(300, 200).await;
    let mut c = srv.client().await;
    c.conn("c").await;
    // A command every 100 ms: never idle for the interval, so no PING.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.send("PING").await;
        assert_eq!(
            c.read_raw(Duration::from_secs(1)).await,
            Read::Line("+PASS:PONG".into())
        );
    }
    // Idle: PING; a command (not PONG) answers it.
    assert_eq!(
        c.read_raw(Duration::from_secs(2)).await,
        Read::Line("PING".into())
    );
    // NOTE: not in the PING's own millisecond, which
    // `pings_answered_at_once_keep_the_connection_open` covers.
    tokio::time::sleep(Duration::from_millis(5)).await;
    c.send("SUB;CLIENT_ID=c;EVENT_NAME=order/*").await;
    assert_eq!(
        c.read_raw(Duration::from_secs(1)).await,
        Read::Line("+PASS:SUBSCRIBED;EVENT_NAME=order/*".into())
    );
    // Past the timeout, still open.
    tokio::time::sleep(Duration::from_millis(250)).await;
    c.send("PING").await;
    let mut got = c.read_raw(Duration::from_secs(1)).await;
    if got == Read::Line("PING".into()) {
        got = c.read_raw(Duration::from_secs(1)).await;
    }
    assert_eq!(got, Read::Line("+PASS:PONG".into()));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ping_gets_pong_and_pong_gets_no_reply() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    // Before CONN and after it.
    c.ping().await;
    c.send("PONG").await;
    c.ping().await;
    c.conn("c").await;
    c.send("PONG").await;
    c.send("PONG").await;
    assert_eq!(c.read_raw(Duration::from_millis(200)).await, Read::Nothing);
    c.ping().await;
    srv.stop().await;
}
