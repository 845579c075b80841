//! Sessions over TCP: CONN and the session checks, command syntax,
//! payloads, framing, live delivery, and the verbs not implemented yet.

mod common;

use std::time::Duration;

use common::*;
use ensync_server::config::{Config, Limits};

const NAME: &str = "user/profile/updated";
const SILENCE: Duration = Duration::from_millis(300);

// --------------------------------------------------------------------- CONN

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conn_with_client_id_answers_connected() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    c.expect(
        "CONN;CLIENT_ID=client-123abc",
        "+PASS:CONNECTED;CLIENT_ID=client-123abc",
    )
    .await;
    // Connected as that id: commands carrying it work.
    c.sub("client-123abc", NAME).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conn_with_access_key_answers_client_id_and_stable_hash() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    let got = c.cmd("CONN;ACCESS_KEY=key-1").await;
    let hash = got
        .strip_prefix("+PASS:{clientId=key-1,clientHash=")
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or_else(|| panic!("unexpected CONN reply {got:?}"));
    assert!(
        hash.len() == 16
            && hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "clientHash is not 16 lowercase hex digits: {got:?}"
    );
    // The connection is client key-1.
    c.sub("key-1", NAME).await;
    c.expect_prefix(
        &format!("SUB;CLIENT_ID=other;EVENT_NAME={NAME}"),
        "-FAIL:PERMISSION_DENIED;MESSAGE=",
    )
    .await;

    // Another connection as the same key gets the same hash.
    let mut d = srv.client().await;
    d.expect("CONN;ACCESS_KEY=key-1", &got).await;
    // ...and the =: form of the SDK.
    let mut e = srv.client().await;
    e.expect("CONN;ACCESS_KEY=:key-1", &got).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conn_rules_both_keys_missing_keys_repeat_and_other_id() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    c.expect_prefix(
        "CONN;CLIENT_ID=a;ACCESS_KEY=a",
        "-FAIL:INVALID_PARAMETERS;MESSAGE=",
    )
    .await;
    c.expect_prefix("CONN", "-FAIL:MISSING_PARAMETERS;MESSAGE=")
        .await;
    // Still not connected after failed CONNs.
    c.expect_prefix(
        &format!("SUB;CLIENT_ID=a;EVENT_NAME={NAME}"),
        "-FAIL:NOT_CONNECTED;MESSAGE=",
    )
    .await;
    c.conn("a").await;
    c.conn("a").await; // again as the same id: same PASS
    c.expect_prefix("CONN;CLIENT_ID=b", "-FAIL:ALREADY_CONNECTED;MESSAGE=")
        .await;
    // Still client a.
    c.sub("a", NAME).await;
    c.expect_prefix(
        &format!("SUB;CLIENT_ID=b;EVENT_NAME={NAME}"),
        "-FAIL:PERMISSION_DENIED;MESSAGE=",
    )
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_before_conn_are_not_connected() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    for line in [
        format!("PUB;CLIENT_ID=a;EVENT_NAME={NAME};PAYLOAD={{}};DELIVERY_TO=*"),
        format!("SUB;CLIENT_ID=a;EVENT_NAME={NAME}"),
        format!("REPLAY;CLIENT_ID=a;EVENT_NAME={NAME};FROM_POSITION=earliest"),
        format!("REPLAY;CLIENT_ID=a;EVENT_IDEM=evt_ffffffffffffffffffffffff;EVENT_NAME={NAME}"),
    ] {
        c.expect_prefix(&line, "-FAIL:NOT_CONNECTED;MESSAGE=").await;
    }
    // PING needs no session.
    c.ping().await;
    c.conn("a").await;
    c.sub("a", NAME).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_other_than_the_connection_is_permission_denied() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    c.conn("alice").await;
    for line in [
        format!("PUB;CLIENT_ID=bob;EVENT_NAME={NAME};PAYLOAD={{}};DELIVERY_TO=*"),
        format!("SUB;CLIENT_ID=bob;EVENT_NAME={NAME}"),
        format!("REPLAY;CLIENT_ID=bob;EVENT_NAME={NAME};FROM_POSITION=earliest"),
        format!("REPLAY;CLIENT_ID=bob;EVENT_IDEM=evt_ffffffffffffffffffffffff;EVENT_NAME={NAME}"),
        // Ids are case-sensitive.
        format!("SUB;CLIENT_ID=ALICE;EVENT_NAME={NAME}"),
    ] {
        c.expect_prefix(&line, "-FAIL:PERMISSION_DENIED;MESSAGE=")
            .await;
    }
    // Nothing was published or subscribed as bob.
    let mut b = srv.client().await;
    b.conn("bob").await;
    b.expect_prefix(
        &format!("REPLAY;CLIENT_ID=bob;EVENT_NAME={NAME};FROM_POSITION=earliest"),
        "-FAIL:NOT_SUBSCRIBED;MESSAGE=",
    )
    .await;
    b.assert_nothing_stored("bob", NAME, "a denied PUB must not publish")
        .await;
    srv.stop().await;
}

