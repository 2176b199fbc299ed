//! One request as its log line and, with OpenTelemetry, its server span tell it: made when
//! the request arrives, filled in by the handler and the stream, written (the span ended)
//! when the last of them lets go.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, Status, TraceContextExt as _};

use super::otel::{finish_reasons, kv};
use super::{OPERATION, Outcome};
use crate::backend::{BackendError, Usage};

/// One request as the log line at its end tells it. The middleware makes it, the handler
/// and the stream fill it in, and the last of them to let go writes the line.
#[derive(Clone)]
pub struct Exchange(Arc<ExchangeInner>);

struct ExchangeInner {
    arrived: Instant,
    /// The same moment on the wall clock, for the ledger.
    wall: SystemTime,
    request_id: String,
    method: String,
    path: String,
    /// The server span, with OpenTelemetry (and never for health and metrics requests).
    span: Option<Context>,
    record: Mutex<Record>,
}

#[derive(Default)]
struct Record {
    route: Option<String>,
    status: Option<u16>,
    key: Option<Arc<str>>,
    /// Whether `key` is a key's name (else the client's address: sluice has no keys).
    keyed: bool,
    /// The key's team, when it has one.
    team: Option<Arc<str>>,
    model: Option<String>,
    /// The target that served the request (the last one tried), and its name for the model.
    target: Option<Arc<str>>,
    served: Option<String>,
    /// What the request cost, when its model has a price.
    cost: Option<f64>,
    /// The model's metric label, once admitted.
    label: Option<String>,
    outcome: Option<Outcome>,
    ttft: Option<Duration>,
    usage: Option<Usage>,
    fallbacks: u32,
    error: Option<String>,
    /// The id of the stream the request started, or of the stored one it read or stopped.
    stream: Option<String>,
    /// A chat request: `gen_ai.provider.name` of the API the client speaks, and whether
    /// it asked for a stream.
    chat: Option<(&'static str, bool)>,
    max_tokens: Option<u32>,
    finish: Option<String>,
    /// How long admission took (limits, Redis, a pool's queue).
    admission: Option<Duration>,
    /// A reader of a stream produced by another request (whose span it links to).
    resumed: bool,
}

impl Exchange {
    /// A request that has just arrived, with its server span when it is traced.
    pub fn new(request_id: String, method: String, path: String, span: Option<Context>) -> Self {
        Exchange(Arc::new(ExchangeInner {
            arrived: Instant::now(),
            wall: SystemTime::now(),
            request_id,
            method,
            path,
            span,
            record: Mutex::new(Record::default()),
        }))
    }

    /// The server span's context: the parent of the request's upstream attempts.
    pub fn span(&self) -> Option<&Context> {
        self.0.span.as_ref()
    }

    /// The server span's identity, for a stream that later readers link to.
    pub fn span_context(&self) -> Option<SpanContext> {
        self.span().map(|cx| cx.span().span_context().clone())
    }

    /// `trace_id` and `span_id` of the server span, for log lines.
    pub fn trace_ids(&self) -> Option<(String, String)> {
        self.span().and_then(ids)
    }

    /// A chat request in an API of `provider`, streamed or not.
    pub fn set_chat(&self, provider: &'static str, stream: bool) {
        self.record().chat = Some((provider, stream));
    }

    /// `gen_ai.provider.name` of the API the client speaks (`sluice` until it is known).
    pub fn provider(&self) -> &'static str {
        self.record()
            .chat
            .map_or("sluice", |(provider, _)| provider)
    }

    pub fn set_max_tokens(&self, max_tokens: Option<u32>) {
        self.record().max_tokens = max_tokens;
    }

    /// Admission (limits, then a pool's queue) took `wait` more.
    pub fn admitted(&self, wait: Duration) {
        let mut record = self.record();
        record.admission = Some(record.admission.unwrap_or_default() + wait);
    }

    /// The reply's finish reason.
    pub fn set_finish(&self, reason: &str) {
        self.record().finish = Some(reason.to_owned());
    }

    /// This request reads a stream that `producer`'s request started: its span links there.
    pub fn resumed(&self, producer: Option<SpanContext>) {
        self.record().resumed = true;
        if let (Some(cx), Some(producer)) = (self.span(), producer) {
            cx.span().add_link(producer, Vec::new());
        }
    }

