//! Reads the conformance vectors in `protocol/vectors/`: shared by the
//! parser test in this crate and the TCP test of the server.
//!
//! Line kinds: `>` a line the client sends; `=` the canonical encoding the
//! previous `>` line parses to; `!` the exact `-FAIL` reply it is refused
//! with (by the parser, so also by a server); `<` a line a server sends;
//! `#` a comment. In `<` lines `{*}` matches a run of characters other
//! than `;` `,` `"` `}`, `{$name}` does the same and captures it, `{**}`
//! matches the rest of the line, and `$name` stands for a captured value
//! (in `>` lines too).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

/// One step of a vector script.
#[derive(Debug, Clone)]
pub enum Step {
    /// `>`: send this line.
    Send(String),
    /// `=`: the previous line parses to this canonical form.
    Parses(String),
    /// `!`: the previous line is refused with this reply.
    Fails(String),
    /// `<`: the server sends a line matching this pattern.
    Expect(String),
}

/// A vector file: its name and steps with their line numbers.
#[derive(Debug)]
pub struct VectorFile {
    pub name: String,
    pub steps: Vec<(usize, Step)>,
}

/// Every `*.txt` file in `dir`, sorted by name.
pub fn load_all(dir: &Path) -> Vec<VectorFile> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .expect("vectors directory exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no vectors in {}", dir.display());
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).expect("readable vector file");
            let steps = text
                .lines()
                .enumerate()
                .filter_map(|(i, line)| {
                    let step = if let Some(rest) = line.strip_prefix("> ") {
                        Step::Send(rest.to_owned())
                    } else if let Some(rest) = line.strip_prefix("= ") {
                        Step::Parses(rest.to_owned())
                    } else if let Some(rest) = line.strip_prefix("! ") {
                        Step::Fails(rest.to_owned())
                    } else if let Some(rest) = line.strip_prefix("< ") {
                        Step::Expect(rest.to_owned())
                    } else if line.is_empty() || line.starts_with('#') {
                        return None;
                    } else {
                        panic!("{}:{}: unknown vector line {line:?}", path.display(), i + 1);
                    };
                    Some((i + 1, step))
                })
                .collect();
            VectorFile {
                name: path
                    .file_name()
                    .expect("file name")
                    .to_string_lossy()
                    .into_owned(),
                steps,
            }
        })
        .collect()
}

/// Replaces `$name` by captured values (longest names first, so `$e1`
/// never eats the start of `$e10`).
pub fn substitute(line: &str, vars: &HashMap<String, String>) -> String {
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut out = line.to_owned();
    for name in names {
        out = out.replace(&format!("${name}"), &vars[name]);
    }
    out
}

fn is_wild(c: char) -> bool {
    !matches!(c, ';' | ',' | '"' | '}')
}

/// Matches `actual` against an expectation, capturing into `vars`.
///
/// # Errors
/// Where the match failed.
pub fn matches(
    pattern: &str,
    actual: &str,
    vars: &mut HashMap<String, String>,
) -> Result<(), String> {
    let pattern = substitute(pattern, vars);
    let (mut p, mut a) = (pattern.as_str(), actual);
    while !p.is_empty() {
        if let Some(rest) = p.strip_prefix("{**}") {
            assert!(rest.is_empty(), "{{**}} must end a pattern");
            return Ok(());
        }
        let token = if p.starts_with("{*}") {
            Some((3, None))
        } else if let Some(rest) = p.strip_prefix("{$") {
            rest.find('}')
                .map(|end| (end + 3, Some(rest[..end].to_owned())))
        } else {
            None
        };
        if let Some((len, capture)) = token {
            let run = a.find(|c| !is_wild(c)).unwrap_or(a.len());
            if run == 0 {
                return Err(format!("expected a value at {a:?}"));
            }
            if let Some(name) = capture {
                vars.insert(name, a[..run].to_owned());
            }
            p = &p[len..];
            a = &a[run..];
            continue;
        }
        let literal_len = p.find('{').map_or(p.len(), |i| if i == 0 { 1 } else { i });
        let literal = &p[..literal_len];
        match a.strip_prefix(literal) {
            Some(rest) => {
                p = &p[literal_len..];
                a = rest;
            }
            None => return Err(format!("expected {literal:?} at {a:?}")),
        }
    }
    if a.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected trailing {a:?}"))
    }
}
