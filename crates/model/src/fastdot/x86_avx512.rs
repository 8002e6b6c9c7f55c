//! AVX-512 VNNI kernels: `vpdpbusd` (u8 × i8, four products summed into each i32 lane).
//!
//! A row is read in chunks of 16 blocks. Each of 8 registers holds two consecutive blocks
//! (`2k` in the low 256 bits, `2k + 1` in the high), multiplied against the activations in
//! their natural order; [`block_sums`] folds the 8 registers into one vector of 16 block
//! sums, block `b` in lane `b`. The float terms of the module docs then go into 16 float
//! lanes with the same operations as `portable.rs`, so the bits agree.
//!
//! Signed weights (`Q8_0`) use ggml's sign trick: `|w|` (u8) times `x` with `w`'s sign.
//! 4-bit weights are unsigned nibbles; `Q4_0`'s `-8` comes off afterwards as `8 * Σq_x`.
//! `Q4_K` stores two blocks per 32 bytes of nibbles, so one load makes a register; `Q6_K`
//! multiplies with `vpmaddubsw` then `vpmaddwd` against its sub-block scales, and takes
//! `32 * Σ sc_h Σq_x` off afterwards.
//!
//! The blocks' f16 fields come from a gather, or for whole `Q4_0`/`Q4_1` chunks (where the
//! gather cost a fifth of the time) from word permutes of the chunk ([`q4_heads`]). A row's
//! last partial chunk masks its missing lanes out of the float add; one of one or two
//! blocks (rows of 576) skips the 16-block fold ([`pair_terms`]).

use std::arch::x86_64::*;

use super::acts::Chunk;
use super::{LANES, QuantizedActs, le_u32, unpack_scales_q4_k};
use crate::quant::DType;

/// Proof that the running CPU has AVX-512 F/BW/VNNI, AVX2 and F16C: only [`detect`] makes
/// one.
///
/// [`detect`]: Avx512Vnni::detect
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Avx512Vnni(());

impl Avx512Vnni {
    pub(super) fn detect() -> Option<Avx512Vnni> {
        let yes = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c");
        yes.then_some(Avx512Vnni(()))
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
        // SAFETY: an `Avx512Vnni` exists only if `detect` saw every feature enabled there.
        unsafe { dot_rows(dtype, rows, row_bytes, x, out) }
    }

    /// `out[t * n + r]` = row `r` against `xs[t]`, each bitwise as [`Avx512Vnni::dot_rows`]
    /// gives it, reading and unpacking each chunk of weights once for up to [`TOKENS`]
    /// tokens. Precondition (checked in `mod.rs`): as `dot_rows` for every token, and
    /// `out.len() == xs.len() * n` for the `n` rows.
    pub(super) fn dot_rows_tokens(
        self,
        dtype: DType,
        rows: &[u8],
        row_bytes: usize,
        xs: &[QuantizedActs],
        out: &mut [f32],
    ) {
        // SAFETY: an `Avx512Vnni` exists only if `detect` saw every feature enabled there.
        unsafe { dot_rows_tokens(dtype, rows, row_bytes, xs, out) }
    }
}

/// Tokens whose products share each chunk's weight loads and unpacking: their block sums
/// stay in registers (4 tokens x 4 registers) while a chunk is read.
const TOKENS: usize = 4;

