//! ensync-server: the EnSync protocol over TCP, backed by a durable,
//! ordered, replayable event log.
//!
//! Bytes are framed by the protocol crate's codec, parsed into commands,
//! checked by the [`session`] against the connection's client, carried out
//! by the [`engine`] against the [`store`], and answered with replies and
//! records in command order.
#![deny(clippy::unwrap_used)]

pub mod access;
pub mod config;
pub mod connection;
pub mod engine;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;

pub use config::Config;
