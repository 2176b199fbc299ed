//! An OpenAI-compatible upstream (OpenAI, vLLM, Ollama, llama.cpp server...): the client's
//! request fields passed through, the reply read as it arrives.
//!
//! One HTTP request per call, never retried here (fallbacks are the relay's, and only
//! before the first byte; the one exception is a kept connection found closed before any
//! answer, see [`h1`]), no redirect followed (it would carry the prompt, and the key,
//! elsewhere). A plain-HTTP upstream is read in the stream's own task ([`h1`]); any other
//! through reqwest. The event stream is parsed straight off the body, pulled only as fast
//! as the client reads: a slow client pauses the upstream through TCP instead of filling a
//! buffer, and dropping the stream closes the upstream connection. What an upstream sends
//! is read within caps: an error body, a line, an event.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::h1;
use super::sse::{self, StreamError};
use super::{Backend, BackendError, DeltaStream, ModelRequest};

/// How long sluice waits, after `[DONE]`, for the response body to end.
const BODY_END: Duration = Duration::from_millis(100);
/// How long a readiness probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How much of an error answer's body sluice reads.
const ERROR_BODY_BYTES: usize = 64 * 1024;
/// How much of a model list sluice reads, and how many names it keeps.
const CATALOGUE_BYTES: usize = 4 * 1024 * 1024;
const CATALOGUE_MODELS: usize = 10_000;

pub struct OpenAiBackend {
    http: reqwest::Client,
    /// A plain-HTTP upstream's connections, read in the stream's own task (see [`h1`]);
    /// `None` for any other (TLS, a proxy, credentials in the URL), which reqwest calls.
    direct: Option<Arc<h1::Connections>>,
    base_url: String,
    /// `base_url` with any credentials in it masked: for logs and `/readyz`.
    shown_url: String,
    endpoint: String,
    /// `endpoint`'s path and query, as an HTTP/1.1 request names it.
    target: String,
    /// The header that carries the key, as the API wants it.
    key: Option<(HeaderName, HeaderValue)>,
    /// The API the upstream is called with (`api` in its route): the request's shape and
    /// how its reply is read.
    speaker: Arc<dyn Speaker>,
}

pub use super::speaker::Api;
use super::speaker::Speaker;

impl OpenAiBackend {
    pub fn new(
        base_url: &str,
        api_key: Option<&str>,
        connect_timeout: Duration,
        speaker: Arc<dyn Speaker>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let base_url = base_url.trim_end_matches('/').to_owned();
        let key =
            match api_key.filter(|k| !k.is_empty()) {
                Some(key) => Some(speaker.key(key).ok_or_else(|| {
                    anyhow::anyhow!("the API key holds characters a header cannot")
                })?),
                None => None,
            };
        let endpoint = format!("{base_url}{}", speaker.path());
        Ok(OpenAiBackend {
            http,
            direct: h1::Connections::for_url(&base_url, connect_timeout),
            target: target(&endpoint),
            endpoint,
            shown_url: masked_url(&base_url),
            base_url,
            key,
            speaker,
        })
    }
}

