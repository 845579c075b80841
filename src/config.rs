//! Server settings: defaults, the TOML config file, and the bounds every
//! queue and buffer is held to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Default TCP listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default HTTP/WebSocket listen address.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7071";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default LIMIT ceiling for a range REPLAY.
pub const DEFAULT_MAX_REPLAY_LIMIT: u32 = 100_000;
/// Default cap on open connections: each costs two tasks and a few
/// buffers, so this bounds the memory connections can take.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default cap on one client's connections: room for a pool per process
/// of a few processes, not for a leak that opens one per request.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 256;
/// Default cap on one client's subscriptions: each is held in memory, so
/// the cap bounds what one client's `SUB`s can take (some tens of MiB).
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT: usize = 100_000;
/// Default commands per second per connection: above what a pipelining
/// SDK client sends, below what a runaway loop does.
pub const DEFAULT_COMMANDS_PER_SECOND: u32 = 100_000;
/// Default replays one connection may have asked for and not received.
pub const DEFAULT_MAX_REPLAYS_IN_FLIGHT: usize = 64;
/// Default output one connection may have waiting for its client.
pub const DEFAULT_MAX_OUTBOUND_BYTES: u64 = 1024 * 1024;
/// Default time output may wait on a client that reads nothing.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to CONN after connecting.
pub const DEFAULT_LOGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Default idle time before an unsubscribed connection is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Default time a delivered event may stay unsettled before it is
/// delivered again.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Default cap on unsettled deliveries per subscription.
pub const DEFAULT_MAX_UNSETTLED: usize = 1000;
/// Default idle time after which the server sends `PING`.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Default time a client has to answer a `PING`.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(20);
/// Default pause between retention checks.
pub const DEFAULT_RETENTION_CHECK: Duration = Duration::from_secs(10);

/// Default memory for the store's index (`store.index_cache`).
pub const DEFAULT_INDEX_CACHE: u64 = 256 * 1024 * 1024;
/// Default page cache that replays may read through maps
/// (`store.mapped_reads`).
pub const DEFAULT_MAPPED_READS: u64 = 1024 * 1024 * 1024;

/// Longest line a connection may send before its CONN succeeded.
pub const MAX_LINE_BEFORE_CONN: usize = 4096;
/// Commands one connection may have in flight (parsed, not yet answered).
/// Past it the server stops reading that connection, so a client that
/// pipelines without reading replies is held back by TCP, not memory.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Publishes and subscription changes waiting for the commit thread.
pub const COMMIT_QUEUE: usize = 16 * 1024;
/// Bytes of events waiting for the commit thread, across all connections.
/// Publishers past it wait (and so stop reading their sockets): this, not
/// the number of connections, bounds what pending publishes hold.
pub const COMMIT_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;
/// Most operations in one group commit.
pub const MAX_COMMIT_BATCH: usize = 4096;
/// Most event bytes in one group commit; one batch is one live-feed entry.
pub const MAX_COMMIT_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of a replay's first chunk. Each chunk after it is twice the one
/// before, up to `REPLAY_CHUNK_BYTES`: the first records go out soon, and
/// a long replay hands the connection few, large chunks (a full replay in
/// 1 MiB chunks ran 20% faster than in 256 KiB ones, and 64 KiB ones 25%
/// slower: BENCHMARKS.md).
pub const REPLAY_FIRST_CHUNK_BYTES: usize = 64 * 1024;
/// Most bytes a replay encodes before handing a chunk to the connection.
pub const REPLAY_CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks a replay may have encoded ahead of the socket: with the chunk
/// being encoded and the one being written, this bounds a replay's
/// buffers at about 3 MiB, whatever its LIMIT and however slowly the
/// client reads.
pub const REPLAY_CHUNKS_AHEAD: usize = 1;
/// Most bytes of records a small replay (`INLINE_REPLAY_LIMIT`) encodes on
/// the connection's task; past them a blocking thread takes the replay.
pub const INLINE_REPLAY_BYTES: usize = 256 * 1024;
/// Replays with at most this LIMIT first try one pass on the connection's
/// task (bounded in records, bytes and events looked at) before a blocking
/// thread takes them.
pub const INLINE_REPLAY_LIMIT: u32 = 100;

