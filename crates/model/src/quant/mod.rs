//! Quantized weight formats: the byte layouts of GGML/GGUF tensors and the CPU reference for
//! reading them.
//!
//! A weight matrix is stored row by row; each row is a run of *blocks*, and each block holds
//! [`DType::block_elems`] weights in [`DType::block_bytes`] bytes, laid out exactly as
//! llama.cpp's `ggml-common.h` (all multi-byte fields little-endian):
//!
//! | type   | elems | bytes | block                                                         |
//! |--------|-------|-------|---------------------------------------------------------------|
//! | `F32`  | 1     | 4     | `f32`                                                         |
//! | `F16`  | 1     | 2     | IEEE binary16                                                 |
//! | `BF16` | 1     | 2     | bfloat16 (the high half of an `f32`)                          |
//! | `Q8_0` | 32    | 34    | `{f16 d; i8 qs[32]}`, `w = qs*d`                              |
//! | `Q4_0` | 32    | 18    | `{f16 d; u8 qs[16]}`, `w = (q-8)*d`                           |
//! | `Q4_1` | 32    | 20    | `{f16 d; f16 m; u8 qs[16]}`, `w = q*d + m`                    |
//! | `Q4_K` | 256   | 144   | `{f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}`, see [`kquants`] |
//! | `Q6_K` | 256   | 210   | `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}`, see [`kquants`] |
//!
//! In the 32-element 4-bit blocks the low nibbles of `qs` are elements 0..16 and the high
//! nibbles elements 16..32.
//!
//! # What this module guarantees
//!
//! * Activations stay `f32`. Every weight is widened to `f32` with the same arithmetic as
//!   ggml's `dequantize_row_*` (e.g. `q*d + m` as a multiply then an add, never fused), so
//!   [`dequantize_row`] matches ggml and the Python `gguf` package bit for bit.
//! * [`dot_row`] (and [`dot_rows`], its loop over a run of rows) dequantizes one block at a
//!   time and multiply-adds it into 32 `f32` lanes (element `i` goes to lane `i % 32`), then
//!   sums the lanes in a fixed binary tree. It is bitwise equal to [`dot_f32`] of
//!   [`dequantize_row`]'s output, whatever the thread count and whatever code path the CPU
//!   takes: the portable loops, or (x86-64, chosen at run time) the same loops compiled for
//!   AVX2 or AVX-512, where `Q4_0`/`Q4_1`/`Q4_K` look their weights up in a per-block table
//!   of the 16 values computed with the very same expression. Rust never contracts
//!   `a*b + c` into an FMA, so every path rounds identically.
//! * Nothing here panics on well-formed input. The lengths are preconditions (see each
//!   function); a mismatch is a caller bug: debug builds assert, release builds poison the
//!   output with NaN instead of reading or writing out of bounds.

mod blocks;
mod exp;
mod float;
pub(crate) use float::f32_to_f16;
pub mod kquants;
mod rows;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

use std::fmt;

pub use exp::exp;

/// The element type of a tensor: a float type or a GGML block-quantized format.
#[allow(non_camel_case_types)] // ggml's spelling: `Q4_K` is not `Q4K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4_K,
    Q6_K,
}

