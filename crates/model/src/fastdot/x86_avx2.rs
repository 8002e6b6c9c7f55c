//! AVX2 kernels: `vpmaddubsw` (u8 × i8 → pairs summed into i16) then `vpmaddwd` (i16
//! pairs into i32), ggml's AVX2 recipe.
//!
//! A row is read in chunks of 16 blocks, as two halves of 8. Each block gives one register
//! of eight i32 partial sums; [`block_sums`] folds a half's 8 registers into one vector of
//! its 8 block sums, block `b` in lane `b`. The float terms then go into 16 float lanes
//! (two registers) with the same operations as `portable.rs`, so the bits agree.
//!
//! No 16-bit sum can saturate: activations are clamped to ±127, so a pair is at most
//! `2 * 128 * 127` (`Q8_0`, weights as magnitude with the sign moved onto `x`), `2 * 15 *
//! 127` (4-bit) or `2 * 63 * 127` (`Q6_K`).

use std::arch::x86_64::*;

use super::acts::Chunk;
use super::{LANES, QuantizedActs, le_u32, unpack_scales_q4_k};
use crate::quant::DType;

/// Proof that the running CPU has AVX2 and F16C: only [`detect`] makes one.
///
/// [`detect`]: Avx2::detect
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Avx2(());

impl Avx2 {
    pub(super) fn detect() -> Option<Avx2> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")).then_some(Avx2(()))
    }

    /// Precondition (checked in `mod.rs`): `dtype` is supported, `row_bytes` is its row
    /// length for `x.len()` activations (not 0), and `rows.len() == out.len() * row_bytes`.
    pub(super) fn dot_rows(
        self,
        dtype: DType,
        rows: &[u8],
        row_bytes: usize,
        x: &QuantizedActs,
        out: &mut [f32],
    ) {
        // SAFETY: an `Avx2` exists only if `detect` saw AVX2 and F16C on this CPU.
        unsafe { dot_rows(dtype, rows, row_bytes, x, out) }
    }
}

/// Format tags for the const-generic kernels (each paired with its bytes per chunk).
const Q8_0: usize = 0;
const Q4_0: usize = 1;
const Q4_1: usize = 2;
const Q4_K: usize = 3;
const Q6_K: usize = 4;

/// Sixteen float lanes: `[lanes 0..8, lanes 8..16]`.
type Lanes = [__m256; 2];

#[target_feature(enable = "avx2,f16c")]
fn dot_rows(dtype: DType, rows: &[u8], row_bytes: usize, x: &QuantizedActs, out: &mut [f32]) {
    let rows = rows.chunks_exact(row_bytes);
    match dtype {
        DType::Q8_0 => run::<Q8_0, { 16 * 34 }>(rows, x, out),
        DType::Q4_0 => run::<Q4_0, { 16 * 18 }>(rows, x, out),
        DType::Q4_1 => run::<Q4_1, { 16 * 20 }>(rows, x, out),
        DType::Q4_K => run::<Q4_K, { 2 * 144 }>(rows, x, out),
        DType::Q6_K => run::<Q6_K, { 2 * 210 }>(rows, x, out),
        DType::F32 | DType::F16 | DType::BF16 => out.fill(f32::NAN),
    }
}

#[target_feature(enable = "avx2,f16c")]
fn run<const F: usize, const N: usize>(
    rows: std::slice::ChunksExact<'_, u8>,
    x: &QuantizedActs,
    out: &mut [f32],
) {
    for (row, y) in rows.zip(out) {
        *y = dot_row::<F, N>(row, x);
    }
}

