//! OpenTelemetry, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set: spans (one per request, a child
//! per upstream attempt) and the GenAI metrics, exported by OTLP (HTTP/protobuf or gRPC);
//! W3C trace context read from clients and sent upstream. Unset, none of this exists: no
//! provider, no exporter thread, no work per request.
//!
//! Spans are per request and per attempt, never per chunk: attributes are set when a
//! request or attempt ends, from what its log record and meter already hold.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, InstrumentationScope};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer};
use opentelemetry_sdk::trace::{SdkTracerProvider, Span};

/// What the standard `OTEL_*` variables say (see `Config`).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: the collector's base URL. Unset: no telemetry.
    pub endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` (default) or `grpc`.
    pub protocol: String,
    /// `OTEL_SERVICE_NAME`.
    pub service_name: String,
    /// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
    pub sampler: String,
    pub sampler_arg: Option<String>,
    /// `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`: prompts and replies on spans.
    pub capture_content: bool,
    /// `OTEL_BSP_SCHEDULE_DELAY`: how often finished spans are sent.
    pub span_delay: Duration,
    /// `OTEL_METRIC_EXPORT_INTERVAL`: how often metrics are sent.
    pub metric_interval: Duration,
}

/// Bucket boundaries the GenAI conventions advise, in seconds.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
pub const TTFT_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
pub const TPOT_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];

/// The exporters, the tracer, and the GenAI instruments.
pub struct Otel {
    traces: SdkTracerProvider,
    meters: SdkMeterProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    pub capture_content: bool,
    pub server_duration: Histogram<f64>,
    pub server_ttft: Histogram<f64>,
    pub server_per_token: Histogram<f64>,
    pub client_duration: Histogram<f64>,
    pub client_first_chunk: Histogram<f64>,
    pub input_tokens: Counter<u64>,
    pub output_tokens: Counter<u64>,
}

impl Otel {
    /// The exporters `settings` ask for, or `None` when no endpoint is set. Must run inside
    /// the Tokio runtime (the gRPC exporter's connection lives there).
    pub fn start(settings: &Settings) -> anyhow::Result<Option<Otel>> {
        let Some(endpoint) = settings.endpoint.as_deref().filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        let endpoint = endpoint.trim_end_matches('/');
        let grpc = match settings.protocol.as_str() {
            "" | "http/protobuf" => false,
            "grpc" => true,
            other => anyhow::bail!(
                "OTEL_EXPORTER_OTLP_PROTOCOL: `{other}` is not supported (`http/protobuf` or `grpc`)"
            ),
        };
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build();
        // An exporter of one signal: over gRPC to the endpoint, over HTTP to its path there.
        macro_rules! exporter {
            ($kind:ident, $path:literal) => {
                if grpc {
                    opentelemetry_otlp::$kind::builder()
                        .with_tonic()
                        .with_endpoint(endpoint)
                        .build()?
                } else {
                    opentelemetry_otlp::$kind::builder()
                        .with_http()
                        .with_endpoint(format!("{endpoint}{}", $path))
                        .build()?
                }
            };
        }
        let spans = exporter!(SpanExporter, "/v1/traces");
        let batch = BatchConfigBuilder::default()
            .with_scheduled_delay(settings.span_delay)
            .build();
        let traces = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(spans)
                    .with_batch_config(batch)
                    .build(),
            )
            .with_sampler(sampler(&settings.sampler, settings.sampler_arg.as_deref())?)
            .with_resource(resource.clone())
            .build();
        let metrics = exporter!(MetricExporter, "/v1/metrics");
        let meters = SdkMeterProvider::builder()
            .with_reader(
                PeriodicReader::builder(metrics)
                    .with_interval(settings.metric_interval)
                    .build(),
            )
            .with_resource(resource)
            .build();
        let scope = InstrumentationScope::builder("sluice")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let tracer = traces.tracer_with_scope(scope.clone());
        let meter = meters.meter_with_scope(scope);
        Ok(Some(Otel::with(traces, meters, tracer, &meter, settings)))
    }

    fn with(
        traces: SdkTracerProvider,
        meters: SdkMeterProvider,
        tracer: SdkTracer,
        meter: &Meter,
        settings: &Settings,
    ) -> Otel {
        let seconds = |name: &'static str, help: &'static str, buckets: &[f64]| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(help)
                .with_boundaries(buckets.to_vec())
                .build()
        };
        let tokens = |name: &'static str, help: &'static str| {
            meter
                .u64_counter(name)
                .with_unit("{token}")
                .with_description(help)
                .build()
        };
        Otel {
            server_duration: seconds(
                "gen_ai.server.request.duration",
                "From a request's arrival to its last byte.",
                &DURATION_BUCKETS,
            ),
            server_ttft: seconds(
                "gen_ai.server.time_to_first_token",
                "From a request's arrival to its first token, for successful responses.",
                &TTFT_BUCKETS,
            ),
            server_per_token: seconds(
                "gen_ai.server.time_per_output_token",
                "Time per output token after the first, for successful responses.",
                &TPOT_BUCKETS,
            ),
            client_duration: seconds(
                "gen_ai.client.inference.duration",
                "Upstream calls, from sending to their last byte.",
                &DURATION_BUCKETS,
            ),
            client_first_chunk: seconds(
                "gen_ai.client.inference.time_to_first_chunk",
                "Upstream calls, from sending to their first chunk.",
                &DURATION_BUCKETS,
            ),
            input_tokens: tokens(
                "gen_ai.client.inference.usage.input_tokens",
                "Input tokens upstream calls used.",
            ),
            output_tokens: tokens(
                "gen_ai.client.inference.usage.output_tokens",
                "Output tokens upstream calls used.",
            ),
            capture_content: settings.capture_content,
            propagator: TraceContextPropagator::new(),
            traces,
            meters,
            tracer,
        }
    }

    /// A request's server span, continuing the client's `traceparent` when it sent one.
    pub fn server_span(&self, name: String, headers: &axum::http::HeaderMap) -> Context {
        let parent = self.propagator.extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        parent.with_span(span)
    }

    /// An upstream attempt's span, a child of its request's: `CLIENT`, or `INTERNAL` for a
    /// model sluice runs in its own process.
    pub fn client_span(&self, name: String, parent: &Context, in_process: bool) -> Span {
        let kind = if in_process {
            SpanKind::Internal
        } else {
            SpanKind::Client
        };
        self.tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(&self.tracer, parent)
    }

    /// `traceparent` (and `tracestate`) naming `span`, for the upstream request.
    pub fn headers_for(&self, span: &Span) -> Vec<(&'static str, String)> {
        use opentelemetry::trace::Span as _;
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        let mut out = Carrier(Vec::with_capacity(2));
        self.propagator.inject_context(&cx, &mut out);
        out.0
    }

    /// Sends what is buffered and stops the exporters (at shutdown), waiting two seconds
    /// at most: a collector that is down does not hold the process.
    pub fn shutdown(&self) {
        let (traces, meters) = (self.traces.clone(), self.meters.clone());
        let (done, stopped) = std::sync::mpsc::channel();
        let stopping = std::thread::Builder::new()
            .name("otel-shutdown".into())
            .spawn(move || {
                let _ = traces.shutdown();
                let _ = meters.shutdown();
                let _ = done.send(());
            });
        if stopping.is_ok() {
            let _ = stopped.recv_timeout(Duration::from_secs(2));
        }
    }
}

/// `OTEL_TRACES_SAMPLER` as the specification names its values.
fn sampler(name: &str, arg: Option<&str>) -> anyhow::Result<Sampler> {
    let ratio = || -> anyhow::Result<f64> {
        match arg {
            None | Some("") => Ok(1.0),
            Some(arg) => arg
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    anyhow::anyhow!("OTEL_TRACES_SAMPLER_ARG: `{arg}` is not a ratio from 0 to 1")
                }),
        }
    };
    Ok(match name {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "" | "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
        }
        other => anyhow::bail!(
            "OTEL_TRACES_SAMPLER: `{other}` is not supported (always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio)"
        ),
    })
}

struct Headers<'a>(&'a axum::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

struct Carrier(Vec<(&'static str, String)>);

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            "traceparent" => "traceparent",
            "tracestate" => "tracestate",
            _ => return,
        };
        if !value.is_empty() {
            self.0.push((name, value));
        }
    }
}

/// A span's `traceparent` (W3C Trace Context), as a stream keeps its producer's in Redis.
pub fn traceparent(span: &opentelemetry::trace::SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        span.trace_flags().to_u8()
    )
}

/// The span a `traceparent` names, when it is a valid one.
pub fn span_of(traceparent: &str) -> Option<opentelemetry::trace::SpanContext> {
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// `gen_ai.response.finish_reasons`: one reply, one reason.
pub fn finish_reasons(reason: &str) -> KeyValue {
    let reasons = opentelemetry::Array::String(vec![reason.to_owned().into()]);
    KeyValue::new(
        "gen_ai.response.finish_reasons",
        opentelemetry::Value::Array(reasons),
    )
}

/// An attribute.
pub fn kv(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_by_their_standard_names() {
        assert!(sampler("always_on", None).is_ok());
        assert!(sampler("parentbased_traceidratio", Some("0.25")).is_ok());
        assert!(sampler("traceidratio", Some("2")).is_err());
        assert!(sampler("jaeger_remote", None).is_err());
    }
}
