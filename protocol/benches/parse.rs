//! Time to parse typical command lines, in ns per line (best of 7 runs).
//!
//! `cargo bench -p ensync-protocol --bench parse`. Pin it to a core
//! (`taskset -c 1`) and compare two builds in one sitting: the numbers
//! move with the machine. Or count instructions, which do not: run the
//! bench binary under `valgrind --tool=callgrind` with `LINES=1000`
//! (lines per run instead of 200,000) and compare the totals.

use std::hint::black_box;
use std::time::Instant;

use ensync_protocol::parse_command;

fn main() {
    let lines_per_run: u32 = std::env::var("LINES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let payload = format!(
        "{{\"order\":12345,\"kind\":\"created\",\"note\":\"{}\"}}",
        "x".repeat(200)
    );
    let lines = [
        (
            "PUB to *",
            format!("PUB;CLIENT_ID=svc;EVENT_NAME=orders/eu/created;PAYLOAD={payload};DELIVERY_TO=*"),
        ),
        (
            "PUB to 2",
            format!(
                "PUB;CLIENT_ID=svc;EVENT_NAME=orders/eu/created;PAYLOAD={payload};DELIVERY_TO=billing,audit"
            ),
        ),
        (
            "REPLAY",
            "REPLAY;CLIENT_ID=svc;EVENT_NAME=orders/*;FROM_POSITION=1795319485842;LIMIT=50".to_owned(),
        ),
    ];
    for (what, line) in &lines {
        parse_command(line).expect("the bench's lines are valid");
        let best = (0..7)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..lines_per_run {
                    black_box(parse_command(black_box(line)).ok());
                }
                start.elapsed().as_nanos() as f64 / f64::from(lines_per_run)
            })
            .fold(f64::INFINITY, f64::min);
        println!("{what:<10} {best:>7.1} ns/line");
    }
}
