//! Shared pieces: the bench configuration, payloads, position samples,
//! slow-reader pacing and the multi-client rate loop.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::report::Rate;

/// Publishes in flight per connection.
pub const WINDOW: usize = 1000;
/// Events per LIMIT replay.
pub const LIMIT_COUNT: usize = 50;
/// Positions remembered per loaded log for seeks and LIMIT replays.
pub const POOL: usize = 4096;

/// What to run and how big (the flags, after `--smoke`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cfg {
    pub n: usize,
    pub payload: usize,
    pub seek_n: usize,
    /// Size of the log at the first seek measurement.
    pub seek_small: usize,
    pub rounds: usize,
    pub workloads: Vec<String>,
    pub limit_secs: f64,
    /// Seek samples per size (NATS: a tenth).
    pub seek_samples: usize,
    /// How long the slow reader of the memory workload reads.
    pub slow_secs: f64,
    /// Names of the `names` workload, an event each.
    pub names: usize,
    /// Live deliveries timed in the `names` workload.
    pub live_samples: usize,
    /// Idle subscribers connected while the `crowd` workload publishes.
    pub crowd_clients: usize,
}

impl Cfg {
    pub fn runs(&self, workload: &str) -> bool {
        self.workloads.iter().any(|w| w == workload)
    }

    pub fn limit_duration(&self) -> Duration {
        Duration::from_secs_f64(self.limit_secs)
    }
}

/// The JSON payload of event `i`, padded to about `size` bytes.
pub fn payload(i: usize, size: usize) -> String {
    let head = format!("{{\"user\":\"u{}\",\"seq\":{i},\"pad\":\"", i % 1000);
    let pad = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// Remembers a value for a few random event indices while a log loads.
pub struct Sampler<T> {
    wanted: Vec<usize>,
    next: usize,
    pub got: Vec<T>,
}

impl<T> Sampler<T> {
    /// Up to `k` distinct random indices in `0..len`.
    pub fn new(len: usize, k: usize, rng: &mut fastrand::Rng) -> Self {
        let wanted: BTreeSet<usize> = (0..k.min(len)).map(|_| rng.usize(0..len)).collect();
        Self {
            wanted: wanted.into_iter().collect(),
            next: 0,
            got: Vec::new(),
        }
    }

    /// Offers event `i` (indices must come in increasing order).
    pub fn offer(&mut self, i: usize, value: impl FnOnce() -> T) {
        if self.wanted.get(self.next) == Some(&i) {
            self.got.push(value());
            self.next += 1;
        }
    }
}

/// A random element of the first `small` or the rest, weighted so that
/// picks are uniform over the whole log (`small_len` of `total` events are
/// in `small`).
pub fn pick<'a, T>(
    rng: &mut fastrand::Rng,
    small: &'a [T],
    rest: &'a [T],
    small_len: usize,
    total: usize,
) -> &'a T {
    if rest.is_empty() || rng.usize(0..total.max(1)) < small_len {
        &small[rng.usize(0..small.len())]
    } else {
        &rest[rng.usize(0..rest.len())]
    }
}

/// Paces a slow reader: about `per_tick` bytes each `tick`, stopping
/// after `total`.
pub struct Pacer {
    start: Instant,
    tick_start: Instant,
    in_tick: usize,
    total: Duration,
}

impl Pacer {
    const PER_TICK: usize = 1 << 20;
    const TICK: Duration = Duration::from_millis(100);

    pub fn new(total: Duration) -> Self {
        let now = Instant::now();
        Self {
            start: now,
            tick_start: now,
            in_tick: 0,
            total,
        }
    }

    /// Accounts `bytes` read; sleeps out the tick when its budget is used.
    /// Returns false once the reader should disconnect.
    pub fn read(&mut self, bytes: usize) -> bool {
        self.in_tick += bytes;
        if self.in_tick >= Self::PER_TICK {
            let end = self.tick_start + Self::TICK;
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
            self.tick_start = Instant::now();
            self.in_tick = 0;
        }
        self.start.elapsed() < self.total
    }
}

