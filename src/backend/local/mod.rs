//! The local model: a GGUF llama-family model (SmolLM2-135M-Instruct by default) run by
//! candle inside the process, so sluice chats with no network and no key.
//!
//! One thread owns the model ([`batch`]) and decodes up to `SLUICE_LOCAL_BATCH` requests
//! together, taking more from a bounded queue as places free up. Each request streams its
//! tokens back through a small bounded channel; when the client leaves, the receiving end
//! is dropped and its sequence leaves the batch before the next step. What a reply leaves
//! behind is kept ([`cache`]) for the conversation's next turn.

mod batch;
mod cache;
pub mod model;
mod text;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use candle_core::quantized::gguf_file;
use tokio::sync::{mpsc, watch};

pub use text::{TextStream, load_tokenizer};

use super::{Backend, BackendError, Delta, DeltaStream, ModelRequest};

/// The name clients ask for.
pub const MODEL_NAME: &str = "smollm2";
/// Tokens that may wait between the model and a client that reads slowly.
const CHANNEL_TOKENS: usize = 4;

/// How the local model is run (`SLUICE_LOCAL_*`).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Requests that may wait for a place in the batch.
    pub queue: usize,
    /// Sequences decoded together.
    pub batch: usize,
    /// Tokens of context, at most what the file says.
    pub context: usize,
    /// Memory for kept prefixes, in bytes.
    pub cache_bytes: usize,
}

/// What the model counts, for `/metrics`.
pub struct Meters {
    /// Tokens sampled (an end-of-turn token included).
    pub generated: metrics::Counter,
    /// Prompt tokens computed, and prompt tokens taken from the prefix cache.
    pub computed: metrics::Counter,
    pub cached: metrics::Counter,
    /// Bytes the prefix cache holds.
    pub cache_bytes: metrics::Gauge,
}

type Reply = mpsc::Sender<Result<Delta, BackendError>>;

/// What the model tells waiting requests: the last ticket it took into its batch, and
/// whether the batch is full (then even the next ticket waits for a place).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Place {
    admitted: u64,
    full: bool,
}

struct Job {
    ticket: u64,
    request: ModelRequest,
    reply: Reply,
}

pub struct LocalBackend {
    jobs: mpsc::Sender<Job>,
    /// Tickets number the accepted requests 1, 2, 3...; the model publishes the last one it
    /// took into its batch, so a waiting request has `ticket - 1 - admitted` ahead of it,
    /// and one more while the batch is full.
    place: watch::Receiver<Place>,
    next_ticket: Arc<std::sync::Mutex<u64>>,
    /// A running average of how long a request holds its place, for Retry-After.
    average_ms: Arc<AtomicU64>,
    batch: u32,
}

impl LocalBackend {
    /// Loads the model (a second or two) and starts its thread. The context is capped at
    /// the file's.
    pub fn start(path: &Path, mut settings: Settings, meters: Meters) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("SLUICE_LOCAL_MODEL: cannot open {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file).with_context(|| {
            format!("SLUICE_LOCAL_MODEL: {} is not a GGUF file", path.display())
        })?;
        let chat = text::Chat::load(&content)?;
        let model = model::Llama::load(content, &mut file)?;
        settings.context = settings.context.min(model.dims.context);
        settings.batch = settings.batch.max(1);
        tracing::info!(
            model = MODEL_NAME,
            file = %path.display(),
            context = settings.context,
            batch = settings.batch,
            load_ms = started.elapsed().as_millis() as u64,
            "local model loaded"
        );
        let (jobs, inbox) = mpsc::channel(settings.queue.max(1));
        let (place_tx, place) = watch::channel(Place::default());
        let average_ms = Arc::new(AtomicU64::new(2_000));
        let worker = batch::Worker {
            model,
            chat,
            cache: cache::PrefixCache::new(settings.cache_bytes, meters.cache_bytes.clone()),
            settings,
            meters,
            average_ms: average_ms.clone(),
        };
        std::thread::Builder::new()
            .name("local-model".into())
            .spawn(move || worker.serve(inbox, place_tx))
            .context("cannot start the local model's thread")?;
        Ok(LocalBackend {
            jobs,
            place,
            next_ticket: Arc::new(std::sync::Mutex::new(1)),
            average_ms,
            batch: settings.batch as u32,
        })
    }
}

impl Backend for LocalBackend {
    fn stream(&self, request: ModelRequest) -> DeltaStream {
        let jobs = self.jobs.clone();
        let mut place = self.place.clone();
        let next_ticket = self.next_ticket.clone();
        let average = Duration::from_millis(self.average_ms.load(Ordering::Relaxed));
        let batch = self.batch;
        Box::pin(async_stream::stream! {
            let (reply, mut tokens) = mpsc::channel(CHANNEL_TOKENS);
            // A ticket only for a request the queue takes: a refused one would leave a gap
            // that no admitted request ever closes.
            let enqueued = {
                let mut next = next_ticket.lock().unwrap_or_else(|e| e.into_inner());
                let ticket = *next;
                let sent = jobs.try_send(Job { ticket, request, reply });
                if sent.is_ok() {
                    *next += 1;
                }
                sent.map(|()| ticket)
            };
            let ticket = match enqueued {
                Ok(ticket) => ticket,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let waiting = jobs.max_capacity() as u32;
                    yield Err(BackendError::Overloaded {
                        message: format!("the local model's queue of {waiting} is full"),
                        retry_after: average * (waiting / batch + 1),
                    });
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    yield Err(BackendError::Unreachable("the local model has stopped".into()));
                    return;
                }
            };
            // Until the model takes the request, tell the client where it stands.
            let mut told = None;
            loop {
                let now = *place.borrow_and_update();
                let ahead = match ticket.checked_sub(now.admitted + 1) {
                    Some(before) => (before + u64::from(now.full)) as usize,
                    None => 0, // in the batch
                };
                if ahead > 0 && told != Some(ahead) {
                    told = Some(ahead);
                    yield Ok(Delta::Queued(ahead));
                }
                tokio::select! {
                    biased;
                    first = tokens.recv() => {
                        if let Some(first) = first {
                            yield first;
                        }
                        break;
                    }
                    changed = place.changed() => if changed.is_err() { break },
                }
            }
            while let Some(item) = tokens.recv().await {
                yield item;
            }
        })
    }
}