/// Format tags for the const-generic kernels (each paired with its bytes per chunk).
const Q8_0: usize = 0;
const Q4_0: usize = 1;
const Q4_1: usize = 2;
const Q4_K: usize = 3;
const Q6_K: usize = 4;

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
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

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
fn run<const F: usize, const N: usize>(
    rows: std::slice::ChunksExact<'_, u8>,
    x: &QuantizedActs,
    out: &mut [f32],
) {
    for (row, y) in rows.zip(out) {
        *y = dot_row::<F, N>(row, x);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
fn dot_rows_tokens(
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    xs: &[QuantizedActs],
    out: &mut [f32],
) {
    let n = rows.len() / row_bytes;
    let mut groups = xs.chunks_exact(TOKENS);
    let mut outs = out.chunks_exact_mut(TOKENS * n);
    for (xs, out) in (&mut groups).zip(&mut outs) {
        let xs = [&xs[0], &xs[1], &xs[2], &xs[3]];
        let each = rows.chunks_exact(row_bytes);
        match dtype {
            DType::Q8_0 => run_tokens::<Q8_0, { 16 * 34 }>(each, xs, out),
            DType::Q4_0 => run_tokens::<Q4_0, { 16 * 18 }>(each, xs, out),
            DType::Q4_1 => run_tokens::<Q4_1, { 16 * 20 }>(each, xs, out),
            // K-quant chunks (two super-blocks) unpack with their scales: token by token.
            _ => {
                for (x, out) in xs.into_iter().zip(out.chunks_exact_mut(n)) {
                    dot_rows(dtype, rows, row_bytes, x, out);
                }
            }
        }
    }
    // The tokens past the last whole group, one by one.
    for (x, out) in groups
        .remainder()
        .iter()
        .zip(outs.into_remainder().chunks_exact_mut(n))
    {
        dot_rows(dtype, rows, row_bytes, x, out);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
fn run_tokens<const F: usize, const N: usize>(
    rows: std::slice::ChunksExact<'_, u8>,
    xs: [&QuantizedActs; TOKENS],
    out: &mut [f32],
) {
    let n = rows.len();
    for (r, row) in rows.enumerate() {
        let (whole, tail) = row.as_chunks::<N>();
        let mut acc = [_mm512_setzero_ps(); TOKENS];
        for (i, w) in whole.iter().enumerate() {
            let Some(cs) = chunks_at(xs, i) else {
                break;
            };
            let t = terms_tokens::<F, N>(w, &cs);
            for (acc, t) in acc.iter_mut().zip(t) {
                *acc = _mm512_add_ps(*acc, t);
            }
        }
        let n_blocks = tail.len() * LANES / N;
        if (1..=2).contains(&n_blocks)
            && let Some(cs) = chunks_at(xs, whole.len())
        {
            // E.g. rows of 576 (18 blocks): the last two blocks' weights unpacked once.
            let (reg, head) = pair_weights::<F, N>(tail);
            let live = ((1u32 << n_blocks) - 1) as u16;
            for t in 0..TOKENS {
                let v = pair_terms_of::<F>(reg, head, &cs[t]);
                out[t * n + r] = hsum(_mm512_mask_add_ps(acc[t], live, acc[t], v));
            }
            continue;
        }
        for t in 0..TOKENS {
            out[t * n + r] = hsum(add_tail::<F, N>(acc[t], tail, xs[t].chunk(whole.len())));
        }
    }
}

/// Chunk `i` of every token's activations, if they all have one.
#[inline]
fn chunks_at(xs: [&QuantizedActs; TOKENS], i: usize) -> Option<[Chunk<'_>; TOKENS]> {
    let [a, b, c, d] = xs;
    Some([a.chunk(i)?, b.chunk(i)?, c.chunk(i)?, d.chunk(i)?])
}

/// One row: whole chunks, then a last partial chunk ([`add_tail`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
#[inline]
fn dot_row<const F: usize, const N: usize>(row: &[u8], x: &QuantizedActs) -> f32 {
    let (whole, tail) = row.as_chunks::<N>();
    let mut chunks = x.chunks();
    let mut acc = _mm512_setzero_ps();
    for (w, c) in whole.iter().zip(&mut chunks) {
        acc = _mm512_add_ps(acc, terms::<F, N, false>(w, LANES, &c));
    }
    hsum(add_tail::<F, N>(acc, tail, chunks.next()))
}

/// `acc` plus the terms of a row's last partial chunk `tail` (against activations `c`), its
/// missing blocks masked out of the float lanes. (A K-quant row ends in half a chunk,
/// copied into a zero-padded buffer.)
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
#[inline]
fn add_tail<const F: usize, const N: usize>(
    acc: __m512,
    tail: &[u8],
    c: Option<Chunk<'_>>,
) -> __m512 {
    let Some(c) = c.filter(|_| !tail.is_empty()) else {
        return acc;
    };
    let n_blocks = tail.len() * LANES / N;
    let t = if F == Q4_K || F == Q6_K {
        let mut buf = [0u8; N];
        buf[..tail.len()].copy_from_slice(tail);
        terms::<F, N, false>(&buf, LANES, &c)
    } else if n_blocks <= 2 {
        // E.g. rows of 576 (18 blocks): one register, far cheaper on its own.
        pair_terms::<F, N>(tail, &c)
    } else {
        terms::<F, N, true>(tail, n_blocks, &c)
    };
    _mm512_mask_add_ps(acc, ((1u32 << n_blocks) - 1) as u16, acc, t)
}

/// `lane[j] += lane[j + h]` for `h` = 8, 4, 2, 1; returns lane 0.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
#[inline]
fn hsum(v: __m512) -> f32 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let v = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

/// The float terms of the first `n_blocks` blocks of a chunk, `w` (block `b` in lane `b`;
/// lanes past `n_blocks` hold junk). Precondition: `w` holds `n_blocks` blocks; `n_blocks`
/// is 16 unless `PARTIAL`, and K-quants are never `PARTIAL`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
#[inline]
fn terms<const F: usize, const N: usize, const PARTIAL: bool>(
    w: &[u8],
    n_blocks: usize,
    c: &Chunk<'_>,
) -> __m512 {
    const { assert!(N == [16 * 34, 16 * 18, 16 * 20, 2 * 144, 2 * 210][F]) };
    // A constant for whole chunks, so that their loops unroll without checks.
    let n_blocks = if PARTIAL { n_blocks } else { LANES };
    match F {
        Q4_K => q4_k_terms::<N>(w, c),
        Q6_K => q6_k_terms::<N>(w, c),
        _ => {
            let bb = N / LANES;
            // The nibbles (`Q4_*`) or `i8`s (`Q8_0`) of a block start after its f16 fields.
            let at = [2, 2, 4][F];
            let mut parts = [_mm512_setzero_si512(); 8];
            for (k, part) in parts.iter_mut().enumerate().take(n_blocks.div_ceil(2)) {
                let x = load512(&c.q[64 * k..]);
                // (No closures here: they would not inherit the target features.)
                let u = &w[2 * bb * k + at..];
                let v = if 2 * k + 1 < n_blocks {
                    Some(&w[(2 * k + 1) * bb + at..])
                } else {
                    None
                };
                *part = if F == Q8_0 {
                    let u = load256z(u);
                    match v {
                        Some(v) => dot_i8(_mm512_inserti64x4::<1>(u, load256(v)), x),
                        None => dot_i8(u, x),
                    }
                } else {
                    dot_u8(nibbles_pair(u, v), x)
                };
            }
            let isum = block_sums(parts);
            if !PARTIAL && F != Q8_0 {
                let (d, m) = q4_heads::<N>(w);
                combine::<F>(isum, d, m, c)
            } else {
                combine_heads::<F>(isum, gather_heads::<N>(w, n_blocks), c)
            }
        }
    }
}

/// [`terms`] of a whole chunk of `Q8_0`, `Q4_0` or `Q4_1` blocks for [`TOKENS`] tokens at
/// once: each pair of blocks is loaded and unpacked once, and its products with each
/// token's activations folded into that token's block sums at once. Bitwise what `terms`
/// gives each token: the block sums are exact integers, the float terms the same
/// operations on the same values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
#[inline]
fn terms_tokens<const F: usize, const N: usize>(
    w: &[u8],
    cs: &[Chunk<'_>; TOKENS],
) -> [__m512; TOKENS] {
    const { assert!(F == Q8_0 || F == Q4_0 || F == Q4_1) };
    const { assert!(N == [16 * 34, 16 * 18, 16 * 20][F]) };
    let bb = N / LANES;
    let at = [2, 2, 4][F];
    // pairs[t][j]: token t's sums of registers 2j and 2j + 1 (blocks 4j .. 4j + 4).
    // (No closures here: they would not inherit the target features.)
    let mut pairs = [[_mm512_setzero_si512(); 4]; TOKENS];
    for j in 0..4 {
        let mut regs = [_mm512_setzero_si512(); 2];
        for (i, reg) in regs.iter_mut().enumerate() {
            let k = 2 * j + i;
            let (u, v) = (&w[2 * bb * k + at..], &w[(2 * k + 1) * bb + at..]);
            *reg = if F == Q8_0 {
                _mm512_inserti64x4::<1>(load256z(u), load256(v))
            } else {
                nibbles_pair(u, Some(v))
            };
        }
        for t in 0..TOKENS {
            let q = cs[t].q;
            let (xa, xb) = (load512(&q[128 * j..]), load512(&q[128 * j + 64..]));
            pairs[t][j] = if F == Q8_0 {
                hadd(dot_i8(regs[0], xa), dot_i8(regs[1], xb))
            } else {
                hadd(dot_u8(regs[0], xa), dot_u8(regs[1], xb))
            };
        }
    }
    let mut out = [_mm512_setzero_ps(); TOKENS];
    if F == Q8_0 {
        let head = gather_heads::<N>(w, LANES);
        for t in 0..TOKENS {
            out[t] = combine_heads::<F>(fold_pairs(pairs[t]), head, &cs[t]);
        }
    } else {
        let (d, m) = q4_heads::<N>(w);
        for t in 0..TOKENS {
            out[t] = combine::<F>(fold_pairs(pairs[t]), d, m, &cs[t]);
        }
    }
    out
}

/// The first 4 bytes of each of the first `n_blocks` blocks of a chunk of `Q8_0`, `Q4_0` or
/// `Q4_1` blocks (`N / 16` bytes each), in its i32 lane: the block's f16 `d`, then (`Q4_1`)
/// its f16 `m`. Lanes past `n_blocks` hold 0.
#[target_feature(enable = "avx512f")]
#[inline]
fn gather_heads<const N: usize>(w: &[u8], n_blocks: usize) -> __m512i {
    let bb = N / LANES;
    let idx = _mm512_mullo_epi32(lane_index(), _mm512_set1_epi32(bb as i32));
    let live = ((1u32 << n_blocks) - 1) as u16;
    assert!(n_blocks <= LANES && w.len() >= n_blocks * bb);
    // SAFETY: live lane `b < n_blocks` reads `w[bb*b..bb*b + 4]`, inside `w` (asserted, and
    // `bb >= 18`); the others read nothing.
    unsafe {
        let zero = _mm512_setzero_si512();
        _mm512_mask_i32gather_epi32::<1>(zero, live, idx, w.as_ptr().cast())
    }
}

/// The float terms from the block sums and the blocks' f16 `d` and (`Q4_1`) `m`, one block
/// per lane.
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
#[inline]
fn combine<const F: usize>(isum: __m512i, d: __m256i, m: __m256i, c: &Chunk<'_>) -> __m512 {
    let isum = if F == Q4_0 {
        _mm512_sub_epi32(isum, _mm512_slli_epi32::<3>(load512(c.qsum)))
    } else {
        isum
    };
    let (d, dx) = (_mm512_cvtph_ps(d), load_ps(c.d));
    let t = _mm512_mul_ps(_mm512_mul_ps(d, dx), _mm512_cvtepi32_ps(isum));
    if F == Q4_1 {
        _mm512_add_ps(t, _mm512_mul_ps(_mm512_cvtph_ps(m), load_ps(c.s)))
    } else {
        t
    }
}

/// [`combine`] with each block's first 4 bytes in its i32 lane (`d`, then `m`).
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
#[inline]
fn combine_heads<const F: usize>(isum: __m512i, head: __m512i, c: &Chunk<'_>) -> __m512 {
    let m = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(head));
    combine::<F>(isum, _mm512_cvtepi32_epi16(head), m, c)
}

/// Where a whole chunk of `Q4_0`/`Q4_1` blocks (`bb` bytes each, `16 * bb` in all) keeps
/// its f16 fields, for [`q4_heads`]: word lane `i` of the result is field `i / 16` (`d`,
/// `m`) of block `i % 16`, taken from one of three sources. Returns the index into each
/// source and the lanes taken from the second and third.
const fn q4_head_index(bb: usize) -> ([[i16; 32]; 3], u32, u32) {
    // Sources, in 16-bit words of the chunk: [0, 64) (two loads), [64, 128) (two loads),
    // and the last 64 bytes.
    let last = (16 * bb - 64) / 2;
    let mut idx = [[0i16; 32]; 3];
    let (mut second, mut third) = (0u32, 0u32);
    let mut i = 0;
    while i < 32 {
        let word = bb * (i % 16) / 2 + i / 16;
        if word < 64 {
            idx[0][i] = word as i16;
        } else if word < 128 {
            idx[1][i] = (word - 64) as i16;
            second |= 1 << i;
        } else {
            // (Instantiated, never run, for other formats: saturate rather than fail.)
            idx[2][i] = word.saturating_sub(last) as i16;
            third |= 1 << i;
        }
        i += 1;
    }
    (idx, second, third)
}

/// Each block's f16 `d` and `m` (`Q4_1`; junk for `Q4_0`) from a whole chunk of 4-bit
/// blocks: five 64-byte loads and three word permutes, cheaper than a gather.
#[target_feature(enable = "avx512f,avx512bw,avx2")]
#[inline]
fn q4_heads<const N: usize>(w: &[u8]) -> (__m256i, __m256i) {
    let (idx, second, third) = const { q4_head_index(N / LANES) };
    let a = _mm512_permutex2var_epi16(load512(w), load512(&idx[0]), load512(&w[64..]));
    let b = _mm512_permutex2var_epi16(load512(&w[128..]), load512(&idx[1]), load512(&w[192..]));
    let c = _mm512_permutexvar_epi16(load512(&idx[2]), load512(&w[N - 64..]));
    let fields = _mm512_mask_blend_epi16(third, _mm512_mask_blend_epi16(second, a, b), c);
    (
        _mm512_castsi512_si256(fields),
        _mm512_extracti64x4_epi64::<1>(fields),
    )
}

/// [`terms`] for a partial chunk of one or two blocks (`w`): one register, whose two block
/// sums take a few in-register adds instead of [`block_sums`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
#[inline]
fn pair_terms<const F: usize, const N: usize>(w: &[u8], c: &Chunk<'_>) -> __m512 {
    let (reg, head) = pair_weights::<F, N>(w);
    pair_terms_of::<F>(reg, head, c)
}

/// The weights of a partial chunk of one or two blocks as [`pair_terms`] multiplies them
/// (`Q8_0`: signed bytes; 4-bit formats: nibbles in element order), and their heads
/// ([`combine_heads`]).
#[target_feature(enable = "avx512f,avx512bw,avx2")]
#[inline]
fn pair_weights<const F: usize, const N: usize>(w: &[u8]) -> (__m512i, __m512i) {
    let bb = N / LANES;
    let at = [2, 2, 4][F];
    let two = w.len() >= 2 * bb;
    let v = if two { Some(&w[bb + at..]) } else { None };
    let reg = if F == Q8_0 {
        let u = load256z(&w[at..]);
        match v {
            Some(v) => _mm512_inserti64x4::<1>(u, load256(v)),
            None => u,
        }
    } else {
        nibbles_pair(&w[at..], v)
    };
    let h1 = if two { le_u32(w, bb) } else { 0 };
    let head = _mm512_castsi128_si512(_mm_setr_epi32(le_u32(w, 0) as i32, h1 as i32, 0, 0));
    (reg, head)
}

/// [`pair_terms`] from [`pair_weights`]' register and heads.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
#[inline]
fn pair_terms_of<const F: usize>(reg: __m512i, head: __m512i, c: &Chunk<'_>) -> __m512 {
    let x = load512(c.q);
    let part = if F == Q8_0 {
        dot_i8(reg, x)
    } else {
        dot_u8(reg, x)
    };
    // Sum each 128-bit lane into all its lanes, then pairs of them: block 0 in lanes 0..8,
    // block 1 in lanes 8..16; move them to lanes 0 and 1.
    let a = _mm512_add_epi32(part, _mm512_shuffle_epi32::<0b01_00_11_10>(part));
    let a = _mm512_add_epi32(a, _mm512_shuffle_epi32::<0b10_11_00_01>(a));
    let a = _mm512_add_epi32(a, _mm512_shuffle_i64x2::<0b10_11_00_01>(a, a));
    let isum = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        a,
    );
    combine_heads::<F>(isum, head, c)
}

// ---------------------------------------------------------------------------------------
// Integer pieces
// ---------------------------------------------------------------------------------------

/// `[0, 1, .., 15]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn lane_index() -> __m512i {
    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
}

/// The 64 bytes at the start of `v`.
#[target_feature(enable = "avx512f")]
#[inline]
fn load512<T>(v: &[T]) -> __m512i {
    assert!(size_of_val(v) >= 64);
    // SAFETY: `v` holds at least 64 bytes (asserted; the callers' constant offsets make the
    // check compile away).
    unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
}

/// 16 floats.
#[target_feature(enable = "avx512f")]
#[inline]
fn load_ps(v: &[f32; 16]) -> __m512 {
    // SAFETY: `v` is 16 floats.
    unsafe { _mm512_loadu_ps(v.as_ptr()) }
}

/// The 32 bytes at the start of `v`.
#[target_feature(enable = "avx2")]
#[inline]
fn load256(v: &[u8]) -> __m256i {
    assert!(v.len() >= 32);
    // SAFETY: `v` holds at least 32 bytes (asserted as in `load512`).
    unsafe { _mm256_loadu_si256(v.as_ptr().cast()) }
}

/// [`load256`] into the low half of a zmm register.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
fn load256z(v: &[u8]) -> __m512i {
    _mm512_castsi256_si512(load256(v))
}

/// The 16 bytes at the start of `v`.
#[target_feature(enable = "avx2")]
#[inline]
fn load128(v: &[u8]) -> __m128i {
    assert!(v.len() >= 16);
    // SAFETY: `v` holds at least 16 bytes (asserted as in `load512`).
    unsafe { _mm_loadu_si128(v.as_ptr().cast()) }
}

/// Two 4-bit blocks (the 16 bytes at `u` and at `v`, or zeros) as 64 bytes in element order:
/// `u`'s low nibbles, `u`'s high nibbles, then `v`'s.
#[target_feature(enable = "avx512f,avx512bw,avx2")]
#[inline]
fn nibbles_pair(u: &[u8], v: Option<&[u8]>) -> __m512i {
    let u = _mm256_castsi128_si256(load128(u));
    let uv = match v {
        Some(v) => _mm256_inserti128_si256::<1>(u, load128(v)),
        None => u,
    };
    let uv = _mm512_castsi256_si512(uv);
    // [u, u, v, v], then the second copy of each shifted down to its high nibbles.
    let uuvv = _mm512_shuffle_i64x2::<0b01_01_00_00>(uv, uv);
    let shifted = _mm512_mask_srli_epi16::<4>(uuvv, 0xff00_ff00, uuvv);
    _mm512_and_si512(shifted, _mm512_set1_epi8(0x0f))
}

/// `Σ w*x` per i32 lane (4 products each) for unsigned `w` (< 128) and signed `x`.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
fn dot_u8(w: __m512i, x: __m512i) -> __m512i {
    _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x)
}

/// `Σ w*x` per i32 lane for signed `w` and `x` (`x != -128`): `|w| * (x with w's sign)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
fn dot_i8(w: __m512i, x: __m512i) -> __m512i {
    let zero = _mm512_setzero_si512();
    let x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), zero, x);
    _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(w), x)
}

