//! x86-64 code paths: AVX2 and AVX-512 copies of the row loops in `rows.rs`, chosen at run
//! time.
//!
//! Each path is a token type that only its `detect` makes, after `is_x86_feature_detected!`
//! has seen every feature its `#[target_feature]` functions are compiled with. The copies
//! are the generic loops compiled wider, plus F16C for f16 data and, on AVX-512, table lookups
//! for `Q4_0`/`Q4_1`/`Q4_K`: per (sub-)block the 16 possible weights are computed once, with
//! the very operations the portable dequantizer applies to each weight, and each weight is
//! then looked up (`vpermps`) instead of recomputed. Same values, same summation order, same
//! bits. (Measured on a Zen 4 core: `Q4_1` 5.5 GB/s of weights with AVX2, 7.7 with the
//! lookups, against 2.5 for the SSE2 baseline.) Both paths also run `exp` (see `exp.rs`) on 8
//! lanes, with its very operations.

use std::arch::x86_64::{
    __m128, __m256, __m512i, _mm_add_ps, _mm_add_ss, _mm_cvtph_ps, _mm_cvtsi32_si128,
    _mm_cvtss_f32, _mm_loadu_si128, _mm_movehdup_ps, _mm_movehl_ps, _mm_set1_epi16,
    _mm256_add_epi64, _mm256_add_ps, _mm256_and_si256, _mm256_castpd_ps, _mm256_castpd_si256,
    _mm256_castps128_ps256, _mm256_castps256_ps128, _mm256_castsi256_pd, _mm256_cvtpd_ps,
    _mm256_cvtps_pd, _mm256_extractf128_ps, _mm256_fmadd_pd, _mm256_fmsub_pd,
    _mm256_i64gather_epi64, _mm256_insertf128_ps, _mm256_loadu_ps, _mm256_mul_pd, _mm256_mul_ps,
    _mm256_set1_epi64x, _mm256_set1_pd, _mm256_setzero_ps, _mm256_slli_epi64, _mm256_storeu_ps,
    _mm256_sub_pd, _mm512_add_epi64, _mm512_add_ps, _mm512_broadcastss_ps, _mm512_castpd_si512,
    _mm512_castps_pd, _mm512_castps512_ps256, _mm512_castsi512_pd, _mm512_cvtepu8_epi32,
    _mm512_cvtpd_ps, _mm512_cvtps_pd, _mm512_extractf64x4_pd, _mm512_fmadd_pd, _mm512_fmsub_pd,
    _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_blend_epi64, _mm512_mul_pd, _mm512_mul_ps,
    _mm512_permutex2var_epi64, _mm512_permutexvar_ps, _mm512_set1_epi64, _mm512_set1_pd,
    _mm512_set1_ps, _mm512_setr_ps, _mm512_setzero_ps, _mm512_slli_epi64, _mm512_srli_epi32,
    _mm512_storeu_ps, _mm512_sub_pd, _mm512_sub_ps, _mm512_test_epi64_mask,
};

use super::DType;
use super::blocks::{Q4_0_BYTES, Q4_1_BYTES, QK};
use super::exp;
use super::float::{Widen, le_f16};
use super::kquants::{K_SCALE_SIZE, Q4_K_BYTES, QK_K, scale_min_k4};
use super::rows::{Isa, LANES, Lanes, dot_f32_impl};

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