/// One row: whole chunks, then a last partial chunk, its missing blocks masked out of the
/// float lanes.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn dot_row<const F: usize, const N: usize>(row: &[u8], x: &QuantizedActs) -> f32 {
    let (whole, tail) = row.as_chunks::<N>();
    let mut chunks = x.chunks();
    let mut acc = [_mm256_setzero_ps(); 2];
    for (w, c) in whole.iter().zip(&mut chunks) {
        let t = terms::<F, N, false>(w, LANES, &c);
        acc = [_mm256_add_ps(acc[0], t[0]), _mm256_add_ps(acc[1], t[1])];
    }
    if !tail.is_empty()
        && let Some(c) = chunks.next()
    {
        let n_blocks = tail.len() * LANES / N;
        let t = terms::<F, N, true>(tail, n_blocks, &c);
        let n_blocks = n_blocks as i32;
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (h, (acc, t)) in acc.iter_mut().zip(t).enumerate() {
            let live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n_blocks - 8 * h as i32), lane);
            *acc = _mm256_blendv_ps(*acc, _mm256_add_ps(*acc, t), _mm256_castsi256_ps(live));
        }
    }
    hsum(acc)
}

/// `lane[j] += lane[j + h]` for `h` = 8, 4, 2, 1; returns lane 0.
#[target_feature(enable = "avx2")]
#[inline]
fn hsum(acc: Lanes) -> f32 {
    let v = _mm256_add_ps(acc[0], acc[1]);
    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

/// The float terms of the first `n_blocks` blocks of a chunk, `w` (block `b` in lane `b`;
/// lanes past `n_blocks` hold junk). Precondition: `w` holds `n_blocks` blocks; `n_blocks`
/// is 16 unless `PARTIAL`, and 8 or 16 for the K-quants.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn terms<const F: usize, const N: usize, const PARTIAL: bool>(
    w: &[u8],
    n_blocks: usize,
    c: &Chunk<'_>,
) -> Lanes {
    const { assert!(N == [16 * 34, 16 * 18, 16 * 20, 2 * 144, 2 * 210][F]) };
    // A constant for whole chunks, so that their loops unroll without checks.
    let n_blocks = if PARTIAL { n_blocks } else { LANES };
    let mut out = [_mm256_setzero_ps(); 2];
    for (h, out) in out.iter_mut().enumerate() {
        // Blocks of this half present in `w`.
        let n = n_blocks.saturating_sub(8 * h).min(8);
        if n == 0 {
            continue;
        }
        let dx = load_ps(&c.d[8 * h..]);
        let s = load_ps(&c.s[8 * h..]);
        let xq = &c.q[256 * h..];
        *out = match F {
            Q4_K => q4_k_terms(&w[(N / 2) * h..N / 2 * (h + 1)], xq, dx, s),
            Q6_K => q6_k_terms(
                &w[(N / 2) * h..N / 2 * (h + 1)],
                xq,
                &c.qsum16[16 * h..],
                dx,
            ),
            _ => {
                let bb = N / LANES;
                let w = &w[8 * bb * h..];
                // The nibbles (`Q4_*`) or `i8`s (`Q8_0`) of a block start after its f16s.
                let at = [2, 2, 4][F];
                let mut parts = [_mm256_setzero_si256(); 8];
                for (b, part) in parts.iter_mut().enumerate().take(n) {
                    let (wb, x) = (&w[bb * b + at..], load256(&xq[32 * b..]));
                    *part = if F == Q8_0 {
                        dot_i8(load256(wb), x)
                    } else {
                        dot_u8(nibbles(wb), x)
                    };
                }
                let mut isum = block_sums(parts);
                if F == Q4_0 {
                    let qsum = load256(&c.qsum[8 * h..]);
                    isum = _mm256_sub_epi32(isum, _mm256_slli_epi32::<3>(qsum));
                }
                // Each block starts with its f16 `d` (and for `Q4_1` its f16 `m`).
                let idx = _mm256_mullo_epi32(lane_index(), _mm256_set1_epi32(bb as i32));
                let live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane_index());
                assert!(w.len() >= n * bb);
                // SAFETY: live lane `b < n` reads `w[bb*b..bb*b + 4]`, inside `w` (asserted,
                // and `bb >= 18`); the others read nothing.
                let head = unsafe {
                    _mm256_mask_i32gather_epi32::<1>(
                        _mm256_setzero_si256(),
                        w.as_ptr().cast(),
                        idx,
                        live,
                    )
                };
                let d = f16_low_halves(head);
                let t = _mm256_mul_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(isum));
                if F == Q4_1 {
                    let m = f16_low_halves(_mm256_srli_epi32::<16>(head));
                    _mm256_add_ps(t, _mm256_mul_ps(m, s))
                } else {
                    t
                }
            }
        };
    }
    out
}

