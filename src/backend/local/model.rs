//! The forward pass of a llama-family GGUF model, for many sequences at once.
//!
//! One call takes rows of tokens from several sequences, each with its own key-value state
//! ([`Kv`]) and position: a chunk of one sequence's prompt and the next token of every
//! sequence that is decoding go through the weights together, as one matrix product per
//! layer. That is what makes batched decoding cheaper than one sequence after another, and
//! a prompt's prefill a matrix product rather than a matrix-vector one.
//!
//! The weights are re-quantised to Q8_0 with their inner dimension padded with zeros to a
//! multiple of 256: candle's AVX-512 VNNI kernel (several times its AVX2 one) takes only
//! such matrices, and SmolLM2's width of 576 is not one. The residual stream is kept at the
//! padded width, its padding zero throughout; RMS norm's epsilon and weight are rescaled so
//! the norm over the padded width equals the one over the model's.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};

/// candle's fast quantised kernels want inner dimensions in multiples of this.
const ALIGN: usize = 256;
/// Prompt tokens one pass reads: big enough for a fast matrix product, small enough that
/// the sequences decoding beside it keep streaming.
pub const PREFILL_CHUNK: usize = 256;

/// The model's shape, from the GGUF metadata.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hidden: usize,
    /// `hidden` padded to [`ALIGN`].
    width: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    pub layers: usize,
    /// The context the file says the model was trained for.
    pub context: usize,
}

impl Dims {
    /// Floats a token's keys (or values) take in one layer.
    fn kv_row(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

struct Layer {
    attn_norm: Tensor,
    /// Queries, keys and values: one product, as they share their input.
    qkv: Shared<3>,
    o: QMatMul,
    ffn_norm: Tensor,
    /// Gate and up projections, likewise.
    gate_up: Shared<2>,
    down: QMatMul,
}

pub struct Llama {
    pub dims: Dims,
    /// Token embeddings, `(vocab, width)`.
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: QMatMul,
    eps: f32,
    /// RoPE's cosines and sines, `context × rope_dim / 2`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    rope_dim: usize,
}

/// One sequence's keys and values: per layer, a token's keys (then values) as one row.
#[derive(Clone)]
pub struct Kv {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    row: usize,
}

impl Kv {
    pub fn new(dims: &Dims) -> Self {
        Kv {
            keys: vec![Vec::new(); dims.layers],
            values: vec![Vec::new(); dims.layers],
            len: 0,
            row: dims.kv_row(),
        }
    }

    /// Tokens it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of its first `n` tokens.
    pub fn prefix(&self, n: usize) -> Kv {
        let n = n.min(self.len);
        let cut = |rows: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            rows.iter().map(|r| r[..n * self.row].to_vec()).collect()
        };
        Kv {
            keys: cut(&self.keys),
            values: cut(&self.values),
            len: n,
            row: self.row,
        }
    }

    /// Bytes a token takes in every layer, keys and values.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.keys.len() * self.row * std::mem::size_of::<f32>()
    }

    /// Keeps only its first `n` tokens.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
        let floats = self.len * self.row;
        self.keys.iter_mut().for_each(|k| k.truncate(floats));
        self.values.iter_mut().for_each(|v| v.truncate(floats));
    }

    /// Memory it takes, in bytes.
    pub fn bytes(&self) -> usize {
        let floats: usize = self
            .keys
            .iter()
            .chain(&self.values)
            .map(Vec::capacity)
            .sum();
        floats * std::mem::size_of::<f32>()
    }

    pub fn shrink(&mut self) {
        self.keys.iter_mut().for_each(Vec::shrink_to_fit);
        self.values.iter_mut().for_each(Vec::shrink_to_fit);
    }
}

/// Matrices that take the same input: candle quantises it once and runs them in one
/// parallel region.
struct Shared<const N: usize>([Arc<QTensor>; N]);

impl<const N: usize> Shared<N> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<[Tensor; N]> {
        let ws: Vec<&QTensor> = self.0.iter().map(|w| w.as_ref()).collect();
        let outs = match QTensor::gemv_fused_shared_lhs(&ws, x)? {
            Some(outs) => outs,
            None => self
                .0
                .iter()
                .map(|w| QMatMul::from_arc(w.clone())?.forward(x))
                .collect::<candle_core::Result<_>>()?,
        };
        outs.try_into()
            .map_err(|_| candle_core::Error::Msg("a fused product lost a part".into()))
    }
}

/// Some consecutive tokens of one sequence, fed at the position its state has reached.
pub struct Rows<'a> {
    pub kv: &'a mut Kv,
    pub tokens: &'a [u32],
    /// Whether the logits after its last token are wanted.
    pub logits: bool,
}

