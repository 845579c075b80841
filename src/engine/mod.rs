//! The engine: carries out commands against the store for a connected
//! client. It knows commands, events and clients; it never touches a
//! socket, so TCP and WebSocket sessions share it unchanged.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ensync_protocol::command::{ConnAuth, Replay, ReplayEvent};
use ensync_protocol::field::ClientId;
use ensync_protocol::{Command, ErrorCode, Marks, Pass, Reply, StoredRecord};
use tokio::sync::{broadcast, oneshot};
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::store::{self, Applied, EventLog, NewEvent, SledLog, StoreError, WriteOp};

mod commit;
pub mod replay;
mod subs;

pub use commit::{Committed, LiveBatch};
pub use replay::{Chunk, ReplayStream};
use subs::Registry;

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The store would not open.
    #[error("cannot open the event log in {dir}: {source}")]
    Open {
        /// The data directory.
        dir: String,
        /// Why.
        source: StoreError,
    },
    /// The commit thread would not start.
    #[error("cannot start the commit thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// What a command turns into. Commands that read the log run when the
/// connection reaches them in order, after the replies before them, so a
/// client always reads its own writes.
#[derive(Debug)]
pub enum Outcome {
    /// Answered already.
    Reply(Reply),
    /// Answered once the commit thread has made the change durable.
    Commit(oneshot::Receiver<Committed>),
    /// A range replay to run in turn.
    Replay(Replay),
    /// A single-event replay to run in turn.
    ReplayEvent(ReplayEvent),
}

/// The shared state behind every connection.
pub struct Engine {
    store: Arc<dyn EventLog>,
    commit: commit::Committer,
    subs: Arc<Registry>,
    config: Config,
    tracker: TaskTracker,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A stable, opaque 64-bit hash of a client id (FNV-1a), as CONN's
/// ACCESS_KEY form reports it.
fn client_hash(client: &ClientId) -> String {
    let hash = client
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{hash:016x}")
}

impl Engine {
    /// Opens the store in `config.data_dir` and starts the commit thread.
    /// Blocking work (replays) is spawned on `tracker`, so waiting for it
    /// waits for them too.
    ///
    /// # Errors
    /// When the store cannot be opened or the thread cannot start.
    pub fn open(config: Config, tracker: TaskTracker) -> Result<Self, EngineError> {
        let open_err = |source| EngineError::Open {
            dir: config.data_dir.display().to_string(),
            source,
        };
        let store: Arc<dyn EventLog> = Arc::new(SledLog::open(&config.data_dir).map_err(open_err)?);
        let subs = Arc::new(Registry::new(store.subscriptions().map_err(open_err)?));
        let commit = commit::Committer::start(Arc::clone(&store), Arc::clone(&subs))?;
        Ok(Self {
            store,
            commit,
            subs,
            config,
            tracker,
        })
    }

    /// The settings the engine runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Authenticates a CONN: the client it names and the success reply.
    ///
    /// # Errors
    /// The `-FAIL` reply for an unknown client.
    pub fn connect(&self, auth: &ConnAuth) -> Result<(ClientId, Reply), Reply> {
        // Open mode: every client id is accepted, an access key is the id.
        Ok(match auth {
            ConnAuth::ClientId(id) => (
                id.clone(),
                Reply::Pass(Pass::Connected {
                    client_id: id.to_string(),
                }),
            ),
            ConnAuth::AccessKey(key) => (
                key.clone(),
                Reply::Pass(Pass::Authenticated {
                    client_id: key.to_string(),
                    client_hash: client_hash(key),
                }),
            ),
        })
    }

    /// Every name an event may be addressed to this client by.
    fn identities(&self, client: &ClientId) -> Vec<String> {
        vec![client.to_string()]
    }

