//! The K-quant super-block formats `Q4_K` and `Q6_K` (256 weights each).
//!
//! `Q4_K` (144 bytes): `{f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}`. Eight sub-blocks of
//! 32 weights, each with a 6-bit scale `sc` and a 6-bit min `m` packed into `scales` (see
//! [`scale_min_k4`]); `w = (d*sc) * q - (dmin*m)` with `q` a nibble. Each group of 64
//! weights reads 32 bytes of `qs`: low nibbles are its first sub-block, high nibbles its
//! second.
//!
//! `Q6_K` (210 bytes): `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}`. Sixteen sub-blocks
//! of 16 weights with signed 8-bit scales; `w = (d*scale) * (q - 32)` with `q` 6 bits: 4
//! from `ql`, 2 from `qh`. Each half of 128 weights reads 64 bytes of `ql` and 32 of `qh`:
//! for `l` in 0..32, element `l` is `ql[l]` low | `qh[l]` bits 0-1, `l+32` is `ql[l+32]`
//! low | bits 2-3, `l+64` is `ql[l]` high | bits 4-5, `l+96` is `ql[l+32]` high | bits 6-7.
//!
//! Dequantizers follow ggml's `dequantize_row_q4_K`/`_q6_K` operation for operation. The
//! quantizers here are simple and valid but not ggml's error-minimizing search.

use super::float::{Widen, f16_to_f32, f32_to_f16, le_f16};

/// Weights per super-block.
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit scales and mins in a `Q4_K` block.
pub const K_SCALE_SIZE: usize = 12;
/// `{f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}`.
pub(crate) const Q4_K_BYTES: usize = 4 + K_SCALE_SIZE + QK_K / 2;
/// `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}`.
pub(crate) const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// The 6-bit scale and min of sub-block `j` (0..8) of a `Q4_K` block (`get_scale_min_k4`).
///
/// ```text
///  byte  0..4: scale j (bits 0-5) for j < 4, bits 4-5 of scale j+4 in bits 6-7
///  byte  4..8: min j   (bits 0-5) for j < 4, bits 4-5 of min   j+4 in bits 6-7
///  byte 8..12: bits 0-3 of scale j+4 (low nibble) and of min j+4 (high nibble)
/// ```
#[inline(always)]
pub fn scale_min_k4(j: usize, scales: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        let sc = (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4);
        let m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (sc, m)
    }
}

/// Packs eight 6-bit scales and mins (each < 64) as [`scale_min_k4`] reads them.
pub fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut out = [0u8; K_SCALE_SIZE];
    for j in 0..8 {
        let (ls, lm) = (sc[j] & 63, m[j] & 63);
        if j < 4 {
            out[j] |= ls;
            out[j + 4] |= lm;
        } else {
            out[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            out[j - 4] |= (ls >> 4) << 6;
            out[j] |= (lm >> 4) << 6;
        }
    }
    out
}

/// Widens one `Q4_K` block.
#[inline(always)]
pub(crate) fn dequant_q4_k<W: Widen>(b: &[u8; Q4_K_BYTES], w: &mut [f32; QK_K]) {
    let [d, dmin] = W::f16x2(b, 0);
    let scales: [u8; K_SCALE_SIZE] = std::array::from_fn(|i| b[4 + i]);
    let qs = &b[4 + K_SCALE_SIZE..];
    for (g, (wg, qg)) in w.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * g, &scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, &scales);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (lo, hi) = wg.split_at_mut(32);
        for ((l, h), &q) in lo.iter_mut().zip(hi).zip(qg) {
            *l = d1 * f32::from(q & 0x0f) - min1;
            *h = d2 * f32::from(q >> 4) - min2;
        }
    }
}