/// A path's entry points: `$token`'s methods (the token proves that `detect` saw every feature
/// of the path on this CPU), each calling the generic loop of `rows.rs` compiled with the
/// path's features in module `$fns`: `$base` (wider loads, F16C), `$fma` for attention (its
/// `exp` too) and `$exp` for `exp` alone.
macro_rules! path_entries {
    ($token:ident, $isa:ty, $fns:ident, $base:literal, $fma:literal, $exp:literal) => {
        impl $token {
            pub(crate) fn dot(self, dtype: DType, row: &[u8], x: &[f32]) -> f32 {
                // SAFETY: the token exists only if `detect` saw the path's features.
                unsafe { $fns::dot(dtype, row, x) }
            }

            pub(crate) fn dot_rows(
                self,
                dtype: DType,
                rows: &[u8],
                row_bytes: usize,
                x: &[f32],
                out: &mut [f32],
            ) {
                // SAFETY: as in `dot`.
                unsafe { $fns::dot_rows(dtype, rows, row_bytes, x, out) }
            }

            pub(crate) fn dot_f32(self, w: &[f32], x: &[f32]) -> f32 {
                // SAFETY: as in `dot`.
                unsafe { $fns::dot_f32(w, x) }
            }

            pub(crate) fn attend_block(
                self,
                a: &super::Attend<'_>,
                b: usize,
                q: &[f32],
                partials: &mut [f32],
            ) {
                // SAFETY: as in `dot`.
                unsafe { $fns::attend_block(a, b, q, partials) }
            }

            pub(crate) fn attend_block_half(
                self,
                a: &super::Attend<'_>,
                half: super::Half<'_>,
                b: usize,
                q: &[f32],
                partials: &mut [f32],
                wide: &mut Vec<f32>,
            ) {
                // SAFETY: as in `dot`.
                unsafe { $fns::attend_block_half(a, half, b, q, partials, wide) }
            }

            pub(crate) fn dequantize(self, dtype: DType, src: &[u8], dst: &mut [f32]) {
                // SAFETY: as in `dot`.
                unsafe { $fns::dequantize(dtype, src, dst) }
            }

            pub(crate) fn exp_in_place(self, x: &mut [f32]) {
                // SAFETY: as in `dot`.
                unsafe { $fns::exp_in_place(x) }
            }
        }

        mod $fns {
            use super::super::rows::{
                attend_block_half_impl, attend_block_impl, dequantize_impl, dot_f32_impl, dot_impl,
                dot_rows_impl,
            };
            use super::super::{Attend, DType, Half};
            use super::{exp_lanes, $isa};

            #[target_feature(enable = $base)]
            pub(super) fn dot(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
                dot_impl::<$isa>(dtype, row, x)
            }

            #[target_feature(enable = $base)]
            pub(super) fn dot_rows(
                dtype: DType,
                rows: &[u8],
                row_bytes: usize,
                x: &[f32],
                out: &mut [f32],
            ) {
                dot_rows_impl::<$isa>(dtype, rows, row_bytes, x, out);
            }

            #[target_feature(enable = $base)]
            pub(super) fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
                dot_f32_impl(w, x)
            }

            #[target_feature(enable = $fma)]
            pub(super) fn attend_block(a: &Attend<'_>, b: usize, q: &[f32], partials: &mut [f32]) {
                attend_block_impl::<$isa>(a, b, q, partials);
            }

            #[target_feature(enable = $fma)]
            pub(super) fn attend_block_half(
                a: &Attend<'_>,
                half: Half<'_>,
                b: usize,
                q: &[f32],
                partials: &mut [f32],
                wide: &mut Vec<f32>,
            ) {
                attend_block_half_impl::<$isa>(a, half, b, q, partials, wide);
            }

            #[target_feature(enable = $base)]
            pub(super) fn dequantize(dtype: DType, src: &[u8], dst: &mut [f32]) {
                dequantize_impl::<$isa>(dtype, src, dst);
            }

            #[target_feature(enable = $exp)]
            pub(super) fn exp_in_place(x: &mut [f32]) {
                exp_lanes::<$isa>(x);
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------

/// Proof that the running CPU supports AVX2, F16C and FMA: only [`Avx2::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2(());

struct Avx2Isa;
widen_with_f16c!(Avx2Isa);
impl Isa for Avx2Isa {
    #[inline(always)]
    fn dot_f32_short(w: &[f32], x: &[f32]) -> f32 {
        // SAFETY: only called within `avx2::*`, which run only after `detect`.
        unsafe { dot_f32_avx2(w, x) }
    }

    #[inline(always)]
    fn exp_in_place(x: &mut [f32]) {
        exp_lanes::<Avx2Isa>(x);
    }
}

impl Exp8 for Avx2Isa {
    #[inline(always)]
    fn exp8(x: __m256) -> __m256 {
        // SAFETY: only called within `avx2::*`, which run only after `detect`.
        unsafe {
            let lo = exp4_avx2(_mm256_castps256_ps128(x));
            _mm256_insertf128_ps::<1>(
                _mm256_castps128_ps256(lo),
                exp4_avx2(_mm256_extractf128_ps::<1>(x)),
            )
        }
    }
}

/// [`exp::exp`] of 4 lanes, its very operations in `f64` lanes (the table by a gather).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp4_avx2(x: __m128) -> __m128 {
    let xd = _mm256_cvtps_pd(x);
    let inv = _mm256_set1_pd(exp::INV_LN2_N);
    let shift = _mm256_set1_pd(exp::SHIFT);
    let shifted = _mm256_fmadd_pd(inv, xd, shift);
    let k = _mm256_castpd_si256(shifted);
    let r = _mm256_fmsub_pd(inv, xd, _mm256_sub_pd(shifted, shift));
    let i = _mm256_and_si256(k, _mm256_set1_epi64x(31));
    // SAFETY: every index is below 32, the table's length.
    let t = unsafe { _mm256_i64gather_epi64::<8>(exp::TABLE.as_ptr().cast(), i) };
    let scale = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(k)));
    let z = _mm256_fmadd_pd(_mm256_set1_pd(exp::C[0]), r, _mm256_set1_pd(exp::C[1]));
    let y = _mm256_fmadd_pd(_mm256_set1_pd(exp::C[2]), r, _mm256_set1_pd(1.0));
    let y = _mm256_fmadd_pd(z, _mm256_mul_pd(r, r), y);
    _mm256_cvtpd_ps(_mm256_mul_pd(y, scale))
}

