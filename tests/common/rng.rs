//! A seeded pseudo-random source for tests (splitmix64): the same seed
//! gives the same numbers on every machine, so a failing run can be
//! repeated from the seed it printed.

use std::time::{SystemTime, UNIX_EPOCH};

/// splitmix64: small, and every seed gives a usable sequence.
pub struct Rng(pub u64);

impl Rng {
    /// Seeds from the environment variable `var` when set, else from the
    /// clock and the process id, and prints the seed with how to repeat
    /// the run.
    pub fn seeded(var: &str, test: &str) -> Self {
        let seed = match std::env::var(var) {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{var} must be a u64, got {s:?}")),
            Err(_) => {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_nanos() as u64;
                nanos ^ u64::from(std::process::id()).rotate_left(32)
            }
        };
        eprintln!("{test}: seed {seed} ({var}={seed} repeats this run)");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform enough in `0..=max`.
    pub fn upto(&mut self, max: u64) -> u64 {
        self.next() % (max + 1)
    }

    /// Any byte but LF, so a generated line stays one line.
    pub fn byte(&mut self) -> u8 {
        loop {
            let b = self.next() as u8;
            if b != b'\n' {
                return b;
            }
        }
    }

    /// `n` bytes, none of them LF.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}