/// Per 128-bit lane `[a0+a1, a2+a3, b0+b1, b2+b3]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn hadd(a: __m512i, b: __m512i) -> __m512i {
    let (a, b) = (_mm512_castsi512_ps(a), _mm512_castsi512_ps(b));
    let even = _mm512_shuffle_ps::<0b10_00_10_00>(a, b);
    let odd = _mm512_shuffle_ps::<0b11_01_11_01>(a, b);
    _mm512_add_epi32(_mm512_castps_si512(even), _mm512_castps_si512(odd))
}

/// Folds 8 registers of i32 partial sums, register `k` holding block `2k` in lanes 0..8 and
/// block `2k + 1` in lanes 8..16, into the 16 block sums (block `b` in lane `b`).
#[target_feature(enable = "avx512f")]
#[inline]
fn block_sums(p: [__m512i; 8]) -> __m512i {
    fold_pairs([
        hadd(p[0], p[1]),
        hadd(p[2], p[3]),
        hadd(p[4], p[5]),
        hadd(p[6], p[7]),
    ])
}

/// [`block_sums`] from `hadd`s of its registers' pairs (`p[j] = hadd(p[2j], p[2j + 1])`).
#[target_feature(enable = "avx512f")]
#[inline]
fn fold_pairs(p: [__m512i; 4]) -> __m512i {
    // Per 128-bit lane L, q0 holds blocks [0, 2, 4, 6] (L = 0, 1) or [1, 3, 5, 7] (L = 2, 3),
    // partial over that quarter of each block; q1 the same for blocks 8..16.
    let q0 = hadd(p[0], p[1]);
    let q1 = hadd(p[2], p[3]);
    let lo = _mm512_shuffle_i64x2::<0b10_00_10_00>(q0, q1);
    let hi = _mm512_shuffle_i64x2::<0b11_01_11_01>(q0, q1);
    // Lanes now hold blocks [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15].
    let order = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    _mm512_permutexvar_epi32(order, _mm512_add_epi32(lo, hi))
}