/// 8 lanes of [`exp::exp`] for `|x| < 88` (other lanes are redone by [`exp_lanes`]).
trait Exp8 {
    fn exp8(x: __m256) -> __m256;
}

/// [`exp::exp_in_place`] 8 lanes at a time by `E`: the same bits.
#[inline(always)]
fn exp_lanes<E: Exp8>(x: &mut [f32]) {
    let (lanes, tail) = x.as_chunks_mut::<8>();
    for lanes in lanes {
        let inputs = *lanes;
        // SAFETY: 8 floats in and out.
        unsafe {
            let y = E::exp8(_mm256_loadu_ps(inputs.as_ptr()));
            _mm256_storeu_ps(lanes.as_mut_ptr(), y);
        }
        if !inputs.iter().all(|&v| exp::in_range(v)) {
            for (out, &v) in lanes.iter_mut().zip(&inputs) {
                *out = exp::exp(v);
            }
        }
    }
    exp::exp_in_place(tail);
}

/// [`dot_f32_impl`] with its 32 lanes in four registers: lane `i % 32` gets `w[i] * x[i]`
/// in increasing `i` (a product, then a sum), then the lanes are added pairwise, 16 apart,
/// then 8, 4, 2, 1. Same operations on the same values, so the same bits. Rows that are not
/// whole 32-float chunks take `dot_f32_impl` itself.
#[target_feature(enable = "avx2")]
#[inline]
fn dot_f32_avx2(w: &[f32], x: &[f32]) -> f32 {
    let ((wc, []), (xc, [])) = (w.as_chunks::<LANES>(), x.as_chunks::<LANES>()) else {
        return dot_f32_impl(w, x);
    };
    let mut acc = [_mm256_setzero_ps(); 4];
    for (w, x) in wc.iter().zip(xc) {
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: 8 floats at 8i inside 32-float chunks.
            let (w, x) = unsafe {
                (
                    _mm256_loadu_ps(w.as_ptr().add(8 * i)),
                    _mm256_loadu_ps(x.as_ptr().add(8 * i)),
                )
            };
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(w, x));
        }
    }
    // Lanes 0..16 += 16..32 (registers 0, 1 += 2, 3), then 0..8 += 8..16.
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    sum_lanes8(v)
}

