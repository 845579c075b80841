//! Replies: the one line the server answers each command with, as data,
//! and their encoding (`+PASS:`, `-FAIL:`, `+REPLAY:`). Record lines are in
//! `record.rs`.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

/// Every `-FAIL` code the server uses. `as_str` is the one place their
/// spellings live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A required key is absent.
    MissingParameters,
    /// A key, value or line shape is wrong.
    InvalidParameters,
    /// PAYLOAD is neither JSON nor base64.
    InvalidPayload,
    /// The verb is unknown.
    UnknownCommand,
    /// A command other than CONN before a successful CONN.
    NotConnected,
    /// CONN on a connection already connected as another client.
    AlreadyConnected,
    /// The client may not do this.
    PermissionDenied,
    /// Unknown client or access key.
    ClientNotFound,
    /// No such subscription or event.
    NotFound,
    /// The client has no subscription covering the name.
    NotSubscribed,
    /// CONTINUE of a subscription that is not paused.
    NotPaused,
    /// DISCARD without REASON.
    MissingReason,
    /// A replay position that is unparsable, unknown or trimmed.
    InvalidPosition,
    /// A line over the configured maximum length.
    LineTooLong,
    /// A line that is not UTF-8.
    InvalidEncoding,
    /// A command this release parses but does not carry out.
    NotImplemented,
    /// The client sends faster than allowed.
    RateLimited,
    /// The server or the client is at its connection limit.
    TooManyConnections,
    /// The client holds as many subscriptions as it may.
    TooManySubscriptions,
    /// The connection waited too long for the client (to CONN, or idle).
    Timeout,
    /// The server could not carry out the command (storage failure).
    Internal,
}

impl ErrorCode {
    /// The code as it appears after `-FAIL:`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MissingParameters => "MISSING_PARAMETERS",
            ErrorCode::InvalidParameters => "INVALID_PARAMETERS",
            ErrorCode::InvalidPayload => "INVALID_PAYLOAD",
            ErrorCode::UnknownCommand => "UNKNOWN_COMMAND",
            ErrorCode::NotConnected => "NOT_CONNECTED",
            ErrorCode::AlreadyConnected => "ALREADY_CONNECTED",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::ClientNotFound => "CLIENT_NOT_FOUND",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::NotSubscribed => "NOT_SUBSCRIBED",
            ErrorCode::NotPaused => "NOT_PAUSED",
            ErrorCode::MissingReason => "MISSING_REASON",
            ErrorCode::InvalidPosition => "INVALID_POSITION",
            ErrorCode::LineTooLong => "LINE_TOO_LONG",
            ErrorCode::InvalidEncoding => "INVALID_ENCODING",
            ErrorCode::NotImplemented => "NOT_IMPLEMENTED",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::TooManyConnections => "TOO_MANY_CONNECTIONS",
            ErrorCode::TooManySubscriptions => "TOO_MANY_SUBSCRIPTIONS",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pass {
    /// `+PASS:CONNECTED;CLIENT_ID=id`
    Connected {
        /// The connection's client.
        client_id: String,
    },
    /// `+PASS:{clientId=id,clientHash=h}`: the ACCESS_KEY form of CONN.
    Authenticated {
        /// The connection's client.
        client_id: String,
        /// A stable opaque hash of the client.
        client_hash: String,
    },
    /// `+PASS:PUBLISHED;IDEM=id;TIMESTAMP=ms`
    Published {
        /// The new event's id.
        idem: String,
        /// Its `loggedAt`.
        timestamp: u64,
    },
    /// `+PASS:SUBSCRIBED;EVENT_NAME=n`
    Subscribed {
        /// The pattern subscribed to.
        event_name: String,
    },
    /// `+PASS:UNSUBSCRIBED;EVENT_NAME=n;CLIENT_ID=id`
    Unsubscribed {
        /// The pattern.
        event_name: String,
        /// The client.
        client_id: String,
    },
    /// `+PASS:PAUSED;EVENT_NAME=n`
    Paused {
        /// The pattern.
        event_name: String,
    },
    /// `+PASS:CONTINUED;EVENT_NAME=n`
    Continued {
        /// The pattern.
        event_name: String,
    },
    /// `+PASS:ACKNOWLEDGED;IDEM=id`
    Acknowledged {
        /// The event.
        idem: String,
    },
    /// `+PASS:DEFERRED;IDEM=id;DELIVERY_AT=ms`
    Deferred {
        /// The event.
        idem: String,
        /// When it is delivered again.
        delivery_at: u64,
    },
    /// `+PASS:DISCARDED;IDEM=id`
    Discarded {
        /// The event.
        idem: String,
    },
    /// `+PASS:ROLLED_BACK;IDEM=id`
    RolledBack {
        /// The event.
        idem: String,
    },
    /// `+PASS:REPLAY_STARTED;EVENT_NAME=n;COUNT=c`, followed by c records.
    ReplayStarted {
        /// The pattern replayed, as asked.
        event_name: String,
        /// How many records follow.
        count: u64,
    },
    /// `+PASS:PONG`: the answer to a client's PING.
    Pong,
}

/// The one line a command is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+PASS:...`
    Pass(Pass),
    /// `-FAIL:CODE;MESSAGE=text`
    Fail {
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
    /// `+REPLAY:{record}`: a single-event replay; the bytes are the record
    /// JSON.
    Event(Bytes),
}

impl Reply {
    /// A `-FAIL` reply. `;` and line breaks in `message` are replaced so the
    /// reply stays one parsable line.
    pub fn fail(code: ErrorCode, message: impl Into<String>) -> Reply {
        let mut message = message.into();
        if message.contains([';', '\n', '\r']) {
            message = message.replace(';', ",").replace(['\n', '\r'], " ");
        }
        Reply::Fail { code, message }
    }

