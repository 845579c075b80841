//! Limits on what one connection or one client may take: its share of
//! the connections, its command rate, and the pace of its replays.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ensync_protocol::field::ClientId;
use tokio::time::{Instant, Sleep};

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    filled_at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64) -> Self {
        Self {
            rate: rate as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            filled_at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.duration_since(self.filled_at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.filled_at = now;
    }

    /// Takes one token, if there is one at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt if there are fewer; returns how
    /// long to wait until the debt is paid.
    fn reserve(&mut self, n: u64) -> Duration {
        self.refill(Instant::now());
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Paces one client's replays, all its connections together.
#[derive(Debug)]
pub struct Pacer {
    /// Events per second; `None` streams as fast as the client reads.
    bucket: Option<Mutex<Bucket>>,
    /// Most events sent between waits.
    step: usize,
}

impl Pacer {
    /// A pacer of `events_per_second` (0: unpaced), with bursts of a tenth
    /// of a second's worth.
    pub fn new(events_per_second: u64) -> Self {
        Self {
            bucket: (events_per_second > 0)
                .then(|| Mutex::new(Bucket::new(events_per_second, events_per_second / 10))),
            step: match events_per_second {
                0 => usize::MAX,
                rate => usize::try_from(rate / 10).unwrap_or(usize::MAX).max(1),
            },
        }
    }

    /// Whether this pacer ever waits.
    pub fn is_paced(&self) -> bool {
        self.bucket.is_some()
    }

    /// Most events to send before waiting again: a tenth of a second's
    /// worth, so paced replays flow evenly.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Waits until `events` more may be sent.
    pub async fn take(&self, events: u64) {
        let Some(bucket) = &self.bucket else { return };
        let wait = bucket
            .lock()
            .expect("pacer lock is never poisoned")
            .reserve(events);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The connections of each client, and the pacer they share.
#[derive(Debug)]
pub struct ClientSlots {
    per_client: usize,
    replay_rate: u64,
    open: Mutex<HashMap<ClientId, (usize, Arc<Pacer>)>>,
}

/// One connection's claim on its client's slots; dropping it frees it.
#[derive(Debug)]
pub struct ClientSlot {
    slots: Arc<ClientSlots>,
    client: ClientId,
    pacer: Arc<Pacer>,
}

impl ClientSlot {
    /// The pacer of the client's replays.
    pub fn pacer(&self) -> &Arc<Pacer> {
        &self.pacer
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .expect("slots lock is never poisoned");
        if let Some((count, _)) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

impl ClientSlots {
    /// Slots for `per_client` connections a client, whose replays are
    /// paced at `replay_rate` events a second (0: unpaced).
    pub fn new(per_client: usize, replay_rate: u64) -> Arc<Self> {
        Arc::new(Self {
            per_client,
            replay_rate,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Claims a slot of `client`'s, if it has one free.
    ///
    /// # Errors
    /// How many connections the client has open: all its slots.
    pub fn claim(self: &Arc<Self>, client: &ClientId) -> Result<ClientSlot, usize> {
        let mut open = self.open.lock().expect("slots lock is never poisoned");
        let (count, pacer) = open
            .entry(client.clone())
            .or_insert_with(|| (0, Arc::new(Pacer::new(self.replay_rate))));
        if *count >= self.per_client {
            return Err(*count);
        }
        *count += 1;
        Ok(ClientSlot {
            slots: Arc::clone(self),
            client: client.clone(),
            pacer: Arc::clone(pacer),
        })
    }
}

/// A client that read nothing of its output for the send timeout.
#[derive(Debug, thiserror::Error)]
#[error("the client read nothing for {} with output waiting for it (limits.send_timeout)", humantime::format_duration(*.0))]
pub struct Stalled(Duration);

impl Stalled {
    /// Whether `e` is a transport giving up on a stalled client.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<Stalled>())
    }
}

/// Times how long a connection's output has waited on its client; a
/// transport's sink holds one and consults it whenever a write waits.
#[derive(Debug)]
pub struct StallTimer {
    timeout: Duration,
    /// Armed while a write waits on the client.
    armed: Option<Pin<Box<Sleep>>>,
}

impl StallTimer {
    /// A timer that gives up after `timeout` without progress.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            armed: None,
        }
    }

    /// The client took some output: the wait starts over.
    pub fn progressed(&mut self) {
        self.armed = None;
    }

    /// The client took nothing: pending until it has waited the timeout,
    /// then the error that ends the connection.
    pub fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let timeout = self.timeout;
        let armed = self
            .armed
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(armed.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            Stalled(timeout),
        )))
    }
}

#[cfg(test)]
mod buckets {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_its_rate() {
        let mut bucket = Bucket::new(10, 10);
        assert_eq!(
            (0..20).filter(|_| bucket.try_take(Instant::now())).count(),
            10
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(
            (0..20).filter(|_| bucket.try_take(Instant::now())).count(),
            5
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pacer_spreads_events_at_its_rate() {
        let pacer = Pacer::new(1000);
        let started = Instant::now();
        for _ in 0..30 {
            pacer.take(100).await;
        }
        // 3,000 events at 1,000 a second, less the first burst of 100.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(2899), "{took:?}");
        assert!(took <= Duration::from_millis(2901), "{took:?}");
    }

    #[test]
    fn slots_are_per_client_and_come_back() {
        let slots = ClientSlots::new(2, 0);
        let a: ClientId = "a".parse().expect("id");
        let b: ClientId = "b".parse().expect("id");
        let first = slots.claim(&a).expect("free");
        let _second = slots.claim(&a).expect("free");
        assert_eq!(slots.claim(&a).expect_err("full"), 2);
        assert!(slots.claim(&b).is_ok());
        drop(first);
        assert!(slots.claim(&a).is_ok());
    }
}
