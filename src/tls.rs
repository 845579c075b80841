//! TLS for both listeners (`[tls]`): the certificate chain and key read
//! once at start-up, the handshake and its time limit, and the HTTP
//! listener that hands axum only connections whose handshake is done.
//!
//! The session, the engine and the HTTP handlers never see TLS: they get
//! a byte stream either way. Client certificates are not asked for;
//! clients prove who they are with `CONN`, as over plain TCP.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::config;

/// How long a client has to finish the TLS handshake after connecting.
///
/// A fixed bound rather than `limits.login_timeout`: a real client's
/// handshake is two round trips, done in milliseconds even across the
/// world, while the login timeout (60 s by default) is sized for a client
/// to get to `CONN`. A peer that connects and never says hello would
/// otherwise hold its connection slot that long. The same bound applies to
/// HTTP, where there is no login timeout at all.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes the HTTP listener runs at once. Each holds a task and
/// rustls's buffers (tens of KiB), so this caps them at some tens of MiB;
/// past it, new connections wait in the accept queue until a handshake
/// ends, which `HANDSHAKE_TIMEOUT` bounds.
const MAX_HTTP_HANDSHAKES: usize = 1024;

/// Pause after an HTTPS accept fails for a reason other than the one
/// connection (out of file descriptors, say), as axum does for plain HTTP.
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// The protocol HTTPS clients are told to speak: axum's WebSocket upgrade
/// needs HTTP/1.1, and a client that offers only h2 is refused in the
/// handshake rather than after it.
const HTTP_ALPN: &[u8] = b"http/1.1";

/// The config keys, as errors name them.
const CERT_KEY: &str = "tls.cert";
const KEY_KEY: &str = "tls.key";

/// A `[tls]` setting the server cannot start with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// One of the files cannot be read or does not hold what it should.
    #[error("{key} {}: {problem}", path.display())]
    File {
        /// The config key: `tls.cert` or `tls.key`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The key is not the one the certificate was issued for.
    #[error("tls.key {} does not match the certificate in tls.cert {} (the first certificate must be the one issued for this key)", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the settings for another reason.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsError {
    fn file(key: &'static str, path: &Path, problem: impl Into<String>) -> Self {
        Self::File {
            key,
            path: path.to_owned(),
            problem: problem.into(),
        }
    }
}

/// The handshake configurations of both listeners; cheap to clone.
#[derive(Clone)]
pub struct Acceptors {
    /// The protocol over TCP.
    pub tcp: TlsAcceptor,
    /// HTTP and WebSocket, with ALPN `http/1.1`.
    pub http: TlsAcceptor,
}

impl std::fmt::Debug for Acceptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptors").finish_non_exhaustive()
    }
}

/// Reads the certificate chain and key that `tls` names and builds the
/// acceptors of both listeners.
///
/// # Errors
/// When a file cannot be read, holds no certificate or no key, is not
/// valid PEM, or the key does not match the certificate; the message
/// names the config key and the file.
pub fn load(tls: &config::Tls) -> Result<Acceptors, TlsError> {
    let chain = read_chain(&tls.cert)?;
    let key = read_key(&tls.key)?;
    // NOTE: the provider is named here rather than installed process-wide:
    // rustls picks no default when more than one provider is compiled in,
    // and a dependency may bring in another.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::Mismatch {
                    cert: tls.cert.clone(),
                    key: tls.key.clone(),
                }
            }
            rustls::Error::InvalidCertificate(_) => TlsError::file(
                CERT_KEY,
                &tls.cert,
                format!("the first certificate cannot be used: {e}"),
            ),
            e => TlsError::file(KEY_KEY, &tls.key, format!("the key cannot be used: {e}")),
        })?;
    let mut http = config.clone();
    http.alpn_protocols = vec![HTTP_ALPN.to_vec()];
    Ok(Acceptors {
        tcp: TlsAcceptor::from(Arc::new(config)),
        http: TlsAcceptor::from(Arc::new(http)),
    })
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::file(key, path, format!("cannot read: {e}")))
}

/// Every certificate in the file, in order (leaf first).
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(CERT_KEY, path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::file(CERT_KEY, path, not_pem(&e)))?;
    if chain.is_empty() {
        return Err(TlsError::file(
            CERT_KEY,
            path,
            "no certificate in the file (expected a PEM block \"-----BEGIN CERTIFICATE-----\")",
        ));
    }
    Ok(chain)
}

/// The first private key in the file, of whichever of the three kinds.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(KEY_KEY, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        let problem = match e {
            pem::Error::NoItemsFound => "no private key in the file (expected a PEM block \"-----BEGIN PRIVATE KEY-----\", \"-----BEGIN RSA PRIVATE KEY-----\" or \"-----BEGIN EC PRIVATE KEY-----\")".to_string(),
            e => not_pem(&e),
        };
        TlsError::file(KEY_KEY, path, problem)
    })
}

/// A PEM error in words; the parser's own shows the offending line as a
/// list of byte values.
fn not_pem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: no end line {:?}",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "not valid PEM: malformed begin line {:?}",
            String::from_utf8_lossy(line)
        ),
        e => format!("not valid PEM: {e}"),
    }
}

/// Runs the server side of the handshake on `stream`, within
/// `HANDSHAKE_TIMEOUT`.
///
/// # Errors
/// When the peer does not speak TLS, the handshake fails, or it takes
/// longer than `HANDSHAKE_TIMEOUT`.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> io::Result<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(done) => done,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no TLS handshake within {}",
                humantime::format_duration(HANDSHAKE_TIMEOUT)
            ),
        )),
    }
}

/// The HTTPS listener: accepts TCP connections and hands axum those whose
/// handshake succeeded.
///
/// Each handshake runs in its own task, so one slow or silent client
/// never holds up the next; they are dropped (and so aborted) with the
/// listener when the server stops accepting.
pub struct HttpsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
    /// Set after an accept failed: no accepts until then.
    paused_until: Option<Instant>,
}

impl HttpsListener {
    /// A listener that runs `acceptor`'s handshake on what `tcp` accepts.
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> Self {
        Self {
            tcp,
            acceptor,
            handshakes: JoinSet::new(),
            paused_until: None,
        }
    }

    fn start_handshake(&mut self, stream: TcpStream, peer: SocketAddr) {
        let acceptor = self.acceptor.clone();
        self.handshakes.spawn(async move {
            match handshake(&acceptor, stream).await {
                Ok(stream) => Some((stream, peer)),
                Err(e) => {
                    debug!(%peer, error = %e, "HTTPS: TLS handshake failed; connection closed");
                    None
                }
            }
        });
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    // IMPORTANT: axum drops this future whenever shutdown begins, so it
    // must lose nothing when cancelled: a finished handshake stays in the
    // JoinSet until the very poll that returns it.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let accepting = self.handshakes.len() < MAX_HTTP_HANDSHAKES;
            let paused_until = self.paused_until;
            tokio::select! {
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
                () = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)),
                    if paused_until.is_some() => self.paused_until = None,
                accepted = self.tcp.accept(), if accepting && paused_until.is_none() => {
                    match accepted {
                        Ok((stream, peer)) => self.start_handshake(stream, peer),
                        // The one connection went away before it was accepted.
                        Err(e) if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionAborted
                                | io::ErrorKind::ConnectionReset
                                | io::ErrorKind::ConnectionRefused
                        ) => {}
                        Err(e) => {
                            warn!(error = %e, "HTTPS accept failed; pausing {ACCEPT_PAUSE:?}");
                            self.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                        }
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