/// Everything the server needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TCP listen address.
    pub listen: SocketAddr,
    /// HTTP/WebSocket listen address.
    pub http_listen: SocketAddr,
    /// Where the event log lives.
    pub data_dir: PathBuf,
    /// What one connection or client may take.
    pub limits: Limits,
    /// Acknowledgement and flow control.
    pub delivery: Delivery,
    /// Keep-alive of idle connections.
    pub heartbeat: Heartbeat,
    /// How much history is kept.
    pub retention: Retention,
    /// The store.
    pub store: Store,
    /// TLS for both listeners; plain TCP and HTTP without it.
    pub tls: Option<Tls>,
    /// The clients: with at least one access key configured, only they
    /// may connect, each within its patterns. Without, the server is in
    /// open mode and entries only name public keys.
    pub clients: Vec<ClientEntry>,
    /// Bearer token the admin API (`/replays`, `/asyncOperations`) asks
    /// for; the admin API is open when it is not set.
    pub admin_token: Option<String>,
}

/// What one connection or client may take (`[limits]`). Each has a
/// default that a well-behaved client does not reach.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Longest command line accepted, in bytes.
    pub max_line_len: usize,
    /// Highest LIMIT a range REPLAY may ask for.
    pub max_replay_limit: u32,
    /// Most connections open at once, TCP and WebSocket together.
    pub max_connections: usize,
    /// Most connections one client may have open at once.
    pub max_connections_per_client: usize,
    /// Most subscriptions one client may hold.
    pub max_subscriptions_per_client: usize,
    /// Commands one connection may send per second (bursts up to one
    /// second's worth); past it, `RATE_LIMITED`. 0: no limit.
    pub commands_per_second: u32,
    /// Events per second one client's replays stream at, all its
    /// connections together (paced, never refused). 0: as fast as the
    /// client reads.
    pub replay_events_per_second: u64,
    /// Replays one connection may have asked for and not yet received.
    pub max_replays_in_flight: usize,
    /// Bytes of output one connection may have waiting for the client.
    #[serde(deserialize_with = "byte_size")]
    pub max_outbound_bytes: u64,
    /// A connection whose output has waited this long without the client
    /// reading any of it is closed.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// A connection must CONN within this time of opening.
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
    /// A connection whose client has no subscription and that sent no
    /// command for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line_len: ensync_protocol::DEFAULT_MAX_LINE_LEN,
            max_replay_limit: DEFAULT_MAX_REPLAY_LIMIT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            max_subscriptions_per_client: DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT,
            commands_per_second: DEFAULT_COMMANDS_PER_SECOND,
            replay_events_per_second: 0,
            max_replays_in_flight: DEFAULT_MAX_REPLAYS_IN_FLIGHT,
            max_outbound_bytes: DEFAULT_MAX_OUTBOUND_BYTES,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            login_timeout: DEFAULT_LOGIN_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// TLS settings (`[tls]`): PEM files, read at start-up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Acknowledgement and flow control settings (`[delivery]`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Delivery {
    /// How long a delivered event may stay unsettled before it is
    /// delivered again.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Most unsettled events per subscription; past it, delivery waits.
    pub max_unsettled: usize,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            ack_wait: DEFAULT_ACK_WAIT,
            max_unsettled: DEFAULT_MAX_UNSETTLED,
        }
    }
}

/// Keep-alive settings (`[heartbeat]`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Heartbeat {
    /// A connection that sent nothing for this long gets `PING`.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A connection that sends nothing for this long after a `PING` is
    /// closed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            interval: DEFAULT_HEARTBEAT_INTERVAL,
            timeout: DEFAULT_HEARTBEAT_TIMEOUT,
        }
    }
}

/// Retention settings (`[retention]`); with neither limit set, everything
/// is kept.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Events older than this are removed.
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// The oldest events are removed while the log holds more bytes.
    #[serde(deserialize_with = "optional_byte_size")]
    pub max_bytes: Option<u64>,
    /// How often retention looks.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: None,
            max_bytes: None,
            check_interval: DEFAULT_RETENTION_CHECK,
        }
    }
}

