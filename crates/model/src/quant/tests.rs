//! Unit tests: format constants, hand-built blocks with known values, reference vectors from
//! the Python `gguf` package, quantizer round trips, and the dot-product contract (bitwise
//! equal to `dot_f32` of the dequantized row, on every compiled code path).
//!
//! `bench_dot_row` (ignored) prints single-thread `dot_row` throughput:
//! `cargo test --release -p tern-model --lib quant::tests::bench -- --ignored --nocapture`.

use super::float::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use super::kquants::{K_SCALE_SIZE, QK_K, pack_scale_min_k4, scale_min_k4};
use super::reference as r;
use super::rows::Path;
use super::*;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A small deterministic generator (64-bit LCG, high bits out), so tests need no dependency.
struct Rng(u64);

impl Rng {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 32) as u32
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }

    /// Weight-like data: each 32-run has its own scale and offset, with a few outliers.
    fn weights(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        let (mut scale, mut offset) = (1.0, 0.0);
        for i in 0..n {
            if i % 32 == 0 {
                scale = 10f32.powf(2.0 * self.uniform() - 1.0);
                offset = if self.next_u32().is_multiple_of(4) {
                    scale * self.uniform()
                } else {
                    0.0
                };
            }
            let outlier = if self.next_u32().is_multiple_of(64) {
                4.0
            } else {
                1.0
            };
            out.push(offset + scale * outlier * self.uniform());
        }
        out
    }

    /// Random bytes for a row of `n` weights with every f16 scale finite and moderate, so
    /// that every bit pattern of the quantized fields gets exercised.
    fn block_bytes(&mut self, dtype: DType, n: usize) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..dtype.row_bytes(n).unwrap())
            .map(|_| self.next_u32() as u8)
            .collect();
        let f16_fields: &[usize] = match dtype {
            DType::Q8_0 | DType::Q4_0 => &[0],
            DType::Q4_1 | DType::Q4_K => &[0, 2],
            DType::Q6_K => &[208],
            DType::F16 => &[],
            DType::F32 | DType::BF16 => {
                return self
                    .weights(n)
                    .iter()
                    .flat_map(|v| float_bytes(dtype, *v))
                    .collect();
            }
        };
        let fix = |v: u16| (v % 0x3000 + 0x1000) | (v & 0x8000);
        match dtype {
            DType::F16 => bytes
                .chunks_exact_mut(2)
                .for_each(|b| b.copy_from_slice(&fix(le(b)).to_le_bytes())),
            _ => {
                for block in bytes.chunks_exact_mut(dtype.block_bytes()) {
                    for &at in f16_fields {
                        let v = fix(le(&block[at..]));
                        block[at..at + 2].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        bytes
    }
}

fn le(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn float_bytes(dtype: DType, v: f32) -> Vec<u8> {
    match dtype {
        DType::BF16 => f32_to_bf16(v).to_le_bytes().to_vec(),
        _ => v.to_le_bytes().to_vec(),
    }
}

fn quantized(dtype: DType, x: &[f32]) -> Vec<u8> {
    let mut bytes = vec![0u8; dtype.row_bytes(x.len()).unwrap()];
    quantize_row(dtype, x, &mut bytes);
    bytes
}

fn dequantized(dtype: DType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    dequantize_row(dtype, bytes, &mut out);
    out
}

#[track_caller]
fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: element {i}: got {g:e}, want {w:e}"
        );
    }
}

/// Every compiled code path this CPU can run.
fn paths() -> Vec<Path> {
    Path::supported()
}

/// Row lengths worth testing for `dtype`: a few whole-block counts, and ragged ones for
/// float types.
fn lengths(dtype: DType) -> Vec<usize> {
    match dtype.block_elems() {
        1 => vec![0, 1, 7, 31, 32, 33, 64, 100, 576, 1000],
        32 => vec![32, 64, 96, 576, 1536],
        be => vec![be, 2 * be, 3 * be, 1536],
    }
}

// ---------------------------------------------------------------------------------------
// Type table
// ---------------------------------------------------------------------------------------

#[test]
fn dtype_table_matches_ggml() {
    let table = [
        (DType::F32, 0, "f32", 1, 4),
        (DType::F16, 1, "f16", 1, 2),
        (DType::Q4_0, 2, "q4_0", 32, 18),
        (DType::Q4_1, 3, "q4_1", 32, 20),
        (DType::Q8_0, 8, "q8_0", 32, 34),
        (DType::Q4_K, 12, "q4_K", 256, 144),
        (DType::Q6_K, 14, "q6_K", 256, 210),
        (DType::BF16, 30, "bf16", 1, 2),
    ];
    assert_eq!(table.len(), DType::ALL.len());
    for (dtype, id, name, elems, bytes) in table {
        assert_eq!(DType::from_ggml(id), Some(dtype));
        assert_eq!(dtype.ggml_id(), id);
        assert_eq!(dtype.name(), name);
        assert_eq!(dtype.to_string(), name);
        assert_eq!(dtype.block_elems(), elems, "{name}");
        assert_eq!(dtype.block_bytes(), bytes, "{name}");
        assert_eq!(dtype.is_quantized(), elems > 1);
    }
    for unknown in [4, 5, 6, 7, 9, 10, 11, 13, 15, 16, 29, 31, 39, u32::MAX] {
        assert_eq!(DType::from_ggml(unknown), None, "id {unknown}");
    }
}

