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
/// Bytes a replay encodes before handing a chunk to the connection.
pub const REPLAY_CHUNK_BYTES: usize = 256 * 1024;
/// Chunks a replay may have encoded ahead of the socket: with
/// `REPLAY_CHUNK_BYTES`, and the chunk being encoded and the one being
/// written, this bounds a replay's buffers at about 1 MiB, whatever its
/// LIMIT and however slowly the client reads.
pub const REPLAY_CHUNKS_AHEAD: usize = 2;
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
    /// Longest command line accepted, in bytes.
    pub max_line_len: usize,
    /// Highest LIMIT a range REPLAY may ask for.
    pub max_replay_limit: u32,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Acknowledgement and flow control.
    pub delivery: Delivery,
    /// Keep-alive of idle connections.
    pub heartbeat: Heartbeat,
    /// How much history is kept.
    pub retention: Retention,
    /// Clients known by more than their id (public keys events can be
    /// addressed to).
    pub clients: Vec<ClientEntry>,
    /// Bearer token the admin API (`/replays`, `/asyncOperations`) asks
    /// for; the admin API is open when it is not set.
    pub admin_token: Option<String>,
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
    #[serde(deserialize_with = "byte_size")]
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

/// A client known by more than its id (`[[clients]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    /// Its client id.
    pub id: String,
    /// Its public key (as the SDK addresses it: base64), if any.
    pub public_key: Option<String>,
}

/// A size as bytes (`1048576`) or with a unit (`"512MiB"`, `"10GB"`).
fn byte_size<'de, D: Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(de)? {
        Size::Bytes(n) => Ok(Some(n)),
        Size::Text(text) => parse_size(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
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
            max_line_len: ensync_protocol::DEFAULT_MAX_LINE_LEN,
            max_replay_limit: DEFAULT_MAX_REPLAY_LIMIT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            delivery: Delivery::default(),
            heartbeat: Heartbeat::default(),
            retention: Retention::default(),
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
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.check().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Checks the ranges of the limits.
    ///
    /// # Errors
    /// A message naming the key and its allowed range.
    pub fn check(&self) -> Result<(), String> {
        if self.max_line_len < 1024 {
            return Err(format!(
                "max_line_len is {}; it must be at least 1024",
                self.max_line_len
            ));
        }
        if self.max_replay_limit == 0 {
            return Err("max_replay_limit must be at least 1".into());
        }
        if self
            .admin_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(
                "admin_token must not be empty (leave it out to keep the admin API open)".into(),
            );
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.delivery.max_unsettled == 0 {
            return Err("delivery.max_unsettled must be at least 1".into());
        }
        if self.delivery.ack_wait < Duration::from_millis(100) {
            return Err("delivery.ack_wait must be at least 100ms".into());
        }
        if self.heartbeat.interval.is_zero() || self.heartbeat.timeout.is_zero() {
            return Err("heartbeat.interval and heartbeat.timeout must be above zero".into());
        }
        if self.retention.check_interval < Duration::from_millis(10) {
            return Err("retention.check_interval must be at least 10ms".into());
        }
        for client in &self.clients {
            if client
                .id
                .parse::<ensync_protocol::field::ClientId>()
                .is_err()
            {
                return Err(format!("clients: {:?} is not a valid client id", client.id));
            }
        }
        Ok(())
    }
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
        assert_eq!(config.max_line_len, default.max_line_len);
        assert_eq!(config.max_replay_limit, default.max_replay_limit);
        assert_eq!(config.max_connections, default.max_connections);
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

        std::fs::write(&path, "max_line_len = 10\n").expect("write");
        let message = Config::from_file(&path).expect_err("too small").to_string();
        assert!(message.contains("max_line_len is 10"), "{message}");
    }
}
