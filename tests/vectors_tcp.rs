//! Runs every script in `protocol/vectors/` against a real server over
//! TCP: each file is one session on a fresh server and data directory;
//! `>` lines are sent, `<` and `!` lines must be what comes back, in
//! order, and nothing more may come after the last one.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

mod common;

#[path = "../protocol/tests/support/vectors.rs"]
mod vectors;

use vectors::Step;

#[tokio::test]
async fn vectors_hold_over_tcp() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/vectors");
    for file in vectors::load_all(&dir) {
        let data = tempfile::tempdir().expect("temp dir");
        let server = common::start_server(data.path()).await;
        let mut client = server.client().await;
        let mut vars = HashMap::new();
        for (lineno, step) in &file.steps {
            let at = format!("{}:{lineno}", file.name);
            match step {
                Step::Send(line) => client.send(&vectors::substitute(line, &vars)).await,
                Step::Parses(_) => {}
                Step::Fails(reply) => {
                    let got = client.line().await;
                    assert_eq!(got, vectors::substitute(reply, &vars), "{at}");
                }
                Step::Expect(pattern) => {
                    let got = client.line().await;
                    if let Err(why) = vectors::matches(pattern, &got, &mut vars) {
                        panic!("{at}: {why}\n  expected {pattern}\n  got      {got}");
                    }
                }
            }
        }
        client.expect_silence(Duration::from_millis(300)).await;
        drop(client);
        server.stop().await;
    }
}