#[test]
fn row_bytes_rejects_misfits_and_overflow() {
    assert_eq!(DType::Q4_1.row_bytes(576), Some(360));
    assert_eq!(DType::Q8_0.row_bytes(576), Some(612));
    assert_eq!(DType::Q4_K.row_bytes(768), Some(432));
    assert_eq!(DType::Q6_K.row_bytes(256), Some(210));
    assert_eq!(DType::F32.row_bytes(3), Some(12));
    assert_eq!(DType::BF16.row_bytes(0), Some(0));
    assert_eq!(DType::Q4_0.row_bytes(0), Some(0));
    assert_eq!(DType::Q4_1.row_bytes(33), None);
    assert_eq!(DType::Q8_0.row_bytes(16), None);
    assert_eq!(DType::Q4_K.row_bytes(576), None);
    assert_eq!(DType::Q6_K.row_bytes(255), None);
    assert_eq!(DType::F32.row_bytes(usize::MAX), None);
    assert_eq!(DType::F16.row_bytes(usize::MAX / 2 + 1), None);
    assert_eq!(DType::Q8_0.row_bytes(usize::MAX / 32 * 32), None);
    // Fewer bytes than weights: the largest whole row still fits.
    assert_eq!(
        DType::Q6_K.row_bytes(usize::MAX / 256 * 256),
        Some(usize::MAX / 256 * 210)
    );
}

// ---------------------------------------------------------------------------------------
// Half-precision conversions
// ---------------------------------------------------------------------------------------

#[test]
fn f16_widening_matches_half_on_every_bit_pattern() {
    for h in 0..=u16::MAX {
        let want = half::f16::from_bits(h).to_f32();
        assert_eq!(f16_to_f32(h).to_bits(), want.to_bits(), "f16 bits {h:#06x}");
    }
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xfbff), -65504.0);
    assert_eq!(
        f16_to_f32(0x7d00).to_bits(),
        0x7fe0_0000,
        "signaling NaN comes out quiet"
    );
}

#[test]
fn f16_and_bf16_narrowing_round_to_nearest_even() {
    assert_eq!(f32_to_f16(1.0), 0x3c00);
    assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00, "tie goes to even");
    assert_eq!(
        f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)),
        0x3c02,
        "tie goes to even"
    );
    assert_eq!(f32_to_f16(1e6), 0x7c00);
    assert_eq!(f32_to_bf16(1.0), 0x3f80);
    assert_eq!(
        f32_to_bf16(f32::from_bits(0x3f80_8000)),
        0x3f80,
        "tie goes to even"
    );
    assert_eq!(
        f32_to_bf16(f32::from_bits(0x3f81_8000)),
        0x3f82,
        "tie goes to even"
    );
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(
        f32_to_bf16(f32::MAX),
        0x7f80,
        "rounds up to infinity, as ggml"
    );
    assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
    assert_eq!(
        f32_to_bf16(f32::from_bits(0x7f80_0001)),
        0x7fc0,
        "NaN stays NaN, quiet"
    );
    assert_eq!(bf16_to_f32(0xc040), -3.0);
}

// ---------------------------------------------------------------------------------------
// Hand-built blocks with known values
// ---------------------------------------------------------------------------------------

#[test]
fn q4_1_hand_built_block() {
    // d = 0.5, m = -1, element j (< 16) has nibble j, element 16 + j has nibble 15 - j.
    let mut block = vec![0x00, 0x38, 0x00, 0xbc];
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let want: Vec<f32> = (0..32)
        .map(|i| if i < 16 { i as f32 } else { (31 - i) as f32 } * 0.5 - 1.0)
        .collect();
    assert_eq!(&want[..4], &[-1.0, -0.5, 0.0, 0.5]);
    assert_eq!(want[16], 6.5);
    assert_bits_eq(&dequantized(DType::Q4_1, &block, 32), &want, "q4_1");
}

#[test]
fn q4_0_hand_built_block() {
    // d = 0.25, nibbles as in the Q4_1 test: w = (q - 8) * d.
    let mut block = vec![0x00, 0x34];
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let want: Vec<f32> = (0..32)
        .map(|i| (if i < 16 { i } else { 31 - i } - 8) as f32 * 0.25)
        .collect();
    assert_eq!(
        (want[0], want[8], want[15], want[16]),
        (-2.0, 0.0, 1.75, 1.75)
    );
    assert_bits_eq(&dequantized(DType::Q4_0, &block, 32), &want, "q4_0");
}

