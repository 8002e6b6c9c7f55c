//! x86-64 code paths: AVX2 and AVX-512 copies of the row loops in `rows.rs`, chosen at run
//! time.
//!
//! Each path is a token type that only its `detect` makes, after `is_x86_feature_detected!`
//! has seen every feature its `#[target_feature]` functions are compiled with. The copies
//! are the generic loops compiled wider, plus F16C for the f16 scales and, on AVX-512, table
//! lookups for `Q4_0`/`Q4_1`: per block the 16 possible weights are computed once, with the
//! very operations the portable dequantizer applies to each weight, and each weight is then
//! looked up (`vpermps`) instead of recomputed. Same values, same summation order, same bits.

use std::arch::x86_64::{
    __m128, _mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32, _mm_loadu_si128, _mm_movehdup_ps,
    _mm_set1_epi16, _mm256_loadu_si256, _mm512_add_ps, _mm512_cvtepu8_epi32, _mm512_cvtph_ps,
    _mm512_loadu_ps, _mm512_mul_ps, _mm512_permutexvar_ps, _mm512_set1_ps, _mm512_setr_ps,
    _mm512_srli_epi32, _mm512_storeu_ps,
};

use super::DType;
use super::blocks::{Q4_0_BYTES, Q4_1_BYTES, QK};
use super::float::Widen;
use super::rows::{Isa, LANES, Lanes, dequantize_impl, dot_f32_impl, dot_impl, dot_rows_impl};

/// Implements `Widen` with F16C. The types using this are private to this module and only
/// instantiate code inside its `#[target_feature(enable = "...f16c")]` functions.
macro_rules! widen_with_f16c {
    ($isa:ty) => {
        impl Widen for $isa {
            #[inline(always)]
            fn f16(bits: u16) -> f32 {
                // SAFETY: only reached from this module's functions compiled with F16C, which
                // run only after `detect` saw F16C.
                unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(bits as i16))) }
            }

            #[inline(always)]
            fn f16x2(bytes: &[u8], at: usize) -> [f32; 2] {
                let bits =
                    i32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
                // SAFETY: as in `f16`. (A 32-bit load into a zeroed register: no false
                // dependency, see `Widen`.)
                let v: __m128 = unsafe { _mm_cvtph_ps(_mm_cvtsi32_si128(bits)) };
                // SAFETY: as in `f16`.
                unsafe { [_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v))] }
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------

/// Proof that the running CPU supports AVX2 and F16C: only [`Avx2::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2(());

struct Avx2Isa;
widen_with_f16c!(Avx2Isa);
impl Isa for Avx2Isa {}

impl Avx2 {
    pub(crate) fn detect() -> Option<Avx2> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")).then_some(Avx2(()))
    }

    pub(crate) fn dot(self, dtype: DType, row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: an `Avx2` exists only if `detect` saw AVX2 and F16C on this CPU.
        unsafe { avx2_dot(dtype, row, x) }
    }

    pub(crate) fn dot_rows(
        self,
        dtype: DType,
        rows: &[u8],
        row_bytes: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: an `Avx2` exists only if `detect` saw AVX2 and F16C on this CPU.
        unsafe { avx2_dot_rows(dtype, rows, row_bytes, x, out) }
    }

    pub(crate) fn dot_f32(self, w: &[f32], x: &[f32]) -> f32 {
        // SAFETY: an `Avx2` exists only if `detect` saw AVX2 and F16C on this CPU.
        unsafe { avx2_dot_f32(w, x) }
    }

    pub(crate) fn dequantize(self, dtype: DType, src: &[u8], dst: &mut [f32]) {
        // SAFETY: an `Avx2` exists only if `detect` saw AVX2 and F16C on this CPU.
        unsafe { avx2_dequantize(dtype, src, dst) }
    }
}

#[target_feature(enable = "avx2,f16c")]
fn avx2_dot(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    dot_impl::<Avx2Isa>(dtype, row, x)
}

