//! Results per system, the targets, the printed table and the JSON file.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::common::Cfg;
use crate::lineconn::Received;
use crate::procs::Rss;
use crate::stats::{median, percentile};

/// The systems, in table order.
pub const SYSTEMS: [&str; 4] = ["ensync", "redis", "nats", "ceiling"];

/// A rate measured over rounds; `median` is what the table shows.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub median: f64,
    pub rounds: Vec<f64>,
}

/// A full replay: events and bytes received, rates (median of rounds).
#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    pub events: u64,
    pub bytes: u64,
    pub events_per_s: f64,
    pub mb_per_s: f64,
    pub rounds_events_per_s: Vec<f64>,
}

/// Seek latency percentiles (µs) at two log sizes.
#[derive(Debug, Clone, Serialize)]
pub struct Seek {
    pub small_n: usize,
    pub large_n: usize,
    pub samples_small: usize,
    pub samples_large: usize,
    pub p50_small_us: f64,
    pub p99_small_us: f64,
    pub p50_large_us: f64,
    pub p99_large_us: f64,
    /// KiB the server read from storage while it was timed, at each size
    /// (measured for ensync-server): seeks whose bytes the kernel had
    /// evicted from the page cache wait for the disk.
    pub storage_read_small_kib: Option<f64>,
    pub storage_read_large_kib: Option<f64>,
}

impl Seek {
    pub fn new(small_n: usize, large_n: usize, small: &[f64], large: &[f64]) -> Self {
        Self {
            small_n,
            large_n,
            samples_small: small.len(),
            samples_large: large.len(),
            p50_small_us: percentile(small, 50.0).unwrap_or(f64::NAN),
            p99_small_us: percentile(small, 99.0).unwrap_or(f64::NAN),
            p50_large_us: percentile(large, 50.0).unwrap_or(f64::NAN),
            p99_large_us: percentile(large, 99.0).unwrap_or(f64::NAN),
            storage_read_small_kib: None,
            storage_read_large_kib: None,
        }
    }
}

/// Server RSS (MiB) before and peak during a full replay to a fast and a
/// slow reader: all of it, and its anonymous part ([`Rss`]).
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub fast_before_mib: f64,
    pub fast_peak_mib: f64,
    pub fast_growth_mib: f64,
    pub fast_anon_before_mib: f64,
    pub fast_anon_growth_mib: f64,
    pub slow_before_mib: f64,
    pub slow_peak_mib: f64,
    pub slow_growth_mib: f64,
    pub slow_anon_growth_mib: f64,
    pub slow_bytes_read: u64,
}

impl Memory {
    pub fn new(
        before: Rss,
        fast_peak: Rss,
        slow_before: Rss,
        slow_peak: Rss,
        slow_bytes: u64,
    ) -> Self {
        Self {
            fast_before_mib: mib(before.all_kib),
            fast_peak_mib: mib(fast_peak.all_kib),
            fast_growth_mib: growth_mib(before.all_kib, fast_peak.all_kib),
            fast_anon_before_mib: mib(before.anon_kib),
            fast_anon_growth_mib: growth_mib(before.anon_kib, fast_peak.anon_kib),
            slow_before_mib: mib(slow_before.all_kib),
            slow_peak_mib: mib(slow_peak.all_kib),
            slow_growth_mib: growth_mib(slow_before.all_kib, slow_peak.all_kib),
            slow_anon_growth_mib: growth_mib(slow_before.anon_kib, slow_peak.anon_kib),
            slow_bytes_read: slow_bytes,
        }
    }

    /// The growth the targets hold to 64 MiB: the larger of all of the
    /// RSS's and its anonymous part's, so that mapped pages let go during
    /// the replay hide no growth of what the server holds.
    pub fn fast_target_mib(&self) -> f64 {
        self.fast_growth_mib.max(self.fast_anon_growth_mib)
    }

    /// [`Memory::fast_target_mib`] for the slow reader.
    pub fn slow_target_mib(&self) -> f64 {
        self.slow_growth_mib.max(self.slow_anon_growth_mib)
    }
}

/// KiB as MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// MiB from `before` to `peak` (KiB), 0 when it fell.
pub fn growth_mib(before: u64, peak: u64) -> f64 {
    mib(peak.saturating_sub(before))
}

