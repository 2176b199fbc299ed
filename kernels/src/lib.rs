//! The local model's inner loops: attention for one token, a causal softmax, rotary
//! position embeddings and a fast exponential, over plain slices of `f32`.
//!
//! They live in a crate of their own so that `[profile.dev.package.sluice-kernels]` builds
//! them optimised in test builds too: at `opt-level = 0` an 8,000-token prompt would take
//! minutes. Sums run in sixteen independent lanes, which the compiler turns into vector
//! instructions without reassociating floats itself.

const LANES: usize = 16;

/// The shape of a model's attention.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    /// Floats one token's keys (or values) take.
    pub fn kv_row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Query heads that share one key-value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Attention for `n` consecutive tokens of one sequence, the first at position `past`:
/// token `i`'s queries (`q`, `n × heads × head_dim`) over the keys and values of positions
/// `0..=past + i` (rows of `kv_heads × head_dim`), written into the first `heads ×
/// head_dim` values of each row of `out` (`n` rows of `width`).
///
/// Every token goes through the same arithmetic in the same order whether it comes alone
/// (decoding), in a chunk of a prompt, or after a prefix taken from a cache: the model's
/// output does not depend on how its input was cut. Long chunks are split between two
/// threads.
pub fn attend(
    shape: Heads,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    past: usize,
    out: &mut [f32],
    width: usize,
) {
    let qw = shape.heads * shape.head_dim;
    let n = q.len() / qw;
    // Rows 0..r see past·r + r(r+1)/2 keys: cut where that is half of all, when it is worth
    // a thread.
    let work = |r: usize| past * r + r * (r + 1) / 2;
    let rows = |from: usize, q: &[f32], out: &mut [f32]| {
        pulp::Arch::new().dispatch(Rows {
            shape,
            q,
            keys,
            values,
            first: past + from,
            out,
            width,
        })
    };
    if work(n) < 32 * 1024 {
        return rows(0, q, out);
    }
    let cut = (1..n).find(|&r| 2 * work(r) >= work(n)).unwrap_or(n);
    let (q0, q1) = q.split_at(cut * qw);
    let (out0, out1) = out.split_at_mut(cut * width);
    std::thread::scope(|s| {
        s.spawn(|| rows(cut, q1, out1));
        rows(0, q0, out0);
    });
}

/// Attention for consecutive rows, the first at position `first`, with the machine's
/// vector instructions (pulp picks them at run time).
struct Rows<'a> {
    shape: Heads,
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    first: usize,
    out: &'a mut [f32],
    width: usize,
}

