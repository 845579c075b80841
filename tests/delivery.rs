//! Delivery semantics over TCP: settling (ACK, DEFER, DISCARD, ROLLBACK),
//! PAUSE/CONTINUE/UNSUB, at-least-once redelivery (ack wait, reconnect,
//! restart), flow control, competing consumers, addressing, and the
//! acknowledgement marks of replays.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use ensync_server::config::{ClientEntry, Config};

const PATTERN: &str = "order/*";
const NAME: &str = "order/created";
/// How long "nothing arrives" is watched for.
const SILENCE: Duration = Duration::from_millis(300);
/// A short ack wait for the tests that wait for redelivery.
const SHORT_ACK_WAIT: Duration = Duration::from_millis(300);

/// A fresh data directory and its default config.
fn setup() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path());
    (dir, config)
}

/// A connected publisher `p`.
async fn publisher(srv: &TestServer) -> Client {
    let mut p = srv.client().await;
    p.conn("p").await;
    p
}

/// A connection of `id`, subscribed to `PATTERN`.
async fn subscriber(srv: &TestServer, id: &str) -> Client {
    subscriber_to(srv, id, PATTERN).await
}

/// A connection of `id`, subscribed to `pattern`.
async fn subscriber_to(srv: &TestServer, id: &str, pattern: &str) -> Client {
    let mut c = srv.client().await;
    c.conn(id).await;
    c.sub(id, pattern).await;
    c
}

/// Pauses client `c`'s subscription to `PATTERN`.
async fn pause(c: &mut Client) {
    c.expect(
        &format!("PAUSE;CLIENT_ID=c;EVENT_NAME={PATTERN}"),
        &format!("+PASS:PAUSED;EVENT_NAME={PATTERN}"),
    )
    .await;
}

/// Continues client `c`'s subscription to `PATTERN`.
async fn resume(c: &mut Client) {
    resume_pattern(c, PATTERN).await;
}

/// Continues client `c`'s subscription to `pattern`.
async fn resume_pattern(c: &mut Client, pattern: &str) {
    c.expect(
        &format!("CONTINUE;CLIENT_ID=c;EVENT_NAME={pattern}"),
        &format!("+PASS:CONTINUED;EVENT_NAME={pattern}"),
    )
    .await;
}

/// Publishes `n` events on `name` addressed to `*`, one commit each;
/// returns their idems.
async fn publish_n(p: &mut Client, name: &str, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(p.publish("p", name, &format!("{{\"i\":{i}}}")).await.0);
    }
    out
}

// ------------------------------------------------------- at-least-once

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_gets_exactly_the_unacked_events_then_live_ones() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 4).await;
    assert_eq!(c.deliveries(4).await, evs);
    c.ack("c", &evs[0]).await;
    c.ack("c", &evs[2]).await;
    drop(c); // the client crashes: its only connection is gone

    let mut c = srv.client().await;
    c.conn("c").await;
    assert_eq!(c.deliveries(2).await, vec![evs[1].clone(), evs[3].clone()]);
    c.expect_silence(SILENCE).await;
    let live = p.publish("p", NAME, "{\"i\":4}").await.0;
    assert_eq!(c.deliveries(1).await, vec![live.clone()]);
    // The redelivered events are in the queue of the new connection.
    for id in [&evs[1], &evs[3], &live] {
        c.ack("c", id).await;
    }
    drop(c);

    let mut c = srv.client().await;
    c.conn("c").await;
    c.expect_silence(SILENCE).await;
    c.ping().await;
    srv.stop().await;
}

