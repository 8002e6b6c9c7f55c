//! Row loops: dequantize, dot and quantize a whole row, block by block.
//!
//! The hot loops are written once, as `#[inline(always)]` functions over fixed-size arrays
//! that LLVM auto-vectorizes, generic over an [`Isa`], and compiled once per code path: the
//! target's baseline (SSE2 on x86-64) and, on x86-64 CPUs that have them, AVX2 and AVX-512
//! (see `x86.rs`). Every path performs the same IEEE operations on the same values in the
//! same order (Rust never reassociates floats nor fuses `a*b + c` into an FMA; hand-written
//! kernels only look values up instead of recomputing them), so all paths give
//! bitwise-identical results; `tests.rs` checks this on the paths the CPU supports.
//!
//! Callers (`mod.rs`) have already checked that byte and element counts agree.

use std::sync::OnceLock;

use super::DType;
use super::blocks::{self, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES, QK};
use super::float::{self, Soft, Widen, bf16_to_f32};
use super::kquants::{self, Q4_K_BYTES, Q6_K_BYTES, QK_K};

/// Accumulator lanes of every dot product: element `i` of a row goes to lane `i % LANES`.
pub(crate) const LANES: usize = 32;
pub(crate) type Lanes = [f32; LANES];

// ---------------------------------------------------------------------------------------
// Code paths
// ---------------------------------------------------------------------------------------

/// What one compiled copy of the row loops may use. The defaults are the portable loops; a
/// path may replace a format's dot with a hand-written kernel that gives the same bits.
pub(crate) trait Isa: Widen + Sized {
    /// Multiply-adds a row of `Q4_0` blocks into `acc` (see [`dot_blocks`]).
    #[inline(always)]
    fn dot_q4_0(row: &[u8], x: &[f32], acc: &mut Lanes) {
        dot_blocks::<_, _, Q4_0, Self>(row, x, acc);
    }

    /// Multiply-adds a row of `Q4_1` blocks into `acc` (see [`dot_blocks`]).
    #[inline(always)]
    fn dot_q4_1(row: &[u8], x: &[f32], acc: &mut Lanes) {
        dot_blocks::<_, _, Q4_1, Self>(row, x, acc);
    }

    /// Multiply-adds a row of `Q4_K` blocks into `acc` (see [`dot_blocks`]).
    #[inline(always)]
    fn dot_q4_k(row: &[u8], x: &[f32], acc: &mut Lanes) {
        dot_blocks::<_, _, Q4K, Self>(row, x, acc);
    }

    /// [`dot_f32_impl`] of two short rows (an attention score). Inlined into the attention's
    /// loops, LLVM builds its 32 lanes element by element (measured on x86-64: half the
    /// speed), so by default it is a call; the x86 paths keep the lanes in registers.
    #[inline(always)]
    fn dot_f32_short(w: &[f32], x: &[f32]) -> f32 {
        dot_f32_outlined(w, x)
    }

    /// [`super::exp_in_place`]: the same bits, the x86 paths 8 lanes at a time.
    #[inline(always)]
    fn exp_in_place(x: &mut [f32]) {
        super::exp::exp_in_place(x);
    }
}

impl Isa for Soft {}

/// Which compiled copy of the row loops to run. Holding a token proves the CPU supports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// The target's baseline instruction set (SSE2 on x86-64).
    Portable,
    /// AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2(super::x86::Avx2),
    /// AVX-512 (F, BW, VL) and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx512(super::x86::Avx512),
}

/// `$path`'s call: `$portable` on the portable path, else `$call` with `$token` bound to the
/// path's token (each x86 path's own type, so `$call` is written once for both).
macro_rules! on_path {
    ($path:expr, $portable:expr, $token:ident => $call:expr) => {
        match $path {
            Path::Portable => $portable,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2($token) => $call,
            #[cfg(target_arch = "x86_64")]
            Path::Avx512($token) => $call,
        }
    };
}

impl Path {
    /// Every path this CPU supports, slowest first.
    #[cfg(test)]
    pub(crate) fn supported() -> Vec<Path> {
        #[cfg(target_arch = "x86_64")]
        let wider = [
            super::x86::Avx2::detect().map(Path::Avx2),
            super::x86::Avx512::detect().map(Path::Avx512),
        ];
        #[cfg(not(target_arch = "x86_64"))]
        let wider: [Option<Path>; 0] = [];
        std::iter::once(Path::Portable)
            .chain(wider.into_iter().flatten())
            .collect()
    }