// ---------------------------------------------------------------------------------------
// Integer pieces
// ---------------------------------------------------------------------------------------

/// `[0, 1, .., 7]`.
#[target_feature(enable = "avx2")]
#[inline]
fn lane_index() -> __m256i {
    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
}

/// The 8 floats at the start of `v`.
#[target_feature(enable = "avx2")]
#[inline]
fn load_ps(v: &[f32]) -> __m256 {
    assert!(v.len() >= 8);
    // SAFETY: `v` holds at least 8 floats (asserted as in `load256`).
    unsafe { _mm256_loadu_ps(v.as_ptr()) }
}

/// The 32 bytes at the start of `v`.
#[target_feature(enable = "avx2")]
#[inline]
fn load256<T>(v: &[T]) -> __m256i {
    assert!(size_of_val(v) >= 32);
    // SAFETY: `v` holds at least 32 bytes (asserted; the callers' constant offsets make the
    // check compile away).
    unsafe { _mm256_loadu_si256(v.as_ptr().cast()) }
}

/// The 16 bytes at the start of `v`.
#[target_feature(enable = "avx2")]
#[inline]
fn load128<T>(v: &[T]) -> __m128i {
    assert!(size_of_val(v) >= 16);
    // SAFETY: `v` holds at least 16 bytes (asserted as in `load256`).
    unsafe { _mm_loadu_si128(v.as_ptr().cast()) }
}

/// A 4-bit block (the 16 bytes at `v`) as 32 bytes in element order: low nibbles, then high.
#[target_feature(enable = "avx2")]
#[inline]
fn nibbles(v: &[u8]) -> __m256i {
    let t = load128(v);
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(t), t);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// `Σ w*x` per i32 lane (4 products each) for unsigned `w` (< 128) and signed `x`.
#[target_feature(enable = "avx2")]
#[inline]
fn dot_u8(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

/// `Σ w*x` per i32 lane for signed `w` and `x` (`x != -128`): `|w| * (x with w's sign)`.
#[target_feature(enable = "avx2")]
#[inline]
fn dot_i8(w: __m256i, x: __m256i) -> __m256i {
    dot_u8(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w))
}

/// Folds 8 registers of i32 partial sums, register `b` holding block `b`, into the 8 block
/// sums (block `b` in lane `b`).
#[target_feature(enable = "avx2")]
#[inline]
fn block_sums(p: [__m256i; 8]) -> __m256i {
    // Both 128-bit halves of q0 hold blocks [0, 1, 2, 3], each half a partial sum; q1 the
    // same for blocks 4..8.
    let q0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    let q1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(q0, q1),
        _mm256_permute2x128_si256::<0x31>(q0, q1),
    )
}

/// The low 16 bits of each i32 lane, as f16s, widened.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn f16_low_halves(v: __m256i) -> __m256 {
    let pick = _mm256_setr_epi8(
        0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1,
        -1, -1, -1, -1, -1, -1,
    );
    let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(v, pick));
    _mm256_cvtph_ps(_mm256_castsi256_si128(packed))
}

/// The two f16s at the start of `w` (a K-quant super-block's `d`, `dmin`), widened, each
/// over 8 lanes.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn f16_pair(w: &[u8]) -> (__m256, __m256) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(le_u32(w, 0) as i32));
    (
        _mm256_broadcastss_ps(v),
        _mm256_broadcastss_ps(_mm_movehdup_ps(v)),
    )
}

