//! Branch-free `exp` and `sigmoid` for the element-wise loops, written so the compiler
//! vectorizes them (libm's scalar `expf` / `tanhf` calls were most of the non-GEMM time of a
//! GPT-2 training step), and `map` helpers that run a loop body in an AVX2+FMA-compiled
//! trampoline when the CPU has those features.
//!
//! `exp` is the Cephes single-precision scheme: `n = round(x log2 e)`, `r = x - n ln 2` (ln 2 split
//! in two), a degree-6 polynomial for `e^r`, and `2^n` built in the exponent bits. Inputs are
//! clamped to [-87.3, 88.37] (results ~1.2e-38 and ~2.4e38 at the ends instead of subnormals /
//! infinity); NaN stays NaN. Accuracy (tested against f64 over the whole range): <= 2 ulp-ish,
//! relative error <= 3e-7.

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;

/// `e^x` (see the module docs for range and accuracy).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.376_26);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((ni + 127) << 23) as u32)
}

/// `1 / (1 + e^{-x})`; exactly 0 below x = -87 (where the true value is already below f32's
/// normal range, and the clamped `exp` would otherwise leave ~4e-39: harmless alone, but
/// `x * sigmoid(x)` at x = -1e30 would come out -4e-9 instead of 0).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-x));
    if x < -87.0 {
        0.0
    } else {
        s
    }
}

/// `erfc(z)` for the element-wise loops (branch-free, so it vectorizes; libm's scalar `erfcf`
/// and `expf` were 8% of a ViT-base training step). Numerical Recipes' Chebyshev fit:
/// `erfc(a) = t exp(-a^2 + P(t))`, `t = 1 / (1 + a/2)`, `a = |z|`, fractional error below
/// 1.2e-7 for every `a >= 0` in exact arithmetic, and `erfc(z) = 2 - erfc(-z)` for `z < 0`.
/// In f32 the exponent's argument is carried as an f32 and an exact remainder (`a^2` split
/// exactly, the sum with TwoSum), so its rounding does not grow with `a^2` in the tail.
/// Relative error against f64 on [-10, 9.2]: at most 3.6e-7 (tested, bound 5e-7). Exactly 0
/// once `erfc(a)` is below f32's normal range (a > 9.2); NaN stays NaN.
#[inline(always)]
pub fn erfc(z: f32) -> f32 {
    let a = z.abs();
    let (t, e, c) = erfc_parts(a);
    let r = t * exp(e) * (1.0 + c);
    let r = if e < -87.0 || a > 9.5 { 0.0 } else { r }; // a = inf: e is NaN
    if z < 0.0 {
        2.0 - r
    } else {
        r
    }
}

/// `(t, e, c)` of [`erfc`], `a >= 0`: `-a^2 + P(t) = e + c` with `e` the rounded f32 sum
/// and `c` its small remainder (the square's rounding and the sum's, both exact), so that
/// `e^{e + c} = e^e (1 + c)` to f32 precision.
#[inline(always)]
fn erfc_parts(a: f32) -> (f32, f32, f32) {
    let t = 1.0 / (1.0 + 0.5 * a);
    // Numerical Recipes' coefficients, written as the f32 values they round to.
    let mut p = 0.170_872_76f32;
    for c in [
        -0.822_152_26,
        1.488_515_9,
        -1.135_204,
        0.278_868_08,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_95,
        1.000_023_7,
        -1.265_512_2,
    ] {
        p = p * t + c;
    }
    let (s, lo) = square_split(a);
    let e = p - s;
    let bv = e - p; // TwoSum: p + (-s) = e + err exactly
    let err = (p - (e - bv)) + (-s - bv);
    (t, e, err - lo)
}

/// `a^2 = s + lo` exactly, `s` the rounded square (Dekker's product with Veltkamp's split: no
/// FMA, so the result is the same on every CPU and in every compiled context).
#[inline(always)]
fn square_split(a: f32) -> (f32, f32) {
    let s = a * a;
    let c = a * 4097.0; // 2^12 + 1
    let hi = c - (c - a);
    let lo = a - hi;
    (s, ((hi * hi - s) + 2.0 * hi * lo) + lo * lo)
}

/// `e^{-a^2}` for `a >= 0`: `e^{-s} (1 - lo)` with `a^2 = s + lo` split exactly, so
/// the square's rounding costs nothing (relative error that of [`exp`]); 0 past f32's normal
/// range.
#[inline(always)]
pub fn exp_neg_square(a: f32) -> f32 {
    let (s, lo) = square_split(a);
    let r = exp(-s) * (1.0 - lo);
    if s > 87.0 || a > 9.5 {
        0.0
    } else {
        r
    }
}

