//! One upstream attempt as operators see it: counted open while it runs, its duration,
//! first chunk and usage recorded when it ends (sluice's series and the GenAI client
//! conventions'), and, with OpenTelemetry, a client span under its request's span whose
//! `traceparent` goes upstream with the request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Histogram;
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, Status};
use opentelemetry_sdk::trace::Span;

use super::otel::{finish_reasons, kv};
use super::{Exchange, GenAi, Metrics, OPERATION};
use crate::backend::{BackendError, ModelRequest, Text, Usage};

/// What an attempt is: where it goes and what it asks.
pub struct Call<'a> {
    /// The model's metric label (a bounded name).
    pub label: &'a str,
    /// `gen_ai.provider.name` of the upstream's API (`openai`, `anthropic`), or `sluice`
    /// for a model sluice runs itself.
    pub provider: &'static str,
    /// The upstream, when it is one (its URL, credentials masked).
    pub server: Option<&'a str>,
    pub request: &'a ModelRequest,
}

/// One open upstream attempt; see [`Metrics::upstream_call`]. Dropping it ends it.
pub struct UpstreamCall {
    metrics: Metrics,
    duration: Histogram,
    genai: Arc<GenAi>,
    started: Instant,
    first_chunk: Option<Duration>,
    usage: Option<Usage>,
    error: Option<String>,
    /// With OpenTelemetry: the span, its metric attributes, and the reply's text when
    /// content is captured.
    span: Option<Box<Traced>>,
}

struct Traced {
    span: Span,
    attrs: Vec<KeyValue>,
    reply: Option<String>,
    finish: Option<String>,
}

impl Metrics {
    /// Counts a backend call open until the returned guard drops, then records it. With
    /// OpenTelemetry, the call is a client span under `exchange`'s.
    pub fn upstream_call(&self, call: Call<'_>, exchange: &Exchange) -> UpstreamCall {
        self.0.upstream_in_flight.increment(1.0);
        let span = self.otel().zip(exchange.span()).map(|(otel, parent)| {
            let model = &call.request.model;
            let name = format!("{OPERATION} {model}");
            let mut span = otel.client_span(name, parent, call.server.is_none());
            let attrs = vec![
                kv("gen_ai.operation.name", OPERATION),
                kv("gen_ai.provider.name", call.provider),
                kv("gen_ai.request.model", call.label.to_owned()),
            ];
            span.set_attributes([
                kv("gen_ai.operation.name", OPERATION),
                kv("gen_ai.provider.name", call.provider),
                kv("gen_ai.request.model", model.clone()),
                // The name the target was asked for is the one that answers.
                kv("gen_ai.response.model", model.clone()),
            ]);
            span.set_attribute(kv("gen_ai.request.stream", true));
            if let Some(n) = call.request.max_tokens {
                span.set_attribute(kv("gen_ai.request.max_tokens", i64::from(n)));
            }
            if let Some(t) = call.request.temperature {
                span.set_attribute(kv("gen_ai.request.temperature", f64::from(t)));
            }
            if let Some((host, port)) = call.server.and_then(host_port) {
                span.set_attribute(kv("server.address", host));
                span.set_attribute(kv("server.port", port));
            }
            if otel.capture_content {
                span.set_attribute(kv("gen_ai.input.messages", messages(call.request)));
            }
            Box::new(Traced {
                span,
                attrs,
                reply: otel.capture_content.then(String::new),
                finish: None,
            })
        });
        UpstreamCall {
            metrics: self.clone(),
            duration: self.model(call.label).upstream_duration.clone(),
            genai: self.genai(call.provider, call.label),
            started: Instant::now(),
            first_chunk: None,
            usage: None,
            error: None,
            span,
        }
    }
}

impl UpstreamCall {
    /// `traceparent` and `tracestate` for the upstream request: this attempt's span.
    pub fn trace_headers(&self) -> Vec<(&'static str, String)> {
        match (self.metrics.otel(), &self.span) {
            (Some(otel), Some(traced)) => otel.headers_for(&traced.span),
            _ => Vec::new(),
        }
    }

    /// The first chunk came.
    pub fn first_chunk(&mut self) {
        self.first_chunk.get_or_insert(self.started.elapsed());
    }

    pub fn usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
    }

    /// The reply's text, kept only when content is captured.
    pub fn text(&mut self, text: &Text) {
        if let Some(reply) = self.span.as_mut().and_then(|t| t.reply.as_mut()) {
            text.push_to(reply);
        }
    }

    pub fn finished(&mut self, reason: &str) {
        if let Some(traced) = &mut self.span {
            traced.finish = Some(reason.to_owned());
        }
    }

    /// The attempt failed: `error.type` is the upstream's status, or the failure's kind.
    pub fn failed(&mut self, error: &BackendError) {
        self.error = Some(error_type(error));
        if let Some(traced) = &mut self.span {
            traced.span.set_status(Status::error(error.to_string()));
        }
    }
}