    /// Appends the reply line, without its line ending, to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Reply::Pass(pass) => {
                dst.put_slice(b"+PASS:");
                encode_pass(pass, dst);
            }
            Reply::Fail { code, message } => {
                dst.put_slice(b"-FAIL:");
                dst.put_slice(code.as_str().as_bytes());
                dst.put_slice(b";MESSAGE=");
                dst.put_slice(message.as_bytes());
            }
            Reply::Event(record) => {
                dst.put_slice(b"+REPLAY:");
                dst.put_slice(record);
            }
        }
    }

    /// Whether this is a `-FAIL`.
    pub fn is_fail(&self) -> bool {
        matches!(self, Reply::Fail { .. })
    }
}

fn put_kv(dst: &mut BytesMut, key: &str, value: &str) {
    dst.put_u8(b';');
    dst.put_slice(key.as_bytes());
    dst.put_u8(b'=');
    dst.put_slice(value.as_bytes());
}

fn put_kn(dst: &mut BytesMut, key: &str, value: u64) {
    put_kv(dst, key, itoa::Buffer::new().format(value));
}

fn encode_pass(pass: &Pass, dst: &mut BytesMut) {
    match pass {
        Pass::Connected { client_id } => {
            dst.put_slice(b"CONNECTED");
            put_kv(dst, "CLIENT_ID", client_id);
        }
        Pass::Authenticated {
            client_id,
            client_hash,
        } => {
            dst.put_slice(b"{clientId=");
            dst.put_slice(client_id.as_bytes());
            dst.put_slice(b",clientHash=");
            dst.put_slice(client_hash.as_bytes());
            dst.put_u8(b'}');
        }
        Pass::Published { idem, timestamp } => {
            dst.put_slice(b"PUBLISHED");
            put_kv(dst, "IDEM", idem);
            put_kn(dst, "TIMESTAMP", *timestamp);
        }
        Pass::Subscribed { event_name } => {
            dst.put_slice(b"SUBSCRIBED");
            put_kv(dst, "EVENT_NAME", event_name);
        }
        Pass::Unsubscribed {
            event_name,
            client_id,
        } => {
            dst.put_slice(b"UNSUBSCRIBED");
            put_kv(dst, "EVENT_NAME", event_name);
            put_kv(dst, "CLIENT_ID", client_id);
        }
        Pass::Paused { event_name } => {
            dst.put_slice(b"PAUSED");
            put_kv(dst, "EVENT_NAME", event_name);
        }
        Pass::Continued { event_name } => {
            dst.put_slice(b"CONTINUED");
            put_kv(dst, "EVENT_NAME", event_name);
        }
        Pass::Acknowledged { idem } => {
            dst.put_slice(b"ACKNOWLEDGED");
            put_kv(dst, "IDEM", idem);
        }
        Pass::Deferred { idem, delivery_at } => {
            dst.put_slice(b"DEFERRED");
            put_kv(dst, "IDEM", idem);
            put_kn(dst, "DELIVERY_AT", *delivery_at);
        }
        Pass::Discarded { idem } => {
            dst.put_slice(b"DISCARDED");
            put_kv(dst, "IDEM", idem);
        }
        Pass::RolledBack { idem } => {
            dst.put_slice(b"ROLLED_BACK");
            put_kv(dst, "IDEM", idem);
        }
        Pass::ReplayStarted { event_name, count } => {
            dst.put_slice(b"REPLAY_STARTED");
            put_kv(dst, "EVENT_NAME", event_name);
            put_kn(dst, "COUNT", *count);
        }
        Pass::Pong => dst.put_slice(b"PONG"),
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        f.write_str(&String::from_utf8_lossy(&buf))
    }
}

#[cfg(test)]
mod encode_reply {
    use super::*;

    #[test]
    fn fail_messages_stay_on_one_line() {
        let reply = Reply::fail(ErrorCode::InvalidParameters, "a;b\nc");
        assert_eq!(reply.to_string(), "-FAIL:INVALID_PARAMETERS;MESSAGE=a,b c");
    }

    #[test]
    fn access_key_form_is_what_the_sdk_parses() {
        let reply = Reply::Pass(Pass::Authenticated {
            client_id: "k1".into(),
            client_hash: "00ff".into(),
        });
        assert_eq!(reply.to_string(), "+PASS:{clientId=k1,clientHash=00ff}");
    }
}