impl DType {
    /// Every supported type, in declaration order.
    pub const ALL: [DType; 8] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q4_K,
        DType::Q6_K,
    ];

    /// The type with GGML type id `type_id` (`enum ggml_type`), or `None` if unsupported.
    pub fn from_ggml(type_id: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|t| t.ggml_id() == type_id)
    }

    /// The GGML type id (`enum ggml_type`) stored in GGUF tensor headers.
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q8_0 => 8,
            DType::Q4_K => 12,
            DType::Q6_K => 14,
            DType::BF16 => 30,
        }
    }

    /// ggml's name for the type (`ggml_type_name`): `"f32"`, `"q4_1"`, `"q4_K"`, ...
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q4_K => "q4_K",
            DType::Q6_K => "q6_K",
        }
    }

    /// Weights per block: 1 for float types, 32 for `Q4_0`/`Q4_1`/`Q8_0`, 256 for K-quants.
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => blocks::QK,
            DType::Q4_K | DType::Q6_K => kquants::QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => blocks::Q8_0_BYTES,
            DType::Q4_0 => blocks::Q4_0_BYTES,
            DType::Q4_1 => blocks::Q4_1_BYTES,
            DType::Q4_K => kquants::Q4_K_BYTES,
            DType::Q6_K => kquants::Q6_K_BYTES,
        }
    }

    /// Bytes of a row of `n_elems` weights, or `None` if `n_elems` is not a whole number of
    /// blocks or the size overflows `usize`.
    pub fn row_bytes(self, n_elems: usize) -> Option<usize> {
        if !n_elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n_elems / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// Whether this is a block-quantized format (not a float type).
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// True when `n_bytes` holds exactly `n_elems` weights of `dtype`.
fn lengths_match(dtype: DType, n_bytes: usize, n_elems: usize) -> bool {
    dtype.row_bytes(n_elems) == Some(n_bytes)
}

/// Widens one row of `dtype` weights to `f32`: `dst.len()` weights from `src`.
///
/// Precondition: `src.len() == dtype.row_bytes(dst.len())`. On a mismatch, debug builds
/// panic and release builds fill `dst` with NaN.
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) {
    if !lengths_match(dtype, src.len(), dst.len()) {
        debug_assert!(
            false,
            "dequantize_row: {} bytes of {dtype} for {} weights",
            src.len(),
            dst.len()
        );
        dst.fill(f32::NAN);
        return;
    }
    rows::Path::best().dequantize(dtype, src, dst);
}

/// `sum_i w[i] * x[i]` over one row `w` of `dtype` weights, dequantized block by block; the
/// decode hot loop. Bitwise equal to `dot_f32(&dequantized_row, x)`.
///
/// Precondition: `row.len() == dtype.row_bytes(x.len())`. On a mismatch, debug builds panic
/// and release builds return NaN.
pub fn dot_row(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    if !lengths_match(dtype, row.len(), x.len()) {
        debug_assert!(
            false,
            "dot_row: {} bytes of {dtype} for {} activations",
            row.len(),
            x.len()
        );
        return f32::NAN;
    }
    rows::Path::best().dot(dtype, row, x)
}

/// `out[r] = dot_row(dtype, row r, x)` for `out.len()` consecutive rows of `rows`: a
/// matrix-vector product over a run of rows (split a matrix into runs to spread it over
/// threads). Each output is bitwise what [`dot_row`] gives; the code path is chosen once.
///
/// Precondition: `rows.len() == out.len() * dtype.row_bytes(x.len())`. On a mismatch, debug
/// builds panic and release builds fill `out` with NaN.
pub fn dot_rows(dtype: DType, rows: &[u8], x: &[f32], out: &mut [f32]) {
    let row_bytes = dtype.row_bytes(x.len());
    if row_bytes.and_then(|b| b.checked_mul(out.len())) != Some(rows.len()) {
        debug_assert!(
            false,
            "dot_rows: {} bytes of {dtype} for {} rows of {} activations",
            rows.len(),
            out.len(),
            x.len()
        );
        out.fill(f32::NAN);
        return;
    }
    rows::Path::best().dot_rows(dtype, rows, row_bytes.unwrap_or(0), x, out);
}

/// `sum_i w[i] * x[i]` in the order every dot in this module uses: products go into 32 lanes
/// (lane `i % 32`) in increasing `i`, then lanes are added pairwise (`lane[j] += lane[j + h]`
/// for `h` = 16, 8, 4, 2, 1). The reference [`dot_row`] is checked against.
///
/// Precondition: `w.len() == x.len()`. On a mismatch, debug builds panic and release builds
/// return NaN.
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    if w.len() != x.len() {
        debug_assert!(
            false,
            "dot_f32: {} weights for {} activations",
            w.len(),
            x.len()
        );
        return f32::NAN;
    }
    rows::Path::best().dot_f32(w, x)
}

