//! Unit tests: activation quantization by hand, every code path bitwise equal to the
//! portable kernels, results within `f32` rounding of the exact dot with the quantized
//! activations and within their int8 rounding of the `f32` reference `quant::dot_row`.
//!
//! `bench_dot_q8` (ignored) prints single-thread throughput against `quant::dot_rows`:
//! `cargo test --release -p tern-model --lib fastdot::tests::bench -- --ignored --nocapture`.

use super::*;
use crate::quant::{dequantize_row, dot_row, dot_rows};

/// Every format [`supports`] accepts.
const FORMATS: [DType; 5] = [
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q4_K,
    DType::Q6_K,
];

/// A small deterministic generator (64-bit LCG, high bits out).
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

    /// Activation-like data: each 32-run has its own scale; some runs are all zero, some
    /// hold one outlier (100x the rest), some are constant.
    fn acts(&mut self, n: usize) -> Vec<f32> {
        self.acts_with(n, true)
    }

    /// [`Rng::acts`], with or without the outlier runs.
    fn acts_with(&mut self, n: usize, outliers: bool) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        let (mut scale, mut kind) = (1.0, 0);
        for i in 0..n {
            if i % 32 == 0 {
                scale = 10f32.powf(3.0 * self.uniform());
                kind = self.next_u32() % 8;
            }
            out.push(match kind {
                0 => 0.0,
                1 if outliers && i % 32 == 7 => 100.0 * scale,
                2 => -scale,
                _ => scale * self.uniform(),
            });
        }
        out
    }

    /// Random bytes for a row of `n` weights, with every f16 field finite and moderate, so
    /// every bit pattern of the quantized fields gets exercised.
    fn row(&mut self, dtype: DType, n: usize) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..dtype.row_bytes(n).unwrap())
            .map(|_| self.next_u32() as u8)
            .collect();
        let f16_fields: &[usize] = match dtype {
            DType::Q8_0 | DType::Q4_0 => &[0],
            DType::Q4_1 | DType::Q4_K => &[0, 2],
            _ => &[208],
        };
        for block in bytes.chunks_exact_mut(dtype.block_bytes()) {
            for &at in f16_fields {
                let v = u16::from_le_bytes([block[at], block[at + 1]]);
                let v = (v % 0x3000 + 0x1000) | (v & 0x8000);
                block[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        bytes
    }
}

/// Row lengths that exercise whole chunks, partial chunks and single blocks.
fn lengths(dtype: DType) -> &'static [usize] {
    match dtype.block_elems() {
        32 => &[32, 64, 480, 512, 544, 576, 992, 1536],
        _ => &[256, 512, 768, 1536],
    }
}

/// `x`'s quantized values, dequantized (`d * q`).
fn dequantized_acts(x: &QuantizedActs) -> Vec<f32> {
    (0..x.len()).map(|i| x.dequantized(i).unwrap()).collect()
}

/// The per-block min term's magnitude for each weight (`|m|` for `Q4_1`, `dmin * m` for
/// `Q4_K`, 0 otherwise): bounds the cancellation inside a term, since `|d*q| <= |w| + |m|`.
fn min_magnitudes(dtype: DType, row: &[u8], n: usize) -> Vec<f32> {
    let f16 = portable::le_f16;
    let mut out = vec![0.0f32; n];
    match dtype {
        DType::Q4_1 => {
            for (b, blk) in row.chunks_exact(20).enumerate() {
                out[32 * b..32 * b + 32].fill(f16(blk, 2).abs());
            }
        }
        DType::Q4_K => {
            for (sb, blk) in row.chunks_exact(144).enumerate() {
                let scales: [u8; 12] = std::array::from_fn(|i| blk[4 + i]);
                for j in 0..8 {
                    let m = crate::quant::kquants::scale_min_k4(j, &scales).1;
                    let mw = (f16(blk, 2) * f32::from(m)).abs();
                    out[256 * sb + 32 * j..][..32].fill(mw);
                }
            }
        }
        _ => {}
    }
    out
}

// ---------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------

