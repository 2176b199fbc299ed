//! What sluice tells its operators: Prometheus series here (sluice's own and the GenAI
//! conventions' under their Prometheus names), the per-request log record and server span
//! ([`Exchange`]) in `exchange.rs`, an upstream attempt's meter and client span
//! ([`UpstreamCall`]) in `call.rs`, and OpenTelemetry's exporters in `otel.rs`.
//!
//! Each app owns its recorder (not the process-global one), so several apps in one
//! process, as in the tests, count apart. The series are listed in docs/src/operating.md.

mod call;
mod exchange;
mod otel;
pub use call::{Call, UpstreamCall};
pub use exchange::Exchange;
pub use otel::{
    DURATION_BUCKETS, Otel, Settings as OtelSettings, TPOT_BUCKETS, TTFT_BUCKETS, span_of,
    traceparent,
};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::backend::{BackendError, Usage};

/// How a chat request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// The client went away first (or stopped reading for too long).
    Cancelled,
    /// A limit ran out: connection, first token, between chunks, total.
    TimedOut,
    /// The upstream refused, failed, broke off or sent garbage.
    UpstreamError,
    /// sluice shut down before the reply was finished.
    Shutdown,
    /// The key's or its team's budget ran out under the stream.
    BudgetExceeded,
    /// The key was revoked with its streams ended.
    Revoked,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Completed,
        Outcome::Cancelled,
        Outcome::TimedOut,
        Outcome::UpstreamError,
        Outcome::Shutdown,
        Outcome::BudgetExceeded,
        Outcome::Revoked,
    ];

    pub fn of(error: &BackendError) -> Outcome {
        match error {
            BackendError::Timeout(_) => Outcome::TimedOut,
            BackendError::ShuttingDown => Outcome::Shutdown,
            BackendError::BudgetSpent { .. } => Outcome::BudgetExceeded,
            BackendError::KeyRevoked => Outcome::Revoked,
            _ => Outcome::UpstreamError,
        }
    }

    /// `error.type` of a request that ended so: none for one completed, or cancelled by
    /// its client.
    pub fn error_type(self) -> Option<&'static str> {
        match self {
            Outcome::Completed | Outcome::Cancelled => None,
            Outcome::TimedOut => Some("timeout"),
            Outcome::UpstreamError => Some("upstream_error"),
            Outcome::Shutdown => Some("server_restarting"),
            Outcome::BudgetExceeded => Some("insufficient_quota"),
            Outcome::Revoked => Some("key_revoked"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Cancelled => "cancelled",
            Outcome::TimedOut => "timed_out",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Shutdown => "shutdown",
            Outcome::BudgetExceeded => "budget_exceeded",
            Outcome::Revoked => "revoked",
        }
    }
}

/// A key's name and a model's label.
type SpendKey = (Arc<str>, String);

/// The spend series of one key and model.
struct Spend {
    usd: Gauge,
    input: Counter,
    output: Counter,
    cached: Counter,
    cache_write: Counter,
    reasoning: Counter,
    unpriced: Counter,
}

/// Buckets for latencies a person notices: first token, whole upstream requests.
const HUMAN_SECONDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Buckets for time per output token and sluice's own overhead.
const SMALL_SECONDS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Every histogram: its name, its buckets and what it measures.
const HISTOGRAMS: [(&str, &[f64], &str); 9] = [
    (
        "sluice_time_to_first_token_seconds",
        &HUMAN_SECONDS,
        "From the request's arrival to its first token leaving sluice, by model.",
    ),
    (
        "sluice_time_per_output_token_seconds",
        &SMALL_SECONDS,
        "Mean time between tokens after the first, per request, by model.",
    ),
    (
        "sluice_upstream_request_duration_seconds",
        &HUMAN_SECONDS,
        "Upstream requests from sending to their last byte (or cancellation), by model.",
    ),
    (
        "sluice_overhead_seconds",
        &SMALL_SECONDS,
        "sluice's own share of the time to first byte: before the upstream call, and from the upstream's first chunk to its relay.",
    ),
    (
        "gen_ai_server_request_duration_seconds",
        &otel::DURATION_BUCKETS,
        "gen_ai.server.request.duration: from a chat request's arrival to its last byte.",
    ),
    (
        "gen_ai_server_time_to_first_token_seconds",
        &otel::TTFT_BUCKETS,
        "gen_ai.server.time_to_first_token: from arrival to the first token, successful responses.",
    ),
    (
        "gen_ai_server_time_per_output_token_seconds",
        &otel::TPOT_BUCKETS,
        "gen_ai.server.time_per_output_token: per output token after the first, successful responses.",
    ),
    (
        "gen_ai_client_inference_duration_seconds",
        &otel::DURATION_BUCKETS,
        "gen_ai.client.inference.duration: an upstream call from sending to its last byte.",
    ),
    (
        "gen_ai_client_inference_time_to_first_chunk_seconds",
        &otel::DURATION_BUCKETS,
        "gen_ai.client.inference.time_to_first_chunk: an upstream call from sending to its first chunk.",
    ),
];

