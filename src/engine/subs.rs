//! The in-memory view of every client's durable subscriptions: read on
//! every live delivery and replay check, written by the commit thread
//! after the change is on disk. It also finds the clients a published
//! name concerns, so that a commit wakes those clients only.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ensync_protocol::field::{ClientId, Pattern};

use crate::store::Subscription;

/// Subscriptions by client, and the clients subscribed by pattern.
#[derive(Debug, Default)]
pub struct Registry {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_client: HashMap<ClientId, ClientSubs>,
    subscribers: Subscribers,
}

/// One client's subscriptions. A change costs the same however many the
/// client holds: the list handed out as a snapshot is built again only
/// when someone asks for it after a change, not at every change, so a
/// client subscribing to thousands of names one `SUB` at a time does not
/// copy them all at each.
#[derive(Debug, Default)]
struct ClientSubs {
    subs: Vec<Subscription>,
    /// Where each pattern is in `subs`.
    at: HashMap<Pattern, usize>,
    /// The patterns that are not an exact name: only these can cover
    /// another pattern.
    wide: Vec<Pattern>,
    /// Each subscription's delivery floor. Settlements raise floors at
    /// every ACK, so they are kept apart from the snapshot: raising one
    /// copies nothing, and a connection's delivery state sees no change
    /// of subscriptions to bring itself in line with.
    floors: HashMap<Pattern, u64>,
    /// `subs` as last handed out; empty after a change.
    snapshot: OnceLock<Arc<[Subscription]>>,
}

impl ClientSubs {
    /// Records `sub`, replacing the one with the same pattern; whether the
    /// pattern is new.
    fn put(&mut self, sub: Subscription) -> bool {
        self.snapshot = OnceLock::new();
        self.floors.insert(sub.pattern.clone(), sub.floor);
        if let Some(&at) = self.at.get(&sub.pattern) {
            self.subs[at] = sub;
            return false;
        }
        if !matches!(sub.pattern, Pattern::Exact(_)) {
            self.wide.push(sub.pattern.clone());
        }
        self.at.insert(sub.pattern.clone(), self.subs.len());
        self.subs.push(sub);
        true
    }

    /// Forgets the subscription to `pattern`; whether there was one.
    fn remove(&mut self, pattern: &Pattern) -> bool {
        let Some(at) = self.at.remove(pattern) else {
            return false;
        };
        self.snapshot = OnceLock::new();
        self.floors.remove(pattern);
        self.wide.retain(|wide| wide != pattern);
        self.subs.swap_remove(at);
        if let Some(moved) = self.subs.get(at) {
            self.at.insert(moved.pattern.clone(), at);
        }
        true
    }

    fn snapshot(&self) -> Arc<[Subscription]> {
        Arc::clone(self.snapshot.get_or_init(|| self.subs.as_slice().into()))
    }

    /// Whether one of the subscriptions covers every name `pattern` can
    /// match: the same pattern, or a wider one.
    fn covers(&self, pattern: &Pattern) -> bool {
        self.at.contains_key(pattern) || self.wide.iter().any(|wide| wide.covers(pattern))
    }
}

/// Who subscribes to what, for finding the clients a name concerns
/// without looking at every client's subscriptions.
#[derive(Debug, Default)]
struct Subscribers {
    /// By the name an exact pattern names.
    exact: HashMap<String, HashSet<ClientId>>,
    /// By the prefix of a `prefix/*` pattern.
    below: HashMap<String, HashSet<ClientId>>,
    /// Subscribed to `*`.
    all: HashSet<ClientId>,
}

impl Subscribers {
    fn set(&mut self, pattern: &Pattern) -> &mut HashSet<ClientId> {
        match pattern {
            Pattern::Exact(name) => self.exact.entry(name.as_str().to_owned()).or_default(),
            Pattern::Below(prefix) => self.below.entry(prefix.clone()).or_default(),
            Pattern::All => &mut self.all,
        }
    }

    fn add(&mut self, client: &ClientId, pattern: &Pattern) {
        self.set(pattern).insert(client.clone());
    }