/// A subscriber that comes back to events the page cache no longer holds
/// (after an outage, say) gets them all, in order, read on a thread that
/// may wait for the disk: on the connection's own thread that read would
/// hold up every connection the thread serves.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_catching_up_on_events_paged_out_gets_them_all_in_order() {
    let (dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let from_disk = || async {
        common::http::scrape(srv.http_addr)
            .await
            .must("ensync_deliveries_read_from_disk_total", &[])
    };
    drop(subscriber(&srv, "c").await);
    let pad = "x".repeat(400);
    // The kernel may keep a page another CPU still holds a reference to:
    // a catch-up served from memory is followed by another.
    for round in 0..20 {
        let missed: Vec<String> = p
            .publish_many("p", 300, |i| {
                (NAME.to_string(), format!("{{\"i\":{i},\"pad\":\"{pad}\"}}"))
            })
            .await
            .into_iter()
            .map(|e| e.idem)
            .collect();
        page_out(dir.path());
        let mut c = srv.client().await;
        c.conn("c").await;
        assert_eq!(c.deliveries(missed.len()).await, missed, "round {round}");
        let acks: Vec<String> = missed
            .iter()
            .map(|id| format!("ACK;CLIENT_ID=c;EVENT_IDEM={id}"))
            .collect();
        for reply in c.pipeline(&acks, acks.len()).await {
            assert!(reply.starts_with("+PASS:ACKNOWLEDGED"), "{reply}");
        }
        let live = p.publish("p", NAME, "{}").await.0;
        assert_eq!(c.deliveries(1).await, vec![live.clone()]);
        c.ack("c", &live).await;
        if from_disk().await > 0.0 {
            break;
        }
    }
    assert!(from_disk().await > 0.0, "read from the disk");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsettled_event_is_delivered_again_after_the_ack_wait() {
    let (_dir, mut config) = setup();
    config.delivery.ack_wait = SHORT_ACK_WAIT;
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 2).await;
    assert_eq!(c.deliveries(2).await, evs);
    let delivered = Instant::now();
    c.ack("c", &evs[0]).await;

    // Only the unacked one comes back, and not before the ack wait.
    assert_eq!(c.deliveries(1).await, vec![evs[1].clone()]);
    let waited = delivered.elapsed();
    assert!(
        waited >= SHORT_ACK_WAIT - Duration::from_millis(20),
        "redelivered after {waited:?}, before the ack wait"
    );
    c.ack("c", &evs[1]).await;
    c.expect_silence(2 * SHORT_ACK_WAIT).await;
    c.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_delivers_the_event_again_at_once() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 1).await;
    assert_eq!(c.deliveries(1).await, evs);

    let started = Instant::now();
    c.expect(
        &format!("ROLLBACK;CLIENT_ID=c;EVENT_IDEM={}", evs[0]),
        &format!("+PASS:ROLLED_BACK;IDEM={}", evs[0]),
    )
    .await;
    assert_eq!(c.deliveries(1).await, evs);
    // The default ack wait is 30 s: this is the rollback, not a timeout.
    assert!(started.elapsed() < Duration::from_secs(2));
    c.ack("c", &evs[0]).await;
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defer_delivers_again_after_its_delay_and_not_before() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 2).await;
    assert_eq!(c.deliveries(2).await, evs);

    let before = now_ms();
    let reply = c
        .cmd(&format!(
            "DEFER;CLIENT_ID=c;EVENT_IDEM={};DELAY=1000",
            evs[0]
        ))
        .await;
    let after = now_ms();
    let at: u64 = reply
        .strip_prefix(&format!("+PASS:DEFERRED;IDEM={};DELIVERY_AT=", evs[0]))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("unexpected DEFER reply {reply:?}"));
    assert!(
        (before + 1000..=after + 1000).contains(&at),
        "DELIVERY_AT={at} is not 1000 ms after the DEFER ({before}..={after})"
    );
    // DELAY_MS is accepted too.
    let reply = c
        .cmd(&format!(
            "DEFER;CLIENT_ID=c;EVENT_IDEM={};DELAY_MS=1500",
            evs[1]
        ))
        .await;
    let prefix = format!("+PASS:DEFERRED;IDEM={};DELIVERY_AT=", evs[1]);
    assert!(reply.starts_with(&prefix), "unexpected reply {reply:?}");

    c.expect_silence(Duration::from_millis(700)).await;
    assert_eq!(c.deliveries(1).await, vec![evs[0].clone()]);
    let now = now_ms();
    assert!(now >= at, "redelivered at {now}, before DELIVERY_AT={at}");
    assert_eq!(c.deliveries(1).await, vec![evs[1].clone()]);
    for id in &evs {
        c.ack("c", id).await;
    }
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarded_event_never_comes_back() {
    let (dir, mut config) = setup();
    config.delivery.ack_wait = SHORT_ACK_WAIT;
    let srv = start_server_with(config.clone()).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 2).await;
    assert_eq!(c.deliveries(2).await, evs);
    c.expect(
        &format!("DISCARD;CLIENT_ID=c;EVENT_IDEM={};REASON=bad order", evs[0]),
        &format!("+PASS:DISCARDED;IDEM={}", evs[0]),
    )
    .await;

    // After the ack wait only the unsettled one comes back.
    assert_eq!(c.deliveries(1).await, vec![evs[1].clone()]);
    c.ack("c", &evs[1]).await;
    c.expect_silence(2 * SHORT_ACK_WAIT).await;

    // Not after a reconnect: the first delivery is a new event.
    drop(c);
    let mut c = srv.client().await;
    c.conn("c").await;
    c.expect_silence(SILENCE).await;
    let next = p.publish("p", NAME, "{\"i\":2}").await.0;
    assert_eq!(c.deliveries(1).await, vec![next.clone()]);
    c.ack("c", &next).await;
    drop((c, p));

    // Not after a restart either.
    let srv = restart(srv, config).await;
    let mut p = publisher(&srv).await;
    let mut c = srv.client().await;
    c.conn("c").await;
    c.expect_silence(SILENCE).await;
    let last = p.publish("p", NAME, "{\"i\":3}").await.0;
    assert_eq!(c.deliveries(1).await, vec![last]);
    // Discarded is settled: it cannot be acked or discarded again.
    c.expect_prefix(
        &format!("ACK;CLIENT_ID=c;EVENT_IDEM={}", evs[0]),
        "-FAIL:NOT_FOUND;MESSAGE=",
    )
    .await;
    srv.stop().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_state_and_unsettled_events_survive_a_restart() {
    let (_dir, config) = setup();
    let srv = start_server_with(config.clone()).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    c.sub("c", "audit/*").await;
    c.expect(
        "PAUSE;CLIENT_ID=c;EVENT_NAME=audit/*;REASON=maintenance",
        "+PASS:PAUSED;EVENT_NAME=audit/*",
    )
    .await;
    let orders = publish_n(&mut p, NAME, 3).await;
    let audit = p.publish("p", "audit/logged", "{}").await.0;
    assert_eq!(c.deliveries(3).await, orders);
    c.ack("c", &orders[1]).await;
    c.expect_silence(SILENCE).await;
    drop((c, p));

    let srv = restart(srv, config).await;
    let mut c = srv.client().await;
    c.conn("c").await;
    // Exactly the unacked events; the paused subscription stays paused.
    assert_eq!(
        c.deliveries(2).await,
        vec![orders[0].clone(), orders[2].clone()]
    );
    c.expect_silence(SILENCE).await;
    resume_pattern(&mut c, "audit/*").await;
    assert_eq!(c.deliveries(1).await, vec![audit.clone()]);

    // The subscription itself survived: new events are delivered.
    let mut p = publisher(&srv).await;
    let live = p.publish("p", NAME, "{}").await.0;
    assert_eq!(c.deliveries(1).await, vec![live.clone()]);
    for id in [&orders[0], &orders[2], &audit, &live] {
        c.ack("c", id).await;
    }
    c.expect_prefix(
        &format!("ACK;CLIENT_ID=c;EVENT_IDEM={}", orders[1]),
        "-FAIL:NOT_FOUND;MESSAGE=",
    )
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_again_keeps_the_paused_flag_and_the_position() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let first = publish_n(&mut p, NAME, 1).await;
    assert_eq!(c.deliveries(1).await, first);
    pause(&mut c).await;
    let queued = publish_n(&mut p, NAME, 2).await;
    c.sub("c", PATTERN).await;
    c.expect_silence(SILENCE).await;
    resume(&mut c).await;
    // What queued while paused is still there: SUB did not move the start
    // to the head.
    assert_eq!(c.deliveries(2).await, queued);
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

// ------------------------------------------------------- PAUSE, UNSUB

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_events_and_continue_releases_them_in_order() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    c.sub("c", "audit/*").await;
    pause(&mut c).await;
    let mut queued = Vec::new();
    for i in 0..4 {
        let name = if i % 2 == 0 { NAME } else { "order/paid" };
        queued.push(p.publish("p", name, &format!("{{\"i\":{i}}}")).await.0);
    }
    // Other subscriptions keep delivering.
    let audit = p.publish("p", "audit/logged", "{}").await.0;
    assert_eq!(c.deliveries(1).await, vec![audit]);
    c.expect_silence(SILENCE).await;

    resume(&mut c).await;
    assert_eq!(c.deliveries(4).await, queued);
    let live = p.publish("p", NAME, "{}").await.0;
    assert_eq!(c.deliveries(1).await, vec![live]);
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_also_holds_redeliveries() {
    let (_dir, mut config) = setup();
    config.delivery.ack_wait = SHORT_ACK_WAIT;
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 1).await;
    assert_eq!(c.deliveries(1).await, evs);
    let (reply, early) = c
        .call(&format!("PAUSE;CLIENT_ID=c;EVENT_NAME={PATTERN}"))
        .await;
    assert_eq!(reply, format!("+PASS:PAUSED;EVENT_NAME={PATTERN}"));
    assert!(early.len() <= 1, "before PAUSE: {early:?}");
    c.expect_silence(3 * SHORT_ACK_WAIT).await;
    resume(&mut c).await;
    assert_eq!(c.deliveries(1).await, evs);
    srv.stop().await;
}

