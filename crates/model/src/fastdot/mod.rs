//! Integer dot products: quantized weights against activations quantized to int8 blocks,
//! the fast path llama.cpp takes for a matrix-vector product (`ggml_vec_dot_q4_1_q8_1` and
//! friends). [`crate::quant`]'s `dot_row` stays the `f32` reference; this module trades the
//! int8 rounding of the activations for speed.
//!
//! # Activations
//!
//! [`QuantizedActs`] splits `x` into blocks of 32 (`x[32b..32b + 32]`), each with an `f32`
//! scale `d_x = max|x| / 127` and `i8` values `q_x = round(x / d_x)`, like ggml's
//! `Q8_0`/`Q8_1`, plus per block `s_x = d_x * Σq_x` (an `f32`) and the exact `Σq_x`.
//!
//! # What a dot product computes
//!
//! Every weight format is read as 32-element blocks `b` (a K-quant super-block is 8 of them:
//! its sub-blocks). Per block an exact integer sum `isum` is formed, then one `f32` term:
//!
//! | weights | `w`                 | `isum` (exact `i32`)   | term                                 |
//! |---------|---------------------|------------------------|--------------------------------------|
//! | `Q8_0`  | `d*q`               | `Σ q q_x`              | `(d*d_x) * isum`                     |
//! | `Q4_0`  | `d*(q-8)`           | `Σ (q-8) q_x`          | `(d*d_x) * isum`                     |
//! | `Q4_1`  | `d*q + m`           | `Σ q q_x`              | `(d*d_x) * isum + m*s_x`             |
//! | `Q4_K`  | `(d*sc)*q - dmin*m` | `Σ q q_x`              | `((d*sc)*d_x) * isum - (dmin*m)*s_x` |
//! | `Q6_K`  | `(d*sc)*(q-32)`     | `Σ_h sc_h Σ(q-32)q_x`  | `(d*d_x) * isum`                     |
//!
//! (`Q4_K`: `sc`, `m` are the 6-bit scale and min of the sub-block. `Q6_K`: `h` runs over
//! the two halves of 16 of the block, each with its `i8` scale `sc_h`; the inner sum is over
//! the half.) `isum` is converted to `f32` with one rounding (`isum as f32`); each product
//! and sum above rounds once, in the order written (never fused).
//!
//! Terms are summed in 16 lanes: block `b` is added to `lane[b % 16]`, in increasing `b`;
//! then `lane[j] += lane[j + h]` for `h` = 8, 4, 2, 1, and `lane[0]` is the result.
//!
//! # Using it
//!
//! For `y = W x` (decode: one position), quantize `x` once with
//! [`QuantizedActs::quantize_into`] (a buffer kept across calls; a few microseconds), then
//! split `W`'s rows into runs, one task each, and call [`dot_q8_rows`] on each run: the
//! activations are read-only and shared, the weights stream through once.
//!
//! # Speed
//!
//! The x86 kernels read a row in chunks of 16 blocks, one block's integer products per
//! 256-bit half register, fold the partial sums of 16 blocks into one vector, and apply the
//! float terms 16 at a time (see `x86_avx512.rs`). On one Zen 4 core, from DRAM, that streams
//! about 17-25 GB/s of weights (AVX-512 VNNI), against 8-14 GB/s for the `f32` reference;
//! `tests.rs`'s `bench_dot_q8` measures it. For several tokens at once (a prefill, a batched
//! step) a CPU with AMX forms the block sums of 16 rows and up to 16 tokens in one tile
//! product (see `x86_amx.rs`); `bench_dot_q8_tokens` compares the paths.
//!
//! # What this module guarantees
//!
//! * Every code path (portable, and on x86-64 chosen once at run time: AVX2, AVX-512 VNNI,
//!   and AMX for products of several tokens) gives bitwise the same result: integer sums are
//!   exact whatever order a path adds them in, and every path performs the `f32` operations
//!   above on the same values in the same lane structure. `tests.rs` checks this on every
//!   path the CPU supports. So a token's result never depends on how many tokens share its
//!   product, nor on which of these paths ran it.
//! * The result is within the int8 rounding of the activations of [`crate::quant::dot_row`]
//!   (each activation moves by at most `d_x / 2`), plus `f32` rounding.
//! * Nothing here panics on well-formed input. Lengths are preconditions, checked once at
//!   the top: a mismatch is a caller bug; debug builds assert, release builds return NaN.

