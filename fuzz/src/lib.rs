//! The properties the fuzz targets check on `ensync-protocol`: framing that
//! does not depend on how the bytes arrive, buffering bounded by the line
//! limit, a parser whose canonical encoding parses back to the same
//! command, error replies that stay one line, and a JSON check that
//! agrees with `serde_json`.
//!
//! The targets in `fuzz_targets/` only hand their input to
//! [`check_codec`], [`check_line`] or [`check_json`]; a failed property is
//! a panic, which the fuzzer reports as a crash and saves the input for.
#![deny(clippy::unwrap_used)]

use bytes::BytesMut;
use ensync_protocol::{
    parse_command, Command, EnsyncCodec, Frame, ParseError, DEFAULT_MAX_LINE_LEN,
};
use tokio_util::codec::{Decoder, Encoder};

/// LIMIT maxima error replies are rendered with: the server's default and
/// the widest a config can give.
const MAX_LIMITS: [u32; 2] = [100_000, u32::MAX];

/// How the codec target reads its input: a two-byte header, then the bytes
/// a client sends.
#[derive(Debug)]
pub struct CodecInput<'a> {
    /// The codec's line limit.
    pub max_line_len: usize,
    /// The longest read the split stream is cut into.
    pub max_read: usize,
    /// Seeds the read lengths, so the split points come from the input.
    pub seed: u32,
    /// What the client sends.
    pub data: &'a [u8],
}

impl<'a> CodecInput<'a> {
    /// Reads the header: byte 0 picks the line limit (0 to 63 bytes, 256,
    /// 4096 or the default), byte 1 the longest read (1 to 8192 bytes) and
    /// the read lengths' seed.
    pub fn new(input: &'a [u8]) -> Self {
        let (&limit, rest) = input.split_first().unwrap_or((&0, &[]));
        let (&reads, data) = rest.split_first().unwrap_or((&0, &[]));
        let max_line_len = match limit >> 6 {
            0 => usize::from(limit & 63),
            1 => 256,
            2 => 4096,
            _ => DEFAULT_MAX_LINE_LEN,
        };
        Self {
            max_line_len,
            max_read: 1 << (reads % 14),
            seed: u32::from(reads) | u32::from(limit) << 8 | (data.len() as u32) << 16,
            data,
        }
    }

    /// Cuts the data into reads of 1 to `max_read` bytes.
    fn reads(&self) -> Vec<&'a [u8]> {
        // xorshift32: any non-zero state works.
        let mut state = self.seed | 1;
        let mut rest = self.data;
        let mut reads = Vec::new();
        while !rest.is_empty() {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let len = 1 + state as usize % self.max_read;
            let (read, after) = rest.split_at(len.min(rest.len()));
            reads.push(read);
            rest = after;
        }
        reads
    }
}

/// Decodes `reads` one after another as a connection would, then the end
/// of the stream, checking after every call what the codec keeps buffered.
fn decode_reads(max_line_len: usize, reads: &[&[u8]]) -> Vec<Frame> {
    let mut codec = EnsyncCodec::new(max_line_len);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for read in reads {
        buf.extend_from_slice(read);
        while let Some(frame) = codec.decode(&mut buf).expect("the decoder never fails") {
            frames.push(frame);
        }
        // Waiting for more, the codec holds at most one line and its CR;
        // inside an over-long line it holds nothing.
        assert!(
            buf.len() <= max_line_len + 1,
            "the codec holds {} bytes with a line limit of {max_line_len}",
            buf.len()
        );
    }
    while let Some(frame) = codec.decode_eof(&mut buf).expect("the decoder never fails") {
        frames.push(frame);
    }
    // A framed stream that ends with bytes left over is an error.
    assert!(
        buf.is_empty(),
        "{} bytes left at the end of the stream",
        buf.len()
    );
    frames
}

/// SPEC.md, "Framing", written out directly: lines end at LF (a last line
/// may lack it), one CR before it is dropped, empty lines are skipped, a
/// line over the limit is one `TooLong`.
pub fn reference_frames(max_line_len: usize, data: &[u8]) -> Vec<Frame> {
    data.split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty())
        .map(|line| {
            if line.len() > max_line_len {
                Frame::TooLong { max: max_line_len }
            } else {
                match std::str::from_utf8(line) {
                    Ok(text) => Frame::Line(text.to_owned()),
                    Err(_) => Frame::InvalidEncoding,
                }
            }
        })
        .collect()
}