#[test]
fn q8_0_hand_built_block() {
    // d = -2, q = i - 16, with the extremes -128 and 127 at both ends.
    let mut q: Vec<i8> = (0..32).map(|i| i - 16).collect();
    (q[0], q[31]) = (-128, 127);
    let mut block = vec![0x00, 0xc0];
    block.extend(q.iter().map(|&v| v as u8));
    let want: Vec<f32> = q.iter().map(|&v| f32::from(v) * -2.0).collect();
    assert_eq!((want[0], want[16], want[31]), (256.0, -0.0, -254.0));
    assert_bits_eq(&dequantized(DType::Q8_0, &block, 32), &want, "q8_0");
}

/// Scale bytes with every bit used, and their unpacking computed by hand.
const K4_SCALES: [u8; K_SCALE_SIZE] = [
    0xc1, 0x42, 0x83, 0x04, 0x45, 0x86, 0xc7, 0x08, 0x9a, 0xbc, 0xde, 0xf1,
];
const K4_SC: [u8; 8] = [1, 2, 3, 4, 58, 28, 46, 1];
const K4_MIN: [u8; 8] = [5, 6, 7, 8, 25, 43, 61, 15];

#[test]
fn q4_k_scale_unpacking_by_hand() {
    // j < 4: low 6 bits of bytes j and j + 4. j >= 4, e.g. j = 4:
    // scale = 0x9a & 15 | (0xc1 >> 6) << 4
    // = 10 | 48 = 58, min = 0x9a >> 4 | (0x45 >> 6) << 4 = 9 | 16 = 25.
    for j in 0..8 {
        assert_eq!(
            scale_min_k4(j, &K4_SCALES),
            (K4_SC[j], K4_MIN[j]),
            "sub-block {j}"
        );
    }
    assert_eq!(pack_scale_min_k4(&K4_SC, &K4_MIN), K4_SCALES);
    let mut rng = Rng(7);
    for _ in 0..1000 {
        let sc: [u8; 8] = std::array::from_fn(|_| (rng.next_u32() % 64) as u8);
        let m: [u8; 8] = std::array::from_fn(|_| (rng.next_u32() % 64) as u8);
        let packed = pack_scale_min_k4(&sc, &m);
        assert!((0..8).all(|j| scale_min_k4(j, &packed) == (sc[j], m[j])));
    }
}

#[test]
fn q4_k_hand_built_block() {
    // d = 0.5, dmin = 0.25; in each 64-group byte l has low nibble l % 16, high 15 - l % 16.
    let mut block = vec![0x00, 0x38, 0x00, 0x34];
    block.extend(K4_SCALES);
    block.extend((0..128).map(|l| (l % 16) as u8 | ((15 - l % 16) as u8) << 4));
    let want: Vec<f32> = (0..256)
        .map(|i| {
            let (sub, l) = (i / 32, i % 32);
            let q = if sub % 2 == 0 { l % 16 } else { 15 - l % 16 };
            0.5 * f32::from(K4_SC[sub]) * q as f32 - 0.25 * f32::from(K4_MIN[sub])
        })
        .collect();
    // Element 33: sub-block 1, nibble 15 - 1; element 129: sub-block 4, nibble 1.
    assert_eq!(
        (want[0], want[33], want[129]),
        (-1.25, 1.0 * 14.0 - 1.5, 29.0 - 6.25)
    );
    assert_bits_eq(&dequantized(DType::Q4_K, &block, 256), &want, "q4_K");
}

#[test]
fn q6_k_hand_built_block() {
    // d = 0.5, scale of sub-block s is s - 8, element n holds the 6-bit value (7n + 3) % 64.
    // Element n = 128h + 32k + l: 4 low bits in ql[64h + l + 32(k & 1)] at bit 4(k >> 1),
    // 2 high bits in qh[32h + l] at bit 2k (ggml's dequantize_row_q6_K, restated).
    let value = |n: usize| ((7 * n + 3) % 64) as u8;
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for n in 0..256 {
        let (h, k, l) = (n / 128, n % 128 / 32, n % 32);
        ql[64 * h + l + 32 * (k & 1)] |= (value(n) & 15) << (4 * (k >> 1));
        qh[32 * h + l] |= (value(n) >> 4) << (2 * k);
    }
    let mut block = [ql.as_slice(), &qh].concat();
    block.extend((0..16).map(|s| (s as i8 - 8) as u8));
    block.extend([0x00, 0x38]);
    let want: Vec<f32> = (0..256)
        .map(|n| 0.5 * ((n / 16) as f32 - 8.0) * (f32::from(value(n)) - 32.0))
        .collect();
    assert_eq!(
        (want[0], want[255]),
        (
            0.5 * -8.0 * (3.0 - 32.0),
            0.5 * 7.0 * (f32::from(value(255)) - 32.0)
        )
    );
    assert_bits_eq(&dequantized(DType::Q6_K, &block, 256), &want, "q6_K");
}

// ---------------------------------------------------------------------------------------
// Python `gguf` reference vectors
// ---------------------------------------------------------------------------------------

