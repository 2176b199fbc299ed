//! An OpenAI-compatible upstream (OpenAI, vLLM, Ollama, llama.cpp server...) through
//! async-openai, with the client's request fields passed through.
//!
//! async-openai's default executor retries 429, 5xx and connect errors by itself; a gateway
//! must not retry behind its client's back, so sluice installs its own HTTP service: one
//! request, and an error status turned into [`UpstreamStatus`] with its `Retry-After` kept.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::{HttpRequestFactory, ReqwestService};
use futures::StreamExt;
use serde_json::{Map, Value, json};

use super::{Backend, BackendError, ChatRequest, Delta, DeltaStream, Usage};

/// An upstream's error answer, as the HTTP layer saw it.
#[derive(Debug, thiserror::Error)]
#[error("upstream answered {status}: {message}")]
struct UpstreamStatus {
    status: u16,
    retry_after: Option<Duration>,
    message: String,
    param: Option<String>,
    code: Option<String>,
}

/// The HTTP service async-openai calls: plain reqwest, no retry, error answers kept whole.
#[derive(Clone)]
struct NoRetry(ReqwestService);

impl tower::Service<HttpRequestFactory> for NoRetry {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), OpenAIError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequestFactory) -> Self::Future {
        let sent = self.0.call(request);
        Box::pin(async move {
            let response = sent.await?;
            if response.status().is_success() {
                return Ok(response);
            }
            Err(OpenAIError::Boxed(Box::new(read_error(response).await)))
        })
    }
}

async fn read_error(response: reqwest::Response) -> UpstreamStatus {
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    let body = response.bytes().await.unwrap_or_default();
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
    UpstreamStatus {
        status,
        retry_after,
        message,
        param: field("param"),
        code: field("code"),
    }
}

/// `retry-after-ms` (OpenAI's), else `Retry-After` in seconds.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    if let Some(ms) = number("retry-after-ms").filter(|ms| *ms >= 0.0) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    number("retry-after")
        .filter(|s| *s >= 0.0)
        .map(Duration::from_secs_f64)
}

pub struct OpenAiBackend {
    client: async_openai::Client<OpenAIConfig>,
    /// Also send `max_tokens` when the client set only `max_completion_tokens`: servers
    /// such as llama-cpp-python ignore the newer name. OpenAI itself rejects the old one
    /// for some models, so not there.
    copy_max_tokens: bool,
}

impl OpenAiBackend {
    pub fn new(
        base_url: &str,
        api_key: Option<&str>,
        connect_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()?;
        let config = OpenAIConfig::new()
            .with_api_base(base_url.trim_end_matches('/'))
            .with_api_key(api_key.unwrap_or_default());
        let client = async_openai::Client::build(http.clone(), config)
            .with_http_service(NoRetry(ReqwestService::new(http)));
        Ok(OpenAiBackend {
            client,
            copy_max_tokens: !base_url.contains("api.openai.com"),
        })
    }

    /// The client's body with the upstream's model name, always streamed, always with usage.
    fn upstream_body(&self, request: ChatRequest) -> Map<String, Value> {
        let mut body = request.body;
        body.insert("model".into(), Value::String(request.model));
        body.insert("stream".into(), Value::Bool(true));
        let options = body.entry("stream_options").or_insert_with(|| json!({}));
        if let Value::Object(options) = options {
            options.insert("include_usage".into(), Value::Bool(true));
        } else {
            *options = json!({"include_usage": true});
        }
        if self.copy_max_tokens
            && !body.contains_key("max_tokens")
            && let Some(n) = body.get("max_completion_tokens").cloned()
        {
            body.insert("max_tokens".into(), n);
        }
        body
    }
}

