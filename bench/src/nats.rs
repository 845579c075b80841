//! NATS JetStream (file storage): publish with ack futures, ordered push
//! consumers for full replays, pull consumers for seeks and LIMIT.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::consumer::{pull, push, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType, Stream};
use async_nats::jetstream::{self, Context};
use async_nats::Event;
use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::common::{payload, Cfg, Pacer, Sampler, LIMIT_COUNT, POOL, WINDOW};
use crate::lineconn::Received;
use crate::procs::{self, RssSampler, Server};
use crate::report::{self, Memory, Results, Seek};

/// Runs the chosen workloads against a fresh `nats-server -js`. Streams:
/// PUB (pub.>), CROWDED (crowded.>), BENCH (bench.e0), MIXED
/// (mixed.m0..m9), SEEK (seek.s0).
pub fn run(cfg: &Cfg, bin: &Path, tmp: &Path) -> Result<Results> {
    let dir = tmp.join("nats");
    std::fs::create_dir_all(&dir)?;
    let port = procs::free_port()?;
    let args: Vec<String> = [
        "-js",
        "-a",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-sd",
        &dir.display().to_string(),
    ]
    .map(str::to_owned)
    .into();
    let server = Server::spawn("nats-server", bin, &args, &dir.join("log"), port)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run_async(cfg, &server, &format!("127.0.0.1:{port}")))
}