    /// A short name, for test messages and benchmarks.
    #[cfg(test)]
    pub(crate) fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Path::Avx2(_) => "avx2",
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(_) => "avx512",
        }
    }

    /// The fastest path this CPU supports (detected once, then cached).
    #[inline]
    pub(crate) fn best() -> Path {
        static BEST: OnceLock<Path> = OnceLock::new();
        *BEST.get_or_init(Path::detect)
    }

    fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(token) = super::x86::Avx512::detect() {
                return Path::Avx512(token);
            }
            if let Some(token) = super::x86::Avx2::detect() {
                return Path::Avx2(token);
            }
        }
        Path::Portable
    }

    pub(crate) fn dot(self, dtype: DType, row: &[u8], x: &[f32]) -> f32 {
        on_path!(self, dot_impl::<Soft>(dtype, row, x), token => token.dot(dtype, row, x))
    }

    /// `out[r]` = the dot of row `r` (`row_bytes` each) of `rows` with `x`.
    pub(crate) fn dot_rows(
        self,
        dtype: DType,
        rows: &[u8],
        row_bytes: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        on_path!(
            self,
            dot_rows_impl::<Soft>(dtype, rows, row_bytes, x, out),
            token => token.dot_rows(dtype, rows, row_bytes, x, out)
        )
    }

    pub(crate) fn dot_f32(self, w: &[f32], x: &[f32]) -> f32 {
        on_path!(self, dot_f32_impl(w, x), token => token.dot_f32(w, x))
    }

    /// [`super::exp_in_place`] on this path.
    pub(crate) fn exp_in_place(self, x: &mut [f32]) {
        on_path!(self, super::exp::exp_in_place(x), token => token.exp_in_place(x))
    }

    pub(crate) fn attend_block(
        self,
        a: &super::Attend<'_>,
        b: usize,
        q: &[f32],
        partials: &mut [f32],
    ) {
        on_path!(
            self,
            attend_block_impl::<Soft>(a, b, q, partials),
            token => token.attend_block(a, b, q, partials)
        )
    }

    /// [`attend_block_half_impl`] on this path.
    pub(crate) fn attend_block_half(
        self,
        a: &super::Attend<'_>,
        half: super::Half<'_>,
        b: usize,
        q: &[f32],
        partials: &mut [f32],
        wide: &mut Vec<f32>,
    ) {
        on_path!(
            self,
            attend_block_half_impl::<Soft>(a, half, b, q, partials, wide),
            token => token.attend_block_half(a, half, b, q, partials, wide)
        )
    }

    pub(crate) fn dequantize(self, dtype: DType, src: &[u8], dst: &mut [f32]) {
        on_path!(
            self,
            dequantize_impl::<Soft>(dtype, src, dst),
            token => token.dequantize(dtype, src, dst)
        )
    }
}

// ---------------------------------------------------------------------------------------
// Block formats as the loops see them
// ---------------------------------------------------------------------------------------

/// A block format: `B` bytes in, `E` weights out. Implemented on marker types (not passed
/// as closures or fn items, whose call shims LLVM may keep out of line and compile without
/// the caller's target features).
pub(crate) trait Block<const B: usize, const E: usize> {
    fn dequant<W: Widen>(b: &[u8; B], w: &mut [f32; E]);
}

macro_rules! block_formats {
    ($($name:ident: $bytes:expr, $elems:expr, $($f:ident)::+;)*) => {$(
        pub(crate) struct $name;
        impl Block<{ $bytes }, { $elems }> for $name {
            #[inline(always)]
            fn dequant<W: Widen>(b: &[u8; $bytes], w: &mut [f32; $elems]) {
                $($f)::+::<W>(b, w)
            }
        }
    )*};
}

block_formats! {
    F32Chunk: 4 * LANES, LANES, dequant_f32_chunk;
    F16Chunk: 2 * LANES, LANES, float::dequant_f16_chunk;
    Bf16Chunk: 2 * LANES, LANES, dequant_bf16_chunk;
    Q8_0: Q8_0_BYTES, QK, blocks::dequant_q8_0;
    Q4_0: Q4_0_BYTES, QK, blocks::dequant_q4_0;
    Q4_1: Q4_1_BYTES, QK, blocks::dequant_q4_1;
    Q4K: Q4_K_BYTES, QK_K, kquants::dequant_q4_k;
    Q6K: Q6_K_BYTES, QK_K, kquants::dequant_q6_k;
}

#[inline(always)]
fn dequant_f32_chunk<W: Widen>(b: &[u8; 4 * LANES], w: &mut Lanes) {
    float::dequant_f32_chunk(b, w);
}

