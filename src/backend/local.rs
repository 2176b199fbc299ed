//! The local model: a GGUF llama-family model (SmolLM2-135M-Instruct by default) run by
//! candle inside the process, so sluice chats with no network and no key.
//!
//! One thread owns the model and takes requests one at a time from a bounded queue. Each
//! request streams its tokens back through a small bounded channel; when the client leaves,
//! the receiving end is dropped and generation stops before its next token.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::{MAX_SEQ_LEN, ModelWeights};
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, watch};

use super::{Backend, BackendError, ChatRequest, Delta, DeltaStream, Message, Text, Usage};

/// The name clients ask for.
pub const MODEL_NAME: &str = "smollm2";
/// Reply length when a request sets no `max_tokens`.
const DEFAULT_MAX_TOKENS: u32 = 512;
/// Tokens that may wait between the model and a client that reads slowly.
const CHANNEL_TOKENS: usize = 4;
/// Small models loop without it; llama.cpp's classic default.
const REPEAT_PENALTY: f32 = 1.1;
const REPEAT_WINDOW: usize = 64;

type Reply = mpsc::Sender<Result<Delta, BackendError>>;

struct Job {
    ticket: u64,
    request: ChatRequest,
    reply: Reply,
}

pub struct LocalBackend {
    jobs: mpsc::Sender<Job>,
    /// Tickets number the accepted requests 1, 2, 3...; the model publishes the last one it
    /// finished, so a waiting request has `ticket - 1 - finished` ahead of it.
    finished: watch::Receiver<u64>,
    next_ticket: Arc<std::sync::Mutex<u64>>,
    /// A running average of how long a request holds the model, for Retry-After.
    average_ms: Arc<AtomicU64>,
}

impl LocalBackend {
    /// Loads the model (a second or two) and starts its thread. `queue` requests may wait.
    pub fn start(path: &Path, queue: usize, generated: metrics::Counter) -> anyhow::Result<Self> {
        let started = Instant::now();
        let model = Model::load(path)?;
        tracing::info!(
            model = MODEL_NAME,
            file = %path.display(),
            load_ms = started.elapsed().as_millis() as u64,
            "local model loaded"
        );
        let (jobs, inbox) = mpsc::channel(queue.max(1));
        let (finished_tx, finished) = watch::channel(0);
        let average_ms = Arc::new(AtomicU64::new(2_000));
        let worker_average = average_ms.clone();
        std::thread::Builder::new()
            .name("local-model".into())
            .spawn(move || model.serve(inbox, finished_tx, worker_average, generated))
            .context("cannot start the local model's thread")?;
        Ok(LocalBackend {
            jobs,
            finished,
            next_ticket: Arc::new(std::sync::Mutex::new(1)),
            average_ms,
        })
    }
}

impl Backend for LocalBackend {
    fn stream(&self, request: ChatRequest) -> DeltaStream {
        let jobs = self.jobs.clone();
        let mut finished = self.finished.clone();
        let next_ticket = self.next_ticket.clone();
        let average = Duration::from_millis(self.average_ms.load(Ordering::Relaxed));
        Box::pin(async_stream::stream! {
            let (reply, mut tokens) = mpsc::channel(CHANNEL_TOKENS);
            // A ticket only for a request the queue takes: a refused one would leave a gap
            // that no finished request ever closes.
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
                    let waiting = jobs.max_capacity() as u32 + 1;
                    yield Err(BackendError::Overloaded {
                        message: format!("the local model's queue of {} is full", waiting - 1),
                        retry_after: average * waiting,
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
                let done = *finished.borrow_and_update();
                let ahead = ticket.saturating_sub(done + 1) as usize;
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
                    changed = finished.changed() => if changed.is_err() { break },
                }
            }
            while let Some(item) = tokens.recv().await {
                yield item;
            }
        })
    }
}

/// The model, its tokenizer and chat template: owned by the model's thread.
struct Model {
    weights: ModelWeights,
    tokenizer: Tokenizer,
    template: minijinja::Environment<'static>,
    /// End-of-turn and end-of-text tokens.
    stop: Vec<u32>,
    bos: String,
    eos: String,
}