// ------------------------------------------------------------------ syntax

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_verb_is_unknown_command_even_before_conn() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    c.expect_prefix("FOO;CLIENT_ID=a", "-FAIL:UNKNOWN_COMMAND;MESSAGE=")
        .await;
    c.expect_prefix("HELLO", "-FAIL:UNKNOWN_COMMAND;MESSAGE=")
        .await;
    c.conn("a").await;
    c.expect_prefix("PUBLISH;CLIENT_ID=a", "-FAIL:UNKNOWN_COMMAND;MESSAGE=")
        .await;
    c.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbs_and_keys_are_case_insensitive_and_accept_equals_colon() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    c.expect("conn;client_id=:Alice", "+PASS:CONNECTED;CLIENT_ID=Alice")
        .await;
    c.expect("ping", "+PASS:PONG").await;
    let reply = c
        .cmd("pub;Client_Id=:Alice;event_name=:user/a/x;payload=:{\"k\":1};Delivery_To=:*")
        .await;
    let e = parse_published(&reply);
    let reply = c
        .cmd("Pub;CLIENT_ID=Alice;Event_Name=user/a/x;PAYLOAD=:\"s\";DELIVERY_TO=*;metadata=:{\"m\":true}")
        .await;
    let e2 = parse_published(&reply);
    c.expect(
        "Sub;Client_Id=:Alice;Event_Name=:user/a/x",
        "+PASS:SUBSCRIBED;EVENT_NAME=user/a/x",
    )
    .await;
    let rep = c
        .replay_line(
            "replay;client_id=:Alice;event_name=:user/a/x;from_position=:earliest;limit=:5;include_payloads=:FALSE",
            "user/a/x",
            false,
        )
        .await;
    assert_eq!(
        rep.header,
        "+PASS:REPLAY_STARTED;EVENT_NAME=user/a/x;COUNT=2"
    );
    assert_eq!(rep.idems(), vec![e.idem, e2.idem]);
    assert!(rep.records[0].get("payload").is_none());
    assert_eq!(rep.records[1]["metadata"]["m"], true);
    assert_eq!(rep.records[0]["sender"], "Alice");
    c.ping().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_lines_are_invalid_parameters_naming_the_problem() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    c.conn("a").await;
    let dup = c
        .expect_prefix(
            "PUB;CLIENT_ID=a;CLIENT_ID=a;EVENT_NAME=a/b/c;PAYLOAD={};DELIVERY_TO=*",
            "-FAIL:INVALID_PARAMETERS;MESSAGE=",
        )
        .await;
    assert!(dup.contains("CLIENT_ID"), "names the duplicate key: {dup}");
    let unk = c
        .expect_prefix(
            "SUB;CLIENT_ID=a;EVENT_NAME=a/b/c;COLOR=red",
            "-FAIL:INVALID_PARAMETERS;MESSAGE=",
        )
        .await;
    assert!(
        unk.to_uppercase().contains("COLOR"),
        "names the unknown key: {unk}"
    );
    for line in [
        "SUB;CLIENT_ID=a;EVENT_NAME=",
        "SUB;CLIENT_ID=a;EVENT_NAME=a//b",
        "PUB;CLIENT_ID=a;EVENT_NAME=a/*;PAYLOAD={};DELIVERY_TO=*",
        "PUB;CLIENT_ID=a;EVENT_NAME=a/b/c;PAYLOAD={\"a\":1}x;DELIVERY_TO=*",
        "PUB;CLIENT_ID=a;EVENT_NAME=a/b/c;PAYLOAD={};DELIVERY_TO=*;METADATA=[1,2]",
        "PUB;CLIENT_ID=a;EVENT_NAME=a/b/c;PAYLOAD={};DELIVERY_TO=*;METADATA={\"REPLAYED\":true}",
        "PUB;CLIENT_ID=a;EVENT_NAME=a/b/c;PAYLOAD={};DELIVERY_TO=*;METADATA={\"$internal\":{}}",
        "SUB;CLIENT_ID",
    ] {
        c.expect_prefix(line, "-FAIL:INVALID_PARAMETERS;MESSAGE=")
            .await;
    }
    let missing = c
        .expect_prefix(
            "PUB;CLIENT_ID=a;EVENT_NAME=a/b/c",
            "-FAIL:MISSING_PARAMETERS;MESSAGE=",
        )
        .await;
    assert!(
        missing.contains("PAYLOAD") && missing.contains("DELIVERY_TO"),
        "names the missing keys: {missing}"
    );
    // A trailing ';' is fine.
    c.expect(
        "SUB;CLIENT_ID=a;EVENT_NAME=a/b/c;",
        "+PASS:SUBSCRIBED;EVENT_NAME=a/b/c",
    )
    .await;
    // SUB again on an existing subscription: same PASS.
    c.sub("a", "a/b/c").await;
    c.ping().await;
    srv.stop().await;
}

