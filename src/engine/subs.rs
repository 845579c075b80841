//! The in-memory view of every client's durable subscriptions: read on
//! every live delivery and replay check, written by the commit thread
//! after the change is on disk.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ensync_protocol::field::{ClientId, Pattern};

use crate::store::Subscription;

/// Subscriptions by client.
#[derive(Debug, Default)]
pub struct Registry {
    by_client: RwLock<HashMap<ClientId, Arc<[Subscription]>>>,
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

    /// Records a subscription as stored, replacing the one with the same
    /// pattern.
    pub fn put(&self, sub: Subscription) {
        self.change(&sub.client.clone(), |subs| {
            match subs.iter_mut().find(|s| s.pattern == sub.pattern) {
                Some(existing) => *existing = sub,
                None => subs.push(sub),
            }
        });
    }

    /// Forgets a subscription.
    pub fn remove(&self, client: &ClientId, pattern: &Pattern) {
        self.change(client, |subs| subs.retain(|s| s.pattern != *pattern));
    }

    /// Moves delivery floors forward.
    pub fn raise_floors(&self, client: &ClientId, floors: &[(Pattern, u64)]) {
        self.change(client, |subs| {
            for (pattern, floor) in floors {
                if let Some(sub) = subs.iter_mut().find(|s| s.pattern == *pattern) {
                    sub.floor = sub.floor.max(*floor);
                }
            }
        });
    }

    /// Replaces the client's subscriptions with an edited copy, so that
    /// snapshots already handed out stay as they were.
    fn change(&self, client: &ClientId, edit: impl FnOnce(&mut Vec<Subscription>)) {
        let mut map = self
            .by_client
            .write()
            .expect("registry lock is never poisoned");
        let mut subs = map.get(client).map(|s| s.to_vec()).unwrap_or_default();
        edit(&mut subs);
        if subs.is_empty() {
            map.remove(client);
        } else {
            map.insert(client.clone(), subs.into());
        }
    }

    /// The client's subscriptions (a cheap snapshot).
    pub fn of(&self, client: &ClientId) -> Arc<[Subscription]> {
        self.by_client
            .read()
            .expect("registry lock is never poisoned")
            .get(client)
            .cloned()
            .unwrap_or_else(|| Arc::new([]))
    }

    /// Every client's subscriptions (a snapshot).
    pub fn all(&self) -> Vec<Arc<[Subscription]>> {
        self.by_client
            .read()
            .expect("registry lock is never poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Whether one of the client's subscriptions covers every name
    /// `pattern` can match.
    pub fn covers(&self, client: &ClientId, pattern: &Pattern) -> bool {
        self.of(client).iter().any(|s| s.pattern.covers(pattern))
    }
}
