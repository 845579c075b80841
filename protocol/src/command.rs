//! Commands: one struct per verb, holding validated fields named after the
//! wire keys, and their canonical encoding (upper-case verb and keys, keys
//! in the order of SPEC.md, optional keys only when given).

use std::fmt;

use crate::field::{
    ClientId, DelayMs, DeliveryTo, EventId, EventName, Limit, Metadata, Pattern, Payload, Position,
    Reason,
};

/// How a CONN names its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnAuth {
    /// `CLIENT_ID=id`
    ClientId(ClientId),
    /// `ACCESS_KEY=key`, as the SDK sends it.
    AccessKey(ClientId),
}

/// Authenticates the connection as one client.
///
/// ```text
/// CONN;CLIENT_ID=<id>
/// CONN;ACCESS_KEY=<key>
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    /// The credential given.
    pub auth: ConnAuth,
}

/// Publishes one event.
///
/// ```text
/// PUB;CLIENT_ID=<id>;EVENT_NAME=<name>;PAYLOAD=<json|base64>;DELIVERY_TO=<*|id,...>[;METADATA=<object>]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pub {
    /// The publisher.
    pub client_id: ClientId,
    /// The event name.
    pub event_name: EventName,
    /// The payload.
    pub payload: Payload,
    /// Who may receive it.
    pub delivery_to: DeliveryTo,
    /// Extra metadata.
    pub metadata: Option<Metadata>,
}

/// Subscribes the client to a name or pattern, durably.
///
/// ```text
/// SUB;CLIENT_ID=<id>;EVENT_NAME=<pattern>
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sub {
    /// The subscriber.
    pub client_id: ClientId,
    /// What it subscribes to.
    pub event_name: Pattern,
}

/// Removes a subscription.
///
/// ```text
/// UNSUB;CLIENT_ID=<id>;EVENT_NAME=<pattern>
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsub {
    /// The subscriber.
    pub client_id: ClientId,
    /// The subscription.
    pub event_name: Pattern,
}

/// Holds delivery on a subscription.
///
/// ```text
/// PAUSE;CLIENT_ID=<id>;EVENT_NAME=<pattern>[;REASON=<text>]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// The subscriber.
    pub client_id: ClientId,
    /// The subscription.
    pub event_name: Pattern,
    /// Why, for the log.
    pub reason: Option<Reason>,
}

/// Resumes delivery on a paused subscription.
///
/// ```text
/// CONTINUE;CLIENT_ID=<id>;EVENT_NAME=<pattern>
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continue {
    /// The subscriber.
    pub client_id: ClientId,
    /// The subscription.
    pub event_name: Pattern,
}

/// Settles a delivered event as processed.
///
/// ```text
/// ACK;CLIENT_ID=<id>;EVENT_IDEM=<id>[;BLOCK=<n>][;EVENT_NAME=<name>]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The subscriber.
    pub client_id: ClientId,
    /// The event.
    pub event_idem: EventId,
    /// The record's block, as delivered.
    pub block: Option<u64>,
    /// The event's name.
    pub event_name: Option<EventName>,
}

/// Asks for a delivered event again after a delay.
///
/// ```text
/// DEFER;CLIENT_ID=<id>;EVENT_IDEM=<id>;DELAY=<ms>[;EVENT_NAME=<name>][;REASON=<text>]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defer {
    /// The subscriber.
    pub client_id: ClientId,
    /// The event.
    pub event_idem: EventId,
    /// How long to wait (DELAY, or DELAY_MS).
    pub delay: DelayMs,
    /// The event's name.
    pub event_name: Option<EventName>,
    /// Why.
    pub reason: Option<Reason>,
}

/// Drops a delivered event for this client for good.
///
/// ```text
/// DISCARD;CLIENT_ID=<id>;EVENT_IDEM=<id>;REASON=<text>[;EVENT_NAME=<name>]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discard {
    /// The subscriber.
    pub client_id: ClientId,
    /// The event.
    pub event_idem: EventId,
    /// Why.
    pub reason: Reason,
    /// The event's name.
    pub event_name: Option<EventName>,
}

