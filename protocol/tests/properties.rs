//! Property tests: nothing a client sends makes the codec or parser panic,
//! and every command's canonical encoding parses back to the same command.

use bytes::BytesMut;
use ensync_protocol::{parse_command, EnsyncCodec, Frame};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

fn client_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.@+=/-][A-Za-z0-9_.@:+=/-]{0,23}"
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.-]{1,8}(/[a-zA-Z0-9_.-]{1,8}){0,3}"
}

fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        name(),
        name().prop_map(|n| format!("{n}/*")),
        Just("*".to_owned())
    ]
}

fn position() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("earliest".to_owned()),
        any::<u64>().prop_map(|n| n.to_string()),
        "evt_[a-z0-9]{1,24}",
        (2000i32..2100, 1u8..=12, 1u8..=28, 0u8..24)
            .prop_map(|(y, m, d, h)| format!("{y}-{m:02}-{d:02}T{h:02}:30:00.250Z")),
    ]
}

fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just("true".to_owned()),
        Just("null".to_owned()),
        "[a-z;=:\\[\\]{} ]{0,12}".prop_map(|s| serde_json::to_string(&s).expect("string encodes")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z;]{1,6}", inner), 0..4).prop_map(|v| {
                let members: Vec<String> = v
                    .into_iter()
                    .map(|(k, val)| {
                        format!("{}:{val}", serde_json::to_string(&k).expect("key encodes"))
                    })
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

fn payload() -> impl Strategy<Value = String> {
    use base64::Engine as _;
    prop_oneof![
        // Only objects and arrays are bracket-matched: a bare JSON string
        // runs to the next ';' like any other value (SPEC.md, "Grammar").
        json_text().prop_filter("a bare JSON string holds no ';'", |j| !(j.starts_with('"')
            && j.contains(';'))),
        prop::collection::vec(any::<u8>(), 1..48)
            .prop_map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
    ]
}

fn metadata() -> impl Strategy<Value = String> {
    prop::collection::vec(("[a-z;]{1,6}", json_text()), 0..4).prop_map(|v| {
        let members: Vec<String> = v
            .into_iter()
            .map(|(k, val)| format!("{}: {val}", serde_json::to_string(&k).expect("key encodes")))
            .collect();
        format!("{{{}}}", members.join(", "))
    })
}

/// Writes pairs in a shuffled order, with random key case and `=:`.
fn line(verb: &str, pairs: Vec<(&str, String)>, seed: u64) -> String {
    let mut pairs = pairs;
    let n = pairs.len();
    for i in (1..n).rev() {
        pairs.swap(
            i,
            (seed as usize).wrapping_mul(31).wrapping_add(i * 17) % (i + 1),
        );
    }
    let mut out = if seed & 1 == 0 {
        verb.to_owned()
    } else {
        verb.to_ascii_lowercase()
    };
    for (i, (key, value)) in pairs.into_iter().enumerate() {
        let key = if (seed >> (i + 1)) & 1 == 0 {
            key.to_owned()
        } else {
            key.to_ascii_lowercase()
        };
        let colon = if (seed >> (i + 9)) & 1 == 0 { "" } else { ":" };
        out.push_str(&format!(";{key}={colon}{value}"));
    }
    out
}

fn opt(key: &'static str, value: Option<String>) -> Vec<(&'static str, String)> {
    value.map(|v| (key, v)).into_iter().collect()
}

