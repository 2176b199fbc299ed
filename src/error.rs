//! `ApiError`: every failure a client can see, one status match, OpenAI's error body.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::admission::{Quota, Refusal, Window};
use crate::backend::BackendError;

/// An error answer's code and message, for the request's log line.
#[derive(Debug, Clone)]
pub struct Answered(pub String);

/// Marks a response refused by sluice's own limits: `client` or `global`.
#[derive(Debug, Clone, Copy)]
pub struct RateLimited(pub &'static str);

/// What went wrong, as the client is told. 5xx details are logged, not returned.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// A configured route whose every upstream names a key variable that is not set.
    #[error(
        "The model `{model}` is routed to an upstream whose key is not set where sluice runs ({}); set it and start sluice again.",
        unset.join(", ")
    )]
    ModelOff { model: String, unset: Vec<String> },
    #[error("Unknown request URL: {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("Method {method} is not allowed for {path}")]
    MethodNotAllowed { method: String, path: String },
    /// The upstream refused the request itself (400, 404, 422...): its status and message.
    #[error("{message}")]
    UpstreamRejected {
        status: StatusCode,
        message: String,
        param: Option<String>,
        code: Option<String>,
    },
    #[error("the upstream is rate limiting requests: {message}")]
    UpstreamRateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("the upstream rejected sluice's credentials for this model")]
    UpstreamAuth,
    #[error("the upstream failed: {0}")]
    UpstreamFailed(String),
    #[error("the upstream did not answer in time: {0}")]
    UpstreamTimeout(String),
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after: Duration,
    },
    #[error(
        "Incorrect API key provided. Send one of sluice's keys as `Authorization: Bearer <key>`."
    )]
    InvalidApiKey,
    #[error(
        "`/metrics` and `/readyz` want SLUICE_METRICS_TOKEN as `Authorization: Bearer <token>`."
    )]
    InvalidMetricsToken,
    #[error("`/admin` wants SLUICE_ADMIN_KEY as `Authorization: Bearer <key>`.")]
    InvalidAdminKey,
    #[error("The admin key (SLUICE_ADMIN_KEY) cannot call inference: send one of sluice's keys.")]
    AdminKeyForInference,
    /// The ledger is off, or its database cannot be read.
    #[error("{0}")]
    LedgerUnavailable(String),
    /// An admin request names something that is not there.
    #[error("{0}")]
    NotFound(String),
    /// An admin request conflicts with what is there (a name taken, a key revoked).
    #[error("{0}")]
    Conflict(String),
    /// The client is over one of its limits.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
        quota: Option<Quota>,
    },
    /// A budget (the key's or its team's) is spent: OpenAI's `insufficient_quota`, until
    /// the period resets (never, for `total`).
    #[error("{message}")]
    InsufficientQuota {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The key was revoked, and its streams ended with it.
    #[error("the API key was revoked; its streams were ended")]
    KeyRevoked,
    /// sluice as a whole is at its limit.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after: Duration,
    },
    /// Every target of the model's pool is at its `max_streams`, and its queue is full or
    /// the wait ran out.
    #[error(
        "every upstream of `{model}` is serving as many streams as it may, and the queue for it is full or the wait ran out; try again shortly"
    )]
    PoolFull {
        model: String,
        retry_after: Duration,
    },
    /// Every target of the model's pool is ejected for failing.
    #[error("every upstream of `{model}` is failing and taken out for now; try again shortly")]
    NoHealthyUpstream {
        model: String,
        retry_after: Duration,
    },
    /// sluice is shutting down: the client should try again, on another instance.
    #[error("the server is restarting; retry the request")]
    Restarting,
    /// The request's body did not arrive within the limit.
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(u64),
    /// No stream by this id that this client may read: unknown, expired, or another's.
    #[error("No stream `{0}` that this key may read: unknown, another client's, or expired.")]
    StreamNotFound(String),
    /// The stream is still running: its whole reply is not there yet.
    #[error(
        "the stream `{0}` is still running; follow it with `stream=true`, or ask again when it has finished"
    )]
    StreamRunning(String),
    /// The client's cursor (event `n`) is past the end of a finished stream; the route names
    /// the parameter it came in (see [`ApiError::cursor_beyond`]).
    #[error("Last-Event-ID {0} is beyond the stream's last event")]
    CursorBeyond(u64),
    /// The events after the client's cursor are no longer kept.
    #[error("the events of stream `{0}` after that cursor are no longer kept")]
    StreamEventsGone(String),
    /// The stream was cancelled (by the cancel route, or because nobody reattached in time).
    #[error("the stream was cancelled")]
    StreamCancelled,
    /// The instance producing the stream stopped answering.
    #[error("the instance producing this stream is gone; the stream cannot go on")]
    ProducerLost,
    /// The shared log (Redis) failed under a reader on another instance: the stream may
    /// well go on where it is produced, but cannot be followed from here.
    #[error("the shared stream log (Redis) failed while this stream was read; resume it again")]
    SharedLogUnavailable,
    /// One event of a resumable stream is larger than its log can hold.
    #[error("{0}")]
    StreamTooLarge(String),
    /// Some of a stream's events did not reach the shared log.
    #[error("some events of this stream were not logged; resume is not possible")]
    StreamEventsLost,
    /// `previous_response_id` names no stored response this key may read.
    #[error("Previous response with id '{0}' not found.")]
    PreviousResponseNotFound(String),
    /// A bug in sluice (a panic was caught): the details are in the log.
    #[error("the server had an error while processing the request")]
    Internal,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_owned),
            code: None,
        }
    }

    /// A cursor beyond a finished stream, named as the client sent it: `param` and the value
    /// it gave (a Responses `starting_after` is one below the event's number).
    pub fn cursor_beyond(self, param: &str, sent: u64) -> Self {
        match self {
            ApiError::CursorBeyond(_) => ApiError::invalid(
                format!("`{param}` {sent} is beyond the stream's last event"),
                Some(param),
            ),
            other => other,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::CursorBeyond(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::ModelNotFound(_)
            | ApiError::ModelOff { .. }
            | ApiError::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UpstreamRejected { status, .. } => *status,
            ApiError::UpstreamRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::UpstreamAuth | ApiError::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Overloaded { .. }
            | ApiError::Busy { .. }
            | ApiError::Restarting
            | ApiError::NoHealthyUpstream { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::PoolFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::InvalidApiKey
            | ApiError::InvalidMetricsToken
            | ApiError::InvalidAdminKey
            | ApiError::AdminKeyForInference => StatusCode::UNAUTHORIZED,
            ApiError::RateLimited { .. } | ApiError::InsufficientQuota { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::KeyRevoked => StatusCode::UNAUTHORIZED,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::StreamNotFound(_) | ApiError::PreviousResponseNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::StreamRunning(_) | ApiError::StreamCancelled => StatusCode::CONFLICT,
            ApiError::StreamEventsGone(_) => StatusCode::GONE,
            ApiError::ProducerLost | ApiError::StreamEventsLost => StatusCode::BAD_GATEWAY,
            ApiError::SharedLogUnavailable | ApiError::LedgerUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::StreamTooLarge(_) => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::CursorBeyond(_)
            | ApiError::PayloadTooLarge { .. }
            | ApiError::UnsupportedMediaType
            | ApiError::ModelNotFound(_)
            | ApiError::ModelOff { .. }
            | ApiError::RouteNotFound { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::BodyTimeout(_)
            | ApiError::NotFound(_)
            | ApiError::Conflict(_)
            | ApiError::UpstreamRejected { .. } => "invalid_request_error",
            ApiError::UpstreamRateLimited { .. }
            | ApiError::RateLimited { .. }
            | ApiError::PoolFull { .. } => "rate_limit_error",
            // OpenAI's type and code for a quota that is spent.
            ApiError::InsufficientQuota { .. } => "insufficient_quota",
            ApiError::KeyRevoked => "invalid_request_error",
            ApiError::InvalidApiKey
            | ApiError::InvalidMetricsToken
            | ApiError::InvalidAdminKey
            | ApiError::AdminKeyForInference => "invalid_request_error",
            // OpenAI's type for what fails on the server's side, whichever part failed.
            ApiError::Busy { .. }
            | ApiError::UpstreamAuth
            | ApiError::UpstreamFailed(_)
            | ApiError::UpstreamTimeout(_)
            | ApiError::Overloaded { .. }
            | ApiError::NoHealthyUpstream { .. } => "server_error",
            ApiError::Restarting | ApiError::Internal => "server_error",
            ApiError::StreamNotFound(_)
            | ApiError::PreviousResponseNotFound(_)
            | ApiError::StreamRunning(_)
            | ApiError::StreamEventsGone(_)
            | ApiError::StreamCancelled => "invalid_request_error",
            ApiError::ProducerLost
            | ApiError::StreamEventsLost
            | ApiError::SharedLogUnavailable
            | ApiError::LedgerUnavailable(_)
            | ApiError::StreamTooLarge(_) => "server_error",
        }
    }

    fn code(&self) -> Option<String> {
        let code = match self {
            ApiError::InvalidRequest { code, .. } => return code.map(str::to_owned),
            ApiError::UpstreamRejected { code, .. } => return code.clone(),
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::ModelNotFound(_) | ApiError::ModelOff { .. } => "model_not_found",
            ApiError::RouteNotFound { .. } => "unknown_url",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::UpstreamRateLimited { .. } => "rate_limit_exceeded",
            ApiError::UpstreamAuth => "upstream_auth_failed",
            ApiError::UpstreamFailed(_) => "upstream_failed",
            ApiError::UpstreamTimeout(_) => "upstream_timeout",
            ApiError::Overloaded { .. } => "model_overloaded",
            ApiError::InvalidApiKey
            | ApiError::InvalidMetricsToken
            | ApiError::InvalidAdminKey
            | ApiError::AdminKeyForInference => "invalid_api_key",
            ApiError::RateLimited { .. } => "rate_limit_exceeded",
            ApiError::InsufficientQuota { .. } => "insufficient_quota",
            ApiError::KeyRevoked => "key_revoked",
            ApiError::Busy { .. } => "server_busy",
            ApiError::PoolFull { .. } => "model_at_capacity",
            ApiError::NoHealthyUpstream { .. } => "no_healthy_upstream",
            ApiError::Restarting => "server_restarting",
            ApiError::BodyTimeout(_) => "request_timeout",
            ApiError::Internal => "internal_error",
            ApiError::StreamNotFound(_) => "stream_not_found",
            ApiError::PreviousResponseNotFound(_) => "previous_response_not_found",
            ApiError::StreamRunning(_) => "stream_running",
            ApiError::CursorBeyond(_) => "cursor_beyond_stream",
            ApiError::StreamEventsGone(_) => "stream_events_gone",
            ApiError::StreamCancelled => "stream_cancelled",
            ApiError::ProducerLost => "producer_lost",
            ApiError::StreamEventsLost => "stream_events_lost",
            ApiError::SharedLogUnavailable => "shared_log_unavailable",
            ApiError::LedgerUnavailable(_) => "ledger_unavailable",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::StreamTooLarge(_) => "stream_too_large",
        };
        Some(code.to_owned())
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } | ApiError::UpstreamRejected { param, .. } => {
                param.as_deref()
            }
            ApiError::ModelNotFound(_) | ApiError::ModelOff { .. } => Some("model"),
            ApiError::CursorBeyond(_) => Some("Last-Event-ID"),
            ApiError::PreviousResponseNotFound(_) => Some("previous_response_id"),
            _ => None,
        }
    }

    /// `{"error":{"message","type","param","code"}}`: the body of an error response, and the
    /// payload of an error event once a stream has started.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.to_string(),
            "type": self.kind(),
            "param": self.param(),
            "code": self.code(),
        }})
    }

    /// How long the client should wait before trying again.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::UpstreamRateLimited {
                retry_after: Some(d),
                ..
            }
            | ApiError::Overloaded { retry_after: d, .. }
            | ApiError::RateLimited { retry_after: d, .. }
            | ApiError::Busy { retry_after: d, .. }
            | ApiError::PoolFull { retry_after: d, .. }
            | ApiError::NoHealthyUpstream { retry_after: d, .. } => Some(*d),
            ApiError::InsufficientQuota { retry_after, .. } => *retry_after,
            ApiError::Restarting => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Rejected {
                status,
                message,
                param,
                code,
            } => match status {
                401 | 403 => ApiError::UpstreamAuth,
                429 => ApiError::UpstreamRateLimited {
                    message,
                    retry_after: None,
                },
                400..=499 => ApiError::UpstreamRejected {
                    status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                    message,
                    param,
                    code,
                },
                // The upstream's own words for a redirect or a 5xx (tracebacks, host names)
                // are in sluice's log, not in the client's answer.
                300..=399 => ApiError::UpstreamFailed(format!(
                    "the upstream answered {status}, a redirect; sluice follows none"
                )),
                _ => ApiError::UpstreamFailed(format!("the upstream answered {status}")),
            },
            BackendError::RateLimited {
                message,
                retry_after,
            } => ApiError::UpstreamRateLimited {
                message,
                retry_after,
            },
            BackendError::TooLarge(_) => ApiError::UpstreamFailed(e.to_string()),
            BackendError::Unreachable(m)
            | BackendError::Unanswered(m)
            | BackendError::Interrupted(m)
            | BackendError::Protocol(m) => ApiError::UpstreamFailed(m),
            BackendError::Overloaded {
                message,
                retry_after,
            } => ApiError::Overloaded {
                message,
                retry_after,
            },
            BackendError::Timeout(wait) => {
                ApiError::UpstreamTimeout(format!("no {wait} within the limit"))
            }
            BackendError::ShuttingDown => ApiError::Restarting,
            BackendError::BudgetSpent {
                message,
                retry_after,
            } => ApiError::InsufficientQuota {
                message,
                retry_after,
            },
            BackendError::KeyRevoked => ApiError::KeyRevoked,
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let again = Duration::from_secs(1);
        match refusal {
            Refusal::InvalidKey => ApiError::InvalidApiKey,
            Refusal::AdminKey => ApiError::AdminKeyForInference,
            Refusal::ModelNotAllowed(model) => ApiError::ModelNotFound(model),
            Refusal::Full { max_streams } => ApiError::Busy {
                message: format!("sluice is at its limit of {max_streams} streams"),
                retry_after: again,
            },
            Refusal::LimitsUnavailable => ApiError::Busy {
                message: "rate limits cannot be checked right now; try again shortly".into(),
                retry_after: again,
            },
            Refusal::TooManyStreams { max_streams, quota } => ApiError::RateLimited {
                message: format!(
                    "you have {max_streams} streams open, the limit; one must end before another starts"
                ),
                retry_after: again,
                quota: Some(quota),
            },
            Refusal::TooManyReaders { max_readers } => ApiError::RateLimited {
                message: format!(
                    "you are reading {max_readers} stored streams at once, the limit; close one first"
                ),
                retry_after: again,
                quota: None,
            },
            Refusal::StreamReaders { max_readers } => ApiError::RateLimited {
                message: format!(
                    "this stream has {max_readers} readers, the limit; close one first"
                ),
                retry_after: again,
                quota: None,
            },
            Refusal::Requests { rpm, wait, quota } => ApiError::RateLimited {
                message: format!(
                    "rate limit of {rpm} requests per minute reached; try again in {}",
                    duration(wait)
                ),
                retry_after: wait,
                quota: Some(quota),
            },
            Refusal::NeverFits { tokens, tpm } => ApiError::invalid(
                format!(
                    "this request may use {tokens} tokens (prompt and max_tokens), more than the limit of {tpm} tokens per minute; lower max_tokens"
                ),
                Some("max_tokens"),
            ),
            Refusal::Tokens { tpm, wait, quota } => ApiError::RateLimited {
                message: format!(
                    "rate limit of {tpm} tokens per minute reached; try again in {}",
                    duration(wait)
                ),
                retry_after: wait,
                quota: Some(quota),
            },
            Refusal::Budget(exhausted) => ApiError::InsufficientQuota {
                message: exhausted.message(),
                retry_after: exhausted.reset,
            },
        }
    }
}