mod acts;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_amx;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use rayon::prelude::*;

pub use acts::QuantizedActs;

use crate::quant::DType;

/// Elements per activation block (and per weight block or sub-block).
const QK: usize = 32;
/// Float lanes of every dot product, and blocks per chunk in the x86 kernels.
const LANES: usize = 16;
/// Elements per chunk of [`LANES`] blocks.
const CHUNK_ELEMS: usize = LANES * QK;

/// Whether [`dot_q8`] handles weights of `dtype`: the block-quantized formats.
pub fn supports(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q4_K | DType::Q6_K
    )
}

/// True when `row_bytes` bytes hold exactly `x.len()` weights of a supported `dtype`.
fn row_fits(dtype: DType, row_bytes: usize, x: &QuantizedActs) -> bool {
    supports(dtype) && dtype.row_bytes(x.len()) == Some(row_bytes)
}

/// `Σ w·x` for one row of `dtype` weights against quantized activations, as the module docs
/// describe.
///
/// Precondition: [`supports`]`(dtype)` and `row.len() == dtype.row_bytes(x.len())`. On a
/// mismatch, debug builds panic and release builds return NaN.
pub fn dot_q8(dtype: DType, row: &[u8], x: &QuantizedActs) -> f32 {
    let mut out = [0.0f32];
    if !row_fits(dtype, row.len(), x) {
        debug_assert!(
            false,
            "dot_q8: {} bytes of {dtype} for {} activations",
            row.len(),
            x.len()
        );
        return f32::NAN;
    }
    Path::best().dot_rows(dtype, row, row.len(), x, &mut out);
    out[0]
}

/// `out[r] = dot_q8(dtype, row r, x)` for `out.len()` consecutive rows of `row_bytes` bytes:
/// a matrix-vector product over a run of rows. Each output is bitwise what [`dot_q8`] gives.
///
/// Precondition: [`supports`]`(dtype)`, `row_bytes == dtype.row_bytes(x.len())` and
/// `rows.len() == out.len() * row_bytes`. On a mismatch, debug builds panic and release
/// builds fill `out` with NaN.
pub fn dot_q8_rows(
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    x: &QuantizedActs,
    out: &mut [f32],
) {
    Path::best().checked_dot_rows(dtype, rows, row_bytes, x, out);
}

/// Several tokens' activations, each quantized as [`QuantizedActs`], for
/// [`dot_q8_rows_tokens`]. Where the AMX kernels run, the layout they read is made with them
/// (by [`QuantizedTokens::new`], before the products' threads start, so that none waits for
/// another to make it), or else by the first product that needs it, and shared by every later
/// product (on any thread).
#[derive(Debug, Clone, Default)]
pub struct QuantizedTokens {
    acts: Vec<QuantizedActs>,
    #[cfg(target_arch = "x86_64")]
    tiles: OnceLock<x86_amx::TokenTiles>,
}

impl QuantizedTokens {
    /// Quantizes each `cols` values of `x` (its last row may be shorter), a token each.
    /// (On the calling thread's rayon pool, a token a task.)
    pub fn new(x: &[f32], cols: usize) -> QuantizedTokens {
        let xs: QuantizedTokens = x
            .par_chunks(cols.max(1))
            .map(|x| {
                let mut acts = take_spare();
                acts.quantize_into(x);
                acts
            })
            .collect::<Vec<_>>()
            .into();
        #[cfg(target_arch = "x86_64")]
        if xs.len() >= 2 && matches!(Path::best(), Path::Amx(_)) {
            let _ = xs.tiles.set(x86_amx::TokenTiles::new(&xs.acts));
        }
        xs
    }

    /// The tokens' activations, in order.
    pub fn acts(&self) -> &[QuantizedActs] {
        &self.acts
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.acts.len()
    }

    /// Whether no tokens are held.
    pub fn is_empty(&self) -> bool {
        self.acts.is_empty()
    }
}

