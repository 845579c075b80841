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
            registry.add(sub);
        }
        registry
    }

    /// Records a subscription; an existing one for the same pattern stays
    /// as it is.
    pub fn add(&self, sub: Subscription) {
        let mut map = self
            .by_client
            .write()
            .expect("registry lock is never poisoned");
        let current = map
            .get(&sub.client)
            .cloned()
            .unwrap_or_else(|| Arc::new([]));
        if current.iter().any(|s| s.pattern == sub.pattern) {
            return;
        }
        let mut next = current.to_vec();
        let client = sub.client.clone();
        next.push(sub);
        map.insert(client, next.into());
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

    /// Whether one of the client's subscriptions covers every name
    /// `pattern` can match.
    pub fn covers(&self, client: &ClientId, pattern: &Pattern) -> bool {
        self.of(client).iter().any(|s| s.pattern.covers(pattern))
    }
}
