//! The operator API: `POST /replays` starts an operator replay,
//! `/asyncOperations` tracks and cancels it.

use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ensync_protocol::field::{ClientId, Pattern, Position};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error, HttpState};
use crate::engine::{OpError, ReplayRequest};

/// The body of `POST /replays`, as sent.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReplayBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    event_name: Option<String>,
    start_timestamp: Option<Value>,
    end_timestamp: Option<Value>,
    client_id: Option<String>,
    only_unacked: Option<bool>,
    events_per_second: Option<u32>,
}

pub(super) async fn create_replay(State(state): State<HttpState>, body: Bytes) -> Response {
    let request = match replay_request(&body) {
        Ok(request) => request,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match state.engine.start_replay(request).await {
        Ok(status) => {
            let location = format!("/asyncOperations/{}", status.id);
            let mut response = (
                StatusCode::ACCEPTED,
                Json(json!({ "asyncOperationId": status.id })),
            )
                .into_response();
            if let Ok(location) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        Err(e) => op_error(&e),
    }
}

pub(super) async fn list_operations(State(state): State<HttpState>) -> Response {
    Json(json!({ "asyncOperations": state.engine.operations() })).into_response()
}

pub(super) async fn get_operation(
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Response {
    match state.engine.operation(&id) {
        Some(status) => Json(status).into_response(),
        None => op_error(&OpError::NotFound(id)),
    }
}

pub(super) async fn cancel_operation(
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Response {
    match state.engine.cancel_operation(&id).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => op_error(&e),
    }
}

fn op_error(e: &OpError) -> Response {
    let status = match e {
        OpError::NotFound(_) => StatusCode::NOT_FOUND,
        OpError::Finished(_) => StatusCode::CONFLICT,
        OpError::Invalid(_) => StatusCode::BAD_REQUEST,
        OpError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// Validates a `POST /replays` body; the error says what to fix.
fn replay_request(body: &[u8]) -> Result<ReplayRequest, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(
            "the body is empty; send a JSON object such as {\"type\":\"ensync\",\"eventName\":\"orders/*\",\"startTimestamp\":1700000000000}"
                .into(),
        );
    }
    let body: ReplayBody = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not a valid replay request: {e}"))?;
    match body.kind.as_deref() {
        None | Some("ensync") => {}
        Some(other) => return Err(format!("type is {other:?}; the only type is \"ensync\"")),
    }
    let name = body
        .event_name
        .ok_or("eventName is required: an event name or a pattern such as orders/*")?;
    let pattern = Pattern::from_str(&name).map_err(|e| format!("eventName {name:?} {e}"))?;
    let client = body
        .client_id
        .map(|id| ClientId::from_str(&id).map_err(|e| format!("clientId {id:?} {e}")))
        .transpose()?;
    Ok(ReplayRequest {
        pattern,
        start: body
            .start_timestamp
            .map(|v| timestamp("startTimestamp", &v))
            .transpose()?,
        end: body
            .end_timestamp
            .map(|v| timestamp("endTimestamp", &v))
            .transpose()?,
        client,
        only_unacked: body.only_unacked.unwrap_or(false),
        events_per_second: match body.events_per_second {
            Some(0) => {
                return Err("eventsPerSecond must be at least 1 (leave it out for no limit)".into())
            }
            rate => rate,
        },
    })
}

/// Milliseconds since the epoch from a number, a string of digits, or an
/// RFC 3339 date-time.
fn timestamp(key: &str, value: &Value) -> Result<u64, String> {
    let bad = || {
        format!(
            "{key} is {value}; give milliseconds since the epoch or an RFC 3339 date-time such as \"2026-11-22T10:00:00Z\""
        )
    };
    match value {
        Value::Number(n) => n.as_u64().ok_or_else(bad),
        Value::String(text) => match Position::from_str(text.trim()) {
            Ok(Position::Timestamp(ms)) => Ok(ms),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}
