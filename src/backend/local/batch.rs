//! The model's thread: continuous batching. Up to `SLUICE_LOCAL_BATCH` sequences share each
//! step through the weights: every decoding sequence feeds its last token, and one prompt
//! still being read feeds a chunk of up to [`PREFILL_CHUNK`] tokens, so a long prompt joining the
//! batch slows the others' tokens rather than stopping them. A request joins at the next
//! step; a finished or cancelled one leaves at once, its state kept in the prefix cache.
//!
//! A sequence whose client reads slowly waits (its channel of [`super::CHANNEL_TOKENS`]
//! and [`OUTBOX`] pieces beside it are full) without holding back the others.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokio::sync::{mpsc, watch};

use super::cache::PrefixCache;
use super::model::{Kv, Llama, PREFILL_CHUNK, Rows};
use super::text::{Chat, TextStream};
use super::{Job, Meters, Place, Settings};
use crate::backend::{BackendError, Delta, Finish, ModelRequest, Text, Usage};

/// Pieces of text a sequence may hold while its client's channel is full before it waits:
/// enough that a client a moment behind (its task not yet scheduled on a busy machine)
/// does not hold the model back, few enough that one that left costs little.
const OUTBOX: usize = 4;
/// Reply length when a request sets no `max_tokens`.
const DEFAULT_MAX_TOKENS: u32 = 512;
/// Small models loop without it; llama.cpp's classic default.
const REPEAT_PENALTY: f32 = 1.1;
const REPEAT_WINDOW: usize = 64;

pub(super) struct Worker {
    pub model: Llama,
    pub chat: Chat,
    pub cache: PrefixCache,
    pub settings: Settings,
    pub meters: Meters,
    /// A running average of how long a request holds its place in the batch.
    pub average_ms: Arc<AtomicU64>,
}

struct Seq {
    job: Job,
    prompt: Vec<u32>,
    kv: Kv,
    generated: Vec<u32>,
    /// The token sampled last, which the next step feeds.
    next: [u32; 1],
    max_tokens: usize,
    cached: usize,
    sampler: LogitsProcessor,
    text: TextStream,
    /// What waits for room in the client's channel.
    outbox: VecDeque<Result<Delta, BackendError>>,
    done: bool,
    started: Instant,
}

impl Seq {
    fn send(&mut self, item: Result<Delta, BackendError>) {
        self.outbox.push_back(item);
        self.flush();
    }

    /// Moves what it can into the client's channel, without waiting.
    fn flush(&mut self) {
        while let Some(item) = self.outbox.pop_front() {
            match self.job.reply.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.outbox.push_front(item);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.outbox.clear();
                    return;
                }
            }
        }
    }

    fn gone(&self) -> bool {
        self.job.reply.is_closed()
    }

    fn reading_prompt(&self) -> bool {
        self.kv.len() < self.prompt.len()
    }

    /// Every token its state holds.
    fn tokens(&self) -> Vec<u32> {
        let mut tokens = self.prompt.clone();
        tokens.extend_from_slice(&self.generated);
        tokens.truncate(self.kv.len());
        tokens
    }
}

impl Worker {
    pub fn serve(mut self, mut inbox: mpsc::Receiver<Job>, place: watch::Sender<Place>) {
        let mut active: Vec<Seq> = Vec::new();
        let mut admitted = 0;
        loop {
            while active.len() < self.settings.batch {
                let job = if active.is_empty() {
                    match inbox.blocking_recv() {
                        Some(job) => job,
                        None => return,
                    }
                } else {
                    match inbox.try_recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                };
                admitted = job.ticket;
                // A client that left while it waited costs nothing.
                if job.reply.is_closed() {
                    continue;
                }
                if let Some(seq) = self.begin(job) {
                    active.push(seq);
                }
            }
            for seq in &mut active {
                seq.flush();
            }
            // Where a waiting request stands: those before it, and a place in the batch.
            let mut i = 0;
            while i < active.len() {
                let seq = &active[i];
                if seq.gone() || (seq.done && seq.outbox.is_empty()) {
                    let seq = active.swap_remove(i);
                    self.leave(seq);
                } else {
                    i += 1;
                }
            }
            place.send_if_modified(|p| {
                let now = Place {
                    admitted,
                    full: active.len() >= self.settings.batch,
                };
                std::mem::replace(p, now) != now
            });
            let ready = active.iter().any(|s| !s.done && s.outbox.len() < OUTBOX);
            if !ready {
                if !active.is_empty() {
                    // Every client is behind: give them a moment to read.
                    std::thread::park_timeout(Duration::from_millis(2));
                }
                continue;
            }
            if let Err(e) = self.step(&mut active) {
                for seq in active.iter_mut().filter(|s| !s.done) {
                    seq.send(Err(e.clone()));
                    seq.done = true;
                    // A pass that failed part way leaves a state not worth keeping.
                    seq.kv = Kv::new(&self.model.dims);
                }
            }
        }
    }