#[target_feature(enable = "avx2,f16c")]
fn avx2_dot_rows(dtype: DType, rows: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    dot_rows_impl::<Avx2Isa>(dtype, rows, row_bytes, x, out);
}

#[target_feature(enable = "avx2,f16c")]
fn avx2_dot_f32(w: &[f32], x: &[f32]) -> f32 {
    dot_f32_impl(w, x)
}

#[target_feature(enable = "avx2,f16c")]
fn avx2_dequantize(dtype: DType, src: &[u8], dst: &mut [f32]) {
    dequantize_impl::<Avx2Isa>(dtype, src, dst);
}

// ---------------------------------------------------------------------------------------
// AVX-512
// ---------------------------------------------------------------------------------------

/// Proof that the running CPU supports AVX-512 F/BW/VL, AVX2 and F16C: only
/// [`Avx512::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx512(());

struct Avx512Isa;
widen_with_f16c!(Avx512Isa);

impl Isa for Avx512Isa {
    #[inline(always)]
    fn dot_q4_0(row: &[u8], x: &[f32], acc: &mut Lanes) {
        // SAFETY: only reached from `avx512_dot`, which runs only after `detect`.
        unsafe { dot_q4_lut::<Q4_0_BYTES>(row, x, acc) }
    }

    #[inline(always)]
    fn dot_q4_1(row: &[u8], x: &[f32], acc: &mut Lanes) {
        // SAFETY: only reached from `avx512_dot`, which runs only after `detect`.
        unsafe { dot_q4_lut::<Q4_1_BYTES>(row, x, acc) }
    }
}

impl Avx512 {
    pub(crate) fn detect() -> Option<Avx512> {
        let yes = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c");
        yes.then_some(Avx512(()))
    }

    pub(crate) fn dot(self, dtype: DType, row: &[u8], x: &[f32]) -> f32 {
        // SAFETY: an `Avx512` exists only if `detect` saw every feature enabled on this CPU.
        unsafe { avx512_dot(dtype, row, x) }
    }

    pub(crate) fn dot_rows(
        self,
        dtype: DType,
        rows: &[u8],
        row_bytes: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: an `Avx512` exists only if `detect` saw every feature enabled on this CPU.
        unsafe { avx512_dot_rows(dtype, rows, row_bytes, x, out) }
    }

    pub(crate) fn dot_f32(self, w: &[f32], x: &[f32]) -> f32 {
        // SAFETY: an `Avx512` exists only if `detect` saw every feature enabled on this CPU.
        unsafe { avx512_dot_f32(w, x) }
    }