pub use crate::backend::shown;

/// OpenAI's `x-ratelimit-*` headers for a client's quota.
pub fn rate_headers(quota: &Quota, headers: &mut HeaderMap) {
    let windows = [("requests", quota.requests), ("tokens", quota.tokens)];
    for (what, window) in windows {
        let Some(Window {
            limit,
            remaining,
            reset,
        }) = window
        else {
            continue;
        };
        for (name, value) in [
            ("limit", limit.to_string()),
            ("remaining", remaining.to_string()),
            ("reset", duration(reset)),
        ] {
            let name = HeaderName::try_from(format!("x-ratelimit-{name}-{what}"));
            if let (Ok(name), Ok(value)) = (name, HeaderValue::from_str(&value)) {
                headers.insert(name, value);
            }
        }
    }
    if let Some(left) = quota.budget {
        if let Some(usd) = left.usd {
            let value = HeaderValue::from_str(&format!("{usd:.6}"));
            if let Ok(value) = value {
                headers.insert("x-ratelimit-remaining-budget-usd", value);
            }
        }
        if let Some(tokens) = left.tokens {
            headers.insert(
                "x-ratelimit-remaining-budget-tokens",
                HeaderValue::from(tokens),
            );
        }
    }
}

/// A duration as OpenAI writes it: `120ms`, `1s`, `6m0s`, `1h2m3s`.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64().ceil() as u64;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, detail = ?self, "request failed");
        }
        let retry_after = self.retry_after();
        // `code: message`, or the message alone when it has no code.
        let answered = Answered(match self.code() {
            Some(code) if !code.is_empty() => format!("{code}: {self}"),
            _ => self.to_string(),
        });
        let mut response = (status, axum::Json(self.body())).into_response();
        response.extensions_mut().insert(answered);
        let headers = response.headers_mut();
        if let Some(wait) = retry_after {
            // Rounded up and never 0: a client that waits that long gets in.
            let ms = wait.as_nanos().div_ceil(1_000_000).max(1) as u64;
            headers.insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
            headers.insert("retry-after-ms", HeaderValue::from(ms));
        }
        if let ApiError::RateLimited {
            quota: Some(quota), ..
        } = &self
        {
            rate_headers(quota, headers);
        }
        let limited = match self {
            ApiError::RateLimited { .. } => Some("client"),
            ApiError::Busy { .. } => Some("global"),
            _ => None,
        };
        if let Some(limit) = limited {
            response.extensions_mut().insert(RateLimited(limit));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_openai() {
        assert_eq!(duration(Duration::from_millis(120)), "120ms");
        assert_eq!(duration(Duration::from_millis(1000)), "1s");
        assert_eq!(duration(Duration::from_millis(1200)), "2s");
        assert_eq!(duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
