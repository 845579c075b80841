//! Time to parse typical command lines, in ns per line (best of 7 runs).
//!
//! `cargo bench -p ensync-protocol --bench parse`. Pin it to a core
//! (`taskset -c 1`) and compare two builds in one sitting: the numbers
//! move with the machine.

use std::hint::black_box;
use std::time::Instant;

use ensync_protocol::parse_command;

const LINES_PER_RUN: u32 = 200_000;

fn main() {
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
                for _ in 0..LINES_PER_RUN {
                    black_box(parse_command(black_box(line)).ok());
                }
                start.elapsed().as_nanos() as f64 / f64::from(LINES_PER_RUN)
            })
            .fold(f64::INFINITY, f64::min);
        println!("{what:<10} {best:>7.1} ns/line");
    }
}