/// Puts a delivered event back to pending, to be delivered again.
///
/// ```text
/// ROLLBACK;CLIENT_ID=<id>;EVENT_IDEM=<id>[;BLOCK=<n>]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    /// The subscriber.
    pub client_id: ClientId,
    /// The event.
    pub event_idem: EventId,
    /// The record's block, as delivered.
    pub block: Option<u64>,
}

/// Replays stored events of a name or pattern, oldest first.
///
/// ```text
/// REPLAY;CLIENT_ID=<id>;EVENT_NAME=<pattern>;FROM_POSITION=<ms|rfc3339|evt_id|earliest>
///       [;TO_POSITION=<ms|rfc3339|evt_id>][;LIMIT=<n>][;INCLUDE_PAYLOADS=<bool>][;ONLY_UNACKED=<bool>]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The requesting client.
    pub client_id: ClientId,
    /// What to replay.
    pub event_name: Pattern,
    /// Where to start (inclusive).
    pub from_position: Position,
    /// Where to stop (inclusive).
    pub to_position: Option<Position>,
    /// How many records at most (default 50).
    pub limit: Option<Limit>,
    /// Whether records carry their payload (default true).
    pub include_payloads: Option<bool>,
    /// Whether to skip events the client acknowledged (default false).
    pub only_unacked: Option<bool>,
}

/// Replays one stored event, answered `+REPLAY:{record}`.
///
/// ```text
/// REPLAY;CLIENT_ID=<id>;EVENT_IDEM=<id>[;EVENT_NAME=<name>]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayEvent {
    /// The requesting client.
    pub client_id: ClientId,
    /// The event.
    pub event_idem: EventId,
    /// The event's name, checked when given.
    pub event_name: Option<EventName>,
}

/// One parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// CONN
    Conn(Conn),
    /// PUB
    Pub(Pub),
    /// SUB
    Sub(Sub),
    /// UNSUB
    Unsub(Unsub),
    /// PAUSE
    Pause(Pause),
    /// CONTINUE
    Continue(Continue),
    /// ACK
    Ack(Ack),
    /// DEFER
    Defer(Defer),
    /// DISCARD
    Discard(Discard),
    /// ROLLBACK
    Rollback(Rollback),
    /// REPLAY, range form
    Replay(Replay),
    /// REPLAY, single-event form
    ReplayEvent(ReplayEvent),
    /// PING from the client: answered `+PASS:PONG`.
    Ping,
    /// PONG from the client, answering a server PING: no reply.
    Pong,
}

impl Command {
    /// The wire verb.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Conn(_) => "CONN",
            Command::Pub(_) => "PUB",
            Command::Sub(_) => "SUB",
            Command::Unsub(_) => "UNSUB",
            Command::Pause(_) => "PAUSE",
            Command::Continue(_) => "CONTINUE",
            Command::Ack(_) => "ACK",
            Command::Defer(_) => "DEFER",
            Command::Discard(_) => "DISCARD",
            Command::Rollback(_) => "ROLLBACK",
            Command::Replay(_) | Command::ReplayEvent(_) => "REPLAY",
            Command::Ping => "PING",
            Command::Pong => "PONG",
        }
    }

    /// The CLIENT_ID the command carries (every command but CONN, PING and
    /// PONG has one).
    pub fn client_id(&self) -> Option<&ClientId> {
        match self {
            Command::Conn(_) | Command::Ping | Command::Pong => None,
            Command::Pub(c) => Some(&c.client_id),
            Command::Sub(c) => Some(&c.client_id),
            Command::Unsub(c) => Some(&c.client_id),
            Command::Pause(c) => Some(&c.client_id),
            Command::Continue(c) => Some(&c.client_id),
            Command::Ack(c) => Some(&c.client_id),
            Command::Defer(c) => Some(&c.client_id),
            Command::Discard(c) => Some(&c.client_id),
            Command::Rollback(c) => Some(&c.client_id),
            Command::Replay(c) => Some(&c.client_id),
            Command::ReplayEvent(c) => Some(&c.client_id),
        }
    }
}

/// Writes `;KEY=value` for a present value.
struct Keys<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl Keys<'_, '_> {
    fn key(&mut self, key: &str, value: impl fmt::Display) -> fmt::Result {
        let value = value.to_string();
        // NOTE: `KEY=:VALUE` reads as `KEY=VALUE`, so a value that begins
        // with ':' (a REASON can) keeps it only as `KEY=::value`.
        let colon = if value.starts_with(':') { ":" } else { "" };
        write!(self.0, ";{key}={colon}{value}")
    }