#[test]
fn dequantize_matches_python_gguf() {
    let cases: [(DType, &[u8], &[f32], &str); 9] = [
        (DType::Q4_0, &r::Q4_0_BYTES, &r::Q4_0_VALUES, "random q4_0"),
        (DType::Q4_1, &r::Q4_1_BYTES, &r::Q4_1_VALUES, "random q4_1"),
        (DType::Q8_0, &r::Q8_0_BYTES, &r::Q8_0_VALUES, "random q8_0"),
        (DType::Q4_K, &r::Q4_K_BYTES, &r::Q4_K_VALUES, "random q4_K"),
        (DType::Q6_K, &r::Q6_K_BYTES, &r::Q6_K_VALUES, "random q6_K"),
        (DType::F16, &r::F16_BYTES, &r::F16_VALUES, "random f16"),
        (DType::BF16, &r::BF16_BYTES, &r::BF16_VALUES, "random bf16"),
        (
            DType::Q4_1,
            &r::REAL_Q4_1_BYTES,
            &r::REAL_Q4_1_VALUES,
            "SmolLM2 q4_1",
        ),
        (
            DType::Q8_0,
            &r::REAL_Q8_0_BYTES,
            &r::REAL_Q8_0_VALUES,
            "SmolLM2 q8_0",
        ),
    ];
    for (dtype, bytes, values, what) in cases {
        for path in paths() {
            let mut out = vec![0.0; values.len()];
            path.dequantize(dtype, bytes, &mut out);
            assert_bits_eq(&out, values, &format!("{what} on {}", path.name()));
        }
    }
}

#[test]
fn quantize_matches_python_gguf() {
    let cases: [(DType, &[u8]); 5] = [
        (DType::Q4_0, &r::Q4_0_OF_INPUT),
        (DType::Q4_1, &r::Q4_1_OF_INPUT),
        (DType::Q8_0, &r::Q8_0_OF_INPUT),
        (DType::BF16, &r::BF16_OF_INPUT),
        (DType::F16, &r::F16_OF_INPUT),
    ];
    for (dtype, want) in cases {
        assert_eq!(quantized(dtype, &r::QUANT_INPUT), want, "{dtype}");
    }
}

// ---------------------------------------------------------------------------------------
// Quantizer round trips
// ---------------------------------------------------------------------------------------

/// The largest error each quantizer may make on block `x` (see each format's quantizer):
/// a bound derived from its scale rounding, with 1% slack for the f16 rounding of scales.
fn error_bound(dtype: DType, x: &[f32]) -> Vec<f32> {
    let amax = |xs: &[f32]| xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let lo = |xs: &[f32]| xs.iter().fold(f32::MAX, |a, &v| a.min(v));
    let hi = |xs: &[f32]| xs.iter().fold(-f32::MAX, |a, &v| a.max(v));
    let per_sub = |n: usize, f: &dyn Fn(&[f32]) -> f32| {
        x.chunks(n).flat_map(|s| vec![f(s); n]).collect::<Vec<_>>()
    };
    let bound: Vec<f32> = match dtype {
        DType::F32 => vec![0.0; x.len()],
        // Half an ulp; subnormal f16s have a fixed ulp of 2^-24.
        DType::F16 => x
            .iter()
            .map(|v| (v.abs() * 2f32.powi(-11)).max(2f32.powi(-25)))
            .collect(),
        DType::BF16 => x.iter().map(|v| v.abs() * 2f32.powi(-8)).collect(),
        // Round to nearest on a grid of amax / 127.
        DType::Q8_0 => vec![0.5 * amax(x) / 127.0 + 127.0 * amax(x) / 127.0 * 2f32.powi(-11); 32],
        // The far end of [-amax, amax] clips from 8d to 7d: one step, d = amax / 8.
        DType::Q4_0 => vec![amax(x) / 8.0; 32],
        // Half a step of (max - min) / 15, plus the f16 rounding of min.
        DType::Q4_1 => vec![0.5 * (hi(x) - lo(x)) / 15.0 + lo(x).abs() * 2f32.powi(-11); 32],
        // Half a step; the step is the sub-block's range / 15 rounded up by at most one 6-bit
        // unit of the largest step, widened by the rounded-up min.
        DType::Q4_K => {
            let range = |s: &[f32]| hi(s).max(0.0) - lo(s).min(0.0);
            let max_step = x.chunks(32).map(range).fold(0.0f32, f32::max) / 15.0;
            let dmin = x.chunks(32).map(|s| -lo(s).min(0.0)).fold(0.0f32, f32::max) / 63.0;
            per_sub(32, &|s| {
                0.5 * (range(s) + dmin) / 15.0 + 0.5 * (max_step + dmin / 15.0) / 63.0
            })
        }
        // One step (the far end clips from +32 to +31), the step amax / 32 rounded up by at
        // most one 8-bit unit of the largest.
        DType::Q6_K => {
            let unit = amax(x) / 32.0 / 128.0;
            per_sub(16, &|s| amax(s) / 32.0 + unit)
        }
    };
    bound.iter().map(|b| b * 1.01).collect()
}

