//! What the server counts, in Prometheus form: one registry per server, so
//! two servers in one process (the tests) never mix their numbers.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Upper bounds of the latency buckets, in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Upper bounds of the replay-duration buckets, in seconds: 1 ms to 10 min.
const REPLAY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];

/// The server's counters, gauges and histograms.
pub struct Metrics {
    registry: Registry,
    connections: IntGaugeVec,
    closed: IntCounterVec,
    commands: IntCounterVec,
    /// `commands_total` with outcome PASS, by verb, each looked up once:
    /// counting a command then needs no label hashing.
    passed: [OnceLock<(&'static str, IntCounter)>; 16],
    published: IntCounter,
    delivered: IntCounter,
    replayed: IntCounter,
    replays_from_disk: IntCounter,
    deliveries_from_disk: IntCounter,
    publish_latency: Histogram,
    replay_duration: Histogram,
    store_bytes: IntGauge,
    mapped_read_bytes: IntGauge,
    log_head: IntGauge,
    operations: IntGaugeVec,
}

/// Which transport a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A TCP connection.
    Tcp,
    /// A WebSocket on the HTTP listener.
    WebSocket,
}

/// Why the server closed or refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Refused at `limits.max_connections`.
    MaxConnections,
    /// No CONN within `limits.login_timeout`.
    LoginTimeout,
    /// Idle past `limits.idle_timeout` without subscriptions.
    IdleTimeout,
    /// No answer to the heartbeat's PING.
    Heartbeat,
    /// The client read nothing for `limits.send_timeout`.
    SendTimeout,
    /// The TLS handshake failed or took too long.
    TlsHandshake,
    /// Too many CONNs with unknown access keys.
    FailedLogins,
}

impl Closed {
    fn label(self) -> &'static str {
        match self {
            Closed::MaxConnections => "max_connections",
            Closed::LoginTimeout => "login_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::Heartbeat => "heartbeat",
            Closed::SendTimeout => "send_timeout",
            Closed::TlsHandshake => "tls_handshake",
            Closed::FailedLogins => "failed_logins",
        }
    }
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::WebSocket => "websocket",
        }
    }
}