    /// Carries out `cmd` for the connection's `client` (already checked to
    /// be the command's CLIENT_ID).
    pub async fn execute(&self, client: &ClientId, cmd: Command) -> Outcome {
        match cmd {
            Command::Pub(p) => {
                let recipients = p.delivery_to.recipients().to_vec();
                self.commit_op(WriteOp::Publish(NewEvent {
                    name: p.event_name,
                    sender: p.client_id,
                    payload: p.payload,
                    metadata: p.metadata,
                    recipients,
                }))
                .await
            }
            Command::Sub(s) => {
                self.commit_op(WriteOp::Subscribe {
                    client: client.clone(),
                    pattern: s.event_name,
                })
                .await
            }
            Command::Replay(r) => Outcome::Replay(r),
            Command::ReplayEvent(r) => Outcome::ReplayEvent(r),
            Command::Ping => Outcome::Reply(Reply::Pass(Pass::Pong)),
            other => Outcome::Reply(Reply::fail(
                ErrorCode::NotImplemented,
                format!("{} is not implemented yet", other.verb()),
            )),
        }
    }

    async fn commit_op(&self, op: WriteOp) -> Outcome {
        match self.commit.submit(op).await {
            Ok(rx) => Outcome::Commit(rx),
            Err(stopped) => Outcome::Reply(Reply::fail(ErrorCode::Internal, stopped.to_string())),
        }
    }

    /// The reply for a committed operation.
    pub fn committed_reply(result: Result<Committed, oneshot::error::RecvError>) -> Reply {
        match result {
            Ok(Ok(Applied::Published(event))) => Reply::Pass(Pass::Published {
                idem: event.idem,
                timestamp: event.logged_at,
            }),
            Ok(Ok(Applied::Subscribed(sub))) => Reply::Pass(Pass::Subscribed {
                event_name: sub.pattern.to_string(),
            }),
            Ok(Err(_)) => Reply::fail(
                ErrorCode::Internal,
                "the change could not be stored and did not take effect; see the server log",
            ),
            Err(_) => Reply::fail(ErrorCode::Internal, "the server is shutting down"),
        }
    }

    /// Starts a range replay.
    pub async fn replay(&self, client: &ClientId, req: Replay) -> ReplayStream {
        replay::range(self, client, req).await
    }

    /// Replays one event.
    pub async fn replay_event(&self, client: &ClientId, req: ReplayEvent) -> Reply {
        replay::event(self, client, req).await
    }

    /// Committed batches from now on, and the head they follow.
    pub fn follow(&self) -> (broadcast::Receiver<LiveBatch>, u64) {
        let rx = self.commit.follow();
        (rx, self.commit.head())
    }

    /// The last durable sequence number.
    pub fn head(&self) -> u64 {
        self.commit.head()
    }

    /// The live record lines in `batch` for `client`, skipping events up
    /// to `after`.
    pub fn live_lines(&self, client: &ClientId, batch: &LiveBatch, after: u64) -> Option<Bytes> {
        let subs = self.subs.of(client);
        if subs.is_empty() {
            return None;
        }
        let identities = self.identities(client);
        let ids: Vec<&str> = identities.iter().map(String::as_str).collect();
        let mut buf = BytesMut::new();
        for event in batch.iter().filter(|e| e.seq > after) {
            if replay::delivers(&subs, event.name.as_str(), event.seq)
                && store::addressed_to(&event.recipients, &ids)
            {
                if let Ok(record) = StoredRecord::new(&event.record) {
                    record.write_line(&mut buf, &Marks::LIVE);
                }
            }
        }
        (!buf.is_empty()).then(|| buf.freeze())
    }

    /// Streams what `client` missed of the live feed after `after`, if it
    /// subscribes to anything.
    pub fn catch_up(
        &self,
        client: &ClientId,
        after: u64,
        until: u64,
    ) -> Option<tokio::sync::mpsc::Receiver<Chunk>> {
        replay::catch_up(self, client, after, until)
    }

    /// Commits what is queued and stops the commit thread (final flush).
    pub async fn shutdown(&self) {
        self.commit.stop().await;
    }
}
