//! The queue between a session's two halves, and the join that runs them.
//!
//! Both halves run in the connection's one task. [`reader_then_writer`]
//! polls the reader and then the writer on every wake of that task, so
//! whatever the reader queues during its turn the writer finds in its own
//! turn of the same wake. A queued command therefore wakes nobody: a
//! channel would wake the task it is already running in, and the runtime
//! would poll the whole connection a second time for nothing (about a
//! tenth of a seek's instructions).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

/// Runs `reader` and `writer` to the end of both, polling the reader
/// first on every wake. The handoff queue relies on that order.
pub async fn reader_then_writer<R, W>(reader: R, writer: W) -> (R::Output, W::Output)
where
    R: Future,
    W: Future,
{
    let (mut reader, mut writer) = (pin!(reader), pin!(writer));
    let (mut read, mut written) = (None, None);
    poll_fn(|cx| {
        if read.is_none() {
            if let Poll::Ready(output) = reader.as_mut().poll(cx) {
                read = Some(output);
            }
        }
        if written.is_none() {
            if let Poll::Ready(output) = writer.as_mut().poll(cx) {
                written = Some(output);
            }
        }
        match (read.take(), written.take()) {
            (Some(read), Some(written)) => Poll::Ready((read, written)),
            (r, w) => {
                (read, written) = (r, w);
                Poll::Pending
            }
        }
    })
    .await
}

/// A bounded queue from a session's reader to its writer, in one task
/// run by [`reader_then_writer`].
pub fn handoff<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Mutex::new(State {
        items: VecDeque::new(),
        capacity,
        sender_gone: false,
        receiver_gone: false,
        waiting_sender: None,
    }));
    (Sender(Arc::clone(&shared)), Receiver(shared))
}

struct State<T> {
    items: VecDeque<T>,
    capacity: usize,
    sender_gone: bool,
    receiver_gone: bool,
    /// The reader, waiting for room.
    waiting_sender: Option<Waker>,
}

fn lock<T>(state: &Mutex<State<T>>) -> MutexGuard<'_, State<T>> {
    // Nothing panics while holding it; a poisoned queue is still whole.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The reader's end.
pub struct Sender<T>(Arc<Mutex<State<T>>>);

impl<T> Sender<T> {
    /// Queues `item`, waiting while the queue is full; `false` once the
    /// writer is gone.
    pub async fn send(&self, item: T) -> bool {
        let mut item = Some(item);
        poll_fn(|cx| {
            let mut state = lock(&self.0);
            if state.receiver_gone {
                return Poll::Ready(false);
            }
            if state.items.len() >= state.capacity {
                state.waiting_sender = Some(cx.waker().clone());
                return Poll::Pending;
            }
            // NOTE: no wake-up: the writer is polled after the reader in
            // this same wake (`reader_then_writer`).
            state.items.extend(item.take());
            Poll::Ready(true)
        })
        .await
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        lock(&self.0).sender_gone = true;
    }
}

/// The writer's end.
pub struct Receiver<T>(Arc<Mutex<State<T>>>);

impl<T> Receiver<T> {
    /// The next item, or `None` once the queue is empty and the reader
    /// gone.
    ///
    /// IMPORTANT: it registers no waker. It is woken by whatever wakes the
    /// task, and is polled after the reader on every wake, so it sees
    /// each item in the wake that queued it.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|_| {
            let mut state = lock(&self.0);
            match state.items.pop_front() {
                Some(item) => {
                    if let Some(sender) = state.waiting_sender.take() {
                        sender.wake();
                    }
                    Poll::Ready(Some(item))
                }
                None if state.sender_gone => Poll::Ready(None),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        lock(&self.0).items.is_empty()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.0);
        state.receiver_gone = true;
        // The items go with the writer; a reader waiting for room learns
        // that it is gone.
        state.items.clear();
        if let Some(sender) = state.waiting_sender.take() {
            sender.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const PROMPT: Duration = Duration::from_secs(2);

    /// Runs `halves` to the end, failing unless they end within
    /// [`PROMPT`]. The elapsed time is checked as well as the timeout: a
    /// timeout's own wake-up polls the halves once more, which could
    /// rescue a wake-up the queue forgot.
    async fn promptly<T>(halves: impl Future<Output = T>, what: &str) -> T {
        let started = std::time::Instant::now();
        let out = tokio::time::timeout(PROMPT * 3, halves)
            .await
            .unwrap_or_else(|_| panic!("{what}"));
        assert!(started.elapsed() < PROMPT, "{what}");
        out
    }

    #[tokio::test]
    async fn a_reader_held_by_a_full_queue_goes_on_when_the_writer_makes_room() {
        let (tx, mut rx) = handoff(2);
        let reader = async move {
            for i in 0..100 {
                assert!(tx.send(i).await, "the writer is still there");
            }
        };
        // A writer that waits for nothing else: only the queue can wake
        // the reader it holds up.
        let writer = async move {
            let mut got = Vec::new();
            while let Some(i) = rx.recv().await {
                got.push(i);
            }
            got
        };
        let ((), got) = promptly(
            reader_then_writer(reader, writer),
            "the reader was never woken after the queue filled",
        )
        .await;
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn the_writer_gets_what_was_queued_before_the_reader_ended() {
        let (tx, mut rx) = handoff(8);
        let reader = async move {
            assert!(tx.send("a").await);
            assert!(tx.send("b").await);
        };
        let writer = async move {
            let mut got = Vec::new();
            while let Some(item) = rx.recv().await {
                got.push(item);
            }
            got
        };
        let ((), got) = reader_then_writer(reader, writer).await;
        assert_eq!(got, ["a", "b"]);
    }

    #[tokio::test]
    async fn a_reader_learns_the_writer_is_gone_even_when_waiting_for_room() {
        let (tx, rx) = handoff(1);
        let reader = async move { (tx.send(1).await, tx.send(2).await) };
        let writer = async move {
            // Gone without reading, as when the connection breaks.
            tokio::task::yield_now().await;
            drop(rx);
        };
        let ((first, second), ()) = promptly(
            reader_then_writer(reader, writer),
            "a reader waiting for room was not told the writer went",
        )
        .await;
        assert!(first, "queued while the writer was there");
        assert!(!second, "refused once the writer was gone");
    }
}