/// Lanes 0..4 += 4..8, then 0..2 += 2..4, then lane 0 += lane 1; returns lane 0.
#[target_feature(enable = "avx2")]
#[inline]
fn sum_lanes8(v: __m256) -> f32 {
    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

/// [`dot_f32_avx2`] with the 32 lanes in two AVX-512 registers.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
fn dot_f32_avx512(w: &[f32], x: &[f32]) -> f32 {
    let ((wc, []), (xc, [])) = (w.as_chunks::<LANES>(), x.as_chunks::<LANES>()) else {
        return dot_f32_impl(w, x);
    };
    let mut acc = [_mm512_setzero_ps(); 2];
    for (w, x) in wc.iter().zip(xc) {
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: 16 floats at 16i inside 32-float chunks.
            let (w, x) = unsafe {
                (
                    _mm512_loadu_ps(w.as_ptr().add(16 * i)),
                    _mm512_loadu_ps(x.as_ptr().add(16 * i)),
                )
            };
            *acc = _mm512_add_ps(*acc, _mm512_mul_ps(w, x));
        }
    }
    // Lanes 0..16 += 16..32, then 0..8 += 8..16.
    let v = _mm512_add_ps(acc[0], acc[1]);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    sum_lanes8(_mm256_add_ps(_mm512_castps512_ps256(v), hi))
}

impl Avx2 {
    pub(crate) fn detect() -> Option<Avx2> {
        let yes = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma");
        yes.then_some(Avx2(()))
    }
}

path_entries!(
    Avx2,
    Avx2Isa,
    avx2,
    "avx2,f16c",
    "avx2,f16c,fma",
    "avx2,fma"
);

// ---------------------------------------------------------------------------------------
// AVX-512
// ---------------------------------------------------------------------------------------

/// Proof that the running CPU supports AVX-512 F/BW/VL, AVX2, F16C and FMA: only
/// [`Avx512::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx512(());

struct Avx512Isa;
widen_with_f16c!(Avx512Isa);

impl Isa for Avx512Isa {
    #[inline(always)]
    fn dot_q4_0(row: &[u8], x: &[f32], acc: &mut Lanes) {
        // SAFETY: only called within `avx512::dot*`, which run only after `detect`.
        unsafe { dot_q4_lut::<Q4_0_BYTES>(row, x, acc) }
    }

    #[inline(always)]
    fn dot_q4_1(row: &[u8], x: &[f32], acc: &mut Lanes) {
        // SAFETY: only called within `avx512::dot*`, which run only after `detect`.
        unsafe { dot_q4_lut::<Q4_1_BYTES>(row, x, acc) }
    }

    #[inline(always)]
    fn dot_q4_k(row: &[u8], x: &[f32], acc: &mut Lanes) {
        // SAFETY: only called within `avx512::dot*`, which run only after `detect`.
        unsafe { dot_q4_k_lut(row, x, acc) }
    }

    #[inline(always)]
    fn dot_f32_short(w: &[f32], x: &[f32]) -> f32 {
        // SAFETY: only called within `avx512::*`, which run only after `detect`.
        unsafe { dot_f32_avx512(w, x) }
    }

    #[inline(always)]
    fn exp_in_place(x: &mut [f32]) {
        exp_lanes::<Avx512Isa>(x);
    }
}

impl Exp8 for Avx512Isa {
    #[inline(always)]
    fn exp8(x: __m256) -> __m256 {
        // SAFETY: only called within `avx512::*`, which run only after `detect`.
        unsafe { exp8_avx512(x) }
    }
}

