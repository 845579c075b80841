//! Who may connect, and which event names each client may publish,
//! subscribe to and replay.
//!
//! With no access key in the config the server is in open mode: any
//! CLIENT_ID is accepted, an ACCESS_KEY is taken as the client id, and
//! every client may do everything. With keys, a client connects only with
//! its key (`CONN;ACCESS_KEY=...`) and within its patterns; what a client
//! is not granted is refused with `PERMISSION_DENIED`.

use std::collections::HashMap;
use std::sync::Arc;

use ensync_protocol::command::ConnAuth;
use ensync_protocol::field::{ClientId, Pattern};
use ensync_protocol::{ErrorCode, Reply};
use sha2::{Digest, Sha256};

use crate::config::{ClientEntry, Config, Invalid};

/// What one client may do with event names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    publish: Vec<Pattern>,
    subscribe: Vec<Pattern>,
    replay: Vec<Pattern>,
}

impl Grants {
    /// Everything: open mode.
    pub fn all() -> Self {
        Self {
            publish: vec![Pattern::All],
            subscribe: vec![Pattern::All],
            replay: vec![Pattern::All],
        }
    }

    /// Whether events named `name` may be published.
    pub fn may_publish(&self, name: &str) -> bool {
        self.publish.iter().any(|p| p.matches(name))
    }

    /// Whether a subscription to `pattern` may be made: one grant must
    /// cover every name it matches.
    pub fn may_subscribe(&self, pattern: &Pattern) -> bool {
        self.subscribe.iter().any(|p| p.covers(pattern))
    }

    /// Whether a replay of `pattern` may be asked for.
    pub fn may_replay(&self, pattern: &Pattern) -> bool {
        self.replay.iter().any(|p| p.covers(pattern))
    }

    /// Whether the event named `name` may be replayed.
    pub fn may_replay_name(&self, name: &str) -> bool {
        self.replay.iter().any(|p| p.matches(name))
    }
}

/// The access rules the server runs with.
#[derive(Debug)]
pub struct Access {
    /// Client ids by the SHA-256 of their access key; empty in open mode.
    by_key: HashMap<[u8; 32], ClientId>,
    /// The same clients' grants by id.
    by_id: HashMap<String, Arc<Grants>>,
    /// Public keys by client id: events addressed to one reach the client.
    public_keys: HashMap<String, Vec<String>>,
    /// Shared by every connection in open mode.
    everything: Arc<Grants>,
}

/// The message of a refused replay (the one EnSync documents).
pub const NOT_AUTHORIZED_TO_REPLAY: &str = "Not authorized to replay this event type";
/// The message of a refused publish.
pub const NOT_AUTHORIZED_TO_PUBLISH: &str = "Not authorized to publish this event type";
/// The message of a refused subscription.
pub const NOT_AUTHORIZED_TO_SUBSCRIBE: &str = "Not authorized to subscribe to this event type";

/// The reply to a CONN that names no configured key.
pub const UNKNOWN_KEY: &str =
    "no client has this access key (check the key the operator gave you: keys are case-sensitive)";

