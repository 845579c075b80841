//! The EnSync wire protocol: framing, commands, replies and event records.
//!
//! This crate has no sockets, storage or runtime. A server (or a client
//! library, or a test harness) feeds it bytes and gets typed commands, and
//! turns typed replies and stored records back into bytes. `SPEC.md` in
//! this crate is the normative description; `vectors/` holds conformance
//! scripts any implementation can run.
#![warn(missing_docs)]
#![deny(clippy::unwrap_used)]

pub mod codec;
pub mod command;
pub mod error;
pub mod field;
pub mod json;
pub mod parse;
pub mod record;
pub mod reply;

pub use codec::{EnsyncCodec, Frame, LineLimit, DEFAULT_MAX_LINE_LEN};
pub use command::Command;
pub use error::{FieldError, ParseError};
pub use parse::parse_command;
pub use record::{
    encode_record, encode_record_into, Marks, RecordFields, RenderedMarks, ReplayInfo, StoredRecord,
};
pub use reply::{ErrorCode, Pass, Reply};
