//! Test helpers: seeded data, f32/f64 conversion, error metrics and central finite differences.
#![allow(dead_code)]

use lora_kernels::rng::Rng;

/// Seeded uniform values in `[-scale, scale)`.
pub fn rand_vec(len: usize, seed: u64, scale: f64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..len)
        .map(|_| r.uniform_range(-scale, scale) as f32)
        .collect()
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `max |got - want| / max(max |want|, floor)`: error relative to the tensor's scale.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs()))
        / scale
}

pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}

/// [`fd_grad`] for an element-wise `f` (`f(x)_i` depends on `x_i` alone, given as `f(i, x_i)`):
/// the same central differences, one element at a time, so `O(n)` evaluations instead of the
/// `O(n^2)` of perturbing `x_i` and re-evaluating the whole vector (and without the rounding of
/// the other `n - 1` unchanged terms in each difference).
pub fn fd_grad_elementwise(x: &[f64], w: &[f64], f: impl Fn(usize, f64) -> f64) -> Vec<f64> {
    assert_eq!(x.len(), w.len(), "length mismatch");
    let h = 1e-5;
    x.iter()
        .zip(w)
        .enumerate()
        .map(|(i, (&t, &wi))| (f(i, t + h) * wi - f(i, t - h) * wi) / (2.0 * h))
        .collect()
}

/// Gradient of `L(x) = sum_i f(x)_i * w_i` with respect to `x`, by central differences in f64.
pub fn fd_grad(x: &[f64], w: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let h = 1e-5;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let lp: f64 = f(&xp).iter().zip(w).map(|(a, b)| a * b).sum();
            xp[i] = orig - h;
            let lm: f64 = f(&xp).iter().zip(w).map(|(a, b)| a * b).sum();
            xp[i] = orig;
            (lp - lm) / (2.0 * h)
        })
        .collect()
}

/// `max |got - want| / scale <= tol` for results that are differences of larger terms (the norm
/// backwards): `scale` is the magnitude of those terms, so cancellation does not inflate the
/// bound's meaning the way dividing by a tiny `max |want|` would.
pub fn assert_close_scaled(what: &str, got: &[f32], want: &[f64], scale: f64, tol: f64) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let e = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs()))
        / scale.max(1e-12);
    assert!(
        e <= tol,
        "{what}: error {e:.3e} (relative to term scale {scale:.3e}) > {tol:.1e}"
    );
}

/// Like [`assert_close`], but the error is relative to `bound`'s largest element: for a sum of
/// products, pass the same computation on absolute values (`sum |a_i b_i|`), the scale that f32
/// rounding error is proportional to. A plain relative error is meaningless where the sum
/// cancels to near zero (e.g. one output of a 61-term dot product).
pub fn assert_close_bound(what: &str, got: &[f32], want: &[f64], bound: &[f64], tol: f64) {
    let scale = bound.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    assert_close_scaled(what, got, want, scale, tol);
}

/// Whether a CUDA device answers, for the GPU tests: without one they print that they were
/// skipped and pass, unless `LORA_REQUIRE_GPU` is set (`scripts/gpu-check.sh` sets it), which
/// turns the skip into a failure so a GPU run cannot pass by not running.
#[cfg(feature = "cuda")]
pub fn gpu_present() -> bool {
    if lora_kernels::cuda::device_count() > 0 {
        return true;
    }
    assert!(
        std::env::var_os("LORA_REQUIRE_GPU").is_none(),
        "LORA_REQUIRE_GPU is set but no CUDA device answers"
    );
    println!("SKIPPED: no CUDA device answers on this machine");
    false
}

/// For an element-wise function `f`: each `got[i]` must lie within `tol * scale` of `f`
/// evaluated somewhere within 8 ulp of `x[i]` (`scale = max(max |f(x)|, 1e-3)`, as
/// [`assert_close`]). This is what an f32 evaluation can promise where `f` is ill-conditioned —
/// the steep negative tail of GELU (the rounding of its exponent's argument is amplified ~10x
/// there), a derivative's zero crossing (a difference of two ~0.2 terms) — and where a bound
/// relative to a tiny `max |f|` could not be met by any f32 implementation: drawn with a single
/// value there, `elementwise_ops` failed for GELU (1.3e-6 > 1e-6 at x = -3.37) and could for
/// GELU' and SiLU' (6.5e-5 and 2.4e-5 > 1e-5 near x = -0.75 and -1.28). Away from those spots
/// the input perturbation adds almost nothing and the bound is [`assert_close`]'s.
pub fn assert_close_stable(what: &str, got: &[f32], x: &[f32], f: impl Fn(f64) -> f64, tol: f64) {
    assert_eq!(got.len(), x.len(), "length mismatch");
    let want: Vec<f64> = x.iter().map(|&v| f(v as f64)).collect();
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    let delta = 8.0 * f32::EPSILON as f64;
    for (i, (&g, &xi)) in got.iter().zip(x).enumerate() {
        let xi = xi as f64;
        let vals: Vec<f64> = [-1.0, -0.5, 0.0, 0.5, 1.0]
            .iter()
            .map(|t| f(xi + t * delta * xi.abs()))
            .collect();
        let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min) - tol * scale;
        let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max) + tol * scale;
        assert!(
            (lo..=hi).contains(&(g as f64)),
            "{what}: element {i} (x = {xi}): {g} outside [{lo}, {hi}] (f(x) = {})",
            want[i]
        );
    }
}

/// [`rel_err`] for two f64 vectors (an oracle against finite differences).
pub fn assert_close_f64(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    let e = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()))
        / scale;
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}
