//! The limits over real sockets: each is hit by a client that asks for
//! it, answers with a `-FAIL` naming the key to raise (or closes the
//! connection), and leaves well-behaved clients alone.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ensync_server::config::Config;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A server on a fresh directory with `tune` applied to its config.
async fn server_with(tune: impl FnOnce(&mut Config)) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_in(dir.path());
    tune(&mut config);
    let srv = start_server_with(config).await;
    (dir, srv)
}

/// How many connections the server closed or refused for `reason`.
async fn closed(srv: &TestServer, reason: &str) -> f64 {
    common::http::scrape(srv.http_addr)
        .await
        .value("ensync_connections_closed_total", &[("reason", reason)])
}

/// Reads until the server closes the connection; panics if it does not
/// within `wait`. Returns the lines read.
async fn until_closed(c: &mut Client, wait: Duration) -> Vec<String> {
    let deadline = Instant::now() + wait;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.read_raw(left).await {
            Read::Line(line) => lines.push(line),
            Read::Closed => return lines,
            Read::Nothing => panic!("still open after {wait:?}; read {lines:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_client_is_told_and_closed_and_a_freed_slot_is_reused() {
    let (_dir, srv) = server_with(|c| c.limits.max_connections = 3).await;
    let mut open = Vec::new();
    for i in 0..3 {
        let mut c = srv.client().await;
        c.conn(&format!("c{i}")).await;
        open.push(c);
    }
    let mut refused = srv.client().await;
    let lines = until_closed(&mut refused, LINE_TIMEOUT).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("-FAIL:TOO_MANY_CONNECTIONS;MESSAGE=the server has 3 connections open (limits.max_connections)"),
        "{lines:?}"
    );
    // The open ones are unaffected; the refusal is counted.
    open[0].ping().await;
    assert_eq!(closed(&srv, "max_connections").await, 1.0);
    drop(open.pop());
    // The freed slot is taken as soon as the server sees it go.
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let mut c = srv.client().await;
        match c.read_raw(Duration::from_millis(100)).await {
            Read::Nothing => {
                c.conn("again").await;
                break;
            }
            other => assert!(Instant::now() < deadline, "slot never freed: {other:?}"),
        }
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_connections_is_refused_at_conn_and_others_are_not() {
    let (_dir, srv) = server_with(|c| c.limits.max_connections_per_client = 2).await;
    let mut first = srv.client().await;
    first.conn("a").await;
    let mut second = srv.client().await;
    second.conn("a").await;
    let mut third = srv.client().await;
    third
        .expect(
            "CONN;CLIENT_ID=a",
            "-FAIL:TOO_MANY_CONNECTIONS;MESSAGE=a already has 2 connections open (limits.max_connections_per_client): close one or share it",
        )
        .await;
    // Another client is not counted against a's.
    third.conn("b").await;
    drop(first);
    let deadline = Instant::now() + LINE_TIMEOUT;
    let mut fourth = srv.client().await;
    while !fourth.cmd("CONN;CLIENT_ID=a").await.starts_with("+PASS") {
        assert!(Instant::now() < deadline, "a's slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_subscriptions_is_refused_and_an_unsub_makes_room() {
    let (dir, srv) = server_with(|c| c.limits.max_subscriptions_per_client = 3).await;
    let mut a = srv.client().await;
    a.conn("a").await;
    for name in ["a/1", "a/2", "a/*"] {
        a.sub("a", name).await;
    }
    let full = "-FAIL:TOO_MANY_SUBSCRIPTIONS;MESSAGE=a holds 3 subscriptions (limits.max_subscriptions_per_client is 3): UNSUB one first, or subscribe to a pattern that covers several";
    a.expect("SUB;CLIENT_ID=a;EVENT_NAME=a/4", full).await;
    // Subscribing again to a pattern it holds is not a new one.
    a.sub("a", "a/2").await;
    // Another client is not counted against a's.
    let mut b = srv.client().await;
    b.conn("b").await;
    b.sub("b", "a/4").await;
    a.expect(
        "UNSUB;CLIENT_ID=a;EVENT_NAME=a/1",
        "+PASS:UNSUBSCRIBED;EVENT_NAME=a/1;CLIENT_ID=a",
    )
    .await;
    a.sub("a", "a/4").await;
    a.expect("SUB;CLIENT_ID=a;EVENT_NAME=a/5", full).await;
    // The refused SUB took no effect: a/5 is not a's after a restart.
    drop((a, b));
    let srv = restart(srv, {
        let mut config = config_in(dir.path());
        config.limits.max_subscriptions_per_client = 3;
        config
    })
    .await;
    let mut a = srv.client().await;
    a.conn("a").await;
    a.expect_prefix(
        "UNSUB;CLIENT_ID=a;EVENT_NAME=a/5",
        "-FAIL:NOT_FOUND;MESSAGE=",
    )
    .await;
    a.expect("SUB;CLIENT_ID=a;EVENT_NAME=a/5", full).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_past_the_rate_are_refused_one_reply_each_and_then_allowed_again() {
    let (_dir, srv) = server_with(|c| c.limits.commands_per_second = 50).await;
    let mut c = srv.client().await;
    let mut calm = srv.client().await;
    calm.conn("calm").await;
    let lines = vec!["PING".to_string(); 200];
    let replies = c.pipeline(&lines, 200).await;
    let pongs = replies.iter().filter(|r| *r == "+PASS:PONG").count();
    let limited: Vec<_> = replies
        .iter()
        .filter(|r| r.starts_with("-FAIL:RATE_LIMITED;"))
        .collect();
    assert_eq!(
        pongs + limited.len(),
        200,
        "one reply per line: {replies:?}"
    );
    // A burst of one second's worth, and what a second refills meanwhile.
    assert!((50..100).contains(&pongs), "{pongs} PINGs were answered");
    assert!(
        limited[0].contains(
            "more than 50 commands a second on this connection (limits.commands_per_second)"
        ),
        "{}",
        limited[0]
    );
    // Another connection has its own allowance.
    calm.ping().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_paced_per_client_and_nothing_is_refused() {
    let (_dir, srv) = server_with(|c| c.limits.replay_events_per_second = 500).await;
    let mut p = srv.client().await;
    p.conn("p").await;
    let mut r = srv.client().await;
    r.conn("r").await;
    r.sub("r", "pace/*").await;
    let published = p
        .publish_many("p", 400, |_| ("pace/tick".into(), "{}".into()))
        .await;
    let mut live = 0;
    while live < published.len() {
        r.line().await;
        live += 1;
    }
    let started = Instant::now();
    let replay = r
        .replay("r", "pace/*", "FROM_POSITION=earliest;LIMIT=400")
        .await;
    let took = started.elapsed();
    assert_eq!(replay.count, 400);
    assert_eq!(replay.records.len(), 400);
    // 400 events at 500 a second, less a first burst of 50: at least
    // 0.7 s, where an unpaced replay takes a few milliseconds.
    assert!(took >= Duration::from_millis(650), "400 events in {took:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_past_the_in_flight_limit_are_refused_in_order() {
    let (_dir, srv) = server_with(|c| {
        c.limits.max_replays_in_flight = 2;
        // Slow replays, so the first two are still streaming when the
        // others arrive.
        c.limits.replay_events_per_second = 100;
    })
    .await;
    let mut p = srv.client().await;
    p.conn("p").await;
    p.publish_many("p", 20, |_| ("slow/tick".into(), "{}".into()))
        .await;
    let mut r = srv.client().await;
    r.conn("r").await;
    let replay = "REPLAY;CLIENT_ID=r;EVENT_NAME=slow/*;FROM_POSITION=earliest;LIMIT=20";
    r.expect(
        "SUB;CLIENT_ID=r;EVENT_NAME=slow/*",
        "+PASS:SUBSCRIBED;EVENT_NAME=slow/*",
    )
    .await;
    let lines = vec![replay.to_string(); 5];
    // Two headers with 20 records each, then three refusals.
    let replies = r.pipeline(&lines, 2 + 40 + 3).await;
    let headers = replies
        .iter()
        .filter(|l| l.starts_with("+PASS:REPLAY_STARTED"))
        .count();
    let refused: Vec<_> = replies
        .iter()
        .filter(|l| l.starts_with("-FAIL:RATE_LIMITED;"))
        .collect();
    assert_eq!((headers, refused.len()), (2, 3), "{replies:?}");
    assert!(
        refused[0].contains(
            "2 replays are already waiting on this connection (limits.max_replays_in_flight)"
        ),
        "{}",
        refused[0]
    );
    // Once they are read, replays are taken again.
    let again = r
        .replay("r", "slow/*", "FROM_POSITION=earliest;LIMIT=1")
        .await;
    assert_eq!(again.count, 1);
    srv.stop().await;
}

/// Publishes `n` events of about 1 KiB under `name`.
async fn publish_kib(p: &mut Client, name: &str, n: usize) {
    let payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(1000));
    for _ in 0..n / 500 {
        p.publish_many("p", 500, |_| (name.to_string(), payload.clone()))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_a_slow_reader_is_not() {
    let (_dir, srv) = server_with(|c| {
        c.limits.send_timeout = Duration::from_millis(500);
        c.limits.max_outbound_bytes = 64 * 1024;
    })
    .await;
    let mut p = srv.client().await;
    p.conn("p").await;
    // 30 MB: far more than the socket buffers hold.
    publish_kib(&mut p, "big/blob", 30_000).await;

    // The stalled reader asks for all of it and reads nothing.
    let mut stalled = TcpStream::connect(srv.addr).await.expect("connect");
    stalled.set_nodelay(true).expect("nodelay");
    use tokio::io::AsyncWriteExt;
    stalled
        .write_all(b"CONN;CLIENT_ID=s\nSUB;CLIENT_ID=s;EVENT_NAME=big/*\nREPLAY;CLIENT_ID=s;EVENT_NAME=big/*;FROM_POSITION=earliest;LIMIT=30000\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Draining it now ends in EOF or a reset well before 30 MB: the
    // server gave up on it.
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let drained = tokio::time::timeout(LINE_TIMEOUT, async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the stalled connection is still open");
    assert!(
        got < 20_000_000,
        "{got} bytes reached a reader that had stalled"
    );
    // Meanwhile the publisher is answered.
    p.ping().await;

    // A reader that keeps reading, slowly, gets everything even though
    // the whole replay takes far longer than the send timeout.
    let mut slow = TcpStream::connect(srv.addr).await.expect("connect");
    slow.write_all(b"CONN;CLIENT_ID=w\nSUB;CLIENT_ID=w;EVENT_NAME=big/*\nREPLAY;CLIENT_ID=w;EVENT_NAME=big/*;FROM_POSITION=earliest;LIMIT=3000\n")
        .await
        .expect("write");
    let started = Instant::now();
    let mut lines = 0usize;
    let mut small = vec![0u8; 16 * 1024];
    while lines < 3 + 3000 {
        let n = tokio::time::timeout(LINE_TIMEOUT, slow.read(&mut small))
            .await
            .expect("the slow reader got nothing for 10 s")
            .expect("read");
        assert!(n > 0, "closed after {lines} lines");
        lines += small[..n].iter().filter(|b| **b == b'\n').count();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        started.elapsed() > Duration::from_millis(500),
        "the slow reader read too fast to show anything"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_conns_is_told_and_closed() {
    let (_dir, srv) = server_with(|c| c.limits.login_timeout = Duration::from_millis(300)).await;
    let mut c = srv.client().await;
    let lines = until_closed(&mut c, LINE_TIMEOUT).await;
    assert_eq!(
        lines,
        vec!["-FAIL:TIMEOUT;MESSAGE=no CONN within 300ms of connecting (limits.login_timeout), closing the connection"]
    );
    assert_eq!(closed(&srv, "login_timeout").await, 1.0);
    // A connection that CONNs in time stays.
    let mut d = srv.client().await;
    d.conn("d").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_without_subscriptions_is_closed_and_a_subscriber_is_not() {
    let (_dir, srv) = server_with(|c| c.limits.idle_timeout = Duration::from_millis(300)).await;
    let mut idle = srv.client().await;
    idle.conn("idle").await;
    let mut subscriber = srv.client().await;
    subscriber.conn("s").await;
    subscriber.sub("s", "quiet/*").await;
    let lines = until_closed(&mut idle, LINE_TIMEOUT).await;
    assert_eq!(
        lines,
        vec!["-FAIL:TIMEOUT;MESSAGE=no command for 300ms and no subscription (limits.idle_timeout), closing the connection"]
    );
    assert_eq!(closed(&srv, "idle_timeout").await, 1.0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    subscriber.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_before_conn_are_short_and_after_it_take_the_configured_length() {
    let (_dir, srv) = server_with(|_| {}).await;
    let mut c = srv.client().await;
    let long = format!(
        "PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD=\"{}\";DELIVERY_TO=*",
        "z".repeat(8000)
    );
    let before = c.cmd(&long).await;
    assert_eq!(
        before,
        "-FAIL:LINE_TOO_LONG;MESSAGE=the line is longer than 4096 bytes, the most before CONN, and was dropped up to the next newline"
    );
    c.conn("a").await;
    let after = c.cmd(&long).await;
    assert!(after.starts_with("+PASS:PUBLISHED;"), "{after}");
    srv.stop().await;
}
