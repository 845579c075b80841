//! A replay streams at the pace its client reads: a client that stops
//! reading in the middle of a large replay holds up only itself, and when
//! it reads again it gets exactly the records announced.

use std::time::{Duration, Instant};

mod common;

use common::{start_server, start_server_with, Client};
use ensync_server::config::Config;

const EVENTS: usize = 100_000;

/// Publishes `n` events named `name` of about `pad + 30` bytes each,
/// pipelined and addressed to everyone.
async fn publish_padded(client: &mut Client, id: &str, name: &str, n: usize, pad: usize) {
    let pad = "x".repeat(pad);
    let published = client
        .publish_many(id, n, |i| {
            (name.to_owned(), format!("{{\"n\":{i},\"pad\":\"{pad}\"}}"))
        })
        .await;
    assert_eq!(published.len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_holds_up_only_its_own_replay() {
    let data = tempfile::tempdir().expect("temp dir");
    let server = start_server(data.path()).await;

    // The publisher is not subscribed, so it gets no live copies.
    let mut publisher = server.client().await;
    publisher.conn("loader").await;
    publish_padded(&mut publisher, "loader", "bulk/item/added", EVENTS, 40).await;

    let mut slow = server.client().await;
    slow.conn("slow").await;
    slow.sub("slow", "bulk/*").await;
    // Ask for everything, then read nothing: ~12 MB of records back up in
    // the socket buffers and the server must stop producing, not buffer.
    slow.send(&format!(
        "REPLAY;CLIENT_ID=slow;EVENT_NAME=bulk/item/added;FROM_POSITION=earliest;LIMIT={EVENTS}"
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Meanwhile another client publishes, replays and is answered promptly.
    let mut other = server.client().await;
    other.conn("other").await;
    other.sub("other", "bulk/*").await;
    let started = Instant::now();
    let published = other
        .expect_prefix(
            "PUB;CLIENT_ID=other;EVENT_NAME=bulk/item/added;PAYLOAD={};DELIVERY_TO=other",
            "+PASS:PUBLISHED;",
        )
        .await;
    let live = other.line().await;
    assert!(live.starts_with("+RECORD:"), "{live}");
    other
        .expect(
            "REPLAY;CLIENT_ID=other;EVENT_NAME=bulk/*;FROM_POSITION=earliest;LIMIT=3",
            "+PASS:REPLAY_STARTED;EVENT_NAME=bulk/*;COUNT=3",
        )
        .await;
    for _ in 0..3 {
        assert!(other.line().await.starts_with("+RECORD:"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "other clients waited {:?} behind a stalled replay",
        started.elapsed()
    );
    assert!(published.contains("IDEM=evt_"));

    // The stalled client now reads: the header, then exactly what it
    // announced, in order, and nothing published after the REPLAY.
    let header = slow.line().await;
    assert_eq!(
        header,
        format!("+PASS:REPLAY_STARTED;EVENT_NAME=bulk/item/added;COUNT={EVENTS}")
    );
    let mut last_block = 0;
    for i in 0..EVENTS {
        let line = slow.line().await;
        let record = common::parse_record(&line);
        let block = common::block_of(&record);
        assert!(block > last_block, "record {i} out of order");
        assert_eq!(record["payload"]["n"], i, "record {i}");
        last_block = block;
    }
    // Its reply to the next command comes right after the last record.
    slow.expect("PING", "+PASS:PONG").await;

    drop((publisher, slow, other));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_that_falls_behind_still_gets_every_event_once_in_order() {
    // ~30 MB of live records: far more than socket buffers hold, so the
    // subscriber's connection must pull them from the log as it drains.
    const LIVE: usize = 30_000;
    let data = tempfile::tempdir().expect("temp dir");
    // A cap above LIVE: this test is about a slow reader, not about
    // unacknowledged events holding delivery back.
    let mut config = Config {
        data_dir: data.path().to_path_buf(),
        ..Config::default()
    };
    config.delivery.max_unsettled = LIVE + 1;
    let server = start_server_with(config).await;

    let mut subscriber = server.client().await;
    subscriber.conn("lagger").await;
    subscriber.sub("lagger", "feed/*").await;

    let mut publisher = server.client().await;
    publisher.conn("firehose").await;
    publish_padded(&mut publisher, "firehose", "feed/tick/sent", LIVE, 1000).await;

    let mut last_block = 0;
    for i in 0..LIVE {
        let record = common::parse_record(&subscriber.line().await);
        assert_eq!(record["payload"]["n"], i, "live record {i}");
        let block = common::block_of(&record);
        assert!(block > last_block, "live record {i} out of order");
        assert!(!common::is_replayed(&record));
        last_block = block;
    }
    subscriber.expect("PING", "+PASS:PONG").await;

    drop((publisher, subscriber));
    server.stop().await;
}