/// Store settings (`[store]`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Store {
    /// Memory for the store's index: where each chunk of events lies, the
    /// time and sequence indexes, subscriptions and settlements (no event
    /// bytes). A log whose index outgrows it still works, but seeks read
    /// index pages from disk more often. An eighth of it lists where the
    /// newest events lie, for seeks and replays into recent history;
    /// after a start it is filled in the background from the index.
    /// sled counts its cache by the size of its pages on disk, and in
    /// memory they take several times that, so the server's memory for a
    /// large index is a multiple of this setting.
    #[serde(deserialize_with = "byte_size")]
    pub index_cache: u64,
    /// How much of the page cache small replays may read through maps of
    /// the segment files, rather than with a system call per read (about
    /// a fifth more replays a second), once they read a part of the log a
    /// second time within 10 s. Pages read that way count in the
    /// server's resident memory (as file pages, which the kernel reclaims
    /// like the rest of the page cache); they are let go every 10 s. 0:
    /// replays never read through maps.
    #[serde(deserialize_with = "byte_size")]
    pub mapped_reads: u64,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            index_cache: DEFAULT_INDEX_CACHE,
            mapped_reads: DEFAULT_MAPPED_READS,
        }
    }
}

/// A client (`[[clients]]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientEntry {
    /// Its client id.
    pub id: String,
    /// The key it connects with (`CONN;ACCESS_KEY=...`).
    pub access_key: Option<String>,
    /// The same key as the hex SHA-256 of it, so the file need not hold
    /// the secret.
    pub access_key_sha256: Option<String>,
    /// Its public key (as the SDK addresses it: base64), if any.
    pub public_key: Option<String>,
    /// Event-name patterns it may publish to.
    pub publish: Vec<String>,
    /// Patterns it may subscribe to.
    pub subscribe: Vec<String>,
    /// Patterns it may replay.
    pub replay: Vec<String>,
}

impl ClientEntry {
    /// Whether it names a key to connect with.
    pub fn has_key(&self) -> bool {
        self.access_key.is_some() || self.access_key_sha256.is_some()
    }
}

/// A size that may be left out.
fn optional_byte_size<'de, D: Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    byte_size(de).map(Some)
}

/// A size as bytes (`1048576`) or with a unit (`"512MiB"`, `"10GB"`).
fn byte_size<'de, D: Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(de)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(text) => parse_size(&text).map_err(serde::de::Error::custom),
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("{text:?} is not a size (write e.g. 1048576, \"512MiB\" or \"10GB\")")
    })?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KB, KiB, MB, MiB, GB, GiB, TB or TiB)"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("default address is valid"),
            http_listen: DEFAULT_HTTP_LISTEN
                .parse()
                .expect("default address is valid"),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            limits: Limits::default(),
            delivery: Delivery::default(),
            heartbeat: Heartbeat::default(),
            retention: Retention::default(),
            store: Store::default(),
            tls: None,
            clients: Vec::new(),
            admin_token: None,
        }
    }
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for a config.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where (line, column, key).
        message: String,
    },
    /// A value is out of range.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A value out of range: the key it is under and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Where the value is: `limits.max_line_len`, `clients[2].publish`.
    pub key: String,
    /// What is wrong with it, and what would be right.
    pub message: String,
}

