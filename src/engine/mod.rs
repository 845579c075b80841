//! The engine: carries out commands against the store for a connected
//! client. It knows commands, events and clients; it never touches a
//! socket, so TCP and WebSocket sessions share it unchanged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use ensync_protocol::command::{ConnAuth, Replay, ReplayEvent};
use ensync_protocol::field::{ClientId, EventId, Pattern};
use ensync_protocol::{Command, ErrorCode, Pass, Reply};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::access::{Access, Grants};
use crate::config::{Config, Invalid};
use crate::limits::{ClientSlot, ClientSlots};
use crate::metrics::{Metrics, Scrape};
use crate::store::{
    Applied, EventLog, NewEvent, PauseRefused, Reads, Settlement, SledLog, StoreError, WriteOp,
};

mod commit;
pub mod delivery;
pub mod operations;
pub mod replay;
mod retention;
mod subs;

pub use commit::Committed;
pub use delivery::{Attachment, Delivered};
pub use operations::{OpError, OpState, OperationStatus, ReplayRequest};
pub use replay::{Chunk, RecordSource, Records, ReplayStream};
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
    /// The clients in the config cannot be used.
    #[error("config: {0}")]
    Config(Invalid),
    /// The commit thread would not start.
    #[error("cannot start the commit thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// A reply that is ready once something finishes (a commit).
pub type Later = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// What a command turns into. Commands that read the log run when the
/// connection reaches them in order, after the replies before them, so a
/// client always reads its own writes.
pub enum Outcome {
    /// Answered already.
    Reply(Reply),
    /// Answered once the change is durable.
    Later(Later),
    /// A range replay to run in turn.
    Replay(Replay),
    /// A single-event replay to run in turn.
    ReplayEvent(ReplayEvent),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Reply(reply) => f.debug_tuple("Reply").field(reply).finish(),
            Outcome::Later(_) => f.write_str("Later"),
            Outcome::Replay(r) => f.debug_tuple("Replay").field(r).finish(),
            Outcome::ReplayEvent(r) => f.debug_tuple("ReplayEvent").field(r).finish(),
        }
    }
}

/// The shared state behind every connection.
pub struct Engine {
    store: Arc<dyn EventLog>,
    commit: Arc<commit::Committer>,
    subs: Arc<Registry>,
    hub: Arc<delivery::Hub>,
    pins: Arc<retention::Pins>,
    /// Who may connect, and what each client may do.
    access: Access,
    /// Each client's connections and replay pacer.
    slots: Arc<ClientSlots>,
    config: Config,
    tracker: TaskTracker,
    ops: operations::Operations,
    metrics: Metrics,
    /// Fires when the server stops: background work winds down.
    stopping: CancellationToken,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn internal(e: &StoreError) -> Reply {
    error!(error = %e, "store failure");
    Reply::fail(
        ErrorCode::Internal,
        "the event log could not be read; see the server log",
    )
}

fn not_queued(client: &ClientId, id: &EventId) -> Reply {
    Reply::fail(
        ErrorCode::NotFound,
        format!("{id} is not in the processing queue of {client} (never delivered to it, or already settled)"),
    )
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
        let store: Arc<dyn EventLog> = Arc::new(
            SledLog::open_with_cache(&config.data_dir, config.store.index_cache)
                .map_err(open_err)?
                .with_mapped_reads(config.store.mapped_reads),
        );
        let subs = Arc::new(Registry::new(store.subscriptions().map_err(open_err)?));
        let ops = operations::Operations::load(store.as_ref()).map_err(open_err)?;
        let pins = Arc::new(retention::Pins::default());
        let attached = Arc::new(delivery::Attached::default());
        let commit = Arc::new(commit::Committer::start(
            Arc::clone(&store),
            Arc::clone(&subs),
            Arc::clone(&attached),
            Arc::clone(&pins),
        )?);
        let hub = Arc::new(delivery::Hub::new(
            Arc::clone(&store),
            Arc::clone(&subs),
            Arc::clone(&commit),
            attached,
            delivery::Settings {
                ack_wait: config.delivery.ack_wait,
                max_unsettled: config.delivery.max_unsettled,
            },
        ));
        let access = Access::from_config(&config).map_err(EngineError::Config)?;
        Ok(Self {
            store,
            commit,
            subs,
            hub,
            pins,
            access,
            slots: ClientSlots::new(
                config.limits.max_connections_per_client,
                config.limits.replay_events_per_second,
            ),
            config,
            tracker,
            ops,
            metrics: Metrics::new(),
            stopping: CancellationToken::new(),
        })
    }

