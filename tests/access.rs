//! Access control over real sockets: with access keys configured only
//! the clients they name connect, and each publishes, subscribes to and
//! replays only what its patterns grant.

mod common;

use std::time::Duration;

use common::*;
use ensync_server::config::{ClientEntry, Config};

/// The exact refusal of a replay outside a client's rights.
const REPLAY_DENIED: &str =
    "-FAIL:PERMISSION_DENIED;MESSAGE=Not authorized to replay this event type";

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_string()).collect()
}

/// `billing` publishes billing events and follows orders; `audit` reads
/// everything but publishes nothing; `shop` publishes orders.
fn closed_config(dir: &std::path::Path) -> Config {
    Config {
        clients: vec![
            ClientEntry {
                id: "billing".into(),
                access_key: Some("bk-1".into()),
                publish: strings(&["billing/*"]),
                subscribe: strings(&["order/*", "billing/*"]),
                replay: strings(&["order/*"]),
                ..ClientEntry::default()
            },
            ClientEntry {
                id: "audit".into(),
                // As `printf %s ak-2 | sha256sum` prints it.
                access_key_sha256: Some(sha256_hex("ak-2")),
                subscribe: strings(&["*"]),
                replay: strings(&["*"]),
                ..ClientEntry::default()
            },
            ClientEntry {
                id: "shop".into(),
                access_key: Some("sk-3".into()),
                publish: strings(&["order/*"]),
                ..ClientEntry::default()
            },
        ],
        ..config_in(dir)
    }
}