#[inline(always)]
fn dequant_bf16_chunk<W: Widen>(b: &[u8; 2 * LANES], w: &mut Lanes) {
    float::dequant_bf16_chunk(b, w);
}

// ---------------------------------------------------------------------------------------
// Dot products (the decode hot loop)
// ---------------------------------------------------------------------------------------

/// `acc[j] += w[j] * x[j]`: a multiply, then an add, per lane.
#[inline(always)]
fn mac(acc: &mut Lanes, w: &Lanes, x: &Lanes) {
    for j in 0..LANES {
        acc[j] += w[j] * x[j];
    }
}

/// Sums the lanes pairwise: `acc[j] += acc[j + h]` for `h` = 16, 8, 4, 2, 1.
#[inline(always)]
fn reduce(mut acc: Lanes) -> f32 {
    let mut h = LANES / 2;
    while h > 0 {
        for j in 0..h {
            acc[j] += acc[j + h];
        }
        h /= 2;
    }
    acc[0]
}

/// Multiply-adds whole blocks of `B` bytes / `E` weights into `acc`, one dequantized block
/// at a time; stops at the shorter of `row` and `x`.
#[inline(always)]
pub(crate) fn dot_blocks<const B: usize, const E: usize, F: Block<B, E>, W: Widen>(
    row: &[u8],
    x: &[f32],
    acc: &mut Lanes,
) {
    const { assert!(E.is_multiple_of(LANES)) };
    let mut w = [0.0f32; E];
    for (b, xb) in row.as_chunks::<B>().0.iter().zip(x.as_chunks::<E>().0) {
        F::dequant::<W>(b, &mut w);
        for (wc, xc) in w
            .as_chunks::<LANES>()
            .0
            .iter()
            .zip(xb.as_chunks::<LANES>().0)
        {
            mac(acc, wc, xc);
        }
    }
}

/// The elements of a float row past its last whole chunk of `LANES`: element `j` of the tail
/// goes to lane `j`. `size` is the bytes per element.
#[inline(always)]
fn dot_tail(row: &[u8], x: &[f32], size: usize, acc: &mut Lanes, widen: impl Fn(&[u8]) -> f32) {
    let done = x.len() / LANES * LANES;
    let tail = row[done * size..].chunks_exact(size).zip(&x[done..]);
    for (a, (w, &xv)) in acc.iter_mut().zip(tail) {
        *a += widen(w) * xv;
    }
}

/// [`dot_f32_impl`], compiled on its own (see [`Isa::dot_f32_short`]).
#[inline(never)]
fn dot_f32_outlined(w: &[f32], x: &[f32]) -> f32 {
    dot_f32_impl(w, x)
}

#[inline(always)]
pub(crate) fn dot_f32_impl(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (wc, xc) in w
        .as_chunks::<LANES>()
        .0
        .iter()
        .zip(x.as_chunks::<LANES>().0)
    {
        mac(&mut acc, wc, xc);
    }
    let done = x.len() / LANES * LANES;
    for (a, (wv, xv)) in acc.iter_mut().zip(w[done..].iter().zip(&x[done..])) {
        *a += wv * xv;
    }
    reduce(acc)
}

/// [`super::attend_block`] with its preconditions checked.
#[inline(always)]
pub(crate) fn attend_block_impl<I: Isa>(
    a: &super::Attend<'_>,
    b: usize,
    q: &[f32],
    partials: &mut [f32],
) {
    let hd = a.head_dim;
    let p0 = b * super::ATTEND_BLOCK;
    let n = a.n_pos.min(p0 + super::ATTEND_BLOCK) - p0;
    let g = q.len() / hd;
    let mut weights = vec![0.0f32; g * n];
    // Rows `stride` apart are too far for the CPU's prefetchers to follow while the dots
    // keep few loads in flight: each key row is asked for ROWS_AHEAD positions before its
    // dots, each value row beside its key (a hint: the same arithmetic, the same bits).
    // Contiguous rows (a block widened by `attend_block_half_impl`, which asked for its rows
    // already) are not asked for again.
    let far = a.stride > hd;
    let key_ahead = |p: usize| {
        if far && p < n {
            prefetch(&a.k[(p0 + p) * a.stride..][..hd]);
        }
    };
    (0..ROWS_AHEAD).for_each(key_ahead);
    // Each key row read once for the `g` queries; each query's scores in position order.
    for p in 0..n {
        key_ahead(p + ROWS_AHEAD);
        if far {
            prefetch(&a.v[(p0 + p) * a.stride..][..hd]);
        }
        let k = &a.k[(p0 + p) * a.stride..][..hd];
        for (j, q) in q.chunks_exact(hd).enumerate() {
            weights[j * n + p] = I::dot_f32_short(q, k) * a.scale;
        }
    }
    for (w, part) in weights
        .chunks_exact_mut(n)
        .zip(partials.chunks_exact_mut(super::partial_len(hd)))
    {
        let (max, sum) = super::softmax_max_sum::<I>(w);
        part[..hd].fill(0.0);
        part[hd] = max;
        part[hd + 1] = sum;
    }
    // Each query's sums in position order (a product, then a sum, per element).
    let values = |p: usize| &a.v[(p0 + p) * a.stride..][..hd];
    for (w, part) in weights
        .chunks_exact(n)
        .zip(partials.chunks_exact_mut(super::partial_len(hd)))
    {
        match <&mut [f32; 64]>::try_from(&mut part[..hd]) {
            // The usual head size: the sums stay in registers across the positions.
            Ok(out) => {
                let mut acc = *out;
                weighted_sum(w, values, &mut acc);
                *out = acc;
            }
            Err(_) => weighted_sum(w, values, &mut part[..hd]),
        }
    }
}