impl Access {
    /// Builds the rules from `config.clients`.
    ///
    /// # Errors
    /// An entry that cannot be used: a bad id, key or pattern, a repeated
    /// id or key, or a mix of clients with and without keys.
    pub fn from_config(config: &Config) -> Result<Self, Invalid> {
        let keyed = config.clients.iter().any(ClientEntry::has_key);
        let mut by_key = HashMap::new();
        let mut by_id = HashMap::new();
        let mut public_keys: HashMap<String, Vec<String>> = HashMap::new();
        let mut ids = HashMap::new();
        for (index, entry) in config.clients.iter().enumerate() {
            let key = |field: &str| format!("clients[{index}].{field}");
            let id: ClientId = entry
                .id
                .parse()
                .map_err(|e| Invalid::new(key("id"), format!("{:?} {e}", entry.id)))?;
            if let Some(first) = ids.insert(entry.id.clone(), index) {
                return Err(Invalid::new(
                    key("id"),
                    format!("{:?} is already the id of clients[{first}]", entry.id),
                ));
            }
            if let Some(public_key) = &entry.public_key {
                check_public_key(config, index, public_key)
                    .map_err(|e| Invalid::new(key("public_key"), e))?;
                public_keys
                    .entry(entry.id.clone())
                    .or_default()
                    .push(public_key.clone());
            }
            let grants = Grants {
                publish: patterns(&entry.publish).map_err(|e| Invalid::new(key("publish"), e))?,
                subscribe: patterns(&entry.subscribe)
                    .map_err(|e| Invalid::new(key("subscribe"), e))?,
                replay: patterns(&entry.replay).map_err(|e| Invalid::new(key("replay"), e))?,
            };
            if !keyed {
                let granted = [
                    ("publish", &entry.publish),
                    ("subscribe", &entry.subscribe),
                    ("replay", &entry.replay),
                ];
                if let Some((field, _)) = granted.iter().find(|(_, list)| !list.is_empty()) {
                    return Err(Invalid::new(
                        key(field),
                        "takes effect only with access keys: give the clients an access_key (without one, anyone may connect as any client)",
                    ));
                }
                continue;
            }
            let digest = match (&entry.access_key, &entry.access_key_sha256) {
                (Some(_), Some(_)) => {
                    return Err(Invalid::new(
                        key("access_key_sha256"),
                        "give access_key or access_key_sha256, not both",
                    ))
                }
                (None, None) => {
                    return Err(Invalid::new(
                        key("id"),
                        format!("{:?} has no access_key (or access_key_sha256); once one client has a key, every client needs one", entry.id),
                    ))
                }
                (Some(plain), None) => {
                    plain.parse::<ClientId>().map_err(|e| {
                        Invalid::new(key("access_key"), format!("{e} (it is sent as CONN;ACCESS_KEY=<key>)"))
                    })?;
                    Sha256::digest(plain.as_bytes()).into()
                }
                (None, Some(hex)) => from_hex(hex).ok_or_else(|| {
                    Invalid::new(
                        key("access_key_sha256"),
                        "must be 64 hex digits (e.g. the output of: printf %s KEY | sha256sum)",
                    )
                })?,
            };
            by_id.insert(entry.id.clone(), Arc::new(grants));
            if let Some(other) = by_key.insert(digest, id) {
                let field = if entry.access_key.is_some() {
                    "access_key"
                } else {
                    "access_key_sha256"
                };
                return Err(Invalid::new(
                    key(field),
                    format!(
                        "is also the key of {:?}; each client needs its own",
                        other.as_str()
                    ),
                ));
            }
        }
        Ok(Self {
            by_key,
            by_id,
            public_keys,
            everything: Arc::new(Grants::all()),
        })
    }

