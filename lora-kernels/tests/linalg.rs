//! QR and Jacobi SVD (`lora_kernels::linalg`) on random shapes, rank-deficient and zero
//! matrices included: each factorisation reconstructs its input and its factors have the
//! promised structure (orthonormal or zero columns, triangular `R`, sorted singular values).

use lora_kernels::linalg::{jacobi_svd, qr};
use lora_kernels::rng::Rng;
use proptest::prelude::*;

fn random(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect()
}

/// `a` (`n x k`) times `b` (`k x m`), row-major.
fn mul(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * m];
    for i in 0..n {
        for t in 0..k {
            for j in 0..m {
                c[i * m + j] += a[i * k + t] * b[t * m + j];
            }
        }
    }
    c
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

fn close(got: &[f64], want: &[f64], tol: f64) -> std::result::Result<(), TestCaseError> {
    let scale = max_abs(want).max(1.0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        prop_assert!((g - w).abs() <= tol * scale, "[{i}] {g} vs {w}");
    }
    Ok(())
}

/// Columns of `q` (`n x k`) are orthonormal, or zero.
fn orthonormal_or_zero(q: &[f64], n: usize, k: usize) -> std::result::Result<(), TestCaseError> {
    for i in 0..k {
        for j in 0..k {
            let d: f64 = (0..n).map(|t| q[t * k + i] * q[t * k + j]).sum();
            let ni: f64 = (0..n).map(|t| q[t * k + i].powi(2)).sum();
            let want = if i == j && ni > 0.5 { 1.0 } else { 0.0 };
            prop_assert!((d - want).abs() < 1e-10, "q[{i}].q[{j}] = {d}");
        }
    }
    Ok(())
}

/// A random `n x k` matrix; with `dup`, its last column repeats its first (rank-deficient).
fn matrix(seed: u64, n: usize, k: usize, dup: bool) -> Vec<f64> {
    let mut x = random(&mut Rng::new(seed), n * k);
    if dup && k > 1 {
        for t in 0..n {
            x[t * k + k - 1] = x[t * k];
        }
    }
    x
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn qr_reconstructs_with_orthonormal_q_and_triangular_r(
        n in 1usize..24, k in 1usize..12, seed in 0u64..1000, dup in any::<bool>()
    ) {
        let x = matrix(seed, n, k, dup);
        let (q, r) = qr(&x, n, k);
        close(&mul(&q, &r, n, k, k), &x, 1e-10)?;
        orthonormal_or_zero(&q, n, k)?;
        for i in 0..k {
            for j in 0..i {
                prop_assert_eq!(r[i * k + j], 0.0);
            }
            prop_assert!(r[i * k + i] >= 0.0);
        }
    }

    #[test]
    fn svd_reconstructs_with_sorted_values_and_orthogonal_factors(
        k in 1usize..16, seed in 0u64..1000, dup in any::<bool>()
    ) {
        let m = matrix(seed, k, k, dup);
        let (u, s, v) = jacobi_svd(&m, k);
        // U diag(s) V^T
        let mut us = u.clone();
        for t in 0..k {
            for c in 0..k {
                us[t * k + c] *= s[c];
            }
        }
        let mut vt = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..k {
                vt[j * k + i] = v[i * k + j];
            }
        }
        close(&mul(&us, &vt, k, k, k), &m, 1e-10)?;
        prop_assert!(s.windows(2).all(|w| w[0] >= w[1]) && s.iter().all(|&x| x >= 0.0), "{s:?}");
        orthonormal_or_zero(&v, k, k)?;
        orthonormal_or_zero(&u, k, k)?;
        if dup && k > 1 {
            prop_assert!(s[k - 1] < 1e-10 * s[0].max(1.0), "rank-deficient: {s:?}");
        }
    }
}

#[test]
fn zero_and_rank_one_matrices() {
    let (q, r) = qr(&[0.0; 6], 3, 2);
    assert!(q.iter().chain(&r).all(|&x| x == 0.0));
    let (u, s, v) = jacobi_svd(&[0.0; 4], 2);
    assert_eq!(s, vec![0.0, 0.0]);
    assert!(u.iter().all(|&x| x == 0.0));
    // V stays the identity for a zero matrix.
    assert_eq!(v, vec![1.0, 0.0, 0.0, 1.0]);
    // 1 x 1: the singular value is |m|, the sign goes to U.
    let (u, s, v) = jacobi_svd(&[-3.0], 1);
    assert_eq!((u[0], s[0], v[0]), (-1.0, 3.0, 1.0));
    // An outer product has one nonzero singular value: |a| |b|.
    let (a, b) = ([1.0, 2.0, 2.0], [3.0, 4.0, 0.0]);
    let m: Vec<f64> = (0..9).map(|i| a[i / 3] * b[i % 3]).collect();
    let (_, s, _) = jacobi_svd(&m, 3);
    assert!(
        (s[0] - 15.0).abs() < 1e-12 && s[1].abs() < 1e-12 && s[2].abs() < 1e-12,
        "{s:?}"
    );
}
