//! Validated values of command keys: client ids, event names, patterns,
//! event ids, positions, limits, payloads and recipients.
//!
//! Every type here is built only through `FromStr` (or a named constructor
//! that validates), so a value that exists is valid. Storage and routing
//! decisions built on top of them live in the server.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;

use crate::error::FieldError;

/// Longest client id, access key or public key accepted, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 256;
/// Longest event name or pattern accepted, in bytes.
pub const MAX_EVENT_NAME_LEN: usize = 255;
/// Most recipients one `DELIVERY_TO` may list.
pub const MAX_RECIPIENTS: usize = 1000;
/// Longest event id accepted, in bytes (ids minted by the server are 28).
pub const MAX_EVENT_ID_LEN: usize = 64;
/// Longest REASON accepted, in bytes.
pub const MAX_REASON_LEN: usize = 1024;
/// Shortest DEFER delay: one second.
pub const MIN_DEFER_MS: u64 = 1_000;
/// Longest DEFER delay: one day.
pub const MAX_DEFER_MS: u64 = 86_400_000;

/// Metadata keys the server writes itself into replayed records.
pub const RESERVED_METADATA_KEYS: [&str; 2] = ["REPLAYED", "$internal"];

/// Identity of a client: its configured id, or in open mode whatever id it
/// connects with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(String);

impl ClientId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_client_id_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'{' | b'}' | b'"' | b'\\')
}

impl FromStr for ClientId {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > MAX_CLIENT_ID_LEN {
            return Err(FieldError::new(format!(
                "must be 1 to {MAX_CLIENT_ID_LEN} characters long"
            )));
        }
        if s.starts_with(':') {
            // `KEY=:VALUE` means `KEY=VALUE`, so a leading colon could
            // never be sent back.
            return Err(FieldError::new("must not start with ':'"));
        }
        if let Some(c) = s.bytes().find(|b| !is_client_id_byte(*b)) {
            return Err(FieldError::new(format!(
                "contains {:?} (use printable ASCII without spaces, semicolons, commas, braces, quotes or backslashes)",
                c as char
            )));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A concrete event name such as `user/profile/updated`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventName(String);

impl EventName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_name(s: &str) -> Result<(), FieldError> {
    if s.is_empty() || s.len() > MAX_EVENT_NAME_LEN {
        return Err(FieldError::new(format!(
            "must be 1 to {MAX_EVENT_NAME_LEN} characters long"
        )));
    }
    // One pass over the bytes; the message's character is looked for
    // only when there is one to report.
    let mut segment_empty = true;
    for (i, b) in s.bytes().enumerate() {
        if b == b'/' {
            if segment_empty {
                return Err(empty_segment());
            }
            segment_empty = true;
        } else if is_name_byte(b) {
            segment_empty = false;
        } else {
            // Every byte before it is ASCII, so a character starts here.
            let c = s[i..].chars().next().unwrap_or_default();
            return Err(FieldError::new(format!(
                "contains {c:?} (segments take letters, digits, '_', '-' and '.')"
            )));
        }
    }
    if segment_empty {
        return Err(empty_segment());
    }
    Ok(())
}

/// Whether `b` may appear in a segment of a name.
fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

fn empty_segment() -> FieldError {
    FieldError::new("has an empty segment (names look like domain/resource/action)")
}

impl FromStr for EventName {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains('*') {
            return Err(FieldError::new(
                "is a pattern, but PUB needs a concrete name such as user/profile/updated",
            ));
        }
        check_name(s)?;
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event name or a wildcard over names: `a/b/c`, `a/*` (every name
/// strictly below `a/`), or `*` (every name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    /// Exactly one name.
    Exact(EventName),
    /// Every name that starts with this prefix followed by `/`.
    Below(String),
    /// Every name.
    All,
}

impl Pattern {
    /// Whether the concrete `name` is matched.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact.as_str() == name,
            Pattern::Below(prefix) => name
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
            Pattern::All => true,
        }
    }

    /// Whether every name `other` can match is also matched by `self`.
    pub fn covers(&self, other: &Pattern) -> bool {
        match (self, other) {
            (Pattern::All, _) => true,
            (_, Pattern::All) => false,
            (_, Pattern::Exact(name)) => self.matches(name.as_str()),
            (Pattern::Exact(_), Pattern::Below(_)) => false,
            (Pattern::Below(mine), Pattern::Below(theirs)) => {
                mine == theirs || Pattern::Below(mine.clone()).matches(theirs)
            }
        }
    }

    /// The fixed part every matched name starts with (`""` for `*`).
    pub fn prefix(&self) -> &str {
        match self {
            Pattern::Exact(name) => name.as_str(),
            Pattern::Below(prefix) => prefix,
            Pattern::All => "",
        }
    }
}

impl FromStr for Pattern {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "*" {
            return Ok(Pattern::All);
        }
        if let Some(prefix) = s.strip_suffix("/*") {
            if prefix.contains('*') {
                return Err(FieldError::new(
                    "may hold '*' only as its last segment, as in order/*",
                ));
            }
            check_name(prefix)?;
            return Ok(Pattern::Below(prefix.to_owned()));
        }
        if s.contains('*') {
            return Err(FieldError::new(
                "may hold '*' only as its last segment, as in order/*",
            ));
        }
        Ok(Pattern::Exact(s.parse()?))
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(name) => f.write_str(name.as_str()),
            Pattern::Below(prefix) => write!(f, "{prefix}/*"),
            Pattern::All => f.write_str("*"),
        }
    }
}

