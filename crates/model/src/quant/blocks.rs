//! The 32-weight block formats `Q8_0`, `Q4_0` and `Q4_1`: one block in, one block out.
//!
//! Dequantizers use ggml's arithmetic exactly (`dequantize_row_q*_0/1`); quantizers are
//! ggml's `quantize_row_q*_ref`, so their bytes match llama.cpp's and the Python `gguf`
//! package's for finite input.

use super::float::{Widen, f32_to_f16, le_f16};

/// Weights per block.
pub(crate) const QK: usize = 32;
/// `{f16 d; i8 qs[32]}`.
pub(crate) const Q8_0_BYTES: usize = 2 + QK;
/// `{f16 d; u8 qs[16]}`.
pub(crate) const Q4_0_BYTES: usize = 2 + QK / 2;
/// `{f16 d; f16 m; u8 qs[16]}`.
pub(crate) const Q4_1_BYTES: usize = 4 + QK / 2;

// ---------------------------------------------------------------------------------------
// Dequantize (hot: inlined into the row loops)
// ---------------------------------------------------------------------------------------

/// `w[i] = qs[i] * d`.
#[inline(always)]
pub(crate) fn dequant_q8_0<W: Widen>(b: &[u8; Q8_0_BYTES], w: &mut [f32; QK]) {
    let d = le_f16(b, 0);
    for (wi, &q) in w.iter_mut().zip(&b[2..]) {
        *wi = f32::from(q as i8) * d;
    }
}

/// `w[i] = (q[i] - 8) * d`; low nibbles are elements 0..16, high nibbles 16..32.
#[inline(always)]
pub(crate) fn dequant_q4_0<W: Widen>(b: &[u8; Q4_0_BYTES], w: &mut [f32; QK]) {
    let d = le_f16(b, 0);
    let (lo, hi) = w.split_at_mut(QK / 2);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..]) {
        *l = f32::from((q & 0x0f) as i8 - 8) * d;
        *h = f32::from((q >> 4) as i8 - 8) * d;
    }
}

/// `w[i] = q[i] * d + m` (a multiply, then an add); nibbles as in [`dequant_q4_0`].
#[inline(always)]
pub(crate) fn dequant_q4_1<W: Widen>(b: &[u8; Q4_1_BYTES], w: &mut [f32; QK]) {
    let [d, m] = W::f16x2(b, 0);
    let (lo, hi) = w.split_at_mut(QK / 2);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[4..]) {
        *l = f32::from(q & 0x0f) * d + m;
        *h = f32::from(q >> 4) * d + m;
    }
}

// ---------------------------------------------------------------------------------------
// Quantize (ggml's reference quantizers)
// ---------------------------------------------------------------------------------------

/// `1 / d`, or 0 when `d` is 0 (an all-zero block).
fn inverse(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// Packs 32 nibbles: element `j` low, element `j + 16` high.
fn pack_nibbles(q: &[u8; QK], qs: &mut [u8]) {
    for (j, out) in qs.iter_mut().enumerate().take(QK / 2) {
        *out = q[j] | (q[j + QK / 2] << 4);
    }
}

/// `quantize_row_q8_0_ref`: `d = amax / 127`, `q = round(x / d)` (half away from zero).
pub(crate) fn quant_q8_0(x: &[f32; QK], b: &mut [u8; Q8_0_BYTES]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    b[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
    for (out, &v) in b[2..].iter_mut().zip(x) {
        // `as` saturates (and maps NaN to 0): no panic on any input.
        *out = (v * id).round() as i8 as u8;
    }
}

/// `quantize_row_q4_0_ref`: `d = max / -8` where `max` is the value of largest magnitude,
/// `q = min(15, trunc(x / d + 8.5))`.
pub(crate) fn quant_q4_0(x: &[f32; QK], b: &mut [u8; Q4_0_BYTES]) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = inverse(d);
    b[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
    let q = x.map(|v| ((v * id + 8.5) as i8).clamp(0, 15) as u8);
    pack_nibbles(&q, &mut b[2..]);
}

/// `quantize_row_q4_1_ref`: `d = (max - min) / 15`, `m = min`,
/// `q = min(15, trunc((x - min) / d + 0.5))`.
pub(crate) fn quant_q4_1(x: &[f32; QK], b: &mut [u8; Q4_1_BYTES]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    let d = (max - min) / 15.0;
    let id = inverse(d);
    b[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
    b[2..4].copy_from_slice(&f32_to_f16(min).to_le_bytes());
    let q = x.map(|v| (((v - min) * id + 0.5) as i8).clamp(0, 15) as u8);
    pack_nibbles(&q, &mut b[4..]);
}
