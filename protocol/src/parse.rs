//! The command grammar: one line of text into a [`Command`].
//!
//! ```text
//! line  = verb *( ";" pair ) [ ";" ]
//! verb  = 1*ALPHA                      ; case-insensitive
//! pair  = key "=" [ ":" ] value        ; KEY=:VALUE is KEY=VALUE
//! key   = 1*( ALPHA / DIGIT / "_" )    ; case-insensitive
//! value = json / text
//! json  = ( "{" / "[" ) ... matching bracket, strings and escapes respected
//! text  = *( any char but ";" )
//! ```
//!
//! nom splits the line; each verb then takes its keys from the pairs,
//! rejecting unknown and repeated ones, and builds its validated fields.
//! nom's own error type never leaves this file.

use std::str::FromStr;

use nom::character::complete::char;
use nom::combinator::opt;
use nom::sequence::{terminated, tuple};
use nom::IResult;

use crate::command::{
    Ack, Command, Conn, ConnAuth, Continue, Defer, Discard, Pause, Pub, Replay, ReplayEvent,
    Rollback, Sub, Unsub,
};
use crate::error::{FieldError, ParseError};
use crate::field::{self, Limit, Payload};
use crate::json;

/// Longest verb echoed back in an UNKNOWN_COMMAND message.
const MAX_ECHO: usize = 32;

/// Parses one command line (without its line ending).
///
/// # Errors
/// A [`ParseError`] saying what is wrong; its `code()` is the `-FAIL` code.
pub fn parse_command(line: &str) -> Result<Command, ParseError> {
    let Ok((rest, verb)) = verb(line) else {
        return Err(unknown_verb(line));
    };
    let pairs = match rest.strip_prefix(';') {
        Some(pairs) => pairs,
        None if rest.is_empty() => "",
        None => return Err(unknown_verb(line)),
    };
    match VERBS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(verb))
    {
        Some((_, parse)) => parse(pairs),
        None => Err(unknown_verb(line)),
    }
}

/// Builds a verb's command from the pairs after it.
type VerbParser = fn(&str) -> Result<Command, ParseError>;

/// Each verb and the parser of its pairs; verbs match without case.
const VERBS: [(&str, VerbParser); 13] = [
    ("PUB", publish),
    ("CONN", conn),
    ("SUB", sub),
    ("UNSUB", unsub),
    ("PAUSE", pause),
    ("CONTINUE", resume),
    ("ACK", ack),
    ("DEFER", defer),
    ("DISCARD", discard),
    ("ROLLBACK", rollback),
    ("REPLAY", replay),
    ("PING", |pairs| bare("PING", pairs).map(|()| Command::Ping)),
    ("PONG", |pairs| bare("PONG", pairs).map(|()| Command::Pong)),
];

fn unknown_verb(line: &str) -> ParseError {
    let verb = line.split(';').next().unwrap_or_default();
    let mut end = verb.len().min(MAX_ECHO);
    while !verb.is_char_boundary(end) {
        end -= 1;
    }
    ParseError::UnknownCommand {
        verb: verb[..end].to_owned(),
    }
}

/// One or more bytes `accept` takes, which must be ASCII. nom's own
/// `take_while1` decodes a `&str` char by char, which cost a PUB more than
/// reading its JSON's end.
fn ascii_run(input: &str, accept: impl Fn(u8) -> bool) -> IResult<&str, &str> {
    let len = input
        .bytes()
        .position(|b| !accept(b))
        .unwrap_or(input.len());
    if len == 0 {
        return Err(nom::Err::Error(nom::error::Error::new(
            input,
            nom::error::ErrorKind::TakeWhile1,
        )));
    }
    // Only ASCII was taken, so `len` is a char boundary.
    Ok((&input[len..], &input[..len]))
}

fn verb(input: &str) -> IResult<&str, &str> {
    ascii_run(input, |b| b.is_ascii_alphabetic())
}