impl Invalid {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Longest timeout or interval a config may set.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Keys that moved into `[limits]`, so an older file gets told where.
const MOVED_TO_LIMITS: [&str; 3] = ["max_line_len", "max_replay_limit", "max_connections"];

impl Config {
    /// Reads a TOML config file; keys it leaves out keep their defaults.
    ///
    /// # Errors
    /// When the file cannot be read, is not valid TOML, names an unknown
    /// key, or holds a value out of range.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| {
            let mut message = e.to_string().trim_end().replace('\n', " ");
            if let Some(moved) = MOVED_TO_LIMITS
                .iter()
                .find(|key| message.contains(&format!("unknown field `{key}`")))
            {
                message.push_str(&format!(" ({moved} is set under [limits] now)"));
            }
            ConfigError::Parse {
                path: path.to_owned(),
                message,
            }
        })?;
        config.check().map_err(|invalid| ConfigError::Invalid {
            path: path.to_owned(),
            message: match line_of(&text, &invalid.key) {
                Some(line) => format!("line {line}, {invalid}"),
                None => invalid.to_string(),
            },
        })?;
        Ok(config)
    }

    /// Checks the ranges of the limits and the clients' entries.
    ///
    /// # Errors
    /// The key and what is wrong with its value.
    pub fn check(&self) -> Result<(), Invalid> {
        let limits = &self.limits;
        if limits.max_line_len < 1024 {
            return Err(Invalid::new(
                "limits.max_line_len",
                format!("is {}; it must be at least 1024", limits.max_line_len),
            ));
        }
        let at_least_one = [
            (
                "limits.max_replay_limit",
                u64::from(limits.max_replay_limit),
            ),
            ("limits.max_connections", limits.max_connections as u64),
            (
                "limits.max_connections_per_client",
                limits.max_connections_per_client as u64,
            ),
            (
                "limits.max_subscriptions_per_client",
                limits.max_subscriptions_per_client as u64,
            ),
            (
                "limits.max_replays_in_flight",
                limits.max_replays_in_flight as u64,
            ),
            ("delivery.max_unsettled", self.delivery.max_unsettled as u64),
        ];
        if let Some((key, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err(Invalid::new(*key, "must be at least 1"));
        }
        if self.store.index_cache < 1024 * 1024 {
            return Err(Invalid::new("store.index_cache", "must be at least 1MiB"));
        }
        if limits.max_outbound_bytes < 64 * 1024 {
            return Err(Invalid::new(
                "limits.max_outbound_bytes",
                "must be at least 64KiB (a replay hands over chunks of up to 256KiB)",
            ));
        }
        let at_least = [
            ("limits.send_timeout", limits.send_timeout, 100),
            ("limits.login_timeout", limits.login_timeout, 100),
            ("limits.idle_timeout", limits.idle_timeout, 100),
            ("delivery.ack_wait", self.delivery.ack_wait, 100),
            ("heartbeat.interval", self.heartbeat.interval, 1),
            ("heartbeat.timeout", self.heartbeat.timeout, 1),
            (
                "retention.check_interval",
                self.retention.check_interval,
                10,
            ),
        ];
        for (key, value, millis) in at_least {
            if value < Duration::from_millis(millis) {
                return Err(Invalid::new(key, format!("must be at least {millis}ms")));
            }
            // Deadlines are instants plus these: keep them far from overflow.
            if value > MAX_DURATION {
                return Err(Invalid::new(key, "must be at most 365days"));
            }
        }
        if self
            .admin_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(Invalid::new(
                "admin_token",
                "must not be empty (leave it out to keep the admin API open)",
            ));
        }
        crate::access::Access::from_config(self).map(drop)
    }
}

/// The line of `key` (`a.b`, `clients[2].c`, `c`) in a config file's
/// `text`, if it is written there as `c = ...`.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let (table, field) = match key.rsplit_once('.') {
        Some((table, field)) => (Some(table), field),
        None => (None, key),
    };
    let (header, nth) = match table {
        None => (None, 0),
        Some(table) => match table.split_once('[') {
            Some((name, index)) => (
                Some(format!("[[{name}]]")),
                index.trim_end_matches(']').parse().ok()?,
            ),
            None => (Some(format!("[{table}]")), 0),
        },
    };
    let mut seen = 0;
    let mut inside = header.is_none();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = header.as_deref() == Some(line) && {
                seen += 1;
                seen == nth + 1
            };
            continue;
        }
        let written = line
            .split_once('=')
            .is_some_and(|(name, _)| name.trim() == field);
        if inside && written {
            return Some(number + 1);
        }
    }
    None
}

#[cfg(test)]
mod config_file {
    use super::*;