/// A pattern over many names with an event each: LIMIT-50 replays of it
/// from one client, full replays, live deliveries to a subscription to it
/// (µs from publishing to the record), and the server's RSS meanwhile.
#[derive(Debug, Clone, Serialize)]
pub struct Names {
    pub names: usize,
    pub limit_1: Rate,
    pub replay: Replay,
    pub live_samples: usize,
    pub live_p50_us: f64,
    pub live_p99_us: f64,
    pub rss_before_mib: f64,
    pub rss_growth_mib: f64,
    pub anon_growth_mib: f64,
}

/// Everything measured for one system; `None` when not measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Results {
    pub publish_1: Option<Rate>,
    pub publish_8: Option<Rate>,
    /// Publishing from 1 connection (as `publish_1`) while
    /// `crowd_clients` others wait for names nobody publishes.
    pub crowd: Option<Rate>,
    pub replay: Option<Replay>,
    pub mixed: Option<Replay>,
    /// A full replay of a name published a few events at a time.
    pub trickle: Option<Replay>,
    pub seek: Option<Seek>,
    pub limit_1: Option<Rate>,
    pub limit_8: Option<Rate>,
    /// KiB the server read from storage over its LIMIT-50 replays: more
    /// than none when the log's pages had left the page cache.
    pub limit_storage_read_kib: Option<f64>,
    pub memory: Option<Memory>,
    pub names: Option<Names>,
}

impl Rate {
    /// The median of `rounds`.
    pub fn of(rounds: Vec<f64>) -> Self {
        Self {
            median: median(&rounds).unwrap_or(f64::NAN),
            rounds,
        }
    }
}

/// Runs `f` once per round; the median of what it returns.
pub fn rounds(cfg: &Cfg, f: impl FnMut(usize) -> Result<f64>) -> Result<Rate> {
    Ok(Rate::of((0..cfg.rounds).map(f).collect::<Result<_>>()?))
}

impl Replay {
    /// From full replays' rounds, each checked to have got `expect` events.
    pub fn of(expect: u64, rounds: &[(Received, Duration)]) -> Result<Self> {
        let mut eps = Vec::new();
        let mut mbps = Vec::new();
        let mut last = Received::default();
        for &(got, took) in rounds {
            if got.lines != expect {
                bail!("replay got {} events, expected {expect}", got.lines);
            }
            eps.push(got.lines as f64 / took.as_secs_f64());
            mbps.push(got.bytes as f64 / 1e6 / took.as_secs_f64());
            last = got;
        }
        Ok(Self {
            events: last.lines,
            bytes: last.bytes,
            events_per_s: median(&eps).unwrap_or(f64::NAN),
            mb_per_s: median(&mbps).unwrap_or(f64::NAN),
            rounds_events_per_s: eps,
        })
    }
}

/// Runs a full replay once per round, checking it got `expect` events.
pub fn replay_rounds(
    cfg: &Cfg,
    expect: u64,
    mut f: impl FnMut() -> Result<(Received, Duration)>,
) -> Result<Replay> {
    let rounds = (0..cfg.rounds).map(|_| f()).collect::<Result<Vec<_>>>()?;
    Replay::of(expect, &rounds)
}

/// One target: PASS/MISS, or `None` when its inputs were not measured.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: &'static str,
    pub pass: Option<bool>,
    pub detail: String,
}

/// The whole run, as written to the JSON file.
#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub pinning: String,
    /// Which workloads were measured in turns, and with which systems.
    pub turns: String,
    pub versions: BTreeMap<&'static str, String>,
    pub config: Cfg,
    pub systems: BTreeMap<&'static str, Results>,
    /// Percent of each CPU's time the hypervisor took while each system's
    /// run went on (its turns with the others included): a run with much
    /// of it was slowed unevenly, and its ratios say less.
    pub steal: BTreeMap<&'static str, Vec<f64>>,
    pub targets: Vec<Target>,
}

impl Report {
    /// The hypervisor's share of each CPU during each system's run, as
    /// one line ending in a newline; empty without /proc/stat.
    fn steal_line(&self) -> String {
        let runs: Vec<String> = self
            .steal
            .iter()
            .filter(|(_, cpus)| !cpus.is_empty())
            .map(|(system, cpus)| {
                let cpus: Vec<String> = cpus
                    .iter()
                    .enumerate()
                    .map(|(cpu, percent)| format!("CPU {cpu} {percent:.1}%"))
                    .collect();
                format!("{system}'s run {}", cpus.join(", "))
            })
            .collect();
        if runs.is_empty() {
            return String::new();
        }
        format!("stolen by the hypervisor: {}\n", runs.join("; "))
    }