/// `sum_j e^{row_j - shift}`, in 8 interleaved partial sums (vectorizable; a fixed order, so
/// deterministic).
#[inline(always)]
pub fn sum_exp(row: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() {
        // SAFETY: the CPU was just checked to support avx2 and fma.
        return unsafe { x86::sum_exp(row, shift) };
    }
    sum_exp_portable(row, shift)
}

#[inline(always)]
fn sum_exp_portable(row: &[f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += exp(c[k] - shift);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &z in rest {
        s += exp(z - shift);
    }
    s
}

/// `row_j = e^{row_j - shift}` in place; returns their sum, added as [`sum_exp`] adds (so
/// the same value).
#[inline(always)]
pub fn exp_in_place_sum(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() {
        // SAFETY: the CPU was just checked to support avx2 and fma.
        return unsafe { x86::exp_in_place_sum(row, shift) };
    }
    exp_in_place_sum_portable(row, shift)
}

#[inline(always)]
fn exp_in_place_sum_portable(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for k in 0..8 {
            c[k] = exp(c[k] - shift);
            acc[k] += c[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for z in chunks.into_remainder() {
        *z = exp(*z - shift);
        s += *z;
    }
    s
}

/// `row_j = scale * e^{row_j - shift}` in place.
#[inline(always)]
pub fn exp_scaled_in_place(row: &mut [f32], shift: f32, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() {
        // SAFETY: the CPU was just checked to support avx2 and fma.
        return unsafe { x86::exp_scaled_in_place(row, shift, scale) };
    }
    exp_scaled_in_place_portable(row, shift, scale)
}

#[inline(always)]
fn exp_scaled_in_place_portable(row: &mut [f32], shift: f32, scale: f32) {
    for z in row.iter_mut() {
        *z = scale * exp(*z - shift);
    }
}

/// The softmax loops above in explicit 8-lane AVX2: the compiler vectorized the portable ones
/// only 4 lanes wide (perf showed `xmm` code in attention's softmax, 15% of a Stable Diffusion
/// UNet step). The same operations per element in the same order as [`exp`] (separate
/// multiplies and adds, no fused multiply-add) and the same 8 partial sums: bit-identical
/// results, tested.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn set(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }

    /// [`super::exp`] on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        // clamp: max(lo, x) returns x when x is NaN (the second operand), so NaN stays NaN.
        let x = _mm256_min_ps(set(88.376_26), _mm256_max_ps(set(-87.336_54), x));
        let round = set(super::ROUND);
        let t = _mm256_add_ps(_mm256_mul_ps(x, set(super::LOG2E)), round);
        let n = _mm256_sub_ps(t, round);
        let ni = _mm256_sub_epi32(
            _mm256_castps_si256(t),
            _mm256_set1_epi32(super::ROUND.to_bits() as i32),
        );
        let r = _mm256_add_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, set(0.693_359_4))),
            _mm256_mul_ps(n, set(2.121_944_4e-4)),
        );
        let mut p = set(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5.000_000_1e-1,
        ] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), set(c));
        }
        let y = _mm256_add_ps(
            _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r),
            set(1.0),
        );
        let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(ni, _mm256_set1_epi32(127)));
        _mm256_mul_ps(y, _mm256_castsi256_ps(scale))
    }

    /// The 8 partial sums combined as the portable loops combine them.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn combine(acc: __m256) -> f32 {
        let mut a = [0.0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), acc);
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sum_exp(row: &[f32], shift: f32) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let chunks = row.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            let v = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), set(shift));
            acc = _mm256_add_ps(acc, exp8(v));
        }
        let mut s = combine(acc);
        for &z in rest {
            s += super::exp(z - shift);
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_in_place_sum(row: &mut [f32], shift: f32) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), set(shift)));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut s = combine(acc);
        for z in chunks.into_remainder() {
            *z = super::exp(*z - shift);
            s += *z;
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_scaled_in_place(row: &mut [f32], shift: f32, scale: f32) {
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), set(shift)));
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_mul_ps(set(scale), e));
        }
        for z in chunks.into_remainder() {
            *z = scale * super::exp(*z - shift);
        }
    }
}

/// Runs `body` compiled for AVX2+FMA when the CPU has them (wider vectors for the loops inside),
/// else as is. `body` must be `#[inline(always)]`-friendly (a closure).
#[inline(always)]
pub(crate) fn map<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx2_fma() {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn trampoline<F: FnOnce() -> R, R>(f: F) -> R {
                f()
            }
            // SAFETY: the CPU was just checked to support avx2 and fma.
            return unsafe { trampoline(body) };
        }
    }
    body()
}