#[test]
fn quantize_round_trip_within_bounds() {
    let mut rng = Rng(42);
    for dtype in DType::ALL {
        let n = 4 * QK_K;
        let x = rng.weights(n);
        let back = dequantized(dtype, &quantized(dtype, &x), n);
        let block = dtype.block_elems().max(32);
        let (mut sq_err, mut sq) = (0.0f64, 0.0f64);
        for (b, (xs, ys)) in x.chunks(block).zip(back.chunks(block)).enumerate() {
            let bound = error_bound(dtype, xs);
            for (i, ((&v, &y), &e)) in xs.iter().zip(ys).zip(&bound).enumerate() {
                assert!(
                    (v - y).abs() <= e,
                    "{dtype} block {b} elem {i}: {v} -> {y}, bound {e}"
                );
                sq_err += f64::from(v - y).powi(2);
                sq += f64::from(v).powi(2);
            }
        }
        let rel_rms = (sq_err / sq).sqrt();
        let max_rel_rms = match dtype {
            DType::F32 => 0.0,
            DType::F16 => 1e-3,
            DType::BF16 => 4e-3,
            DType::Q8_0 => 0.01,
            DType::Q6_K => 0.03,
            DType::Q4_0 | DType::Q4_1 | DType::Q4_K => 0.12,
        };
        assert!(
            rel_rms <= max_rel_rms,
            "{dtype}: relative RMS error {rel_rms}"
        );
    }
}

#[test]
fn quantize_constant_and_zero_blocks() {
    for dtype in DType::ALL {
        let zeros = dequantized(dtype, &quantized(dtype, &[0.0; QK_K]), QK_K);
        assert!(zeros.iter().all(|&v| v == 0.0), "{dtype}: zeros");
        let twos = dequantized(dtype, &quantized(dtype, &[2.0; QK_K]), QK_K);
        let bound = error_bound(dtype, &[2.0; QK_K][..dtype.block_elems().max(32)]);
        assert!(
            twos.iter().all(|&v| (v - 2.0).abs() <= bound[0]),
            "{dtype}: constant 2 -> {}",
            twos[0]
        );
        if dtype == DType::Q4_1 {
            assert!(twos.iter().all(|&v| v == 2.0), "d = 0, m = 2 is exact");
        }
    }
}

#[test]
fn quantize_never_panics_on_nonfinite_input() {
    let mut x = Rng(3).weights(QK_K);
    (x[1], x[40], x[100]) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY);
    for dtype in DType::ALL {
        let bytes = quantized(dtype, &x);
        let _ = dot_row(dtype, &bytes, &x);
    }
}

// ---------------------------------------------------------------------------------------
// Dot products
// ---------------------------------------------------------------------------------------

/// The summation order `dot_f32` documents, written out plainly.
fn dot_documented(w: &[f32], x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 32];
    for i in 0..w.len() {
        lanes[i % 32] += w[i] * x[i];
    }
    for h in [16, 8, 4, 2, 1] {
        for j in 0..h {
            lanes[j] += lanes[j + h];
        }
    }
    lanes[0]
}

#[test]
fn dot_f32_follows_documented_order() {
    let mut rng = Rng(9);
    for n in [0, 1, 5, 31, 32, 33, 95, 576, 1001] {
        let (w, x) = (rng.weights(n), rng.weights(n));
        let want = dot_documented(&w, &x);
        for path in paths() {
            assert_eq!(
                path.dot_f32(&w, &x).to_bits(),
                want.to_bits(),
                "n = {n} on {}",
                path.name()
            );
        }
    }
}

