//! Prometheus metrics for one app. Each app owns its recorder (not the process-global one),
//! so several apps in one process, as in the tests, count apart.

use std::sync::Arc;

use metrics::{Counter, Gauge, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::backend::BackendError;

/// How a chat request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// The client went away first.
    Cancelled,
    /// A limit ran out: connection, first token, between chunks.
    TimedOut,
    /// The upstream refused, failed, broke off or sent garbage.
    UpstreamError,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Completed,
        Outcome::Cancelled,
        Outcome::TimedOut,
        Outcome::UpstreamError,
    ];

    pub fn of(error: &BackendError) -> Outcome {
        match error {
            BackendError::Timeout(_) => Outcome::TimedOut,
            _ => Outcome::UpstreamError,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Cancelled => "cancelled",
            Outcome::TimedOut => "timed_out",
            Outcome::UpstreamError => "upstream_error",
        }
    }
}

#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    handle: PrometheusHandle,
    active: Gauge,
    /// Indexed like [`Outcome::ALL`].
    ended: [Counter; 4],
    mock_tokens: Counter,
    local_tokens: Counter,
    redis_errors: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let meta = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));
        let counter = |name: &'static str, labels: Vec<Label>, help: &'static str| {
            recorder.describe_counter(name.into(), None, help.into());
            recorder.register_counter(&Key::from_parts(name, labels), &meta)
        };
        let ended = Outcome::ALL.map(|o| {
            counter(
                "sluice_chat_requests_total",
                vec![Label::new("outcome", o.as_str())],
                "Chat requests that reached a backend, by how they ended.",
            )
        });
        let mock_tokens = counter(
            "sluice_mock_tokens_generated_total",
            vec![],
            "Tokens the built-in mock model generated.",
        );
        let local_tokens = counter(
            "sluice_local_tokens_generated_total",
            vec![],
            "Tokens the in-process model computed.",
        );
        let redis_errors = counter(
            "sluice_redis_errors_total",
            vec![],
            "Admissions that could not reach Redis (then failed open or closed).",
        );
        recorder.describe_gauge(
            "sluice_active_streams".into(),
            None,
            "Chat requests in progress.".into(),
        );
        let active = recorder.register_gauge(&Key::from_name("sluice_active_streams"), &meta);
        active.set(0.0);
        Metrics(Arc::new(Inner {
            handle: recorder.handle(),
            active,
            ended,
            mock_tokens,
            local_tokens,
            redis_errors,
        }))
    }

    pub fn stream_started(&self) {
        self.0.active.increment(1.0);
    }

    pub fn stream_ended(&self, outcome: Outcome) {
        self.0.active.decrement(1.0);
        let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.0.ended[index].increment(1);
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

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.0.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