/// The keys and values one attention call reads: position `p`'s key is
/// `k[p * stride..][..head_dim]`, its value `v[p * stride..][..head_dim]`, for `p < n_pos`.
#[derive(Clone, Copy)]
pub struct Attend<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub stride: usize,
    pub n_pos: usize,
    pub head_dim: usize,
    /// What each score is multiplied by (1 / sqrt(head_dim)).
    pub scale: f32,
}

/// Positions per block of [`attend`]'s softmax.
pub const ATTEND_BLOCK: usize = 128;

impl Attend<'_> {
    /// Blocks of [`ATTEND_BLOCK`] positions over the `n_pos` positions (the last one part
    /// of a block).
    pub fn blocks(&self) -> usize {
        self.n_pos.div_ceil(ATTEND_BLOCK)
    }

    /// Whether the keys and values hold every position, `g` queries of `head_dim` fit `q`,
    /// and there is at least one position.
    fn fits(&self, q: usize) -> bool {
        self.fits_rows(q, self.k.len(), self.v.len())
    }

    /// [`fits`](Self::fits) for keys and values of `k` and `v` elements stored elsewhere.
    fn fits_rows(&self, q: usize, k: usize, v: usize) -> bool {
        let need = (self.n_pos.max(1) - 1)
            .checked_mul(self.stride)
            .and_then(|n| n.checked_add(self.head_dim));
        self.head_dim > 0
            && self.n_pos > 0
            && q.is_multiple_of(self.head_dim)
            && need.is_some_and(|n| n <= k && n <= v)
    }

    fn refuse(&self, what: &str, q: usize, out: &mut [f32]) {
        debug_assert!(
            false,
            "{what}: {q} query floats into {}, head_dim {}, {} positions {} apart in {} keys and \
             {} values",
            out.len(),
            self.head_dim,
            self.n_pos,
            self.stride,
            self.k.len(),
            self.v.len()
        );
        out.fill(f32::NAN);
    }
}

/// Floats of one query's result for one block ([`attend_block`]): its `head_dim` weighted
/// value sums, the block's largest score, and the sum of its exps.
pub fn partial_len(head_dim: usize) -> usize {
    head_dim + 2
}

/// Causal attention of `tokens` consecutive positions' queries into `out` (the same shape
/// as `q`): `q` holds, token by token, the same number of queries (`head_dim` floats each,
/// all over the same keys and values), and token `k` sees `a.n_pos + k` positions. The
/// blocks every token sees whole are [`attend_block`]s of all the queries at once (each key
/// and value read once for them), each token's other blocks of its own queries; then each
/// query's blocks go through [`attend_merge`], in block order. Each query's result is the
/// same bits whatever other queries share the call, however its blocks are computed, and on
/// every code path.
///
/// Precondition: `tokens >= 1`; `q.len() == out.len()`, `tokens` times a multiple of
/// `head_dim`; `n_pos >= 1`; `k` and `v` hold every row the last token sees. On a mismatch,
/// debug builds panic and release builds fill `out` with NaN.
pub fn attend(a: &Attend<'_>, tokens: usize, q: &[f32], out: &mut [f32]) {
    let path = rows::Path::best();
    let rows = (a.k.len(), a.v.len());
    attend_by(a, rows, tokens, q, out, |a, b, q, partials| {
        path.attend_block(a, b, q, partials)
    });
}

/// Keys and values stored as IEEE half-precision bits (an f16 KV cache), laid out as
/// [`Attend`]'s `k` and `v`, for [`attend_half`] and [`attend_block_half`] (which read these
/// and not the `Attend`'s own slices). Each block's rows are widened to f32, exactly, and
/// attended as [`attend_block`] does: the f32 arithmetic on the rounded values, so the same
/// bits on every path and whatever else shares a step.
#[derive(Clone, Copy)]
pub struct Half<'a> {
    pub k: &'a [u16],
    pub v: &'a [u16],
}

/// [`attend`] over keys and values in `half`.
pub fn attend_half(a: &Attend<'_>, half: Half<'_>, tokens: usize, q: &[f32], out: &mut [f32]) {
    let rows = (half.k.len(), half.v.len());
    attend_by(a, rows, tokens, q, out, |a, b, q, partials| {
        half_block(a, half, b, q, partials)
    });
}