#[cfg(test)]
mod tests {
    /// Dense sweep against f64: exp relative error, sigmoid absolute error.
    #[test]
    fn accuracy_over_the_range() {
        let (mut e_exp, mut e_sig) = (0.0f64, 0.0f64);
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            e_exp = e_exp.max(((super::exp(x) as f64) - want).abs() / want);
            x += 0.000_37 * (1.0 + x.abs());
        }
        let mut u = -30.0f32;
        while u < 30.0 {
            e_sig = e_sig.max((super::sigmoid(u) as f64 - 1.0 / (1.0 + (-(u as f64)).exp())).abs());
            u += 0.000_91;
        }
        assert!(e_exp <= 3e-7, "exp relative error {e_exp:e}");
        // erfc against musl's f64 erfc, relative, over the whole range where it is normal
        // (z in [-10, 9.2]), densely around 0 and through the tail.
        let mut e_erfc = 0.0f64;
        let mut z = -10.0f32;
        while z < 9.2 {
            let want = libm::erfc(z as f64);
            let got = super::erfc(z) as f64;
            e_erfc = e_erfc.max((got - want).abs() / want);
            z += 0.000_29 * (1.0 + z.abs());
        }
        assert!(e_erfc <= 5e-7, "erfc relative error {e_erfc:e}");
        assert_eq!(super::erfc(9.5), 0.0);
        assert_eq!(super::erfc(f32::INFINITY), 0.0);
        assert_eq!(super::erfc(-30.0), 2.0);
        assert_eq!(super::erfc(f32::NEG_INFINITY), 2.0);
        assert!(super::erfc(f32::NAN).is_nan());
        let mut e_ens = 0.0f64;
        let mut a = 0.0f32;
        while a < 9.3 {
            let want = (-(a as f64) * (a as f64)).exp();
            e_ens = e_ens.max((super::exp_neg_square(a) as f64 - want).abs() / want);
            a += 0.000_31 * (1.0 + a);
        }
        assert!(e_ens <= 3.5e-7, "exp(-a^2) relative error {e_ens:e}");
        assert_eq!(super::exp_neg_square(9.5), 0.0);
        assert!(e_sig <= 1e-7, "sigmoid absolute error {e_sig:e}");
        assert!(super::exp(f32::NAN).is_nan() && super::sigmoid(f32::NAN).is_nan());
        assert_eq!(super::sigmoid(100.0), 1.0);
        assert_eq!(super::sigmoid(-100.0), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
        let row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let want: f64 = row.iter().map(|&z| ((z - 1.5) as f64).exp()).sum();
        let got = super::sum_exp(&row, 1.5) as f64;
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    }

    /// The AVX2 softmax loops equal the portable ones bit for bit (values and sums), on rows of
    /// every length mod 8 with ordinary, huge, tiny, infinite and NaN entries.
    #[test]
    fn vector_softmax_loops_equal_the_portable_ones() {
        let mut rng = crate::rng::Rng::new(5);
        let special = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            88.5,
            -90.0,
            0.0,
        ];
        for len in 0..70 {
            for shift in [0.0f32, 3.5, -2.25] {
                let row: Vec<f32> = (0..len)
                    .map(|i| {
                        if i % 11 == 7 {
                            special[(i / 11) % special.len()]
                        } else {
                            (rng.normal() * 20.0) as f32
                        }
                    })
                    .collect();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let same =
                    |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
                assert!(same(
                    super::sum_exp(&row, shift),
                    super::sum_exp_portable(&row, shift)
                ));
                let (mut a, mut b) = (row.clone(), row.clone());
                let (sa, sb) = (
                    super::exp_in_place_sum(&mut a, shift),
                    super::exp_in_place_sum_portable(&mut b, shift),
                );
                assert!(same(sa, sb), "len {len}: {sa} vs {sb}");
                let nan_eq = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| same(*p, *q));
                assert!(
                    nan_eq(&a, &b),
                    "len {len}: {:?} vs {:?}",
                    bits(&a),
                    bits(&b)
                );
                let (mut a, mut b) = (row.clone(), row.clone());
                super::exp_scaled_in_place(&mut a, shift, 0.7);
                super::exp_scaled_in_place_portable(&mut b, shift, 0.7);
                assert!(nan_eq(&a, &b), "len {len}");
            }
        }
    }
}
