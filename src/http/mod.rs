//! The HTTP edge every route shares: the JSON body extractor (every rejection in OpenAI's
//! error shape, the body read within its time limit), the caller as a [`Principal`], rate
//! headers on an answer, the request id, and the middleware that observes every request.

mod observe;

pub use observe::{name_route, observe};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRef, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::admission::{Admission, Principal, Quota};
use crate::error::ApiError;
use crate::telemetry::Exchange;

/// The largest request body sluice reads.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// A JSON object body. Wrong content type → 415, too large → 413, not there within the body
/// limit → 408, not JSON or not an object → 400; all with OpenAI's error body.
/// The second field is the body's size in bytes.
pub struct JsonObject(pub Map<String, Value>, pub usize);

/// How long a request's body may take to arrive, once its headers are in.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

impl<S> FromRequest<S> for JsonObject
where
    S: Send + Sync,
    BodyTimeout: FromRef<S>,
    crate::tokens::Counter: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
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
        // The client's lane of large work: its key, else its address.
        let client = bearer(req.headers()).map(str::to_owned).or_else(|| {
            let peer = req.extensions().get::<ConnectInfo<Peer>>();
            peer.map(|c| c.0.0.ip().to_string())
        });
        let lane = crate::tokens::lane(client.as_deref().unwrap_or(""));
        let BodyTimeout(limit) = BodyTimeout::from_ref(state);
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
        // A large body is parsed off the async workers, one at a time (as large prompts are
        // counted): a megabyte of JSON takes milliseconds that other requests must not wait.
        let size = bytes.len();
        let parsed = crate::tokens::Counter::from_ref(state)
            .heavy(lane, size, move || serde_json::from_slice::<Value>(&bytes))
            .await
            .ok_or(ApiError::Internal)?;
        match parsed {
            Ok(Value::Object(map)) => Ok(JsonObject(map, size)),
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
pub fn with_rate_headers(response: Result<Response, ApiError>, quota: &Quota) -> Response {
    let mut response = response.unwrap_or_else(IntoResponse::into_response);
    crate::error::rate_headers(quota, response.headers_mut());
    response
}

/// `x-sluice-dropped: web_search,thinking…`: what of the client's request its upstream
/// was not sent, because it does not speak the client's API (none: no header).
pub fn with_dropped(mut response: Response, dropped: &[String]) -> Response {
    if !dropped.is_empty()
        && let Ok(value) = HeaderValue::from_str(&dropped.join(","))
    {
        response.headers_mut().insert("x-sluice-dropped", value);
    }
    response
}

/// `response` (a reply answered whole) with `x-sluice-cost-usd`: what it cost, when its
/// model has a price.
pub fn with_cost(mut response: Response, cost: Option<f64>) -> Response {
    if let Some(cost) = cost
        && let Ok(value) = HeaderValue::from_str(&dollars(cost))
    {
        response.headers_mut().insert("x-sluice-cost-usd", value);
    }
    response
}

/// `cost` as a plain decimal, to the billionth of a dollar (`0.000062`, not `6.2e-5`).
fn dollars(cost: f64) -> String {
    let text = format!("{cost:.9}");
    let text = text.trim_end_matches('0');
    text.strip_suffix('.').unwrap_or(text).to_owned()
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case, RFC 9110).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim()
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// Whether the request asks for a stream that outlives its connection
/// (`x-sluice-resumable: true`).
pub fn asks_resumable(headers: &HeaderMap) -> bool {
    headers
        .get("x-sluice-resumable")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

/// The client's address, as handlers see it through `ConnectInfo<Peer>`.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Who is asking: identified by admission from the request's credentials and address, and
/// noted in the request's log line. A wrong or missing key is a 401.
impl<S> FromRequestParts<S> for Principal
where
    S: Send + Sync,
    Arc<Admission>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<Peer>>()
            .map(|c| c.0.0.ip());
        let headers = &parts.headers;
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        // Anthropic's clients send their key as `x-api-key`.
        let key = bearer(headers).or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        });
        let who = Arc::<Admission>::from_ref(state).identify(key, forwarded, peer)?;
        if let Some(exchange) = parts.extensions.get::<Exchange>() {
            exchange.set_key(who.name.clone(), who.keyed, who.team_name());
        }
        Ok(who)
    }
}

/// The id the request-id layer gave this request.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}