/// Block `b` of an f16 cache's rows (`half`) widened to f32, exactly, into `wide` (a buffer
/// the caller keeps), and attended as block 0 of an [`Attend`](super::Attend) holding just
/// them (the same positions, so [`attend_block_impl`]'s arithmetic on the same values). The
/// widening is inlined into the path's own instructions, and each row is asked for ahead of
/// it (a hint).
#[inline(always)]
pub(crate) fn attend_block_half_impl<I: Isa>(
    a: &super::Attend<'_>,
    half: super::Half<'_>,
    b: usize,
    q: &[f32],
    partials: &mut [f32],
    wide: &mut Vec<f32>,
) {
    let (hd, p0) = (a.head_dim, b * super::ATTEND_BLOCK);
    let n = a.n_pos.min(p0 + super::ATTEND_BLOCK) - p0;
    wide.resize(2 * n * hd, 0.0);
    let (k, v) = wide.split_at_mut(n * hd);
    let ahead = |p: usize| {
        if p < n {
            let at = (p0 + p) * a.stride;
            prefetch(&half.k[at..][..hd]);
            prefetch(&half.v[at..][..hd]);
        }
    };
    (0..ROWS_AHEAD).for_each(ahead);
    for p in 0..n {
        ahead(p + ROWS_AHEAD);
        let at = (p0 + p) * a.stride;
        for (dst, src) in [(&mut *k, half.k), (&mut *v, half.v)] {
            for (w, &bits) in dst[p * hd..][..hd].iter_mut().zip(&src[at..][..hd]) {
                *w = I::f16(bits);
            }
        }
    }
    let block = super::Attend {
        k,
        v,
        stride: hd,
        n_pos: n,
        ..*a
    };
    attend_block_impl::<I>(&block, 0, q, partials);
}

/// Rows asked for ahead of their use: keys by [`attend_block_impl`], an f16 cache's keys and
/// values by [`attend_block_half_impl`].
const ROWS_AHEAD: usize = 8;

/// Asks the CPU to bring `values`' cache lines in: a hint, which changes no result.
#[inline(always)]
fn prefetch<T>(values: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in values.chunks(64 / size_of::<T>().max(1)) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a hint about an address inside `values`; SSE is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// `out += sum_p w[p] * values(p)` in position order, each element a product, then a sum.
#[inline(always)]
fn weighted_sum<'v>(w: &[f32], values: impl Fn(usize) -> &'v [f32], out: &mut [f32]) {
    for (p, &weight) in w.iter().enumerate() {
        for (o, &vi) in out.iter_mut().zip(values(p)) {
            *o += weight * vi;
        }
    }
}

#[inline(always)]
pub(crate) fn dot_impl<I: Isa>(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    match dtype {
        DType::F32 => {
            dot_blocks::<_, _, F32Chunk, I>(row, x, &mut acc);
            dot_tail(row, x, 4, &mut acc, |b| {
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            });
        }
        DType::F16 => {
            dot_blocks::<_, _, F16Chunk, I>(row, x, &mut acc);
            dot_tail(row, x, 2, &mut acc, |b| {
                I::f16(u16::from_le_bytes([b[0], b[1]]))
            });
        }
        DType::BF16 => {
            dot_blocks::<_, _, Bf16Chunk, I>(row, x, &mut acc);
            dot_tail(row, x, 2, &mut acc, |b| {
                bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))
            });
        }
        DType::Q8_0 => dot_blocks::<_, _, Q8_0, I>(row, x, &mut acc),
        DType::Q4_0 => I::dot_q4_0(row, x, &mut acc),
        DType::Q4_1 => I::dot_q4_1(row, x, &mut acc),
        DType::Q4_K => I::dot_q4_k(row, x, &mut acc),
        DType::Q6_K => dot_blocks::<_, _, Q6K, I>(row, x, &mut acc),
    }
    reduce(acc)
}