    pub(crate) fn dequantize(self, dtype: DType, src: &[u8], dst: &mut [f32]) {
        // SAFETY: an `Avx512` exists only if `detect` saw every feature enabled on this CPU.
        unsafe { avx512_dequantize(dtype, src, dst) }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
fn avx512_dot(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    dot_impl::<Avx512Isa>(dtype, row, x)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
fn avx512_dot_rows(dtype: DType, rows: &[u8], row_bytes: usize, x: &[f32], out: &mut [f32]) {
    dot_rows_impl::<Avx512Isa>(dtype, rows, row_bytes, x, out);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
fn avx512_dot_f32(w: &[f32], x: &[f32]) -> f32 {
    dot_f32_impl(w, x)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
fn avx512_dequantize(dtype: DType, src: &[u8], dst: &mut [f32]) {
    dequantize_impl::<Avx512Isa>(dtype, src, dst);
}

/// Blocks per batch of scale conversions in [`dot_q4_lut`].
const SCALE_BATCH: usize = 16;

/// `Q4_0` (`B` = 18) or `Q4_1` (`B` = 20) blocks multiply-added into `acc`, as
/// `rows::dot_blocks` does, with the weights looked up in a per-block table of the 16
/// values a nibble can stand for: `t[q] = f32(q - 8) * d` or `t[q] = f32(q) * d + m`,
/// exactly the portable dequantizers' expressions.
///
/// The f16 scales of 16 blocks are widened together first, so that the block loop
/// broadcasts them from memory (a plain load) rather than across registers (a shuffle, the
/// scarce resource here: the byte widening and the two lookups are shuffles too).
#[target_feature(enable = "avx512f,f16c")]
#[inline]
fn dot_q4_lut<const B: usize>(row: &[u8], x: &[f32], acc: &mut Lanes) {
    const { assert!(B == Q4_0_BYTES || B == Q4_1_BYTES) };
    const { assert!(LANES == 32) };
    let nibbles = if B == Q4_0_BYTES {
        _mm512_setr_ps(
            -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
        )
    } else {
        _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        )
    };
    // SAFETY: `acc` holds 32 f32s: lanes 0..16 and 16..32.
    let (mut acc_lo, mut acc_hi) = unsafe {
        (
            _mm512_loadu_ps(acc.as_ptr()),
            _mm512_loadu_ps(acc.as_ptr().add(16)),
        )
    };
    let blocks = row.as_chunks::<B>().0;
    for (batch, x_batch) in blocks
        .chunks(SCALE_BATCH)
        .zip(x.as_chunks::<QK>().0.chunks(SCALE_BATCH))
    {
        // [d, m] of each block (m = 0 for Q4_0, unused), widened 16 f16s at a time.
        let mut halves = [0u16; 2 * SCALE_BATCH];
        for (h, b) in halves.as_chunks_mut::<2>().0.iter_mut().zip(batch) {
            h[0] = u16::from_le_bytes([b[0], b[1]]);
            if B == Q4_1_BYTES {
                h[1] = u16::from_le_bytes([b[2], b[3]]);
            }
        }
        let mut scales = [0.0f32; 2 * SCALE_BATCH];
        for (s, h) in scales
            .as_chunks_mut::<16>()
            .0
            .iter_mut()
            .zip(halves.as_chunks::<16>().0)
        {
            // SAFETY: `h` is 16 u16s (one 256-bit load); `s` is 16 f32s (one 512-bit store).
            unsafe {
                _mm512_storeu_ps(
                    s.as_mut_ptr(),
                    _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr().cast())),
                )
            };
        }
        for ((b, xb), dm) in batch.iter().zip(x_batch).zip(scales.as_chunks::<2>().0) {
            let table = if B == Q4_0_BYTES {
                _mm512_mul_ps(nibbles, _mm512_set1_ps(dm[0]))
            } else {
                _mm512_add_ps(
                    _mm512_mul_ps(nibbles, _mm512_set1_ps(dm[0])),
                    _mm512_set1_ps(dm[1]),
                )
            };
            // SAFETY: the last 16 bytes of a block are its nibbles (B - 16 = 2 or 4).
            let qs = unsafe { _mm_loadu_si128(b[B - QK / 2..].as_ptr().cast()) };
            // One byte per 32-bit lane; `vpermps` reads only the low 4 bits of each index, so
            // the low nibble indexes as it is and the high nibble after a shift.
            let bytes = _mm512_cvtepu8_epi32(qs);
            let w_lo = _mm512_permutexvar_ps(bytes, table);
            let w_hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table);
            // SAFETY: `xb` holds 32 f32s: elements 0..16 and 16..32 of the block.
            let (x_lo, x_hi) = unsafe {
                (
                    _mm512_loadu_ps(xb.as_ptr()),
                    _mm512_loadu_ps(xb.as_ptr().add(16)),
                )
            };
            acc_lo = _mm512_add_ps(acc_lo, _mm512_mul_ps(w_lo, x_lo));
            acc_hi = _mm512_add_ps(acc_hi, _mm512_mul_ps(w_hi, x_hi));
        }
    }
    // SAFETY: as for the loads.
    unsafe {
        _mm512_storeu_ps(acc.as_mut_ptr(), acc_lo);
        _mm512_storeu_ps(acc.as_mut_ptr().add(16), acc_hi);
    }
}
