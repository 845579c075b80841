//! The HTTP listener: the protocol over WebSocket at `/message`, the
//! operator API (async replays), `/healthz` and `/metrics`, over plain
//! TCP or TLS.
//!
//! axum serves it: it is the tokio project's own HTTP framework, built on
//! hyper, with WebSocket upgrades (through tungstenite), routing and
//! extractors that we would otherwise write and maintain ourselves.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info_span, Instrument};

use crate::engine::Engine;
use crate::metrics::Closed;
use crate::tls::HttpsListener;

mod admin;
pub mod websocket;

/// Bytes a WebSocket gathers before writing them to the socket.
const WS_WRITE_BUFFER: usize = 16 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    /// The engine every session and operation runs against.
    pub engine: Arc<Engine>,
    /// Connection permits, shared with the TCP listener.
    pub permits: Arc<Semaphore>,
    /// Tracks WebSocket sessions, so shutdown waits for them.
    pub tracker: TaskTracker,
    /// Fires at shutdown.
    pub cancel: CancellationToken,
}

/// Serves HTTP on `listener`, over TLS when `tls` is set, until `cancel`
/// fires.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: HttpState,
) -> std::io::Result<()> {
    let cancel = state.cancel.clone();
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let Some(acceptor) = tls else {
        return axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
    };
    // NOTE: axum provides `ConnectInfo<SocketAddr>` (which `/message`
    // takes) for its own TcpListener and for any listener wrapped by
    // `tap_io`, and the orphan rule keeps us from adding it for ours: the
    // tap that does nothing is what makes the peer address available.
    let listener = HttpsListener::new(listener, acceptor).tap_io(|_| {});
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

/// Every route.
pub fn router(state: HttpState) -> Router {
    let admin = Router::new()
        .route("/replays", post(admin::create_replay))
        .route("/asyncOperations", get(admin::list_operations))
        .route(
            "/asyncOperations/{id}",
            get(admin::get_operation).delete(admin::cancel_operation),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), admin_auth));
    Router::new()
        .route("/message", get(websocket))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A JSON error body: `{"error": message}`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no route {method} {}; the routes are GET /message (WebSocket), GET /healthz, GET /metrics, POST /replays, GET /asyncOperations, GET and DELETE /asyncOperations/{{id}}",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

/// Lets a request through to the admin routes when no token is configured,
/// or when it carries `Authorization: Bearer <token>`.
async fn admin_auth(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    let Some(token) = state.engine.config().admin_token.as_deref() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    match given {
        Some(given) if same_secret(given.trim().as_bytes(), token.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => unauthorized("the bearer token is not the admin token"),
        None => unauthorized("the admin API needs the header Authorization: Bearer <admin_token>"),
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is
/// matched without regard to case, as HTTP auth schemes are.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

fn unauthorized(message: &str) -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, message);
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Compares secrets in time that depends on their lengths only.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn websocket(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return error(
                rejection.status(),
                format!(
                    "{}; /message is the protocol over WebSocket (ws://HOST:PORT/message)",
                    rejection.body_text()
                ),
            )
        }
    };
    let Ok(permit) = Arc::clone(&state.permits).try_acquire_owned() else {
        state.engine.metrics().closed(Closed::MaxConnections);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is at its connection limit (limits.max_connections); try again later",
        );
    };
    // Room for a line of the maximum length, so a longer one gets
    // LINE_TOO_LONG like over TCP; far larger frames close the socket.
    let max_frame = state.engine.config().limits.max_line_len.saturating_mul(2);
    let HttpState {
        engine,
        tracker,
        cancel,
        ..
    } = state;
    let span = info_span!("ws", %peer, client_id = tracing::field::Empty);
    upgrade
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        // The send timeout counts a flushed write buffer as the client's
        // progress: a small one lets a slow but steady reader keep up.
        .write_buffer_size(WS_WRITE_BUFFER)
        .on_upgrade(move |socket| {
            tracker.track_future(
                async move {
                    websocket::serve(engine, socket, cancel.child_token()).await;
                    drop(permit);
                }
                .instrument(span),
            )
        })
}

async fn healthz(State(state): State<HttpState>) -> Response {
    let engine = &state.engine;
    Json(json!({
        "status": "ok",
        "head": engine.head(),
        "storeBytes": engine.stored_bytes(),
    }))
    .into_response()
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let body = state.engine.render_metrics();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}