impl Metrics {
    /// A fresh set, all zero.
    ///
    /// # Panics
    /// Never in practice: only if two metrics had the same name.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("ensync".into()), None)
            .expect("the prefix is a valid metric name");
        let connections = IntGaugeVec::new(
            Opts::new("connections", "Open client connections"),
            &["transport"],
        )
        .expect("valid metric");
        let closed = IntCounterVec::new(
            Opts::new(
                "connections_closed_total",
                "Connections the server closed or refused, by why (see Closed)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let commands = IntCounterVec::new(
            Opts::new(
                "commands_total",
                "Commands answered, by verb and outcome (PASS or the FAIL code)",
            ),
            &["verb", "outcome"],
        )
        .expect("valid metric");
        let published = IntCounter::new("events_published_total", "Events published (durable)")
            .expect("valid metric");
        let delivered = IntCounter::new(
            "events_delivered_total",
            "Events sent to subscribers: live deliveries, redeliveries and the deliveries of operator replays",
        )
        .expect("valid metric");
        let replayed = IntCounter::new(
            "events_replayed_total",
            "Records sent by REPLAY, and operator replay deliveries queued",
        )
        .expect("valid metric");
        let replays_from_disk = IntCounter::new(
            "replays_read_from_disk_total",
            "Small replays (LIMIT up to 100) whose events were not all in memory, read from the disk on a blocking thread instead of the connection's",
        )
        .expect("valid metric");
        let deliveries_from_disk = IntCounter::new(
            "deliveries_read_from_disk_total",
            "Deliveries to subscribers whose events (new, replayed or delivered again) were not all in memory, read from the disk on a blocking thread instead of the connection's",
        )
        .expect("valid metric");
        let publish_latency = Histogram::with_opts(
            HistogramOpts::new(
                "publish_latency_seconds",
                "From a PUB line read to its durable reply",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let replay_duration = Histogram::with_opts(
            HistogramOpts::new(
                "replay_duration_seconds",
                "From a REPLAY taken up to its last record written",
            )
            .buckets(REPLAY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let store_bytes =
            IntGauge::new("store_bytes", "Bytes of event data in the log").expect("valid metric");
        let mapped_read_bytes = IntGauge::new(
            "mapped_read_bytes",
            "Bytes of the page cache that replays read through maps (resident in the server's memory)",
        )
        .expect("valid metric");
        let log_head = IntGauge::new("log_head", "Sequence number of the newest durable event")
            .expect("valid metric");
        let operations = IntGaugeVec::new(
            Opts::new("async_operations", "Operator replays, by status"),
            &["status"],
        )
        .expect("valid metric");
        let metrics = Self {
            registry,
            connections,
            closed,
            commands,
            passed: Default::default(),
            published,
            delivered,
            replayed,
            replays_from_disk,
            deliveries_from_disk,
            publish_latency,
            replay_duration,
            store_bytes,
            mapped_read_bytes,
            log_head,
            operations,
        };
        metrics.register();
        metrics
    }

    #[allow(clippy::expect_used)]
    fn register(&self) {
        let collectors: [Box<dyn prometheus::core::Collector>; 14] = [
            Box::new(self.connections.clone()),
            Box::new(self.closed.clone()),
            Box::new(self.commands.clone()),
            Box::new(self.published.clone()),
            Box::new(self.delivered.clone()),
            Box::new(self.replayed.clone()),
            Box::new(self.replays_from_disk.clone()),
            Box::new(self.deliveries_from_disk.clone()),
            Box::new(self.publish_latency.clone()),
            Box::new(self.replay_duration.clone()),
            Box::new(self.store_bytes.clone()),
            Box::new(self.mapped_read_bytes.clone()),
            Box::new(self.log_head.clone()),
            Box::new(self.operations.clone()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("each metric is registered once");
        }
    }

    /// A connection opened; closing it is dropping the guard.
    pub fn connection(&self, transport: Transport) -> ConnectionGuard {
        let gauge = self.connections.with_label_values(&[transport.label()]);
        gauge.inc();
        ConnectionGuard(gauge)
    }

    /// The server closed or refused a connection.
    pub fn closed(&self, why: Closed) {
        self.closed.with_label_values(&[why.label()]).inc();
    }

    /// A command answered with `outcome` (`PASS` or a FAIL code).
    pub fn command(&self, verb: &'static str, outcome: &str) {
        if outcome == "PASS" {
            // Slots fill in order; a verb takes the first free one.
            for slot in &self.passed {
                let (of, counter) =
                    slot.get_or_init(|| (verb, self.commands.with_label_values(&[verb, "PASS"])));
                if *of == verb {
                    counter.inc();
                    return;
                }
            }
        }
        self.commands.with_label_values(&[verb, outcome]).inc();
    }

    /// A PUB answered `+PASS` after `latency`.
    pub fn published(&self, latency: Duration) {
        self.published.inc();
        self.publish_latency.observe(latency.as_secs_f64());
    }

    /// `n` events delivered live; `from_disk` when a thread that may wait
    /// for the disk read them, as they were not all in memory.
    pub fn delivered(&self, n: u64, from_disk: bool) {
        self.delivered.inc_by(n);
        if from_disk {
            self.deliveries_from_disk.inc();
        }
    }

    /// `n` replayed records sent or queued.
    pub fn replayed(&self, n: u64) {
        self.replayed.inc_by(n);
    }

    /// A small REPLAY went to a blocking thread, as its events were not
    /// all in memory.
    pub fn replay_read_from_disk(&self) {
        self.replays_from_disk.inc();
    }

    /// A REPLAY finished after `took`.
    pub fn replay_finished(&self, took: Duration) {
        self.replay_duration.observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition, with the gauges read at scrape time
    /// set first.
    pub fn render(&self, scrape: &Scrape) -> String {
        self.store_bytes
            .set(i64::try_from(scrape.store_bytes).unwrap_or(i64::MAX));
        self.mapped_read_bytes
            .set(i64::try_from(scrape.mapped_read_bytes).unwrap_or(i64::MAX));
        self.log_head
            .set(i64::try_from(scrape.log_head).unwrap_or(i64::MAX));
        for (status, count) in &scrape.operations {
            self.operations
                .with_label_values(&[status])
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Gauges read when metrics are scraped.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Bytes of event data stored.
    pub store_bytes: u64,
    /// Bytes of the page cache replays read through maps.
    pub mapped_read_bytes: u64,
    /// The newest durable sequence number.
    pub log_head: u64,
    /// Operator replays by status.
    pub operations: Vec<(&'static str, u64)>,
}

/// Counts one open connection until dropped.
pub struct ConnectionGuard(IntGauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
