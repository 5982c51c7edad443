//! Small dense linear algebra in `f64` for the adapter tools: a QR factorisation (modified
//! Gram-Schmidt, twice) and a one-sided Jacobi SVD of a small square matrix. `lora combine --how
//! svd` uses them to reduce a sum of low-rank products, `B A` summed over adapters, to rank `r`
//! without forming the `out x in` delta: QR of the stacked factors, SVD of the `k x k` core.
//! Both are exact to rounding (no randomised sketch), which is what those matrices (k = sum of
//! ranks, rarely above a few hundred) afford.

/// Modified Gram-Schmidt (twice, for orthogonality) of the columns of `x` (`n x k`, row-major):
/// returns `Q` (`n x k`, orthonormal or zero columns) and upper-triangular `R` (`k x k`).
pub fn qr(x: &[f64], n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut q = x.to_vec();
    let mut r = vec![0.0; k * k];
    let scale = x
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    for j in 0..k {
        for _ in 0..2 {
            for i in 0..j {
                let d: f64 = (0..n).map(|t| q[t * k + i] * q[t * k + j]).sum();
                r[i * k + j] += d;
                for t in 0..n {
                    q[t * k + j] -= d * q[t * k + i];
                }
            }
        }
        let nrm = (0..n).map(|t| q[t * k + j].powi(2)).sum::<f64>().sqrt();
        if nrm > 1e-13 * scale {
            r[j * k + j] = nrm;
            (0..n).for_each(|t| q[t * k + j] /= nrm);
        } else {
            (0..n).for_each(|t| q[t * k + j] = 0.0);
        }
    }
    (q, r)
}

/// One-sided Jacobi SVD of a square `k x k` matrix: returns `(U, s, V)` with `M = U diag(s) V^T`,
/// singular values sorted descending.
pub fn jacobi_svd(m: &[f64], k: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = vec![0.0; k * k];
    (0..k).for_each(|i| v[i * k + i] = 1.0);
    for _sweep in 0..60 {
        let mut off = 0.0f64;
        for p in 0..k {
            for q in p + 1..k {
                let (mut al, mut be, mut ga) = (0.0, 0.0, 0.0);
                for t in 0..k {
                    al += a[t * k + p] * a[t * k + p];
                    be += a[t * k + q] * a[t * k + q];
                    ga += a[t * k + p] * a[t * k + q];
                }
                if ga.abs() <= 1e-15 * (al * be).sqrt() || ga == 0.0 {
                    continue;
                }
                off = off.max(ga.abs() / (al * be).sqrt());
                let zeta = (be - al) / (2.0 * ga);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for row in 0..k {
                    let (x, y) = (a[row * k + p], a[row * k + q]);
                    a[row * k + p] = c * x - s * y;
                    a[row * k + q] = s * x + c * y;
                    let (x, y) = (v[row * k + p], v[row * k + q]);
                    v[row * k + p] = c * x - s * y;
                    v[row * k + q] = s * x + c * y;
                }
            }
        }
        if off < 1e-14 {
            break;
        }
    }
    let sig: Vec<f64> = (0..k)
        .map(|j| (0..k).map(|t| a[t * k + j].powi(2)).sum::<f64>().sqrt())
        .collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&x, &y| sig[y].total_cmp(&sig[x]));
    let mut u = vec![0.0; k * k];
    let mut vs = vec![0.0; k * k];
    let mut s = vec![0.0; k];
    for (nj, &j) in order.iter().enumerate() {
        s[nj] = sig[j];
        for t in 0..k {
            u[t * k + nj] = if sig[j] > 0.0 {
                a[t * k + j] / sig[j]
            } else {
                0.0
            };
            vs[t * k + nj] = v[t * k + j];
        }
    }
    (u, s, vs)
}
