//! Runs `protocol/vectors/` through the parser and the reply encoder: every
//! `>` line followed by `=` must parse to that canonical form (and that
//! form must parse to the same command), every one followed by `!` must be
//! refused with exactly that reply.

use std::collections::HashMap;
use std::path::Path;

use ensync_protocol::parse_command;

#[path = "support/vectors.rs"]
mod vectors;

use vectors::Step;

/// The LIMIT maximum the vectors assume (the server's default).
const MAX_LIMIT: u32 = 100_000;

#[test]
fn vectors_parse_and_encode_as_written() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors");
    let mut checked = 0;
    for file in vectors::load_all(&dir) {
        let mut last: Option<(usize, String)> = None;
        let vars = HashMap::new();
        for (lineno, step) in &file.steps {
            let at = format!("{}:{lineno}", file.name);
            match step {
                Step::Send(line) => last = Some((*lineno, line.clone())),
                Step::Parses(canonical) => {
                    let (_, line) = last
                        .as_ref()
                        .unwrap_or_else(|| panic!("{at}: '=' without '>'"));
                    assert!(
                        !line.contains('$'),
                        "{at}: a parse vector cannot use captures"
                    );
                    let cmd = parse_command(line)
                        .unwrap_or_else(|e| panic!("{at}: {line:?} failed: {e}"));
                    assert_eq!(&cmd.to_string(), canonical, "{at}");
                    let again = parse_command(canonical)
                        .unwrap_or_else(|e| panic!("{at}: canonical form failed: {e}"));
                    assert_eq!(again, cmd, "{at}: canonical form parses differently");
                    checked += 1;
                }
                Step::Fails(reply) => {
                    let (_, line) = last
                        .as_ref()
                        .unwrap_or_else(|| panic!("{at}: '!' without '>'"));
                    let line = vectors::substitute(line, &vars);
                    if line.contains('$') {
                        // Depends on a value captured from a server; the
                        // TCP runner checks it.
                        continue;
                    }
                    let err =
                        parse_command(&line).expect_err(&format!("{at}: {line:?} must be refused"));
                    assert_eq!(&err.to_reply(MAX_LIMIT).to_string(), reply, "{at}");
                    checked += 1;
                }
                Step::Expect(_) => {}
            }
        }
    }
    assert!(checked > 40, "only {checked} vectors checked");
}