/// Decodes the input whole and in reads cut at points the input chooses,
/// checks both against the framing rules, then checks every line it
/// yields with [`check_line`].
///
/// # Panics
/// When a property fails.
pub fn check_codec(input: &[u8]) {
    let input = CodecInput::new(input);
    let whole = decode_reads(input.max_line_len, &[input.data]);
    let split = decode_reads(input.max_line_len, &input.reads());
    assert_eq!(whole, split, "frames depend on how the bytes were read");
    assert_eq!(
        whole,
        reference_frames(input.max_line_len, input.data),
        "frames differ from SPEC.md's framing"
    );
    for frame in &whole {
        match frame {
            Frame::Line(line) => {
                assert!(!line.is_empty() && line.len() <= input.max_line_len);
                // Only one CR before the LF is line ending: "A\r\r\n" is "A\r".
                assert!(!line.contains('\n'));
                check_line(line);
            }
            Frame::TooLong { max } => assert_eq!(*max, input.max_line_len),
            Frame::InvalidEncoding => {}
        }
    }
}

/// Parses one line and checks what comes out: a command's canonical
/// encoding parses back to the same command (and so is a fixed point), a
/// refusal is one well-formed `-FAIL` line.
///
/// # Panics
/// When a property fails.
pub fn check_line(line: &str) {
    match parse_command(line) {
        Ok(cmd) => check_canonical(line, &cmd),
        Err(err) => check_error_reply(line, &err),
    }
}

fn check_canonical(line: &str, cmd: &Command) {
    let canonical = cmd.to_string();
    assert!(
        canonical.starts_with(cmd.verb()),
        "{line:?}: canonical form {canonical:?} does not start with {}",
        cmd.verb()
    );
    if !line.contains(['\n', '\r']) {
        assert!(
            !canonical.contains(['\n', '\r']),
            "{line:?}: canonical form {canonical:?} has a line break"
        );
    }
    let again = parse_command(&canonical).unwrap_or_else(|e| {
        panic!("{line:?} parses to {cmd:?}, but its canonical form {canonical:?} is refused: {e}")
    });
    assert_eq!(
        &again, cmd,
        "{line:?}: canonical form {canonical:?} parses to another command"
    );
    assert_eq!(
        again.to_string(),
        canonical,
        "{line:?}: canonical form is not a fixed point"
    );
}

fn check_error_reply(line: &str, err: &ParseError) {
    for max_limit in MAX_LIMITS {
        let reply = err.to_reply(max_limit);
        assert!(
            reply.is_fail(),
            "{line:?}: {err:?} is not answered with -FAIL"
        );
        let mut wire = BytesMut::new();
        EnsyncCodec::default()
            .encode(reply, &mut wire)
            .expect("encoding a reply never fails");
        let text = std::str::from_utf8(&wire).expect("replies are UTF-8");
        // Exactly one line: one LF, at the end, and no CR.
        let body = text
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("{line:?}: reply {text:?} does not end in LF"));
        assert!(
            !body.contains(['\n', '\r']),
            "{line:?}: reply {text:?} is more than one line"
        );
        let prefix = format!("-FAIL:{};MESSAGE=", err.code());
        let message = body
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{line:?}: reply {body:?} does not start with {prefix:?}"));
        assert!(
            !message.is_empty(),
            "{line:?}: reply {body:?} has no message"
        );
        assert!(
            !message.contains(';'),
            "{line:?}: the message of {body:?} has a ';'"
        );
    }
}

/// The payload's JSON check (`ensync_protocol::json::is_json`) takes
/// exactly the texts `serde_json` reads as one value.
///
/// # Panics
/// When the two disagree.
pub fn check_json(text: &str) {
    let serde = serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
    assert_eq!(
        ensync_protocol::json::is_json(text),
        serde,
        "{text:?}: serde_json says {serde}"
    );
}

#[cfg(test)]
mod properties_hold {
    use super::*;

    #[test]
    fn on_vector_like_lines() {
        for line in [
            "PING",
            "sub;client_id=:alice;event_name=a/*",
            r#"PUB;CLIENT_ID=a;EVENT_NAME=a/b;PAYLOAD={"x":";"};DELIVERY_TO=bob"#,
            "REPLAY;CLIENT_ID=alice;EVENT_NAME=a/b;FROM_POSITION=earliest;LIMIT=0",
            "HELLO\r there",
        ] {
            check_line(line);
        }
    }

    #[test]
    fn on_json() {
        for text in [r#"{"a":[1,-2.5e3,"\u00e9"]}"#, "[1,]", "\"a\u{1}\"", " null "] {
            check_json(text);
        }
    }

    #[test]
    fn on_split_framing() {
        check_codec(b"\x04\x00PING\r\n\r\nabcdefgh\nPONG");
        check_codec(b"\x04\x03\xff\xfe\nPIN\rG\r\r\n");
    }
}