/// [`attend_block`] over keys and values in `half`.
pub fn attend_block_half(
    a: &Attend<'_>,
    half: Half<'_>,
    b: usize,
    q: &[f32],
    partials: &mut [f32],
) {
    let sized = a.head_dim > 0 && partials.len() == q.len() / a.head_dim * partial_len(a.head_dim);
    if !a.fits_rows(q.len(), half.k.len(), half.v.len()) || !sized || b >= a.blocks() {
        a.refuse("attend_block_half", q.len(), partials);
        return;
    }
    half_block(a, half, b, q, partials);
}

/// Block `b` of `half`'s rows widened to f32 (by the CPU's vector conversion where it has
/// one: exact either way) and attended as block 0 of an f32 [`Attend`] holding just them (the
/// same positions, so the same arithmetic), on the CPU's best path.
fn half_block(a: &Attend<'_>, half: Half<'_>, b: usize, q: &[f32], partials: &mut [f32]) {
    thread_local! {
        /// The widened keys, then values, of one block: reused call to call.
        static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let path = rows::Path::best();
    WIDE.with_borrow_mut(|wide| path.attend_block_half(a, half, b, q, partials, wide));
}

/// [`attend`] over keys and values of `rows` (`k` and `v` elements), each block through
/// `block`.
fn attend_by(
    a: &Attend<'_>,
    rows: (usize, usize),
    tokens: usize,
    q: &[f32],
    out: &mut [f32],
    block_fn: impl Fn(&Attend<'_>, usize, &[f32], &mut [f32]),
) {
    let seen = |k: usize| Attend {
        n_pos: a.n_pos + k,
        ..*a
    };
    let last = seen(tokens.max(1) - 1);
    let whole_tokens = a.head_dim > 0 && (q.len() / a.head_dim).is_multiple_of(tokens);
    let fits = last.fits_rows(q.len(), rows.0, rows.1);
    if tokens == 0 || !whole_tokens || !fits || q.len() != out.len() {
        last.refuse("attend", q.len(), out);
        return;
    }
    let (hd, plen, most) = (a.head_dim, partial_len(a.head_dim), last.blocks());
    let width = q.len() / tokens; // one token's queries
    // parts[query][block], the queries in token order.
    let mut parts = vec![0.0f32; q.len() / hd * most * plen];
    let mut block = vec![0.0f32; q.len() / hd * plen];
    let mut keep = |first: usize, b: usize, block: &[f32]| {
        for (j, part) in block.chunks_exact(plen).enumerate() {
            parts[((first + j) * most + b) * plen..][..plen].copy_from_slice(part);
        }
    };
    let full = a.n_pos / ATTEND_BLOCK;
    for b in 0..full {
        block_fn(a, b, q, &mut block);
        keep(0, b, &block);
    }
    for k in 0..tokens {
        let (mine, block) = (seen(k), &mut block[..width / hd * plen]);
        for b in full..mine.blocks() {
            block_fn(&mine, b, &q[k * width..][..width], block);
            keep(k * width / hd, b, block);
        }
    }
    for (j, out) in out.chunks_exact_mut(hd).enumerate() {
        let blocks = seen(j * hd / width).blocks();
        merge(&parts[j * most * plen..], plen, blocks, out);
    }
}

/// Block `b` of [`attend`] (positions `128 b ..` up to 128 of them, at most `n_pos`) for
/// the queries in `q`, into `partials` (`partial_len(head_dim)` floats a query, in order):
/// the scores `dot_f32(q, key_p) * scale` in position order, then as [`softmax`] does, their
/// largest `m`, the exps `exp(score - m)`, their sum `l` in order and the weights
/// `exp / l`; then the values weighted by them, summed in position order (a product, then a
/// sum, per element), `m` and `l`. The keys and values are read once for all the queries.
///
/// Precondition: as [`attend`], with `partials` sized for the queries and `b` a block. On a
/// mismatch, debug builds panic and release builds fill `partials` with NaN.
pub fn attend_block(a: &Attend<'_>, b: usize, q: &[f32], partials: &mut [f32]) {
    let sized = a.head_dim > 0 && partials.len() == q.len() / a.head_dim * partial_len(a.head_dim);
    if !a.fits(q.len()) || !sized || b >= a.blocks() {
        a.refuse("attend_block", q.len(), partials);
        return;
    }
    rows::Path::best().attend_block(a, b, q, partials);
}

/// One query's result from its blocks' partials ([`attend_block`]; block `b`'s at
/// `partials[b * stride..]`), into `out` (`head_dim` floats): `M` the largest block
/// maximum, each block's share `f_b = exp(m_b - M) * l_b`, `L` their sum in block order, and
/// `out = sum_b (f_b / L) * values_b` in block order. With one block that is its values
/// exactly (`f / L` is 1), so up to 128 positions the result is the one softmax over them
/// all gives.
///
/// Precondition: `blocks >= 1` and `partials` holds them. On a mismatch, debug builds panic
/// and release builds fill `out` with NaN.
pub fn attend_merge(partials: &[f32], stride: usize, blocks: usize, out: &mut [f32]) {
    let need = (blocks.max(1) - 1)
        .checked_mul(stride)
        .and_then(|n| n.checked_add(partial_len(out.len())));
    if blocks == 0 || need.is_none_or(|n| n > partials.len()) {
        debug_assert!(
            false,
            "attend_merge: {blocks} blocks {stride} apart in {} floats, {} outputs",
            partials.len(),
            out.len()
        );
        out.fill(f32::NAN);
        return;
    }
    merge(partials, stride, blocks, out);
}

/// [`attend_merge`] with its preconditions met.
fn merge(partials: &[f32], stride: usize, blocks: usize, out: &mut [f32]) {
    let hd = out.len();
    let block = |b: usize| &partials[b * stride..][..partial_len(hd)];
    let max = (0..blocks).fold(f32::NEG_INFINITY, |m, b| m.max(block(b)[hd]));
    let share = |b: usize| exp(block(b)[hd] - max) * block(b)[hd + 1];
    let total = (0..blocks).fold(0.0f32, |t, b| t + share(b));
    out.fill(0.0);
    for b in 0..blocks {
        let weight = share(b) / total;
        for (o, &v) in out.iter_mut().zip(&block(b)[..hd]) {
            *o += weight * v;
        }
    }
}

/// [`exp`] of each element, in place: the same bits, several lanes at a time where the CPU
/// has them.
pub fn exp_in_place(x: &mut [f32]) {
    rows::Path::best().exp_in_place(x);
}

/// In-place softmax: `exp(x - max)` ([`exp`]), their sum in order, then each divided by it.
pub fn softmax(x: &mut [f32]) {
    softmax_max_sum::<float::Soft>(x);
}

/// [`softmax`], its exps by `I`'s copy of [`exp_in_place`]; returns the largest value and the
/// sum of the exps.
fn softmax_max_sum<I: rows::Isa>(x: &mut [f32]) -> (f32, f32) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in x.iter_mut() {
        *v -= max;
    }
    I::exp_in_place(x);
    let sum = x.iter().fold(0.0, |sum, v| sum + v);
    for v in x.iter_mut() {
        *v /= sum;
    }
    (max, sum)
}

/// Encodes `src` as one row of `dtype` into `dst`, with ggml's reference quantizers for the
/// float types and `Q8_0`/`Q4_0`/`Q4_1` (byte-identical to `quantize_row_*_ref`), and simple
/// valid (not error-minimizing) quantizers for `Q4_K`/`Q6_K`. Meant for tests and generated
/// models, not for a production model converter.
///
/// Precondition: `dst.len() == dtype.row_bytes(src.len())`. On a mismatch, debug builds
/// panic and release builds zero `dst` (which every format reads back as zeros).
pub fn quantize_row(dtype: DType, src: &[f32], dst: &mut [u8]) {
    if !lengths_match(dtype, dst.len(), src.len()) {
        debug_assert!(
            false,
            "quantize_row: {} bytes of {dtype} for {} weights",
            dst.len(),
            src.len()
        );
        dst.fill(0);
        return;
    }
    rows::quantize(dtype, src, dst);
}
