//! Whether a text is JSON, read in one pass without building anything.
//!
//! A published payload is stored as it was sent, so the server only needs
//! to know that it is JSON (RFC 8259: one value, whitespace around it). A
//! string's end is found with `memchr` and the characters before it are
//! checked a vector at a time: a payload's bytes are mostly in strings,
//! which `serde_json` reads a byte at a time. It accepts exactly what
//! `serde_json` accepts (deserializing into `IgnoredAny`), including a
//! `\u` escape of a lone surrogate and any depth of nesting; the fuzz
//! target `json` compares the two.

/// Whether `text` is one JSON value, with only whitespace around it.
pub fn is_json(text: &str) -> bool {
    let bytes = text.as_bytes();
    match value_end(bytes, skip_ws(bytes, 0)) {
        Some(end) => skip_ws(bytes, end) == bytes.len(),
        None => false,
    }
}

/// The length of the JSON value `text` starts with (no whitespace before
/// it), or `None` when it does not start with one; what follows the
/// value is not read.
pub fn value_len(text: &str) -> Option<usize> {
    value_end(text.as_bytes(), 0)
}

/// Where the value starting at `at` ends, or `None` when it is not JSON.
fn value_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    let mut open = Nesting::default();
    loop {
        // A value starts at `at`.
        match *bytes.get(at)? {
            opening @ (b'{' | b'[') => {
                let container = if opening == b'{' {
                    Container::Object
                } else {
                    Container::Array
                };
                at = skip_ws(bytes, at + 1);
                if bytes.get(at) == Some(&container.closing()) {
                    at += 1;
                } else {
                    open.push(container);
                    at = member_start(bytes, at, container)?;
                    continue;
                }
            }
            b'"' => at = string_end(bytes, at + 1)?,
            b't' => at = literal_end(bytes, at, b"true")?,
            b'f' => at = literal_end(bytes, at, b"false")?,
            b'n' => at = literal_end(bytes, at, b"null")?,
            b'-' | b'0'..=b'9' => at = number_end(bytes, at)?,
            _ => return None,
        }
        // A value ended at `at`: close what it ends, up to the next value.
        loop {
            let Some(container) = open.innermost() else {
                return Some(at);
            };
            at = skip_ws(bytes, at);
            match (*bytes.get(at)?, container) {
                (b',', container) => {
                    at = member_start(bytes, at + 1, container)?;
                    break;
                }
                (byte, container) if byte == container.closing() => {
                    open.pop();
                    at += 1;
                }
                _ => return None,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

impl Container {
    fn closing(self) -> u8 {
        match self {
            Container::Object => b'}',
            Container::Array => b']',
        }
    }
}

/// The containers open around the current value, innermost last: one bit
/// each, 64 to a word, so only nesting deeper than 64 allocates.
#[derive(Default)]
struct Nesting {
    depth: usize,
    /// The innermost (up to) 64 levels; bit 0 is the innermost, set for
    /// an object.
    word: u64,
    /// The full words of the levels outside `word`.
    outer: Vec<u64>,
}

impl Nesting {
    fn push(&mut self, container: Container) {
        if self.depth > 0 && self.depth % 64 == 0 {
            self.outer.push(self.word);
            self.word = 0;
        }
        self.word = self.word << 1 | u64::from(container == Container::Object);
        self.depth += 1;
    }

    fn pop(&mut self) {
        self.word >>= 1;
        self.depth -= 1;
        if self.depth > 0 && self.depth % 64 == 0 {
            self.word = self.outer.pop().unwrap_or_default();
        }
    }

    fn innermost(&self) -> Option<Container> {
        match (self.depth, self.word & 1) {
            (0, _) => None,
            (_, 1) => Some(Container::Object),
            _ => Some(Container::Array),
        }
    }
}

/// Where the value of a member of `container` starts, from `at` (just
/// past its opening bracket or a comma): past whitespace and, in an
/// object, past `"key" ws ":" ws`.
fn member_start(bytes: &[u8], at: usize, container: Container) -> Option<usize> {
    let at = skip_ws(bytes, at);
    if container == Container::Array {
        return Some(at);
    }
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let at = skip_ws(bytes, string_end(bytes, at + 1)?);
    (bytes.get(at) == Some(&b':')).then(|| skip_ws(bytes, at + 1))
}

fn skip_ws(bytes: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(at) {
        at += 1;
    }
    at
}

/// The end of a string whose opening quote is just before `at`.
fn string_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let rest = bytes.get(at..)?;
        let plain = memchr::memchr2(b'"', b'\\', rest)?;
        if has_control(&rest[..plain]) {
            return None;
        }
        at += plain;
        if bytes[at] == b'"' {
            return Some(at + 1);
        }
        match *bytes.get(at + 1)? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => at += 2,
            b'u' => {
                let digits = bytes.get(at + 2..at + 6)?;
                if !digits.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                at += 6;
            }
            _ => return None,
        }
    }
}

