//! The HTTP API against a real server: operator replays (`POST /replays`,
//! `/asyncOperations`) and what their deliveries do to subscribers over
//! TCP, the admin token, `/healthz`, `/metrics`, and the JSON errors of
//! unknown routes, wrong methods and bad bodies.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::http::*;
use common::*;
use ensync_server::config::{ClientEntry, Config};
use serde_json::{json, Value};

/// How long "nothing arrives" is watched for.
const SILENCE: Duration = Duration::from_millis(300);
/// A short ack wait for the tests that wait for redelivery.
const SHORT_ACK_WAIT: Duration = Duration::from_millis(500);

/// A fresh data directory and its default config.
fn setup() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path());
    (dir, config)
}

/// A connection of `id`, connected.
async fn connected(srv: &TestServer, id: &str) -> Client {
    let mut c = srv.client().await;
    c.conn(id).await;
    c
}

/// A connection of `id`, subscribed to each of `patterns`.
async fn subscriber(srv: &TestServer, id: &str, patterns: &[&str]) -> Client {
    let mut c = connected(srv, id).await;
    for pattern in patterns {
        c.sub(id, pattern).await;
    }
    c
}

/// A published event.
#[derive(Debug, Clone)]
struct Ev {
    idem: String,
    ts: u64,
}

/// Publishes one event per `(name, delivery_to)` as `p`, payload
/// `{"i":<index>}`, each with a loggedAt at least 2 ms after the one
/// before (asserted), so `ts + 1` and `ts - 1` fall between neighbours.
async fn publish_spaced(p: &mut Client, items: &[(&str, &str)]) -> Vec<Ev> {
    let mut out: Vec<Ev> = Vec::with_capacity(items.len());
    for (i, (name, to)) in items.iter().enumerate() {
        if let Some(last) = out.last() {
            while now_ms() <= last.ts + 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let (idem, ts) = p.publish_to("p", name, &format!("{{\"i\":{i}}}"), to).await;
        if let Some(last) = out.last() {
            assert!(ts >= last.ts + 2, "precondition: loggedAt {ts} too close");
        }
        out.push(Ev { idem, ts });
    }
    out
}

/// Reads `n` live deliveries, returning their lines.
async fn live_lines(c: &mut Client, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let line = c.line().await;
        assert!(line.starts_with("+RECORD:"), "expected a delivery: {line}");
        assert!(!is_replayed(&parse_record(&line)), "not live: {line}");
        out.push(line);
    }
    out
}

/// Reads `n` deliveries that must carry the replay marks.
async fn replayed(c: &mut Client, n: usize) -> Vec<(String, Value)> {
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let line = c.line().await;
        assert!(
            line.starts_with("+RECORD:"),
            "expected replayed delivery {} of {n}, got {line:?}",
            k + 1
        );
        let record = parse_record(&line);
        assert!(is_replayed(&record), "not marked replayed: {line}");
        out.push((line, record));
    }
    out
}

/// The idems of `n` replayed deliveries, in the order received.
async fn replayed_idems(c: &mut Client, n: usize) -> Vec<String> {
    replayed(c, n)
        .await
        .iter()
        .map(|(_, r)| idem_of(r))
        .collect()
}

/// What a live delivery line (published without metadata) looks like
/// when an operator replay delivers it.
fn marked(live: &str, replay_ts: u64, acked: bool) -> String {
    let body = live
        .strip_suffix("\"metadata\":{}}")
        .unwrap_or_else(|| panic!("live record without empty metadata at its end: {live}"));
    format!(
        "{body}\"metadata\":{{\"REPLAYED\":true,\"$internal\":{{\"replay_info\":{{\"isReplayed\":true,\"replayTimestamp\":{replay_ts},\"wasAcknowledged\":{acked}}}}}}}}}"
    )
}

/// Asserts that none of `clients` receives anything for `SILENCE`,
/// watching them all at once.
async fn silent(clients: &mut [&mut Client]) {
    futures_util::future::join_all(clients.iter_mut().map(|c| c.expect_silence(SILENCE))).await;
}

/// ACKs every idem as `id`.
async fn ack_all(c: &mut Client, id: &str, idems: &[String]) {
    for idem in idems {
        c.ack(id, idem).await;
    }
}

fn idems(evs: &[Ev]) -> Vec<String> {
    evs.iter().map(|e| e.idem.clone()).collect()
}

fn pick(evs: &[Ev], at: &[usize]) -> Vec<String> {
    at.iter().map(|&i| evs[i].idem.clone()).collect()
}