// ---------------------------------------------------------------------------------------
// K-quants: a half chunk is one super-block
// ---------------------------------------------------------------------------------------

/// `Q4_K`: `((d*sc)*d_x) * isum - (dmin*m)*s_x` for the 8 blocks of super-block `w`.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn q4_k_terms(w: &[u8], xq: &[i8], dx: __m256, s: __m256) -> __m256 {
    let mut parts = [_mm256_setzero_si256(); 8];
    for (g, pair) in parts.as_chunks_mut::<2>().0.iter_mut().enumerate() {
        let t = load256(&w[16 + 32 * g..]);
        let mask = _mm256_set1_epi8(0x0f);
        let lo = _mm256_and_si256(t, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(t), mask);
        pair[0] = dot_u8(lo, load256(&xq[64 * g..]));
        pair[1] = dot_u8(hi, load256(&xq[64 * g + 32..]));
    }
    let isum = block_sums(parts);
    let (sc, m) = unpack_scales_q4_k(&w[4..16]);
    let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(sc as i64)));
    let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(m as i64)));
    let (d, dmin) = f16_pair(w);
    let (dw, mw) = (_mm256_mul_ps(d, sc), _mm256_mul_ps(dmin, m));
    let t = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum));
    _mm256_sub_ps(t, _mm256_mul_ps(mw, s))
}

/// `Q6_K`: `(d*d_x) * isum`, `isum = Σ_h sc_h (Σ q q_x - 32 Σq_x)`, for the 8 blocks of
/// super-block `w`; `qsum16` holds their 16 half-block sums.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn q6_k_terms(w: &[u8], xq: &[i8], qsum16: &[i16], dx: __m256) -> __m256 {
    let scales = load128(&w[192..]);
    let (low4, bits45) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
    let mut parts = [_mm256_setzero_si256(); 8];
    for (half, quad) in parts.as_chunks_mut::<4>().0.iter_mut().enumerate() {
        let a = load256(&w[64 * half..]);
        let b = load256(&w[64 * half + 32..]);
        let h = load256(&w[128 + 32 * half..]);
        // Block 4*half + k: `ql` low nibbles (k < 2) or high (k >= 2) of `a` (even k) or
        // `b` (odd k), with bits 2k, 2k+1 of `qh` on top.
        let q = [
            (a, _mm256_slli_epi16::<4>(h)),
            (b, _mm256_slli_epi16::<2>(h)),
            (_mm256_srli_epi16::<4>(a), h),
            (_mm256_srli_epi16::<4>(b), _mm256_srli_epi16::<2>(h)),
        ];
        for (k, (part, (lo, hi))) in quad.iter_mut().zip(q).enumerate() {
            let q = _mm256_or_si256(_mm256_and_si256(lo, low4), _mm256_and_si256(hi, bits45));
            let j = (4 * half + k) as u8;
            let pick = _mm_set_epi64x(
                i64::from_ne_bytes([2 * j + 1; 8]),
                i64::from_ne_bytes([2 * j; 8]),
            );
            let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
            let pairs = _mm256_maddubs_epi16(q, load256(&xq[32 * (4 * half + k)..]));
            *part = _mm256_madd_epi16(pairs, sc);
        }
    }
    // 32 * Σ_h sc_h Σq_x per block, from the per-half sums.
    let offset = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scales), load256(qsum16));
    let isum = _mm256_sub_epi32(block_sums(parts), _mm256_slli_epi32::<5>(offset));
    let d = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le_bytes([
        w[208], w[209],
    ]))));
    _mm256_mul_ps(
        _mm256_mul_ps(_mm256_broadcastss_ps(d), dx),
        _mm256_cvtepi32_ps(isum),
    )
}
