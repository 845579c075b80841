//! Event records: the JSON body of `+RECORD:` and `+REPLAY:` lines.
//!
//! A record is encoded once, when its event is published, into a *stored
//! form*: a short header and the record JSON cut open before the end of its
//! metadata object. Writing a record then costs a few copies: the payload
//! can be left out (`INCLUDE_PAYLOADS=false`) by skipping one span, and the
//! replay marks are appended to the metadata before it is closed. Nothing
//! is re-serialised on the read path.
//!
//! Stored form: `payload_start: u32 LE`, `payload_end: u32 LE`,
//! `has_members: u8`, then `{"idem":..,"block":..,"name":..,"loggedAt":..,
//! "sender":..,"payload":<P>,"metadata":{<members>`. The payload span
//! covers `,"payload":<P>` so that removing it leaves valid JSON.

use bytes::{BufMut, BytesMut};

use crate::field::{Metadata, Payload};

const HEADER_LEN: usize = 9;

/// Prefix of a delivered record line.
pub const RECORD_PREFIX: &[u8] = b"+RECORD:";

/// What a record says about one event.
#[derive(Debug, Clone, Copy)]
pub struct RecordFields<'a> {
    /// The event id.
    pub idem: &'a str,
    /// The event's sequence number in the log.
    pub block: u64,
    /// The event name.
    pub name: &'a str,
    /// Milliseconds since the epoch when the event was logged.
    pub logged_at: u64,
    /// The publishing client.
    pub sender: &'a str,
    /// The payload as published.
    pub payload: &'a Payload,
    /// The metadata as published.
    pub metadata: Option<&'a Metadata>,
}

/// How a stored record is written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    /// Whether `payload` is written.
    pub include_payload: bool,
    /// Replay marks, for replayed records.
    pub replay: Option<ReplayInfo>,
}

impl Marks {
    /// A live delivery: payload, no replay marks.
    pub const LIVE: Marks = Marks {
        include_payload: true,
        replay: None,
    };
}

/// The `replay_info` a replayed record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayInfo {
    /// Milliseconds since the epoch when the replay was asked for.
    pub replay_timestamp: u64,
    /// Whether the receiving client acknowledged this event.
    pub was_acknowledged: bool,
}

/// A stored record that failed its header checks (a damaged store).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored record is damaged: {0}")]
pub struct RecordError(&'static str);

fn put_json_str(dst: &mut Vec<u8>, s: &str) {
    // NOTE: names, ids and client ids exclude '"', '\\' and control
    // characters by construction, so they need no escaping.
    debug_assert!(!s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20));
    dst.push(b'"');
    dst.extend_from_slice(s.as_bytes());
    dst.push(b'"');
}

/// Encodes an event into its stored form.
pub fn encode_record(fields: &RecordFields<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_record_into(fields, &mut out);
    out
}

/// [`encode_record`] appended to `out`, after what it holds.
pub fn encode_record_into(fields: &RecordFields<'_>, out: &mut Vec<u8>) {
    let payload = fields.payload.as_str();
    let members = fields.metadata.map_or("", Metadata::members);
    out.reserve(HEADER_LEN + 128 + payload.len() + members.len());
    let base = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let body = base + HEADER_LEN;
    out.extend_from_slice(b"{\"idem\":");
    put_json_str(out, fields.idem);
    out.extend_from_slice(b",\"block\":\"");
    out.extend_from_slice(itoa::Buffer::new().format(fields.block).as_bytes());
    out.extend_from_slice(b"\",\"name\":");
    put_json_str(out, fields.name);
    out.extend_from_slice(b",\"loggedAt\":");
    out.extend_from_slice(itoa::Buffer::new().format(fields.logged_at).as_bytes());
    out.extend_from_slice(b",\"sender\":");
    put_json_str(out, fields.sender);
    let payload_start = out.len() - body;
    out.extend_from_slice(b",\"payload\":");
    match fields.payload {
        Payload::Json(text) => out.extend_from_slice(text.as_bytes()),
        Payload::Base64(text) => put_json_str(out, text),
    }
    let payload_end = out.len() - body;
    out.extend_from_slice(b",\"metadata\":{");
    out.extend_from_slice(members.as_bytes());
    let start = u32::try_from(payload_start).expect("record head is short");
    // Payloads are bounded by the line length limit, far below 4 GiB.
    let end = u32::try_from(payload_end).unwrap_or(u32::MAX);
    out[base..base + 4].copy_from_slice(&start.to_le_bytes());
    out[base + 4..base + 8].copy_from_slice(&end.to_le_bytes());
    out[base + 8] = u8::from(!members.is_empty());
}