/// [`exp::exp`] of 8 lanes, its very operations in `f64` lanes (the table by two
/// two-register permutes and a blend).
#[target_feature(enable = "avx512f,fma")]
#[inline]
fn exp8_avx512(x: __m256) -> __m256 {
    let xd = _mm512_cvtps_pd(x);
    let inv = _mm512_set1_pd(exp::INV_LN2_N);
    let shift = _mm512_set1_pd(exp::SHIFT);
    let shifted = _mm512_fmadd_pd(inv, xd, shift);
    let k = _mm512_castpd_si512(shifted);
    let r = _mm512_fmsub_pd(inv, xd, _mm512_sub_pd(shifted, shift));
    let t = exp::TABLE.as_ptr();
    // SAFETY: the table holds 4 registers' worth. (No closure: it would not inherit the
    // target features.)
    let table: [__m512i; 4] = unsafe {
        [
            _mm512_loadu_si512(t.cast()),
            _mm512_loadu_si512(t.add(8).cast()),
            _mm512_loadu_si512(t.add(16).cast()),
            _mm512_loadu_si512(t.add(24).cast()),
        ]
    };
    // Entries 0..16 and 16..32 by the index's low 4 bits; its bit 4 picks one.
    let low = _mm512_permutex2var_epi64(table[0], k, table[1]);
    let high = _mm512_permutex2var_epi64(table[2], k, table[3]);
    let t = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(k, _mm512_set1_epi64(16)), low, high);
    let scale = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(k)));
    let z = _mm512_fmadd_pd(_mm512_set1_pd(exp::C[0]), r, _mm512_set1_pd(exp::C[1]));
    let y = _mm512_fmadd_pd(_mm512_set1_pd(exp::C[2]), r, _mm512_set1_pd(1.0));
    let y = _mm512_fmadd_pd(z, _mm512_mul_pd(r, r), y);
    _mm512_cvtpd_ps(_mm512_mul_pd(y, scale))
}

impl Avx512 {
    pub(crate) fn detect() -> Option<Avx512> {
        let yes = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma");
        yes.then_some(Avx512(()))
    }
}

path_entries!(
    Avx512,
    Avx512Isa,
    avx512,
    "avx512f,avx512bw,avx512vl,avx2,f16c",
    "avx512f,avx512bw,avx512vl,avx2,f16c,fma",
    "avx512f,avx2,fma"
);

/// `Q4_0` (`B` = 18) or `Q4_1` (`B` = 20) blocks multiply-added into `acc`, as
/// `rows::dot_blocks` does, with the weights looked up in a per-block table of the 16
/// values a nibble can stand for: `t[q] = f32(q - 8) * d` or `t[q] = f32(q) * d + m`,
/// exactly the portable dequantizers' expressions.
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
    for (b, xb) in row.as_chunks::<B>().0.iter().zip(x.as_chunks::<QK>().0) {
        let table = if B == Q4_0_BYTES {
            // A lone f16 in software (see `Widen` on F16C and false dependencies).
            _mm512_mul_ps(nibbles, _mm512_set1_ps(le_f16(b, 0)))
        } else {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
                b[0], b[1], b[2], b[3],
            ])));
            let (d, m) = (
                _mm512_broadcastss_ps(dm),
                _mm512_broadcastss_ps(_mm_movehdup_ps(dm)),
            );
            _mm512_add_ps(_mm512_mul_ps(nibbles, d), m)
        };
        // SAFETY: the last 16 bytes of a block are its nibbles (B - 16 = 2 or 4).
        let qs = unsafe { _mm_loadu_si128(b[B - QK / 2..].as_ptr().cast()) };
        // One byte per 32-bit lane; `vpermps` reads only the low 4 bits of each index, so the
        // low nibble indexes as it is and the high nibble after a shift.
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
    // SAFETY: as for the loads.
    unsafe {
        _mm512_storeu_ps(acc.as_mut_ptr(), acc_lo);
        _mm512_storeu_ps(acc.as_mut_ptr().add(16), acc_hi);
    }
}

