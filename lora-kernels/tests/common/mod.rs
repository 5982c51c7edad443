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