/// `gen_ai.operation.name` of every request sluice traces as a GenAI operation.
pub const OPERATION: &str = "chat";

/// A sluice's metrics: fixed series as handles, labelled ones registered on use.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    active: Gauge,
    upstream_in_flight: Gauge,
    /// Indexed like [`Outcome::ALL`].
    ended: [Counter; Outcome::ALL.len()],
    mock_tokens: Counter,
    local_tokens: Counter,
    redis_errors: Counter,
    slow_clients: Counter,
    accept_errors: Counter,
    idle_closed: Counter,
    /// Each model's series, registered once: a stream's end takes one lookup, not four.
    per_model: Mutex<std::collections::HashMap<String, Arc<ModelSeries>>>,
    /// The spend series of each key and model label.
    spend: Mutex<std::collections::HashMap<SpendKey, Arc<Spend>>>,
    /// The request fields a translation left out, by name: the first few dozen names seen
    /// are labels of their own, the rest `other` (names come from clients' requests).
    dropped: Mutex<std::collections::HashMap<String, Counter>>,
    /// The GenAI series of each model, by provider, likewise.
    genai: Mutex<std::collections::HashMap<String, Vec<Arc<GenAi>>>>,
    overhead: Histogram,
    /// OpenTelemetry's exporters, when an endpoint is configured.
    otel: Option<Otel>,
}

/// The GenAI conventions' series of one provider and model, under their Prometheus names.
struct GenAi {
    provider: &'static str,
    model: String,
    server_duration: Histogram,
    server_ttft: Histogram,
    server_per_token: Histogram,
    client_duration: Histogram,
    client_first_chunk: Histogram,
    input_tokens: Counter,
    output_tokens: Counter,
}

struct ModelSeries {
    prompt_tokens: Counter,
    completion_tokens: Counter,
    ttft: Histogram,
    per_token: Histogram,
    upstream_duration: Histogram,
}

const META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

impl Metrics {
    pub fn new() -> Self {
        Self::with(None)
    }