    /// Tokenises a request and finds what the cache already holds of its prompt; a request
    /// that cannot start is answered with its error.
    fn begin(&mut self, job: Job) -> Option<Seq> {
        let request: &ModelRequest = &job.request;
        let prompt = match self.chat.prompt(&request.messages) {
            Ok(prompt) => prompt,
            Err(e) => {
                let _ = job.reply.try_send(Err(e));
                return None;
            }
        };
        let context = self.settings.context;
        // `max_tokens` is a bound, not a demand: a reply gets what is left of the context
        // (and ends with `length` there), as an agent that asks for 32,000 expects.
        let max_tokens = (request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize)
            .min(context.saturating_sub(prompt.len()));
        if max_tokens == 0 {
            let e = BackendError::Rejected {
                status: 400,
                message: format!(
                    "the prompt is {} tokens; with a reply it does not fit the model's context of {context}",
                    prompt.len()
                ),
                param: Some("messages".into()),
                code: Some("context_length_exceeded".into()),
            };
            let _ = job.reply.try_send(Err(e));
            return None;
        }
        let (kv, cached) = self
            .cache
            .lookup(&prompt)
            .unwrap_or_else(|| (Kv::new(&self.model.dims), 0));
        self.meters.cached.increment(cached as u64);
        self.meters
            .computed
            .increment((prompt.len() - cached) as u64);
        let sampler = LogitsProcessor::from_sampling(
            request.seed.unwrap_or_else(random_seed),
            sampling(request.temperature, request.top_p),
        );
        Some(Seq {
            job,
            prompt,
            kv,
            generated: Vec::new(),
            next: [0],
            max_tokens,
            cached,
            sampler,
            text: TextStream::default(),
            outbox: VecDeque::new(),
            done: false,
            started: Instant::now(),
        })
    }

    /// One pass through the weights for every sequence that can take one.
    fn step(&mut self, active: &mut [Seq]) -> Result<(), BackendError> {
        let failed =
            |e: candle_core::Error| BackendError::Protocol(format!("the local model failed: {e}"));
        let mut chunk = PREFILL_CHUNK;
        let mut sampled = Vec::new();
        let mut groups = Vec::new();
        for (i, seq) in active.iter_mut().enumerate() {
            if seq.done || seq.outbox.len() >= OUTBOX {
                continue;
            }
            if seq.reading_prompt() {
                if chunk == 0 {
                    continue;
                }
                let from = seq.kv.len();
                let to = seq.prompt.len().min(from + chunk);
                chunk -= to - from;
                let logits = to == seq.prompt.len();
                if logits {
                    sampled.push(i);
                }
                groups.push(Rows {
                    kv: &mut seq.kv,
                    tokens: &seq.prompt[from..to],
                    logits,
                });
            } else {
                sampled.push(i);
                groups.push(Rows {
                    kv: &mut seq.kv,
                    tokens: &seq.next,
                    logits: true,
                });
            }
        }
        let logits = self.model.forward(&mut groups).map_err(failed)?;
        drop(groups);
        let Some(logits) = logits else {
            return Ok(());
        };
        for (row, &i) in sampled.iter().enumerate() {
            let seq = &mut active[i];
            let logits = logits.get(row).map_err(failed)?;
            let start = seq.generated.len().saturating_sub(REPEAT_WINDOW);
            let penalised = candle_transformers::utils::apply_repeat_penalty(
                &logits,
                REPEAT_PENALTY,
                &seq.generated[start..],
            )
            .map_err(failed)?;
            let token = seq.sampler.sample(&penalised).map_err(failed)?;
            self.meters.generated.increment(1);
            if self.chat.stop.contains(&token) {
                self.finish(seq, Finish::Stop);
                continue;
            }
            seq.generated.push(token);
            seq.next = [token];
            if let Some(piece) = seq.text.push(&self.chat.tokenizer, &seq.generated) {
                seq.send(Ok(Delta::Text(Text::plain(&piece))));
            }
            if seq.generated.len() == seq.max_tokens {
                self.finish(seq, Finish::Length);
            }
        }
        Ok(())
    }

    fn finish(&self, seq: &mut Seq, reason: Finish) {
        if let Some(rest) = seq.text.finish(&self.chat.tokenizer, &seq.generated) {
            seq.send(Ok(Delta::Text(Text::plain(&rest))));
        }
        seq.send(Ok(Delta::Finish(reason)));
        if seq.cached > 0 {
            seq.send(Ok(Delta::UsageDetails(
                format!(
                    r#""prompt_tokens_details":{{"cached_tokens":{}}}"#,
                    seq.cached
                )
                .into(),
            )));
        }
        seq.send(Ok(Delta::Usage(Usage::new(
            seq.prompt.len() as u32,
            seq.generated.len() as u32,
        ))));
        seq.done = true;
    }

    /// A sequence leaves the batch: what it computed stays for the next turn.
    fn leave(&mut self, seq: Seq) {
        let ms = seq.started.elapsed().as_millis() as u64;
        let old = self.average_ms.load(Ordering::Relaxed);
        self.average_ms.store((old * 7 + ms) / 8, Ordering::Relaxed);
        let tokens = seq.tokens();
        self.cache.keep(tokens, seq.kv);
    }
}

/// Temperature 0 (or none given with a seed) picks the likeliest token: the same seed and
/// temperature give the same text.
fn sampling(temperature: Option<f32>, top_p: Option<f32>) -> Sampling {
    let temperature = f64::from(temperature.unwrap_or(0.7));
    match top_p {
        _ if temperature <= 0.0 => Sampling::ArgMax,
        Some(p) if p > 0.0 && p < 1.0 => Sampling::TopP {
            p: f64::from(p),
            temperature,
        },
        _ => Sampling::All { temperature },
    }
}

fn random_seed() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}
