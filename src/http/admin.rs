//! The operator API: `POST /replays` starts an operator replay,
//! `/asyncOperations` tracks and cancels it.

use std::fmt;
use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ensync_protocol::field::{ClientId, Pattern, Position};
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{json, Value};

use super::{error, HttpState};
use crate::engine::{OpError, ReplayRequest};

pub(super) async fn create_replay(
    State(state): State<HttpState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
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

/// The keys a `POST /replays` body may hold.
const REPLAY_KEYS: &str =
    "type, eventName, startTimestamp, endTimestamp, clientId, onlyUnacked, eventsPerSecond";

/// Validates a `POST /replays` body; the error says what to fix.
fn replay_request(body: &[u8]) -> Result<ReplayRequest, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(
            "the body is empty; send a JSON object such as {\"type\":\"ensync\",\"eventName\":\"orders/*\",\"startTimestamp\":1700000000000}"
                .into(),
        );
    }
    let invalid = |why: String| format!("the body is not a valid replay request: {why}");
    let value: Value = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    if !value.is_object() {
        return Err(invalid(format!(
            "it is {}, not a JSON object with the keys {REPLAY_KEYS}",
            json_kind(&value)
        )));
    }
    // Read again, refusing a key given twice (a map keeps only one).
    let Fields(fields) = serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))?;
    if let Some(unknown) = fields
        .keys()
        .find(|k| !REPLAY_KEYS.split(", ").any(|known| known == k.as_str()))
    {
        return Err(format!(
            "unknown key {unknown:?}; the keys are {REPLAY_KEYS}"
        ));
    }
    // A key set to null counts as left out.
    let field = |key: &str| fields.get(key).filter(|v| !v.is_null());
    match field("type") {
        None => {}
        Some(Value::String(kind)) if kind == "ensync" => {}
        Some(other) => return Err(format!("type is {other}; the only type is \"ensync\"")),
    }
    let name = match field("eventName") {
        None => {
            return Err("eventName is required: an event name or a pattern such as orders/*".into())
        }
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(format!(
                "eventName is {}; give a string: an event name or a pattern such as orders/*",
                json_kind(other)
            ))
        }
    };
    let pattern = Pattern::from_str(name).map_err(|e| format!("eventName {name:?} {e}"))?;
    let client = match field("clientId") {
        None => None,
        Some(Value::String(id)) => {
            Some(ClientId::from_str(id).map_err(|e| format!("clientId {id:?} {e}"))?)
        }
        Some(other) => {
            return Err(format!(
                "clientId is {}; give a client id as a string",
                json_kind(other)
            ))
        }
    };
    let only_unacked = match field("onlyUnacked") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(format!(
                "onlyUnacked is {}; give true or false",
                json_kind(other)
            ))
        }
    };
    let events_per_second = match field("eventsPerSecond") {
        None => None,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n >= 1 => Some(n),
            _ => {
                return Err(format!(
                    "eventsPerSecond is {v}; give a whole number from 1 to {} (leave it out for no limit)",
                    u32::MAX
                ))
            }
        },
    };
    Ok(ReplayRequest {
        pattern,
        start: field("startTimestamp")
            .map(|v| timestamp("startTimestamp", v))
            .transpose()?,
        end: field("endTimestamp")
            .map(|v| timestamp("endTimestamp", v))
            .transpose()?,
        client,
        only_unacked,
        events_per_second,
    })
}

/// A JSON object's members, with no key given twice.
struct Fields(serde_json::Map<String, Value>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Fields;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = serde_json::Map::new();
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    if fields.contains_key(&key) {
                        return Err(de::Error::custom(format!("the key {key:?} is given twice")));
                    }
                    fields.insert(key, value);
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// What kind of JSON value `v` is, for error messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
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