/// The most tokens' buffers kept for reuse ([`QuantizedTokens`]' drop).
const SPARE_TOKENS: usize = 1024;

/// Buffers of dropped [`QuantizedTokens`], for the next ones: a step quantizes every token's
/// activations several times a layer, and each token's are five allocations.
static SPARE: std::sync::Mutex<Vec<QuantizedActs>> = std::sync::Mutex::new(Vec::new());

fn take_spare() -> QuantizedActs {
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    spare.pop().unwrap_or_default()
}

impl Drop for QuantizedTokens {
    fn drop(&mut self) {
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        let room = SPARE_TOKENS.saturating_sub(spare.len());
        spare.extend(self.acts.drain(..).take(room));
    }
}

impl From<Vec<QuantizedActs>> for QuantizedTokens {
    fn from(acts: Vec<QuantizedActs>) -> QuantizedTokens {
        QuantizedTokens {
            acts,
            #[cfg(target_arch = "x86_64")]
            tiles: OnceLock::new(),
        }
    }
}

/// `out[t * n + r] = dot_q8(dtype, row r, xs[t])` for the `n = out.len() / xs.len()`
/// consecutive rows of `row_bytes` bytes in `rows` and every token's activations `xs[t]`: a
/// matrix product over a run of rows, for a prefill or a batched step. Each output is
/// bitwise what [`dot_q8_rows`] gives for that token alone; the fastest paths read and
/// unpack each block of weights once for several tokens (on AMX, 16 tokens a tile product).
///
/// Precondition: as [`dot_q8_rows`] for every `xs[t]`, and `out.len() == xs.len() * n`. On a
/// mismatch, debug builds panic and release builds fill `out` with NaN.
pub fn dot_q8_rows_tokens(
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    xs: &QuantizedTokens,
    out: &mut [f32],
) {
    let n = out.len().checked_div(xs.len()).unwrap_or(0);
    let fits = xs.acts.iter().all(|x| row_fits(dtype, row_bytes, x))
        && n * xs.len() == out.len()
        && row_bytes.checked_mul(n) == Some(rows.len());
    if !fits {
        debug_assert!(
            false,
            "dot_q8_rows_tokens: {} bytes of {dtype} in rows of {row_bytes} bytes, {} tokens, \
             {} outputs",
            rows.len(),
            xs.len(),
            out.len()
        );
        out.fill(f32::NAN);
        return;
    }
    Path::best().dot_rows_tokens(dtype, rows, row_bytes, xs, out);
}

// ---------------------------------------------------------------------------------------
// Code paths
// ---------------------------------------------------------------------------------------

/// Which kernels to run. Holding a token proves the CPU supports its instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 (`vpmaddubsw`, `vpmaddwd`).
    #[cfg(target_arch = "x86_64")]
    Avx2(x86_avx2::Avx2),
    /// AVX-512 VNNI (`vpdpbusd`).
    #[cfg(target_arch = "x86_64")]
    Avx512(x86_avx512::Avx512Vnni),
    /// AMX (`tdpbusd`) for several tokens at once, AVX-512 VNNI for the rest.
    #[cfg(target_arch = "x86_64")]
    Amx(x86_amx::Amx),
}

impl Path {
    /// Every path this CPU supports, slowest first.
    #[cfg(test)]
    fn supported() -> Vec<Path> {
        #[cfg(target_arch = "x86_64")]
        let wider = [
            x86_avx2::Avx2::detect().map(Path::Avx2),
            x86_avx512::Avx512Vnni::detect().map(Path::Avx512),
            x86_amx::Amx::detect().map(Path::Amx),
        ];
        #[cfg(not(target_arch = "x86_64"))]
        let wider: [Option<Path>; 0] = [];
        std::iter::once(Path::Portable)
            .chain(wider.into_iter().flatten())
            .collect()
    }