impl Backend for OpenAiBackend {
    fn stream(&self, request: ChatRequest) -> DeltaStream {
        let client = self.client.clone();
        let body = self.upstream_body(request);
        Box::pin(async_stream::stream! {
            let mut upstream = match client
                .chat()
                .create_stream_byot::<_, Value>(Value::Object(body))
                .await
            {
                Ok(upstream) => upstream,
                Err(e) => {
                    yield Err(request_error(e));
                    return;
                }
            };
            while let Some(item) = upstream.next().await {
                let chunk = match item {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        yield Err(stream_error(e));
                        return;
                    }
                };
                match deltas(chunk) {
                    Ok(deltas) => {
                        for delta in deltas {
                            yield Ok(delta);
                        }
                    }
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                }
            }
            // async-openai ends the same way on `[DONE]` and on a bare end of stream; the
            // relay treats a reply without a finish_reason as broken off.
        })
    }
}

/// The deltas of one upstream chunk, or the error it carries in band.
fn deltas(mut chunk: Value) -> Result<Vec<Delta>, BackendError> {
    if let Some(error) = chunk.get("error") {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("the upstream reported an error mid-stream");
        return Err(BackendError::Interrupted(message.to_owned()));
    }
    let mut out = Vec::with_capacity(1);
    let choice = chunk
        .get_mut("choices")
        .and_then(Value::as_array_mut)
        .and_then(|choices| choices.first_mut());
    if let Some(choice) = choice {
        if let Some(Value::Object(mut delta)) = choice.get_mut("delta").map(Value::take) {
            delta.remove("role");
            if let Some(Value::String(text)) = delta.remove("content")
                && !text.is_empty()
            {
                out.push(Delta::Text(text));
            }
            delta.retain(|_, v| !v.is_null());
            if !delta.is_empty() {
                out.push(Delta::Fields(delta));
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            out.push(Delta::Finish(reason.to_owned()));
        }
    } else if chunk.get("choices").is_none() && chunk.get("usage").is_none() {
        return Err(BackendError::Protocol(
            "a chunk with neither choices nor usage".into(),
        ));
    }
    if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
        let count = |name| usage.get(name).and_then(Value::as_u64).unwrap_or(0) as u32;
        out.push(Delta::Usage(Usage::new(
            count("prompt_tokens"),
            count("completion_tokens"),
        )));
    }
    Ok(out)
}

/// An error before the stream started: the upstream's answer, or why there was none.
fn request_error(error: OpenAIError) -> BackendError {
    match error {
        OpenAIError::Boxed(boxed) => match boxed.downcast::<UpstreamStatus>() {
            Ok(status) if status.status == 429 => BackendError::RateLimited {
                message: status.message,
                retry_after: status.retry_after,
            },
            Ok(status) => BackendError::Rejected {
                status: status.status,
                message: status.message,
                param: status.param,
                code: status.code,
            },
            Err(other) => BackendError::Unreachable(other.to_string()),
        },
        OpenAIError::Reqwest(e) if e.is_timeout() => BackendError::Timeout("connection"),
        OpenAIError::Reqwest(e) => BackendError::Unreachable(without_url(&e)),
        other => BackendError::Unreachable(other.to_string()),
    }
}

/// An error once the stream runs.
fn stream_error(error: OpenAIError) -> BackendError {
    match error {
        OpenAIError::JSONDeserialize(e, _) => {
            BackendError::Protocol(format!("a chunk that is not JSON ({e})"))
        }
        OpenAIError::StreamError(e) => BackendError::Interrupted(format!("connection lost: {e}")),
        other => BackendError::Interrupted(other.to_string()),
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
mod tests {
    use super::*;

    #[test]
    fn a_chunk_yields_text_fields_finish_and_usage() {
        let chunk = json!({"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi",
            "tool_calls":[{"index":0,"id":"c1"}],"refusal":null},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}});
        let out = deltas(chunk).expect("a valid chunk");
        assert_eq!(out[0], Delta::Text("Hi".into()));
        assert!(
            matches!(&out[1], Delta::Fields(f) if f.contains_key("tool_calls") && f.len() == 1)
        );
        assert_eq!(out[2], Delta::Finish("stop".into()));
        assert_eq!(out[3], Delta::Usage(Usage::new(3, 1)));
    }

    #[test]
    fn an_error_object_in_band_is_an_error() {
        let chunk = json!({"error":{"message":"overloaded"}});
        assert!(matches!(deltas(chunk), Err(BackendError::Interrupted(m)) if m == "overloaded"));
    }
}