/// Runs `op` in a loop on `clients` threads (each with its own connection
/// from `connect`) for `duration`; returns operations per second.
pub fn rate<C: Send>(
    clients: usize,
    duration: Duration,
    connect: impl Fn(usize) -> Result<C> + Sync,
    op: impl Fn(&mut C, &mut fastrand::Rng) -> Result<()> + Sync,
) -> Result<f64> {
    let conns = (0..clients).map(&connect).collect::<Result<Vec<_>>>()?;
    let start = Instant::now();
    let deadline = start + duration;
    let total = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                let op = &op;
                s.spawn(move || -> Result<u64> {
                    let mut rng = fastrand::Rng::new();
                    let mut done = 0;
                    while Instant::now() < deadline {
                        op(&mut conn, &mut rng)?;
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rate client panicked"))
            .sum::<Result<u64>>()
    })?;
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Runs `a` and `b` in turns, `rounds` times each, `a` first: a stretch of
/// a noisy machine then slows both alike, not whichever ran during it.
/// Where a target compares two systems, the bench measures them so.
pub fn in_turns<A, B>(
    rounds: usize,
    mut a: impl FnMut() -> Result<A>,
    mut b: impl FnMut() -> Result<B>,
) -> Result<(Vec<A>, Vec<B>)> {
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        got_a.push(a()?);
        got_b.push(b()?);
    }
    Ok((got_a, got_b))
}

/// A rate from 1 connection and from 8 (`ours(conns)`, `cfg.rounds`
/// rounds each), in turns with a peer's (`peer(conns)`) when one runs
/// beside: ours at 1 and 8, and the peer's.
pub fn rates_1_and_8(
    rounds: usize,
    mut ours: impl FnMut(usize) -> Result<f64>,
    mut peer: Option<impl FnMut(usize) -> Result<f64>>,
) -> Result<([Rate; 2], Option<[Rate; 2]>)> {
    let mut rates = [1, 8].map(|_| (Vec::new(), Vec::new()));
    for (conns, (mine, theirs)) in [1, 8].into_iter().zip(&mut rates) {
        match peer.as_mut() {
            Some(peer) => (*mine, *theirs) = in_turns(rounds, || ours(conns), || peer(conns))?,
            None => *mine = (0..rounds).map(|_| ours(conns)).collect::<Result<_>>()?,
        }
    }
    let [(mine_1, theirs_1), (mine_8, theirs_8)] = rates;
    let theirs = peer.map(|_| [Rate::of(theirs_1), Rate::of(theirs_8)]);
    Ok(([Rate::of(mine_1), Rate::of(mine_8)], theirs))
}

/// Something whose seeks are timed one at a time.
pub trait Seeker {
    /// Times a seek to a random place: µs to its first record.
    fn seek(&mut self, rng: &mut fastrand::Rng) -> Result<f64>;
}

/// Seeks timed in a turn of [`seeks_in_turns`]: about 6 ms of seeking,
/// so that a turn of each of three systems takes about 20 ms.
const SEEK_TURN: usize = 100;

/// `samples` seeks of each seeker, taken in turns of [`SEEK_TURN`].
///
/// Each turn starts with a seek that is not counted. It follows the other
/// systems' turns, and a server's first request after a pause is slower
/// (caches gone cold) than the back-to-back ones measured here: without
/// it, turns would add a slow seek per turn that a run of one system's
/// seeks does not have.
pub fn seeks_in_turns(
    seekers: &mut [&mut dyn Seeker],
    samples: usize,
    rng: &mut fastrand::Rng,
) -> Result<Vec<Vec<f64>>> {
    let mut got = vec![Vec::with_capacity(samples); seekers.len()];
    while got[0].len() < samples {
        let turn = SEEK_TURN.min(samples - got[0].len());
        for (seeker, got) in seekers.iter_mut().zip(&mut got) {
            seeker.seek(rng)?;
            for _ in 0..turn {
                got.push(seeker.seek(rng)?);
            }
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_json_of_about_the_size() {
        let p = payload(17, 256);
        assert_eq!(p.len(), 256);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["seq"], 17);
        assert!(serde_json::from_str::<serde_json::Value>(&payload(3, 1)).is_ok());
    }

    #[test]
    fn seeks_in_turns_take_each_seeker_s_samples_a_turn_at_a_time() {
        /// Records which seeker each seek went to, in one shared log, and
        /// times its seeks 0, 1, 2, ...
        struct Logged<'a>(usize, &'a std::cell::RefCell<Vec<usize>>, f64);
        impl Seeker for Logged<'_> {
            fn seek(&mut self, _: &mut fastrand::Rng) -> Result<f64> {
                self.1.borrow_mut().push(self.0);
                self.2 += 1.0;
                Ok(self.2 - 1.0)
            }
        }
        let log = std::cell::RefCell::new(Vec::new());
        let (mut a, mut b) = (Logged(0, &log, 0.0), Logged(1, &log, 0.0));
        let samples = SEEK_TURN * 2 + 7;
        let got =
            seeks_in_turns(&mut [&mut a, &mut b], samples, &mut fastrand::Rng::new()).unwrap();
        // Each turn's first seek is not counted.
        let counted: Vec<f64> = [SEEK_TURN, SEEK_TURN, 7]
            .into_iter()
            .enumerate()
            .flat_map(|(turn, len)| {
                let first = turn * (SEEK_TURN + 1) + 1;
                (first..first + len).map(|k| k as f64)
            })
            .collect();
        assert_eq!(got, [counted.clone(), counted]);
        let log = log.into_inner();
        let turns: Vec<(usize, usize)> = log
            .chunk_by(|x, y| x == y)
            .map(|run| (run[0], run.len()))
            .collect();
        assert_eq!(
            turns,
            [
                (0, SEEK_TURN + 1),
                (1, SEEK_TURN + 1),
                (0, SEEK_TURN + 1),
                (1, SEEK_TURN + 1),
                (0, 8),
                (1, 8)
            ]
        );
    }

    #[test]
    fn sampler_keeps_wanted_in_order() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut s = Sampler::new(100, 10, &mut rng);
        for i in 0..100 {
            s.offer(i, || i);
        }
        assert_eq!(s.got.len(), s.wanted.len());
        assert!(s.got.windows(2).all(|w| w[0] < w[1]));
    }
}
