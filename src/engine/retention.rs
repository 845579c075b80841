//! Retention: a background task that removes the oldest commits once they
//! are older than the configured age or the log is over its size, and the
//! pins that keep it away from what running replays read.
//!
//! Each step removes a bounded number of commits and goes through the
//! commit queue like any other change, so publishers wait at most one
//! small step, never a whole trim.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::commit::Committer;
use super::now_ms;
use crate::config::Retention;
use crate::store::{Applied, Trim, WriteOp};

/// Commits one trim step removes at most.
const STEP_COMMITS: usize = 256;

/// The first sequence numbers running replays still read.
#[derive(Debug, Default)]
pub struct Pins {
    pinned: Mutex<BTreeMap<u64, usize>>,
}

/// The pins, held while a trim applies.
pub struct Held<'a>(MutexGuard<'a, BTreeMap<u64, usize>>);

impl Held<'_> {
    /// Nothing at or after this may be removed.
    pub fn lowest(&self) -> u64 {
        self.0.keys().next().copied().unwrap_or(u64::MAX)
    }
}

/// Keeps retention from removing events at or after its seq.
pub struct Pin {
    pins: Arc<Pins>,
    at: u64,
}

impl Pins {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, usize>> {
        self.pinned.lock().expect("pins lock is never poisoned")
    }

    /// Pins the whole log (until [`Pin::move_to`]). Waits for a trim that
    /// is being applied, so what the caller reads next is consistent.
    pub fn pin(self: &Arc<Self>) -> Pin {
        *self.lock().entry(0).or_default() += 1;
        Pin {
            pins: Arc::clone(self),
            at: 0,
        }
    }

    /// Holds every pin still while a trim applies.
    pub fn hold(&self) -> Held<'_> {
        Held(self.lock())
    }

    fn release(&self, map: &mut BTreeMap<u64, usize>, at: u64) {
        if let Some(count) = map.get_mut(&at) {
            *count -= 1;
            if *count == 0 {
                map.remove(&at);
            }
        }
    }
}

impl Pin {
    /// Pins from `seq` on instead.
    pub fn move_to(&mut self, seq: u64) {
        let mut map = self.pins.lock();
        self.pins.release(&mut map, self.at);
        *map.entry(seq).or_default() += 1;
        self.at = seq;
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut map = self.pins.lock();
        self.pins.release(&mut map, self.at);
    }
}

/// Trims the log to `retention` every `retention.check_interval` until
/// `cancel` fires.
pub async fn run(commit: Arc<Committer>, retention: Retention, cancel: CancellationToken) {
    if retention.max_age.is_none() && retention.max_bytes.is_none() {
        return;
    }
    info!(?retention, "retention is on");
    loop {
        let step = Trim {
            before_ms: retention.max_age.map(|age| {
                now_ms().saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
            }),
            max_bytes: retention.max_bytes,
            keep_from: u64::MAX,
            max_commits: STEP_COMMITS,
        };
        let more = match commit.submit(WriteOp::Trim(step)).await {
            Err(_) => return,
            Ok(done) => match done.await {
                Ok(Ok(Applied::Trimmed(trimmed))) => trimmed.more,
                Ok(Ok(_)) => false,
                Ok(Err(e)) => {
                    error!(error = %e, "retention step failed; trying again later");
                    false
                }
                Err(_) => return,
            },
        };
        let pause = if more {
            Duration::ZERO
        } else {
            retention.check_interval
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