/// Connects with `key`, expecting to be `id`.
async fn login(srv: &TestServer, key: &str, id: &str) -> Client {
    let mut c = srv.client().await;
    let reply = c.cmd(&format!("CONN;ACCESS_KEY={key}")).await;
    assert!(
        reply.starts_with(&format!("+PASS:{{clientId={id},clientHash=")),
        "CONN with {key}: {reply}"
    );
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_keys_connect_and_a_bare_client_id_is_told_to_use_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_server_with(closed_config(dir.path())).await;
    let mut c = srv.client().await;
    let wrong = c.cmd("CONN;ACCESS_KEY=bk-2").await;
    assert!(
        wrong.starts_with("-FAIL:CLIENT_NOT_FOUND;MESSAGE=no client has this access key"),
        "{wrong}"
    );
    let bare = c.cmd("CONN;CLIENT_ID=billing").await;
    assert!(
        bare.starts_with("-FAIL:PERMISSION_DENIED;MESSAGE=this server checks access keys"),
        "{bare}"
    );
    // Still not connected after both refusals.
    let sub = c.cmd("SUB;CLIENT_ID=billing;EVENT_NAME=order/*").await;
    assert!(sub.starts_with("-FAIL:NOT_CONNECTED"), "{sub}");
    // The key maps to the client id, and every later command must name it.
    c.expect_prefix(
        "CONN;ACCESS_KEY=bk-1",
        "+PASS:{clientId=billing,clientHash=",
    )
    .await;
    let claimed = c.cmd("SUB;CLIENT_ID=audit;EVENT_NAME=order/*").await;
    assert!(claimed.starts_with("-FAIL:PERMISSION_DENIED"), "{claimed}");
    // A key given as its SHA-256 in the config works the same.
    login(&srv, "ak-2", "audit").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_publishes_subscribes_and_replays_within_its_patterns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_server_with(closed_config(dir.path())).await;
    let mut billing = login(&srv, "bk-1", "billing").await;
    let mut shop = login(&srv, "sk-3", "shop").await;
    let mut audit = login(&srv, "ak-2", "audit").await;

    // Subscribing: within the grants, and a pattern wider than them is
    // refused even though part of it is granted.
    billing.sub("billing", "order/*").await;
    billing.sub("billing", "billing/*").await;
    for pattern in ["*", "user/*", "order/created/x"] {
        let reply = billing
            .cmd(&format!("SUB;CLIENT_ID=billing;EVENT_NAME={pattern}"))
            .await;
        if pattern == "order/created/x" {
            assert_eq!(reply, "+PASS:SUBSCRIBED;EVENT_NAME=order/created/x");
        } else {
            assert_eq!(
                reply,
                "-FAIL:PERMISSION_DENIED;MESSAGE=Not authorized to subscribe to this event type",
                "SUB {pattern}"
            );
        }
    }
    // Publishing: shop may publish orders, not billing events; audit
    // publishes nothing. A refused publish stores nothing.
    let order = shop
        .publish_to("shop", "order/created", "{\"n\":1}", "*")
        .await
        .0;
    let live = billing.line().await;
    assert!(live.contains(&order), "billing follows orders: {live}");
    for (client, id, name) in [
        (&mut shop, "shop", "billing/invoice/sent"),
        (&mut audit, "audit", "order/created"),
    ] {
        let reply = client
            .cmd(&format!(
                "PUB;CLIENT_ID={id};EVENT_NAME={name};PAYLOAD={{}};DELIVERY_TO=*"
            ))
            .await;
        assert_eq!(
            reply,
            "-FAIL:PERMISSION_DENIED;MESSAGE=Not authorized to publish this event type"
        );
    }
    // billing follows its own events too: the reply and the record may
    // come in either order.
    billing
        .send(
            "PUB;CLIENT_ID=billing;EVENT_NAME=billing/invoice/sent;PAYLOAD={\"n\":2};DELIVERY_TO=*",
        )
        .await;
    let (first, second) = (billing.line().await, billing.line().await);
    let reply = [&first, &second]
        .into_iter()
        .find(|line| line.starts_with("+PASS:PUBLISHED"))
        .unwrap_or_else(|| panic!("no PUB reply in {first:?}, {second:?}"));
    let invoice = parse_published(reply).idem;

    // Replaying: billing may replay orders, not billing events, even
    // though it is subscribed to them; audit may replay both.
    let orders = billing
        .replay("billing", "order/*", "FROM_POSITION=earliest")
        .await;
    assert_eq!(orders.idems(), vec![order.clone()]);
    let denied = billing
        .cmd("REPLAY;CLIENT_ID=billing;EVENT_NAME=billing/*;FROM_POSITION=earliest")
        .await;
    assert_eq!(denied, REPLAY_DENIED);
    let single = billing
        .cmd(&format!("REPLAY;CLIENT_ID=billing;EVENT_IDEM={invoice}"))
        .await;
    assert_eq!(
        single, REPLAY_DENIED,
        "single-event replay of a billing event"
    );
    let single = billing
        .cmd(&format!("REPLAY;CLIENT_ID=billing;EVENT_IDEM={order}"))
        .await;
    assert!(single.starts_with("+REPLAY:{"), "{single}");
    audit.sub("audit", "*").await;
    let everything = audit.replay("audit", "*", "FROM_POSITION=earliest").await;
    assert_eq!(everything.idems(), vec![order, invoice]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_are_held_to_the_same_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_server_with(closed_config(dir.path())).await;
    let mut ws = common::http::WsClient::connect(srv.http_addr).await;
    for (line, expected) in [
        ("CONN;ACCESS_KEY=nope", "-FAIL:CLIENT_NOT_FOUND;"),
        ("CONN;ACCESS_KEY=sk-3", "+PASS:{clientId=shop,"),
        (
            "REPLAY;CLIENT_ID=shop;EVENT_NAME=order/*;FROM_POSITION=earliest",
            REPLAY_DENIED,
        ),
    ] {
        ws.send(line).await;
        let reply = ws.line().await;
        assert!(reply.starts_with(expected), "{line}: {reply}");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_takes_any_client_id_and_an_access_key_as_the_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_server(dir.path()).await;
    let mut c = srv.client().await;
    c.expect_prefix("CONN;ACCESS_KEY=alice", "+PASS:{clientId=alice,clientHash=")
        .await;
    c.expect_silence(Duration::from_millis(50)).await;
    let mut d = srv.client().await;
    d.conn("anyone").await;
    d.sub("anyone", "*").await;
    srv.stop().await;
}

/// The hex SHA-256 of `text`, as `sha256sum` prints it.
fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_a_narrowed_config_no_longer_grants_are_removed_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Open mode: audit follows everything, and shop follows orders.
    let srv = start_server(dir.path()).await;
    let mut audit = srv.client().await;
    audit.conn("audit").await;
    audit.sub("audit", "*").await;
    audit.sub("audit", "billing/*").await;
    srv.stop().await;

    // With keys, audit may only follow billing events.
    let mut config = closed_config(dir.path());
    config.clients[1].subscribe = strings(&["billing/*"]);
    let srv = start_server_with(config).await;
    let mut audit = login(&srv, "ak-2", "audit").await;
    let mut shop = login(&srv, "sk-3", "shop").await;
    let mut billing = login(&srv, "bk-1", "billing").await;
    shop.publish_to("shop", "order/created", "{}", "*").await;
    let invoice = billing
        .publish_to("billing", "billing/invoice/sent", "{}", "*")
        .await
        .0;
    // The order is not delivered: the `*` subscription is gone; the
    // billing one stays.
    let live = audit.line().await;
    assert!(live.contains(&invoice), "{live}");
    audit.expect_silence(Duration::from_millis(300)).await;
    let pause = audit.cmd("PAUSE;CLIENT_ID=audit;EVENT_NAME=*").await;
    assert!(pause.starts_with("-FAIL:NOT_SUBSCRIBED"), "{pause}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_unknown_keys_close_the_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start_server_with(closed_config(dir.path())).await;
    let mut guesser = srv.client().await;
    for guess in ["k1", "k2", "k3"] {
        let reply = guesser.cmd(&format!("CONN;ACCESS_KEY={guess}")).await;
        assert!(reply.starts_with("-FAIL:CLIENT_NOT_FOUND;"), "{reply}");
    }
    assert_eq!(guesser.read_raw(LINE_TIMEOUT).await, Read::Closed);
    let closed = common::http::scrape(srv.http_addr).await.value(
        "ensync_connections_closed_total",
        &[("reason", "failed_logins")],
    );
    assert_eq!(closed, 1.0);
    // The right key on a new connection is let in.
    login(&srv, "sk-3", "shop").await;
    srv.stop().await;
}
