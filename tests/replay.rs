//! REPLAY over TCP: positions, limits, payloads, routing, snapshots,
//! ordering, durability across restarts, and pipelining.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ensync_server::config::{Config, Limits};

const NAME: &str = "user/profile/updated";

fn idems(evs: &[(String, u64)]) -> Vec<String> {
    evs.iter().map(|e| e.0.clone()).collect()
}

fn pub_idems(evs: &[Published]) -> Vec<String> {
    evs.iter().map(|e| e.idem.clone()).collect()
}

/// Publisher `pub` with `n` spaced events on NAME, and a connected,
/// subscribed `reader`.
async fn spaced_setup(srv: &TestServer, n: usize) -> (Client, Client, Vec<(String, u64)>) {
    let mut p = publisher(srv).await;
    let evs = p.publish_spaced("pub", NAME, n).await;
    let r = reader(srv).await;
    (p, r, evs)
}

/// Publisher `pub` with `n` pipelined events on NAME (payload `{"i":i}`),
/// and a connected, subscribed `reader`.
async fn burst_setup(srv: &TestServer, n: usize) -> (Client, Client, Vec<Published>) {
    let mut p = publisher(srv).await;
    let evs = p
        .publish_many("pub", n, |i| (NAME.to_string(), format!("{{\"i\":{i}}}")))
        .await;
    let r = reader(srv).await;
    (p, r, evs)
}

/// Publisher `pub` with `n` pipelined events on NAME of about `pad` bytes
/// each (payload `{"i":i,"pad":"xx..."}`), their ids, and a connected,
/// subscribed `reader`.
async fn padded_setup(srv: &TestServer, n: usize, pad: usize) -> (Client, Client, Vec<String>) {
    let mut p = publisher(srv).await;
    let pad = "x".repeat(pad);
    let evs = p
        .publish_many("pub", n, |i| {
            (NAME.to_string(), format!("{{\"i\":{i},\"pad\":\"{pad}\"}}"))
        })
        .await;
    let r = reader(srv).await;
    (p, r, pub_idems(&evs))
}

/// `pub`, connected.
async fn publisher(srv: &TestServer) -> Client {
    let mut p = srv.client().await;
    p.conn("pub").await;
    p
}

/// `reader`, connected and subscribed to NAME.
async fn reader(srv: &TestServer) -> Client {
    reader_of(srv, NAME).await
}

/// A client `reader`, connected and subscribed to `pattern`.
async fn reader_of(srv: &TestServer, pattern: &str) -> Client {
    let mut r = srv.client().await;
    r.conn("reader").await;
    r.sub("reader", pattern).await;
    r
}

fn header(name: &str, count: usize) -> String {
    format!("+PASS:REPLAY_STARTED;EVENT_NAME={name};COUNT={count}")
}