    #[test]
    fn example_file_holds_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ensync.example.toml");
        let config = Config::from_file(&path).expect("example parses");
        let default = Config::default();
        assert_eq!(config.listen, default.listen);
        assert_eq!(config.http_listen, default.http_listen);
        assert_eq!(config.data_dir, default.data_dir);
        assert_eq!(
            format!("{:?}", config.limits),
            format!("{:?}", default.limits)
        );
        assert!(config.tls.is_none() && config.clients.is_empty());
        assert_eq!(config.delivery.ack_wait, default.delivery.ack_wait);
        assert_eq!(
            config.delivery.max_unsettled,
            default.delivery.max_unsettled
        );
        assert_eq!(config.heartbeat.interval, default.heartbeat.interval);
        assert_eq!(config.heartbeat.timeout, default.heartbeat.timeout);
        assert_eq!(config.retention.max_age, default.retention.max_age);
        assert_eq!(config.retention.max_bytes, default.retention.max_bytes);
        assert_eq!(
            config.retention.check_interval,
            default.retention.check_interval
        );
        assert_eq!(config.store.index_cache, default.store.index_cache);
    }

    #[test]
    fn the_example_clients_and_tls_work_once_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ensync.example.toml");
        let text = std::fs::read_to_string(path).expect("example");
        // The commented tables and their keys; prose comments stay.
        let mut inside = false;
        let uncommented: String = text
            .lines()
            .map(|line| {
                let bare = line.strip_prefix("# ").unwrap_or(line);
                if bare.starts_with('[') {
                    inside = bare == "[tls]" || bare == "[[clients]]";
                }
                let setting = bare.split_once(" = ").is_some() || bare.starts_with('[');
                if inside && setting && line.starts_with("# ") {
                    format!("{bare}\n")
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        let config: Config = toml::from_str(&uncommented).expect("parses");
        config.check().expect("valid");
        let tls = config.tls.expect("[tls]");
        assert_eq!(tls.cert, Path::new("/etc/ensync/cert.pem"));
        let ids: Vec<&str> = config.clients.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["billing-service", "audit"]);
        assert!(config.clients.iter().all(ClientEntry::has_key));
        assert_eq!(config.clients[0].replay, ["order/*"]);
    }

    #[test]
    fn durations_and_sizes_read_as_people_write_them() {
        let config: Config = toml::from_str(
            "[delivery]\nack_wait = \"1m 30s\"\n[retention]\nmax_age = \"7days\"\nmax_bytes = \"512MiB\"\n",
        )
        .expect("parses");
        assert_eq!(config.delivery.ack_wait, Duration::from_secs(90));
        assert_eq!(
            config.retention.max_age,
            Some(Duration::from_secs(7 * 86400))
        );
        assert_eq!(config.retention.max_bytes, Some(512 << 20));
        let config: Config = toml::from_str("[store]\nindex_cache = \"1GiB\"\n").expect("parses");
        assert_eq!(config.store.index_cache, 1 << 30);
        assert_eq!(config.store.mapped_reads, DEFAULT_MAPPED_READS);
        let config: Config = toml::from_str("[store]\nmapped_reads = 0\n").expect("parses");
        assert_eq!(config.store.mapped_reads, 0);
        assert_eq!(Config::default().store.index_cache, DEFAULT_INDEX_CACHE);
        assert_eq!(parse_size("1000"), Ok(1000));
        let refused = parse_size("5 parsecs").expect_err("not a unit");
        assert!(refused.contains("unknown size unit"), "{refused}");
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\nmax_replay_limt = 5\n").expect("write");
        let message = Config::from_file(&path)
            .expect_err("unknown key")
            .to_string();
        assert!(message.contains("bad.toml"), "{message}");
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("max_replay_limt"), "{message}");

        std::fs::write(&path, "# limits\n[limits]\nmax_line_len = 10\n").expect("write");
        let message = Config::from_file(&path).expect_err("too small").to_string();
        assert!(
            message.contains("line 3, limits.max_line_len: is 10"),
            "{message}"
        );

        std::fs::write(&path, "[store]\nindex_cache = \"64KiB\"\n").expect("write");
        let message = Config::from_file(&path).expect_err("too small").to_string();
        assert!(
            message.contains("line 2, store.index_cache: must be at least 1MiB"),
            "{message}"
        );

        std::fs::write(&path, "max_connections = 10\n").expect("write");
        let message = Config::from_file(&path).expect_err("moved").to_string();
        assert!(message.contains("under [limits]"), "{message}");

        std::fs::write(
            &path,
            "[[clients]]\nid = \"a\"\naccess_key = \"k1\"\n[[clients]]\nid = \"b\"\naccess_key = \"k2\"\npublish = [\"x/**\"]\n",
        )
        .expect("write");
        let message = Config::from_file(&path)
            .expect_err("bad pattern")
            .to_string();
        assert!(message.contains("line 7, clients[1].publish:"), "{message}");
    }
}