/// `error.type` of a failed attempt: its HTTP status when the upstream answered one.
fn error_type(error: &BackendError) -> String {
    match error {
        BackendError::Rejected { status, .. } => status.to_string(),
        BackendError::RateLimited { .. } => "429".into(),
        BackendError::Unreachable(_) => "unreachable".into(),
        BackendError::Unanswered(_) => "unanswered".into(),
        BackendError::Interrupted(_) => "interrupted".into(),
        BackendError::Protocol(_) => "protocol".into(),
        BackendError::Timeout(_) => "timeout".into(),
        BackendError::Overloaded { .. } => "overloaded".into(),
        BackendError::TooLarge(_) => "too_large".into(),
        BackendError::ShuttingDown => "server_restarting".into(),
        BackendError::BudgetSpent { .. } => "insufficient_quota".into(),
        BackendError::KeyRevoked => "key_revoked".into(),
    }
}

impl Drop for UpstreamCall {
    fn drop(&mut self) {
        self.metrics.0.upstream_in_flight.decrement(1.0);
        let duration = self.started.elapsed().as_secs_f64();
        self.duration.record(duration);
        let usage = self.usage.unwrap_or_default();
        if self.error.is_none() {
            self.genai.client_duration.record(duration);
        }
        if let Some(first) = self.first_chunk {
            self.genai.client_first_chunk.record(first.as_secs_f64());
        }
        self.genai
            .input_tokens
            .increment(u64::from(usage.prompt_tokens));
        self.genai
            .output_tokens
            .increment(u64::from(usage.completion_tokens));
        if let Some(error) = &self.error {
            self.metrics
                .error_histogram(
                    "gen_ai_client_inference_duration_seconds",
                    &self.genai,
                    error,
                )
                .record(duration);
        }
        let (Some(otel), Some(traced)) = (self.metrics.otel(), self.span.take()) else {
            return;
        };
        let Traced {
            mut span,
            mut attrs,
            reply,
            finish,
        } = *traced;
        if let Some(first) = self.first_chunk {
            let first = first.as_secs_f64();
            span.set_attribute(kv("gen_ai.response.time_to_first_chunk", first));
            otel.client_first_chunk.record(first, &attrs);
        }
        if let Some(u) = self.usage {
            span.set_attribute(kv("gen_ai.usage.input_tokens", i64::from(u.prompt_tokens)));
            span.set_attribute(kv(
                "gen_ai.usage.output_tokens",
                i64::from(u.completion_tokens),
            ));
        }
        if let Some(finish) = &finish {
            span.set_attribute(finish_reasons(finish));
        }
        if let Some(reply) = reply {
            span.set_attribute(kv(
                "gen_ai.output.messages",
                output(&reply, finish.as_deref()),
            ));
        }
        let modality = if self.usage.is_some() {
            "text"
        } else {
            "unknown"
        };
        let mut tokens = attrs.clone();
        tokens.push(kv("gen_ai.token.modality", modality));
        otel.input_tokens
            .add(u64::from(usage.prompt_tokens), &tokens);
        otel.output_tokens
            .add(u64::from(usage.completion_tokens), &tokens);
        if let Some(error) = self.error.take() {
            span.set_attribute(kv("error.type", error.clone()));
            attrs.push(kv("error.type", error));
        }
        otel.client_duration.record(duration, &attrs);
        span.end();
    }
}

/// `host` and `port` of an upstream URL.
fn host_port(url: &str) -> Option<(String, i64)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    let default = if scheme == "https" { 443 } else { 80 };
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            let port = port.parse().ok().unwrap_or(default);
            Some((host.trim_matches(['[', ']']).to_owned(), port))
        }
        _ => Some((authority.to_owned(), default)),
    }
}

/// `gen_ai.input.messages` in the conventions' shape: role and text parts.
fn messages(request: &ModelRequest) -> String {
    let messages: Vec<_> = request
        .messages
        .iter()
        .map(|m| {
            serde_json::json!({
                "role": m.role,
                "parts": [{"type": "text", "content": m.content}],
            })
        })
        .collect();
    serde_json::Value::Array(messages).to_string()
}

/// `gen_ai.output.messages`: the reply's text.
fn output(text: &str, finish: Option<&str>) -> String {
    serde_json::json!([{
        "role": "assistant",
        "parts": [{"type": "text", "content": text}],
        "finish_reason": finish.unwrap_or("error"),
    }])
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_s_host_and_port() {
        assert_eq!(
            host_port("http://127.0.0.1:8000/v1"),
            Some(("127.0.0.1".into(), 8000))
        );
        assert_eq!(
            host_port("https://api.openai.com/v1"),
            Some(("api.openai.com".into(), 443))
        );
        assert_eq!(host_port("http://***@[::1]:9/v1"), Some(("::1".into(), 9)));
    }
}