// ---------------------------------------------------------------------------------------
// K-quants: a chunk is two super-blocks of 8 blocks
// ---------------------------------------------------------------------------------------

/// Two super-blocks' f16 pairs (`[d, dmin]` as little-endian u32s, `a` then `b`), widened
/// and spread: `(first of each pair, second of each pair)`, `a`'s over lanes 0..8.
#[target_feature(enable = "avx512f,avx2,f16c")]
#[inline]
fn spread_f16_pairs(a: u32, b: u32) -> (__m512, __m512) {
    let v = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_setr_epi32(a as i32, b as i32, 0, 0)));
    let first = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    let second = _mm512_add_epi32(first, _mm512_set1_epi32(1));
    (
        _mm512_permutexvar_ps(first, v),
        _mm512_permutexvar_ps(second, v),
    )
}

/// `Q4_K`: `((d*sc)*d_x) * isum - (dmin*m)*s_x`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
#[inline]
fn q4_k_terms<const N: usize>(w: &[u8], c: &Chunk<'_>) -> __m512 {
    let dx = load_ps(c.d);
    let mut parts = [_mm512_setzero_si512(); 8];
    for (k, part) in parts.iter_mut().enumerate() {
        // Register k: super-block k / 4, its 32 bytes of `qs` for blocks 2(k%4), 2(k%4)+1.
        let t = load256(&w[(N / 2) * (k / 4) + 16 + 32 * (k % 4)..]);
        let lo_hi = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(t), _mm256_srli_epi16::<4>(t));
        let q = _mm512_and_si512(lo_hi, _mm512_set1_epi8(0x0f));
        *part = dot_u8(q, load512(&c.q[64 * k..]));
    }
    let isum = block_sums(parts);
    let (sc0, m0) = unpack_scales_q4_k(&w[4..16]);
    let (sc1, m1) = unpack_scales_q4_k(&w[N / 2 + 4..N / 2 + 16]);
    let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(sc1 as i64, sc0 as i64)));
    let m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(m1 as i64, m0 as i64)));
    let (d, dmin) = spread_f16_pairs(le_u32(w, 0), le_u32(w, N / 2));
    let (dw, mw) = (_mm512_mul_ps(d, sc), _mm512_mul_ps(dmin, m));
    let t = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(isum));
    _mm512_sub_ps(t, _mm512_mul_ps(mw, load_ps(c.s)))
}