/// The arithmetic `attend` documents, for one query, written out plainly.
fn attend_documented(q: &[f32], a: &super::Attend<'_>) -> Vec<f32> {
    let hd = a.head_dim;
    let mut blocks = Vec::new();
    for p0 in (0..a.n_pos).step_by(super::ATTEND_BLOCK) {
        let positions = p0..a.n_pos.min(p0 + super::ATTEND_BLOCK);
        let scores: Vec<f32> = positions
            .clone()
            .map(|p| dot_documented(q, &a.k[p * a.stride..][..hd]) * a.scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut weights = scores.clone();
        super::softmax(&mut weights);
        let sum = scores.iter().fold(0.0f32, |s, x| s + super::exp(x - max));
        let mut values = vec![0.0f32; hd];
        for (p, w) in positions.zip(weights) {
            for (o, &v) in values.iter_mut().zip(&a.v[p * a.stride..][..hd]) {
                *o += w * v;
            }
        }
        blocks.push((values, max, sum));
    }
    let max = blocks.iter().fold(f32::NEG_INFINITY, |m, b| m.max(b.1));
    let share = |b: &(Vec<f32>, f32, f32)| super::exp(b.1 - max) * b.2;
    let total = blocks.iter().fold(0.0f32, |t, b| t + share(b));
    let mut out = vec![0.0f32; hd];
    for b in &blocks {
        let weight = share(b) / total;
        for (o, v) in out.iter_mut().zip(&b.0) {
            *o += weight * v;
        }
    }
    out
}

#[test]
fn attention_follows_documented_order_whatever_shares_the_call() {
    let mut rng = Rng(13);
    let cases = [
        (64, 192, 1, 3),
        (64, 192, 37, 3),
        (64, 64, 300, 1),
        (128, 512, 257, 4),
        (7, 9, 5, 2),
    ];
    for (hd, stride, n_pos, queries) in cases {
        let k = rng.weights((n_pos - 1) * stride + hd);
        let v = rng.weights((n_pos - 1) * stride + hd);
        let q = rng.weights(queries * hd);
        let a = super::Attend {
            k: &k,
            v: &v,
            stride,
            n_pos,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let what = format!("{queries} queries of {hd}, {n_pos} positions");
        let want: Vec<f32> = q
            .chunks_exact(hd)
            .flat_map(|q| attend_documented(q, &a))
            .collect();
        let plen = super::partial_len(hd);
        for path in paths() {
            // All queries at once, block by block, then each query's blocks merged.
            let mut parts = vec![0.0f32; a.blocks() * queries * plen];
            for (b, part) in parts.chunks_exact_mut(queries * plen).enumerate() {
                path.attend_block(&a, b, &q, part);
            }
            for (j, want) in want.chunks_exact(hd).enumerate() {
                let mut out = vec![0.0f32; hd];
                super::attend_merge(&parts[j * plen..], queries * plen, a.blocks(), &mut out);
                assert_bits_eq(&out, want, &format!("{what}, query {j} on {}", path.name()));
            }
            // Each query alone.
            for (j, q) in q.chunks_exact(hd).enumerate() {
                let mut parts = vec![0.0f32; a.blocks() * plen];
                for (b, part) in parts.chunks_exact_mut(plen).enumerate() {
                    path.attend_block(&a, b, q, part);
                }
                let mut out = vec![0.0f32; hd];
                super::attend_merge(&parts, plen, a.blocks(), &mut out);
                let want = &want[j * hd..][..hd];
                assert_bits_eq(
                    &out,
                    want,
                    &format!("{what}, query {j} alone on {}", path.name()),
                );
            }
        }
        let mut all = vec![0.0f32; q.len()];
        super::attend(&a, 1, &q, &mut all);
        assert_bits_eq(&all, &want, &format!("attend: {what}"));
        // The same queries as three consecutive tokens', token k seeing n_pos + k positions.
        let tokens = 3;
        let (k, v) = (
            rng.weights((n_pos + 1) * stride + hd),
            rng.weights((n_pos + 1) * stride + hd),
        );
        let (a, q) = (
            super::Attend { k: &k, v: &v, ..a },
            rng.weights(tokens * queries * hd),
        );
        let mut all = vec![0.0f32; q.len()];
        super::attend(&a, tokens, &q, &mut all);
        for (j, q) in q.chunks_exact(hd).enumerate() {
            let token = j / queries;
            let seen = super::Attend {
                n_pos: n_pos + token,
                ..a
            };
            let what = format!("attend: {what}, token {token}'s query {}", j % queries);
            assert_bits_eq(&all[j * hd..][..hd], &attend_documented(q, &seen), &what);
        }
    }
}

#[test]
#[cfg_attr(
    debug_assertions,
    should_panic(
        expected = "attend: 64 query floats into 64, head_dim 64, 3 positions 64 apart in 128 keys"
    )
)]
fn attention_past_its_keys_poisons_instead_of_reading_out_of_bounds() {
    // Release builds: NaN out, nothing read past the slices.
    let (k, q) = (vec![1.0f32; 128], vec![1.0f32; 64]);
    let a = super::Attend {
        k: &k,
        v: &k,
        stride: 64,
        n_pos: 3,
        head_dim: 64,
        scale: 0.125,
    };
    let mut out = vec![0.0f32; 64];
    super::attend(&a, 1, &q, &mut out);
    assert!(out.iter().all(|v| v.is_nan()));
    let mut part = vec![0.0f32; super::partial_len(64)];
    super::attend_block(&a, 0, &q, &mut part);
    assert!(part.iter().all(|v| v.is_nan()));
}

#[test]
#[cfg_attr(
    debug_assertions,
    should_panic(expected = "attend_merge: 3 blocks 66 apart")
)]
fn merging_past_the_partials_poisons() {
    let mut out = vec![0.0f32; 64];
    super::attend_merge(&[1.0; 66 * 2], 66, 3, &mut out);
    assert!(out.iter().all(|v| v.is_nan()));
}

#[test]
fn dot_row_is_dot_f32_of_dequantized_row_bitwise() {
    let mut rng = Rng(11);
    for dtype in DType::ALL {
        for n in lengths(dtype) {
            let x = rng.weights(n);
            for bytes in [quantized(dtype, &rng.weights(n)), rng.block_bytes(dtype, n)] {
                let w = dequantized(dtype, &bytes, n);
                let want = dot_documented(&w, &x);
                for path in paths() {
                    let mut w_path = vec![0.0; n];
                    path.dequantize(dtype, &bytes, &mut w_path);
                    assert_bits_eq(
                        &w_path,
                        &w,
                        &format!("{dtype} n = {n} dequantize on {}", path.name()),
                    );
                    let got = path.dot(dtype, &bytes, &x);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{dtype} n = {n} on {}: {got} vs {want}",
                        path.name()
                    );
                }
            }
        }
    }
}

