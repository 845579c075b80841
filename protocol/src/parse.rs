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
use crate::field::{self, Limit};

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

/// The length of the JSON value at the start of `input` (which starts with
/// `{` or `[`), or `None` when its brackets never close.
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

/// One `KEY=VALUE`: the key as written, the value, and what follows it.
fn pair(input: &str) -> Result<(&str, &str, &str), ParseError> {
    let (rest, key) = key_eq(input).map_err(|_| {
        let shown: String = input.chars().take(MAX_ECHO).collect();
        ParseError::Malformed(format!("expected KEY=VALUE, found {shown:?}"))
    })?;
    if rest.starts_with(['{', '[']) {
        let len = json_len(rest).ok_or_else(|| {
            let key = key.to_ascii_uppercase();
            ParseError::Malformed(format!("the JSON value of {key} is not closed"))
        })?;
        let (value, after) = rest.split_at(len);
        if !(after.is_empty() || after.starts_with(';')) {
            let key = key.to_ascii_uppercase();
            return Err(ParseError::Malformed(format!(
                "unexpected text after the JSON value of {key} (keys are separated by semicolons)"
            )));
        }
        Ok((key, value, after))
    } else {
        let (after, value) = text(rest);
        Ok((key, value, after))
    }
}

/// The values of a verb's keys, by position in its key list.
struct Fields<'a, const N: usize> {
    verb: &'static str,
    keys: [&'static str; N],
    values: [Option<&'a str>; N],
}

impl<'a, const N: usize> Fields<'a, N> {
    /// Splits `input` into pairs and files each under its key.
    fn split(
        verb: &'static str,
        keys: [&'static str; N],
        mut input: &'a str,
    ) -> Result<Self, ParseError> {
        let mut values = [None; N];
        while !input.is_empty() {
            let (key, value, after) = pair(input)?;
            // Keys are upper-case ASCII, so the comparison needs no copy.
            let Some(slot) = keys.iter().position(|k| k.eq_ignore_ascii_case(key)) else {
                return Err(ParseError::UnknownKey {
                    verb,
                    key: key.to_ascii_uppercase().chars().take(MAX_ECHO).collect(),
                    allowed: keys.join(", "),
                });
            };
            if values[slot].is_some() {
                return Err(ParseError::DuplicateKey {
                    key: key.to_ascii_uppercase(),
                });
            }
            values[slot] = Some(value);
            input = after.strip_prefix(';').unwrap_or(after);
        }
        Ok(Self { verb, keys, values })
    }

    fn slot(&self, key: &str) -> usize {
        self.keys
            .iter()
            .position(|k| *k == key)
            .expect("key is in the verb's list")
    }

    fn has(&self, key: &str) -> bool {
        self.values[self.slot(key)].is_some()
    }

    /// Fails with MISSING_PARAMETERS naming every absent key of `required`.
    fn require(&self, required: &[&'static str]) -> Result<(), ParseError> {
        let keys: Vec<&'static str> = required.iter().copied().filter(|k| !self.has(k)).collect();
        if keys.is_empty() {
            Ok(())
        } else {
            Err(ParseError::Missing {
                verb: self.verb,
                keys,
            })
        }
    }

    fn raw(&self, key: &'static str) -> Result<Option<&'a str>, ParseError> {
        match self.values[self.slot(key)] {
            Some("") => Err(ParseError::InvalidValue {
                key,
                reason: FieldError::new("is empty"),
            }),
            other => Ok(other),
        }
    }

    /// The value of an optional key, validated.
    fn opt<T: FromStr<Err = FieldError>>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, ParseError> {
        self.opt_with(key, T::from_str)
    }

    fn opt_with<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, FieldError>,
    ) -> Result<Option<T>, ParseError> {
        self.raw(key)?
            .map(|raw| parse(raw).map_err(|reason| ParseError::InvalidValue { key, reason }))
            .transpose()
    }

    /// The value of a key `require` has checked, validated.
    fn get<T: FromStr<Err = FieldError>>(&self, key: &'static str) -> Result<T, ParseError> {
        self.opt(key)?.ok_or_else(|| ParseError::Missing {
            verb: self.verb,
            keys: vec![key],
        })
    }
}

fn bare(verb: &'static str, pairs: &str) -> Result<(), ParseError> {
    Fields::split(verb, [], pairs).map(|_| ())
}

fn conn(pairs: &str) -> Result<Command, ParseError> {
    let f = Fields::split("CONN", ["CLIENT_ID", "ACCESS_KEY"], pairs)?;
    let auth = match (f.opt("CLIENT_ID")?, f.opt("ACCESS_KEY")?) {
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
    let f = Fields::split(
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
    f.require(&["CLIENT_ID", "EVENT_NAME", "PAYLOAD", "DELIVERY_TO"])?;
    let client_id = f.get("CLIENT_ID")?;
    let event_name = f.get("EVENT_NAME")?;
    // `require` has seen PAYLOAD; its own error code is INVALID_PAYLOAD.
    let payload = f
        .raw("PAYLOAD")?
        .unwrap_or_default()
        .parse()
        .map_err(ParseError::InvalidPayload)?;
    Ok(Command::Pub(Pub {
        client_id,
        event_name,
        payload,
        delivery_to: f.get("DELIVERY_TO")?,
        metadata: f.opt("METADATA")?,
    }))
}

fn sub(pairs: &str) -> Result<Command, ParseError> {
    let f = Fields::split("SUB", ["CLIENT_ID", "EVENT_NAME"], pairs)?;
    f.require(&["CLIENT_ID", "EVENT_NAME"])?;
    Ok(Command::Sub(Sub {
        client_id: f.get("CLIENT_ID")?,
        event_name: f.get("EVENT_NAME")?,
    }))
}

fn unsub(pairs: &str) -> Result<Command, ParseError> {
    let f = Fields::split("UNSUB", ["CLIENT_ID", "EVENT_NAME"], pairs)?;
    f.require(&["CLIENT_ID", "EVENT_NAME"])?;
    Ok(Command::Unsub(Unsub {
        client_id: f.get("CLIENT_ID")?,
        event_name: f.get("EVENT_NAME")?,
    }))
}

fn pause(pairs: &str) -> Result<Command, ParseError> {
    let f = Fields::split("PAUSE", ["CLIENT_ID", "EVENT_NAME", "REASON"], pairs)?;
    f.require(&["CLIENT_ID", "EVENT_NAME"])?;
    Ok(Command::Pause(Pause {
        client_id: f.get("CLIENT_ID")?,
        event_name: f.get("EVENT_NAME")?,
        reason: f.opt("REASON")?,
    }))
}

fn resume(pairs: &str) -> Result<Command, ParseError> {
    let f = Fields::split("CONTINUE", ["CLIENT_ID", "EVENT_NAME"], pairs)?;
    f.require(&["CLIENT_ID", "EVENT_NAME"])?;
    Ok(Command::Continue(Continue {
        client_id: f.get("CLIENT_ID")?,
        event_name: f.get("EVENT_NAME")?,
    }))
}

fn ack(pairs: &str) -> Result<Command, ParseError> {
    let f = Fields::split(
        "ACK",
        ["CLIENT_ID", "EVENT_IDEM", "BLOCK", "EVENT_NAME"],
        pairs,
    )?;
    f.require(&["CLIENT_ID", "EVENT_IDEM"])?;
    Ok(Command::Ack(Ack {
        client_id: f.get("CLIENT_ID")?,
        event_idem: f.get("EVENT_IDEM")?,
        block: f.opt_with("BLOCK", field::parse_block)?,
        event_name: f.opt("EVENT_NAME")?,
    }))
}

fn defer(pairs: &str) -> Result<Command, ParseError> {
    let f = Fields::split(
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
    if f.has("DELAY") && f.has("DELAY_MS") {
        return Err(ParseError::Malformed(
            "DEFER takes DELAY or DELAY_MS, not both".to_owned(),
        ));
    }
    let delay_key = if f.has("DELAY_MS") {
        "DELAY_MS"
    } else {
        "DELAY"
    };
    f.require(&["CLIENT_ID", "EVENT_IDEM", delay_key])?;
    Ok(Command::Defer(Defer {
        client_id: f.get("CLIENT_ID")?,
        event_idem: f.get("EVENT_IDEM")?,
        delay: f.get(delay_key)?,
        event_name: f.opt("EVENT_NAME")?,
        reason: f.opt("REASON")?,
    }))
}

fn discard(pairs: &str) -> Result<Command, ParseError> {
    let f = Fields::split(
        "DISCARD",
        ["CLIENT_ID", "EVENT_IDEM", "REASON", "EVENT_NAME"],
        pairs,
    )?;
    f.require(&["CLIENT_ID", "EVENT_IDEM"])?;
    if !f.has("REASON") {
        return Err(ParseError::MissingReason);
    }
    Ok(Command::Discard(Discard {
        client_id: f.get("CLIENT_ID")?,
        event_idem: f.get("EVENT_IDEM")?,
        reason: f.get("REASON")?,
        event_name: f.opt("EVENT_NAME")?,
    }))
}

fn rollback(pairs: &str) -> Result<Command, ParseError> {
    let f = Fields::split("ROLLBACK", ["CLIENT_ID", "EVENT_IDEM", "BLOCK"], pairs)?;
    f.require(&["CLIENT_ID", "EVENT_IDEM"])?;
    Ok(Command::Rollback(Rollback {
        client_id: f.get("CLIENT_ID")?,
        event_idem: f.get("EVENT_IDEM")?,
        block: f.opt_with("BLOCK", field::parse_block)?,
    }))
}

fn position(f: &Fields<'_, 8>, key: &'static str) -> Result<Option<field::Position>, ParseError> {
    f.raw(key)?
        .map(|raw| raw.parse().map_err(|_| ParseError::InvalidPosition))
        .transpose()
}

fn replay(pairs: &str) -> Result<Command, ParseError> {
    let f = Fields::split(
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
    if f.has("EVENT_IDEM") {
        if let Some(key) = [
            "FROM_POSITION",
            "TO_POSITION",
            "LIMIT",
            "INCLUDE_PAYLOADS",
            "ONLY_UNACKED",
        ]
        .into_iter()
        .find(|k| f.has(k))
        {
            return Err(ParseError::Malformed(format!(
                "REPLAY with EVENT_IDEM replays one event and does not take {key}"
            )));
        }
        if !f.has("CLIENT_ID") {
            return Err(ParseError::MissingReplayData);
        }
        return Ok(Command::ReplayEvent(ReplayEvent {
            client_id: f.get("CLIENT_ID")?,
            event_idem: f.get("EVENT_IDEM")?,
            event_name: f.opt("EVENT_NAME")?,
        }));
    }
    if !(f.has("CLIENT_ID") && f.has("EVENT_NAME") && f.has("FROM_POSITION")) {
        return Err(ParseError::MissingReplayData);
    }
    let to_position = position(&f, "TO_POSITION")?;
    if to_position == Some(field::Position::Earliest) {
        return Err(ParseError::InvalidPosition);
    }
    Ok(Command::Replay(Replay {
        client_id: f.get("CLIENT_ID")?,
        event_name: f.get("EVENT_NAME")?,
        from_position: position(&f, "FROM_POSITION")?.ok_or(ParseError::MissingReplayData)?,
        to_position,
        limit: f
            .raw("LIMIT")?
            .map(|raw| raw.parse::<Limit>().map_err(|_| ParseError::InvalidLimit))
            .transpose()?,
        include_payloads: f.opt_with("INCLUDE_PAYLOADS", field::parse_bool)?,
        only_unacked: f.opt_with("ONLY_UNACKED", field::parse_bool)?,
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