// ---------------------------------------------------------------- payloads

/// Publishes `line` as `pub`, then replays it as `reader`; returns the
/// record's payload text as it came on the wire.
async fn round_trip(srv: &TestServer, pub_line: &str) -> (String, serde_json::Value) {
    let mut p = srv.client().await;
    p.conn("pub").await;
    let e = parse_published(&p.cmd(pub_line).await);
    let mut r = srv.client().await;
    r.conn("reader").await;
    r.sub("reader", NAME).await;
    let rep = r
        .replay("reader", NAME, &format!("FROM_POSITION={}", e.idem))
        .await;
    assert!(rep.count >= 1);
    let rec = rep.records[0].clone();
    assert_eq!(rec["idem"], e.idem.as_str());
    (rep.lines[0].clone(), rec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_payload_may_contain_semicolons_inside_strings() {
    let (_dir, srv) = temp_server().await;
    let payload = r#"{"text":"a;b;c","q":"say \"hi;\" ]}","arr":[";",{"x":"]};"}],"n":1}"#;
    let meta = r#"{"note":"x;y","k":"}"}"#;
    let (line, rec) = round_trip(
        &srv,
        &format!(
            "PUB;CLIENT_ID=pub;EVENT_NAME={NAME};PAYLOAD={payload};DELIVERY_TO=*;METADATA={meta}"
        ),
    )
    .await;
    assert!(
        line.contains(&format!("\"payload\":{payload},")),
        "payload kept verbatim: {line}"
    );
    assert_eq!(rec["payload"]["text"], "a;b;c");
    assert_eq!(rec["payload"]["q"], "say \"hi;\" ]}");
    assert_eq!(rec["metadata"]["note"], "x;y");
    assert_eq!(rec["metadata"]["k"], "}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_payload_is_stored_and_returned_as_a_json_string() {
    let (_dir, srv) = temp_server().await;
    let mut p = srv.client().await;
    p.conn("pub").await;
    let cases = [
        "aGVsbG8gd29ybGQ=",
        "SGk+Lz8",
        "SGk+Lz8=",
        "AAECAwQFBgcICQ==",
    ];
    let mut ids = Vec::new();
    for b64 in cases {
        let (idem, _) = p.publish("pub", NAME, b64).await;
        ids.push(idem);
    }
    let mut r = srv.client().await;
    r.conn("reader").await;
    r.sub("reader", NAME).await;
    let rep = r.replay("reader", NAME, "FROM_POSITION=earliest").await;
    assert_eq!(rep.idems(), ids);
    for (b64, (rec, line)) in cases.iter().zip(rep.records.iter().zip(&rep.lines)) {
        assert_eq!(rec["payload"], *b64, "{line}");
        assert!(line.contains(&format!("\"payload\":\"{b64}\",")), "{line}");
    }
    // The single-event form returns it the same way.
    let got = r
        .cmd(&format!(
            "REPLAY;CLIENT_ID=reader;EVENT_IDEM={};EVENT_NAME={NAME}",
            ids[0]
        ))
        .await;
    assert_eq!(parse_record(&got)["payload"], cases[0], "{got}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_neither_json_nor_base64_is_invalid_payload() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    c.conn("pub").await;
    for payload in ["not json!", "hello world", "%%%", "abc$", "'single'"] {
        c.expect_prefix(
            &format!("PUB;CLIENT_ID=pub;EVENT_NAME={NAME};PAYLOAD={payload};DELIVERY_TO=*"),
            "-FAIL:INVALID_PAYLOAD;MESSAGE=",
        )
        .await;
    }
    c.assert_nothing_stored("pub", NAME, "a rejected PUB must not publish")
        .await;
    srv.stop().await;
}

// ----------------------------------------------------------------- framing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_too_long_is_answered_at_once_and_the_connection_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server_with(Config {
        data_dir: dir.path().to_path_buf(),
        limits: Limits {
            max_line_len: 1024,
            ..Limits::default()
        },
        ..Config::default()
    })
    .await;
    let mut c = srv.client().await;
    c.conn("a").await;
    // Under the limit: fine.
    let pad = "x".repeat(800);
    let ok = c
        .cmd(&format!(
            "PUB;CLIENT_ID=a;EVENT_NAME={NAME};PAYLOAD={{\"p\":\"{pad}\"}};DELIVERY_TO=*"
        ))
        .await;
    parse_published(&ok);

    // Over it, and no LF yet: the reply comes before the line ends.
    let long = format!(
        "PUB;CLIENT_ID=a;EVENT_NAME={NAME};PAYLOAD={{\"p\":\"{}",
        "y".repeat(3000)
    );
    c.send_raw(long.as_bytes()).await;
    let got = c.line().await;
    assert!(got.starts_with("-FAIL:LINE_TOO_LONG;MESSAGE="), "{got}");
    assert_fail_shape(&got);
    // The rest of that line is discarded, not parsed as a command.
    c.send_raw(format!("{}\"}};DELIVERY_TO=*\nPING\n", "z".repeat(2000)).as_bytes())
        .await;
    assert_eq!(c.line().await, "+PASS:PONG");

    // In one write, followed by a good command.
    let mut buf = format!("BOGUS;{}\n", "q".repeat(5000)).into_bytes();
    buf.extend_from_slice(b"PING\n");
    c.send_raw(&buf).await;
    let got = c.line().await;
    assert!(got.starts_with("-FAIL:LINE_TOO_LONG;MESSAGE="), "{got}");
    assert_eq!(c.line().await, "+PASS:PONG");

    // Still a working session.
    c.sub("a", NAME).await;
    let rep = c.replay("a", NAME, "FROM_POSITION=earliest").await;
    assert_eq!(rep.count, 1, "only the short PUB was published");
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_invalid_encoding_and_the_connection_stays_usable() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    // Before CONN too.
    c.send_raw(b"CONN;CLIENT_ID=\xff\xfe\n").await;
    let got = c.line().await;
    assert!(got.starts_with("-FAIL:INVALID_ENCODING;MESSAGE="), "{got}");
    assert_fail_shape(&got);
    c.conn("a").await;
    for bad in [
        &b"PUB;CLIENT_ID=a;EVENT_NAME=a/b/c;PAYLOAD=\"\xc3\x28\";DELIVERY_TO=*\n"[..],
        &b"\x80\n"[..],
        &b"PING\xed\xa0\x80\n"[..], // an encoded surrogate
    ] {
        c.send_raw(bad).await;
        let got = c.line().await;
        assert!(got.starts_with("-FAIL:INVALID_ENCODING;MESSAGE="), "{got}");
    }
    c.ping().await;
    // Valid multi-byte UTF-8 is fine.
    let reply = c
        .cmd("PUB;CLIENT_ID=a;EVENT_NAME=a/b/c;PAYLOAD={\"s\":\"héllo ✓ 日本\"};DELIVERY_TO=*")
        .await;
    parse_published(&reply);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crlf_line_ends_and_empty_lines_are_accepted() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    let got = c
        .pipeline_raw(b"\r\n\n\nCONN;CLIENT_ID=crlf\r\n\r\n\n\nPING\r\n", 2)
        .await;
    assert_eq!(got, vec!["+PASS:CONNECTED;CLIENT_ID=crlf", "+PASS:PONG"]);
    c.expect_silence(SILENCE).await;

    // A CR must not end up in the last value: the event is addressed to
    // "reader", not "reader\r".
    c.send_raw(
        format!("PUB;CLIENT_ID=crlf;EVENT_NAME={NAME};PAYLOAD={{\"a\":1}};DELIVERY_TO=reader\r\n")
            .as_bytes(),
    )
    .await;
    let e = parse_published(&c.line().await);
    c.send_raw(format!("SUB;CLIENT_ID=crlf;EVENT_NAME={NAME}\r\n").as_bytes())
        .await;
    assert_eq!(
        c.line().await,
        format!("+PASS:SUBSCRIBED;EVENT_NAME={NAME}")
    );

    let mut r = srv.client().await;
    r.conn("reader").await;
    r.sub("reader", NAME).await;
    let rep = r
        .replay_line(
            &format!("REPLAY;CLIENT_ID=reader;EVENT_NAME={NAME};FROM_POSITION=earliest\r"),
            NAME,
            true,
        )
        .await;
    assert_eq!(rep.idems(), vec![e.idem]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pong_gets_no_reply() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    c.send("PONG").await;
    c.expect_silence(SILENCE).await;
    c.conn("a").await;
    let got = c.pipeline_raw(b"PONG\nPONG\nPING\nPONG\n", 1).await;
    assert_eq!(got, vec!["+PASS:PONG"]);
    c.expect_silence(SILENCE).await;
    srv.stop().await;
}

// ----------------------------------------------------------- live delivery

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_receives_live_records_without_replay_marks() {
    let (_dir, srv) = temp_server().await;
    let mut bob = srv.client().await;
    bob.conn("bob").await;
    bob.sub("bob", NAME).await;
    let mut alice = srv.client().await;
    alice.conn("alice").await;

    alice.publish("alice", "user/profile/deleted", "{}").await; // other name
    alice.publish_to("alice", NAME, "{}", "carol").await; // not addressed to bob
    let meta = r#"{"source":"web","n":[1,2]}"#;
    let payload = r#"{"id":7,"email":"a;b@example.com"}"#;
    let e = parse_published(
        &alice
            .cmd(&format!("PUB;CLIENT_ID=alice;EVENT_NAME={NAME};PAYLOAD={payload};DELIVERY_TO=*;METADATA={meta}"))
            .await,
    );
    let (e2, t2) = alice
        .publish_to("alice", NAME, "\"aGk=\"", "carol,bob")
        .await;
    let (e3, t3) = alice.publish_to("alice", NAME, "aGk=", "bob").await;

    let got = bob.line().await;
    let rec = parse_record(&got);
    assert_eq!(
        got,
        record_line(
            "+RECORD:",
            &e.idem,
            block_of(&rec),
            NAME,
            e.timestamp,
            "alice",
            Some(payload),
            meta
        ),
        "the first record bob gets is the first event for him, unmarked"
    );
    let got2 = bob.line().await;
    let rec2 = parse_record(&got2);
    assert_eq!(
        got2,
        record_line(
            "+RECORD:",
            &e2,
            block_of(&rec2),
            NAME,
            t2,
            "alice",
            Some("\"aGk=\""),
            "{}"
        )
    );
    let got3 = bob.line().await;
    let rec3 = parse_record(&got3);
    assert_eq!(
        got3,
        record_line(
            "+RECORD:",
            &e3,
            block_of(&rec3),
            NAME,
            t3,
            "alice",
            Some("\"aGk=\""),
            "{}"
        )
    );
    assert!(block_of(&rec) < block_of(&rec2) && block_of(&rec2) < block_of(&rec3));
    bob.expect_silence(SILENCE).await;
    // The publisher is not subscribed: it gets nothing.
    alice.expect_silence(Duration::from_millis(50)).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscription_receives_every_name_below_the_prefix() {
    let (_dir, srv) = temp_server().await;
    let mut bob = srv.client().await;
    bob.conn("bob").await;
    bob.sub("bob", "user/*").await;
    let mut all = srv.client().await;
    all.conn("all").await;
    all.sub("all", "*").await;

    let mut alice = srv.client().await;
    alice.conn("alice").await;
    let (a, _) = alice.publish("alice", "user/a/x", "{}").await;
    let (o, _) = alice.publish("alice", "order/x/y", "{}").await;
    let (u, _) = alice.publish("alice", "user", "{}").await;
    let (d, _) = alice.publish("alice", "user/b/c/d", "{}").await;

    let mut got = Vec::new();
    for _ in 0..2 {
        let rec = parse_record(&bob.line().await);
        assert!(!is_replayed(&rec));
        got.push(rec["idem"].as_str().unwrap().to_string());
    }
    assert_eq!(got, vec![a.clone(), d.clone()]);
    bob.expect_silence(SILENCE).await;

    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(
            parse_record(&all.line().await)["idem"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(got, vec![a, o, u, d]);
    all.expect_silence(Duration::from_millis(50)).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_resumes_after_reconnect_without_sub() {
    let (_dir, srv) = temp_server().await;
    let mut bob = srv.client().await;
    bob.conn("bob").await;
    bob.sub("bob", NAME).await;
    drop(bob);

    let mut bob = srv.client().await;
    bob.conn("bob").await; // no SUB
    let mut alice = srv.client().await;
    alice.conn("alice").await;
    let (e, ts) = alice.publish("alice", NAME, "{\"again\":true}").await;
    let got = bob.line().await;
    let rec = parse_record(&got);
    assert_eq!(
        got,
        record_line(
            "+RECORD:",
            &e,
            block_of(&rec),
            NAME,
            ts,
            "alice",
            Some("{\"again\":true}"),
            "{}"
        )
    );
    bob.expect_silence(SILENCE).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_resumes_after_server_restart_without_sub() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_server(dir.path()).await;
    let mut bob = srv.client().await;
    bob.conn("bob").await;
    bob.sub("bob", "user/*").await;
    drop(bob);
    srv.stop().await;

    let srv = start_server(dir.path()).await;
    let mut bob = srv.client().await;
    bob.conn("bob").await;
    let mut alice = srv.client().await;
    alice.conn("alice").await;
    let (e, _) = alice.publish("alice", "user/x/y", "{}").await;
    let rec = parse_record(&bob.line().await);
    assert_eq!(rec["idem"], e.as_str());
    assert!(!is_replayed(&rec));
    srv.stop().await;
}

// ------------------------------------------------------ settling verbs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_verbs_parse_fully_and_name_the_unknown_event() {
    let (_dir, srv) = temp_server().await;
    let mut c = srv.client().await;
    c.conn("a").await;
    c.sub("a", NAME).await;
    // An id of another store: never in this client's processing queue.
    let id = "evt_0123456789abcdef01234567";
    let not_queued = format!(
        "-FAIL:NOT_FOUND;MESSAGE={id} is not in the processing queue of a (never delivered to it, or already settled)"
    );
    for line in [
        format!("ACK;CLIENT_ID=a;EVENT_IDEM={id};EVENT_NAME={NAME}"),
        format!("DEFER;CLIENT_ID=a;EVENT_IDEM={id};DELAY=1000;EVENT_NAME={NAME};REASON=later"),
        format!("DEFER;CLIENT_ID=a;EVENT_IDEM={id};DELAY_MS=1000"),
        format!("DISCARD;CLIENT_ID=a;EVENT_IDEM={id};REASON=bad"),
        format!("ROLLBACK;CLIENT_ID=a;EVENT_IDEM={id}"),
        format!("ack;client_id=:a;event_idem=:{id}"),
    ] {
        c.expect(&line, &not_queued).await;
    }
    // Parsed fully: missing keys and session checks come first.
    c.expect_prefix(
        &format!("DEFER;CLIENT_ID=a;EVENT_IDEM={id}"),
        "-FAIL:MISSING_PARAMETERS;MESSAGE=",
    )
    .await;
    // DISCARD without REASON: the public pages' MISSING_REASON, never
    // NOT_IMPLEMENTED.
    c.expect(
        &format!("DISCARD;CLIENT_ID=a;EVENT_IDEM={id}"),
        "-FAIL:MISSING_REASON;MESSAGE=DISCARD needs a REASON saying why the event is discarded",
    )
    .await;
    c.expect_prefix("ACK;CLIENT_ID=a", "-FAIL:MISSING_PARAMETERS;MESSAGE=")
        .await;
    c.expect_prefix(
        &format!("ACK;CLIENT_ID=a;EVENT_IDEM={id};COLOR=red"),
        "-FAIL:INVALID_PARAMETERS;MESSAGE=",
    )
    .await;
    c.expect_prefix(
        &format!("ACK;CLIENT_ID=b;EVENT_IDEM={id}"),
        "-FAIL:PERMISSION_DENIED;MESSAGE=",
    )
    .await;
    for only_unacked in ["false", "true"] {
        let rep = c
            .replay(
                "a",
                NAME,
                &format!("FROM_POSITION=earliest;ONLY_UNACKED={only_unacked}"),
            )
            .await;
        assert_eq!(rep.count, 0);
    }
    c.ping().await;
    srv.stop().await;
}