async fn run_async(cfg: &Cfg, server: &Server, addr: &str) -> Result<Results> {
    let client = async_nats::connect(addr).await?;
    let js = jetstream::new(client.clone());
    for (name, subject) in [
        ("PUB", "pub.>"),
        ("CROWDED", "crowded.>"),
        ("BENCH", "bench.>"),
        ("MIXED", "mixed.>"),
        ("SEEK", "seek.>"),
    ] {
        js.create_stream(StreamConfig {
            name: name.into(),
            subjects: vec![subject.into()],
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {name}"))?;
    }
    let mut res = Results::default();
    let n = cfg.n;

    if cfg.runs("publish") {
        for (conns, slot) in [(1, &mut res.publish_1), (8, &mut res.publish_8)] {
            let mut rounds = Vec::new();
            for _ in 0..cfg.rounds {
                rounds.push(publish(addr, conns, "pub.e0", n, cfg.payload).await?);
            }
            *slot = Some(report::rounds(cfg, |r| Ok(rounds[r]))?);
        }
    }
    if cfg.runs("crowd") {
        let idle = Idle::open(addr, cfg.crowd_clients).await?;
        let mut rounds = Vec::new();
        for _ in 0..cfg.rounds {
            rounds.push(publish(addr, 1, "crowded.e0", n, cfg.payload).await?);
        }
        idle.close().await?;
        res.crowd = Some(report::rounds(cfg, |r| Ok(rounds[r]))?);
    }
    if cfg.runs("replay") || cfg.runs("limit") || cfg.runs("memory") {
        load(&js, &["bench.e0".into()], 0..n, cfg.payload, None).await?;
    }
    let bench = js.get_stream("BENCH").await?;
    if cfg.runs("replay") {
        let mut rounds = Vec::new();
        for _ in 0..cfg.rounds {
            let start = Instant::now();
            let got = replay(&client, &bench, "bench.e0", n as u64, None).await?;
            rounds.push((got, start.elapsed()));
        }
        let mut it = rounds.into_iter();
        res.replay = Some(report::replay_rounds(cfg, n as u64, || {
            it.next().context("missing round")
        })?);
    }
    if cfg.runs("mixed") {
        let subjects: Vec<String> = (0..10).map(|k| format!("mixed.m{k}")).collect();
        load(&js, &subjects, 0..n, cfg.payload, None).await?;
        let mixed = js.get_stream("MIXED").await?;
        let m = n.div_ceil(10) as u64;
        let mut rounds = Vec::new();
        for _ in 0..cfg.rounds {
            let start = Instant::now();
            rounds.push((
                replay(&client, &mixed, "mixed.m0", m, None).await?,
                start.elapsed(),
            ));
        }
        let mut it = rounds.into_iter();
        res.mixed = Some(report::replay_rounds(cfg, m, || {
            it.next().context("missing round")
        })?);
    }
    if cfg.runs("seek") {
        res.seek = Some(seek(cfg, &js).await?);
    }
    if cfg.runs("limit") {
        let max_start = n.saturating_sub(LIMIT_COUNT).max(1) as u64;
        for (clients, slot) in [(1, &mut res.limit_1), (8, &mut res.limit_8)] {
            let mut rounds = Vec::new();
            for _ in 0..cfg.rounds {
                rounds.push(limit_rate(addr, clients, cfg.limit_duration(), max_start).await?);
            }
            *slot = Some(report::rounds(cfg, |r| Ok(rounds[r]))?);
        }
    }
    if cfg.runs("memory") {
        let pid = server.pid();
        let before = procs::Rss::of(pid)?;
        let rss = RssSampler::start(pid);
        replay(&client, &bench, "bench.e0", n as u64, None).await?;
        let fast_peak = rss.finish();
        let slow_before = procs::Rss::of(pid)?;
        let rss = RssSampler::start(pid);
        let mut pacer = Pacer::new(Duration::from_secs_f64(cfg.slow_secs));
        let slow = replay(&client, &bench, "bench.e0", n as u64, Some(&mut pacer)).await?;
        let slow_peak = rss.finish();
        res.memory = Some(Memory::new(
            before,
            fast_peak,
            slow_before,
            slow_peak,
            slow.bytes,
        ));
    }
    Ok(res)
}

/// Publishes `n` events to `subject` over `conns` connections; events/s.
async fn publish(addr: &str, conns: usize, subject: &str, n: usize, size: usize) -> Result<f64> {
    let mut contexts = Vec::new();
    for _ in 0..conns {
        contexts.push(jetstream::new(async_nats::connect(addr).await?));
    }
    let subjects = [subject.to_owned()];
    let start = Instant::now();
    let loads = contexts.iter().enumerate().map(|(k, js)| {
        load(
            js,
            &subjects,
            n * k / conns..n * (k + 1) / conns,
            size,
            None,
        )
    });
    futures_util::future::try_join_all(loads).await?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Clients each with a core subscription to a subject of its own that
/// nobody publishes to (`crowd.{i}`): the `crowd` workload's idle
/// subscribers, a connection each. Their clients' tasks share the bench's
/// one runtime thread with the publisher, and sleep while nothing comes.
struct Idle {
    subs: Vec<(async_nats::Client, async_nats::Subscriber)>,
    /// A message each time one of the clients has closed its connection.
    closed: mpsc::UnboundedReceiver<()>,
}

impl Idle {
    /// `clients` idle subscribers, each subscription known to the server
    /// (flushed) before the next connects.
    async fn open(addr: &str, clients: usize) -> Result<Self> {
        let (tx, closed) = mpsc::unbounded_channel();
        let mut subs = Vec::with_capacity(clients);
        for i in 0..clients {
            let tx = tx.clone();
            let client = async_nats::ConnectOptions::new()
                .event_callback(move |event| {
                    let (tx, closed) = (tx.clone(), matches!(event, Event::Closed));
                    async move {
                        if closed {
                            // Only `close` waits for it, and only while it
                            // keeps the receiver.
                            let _ = tx.send(());
                        }
                    }
                })
                .connect(addr)
                .await?;
            let sub = client.subscribe(format!("crowd.{i}")).await?;
            client.flush().await?;
            subs.push((client, sub));
        }
        Ok(Self { subs, closed })
    }

    /// Drops the clients and their subscriptions, and waits until each
    /// client has closed its connection. (`Client::drain` would only close
    /// it at the client's next wakeup, which an idle client may not have.)
    async fn close(mut self) -> Result<()> {
        let count = self.subs.len();
        drop(self.subs);
        for left in (1..=count).rev() {
            tokio::time::timeout(Duration::from_secs(10), self.closed.recv())
                .await
                .ok()
                .flatten()
                .with_context(|| format!("{left} idle clients did not close"))?;
        }
        Ok(())
    }
}

/// Publishes events `range` (event `i` to `subjects[i % len]`) keeping
/// [`WINDOW`] ack futures in flight; `sampler` gets the time each wanted
/// event was sent (before it was stored).
async fn load(
    js: &Context,
    subjects: &[String],
    range: Range<usize>,
    size: usize,
    mut sampler: Option<&mut Sampler<OffsetDateTime>>,
) -> Result<()> {
    let mut inflight = VecDeque::with_capacity(WINDOW);
    for i in range.clone() {
        if inflight.len() >= WINDOW {
            let ack: jetstream::context::PublishAckFuture =
                inflight.pop_front().expect("in flight");
            ack.await?;
        }
        if let Some(s) = sampler.as_deref_mut() {
            s.offer(i - range.start, OffsetDateTime::now_utc);
        }
        let subject = subjects[i % subjects.len()].clone();
        inflight.push_back(js.publish(subject, payload(i, size).into()).await?);
    }
    for ack in inflight {
        ack.await?;
    }
    Ok(())
}

/// Reads `expect` messages of `filter` from the start with an ordered
/// push consumer; with a pacer, stops when it says so.
async fn replay(
    client: &async_nats::Client,
    stream: &Stream,
    filter: &str,
    expect: u64,
    mut pacer: Option<&mut Pacer>,
) -> Result<Received> {
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: filter.into(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut got = Received::default();
    while got.lines < expect {
        let msg = messages.next().await.context("consumer ended")??;
        got.lines += 1;
        got.bytes += msg.length as u64;
        if let Some(p) = pacer.as_deref_mut() {
            if !p.read(msg.length) {
                break;
            }
        }
    }
    Ok(got)
}

/// Time to the first of up to `k` messages from `policy` through a new
/// pull consumer; all `k` (or what there is) are read.
async fn first_k(
    stream: &Stream,
    filter: &str,
    policy: DeliverPolicy,
    k: usize,
) -> Result<Duration> {
    let start = Instant::now();
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: policy,
            ack_policy: AckPolicy::None,
            filter_subject: filter.into(),
            inactive_threshold: Duration::from_secs(2),
            ..Default::default()
        })
        .await?;
    let mut batch = consumer
        .fetch()
        .max_messages(k)
        .expires(Duration::from_secs(2))
        .messages()
        .await?;
    let first = batch.next().await.context("no message")?;
    first.map_err(|e| anyhow::anyhow!("fetch: {e}"))?;
    let took = start.elapsed();
    for _ in 1..k {
        if batch.next().await.is_none() {
            break;
        }
    }
    Ok(took)
}

/// Seek latency by start sequence and by start time, at two log sizes.
async fn seek(cfg: &Cfg, js: &Context) -> Result<Seek> {
    let subjects = ["seek.s0".to_owned()];
    let small = cfg.seek_small;
    let samples = (cfg.seek_samples / 10).clamp(10, 200);
    let mut rng = fastrand::Rng::new();
    let mut pool1 = Sampler::new(small, POOL, &mut rng);
    load(js, &subjects, 0..small, cfg.payload, Some(&mut pool1)).await?;
    procs::settle();
    let stream = js.get_stream("SEEK").await?;
    let mut small_us = Vec::new();
    for i in 0..samples {
        let policy = if i % 2 == 0 {
            DeliverPolicy::ByStartSequence {
                start_sequence: rng.u64(1..=small as u64),
            }
        } else {
            DeliverPolicy::ByStartTime {
                start_time: pool1.got[rng.usize(0..pool1.got.len())],
            }
        };
        small_us.push(first_k(&stream, "seek.s0", policy, 1).await?.as_secs_f64() * 1e6);
    }
    let mut pool2 = Sampler::new(cfg.seek_n - small, POOL, &mut rng);
    load(
        js,
        &subjects,
        small..cfg.seek_n,
        cfg.payload,
        Some(&mut pool2),
    )
    .await?;
    procs::settle();
    let mut large_us = Vec::new();
    for i in 0..samples {
        let policy = if i % 2 == 0 {
            DeliverPolicy::ByStartSequence {
                start_sequence: rng.u64(1..=cfg.seek_n as u64),
            }
        } else {
            let t = crate::common::pick(&mut rng, &pool1.got, &pool2.got, small, cfg.seek_n);
            DeliverPolicy::ByStartTime { start_time: *t }
        };
        large_us.push(first_k(&stream, "seek.s0", policy, 1).await?.as_secs_f64() * 1e6);
    }
    Ok(Seek::new(small, cfg.seek_n, &small_us, &large_us))
}

/// LIMIT-50 fetches from random start sequences on `clients` connections
/// for `duration`; fetches per second.
async fn limit_rate(addr: &str, clients: usize, duration: Duration, max_start: u64) -> Result<f64> {
    let mut streams = Vec::new();
    for _ in 0..clients {
        let js = jetstream::new(async_nats::connect(addr).await?);
        streams.push(js.get_stream("BENCH").await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let loops = streams.iter().map(|stream| async move {
        let mut rng = fastrand::Rng::new();
        let mut done = 0u64;
        while Instant::now() < deadline {
            let policy = DeliverPolicy::ByStartSequence {
                start_sequence: rng.u64(1..=max_start),
            };
            first_k(stream, "bench.e0", policy, LIMIT_COUNT).await?;
            done += 1;
        }
        Ok::<_, anyhow::Error>(done)
    });
    let done: u64 = futures_util::future::try_join_all(loops)
        .await?
        .into_iter()
        .sum();
    if done == 0 {
        bail!("no LIMIT fetch completed");
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}