    /// Metrics that also go to OpenTelemetry when `otel` is set.
    pub fn with(otel: Option<Otel>) -> Self {
        let builder =
            HISTOGRAMS
                .iter()
                .try_fold(PrometheusBuilder::new(), |builder, (name, buckets, _)| {
                    builder.set_buckets_for_metric(Matcher::Full((*name).into()), buckets)
                });
        let recorder = match builder {
            Ok(builder) => builder.build_recorder(),
            // Only an empty bucket list fails, and these are constants.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        for (name, _, help) in HISTOGRAMS {
            recorder.describe_histogram(name.into(), Some(metrics::Unit::Seconds), help.into());
        }
        let describe = |name: &'static str, help: &'static str| {
            recorder.describe_counter(name.into(), None, help.into());
        };
        describe(
            "sluice_requests_total",
            "HTTP requests by route, model and status.",
        );
        describe(
            "sluice_chat_requests_total",
            "Chat requests that reached a backend, by how they ended.",
        );
        describe(
            "sluice_prompt_tokens_total",
            "Prompt tokens of chat requests, by model.",
        );
        describe(
            "sluice_completion_tokens_total",
            "Completion tokens delivered, by model.",
        );
        describe(
            "sluice_rate_limited_total",
            "Requests refused by sluice's own limits: a client's (`client`) or sluice's (`global`).",
        );
        describe(
            "sluice_upstream_fallbacks_total",
            "Times a route moved on to its next upstream before the first byte, by model and reason.",
        );
        describe(
            "sluice_config_reloads_total",
            "Reloads of the TOML config (SIGHUP, SLUICE_CONFIG_WATCH): `ok`, or `refused` (invalid: the running one kept).",
        );
        describe(
            "sluice_pool_target_streams_total",
            "Streams started on each target of a pool, by route and target.",
        );
        describe(
            "gen_ai_client_inference_usage_input_tokens_total",
            "gen_ai.client.inference.usage.input_tokens: input tokens upstream calls used.",
        );
        describe(
            "gen_ai_client_inference_usage_output_tokens_total",
            "gen_ai.client.inference.usage.output_tokens: output tokens upstream calls used.",
        );
        describe(
            "sluice_slow_clients_dropped_total",
            "Connections dropped because the client took nothing for SLUICE_SLOW_CLIENT_TIMEOUT_MS.",
        );
        describe(
            "sluice_accept_errors_total",
            "Failed accepts of client connections (out of descriptors, mostly), each followed by a back-off.",
        );
        describe(
            "sluice_idle_connections_closed_total",
            "Client connections closed for sending no request within SLUICE_HEADER_TIMEOUT_MS.",
        );
        describe(
            "sluice_mock_tokens_generated_total",
            "Tokens the built-in mock model generated.",
        );
        describe(
            "sluice_local_tokens_generated_total",
            "Tokens the in-process model computed.",
        );
        describe(
            "sluice_local_prompt_tokens_total",
            "Prompt tokens of the in-process model, by source: computed, or taken from its prefix cache.",
        );

        describe(
            "sluice_redis_errors_total",
            "Admissions that could not reach Redis (then failed open or closed).",
        );
        describe(
            "sluice_stream_resumes_total",
            "Readers that attached to a resumable stream again (Last-Event-ID or a cursor).",
        );
        describe(
            "sluice_streams_detached_total",
            "Times a resumable stream lost its last reader and went on alone.",
        );
        describe(
            "sluice_stream_grace_expired_total",
            "Resumable streams cancelled because no reader came back within SLUICE_RESUME_GRACE_S.",
        );
        describe(
            "sluice_dropped_fields_total",
            "Request fields and tools not sent upstream because its API cannot carry them, by name (as x-sluice-dropped names them; the first 64 names, then other).",
        );
        describe(
            "sluice_stream_cancels_total",
            "Resumable streams cancelled by a cancel request.",
        );
        describe(
            "sluice_streams_not_resumable_total",
            "Streams that asked to be resumable but were served directly: no log memory left, or Redis unreachable.",
        );
        describe(
            "sluice_tokens_total",
            "Tokens of chat requests by key (its name; `open` when sluice has no keys), model and type: input, output, and of those cached (read from a cache), cache_write and reasoning.",
        );
        describe(
            "sluice_unpriced_requests_total",
            "Chat requests whose model has no price: their cost is unknown, not zero.",
        );
        describe(
            "sluice_ledger_records_written_total",
            "Ledger records the database took.",
        );
        describe(
            "sluice_ledger_records_dropped_total",
            "Ledger records dropped because the queue for a slow or stopped database was full.",
        );
        describe(
            "sluice_ledger_write_errors_total",
            "Batches of ledger records the database refused or could not take (retried).",
        );
        recorder.describe_gauge(
            "sluice_spend_usd_total".into(),
            None,
            "USD spent by key and model, from the price table (a running total, kept as a gauge: counters count whole numbers).".into(),
        );
        recorder.describe_gauge(
            "sluice_ledger_records_queued".into(),
            None,
            "Ledger records waiting for the database.".into(),
        );
        recorder.describe_gauge(
            "sluice_stream_log_bytes".into(),
            None,
            "Memory held by resumable streams' event logs.".into(),
        );
        recorder.describe_gauge(
            "sluice_local_cache_bytes".into(),
            None,
            "Memory the in-process model's prefix cache holds (SLUICE_LOCAL_CACHE_MB at most)."
                .into(),
        );
        recorder.describe_gauge(
            "sluice_active_streams".into(),
            None,
            "Chat requests in progress.".into(),
        );
        recorder.describe_gauge(
            "sluice_upstream_requests_in_flight".into(),
            None,
            "Backend calls open (upstream connections in use, mock and local generations).".into(),
        );
        let counter = |name: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&Key::from_parts(name, labels), &META)
        };
        let ended = Outcome::ALL.map(|o| {
            counter(
                "sluice_chat_requests_total",
                vec![Label::new("outcome", o.as_str())],
            )
        });
        let gauge = |name: &'static str| {
            let gauge = recorder.register_gauge(&Key::from_name(name), &META);
            gauge.set(0.0);
            gauge
        };
        Metrics(Arc::new(Inner {
            active: gauge("sluice_active_streams"),
            upstream_in_flight: gauge("sluice_upstream_requests_in_flight"),
            ended,
            mock_tokens: counter("sluice_mock_tokens_generated_total", vec![]),
            local_tokens: counter("sluice_local_tokens_generated_total", vec![]),
            redis_errors: counter("sluice_redis_errors_total", vec![]),
            slow_clients: counter("sluice_slow_clients_dropped_total", vec![]),
            accept_errors: counter("sluice_accept_errors_total", vec![]),
            idle_closed: counter("sluice_idle_connections_closed_total", vec![]),
            per_model: Mutex::default(),
            spend: Mutex::default(),
            dropped: Mutex::default(),
            genai: Mutex::default(),
            otel,
            overhead: recorder
                .register_histogram(&Key::from_name("sluice_overhead_seconds"), &META),
            handle: recorder.handle(),
            recorder,
        }))
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels = labels.iter().map(|(k, v)| Label::new(*k, (*v).to_owned()));
        Key::from_parts(name, labels.collect::<Vec<_>>())
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.0
            .recorder
            .register_counter(&Self::key(name, labels), &META)
    }

    pub fn gauge(&self, name: &'static str) -> Gauge {
        self.0.recorder.register_gauge(&Key::from_name(name), &META)
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.0
            .recorder
            .register_histogram(&Self::key(name, labels), &META)
    }

    fn model(&self, model: &str) -> Arc<ModelSeries> {
        let mut known = self.0.per_model.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(series) = known.get(model) {
            return series.clone();
        }
        let label = [("model", model)];
        let series = Arc::new(ModelSeries {
            prompt_tokens: self.counter("sluice_prompt_tokens_total", &label),
            completion_tokens: self.counter("sluice_completion_tokens_total", &label),
            ttft: self.histogram("sluice_time_to_first_token_seconds", &label),
            per_token: self.histogram("sluice_time_per_output_token_seconds", &label),
            upstream_duration: self.histogram("sluice_upstream_request_duration_seconds", &label),
        });
        known.insert(model.to_owned(), series.clone());
        series
    }

    pub fn stream_started(&self) {
        self.0.active.increment(1.0);
    }

    /// The GenAI series of `provider` and `model` (a bounded label).
    fn genai(&self, provider: &'static str, model: &str) -> Arc<GenAi> {
        let mut known = self.0.genai.lock().unwrap_or_else(|e| e.into_inner());
        let found = known
            .get(model)
            .and_then(|by| by.iter().find(|s| s.provider == provider));
        if let Some(series) = found {
            return series.clone();
        }
        let labels = [
            ("gen_ai_operation_name", OPERATION),
            ("gen_ai_provider_name", provider),
            ("gen_ai_request_model", model),
        ];
        let tokens = [
            ("gen_ai_operation_name", OPERATION),
            ("gen_ai_provider_name", provider),
            ("gen_ai_request_model", model),
            ("gen_ai_token_modality", "text"),
        ];
        let series = Arc::new(GenAi {
            provider,
            model: model.to_owned(),
            server_duration: self.histogram("gen_ai_server_request_duration_seconds", &labels),
            server_ttft: self.histogram("gen_ai_server_time_to_first_token_seconds", &labels),
            server_per_token: self
                .histogram("gen_ai_server_time_per_output_token_seconds", &labels),
            client_duration: self.histogram("gen_ai_client_inference_duration_seconds", &labels),
            client_first_chunk: self.histogram(
                "gen_ai_client_inference_time_to_first_chunk_seconds",
                &labels,
            ),
            input_tokens: self.counter("gen_ai_client_inference_usage_input_tokens_total", &tokens),
            output_tokens: self
                .counter("gen_ai_client_inference_usage_output_tokens_total", &tokens),
        });
        known
            .entry(model.to_owned())
            .or_default()
            .push(series.clone());
        series
    }

    /// `name` for one failure kind: registered on use (failures are rare, kinds few).
    fn error_histogram(&self, name: &'static str, series: &GenAi, error: &str) -> Histogram {
        self.histogram(
            name,
            &[
                ("gen_ai_operation_name", OPERATION),
                ("gen_ai_provider_name", series.provider),
                ("gen_ai_request_model", &series.model),
                ("error_type", error),
            ],
        )
    }

    /// OpenTelemetry, when it is configured.
    pub fn otel(&self) -> Option<&Otel> {
        self.0.otel.as_ref()
    }

    /// Sends what OpenTelemetry holds and stops its exporters (at shutdown).
    pub fn shutdown(&self) {
        if let Some(otel) = self.otel() {
            otel.shutdown();
        }
    }

    /// A chat request's end: its outcome, tokens and timings, in sluice's series and the
    /// GenAI conventions' (which count time to first token and per token only for
    /// successful responses, and name a failure's kind in `error.type`).
    pub fn stream_ended(
        &self,
        outcome: Outcome,
        model: &str,
        provider: &'static str,
        usage: Usage,
        times: &TokenTimes,
        duration: Duration,
    ) {
        self.genai_server(outcome, model, provider, times, duration);
        self.0.active.decrement(1.0);
        let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.0.ended[index].increment(1);
        let series = self.model(model);
        series
            .prompt_tokens
            .increment(u64::from(usage.prompt_tokens));
        series
            .completion_tokens
            .increment(u64::from(usage.completion_tokens));
        if let Some(first) = times.first {
            series.ttft.record(first.as_secs_f64());
        }
        if let Some(per_token) = times.per_token() {
            series.per_token.record(per_token.as_secs_f64());
        }
    }

    fn genai_server(
        &self,
        outcome: Outcome,
        model: &str,
        provider: &'static str,
        times: &TokenTimes,
        duration: Duration,
    ) {
        let series = self.genai(provider, model);
        let error = outcome.error_type();
        let ok = outcome == Outcome::Completed;
        let ttft = times.first.filter(|_| ok).map(|d| d.as_secs_f64());
        let per_token = times.per_token().filter(|_| ok).map(|d| d.as_secs_f64());
        match error {
            None => series.server_duration.record(duration.as_secs_f64()),
            Some(error) => self
                .error_histogram("gen_ai_server_request_duration_seconds", &series, error)
                .record(duration.as_secs_f64()),
        }
        if let Some(ttft) = ttft {
            series.server_ttft.record(ttft);
        }
        if let Some(per_token) = per_token {
            series.server_per_token.record(per_token);
        }
        if let Some(otel) = self.otel() {
            let mut attrs = vec![
                otel::kv("gen_ai.operation.name", OPERATION),
                otel::kv("gen_ai.provider.name", provider),
                otel::kv("gen_ai.request.model", model.to_owned()),
            ];
            if let Some(ttft) = ttft {
                otel.server_ttft.record(ttft, &attrs);
            }
            if let Some(per_token) = per_token {
                otel.server_per_token.record(per_token, &attrs);
            }
            if let Some(error) = error {
                attrs.push(otel::kv("error.type", error));
            }
            otel.server_duration.record(duration.as_secs_f64(), &attrs);
        }
    }

    /// What a chat request spent: its tokens by type and its cost, by key and model (both
    /// bounded labels); a request of a model with no price is counted as unpriced.
    pub fn spent(
        &self,
        key: &Arc<str>,
        model: &str,
        usage: Usage,
        details: crate::prices::Details,
        cost: Option<f64>,
    ) {
        let series = {
            let mut known = self.0.spend.lock().unwrap_or_else(|e| e.into_inner());
            known
                .entry((key.clone(), model.to_owned()))
                .or_insert_with(|| {
                    let tokens = |kind| {
                        self.counter(
                            "sluice_tokens_total",
                            &[("key", key), ("model", model), ("type", kind)],
                        )
                    };
                    Arc::new(Spend {
                        usd: self.0.recorder.register_gauge(
                            &Self::key("sluice_spend_usd_total", &[("key", key), ("model", model)]),
                            &META,
                        ),
                        input: tokens("input"),
                        output: tokens("output"),
                        cached: tokens("cached"),
                        cache_write: tokens("cache_write"),
                        reasoning: tokens("reasoning"),
                        unpriced: self
                            .counter("sluice_unpriced_requests_total", &[("model", model)]),
                    })
                })
                .clone()
        };
        series.input.increment(u64::from(usage.prompt_tokens));
        series.output.increment(u64::from(usage.completion_tokens));
        series.cached.increment(u64::from(details.cached));
        series.cache_write.increment(u64::from(details.cache_write));
        series.reasoning.increment(u64::from(details.reasoning));
        match cost {
            Some(cost) => series.usd.increment(cost),
            None => series.unpriced.increment(1),
        }
    }

    /// A reload of the configuration: taken, or refused (the running one kept).
    pub fn config_reloaded(&self, taken: bool) {
        let outcome = if taken { "ok" } else { "refused" };
        self.counter("sluice_config_reloads_total", &[("outcome", outcome)])
            .increment(1);
    }

    /// A gauge with labels.
    pub fn gauge_with(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.0
            .recorder
            .register_gauge(&Self::key(name, labels), &META)
    }

    /// Counts the request fields a translation left out (as `x-sluice-dropped` names them).
    pub fn dropped(&self, fields: &[String]) {
        const NAMES: usize = 64;
        let mut known = self.0.dropped.lock().unwrap_or_else(|e| e.into_inner());
        for field in fields {
            if !known.contains_key(field) {
                let label = if known.len() < NAMES {
                    field.as_str()
                } else {
                    "other"
                };
                let counter = self.counter("sluice_dropped_fields_total", &[("field", label)]);
                if known.len() >= NAMES {
                    counter.increment(1);
                    continue;
                }
                known.insert(field.clone(), counter);
            }
            if let Some(counter) = known.get(field) {
                counter.increment(1);
            }
        }
    }

    pub fn fallback(&self, model: &str, reason: &str) {
        self.counter(
            "sluice_upstream_fallbacks_total",
            &[("model", model), ("reason", reason)],
        )
        .increment(1);
    }

    pub fn overhead(&self, value: Duration) {
        self.0.overhead.record(value.as_secs_f64());
    }

    pub fn mock_tokens(&self) -> Counter {
        self.0.mock_tokens.clone()
    }

    pub fn redis_errors(&self) -> Counter {
        self.0.redis_errors.clone()
    }

    pub fn local_tokens(&self) -> Counter {
        self.0.local_tokens.clone()
    }

    pub fn slow_clients(&self) -> Counter {
        self.0.slow_clients.clone()
    }

    pub fn accept_errors(&self) -> Counter {
        self.0.accept_errors.clone()
    }

    pub fn idle_connections_closed(&self) -> Counter {
        self.0.idle_closed.clone()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.0.handle.render()
    }

    /// Folds the histograms' recent samples into their buckets every few seconds, as a
    /// scrape would: without it they pile up in memory until someone scrapes.
    pub async fn maintain(self, stop: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => self.0.handle.run_upkeep(),
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// When a reply's tokens left sluice, relative to the request's arrival.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenTimes {
    pub first: Option<Duration>,
    pub last: Option<Duration>,
    pub count: u32,
}

impl TokenTimes {
    pub fn token(&mut self, at: Duration) {
        self.first.get_or_insert(at);
        self.last = Some(at);
        self.count = self.count.saturating_add(1);
    }

    fn per_token(&self) -> Option<Duration> {
        let (first, last) = (self.first?, self.last?);
        (self.count > 1).then(|| (last - first) / (self.count - 1))
    }
}