impl pulp::WithSimd for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Rows {
            shape,
            q,
            keys,
            values,
            first,
            out,
            width,
        } = self;
        let (kvw, hd, group) = (shape.kv_row(), shape.head_dim, shape.group());
        let qw = shape.heads * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut scores = Vec::new();
        for (i, (q, out)) in q
            .chunks_exact(qw)
            .zip(out.chunks_exact_mut(width))
            .enumerate()
        {
            let len = first + i + 1;
            scores.clear();
            scores.resize(group * len, 0.0);
            for g in 0..shape.kv_heads {
                let at = g * hd;
                for j in 0..group {
                    let h = g * group + j;
                    let (qh, _) = S::as_simd_f32s(&q[h * hd..(h + 1) * hd]);
                    let row = &mut scores[j * len..(j + 1) * len];
                    match <&[S::f32s; 8]>::try_from(qh) {
                        // 64 values a head in eight registers of eight (AVX2): the
                        // query stays in registers across the keys.
                        Ok(qh) => {
                            let qh = *qh;
                            for (t, s) in row.iter_mut().enumerate() {
                                let (key, _) =
                                    S::as_simd_f32s(&keys[t * kvw + at..t * kvw + at + hd]);
                                // A key has its query's length: eight vectors too.
                                let key: &[S::f32s; 8] =
                                    key.try_into().unwrap_or_else(|_| unreachable!());
                                let mut a = simd.mul_f32s(qh[0], key[0]);
                                let mut b = simd.mul_f32s(qh[1], key[1]);
                                for k in (2..8).step_by(2) {
                                    a = simd.mul_add_f32s(qh[k], key[k], a);
                                    b = simd.mul_add_f32s(qh[k + 1], key[k + 1], b);
                                }
                                *s = simd.reduce_sum_f32s(simd.add_f32s(a, b)) * scale;
                            }
                        }
                        Err(_) => {
                            let qs = &q[h * hd..(h + 1) * hd];
                            let (qh, qt) = S::as_simd_f32s(qs);
                            for (t, s) in row.iter_mut().enumerate() {
                                let (key, kt) =
                                    S::as_simd_f32s(&keys[t * kvw + at..t * kvw + at + hd]);
                                let mut acc = simd.splat_f32s(0.0);
                                for (a, b) in qh.iter().zip(key) {
                                    acc = simd.mul_add_f32s(*a, *b, acc);
                                }
                                let tail: f32 = qt.iter().zip(kt).map(|(a, b)| a * b).sum();
                                *s = (simd.reduce_sum_f32s(acc) + tail) * scale;
                            }
                        }
                    }
                    softmax(row);
                    let row = &scores[j * len..(j + 1) * len];
                    let (o, ot) = S::as_mut_simd_f32s(&mut out[h * hd..(h + 1) * hd]);
                    match <&mut [S::f32s; 8]>::try_from(&mut *o) {
                        Ok(o) => {
                            let mut acc = *o;
                            for (t, &p) in row.iter().enumerate() {
                                let p = simd.splat_f32s(p);
                                let (value, _) =
                                    S::as_simd_f32s(&values[t * kvw + at..t * kvw + at + hd]);
                                let value: &[S::f32s; 8] =
                                    value.try_into().unwrap_or_else(|_| unreachable!());
                                for k in 0..8 {
                                    acc[k] = simd.mul_add_f32s(p, value[k], acc[k]);
                                }
                            }
                            *o = acc;
                        }
                        Err(_) => {
                            for (t, &p) in row.iter().enumerate() {
                                let (value, vt) =
                                    S::as_simd_f32s(&values[t * kvw + at..t * kvw + at + hd]);
                                let ps = simd.splat_f32s(p);
                                for (o, v) in o.iter_mut().zip(value) {
                                    *o = simd.mul_add_f32s(ps, *v, *o);
                                }
                                for (o, v) in ot.iter_mut().zip(vt) {
                                    *o += p * v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Softmax in place.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for s in row.iter_mut() {
        *s = exp(*s - max);
    }
    let inv = 1.0 / sum(row);
    row.iter_mut().for_each(|s| *s *= inv);
}

/// Rotates each head of `row` by the angles whose cosines and sines are given, in GGML's
/// interleaved pairs (`2i`, `2i + 1`), the first `2 · cos.len()` values of each head.
pub fn rope(row: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    for head in row.chunks_exact_mut(head_dim) {
        for ((pair, c), s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0 * c - x1 * s;
            pair[1] = x0 * s + x1 * c;
        }
    }
}

/// `e^x` for `x <= 0` (softmax's case) to within 1e-6 relative, in plain arithmetic that
/// vectorises: `2^k · e^r` with `k` the integer nearest `x / ln 2` and a polynomial for
/// `e^r`, `|r| <= ln 2 / 2`.
pub fn exp(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.max(-87.0);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let k = t - SHIFT;
    // ln 2 in two parts (Cody and Waite), so that `r` keeps its precision.
    let r = x - k * 0.693_359_4 - k * -2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = (t.to_bits() as i32 - SHIFT.to_bits() as i32 + 127) << 23;
    p * f32::from_bits(bits as u32)
}

/// A sum in sixteen lanes.
pub fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] += c[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A dot product in sixteen lanes.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_the_library_one() {
        // Down to e^-87, past which f32 has only subnormals (and a softmax, nothing).
        for i in 0..=1740 {
            let x = -(i as f32) * 0.05;
            let (fast, exact) = (exp(x), x.exp());
            assert!(
                (fast - exact).abs() <= 1e-6 * exact + 1e-38,
                "{x}: {fast} vs {exact}"
            );
        }
    }

    #[test]
    fn one_token_attends_to_the_values_by_their_scores() {
        // One head of two dimensions, two keys: the second matches the query far better.
        let shape = Heads {
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
        };
        let (q, keys, values) = ([10.0, 0.0], [0.0, 1.0, 10.0, 0.0], [1.0, 2.0, 3.0, 4.0]);
        let mut out = [0.0; 2];
        attend(shape, &q, &keys, &values, 1, &mut out, 2);
        assert!(
            (out[0] - 3.0).abs() < 1e-3 && (out[1] - 4.0).abs() < 1e-3,
            "{out:?}"
        );
    }

    #[test]
    fn a_token_gets_the_same_bits_alone_or_in_a_chunk_on_any_thread() {
        let shape = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: 16,
        };
        let n = 300;
        let noise = |i: usize| ((i.wrapping_mul(2_654_435_761) % 1000) as f32 - 500.0) / 250.0;
        let q: Vec<f32> = (0..n * 96).map(noise).collect();
        let keys: Vec<f32> = (0..n * 32).map(|i| noise(i + 7)).collect();
        let values: Vec<f32> = (0..n * 32).map(|i| noise(i + 13)).collect();
        let mut chunk = vec![0.0; n * 100];
        attend(shape, &q, &keys, &values, 0, &mut chunk, 100);
        for i in [0, 1, 150, 299] {
            let mut alone = vec![0.0; 100];
            attend(
                shape,
                &q[i * 96..(i + 1) * 96],
                &keys[..(i + 1) * 32],
                &values,
                i,
                &mut alone,
                100,
            );
            assert_eq!(alone, chunk[i * 100..(i + 1) * 100], "token {i}");
        }
    }
}