#[test]
fn dot_rows_is_dot_row_per_row_bitwise() {
    let mut rng = Rng(13);
    for dtype in DType::ALL {
        let n = 2 * dtype.block_elems().max(32);
        let x = rng.weights(n);
        let matrix: Vec<u8> = (0..5).flat_map(|_| rng.block_bytes(dtype, n)).collect();
        let row_bytes = dtype.row_bytes(n).unwrap();
        let want: Vec<f32> = matrix
            .chunks_exact(row_bytes)
            .map(|row| dot_row(dtype, row, &x))
            .collect();
        let mut out = vec![0.0; 5];
        dot_rows(dtype, &matrix, &x, &mut out);
        assert_bits_eq(&out, &want, &format!("{dtype} dot_rows"));
        for path in paths() {
            path.dot_rows(dtype, &matrix, row_bytes, &x, &mut out);
            assert_bits_eq(&out, &want, &format!("{dtype} dot_rows on {}", path.name()));
        }
    }
    let mut out = [1.0; 3];
    dot_rows(DType::Q8_0, &[], &[], &mut out);
    assert_eq!(out, [0.0; 3], "rows of no elements");
}

#[test]
fn dot_row_is_close_to_f64_dot() {
    let mut rng = Rng(5);
    let n = 1536;
    let x = rng.weights(n);
    for dtype in DType::ALL {
        let bytes = quantized(dtype, &rng.weights(n));
        let w = dequantized(dtype, &bytes, n);
        let exact: f64 = w
            .iter()
            .zip(&x)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        let scale: f64 = w
            .iter()
            .zip(&x)
            .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
            .sum();
        let got = f64::from(dot_row(dtype, &bytes, &x));
        assert!(
            (got - exact).abs() <= 1e-6 * scale,
            "{dtype}: {got} vs {exact}"
        );
    }
}

#[test]
#[cfg_attr(
    debug_assertions,
    should_panic(expected = "dot_row: 20 bytes of q4_1 for 64 activations")
)]
fn mismatched_lengths_poison_instead_of_reading_out_of_bounds() {
    // Release builds: NaN out, nothing read or written past the slices.
    assert!(dot_row(DType::Q4_1, &[0; 20], &[1.0; 64]).is_nan());
    let mut out = [0.0f32; 64];
    dequantize_row(DType::Q8_0, &[0; 34], &mut out);
    assert!(out.iter().all(|v| v.is_nan()));
    assert!(dot_f32(&[1.0; 3], &[1.0; 4]).is_nan());
    let mut bytes = [1u8; 20];
    quantize_row(DType::Q4_1, &[1.0; 64], &mut bytes);
    assert_eq!(bytes, [0; 20]);
    let mut out = [0.0f32; 3];
    dot_rows(DType::Q4_1, &[0; 40], &[1.0; 32], &mut out);
    assert!(out.iter().all(|v| v.is_nan()));
}