    /// The answer's status is known: returns the route's name and the model's label.
    pub fn responded(&self, status: u16) -> (String, String) {
        let mut record = self.record();
        record.status = Some(status);
        (
            record.route.clone().unwrap_or_else(|| "unmatched".into()),
            record.label.clone().unwrap_or_default(),
        )
    }

    /// The route the request matched.
    pub fn set_route(&self, route: &str) {
        self.record().route = Some(route.to_owned());
    }

    pub fn arrived(&self) -> Instant {
        self.0.arrived
    }

    pub fn request_id(&self) -> &str {
        &self.0.request_id
    }

    fn record(&self) -> MutexGuard<'_, Record> {
        self.0.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client's key name (or address, when `keyed` is false), once identified.
    pub fn set_key(&self, key: Arc<str>, keyed: bool, team: Option<&str>) {
        let mut record = self.record();
        record.key = Some(key);
        record.keyed = keyed;
        record.team = team.map(Arc::from);
    }

    /// The client as a metric labels it: its key's name, or `open` (addresses are not a
    /// bounded set).
    pub fn key_label(&self) -> Arc<str> {
        let record = self.record();
        match &record.key {
            Some(key) if record.keyed => key.clone(),
            _ => Arc::from("open"),
        }
    }

    /// An attempt went to `target`, which knows the model as `served`.
    pub fn set_target(&self, target: Arc<str>, served: &str) {
        let mut record = self.record();
        record.target = Some(target);
        if record.served.as_deref() != Some(served) {
            record.served = Some(served.to_owned());
        }
    }

    /// The model asked for, once it is known to route somewhere.
    pub fn set_model(&self, model: &str) {
        self.record().model = Some(model.to_owned());
    }

    /// The model's metric label: set once the request is admitted.
    pub fn set_label(&self, label: String) {
        self.record().label = Some(label);
    }

    pub fn fell_back(&self, error: &BackendError) {
        let mut record = self.record();
        record.fallbacks += 1;
        record.error = Some(error.to_string());
    }

    /// How the chat stream ended, and what it cost.
    pub fn ended(&self, outcome: Outcome, ttft: Option<Duration>, usage: Usage, cost: Option<f64>) {
        let mut record = self.record();
        record.outcome = Some(outcome);
        record.ttft = ttft;
        record.usage = Some(usage);
        record.cost = cost;
    }

    /// The ledger's record of the request as it stands: who, where, which model, how it
    /// ended (after [`Exchange::ended`]); the tokens are the meter's to fill in.
    pub fn ledger_record(&self) -> crate::ledger::Record {
        let r = self.record();
        let at_us = self
            .0
            .wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        crate::ledger::Record {
            request_id: self.0.request_id.clone(),
            at_us,
            key: r.key.as_deref().unwrap_or("unknown").to_owned(),
            team: r.team.as_deref().map(str::to_owned),
            route: r.route.clone().unwrap_or_else(|| self.0.path.clone()),
            model: r.model.clone().unwrap_or_default(),
            served_model: r.served.clone(),
            target: r.target.as_deref().map(str::to_owned),
            api: r.chat.map_or("sluice", |(provider, _)| provider).to_owned(),
            stream_id: r.stream.clone(),
            outcome: r.outcome.unwrap_or(Outcome::Cancelled).as_str().to_owned(),
            error: r.error.as_deref().map(|e| e.chars().take(512).collect()),
            cost_usd: r.cost,
            ttft_ms: r.ttft.map(|d| d.as_secs_f64() * 1000.0),
            duration_ms: self.0.arrived.elapsed().as_secs_f64() * 1000.0,
            trace_id: self.span().and_then(ids).map(|(trace, _)| trace),
            ..Default::default()
        }
    }

    /// The stream the request started, or the stored one it read or stopped: logged only
    /// once it was the client's (the path is logged as its route, so an id never appears
    /// before that).
    pub fn set_stream(&self, id: &str) {
        self.record().stream = Some(id.to_owned());
    }

    /// The error a client was answered with (`code: message`), unless a backend's failure
    /// is already recorded.
    pub fn answered(&self, error: &str) {
        self.record().error.get_or_insert_with(|| error.to_owned());
    }

    pub fn failed(&self, error: &BackendError) {
        self.record().error = Some(error.to_string());
    }
}

