//! Retention over TCP: trimming by age and by size, what replays from a
//! trimmed position do, and publishing while the log is trimmed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ensync_server::config::Config;

const NAME: &str = "order/created";
const CHECK: Duration = Duration::from_millis(10);

fn header(count: usize) -> String {
    format!("+PASS:REPLAY_STARTED;EVENT_NAME={NAME};COUNT={count}")
}

/// A data directory and its config with retention checked every 10 ms.
fn setup() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_in(dir.path());
    config.retention.check_interval = CHECK;
    (dir, config)
}

/// A publisher `p` and a connection of `c` subscribed to NAME.
async fn clients(srv: &TestServer) -> (Client, Client) {
    let mut p = srv.client().await;
    p.conn("p").await;
    let mut c = srv.client().await;
    c.conn("c").await;
    c.sub("c", NAME).await;
    (p, c)
}

/// Replays `earliest` until it holds exactly `want`, or fails after 3 s.
async fn await_retained(c: &mut Client, id: &str, want: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let rep = c.replay(id, NAME, "FROM_POSITION=earliest").await;
        if rep.idems() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "retained {:?}, want {want:?}",
            rep.idems()
        );
        tokio::time::sleep(CHECK).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_older_than_max_age_are_removed() {
    let (_dir, mut config) = setup();
    config.retention.max_age = Some(Duration::from_millis(1500));
    let srv = start_server_with(config).await;
    let (mut p, mut c) = clients(&srv).await;
    let old: Vec<(String, u64)> = vec![
        p.publish("p", NAME, "{\"i\":0}").await,
        p.publish("p", NAME, "{\"i\":1}").await,
    ];
    // Delivered to c itself; left unsettled.
    c.deliveries(2).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (young, _) = p.publish("p", NAME, "{\"i\":2}").await;
    c.deliveries(1).await;
    // The old ones go at 1.5 s, the young one not before 2.4 s.
    await_retained(&mut c, "c", std::slice::from_ref(&young)).await;

    c.expect(
        &format!(
            "REPLAY;CLIENT_ID=c;EVENT_NAME={NAME};FROM_POSITION={}",
            old[0].0
        ),
        INVALID_POSITION,
    )
    .await;
    c.expect(
        &format!(
            "REPLAY;CLIENT_ID=c;EVENT_NAME={NAME};FROM_POSITION={}",
            old[1].0
        ),
        INVALID_POSITION,
    )
    .await;
    for pos in [old[0].1.to_string(), "0".into(), rfc3339(old[0].1, 0)] {
        let rep = c.replay("c", NAME, &format!("FROM_POSITION={pos}")).await;
        assert_eq!(rep.header, header(1), "FROM_POSITION={pos}");
        assert_eq!(rep.idems(), vec![young.clone()], "FROM_POSITION={pos}");
    }
    c.expect_prefix(
        &format!("REPLAY;CLIENT_ID=c;EVENT_IDEM={}", old[0].0),
        "-FAIL:NOT_FOUND;MESSAGE=",
    )
    .await;
    // The trimmed events cannot be settled any more, nor are they
    // delivered again to a reconnecting client.
    let (newest, _) = p.publish("p", NAME, "{\"i\":3}").await;
    c.deliveries(1).await;
    drop(c);
    let mut c = srv.client().await;
    c.conn("c").await;
    assert_eq!(c.deliveries(2).await, vec![young, newest]);
    c.expect_silence(Duration::from_millis(200)).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_commits_go_while_the_log_is_over_max_bytes() {
    let (_dir, mut config) = setup();
    // Each event holds a 10 000-byte payload: the log keeps two.
    config.retention.max_bytes = Some(25_000);
    let srv = start_server_with(config).await;
    let (mut p, mut c) = clients(&srv).await;
    let payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(10_000));
    let mut evs = Vec::new();
    for _ in 0..5 {
        evs.push(p.publish("p", NAME, &payload).await);
        c.deliveries(1).await;
    }
    let ids: Vec<String> = evs.iter().map(|e| e.0.clone()).collect();
    await_retained(&mut c, "c", &ids[3..]).await;
    // Stable: the two youngest fit, so they stay.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rep = c.replay("c", NAME, "FROM_POSITION=earliest").await;
    assert_eq!(rep.idems(), ids[3..]);

    for trimmed in &ids[..3] {
        c.expect(
            &format!("REPLAY;CLIENT_ID=c;EVENT_NAME={NAME};FROM_POSITION={trimmed}"),
            INVALID_POSITION,
        )
        .await;
    }
    let rep = c
        .replay("c", NAME, &format!("FROM_POSITION={}", evs[0].1))
        .await;
    assert_eq!(rep.idems(), ids[3..]);
    let rep = c
        .replay("c", NAME, &format!("FROM_POSITION={}", ids[4]))
        .await;
    assert_eq!(rep.idems(), ids[4..]);

    // One more pushes the oldest retained out.
    let (next, _) = p.publish("p", NAME, &payload).await;
    c.deliveries(1).await;
    await_retained(&mut c, "c", &[ids[4].clone(), next]).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_goes_on_while_the_log_is_trimmed() {
    let (_dir, mut config) = setup();
    config.retention.max_bytes = Some(20_000);
    let srv = start_server_with(config).await;
    let mut p = srv.client().await;
    p.conn("p").await;
    let mut r = srv.client().await;
    r.conn("r").await;
    r.sub("r", NAME).await;
    let mut published = Vec::new();
    for round in 0..10 {
        let evs = p
            .publish_many("p", 100, |i| {
                (NAME.to_string(), format!("{{\"round\":{round},\"i\":{i}}}"))
            })
            .await;
        published.extend(evs.into_iter().map(|e| e.idem));
        tokio::time::sleep(CHECK).await;
    }
    // What is left is a suffix of what was published: no gaps, in order.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let line =
            format!("REPLAY;CLIENT_ID=r;EVENT_NAME={NAME};FROM_POSITION=earliest;LIMIT=10000");
        let rep = r.replay_line(&line, NAME, true).await;
        let kept = rep.idems();
        assert!(!kept.is_empty(), "everything was removed");
        assert!(
            published.ends_with(&kept),
            "retained events are not the newest ones in order"
        );
        if kept.len() < published.len() / 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the log was not trimmed");
        tokio::time::sleep(CHECK).await;
    }
    srv.stop().await;
}