impl Llama {
    pub fn load(content: gguf_file::Content, file: &mut std::fs::File) -> anyhow::Result<Self> {
        let device = Device::Cpu;
        let meta = |key: &str| {
            content
                .metadata
                .get(&format!("llama.{key}"))
                .with_context(|| format!("the GGUF file has no llama.{key}"))
        };
        let count = |key: &str| -> anyhow::Result<usize> { Ok(meta(key)?.to_u32()? as usize) };
        let hidden = count("embedding_length")?;
        let heads = count("attention.head_count")?;
        let dims = Dims {
            hidden,
            width: hidden.next_multiple_of(ALIGN),
            heads,
            kv_heads: count("attention.head_count_kv")?,
            head_dim: hidden / heads,
            layers: count("block_count")?,
            context: count("context_length").unwrap_or(4096),
        };
        let rope_dim = count("rope.dimension_count").unwrap_or(dims.head_dim);
        let base = meta("rope.freq_base")
            .and_then(|v| Ok(v.to_f32()?))
            .unwrap_or(10_000.0);
        let eps = meta("attention.layer_norm_rms_epsilon")
            .and_then(|v| Ok(v.to_f32()?))
            .unwrap_or(1e-5);
        let mut tensor = |name: &str| {
            content
                .tensor(file, name, &device)
                .with_context(|| format!("the GGUF file has no {name}"))
        };
        let embed_q = tensor("token_embd.weight")?;
        let embed = embed_q.dequantize(&device)?;
        let head = match tensor("output.weight") {
            Ok(head) => head.dequantize(&device)?,
            Err(_) => embed.clone(),
        };
        let embed = embed.pad_with_zeros(1, 0, dims.width - hidden)?;
        // Over the padded width, mean(x²) is hidden/width of the model's: scaling epsilon and
        // the weight by that ratio (its square root) gives the model's norm exactly.
        let ratio = hidden as f32 / dims.width as f32;
        let norm = |t: QTensor| -> anyhow::Result<Tensor> {
            Ok(
                (t.dequantize(&device)? * f64::from(ratio.sqrt()))?.pad_with_zeros(
                    0,
                    0,
                    dims.width - hidden,
                )?,
            )
        };
        let mut layers = Vec::with_capacity(dims.layers);
        for i in 0..dims.layers {
            let mut w = |name: &str| tensor(&format!("blk.{i}.{name}.weight"));
            layers.push(Layer {
                attn_norm: norm(w("attn_norm")?)?,
                qkv: Shared([
                    quantized(w("attn_q")?.dequantize(&device)?)?,
                    quantized(w("attn_k")?.dequantize(&device)?)?,
                    quantized(w("attn_v")?.dequantize(&device)?)?,
                ]),
                o: matrix(w("attn_output")?.dequantize(&device)?)?,
                ffn_norm: norm(w("ffn_norm")?)?,
                gate_up: Shared([
                    quantized(w("ffn_gate")?.dequantize(&device)?)?,
                    quantized(w("ffn_up")?.dequantize(&device)?)?,
                ]),
                down: matrix(w("ffn_down")?.dequantize(&device)?)?,
            });
        }
        let context = dims.context;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in 0..context {
            for i in 0..rope_dim / 2 {
                let angle = pos as f32 / base.powf(2.0 * i as f32 / rope_dim as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let model = Llama {
            dims,
            embed,
            layers,
            norm: norm(tensor("output_norm.weight")?)?,
            head: matrix(head)?,
            eps: eps * ratio,
            cos,
            sin,
            rope_dim,
        };
        // candle lays the weights out for its kernel on their first use: now, not on the
        // first request.
        model.forward(&mut [Rows {
            kv: &mut Kv::new(&dims),
            tokens: &[0, 0],
            logits: true,
        }])?;
        Ok(model)
    }

    /// Feeds each group of rows to the model, extending its state, and returns the logits
    /// after the last token of each group that asks for them, in order: `(groups, vocab)`.
    pub fn forward(&self, groups: &mut [Rows<'_>]) -> candle_core::Result<Option<Tensor>> {
        let device = Device::Cpu;
        let d = self.dims;
        let ids: Vec<u32> = groups
            .iter()
            .flat_map(|g| g.tokens.iter().copied())
            .collect();
        let rows = ids.len();
        if rows == 0 {
            return Ok(None);
        }
        let mut positions = Vec::with_capacity(rows);
        let mut lasts = Vec::new();
        for g in groups.iter() {
            if g.kv.len + g.tokens.len() > d.context {
                candle_core::bail!("the sequence is longer than the model's context");
            }
            positions.extend(g.kv.len..g.kv.len + g.tokens.len());
            if g.logits {
                lasts.push((positions.len() - 1) as u32);
            }
        }
        let mut x = self
            .embed
            .index_select(&Tensor::new(ids.as_slice(), &device)?, 0)?;
        let (qw, kvw) = (d.heads * d.head_dim, d.kv_row());
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.eps)?;
            let [q, k, v] = layer.qkv.forward(&h)?;
            let mut q = q.flatten_all()?.to_vec1::<f32>()?;
            let mut k = k.flatten_all()?.to_vec1::<f32>()?;
            let v = v.flatten_all()?.to_vec1::<f32>()?;
            for (r, &pos) in positions.iter().enumerate() {
                self.rope(&mut q[r * qw..(r + 1) * qw], pos);
                self.rope(&mut k[r * kvw..(r + 1) * kvw], pos);
            }
            let mut out = vec![0f32; rows * d.width];
            let mut row = 0;
            for g in groups.iter_mut() {
                let n = g.tokens.len();
                g.kv.keys[l].extend_from_slice(&k[row * kvw..(row + n) * kvw]);
                g.kv.values[l].extend_from_slice(&v[row * kvw..(row + n) * kvw]);
                row += n;
            }
            self.attend(l, groups, &q, &mut out);
            let attended = Tensor::from_vec(out, (rows, d.width), &device)?;
            x = (x + self.widen(layer.o.forward(&attended)?)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.eps)?;
            let [gate, up] = layer.gate_up.forward(&h)?;
            let gated = (gate.silu()? * up)?;
            x = (x + self.widen(layer.down.forward(&gated)?)?)?;
        }
        for g in groups.iter_mut() {
            g.kv.len += g.tokens.len();
        }
        if lasts.is_empty() {
            return Ok(None);
        }
        let last = x.index_select(&Tensor::new(lasts.as_slice(), &device)?, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, self.eps)?;
        Ok(Some(self.head.forward(&last)?))
    }

    /// Attention of layer `l` for every group, its keys and values already appended, into
    /// `out` (rows of the residual width). Several sequences attend on both cores (candle's
    /// pool, whose threads would otherwise wait for this one), each on one: the same
    /// arithmetic as alone, so a sequence's tokens do not depend on its company.
    fn attend(&self, l: usize, groups: &[Rows<'_>], q: &[f32], out: &mut [f32]) {
        let (width, qw) = (self.dims.width, self.dims.heads * self.dims.head_dim);
        let mut tasks = Vec::with_capacity(groups.len());
        let (mut q, mut out) = (q, out);
        for g in groups {
            let n = g.tokens.len();
            let (mine, rest) = q.split_at(n * qw);
            let (into, more) = std::mem::take(&mut out).split_at_mut(n * width);
            (q, out) = (rest, more);
            tasks.push(std::sync::Mutex::new((g, mine, into)));
        }
        let run = |task: &std::sync::Mutex<(&Rows<'_>, &[f32], &mut [f32])>| {
            let mut task = task.lock().unwrap_or_else(|e| e.into_inner());
            let (g, q, into) = &mut *task;
            sluice_kernels::attend(
                self.heads(),
                q,
                &g.kv.keys[l],
                &g.kv.values[l],
                g.kv.len,
                into,
                width,
            );
        };
        match tasks.as_slice() {
            [one] => run(one),
            _ => candle_core::utils::barrier_pool()
                .execute_chunked(tasks.len(), |range| tasks[range].iter().for_each(run)),
        }
    }

    /// A matrix's output of the model's width, padded to the residual stream's: padding
    /// the matrix's rows instead would read a quarter more weights per token.
    fn widen(&self, x: Tensor) -> candle_core::Result<Tensor> {
        x.pad_with_zeros(1, 0, self.dims.width - self.dims.hidden)
    }

    /// Rotates each head of one row by its position (GGML's interleaved pairs).
    fn rope(&self, row: &mut [f32], pos: usize) {
        let half = self.rope_dim / 2;
        let (cos, sin) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        sluice_kernels::rope(row, self.dims.head_dim, cos, sin);
    }

    fn heads(&self) -> sluice_kernels::Heads {
        sluice_kernels::Heads {
            heads: self.dims.heads,
            kv_heads: self.dims.kv_heads,
            head_dim: self.dims.head_dim,
        }
    }
}

/// A weight `(n, k)` as candle's fast kernel takes it: `k` padded to [`ALIGN`], Q8_0.
fn matrix(w: Tensor) -> anyhow::Result<QMatMul> {
    Ok(QMatMul::from_arc(quantized(w)?)?)
}

fn quantized(w: Tensor) -> anyhow::Result<Arc<QTensor>> {
    let (_, k) = w.dims2()?;
    let w = w
        .to_dtype(DType::F32)?
        .pad_with_zeros(D::Minus1, 0, k.next_multiple_of(ALIGN) - k)?;
    Ok(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?))
}

/// Loads a model for measurements and tests.
pub fn load(path: &Path) -> anyhow::Result<Llama> {
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("SLUICE_LOCAL_MODEL: cannot open {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .with_context(|| format!("SLUICE_LOCAL_MODEL: {} is not a GGUF file", path.display()))?;
    Llama::load(content, &mut file)
}