#[test]
fn activations_quantize_by_hand() {
    // Block 0: amax 127 (d = 1, values exact). Block 1: amax 2.54 (d = 0.02), partial.
    let mut x = vec![0.0f32; 40];
    x[0] = 127.0;
    x[1] = -63.5; // rounds to even: -64
    x[3] = 62.5; // 62
    x[2] = 0.4;
    x[32] = -2.54;
    x[33] = 1.0; // 1 / 0.02 = 50
    let a = QuantizedActs::new(&x);
    assert_eq!(a.len(), 40);
    assert_eq!(a.d[0], 1.0);
    assert_eq!(&a.q[..5], &[127, -64, 0, 62, 0]);
    assert_eq!(a.qsum[0], 125);
    assert_eq!(a.s[0], 125.0);
    assert_eq!(a.d[1], 2.54f32 / 127.0);
    assert_eq!(&a.q[32..35], &[-127, 50, 0]);
    assert_eq!((a.qsum[1], a.qsum16[2], a.qsum16[3]), (-77, -77, 0));
    assert_eq!((a.qsum16[0], a.qsum16[1]), (125, 0));
    assert_eq!(a.s[1], a.d[1] * -77.0);
    // Padding to a whole chunk is zero; `dequantized` stops at `len`.
    assert_eq!(a.q.len(), CHUNK_ELEMS);
    assert!(a.q[40..].iter().all(|&q| q == 0));
    assert!(a.d[2..].iter().all(|&d| d == 0.0));
    assert_eq!(a.dequantized(1), Some(-64.0));
    assert_eq!(a.dequantized(40), None);
    // Reuse with another length leaves nothing of the old contents behind.
    let mut b = a.clone();
    b.quantize_into(&[3.0; 8]);
    assert_eq!(
        (b.len(), b.q.len(), b.qsum[0], b.qsum[1]),
        (8, CHUNK_ELEMS, 8 * 127, 0)
    );
    assert!(b.q[8..].iter().all(|&q| q == 0));
}

#[test]
fn activations_never_panic_and_keep_nan() {
    let x = [
        f32::NAN,
        1.0,
        f32::INFINITY,
        -f32::INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
    ];
    let a = QuantizedActs::new(&x);
    assert!(a.d[0].is_nan());
    assert!(a.q.iter().all(|&q| q != i8::MIN));
    let row = vec![0x11u8; 34]; // one Q8_0 block, d = f16 0x1111 (finite)
    let mut x = [0.5f32; 32];
    x[3] = f32::NAN;
    assert!(dot_q8(DType::Q8_0, &row, &QuantizedActs::new(&x)).is_nan());
    assert!(QuantizedActs::new(&[]).is_empty());
}

// ---------------------------------------------------------------------------------------
// Paths agree bit for bit
// ---------------------------------------------------------------------------------------

#[test]
fn every_path_matches_portable_bitwise() {
    let paths = Path::supported();
    println!(
        "paths: {:?}",
        paths.iter().map(|p| p.name()).collect::<Vec<_>>()
    );
    let mut rng = Rng(7);
    for dtype in FORMATS {
        for &n in lengths(dtype) {
            let row_bytes = dtype.row_bytes(n).unwrap();
            let n_rows = 9;
            // One byte in, so that no row is aligned.
            let buf: Vec<u8> = std::iter::once(0)
                .chain((0..n_rows).flat_map(|_| rng.row(dtype, n)))
                .collect();
            let rows = &buf[1..];
            let x = QuantizedActs::new(&rng.acts(n));
            let mut want = vec![0.0f32; n_rows];
            Path::Portable.checked_dot_rows(dtype, rows, row_bytes, &x, &mut want);
            for &path in &paths {
                let mut got = vec![0.0f32; n_rows];
                path.checked_dot_rows(dtype, rows, row_bytes, &x, &mut got);
                for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{dtype} n={n} row {r} on {}: {g} vs portable {w}",
                        path.name()
                    );
                }
            }
            // The public entry points run the best path, one row or many.
            let mut all = vec![0.0f32; n_rows];
            dot_q8_rows(dtype, rows, row_bytes, &x, &mut all);
            for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
                assert_eq!(dot_q8(dtype, row, &x).to_bits(), want[r].to_bits());
                assert_eq!(all[r].to_bits(), want[r].to_bits());
            }
        }
    }
}