/// An event id (`IDEM`) as a client sends it back: `evt_` and then up to 60
/// letters, digits, `_` or `-`. Whether it names a stored event is the
/// server's question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventId(String);

impl EventId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for EventId {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let well_formed = s.len() <= MAX_EVENT_ID_LEN
            && s.strip_prefix("evt_").is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        if well_formed {
            Ok(Self(s.to_owned()))
        } else {
            Err(FieldError::new(
                "is not an event id (ids look like evt_ followed by letters and digits)",
            ))
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a replay starts or ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// The oldest retained event.
    Earliest,
    /// Milliseconds since the Unix epoch, compared with `loggedAt`.
    Timestamp(u64),
    /// One stored event.
    Event(EventId),
}

impl FromStr for Position {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("earliest") {
            return Ok(Position::Earliest);
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(Position::Timestamp)
                .map_err(|_| FieldError::new("is a timestamp too large for milliseconds"));
        }
        if s.starts_with("evt_") {
            return s.parse().map(Position::Event);
        }
        let parsed =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| {
                    FieldError::new(
                        "is not a position (use a timestamp in ms, an RFC 3339 date-time, an event id or earliest)",
                    )
                })?;
        let ms = parsed.unix_timestamp_nanos() / 1_000_000;
        u64::try_from(ms)
            .map(Position::Timestamp)
            .map_err(|_| FieldError::new("is a date before 1970"))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Earliest => f.write_str("earliest"),
            Position::Timestamp(ms) => write!(f, "{ms}"),
            Position::Event(id) => f.write_str(id.as_str()),
        }
    }
}

/// How many events a replay returns at most: a whole number of at least 1.
/// The server caps it with its configured maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Limit(u32);

impl Limit {
    /// The limit when a REPLAY gives none.
    pub const DEFAULT: Limit = Limit(50);

    /// The limit as a number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl FromStr for Limit {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u32>() {
            Ok(n) if n >= 1 && s.bytes().all(|b| b.is_ascii_digit()) => Ok(Limit(n)),
            _ => Err(FieldError::new("is not a whole number of at least 1")),
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `true` or `false`, in any case.
pub(crate) fn parse_bool(s: &str) -> Result<bool, FieldError> {
    if s.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if s.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(FieldError::new("must be true or false"))
    }
}

/// A published payload: a JSON value kept as the client wrote it, or a
/// base64 string (how the SDK sends encrypted payloads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// JSON text, verbatim.
    Json(String),
    /// Base64 text, verbatim; a record carries it as a JSON string.
    Base64(String),
}

