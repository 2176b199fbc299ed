//! An OpenTelemetry collector of the tests' own on port 0: it takes OTLP/HTTP exports
//! (`/v1/traces`, `/v1/metrics`), decodes their protobuf with `opentelemetry-proto`, and
//! keeps every span, every metrics export and every byte it was sent.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::metrics::v1::Metric;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::sync::Notify;

use super::DEADLINE;

#[derive(Default)]
pub struct Received {
    pub spans: Vec<Span>,
    /// Each metrics export's metrics (cumulative: the last holds the totals).
    metrics: Vec<Vec<Metric>>,
    /// `service.name` of every export.
    services: Vec<String>,
    /// Every request body, as sent.
    raw: Vec<u8>,
}

#[derive(Clone)]
pub struct Collector {
    addr: std::net::SocketAddr,
    received: Arc<Mutex<Received>>,
    changed: Arc<Notify>,
}

impl Collector {
    pub async fn spawn() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let collector = Collector {
            addr: listener.local_addr().expect("addr"),
            received: Arc::default(),
            changed: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/v1/traces", post(traces))
            .route("/v1/metrics", post(metrics))
            .with_state(collector.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        collector
    }

    /// The base URL: `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `found` finds something in what was received.
    pub async fn wait<T>(&self, what: &str, mut found: impl FnMut(&Received) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let changed = self.changed.notified();
            if let Some(value) = found(&self.lock()) {
                return value;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let names: Vec<String> = self.lock().spans.iter().map(|s| s.name.clone()).collect();
                panic!(
                    "the collector did not receive {what} within {DEADLINE:?}; spans: {names:?}"
                );
            }
        }
    }

    /// The spans of the trace whose server span is named `name`, once `count` have come.
    pub async fn trace(&self, name: &str, count: usize) -> Vec<Span> {
        self.wait(&format!("{count} spans of the trace of `{name}`"), |r| {
            let root = r.spans.iter().find(|s| s.name == name)?;
            let spans: Vec<Span> = r
                .spans
                .iter()
                .filter(|s| s.trace_id == root.trace_id)
                .cloned()
                .collect();
            (spans.len() >= count).then_some(spans)
        })
        .await
    }

    /// The newest export of metric `name` that `found` accepts.
    pub async fn metric<T>(&self, name: &str, mut found: impl FnMut(&Metric) -> Option<T>) -> T {
        self.wait(&format!("metric `{name}`"), |r| {
            r.metrics
                .iter()
                .rev()
                .flat_map(|export| export.iter().filter(|m| m.name == name))
                .find_map(&mut found)
        })
        .await
    }

    pub fn services(&self) -> Vec<String> {
        self.lock().services.clone()
    }

    /// Whether `needle` is anywhere in what was exported.
    pub fn received_bytes(&self, needle: &[u8]) -> bool {
        self.lock().raw.windows(needle.len()).any(|w| w == needle)
    }
}

async fn traces(State(collector): State<Collector>, body: Bytes) -> Vec<u8> {
    collector.take_traces(&body);
    Vec::new()
}

async fn metrics(State(collector): State<Collector>, body: Bytes) -> Vec<u8> {
    collector.take_metrics(&body);
    Vec::new()
}

impl Collector {
    /// The same collector over gRPC (HTTP/2 without TLS): each export is one message
    /// behind gRPC's five-byte prefix, answered with an empty one and `grpc-status: 0`.
    pub async fn spawn_grpc() -> Collector {
        use http_body_util::{BodyExt as _, StreamBody};
        use hyper::body::Frame;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let collector = Collector {
            addr: listener.local_addr().expect("addr"),
            received: Arc::default(),
            changed: Arc::default(),
        };
        let server = collector.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let server = server.clone();
                            async move {
                                let path = req.uri().path().to_owned();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let message = body.get(5..).unwrap_or_default();
                                if path.ends_with("TraceService/Export") {
                                    server.take_traces(message);
                                } else if path.ends_with("MetricsService/Export") {
                                    server.take_metrics(message);
                                }
                                let mut trailers = hyper::HeaderMap::new();
                                trailers.insert(
                                    "grpc-status",
                                    hyper::header::HeaderValue::from_static("0"),
                                );
                                let frames = futures::stream::iter([
                                    Ok::<_, std::convert::Infallible>(Frame::data(
                                        Bytes::from_static(&[0, 0, 0, 0, 0]),
                                    )),
                                    Ok(Frame::trailers(trailers)),
                                ]);
                                let response = hyper::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(StreamBody::new(frames))
                                    .unwrap_or_else(|_| unreachable!());
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
                });
            }
        });
        collector
    }

    fn take_traces(&self, body: &[u8]) {
        if let Ok(request) = ExportTraceServiceRequest::decode(body) {
            let mut received = self.lock();
            received.raw.extend_from_slice(body);
            for resource in request.resource_spans {
                if let Some(service) = resource
                    .resource
                    .as_ref()
                    .and_then(|r| service(&r.attributes))
                {
                    received.services.push(service);
                }
                for scope in resource.scope_spans {
                    received.spans.extend(scope.spans);
                }
            }
        }
        self.changed.notify_waiters();
    }

    fn take_metrics(&self, body: &[u8]) {
        if let Ok(request) = ExportMetricsServiceRequest::decode(body) {
            let mut received = self.lock();
            received.raw.extend_from_slice(body);
            let metrics = request
                .resource_metrics
                .into_iter()
                .flat_map(|r| r.scope_metrics)
                .flat_map(|s| s.metrics)
                .collect();
            received.metrics.push(metrics);
        }
        self.changed.notify_waiters();
    }
}

fn service(attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> Option<String> {
    match attribute(attributes, "service.name")? {
        Any::StringValue(s) => Some(s),
        _ => None,
    }
}

/// An attribute's value.
pub fn attribute(
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<Any> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

/// A string attribute of a span.
pub fn text(span: &Span, key: &str) -> Option<String> {
    match attribute(&span.attributes, key)? {
        Any::StringValue(s) => Some(s),
        _ => None,
    }
}

/// An integer attribute of a span.
pub fn int(span: &Span, key: &str) -> Option<i64> {
    match attribute(&span.attributes, key)? {
        Any::IntValue(n) => Some(n),
        _ => None,
    }
}

/// A boolean attribute of a span.
pub fn flag(span: &Span, key: &str) -> Option<bool> {
    match attribute(&span.attributes, key)? {
        Any::BoolValue(b) => Some(b),
        _ => None,
    }
}

/// A float attribute of a span.
pub fn float(span: &Span, key: &str) -> Option<f64> {
    match attribute(&span.attributes, key)? {
        Any::DoubleValue(x) => Some(x),
        _ => None,
    }
}

/// A string-array attribute of a span.
pub fn texts(span: &Span, key: &str) -> Option<Vec<String>> {
    match attribute(&span.attributes, key)? {
        Any::ArrayValue(a) => Some(
            a.values
                .into_iter()
                .filter_map(|v| match v.value {
                    Some(Any::StringValue(s)) => Some(s),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

/// Lowercase hex, as W3C trace context writes ids.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