impl Backend for OpenAiBackend {
    fn stream(&self, request: ModelRequest) -> DeltaStream {
        let request_id = request.request_id.clone();
        // An upstream of another API relays its events to a client of that same API, and
        // is read into the pivot's events for any other.
        let native = request.relayed;
        let mut headers = vec![(CONTENT_TYPE, HeaderValue::from_static("application/json"))];
        let mut header = |name: &'static str, value: &str| {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.push((HeaderName::from_static(name), value));
            }
        };
        header("x-request-id", &request_id);
        for (name, value) in &request.trace {
            header(name, value);
        }
        let body = self.speaker.body(request, &mut headers);
        headers.extend(self.key.clone());
        let call = match &self.direct {
            Some(pool) => Sending::Direct(
                pool.clone(),
                pool.request(&self.target, &headers, body.as_bytes()),
            ),
            None => {
                let mut call = self.http.post(&self.endpoint).body(body);
                for (name, value) in headers {
                    call = call.header(name, value);
                }
                Sending::Reqwest(Box::new(call))
            }
        };
        let mut reader = self.speaker.reader(native);
        Box::pin(async_stream::stream! {
            let answer = match call.send().await {
                Ok(answer) => answer,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            if !(200..300).contains(&answer.status) {
                yield Err(read_error(answer).await);
                return;
            }
            let mut events = std::pin::pin!(sse::data(answer.body));
            // A chunk's deltas, in one buffer kept for the whole stream.
            let mut ready = Vec::with_capacity(4);
            while let Some(event) = events.next().await {
                let data = match event {
                    Ok(data) => data,
                    Err(StreamError::Transport(e)) => {
                        yield Err(BackendError::Interrupted(format!("connection lost: {e}")));
                        return;
                    }
                    Err(StreamError::Parse(e)) => {
                        yield Err(BackendError::Protocol(format!("not a usable event stream ({e})")));
                        return;
                    }
                };
                match reader.event(&data, &mut ready) {
                    Ok(ended) => {
                        for delta in ready.drain(..) {
                            yield Ok(delta);
                        }
                        if ended {
                            // Read on to the body's end, which is right behind: a response
                            // read to its end gives its connection back to the pool for the
                            // next request.
                            let _ = tokio::time::timeout(BODY_END, events.next()).await;
                            return;
                        }
                    }
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                }
            }
            // A bare end of stream: the relay treats a reply without a finish_reason as
            // broken off.
        })
    }

    fn speaks(&self) -> Api {
        self.speaker.api()
    }

    fn carried(&self) -> &'static [&'static str] {
        self.speaker.carried()
    }

    fn upstream(&self) -> Option<&str> {
        Some(&self.shown_url)
    }

    fn models(&self) -> Option<futures::future::BoxFuture<'_, Result<Vec<String>, String>>> {
        Some(Box::pin(self.list_models()))
    }

    fn probe(&self) -> Option<futures::future::BoxFuture<'static, super::Probe>> {
        let call = self
            .http
            .get(format!("{}/models", self.base_url))
            .timeout(PROBE_TIMEOUT);
        let url = self.shown_url.clone();
        Some(Box::pin(async move {
            let started = std::time::Instant::now();
            // Any HTTP answer, even 401, means the upstream is there.
            match call.send().await {
                Ok(response) => super::Probe {
                    url,
                    reachable: true,
                    status: Some(response.status().as_u16()),
                    latency_ms: Some(started.elapsed().as_millis() as u64),
                    error: None,
                },
                Err(e) => super::Probe {
                    url,
                    reachable: false,
                    status: None,
                    latency_ms: None,
                    error: Some(if e.is_timeout() {
                        format!("no answer within {} s", PROBE_TIMEOUT.as_secs())
                    } else {
                        "cannot connect".to_owned()
                    }),
                },
            }
        }))
    }
}

impl OpenAiBackend {
    /// The upstream's model list (`GET {base}/models`), read within a cap.
    async fn list_models(&self) -> Result<Vec<String>, String> {
        let mut call = self
            .http
            .get(format!("{}/models", self.base_url))
            .timeout(Duration::from_secs(5));
        if let Some((name, value)) = &self.key {
            call = call.header(name, value);
        }
        let response = call.send().await.map_err(|e| without_url(&e))?;
        if !response.status().is_success() {
            return Err(format!(
                "the upstream answered {}",
                response.status().as_u16()
            ));
        }
        let body = read_capped(response.bytes_stream(), CATALOGUE_BYTES).await;
        let list: Value =
            serde_json::from_slice(&body).map_err(|e| format!("not a model list: {e}"))?;
        let names = list["data"]
            .as_array()
            .ok_or("not a model list: no `data`")?
            .iter()
            .filter_map(|m| m["id"].as_str())
            .filter(|id| !id.is_empty() && id.len() <= crate::backend::MAX_MODEL_NAME)
            .take(CATALOGUE_MODELS)
            .map(str::to_owned)
            .collect();
        Ok(names)
    }
}

/// One upstream call, made ready before its stream runs.
enum Sending {
    /// Through reqwest's pool: TLS, proxies, credentials in the URL.
    Reqwest(Box<reqwest::RequestBuilder>),
    /// To a plain-HTTP upstream, on a connection read in the stream's own task.
    Direct(Arc<h1::Connections>, Bytes),
}

/// An upstream's answer: its status and headers, and its body as it arrives.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>,
}