impl Payload {
    /// The payload as the text a client sent.
    pub fn as_str(&self) -> &str {
        match self {
            Payload::Json(text) | Payload::Base64(text) => text,
        }
    }
}

fn is_base64(s: &str) -> bool {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(s).is_ok()
}

impl FromStr for Payload {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if crate::json::is_json(s) {
            Ok(Payload::Json(s.to_owned()))
        } else if is_base64(s) {
            Ok(Payload::Base64(s.to_owned()))
        } else {
            Err(FieldError::new("is neither valid JSON nor a base64 string"))
        }
    }
}

/// Published metadata: a JSON object, kept compact and in the client's key
/// order, without the keys the server reserves for replay marks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata(String);

impl Metadata {
    /// The object as compact JSON text, braces included.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The members between the braces (empty for `{}`).
    pub fn members(&self) -> &str {
        &self.0[1..self.0.len() - 1]
    }
}

impl FromStr for Metadata {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(s)
            .map_err(|e| FieldError::new(format!("must be a JSON object ({e})")))?;
        if let Some(key) = RESERVED_METADATA_KEYS
            .iter()
            .find(|key| object.contains_key(**key))
        {
            return Err(FieldError::new(format!(
                "uses the reserved key {key:?}, which the server sets on replayed records"
            )));
        }
        let compact = serde_json::to_string(&object)
            .map_err(|e| FieldError::new(format!("cannot be re-encoded ({e})")))?;
        Ok(Metadata(compact))
    }
}

/// One addressee of a published event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Recipient {
    /// `*`: every subscriber of the name.
    All,
    /// A client id or a client's public key.
    Client(ClientId),
}

impl Recipient {
    /// The entry as written in a `DELIVERY_TO` list.
    fn written(&self) -> &str {
        match self {
            Recipient::All => "*",
            Recipient::Client(id) => id.as_str(),
        }
    }
}

/// Distinct entries of a `DELIVERY_TO` list checked for repeats by
/// comparison, before a set takes over.
const SHORT_LIST: usize = 16;

/// The comma-separated `DELIVERY_TO` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryTo(Vec<Recipient>);

impl DeliveryTo {
    /// The recipients in the order given, without duplicates.
    pub fn recipients(&self) -> &[Recipient] {
        &self.0
    }

    /// The recipients, taken out.
    pub fn into_recipients(self) -> Vec<Recipient> {
        self.0
    }
}

/// Most characters of a client's value an error message repeats.
const SHOWN_CHARS: usize = 64;

/// `text` quoted for an error message, cut after [`SHOWN_CHARS`]: a
/// message names the value, it does not echo a megabyte of it back.
pub(crate) fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &text[..cut], text.len()),
    }
}

impl FromStr for DeliveryTo {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let entries = memchr::memchr_iter(b',', s.as_bytes()).count() + 1;
        let mut recipients: Vec<Recipient> = Vec::with_capacity(entries.min(MAX_RECIPIENTS));
        // Repeats are found by comparison while the list is short (most
        // lists hold one entry), then by a set: a 1 MiB line holds
        // 100,000s of entries, and comparing each with all before it took
        // minutes.
        let mut seen: Option<HashSet<&str>> = None;
        for (i, entry) in s.split(',').map(str::trim).enumerate() {
            let repeated = match &mut seen {
                Some(seen) => !seen.insert(entry),
                None => recipients.iter().any(|r| r.written() == entry),
            };
            if repeated {
                continue;
            }
            if recipients.len() == MAX_RECIPIENTS {
                return Err(FieldError::new(format!(
                    "lists more than {MAX_RECIPIENTS} recipients"
                )));
            }
            let recipient = if entry == "*" {
                Recipient::All
            } else if entry.is_empty() {
                return Err(FieldError::new("has an empty entry"));
            } else if entry.starts_with('[') {
                // NOTE: written back first in the list (entries trimmed), it
                // would make the value read as JSON: ` [a` has no canonical
                // form.
                return Err(FieldError::new(format!(
                    "entry {} begins with '[' (a list beginning with '[' reads as a JSON value)",
                    shown(entry)
                )));
            } else {
                Recipient::Client(entry.parse().map_err(|e: FieldError| {
                    FieldError::new(format!("entry {} {e}", shown(entry)))
                })?)
            };
            recipients.push(recipient);
            if seen.is_none() && recipients.len() == SHORT_LIST {
                seen = Some(s.split(',').map(str::trim).take(i + 1).collect());
            }
        }
        Ok(DeliveryTo(recipients))
    }
}