/// A stored record, checked and ready to be written.
#[derive(Debug, Clone, Copy)]
pub struct StoredRecord<'a> {
    body: &'a [u8],
    payload_start: usize,
    payload_end: usize,
    has_members: bool,
}

impl<'a> StoredRecord<'a> {
    /// Checks the header of a stored record.
    ///
    /// # Errors
    /// When the header does not describe the bytes that follow it.
    #[inline]
    pub fn new(stored: &'a [u8]) -> Result<Self, RecordError> {
        if stored.len() < HEADER_LEN {
            return Err(RecordError("shorter than its header"));
        }
        let word = |i: usize| {
            let mut b = [0; 4];
            b.copy_from_slice(&stored[i..i + 4]);
            u32::from_le_bytes(b) as usize
        };
        let (payload_start, payload_end) = (word(0), word(4));
        let body = &stored[HEADER_LEN..];
        if payload_start > payload_end || payload_end > body.len() {
            return Err(RecordError("payload span out of bounds"));
        }
        Ok(Self {
            body,
            payload_start,
            payload_end,
            has_members: stored[8] != 0,
        })
    }

    /// Appends the record JSON, as `marks` asks, to `dst`.
    pub fn write(&self, dst: &mut BytesMut, marks: &Marks) {
        self.write_body(dst, marks.include_payload);
        if let Some(info) = marks.replay {
            if self.has_members {
                dst.put_u8(b',');
            }
            put_replay_marks(dst, info);
        }
        dst.put_slice(b"}}");
    }

    /// Appends a whole `+RECORD:` line, newline included, to `dst`.
    pub fn write_line(&self, dst: &mut BytesMut, marks: &Marks) {
        dst.put_slice(RECORD_PREFIX);
        self.write(dst, marks);
        dst.put_u8(b'\n');
    }

    /// Appends a whole `+RECORD:` line with marks rendered beforehand: the
    /// same bytes as [`StoredRecord::write_line`], for many records at the
    /// cost of a few copies each.
    #[inline]
    pub fn write_rendered_line(&self, dst: &mut BytesMut, marks: &RenderedMarks) {
        dst.put_slice(RECORD_PREFIX);
        self.write_body(dst, marks.include_payload);
        dst.put_slice(if self.has_members {
            &marks.after_members
        } else {
            &marks.after_members[marks.comma..]
        });
    }

    fn write_body(&self, dst: &mut BytesMut, include_payload: bool) {
        if include_payload {
            dst.put_slice(self.body);
        } else {
            dst.put_slice(&self.body[..self.payload_start]);
            dst.put_slice(&self.body[self.payload_end..]);
        }
    }
}

fn put_replay_marks(dst: &mut impl BufMut, info: ReplayInfo) {
    dst.put_slice(b"\"REPLAYED\":true,\"$internal\":{\"replay_info\":{\"isReplayed\":true,\"replayTimestamp\":");
    dst.put_slice(itoa::Buffer::new().format(info.replay_timestamp).as_bytes());
    dst.put_slice(if info.was_acknowledged {
        b",\"wasAcknowledged\":true}}"
    } else {
        b",\"wasAcknowledged\":false}}"
    });
}