    /// Evaluates the targets from the systems' results.
    pub fn evaluate(&mut self) {
        let get = |s: &str| self.systems.get(s).cloned().unwrap_or_default();
        let (e, r, c) = (get("ensync"), get("redis"), get("ceiling"));
        let ratio = |name, a: Option<f64>, b: Option<f64>, k: f64, ge: bool| {
            let (pass, detail) = match (a, b) {
                (Some(a), Some(b)) => {
                    let pass = if ge { a >= k * b } else { a <= k * b };
                    (Some(pass), format!("{a:.1} vs {k} x {b:.1}"))
                }
                _ => (None, "not measured".into()),
            };
            Target { name, pass, detail }
        };
        let seek_large = |s: &Results| s.seek.as_ref().map(|s| s.p99_large_us);
        let seek_small = |s: &Results| s.seek.as_ref().map(|s| s.p99_small_us);
        let rss = |m: Option<f64>| m.map(|_| 64.0);
        let fast = e.memory.as_ref().map(Memory::fast_target_mib);
        let slow = e.memory.as_ref().map(Memory::slow_target_mib);
        self.targets = vec![
            ratio(
                "replay events/s >= 0.5 x ceiling",
                e.replay.as_ref().map(|x| x.events_per_s),
                c.replay.as_ref().map(|x| x.events_per_s),
                0.5,
                true,
            ),
            ratio(
                "publish 1 conn >= redis",
                e.publish_1.as_ref().map(|x| x.median),
                r.publish_1.as_ref().map(|x| x.median),
                1.0,
                true,
            ),
            ratio(
                "publish 8 conns >= redis",
                e.publish_8.as_ref().map(|x| x.median),
                r.publish_8.as_ref().map(|x| x.median),
                1.0,
                true,
            ),
            ratio(
                "seek p99 at seek-n <= 1.3 x ceiling",
                seek_large(&e),
                seek_large(&c),
                1.3,
                false,
            ),
            ratio(
                "seek p99 at seek-n <= 1.3 x at small",
                seek_large(&e),
                seek_small(&e),
                1.3,
                false,
            ),
            ratio(
                "limit-50 8 clients >= 0.8 x ceiling",
                e.limit_8.as_ref().map(|x| x.median),
                c.limit_8.as_ref().map(|x| x.median),
                0.8,
                true,
            ),
            ratio(
                "rss growth fast reader <= 64 MiB",
                fast,
                rss(fast),
                1.0,
                false,
            ),
            ratio(
                "rss growth slow reader <= 64 MiB",
                slow,
                rss(slow),
                1.0,
                false,
            ),
        ];
    }