/// Polls the operation until `ready` holds for it (10 s at most).
async fn op_until(admin: &Admin, id: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + OP_TIMEOUT;
    loop {
        let op = admin.op(id).await;
        if ready(&op) {
            return op;
        }
        assert!(Instant::now() < deadline, "{id} never {what}: {op}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ------------------------------------------------------------ slices

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_delivers_exactly_the_slice_in_publication_order_with_replay_marks() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    // c subscribes to user/* too: the operation's pattern, not c's
    // subscriptions, decides which names are in the slice.
    let mut c = subscriber(&srv, "c", &["order/*", "user/*"]).await;
    let mut p = connected(&srv, "p").await;
    let names = [
        "order/created",
        "order/paid",
        "order/created",
        "user/signed_up",
    ];
    let items: Vec<(&str, &str)> = (0..12).map(|i| (names[i % 4], "*")).collect();
    let evs = publish_spaced(&mut p, &items).await;
    let live = live_lines(&mut c, evs.len()).await;
    ack_all(&mut c, "c", &idems(&evs)).await;

    // Both bounds are inclusive, at exact loggedAt values: 4 (just
    // before the start) and 10 (just after the end) match the pattern
    // and are left out; 7 is in the slice but not order/*.
    let before = now_ms();
    let op = admin.run(&slice("order/*", evs[5].ts, evs[9].ts)).await;
    let after = now_ms();
    assert_eq!(
        (
            num(&op, "total"),
            num(&op, "processed"),
            num(&op, "deliveries")
        ),
        (4, 4, 4),
        "{op}"
    );
    let created = num(&op, "createdAt");
    assert!((before..=after).contains(&created), "createdAt {created}");
    let got = replayed(&mut c, 4).await;
    let want: Vec<String> = [5, 6, 8, 9]
        .iter()
        .map(|&i| marked(&live[i], created, true))
        .collect();
    let got_lines: Vec<String> = got.iter().map(|(l, _)| l.clone()).collect();
    assert_eq!(got_lines, want);
    ack_all(&mut c, "c", &pick(&evs, &[5, 6, 8, 9])).await;
    c.expect_silence(SILENCE).await;

    // One millisecond inside each bound leaves the bound events out.
    let op = admin
        .run(&slice("order/*", evs[5].ts + 1, evs[9].ts - 1))
        .await;
    assert_eq!((num(&op, "total"), num(&op, "deliveries")), (2, 2), "{op}");
    assert_eq!(replayed_idems(&mut c, 2).await, pick(&evs, &[6, 8]));
    ack_all(&mut c, "c", &pick(&evs, &[6, 8])).await;

    // The same slice as an RFC 3339 date-time (in another UTC offset)
    // and a string of digits; the status keeps them as milliseconds.
    let op = admin
        .run(&json!({
            "eventName": "order/*",
            "startTimestamp": rfc3339(evs[5].ts, 330),
            "endTimestamp": evs[9].ts.to_string(),
        }))
        .await;
    assert_eq!(num(&op, "startTimestamp"), evs[5].ts, "{op}");
    assert_eq!(num(&op, "endTimestamp"), evs[9].ts, "{op}");
    assert_eq!(num(&op, "deliveries"), 4, "{op}");
    let created = num(&op, "createdAt");
    let got: Vec<String> = replayed(&mut c, 4)
        .await
        .into_iter()
        .map(|(l, _)| l)
        .collect();
    let want: Vec<String> = [5, 6, 8, 9]
        .iter()
        .map(|&i| marked(&live[i], created, true))
        .collect();
    assert_eq!(got, want);
    ack_all(&mut c, "c", &pick(&evs, &[5, 6, 8, 9])).await;

    // A single name, and a slice of one event (start = end).
    let op = admin.run(&slice("order/paid", evs[9].ts, evs[9].ts)).await;
    assert_eq!((num(&op, "total"), num(&op, "deliveries")), (1, 1), "{op}");
    assert_eq!(replayed_idems(&mut c, 1).await, pick(&evs, &[9]));
    c.ack("c", &evs[9].idem).await;
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_outside_the_log_succeed_with_nothing_to_do() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    // An empty log.
    let op = admin.run(&json!({"eventName": "a/*"})).await;
    assert_eq!((num(&op, "total"), num(&op, "processed")), (0, 0), "{op}");

    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    let mut p = connected(&srv, "p").await;
    let evs = publish_spaced(&mut p, &[("a/x", "*"), ("a/x", "*"), ("a/x", "*")]).await;
    let live = live_lines(&mut c, 3).await;
    assert_eq!(live.len(), 3);
    ack_all(&mut c, "c", &idems(&evs)).await;
    for body in [
        json!({"eventName": "a/*", "startTimestamp": evs[2].ts + 1}),
        json!({"eventName": "a/*", "endTimestamp": evs[0].ts - 1}),
        json!({"eventName": "a/*", "startTimestamp": 0, "endTimestamp": evs[0].ts - 1}),
        json!({"eventName": "b/*"}),
    ] {
        let op = admin.run(&body).await;
        assert_eq!(
            (
                num(&op, "total"),
                num(&op, "processed"),
                num(&op, "deliveries")
            ),
            (0, 0, 0),
            "{body} -> {op}"
        );
    }
    c.expect_silence(SILENCE).await;
    // Defaults: the whole log.
    let op = admin.run(&json!({"eventName": "a/*"})).await;
    assert_eq!((num(&op, "total"), num(&op, "deliveries")), (3, 3), "{op}");
    assert_eq!(replayed_idems(&mut c, 3).await, idems(&evs));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slice_ends_at_the_head_when_the_operation_is_created() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut p = connected(&srv, "p").await;
    let old = p
        .publish_many("p", 20, |i| ("a/x".into(), format!("{{\"i\":{i}}}")))
        .await;
    // Subscribed after: the old `*` events never come live.
    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    // Paced, so it is still running while more is published.
    let id = admin
        .start(&json!({"eventName": "a/*", "eventsPerSecond": 20}))
        .await;
    let new = [
        p.publish("p", "a/x", "{\"new\":1}").await.0,
        p.publish("p", "a/x", "{\"new\":2}").await.0,
    ];
    let op = admin.op(&id).await;
    assert_eq!(op["status"], "RUNNING", "precondition: still running: {op}");
    let op = admin.succeeded(&id).await;
    assert_eq!(
        (
            num(&op, "total"),
            num(&op, "processed"),
            num(&op, "deliveries")
        ),
        (20, 20, 20),
        "{op}"
    );
    // c gets the 20 replayed and the 2 new ones live, nothing more.
    let (mut marked_ids, mut live_ids) = (Vec::new(), Vec::new());
    for _ in 0..22 {
        let record = parse_record(&c.line().await);
        if is_replayed(&record) {
            marked_ids.push(idem_of(&record));
        } else {
            live_ids.push(idem_of(&record));
        }
    }
    let old_ids: Vec<String> = old.iter().map(|e| e.idem.clone()).collect();
    assert_eq!(marked_ids, old_ids);
    assert_eq!(live_ids, new.to_vec());
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_before_retention_is_clamped_to_the_oldest_event() {
    let (_dir, mut config) = setup();
    config.retention.max_bytes = Some(1500);
    config.retention.check_interval = Duration::from_millis(10);
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut p = connected(&srv, "p").await;
    let pad = "x".repeat(300);
    let items: Vec<(&str, &str)> = (0..10).map(|_| ("a/x", "*")).collect();
    let mut evs = Vec::new();
    for (name, to) in items {
        evs.push(p.publish_to("p", name, &format!("\"{pad}\""), to).await);
    }
    // Wait for retention to bring the log under its size.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health = get(srv.http_addr, "/healthz").await.json();
        if num(&health, "storeBytes") <= 1500 {
            break;
        }
        assert!(Instant::now() < deadline, "never trimmed: {health}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    let kept = c.replay("c", "a/*", "FROM_POSITION=earliest").await.idems();
    let all: Vec<String> = evs.iter().map(|e| e.0.clone()).collect();
    assert!(
        !kept.is_empty() && kept.len() < all.len(),
        "precondition: retention removed some, not all: {kept:?}"
    );
    assert_eq!(kept[..], all[all.len() - kept.len()..], "kept the newest");

    for start in [json!(evs[0].1), json!(0)] {
        let op = admin
            .run(&json!({"eventName": "a/*", "startTimestamp": start}))
            .await;
        assert_eq!(num(&op, "total"), kept.len() as u64, "{op}");
        assert_eq!(num(&op, "deliveries"), kept.len() as u64, "{op}");
        // The status keeps the start as asked.
        assert_eq!(op["startTimestamp"], start, "{op}");
        assert_eq!(replayed_idems(&mut c, kept.len()).await, kept);
        ack_all(&mut c, "c", &kept).await;
    }
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

// ------------------------------------------------------ who receives

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reaches_every_addressed_subscriber_and_no_one_else() {
    let (_dir, mut config) = setup();
    config.clients = vec![ClientEntry {
        id: "c".into(),
        public_key: Some("pk-of-c".into()),
        ..ClientEntry::default()
    }];
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut a = subscriber(&srv, "a", &["order/*"]).await;
    let mut b = subscriber(&srv, "b", &["order/*"]).await;
    // Two subscriptions covering the same names: still one delivery.
    let mut c = subscriber(&srv, "c", &["order/*", "order/created"]).await;
    let mut d = subscriber(&srv, "d", &["user/*"]).await;
    let mut p = connected(&srv, "p").await;
    let evs = publish_spaced(
        &mut p,
        &[
            ("order/created", "*"),      // 0: a b c
            ("order/paid", "a"),         // 1: a
            ("order/created", "b, c"),   // 2: b c
            ("order/paid", "pk-of-c"),   // 3: c, by its public key
            ("order/created", "nobody"), // 4: no one
            ("user/x", "*"),             // 5: d
            ("order/created", "d"),      // 6: no one (d does not subscribe to it)
        ],
    )
    .await;
    let want = [
        ("a", vec![0, 1]),
        ("b", vec![0, 2]),
        ("c", vec![0, 2, 3]),
        ("d", vec![5]),
    ];
    let mut clients = [&mut a, &mut b, &mut c, &mut d];
    // The same addressing rules held live; settle those deliveries.
    for (client, (id, at)) in clients.iter_mut().zip(&want) {
        let got = client.deliveries(at.len()).await;
        assert_eq!(got, pick(&evs, at), "live to {id}");
        ack_all(client, id, &got).await;
    }

    let op = admin.run(&json!({"eventName": "*"})).await;
    assert_eq!(
        (
            num(&op, "total"),
            num(&op, "processed"),
            num(&op, "deliveries")
        ),
        (7, 7, 8),
        "{op}"
    );
    for (client, (id, at)) in clients.iter_mut().zip(&want) {
        let got = replayed_idems(client, at.len()).await;
        assert_eq!(got, pick(&evs, at), "replayed to {id}");
        ack_all(client, id, &got).await;
    }
    silent(&mut clients).await;

    // clientId: only that client's subscriptions.
    let op = admin
        .run(&json!({"eventName": "order/*", "clientId": "c"}))
        .await;
    assert_eq!(op["clientId"], "c", "{op}");
    assert_eq!((num(&op, "total"), num(&op, "deliveries")), (6, 3), "{op}");
    let got = replayed_idems(clients[2], 3).await;
    assert_eq!(got, pick(&evs, &[0, 2, 3]));
    ack_all(clients[2], "c", &got).await;
    // A client without subscriptions gets nothing, and that succeeds.
    let op = admin
        .run(&json!({"eventName": "*", "clientId": "stranger"}))
        .await;
    assert_eq!((num(&op, "total"), num(&op, "deliveries")), (7, 0), "{op}");
    silent(&mut clients).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_unacked_leaves_out_what_each_subscriber_acknowledged() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut a = subscriber(&srv, "a", &["order/*"]).await;
    let mut b = subscriber(&srv, "b", &["order/*"]).await;
    let mut p = connected(&srv, "p").await;
    let evs = publish_spaced(&mut p, &[("order/x", "*"); 4]).await;
    assert_eq!(a.deliveries(4).await, idems(&evs));
    assert_eq!(b.deliveries(4).await, idems(&evs));
    // a acknowledges 0 and 2, b only 1; the rest are discarded, which
    // is not acknowledging.
    let acked_by = |id: &str| -> Vec<bool> {
        match id {
            "a" => vec![true, false, true, false],
            _ => vec![false, true, false, false],
        }
    };
    async fn settle(c: &mut Client, id: &str, evs: &[Ev], acked: &[bool]) {
        for (e, &ack) in evs.iter().zip(acked) {
            if ack {
                c.ack(id, &e.idem).await;
            } else {
                c.expect(
                    &format!("DISCARD;CLIENT_ID={id};EVENT_IDEM={};REASON=bad", e.idem),
                    &format!("+PASS:DISCARDED;IDEM={}", e.idem),
                )
                .await;
            }
        }
    }
    settle(&mut a, "a", &evs, &acked_by("a")).await;
    settle(&mut b, "b", &evs, &acked_by("b")).await;

    // Everything, each record telling whether its receiver acked it.
    let op = admin.run(&json!({"eventName": "order/*"})).await;
    assert_eq!(op["onlyUnacked"], false, "{op}");
    assert_eq!(num(&op, "deliveries"), 8, "{op}");
    for (c, id) in [(&mut a, "a"), (&mut b, "b")] {
        let got = replayed(c, 4).await;
        let ids: Vec<String> = got.iter().map(|(_, r)| idem_of(r)).collect();
        assert_eq!(ids, idems(&evs), "to {id}");
        let marks: Vec<bool> = got.iter().map(|(_, r)| was_acknowledged(r)).collect();
        assert_eq!(marks, acked_by(id), "wasAcknowledged to {id}");
        // Settled the same way again, so what was acked stays acked.
        settle(c, id, &evs, &acked_by(id)).await;
    }

    let op = admin
        .run(&json!({"eventName": "order/*", "onlyUnacked": true}))
        .await;
    assert_eq!(op["onlyUnacked"], true, "{op}");
    assert_eq!((num(&op, "total"), num(&op, "deliveries")), (4, 5), "{op}");
    let got = replayed(&mut a, 2).await;
    assert_eq!(
        got.iter().map(|(_, r)| idem_of(r)).collect::<Vec<_>>(),
        pick(&evs, &[1, 3])
    );
    assert!(got.iter().all(|(_, r)| !was_acknowledged(r)));
    let got = replayed(&mut b, 3).await;
    assert_eq!(
        got.iter().map(|(_, r)| idem_of(r)).collect::<Vec<_>>(),
        pick(&evs, &[0, 2, 3])
    );
    assert!(got.iter().all(|(_, r)| !was_acknowledged(r)));
    silent(&mut [&mut a, &mut b]).await;
    srv.stop().await;
}

// ----------------------------------------- replayed deliveries settle

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_delivery_comes_again_after_the_ack_wait_until_acked() {
    let (_dir, mut config) = setup();
    config.delivery.ack_wait = SHORT_ACK_WAIT;
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut p = connected(&srv, "p").await;
    let e1 = p.publish("p", "a/x", "{\"i\":1}").await.0;
    let e2 = p.publish("p", "a/x", "{\"i\":2}").await.0;
    // Subscribed after the `*` events: only the replay brings them.
    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    c.expect_silence(SILENCE).await;

    let op = admin.run(&json!({"eventName": "a/*"})).await;
    let first = replayed(&mut c, 2).await;
    assert_eq!(
        first.iter().map(|(_, r)| idem_of(r)).collect::<Vec<_>>(),
        vec![e1.clone(), e2.clone()]
    );
    for (_, r) in &first {
        assert_eq!(replay_timestamp(r), num(&op, "createdAt"));
        assert!(!was_acknowledged(r));
    }
    c.ack("c", &e1).await;
    // Only the unacked one comes back, the same line, still marked.
    let again = replayed(&mut c, 1).await;
    assert_eq!(again[0].0, first[1].0);
    // And again, for as long as it is not acked.
    let again = replayed(&mut c, 1).await;
    assert_eq!(again[0].0, first[1].0);
    c.ack("c", &e2).await;
    c.expect_silence(2 * SHORT_ACK_WAIT).await;
    // Settled for good.
    c.expect_prefix(
        &format!("ACK;CLIENT_ID=c;EVENT_IDEM={e2}"),
        "-FAIL:NOT_FOUND;",
    )
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_subscriber_gets_its_replayed_deliveries_when_it_connects() {
    let (dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    let mut p = connected(&srv, "p").await;
    let evs = publish_spaced(&mut p, &[("a/x", "*"), ("a/y", "*"), ("a/x", "*")]).await;
    assert_eq!(c.deliveries(3).await, idems(&evs));
    ack_all(&mut c, "c", &idems(&evs)).await;
    c.ping().await;
    drop(c);

    let op = admin.run(&json!({"eventName": "a/*"})).await;
    assert_eq!(num(&op, "deliveries"), 3, "{op}");
    let created = num(&op, "createdAt");

    // CONN alone: the subscription is durable, the deliveries stored.
    let mut c = connected(&srv, "c").await;
    let got = replayed(&mut c, 3).await;
    assert_eq!(
        got.iter().map(|(_, r)| idem_of(r)).collect::<Vec<_>>(),
        idems(&evs)
    );
    assert!(got
        .iter()
        .all(|(_, r)| replay_timestamp(r) == created && was_acknowledged(r)));
    c.ack("c", &evs[0].idem).await;
    c.ping().await;
    drop(c);

    // Unacked ones come again on the next connection ...
    let mut c = connected(&srv, "c").await;
    assert_eq!(replayed_idems(&mut c, 2).await, pick(&evs, &[1, 2]));
    c.expect_silence(SILENCE).await;
    drop(c);
    drop(p);
    // ... and after a restart.
    let srv = restart(srv, config_in(dir.path())).await;
    let mut c = connected(&srv, "c").await;
    let got = replayed(&mut c, 2).await;
    assert_eq!(
        got.iter().map(|(_, r)| idem_of(r)).collect::<Vec<_>>(),
        pick(&evs, &[1, 2])
    );
    assert!(got.iter().all(|(_, r)| replay_timestamp(r) == created));
    ack_all(&mut c, "c", &pick(&evs, &[1, 2])).await;
    c.expect_silence(SILENCE).await;
    drop(c);
    let mut c = connected(&srv, "c").await;
    c.expect_silence(SILENCE).await;
    c.ping().await;
    srv.stop().await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_deliveries_of_history_paged_out_arrive_in_order_and_again_until_acked() {
    const N: usize = 300;
    let (dir, mut config) = setup();
    config.delivery.ack_wait = Duration::from_secs(1);
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut p = connected(&srv, "p").await;
    let from_disk = || async {
        scrape(srv.http_addr)
            .await
            .must("ensync_deliveries_read_from_disk_total", &[])
    };
    let pad = "x".repeat(400);
    let (mut replays_cold, mut again_cold) = (false, false);
    // The kernel may keep a page another CPU still holds a reference to:
    // rounds go on, each with history of its own, until both the replayed
    // deliveries and their second delivery were read from the disk.
    for round in 0..20 {
        let name = format!("r{round}/x");
        let evs: Vec<String> = p
            .publish_many("p", N, |i| {
                (name.clone(), format!("{{\"i\":{i},\"pad\":\"{pad}\"}}"))
            })
            .await
            .into_iter()
            .map(|e| e.idem)
            .collect();
        // Subscribed after them, and gone: only the replay brings them,
        // from the queue, when the client connects.
        let pattern = format!("r{round}/*");
        drop(subscriber(&srv, "c", &[&pattern]).await);
        let op = admin.run(&json!({ "eventName": pattern })).await;
        assert_eq!(num(&op, "deliveries"), N as u64, "{op}");
        page_out(dir.path());
        let before = from_disk().await;
        let mut c = connected(&srv, "c").await;
        assert_eq!(replayed_idems(&mut c, N).await, evs, "round {round}");
        let replayed_at = from_disk().await;
        replays_cold |= replayed_at > before;
        // Left unacked, they come again after the ack wait.
        page_out(dir.path());
        assert_eq!(replayed_idems(&mut c, N).await, evs, "round {round}, again");
        again_cold |= from_disk().await > replayed_at;
        let acks: Vec<String> = evs
            .iter()
            .map(|id| format!("ACK;CLIENT_ID=c;EVENT_IDEM={id}"))
            .collect();
        for reply in c.pipeline(&acks, N).await {
            assert!(reply.starts_with("+PASS:ACKNOWLEDGED"), "{reply}");
        }
        if replays_cold && again_cold {
            break;
        }
    }
    assert!(replays_cold, "replayed deliveries read from the disk");
    assert!(again_cold, "deliveries made again read from the disk");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_an_unsettled_event_sends_it_again_and_one_ack_settles_it() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    let mut p = connected(&srv, "p").await;
    let (e1, _) = p.publish("p", "a/x", "{\"i\":1}").await;
    let live = live_lines(&mut c, 1).await;
    // Not acked, and the ack wait (30 s by default) is far off: what
    // comes now is the replay.
    let op = admin.run(&json!({"eventName": "a/*"})).await;
    assert_eq!(num(&op, "deliveries"), 1, "{op}");
    let got = replayed(&mut c, 1).await;
    assert_eq!(got[0].0, marked(&live[0], num(&op, "createdAt"), false));
    c.ack("c", &e1).await;
    c.expect_silence(SILENCE).await;
    drop(c);
    // Nothing left to deliver: one ACK settled both.
    let mut c = connected(&srv, "c").await;
    c.expect_silence(SILENCE).await;
    c.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_subscription_holds_replayed_deliveries_and_sends_them_before_new_events() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut p = connected(&srv, "p").await;
    let old = [
        p.publish("p", "a/x", "{\"i\":1}").await.0,
        p.publish("p", "a/x", "{\"i\":2}").await.0,
    ];
    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    c.expect(
        "PAUSE;CLIENT_ID=c;EVENT_NAME=a/*",
        "+PASS:PAUSED;EVENT_NAME=a/*",
    )
    .await;
    let op = admin.run(&json!({"eventName": "a/*"})).await;
    assert_eq!(num(&op, "deliveries"), 2, "{op}");
    // Published after the operation, while paused: a new event.
    let new = p.publish("p", "a/x", "{\"i\":3}").await.0;
    c.expect_silence(SILENCE).await;
    c.expect(
        "CONTINUE;CLIENT_ID=c;EVENT_NAME=a/*",
        "+PASS:CONTINUED;EVENT_NAME=a/*",
    )
    .await;
    // Replayed deliveries first, then the new event.
    assert_eq!(replayed_idems(&mut c, 2).await, old.to_vec());
    assert_eq!(c.deliveries(1).await, vec![new.clone()]);
    ack_all(&mut c, "c", &[old[0].clone(), old[1].clone(), new]).await;
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_drops_the_replayed_deliveries_queued_for_it() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut p = connected(&srv, "p").await;
    p.publish("p", "a/x", "{\"i\":1}").await;
    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    // Paused, so the replayed delivery waits in the queue.
    c.expect(
        "PAUSE;CLIENT_ID=c;EVENT_NAME=a/*",
        "+PASS:PAUSED;EVENT_NAME=a/*",
    )
    .await;
    let op = admin.run(&json!({"eventName": "a/*"})).await;
    assert_eq!(num(&op, "deliveries"), 1, "{op}");
    c.expect(
        "UNSUB;CLIENT_ID=c;EVENT_NAME=a/*",
        "+PASS:UNSUBSCRIBED;EVENT_NAME=a/*;CLIENT_ID=c",
    )
    .await;
    // A new subscription starts afresh: only what is published now.
    c.sub("c", "a/*").await;
    let new = p.publish("p", "a/x", "{\"i\":2}").await.0;
    let line = c.line().await;
    let record = parse_record(&line);
    assert!(
        !is_replayed(&record),
        "the dropped replayed delivery came: {line}"
    );
    assert_eq!(idem_of(&record), new);
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_event_replayed_keeps_its_due_time() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    let mut p = connected(&srv, "p").await;
    let (e1, _) = p.publish("p", "a/x", "{\"i\":1}").await;
    let live = live_lines(&mut c, 1).await;
    let reply = c
        .cmd(&format!("DEFER;CLIENT_ID=c;EVENT_IDEM={e1};DELAY=2000"))
        .await;
    let due: u64 = reply
        .strip_prefix(&format!("+PASS:DEFERRED;IDEM={e1};DELIVERY_AT="))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("DEFER reply {reply:?}"));
    let op = admin.run(&json!({"eventName": "a/*"})).await;
    assert_eq!(num(&op, "deliveries"), 1, "{op}");
    assert!(
        num(&op, "updatedAt") < due,
        "precondition: the operation finished before the deferral was due: {op}"
    );
    // Not sent now: when it is due, once, marked replayed.
    let line = c.line().await;
    assert!(now_ms() >= due, "sent before its due time {due}: {line}");
    assert_eq!(line, marked(&live[0], num(&op, "createdAt"), false));
    c.ack("c", &e1).await;
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_deliveries_respect_the_unsettled_cap() {
    let (_dir, mut config) = setup();
    config.delivery.max_unsettled = 2;
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut p = connected(&srv, "p").await;
    let evs = p
        .publish_many("p", 5, |i| ("a/x".into(), format!("{{\"i\":{i}}}")))
        .await;
    let all: Vec<String> = evs.iter().map(|e| e.idem.clone()).collect();
    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    let op = admin.run(&json!({"eventName": "a/*"})).await;
    assert_eq!(num(&op, "deliveries"), 5, "{op}");
    assert_eq!(replayed_idems(&mut c, 2).await, all[..2]);
    c.expect_silence(SILENCE).await;
    // Each ACK makes room for one more, in order.
    for k in 0..3 {
        c.ack("c", &all[k]).await;
        assert_eq!(replayed_idems(&mut c, 1).await, all[k + 2..k + 3]);
        c.expect_silence(Duration::from_millis(100)).await;
    }
    ack_all(&mut c, "c", &all[3..]).await;
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

// ------------------------------------------------ operation lifecycle

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_the_request_as_asked_and_the_counts() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut p = connected(&srv, "p").await;
    let evs = publish_spaced(&mut p, &[("a/x", "*"); 3]).await;
    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    let mut d = subscriber(&srv, "d", &["a/*"]).await;

    let before = now_ms();
    let start = rfc3339(evs[0].ts, -120);
    let id = admin
        .start(&json!({
            "type": "ensync",
            "eventName": "a/*",
            "startTimestamp": start,
            "endTimestamp": evs[2].ts.to_string(),
            "clientId": "c",
            "onlyUnacked": true,
            "eventsPerSecond": 1000,
        }))
        .await;
    let after = now_ms();
    let op = admin.op(&id).await;
    assert_op_shape(&op);
    assert_eq!(op["id"], id.as_str());
    assert_eq!(op["taskType"], "Replay");
    assert_eq!(op["eventName"], "a/*");
    assert_eq!(op["clientId"], "c");
    assert_eq!(op["onlyUnacked"], true);
    assert_eq!(num(&op, "startTimestamp"), evs[0].ts);
    assert_eq!(num(&op, "endTimestamp"), evs[2].ts);
    assert_eq!(num(&op, "eventsPerSecond"), 1000);
    let created = num(&op, "createdAt");
    assert!((before..=after).contains(&created), "createdAt {created}");
    assert!(
        ["RUNNING", "SUCCEEDED"].contains(&op["status"].as_str().unwrap_or_default()),
        "{op}"
    );
    let op = admin.succeeded(&id).await;
    assert_op_shape(&op);
    assert_eq!(
        (
            num(&op, "total"),
            num(&op, "processed"),
            num(&op, "deliveries")
        ),
        (3, 3, 3),
        "{op}"
    );
    assert!(num(&op, "updatedAt") >= created, "{op}");
    assert_eq!(op["error"], Value::Null);
    assert_eq!(replayed_idems(&mut c, 3).await, idems(&evs));
    d.expect_silence(SILENCE).await;

    // What was not given is null (or false), not a default value.
    let id = admin.start(&json!({"eventName": "a/x"})).await;
    let op = admin.succeeded(&id).await;
    assert_op_shape(&op);
    for key in [
        "clientId",
        "startTimestamp",
        "endTimestamp",
        "eventsPerSecond",
        "error",
    ] {
        assert_eq!(op[key], Value::Null, "{key} in {op}");
    }
    assert_eq!(op["onlyUnacked"], false);
    assert_eq!(op["eventName"], "a/x");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_listed_newest_first_and_kept_across_a_restart() {
    let (dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    assert!(admin.ops().await.is_empty());
    let mut ids = Vec::new();
    for name in ["a/*", "b/x", "*"] {
        let id = admin.start(&json!({"eventName": name})).await;
        admin.succeeded(&id).await;
        ids.push(id);
    }
    let listed = admin.ops().await;
    let listed_ids: Vec<&str> = listed.iter().filter_map(|o| o["id"].as_str()).collect();
    assert_eq!(
        listed_ids,
        vec![ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]
    );
    for (op, id) in listed.iter().zip(ids.iter().rev()) {
        assert_op_shape(op);
        assert_eq!(op, &admin.op(id).await, "the list shows what GET shows");
    }
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 3);

    let srv = restart(srv, config_in(dir.path())).await;
    let admin = Admin::new(srv.http_addr);
    assert_eq!(
        admin.ops().await,
        listed,
        "the operations survive a restart"
    );
    // New ids do not reuse old ones.
    let id = admin.start(&json!({"eventName": "c/*"})).await;
    assert!(!ids.contains(&id), "{id} reused");
    let listed = admin.ops().await;
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[0]["id"], id.as_str(), "the newest comes first");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_operation_resumes_after_a_restart_and_finishes() {
    let (dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut p = connected(&srv, "p").await;
    let evs = p
        .publish_many("p", 100, |i| ("bulk/item".into(), format!("{{\"i\":{i}}}")))
        .await;
    let all: Vec<String> = evs.iter().map(|e| e.idem.clone()).collect();
    let c = subscriber(&srv, "c", &["bulk/*"]).await;
    drop(c);
    drop(p);

    // 100 events at 50 a second: about two seconds of work.
    let id = admin
        .start(&json!({"eventName": "bulk/*", "eventsPerSecond": 50}))
        .await;
    let before_stop = op_until(&admin, &id, "made progress", |op| num(op, "processed") > 0).await;
    assert_eq!(before_stop["status"], "RUNNING", "{before_stop}");
    assert_eq!(num(&before_stop, "total"), 100, "{before_stop}");
    let done_before = num(&before_stop, "processed");
    assert!(done_before < 100, "{before_stop}");

    let srv = restart(srv, config_in(dir.path())).await;
    let admin = Admin::new(srv.http_addr);
    let resumed = admin.op(&id).await;
    assert_eq!(
        resumed["status"], "RUNNING",
        "interrupted, then resumed: {resumed}"
    );
    assert!(
        num(&resumed, "processed") >= done_before,
        "progress lost: {done_before} before the stop, {resumed} after"
    );
    let op = admin.succeeded(&id).await;
    // Exactly once: a step done before the stop is not done again.
    assert_eq!(
        (
            num(&op, "total"),
            num(&op, "processed"),
            num(&op, "deliveries")
        ),
        (100, 100, 100),
        "{op}"
    );
    let created = num(&op, "createdAt");
    assert_eq!(created, num(&before_stop, "createdAt"));

    let mut c = connected(&srv, "c").await;
    let got = replayed(&mut c, 100).await;
    assert_eq!(got.iter().map(|(_, r)| idem_of(r)).collect::<Vec<_>>(), all);
    assert!(got.iter().all(|(_, r)| replay_timestamp(r) == created));
    c.expect_silence(SILENCE).await;
    let metrics = scrape(srv.http_addr).await;
    assert_eq!(
        metrics.must("ensync_async_operations", &[("status", "SUCCEEDED")]),
        1.0
    );
    assert_eq!(
        metrics.must("ensync_async_operations", &[("status", "RUNNING")]),
        0.0
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_operation_and_keeps_what_it_queued() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut p = connected(&srv, "p").await;
    let evs = p
        .publish_many("p", 100, |i| ("bulk/item".into(), format!("{{\"i\":{i}}}")))
        .await;
    let all: Vec<String> = evs.iter().map(|e| e.idem.clone()).collect();
    drop(subscriber(&srv, "c", &["bulk/*"]).await);

    // Five seconds of work at 20 a second; cancelled early on.
    let id = admin
        .start(&json!({"eventName": "bulk/*", "eventsPerSecond": 20}))
        .await;
    op_until(&admin, &id, "made progress", |op| num(op, "processed") > 0).await;
    let response = admin.cancel(&id).await;
    response.assert_status(200);
    let cancelled = response.json();
    assert_op_shape(&cancelled);
    assert_eq!(cancelled["id"], id.as_str());
    assert_eq!(cancelled["status"], "CANCELLED", "{cancelled}");
    let done = num(&cancelled, "processed");
    assert!(0 < done && done < 100, "{cancelled}");
    assert_eq!(num(&cancelled, "deliveries"), done, "{cancelled}");
    // It stays where it stopped.
    tokio::time::sleep(SILENCE).await;
    assert_eq!(admin.op(&id).await, cancelled);

    // What it queued before the cancel stays queued.
    let mut c = connected(&srv, "c").await;
    let got = replayed_idems(&mut c, done as usize).await;
    assert_eq!(got[..], all[..done as usize]);
    c.expect_silence(SILENCE).await;

    // A finished operation cannot be cancelled: 409, and it is unchanged.
    let message = admin.cancel(&id).await.error(409);
    assert!(message.contains(&id), "{message}");
    assert_eq!(admin.op(&id).await, cancelled);
    let finished = admin.run(&json!({"eventName": "nothing/*"})).await;
    let other = finished["id"].as_str().expect("id").to_string();
    admin.cancel(&other).await.error(409);
    assert_eq!(admin.op(&other).await["status"], "SUCCEEDED");
    // Unknown ones: 404.
    for unknown in ["op_999", "nonsense", "op_"] {
        admin.cancel(unknown).await.error(404);
    }
    let metrics = scrape(srv.http_addr).await;
    assert_eq!(
        metrics.must("ensync_async_operations", &[("status", "CANCELLED")]),
        1.0
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_operations_get_404() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    for unknown in ["op_1", "op_999", "nonsense", "op_", "1"] {
        let path = format!("/asyncOperations/{unknown}");
        let message = admin.call("GET", &path, None).await.error(404);
        assert!(message.contains(unknown), "{message}");
    }
    srv.stop().await;
}

// ---------------------------------------------------------- bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replay_bodies_get_400_naming_the_problem() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        ("   \n", "empty"),
        ("{", "not a valid replay request"),
        ("not json", "not a valid replay request"),
        ("null", "not a valid replay request"),
        (r#"{"eventName":"a/*","bogus":1}"#, "bogus"),
        (r#"{"eventName":"a/*","eventName":"b/*"}"#, "eventName"),
        ("{}", "eventName"),
        (r#"{"startTimestamp":1}"#, "eventName"),
        (r#"{"eventName":""}"#, "eventName"),
        (r#"{"eventName":"a/*/b"}"#, "eventName"),
        (r#"{"eventName":"a b"}"#, "eventName"),
        (r#"{"eventName":"a/*","clientId":"x;y"}"#, "clientId"),
        (r#"{"eventName":"a/*","type":"kinesis"}"#, "type"),
        (
            r#"{"eventName":"a/*","startTimestamp":"yesterday"}"#,
            "startTimestamp",
        ),
        (
            r#"{"eventName":"a/*","startTimestamp":-5}"#,
            "startTimestamp",
        ),
        (
            r#"{"eventName":"a/*","startTimestamp":1.5}"#,
            "startTimestamp",
        ),
        (
            r#"{"eventName":"a/*","startTimestamp":true}"#,
            "startTimestamp",
        ),
        (
            r#"{"eventName":"a/*","startTimestamp":"earliest"}"#,
            "startTimestamp",
        ),
        (
            r#"{"eventName":"a/*","startTimestamp":"99999999999999999999999"}"#,
            "startTimestamp",
        ),
        (
            r#"{"eventName":"a/*","startTimestamp":"1969-12-31T23:59:59Z"}"#,
            "startTimestamp",
        ),
        (
            r#"{"eventName":"a/*","endTimestamp":"2026-13-01T00:00:00Z"}"#,
            "endTimestamp",
        ),
        (
            r#"{"eventName":"a/*","endTimestamp":"evt_000000000000000000000001"}"#,
            "endTimestamp",
        ),
        (
            r#"{"eventName":"a/*","startTimestamp":1700000000001,"endTimestamp":1700000000000}"#,
            "after",
        ),
        (
            r#"{"eventName":"a/*","eventsPerSecond":0}"#,
            "eventsPerSecond",
        ),
    ];
    for (body, names) in cases {
        let message = admin.post_replay_raw(body.as_bytes()).await.error(400);
        assert!(
            message.contains(names),
            "error for {body:?} does not mention {names:?}: {message}"
        );
    }
    // Wrongly typed values are refused too (how the message reads is the
    // subject of `wrongly_typed_values_are_named_in_the_error`).
    for body in [
        r#"{"eventName":"a/*","eventsPerSecond":-1}"#,
        r#"{"eventName":"a/*","eventsPerSecond":"fast"}"#,
        r#"{"eventName":"a/*","onlyUnacked":"yes"}"#,
        r#"{"eventName":5}"#,
        r#"{"eventName":"a/*","clientId":7}"#,
    ] {
        admin.post_replay_raw(body.as_bytes()).await.error(400);
    }
    // A start after its end names both.
    let message = admin
        .post_replay(&json!({"eventName": "a/*", "startTimestamp": 5, "endTimestamp": 4}))
        .await
        .error(400);
    assert!(
        message.contains("startTimestamp") && message.contains("endTimestamp"),
        "{message}"
    );
    assert!(
        admin.ops().await.is_empty(),
        "a refused body made an operation"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrongly_typed_values_are_named_in_the_error() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    for (body, key) in [
        (
            r#"{"eventName":"a/*","eventsPerSecond":-1}"#,
            "eventsPerSecond",
        ),
        (r#"{"eventName":"a/*","onlyUnacked":"yes"}"#, "onlyUnacked"),
        (r#"{"eventName":5}"#, "eventName"),
        (r#"{"eventName":"a/*","clientId":7}"#, "clientId"),
    ] {
        let message = admin.post_replay_raw(body.as_bytes()).await.error(400);
        assert!(message.contains(key), "{body}: {message}");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_body_that_is_not_an_object_is_refused() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let body = r#"["ensync","a/*",null,null,null,null,null]"#;
    admin.post_replay_raw(body.as_bytes()).await.error(400);
    assert!(admin.ops().await.is_empty());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_response_is_json() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    // /message without the upgrade headers.
    let response = get(srv.http_addr, "/message").await;
    assert!(response.status >= 400, "{response:?}");
    response.error(response.status);
    // A body over axum's default limit (2 MB).
    let body = format!(
        "{{\"eventName\":\"a/*\",\"clientId\":\"{}\"}}",
        "x".repeat(3_000_000)
    );
    let response = Admin::new(srv.http_addr)
        .post_replay_raw(body.as_bytes())
        .await;
    assert!(response.status >= 400, "{}", response.status);
    response.error(response.status);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_get_404_and_wrong_methods_405_as_json() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/nope"),
        ("POST", "/replay"),
        ("GET", "/asyncOperations/op_1/cancel"),
        ("GET", "/healthz/x"),
    ] {
        let message = request(srv.http_addr, method, path, &[], None)
            .await
            .error(404);
        for route in [
            "/message",
            "/healthz",
            "/metrics",
            "/replays",
            "/asyncOperations",
        ] {
            assert!(message.contains(route), "{method} {path}: {message}");
        }
    }
    for (method, path, allowed) in [
        ("GET", "/replays", "POST"),
        ("DELETE", "/replays", "POST"),
        ("POST", "/healthz", "GET"),
        ("POST", "/metrics", "GET"),
        ("DELETE", "/asyncOperations", "GET"),
        ("POST", "/asyncOperations/op_1", "GET"),
        ("POST", "/message", "GET"),
    ] {
        let response = request(srv.http_addr, method, path, &[], None).await;
        let message = response.error(405);
        assert!(message.contains(path), "{method} {path}: {message}");
        let allow = response.header("allow").unwrap_or_default();
        assert!(allow.contains(allowed), "{method} {path}: Allow {allow:?}");
    }
    srv.stop().await;
}

// -------------------------------------------------------------- token

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_the_admin_routes_only() {
    let (_dir, mut config) = setup();
    config.admin_token = Some("s3cret-token".into());
    let srv = start_server_with(config).await;
    let body = json!({"eventName": "a/*"}).to_string();
    let refused = |response: Response| {
        response.error(401);
        assert_eq!(
            response.header("www-authenticate"),
            Some("Bearer"),
            "{response:?}"
        );
    };
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-token-and-more"),
        Some("Basic czNjcmV0LXRva2Vu"),
        Some("s3cret-token"),
        Some("Bearer"),
    ] {
        let headers: Vec<(&str, &str)> =
            auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
        for (method, path, body) in [
            ("POST", "/replays", Some(body.as_bytes())),
            // Even a bad body: the token is checked first.
            ("POST", "/replays", Some(b"{".as_slice())),
            ("GET", "/asyncOperations", None),
            ("GET", "/asyncOperations/op_1", None),
            ("DELETE", "/asyncOperations/op_1", None),
        ] {
            refused(request(srv.http_addr, method, path, &headers, body).await);
        }
    }
    let admin = Admin::with_token(srv.http_addr, "s3cret-token");
    let id = admin.start(&json!({"eventName": "a/*"})).await;
    admin.succeeded(&id).await;
    assert_eq!(admin.ops().await.len(), 1);
    admin.cancel(&id).await.error(409);
    admin.post_replay_raw(b"{").await.error(400);
    // Health and metrics stay open.
    get(srv.http_addr, "/healthz").await.assert_status(200);
    scrape(srv.http_addr).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let (_dir, mut config) = setup();
    config.admin_token = Some("s3cret-token".into());
    let srv = start_server_with(config).await;
    for scheme in ["bearer", "BEARER"] {
        let auth = format!("{scheme} s3cret-token");
        request(
            srv.http_addr,
            "GET",
            "/asyncOperations",
            &[("Authorization", auth.as_str())],
            None,
        )
        .await
        .assert_status(200);
    }
    srv.stop().await;
}

// ---------------------------------------------------- health, metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_the_head_and_the_stored_bytes() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let health = || async {
        let response = get(srv.http_addr, "/healthz").await;
        response.assert_status(200);
        assert!(response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")));
        let json = response.json();
        let mut keys: Vec<&String> = json.as_object().expect("object").keys().collect();
        keys.sort();
        assert_eq!(keys, vec!["head", "status", "storeBytes"], "{json}");
        assert_eq!(json["status"], "ok");
        json
    };
    let fresh = health().await;
    assert_eq!((num(&fresh, "head"), num(&fresh, "storeBytes")), (0, 0));
    let mut p = connected(&srv, "p").await;
    p.publish("p", "a/x", "{\"i\":1}").await;
    let one = health().await;
    assert_eq!(num(&one, "head"), 1);
    assert!(num(&one, "storeBytes") > 0, "{one}");
    p.publish("p", "a/x", &format!("\"{}\"", "y".repeat(1000)))
        .await;
    let two = health().await;
    assert_eq!(num(&two, "head"), 2);
    assert!(
        num(&two, "storeBytes") > num(&one, "storeBytes") + 1000,
        "{one} then {two}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_traffic_exactly() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let admin = Admin::new(srv.http_addr);
    let mut c = subscriber(&srv, "c", &["a/*"]).await;
    let mut p = connected(&srv, "p").await;
    let evs = publish_spaced(&mut p, &[("a/x", "*"); 3]).await;
    p.expect_prefix("HELLO;X=1", "-FAIL:UNKNOWN_COMMAND;").await;
    p.ping().await;
    assert_eq!(c.deliveries(3).await, idems(&evs));
    ack_all(&mut c, "c", &idems(&evs)).await;
    c.expect_prefix(
        "ACK;CLIENT_ID=c;EVENT_IDEM=evt_000000000000000000000000",
        "-FAIL:NOT_FOUND;",
    )
    .await;
    let rep = c.replay("c", "a/*", "FROM_POSITION=earliest").await;
    assert_eq!(rep.count, 3);
    // The reply after the replay comes once the replay is done and timed.
    c.ping().await;
    let mut w = WsClient::connect(srv.http_addr).await;
    w.conn("w").await;
    w.ping().await;

    let m = scrape(srv.http_addr).await;
    for sample in &m.samples {
        assert!(sample.name.starts_with("ensync_"), "{sample:?}");
    }
    for (verb, outcome, n) in [
        ("CONN", "PASS", 3.0),
        ("SUB", "PASS", 1.0),
        ("PUB", "PASS", 3.0),
        ("ACK", "PASS", 3.0),
        ("ACK", "NOT_FOUND", 1.0),
        ("REPLAY", "PASS", 1.0),
        ("PING", "PASS", 3.0),
        ("UNKNOWN", "UNKNOWN_COMMAND", 1.0),
    ] {
        assert_eq!(m.commands(verb, outcome), n, "{verb} {outcome}\n{}", m.text);
    }
    let total: f64 = m
        .samples
        .iter()
        .filter(|s| s.name == "ensync_commands_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(total, 16.0, "no other commands counted\n{}", m.text);
    assert_eq!(m.must("ensync_events_published_total", &[]), 3.0);
    assert_eq!(m.must("ensync_events_delivered_total", &[]), 3.0);
    assert_eq!(m.must("ensync_events_replayed_total", &[]), 3.0);
    assert_eq!(m.must("ensync_publish_latency_seconds_count", &[]), 3.0);
    assert_eq!(
        m.must("ensync_publish_latency_seconds_bucket", &[("le", "+Inf")]),
        3.0
    );
    assert_eq!(m.must("ensync_replay_duration_seconds_count", &[]), 1.0);
    assert!(m
        .text
        .contains("# TYPE ensync_publish_latency_seconds histogram"));
    assert!(m
        .text
        .contains("# TYPE ensync_replay_duration_seconds histogram"));
    let health = get(srv.http_addr, "/healthz").await.json();
    assert_eq!(m.must("ensync_log_head", &[]), 3.0);
    assert_eq!(
        m.must("ensync_store_bytes", &[]),
        num(&health, "storeBytes") as f64
    );
    assert!(m.must("ensync_store_bytes", &[]) > 0.0);
    assert_eq!(m.must("ensync_connections", &[("transport", "tcp")]), 2.0);
    assert_eq!(
        m.must("ensync_connections", &[("transport", "websocket")]),
        1.0
    );
    for status in ["RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"] {
        assert_eq!(
            m.must("ensync_async_operations", &[("status", status)]),
            0.0,
            "{status}"
        );
    }

    // c leaves; an operator replay queues 3 deliveries for it.
    drop(c);
    w.close().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = scrape(srv.http_addr).await;
        if m.must("ensync_connections", &[("transport", "tcp")]) == 1.0
            && m.must("ensync_connections", &[("transport", "websocket")]) == 0.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections not counted down\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let op = admin.run(&json!({"eventName": "a/*"})).await;
    assert_eq!(num(&op, "deliveries"), 3);
    let m = scrape(srv.http_addr).await;
    assert_eq!(m.must("ensync_events_replayed_total", &[]), 6.0);
    assert_eq!(m.must("ensync_events_delivered_total", &[]), 3.0);
    assert_eq!(
        m.must("ensync_async_operations", &[("status", "SUCCEEDED")]),
        1.0
    );
    assert_eq!(m.must("ensync_replay_duration_seconds_count", &[]), 1.0);

    // c comes back and receives them: sent deliveries count as delivered.
    let mut c = connected(&srv, "c").await;
    assert_eq!(replayed_idems(&mut c, 3).await, idems(&evs));
    c.ping().await;
    let m = scrape(srv.http_addr).await;
    assert_eq!(m.must("ensync_events_delivered_total", &[]), 6.0);
    assert_eq!(m.must("ensync_events_replayed_total", &[]), 6.0);
    assert_eq!(m.commands("CONN", "PASS"), 4.0);
    assert_eq!(m.must("ensync_events_published_total", &[]), 3.0);
    srv.stop().await;
}
