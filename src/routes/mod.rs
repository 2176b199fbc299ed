//! The HTTP surfaces, one module each, and what they share: the JSON body extractor (every
//! rejection in OpenAI's error shape), the request id, and the 404/405 fallbacks.

pub mod chat;
pub mod health;
pub mod models;
pub mod openai;
pub mod prompts;
pub mod ui;

use axum::body::Bytes;
use axum::extract::{FromRequest, OriginalUri, Request};
use axum::http::{HeaderMap, Method, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::state::AppState;

/// The largest request body sluice reads.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// A JSON object body. Wrong content type → 415, too large → 413, not there within the body
/// limit → 408, not JSON or not an object → 400; all with OpenAI's error body.
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<AppState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim();
                mime.eq_ignore_ascii_case("application/json") || mime.ends_with("+json")
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = state.body_timeout;
        let bytes = tokio::time::timeout(limit, Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::BodyTimeout(limit.as_millis() as u64))?
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { limit: BODY_LIMIT }
                } else {
                    ApiError::invalid(format!("could not read the request body: {e}"), None)
                }
            })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(map)),
            Ok(_) => Err(ApiError::invalid(
                "the request body must be a JSON object",
                None,
            )),
            Err(e) => Err(ApiError::invalid(
                format!("the request body is not valid JSON ({e})"),
                None,
            )),
        }
    }
}

/// Reads a typed view of a JSON body; the error names the field at fault (`param`).
pub fn typed<T: DeserializeOwned>(body: &mut Map<String, Value>) -> Result<T, ApiError> {
    // serde_json reads from `&Value` without copying; the map is lent and given back.
    let value = Value::Object(std::mem::take(body));
    let result = serde_path_to_error::deserialize(&value);
    if let Value::Object(map) = value {
        *body = map;
    }
    result.map_err(|e| {
        let path = e.path().to_string();
        // serde names a missing field in its message, not in the path.
        let message = e.inner().to_string();
        let field = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        let param = match (path.as_str(), field) {
            (".", None) => None,
            (".", Some(field)) => Some(field.to_owned()),
            (_, Some(field)) => Some(format!("{path}.{field}")),
            (_, None) => Some(path),
        };
        let message = match &param {
            Some(p) => format!("invalid value for `{p}`: {}", e.inner()),
            None => e.inner().to_string(),
        };
        ApiError::InvalidRequest {
            message,
            param,
            code: None,
        }
    })
}

/// An admitted request's answer, success or failure, with its `x-ratelimit-*` headers.
pub fn with_rate_headers(
    response: Result<axum::response::Response, ApiError>,
    rate: &crate::admission::RateHeaders,
) -> axum::response::Response {
    let mut response = response.unwrap_or_else(axum::response::IntoResponse::into_response);
    rate.apply(response.headers_mut());
    response
}

/// The id the request-id layer gave this request.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

pub async fn not_found(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

pub async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}