/// A client subscribed to a pattern and to a narrower one gets an event
/// they share once; settled through the wider one while the narrower was
/// paused, it does not come again when the narrower catches up. Each pair
/// sits among subscriptions to other names, as a client that follows many
/// names has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_settled_through_one_subscription_does_not_come_through_another() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    for (wide, narrow, name) in [
        ("order/*", "order/created", "order/created"),
        ("*", "stock/*", "stock/moved"),
    ] {
        let mut c = subscriber_to(&srv, "c", wide).await;
        for other in ["user/1", "user/2", narrow, "user/3"] {
            c.sub("c", other).await;
        }
        c.expect(
            &format!("PAUSE;CLIENT_ID=c;EVENT_NAME={narrow}"),
            &format!("+PASS:PAUSED;EVENT_NAME={narrow}"),
        )
        .await;
        let first = p.publish("p", name, "{}").await.0;
        assert_eq!(c.deliveries(1).await, vec![first.clone()], "{wide}");
        c.ack("c", &first).await;
        resume_pattern(&mut c, narrow).await;
        let second = p.publish("p", name, "{}").await.0;
        assert_eq!(c.deliveries(1).await, vec![second.clone()], "{narrow}");
        c.ack("c", &second).await;
        c.expect_silence(SILENCE).await;
        for pattern in [wide, "user/1", "user/2", narrow, "user/3"] {
            c.expect(
                &format!("UNSUB;CLIENT_ID=c;EVENT_NAME={pattern}"),
                &format!("+PASS:UNSUBSCRIBED;EVENT_NAME={pattern};CLIENT_ID=c"),
            )
            .await;
        }
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_subscribed_to_thousands_of_names_gets_the_events_of_those_it_keeps() {
    const NAMES: usize = 3000;
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = srv.client().await;
    c.conn("c").await;
    let mut subs: Vec<String> = (0..NAMES)
        .map(|i| format!("SUB;CLIENT_ID=c;EVENT_NAME=n/{i}"))
        .collect();
    subs.push("SUB;CLIENT_ID=c;EVENT_NAME=w/*".into());
    let replies = c.pipeline(&subs, subs.len()).await;
    assert!(
        replies.iter().all(|r| r.starts_with("+PASS:SUBSCRIBED")),
        "{:?}",
        replies.iter().find(|r| !r.starts_with("+PASS:SUBSCRIBED"))
    );
    // A third go, from all over the list.
    let dropped = |i: usize| i % 3 == 0;
    let unsubs: Vec<String> = (0..NAMES)
        .filter(|&i| dropped(i))
        .map(|i| format!("UNSUB;CLIENT_ID=c;EVENT_NAME=n/{i}"))
        .collect();
    let replies = c.pipeline(&unsubs, unsubs.len()).await;
    assert!(replies.iter().all(|r| r.starts_with("+PASS:UNSUBSCRIBED")));

    // One event a commit: each wakes the client for a single new event.
    let names = ["n/0", "n/1", "n/2999", "other", "n/1500", "w/x", "n/2998"];
    let mut wanted = Vec::new();
    for name in names {
        let idem = p.publish("p", name, "{}").await.0;
        let kept = match name.strip_prefix("n/") {
            Some(i) => !dropped(i.parse().expect("a number")),
            None => name == "w/x",
        };
        if kept {
            wanted.push(idem);
        }
    }
    // And a pipelined batch across many names.
    let batch = p
        .publish_many("p", 200, |i| (format!("n/{}", i * 13 % NAMES), "{}".into()))
        .await;
    for (i, published) in batch.iter().enumerate() {
        if !dropped(i * 13 % NAMES) {
            wanted.push(published.idem.clone());
        }
    }
    let got = c.deliveries(wanted.len()).await;
    assert_eq!(got, wanted, "in publication order, the kept names only");
    for idem in &got {
        c.ack("c", idem).await;
    }
    c.expect_silence(SILENCE).await;

    // Replays are allowed by the same subscriptions: the kept name's
    // event, and the wider pattern's.
    let kept = c.replay("c", "n/1", "FROM_POSITION=earliest;LIMIT=5").await;
    assert_eq!(kept.idems(), wanted[..1]);
    let wide = c.replay("c", "w/x", "FROM_POSITION=earliest;LIMIT=5").await;
    assert_eq!(wide.count, 1);
    c.expect_prefix(
        "REPLAY;CLIENT_ID=c;EVENT_NAME=n/0;FROM_POSITION=earliest;LIMIT=5",
        "-FAIL:NOT_SUBSCRIBED;MESSAGE=",
    )
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsub_stops_delivery_and_unknown_subscription_is_not_found() {
    let (_dir, mut config) = setup();
    config.delivery.ack_wait = SHORT_ACK_WAIT;
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 1).await;
    assert_eq!(c.deliveries(1).await, evs);
    // Left unacked: after UNSUB it is not delivered again either.
    let (reply, early) = c
        .call(&format!("UNSUB;CLIENT_ID=c;EVENT_NAME={PATTERN}"))
        .await;
    assert_eq!(
        reply,
        format!("+PASS:UNSUBSCRIBED;EVENT_NAME={PATTERN};CLIENT_ID=c")
    );
    assert!(early.len() <= 1, "before UNSUB: {early:?}");
    publish_n(&mut p, NAME, 2).await;
    c.expect_silence(3 * SHORT_ACK_WAIT).await;

    c.expect_prefix(
        &format!("UNSUB;CLIENT_ID=c;EVENT_NAME={PATTERN}"),
        "-FAIL:NOT_FOUND;MESSAGE=",
    )
    .await;
    c.expect_prefix(
        "UNSUB;CLIENT_ID=c;EVENT_NAME=never/subscribed",
        "-FAIL:NOT_FOUND;MESSAGE=",
    )
    .await;
    // Not after a reconnect either.
    drop(c);
    let mut c = srv.client().await;
    c.conn("c").await;
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

// ------------------------------------------------------- flow control

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_unsettled_holds_delivery_until_acks_free_room() {
    let (_dir, mut config) = setup();
    config.delivery.max_unsettled = 3;
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 7).await;
    assert_eq!(c.deliveries(3).await, evs[..3]);
    c.expect_silence(SILENCE).await;

    assert_eq!(settle(&mut c, &evs[0], 1).await, evs[3..4]);
    c.expect_silence(SILENCE).await;

    // A deferred event still counts: deferring frees no room.
    let reply = c
        .cmd(&format!(
            "DEFER;CLIENT_ID=c;EVENT_IDEM={};DELAY=60000",
            evs[1]
        ))
        .await;
    assert!(reply.starts_with("+PASS:DEFERRED;"), "{reply:?}");
    c.expect_silence(SILENCE).await;

    // A discard frees room like an ack.
    let (reply, mut got) = c
        .call(&format!(
            "DISCARD;CLIENT_ID=c;EVENT_IDEM={};REASON=x",
            evs[1]
        ))
        .await;
    assert_eq!(reply, format!("+PASS:DISCARDED;IDEM={}", evs[1]));
    got.extend(c.deliveries(1 - got.len()).await);
    assert_eq!(got, evs[4..5]);
    assert_eq!(settle(&mut c, &evs[2], 1).await, evs[5..6]);
    assert_eq!(settle(&mut c, &evs[3], 1).await, evs[6..7]);
    c.expect_silence(SILENCE).await;
    for id in &evs[4..] {
        c.ack("c", id).await;
    }
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

/// ACKs `idem` on `c` as client `c` and reads the `n` deliveries that
/// follow (before or after the reply); returns them.
async fn settle(c: &mut Client, idem: &str, n: usize) -> Vec<String> {
    let (reply, mut got) = c.call(&format!("ACK;CLIENT_ID=c;EVENT_IDEM={idem}")).await;
    assert_eq!(reply, format!("+PASS:ACKNOWLEDGED;IDEM={idem}"));
    assert!(got.len() <= n, "more deliveries than expected: {got:?}");
    got.extend(c.deliveries(n - got.len()).await);
    got
}

// ------------------------------------------------------- competing consumers

/// Reads deliveries from `conns` until `n` arrived in all; returns what
/// each received, in order.
async fn collect(conns: &mut [Client], n: usize) -> Vec<Vec<String>> {
    let mut got = vec![Vec::new(); conns.len()];
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.iter().map(Vec::len).sum::<usize>() < n {
        assert!(
            Instant::now() < deadline,
            "only {got:?} of {n} events arrived"
        );
        for (i, c) in conns.iter_mut().enumerate() {
            if let Some(line) = c.try_line(Duration::from_millis(20)).await {
                let record = parse_record(&line);
                assert!(!is_replayed(&record), "not a live delivery: {line}");
                got[i].push(idem_of(&record));
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_connections_share_the_queue_without_overlap() {
    let (_dir, mut config) = setup();
    config.delivery.ack_wait = Duration::from_secs(4);
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut conns = vec![subscriber(&srv, "w").await, srv.client().await];
    conns[1].conn("w").await;
    let mut evs = Vec::new();
    for i in 0..20 {
        evs.push(p.publish("p", NAME, &format!("{{\"i\":{i}}}")).await.0);
        // Let both connections be ready for the next one now and then.
        if i % 5 == 4 {
            tokio::task::yield_now().await;
        }
    }
    let got = collect(&mut conns, evs.len()).await;
    for c in &mut conns {
        c.expect_silence(SILENCE).await;
    }
    let a: HashSet<&String> = got[0].iter().collect();
    let b: HashSet<&String> = got[1].iter().collect();
    assert_eq!(a.len() + b.len(), evs.len(), "a duplicate: {got:?}");
    assert!(a.is_disjoint(&b), "both hold one event: {got:?}");
    let all: HashSet<&String> = a.union(&b).copied().collect();
    assert_eq!(all, evs.iter().collect::<HashSet<_>>());
    for held in &got {
        let mut in_order: Vec<String> = held.clone();
        in_order.sort_by_key(|id| evs.iter().position(|e| e == id));
        assert_eq!(held, &in_order, "one connection's deliveries out of order");
    }

    // The connection holding more closes; the other gets exactly what it
    // held, besides its own.
    let closing = usize::from(got[1].len() > got[0].len());
    let staying = 1 - closing;
    let held = got[closing].clone();
    let mut survivor = conns.remove(staying);
    drop(conns);
    let mut handed = survivor.deliveries(held.len()).await;
    survivor.expect_silence(SILENCE).await;
    handed.sort_by_key(|id| evs.iter().position(|e| e == id));
    assert_eq!(handed, held);
    for id in &evs {
        survivor.ack("w", id).await;
    }
    survivor.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_held_by_one_connection_goes_to_the_other_only_after_ack_wait() {
    let (_dir, mut config) = setup();
    config.delivery.ack_wait = Duration::from_millis(600);
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let a = subscriber(&srv, "w").await;
    let mut b = srv.client().await;
    b.conn("w").await;
    let ev = publish_n(&mut p, NAME, 1).await.remove(0);
    let mut conns = [a, b];
    let got = collect(&mut conns, 1).await;
    let [a, b] = &mut conns;
    let (holder, other) = if got[0].is_empty() { (b, a) } else { (a, b) };
    holder.expect_silence(Duration::from_millis(100)).await;
    other.expect_silence(Duration::from_millis(300)).await;
    // Expired: delivered again, to one of them.
    let mut both = [holder, other];
    let mut again = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while again.is_empty() {
        assert!(Instant::now() < deadline, "not redelivered after ack wait");
        for c in both.iter_mut() {
            if let Some(line) = c.try_line(Duration::from_millis(20)).await {
                again.push(idem_of(&parse_record(&line)));
            }
        }
    }
    assert_eq!(again, vec![ev]);
    srv.stop().await;
}

// ------------------------------------------------------- error paths

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_and_pausing_refuse_what_is_not_there() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 2).await;
    assert_eq!(c.deliveries(2).await, evs);
    let undelivered = p.publish("p", "misc/other", "{}").await.0;
    let unknown = "evt_000000000000000000000000";

    c.expect_prefix(
        &format!("CONTINUE;CLIENT_ID=c;EVENT_NAME={PATTERN}"),
        "-FAIL:NOT_PAUSED;MESSAGE=",
    )
    .await;
    for verb in ["PAUSE", "CONTINUE"] {
        for pattern in ["misc/*", NAME, "*"] {
            c.expect_prefix(
                &format!("{verb};CLIENT_ID=c;EVENT_NAME={pattern}"),
                "-FAIL:NOT_SUBSCRIBED;MESSAGE=",
            )
            .await;
        }
    }
    c.expect_prefix(
        &format!("DISCARD;CLIENT_ID=c;EVENT_IDEM={}", evs[0]),
        "-FAIL:MISSING_REASON;MESSAGE=",
    )
    .await;
    for id in [&undelivered, &unknown.to_string()] {
        for line in [
            format!("ACK;CLIENT_ID=c;EVENT_IDEM={id}"),
            format!("DEFER;CLIENT_ID=c;EVENT_IDEM={id};DELAY=1000"),
            format!("DISCARD;CLIENT_ID=c;EVENT_IDEM={id};REASON=x"),
            format!("ROLLBACK;CLIENT_ID=c;EVENT_IDEM={id}"),
        ] {
            c.expect_prefix(&line, "-FAIL:NOT_FOUND;MESSAGE=").await;
        }
    }
    for delay in ["999", "0", "86400001", "soon"] {
        c.expect_prefix(
            &format!("DEFER;CLIENT_ID=c;EVENT_IDEM={};DELAY={delay}", evs[0]),
            "-FAIL:INVALID_PARAMETERS;MESSAGE=",
        )
        .await;
    }
    // BLOCK must be the event's.
    let block = {
        let rep = c
            .replay("c", PATTERN, "FROM_POSITION=earliest;LIMIT=1")
            .await;
        assert_eq!(rep.idems(), vec![evs[0].clone()]);
        rep.blocks()[0]
    };
    for line in [
        format!("ACK;CLIENT_ID=c;EVENT_IDEM={};BLOCK={}", evs[0], block + 1),
        format!(
            "ROLLBACK;CLIENT_ID=c;EVENT_IDEM={};BLOCK={}",
            evs[0],
            block + 1
        ),
    ] {
        c.expect_prefix(&line, "-FAIL:INVALID_PARAMETERS;MESSAGE=")
            .await;
    }
    // Nothing was settled by the refusals.
    c.expect(
        &format!(
            "ACK;CLIENT_ID=c;EVENT_IDEM={};BLOCK={block};EVENT_NAME={NAME}",
            evs[0]
        ),
        &format!("+PASS:ACKNOWLEDGED;IDEM={}", evs[0]),
    )
    .await;
    c.ack("c", &evs[1]).await;
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_of_an_acked_event_is_not_found() {
    let (_dir, config) = setup();
    let srv = start_server_with(config.clone()).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 2).await;
    assert_eq!(c.deliveries(2).await, evs);
    c.ack("c", &evs[0]).await;
    let again = format!("ACK;CLIENT_ID=c;EVENT_IDEM={}", evs[0]);
    c.expect_prefix(&again, "-FAIL:NOT_FOUND;MESSAGE=").await;
    for line in [
        format!("DISCARD;CLIENT_ID=c;EVENT_IDEM={};REASON=x", evs[0]),
        format!("DEFER;CLIENT_ID=c;EVENT_IDEM={};DELAY=1000", evs[0]),
        format!("ROLLBACK;CLIENT_ID=c;EVENT_IDEM={}", evs[0]),
    ] {
        c.expect_prefix(&line, "-FAIL:NOT_FOUND;MESSAGE=").await;
    }

    // From a second connection of the same client.
    let mut d = srv.client().await;
    d.conn("c").await;
    d.expect_prefix(&again, "-FAIL:NOT_FOUND;MESSAGE=").await;
    drop((c, d));

    // After every connection left, and after a restart.
    let mut c = srv.client().await;
    c.conn("c").await;
    assert_eq!(c.deliveries(1).await, vec![evs[1].clone()]);
    c.expect_prefix(&again, "-FAIL:NOT_FOUND;MESSAGE=").await;
    drop((c, p));
    let srv = restart(srv, config).await;
    let mut c = srv.client().await;
    c.conn("c").await;
    assert_eq!(c.deliveries(1).await, vec![evs[1].clone()]);
    c.expect_prefix(&again, "-FAIL:NOT_FOUND;MESSAGE=").await;
    c.ack("c", &evs[1]).await;
    c.expect_prefix(
        &format!("ACK;CLIENT_ID=c;EVENT_IDEM={}", evs[1]),
        "-FAIL:NOT_FOUND;MESSAGE=",
    )
    .await;
    srv.stop().await;
}

// ------------------------------------------------------- addressing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_events_from_before_sub_are_delivered_but_broadcasts_are_not() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let d1 = p.publish_to("p", NAME, "{\"d\":1}", "c").await.0;
    let _everyone = p.publish("p", NAME, "{\"s\":1}").await.0;
    let d2 = p.publish_to("p", "order/paid", "{\"d\":2}", "x,c").await.0;
    let _other = p.publish_to("p", NAME, "{\"d\":3}", "x").await.0;

    let mut c = subscriber(&srv, "c").await;
    assert_eq!(c.deliveries(2).await, vec![d1, d2]);
    c.expect_silence(SILENCE).await;
    let live = p.publish("p", NAME, "{\"s\":2}").await.0;
    assert_eq!(c.deliveries(1).await, vec![live]);
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_only_the_clients_they_are_addressed_to() {
    let (_dir, mut config) = setup();
    config.clients = vec![ClientEntry {
        id: "svc".into(),
        public_key: Some("pk-svc-base64==".into()),
        ..ClientEntry::default()
    }];
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut a = subscriber(&srv, "a").await;
    let mut b = subscriber(&srv, "b").await;
    let mut svc = subscriber(&srv, "svc").await;

    let to_a = p.publish_to("p", NAME, "{}", "a").await.0;
    let to_b = p.publish_to("p", NAME, "{}", "b").await.0;
    let to_key = p.publish_to("p", NAME, "{}", "pk-svc-base64==").await.0;
    let to_svc_id = p.publish_to("p", NAME, "{}", "svc").await.0;
    let to_all = p.publish("p", NAME, "{}").await.0;
    let to_ab = p.publish_to("p", NAME, "{}", "a,b").await.0;
    // A key is not an id: nobody is called pk-svc-base64== but svc.
    let want_a = vec![to_a.clone(), to_all.clone(), to_ab.clone()];
    let want_b = vec![to_b.clone(), to_all.clone(), to_ab.clone()];
    let want_svc = vec![to_key.clone(), to_svc_id.clone(), to_all.clone()];
    assert_eq!(a.deliveries(3).await, want_a);
    assert_eq!(b.deliveries(3).await, want_b);
    assert_eq!(svc.deliveries(3).await, want_svc);
    for c in [&mut a, &mut b, &mut svc] {
        c.expect_silence(Duration::from_millis(150)).await;
    }

    for (c, id, want) in [
        (&mut a, "a", &want_a),
        (&mut b, "b", &want_b),
        (&mut svc, "svc", &want_svc),
    ] {
        let rep = c.replay(id, PATTERN, "FROM_POSITION=earliest").await;
        assert_eq!(&rep.idems(), want, "range replay of {id}");
        for only in ["true", "false"] {
            let rep = c
                .replay(
                    id,
                    PATTERN,
                    &format!("FROM_POSITION=earliest;ONLY_UNACKED={only}"),
                )
                .await;
            assert_eq!(&rep.idems(), want, "ONLY_UNACKED={only} replay of {id}");
        }
        let all = [&to_a, &to_b, &to_key, &to_svc_id, &to_all, &to_ab];
        for ev in all {
            let line = format!("REPLAY;CLIENT_ID={id};EVENT_IDEM={ev}");
            if want.contains(ev) {
                let reply = c.cmd(&line).await;
                assert_eq!(idem_of(&parse_record(&reply)), *ev, "{line}");
            } else {
                c.expect_prefix(&line, "-FAIL:NOT_FOUND;MESSAGE=").await;
            }
        }
    }

    // A client that subscribes later, and a restart of delivery through
    // reconnect, still see only their own.
    let mut late = subscriber(&srv, "late").await;
    let rep = late.replay("late", PATTERN, "FROM_POSITION=earliest").await;
    assert_eq!(rep.idems(), vec![to_all.clone()]);
    late.expect_silence(SILENCE).await;
    srv.stop().await;
}

/// With many clients connected, each subscribed to names of its own, a
/// live event reaches exactly the clients whose patterns match its name:
/// an exact name, a prefix above it at any depth, or `*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_many_clients_connected_an_event_reaches_exactly_its_subscribers() {
    const ROOMS: usize = 40;
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut rooms = Vec::with_capacity(ROOMS);
    for i in 0..ROOMS {
        let mut c = srv.client().await;
        c.conn(&format!("room{i}")).await;
        c.sub(&format!("room{i}"), &format!("room/{i}")).await;
        rooms.push(c);
    }
    let mut floor = subscriber_to(&srv, "floor", "room/*").await;
    let mut corner = subscriber_to(&srv, "corner", "room/3/*").await;
    let mut everyone = subscriber_to(&srv, "everyone", "*").await;
    let mut idle = srv.client().await;
    idle.conn("idle").await;

    let mut published = Vec::new();
    for i in 0..ROOMS {
        published.push(p.publish("p", &format!("room/{i}"), "{}").await.0);
    }
    let nested = p.publish("p", "room/3/door", "{}").await.0;
    let hall = p.publish("p", "hall", "{}").await.0;

    for (i, room) in rooms.iter_mut().enumerate() {
        assert_eq!(room.deliveries(1).await, [published[i].clone()], "room{i}");
    }
    let mut below: Vec<String> = published.clone();
    below.push(nested.clone());
    assert_eq!(floor.deliveries(below.len()).await, below);
    assert_eq!(corner.deliveries(1).await, [nested]);
    below.push(hall);
    assert_eq!(everyone.deliveries(below.len()).await, below);
    for c in rooms
        .iter_mut()
        .chain([&mut floor, &mut corner, &mut everyone, &mut idle])
    {
        c.expect_silence(Duration::from_millis(50)).await;
    }
    srv.stop().await;
}

// ------------------------------------------------------- replay marks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_mark_exactly_the_acknowledged_events() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let mut d = subscriber(&srv, "d").await;
    let evs = publish_n(&mut p, NAME, 5).await;
    assert_eq!(c.deliveries(5).await, evs);
    assert_eq!(d.deliveries(5).await, evs);
    c.ack("c", &evs[0]).await;
    c.expect(
        &format!("DISCARD;CLIENT_ID=c;EVENT_IDEM={};REASON=x", evs[1]),
        &format!("+PASS:DISCARDED;IDEM={}", evs[1]),
    )
    .await;
    let reply = c
        .cmd(&format!(
            "DEFER;CLIENT_ID=c;EVENT_IDEM={};DELAY=60000",
            evs[2]
        ))
        .await;
    assert!(reply.starts_with("+PASS:DEFERRED;"), "{reply:?}");
    c.ack("c", &evs[4]).await;
    // Another client's acks are not this one's.
    d.ack("d", &evs[3]).await;

    let rep = c.replay("c", PATTERN, "FROM_POSITION=earliest").await;
    assert_eq!(
        rep.header,
        format!("+PASS:REPLAY_STARTED;EVENT_NAME={PATTERN};COUNT=5")
    );
    assert_eq!(rep.idems(), evs);
    let marks: Vec<bool> = rep.records.iter().map(was_acknowledged).collect();
    assert_eq!(marks, vec![true, false, false, false, true]);

    let rep = c
        .replay("c", PATTERN, "FROM_POSITION=earliest;ONLY_UNACKED=true")
        .await;
    assert_eq!(
        rep.header,
        format!("+PASS:REPLAY_STARTED;EVENT_NAME={PATTERN};COUNT=3")
    );
    assert_eq!(rep.idems(), evs[1..4]);
    assert!(rep.records.iter().all(|r| !was_acknowledged(r)));

    let rep = c
        .replay(
            "c",
            PATTERN,
            &format!("FROM_POSITION={};ONLY_UNACKED=true;LIMIT=2", evs[0]),
        )
        .await;
    assert_eq!(rep.idems(), evs[1..3], "LIMIT counts only what is sent");

    let rep = d.replay("d", PATTERN, "FROM_POSITION=earliest").await;
    let marks: Vec<bool> = rep.records.iter().map(was_acknowledged).collect();
    assert_eq!(marks, vec![false, false, false, true, false]);

    for (i, want) in [true, false, false, false, true].into_iter().enumerate() {
        let reply = c
            .cmd(&format!("REPLAY;CLIENT_ID=c;EVENT_IDEM={}", evs[i]))
            .await;
        assert!(reply.starts_with("+REPLAY:"), "{reply:?}");
        let record = parse_record(&reply);
        assert_eq!(idem_of(&record), evs[i]);
        assert_eq!(
            was_acknowledged(&record),
            want,
            "single replay of event {i}"
        );
    }
    c.ping().await;
    srv.stop().await;
}

// ------------------------------------------------------- more settling

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferral_holds_across_reconnect_and_restart() {
    let (_dir, config) = setup();
    let srv = start_server_with(config.clone()).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 1).await;
    assert_eq!(c.deliveries(1).await, evs);
    let reply = c
        .cmd(&format!(
            "DEFER;CLIENT_ID=c;EVENT_IDEM={};DELAY=1500",
            evs[0]
        ))
        .await;
    let at: u64 = reply
        .rsplit_once("DELIVERY_AT=")
        .and_then(|(_, ms)| ms.parse().ok())
        .unwrap_or_else(|| panic!("unexpected DEFER reply {reply:?}"));
    drop((c, p));

    let mut c = srv.client().await;
    c.conn("c").await;
    c.expect_silence(Duration::from_millis(200)).await;
    drop(c);
    let srv = restart(srv, config).await;
    let mut c = srv.client().await;
    c.conn("c").await;
    let silent = Duration::from_millis(at.saturating_sub(now_ms() + 100));
    c.expect_silence(silent).await;
    assert_eq!(c.deliveries(1).await, evs);
    assert!(now_ms() >= at, "delivered before DELIVERY_AT={at}");
    c.ack("c", &evs[0]).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acked_deferred_event_does_not_come_back() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 2).await;
    assert_eq!(c.deliveries(2).await, evs);
    for id in &evs {
        let reply = c
            .cmd(&format!("DEFER;CLIENT_ID=c;EVENT_IDEM={id};DELAY=1000"))
            .await;
        assert!(reply.starts_with("+PASS:DEFERRED;"), "{reply:?}");
    }
    c.ack("c", &evs[0]).await;
    // ROLLBACK of a deferred event delivers it now.
    c.expect(
        &format!("ROLLBACK;CLIENT_ID=c;EVENT_IDEM={}", evs[1]),
        &format!("+PASS:ROLLED_BACK;IDEM={}", evs[1]),
    )
    .await;
    assert_eq!(c.deliveries(1).await, evs[1..]);
    c.ack("c", &evs[1]).await;
    c.expect_silence(Duration::from_millis(1300)).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_connection_of_a_client_settles_what_another_holds() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let a = subscriber(&srv, "w").await;
    let mut b = srv.client().await;
    b.conn("w").await;
    let evs = publish_n(&mut p, NAME, 3).await;
    let mut conns = [a, b];
    collect(&mut conns, 3).await;
    let [a, b] = &mut conns;
    a.ack("w", &evs[0]).await;
    b.ack("w", &evs[1]).await;
    a.expect(
        &format!("DISCARD;CLIENT_ID=w;EVENT_IDEM={};REASON=x", evs[2]),
        &format!("+PASS:DISCARDED;IDEM={}", evs[2]),
    )
    .await;
    for c in [a, b] {
        for id in &evs {
            c.expect_prefix(
                &format!("ACK;CLIENT_ID=w;EVENT_IDEM={id}"),
                "-FAIL:NOT_FOUND;MESSAGE=",
            )
            .await;
        }
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_unsettled_holds_across_a_reconnect() {
    let (_dir, mut config) = setup();
    config.delivery.max_unsettled = 2;
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let evs = publish_n(&mut p, NAME, 5).await;
    assert_eq!(c.deliveries(2).await, evs[..2]);
    c.expect_silence(SILENCE).await;
    drop(c);
    let mut c = srv.client().await;
    c.conn("c").await;
    assert_eq!(c.deliveries(2).await, evs[..2]);
    c.expect_silence(SILENCE).await;
    c.ack("c", &evs[1]).await;
    assert_eq!(c.deliveries(1).await, evs[2..3]);
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_a_public_key_queue_until_its_client_subscribes() {
    let (_dir, mut config) = setup();
    config.clients = vec![ClientEntry {
        id: "svc".into(),
        public_key: Some("pk-svc-base64==".into()),
        ..ClientEntry::default()
    }];
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let to_key = p.publish_to("p", NAME, "{}", "pk-svc-base64==").await.0;
    let _to_all = p.publish("p", NAME, "{}").await.0;
    let mut other = subscriber(&srv, "other").await;
    let mut svc = subscriber(&srv, "svc").await;
    assert_eq!(svc.deliveries(1).await, vec![to_key.clone()]);
    svc.expect_silence(SILENCE).await;
    other.expect_silence(Duration::from_millis(50)).await;
    other
        .expect_prefix(
            &format!("REPLAY;CLIENT_ID=other;EVENT_IDEM={to_key}"),
            "-FAIL:NOT_FOUND;MESSAGE=",
        )
        .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_direct_event_is_not_delivered_again_after_resubscribing() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    let acked = p.publish_to("p", NAME, "{\"d\":1}", "c").await.0;
    let discarded = p.publish_to("p", NAME, "{\"d\":2}", "c").await.0;
    assert_eq!(
        c.deliveries(2).await,
        vec![acked.clone(), discarded.clone()]
    );
    c.ack("c", &acked).await;
    c.expect(
        &format!("DISCARD;CLIENT_ID=c;EVENT_IDEM={discarded};REASON=x"),
        &format!("+PASS:DISCARDED;IDEM={discarded}"),
    )
    .await;
    c.expect(
        &format!("UNSUB;CLIENT_ID=c;EVENT_NAME={PATTERN}"),
        &format!("+PASS:UNSUBSCRIBED;EVENT_NAME={PATTERN};CLIENT_ID=c"),
    )
    .await;
    c.sub("c", NAME).await;
    // Settled for this client: neither comes again through the new
    // subscription.
    let mut again = Vec::new();
    while let Some(line) = c.try_line(SILENCE).await {
        again.push(idem_of(&parse_record(&line)));
    }
    assert!(
        again.is_empty(),
        "settled events delivered again: {again:?} (acked {acked}, discarded {discarded})"
    );
    let next = p.publish_to("p", NAME, "{\"d\":3}", "c").await.0;
    assert_eq!(c.deliveries(1).await, vec![next]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_through_a_subscription_come_in_publication_order() {
    let (_dir, config) = setup();
    let srv = start_server_with(config).await;
    let mut p = publisher(&srv).await;
    let mut c = subscriber(&srv, "c").await;
    c.sub("c", "audit/*").await;
    let names = ["order/created", "audit/logged", "misc/other", "order/paid"];
    let evs = p
        .publish_many("p", 400, |i| {
            (names[i % names.len()].to_string(), format!("{{\"i\":{i}}}"))
        })
        .await;
    let mut got = Vec::new();
    for _ in 0..300 {
        let record = c.record().await;
        got.push((idem_of(&record), record["name"].as_str().map(str::to_owned)));
    }
    c.expect_silence(SILENCE).await;
    for prefix in ["order/", "audit/"] {
        let want: Vec<&String> = evs
            .iter()
            .enumerate()
            .filter(|(i, _)| names[i % names.len()].starts_with(prefix))
            .map(|(_, e)| &e.idem)
            .collect();
        let seen: Vec<&String> = got
            .iter()
            .filter(|(_, name)| name.as_deref().is_some_and(|n| n.starts_with(prefix)))
            .map(|(id, _)| id)
            .collect();
        assert_eq!(seen, want, "deliveries of {prefix}*");
    }
    srv.stop().await;
}
