//! Half-precision conversions: IEEE binary16 (`f16`) and bfloat16 (`bf16`), both ways.
//!
//! Widening is exact, written so that LLVM can vectorize it (its branches become selects),
//! and never computes on subnormal `f32`s (they can be slow). NaNs come out quiet, as with
//! the F16C instruction `vcvtph2ps`. Narrowing rounds to nearest, ties to even, as ggml does.

/// Widens an IEEE binary16 bit pattern to `f32` (Giesen's `half_to_float_fast5`).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    const SHIFTED_EXP: u32 = 0x7c00 << 13;
    // 2^-14, the smallest normal f16.
    const MAGIC: f32 = f32::from_bits(113 << 23);
    let mut bits = u32::from(h & 0x7fff) << 13;
    let exp = bits & SHIFTED_EXP;
    bits += (127 - 15) << 23;
    if exp == SHIFTED_EXP {
        // Inf or NaN: move the exponent the rest of the way to 255, make NaNs quiet.
        bits += (128 - 16) << 23;
        if bits & 0x007f_ffff != 0 {
            bits |= 0x0040_0000;
        }
    } else if exp == 0 {
        // Zero or subnormal: `1.m * 2^-14 - 2^-14` is exactly `0.m * 2^-14`.
        bits += 1 << 23;
        bits = (f32::from_bits(bits) - MAGIC).to_bits();
    }
    f32::from_bits(bits | (u32::from(h & 0x8000) << 16))
}

/// Narrows to the nearest IEEE binary16 bit pattern, ties to even (`GGML_FP32_TO_FP16`).
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// Widens a bfloat16 bit pattern to `f32` (exact: bf16 is the high half of an f32).
#[inline(always)]
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Narrows to bfloat16 as ggml's `ggml_compute_fp32_to_bf16`: nearest, ties to even, NaNs
/// kept NaN and made quiet.
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 64) as u16;
    }
    let rounded = (u64::from(bits) + 0x7fff + u64::from((bits >> 16) & 1)) >> 16;
    rounded as u16
}

/// How a compiled copy of the row loops widens f16s: [`Soft`] on any CPU, or the F16C
/// instruction on the x86-64 paths that have it. Both are exact (and quiet NaNs alike), so
/// they give the same bits.
///
/// A block's single f16 scale is read with [`le_f16`] on every path: converting one value
/// with F16C lets LLVM insert its 16 bits into whatever register is live (`vpinsrw`), often
/// an accumulator, which chains loop iterations together through a false dependency.
pub(crate) trait Widen {
    /// One f16, for element-wise loops that vectorize.
    fn f16(bits: u16) -> f32;

    /// The two little-endian f16s at `bytes[at..at + 4]` (a block's scale and min).
    #[inline(always)]
    fn f16x2(bytes: &[u8], at: usize) -> [f32; 2] {
        [le_f16(bytes, at), le_f16(bytes, at + 2)]
    }
}

/// The little-endian f16 at `bytes[at..at + 2]`, widened in software.
#[inline(always)]
pub(crate) fn le_f16(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// Widening in plain integer and float arithmetic ([`f16_to_f32`]).
pub(crate) struct Soft;

impl Widen for Soft {
    #[inline(always)]
    fn f16(bits: u16) -> f32 {
        f16_to_f32(bits)
    }
}

/// Widens 32 little-endian `f32`s.
#[inline(always)]
pub(crate) fn dequant_f32_chunk(b: &[u8; 128], w: &mut [f32; 32]) {
    for (wi, bi) in w.iter_mut().zip(b.as_chunks::<4>().0) {
        *wi = f32::from_le_bytes(*bi);
    }
}

/// Widens 32 little-endian binary16s.
#[inline(always)]
pub(crate) fn dequant_f16_chunk<W: Widen>(b: &[u8; 64], w: &mut [f32; 32]) {
    for (wi, bi) in w.iter_mut().zip(b.as_chunks::<2>().0) {
        *wi = W::f16(u16::from_le_bytes(*bi));
    }
}

/// Widens 32 little-endian bfloat16s.
#[inline(always)]
pub(crate) fn dequant_bf16_chunk(b: &[u8; 64], w: &mut [f32; 32]) {
    for (wi, bi) in w.iter_mut().zip(b.as_chunks::<2>().0) {
        *wi = bf16_to_f32(u16::from_le_bytes(*bi));
    }
}
