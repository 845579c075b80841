//! Server settings: defaults, the TOML config file, and the bounds every
//! queue and buffer is held to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
/// Committed batches kept for live delivery; a connection that falls
/// further behind catches up from the store instead. With
/// `MAX_COMMIT_BATCH_BYTES` this bounds the feed at about 64 MiB.
pub const LIVE_BATCHES: usize = 16;
/// Bytes a replay encodes before handing a chunk to the connection.
pub const REPLAY_CHUNK_BYTES: usize = 64 * 1024;
/// Chunks a replay may have encoded ahead of the socket: with
/// `REPLAY_CHUNK_BYTES` this bounds a replay's buffer at 256 KiB, whatever
/// its LIMIT and however slowly the client reads.
pub const REPLAY_CHUNKS_AHEAD: usize = 4;

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
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
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