#[inline(always)]
pub(crate) fn dot_rows_impl<I: Isa>(
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    x: &[f32],
    out: &mut [f32],
) {
    if row_bytes == 0 {
        out.fill(0.0);
        return;
    }
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(row_bytes)) {
        *o = dot_impl::<I>(dtype, row, x);
    }
}

// ---------------------------------------------------------------------------------------
// Dequantize
// ---------------------------------------------------------------------------------------

/// Widens whole blocks of `B` bytes / `E` weights; stops at the shorter of `src` and `dst`.
#[inline(always)]
fn dequant_blocks<const B: usize, const E: usize, F: Block<B, E>, W: Widen>(
    src: &[u8],
    dst: &mut [f32],
) {
    for (b, out) in src
        .as_chunks::<B>()
        .0
        .iter()
        .zip(dst.as_chunks_mut::<E>().0)
    {
        F::dequant::<W>(b, out);
    }
}

/// Widens a float row element by element (`size` bytes each).
#[inline(always)]
fn dequant_floats(src: &[u8], dst: &mut [f32], size: usize, widen: impl Fn(&[u8]) -> f32) {
    for (out, b) in dst.iter_mut().zip(src.chunks_exact(size)) {
        *out = widen(b);
    }
}

#[inline(always)]
pub(crate) fn dequantize_impl<I: Isa>(dtype: DType, src: &[u8], dst: &mut [f32]) {
    match dtype {
        DType::F32 => dequant_floats(src, dst, 4, |b| {
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }),
        DType::F16 => {
            dequant_blocks::<_, _, F16Chunk, I>(src, dst);
            let done = dst.len() / LANES * LANES;
            dequant_floats(&src[2 * done..], &mut dst[done..], 2, |b| {
                I::f16(u16::from_le_bytes([b[0], b[1]]))
            });
        }
        DType::BF16 => dequant_floats(src, dst, 2, |b| {
            bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))
        }),
        DType::Q8_0 => dequant_blocks::<_, _, Q8_0, I>(src, dst),
        DType::Q4_0 => dequant_blocks::<_, _, Q4_0, I>(src, dst),
        DType::Q4_1 => dequant_blocks::<_, _, Q4_1, I>(src, dst),
        DType::Q4_K => dequant_blocks::<_, _, Q4K, I>(src, dst),
        DType::Q6_K => dequant_blocks::<_, _, Q6K, I>(src, dst),
    }
}

// ---------------------------------------------------------------------------------------
// Quantize (not hot)
// ---------------------------------------------------------------------------------------

/// Encodes whole blocks of `E` weights / `B` bytes.
fn quant_blocks<const B: usize, const E: usize>(
    src: &[f32],
    dst: &mut [u8],
    quant: fn(&[f32; E], &mut [u8; B]),
) {
    for (x, out) in src
        .as_chunks::<E>()
        .0
        .iter()
        .zip(dst.as_chunks_mut::<B>().0)
    {
        quant(x, out);
    }
}

pub(crate) fn quantize(dtype: DType, src: &[f32], dst: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (out, v) in dst.chunks_exact_mut(4).zip(src) {
                out.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 | DType::BF16 => {
            let narrow = if dtype == DType::F16 {
                float::f32_to_f16
            } else {
                float::f32_to_bf16
            };
            for (out, &v) in dst.chunks_exact_mut(2).zip(src) {
                out.copy_from_slice(&narrow(v).to_le_bytes());
            }
        }
        DType::Q8_0 => quant_blocks::<Q8_0_BYTES, QK>(src, dst, blocks::quant_q8_0),
        DType::Q4_0 => quant_blocks::<Q4_0_BYTES, QK>(src, dst, blocks::quant_q4_0),
        DType::Q4_1 => quant_blocks::<Q4_1_BYTES, QK>(src, dst, blocks::quant_q4_1),
        DType::Q4_K => quant_blocks::<Q4_K_BYTES, QK_K>(src, dst, kquants::quant_q4_k),
        DType::Q6_K => quant_blocks::<Q6_K_BYTES, QK_K>(src, dst, kquants::quant_q6_k),
    }
}