    /// The table: one row per metric, one column per system, and the
    /// target verdict.
    pub fn table(&self) -> String {
        type Metric = fn(&Results) -> Option<f64>;
        let crowd = format!("publish 1 conn, {} idle (ev/s)", self.config.crowd_clients);
        let rows: [(&str, Metric, Option<&[usize]>); 30] = [
            (
                "publish 1 conn (ev/s)",
                |r| r.publish_1.as_ref().map(|x| x.median),
                Some(&[1]),
            ),
            (
                "publish 8 conns (ev/s)",
                |r| r.publish_8.as_ref().map(|x| x.median),
                Some(&[2]),
            ),
            (&crowd, |r| r.crowd.as_ref().map(|x| x.median), None),
            (
                "replay (ev/s)",
                |r| r.replay.as_ref().map(|x| x.events_per_s),
                Some(&[0]),
            ),
            (
                "replay (MB/s)",
                |r| r.replay.as_ref().map(|x| x.mb_per_s),
                None,
            ),
            (
                "mixed 1/10 (ev/s)",
                |r| r.mixed.as_ref().map(|x| x.events_per_s),
                None,
            ),
            (
                "mixed 1/10 (MB/s)",
                |r| r.mixed.as_ref().map(|x| x.mb_per_s),
                None,
            ),
            (
                "trickled replay (ev/s)",
                |r| r.trickle.as_ref().map(|x| x.events_per_s),
                None,
            ),
            (
                "seek p50 small (us)",
                |r| r.seek.as_ref().map(|x| x.p50_small_us),
                None,
            ),
            (
                "seek p99 small (us)",
                |r| r.seek.as_ref().map(|x| x.p99_small_us),
                None,
            ),
            (
                "seek p50 seek-n (us)",
                |r| r.seek.as_ref().map(|x| x.p50_large_us),
                None,
            ),
            (
                "seek p99 seek-n (us)",
                |r| r.seek.as_ref().map(|x| x.p99_large_us),
                Some(&[3, 4]),
            ),
            (
                "seek disk reads small (KiB)",
                |r| r.seek.as_ref().and_then(|x| x.storage_read_small_kib),
                None,
            ),
            (
                "seek disk reads seek-n (KiB)",
                |r| r.seek.as_ref().and_then(|x| x.storage_read_large_kib),
                None,
            ),
            (
                "limit-50 1 client (/s)",
                |r| r.limit_1.as_ref().map(|x| x.median),
                None,
            ),
            (
                "limit-50 8 clients (/s)",
                |r| r.limit_8.as_ref().map(|x| x.median),
                Some(&[5]),
            ),
            ("limit disk reads (KiB)", |r| r.limit_storage_read_kib, None),
            (
                "rss before (MiB)",
                |r| r.memory.as_ref().map(|x| x.fast_before_mib),
                None,
            ),
            (
                "rss growth fast (MiB)",
                |r| r.memory.as_ref().map(|x| x.fast_growth_mib),
                Some(&[6]),
            ),
            (
                "rss growth slow (MiB)",
                |r| r.memory.as_ref().map(|x| x.slow_growth_mib),
                Some(&[7]),
            ),
            (
                "anon before (MiB)",
                |r| r.memory.as_ref().map(|x| x.fast_anon_before_mib),
                None,
            ),
            (
                "anon growth fast (MiB)",
                |r| r.memory.as_ref().map(|x| x.fast_anon_growth_mib),
                Some(&[6]),
            ),
            (
                "anon growth slow (MiB)",
                |r| r.memory.as_ref().map(|x| x.slow_anon_growth_mib),
                Some(&[7]),
            ),
            (
                "slow reader read (MB)",
                |r| r.memory.as_ref().map(|x| x.slow_bytes_read as f64 / 1e6),
                None,
            ),
            (
                "names limit-50 (/s)",
                |r| r.names.as_ref().map(|x| x.limit_1.median),
                None,
            ),
            (
                "names replay (ev/s)",
                |r| r.names.as_ref().map(|x| x.replay.events_per_s),
                None,
            ),
            (
                "names live p50 (us)",
                |r| r.names.as_ref().map(|x| x.live_p50_us),
                None,
            ),
            (
                "names live p99 (us)",
                |r| r.names.as_ref().map(|x| x.live_p99_us),
                None,
            ),
            (
                "names rss growth (MiB)",
                |r| r.names.as_ref().map(|x| x.rss_growth_mib),
                None,
            ),
            (
                "names anon growth (MiB)",
                |r| r.names.as_ref().map(|x| x.anon_growth_mib),
                None,
            ),
        ];
        let mut out = format!(
            "machine: {}\npinning: {}\nin turns: {}\nversions: {}\nn={} payload={}B seek-n={} (small {}) rounds={} (median)\n",
            self.machine,
            self.pinning,
            self.turns,
            self.versions
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; "),
            self.config.n,
            self.config.payload,
            self.config.seek_n,
            self.config.seek_small,
            self.config.rounds,
        );
        out += &format!("{}\n", self.steal_line());
        // Wide enough for the longest label, so that every row lines up.
        let width = rows
            .iter()
            .map(|(label, ..)| label.len())
            .fold(26, usize::max);
        out += &format!("{:<width$}", "metric");
        for s in SYSTEMS {
            out += &format!("{s:>14}");
        }
        out += "  target\n";
        for (label, metric, targets) in rows {
            out += &format!("{label:<width$}");
            for s in SYSTEMS {
                let v = self.systems.get(s).and_then(metric);
                out += &format!("{:>14}", v.map_or("-".into(), fmt_num));
            }
            if let Some(ts) = targets {
                let verdicts: Vec<&str> = ts
                    .iter()
                    .map(|&t| match self.targets[t].pass {
                        Some(true) => "PASS",
                        Some(false) => "MISS",
                        None => "-",
                    })
                    .collect();
                out += &format!("  {}", verdicts.join("/"));
            }
            out += "\n";
        }
        out += "\ntargets (ensync):\n";
        for t in &self.targets {
            let v = match t.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "-",
            };
            out += &format!("  {v:<5} {} ({})\n", t.name, t.detail);
        }
        out
    }
}

/// Numbers with about three significant digits, thousands grouped.
fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v.abs() >= 1000.0 {
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
