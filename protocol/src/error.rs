//! Errors of the protocol layer: a value that fails validation, and a line
//! that does not parse into a command. Both map to one `-FAIL` code.

use std::fmt;

use crate::reply::{ErrorCode, Reply};

/// Why one value was refused; the caller adds which key held it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError(String);

impl FieldError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FieldError {}

/// Longest MESSAGE of a parse error, in bytes.
const MAX_MESSAGE: usize = 1024;

/// Why a line is not a command. Each variant is answered with one `-FAIL`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The verb is not one of the protocol's.
    #[error("unknown command {verb:?} (the verbs are CONN, PUB, SUB, UNSUB, PAUSE, CONTINUE, ACK, DEFER, DISCARD, ROLLBACK, REPLAY, PING and PONG)")]
    UnknownCommand {
        /// The verb as sent (truncated).
        verb: String,
    },
    /// The line is not `VERB;KEY=VALUE;...`.
    #[error("{0}")]
    Malformed(String),
    /// A key the verb does not take.
    #[error("{verb} does not take the key {key} (it takes {allowed})")]
    UnknownKey {
        /// The verb.
        verb: &'static str,
        /// The offending key (upper-cased).
        key: String,
        /// The keys it takes, comma-separated.
        allowed: String,
    },
    /// A key given twice.
    #[error("{key} is given more than once")]
    DuplicateKey {
        /// The repeated key (upper-cased).
        key: String,
    },
    /// Required keys absent.
    #[error("{verb} needs {}", .keys.join(", "))]
    Missing {
        /// The verb.
        verb: &'static str,
        /// Every missing key.
        keys: Vec<&'static str>,
    },
    /// A REPLAY range request without its required keys; the message is the
    /// one EnSync documents.
    #[error(
        "Missing required replay data. Ensure CLIENT_ID, EVENT_NAME, and FROM_POSITION are passed"
    )]
    MissingReplayData,
    /// DISCARD without a REASON.
    #[error("DISCARD needs a REASON saying why the event is discarded")]
    MissingReason,
    /// A value that fails its key's rules.
    #[error("{key} {reason}")]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// What is wrong with its value.
        reason: FieldError,
    },
    /// LIMIT is not a whole number of at least 1.
    #[error("LIMIT must be an integer from 1 to the server's maximum")]
    InvalidLimit,
    /// PAYLOAD is neither JSON nor base64.
    #[error("PAYLOAD {0}")]
    InvalidPayload(FieldError),
    /// A FROM_POSITION or TO_POSITION that is not a position.
    #[error("Invalid or expired position marker")]
    InvalidPosition,
}

impl ParseError {
    /// The `-FAIL` code this error is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::UnknownCommand { .. } => ErrorCode::UnknownCommand,
            ParseError::Malformed(_)
            | ParseError::UnknownKey { .. }
            | ParseError::DuplicateKey { .. }
            | ParseError::InvalidValue { .. }
            | ParseError::InvalidLimit => ErrorCode::InvalidParameters,
            ParseError::Missing { .. } | ParseError::MissingReplayData => {
                ErrorCode::MissingParameters
            }
            ParseError::MissingReason => ErrorCode::MissingReason,
            ParseError::InvalidPayload(_) => ErrorCode::InvalidPayload,
            ParseError::InvalidPosition => ErrorCode::InvalidPosition,
        }
    }

    /// The reply a client gets for this error.
    ///
    /// `max_limit` is the server's LIMIT maximum, named in the LIMIT error.
    pub fn to_reply(&self, max_limit: u32) -> Reply {
        let mut message = match self {
            ParseError::InvalidLimit => format!("LIMIT must be an integer from 1 to {max_limit}"),
            other => other.to_string(),
        };
        // A backstop: the variants repeat at most a short piece of what
        // the client sent, but a reply must never grow with its line.
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        Reply::fail(self.code(), message)
    }
}