#[test]
fn several_tokens_give_each_token_alone_bitwise() {
    let mut rng = Rng(11);
    for dtype in FORMATS {
        for &n in lengths(dtype) {
            let row_bytes = dtype.row_bytes(n).unwrap();
            // Rows and tokens past one group of 16 (the AMX kernel's tiles), and short of one.
            let n_rows = 37;
            // One byte in, so that no row is aligned.
            let buf: Vec<u8> = std::iter::once(0)
                .chain((0..n_rows).flat_map(|_| rng.row(dtype, n)))
                .collect();
            let rows = &buf[1..];
            for tokens in [1, 2, 3, 4, 5, 8, 9, 16, 17, 35] {
                let xs: QuantizedTokens = (0..tokens)
                    .map(|_| QuantizedActs::new(&rng.acts(n)))
                    .collect::<Vec<_>>()
                    .into();
                let mut want = vec![0.0f32; tokens * n_rows];
                for (x, want) in xs.acts().iter().zip(want.chunks_exact_mut(n_rows)) {
                    Path::Portable.checked_dot_rows(dtype, rows, row_bytes, x, want);
                }
                let mut all = vec![0.0f32; tokens * n_rows];
                dot_q8_rows_tokens(dtype, rows, row_bytes, &xs, &mut all);
                for path in Path::supported() {
                    let mut got = vec![0.0f32; tokens * n_rows];
                    path.dot_rows_tokens(dtype, rows, row_bytes, &xs, &mut got);
                    for (i, ((g, a), w)) in got.iter().zip(&all).zip(&want).enumerate() {
                        let (t, r) = (i / n_rows, i % n_rows);
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{dtype} n={n} {tokens} tokens: token {t} row {r} on {}: {g} vs {w}",
                            path.name()
                        );
                        assert_eq!(a.to_bits(), w.to_bits(), "{dtype} n={n} token {t} row {r}");
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn q4_k_scale_unpacking_matches_scale_min_k4() {
    let mut rng = Rng(3);
    for _ in 0..1000 {
        let s: [u8; 12] = std::array::from_fn(|_| rng.next_u32() as u8);
        let (sc, m) = unpack_scales_q4_k(&s);
        for j in 0..8 {
            let want = crate::quant::kquants::scale_min_k4(j, &s);
            assert_eq!(((sc >> (8 * j)) as u8, (m >> (8 * j)) as u8), want);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Accuracy
// ---------------------------------------------------------------------------------------

/// Against the exact dot of the dequantized weights with the dequantized activations
/// (computed in f64): only f32 rounding separates them. Each block term rounds a few times
/// and each lane adds at most 3 + 4 terms here, so the error is a few dozen `f32::EPSILON`
/// (1.2e-7) of `M = Σ (|w| + 2|m|) |x̂|`, the largest magnitude any intermediate reaches
/// (`|d*q| <= |w| + |m|`); 1e-5 leaves room without hiding a wrong block, which moves the
/// result by a whole term.
#[test]
fn equals_dot_of_quantized_activations_to_f32_rounding() {
    let mut rng = Rng(11);
    for dtype in FORMATS {
        for &n in lengths(dtype) {
            for _ in 0..20 {
                let row = rng.row(dtype, n);
                let x = QuantizedActs::new(&rng.acts(n));
                let xq = dequantized_acts(&x);
                let mut w = vec![0.0f32; n];
                dequantize_row(dtype, &row, &mut w);
                let m = min_magnitudes(dtype, &row, n);
                let exact: f64 = w
                    .iter()
                    .zip(&xq)
                    .map(|(&w, &x)| f64::from(w) * f64::from(x))
                    .sum();
                let mag: f64 = (0..n)
                    .map(|i| f64::from(w[i].abs() + 2.0 * m[i]) * f64::from(xq[i].abs()))
                    .sum();
                let got = f64::from(dot_q8(dtype, &row, &x));
                assert!(
                    (got - exact).abs() <= 1e-5 * mag,
                    "{dtype} n={n}: {got} vs exact {exact} (magnitude {mag})"
                );
            }
        }
    }
}

/// Against the f32 reference `quant::dot_row`. Quantizing moves each activation by at most
/// half a step, `|x - d_x q| <= d_x / 2` (round to nearest; `x / d_x` never exceeds 127, so
/// the clamp never bites; 1.0001 covers the rounding of `1 / d_x`), so the results differ
/// by at most `E = Σ_b (d_b / 2) Σ_(i in b) |w_i|`, plus f32 rounding on both sides
/// (1e-5 of the magnitude, as above).
///
/// Relative to `Σ |w| |x|` that is at most about 1/127 when the values of a block are
/// spread evenly up to its largest (`d_x / 2` against a mean `|x|` of `127 d_x / 2`), and
/// far less as the errors' signs vary: checked below 1e-2 on data without outlier runs. A
/// block dominated by one outlier rounds its other values coarsely, so no relative bound
/// holds there (only `E`); the worst ratio is printed for both kinds of data.
#[test]
fn within_activation_rounding_of_f32_reference() {
    for outliers in [false, true] {
        let worst = reference_error(outliers);
        println!("outlier runs {outliers}: worst |fast - reference| / Σ|w||x| = {worst:.2e}");
        assert!(outliers || worst < 1e-2);
    }
}

/// Checks every format and length against `quant::dot_row` with the bound above; returns
/// the worst `|fast - reference| / Σ |w| |x|`.
fn reference_error(outliers: bool) -> f64 {
    let mut rng = Rng(5);
    let mut worst = 0.0f64;
    for dtype in FORMATS {
        for &n in lengths(dtype) {
            for _ in 0..20 {
                let row = rng.row(dtype, n);
                let xf = rng.acts_with(n, outliers);
                let x = QuantizedActs::new(&xf);
                let mut w = vec![0.0f32; n];
                dequantize_row(dtype, &row, &mut w);
                let m = min_magnitudes(dtype, &row, n);
                let step_err: f64 = (0..n)
                    .map(|i| f64::from(x.d[i / QK]) / 2.0 * f64::from(w[i].abs()))
                    .sum();
                let mag: f64 = (0..n)
                    .map(|i| {
                        let x_hi = xf[i].abs() + x.d[i / QK];
                        f64::from(w[i].abs() + 2.0 * m[i]) * f64::from(x_hi)
                    })
                    .sum();
                let got = f64::from(dot_q8(dtype, &row, &x));
                let want = f64::from(dot_row(dtype, &row, &xf));
                let err = (got - want).abs();
                assert!(
                    err <= 1.0001 * step_err + 1e-5 * mag,
                    "{dtype} n={n}: {got} vs reference {want} (bound {step_err})"
                );
                let abs_dot: f64 = w
                    .iter()
                    .zip(&xf)
                    .map(|(w, x)| f64::from((w * x).abs()))
                    .sum();
                worst = worst.max(err / abs_dot);
            }
        }
    }
    worst
}

// ---------------------------------------------------------------------------------------
// Contract edges
// ---------------------------------------------------------------------------------------

#[test]
fn supports_exactly_the_block_formats() {
    for dtype in DType::ALL {
        assert_eq!(supports(dtype), FORMATS.contains(&dtype), "{dtype}");
    }
}

#[test]
fn empty_rows_sum_to_zero() {
    let x = QuantizedActs::new(&[]);
    for path in Path::supported() {
        let mut out = [1.0f32; 3];
        path.checked_dot_rows(DType::Q4_1, &[], 0, &x, &mut out);
        assert_eq!(out, [0.0; 3]);
    }
    assert_eq!(dot_q8(DType::Q8_0, &[], &x), 0.0);
}

#[test]
#[cfg_attr(
    debug_assertions,
    should_panic(expected = "dot_q8: 20 bytes of q4_1 for 64 activations")
)]
fn mismatched_lengths_poison_instead_of_reading_out_of_bounds() {
    // Release builds: NaN out, nothing read or written past the slices.
    let x = QuantizedActs::new(&[1.0; 64]);
    assert!(dot_q8(DType::Q4_1, &[0; 20], &x).is_nan());
    assert!(dot_q8(DType::F32, &[0; 256], &x).is_nan());
    let mut out = [0.0f32; 3];
    dot_q8_rows(DType::Q4_1, &[0; 80], 40, &x, &mut out);
    assert!(out.iter().all(|v| v.is_nan()));
    dot_q8_rows(DType::Q4_1, &[0; 80], 20, &x, &mut out);
    assert!(out.iter().all(|v| v.is_nan()));
}

#[test]
#[cfg_attr(
    debug_assertions,
    should_panic(
        expected = "dot_q8_rows_tokens: 68 bytes of q8_0 in rows of 68 bytes, 2 tokens, 3 outputs"
    )
)]
fn several_tokens_with_mismatched_lengths_poison() {
    // Release builds: NaN out, nothing read or written past the slices.
    let x = QuantizedActs::new(&[1.0; 64]);
    let mut out = [0.0f32; 3];
    let xs = QuantizedTokens::from(vec![x.clone(), x]);
    dot_q8_rows_tokens(DType::Q8_0, &[0; 68], 68, &xs, &mut out);
    assert!(out.iter().all(|v| v.is_nan()));
}

// ---------------------------------------------------------------------------------------
// Throughput (not a test: prints numbers)
// ---------------------------------------------------------------------------------------

/// Single-thread prefill products: 32 rows (the CPU forward pass's task) against 128
/// tokens, token by token through `dot_q8_rows` against all at once through
/// `dot_q8_rows_tokens`, on the best path.
#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn bench_dot_q8_tokens() {
    use std::hint::black_box;
    use std::time::Instant;
    let mut rng = Rng(2);
    for (dtype, n) in [
        (DType::Q4_1, 576),
        (DType::Q4_1, 1536),
        (DType::Q8_0, 576),
        (DType::Q4_K, 1536),
    ] {
        let (rows, tokens) = (32, 128);
        let row_bytes = dtype.row_bytes(n).unwrap();
        let matrix: Vec<u8> = (0..rows).flat_map(|_| rng.row(dtype, n)).collect();
        let xs: Vec<QuantizedActs> = (0..tokens)
            .map(|_| QuantizedActs::new(&rng.acts(n)))
            .collect();
        let all_xs = QuantizedTokens::from(xs.clone());
        let mut out = vec![0.0f32; rows * tokens];
        let best = |f: &mut dyn FnMut()| {
            (0..50)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let one = best(&mut || {
            for (x, o) in xs.iter().zip(out.chunks_exact_mut(rows)) {
                dot_q8_rows(dtype, black_box(&matrix), row_bytes, x, o);
            }
        });
        let all = best(&mut || {
            dot_q8_rows_tokens(dtype, black_box(&matrix), row_bytes, &all_xs, &mut out)
        });
        println!(
            "{dtype:>5} {rows} x {n:<5} x {tokens} tokens: one at a time {:8.1} us, together {:8.1} us ({:.2}x)",
            one * 1e6,
            all * 1e6,
            one / all
        );
        // Each path's products of several tokens, at a decode step's batch sizes too.
        for count in [8, 16, tokens] {
            let xs = &QuantizedTokens::from(xs[..count].to_vec());
            let out = &mut out[..rows * count];
            let times: Vec<String> = Path::supported()
                .into_iter()
                .skip(1)
                .map(|path| {
                    let t = best(&mut || {
                        path.dot_rows_tokens(dtype, black_box(&matrix), row_bytes, xs, out)
                    });
                    format!("{} {:.1} us", path.name(), t * 1e6)
                })
                .collect();
            println!("      {count:>3} tokens: {}", times.join(", "));
        }
    }
}

/// Single-thread GB/s of weight bytes, `dot_q8_rows` on each path against the f32
/// reference `quant::dot_rows` on the same matrix.
#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn bench_dot_q8() {
    use std::hint::black_box;
    use std::time::Instant;
    let mut rng = Rng(1);
    let best_of = |f: &mut dyn FnMut()| {
        (0..7)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    // (format, columns, rows): the SmolLM2-135M shapes, and each repeated to 64 MiB (past
    // the 32 MiB L3) to stream from DRAM.
    let shapes = [
        (DType::Q4_1, 576, 1536),
        (DType::Q4_1, 1536, 576),
        (DType::Q8_0, 576, 49152),
        (DType::Q4_1, 576, 0),
        (DType::Q4_1, 1536, 0),
        (DType::Q8_0, 576, 0),
        (DType::Q8_0, 1536, 0),
        (DType::Q4_K, 1536, 0),
        (DType::Q6_K, 1536, 0),
    ];
    for (dtype, n, rows) in shapes {
        let row_bytes = dtype.row_bytes(n).unwrap();
        let rows = if rows == 0 {
            (64 << 20) / row_bytes
        } else {
            rows
        };
        let matrix: Vec<u8> = (0..rows).flat_map(|_| rng.row(dtype, n)).collect();
        let xf = rng.acts(n);
        let mut x = QuantizedActs::new(&xf);
        let mut out = vec![0.0f32; rows];
        let gbs = |secs: f64| matrix.len() as f64 / secs / 1e9;
        let reference = best_of(&mut || {
            dot_rows(dtype, black_box(&matrix), black_box(&xf), &mut out);
        });
        let quantize = best_of(&mut || x.quantize_into(black_box(&xf)));
        print!(
            "{dtype:>5} {rows:>6} x {n:<5} {:>6.1} MB: f32 ref {:6.2} GB/s",
            matrix.len() as f64 / 1e6,
            gbs(reference)
        );
        for path in Path::supported() {
            let secs = best_of(&mut || {
                path.checked_dot_rows(dtype, black_box(&matrix), row_bytes, &x, &mut out);
            });
            print!(
                " | {} {:6.2} GB/s ({:4.1}x)",
                path.name(),
                gbs(secs),
                reference / secs
            );
        }
        if matrix.len() < 32 << 20 {
            println!(" | quantize x {:.2} us", quantize * 1e6);
            continue;
        }
        // From DRAM on both cores of a 2-core machine, each on half the rows, best path.
        let half = rows.div_ceil(2);
        let two = best_of(&mut || {
            std::thread::scope(|scope| {
                let parts = matrix.chunks(half * row_bytes).zip(out.chunks_mut(half));
                for (m, o) in parts {
                    let x = &x;
                    scope.spawn(move || dot_q8_rows(dtype, black_box(m), row_bytes, x, o));
                }
            });
        });
        println!(
            " | 2 threads {:6.2} GB/s | quantize x {:.2} us",
            gbs(two),
            quantize * 1e6
        );
    }
}
