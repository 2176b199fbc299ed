//! One request as its log line tells it: made when the request arrives, filled in by the
//! handler and the stream, written when the last of them lets go.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Outcome;
use crate::backend::{BackendError, Usage};

/// One request as the log line at its end tells it. The middleware makes it, the handler
/// and the stream fill it in, and the last of them to let go writes the line.
#[derive(Clone)]
pub struct Exchange(Arc<ExchangeInner>);

struct ExchangeInner {
    arrived: Instant,
    request_id: String,
    method: String,
    path: String,
    record: Mutex<Record>,
}

#[derive(Default)]
struct Record {
    route: Option<String>,
    status: Option<u16>,
    key: Option<Arc<str>>,
    model: Option<String>,
    /// The model's metric label, once admitted.
    label: Option<String>,
    outcome: Option<Outcome>,
    ttft: Option<Duration>,
    usage: Option<Usage>,
    fallbacks: u32,
    error: Option<String>,
    /// A stored stream's id, once it is known to be the client's.
    stream: Option<String>,
}

impl Exchange {
    /// A request that has just arrived.
    pub fn new(request_id: String, method: String, path: String) -> Self {
        Exchange(Arc::new(ExchangeInner {
            arrived: Instant::now(),
            request_id,
            method,
            path,
            record: Mutex::new(Record::default()),
        }))
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

    /// The client's key name (or address), once identified.
    pub fn set_key(&self, key: Arc<str>) {
        self.record().key = Some(key);
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

    /// How the chat stream ended.
    pub fn ended(&self, outcome: Outcome, ttft: Option<Duration>, usage: Usage) {
        let mut record = self.record();
        record.outcome = Some(outcome);
        record.ttft = ttft;
        record.usage = Some(usage);
    }

    /// The stored stream the request read or stopped: logged only once it was the
    /// client's (the path is logged as its route, so an id never appears before that).
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
        macro_rules! line {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    request_id = %self.request_id,
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
    }
}