    fn remove(&mut self, client: &ClientId, pattern: &Pattern) {
        let (map, key) = match pattern {
            Pattern::Exact(name) => (&mut self.exact, name.as_str()),
            Pattern::Below(prefix) => (&mut self.below, prefix.as_str()),
            Pattern::All => {
                self.all.remove(client);
                return;
            }
        };
        if let Some(set) = map.get_mut(key) {
            set.remove(client);
            if set.is_empty() {
                map.remove(key);
            }
        }
    }

    /// Calls `f` with every client one of whose patterns matches `name`:
    /// once per matching pattern.
    fn matching(&self, name: &str, f: &mut impl FnMut(&ClientId)) {
        let clients = self.exact.get(name).into_iter().chain(
            // `prefix/*` matches the names with a `/` right after it.
            memchr::memchr_iter(b'/', name.as_bytes()).filter_map(|at| self.below.get(&name[..at])),
        );
        clients.chain([&self.all]).flatten().for_each(f);
    }
}

impl Registry {
    /// A registry holding `subs` (as loaded from the store).
    pub fn new(subs: Vec<Subscription>) -> Self {
        let registry = Registry::default();
        for sub in subs {
            registry.put(sub);
        }
        registry
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().expect("registry lock is never poisoned")
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().expect("registry lock is never poisoned")
    }

    /// Records a subscription as stored, with its stored floor, replacing
    /// the one with the same pattern. Snapshots already handed out stay as
    /// they were.
    pub fn put(&self, sub: Subscription) {
        let mut inner = self.write();
        let Inner {
            by_client,
            subscribers,
        } = &mut *inner;
        let (client, pattern) = (sub.client.clone(), sub.pattern.clone());
        if by_client.entry(client.clone()).or_default().put(sub) {
            subscribers.add(&client, &pattern);
        }
    }

    /// Forgets a subscription.
    pub fn remove(&self, client: &ClientId, pattern: &Pattern) {
        let mut inner = self.write();
        let Inner {
            by_client,
            subscribers,
        } = &mut *inner;
        let Some(subs) = by_client.get_mut(client) else {
            return;
        };
        if subs.remove(pattern) {
            subscribers.remove(client, pattern);
            if subs.subs.is_empty() {
                by_client.remove(client);
            }
        }
    }

    /// Moves delivery floors forward.
    pub fn raise_floors(&self, client: &ClientId, raised: &[(Pattern, u64)]) {
        let mut inner = self.write();
        let Some(subs) = inner.by_client.get_mut(client) else {
            return;
        };
        for (pattern, floor) in raised {
            if let Some(current) = subs.floors.get_mut(pattern) {
                *current = (*current).max(*floor);
            }
        }
    }

    /// The delivery floor of the client's subscription to `pattern`:
    /// every event up to it that the subscription delivers is settled.
    pub fn floor(&self, client: &ClientId, pattern: &Pattern) -> Option<u64> {
        self.read()
            .by_client
            .get(client)?
            .floors
            .get(pattern)
            .copied()
    }

    /// The client's subscriptions (a snapshot, built again only after a
    /// change). Each one's `floor` is the one it was stored with;
    /// [`Registry::floor`] has it as settlements have raised it since.
    pub fn of(&self, client: &ClientId) -> Arc<[Subscription]> {
        self.read()
            .by_client
            .get(client)
            .map_or_else(|| Arc::new([]) as Arc<[Subscription]>, ClientSubs::snapshot)
    }

    /// Every client's subscriptions (a snapshot).
    pub fn all(&self) -> Vec<Arc<[Subscription]>> {
        self.read()
            .by_client
            .values()
            .map(ClientSubs::snapshot)
            .collect()
    }

    /// How many subscriptions the client holds, and whether one of them
    /// is to `pattern`.
    pub fn held(&self, client: &ClientId, pattern: &Pattern) -> (usize, bool) {
        self.read()
            .by_client
            .get(client)
            .map_or((0, false), |subs| {
                (subs.subs.len(), subs.at.contains_key(pattern))
            })
    }