    /// Fires when the server stops; background work (retention, operator
    /// replays, sessions) winds down on it.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    /// What the server counts.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The Prometheus exposition of the metrics.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&Scrape {
            store_bytes: self.store.stored_bytes(),
            mapped_read_bytes: self.store.mapped_bytes(),
            log_head: self.head(),
            operations: self.ops.counts(),
        })
    }

    /// Bytes of event data the log holds.
    pub fn stored_bytes(&self) -> u64 {
        self.store.stored_bytes()
    }

    /// Runs retention until `cancel` fires (nothing to do when no limit is
    /// configured).
    pub fn retention(&self, cancel: CancellationToken) -> impl Future<Output = ()> + Send {
        retention::run(Arc::clone(&self.commit), self.config.retention, cancel)
    }

    /// Attaches a connection of `client` to its deliveries.
    pub fn attach(&self, client: &ClientId) -> Attachment {
        self.hub.attach(client, self.identities(client))
    }

    /// The settings the engine runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Authenticates a CONN: the client, what it may do, and the success
    /// reply.
    ///
    /// # Errors
    /// The `-FAIL` reply for an unknown key, or a bare CLIENT_ID where
    /// keys are required.
    pub fn connect(&self, auth: &ConnAuth) -> Result<(ClientId, Arc<Grants>, Reply), Reply> {
        let (id, grants) = self.access.connect(auth)?;
        let reply = match auth {
            ConnAuth::ClientId(_) => Reply::Pass(Pass::Connected {
                client_id: id.to_string(),
            }),
            ConnAuth::AccessKey(_) => Reply::Pass(Pass::Authenticated {
                client_id: id.to_string(),
                client_hash: self.client_hash(&id),
            }),
        };
        Ok((id, grants, reply))
    }

    /// Claims one of `client`'s connection slots for as long as the
    /// returned guard lives.
    ///
    /// # Errors
    /// `TOO_MANY_CONNECTIONS` when the client has all its slots open.
    pub fn claim_slot(&self, client: &ClientId) -> Result<ClientSlot, Reply> {
        self.slots.claim(client).map_err(|open| {
            Reply::fail(
                ErrorCode::TooManyConnections,
                format!("{client} already has {open} connections open (limits.max_connections_per_client): close one or share it"),
            )
        })
    }

    /// Removes the stored subscriptions the config no longer grants (a
    /// client gone from `[[clients]]`, or a pattern outside its subscribe
    /// patterns), so a narrowed grant holds for live delivery too.
    pub async fn drop_ungranted_subscriptions(&self) {
        let stale: Vec<(ClientId, Pattern)> = self
            .subs
            .all()
            .iter()
            .flat_map(|subs| subs.iter())
            .filter(|sub| !self.access.may_keep(sub.client.as_str(), &sub.pattern))
            .map(|sub| (sub.client.clone(), sub.pattern.clone()))
            .collect();
        for (client, pattern) in stale {
            let unsub = Command::Unsub(ensync_protocol::command::Unsub {
                client_id: client.clone(),
                event_name: pattern.clone(),
            });
            let reply = match self.execute(&client, unsub).await {
                Outcome::Later(reply) => reply.await,
                Outcome::Reply(reply) => reply,
                other => unexpected_outcome(&other),
            };
            if reply.is_fail() {
                error!(%client, %pattern, ?reply, "a subscription the config no longer grants could not be removed");
            } else {
                warn!(%client, %pattern, "removed a subscription the config no longer grants");
            }
        }
    }

    /// Whether `client` has any subscription.
    pub fn has_subscriptions(&self, client: &ClientId) -> bool {
        !self.subs.of(client).is_empty()
    }

    /// What CONN reports as `clientHash`: the client's public key when one
    /// is configured (the SDK's `get_client_public_key`), else a stable
    /// hash of its id.
    fn client_hash(&self, client: &ClientId) -> String {
        match self.access.public_keys(client.as_str()).first() {
            Some(key) => key.clone(),
            None => client_hash(client),
        }
    }

    /// Every name an event may be addressed to this client by.
    fn identities(&self, client: &ClientId) -> Vec<String> {
        let mut ids = vec![client.as_str().to_owned()];
        ids.extend(self.access.public_keys(client.as_str()).iter().cloned());
        ids
    }

    /// Carries out `cmd` for the connection's `client` (already checked to
    /// be the command's CLIENT_ID).
    pub async fn execute(&self, client: &ClientId, cmd: Command) -> Outcome {
        match cmd {
            Command::Pub(p) => {
                let op = WriteOp::Publish(NewEvent {
                    name: p.event_name,
                    sender: p.client_id,
                    payload: p.payload,
                    metadata: p.metadata,
                    recipients: p.delivery_to.into_recipients(),
                });
                self.commit_then(op, |applied| match applied {
                    Applied::Published(event) => Reply::Pass(Pass::Published {
                        idem: event.idem,
                        timestamp: event.logged_at,
                    }),
                    other => unexpected(&other),
                })
                .await
            }
            Command::Sub(s) => {
                // Checked as the SUB arrives, against the subscriptions
                // committed: SUBs of the client still waiting for their
                // commit can pass it by as many.
                let max = self.config.limits.max_subscriptions_per_client;
                let (held, again) = self.subs.held(client, &s.event_name);
                if held >= max && !again {
                    return Outcome::Reply(Reply::fail(
                        ErrorCode::TooManySubscriptions,
                        format!("{client} holds {held} subscriptions (limits.max_subscriptions_per_client is {max}): UNSUB one first, or subscribe to a pattern that covers several"),
                    ));
                }
                let op = WriteOp::Subscribe {
                    client: client.clone(),
                    pattern: s.event_name,
                };
                self.commit_then(op, |applied| match applied {
                    Applied::Subscribed(sub) => Reply::Pass(Pass::Subscribed {
                        event_name: sub.pattern.to_string(),
                    }),
                    other => unexpected(&other),
                })
                .await
            }
            Command::Unsub(u) => {
                let (who, pattern) = (client.clone(), u.event_name.clone());
                let op = WriteOp::Unsubscribe {
                    client: client.clone(),
                    pattern: u.event_name,
                };
                let done = match self.commit.submit(op).await {
                    Ok(done) => done,
                    Err(stopped) => {
                        return Outcome::Reply(Reply::fail(
                            ErrorCode::Internal,
                            stopped.to_string(),
                        ))
                    }
                };
                let (store, commit, subs) = (
                    Arc::clone(&self.store),
                    Arc::clone(&self.commit),
                    Arc::clone(&self.subs),
                );
                Outcome::Later(Box::pin(async move {
                    let result = done.await;
                    if let Ok(Ok(Applied::Unsubscribed(Some(_)))) = &result {
                        // Replays queued for what the subscription covered
                        // are not delivered under a later one.
                        if let Err(e) = unqueue_uncovered(store, &commit, &subs, &who).await {
                            warn!(client = %who, error = %e, "queued replays were not dropped");
                        }
                    }
                    committed(result, move |applied| match applied {
                        Applied::Unsubscribed(Some(sub)) => Reply::Pass(Pass::Unsubscribed {
                            event_name: sub.pattern.to_string(),
                            client_id: who.to_string(),
                        }),
                        Applied::Unsubscribed(None) => Reply::fail(
                            ErrorCode::NotFound,
                            format!("{who} has no subscription to {pattern}"),
                        ),
                        other => unexpected(&other),
                    })
                }))
            }
            Command::Pause(p) => self.set_paused(client, p.event_name, true).await,
            Command::Continue(c) => self.set_paused(client, c.event_name, false).await,
            Command::Ack(a) => {
                self.settle(client, &a.event_idem, a.block, Settlement::Acked)
                    .await
            }
            Command::Discard(d) => {
                let reason = d.reason.as_str().to_owned();
                self.settle(client, &d.event_idem, None, Settlement::Discarded(reason))
                    .await
            }
            Command::Defer(d) => {
                let due = now_ms().saturating_add(d.delay.get());
                self.hold(client, &d.event_idem, None, Some(due)).await
            }
            Command::Rollback(r) => self.hold(client, &r.event_idem, r.block, None).await,
            Command::Replay(r) => Outcome::Replay(r),
            Command::ReplayEvent(r) => Outcome::ReplayEvent(r),
            Command::Ping => Outcome::Reply(Reply::Pass(Pass::Pong)),
            other => Outcome::Reply(Reply::fail(
                ErrorCode::InvalidParameters,
                format!(
                    "{} is not a command a connected client sends here",
                    other.verb()
                ),
            )),
        }
    }

    /// Queues `op` for the commit thread; the reply, made by `reply`,
    /// comes once it is durable.
    async fn commit_then(
        &self,
        op: WriteOp,
        reply: impl FnOnce(Applied) -> Reply + Send + 'static,
    ) -> Outcome {
        match self.commit.submit(op).await {
            Ok(done) => Outcome::Later(Box::pin(async move { committed(done.await, reply) })),
            Err(stopped) => Outcome::Reply(Reply::fail(ErrorCode::Internal, stopped.to_string())),
        }
    }

    async fn set_paused(&self, client: &ClientId, pattern: Pattern, paused: bool) -> Outcome {
        let (who, name) = (client.clone(), pattern.clone());
        let op = WriteOp::SetPaused {
            client: client.clone(),
            pattern,
            paused,
        };
        self.commit_then(op, move |applied| match applied {
            Applied::PausedSet(Ok(sub)) if paused => Reply::Pass(Pass::Paused {
                event_name: sub.pattern.to_string(),
            }),
            Applied::PausedSet(Ok(sub)) => Reply::Pass(Pass::Continued {
                event_name: sub.pattern.to_string(),
            }),
            Applied::PausedSet(Err(PauseRefused::NotSubscribed)) => Reply::fail(
                ErrorCode::NotSubscribed,
                format!(
                    "{who} has no subscription to {name} (give the pattern exactly as subscribed)"
                ),
            ),
            Applied::PausedSet(Err(PauseRefused::NotPaused)) => Reply::fail(
                ErrorCode::NotPaused,
                format!("the subscription of {who} to {name} is not paused"),
            ),
            other => unexpected(&other),
        })
        .await
    }

    /// The seq an EVENT_IDEM (and BLOCK, when given) names, or the reply
    /// refusing it.
    fn queued_seq(
        &self,
        client: &ClientId,
        id: &EventId,
        block: Option<u64>,
    ) -> Result<u64, Reply> {
        let seq = self
            .store
            .seq_of(id)
            .ok_or_else(|| not_queued(client, id))?;
        match block {
            Some(block) if block != seq => Err(Reply::fail(
                ErrorCode::InvalidParameters,
                format!("BLOCK={block} is not the block of {id} (it is {seq})"),
            )),
            _ => Ok(seq),
        }
    }

    /// ACK and DISCARD: settles an event of the processing queue for good.
    async fn settle(
        &self,
        client: &ClientId,
        id: &EventId,
        block: Option<u64>,
        settlement: Settlement,
    ) -> Outcome {
        let seq = match self.queued_seq(client, id, block) {
            Ok(seq) => seq,
            Err(reply) => return Outcome::Reply(reply),
        };
        let floors = match self.hub.take(client, seq) {
            Ok(Some(floors)) => floors,
            Ok(None) => return Outcome::Reply(not_queued(client, id)),
            Err(e) => return Outcome::Reply(internal(&e)),
        };
        let idem = id.to_string();
        let acked = settlement == Settlement::Acked;
        let op = WriteOp::Settle {
            client: client.clone(),
            seq,
            settlement,
            floors,
        };
        self.commit_then(op, move |applied| match applied {
            Applied::Stored if acked => Reply::Pass(Pass::Acknowledged { idem }),
            Applied::Stored => Reply::Pass(Pass::Discarded { idem }),
            other => unexpected(&other),
        })
        .await
    }

    /// DEFER (`due`) and ROLLBACK (`None`): the event stays in the queue,
    /// held back or put up for delivery again.
    async fn hold(
        &self,
        client: &ClientId,
        id: &EventId,
        block: Option<u64>,
        due: Option<u64>,
    ) -> Outcome {
        let seq = match self.queued_seq(client, id, block) {
            Ok(seq) => seq,
            Err(reply) => return Outcome::Reply(reply),
        };
        let was_deferred = match self.hub.hold(client, seq, due) {
            Ok(Some(was)) => was,
            Ok(None) => return Outcome::Reply(not_queued(client, id)),
            Err(e) => return Outcome::Reply(internal(&e)),
        };
        let idem = id.to_string();
        let reply = move || match due {
            Some(delivery_at) => Reply::Pass(Pass::Deferred { idem, delivery_at }),
            None => Reply::Pass(Pass::RolledBack { idem }),
        };
        if due.is_none() && !was_deferred {
            // Nothing stored changes: the event was never settled.
            return Outcome::Reply(reply());
        }
        let op = WriteOp::Defer {
            client: client.clone(),
            seq,
            due_ms: due,
        };
        self.commit_then(op, move |applied| match applied {
            Applied::Stored => reply(),
            other => unexpected(&other),
        })
        .await
    }

    /// Starts a range replay.
    pub async fn replay(&self, client: &ClientId, req: Replay) -> ReplayStream {
        replay::range(self, client, req).await
    }

    /// Replays one event, if `grants` allow its name.
    pub async fn replay_event(
        &self,
        client: &ClientId,
        grants: &Grants,
        req: ReplayEvent,
    ) -> Reply {
        replay::event(self, client, grants, req).await
    }

    /// The last durable sequence number.
    pub fn head(&self) -> u64 {
        self.commit.head()
    }

    /// Commits what is queued and stops the commit thread (final flush).
    pub async fn shutdown(&self) {
        self.commit.stop().await;
    }
}