// ---------------------------------------------------------------------------------------
// Throughput (not a test: prints numbers)
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn bench_dot_row() {
    use std::hint::black_box;
    use std::time::Instant;
    let mut rng = Rng(1);
    for dtype in DType::ALL {
        // SmolLM2-135M's n_embd (or BENCH_N), or the next whole number of K-quant blocks.
        let n = std::env::var("BENCH_N")
            .map_or(576usize, |v| v.parse().unwrap())
            .next_multiple_of(dtype.block_elems());
        let row_bytes = dtype.row_bytes(n).unwrap();
        let x = rng.weights(n);
        for (label, total_bytes) in [
            ("L2-resident 256 KiB", 256 << 10),
            ("DRAM 256 MiB", 256 << 20),
        ] {
            let rows = total_bytes / row_bytes;
            let one = quantized(dtype, &rng.weights(n));
            let matrix: Vec<u8> = (0..rows).flat_map(|_| one.iter().copied()).collect();
            for path in paths() {
                let (mut best_row, mut best_rows) = (f64::INFINITY, f64::INFINITY);
                let mut out = vec![0.0f32; rows];
                for _ in 0..5 {
                    let t = Instant::now();
                    let mut sum = 0.0f32;
                    for row in matrix.chunks_exact(row_bytes) {
                        sum += path.dot(dtype, black_box(row), black_box(&x));
                    }
                    black_box(sum);
                    best_row = best_row.min(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    path.dot_rows(
                        dtype,
                        black_box(&matrix),
                        row_bytes,
                        black_box(&x),
                        &mut out,
                    );
                    black_box(&out);
                    best_rows = best_rows.min(t.elapsed().as_secs_f64());
                }
                let gbs = |secs: f64| matrix.len() as f64 / secs / 1e9;
                let (row, all) = (gbs(best_row), gbs(best_rows));
                println!(
                    "{dtype:>5} {label:>20} {:>8}: \
                     dot_row {row:6.2} GB/s, dot_rows {all:6.2} GB/s",
                    path.name()
                );
            }
        }
    }
}

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn bench_attend_block() {
    use std::hint::black_box;
    use std::time::Instant;
    let mut rng = Rng(2);
    // SmolLM2-135M's decode: 3 query heads a KV head, head_dim 64, KV rows of 3 heads.
    let (hd, g, stride, n_pos) = (64, 3, 192, 1024);
    let k = rng.weights(stride * n_pos);
    let v = rng.weights(stride * n_pos);
    let q = rng.weights(g * hd);
    let a = Attend {
        k: &k,
        v: &v,
        stride,
        n_pos,
        head_dim: hd,
        scale: 0.125,
    };
    let mut partials = vec![0.0f32; g * partial_len(hd)];
    for path in paths() {
        let mut best = f64::INFINITY;
        for _ in 0..std::env::var("BENCH_ITERS").map_or(20, |v| v.parse().unwrap()) {
            let t = Instant::now();
            for b in 0..a.blocks() {
                path.attend_block(&a, b, black_box(&q), &mut partials);
                black_box(&partials);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let ns = best * 1e9 / (n_pos * g) as f64;
        println!("{:>8}: {ns:6.2} ns a query and position", path.name());
    }
}

/// A decode step's attention over every layer of SmolLM2-135M at 1,024 positions, caches
/// too large for the CPU's caches as in a real step, with the f32 and the f16 cache (`cargo
/// test --release -p tern-model --lib bench_attend_layers -- --ignored --nocapture`).
#[test]
#[ignore]
fn bench_attend_layers() {
    use std::hint::black_box;
    use std::time::Instant;
    let mut rng = Rng(3);
    let (layers, kv_heads, hd, g, n_pos) = (30, 3, 64, 3, 1024);
    let stride = kv_heads * hd;
    let k: Vec<Vec<f32>> = (0..layers).map(|_| rng.weights(stride * n_pos)).collect();
    let v: Vec<Vec<f32>> = (0..layers).map(|_| rng.weights(stride * n_pos)).collect();
    let half = |x: &Vec<f32>| x.iter().map(|&x| f32_to_f16(x)).collect::<Vec<u16>>();
    let (kh, vh): (Vec<_>, Vec<_>) = (k.iter().map(half).collect(), v.iter().map(half).collect());
    let q = rng.weights(g * hd);
    let mut partials = vec![0.0f32; g * partial_len(hd)];
    let iters = std::env::var("BENCH_ITERS").map_or(10, |v| v.parse().unwrap());
    for f16 in [false, true] {
        let mut best = f64::INFINITY;
        for _ in 0..iters {
            let t = Instant::now();
            for l in 0..layers {
                for h in 0..kv_heads {
                    let a = Attend {
                        k: &k[l][h * hd..],
                        v: &v[l][h * hd..],
                        stride,
                        n_pos,
                        head_dim: hd,
                        scale: 0.125,
                    };
                    let cache = Half {
                        k: &kh[l][h * hd..],
                        v: &vh[l][h * hd..],
                    };
                    for b in 0..a.blocks() {
                        if f16 {
                            attend_block_half(&a, cache, b, black_box(&q), &mut partials);
                        } else {
                            attend_block(&a, b, black_box(&q), &mut partials);
                        }
                        black_box(&partials);
                    }
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let cache = if f16 { "f16" } else { "f32" };
        println!(
            "{cache}: {:.3} ms a step ({layers} layers, one thread)",
            best * 1e3
        );
    }
}

/// `exp` is glibc's `expf` (its FMA build, which x86-64 glibc picks on CPUs with FMA) bit for
/// bit, on every `EXP_STEP`-th f32 (default 61; 1 checks all of them).
#[test]
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn exp_is_glibc_expf_bit_for_bit() {
    if !std::arch::is_x86_feature_detected!("fma") {
        return; // glibc's build without FMA rounds differently
    }
    let step = std::env::var("EXP_STEP").map_or(61, |v| v.parse().unwrap());
    let mut bits = Some(0u32);
    let mut checked = 0u64;
    while let Some(b) = bits {
        let x = f32::from_bits(b);
        let (ours, libm) = (super::exp(x), x.exp());
        assert!(
            ours.to_bits() == libm.to_bits() || (ours.is_nan() && libm.is_nan()),
            "exp({x:e}) ({b:#x}): {ours:e} here, {libm:e} from glibc"
        );
        checked += 1;
        bits = b.checked_add(step);
    }
    assert!(checked > 1 << 20, "{checked} values");
}

/// Each path's `exp` of a slice is the scalar `exp`'s bits, in range and out.
#[test]
fn exp_paths_agree() {
    let mut rng = Rng(5);
    let mut x: Vec<f32> = rng.weights(4099).iter().map(|v| v * 40.0 - 45.0).collect();
    x.extend([
        0.0,
        -0.0,
        88.0,
        -88.0,
        87.99,
        -87.99,
        89.0,
        -104.0,
        -200.0,
        1e-30,
        -1e-30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        -0.5,
    ]);
    let want: Vec<u32> = x.iter().map(|&v| super::exp(v).to_bits()).collect();
    for path in paths() {
        let mut got = x.clone();
        path.exp_in_place(&mut got);
        let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want, "{}", path.name());
    }
}
