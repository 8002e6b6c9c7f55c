//! [`QuantizedActs`]: activations as int8 blocks of 32, quantized once per matrix-vector
//! product and read by every row.

use super::{CHUNK_ELEMS, LANES, QK};

/// `x` quantized for integer dot products: per 32-element block an `f32` scale
/// `d = max|x| / 127` and `i8` values `q = round(x / d)` (to nearest, ties to even;
/// `x ≈ d*q`, like ggml's `Q8_0`/`Q8_1`), plus per block `s = d * Σq` (an `f32`, for the min terms of `Q4_1` and
/// `Q4_K`) and the exact sums `Σq` (per block and per half block).
///
/// Storage is zero-padded to whole chunks of 16 blocks, so kernels read whole chunks
/// without bounds checks per block; the padding is never part of a result.
#[derive(Debug, Clone, Default)]
pub struct QuantizedActs {
    /// Activations quantized (not counting the padding).
    n: usize,
    /// `(n_chunks * 512)` values; block `b` is `q[32b..32b + 32]`.
    pub(super) q: Vec<i8>,
    /// `(n_chunks * 16)` block scales `d`.
    pub(super) d: Vec<f32>,
    /// `(n_chunks * 16)`: `d * (Σq as f32)` per block.
    pub(super) s: Vec<f32>,
    /// `(n_chunks * 16)`: `Σq` per block.
    pub(super) qsum: Vec<i32>,
    /// `(n_chunks * 32)`: `Σq` per half block of 16 (`Q6_K`'s sub-blocks; `|Σq| <= 2032`).
    pub(super) qsum16: Vec<i16>,
}

impl QuantizedActs {
    /// Quantizes `x` (any length; a last partial block reads as if zero-padded).
    pub fn new(x: &[f32]) -> QuantizedActs {
        let mut acts = QuantizedActs::default();
        acts.quantize_into(x);
        acts
    }

    /// Quantizes `x` into `self`, reusing its buffers.
    pub fn quantize_into(&mut self, x: &[f32]) {
        let n_chunks = x.len().div_ceil(CHUNK_ELEMS);
        self.n = x.len();
        self.q.clear();
        self.q.resize(n_chunks * CHUNK_ELEMS, 0);
        for v in [&mut self.d, &mut self.s] {
            v.clear();
            v.resize(n_chunks * LANES, 0.0);
        }
        self.qsum.clear();
        self.qsum.resize(n_chunks * LANES, 0);
        self.qsum16.clear();
        self.qsum16.resize(n_chunks * LANES * 2, 0);
        let (whole, part) = x.as_chunks::<QK>();
        let mut padded = [0.0f32; QK];
        padded[..part.len()].copy_from_slice(part);
        let xs = whole.iter().chain((!part.is_empty()).then_some(&padded));
        let blocks = self.q.as_chunks_mut::<QK>().0;
        for (b, (q, xs)) in blocks.iter_mut().zip(xs).enumerate() {
            let d = quantize_block(xs, q);
            let half = |h: usize| q[16 * h..16 * h + 16].iter().map(|&v| i16::from(v)).sum();
            let (lo, hi): (i16, i16) = (half(0), half(1));
            self.qsum16[2 * b] = lo;
            self.qsum16[2 * b + 1] = hi;
            let sum = i32::from(lo) + i32::from(hi);
            self.qsum[b] = sum;
            self.d[b] = d;
            self.s[b] = d * sum as f32;
        }
    }

    /// Activations quantized (the length of the `x` given).
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether no activations are held.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The chunks of 16 blocks, in order (one more than the whole chunks of `len()` when it
    /// ends with a part of one). Read by the x86 kernels.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn chunks(&self) -> impl Iterator<Item = Chunk<'_>> {
        let q = self.q.as_chunks::<CHUNK_ELEMS>().0.iter();
        let d = self.d.as_chunks::<LANES>().0.iter();
        let s = self.s.as_chunks::<LANES>().0.iter();
        let qsum = self.qsum.as_chunks::<LANES>().0.iter();
        let qsum16 = self.qsum16.as_chunks::<{ 2 * LANES }>().0.iter();
        q.zip(d)
            .zip(s)
            .zip(qsum)
            .zip(qsum16)
            .map(|((((q, d), s), qsum), qsum16)| Chunk {
                q,
                d,
                s,
                qsum,
                qsum16,
            })
    }

    /// Chunk `i` of [`chunks`](Self::chunks), if there is one.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn chunk(&self, i: usize) -> Option<Chunk<'_>> {
        Some(Chunk {
            q: self.q.as_chunks::<CHUNK_ELEMS>().0.get(i)?,
            d: self.d.as_chunks::<LANES>().0.get(i)?,
            s: self.s.as_chunks::<LANES>().0.get(i)?,
            qsum: self.qsum.as_chunks::<LANES>().0.get(i)?,
            qsum16: self.qsum16.as_chunks::<{ 2 * LANES }>().0.get(i)?,
        })
    }

    /// The value activation `i` stands for, `d * q` (for tests and error bounds); `None`
    /// past the end.
    pub fn dequantized(&self, i: usize) -> Option<f32> {
        (i < self.n).then(|| self.d[i / QK] * f32::from(self.q[i]))
    }
}

/// One chunk of 16 blocks of [`QuantizedActs`], as the x86 kernels read it.
#[cfg(target_arch = "x86_64")]
pub(super) struct Chunk<'a> {
    pub(super) q: &'a [i8; CHUNK_ELEMS],
    pub(super) d: &'a [f32; LANES],
    pub(super) s: &'a [f32; LANES],
    pub(super) qsum: &'a [i32; LANES],
    pub(super) qsum16: &'a [i16; 2 * LANES],
}

/// Quantizes 32 values into `q`, returns the scale `d`.
///
/// `d = amax / 127` and `q = x / d` rounded to nearest, ties to even, clamped to ±127 so
/// that every kernel's 16-bit pair sums stay exact (`2 * 128 * 127 < 2^15`). A NaN in the
/// block makes `d` NaN (and `q` 0), so it reaches the result as it would in `f32`. Written
/// in lanes of 8 without branches or calls, so that it vectorizes.
fn quantize_block(xs: &[f32; QK], q: &mut [i8; QK]) -> f32 {
    let (mut amax, mut nan) = ([0.0f32; 8], [0u32; 8]);
    for xs in xs.as_chunks::<8>().0 {
        for i in 0..8 {
            amax[i] = amax[i].max(xs[i].abs());
            nan[i] |= u32::from(xs[i].is_nan());
        }
    }
    let amax = amax.iter().fold(0.0f32, |a, &v| a.max(v));
    let d = if nan.iter().fold(0, |a, &v| a | v) != 0 {
        f32::NAN
    } else {
        amax / 127.0
    };
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // `y + 1.5 * 2^23` rounds `y` to an integer (nearest, ties to even) when `|y| < 2^22`,
    // and its bits less those of `1.5 * 2^23` are that integer; here `|y| <= 127`, or NaN
    // (then `d` is NaN too and `q` does not matter, as long as it is within ±127).
    const ROUND: f32 = 12_582_912.0;
    for (qi, &v) in q.iter_mut().zip(xs) {
        let y = (v * id + ROUND).to_bits() as i32 - ROUND.to_bits() as i32;
        *qi = y.clamp(-127, 127) as i8;
    }
    d
}