fn unexpected_outcome(outcome: &Outcome) -> Reply {
    error!(?outcome, "UNSUB answered with a replay");
    Reply::fail(ErrorCode::Internal, "unexpected outcome of UNSUB")
}

/// Drops the operator replays queued for `client` whose events none of
/// its subscriptions covers any more.
async fn unqueue_uncovered(
    store: Arc<dyn EventLog>,
    commit: &commit::Committer,
    subs: &Registry,
    client: &ClientId,
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    const STEP: usize = 1024;
    let mut after = 0;
    loop {
        let patterns = subs.of(client);
        let (store, who) = (Arc::clone(&store), client.clone());
        let (uncovered, next) = tokio::task::spawn_blocking(move || {
            let entries = store.replay_queue(&who, after, STEP)?;
            let next = (entries.len() == STEP)
                .then(|| entries.last().map(|e| e.0))
                .flatten();
            let mut uncovered = Vec::new();
            for (seq, _) in entries {
                let covered = match store.event_at(seq, Reads::Waiting)? {
                    Some(event) => patterns.iter().any(|s| s.pattern.matches(&event.name)),
                    None => false,
                };
                if !covered {
                    uncovered.push(seq);
                }
            }
            Ok::<_, StoreError>((uncovered, next))
        })
        .await??;
        if !uncovered.is_empty() {
            let op = WriteOp::Unqueue {
                client: client.clone(),
                seqs: uncovered,
            };
            commit.submit(op).await?.await??;
        }
        match next {
            Some(seq) => after = seq,
            None => return Ok(()),
        }
    }
}

/// The reply for a committed change, made by `reply` on success.
fn committed(
    result: Result<Committed, oneshot::error::RecvError>,
    reply: impl FnOnce(Applied) -> Reply,
) -> Reply {
    match result {
        Ok(Ok(applied)) => reply(applied),
        Ok(Err(_)) => Reply::fail(
            ErrorCode::Internal,
            "the change could not be stored and did not take effect; see the server log",
        ),
        Err(_) => Reply::fail(ErrorCode::Internal, "the server is shutting down"),
    }
}

fn unexpected(applied: &Applied) -> Reply {
    error!(
        ?applied,
        "the store answered a change with the wrong kind of result"
    );
    Reply::fail(
        ErrorCode::Internal,
        "the server mixed up a change; see the server log",
    )
}