    /// The fastest path this CPU supports (detected once, then cached).
    #[inline]
    fn best() -> Path {
        static BEST: OnceLock<Path> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if let Some(token) = x86_amx::Amx::detect() {
                    return Path::Amx(token);
                }
                if let Some(token) = x86_avx512::Avx512Vnni::detect() {
                    return Path::Avx512(token);
                }
                if let Some(token) = x86_avx2::Avx2::detect() {
                    return Path::Avx2(token);
                }
            }
            Path::Portable
        })
    }

    #[cfg(test)]
    fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Path::Avx2(_) => "avx2",
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(_) => "avx512vnni",
            #[cfg(target_arch = "x86_64")]
            Path::Amx(_) => "amx",
        }
    }

    /// [`dot_q8_rows`] on this path: checks the lengths, then runs the kernels.
    fn checked_dot_rows(
        self,
        dtype: DType,
        rows: &[u8],
        row_bytes: usize,
        x: &QuantizedActs,
        out: &mut [f32],
    ) {
        if !row_fits(dtype, row_bytes, x) || row_bytes.checked_mul(out.len()) != Some(rows.len()) {
            debug_assert!(
                false,
                "dot_q8_rows: {} bytes of {dtype} for {} rows of {row_bytes} bytes \
                 and {} activations",
                rows.len(),
                out.len(),
                x.len()
            );
            out.fill(f32::NAN);
            return;
        }
        self.dot_rows(dtype, rows, row_bytes, x, out);
    }

    /// [`dot_q8_rows_tokens`] on this path. Precondition (checked by the caller): the
    /// lengths fit as it requires.
    fn dot_rows_tokens(
        self,
        dtype: DType,
        rows: &[u8],
        row_bytes: usize,
        xs: &QuantizedTokens,
        out: &mut [f32],
    ) {
        if row_bytes == 0 || out.is_empty() {
            // No activations (every dot is the empty sum), or nothing to compute.
            out.fill(0.0);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        match self {
            Path::Avx512(token) => {
                return token.dot_rows_tokens(dtype, rows, row_bytes, &xs.acts, out);
            }
            Path::Amx(token) => return token.dot_rows_tokens(dtype, rows, row_bytes, xs, out),
            _ => {}
        }
        let n = rows.len() / row_bytes;
        for (x, out) in xs.acts.iter().zip(out.chunks_exact_mut(n)) {
            self.dot_rows(dtype, rows, row_bytes, x, out);
        }
    }

    /// The kernels. Precondition (checked by the callers): the lengths fit as
    /// [`dot_q8_rows`] requires.
    fn dot_rows(
        self,
        dtype: DType,
        rows: &[u8],
        row_bytes: usize,
        x: &QuantizedActs,
        out: &mut [f32],
    ) {
        if row_bytes == 0 {
            // No activations: every dot is the empty sum.
            out.fill(0.0);
            return;
        }
        match self {
            Path::Portable => portable::dot_rows(dtype, rows, row_bytes, x, out),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2(token) => token.dot_rows(dtype, rows, row_bytes, x, out),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(token) => token.dot_rows(dtype, rows, row_bytes, x, out),
            #[cfg(target_arch = "x86_64")]
            Path::Amx(token) => token.wide().dot_rows(dtype, rows, row_bytes, x, out),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared by the x86 kernels
// ---------------------------------------------------------------------------------------

/// The little-endian u32 at `v[at..at + 4]`.
#[cfg(target_arch = "x86_64")]
#[inline]
fn le_u32(v: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([v[at], v[at + 1], v[at + 2], v[at + 3]])
}

/// A `Q4_K` super-block's 12 bytes of packed scales as its 8 six-bit scales and 8 mins, a
/// byte each (`scale_min_k4` for all `j` at once, as ggml's `utmp` shuffle).
#[cfg(target_arch = "x86_64")]
#[inline]
fn unpack_scales_q4_k(s: &[u8]) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let (a, b, c) = (le_u32(s, 0), le_u32(s, 4), le_u32(s, 8));
    let sc = (a & LOW6, (c & LOW4) | (((a >> 6) & TOP2) << 4));
    let m = (b & LOW6, ((c >> 4) & LOW4) | (((b >> 6) & TOP2) << 4));
    (
        u64::from(sc.0) | (u64::from(sc.1) << 32),
        u64::from(m.0) | (u64::from(m.1) << 32),
    )
}