impl Sending {
    async fn send(self) -> Result<Answer, BackendError> {
        match self {
            Sending::Reqwest(call) => {
                let response = (*call).send().await.map_err(|e| request_error(&e))?;
                Ok(Answer {
                    status: response.status().as_u16(),
                    headers: response.headers().clone(),
                    body: Box::pin(
                        response
                            .bytes_stream()
                            .map(|r| r.map_err(|e| without_url(&e))),
                    ),
                })
            }
            Sending::Direct(pool, request) => match pool.send(&request).await {
                Ok(answer) => {
                    let (status, headers, body) = answer.into_parts();
                    Ok(Answer {
                        status,
                        headers,
                        body: Box::pin(body),
                    })
                }
                Err(h1::Failure::ConnectTimeout) => {
                    Err(BackendError::Timeout(super::Wait::Connect))
                }
                Err(h1::Failure::Connect(e)) => Err(BackendError::Unreachable(format!(
                    "cannot connect to the upstream: {e}"
                ))),
                Err(h1::Failure::Request(e)) => Err(BackendError::Unanswered(format!(
                    "the upstream request failed: {e}"
                ))),
            },
        }
    }
}

/// A URL's path and query: what an HTTP/1.1 request line names.
fn target(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        },
        Err(_) => "/".to_owned(),
    }
}

/// At most `cap` bytes of a response's body; the rest is left unread (the connection goes).
async fn read_capped<E>(
    mut chunks: impl Stream<Item = Result<Bytes, E>> + Unpin,
    cap: usize,
) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(Ok(chunk)) = chunks.next().await {
        let room = cap - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= cap {
            break;
        }
    }
    body
}

/// A URL with its user and password, and its query, masked: for logs and `/readyz`.
pub fn masked_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if !parsed.username().is_empty() || parsed.password().is_some() {
                let _ = parsed.set_username("***");
                let _ = parsed.set_password(None);
            }
            if parsed.query().is_some() {
                parsed.set_query(Some("***"));
            }
            parsed.to_string().trim_end_matches('/').to_owned()
        }
        Err(_) => "(an unparsable URL)".to_owned(),
    }
}

/// An upstream's error answer: its status, message and `Retry-After`.
async fn read_error(answer: Answer) -> BackendError {
    let status = answer.status;
    let retry_after = retry_after(&answer.headers);
    let body = read_capped(answer.body, ERROR_BODY_BYTES).await;
    if status >= 300 && !(400..500).contains(&status) {
        // Only sluice's log sees what a failing upstream said: tracebacks, host names.
        let text = String::from_utf8_lossy(&body);
        tracing::warn!(status, body = %text.chars().take(2000).collect::<String>(), "upstream failure");
    }
    let error = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|mut v| v.get_mut("error").map(Value::take));
    let field = |name: &str| {
        error
            .as_ref()
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let message = field("message").unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&body);
        let text = text.trim();
        if text.is_empty() {
            format!("HTTP {status}")
        } else {
            text.chars().take(500).collect()
        }
    });
    if status == 429 {
        return BackendError::RateLimited {
            message,
            retry_after,
        };
    }
    BackendError::Rejected {
        status,
        message,
        param: field("param"),
        code: field("code"),
    }
}

/// `retry-after-ms` (OpenAI's), else `Retry-After` in seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    if let Some(ms) = number("retry-after-ms").filter(|ms| *ms >= 0.0) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    number("retry-after")
        .filter(|s| *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Why no answer came: the connect limit, or no connection at all.
fn request_error(e: &reqwest::Error) -> BackendError {
    if e.is_timeout() {
        BackendError::Timeout(super::Wait::Connect)
    } else if e.is_connect() {
        BackendError::Unreachable(without_url(e))
    } else {
        BackendError::Unanswered(without_url(e))
    }
}

/// reqwest's message names the URL, which may carry credentials in its query.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "cannot connect to the upstream"
    } else {
        "the upstream request failed"
    };
    match std::error::Error::source(e) {
        Some(source) => format!("{kind}: {source}"),
        None => kind.to_owned(),
    }
}

#[cfg(test)]
mod masking {
    use super::masked_url;

    #[test]
    fn credentials_in_a_url_are_masked() {
        assert_eq!(
            masked_url("http://user:password@host:8000/v1"),
            "http://***@host:8000/v1"
        );
        assert_eq!(
            masked_url("https://host/v1?api-key=secret"),
            "https://host/v1?***"
        );
        assert_eq!(masked_url("http://127.0.0.1:9/v1"), "http://127.0.0.1:9/v1");
    }
}