/// Whether `plain` holds a control character, which a string must escape.
fn has_control(plain: &[u8]) -> bool {
    // Folded without an early exit, so that the compiler reads the bytes
    // a vector at a time.
    plain
        .iter()
        .fold(false, |found, &byte| found | (byte < 0x20))
}

fn literal_end(bytes: &[u8], at: usize, literal: &[u8]) -> Option<usize> {
    let end = at + literal.len();
    (bytes.get(at..end)? == literal).then_some(end)
}

/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?` at `at`.
fn number_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    if bytes[at] == b'-' {
        at += 1;
    }
    match *bytes.get(at)? {
        b'0' => at += 1,
        b'1'..=b'9' => at = digits_end(bytes, at + 1),
        _ => return None,
    }
    if bytes.get(at) == Some(&b'.') {
        let end = digits_end(bytes, at + 1);
        if end == at + 1 {
            return None;
        }
        at = end;
    }
    if let Some(b'e' | b'E') = bytes.get(at) {
        at += 1;
        if let Some(b'+' | b'-') = bytes.get(at) {
            at += 1;
        }
        let end = digits_end(bytes, at);
        if end == at {
            return None;
        }
        at = end;
    }
    Some(at)
}

fn digits_end(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(u8::is_ascii_digit) {
        at += 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::is_json;

    fn serde_says(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    }

    #[test]
    fn agrees_with_serde_json_on_edge_cases() {
        let nested = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let deep_objects = format!("{}{}", r#"{"a":"#.repeat(130), "}".repeat(130));
        let unbalanced = format!("{}{}", "[".repeat(70), "]".repeat(69));
        let cases = [
            "",
            " ",
            "{}",
            "[]",
            " {} ",
            "{",
            "}",
            "[",
            "]",
            "{]",
            "[}",
            "[1,]",
            "[,1]",
            "{,}",
            r#"{"a":1,}"#,
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{a:1}"#,
            r#"{"a" : 1 , "b":[true,false,null]}"#,
            "1",
            "-",
            "-0",
            "01",
            "1.",
            "1.5",
            ".5",
            "1e",
            "1e+",
            "1E-7",
            "-12.5e10",
            "1x",
            "[01]",
            "tru",
            "true",
            "truex",
            "nul",
            "null",
            "false",
            r#""a""#,
            r#""a"#,
            r#""\""#,
            r#""\u12""#,
            r#""\u12ab""#,
            r#""\ud800""#,
            r#""\x""#,
            r#""\/""#,
            "\"a\u{1}b\"",
            "\"a\tb\"",
            "\"\u{7f}\"",
            "\"é ü 語\"",
            "[1]  x",
            "\t[1]\r\n",
            r#"{"a":{"b":{}}}"#,
            r#"["aaaaaaaaaaaaaaaa\"bbbbbbbbbbbbbbbbbbbbbbb"]"#,
            r#"["aaaaaaa\\"]"#,
            "[\"aaaaaaaaaaaaaaaaaa\u{1f}bbbbbbbbbbbbbbbbbbb\"]",
            "\"aaaaaaaaaaaaaaaaaaaaaaa",
            "[\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\\\\\\u00e9\"]",
            &nested,
            &deep_objects,
            &unbalanced,
        ];
        for case in cases {
            assert_eq!(is_json(case), serde_says(case), "{case:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_serde_json(text in r#"[ \t\r\n{}\[\]":,\\/0-9eE.+\-tfnrulasxbu\x01\x1f\u{e9}]{0,40}"#) {
            proptest::prop_assert_eq!(is_json(&text), serde_says(&text), "{:?}", text);
        }

        #[test]
        fn agrees_with_serde_json_on_changed_json(
            value in json_value(),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::sample::select(br#" {}[]":,\/0-9eE.+-tfnu"#.to_vec()),
            change in 0..3u8,
        ) {
            let mut bytes = value.to_string().into_bytes();
            let at = at.index(bytes.len() + 1);
            match change {
                0 if at < bytes.len() => bytes[at] = byte,
                1 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, byte),
            }
            // A change inside a multi-byte character is not text.
            if let Ok(text) = String::from_utf8(bytes) {
                proptest::prop_assert_eq!(is_json(&text), serde_says(&text), "{:?}", text);
            }
        }

        #[test]
        fn accepts_what_serde_json_writes(value in json_value()) {
            let text = value.to_string();
            proptest::prop_assert!(is_json(&text), "{}", text);
            let pretty = serde_json::to_string_pretty(&value).expect("serializes");
            proptest::prop_assert!(is_json(&pretty), "{}", pretty);
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