fn key(input: &str) -> IResult<&str, &str> {
    ascii_run(input, |b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `key "=" [":"]`
fn key_eq(input: &str) -> IResult<&str, &str> {
    terminated(key, tuple((char('='), opt(char(':')))))(input)
}

/// A text value: everything up to the next `;`.
fn text(input: &str) -> (&str, &str) {
    let len = memchr::memchr(b';', input.as_bytes()).unwrap_or(input.len());
    (&input[len..], &input[..len])
}

/// How far a bracketed value that is not valid JSON reaches: from the
/// `{` or `[` that `input` starts with to where its brackets close,
/// outside strings; `None` when they never close.
fn json_len(input: &str) -> Option<usize> {
    let bytes = input.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // To the closing quote, stepping over escapes.
                i += 1;
                loop {
                    let at = i + memchr::memchr2(b'"', b'\\', bytes.get(i..)?)?;
                    if bytes[at] == b'"' {
                        i = at;
                        break;
                    }
                    i = at + 2;
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// A value as a line gives it.
#[derive(Clone, Copy)]
struct Value<'a> {
    text: &'a str,
    /// Whether the text is known to be one JSON value.
    json: bool,
}

/// One `KEY=VALUE`: the key as written, the value, and what follows it.
fn pair(input: &str) -> Result<(&str, Value<'_>, &str), ParseError> {
    let (rest, key) = key_eq(input).map_err(|_| {
        let shown: String = input.chars().take(MAX_ECHO).collect();
        ParseError::Malformed(format!("expected KEY=VALUE, found {shown:?}"))
    })?;
    if !rest.starts_with(['{', '[']) {
        let (after, text) = self::text(rest);
        return Ok((key, Value { text, json: false }, after));
    }
    // A valid JSON value is read once, here; its end is where it ends.
    let (len, json) = match json::value_len(rest) {
        Some(len) => (len, true),
        // Not JSON: it ends where its brackets close, and the field it
        // is given for says what is wrong with it.
        None => match json_len(rest) {
            Some(len) => (len, false),
            None => {
                let key = key.to_ascii_uppercase();
                return Err(ParseError::Malformed(format!(
                    "the JSON value of {key} is not closed"
                )));
            }
        },
    };
    let (text, after) = rest.split_at(len);
    if !(after.is_empty() || after.starts_with(';')) {
        let key = key.to_ascii_uppercase();
        return Err(ParseError::Malformed(format!(
            "unexpected text after the JSON value of {key} (keys are separated by semicolons)"
        )));
    }
    Ok((key, Value { text, json }, after))
}

/// One of a verb's keys, with its value if the line gave one.
#[derive(Clone, Copy)]
struct Field<'a> {
    verb: &'static str,
    key: &'static str,
    value: Option<Value<'a>>,
}

/// Splits `input` into pairs and files each under its key, in the order
/// of `keys`, so that a verb takes its fields by destructuring:
/// `let [client_id, event_name] = split("SUB", ["CLIENT_ID", "EVENT_NAME"], pairs)?;`
fn split<'a, const N: usize>(
    verb: &'static str,
    keys: [&'static str; N],
    mut input: &'a str,
) -> Result<[Field<'a>; N], ParseError> {
    let mut fields = keys.map(|key| Field {
        verb,
        key,
        value: None,
    });
    while !input.is_empty() {
        let (key, value, after) = pair(input)?;
        let Some(field) = fields.iter_mut().find(|f| same_key(f.key, key)) else {
            return Err(ParseError::UnknownKey {
                verb,
                key: key.to_ascii_uppercase().chars().take(MAX_ECHO).collect(),
                allowed: keys.join(", "),
            });
        };
        if field.value.is_some() {
            return Err(ParseError::DuplicateKey {
                key: field.key.to_owned(),
            });
        }
        field.value = Some(value);
        input = after.strip_prefix(';').unwrap_or(after);
    }
    Ok(fields)
}

/// Whether `written`, a key as a line has it (ASCII letters, digits and
/// `_`), is `key` (upper case) in any case.
fn same_key(key: &str, written: &str) -> bool {
    key.len() == written.len()
        && key
            .bytes()
            .zip(written.bytes())
            .all(|(k, w)| k == w.to_ascii_uppercase())
}

/// Fails with MISSING_PARAMETERS naming every field of `required` the
/// line left out.
fn require(required: &[Field<'_>]) -> Result<(), ParseError> {
    let missing: Vec<&Field<'_>> = required.iter().filter(|f| !f.is_given()).collect();
    match missing.first() {
        None => Ok(()),
        Some(first) => Err(ParseError::Missing {
            verb: first.verb,
            keys: missing.iter().map(|f| f.key).collect(),
        }),
    }
}

impl<'a> Field<'a> {
    fn is_given(&self) -> bool {
        self.value.is_some()
    }

    /// The value as written; an empty one is refused.
    fn raw(&self) -> Result<Option<&'a str>, ParseError> {
        match self.value {
            Some(Value { text: "", .. }) => Err(ParseError::InvalidValue {
                key: self.key,
                reason: FieldError::new("is empty"),
            }),
            other => Ok(other.map(|value| value.text)),
        }
    }

    /// The value of an optional key, validated.
    fn opt<T: FromStr<Err = FieldError>>(&self) -> Result<Option<T>, ParseError> {
        self.opt_with(T::from_str)
    }

    fn opt_with<T>(
        &self,
        parse: impl FnOnce(&str) -> Result<T, FieldError>,
    ) -> Result<Option<T>, ParseError> {
        self.raw()?
            .map(|raw| {
                parse(raw).map_err(|reason| ParseError::InvalidValue {
                    key: self.key,
                    reason,
                })
            })
            .transpose()
    }

    /// The value of a key [`require`] has checked, validated.
    fn get<T: FromStr<Err = FieldError>>(&self) -> Result<T, ParseError> {
        self.opt()?.ok_or_else(|| ParseError::Missing {
            verb: self.verb,
            keys: vec![self.key],
        })
    }
}

fn bare(verb: &'static str, pairs: &str) -> Result<(), ParseError> {
    split(verb, [], pairs).map(|[]| ())
}

fn conn(pairs: &str) -> Result<Command, ParseError> {
    let [client_id, access_key] = split("CONN", ["CLIENT_ID", "ACCESS_KEY"], pairs)?;
    let auth = match (client_id.opt()?, access_key.opt()?) {
        (Some(id), None) => ConnAuth::ClientId(id),
        (None, Some(key)) => ConnAuth::AccessKey(key),
        (Some(_), Some(_)) => {
            return Err(ParseError::Malformed(
                "CONN takes CLIENT_ID or ACCESS_KEY, not both".to_owned(),
            ))
        }
        (None, None) => {
            return Err(ParseError::Missing {
                verb: "CONN",
                keys: vec!["CLIENT_ID or ACCESS_KEY"],
            })
        }
    };
    Ok(Command::Conn(Conn { auth }))
}

fn publish(pairs: &str) -> Result<Command, ParseError> {
    let [client_id, event_name, payload, delivery_to, metadata] = split(
        "PUB",
        [
            "CLIENT_ID",
            "EVENT_NAME",
            "PAYLOAD",
            "DELIVERY_TO",
            "METADATA",
        ],
        pairs,
    )?;
    require(&[client_id, event_name, payload, delivery_to])?;
    let client_id = client_id.get()?;
    let event_name = event_name.get()?;
    // `require` has seen PAYLOAD; its own error code is INVALID_PAYLOAD.
    let payload = match payload.value {
        Some(Value { text, json: true }) => Payload::Json(text.to_owned()),
        _ => payload
            .raw()?
            .unwrap_or_default()
            .parse()
            .map_err(ParseError::InvalidPayload)?,
    };
    Ok(Command::Pub(Pub {
        client_id,
        event_name,
        payload,
        delivery_to: delivery_to.get()?,
        metadata: metadata.opt()?,
    }))
}

fn sub(pairs: &str) -> Result<Command, ParseError> {
    let [client_id, event_name] = split("SUB", ["CLIENT_ID", "EVENT_NAME"], pairs)?;
    require(&[client_id, event_name])?;
    Ok(Command::Sub(Sub {
        client_id: client_id.get()?,
        event_name: event_name.get()?,
    }))
}

fn unsub(pairs: &str) -> Result<Command, ParseError> {
    let [client_id, event_name] = split("UNSUB", ["CLIENT_ID", "EVENT_NAME"], pairs)?;
    require(&[client_id, event_name])?;
    Ok(Command::Unsub(Unsub {
        client_id: client_id.get()?,
        event_name: event_name.get()?,
    }))
}

fn pause(pairs: &str) -> Result<Command, ParseError> {
    let [client_id, event_name, reason] =
        split("PAUSE", ["CLIENT_ID", "EVENT_NAME", "REASON"], pairs)?;
    require(&[client_id, event_name])?;
    Ok(Command::Pause(Pause {
        client_id: client_id.get()?,
        event_name: event_name.get()?,
        reason: reason.opt()?,
    }))
}

fn resume(pairs: &str) -> Result<Command, ParseError> {
    let [client_id, event_name] = split("CONTINUE", ["CLIENT_ID", "EVENT_NAME"], pairs)?;
    require(&[client_id, event_name])?;
    Ok(Command::Continue(Continue {
        client_id: client_id.get()?,
        event_name: event_name.get()?,
    }))
}

fn ack(pairs: &str) -> Result<Command, ParseError> {
    let [client_id, event_idem, block, event_name] = split(
        "ACK",
        ["CLIENT_ID", "EVENT_IDEM", "BLOCK", "EVENT_NAME"],
        pairs,
    )?;
    require(&[client_id, event_idem])?;
    Ok(Command::Ack(Ack {
        client_id: client_id.get()?,
        event_idem: event_idem.get()?,
        block: block.opt_with(field::parse_block)?,
        event_name: event_name.opt()?,
    }))
}

fn defer(pairs: &str) -> Result<Command, ParseError> {
    let [client_id, event_idem, delay, delay_ms, event_name, reason] = split(
        "DEFER",
        [
            "CLIENT_ID",
            "EVENT_IDEM",
            "DELAY",
            "DELAY_MS",
            "EVENT_NAME",
            "REASON",
        ],
        pairs,
    )?;
    if delay.is_given() && delay_ms.is_given() {
        return Err(ParseError::Malformed(
            "DEFER takes DELAY or DELAY_MS, not both".to_owned(),
        ));
    }
    let delay = if delay_ms.is_given() { delay_ms } else { delay };
    require(&[client_id, event_idem, delay])?;
    Ok(Command::Defer(Defer {
        client_id: client_id.get()?,
        event_idem: event_idem.get()?,
        delay: delay.get()?,
        event_name: event_name.opt()?,
        reason: reason.opt()?,
    }))
}

fn discard(pairs: &str) -> Result<Command, ParseError> {
    let [client_id, event_idem, reason, event_name] = split(
        "DISCARD",
        ["CLIENT_ID", "EVENT_IDEM", "REASON", "EVENT_NAME"],
        pairs,
    )?;
    require(&[client_id, event_idem])?;
    if !reason.is_given() {
        return Err(ParseError::MissingReason);
    }
    Ok(Command::Discard(Discard {
        client_id: client_id.get()?,
        event_idem: event_idem.get()?,
        reason: reason.get()?,
        event_name: event_name.opt()?,
    }))
}

fn rollback(pairs: &str) -> Result<Command, ParseError> {
    let [client_id, event_idem, block] =
        split("ROLLBACK", ["CLIENT_ID", "EVENT_IDEM", "BLOCK"], pairs)?;
    require(&[client_id, event_idem])?;
    Ok(Command::Rollback(Rollback {
        client_id: client_id.get()?,
        event_idem: event_idem.get()?,
        block: block.opt_with(field::parse_block)?,
    }))
}

fn position(field: Field<'_>) -> Result<Option<field::Position>, ParseError> {
    field
        .raw()?
        .map(|raw| raw.parse().map_err(|_| ParseError::InvalidPosition))
        .transpose()
}

fn replay(pairs: &str) -> Result<Command, ParseError> {
    let [client_id, event_name, from, to, limit, payloads, unacked, event_idem] = split(
        "REPLAY",
        [
            "CLIENT_ID",
            "EVENT_NAME",
            "FROM_POSITION",
            "TO_POSITION",
            "LIMIT",
            "INCLUDE_PAYLOADS",
            "ONLY_UNACKED",
            "EVENT_IDEM",
        ],
        pairs,
    )?;
    if event_idem.is_given() {
        if let Some(ranged) = [from, to, limit, payloads, unacked]
            .into_iter()
            .find(Field::is_given)
        {
            return Err(ParseError::Malformed(format!(
                "REPLAY with EVENT_IDEM replays one event and does not take {}",
                ranged.key
            )));
        }
        if !client_id.is_given() {
            return Err(ParseError::MissingReplayData);
        }
        return Ok(Command::ReplayEvent(ReplayEvent {
            client_id: client_id.get()?,
            event_idem: event_idem.get()?,
            event_name: event_name.opt()?,
        }));
    }
    if !(client_id.is_given() && event_name.is_given() && from.is_given()) {
        return Err(ParseError::MissingReplayData);
    }
    let to_position = position(to)?;
    if to_position == Some(field::Position::Earliest) {
        return Err(ParseError::InvalidPosition);
    }
    Ok(Command::Replay(Replay {
        client_id: client_id.get()?,
        event_name: event_name.get()?,
        from_position: position(from)?.ok_or(ParseError::MissingReplayData)?,
        to_position,
        limit: limit
            .raw()?
            .map(|raw| raw.parse::<Limit>().map_err(|_| ParseError::InvalidLimit))
            .transpose()?,
        include_payloads: payloads.opt_with(field::parse_bool)?,
        only_unacked: unacked.opt_with(field::parse_bool)?,
    }))
}

#[cfg(test)]
mod parse_replay {
    use super::*;
    use crate::reply::ErrorCode;

    fn code(line: &str) -> ErrorCode {
        parse_command(line).expect_err("must fail").code()
    }

    #[test]
    fn takes_the_seed_example() {
        let cmd = parse_command(
            "REPLAY;CLIENT_ID=client-123abc;EVENT_NAME=user/profile/updated;FROM_POSITION=1695420000000;LIMIT=200",
        )
        .expect("parses");
        assert_eq!(
            cmd.to_string(),
            "REPLAY;CLIENT_ID=client-123abc;EVENT_NAME=user/profile/updated;FROM_POSITION=1695420000000;LIMIT=200"
        );
    }

    #[test]
    fn missing_keys_get_the_seed_message() {
        let err = parse_command("REPLAY;EVENT_NAME=a/b;FROM_POSITION=1").expect_err("fails");
        assert_eq!(err.code(), ErrorCode::MissingParameters);
        assert_eq!(
            err.to_string(),
            "Missing required replay data. Ensure CLIENT_ID, EVENT_NAME, and FROM_POSITION are passed"
        );
    }

    #[test]
    fn rejects_limit_zero_and_bad_positions() {
        assert_eq!(
            code("REPLAY;CLIENT_ID=a;EVENT_NAME=a/b;FROM_POSITION=1;LIMIT=0"),
            ErrorCode::InvalidParameters
        );
        assert_eq!(
            code("REPLAY;CLIENT_ID=a;EVENT_NAME=a/b;FROM_POSITION=soon"),
            ErrorCode::InvalidPosition
        );
    }

    #[test]
    fn sdk_colon_form_and_case_are_accepted() {
        let a = parse_command("replay;client_id=:a;Event_Name=:a/*;from_position=:earliest")
            .expect("parses");
        let b = parse_command("REPLAY;CLIENT_ID=a;EVENT_NAME=a/*;FROM_POSITION=earliest")
            .expect("parses");
        assert_eq!(a, b);
    }
}

#[cfg(test)]
mod parse_pub {
    use super::*;
    use crate::reply::ErrorCode;

    #[test]
    fn json_values_may_hold_semicolons() {
        let cmd = parse_command(
            r#"PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={"s":"a;b}"};DELIVERY_TO=*;METADATA={"k": "v;w"}"#,
        )
        .expect("parses");
        let Command::Pub(p) = cmd else {
            panic!("not a PUB")
        };
        assert_eq!(p.payload.as_str(), r#"{"s":"a;b}"}"#);
        assert_eq!(
            p.metadata.as_ref().map(|m| m.as_str()),
            Some(r#"{"k":"v;w"}"#)
        );
    }

    #[test]
    fn names_every_missing_key() {
        let err = parse_command("PUB;CLIENT_ID=a").expect_err("fails");
        assert_eq!(
            err.to_string(),
            "PUB needs EVENT_NAME, PAYLOAD, DELIVERY_TO"
        );
    }

    #[test]
    fn rejects_duplicate_and_unknown_keys() {
        let dup = parse_command("SUB;CLIENT_ID=a;CLIENT_ID=b;EVENT_NAME=x/y").expect_err("fails");
        assert_eq!(dup.code(), ErrorCode::InvalidParameters);
        let unknown = parse_command("SUB;CLIENT_ID=a;COLOR=red;EVENT_NAME=x/y").expect_err("fails");
        assert_eq!(unknown.code(), ErrorCode::InvalidParameters);
        assert!(unknown.to_string().contains("COLOR"));
    }

    #[test]
    fn unclosed_json_is_malformed() {
        let err = parse_command(r#"PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={"a":1;DELIVERY_TO=*"#)
            .expect_err("fails");
        assert_eq!(err.code(), ErrorCode::InvalidParameters);
    }

    #[test]
    fn a_bracketed_payload_that_is_not_json_is_refused_as_a_payload() {
        // Its brackets close, so it is read to there, as a valid one is;
        // then PAYLOAD says what is wrong with it.
        for payload in [
            r#"{"a":1,}"#,
            r#"{"a":tru}"#,
            r#"[1 2]"#,
            "{\"a\":\"\u{1}\"}",
        ] {
            let err = parse_command(&format!(
                "PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={payload};DELIVERY_TO=*"
            ))
            .expect_err("fails");
            assert_eq!(err.code(), ErrorCode::InvalidPayload, "{payload}");
        }
        let err = parse_command(r#"PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={"a":1} ;DELIVERY_TO=*"#)
            .expect_err("fails");
        assert!(
            err.to_string().contains("after the JSON value of PAYLOAD"),
            "{err}"
        );
    }

    #[test]
    fn a_json_payload_is_kept_as_sent() {
        for payload in [
            r#"{ "a" : [1, 2.5e3, "x;y", null] }"#,
            "[]",
            r#"{"é":"\u00e9"}"#,
        ] {
            let Ok(Command::Pub(p)) = parse_command(&format!(
                "PUB;CLIENT_ID=a;EVENT_NAME=x/y;PAYLOAD={payload};DELIVERY_TO=*"
            )) else {
                panic!("{payload} is refused")
            };
            assert_eq!(p.payload, Payload::Json(payload.to_owned()));
        }
    }

    #[test]
    fn json_ends_where_its_brackets_close_outside_strings() {
        assert_eq!(json_len(r#"{"a":"x\"};y"};NEXT=1"#), Some(14));
        assert_eq!(json_len(r#"{"a":"\\"}x"#), Some(10));
        assert_eq!(json_len(r#"[{"]":[1]},"{"]"#), Some(15));
        for unclosed in [r#"{"a":"\"#, r#"{"a":"x"#, r#"{"a":"x\"}"#, "[[1]"] {
            assert_eq!(json_len(unclosed), None, "{unclosed}");
        }
    }

    #[test]
    fn error_messages_name_keys_in_upper_case() {
        let dup = parse_command("SUB;client_id=a;Client_Id=b;EVENT_NAME=x/y").expect_err("fails");
        assert!(dup.to_string().contains("CLIENT_ID"), "{dup}");
        let unknown = parse_command("SUB;CLIENT_ID=a;color=red;EVENT_NAME=x/y").expect_err("fails");
        assert!(unknown.to_string().contains("COLOR"), "{unknown}");
        let open =
            parse_command(r#"PUB;CLIENT_ID=a;EVENT_NAME=x/y;payload={"a":1"#).expect_err("fails");
        assert!(open.to_string().contains("PAYLOAD"), "{open}");
    }

    #[test]
    fn unknown_verb_wins_over_everything() {
        assert_eq!(
            parse_command("HELLO there").expect_err("fails").code(),
            ErrorCode::UnknownCommand
        );
        assert_eq!(
            parse_command("FOO;X=1").expect_err("fails").code(),
            ErrorCode::UnknownCommand
        );
    }
}