impl fmt::Display for DeliveryTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, recipient) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(recipient.written())?;
        }
        Ok(())
    }
}

/// A free-text REASON: up to 1 KiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    /// The reason as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Reason {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_REASON_LEN {
            return Err(FieldError::new(format!(
                "is longer than {MAX_REASON_LEN} bytes"
            )));
        }
        Ok(Reason(s.to_owned()))
    }
}

/// A DEFER delay in milliseconds, from one second to one day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayMs(u64);

impl DelayMs {
    /// The delay in milliseconds.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for DelayMs {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u64>() {
            Ok(ms) if (MIN_DEFER_MS..=MAX_DEFER_MS).contains(&ms) => Ok(DelayMs(ms)),
            _ => Err(FieldError::new(format!(
                "must be milliseconds from {MIN_DEFER_MS} to {MAX_DEFER_MS}"
            ))),
        }
    }
}

/// A `BLOCK` number as records carry it.
pub(crate) fn parse_block(s: &str) -> Result<u64, FieldError> {
    s.parse()
        .map_err(|_| FieldError::new("must be the block number of a record"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_recipient_list_is_refused_at_its_limit_not_after_reading_it_all() {
        let list: Vec<String> = (0..200_000).map(|i| format!("r{i}")).collect();
        let refused = list.join(",").parse::<DeliveryTo>().expect_err("too many");
        assert_eq!(refused.to_string(), "lists more than 1000 recipients");
        // Repeats are one recipient, however many there are.
        let repeated = vec!["a"; 200_000].join(",");
        let one = repeated.parse::<DeliveryTo>().expect("one recipient");
        assert_eq!(one.to_string(), "a");
    }

    #[test]
    fn repeats_are_dropped_in_short_and_long_lists_alike() {
        for distinct in [
            1,
            SHORT_LIST - 1,
            SHORT_LIST,
            SHORT_LIST + 1,
            3 * SHORT_LIST,
        ] {
            // Each entry three times, in an order that mixes them, with
            // spaces around some, and `*` among them.
            let entry = |k: usize| match (k * 7) % distinct {
                0 => "*".to_owned(),
                n if k % 3 == 0 => format!(" c{n} "),
                n => format!("c{n}"),
            };
            let written: Vec<String> = (0..3 * distinct).map(entry).collect();
            let mut expected: Vec<String> = Vec::new();
            for e in &written {
                if !expected.contains(&e.trim().to_owned()) {
                    expected.push(e.trim().to_owned());
                }
            }
            let parsed: DeliveryTo = written.join(",").parse().expect("valid list");
            assert_eq!(
                parsed.to_string(),
                expected.join(","),
                "{distinct} distinct"
            );
        }
    }

    #[test]
    fn the_recipient_limit_counts_distinct_entries() {
        let list = |n: usize| -> String {
            let mut entries: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
            entries.extend((0..n).map(|i| format!("r{i}")));
            entries.join(",")
        };
        let at = list(MAX_RECIPIENTS)
            .parse::<DeliveryTo>()
            .expect("at the limit");
        assert_eq!(at.recipients().len(), MAX_RECIPIENTS);
        let past = list(MAX_RECIPIENTS + 1).parse::<DeliveryTo>();
        assert!(past.is_err(), "{} distinct recipients", MAX_RECIPIENTS + 1);
    }

    #[test]
    fn an_invalid_recipient_is_named_not_echoed_in_full() {
        let entry = "\u{1}".repeat(1 << 20);
        let refused = entry.parse::<DeliveryTo>().expect_err("control bytes");
        let message = refused.to_string();
        assert!(message.len() < 600, "{} bytes", message.len());
        assert!(message.contains("(1048576 bytes)"), "{message}");
    }

    mod patterns {
        use super::*;

        fn p(s: &str) -> Pattern {
            s.parse().expect("valid pattern")
        }

        #[test]
        fn below_matches_strictly_below_its_prefix() {
            assert!(p("user/*").matches("user/a"));
            assert!(p("user/*").matches("user/a/b"));
            assert!(!p("user/*").matches("user"));
            assert!(!p("user/*").matches("users/a"));
        }

        #[test]
        fn coverage_follows_matching() {
            assert!(p("user/*").covers(&p("user/*")));
            assert!(p("user/*").covers(&p("user/a/*")));
            assert!(p("user/*").covers(&p("user/a/b")));
            assert!(!p("user/a/*").covers(&p("user/*")));
            assert!(!p("user/a").covers(&p("user/a/*")));
            assert!(p("*").covers(&p("user/*")));
            assert!(!p("user/*").covers(&p("*")));
        }

        #[test]
        fn rejects_inner_wildcards() {
            assert!("user/*/x".parse::<Pattern>().is_err());
            assert!("user*".parse::<Pattern>().is_err());
            assert!("user//x".parse::<Pattern>().is_err());
        }
    }

    mod positions {
        use super::*;

        #[test]
        fn accepts_every_documented_form() {
            assert_eq!(
                "1695420000000".parse::<Position>().ok(),
                Some(Position::Timestamp(1_695_420_000_000))
            );
            assert_eq!(
                "2023-09-22T22:00:00Z".parse::<Position>().ok(),
                Some(Position::Timestamp(1_695_420_000_000))
            );
            assert_eq!(
                "EARLIEST".parse::<Position>().ok(),
                Some(Position::Earliest)
            );
            assert!(matches!(
                "evt_12345abcde".parse::<Position>(),
                Ok(Position::Event(_))
            ));
        }

        #[test]
        fn rejects_garbage() {
            for bad in ["", "yesterday", "evt_", "evt_a;b", "-5", "12.5"] {
                assert!(bad.parse::<Position>().is_err(), "{bad}");
            }
        }
    }

    mod recipients {
        use super::*;

        #[test]
        fn rejects_entries_beginning_with_a_bracket() {
            for bad in [" [a", "[a]", "b, [a", "[a,b]"] {
                assert!(bad.parse::<DeliveryTo>().is_err(), "{bad}");
            }
            assert_eq!(
                " b , a[ ,b"
                    .parse::<DeliveryTo>()
                    .ok()
                    .map(|d| d.to_string()),
                Some("b,a[".to_owned())
            );
        }
    }

    mod payloads {
        use super::*;

        #[test]
        fn json_wins_over_base64_and_both_are_verbatim() {
            assert_eq!(
                "1234".parse::<Payload>().ok(),
                Some(Payload::Json("1234".into()))
            );
            assert_eq!(
                "aGVsbG8=".parse::<Payload>().ok(),
                Some(Payload::Base64("aGVsbG8=".into()))
            );
            assert!("not base64!".parse::<Payload>().is_err());
        }

        #[test]
        fn metadata_numbers_keep_their_value_through_re_encoding() {
            // Too large for u64, so read as a float: its compact form must
            // read back as the same float.
            let long = format!(r#"{{"n":9999{}}}"#, "7".repeat(65));
            let once = long.parse::<Metadata>().expect("an object");
            let twice = once.as_str().parse::<Metadata>().expect("an object");
            assert_eq!(twice, once);
        }

        #[test]
        fn metadata_refuses_reserved_keys() {
            assert!(r#"{"REPLAYED":false}"#.parse::<Metadata>().is_err());
            assert!("[1]".parse::<Metadata>().is_err());
            assert_eq!(
                r#"{"b": 1, "a": 2}"#.parse::<Metadata>().ok().map(|m| m.0),
                Some(r#"{"b":1,"a":2}"#.to_owned())
            );
        }
    }
}
