//! The accept loop: connection limit, one task per connection, and a
//! clean shutdown that answers what was asked and flushes the store.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

use crate::config::Config;
use crate::connection;
use crate::engine::{Engine, EngineError};
use crate::http::{self, HttpState};

/// How long shutdown waits for connections to finish what they were
/// answering before it stops the store anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// First pause after a failed accept (doubled up to `MAX_ACCEPT_BACKOFF`),
/// so running out of file descriptors does not spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The engine would not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Opening the store panicked or was cancelled.
    #[error("the store could not be opened: {0}")]
    Startup(String),
}

/// Where the server listens.
#[derive(Debug)]
pub struct Listeners {
    /// The protocol over TCP.
    pub tcp: TcpListener,
    /// HTTP: the protocol over WebSocket, the admin API, health and
    /// metrics. `None` serves TCP only.
    pub http: Option<TcpListener>,
}

/// Serves `listeners` until `shutdown` completes, then stops accepting,
/// lets connections finish the command at hand, commits and flushes, and
/// releases the data directory before returning.
///
/// # Errors
/// When the store cannot be opened.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let Listeners {
        tcp: listener,
        http: http_listener,
    } = listeners;
    let tracker = TaskTracker::new();
    let engine = {
        let (config, tracker) = (config.clone(), tracker.clone());
        tokio::task::spawn_blocking(move || Engine::open(config, tracker))
            .await
            .map_err(|e| ServerError::Startup(e.to_string()))??
    };
    let engine = Arc::new(engine);
    info!(data_dir = %config.data_dir.display(), head = engine.head(), "event log open");

    let cancel: CancellationToken = engine.stopping().clone();
    // Before retention starts: a resumed operation pins what it still
    // has to replay.
    engine.resume_operations();
    tracker.spawn(engine.retention(cancel.child_token()));
    let permits = Arc::new(Semaphore::new(config.max_connections));
    if let Some(http_listener) = http_listener {
        let state = HttpState {
            engine: Arc::clone(&engine),
            permits: Arc::clone(&permits),
            tracker: tracker.clone(),
            cancel: cancel.child_token(),
        };
        tracker.spawn(async move {
            if let Err(e) = http::serve(http_listener, state).await {
                error!(error = %e, "the HTTP listener failed");
            }
        });
    }
    let mut backoff = ACCEPT_BACKOFF;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            },
        };
        backoff = ACCEPT_BACKOFF;
        // The permit is taken once a connection is here, so waiting for
        // one does not hold a slot WebSockets could use. Until a slot
        // frees, this connection waits and no other is accepted.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let span = info_span!("conn", %peer, client_id = tracing::field::Empty);
        let (engine, cancel) = (Arc::clone(&engine), cancel.child_token());
        tracker.spawn(
            async move {
                connection::serve(engine, stream, peer, cancel).await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    info!("shutting down");
    drop(listener);
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        error!("connections did not finish within {SHUTDOWN_GRACE:?}; stopping the store anyway");
    }
    engine.shutdown().await;
    info!("stopped");
    Ok(())
}
