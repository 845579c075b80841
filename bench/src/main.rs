//! `ensync-bench`: ensync-server against Redis Streams, NATS JetStream and
//! an in-process raw loopback ceiling, on the same events.

mod ceiling;
mod common;
mod ensync;
mod lineconn;
mod nats;
mod procs;
mod redis;
mod report;
mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;

use common::Cfg;
use procs::{CLIENT_CPU, SERVER_CPU};
use report::{Report, SYSTEMS};

const WORKLOADS: [&str; 9] = [
    "publish", "crowd", "replay", "mixed", "trickle", "seek", "limit", "memory", "names",
];

/// Benchmarks ensync-server against redis-server, nats-server and a raw
/// loopback ceiling; prints a table and writes every number as JSON.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Events per log.
    #[arg(long, default_value_t = 1_000_000)]
    n: usize,
    /// Approximate payload size in bytes.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Events in the seek log.
    #[arg(long, default_value_t = 10_000_000)]
    seek_n: usize,
    /// Rounds of each throughput measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Systems to run (ensync,redis,nats,ceiling).
    #[arg(long, value_delimiter = ',', default_values_t = SYSTEMS.map(String::from))]
    only: Vec<String>,
    /// Workloads to run
    /// (publish,crowd,replay,mixed,trickle,seek,limit,memory,names).
    #[arg(long, value_delimiter = ',', default_values_t = WORKLOADS.map(String::from))]
    workloads: Vec<String>,
    /// The ensync-server binary.
    #[arg(long, default_value = "target/release/ensync-server")]
    server_bin: PathBuf,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench.json")]
    out: PathBuf,
    /// Tiny run: n=2000, seek-n=5000, rounds=1, crowd=50, short durations.
    #[arg(long)]
    smoke: bool,
    /// Seconds of each LIMIT run.
    #[arg(long, default_value_t = 5.0)]
    limit_secs: f64,
    /// Seeks timed at each log size (NATS: a tenth, at most 200, as its
    /// seeks take milliseconds).
    #[arg(long, default_value_t = 20_000)]
    seek_samples: usize,
    /// Names of the `names` workload (ensync only), an event each.
    #[arg(long, default_value_t = 100_000)]
    names: usize,
    /// Idle subscribers of the `crowd` workload, each waiting for a name
    /// of its own that nobody publishes while one connection publishes.
    #[arg(long, default_value_t = 1000)]
    crowd: usize,
}

impl Args {
    fn cfg(&self) -> Result<Cfg> {
        for w in &self.workloads {
            if !WORKLOADS.contains(&w.as_str()) {
                bail!("unknown workload {w} (one of {})", WORKLOADS.join(","));
            }
        }
        let (n, seek_n) = if self.smoke {
            (2000, 5000)
        } else {
            (self.n, self.seek_n)
        };
        if n == 0 || seek_n < 100 {
            bail!("--n must be positive and --seek-n at least 100");
        }
        if self.names < 100 {
            bail!("--names must be at least 100, or a pattern's merge would do");
        }
        if self.seek_samples < 100 {
            bail!("--seek-samples must be at least 100, or there is no p99");
        }
        Ok(Cfg {
            n,
            payload: self.payload,
            seek_n,
            seek_small: if self.smoke {
                seek_n / 100
            } else {
                seek_n.min(100_000)
            },
            rounds: if self.smoke { 1 } else { self.rounds.max(1) },
            workloads: self.workloads.clone(),
            limit_secs: if self.smoke { 0.3 } else { self.limit_secs },
            seek_samples: if self.smoke { 200 } else { self.seek_samples },
            slow_secs: if self.smoke { 0.5 } else { 5.0 },
            names: if self.smoke { 2_000 } else { self.names },
            live_samples: if self.smoke { 50 } else { 2_000 },
            crowd_clients: if self.smoke { 50 } else { self.crowd },
        })
    }
}

/// What the report says was measured in turns (see `ensync::Peers`).
fn turns(runs: &dyn Fn(&str) -> bool) -> String {
    let mut turns = Vec::new();
    if runs("ensync") && runs("redis") {
        turns.push("publish, crowd: ensync with redis");
    }
    if runs("ensync") && runs("ceiling") {
        turns.push("replay, seek (turns of 100) and LIMIT: ensync with the ceiling");
    }
    if turns.is_empty() {
        "none".into()
    } else {
        turns.join("; ")
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = args.cfg()?;
    for s in &args.only {
        if !SYSTEMS.contains(&s.as_str()) {
            bail!("unknown system {s} (one of {})", SYSTEMS.join(","));
        }
    }
    let runs = |s: &str| args.only.iter().any(|o| o == s);
    // Before pinning: the machine line counts every core.
    let machine = procs::machine();
    let mut versions = BTreeMap::new();
    let mut bins = BTreeMap::new();
    if runs("ensync") {
        if !args.server_bin.is_file() {
            bail!(
                "{} not found: build it on its own (cargo build --release) or pass --server-bin",
                args.server_bin.display()
            );
        }
        versions.insert("ensync", procs::version(&args.server_bin));
    }
    for (system, program) in [("redis", "redis-server"), ("nats", "nats-server")] {
        if runs(system) {
            let bin = procs::find_program(program)?;
            versions.insert(system, procs::version(&bin));
            bins.insert(system, bin);
        }
    }
    procs::pin_current_thread(CLIENT_CPU).context("pinning the bench client")?;
    let tmp = tempfile::tempdir()?;
    let mut report = Report {
        machine,
        pinning: format!("servers on CPU {SERVER_CPU}, bench client on CPU {CLIENT_CPU}"),
        turns: turns(&runs),
        versions,
        config: cfg.clone(),
        systems: BTreeMap::new(),
        steal: BTreeMap::new(),
        targets: Vec::new(),
    };
    // Up before ensync's run, which takes turns with them.
    let mut ceiling = runs("ceiling")
        .then(|| ceiling::Ceiling::start(&cfg))
        .transpose()
        .context("starting the ceiling")?;
    let mut redis = runs("redis")
        .then(|| redis::Redis::start(&bins["redis"], tmp.path()))
        .transpose()
        .context("starting redis")?;
    for system in SYSTEMS.into_iter().filter(|s| runs(s)) {
        eprintln!("running {system} ...");
        let ticks = procs::cpu_ticks();
        let results = match system {
            "ensync" => {
                let peers = ensync::Peers {
                    ceiling: ceiling.as_mut(),
                    redis: redis.as_mut(),
                };
                ensync::run(&cfg, &args.server_bin, tmp.path(), peers)
            }
            "redis" => redis::run(&cfg, redis.take().expect("redis runs")),
            "nats" => nats::run(&cfg, &bins["nats"], tmp.path()),
            _ => ceiling::run(&cfg, ceiling.take().expect("the ceiling runs")),
        }
        .with_context(|| format!("{system} benchmark"))?;
        report.systems.insert(system, results);
        let steal = procs::steal_percent(&ticks, &procs::cpu_ticks());
        report.steal.insert(system, steal);
    }
    report.evaluate();
    print!("{}", report.table());
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