fn command_line() -> impl Strategy<Value = String> {
    let conn = (client_id(), any::<bool>(), any::<u64>()).prop_map(|(id, key, seed)| {
        line(
            "CONN",
            vec![(if key { "ACCESS_KEY" } else { "CLIENT_ID" }, id)],
            seed,
        )
    });
    let publish = (
        client_id(),
        name(),
        payload(),
        prop::collection::vec(prop_oneof![client_id(), Just("*".to_owned())], 1..4),
        prop::option::of(metadata()),
        any::<u64>(),
    )
        .prop_map(|(c, n, p, to, m, seed)| {
            let mut pairs = vec![
                ("CLIENT_ID", c),
                ("EVENT_NAME", n),
                ("PAYLOAD", p),
                ("DELIVERY_TO", to.join(",")),
            ];
            pairs.extend(opt("METADATA", m));
            line("PUB", pairs, seed)
        });
    let subs = (
        prop::sample::select(vec!["SUB", "UNSUB", "CONTINUE", "PAUSE"]),
        client_id(),
        pattern(),
        prop::option::of("[a-zA-Z0-9 ]{1,16}"),
        any::<u64>(),
    )
        .prop_map(|(verb, c, p, reason, seed)| {
            let mut pairs = vec![("CLIENT_ID", c), ("EVENT_NAME", p)];
            if verb == "PAUSE" {
                pairs.extend(opt("REASON", reason));
            }
            line(verb, pairs, seed)
        });
    let settle = (
        prop::sample::select(vec!["ACK", "DEFER", "DISCARD", "ROLLBACK"]),
        client_id(),
        "evt_[a-z0-9]{1,24}",
        any::<u32>(),
        name(),
        "[a-zA-Z0-9 ]{1,16}",
        1000u64..=86_400_000,
        any::<u64>(),
    )
        .prop_map(|(verb, c, id, block, n, reason, delay, seed)| {
            let mut pairs = vec![("CLIENT_ID", c), ("EVENT_IDEM", id)];
            match verb {
                "ACK" => pairs.extend([("BLOCK", block.to_string()), ("EVENT_NAME", n)]),
                "DEFER" => pairs.extend([("DELAY", delay.to_string()), ("REASON", reason)]),
                "DISCARD" => pairs.extend([("REASON", reason), ("EVENT_NAME", n)]),
                _ => pairs.push(("BLOCK", block.to_string())),
            }
            line(verb, pairs, seed)
        });
    let replay = (
        client_id(),
        pattern(),
        position(),
        prop::option::of(
            position().prop_filter("TO_POSITION is not earliest", |p| p != "earliest"),
        ),
        prop::option::of(1u32..=1_000_000),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        any::<u64>(),
    )
        .prop_map(|(c, p, from, to, limit, payloads, unacked, seed)| {
            let mut pairs = vec![("CLIENT_ID", c), ("EVENT_NAME", p), ("FROM_POSITION", from)];
            pairs.extend(opt("TO_POSITION", to));
            pairs.extend(opt("LIMIT", limit.map(|l| l.to_string())));
            pairs.extend(opt("INCLUDE_PAYLOADS", payloads.map(|b| b.to_string())));
            pairs.extend(opt("ONLY_UNACKED", unacked.map(|b| b.to_string())));
            line("REPLAY", pairs, seed)
        });
    let replay_event = (
        client_id(),
        "evt_[a-z0-9]{1,24}",
        prop::option::of(name()),
        any::<u64>(),
    )
        .prop_map(|(c, id, n, seed)| {
            let mut pairs = vec![("CLIENT_ID", c), ("EVENT_IDEM", id)];
            pairs.extend(opt("EVENT_NAME", n));
            line("REPLAY", pairs, seed)
        });
    prop_oneof![
        conn,
        publish,
        subs,
        settle,
        replay,
        replay_event,
        Just("PING".to_owned()),
        Just("pong".to_owned())
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_command_round_trips_through_its_encoding(line in command_line()) {
        let cmd = parse_command(&line).map_err(|e| TestCaseError::fail(format!("{line:?}: {e}")))?;
        let canonical = cmd.to_string();
        let again = parse_command(&canonical).map_err(|e| TestCaseError::fail(format!("{canonical:?}: {e}")))?;
        prop_assert_eq!(&again, &cmd);
        prop_assert_eq!(again.to_string(), canonical);
    }

    #[test]
    fn parser_never_panics_on_protocol_like_text(line in "[A-Za-z;=:{}\\[\\]\"\\\\0-9_*/,. -]{0,300}") {
        if let Err(e) = parse_command(&line) {
            let reply = e.to_reply(100_000).to_string();
            prop_assert!(reply.starts_with("-FAIL:"));
            prop_assert!(!reply.contains('\n'));
        }
    }

    #[test]
    fn codec_and_parser_never_panic_on_arbitrary_bytes(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..8)) {
        let mut codec = EnsyncCodec::new(64);
        let mut buf = BytesMut::new();
        for chunk in chunks {
            buf.extend_from_slice(&chunk);
            while let Some(frame) = codec.decode(&mut buf).map_err(|e| TestCaseError::fail(e.to_string()))? {
                match frame {
                    Frame::Line(line) => {
                        prop_assert!(line.len() <= 64);
                        let _ = parse_command(&line);
                    }
                    Frame::TooLong { max } => prop_assert_eq!(max, 64),
                    Frame::InvalidEncoding => {}
                }
            }
            // The decoder never holds more than one line's worth.
            prop_assert!(buf.len() <= 66);
        }
        let _ = codec.decode_eof(&mut buf);
    }
}