    fn opt(&mut self, key: &str, value: Option<impl fmt::Display>) -> fmt::Result {
        match value {
            Some(value) => self.key(key, value),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Command {
    /// The canonical encoding: the line this command parses from.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.verb())?;
        let mut k = Keys(f);
        match self {
            Command::Conn(c) => match &c.auth {
                ConnAuth::ClientId(id) => k.key("CLIENT_ID", id),
                ConnAuth::AccessKey(key) => k.key("ACCESS_KEY", key),
            },
            Command::Pub(c) => {
                k.key("CLIENT_ID", &c.client_id)?;
                k.key("EVENT_NAME", &c.event_name)?;
                k.key("PAYLOAD", c.payload.as_str())?;
                k.key("DELIVERY_TO", &c.delivery_to)?;
                k.opt("METADATA", c.metadata.as_ref().map(Metadata::as_str))
            }
            Command::Sub(c) => {
                k.key("CLIENT_ID", &c.client_id)?;
                k.key("EVENT_NAME", &c.event_name)
            }
            Command::Unsub(c) => {
                k.key("CLIENT_ID", &c.client_id)?;
                k.key("EVENT_NAME", &c.event_name)
            }
            Command::Pause(c) => {
                k.key("CLIENT_ID", &c.client_id)?;
                k.key("EVENT_NAME", &c.event_name)?;
                k.opt("REASON", c.reason.as_ref().map(Reason::as_str))
            }
            Command::Continue(c) => {
                k.key("CLIENT_ID", &c.client_id)?;
                k.key("EVENT_NAME", &c.event_name)
            }
            Command::Ack(c) => {
                k.key("CLIENT_ID", &c.client_id)?;
                k.key("EVENT_IDEM", &c.event_idem)?;
                k.opt("BLOCK", c.block)?;
                k.opt("EVENT_NAME", c.event_name.as_ref())
            }
            Command::Defer(c) => {
                k.key("CLIENT_ID", &c.client_id)?;
                k.key("EVENT_IDEM", &c.event_idem)?;
                k.key("DELAY", c.delay.get())?;
                k.opt("EVENT_NAME", c.event_name.as_ref())?;
                k.opt("REASON", c.reason.as_ref().map(Reason::as_str))
            }
            Command::Discard(c) => {
                k.key("CLIENT_ID", &c.client_id)?;
                k.key("EVENT_IDEM", &c.event_idem)?;
                k.key("REASON", c.reason.as_str())?;
                k.opt("EVENT_NAME", c.event_name.as_ref())
            }
            Command::Rollback(c) => {
                k.key("CLIENT_ID", &c.client_id)?;
                k.key("EVENT_IDEM", &c.event_idem)?;
                k.opt("BLOCK", c.block)
            }
            Command::Replay(c) => {
                k.key("CLIENT_ID", &c.client_id)?;
                k.key("EVENT_NAME", &c.event_name)?;
                k.key("FROM_POSITION", &c.from_position)?;
                k.opt("TO_POSITION", c.to_position.as_ref())?;
                k.opt("LIMIT", c.limit)?;
                k.opt("INCLUDE_PAYLOADS", c.include_payloads)?;
                k.opt("ONLY_UNACKED", c.only_unacked)
            }
            Command::ReplayEvent(c) => {
                k.key("CLIENT_ID", &c.client_id)?;
                k.key("EVENT_IDEM", &c.event_idem)?;
                k.opt("EVENT_NAME", c.event_name.as_ref())
            }
            Command::Ping | Command::Pong => Ok(()),
        }
    }
}

#[cfg(test)]
mod encode_command {
    use crate::parse_command;

    #[test]
    fn value_beginning_with_colon_is_written_after_another_colon() {
        let cmd = parse_command("PAUSE;CLIENT_ID=a;EVENT_NAME=b;REASON=::x").expect("parses");
        assert_eq!(cmd.to_string(), "PAUSE;CLIENT_ID=a;EVENT_NAME=b;REASON=::x");
        assert_eq!(parse_command(&cmd.to_string()).ok(), Some(cmd));
    }
}