impl Model {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("SLUICE_LOCAL_MODEL: cannot open {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file).with_context(|| {
            format!("SLUICE_LOCAL_MODEL: {} is not a GGUF file", path.display())
        })?;
        let tokenizer = tokenizer(&content)?;
        let text = |key: &str| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_string().ok())
                .cloned()
        };
        let token = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let piece = |id: Option<u32>| {
            id.and_then(|id| tokenizer.id_to_token(id))
                .unwrap_or_default()
        };
        let bos = piece(token("tokenizer.ggml.bos_token_id"));
        let eos = piece(token("tokenizer.ggml.eos_token_id"));
        let mut stop: Vec<u32> = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        stop.extend(token("tokenizer.ggml.eos_token_id"));
        let mut template = minijinja::Environment::new();
        template.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        template
            .add_template_owned(
                "chat",
                text("tokenizer.chat_template").unwrap_or_else(|| CHATML.to_owned()),
            )
            .context("the model's chat template does not parse")?;
        let weights = weights(content, &mut file, true)?;
        Ok(Model {
            weights,
            tokenizer,
            template,
            stop,
            bos,
            eos,
        })
    }

    /// The model's thread: one request at a time, until sluice stops.
    fn serve(
        mut self,
        mut inbox: mpsc::Receiver<Job>,
        finished: watch::Sender<u64>,
        average_ms: Arc<AtomicU64>,
        generated: metrics::Counter,
    ) {
        while let Some(job) = inbox.blocking_recv() {
            // A client that left while it waited costs nothing.
            if !job.reply.is_closed() {
                let started = Instant::now();
                if let Err(e) = self.generate(&job.request, &job.reply, &generated) {
                    let _ = job.reply.blocking_send(Err(e));
                }
                let ms = started.elapsed().as_millis() as u64;
                let old = average_ms.load(Ordering::Relaxed);
                average_ms.store((old * 7 + ms) / 8, Ordering::Relaxed);
            }
            finished.send_replace(job.ticket);
        }
    }

    fn prompt(&self, messages: &[Message]) -> Result<String, BackendError> {
        let messages: Vec<_> = messages
            .iter()
            .map(|m| minijinja::context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        self.template
            .get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => self.bos.as_str(),
                    eos_token => self.eos.as_str(),
                })
            })
            .map_err(|e| BackendError::Protocol(format!("the chat template failed: {e}")))
    }

    /// Generates a reply into `reply`; returns early, quietly, when the client has left.
    fn generate(
        &mut self,
        request: &ChatRequest,
        reply: &Reply,
        generated: &metrics::Counter,
    ) -> Result<(), BackendError> {
        let failed =
            |e: candle_core::Error| BackendError::Protocol(format!("the local model failed: {e}"));
        let prompt = self.prompt(&request.messages)?;
        let prompt = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| BackendError::Protocol(format!("cannot tokenize the prompt: {e}")))?
            .get_ids()
            .to_vec();
        // `max_tokens` is a bound, not a demand: a reply gets what is left of the context
        // (and ends with `length` there), as an agent that asks for 32,000 expects.
        let max_tokens = (request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize)
            .min(MAX_SEQ_LEN.saturating_sub(prompt.len()));
        if max_tokens == 0 {
            return Err(BackendError::Rejected {
                status: 400,
                message: format!(
                    "the prompt is {} tokens; with a reply it does not fit the model's context of {MAX_SEQ_LEN}",
                    prompt.len()
                ),
                param: Some("messages".into()),
                code: Some("context_length_exceeded".into()),
            });
        }
        let mut sampler = LogitsProcessor::from_sampling(
            request.seed.unwrap_or_else(random_seed),
            sampling(request.temperature, request.top_p),
        );

        self.weights.clear_kv_cache();
        let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .map_err(failed)?;
        let mut logits = self
            .weights
            .forward(&input, 0)
            .and_then(|l| l.squeeze(0))
            .map_err(failed)?;
        let mut tokens: Vec<u32> = Vec::with_capacity(max_tokens);
        let mut text = TextStream::default();
        let finish = loop {
            if tokens.len() == max_tokens {
                break "length";
            }
            let start = tokens.len().saturating_sub(REPEAT_WINDOW);
            let penalised = candle_transformers::utils::apply_repeat_penalty(
                &logits,
                REPEAT_PENALTY,
                &tokens[start..],
            )
            .map_err(failed)?;
            let next = sampler.sample(&penalised).map_err(failed)?;
            generated.increment(1);
            if self.stop.contains(&next) {
                break "stop";
            }
            tokens.push(next);
            if let Some(piece) = text.push(&self.tokenizer, &tokens)
                && reply
                    .blocking_send(Ok(Delta::Text(Text::plain(&piece))))
                    .is_err()
            {
                return Ok(());
            }
            if reply.is_closed() {
                return Ok(()); // Not one more token for a client that has gone.
            }
            let input = Tensor::new(&[next], &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .map_err(failed)?;
            logits = self
                .weights
                .forward(&input, prompt.len() + tokens.len() - 1)
                .and_then(|l| l.squeeze(0))
                .map_err(failed)?;
        };
        if let Some(rest) = text.finish(&self.tokenizer, &tokens) {
            let _ = reply.blocking_send(Ok(Delta::Text(Text::plain(&rest))));
        }
        let _ = reply.blocking_send(Ok(Delta::Finish(finish.into())));
        let _ = reply.blocking_send(Ok(Delta::Usage(Usage::new(
            prompt.len() as u32,
            tokens.len() as u32,
        ))));
        Ok(())
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

/// The model's tokenizer from the GGUF, with SmolLM's pre-tokenizer: candle's guess for
/// `smollm` prefixes a space and gives ids that differ from the model's training.
fn tokenizer(content: &gguf_file::Content) -> anyhow::Result<Tokenizer> {
    use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence};
    let mut tokenizer = Tokenizer::from_gguf(content)
        .context("SLUICE_LOCAL_MODEL: no tokenizer in the GGUF file")?;
    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    if pre == Some("smollm") {
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
    }
    Ok(tokenizer)
}