// ---------------------------------------------------------------- positions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_timestamp_includes_events_logged_at_that_ms() {
    let (_dir, srv) = temp_server().await;
    let (_p, mut r, evs) = spaced_setup(&srv, 5).await;
    let t3 = evs[2].1;

    let rep = r
        .replay("reader", NAME, &format!("FROM_POSITION={t3}"))
        .await;
    assert_eq!(rep.header, header(NAME, 3));
    assert_eq!(rep.idems(), idems(&evs[2..]));
    let logged: Vec<u64> = rep
        .records
        .iter()
        .map(|r| r["loggedAt"].as_u64().unwrap())
        .collect();
    assert_eq!(
        logged,
        evs[2..].iter().map(|e| e.1).collect::<Vec<_>>(),
        "loggedAt is the PUB TIMESTAMP"
    );

    let rep = r
        .replay("reader", NAME, &format!("FROM_POSITION={}", t3 + 1))
        .await;
    assert_eq!(rep.header, header(NAME, 2));
    assert_eq!(rep.idems(), idems(&evs[3..]));

    let after_all = evs[4].1 + 1;
    let rep = r
        .replay("reader", NAME, &format!("FROM_POSITION={after_all}"))
        .await;
    assert_eq!(rep.header, header(NAME, 0));

    let rep = r.replay("reader", NAME, "FROM_POSITION=0").await;
    assert_eq!(rep.idems(), idems(&evs));
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_event_id_starts_with_that_event() {
    let (_dir, srv) = temp_server().await;
    // Pipelined: neighbours share loggedAt, so only the id can mark the start.
    let (_p, mut r, evs) = burst_setup(&srv, 5).await;
    let ids = pub_idems(&evs);

    let rep = r
        .replay("reader", NAME, &format!("FROM_POSITION={}", ids[2]))
        .await;
    assert_eq!(rep.header, header(NAME, 3));
    assert_eq!(rep.idems(), ids[2..]);

    let rep = r
        .replay("reader", NAME, &format!("FROM_POSITION={}", ids[0]))
        .await;
    assert_eq!(rep.idems(), ids);

    let rep = r
        .replay("reader", NAME, &format!("FROM_POSITION={}", ids[4]))
        .await;
    assert_eq!(rep.header, header(NAME, 1));
    assert_eq!(rep.idems(), ids[4..]);
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_rfc3339_date_time_is_inclusive() {
    let (_dir, srv) = temp_server().await;
    let (_p, mut r, evs) = spaced_setup(&srv, 5).await;
    let t3 = evs[2].1;

    for pos in [rfc3339(t3, 0), rfc3339(t3, 120), rfc3339(t3, -330)] {
        let rep = r
            .replay("reader", NAME, &format!("FROM_POSITION={pos}"))
            .await;
        assert_eq!(rep.header, header(NAME, 3), "FROM_POSITION={pos}");
        assert_eq!(rep.idems(), idems(&evs[2..]), "FROM_POSITION={pos}");
    }
    let pos = rfc3339(t3 + 1, 0);
    let rep = r
        .replay("reader", NAME, &format!("FROM_POSITION={pos}"))
        .await;
    assert_eq!(rep.idems(), idems(&evs[3..]), "FROM_POSITION={pos}");

    // Whole seconds, no fraction.
    let sec = t3 / 1000 * 1000;
    let pos = rfc3339(sec, 0).replace(".000", "");
    let want: Vec<String> = evs
        .iter()
        .filter(|e| e.1 >= sec)
        .map(|e| e.0.clone())
        .collect();
    let rep = r
        .replay("reader", NAME, &format!("FROM_POSITION={pos}"))
        .await;
    assert_eq!(rep.idems(), want, "FROM_POSITION={pos}");
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_earliest_starts_at_the_oldest_event() {
    let (_dir, srv) = temp_server().await;
    let mut p = publisher(&srv).await;
    let mut want = Vec::new();
    for i in 0..3 {
        want.push(p.publish("pub", NAME, &format!("{{\"i\":{i}}}")).await.0);
        p.publish("pub", "other/thing/done", "{}").await;
    }
    let mut r = reader(&srv).await;
    let rep = r.replay("reader", NAME, "FROM_POSITION=earliest").await;
    assert_eq!(rep.header, header(NAME, 3));
    assert_eq!(rep.idems(), want);
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_position_timestamp_is_inclusive() {
    let (_dir, srv) = temp_server().await;
    let (_p, mut r, evs) = spaced_setup(&srv, 5).await;
    let t3 = evs[2].1;

    let rep = r
        .replay(
            "reader",
            NAME,
            &format!("FROM_POSITION=earliest;TO_POSITION={t3}"),
        )
        .await;
    assert_eq!(rep.header, header(NAME, 3));
    assert_eq!(rep.idems(), idems(&evs[..3]));

    let rep = r
        .replay(
            "reader",
            NAME,
            &format!("FROM_POSITION=earliest;TO_POSITION={}", t3 - 1),
        )
        .await;
    assert_eq!(rep.idems(), idems(&evs[..2]));

    let rep = r
        .replay(
            "reader",
            NAME,
            &format!("FROM_POSITION={};TO_POSITION={}", evs[1].1, evs[3].1),
        )
        .await;
    assert_eq!(rep.idems(), idems(&evs[1..4]));
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_position_event_id_includes_that_event() {
    let (_dir, srv) = temp_server().await;
    let (_p, mut r, evs) = burst_setup(&srv, 5).await;
    let ids = pub_idems(&evs);

    let rep = r
        .replay(
            "reader",
            NAME,
            &format!("FROM_POSITION=earliest;TO_POSITION={}", ids[2]),
        )
        .await;
    assert_eq!(rep.header, header(NAME, 3));
    assert_eq!(rep.idems(), ids[..3]);

    let rep = r
        .replay(
            "reader",
            NAME,
            &format!("FROM_POSITION={};TO_POSITION={}", ids[1], ids[3]),
        )
        .await;
    assert_eq!(rep.idems(), ids[1..4]);

    let rep = r
        .replay(
            "reader",
            NAME,
            &format!("FROM_POSITION={};TO_POSITION={}", ids[2], ids[2]),
        )
        .await;
    assert_eq!(rep.idems(), ids[2..3]);
    r.ping().await;
    srv.stop().await;
}

// ------------------------------------------------------------------- limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_limit_defaults_to_50() {
    let (_dir, srv) = temp_server().await;
    let (_p, mut r, evs) = burst_setup(&srv, 60).await;
    let ids = pub_idems(&evs);

    let rep = r.replay("reader", NAME, "FROM_POSITION=earliest").await;
    assert_eq!(rep.header, header(NAME, 50));
    assert_eq!(rep.idems(), ids[..50]);

    let rep = r
        .replay("reader", NAME, &format!("FROM_POSITION={}", ids[50]))
        .await;
    assert_eq!(rep.header, header(NAME, 10));
    assert_eq!(rep.idems(), ids[50..]);
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_count_is_min_of_limit_and_matching_events() {
    let (_dir, srv) = temp_server().await;
    let (_p, mut r, evs) = burst_setup(&srv, 10).await;
    let ids = pub_idems(&evs);

    for (limit, want) in [(1, 1), (3, 3), (10, 10), (11, 10), (100_000, 10)] {
        let rep = r
            .replay(
                "reader",
                NAME,
                &format!("FROM_POSITION=earliest;LIMIT={limit}"),
            )
            .await;
        assert_eq!(rep.header, header(NAME, want), "LIMIT={limit}");
        assert_eq!(rep.idems(), ids[..want], "LIMIT={limit}");
    }
    r.ping().await;
    srv.stop().await;
}

/// A small replay whose records do not fit in one chunk (here 80 events
/// of ~8 KiB, 640 KiB) is streamed in pieces yet counts and orders alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_replays_of_large_events_are_complete_and_in_order() {
    let (_dir, srv) = temp_server().await;
    let (_p, mut r, ids) = padded_setup(&srv, 80, 8 * 1024).await;
    for (from, limit) in [(0, 100), (5, 75), (40, 1)] {
        let rep = r
            .replay(
                "reader",
                NAME,
                &format!("FROM_POSITION={};LIMIT={limit}", ids[from]),
            )
            .await;
        let want = &ids[from..(from + limit).min(80)];
        assert_eq!(rep.header, header(NAME, want.len()), "from {from}");
        assert_eq!(rep.idems(), want, "from {from} LIMIT={limit}");
    }
    r.ping().await;
    srv.stop().await;
}

/// A small replay of events the page cache no longer holds (dropped
/// here with `posix_fadvise`, as the kernel's reclaim drops a log left
/// untouched) is read by a thread that may wait for the disk, so the
/// connections that share its runtime thread do not wait with it. It sends
/// the same records as the same replay once they are in memory again,
/// which the connection's task serves itself: through maps of the log's
/// files, or with system calls when `mapped_reads` is 0 or its budget is
/// spent. The maps hold no more than that budget.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_replays_of_events_paged_out_are_read_from_the_disk_alike() {
    use ensync_server::config::{Store, DEFAULT_MAPPED_READS};

    for mapped_reads in [DEFAULT_MAPPED_READS, 256 * 1024, 0] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = config_in(dir.path());
        config.store = Store {
            mapped_reads,
            ..Store::default()
        };
        let srv = start_server_with(config).await;
        // A page or more each: the replays of one round share no page with
        // the next round's, which a map once read would keep in memory
        // (the kernel maps the 64 KiB around a page read through a map).
        let (_p, mut r, ids) = padded_setup(&srv, 300, 4096).await;
        let from_disk = || async {
            common::http::scrape(srv.http_addr)
                .await
                .must("ensync_replays_read_from_disk_total", &[])
        };
        let untimed = |lines: &[String]| -> Vec<String> {
            let at = |line: &String| line.split("\"replayTimestamp\":").next().map(str::to_owned);
            lines.iter().filter_map(at).collect()
        };
        // The kernel may keep a page another CPU still holds a reference
        // to: rounds go on, each further into the log, until a replay was
        // read from the disk.
        let mut cold_seen = false;
        for round in 0..10 {
            let at = round * 30;
            let request = format!("FROM_POSITION={};LIMIT=5", ids[at]);
            page_out(dir.path());
            let before = from_disk().await;
            let cold = r.replay("reader", NAME, &request).await;
            let after = from_disk().await;
            let warm = r.replay("reader", NAME, &request).await;
            assert_eq!(
                from_disk().await,
                after,
                "the same replay again, from memory"
            );
            for got in [&cold, &warm] {
                assert_eq!(got.header, header(NAME, 5));
                assert_eq!(got.idems(), ids[at..at + 5]);
            }
            assert_eq!(
                untimed(&cold.lines),
                untimed(&warm.lines),
                "the same records up to the replay's time (mapped_reads {mapped_reads})"
            );
            if after > before {
                cold_seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            cold_seen,
            "a replay read from the disk (mapped_reads {mapped_reads})"
        );
        // All of it, in replays served in one pass (1.2 MB, past the
        // smaller budget).
        for at in (0..300).step_by(10) {
            let request = format!("FROM_POSITION={};LIMIT=10", ids[at]);
            let got = r.replay("reader", NAME, &request).await;
            assert_eq!(got.idems(), ids[at..at + 10], "mapped_reads {mapped_reads}");
        }
        let mapped = common::http::scrape(srv.http_addr)
            .await
            .must("ensync_mapped_read_bytes", &[]);
        assert!(
            mapped <= mapped_reads as f64 && (mapped > 0.0) == (mapped_reads > 0),
            "{mapped} bytes mapped, mapped_reads {mapped_reads}"
        );
        r.ping().await;
        srv.stop().await;
    }
}

/// A small replay whose matches lie far apart (here behind 3,000 events
/// addressed to someone else) is found whole and in order all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_replays_find_sparse_matches_behind_long_stretches() {
    let (_dir, srv) = temp_server().await;
    let mut p = publisher(&srv).await;
    let others: Vec<String> = (0..3000)
        .map(|i| {
            format!("PUB;CLIENT_ID=pub;EVENT_NAME={NAME};PAYLOAD={{\"i\":{i}}};DELIVERY_TO=carol")
        })
        .collect();
    p.pipeline(&others, others.len()).await;
    let mine = p
        .publish_many("pub", 3, |i| {
            (NAME.to_string(), format!("{{\"mine\":{i}}}"))
        })
        .await;
    let mut r = reader(&srv).await;
    for limit in [1, 3, 50] {
        let rep = r
            .replay(
                "reader",
                NAME,
                &format!("FROM_POSITION=earliest;LIMIT={limit}"),
            )
            .await;
        let want = &pub_idems(&mine)[..limit.min(3)];
        assert_eq!(rep.header, header(NAME, want.len()), "LIMIT={limit}");
        assert_eq!(rep.idems(), want, "LIMIT={limit}");
    }
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_limit_outside_1_to_max_is_invalid_parameters() {
    let (_dir, srv) = temp_server().await;
    let (_p, mut r, _evs) = burst_setup(&srv, 3).await;
    let want = "-FAIL:INVALID_PARAMETERS;MESSAGE=LIMIT must be an integer from 1 to 100000";
    for limit in [
        "0",
        "100001",
        "abc",
        "-1",
        "1.5",
        "99999999999999999999",
        "5x",
    ] {
        r.expect(
            &format!(
                "REPLAY;CLIENT_ID=reader;EVENT_NAME={NAME};FROM_POSITION=earliest;LIMIT={limit}"
            ),
            want,
        )
        .await;
    }
    // The connection is still fine and nothing else was owed.
    let rep = r
        .replay("reader", NAME, "FROM_POSITION=earliest;LIMIT=2")
        .await;
    assert_eq!(rep.header, header(NAME, 2));
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_limit_max_comes_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server_with(Config {
        data_dir: dir.path().to_path_buf(),
        limits: Limits {
            max_replay_limit: 5,
            ..Limits::default()
        },
        ..Config::default()
    })
    .await;
    let (_p, mut r, evs) = burst_setup(&srv, 8).await;
    let rep = r
        .replay("reader", NAME, "FROM_POSITION=earliest;LIMIT=5")
        .await;
    assert_eq!(rep.header, header(NAME, 5));
    assert_eq!(rep.idems(), pub_idems(&evs[..5]));
    r.expect(
        &format!("REPLAY;CLIENT_ID=reader;EVENT_NAME={NAME};FROM_POSITION=earliest;LIMIT=6"),
        "-FAIL:INVALID_PARAMETERS;MESSAGE=LIMIT must be an integer from 1 to 5",
    )
    .await;
    r.ping().await;
    srv.stop().await;
}

// ----------------------------------------------------------------- payloads

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_include_payloads_false_omits_the_payload_key() {
    let (_dir, srv) = temp_server().await;
    let mut p = publisher(&srv).await;
    let payload = r#"{"big":"x","n":[1,2,3]}"#;
    let (idem, ts) = p.publish("pub", NAME, payload).await;
    let mut r = reader(&srv).await;

    for flag in ["false", "FALSE", "False"] {
        let rep = r
            .replay(
                "reader",
                NAME,
                &format!("FROM_POSITION=earliest;INCLUDE_PAYLOADS={flag}"),
            )
            .await;
        assert_eq!(rep.header, header(NAME, 1));
        let rec = &rep.records[0];
        assert!(
            rec.get("payload").is_none(),
            "INCLUDE_PAYLOADS={flag}: {}",
            rep.lines[0]
        );
        let want = record_line(
            "+RECORD:",
            &idem,
            block_of(rec),
            NAME,
            ts,
            "pub",
            None,
            &replayed_metadata("{}", replay_timestamp(rec)),
        );
        assert_eq!(rep.lines[0], want);
    }
    for rest in [
        "FROM_POSITION=earliest;INCLUDE_PAYLOADS=true",
        "FROM_POSITION=earliest",
    ] {
        let rep = r.replay("reader", NAME, rest).await;
        let rec = &rep.records[0];
        let want = record_line(
            "+RECORD:",
            &idem,
            block_of(rec),
            NAME,
            ts,
            "pub",
            Some(payload),
            &replayed_metadata("{}", replay_timestamp(rec)),
        );
        assert_eq!(rep.lines[0], want, "{rest}");
    }
    let bad = r
        .expect_prefix(
            &format!("REPLAY;CLIENT_ID=reader;EVENT_NAME={NAME};FROM_POSITION=earliest;INCLUDE_PAYLOADS=yes"),
            "-FAIL:INVALID_PARAMETERS;MESSAGE=",
        )
        .await;
    assert!(
        bad.contains("INCLUDE_PAYLOADS"),
        "message names the key: {bad}"
    );
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_records_carry_replay_marks_after_published_metadata() {
    let (_dir, srv) = temp_server().await;
    let mut p = publisher(&srv).await;
    let meta = r#"{"trace":"t-1","nested":{"a":[1,2]},"zeta":null}"#;
    let reply = p
        .cmd(&format!(
            "PUB;CLIENT_ID=pub;EVENT_NAME={NAME};PAYLOAD={{\"v\":1}};DELIVERY_TO=*;METADATA={meta}"
        ))
        .await;
    let e1 = parse_published(&reply);
    let (e2, t2) = p.publish("pub", NAME, "[1,\"two\"]").await;

    let mut r = reader(&srv).await;
    let before = now_ms();
    let rep = r.replay("reader", NAME, "FROM_POSITION=earliest").await;
    let after = now_ms();
    assert_eq!(rep.header, header(NAME, 2));

    let ts = replay_timestamp(&rep.records[0]);
    assert!(
        ts >= before && ts <= after,
        "replayTimestamp {ts} not within [{before}, {after}]"
    );
    assert_eq!(
        replay_timestamp(&rep.records[1]),
        ts,
        "one replay, one replayTimestamp"
    );
    let m = &rep.records[0]["metadata"];
    assert_eq!(m["REPLAYED"], true);
    assert_eq!(m["$internal"]["replay_info"]["isReplayed"], true);
    assert_eq!(m["$internal"]["replay_info"]["wasAcknowledged"], false);
    assert_eq!(m["trace"], "t-1");

    let want1 = record_line(
        "+RECORD:",
        &e1.idem,
        block_of(&rep.records[0]),
        NAME,
        e1.timestamp,
        "pub",
        Some("{\"v\":1}"),
        &replayed_metadata(meta, ts),
    );
    let want2 = record_line(
        "+RECORD:",
        &e2,
        block_of(&rep.records[1]),
        NAME,
        t2,
        "pub",
        Some("[1,\"two\"]"),
        &replayed_metadata("{}", ts),
    );
    assert_eq!(rep.lines, vec![want1, want2]);
    r.ping().await;
    srv.stop().await;
}

// ------------------------------------------------------- names and routing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_replay_merges_matching_names_in_publication_order() {
    let (_dir, srv) = temp_server().await;
    let mut p = publisher(&srv).await;
    let mut want = Vec::new();
    let mut want_ax = Vec::new();
    for i in 0..6 {
        let (a, _) = p
            .publish("pub", "user/a/x", &format!("{{\"i\":{i}}}"))
            .await;
        want.push(a.clone());
        want_ax.push(a);
        p.publish("pub", "order/c/z", "{}").await;
        want.push(
            p.publish("pub", "user/b/y", &format!("{{\"i\":{i}}}"))
                .await
                .0,
        );
        p.publish("pub", "user", "{}").await; // not below user/
        if i % 2 == 0 {
            want.push(p.publish("pub", "user/b/y/deep", "{}").await.0);
        }
    }
    let mut r = reader_of(&srv, "user/*").await;
    let rep = r
        .replay("reader", "user/*", "FROM_POSITION=earliest;LIMIT=1000")
        .await;
    assert_eq!(rep.header, header("user/*", want.len()));
    assert_eq!(rep.idems(), want);
    let blocks = rep.blocks();
    assert!(
        blocks.windows(2).all(|w| w[0] < w[1]),
        "blocks increase: {blocks:?}"
    );

    // The same subscription covers a single name below it.
    let rep = r
        .replay("reader", "user/a/x", "FROM_POSITION=earliest;LIMIT=1000")
        .await;
    assert_eq!(rep.header, header("user/a/x", 6));
    assert_eq!(rep.idems(), want_ax);
    assert!(rep.records.iter().all(|r| r["name"] == "user/a/x"));
    r.ping().await;
    srv.stop().await;
}

/// A pattern over thousands of names, most with an event or two, one
/// with many, published in bursts so that a commit holds a chunk for each
/// name: LIMIT replays from ids and timestamps anywhere in it start where
/// asked and go on in publication order, and a full replay gets them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_replays_of_a_pattern_over_thousands_of_names_start_where_asked() {
    let (_dir, srv) = temp_server().await;
    let mut p = publisher(&srv).await;
    let first = p
        .publish_many("pub", 2_400, |i| {
            let name = match i {
                _ if i % 12 == 0 => "other/x".to_string(),
                _ if i % 5 == 0 => "t/hot".to_string(),
                _ => format!("t/{i}"),
            };
            (name, format!("{{\"i\":{i}}}"))
        })
        .await;
    // Some names again, in commits of their own, and new ones.
    let second = p
        .publish_many("pub", 600, |i| {
            let name = match i {
                _ if i % 3 == 0 => format!("t/{}", i + 1),
                _ => format!("t/new{i}"),
            };
            (name, format!("{{\"j\":{i}}}"))
        })
        .await;
    let under = |i: usize| i % 12 != 0;
    let want: Vec<&Published> = (first.iter().enumerate())
        .filter(|(i, _)| under(*i))
        .map(|(_, e)| e)
        .chain(&second)
        .collect();

    let mut r = reader_of(&srv, "t/*").await;
    let rep = r
        .replay("reader", "t/*", "FROM_POSITION=earliest;LIMIT=10000")
        .await;
    let idems: Vec<&str> = want.iter().map(|e| e.idem.as_str()).collect();
    assert_eq!(rep.idems(), idems, "the whole pattern, in order");

    for k in [
        0,
        1,
        37,
        499,
        1_000,
        1_998,
        2_199,
        2_200,
        2_500,
        want.len() - 10,
    ] {
        let from = &want[k];
        // From its id, and from its timestamp: from the first event
        // logged at it.
        let at = want.partition_point(|e| e.timestamp < from.timestamp);
        for (position, start) in [(from.idem.clone(), k), (from.timestamp.to_string(), at)] {
            let rep = r
                .replay(
                    "reader",
                    "t/*",
                    &format!("FROM_POSITION={position};LIMIT=50"),
                )
                .await;
            let end = (start + 50).min(want.len());
            let what = format!("from {position} (event {k})");
            assert_eq!(rep.header, header("t/*", end - start), "{what}");
            assert_eq!(rep.idems(), idems[start..end], "{what}");
        }
    }
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_returns_only_events_addressed_to_the_client() {
    let (_dir, srv) = temp_server().await;
    let mut bob = srv.client().await;
    bob.conn("bob").await;
    bob.sub("bob", NAME).await;
    let mut carol = srv.client().await;
    carol.conn("carol").await;
    carol.sub("carol", NAME).await;

    let mut p = publisher(&srv).await;
    let (e1, _) = p.publish_to("pub", NAME, "{\"to\":\"bob\"}", "bob").await;
    let (e2, _) = p.publish_to("pub", NAME, "{\"to\":\"all\"}", "*").await;
    let (e3, _) = p
        .publish_to("pub", NAME, "{\"to\":\"dave,bob\"}", "dave,bob")
        .await;
    let (e4, _) = p.publish_to("pub", NAME, "{\"to\":\"dave\"}", "dave").await;

    // Live deliveries may come before, or after, the replay; the replay
    // itself must hold exactly the events addressed to its client.
    let line = format!("REPLAY;CLIENT_ID=bob;EVENT_NAME={NAME};FROM_POSITION=earliest");
    let rep = bob.replay_line(&line, NAME, true).await;
    assert_eq!(rep.header, header(NAME, 3));
    assert_eq!(rep.idems(), vec![e1.clone(), e2.clone(), e3.clone()]);
    let mut bob_live = rep.live.clone();
    bob_live.extend(bob.ping_collecting_live().await);

    let line = format!("REPLAY;CLIENT_ID=carol;EVENT_NAME={NAME};FROM_POSITION=earliest");
    let rep = carol.replay_line(&line, NAME, true).await;
    assert_eq!(rep.header, header(NAME, 1));
    assert_eq!(rep.idems(), vec![e2.clone()]);
    let mut carol_live = rep.live.clone();
    carol_live.extend(carol.ping_collecting_live().await);

    // Single-event replay obeys the same addressing.
    carol
        .expect_prefix(
            &format!("REPLAY;CLIENT_ID=carol;EVENT_IDEM={e1};EVENT_NAME={NAME}"),
            "-FAIL:NOT_FOUND;MESSAGE=",
        )
        .await;
    bob.send(&format!(
        "REPLAY;CLIENT_ID=bob;EVENT_IDEM={e1};EVENT_NAME={NAME}"
    ))
    .await;
    let got = loop {
        let l = bob.line().await;
        if l.starts_with("+RECORD:") && !is_replayed(&parse_record(&l)) {
            bob_live.push(l);
            continue;
        }
        break l;
    };
    assert!(got.starts_with("+REPLAY:"), "{got}");
    assert_eq!(parse_record(&got)["idem"], e1.as_str());

    for l in &carol_live {
        let idem = parse_record(l)["idem"].as_str().unwrap().to_string();
        assert_eq!(
            idem, e2,
            "carol got a live record not addressed to her: {l}"
        );
    }
    for l in &bob_live {
        let idem = parse_record(l)["idem"].as_str().unwrap().to_string();
        assert!(idem != e4, "bob got a live record addressed to dave: {l}");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_needs_a_subscription_covering_the_event_name() {
    let (_dir, srv) = temp_server().await;
    let mut p = publisher(&srv).await;
    p.publish("pub", "user/a/x", "{}").await;
    p.publish("pub", "user/a/y", "{}").await;
    // Another client's subscription does not count.
    p.sub("pub", "user/*").await;

    let mut r = srv.client().await;
    r.conn("reader").await;
    let q =
        |name: &str| format!("REPLAY;CLIENT_ID=reader;EVENT_NAME={name};FROM_POSITION=earliest");
    r.expect_prefix(&q("user/a/x"), "-FAIL:NOT_SUBSCRIBED;MESSAGE=")
        .await;
    r.sub("reader", "user/a/x").await;
    r.expect_prefix(&q("user/a/y"), "-FAIL:NOT_SUBSCRIBED;MESSAGE=")
        .await;
    r.expect_prefix(&q("user/*"), "-FAIL:NOT_SUBSCRIBED;MESSAGE=")
        .await;
    r.expect_prefix(&q("user/a/*"), "-FAIL:NOT_SUBSCRIBED;MESSAGE=")
        .await;
    r.expect_prefix(&q("*"), "-FAIL:NOT_SUBSCRIBED;MESSAGE=")
        .await;
    let rep = r
        .replay("reader", "user/a/x", "FROM_POSITION=earliest")
        .await;
    assert_eq!(rep.header, header("user/a/x", 1));
    r.ping().await;
    srv.stop().await;
}

// ------------------------------------------------------------------- errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_missing_required_keys_gets_the_seed_message() {
    let (_dir, srv) = temp_server().await;
    let mut r = reader(&srv).await;
    for line in [
        format!("REPLAY;EVENT_NAME={NAME};FROM_POSITION=earliest"),
        format!("REPLAY;CLIENT_ID=reader;EVENT_NAME={NAME}"),
        format!("REPLAY;CLIENT_ID=reader;EVENT_NAME={NAME};LIMIT=5"),
        "REPLAY;CLIENT_ID=reader;FROM_POSITION=earliest".to_string(),
        "REPLAY;CLIENT_ID=reader".to_string(),
        format!("REPLAY;EVENT_NAME={NAME}"),
    ] {
        r.expect(&line, REPLAY_MISSING).await;
    }
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_unparsable_or_unknown_position_is_invalid_position() {
    let (_dir, srv) = temp_server().await;
    let (_p, mut r, evs) = burst_setup(&srv, 3).await;
    for pos in [
        "FROM_POSITION=yesterday",
        "FROM_POSITION=12abc",
        "FROM_POSITION=-5",
        "FROM_POSITION=1.5",
        "FROM_POSITION=2024-13-45T99:00:00Z",
        "FROM_POSITION=evt_ffffffffffffffffffffffff",
        "FROM_POSITION=evt_nothex",
        "FROM_POSITION=earliest;TO_POSITION=garbage",
        "FROM_POSITION=earliest;TO_POSITION=evt_ffffffffffffffffffffffff",
        "FROM_POSITION=earliest;TO_POSITION=earliest",
    ] {
        r.expect(
            &format!("REPLAY;CLIENT_ID=reader;EVENT_NAME={NAME};{pos}"),
            INVALID_POSITION,
        )
        .await;
    }
    // A real id in the same shape works.
    let rep = r
        .replay("reader", NAME, &format!("FROM_POSITION={}", evs[1].idem))
        .await;
    assert_eq!(rep.header, header(NAME, 2));
    r.ping().await;
    srv.stop().await;
}

// ------------------------------------------------------------ single event

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_event_replay_answers_one_marked_replay_line() {
    let (_dir, srv) = temp_server().await;
    let mut p = publisher(&srv).await;
    let meta = r#"{"k":"v"}"#;
    let e1 = parse_published(
        &p.cmd(&format!(
            "PUB;CLIENT_ID=pub;EVENT_NAME={NAME};PAYLOAD={{\"a\":\"b;c\"}};DELIVERY_TO=*;METADATA={meta}"
        ))
        .await,
    );
    p.publish("pub", NAME, "{}").await;
    let mut r = reader(&srv).await;

    let before = now_ms();
    let got = r
        .cmd(&format!(
            "REPLAY;CLIENT_ID=reader;EVENT_IDEM={};EVENT_NAME={NAME}",
            e1.idem
        ))
        .await;
    let after = now_ms();
    assert!(got.starts_with("+REPLAY:{"), "{got}");
    let rec = parse_record(&got);
    let ts = replay_timestamp(&rec);
    assert!(
        ts >= before && ts <= after,
        "replayTimestamp {ts} not within [{before}, {after}]"
    );
    let want = record_line(
        "+REPLAY:",
        &e1.idem,
        block_of(&rec),
        NAME,
        e1.timestamp,
        "pub",
        Some("{\"a\":\"b;c\"}"),
        &replayed_metadata(meta, ts),
    );
    assert_eq!(got, want);
    // Exactly one line: the next reply is the PING's.
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_event_replay_of_unknown_or_foreign_event_is_not_found() {
    let (_dir, srv) = temp_server().await;
    let mut p = publisher(&srv).await;
    let (mine, _) = p.publish("pub", NAME, "{}").await;
    let (other_name, _) = p.publish("pub", "user/profile/deleted", "{}").await;
    let (for_bob, _) = p.publish_to("pub", NAME, "{}", "bob").await;
    let mut r = reader_of(&srv, "user/*").await;

    let q = |idem: &str, name: &str| {
        format!("REPLAY;CLIENT_ID=reader;EVENT_IDEM={idem};EVENT_NAME={name}")
    };
    r.expect_prefix(
        &q("evt_ffffffffffffffffffffffff", NAME),
        "-FAIL:NOT_FOUND;MESSAGE=",
    )
    .await;
    r.expect_prefix(&q(&other_name, NAME), "-FAIL:NOT_FOUND;MESSAGE=")
        .await;
    r.expect_prefix(
        &q(&mine, "user/profile/deleted"),
        "-FAIL:NOT_FOUND;MESSAGE=",
    )
    .await;
    r.expect_prefix(&q(&for_bob, NAME), "-FAIL:NOT_FOUND;MESSAGE=")
        .await;
    // EVENT_IDEM and FROM_POSITION together are a malformed request.
    r.expect_prefix(
        &format!(
            "REPLAY;CLIENT_ID=reader;EVENT_IDEM={mine};EVENT_NAME={NAME};FROM_POSITION=earliest"
        ),
        "-FAIL:INVALID_PARAMETERS;MESSAGE=",
    )
    .await;
    // And the found case still works on this connection.
    let got = r.cmd(&q(&mine, NAME)).await;
    assert!(got.starts_with("+REPLAY:"), "{got}");
    assert_eq!(parse_record(&got)["idem"], mine.as_str());
    r.ping().await;
    srv.stop().await;
}

// ------------------------------------------------ ordering and consistency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_millisecond_events_replay_in_publication_order() {
    let (_dir, srv) = temp_server().await;
    let (_p, mut r, evs) = burst_setup(&srv, 500).await;
    let distinct: HashSet<u64> = evs.iter().map(|e| e.timestamp).collect();
    assert!(
        distinct.len() < evs.len(),
        "precondition: some of 500 pipelined PUBs share a loggedAt"
    );
    assert!(
        evs.windows(2).all(|w| w[0].timestamp <= w[1].timestamp),
        "PUB TIMESTAMPs are non-decreasing in reply order"
    );
    let rep = r
        .replay("reader", NAME, "FROM_POSITION=earliest;LIMIT=500")
        .await;
    assert_eq!(rep.header, header(NAME, 500));
    assert_eq!(rep.idems(), pub_idems(&evs));
    let blocks = rep.blocks();
    assert!(
        blocks.windows(2).all(|w| w[0] < w[1]),
        "blocks strictly increase"
    );
    let logged: Vec<u64> = rep
        .records
        .iter()
        .map(|r| r["loggedAt"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, evs.iter().map(|e| e.timestamp).collect::<Vec<_>>());
    for (i, rec) in rep.records.iter().enumerate() {
        assert_eq!(rec["payload"]["i"], i, "payload of record {i}");
    }

    // Starting at an id in the middle of a same-ms run starts exactly there.
    let mid = (1..evs.len())
        .find(|&i| evs[i].timestamp == evs[i - 1].timestamp)
        .expect("a shared loggedAt");
    let rep = r
        .replay(
            "reader",
            NAME,
            &format!("FROM_POSITION={};LIMIT=500", evs[mid].idem),
        )
        .await;
    assert_eq!(rep.idems(), pub_idems(&evs[mid..]));
    // And by that timestamp, the whole run is included.
    let first = evs
        .iter()
        .position(|e| e.timestamp == evs[mid].timestamp)
        .unwrap();
    let rep = r
        .replay(
            "reader",
            NAME,
            &format!("FROM_POSITION={};LIMIT=500", evs[mid].timestamp),
        )
        .await;
    assert_eq!(rep.idems(), pub_idems(&evs[first..]));
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_is_a_snapshot_while_another_connection_publishes() {
    let (_dir, srv) = temp_server().await;
    let name = "snap/e/x";
    let mut p = publisher(&srv).await;
    let pre = p
        .publish_many("pub", 20_000, |i| {
            (name.to_string(), format!("{{\"i\":{i}}}"))
        })
        .await;

    let mut r = reader_of(&srv, "snap/*").await;

    // A second publisher keeps publishing, one PUB at a time, noting for
    // each whether it was sent after the reader had the replay's header.
    let header_seen = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<(bool, String)>>> = Arc::default();
    let mut b = srv.client().await;
    b.conn("pub2").await;
    let task = {
        let (header_seen, stop, log) = (header_seen.clone(), stop.clone(), log.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let late = header_seen.load(Ordering::SeqCst);
                let (idem, _) = b
                    .publish("pub2", "snap/e/y", &format!("{{\"j\":{i}}}"))
                    .await;
                log.lock().unwrap().push((late, idem));
                i += 1;
            }
        })
    };
    // Let it get going.
    let started = Instant::now();
    while log.lock().unwrap().len() < 20 {
        assert!(
            started.elapsed() < LINE_TIMEOUT,
            "second publisher made no progress"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let acked_before: Vec<String> = log.lock().unwrap().iter().map(|e| e.1.clone()).collect();
    r.send("REPLAY;CLIENT_ID=reader;EVENT_NAME=snap/*;FROM_POSITION=earliest;LIMIT=100000")
        .await;
    // Read the header by hand so the flag is set the moment it arrives.
    let mut live_before = Vec::new();
    let hdr = loop {
        let l = r.line().await;
        if l.starts_with("+RECORD:") && !is_replayed(&parse_record(&l)) {
            live_before.push(l);
            continue;
        }
        break l;
    };
    header_seen.store(true, Ordering::SeqCst);
    let count: usize = hdr
        .strip_prefix("+PASS:REPLAY_STARTED;EVENT_NAME=snap/*;COUNT=")
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad header {hdr:?}"));
    let mut replayed = Vec::with_capacity(count);
    while replayed.len() < count {
        let l = r.line().await;
        assert!(
            l.starts_with("+RECORD:"),
            "record {} of {count}: {l:?}",
            replayed.len() + 1
        );
        let rec = parse_record(&l);
        if is_replayed(&rec) {
            replayed.push((rec["idem"].as_str().unwrap().to_string(), block_of(&rec)));
        }
    }
    // Nothing replayed after the COUNT records: only live ones, then PONG.
    r.ping_collecting_live().await;
    // Keep publishing a little past the end of the replay, then stop.
    let n_at_end = log.lock().unwrap().len();
    let started = Instant::now();
    while log.lock().unwrap().len() < n_at_end + 5 {
        assert!(started.elapsed() < LINE_TIMEOUT, "second publisher stalled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(true, Ordering::SeqCst);
    task.await.expect("publisher task");
    let log = log.lock().unwrap().clone();

    assert_eq!(replayed.len(), count);
    assert!(
        count >= pre.len() + acked_before.len(),
        "COUNT {count} misses events published before the REPLAY"
    );
    let got: HashSet<&str> = replayed.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(got.len(), count, "no event replayed twice");
    for e in pre.iter().map(|e| &e.idem).chain(acked_before.iter()) {
        assert!(
            got.contains(e.as_str()),
            "event {e} published before the REPLAY is missing"
        );
    }
    let late: Vec<&String> = log.iter().filter(|e| e.0).map(|e| &e.1).collect();
    assert!(
        !late.is_empty(),
        "precondition: publishing went on after the header"
    );
    for e in &late {
        assert!(
            !got.contains(e.as_str()),
            "event {e} published after the REPLAY header was replayed"
        );
    }
    let blocks: Vec<u64> = replayed.iter().map(|e| e.1).collect();
    assert!(
        blocks.windows(2).all(|w| w[0] < w[1]),
        "blocks strictly increase"
    );
    let bound = *blocks.last().unwrap();

    // The snapshot is a prefix of the log: a later replay of everything
    // starts with the same events, and all later ones lie beyond the bound.
    let all = r
        .replay_line(
            "REPLAY;CLIENT_ID=reader;EVENT_NAME=snap/*;FROM_POSITION=earliest;LIMIT=100000",
            "snap/*",
            true,
        )
        .await;
    assert_eq!(all.count, pre.len() + log.len());
    let all_pairs: Vec<(String, u64)> = all.idems().into_iter().zip(all.blocks()).collect();
    assert_eq!(
        all_pairs[..count],
        replayed[..],
        "the snapshot is a prefix of the log"
    );
    assert!(
        all_pairs[count..].iter().all(|e| e.1 > bound),
        "later events lie beyond block {bound}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_records_all_come_before_the_next_reply() {
    let (_dir, srv) = temp_server().await;
    let (_p, mut r, evs) = burst_setup(&srv, 30).await;
    let lines = vec![
        format!("REPLAY;CLIENT_ID=reader;EVENT_NAME={NAME};FROM_POSITION=earliest;LIMIT=10"),
        "PING".to_string(),
        format!(
            "REPLAY;CLIENT_ID=reader;EVENT_NAME={NAME};FROM_POSITION={};LIMIT=5",
            evs[10].idem
        ),
        "PUB;CLIENT_ID=reader;EVENT_NAME=elsewhere/x/y;PAYLOAD={};DELIVERY_TO=*".to_string(),
        "REPLAY;CLIENT_ID=reader;EVENT_NAME=user/nope/x;FROM_POSITION=earliest".to_string(),
        "PING".to_string(),
    ];
    let got = r.pipeline(&lines, 1 + 10 + 1 + 1 + 5 + 1 + 1 + 1).await;
    assert_eq!(got[0], header(NAME, 10));
    for (i, l) in got[1..11].iter().enumerate() {
        let rec = parse_record(l);
        assert!(is_replayed(&rec));
        assert_eq!(rec["idem"], evs[i].idem.as_str());
    }
    assert_eq!(got[11], "+PASS:PONG");
    assert_eq!(got[12], header(NAME, 5));
    for (i, l) in got[13..18].iter().enumerate() {
        assert_eq!(parse_record(l)["idem"], evs[10 + i].idem.as_str());
    }
    parse_published(&got[18]);
    assert!(
        got[19].starts_with("-FAIL:NOT_SUBSCRIBED;MESSAGE="),
        "{}",
        got[19]
    );
    assert_eq!(got[20], "+PASS:PONG");
    r.expect_silence(Duration::from_millis(200)).await;
    srv.stop().await;
}

// ------------------------------------------------------------- durability

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_restart_is_identical_and_subscriptions_survive() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path()).await;
    let mut p = publisher(&srv).await;
    let mut ids = Vec::new();
    let mut timestamps = Vec::new();
    for i in 0..20 {
        let line = if i % 3 == 0 {
            format!("PUB;CLIENT_ID=pub;EVENT_NAME=user/a/x;PAYLOAD={{\"i\":{i}}};DELIVERY_TO=*;METADATA={{\"m\":{i}}}")
        } else {
            format!("PUB;CLIENT_ID=pub;EVENT_NAME=user/b/y;PAYLOAD=aGVsbG{i:02};DELIVERY_TO=*")
        };
        let published = parse_published(&p.cmd(&line).await);
        ids.push(published.idem);
        timestamps.push(published.timestamp);
    }
    let mut r = reader_of(&srv, "user/*").await;
    let mut queries = vec![
        "FROM_POSITION=earliest;LIMIT=100".to_string(),
        format!("FROM_POSITION={};TO_POSITION={}", ids[5], ids[15]),
        "FROM_POSITION=earliest;LIMIT=7;INCLUDE_PAYLOADS=false".to_string(),
    ];
    // A seek from every event's id and timestamp: after the restart they
    // are answered from what the store lists as it starts.
    for (id, ts) in ids.iter().zip(&timestamps) {
        queries.push(format!("FROM_POSITION={id};LIMIT=1"));
        queries.push(format!("FROM_POSITION={ts};LIMIT=2"));
    }
    let mut before = Vec::new();
    for q in &queries {
        let rep = r.replay("reader", "user/*", q).await;
        before.push((rep.header, rep.lines));
    }
    assert_eq!(before[0].0, header("user/*", 20));
    drop((p, r));
    srv.stop().await;

    let srv = start_server(dir.path()).await;
    let mut r = srv.client().await;
    r.conn("reader").await; // no SUB: the subscription is durable
    for (q, (hdr, lines)) in queries.iter().zip(&before) {
        let rep = r.replay("reader", "user/*", q).await;
        assert_eq!(&rep.header, hdr, "{q}");
        let strip = |v: &[String]| {
            v.iter()
                .map(|l| without_replay_timestamp(l))
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&rep.lines), strip(lines), "{q}");
    }
    r.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_after_restart_follow_earlier_ones() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path()).await;
    let mut p = publisher(&srv).await;
    let first = p
        .publish_many("pub", 10, |i| (NAME.to_string(), format!("{{\"i\":{i}}}")))
        .await;
    drop(p);
    srv.stop().await;

    let srv = start_server(dir.path()).await;
    let mut p = publisher(&srv).await;
    let second = p
        .publish_many("pub", 10, |i| {
            (NAME.to_string(), format!("{{\"i\":{}}}", 10 + i))
        })
        .await;
    let mut r = reader(&srv).await;
    let rep = r
        .replay("reader", NAME, "FROM_POSITION=earliest;LIMIT=100")
        .await;
    let want: Vec<String> = pub_idems(&first)
        .into_iter()
        .chain(pub_idems(&second))
        .collect();
    assert_eq!(rep.idems(), want);
    let blocks = rep.blocks();
    assert!(
        blocks.windows(2).all(|w| w[0] < w[1]),
        "blocks strictly increase across the restart: {blocks:?}"
    );
    let unique: HashSet<&String> = want.iter().collect();
    assert_eq!(unique.len(), 20, "event ids are not reused after a restart");
    r.ping().await;
    srv.stop().await;
}

// ------------------------------------------------------------------ volume

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_100000_events_delivers_exactly_count_records() {
    let (_dir, srv) = temp_server().await;
    let mut p = publisher(&srv).await;
    let n = 100_000;
    let t0 = Instant::now();
    let evs = p
        .publish_many("pub", n, |i| {
            ("bulk/e/x".to_string(), format!("{{\"i\":{i}}}"))
        })
        .await;
    let mut r = reader_of(&srv, "bulk/e/x").await;
    eprintln!("published {n} in {:?}", t0.elapsed());
    let t0 = Instant::now();
    r.send("REPLAY;CLIENT_ID=reader;EVENT_NAME=bulk/e/x;FROM_POSITION=earliest;LIMIT=100000")
        .await;
    assert_eq!(r.line().await, header("bulk/e/x", n));
    let mut last_block = None;
    for (i, e) in evs.iter().enumerate() {
        let l = r.line().await;
        // Cheap checks on every record (a full parse of 100,000 records
        // in a debug build is slow), a full parse of some.
        let prefix = format!("+RECORD:{{\"idem\":\"{}\",\"block\":\"", e.idem);
        let rest = l
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("record {i} is not {} : {l}", e.idem));
        let b: u64 = rest[..rest.find('"').expect("block ends")]
            .parse()
            .unwrap_or_else(|_| panic!("record {i}: bad block: {l}"));
        assert!(
            l.contains("\"REPLAYED\":true,\"$internal\":"),
            "record {i} is not marked: {l}"
        );
        if i % 997 == 0 {
            let rec = parse_record(&l);
            assert!(is_replayed(&rec), "record {i}: {l}");
            assert_eq!(block_of(&rec), b);
            assert_eq!(rec["payload"]["i"], i, "record {i}");
        }
        if let Some(prev) = last_block {
            assert!(b > prev, "block of record {i}");
        }
        last_block = Some(b);
    }
    // No record more than COUNT.
    r.ping().await;
    eprintln!("replayed {n} in {:?}", t0.elapsed());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_get_one_reply_each_in_order() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    c.conn("pipe").await;

    #[derive(Debug)]
    enum Want {
        Published,
        Exact(String),
        Prefix(&'static str),
    }
    // More than the 1,024 commands a connection may have in flight: the
    // server stops reading for a while as the writer waits for commits.
    const LINES: usize = 3000;
    let mut buf = String::new();
    let mut wants = Vec::new();
    for i in 0..LINES {
        let (line, want) = match i % 8 {
            0 | 5 => (
                format!(
                    "PUB;CLIENT_ID=pipe;EVENT_NAME=pipe/e/x;PAYLOAD={{\"i\":{i}}};DELIVERY_TO=*"
                ),
                Want::Published,
            ),
            1 => (
                format!("SUB;CLIENT_ID=pipe;EVENT_NAME=sub/s{i}/*"),
                Want::Exact(format!("+PASS:SUBSCRIBED;EVENT_NAME=sub/s{i}/*")),
            ),
            2 => ("PING".to_string(), Want::Exact("+PASS:PONG".to_string())),
            3 => (
                format!("BOGUS;X={i}"),
                Want::Prefix("-FAIL:UNKNOWN_COMMAND;MESSAGE="),
            ),
            4 => (
                "PUB;CLIENT_ID=pipe;EVENT_NAME=pipe/e/x;PAYLOAD=not json!;DELIVERY_TO=*"
                    .to_string(),
                Want::Prefix("-FAIL:INVALID_PAYLOAD;MESSAGE="),
            ),
            6 => (
                "REPLAY;CLIENT_ID=pipe;EVENT_NAME=pipe/e/x".to_string(),
                Want::Exact(REPLAY_MISSING.to_string()),
            ),
            _ => (
                "PUB;CLIENT_ID=someone-else;EVENT_NAME=pipe/e/x;PAYLOAD={};DELIVERY_TO=*"
                    .to_string(),
                Want::Prefix("-FAIL:PERMISSION_DENIED;MESSAGE="),
            ),
        };
        buf.push_str(&line);
        buf.push('\n');
        // Lines that get no reply at all: a client PONG, blank lines.
        if i % 50 == 0 {
            buf.push_str("PONG\n\n\r\n");
        }
        wants.push((line, want));
    }
    let got = c.pipeline_raw(buf.as_bytes(), LINES).await;
    let mut last_ts = 0;
    for (i, ((line, want), reply)) in wants.iter().zip(&got).enumerate() {
        match want {
            Want::Published => {
                let p = parse_published(reply);
                assert!(p.timestamp >= last_ts, "reply {i}: TIMESTAMP went back");
                last_ts = p.timestamp;
            }
            Want::Exact(s) => assert_eq!(reply, s, "reply {i} to {line:?}"),
            Want::Prefix(s) => {
                assert!(reply.starts_with(s), "reply {i} to {line:?}: {reply:?}");
                assert_fail_shape(reply);
            }
        }
    }
    c.ping().await;
    c.expect_silence(Duration::from_millis(200)).await;
    srv.stop().await;
}