impl Drop for ExchangeInner {
    fn drop(&mut self) {
        let r = self.record.get_mut().unwrap_or_else(|e| e.into_inner());
        let quiet = matches!(self.path.as_str(), "/healthz" | "/readyz" | "/metrics");
        let usage = r.usage.unwrap_or_default();
        // The route as it is written (`/v1/responses/{id}`), not the path the client sent.
        let path = r.route.as_deref().unwrap_or(&self.path);
        let ids = self.span.as_ref().and_then(ids);
        let (trace_id, span_id) = match &ids {
            Some((trace, span)) => (Some(trace.as_str()), Some(span.as_str())),
            None => (None, None),
        };
        macro_rules! line {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    request_id = %self.request_id,
                    trace_id,
                    span_id,
                    method = %self.method,
                    path = %path,
                    stream = r.stream.as_deref(),
                    status = r.status,
                    key = r.key.as_deref(),
                    model = r.model.as_deref(),
                    outcome = r.outcome.map(Outcome::as_str),
                    ttft_ms = r.ttft.map(|d| d.as_secs_f64() * 1000.0),
                    prompt_tokens = r.usage.map(|_| usage.prompt_tokens),
                    completion_tokens = r.usage.map(|_| usage.completion_tokens),
                    cost_usd = r.cost,
                    fallbacks = r.fallbacks,
                    error = r.error.as_deref(),
                    duration_ms = self.arrived.elapsed().as_secs_f64() * 1000.0,
                    "request"
                )
            };
        }
        if quiet {
            line!(tracing::Level::DEBUG);
        } else {
            line!(tracing::Level::INFO);
        }
        if let Some(cx) = &self.span {
            end_span(cx, &self.method, path, r);
        }
    }
}

/// `trace_id` and `span_id` of a valid span.
fn ids(cx: &Context) -> Option<(String, String)> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// The server span's attributes, from the record, and its end.
fn end_span(cx: &Context, method: &str, route: &str, r: &Record) {
    let span = cx.span();
    if !span.is_recording() {
        return;
    }
    span.set_attributes([
        kv("http.request.method", method.to_owned()),
        kv("http.route", route.to_owned()),
    ]);
    if let Some(status) = r.status {
        span.set_attribute(kv("http.response.status_code", i64::from(status)));
    }
    if let Some(stream) = &r.stream {
        span.set_attribute(kv("sluice.stream.id", stream.clone()));
    }
    span.set_attribute(kv("sluice.stream.resumed", r.resumed));
    if let Some(wait) = r.admission {
        span.set_attribute(kv("sluice.admission.wait_ms", wait.as_secs_f64() * 1000.0));
    }
    // A stream's failure by its kind; else a 5xx answer by its status (a 4xx is the
    // client's, not an error of the server's, as OpenTelemetry's HTTP conventions say).
    let error = match r.outcome {
        Some(outcome) => outcome.error_type().map(str::to_owned),
        None => r.status.filter(|s| *s >= 500).map(|s| s.to_string()),
    };
    match (r.chat, &r.model) {
        (Some((provider, stream)), Some(model)) => {
            span.update_name(format!("{OPERATION} {model}"));
            span.set_attributes([
                kv("gen_ai.operation.name", OPERATION),
                kv("gen_ai.provider.name", provider),
                kv("gen_ai.request.model", model.clone()),
                kv("gen_ai.response.model", model.clone()),
                kv("gen_ai.request.stream", stream),
                kv("sluice.cancelled", r.outcome == Some(Outcome::Cancelled)),
            ]);
            if let Some(n) = r.max_tokens {
                span.set_attribute(kv("gen_ai.request.max_tokens", i64::from(n)));
            }
            if let Some(usage) = r.usage {
                span.set_attribute(kv(
                    "gen_ai.usage.input_tokens",
                    i64::from(usage.prompt_tokens),
                ));
                span.set_attribute(kv(
                    "gen_ai.usage.output_tokens",
                    i64::from(usage.completion_tokens),
                ));
            }
            if let Some(cost) = r.cost {
                span.set_attribute(kv("sluice.usage.cost_usd", cost));
            }
            if let Some(ttft) = r.ttft {
                span.set_attribute(kv(
                    "gen_ai.response.time_to_first_chunk",
                    ttft.as_secs_f64(),
                ));
            }
            if let Some(finish) = &r.finish {
                span.set_attribute(finish_reasons(finish));
            }
        }
        _ => span.update_name(format!("{method} {route}")),
    }
    if let Some(error) = error {
        span.set_attribute(kv("error.type", error));
        span.set_status(Status::error(r.error.clone().unwrap_or_default()));
    }
    span.end();
}