/// The weights of the model at `path`, as the backend loads them (`requantize`) or as the
/// file ships them: for benchmarks.
pub fn load_weights(path: &Path, requantize: bool) -> anyhow::Result<ModelWeights> {
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    weights(content, &mut file, requantize)
}

/// Loads the weights, re-quantising 4- and 5-bit blocks to Q8_0 when asked: candle has no
/// SIMD kernel for Q4_1, and its Q8_0 kernel runs about 2.6 times as fast here (docs/src/local-model.md).
fn weights(
    content: gguf_file::Content,
    file: &mut std::fs::File,
    requantize: bool,
) -> anyhow::Result<ModelWeights> {
    let device = Device::Cpu;
    if !requantize {
        return Ok(ModelWeights::from_gguf(content, file, &device)?);
    }
    let mut tensors = Vec::with_capacity(content.tensor_infos.len());
    for name in content.tensor_infos.keys() {
        let tensor = content.tensor(file, name, &device)?;
        let slow = matches!(
            tensor.dtype(),
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
        );
        let blocks_fit = tensor.shape().dims().last().is_some_and(|d| d % 32 == 0);
        let tensor = if slow && blocks_fit {
            QTensor::quantize(&tensor.dequantize(&device)?, GgmlDType::Q8_0)?
        } else {
            tensor
        };
        tensors.push((name.clone(), tensor));
    }
    // The rewritten file uses GGUF's default alignment.
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut buffer = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buffer, &metadata, &tensors)?;
    buffer.set_position(0);
    let content = gguf_file::Content::read(&mut buffer)?;
    Ok(ModelWeights::from_gguf(content, &mut buffer, &device)?)
}

/// Turns tokens into text in whole UTF-8 characters: a token that ends inside a multi-byte
/// character is held until the character is complete. Decoding a short window of tokens
/// rather than one token alone keeps the spaces that byte-level BPE attaches to words.
#[derive(Default)]
pub struct TextStream {
    /// Start of the window: tokens before it are sent and no longer needed as context.
    start: usize,
    /// Tokens before this index have been sent.
    sent: usize,
}

impl TextStream {
    /// The new text that the last of `tokens` (every token so far) completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, tokens: &[u32]) -> Option<String> {
        let piece = self.unsent(tokenizer, tokens)?;
        if piece.ends_with('\u{FFFD}') {
            return None; // A character is cut in two: wait for the rest of it.
        }
        self.start = self.sent;
        self.sent = tokens.len();
        Some(piece)
    }

    /// Whatever text is still held when generation ends.
    pub fn finish(&mut self, tokenizer: &Tokenizer, tokens: &[u32]) -> Option<String> {
        let piece = self.unsent(tokenizer, tokens)?;
        self.sent = tokens.len();
        Some(piece)
    }

    fn unsent(&self, tokenizer: &Tokenizer, tokens: &[u32]) -> Option<String> {
        let sent = tokenizer
            .decode(&tokens[self.start..self.sent], true)
            .ok()?;
        let all = tokenizer.decode(&tokens[self.start..], true).ok()?;
        all.get(sent.len()..)
            .filter(|piece| !piece.is_empty())
            .map(str::to_owned)
    }
}

const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The tokenizer of the model at `path`, for tests of text streaming.
pub fn load_tokenizer(path: &Path) -> anyhow::Result<Tokenizer> {
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    tokenizer(&content)
}
