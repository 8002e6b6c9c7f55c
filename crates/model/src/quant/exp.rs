//! `exp` of `f32`s with the same bits on every machine and every code path.
//!
//! The algorithm is the one glibc (2.27 and later) and musl use for `expf`, from Arm's
//! optimized-routines: with `N = 32`, `x · N / ln 2 = k + r` (`k` an integer, `|r| <= 1/2`),
//! then `exp(x) = 2^(k/N) · 2^(r/N)`, the first factor from a 32-entry table of `2^(i/N)` and
//! the exponent bits of `k`, the second a cubic in `r`, all in `f64`, rounded once to `f32`
//! at the end (within 0.502 ulp). Written out here with glibc's fused multiply-adds, in the
//! order its x86-64 FMA build runs them, it gives that build's bits; and it gives them on
//! every machine, where a libm call gives each platform's (and, without FMA, each CPU's) own.
//! The AVX2 and AVX-512 copies do the same operations on 4 or 8 lanes.
//!
//! Inputs with `|x| >= 88` (overflow, underflow, infinities) and NaNs go to the platform's
//! `f32::exp`; a softmax's `x - max` reaches them only when an element has no weight anyway.

/// `N / ln 2`.
pub(super) const INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
/// `1.5 · 2^52`: adding it rounds to an integer kept in the low bits.
pub(super) const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
/// The cubic's coefficients, for `r` scaled by `N`: `C0 r^3 + C1 r^2 + C2 r + 1`.
pub(super) const C: [f64; 3] = [
    f64::from_bits(0x3ebc_6af8_4b91_2394),
    f64::from_bits(0x3f2e_bfce_50fa_c4f3),
    f64::from_bits(0x3f96_2e42_ff0c_52d6),
];
/// `bits(2^(i/32)) - (i << 47)`: adding `k << 47` to entry `k % 32` gives `2^(k/32)`.
pub(super) const TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// Whether `x` takes the table path (`|x| < 88`, not NaN); the rest go to `f32::exp`.
#[inline(always)]
pub(super) fn in_range(x: f32) -> bool {
    x.abs() < 88.0
}

/// `e^x`, the same bits on every machine (see the module docs).
#[inline]
pub fn exp(x: f32) -> f32 {
    let mut x = [x];
    exp_in_place(&mut x);
    x[0]
}

/// [`exp`] one element at a time, in place.
pub(super) fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA.
        return unsafe { exp_in_place_fma(x) };
    }
    for v in x {
        *v = exp_any(*v);
    }
}

/// [`exp_in_place`] with the fused multiply-adds as instructions (without, each is a libm
/// call).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn exp_in_place_fma(x: &mut [f32]) {
    for v in x {
        *v = exp_any(*v);
    }
}

/// [`exp`] on any CPU: `mul_add` is one correctly rounded fused multiply-add everywhere.
#[inline(always)]
fn exp_any(x: f32) -> f32 {
    if !in_range(x) {
        return x.exp();
    }
    let xd = f64::from(x);
    let shifted = INV_LN2_N.mul_add(xd, SHIFT);
    let k = shifted.to_bits();
    let r = INV_LN2_N.mul_add(xd, -(shifted - SHIFT));
    let scale = f64::from_bits(TABLE[(k % 32) as usize].wrapping_add(k << 47));
    let z = C[0].mul_add(r, C[1]);
    let y = C[2].mul_add(r, 1.0);
    (z.mul_add(r * r, y) * scale) as f32
}