    /// Whether clients must present an access key.
    pub fn is_open(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Authenticates a CONN: the client and what it may do.
    ///
    /// # Errors
    /// `CLIENT_NOT_FOUND` for a key no client has; `PERMISSION_DENIED` for
    /// a bare CLIENT_ID when keys are required.
    pub fn connect(&self, auth: &ConnAuth) -> Result<(ClientId, Arc<Grants>), Reply> {
        if self.is_open() {
            let id = match auth {
                ConnAuth::ClientId(id) | ConnAuth::AccessKey(id) => id.clone(),
            };
            return Ok((id, Arc::clone(&self.everything)));
        }
        match auth {
            ConnAuth::AccessKey(key) => {
                let digest: [u8; 32] = Sha256::digest(key.as_str().as_bytes()).into();
                let unknown = || Reply::fail(ErrorCode::ClientNotFound, UNKNOWN_KEY);
                let id = self.by_key.get(&digest).ok_or_else(unknown)?;
                let grants = self.by_id.get(id.as_str()).ok_or_else(unknown)?;
                Ok((id.clone(), Arc::clone(grants)))
            }
            ConnAuth::ClientId(_) => Err(Reply::fail(
                ErrorCode::PermissionDenied,
                "this server checks access keys: connect with CONN;ACCESS_KEY=<your access key>",
            )),
        }
    }

    /// Whether a stored subscription of `client` to `pattern` may stay:
    /// in open mode always; with keys, only a configured client's within
    /// its subscribe patterns.
    pub fn may_keep(&self, client: &str, pattern: &Pattern) -> bool {
        self.is_open()
            || self
                .by_id
                .get(client)
                .is_some_and(|grants| grants.may_subscribe(pattern))
    }

    /// The public keys of `client` (events addressed to them reach it).
    pub fn public_keys(&self, client: &str) -> &[String] {
        self.public_keys.get(client).map_or(&[], Vec::as_slice)
    }
}

/// A public key is an address events reach its client by, so it must
/// be one (a valid id) and name no one else: not another client's id or
/// key, and not `*`.
fn check_public_key(config: &Config, index: usize, public_key: &str) -> Result<(), String> {
    if public_key == "*" {
        return Err("\"*\" addresses every subscriber, not one client".into());
    }
    public_key
        .parse::<ClientId>()
        .map_err(|e| format!("{public_key:?} {e}"))?;
    for (other, entry) in config.clients.iter().enumerate() {
        if entry.id == public_key {
            return Err(format!(
                "{public_key:?} is the id of clients[{other}]: events addressed to it would reach both"
            ));
        }
        if other < index && entry.public_key.as_deref() == Some(public_key) {
            return Err(format!(
                "{public_key:?} is also the public key of clients[{other}]"
            ));
        }
    }
    Ok(())
}

fn patterns(list: &[String]) -> Result<Vec<Pattern>, String> {
    list.iter()
        .map(|text| {
            text.parse()
                .map_err(|e| format!("{text:?} is not an event-name pattern: {e}"))
        })
        .collect()
}

fn from_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod rules {
    use super::*;

    fn entry(id: &str, key: &str, publish: &[&str], replay: &[&str]) -> ClientEntry {
        ClientEntry {
            id: id.into(),
            access_key: Some(key.into()),
            publish: publish.iter().map(|s| (*s).to_string()).collect(),
            replay: replay.iter().map(|s| (*s).to_string()).collect(),
            ..ClientEntry::default()
        }
    }

    fn access(clients: Vec<ClientEntry>) -> Result<Access, Invalid> {
        Access::from_config(&Config {
            clients,
            ..Config::default()
        })
    }

    #[test]
    fn grants_cover_what_their_patterns_cover() {
        let rules =
            access(vec![entry("a", "ka", &["order/*"], &["order/created"])]).expect("valid");
        let (id, grants) = rules
            .connect(&ConnAuth::AccessKey("ka".parse().expect("key")))
            .expect("known key");
        assert_eq!(id.as_str(), "a");
        assert!(grants.may_publish("order/x/y"));
        assert!(!grants.may_publish("billing/x"));
        assert!(grants.may_replay(&"order/created".parse().expect("pattern")));
        assert!(!grants.may_replay(&"order/*".parse().expect("pattern")));
        assert!(!grants.may_subscribe(&"order/created".parse().expect("pattern")));
    }

    #[test]
    fn a_hashed_key_is_the_same_key() {
        let hex = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"; // "foo"
        let rules = access(vec![ClientEntry {
            id: "a".into(),
            access_key_sha256: Some(hex.into()),
            ..ClientEntry::default()
        }])
        .expect("valid");
        assert!(rules
            .connect(&ConnAuth::AccessKey("foo".parse().expect("key")))
            .is_ok());
        assert!(rules
            .connect(&ConnAuth::AccessKey("Foo".parse().expect("key")))
            .is_err());
    }

    #[test]
    fn entries_that_cannot_work_are_refused_with_their_key() {
        let mut no_key = entry("b", "kb", &[], &[]);
        no_key.access_key = None;
        let refused = access(vec![entry("a", "ka", &[], &[]), no_key]).expect_err("mixed");
        assert_eq!(refused.key, "clients[1].id");
        let refused = access(vec![entry("a", "k", &[], &[]), entry("b", "k", &[], &[])])
            .expect_err("shared key");
        assert_eq!(refused.key, "clients[1].access_key");
        let refused = access(vec![entry("a", "k", &[], &[]), entry("a", "k2", &[], &[])])
            .expect_err("same id");
        assert_eq!(refused.key, "clients[1].id");
        let mut open = entry("a", "k", &["x/*"], &[]);
        open.access_key = None;
        let refused = access(vec![open]).expect_err("grants without keys");
        assert_eq!(refused.key, "clients[0].publish");
        let mut thief = entry("mallory", "km", &[], &[]);
        thief.public_key = Some("billing".into());
        let refused = access(vec![entry("billing", "kb", &[], &[]), thief])
            .expect_err("a public key that is another client's id");
        assert_eq!(refused.key, "clients[1].public_key");
        let mut star = entry("a", "k", &[], &[]);
        star.public_key = Some("*".into());
        assert!(access(vec![star]).is_err(), "* as a public key");
        let mut signed = entry("a", "k", &[], &[]);
        signed.access_key = None;
        signed.access_key_sha256 = Some(format!("+{}", "f".repeat(63)));
        assert_eq!(
            access(vec![signed]).expect_err("a sign").key,
            "clients[0].access_key_sha256"
        );
    }
}
