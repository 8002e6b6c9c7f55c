//! The portable kernels: the module docs' arithmetic written out block by block. Every
//! other path is checked against these bit for bit.
//!
//! Callers (`mod.rs`) have already checked that byte and element counts agree.

use super::{LANES, QK, QuantizedActs};
use crate::quant::DType;
use crate::quant::kquants::{K_SCALE_SIZE, QK_K, scale_min_k4};

/// Blocks of 32 per K-quant super-block.
const SUB: usize = QK_K / QK;

/// `out[r]` = the dot of row `r` (`row_bytes` each) of `rows` with `x`.
pub(super) fn dot_rows(
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    x: &QuantizedActs,
    out: &mut [f32],
) {
    for (row, y) in rows.chunks_exact(row_bytes).zip(out) {
        *y = dot(dtype, row, x);
    }
}

/// The little-endian f16 at `b[at..at + 2]`, widened (exactly).
#[inline]
pub(super) fn le_f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Sums the lanes pairwise: `lanes[j] += lanes[j + h]` for `h` = 8, 4, 2, 1.
pub(super) fn reduce(mut lanes: [f32; LANES]) -> f32 {
    let mut h = LANES / 2;
    while h > 0 {
        for j in 0..h {
            lanes[j] += lanes[j + h];
        }
        h /= 2;
    }
    lanes[0]
}

/// `Σ a[i] * b[i]` over 32 (or fewer) pairs, exactly.
#[inline]
fn isum(a: impl IntoIterator<Item = i32>, b: &[i8]) -> i32 {
    a.into_iter().zip(b).map(|(a, &b)| a * i32::from(b)).sum()
}

fn dot(dtype: DType, row: &[u8], x: &QuantizedActs) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let qx = x.q.as_chunks::<QK>().0;
    // Block `b` adds `term` to `lane[b % 16]`.
    let mut add = |b: usize, term: f32| lanes[b % LANES] += term;
    match dtype {
        DType::Q8_0 => {
            for (b, w) in row.as_chunks::<34>().0.iter().enumerate() {
                let i = isum(w[2..].iter().map(|&q| i32::from(q as i8)), &qx[b]);
                add(b, (le_f16(w, 0) * x.d[b]) * i as f32);
            }
        }
        DType::Q4_0 => {
            for (b, w) in row.as_chunks::<18>().0.iter().enumerate() {
                let i = isum(nibbles(&w[2..]).map(|q| q - 8), &qx[b]);
                add(b, (le_f16(w, 0) * x.d[b]) * i as f32);
            }
        }
        DType::Q4_1 => {
            for (b, w) in row.as_chunks::<20>().0.iter().enumerate() {
                let i = isum(nibbles(&w[4..]), &qx[b]);
                let (d, m) = (le_f16(w, 0), le_f16(w, 2));
                add(b, (d * x.d[b]) * i as f32 + m * x.s[b]);
            }
        }
        DType::Q4_K => {
            for (sb, w) in row.as_chunks::<144>().0.iter().enumerate() {
                let (d, dmin) = (le_f16(w, 0), le_f16(w, 2));
                let scales: [u8; K_SCALE_SIZE] = std::array::from_fn(|i| w[4 + i]);
                for j in 0..SUB {
                    let b = SUB * sb + j;
                    let qs = &w[16 + 32 * (j / 2)..][..32];
                    let shift = 4 * (j % 2);
                    let i = isum(qs.iter().map(|&q| i32::from((q >> shift) & 0x0f)), &qx[b]);
                    let (sc, m) = scale_min_k4(j, &scales);
                    let (dw, mw) = (d * f32::from(sc), dmin * f32::from(m));
                    add(b, ((dw * x.d[b]) * i as f32) - mw * x.s[b]);
                }
            }
        }
        DType::Q6_K => {
            for (sb, w) in row.as_chunks::<210>().0.iter().enumerate() {
                let d = le_f16(w, 208);
                for j in 0..SUB {
                    let b = SUB * sb + j;
                    let q = q6_k_block(w, j);
                    let sc = |h: usize| i32::from(w[192 + 2 * j + h] as i8);
                    let half = |h: usize| {
                        let q = q[16 * h..16 * h + 16].iter().map(|&v| v - 32);
                        isum(q, &qx[b][16 * h..])
                    };
                    let i = sc(0) * half(0) + sc(1) * half(1);
                    add(b, (d * x.d[b]) * i as f32);
                }
            }
        }
        DType::F32 | DType::F16 | DType::BF16 => return f32::NAN,
    }
    reduce(lanes)
}

/// The 32 nibbles of a 4-bit block: low nibbles are elements 0..16, high nibbles 16..32.
fn nibbles(qs: &[u8]) -> impl Iterator<Item = i32> + '_ {
    let lo = qs.iter().map(|&q| i32::from(q & 0x0f));
    let hi = qs.iter().map(|&q| i32::from(q >> 4));
    lo.chain(hi)
}

/// The 6-bit values (0..64) of block `j` (elements `32j..32j + 32`) of a `Q6_K` super-block
/// (layout in [`crate::quant::kquants`]).
fn q6_k_block(w: &[u8; 210], j: usize) -> [i32; QK] {
    let (half, quarter) = (j / 4, j % 4);
    let ql = &w[64 * half + 32 * (quarter % 2)..][..32];
    let qh = &w[128 + 32 * half..][..32];
    let (lo_shift, hi_shift) = (4 * (quarter / 2), 2 * quarter);
    std::array::from_fn(|l| {
        i32::from(((ql[l] >> lo_shift) & 0x0f) | (((qh[l] >> hi_shift) & 3) << 4))
    })
}
