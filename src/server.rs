//! The accept loop: connection limit, one task per connection, and a
//! clean shutdown that answers what was asked and flushes the store.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

use crate::config::{ClientEntry, Config};
use crate::connection;
use crate::engine::{Engine, EngineError};
use crate::http::{self, HttpState};
use crate::metrics::Closed;
use crate::tls::{self, TlsError};

/// How long shutdown waits for connections to finish what they were
/// answering before it stops the store anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// First pause after a failed accept (doubled up to `MAX_ACCEPT_BACKOFF`),
/// so running out of file descriptors does not spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// How long a refused connection gets to take its `-FAIL` line (over TLS,
/// the handshake included).
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// Refused connections told why at once; more are closed without a word.
const MAX_REFUSALS: usize = 256;
/// Refused connections are logged at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Warns when open mode listens where others can reach it.
fn warn_if_exposed(config: &Config, tcp: &TcpListener, http: Option<&TcpListener>) {
    let reachable = |listener: &TcpListener| {
        listener
            .local_addr()
            .ok()
            .filter(|addr| !addr.ip().is_loopback())
    };
    let keyed = config.clients.iter().any(ClientEntry::has_key);
    for addr in std::iter::once(tcp).chain(http).filter_map(reachable) {
        if !keyed {
            warn!(%addr, "open mode on a non-loopback address: no client has an access key, so anyone who reaches {addr} may connect as any client and read its events; give each [[clients]] entry an access_key (see SECURITY.md)");
        } else if config.tls.is_none() {
            warn!(%addr, "no [tls] on a non-loopback address: access keys and events cross the network in clear (see SECURITY.md)");
        }
    }
    if let Some(addr) = http.and_then(reachable) {
        if config.admin_token.is_none() {
            warn!(%addr, "no admin_token on a non-loopback address: anyone who reaches {addr} may start and cancel operator replays (see SECURITY.md)");
        }
    }
}

/// Tells a connection past `max_connections` why it is closed.
///
/// Over TLS a plain line would be noise to the client, so the handshake
/// is done first; it shares the one `REFUSAL_WRITE` budget with the line,
/// so a refused connection costs no more time than over plain TCP.
async fn refuse(stream: TcpStream, max: usize, tls: Option<tokio_rustls::TlsAcceptor>) {
    let line = format!("-FAIL:TOO_MANY_CONNECTIONS;MESSAGE=the server has {max} connections open (limits.max_connections), try again later\n");
    let _ = tokio::time::timeout(REFUSAL_WRITE, async {
        match tls {
            None => write_and_close(stream, &line).await,
            Some(acceptor) => write_and_close(acceptor.accept(stream).await?, &line).await,
        }
    })
    .await;
}

async fn write_and_close(mut stream: impl AsyncWrite + Unpin, line: &str) -> std::io::Result<()> {
    stream.write_all(line.as_bytes()).await?;
    stream.shutdown().await
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The engine would not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A `[tls]` file cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
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
/// When the `[tls]` files cannot be used or the store cannot be opened.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let Listeners {
        tcp: listener,
        http: http_listener,
    } = listeners;
    warn_if_exposed(&config, &listener, http_listener.as_ref());
    // Before the store: a bad certificate should not wait on a large log.
    let (tcp_tls, http_tls) = config
        .tls
        .as_ref()
        .map(tls::load)
        .transpose()?
        .map(|acceptors| (acceptors.tcp, acceptors.http))
        .unzip();
    if let Some(files) = &config.tls {
        info!(cert = %files.cert.display(), "TLS on both listeners");
    }
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
    engine.drop_ungranted_subscriptions().await;
    tracker.spawn(engine.retention(cancel.child_token()));
    let permits = Arc::new(Semaphore::new(config.limits.max_connections));
    if let Some(http_listener) = http_listener {
        let state = HttpState {
            engine: Arc::clone(&engine),
            permits: Arc::clone(&permits),
            tracker: tracker.clone(),
            cancel: cancel.child_token(),
        };
        tracker.spawn(async move {
            if let Err(e) = http::serve(http_listener, http_tls, state).await {
                error!(error = %e, "the HTTP listener failed");
            }
        });
    }
    let mut backoff = ACCEPT_BACKOFF;
    let (mut refused, mut last_refusal_log) = (0u64, None::<Instant>);
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
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
        // Past the limit a connection is told so and closed, rather than
        // left waiting in the accept queue with no word.
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            refused += 1;
            if !last_refusal_log.is_some_and(|at: Instant| at.elapsed() < REFUSAL_LOG_EVERY) {
                warn!(%peer, refused, "refusing connections: {} are open (limits.max_connections)", config.limits.max_connections);
                (refused, last_refusal_log) = (0, Some(Instant::now()));
            }
            engine.metrics().closed(Closed::MaxConnections);
            // Telling is itself capped: past it, a flood is just closed.
            if let Ok(telling) = Arc::clone(&refusals).try_acquire_owned() {
                let (max, tls) = (config.limits.max_connections, tcp_tls.clone());
                tracker.spawn(async move {
                    refuse(stream, max, tls).await;
                    drop(telling);
                });
            }
            continue;
        };
        let span = info_span!("conn", %peer, client_id = tracing::field::Empty);
        let (engine, cancel, tls) = (Arc::clone(&engine), cancel.child_token(), tcp_tls.clone());
        tracker.spawn(
            async move {
                connection::serve(engine, stream, peer, tls, cancel).await;
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