/// `Q4_K` blocks multiply-added into `acc`, as `rows::dot_blocks` does, with table lookups
/// as in [`dot_q4_lut`]: per 32-weight sub-block, `t[q] = (d*sc) * f32(q) - (dmin*m)`, the
/// portable dequantizer's expression. Sub-blocks are added in order, elements 0..16 of each
/// to lanes 0..16 and 16..32 to lanes 16..32.
#[target_feature(enable = "avx512f,f16c")]
#[inline]
fn dot_q4_k_lut(row: &[u8], x: &[f32], acc: &mut Lanes) {
    const { assert!(LANES == 32) };
    let nibbles = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    // SAFETY: `acc` holds 32 f32s: lanes 0..16 and 16..32.
    let (mut acc_lo, mut acc_hi) = unsafe {
        (
            _mm512_loadu_ps(acc.as_ptr()),
            _mm512_loadu_ps(acc.as_ptr().add(16)),
        )
    };
    for (b, xb) in row
        .as_chunks::<Q4_K_BYTES>()
        .0
        .iter()
        .zip(x.as_chunks::<QK_K>().0)
    {
        let [d, dmin] = Avx512Isa::f16x2(b, 0);
        let scales: [u8; K_SCALE_SIZE] = std::array::from_fn(|i| b[4 + i]);
        let qs = &b[4 + K_SCALE_SIZE..];
        // Group g: 32 bytes, low nibbles are sub-block 2g, high nibbles sub-block 2g + 1.
        for (g, (qg, xg)) in qs.chunks_exact(32).zip(xb.chunks_exact(64)).enumerate() {
            // SAFETY: `qg` is 32 bytes: two 16-byte loads.
            let (q_lo, q_hi) = unsafe {
                (
                    _mm_loadu_si128(qg.as_ptr().cast()),
                    _mm_loadu_si128(qg.as_ptr().add(16).cast()),
                )
            };
            let (bytes_lo, bytes_hi) = (_mm512_cvtepu8_epi32(q_lo), _mm512_cvtepu8_epi32(q_hi));
            for (half, xs) in xg.chunks_exact(32).enumerate() {
                let (sc, m) = scale_min_k4(2 * g + half, &scales);
                let d1 = _mm512_set1_ps(d * f32::from(sc));
                let table = _mm512_sub_ps(
                    _mm512_mul_ps(d1, nibbles),
                    _mm512_set1_ps(dmin * f32::from(m)),
                );
                let (idx_lo, idx_hi) = if half == 0 {
                    (bytes_lo, bytes_hi)
                } else {
                    (
                        _mm512_srli_epi32::<4>(bytes_lo),
                        _mm512_srli_epi32::<4>(bytes_hi),
                    )
                };
                let w_lo = _mm512_permutexvar_ps(idx_lo, table);
                let w_hi = _mm512_permutexvar_ps(idx_hi, table);
                // SAFETY: `xs` is 32 f32s: elements 0..16 and 16..32 of the sub-block.
                let (x_lo, x_hi) = unsafe {
                    (
                        _mm512_loadu_ps(xs.as_ptr()),
                        _mm512_loadu_ps(xs.as_ptr().add(16)),
                    )
                };
                acc_lo = _mm512_add_ps(acc_lo, _mm512_mul_ps(w_lo, x_lo));
                acc_hi = _mm512_add_ps(acc_hi, _mm512_mul_ps(w_hi, x_hi));
            }
        }
    }
    // SAFETY: as for the loads.
    unsafe {
        _mm512_storeu_ps(acc.as_mut_ptr(), acc_lo);
        _mm512_storeu_ps(acc.as_mut_ptr().add(16), acc_hi);
    }
}