/// Widens one `Q6_K` block.
#[inline(always)]
pub(crate) fn dequant_q6_k<W: Widen>(b: &[u8; Q6_K_BYTES], w: &mut [f32; QK_K]) {
    let (ql, rest) = b.split_at(QK_K / 2);
    let (qh, rest) = rest.split_at(QK_K / 4);
    let (sc, _) = rest.split_at(QK_K / 16);
    let d = le_f16(b, Q6_K_BYTES - 2);
    for half in 0..2 {
        let (ql, qh, sc) = (
            &ql[64 * half..][..64],
            &qh[32 * half..][..32],
            &sc[8 * half..][..8],
        );
        let y = &mut w[128 * half..][..128];
        // Sub-blocks of 16 share a scale: l in 16*s..16*s+16 uses sc[s], sc[s+2], ...
        for s in 0..2 {
            let dl = [0, 2, 4, 6].map(|k| d * f32::from(sc[s + k] as i8));
            for l in 16 * s..16 * s + 16 {
                let (a, c, h) = (ql[l], ql[l + 32], qh[l]);
                let q1 = ((a & 0x0f) | ((h & 3) << 4)) as i8 - 32;
                let q2 = ((c & 0x0f) | (((h >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((a >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((c >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
                y[l] = dl[0] * f32::from(q1);
                y[l + 32] = dl[1] * f32::from(q2);
                y[l + 64] = dl[2] * f32::from(q3);
                y[l + 96] = dl[3] * f32::from(q4);
            }
        }
    }
}

/// A simple `Q4_K` quantizer. Each sub-block maps `[min(x, 0), max(x)]` onto 0..=15; its
/// 6-bit min and scale are rounded *up* (against the stored f16 `dmin` and `d`) so that the
/// stored grid covers the sub-block and nothing clips; nibbles are then rounded to nearest
/// against the values the dequantizer will use.
pub(crate) fn quant_q4_k(x: &[f32; QK_K], b: &mut [u8; Q4_K_BYTES]) {
    // 6-bit multiple of `unit` at least `v`; 0 when `unit` is 0.
    let up = |v: f32, unit: f32| {
        if unit > 0.0 {
            (v / unit).ceil().clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let neg_min: [f32; 8] =
        std::array::from_fn(|j| -x[32 * j..32 * j + 32].iter().fold(0.0f32, |a, &v| a.min(v)));
    let dmin_bits = f32_to_f16(neg_min.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
    let dmin = f16_to_f32(dmin_bits);
    let lm = neg_min.map(|m| up(m, dmin));
    let scale: [f32; 8] = std::array::from_fn(|j| {
        let hi = x[32 * j..32 * j + 32].iter().fold(0.0f32, |a, &v| a.max(v));
        (hi + dmin * f32::from(lm[j])) / 15.0
    });
    let d_bits = f32_to_f16(scale.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
    let d = f16_to_f32(d_bits);
    let ls = scale.map(|s| up(s, d));
    b[0..2].copy_from_slice(&d_bits.to_le_bytes());
    b[2..4].copy_from_slice(&dmin_bits.to_le_bytes());
    b[4..4 + K_SCALE_SIZE].copy_from_slice(&pack_scale_min_k4(&ls, &lm));
    let mut q = [0u8; QK_K];
    for (j, (qj, xs)) in q.chunks_exact_mut(32).zip(x.chunks_exact(32)).enumerate() {
        let (dj, mj) = (d * f32::from(ls[j]), dmin * f32::from(lm[j]));
        let id = if dj != 0.0 { 1.0 / dj } else { 0.0 };
        for (qi, &v) in qj.iter_mut().zip(xs) {
            *qi = ((v + mj) * id).round().clamp(0.0, 15.0) as u8;
        }
    }
    let qs = &mut b[4 + K_SCALE_SIZE..];
    for (g, out) in qs.chunks_exact_mut(32).enumerate() {
        for (l, o) in out.iter_mut().enumerate() {
            *o = q[64 * g + l] | (q[64 * g + l + 32] << 4);
        }
    }
}

/// A simple `Q6_K` quantizer. Each sub-block of 16 maps its value of largest magnitude to
/// -32; the block's largest sub-block scale becomes -128 and the others are rounded away
/// from zero to 8 bits so the stored grid covers each sub-block; 6-bit values are then
/// rounded to nearest against the values the dequantizer will use.
pub(crate) fn quant_q6_k(x: &[f32; QK_K], b: &mut [u8; Q6_K_BYTES]) {
    let signed_max = |xs: &[f32]| {
        xs.iter()
            .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a })
    };
    let scale: [f32; QK_K / 16] =
        std::array::from_fn(|s| signed_max(&x[16 * s..16 * s + 16]) / -32.0);
    let max_scale = signed_max(&scale);
    let iscale = if max_scale != 0.0 {
        -128.0 / max_scale
    } else {
        0.0
    };
    let d_bits = f32_to_f16(if iscale != 0.0 { 1.0 / iscale } else { 0.0 });
    b[Q6_K_BYTES - 2..].copy_from_slice(&d_bits.to_le_bytes());
    let d = f16_to_f32(d_bits);
    let mut q = [0u8; QK_K];
    for (s, (qs, xs)) in q.chunks_exact_mut(16).zip(x.chunks_exact(16)).enumerate() {
        let v = iscale * scale[s];
        let ls = if v < 0.0 { v.floor() } else { v.ceil() }.clamp(-128.0, 127.0) as i8;
        b[QK_K / 2 + QK_K / 4 + s] = ls as u8;
        let ds = d * f32::from(ls);
        let id = if ds != 0.0 { 1.0 / ds } else { 0.0 };
        for (qi, &v) in qs.iter_mut().zip(xs) {
            *qi = ((v * id).round().clamp(-32.0, 31.0) + 32.0) as u8;
        }
    }
    let (ql, rest) = b.split_at_mut(QK_K / 2);
    let qh = &mut rest[..QK_K / 4];
    for half in 0..2 {
        let (q, ql, qh) = (&q[128 * half..], &mut ql[64 * half..], &mut qh[32 * half..]);
        for l in 0..32 {
            let (q1, q2, q3, q4) = (q[l], q[l + 32], q[l + 64], q[l + 96]);
            ql[l] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
            ql[l + 32] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
            qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}