/// `Q6_K`: `(d*d_x) * isum`, `isum = Σ_h sc_h (Σ q q_x - 32 Σq_x)` over its two halves.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,f16c")]
#[inline]
fn q6_k_terms<const N: usize>(w: &[u8], c: &Chunk<'_>) -> __m512 {
    let dx = load_ps(c.d);
    let sb = [&w[..N / 2], &w[N / 2..]];
    // The 16 i8 scales of each super-block, as i16: lanes 0..16 and 16..32.
    let sc16 = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_cvtepi8_epi16(load128(&sb[0][192..]))),
        _mm256_cvtepi8_epi16(load128(&sb[1][192..])),
    );
    let mut parts = [_mm512_setzero_si512(); 8];
    for (k, part) in parts.iter_mut().enumerate() {
        // Register k: super-block k / 4, half (k / 2) % 2, blocks 2(k%2), 2(k%2)+1 of the
        // half (`ql` low nibbles with `qh` bits 0-3, or high nibbles with bits 4-7).
        let (s, half, upper) = (sb[k / 4], (k / 2) % 2, k % 2 == 1);
        let ql = _mm512_inserti64x4::<1>(load256z(&s[64 * half..]), load256(&s[64 * half + 32..]));
        let h = load256(&s[128 + 32 * half..]);
        let qh = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h), _mm256_srli_epi16::<2>(h));
        let (lo, hi) = if upper {
            (_mm512_srli_epi16::<4>(ql), qh)
        } else {
            (ql, _mm512_slli_epi16::<4>(qh))
        };
        let q = _mm512_or_si512(
            _mm512_and_si512(lo, _mm512_set1_epi8(0x0f)),
            _mm512_and_si512(hi, _mm512_set1_epi8(0x30)),
        );
        // Scales of sub-blocks 4k..4k+4 of the chunk, each over the 8 i16 lanes of its 16
        // elements.
        let pick = _mm512_add_epi16(
            _mm512_set1_epi16(4 * k as i16),
            _mm512_srli_epi16::<3>(_mm512_set_epi16(
                31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11,
                10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
            )),
        );
        let sc = _mm512_permutexvar_epi16(pick, sc16);
        let pairs = _mm512_maddubs_epi16(q, load512(&c.q[64 * k..]));
        *part = _mm512_madd_epi16(pairs, sc);
    }
    // 32 * Σ_h sc_h Σq_x per block, from the per-half sums.
    let qsum16 = load512(c.qsum16);
    let offset = _mm512_slli_epi32::<5>(_mm512_madd_epi16(sc16, qsum16));
    let isum = _mm512_sub_epi32(block_sums(parts), offset);
    let d_bits = [N / 2 - 2, N - 2].map(|at| u32::from(u16::from_le_bytes([w[at], w[at + 1]])));
    let (d, _) = spread_f16_pairs(d_bits[0], d_bits[1]);
    _mm512_mul_ps(_mm512_mul_ps(d, dx), _mm512_cvtepi32_ps(isum))
}