/// [`Marks`] rendered once: what follows a record's metadata members, up
/// to and including the line's LF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedMarks {
    include_payload: bool,
    /// The tail for a record whose metadata has members (it starts with the
    /// comma that separates the marks from them).
    after_members: Vec<u8>,
    /// Where the tail of a record without members starts in `after_members`.
    comma: usize,
}

impl Marks {
    /// Renders the marks for [`StoredRecord::write_rendered_line`].
    pub fn render(&self) -> RenderedMarks {
        let mut tail = Vec::with_capacity(128);
        let mut comma = 0;
        if let Some(info) = self.replay {
            tail.push(b',');
            comma = 1;
            put_replay_marks(&mut tail, info);
        }
        tail.extend_from_slice(b"}}\n");
        RenderedMarks {
            include_payload: self.include_payload,
            after_members: tail,
            comma,
        }
    }
}

#[cfg(test)]
mod encode_record {
    use super::*;

    fn sample(metadata: Option<&str>) -> Vec<u8> {
        let payload: Payload = r#"{"id":"1"}"#.parse().expect("json");
        let metadata: Option<Metadata> = metadata.map(|m| m.parse().expect("object"));
        encode_record(&RecordFields {
            idem: "evt_1",
            block: 7,
            name: "user/profile/updated",
            logged_at: 1_695_420_000_000,
            sender: "alice",
            payload: &payload,
            metadata: metadata.as_ref(),
        })
    }

    fn written(stored: &[u8], marks: &Marks) -> String {
        let mut buf = BytesMut::new();
        StoredRecord::new(stored)
            .expect("valid")
            .write(&mut buf, marks);
        String::from_utf8(buf.to_vec()).expect("utf-8")
    }

    #[test]
    fn live_record_has_the_documented_shape() {
        assert_eq!(
            written(&sample(None), &Marks::LIVE),
            r#"{"idem":"evt_1","block":"7","name":"user/profile/updated","loggedAt":1695420000000,"sender":"alice","payload":{"id":"1"},"metadata":{}}"#
        );
    }

    #[test]
    fn replay_marks_follow_published_metadata() {
        let marks = Marks {
            include_payload: false,
            replay: Some(ReplayInfo {
                replay_timestamp: 5,
                was_acknowledged: false,
            }),
        };
        let text = written(&sample(Some(r#"{"k":"v"}"#)), &marks);
        assert_eq!(
            text,
            r#"{"idem":"evt_1","block":"7","name":"user/profile/updated","loggedAt":1695420000000,"sender":"alice","metadata":{"k":"v","REPLAYED":true,"$internal":{"replay_info":{"isReplayed":true,"replayTimestamp":5,"wasAcknowledged":false}}}}"#
        );
        serde_json::from_str::<serde_json::Value>(&text).expect("valid JSON");
    }

    #[test]
    fn rendered_marks_write_the_same_line() {
        let replay = Some(ReplayInfo {
            replay_timestamp: 1_700_000_000_123,
            was_acknowledged: true,
        });
        for metadata in [None, Some(r#"{"k":"v"}"#)] {
            let stored = sample(metadata);
            let record = StoredRecord::new(&stored).expect("valid");
            for include_payload in [true, false] {
                for replay in [None, replay] {
                    let marks = Marks {
                        include_payload,
                        replay,
                    };
                    let (mut one, mut rendered) = (BytesMut::new(), BytesMut::new());
                    record.write_line(&mut one, &marks);
                    record.write_rendered_line(&mut rendered, &marks.render());
                    assert_eq!(one, rendered, "{marks:?} {metadata:?}");
                }
            }
        }
    }

    #[test]
    fn damaged_header_is_an_error_not_a_panic() {
        assert!(StoredRecord::new(&[1, 2, 3]).is_err());
        let mut stored = sample(None);
        stored[4] = 0xff;
        assert!(StoredRecord::new(&stored).is_err());
    }
}