    /// Whether one of the client's subscriptions covers every name
    /// `pattern` can match.
    pub fn covers(&self, client: &ClientId, pattern: &Pattern) -> bool {
        self.read()
            .by_client
            .get(client)
            .is_some_and(|subs| subs.covers(pattern))
    }

    /// Adds to `out` every client with a subscription matching one of
    /// `names`, paused or not. A name repeating the one before it is
    /// looked up once.
    pub fn subscribers_of<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
        out: &mut HashSet<ClientId>,
    ) {
        let inner = self.read();
        if inner.by_client.is_empty() {
            return;
        }
        let mut add = |client: &ClientId| {
            if !out.contains(client) {
                out.insert(client.clone());
            }
        };
        let mut last = None;
        for name in names {
            if last != Some(name) {
                inner.subscribers.matching(name, &mut add);
                last = Some(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(client: &str) -> ClientId {
        client.parse().expect("a client id")
    }

    fn pattern(text: &str) -> Pattern {
        text.parse().expect("a pattern")
    }

    fn sub(client: &str, text: &str) -> Subscription {
        Subscription {
            client: id(client),
            pattern: pattern(text),
            since: 0,
            paused: false,
            floor: 0,
        }
    }

    fn subscribers(registry: &Registry, names: &[&str]) -> Vec<String> {
        let mut out = HashSet::new();
        registry.subscribers_of(names.iter().copied(), &mut out);
        let mut out: Vec<String> = out.iter().map(ToString::to_string).collect();
        out.sort();
        out
    }

    #[test]
    fn a_name_finds_the_clients_whose_patterns_match_it() {
        let registry = Registry::new(vec![
            sub("exact", "orders/created"),
            sub("below", "orders/*"),
            sub("deeper", "orders/created/*"),
            sub("other", "payments/*"),
            sub("everything", "*"),
        ]);
        assert_eq!(
            subscribers(&registry, &["orders/created"]),
            ["below", "everything", "exact"]
        );
        assert_eq!(
            subscribers(&registry, &["orders/created/eu"]),
            ["below", "deeper", "everything"]
        );
        // `orders/*` matches neither `orders` itself nor `ordersx/1`.
        assert_eq!(
            subscribers(&registry, &["orders", "ordersx/1"]),
            ["everything"]
        );
        assert_eq!(
            subscribers(&registry, &["payments/in", "orders/created"]),
            ["below", "everything", "exact", "other"]
        );
    }

    #[test]
    fn unsubscribing_removes_a_client_from_what_its_pattern_finds() {
        let registry = Registry::new(vec![sub("a", "orders/*"), sub("b", "orders/*")]);
        registry.put(sub("a", "payments/in"));
        registry.remove(&id("a"), &pattern("orders/*"));
        // Nothing to remove: nobody else's subscription goes.
        registry.remove(&id("a"), &pattern("orders/*"));
        registry.remove(&id("c"), &pattern("orders/*"));
        assert_eq!(subscribers(&registry, &["orders/1"]), ["b"]);
        assert_eq!(subscribers(&registry, &["payments/in"]), ["a"]);
        // A floor raised or a pause changes no pattern, and a floor raised
        // leaves the snapshot as it was.
        let before = registry.of(&id("b"));
        registry.raise_floors(&id("b"), &[(pattern("orders/*"), 7)]);
        registry.raise_floors(&id("b"), &[(pattern("orders/*"), 5)]);
        assert!(Arc::ptr_eq(&before, &registry.of(&id("b"))));
        assert_eq!(registry.floor(&id("b"), &pattern("orders/*")), Some(7));
        registry.put(Subscription {
            paused: true,
            ..sub("b", "orders/*")
        });
        assert_eq!(subscribers(&registry, &["orders/1"]), ["b"]);
        registry.remove(&id("b"), &pattern("orders/*"));
        registry.remove(&id("a"), &pattern("payments/in"));
        assert!(subscribers(&registry, &["orders/1", "payments/in"]).is_empty());
        let inner = registry.read();
        assert!(inner.subscribers.below.is_empty() && inner.subscribers.exact.is_empty());
    }
}
