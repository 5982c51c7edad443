//! Batch norm (eval mode), max pooling and adaptive average pooling against their f64
//! definitions on random shapes, their backwards against central finite differences of the
//! oracles, and PyTorch's edge rules (NaN wins a max window, the first maximum takes a tie,
//! padding never wins, adaptive windows overlap).

mod common;

use common::{assert_close, assert_close_bound, f64s, fd_grad, rand_vec};
use lora_kernels::ops::pool::{self, reference, PoolDims};
use proptest::prelude::*;

fn check_batchnorm(n: usize, c: usize, p: usize, seed: u64) {
    let x = rand_vec(n * c * p, seed, 2.0);
    let mean = rand_vec(c, seed ^ 1, 1.0);
    let var: Vec<f32> = rand_vec(c, seed ^ 2, 1.0)
        .iter()
        .map(|v| v.abs() + 0.1)
        .collect();
    let (gamma, beta) = (rand_vec(c, seed ^ 3, 1.5), rand_vec(c, seed ^ 4, 1.0));
    let eps = 1e-5;
    let mut y = vec![f32::NAN; x.len()];
    pool::batchnorm_forward(&mut y, &x, &mean, &var, &gamma, &beta, (n, c, p), eps).unwrap();
    let (x64, m64, v64, g64, b64) = (f64s(&x), f64s(&mean), f64s(&var), f64s(&gamma), f64s(&beta));
    let want = reference::batchnorm(&x64, &m64, &v64, &g64, &b64, (n, c, p), eps as f64);
    assert_close("batchnorm", &y, &want, 1e-6);
    let dy = rand_vec(x.len(), seed ^ 5, 1.0);
    let dy64 = f64s(&dy);
    let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.5; c], vec![-0.5; c]);
    pool::batchnorm_backward(
        Some(&mut dx),
        Some(&mut dg),
        Some(&mut db),
        &dy,
        &x,
        &mean,
        &var,
        &gamma,
        (n, c, p),
        eps,
    )
    .unwrap();
    let f = |xv: &[f64], gv: &[f64], bv: &[f64]| {
        reference::batchnorm(xv, &m64, &v64, gv, bv, (n, c, p), eps as f64)
    };
    let fdx = fd_grad(&x64, &dy64, |v| f(v, &g64, &b64));
    let fdg: Vec<f64> = fd_grad(&g64, &dy64, |v| f(&x64, v, &b64))
        .iter()
        .map(|v| v + 0.5)
        .collect();
    let fdb: Vec<f64> = fd_grad(&b64, &dy64, |v| f(&x64, &g64, v))
        .iter()
        .map(|v| v - 0.5)
        .collect();
    assert_close("batchnorm dx", &dx, &fdx, 1e-5);
    // Sums over n * p terms: bounded by the sums of |terms| (about |dy| (|x| + |mean|) rstd).
    let bound: Vec<f64> = (0..c).map(|_| (n * p) as f64 * 10.0).collect();
    assert_close_bound("batchnorm dgamma", &dg, &fdg, &bound, 1e-6);
    assert_close_bound("batchnorm dbeta", &db, &fdb, &bound, 1e-6);
}

fn check_max_pool(d: PoolDims, seed: u64) {
    let x = rand_vec(d.planes * d.h * d.w, seed, 1.0);
    let (oh, ow) = d.check().unwrap();
    let mut y = vec![f32::NAN; d.planes * oh * ow];
    pool::max_pool2d_forward(&mut y, &x, d).unwrap();
    let x64 = f64s(&x);
    assert_close("max_pool2d", &y, &reference::max_pool2d(&x64, &d), 0.0);
    let dy = rand_vec(y.len(), seed ^ 1, 1.0);
    let mut dx = vec![0.0; x.len()];
    pool::max_pool2d_backward(&mut dx, &dy, &x, d).unwrap();
    let dy64 = f64s(&dy);
    let (want, gap) = reference::max_pool2d_backward(&dy64, &x64, &d);
    assert_close("max_pool2d dx", &dx, &want, 1e-6);
    // The definition against finite differences where every window's maximum is clear of its
    // runner-up by more than the step (a near-tie is a kink the differences straddle).
    if gap > 1e-3 {
        let fd = fd_grad(&x64, &dy64, |v| reference::max_pool2d(v, &d));
        let f32s: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert_close("max_pool2d dx oracle", &f32s, &fd, 1e-5);
    }
}

fn check_adaptive(planes: usize, hw: (usize, usize), o: (usize, usize), seed: u64) {
    let x = rand_vec(planes * hw.0 * hw.1, seed, 1.0);
    let mut y = vec![f32::NAN; planes * o.0 * o.1];
    pool::adaptive_avg_pool2d_forward(&mut y, &x, planes, hw, o).unwrap();
    let x64 = f64s(&x);
    // A mean of up to 64 terms that may cancel: the f32 error is bounded by about (terms) *
    // 2^-24 of the mean of |x| over the window, not of the (possibly tiny) result.
    let abs: Vec<f64> = x64.iter().map(|v| v.abs()).collect();
    let bound = reference::adaptive_avg_pool2d(&abs, planes, hw, o);
    let want = reference::adaptive_avg_pool2d(&x64, planes, hw, o);
    assert_close_bound("adaptive_avg_pool2d", &y, &want, &bound, 1e-5);
    let dy = rand_vec(y.len(), seed ^ 1, 1.0);
    let mut dx = vec![0.0; x.len()];
    pool::adaptive_avg_pool2d_backward(&mut dx, &dy, planes, hw, o).unwrap();
    let fd = fd_grad(&x64, &f64s(&dy), |v| {
        reference::adaptive_avg_pool2d(v, planes, hw, o)
    });
    assert_close("adaptive_avg_pool2d dx", &dx, &fd, 1e-5);
}

#[test]
fn edge_rules() {
    // ResNet's stem pool: 3x3, stride 2, padding 1; a global average; overlapping windows.
    check_max_pool(
        PoolDims {
            planes: 3,
            h: 7,
            w: 8,
            kernel: (3, 3),
            stride: (2, 2),
            padding: (1, 1),
        },
        1,
    );
    check_adaptive(4, (7, 7), (1, 1), 2);
    check_adaptive(2, (5, 7), (3, 4), 3);
    check_batchnorm(1, 1, 1, 4);
    // NaN wins; the first of equal maxima takes the gradient; padding never wins.
    let d = PoolDims {
        planes: 1,
        h: 2,
        w: 3,
        kernel: (2, 2),
        stride: (1, 1),
        padding: (0, 0),
    };
    let x = [1.0, 5.0, 5.0, f32::NAN, 0.0, 2.0];
    let mut y = [0.0f32; 2];
    pool::max_pool2d_forward(&mut y, &x, d).unwrap();
    assert!(y[0].is_nan());
    assert_eq!(y[1], 5.0);
    let mut dx = [0.0f32; 6];
    pool::max_pool2d_backward(&mut dx, &[1.0, 10.0], &x, d).unwrap();
    assert_eq!(dx, [0.0, 10.0, 0.0, 1.0, 0.0, 0.0]);
    let d = PoolDims {
        planes: 1,
        h: 1,
        w: 2,
        kernel: (1, 2),
        stride: (1, 1),
        padding: (0, 1),
    };
    let mut y = [0.0f32; 3];
    pool::max_pool2d_forward(&mut y, &[-3.0, -4.0], d).unwrap();
    assert_eq!(
        y,
        [-3.0, -3.0, -4.0],
        "all-negative windows: the padding must not win"
    );
    // Bad windows are named errors.
    let bad = PoolDims {
        planes: 1,
        h: 4,
        w: 4,
        kernel: (2, 2),
        stride: (1, 1),
        padding: (2, 0),
    };
    assert!(bad.check().unwrap_err().to_string().contains("padding"));
    let e =
        pool::adaptive_avg_pool2d_forward(&mut [0.0], &[0.0; 4], 1, (2, 2), (0, 1)).unwrap_err();
    assert!(e.to_string().contains("output_size"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn batchnorm_matches_the_definition(n in 1usize..3, c in 1usize..5, p in 1usize..40, seed in any::<u64>()) {
        check_batchnorm(n, c, p, seed);
    }

    #[test]
    fn max_pooling_matches_the_definition(
        planes in 1usize..4, h in 1usize..9, w in 1usize..9, kh in 1usize..4, kw in 1usize..4,
        sh in 1usize..4, sw in 1usize..4, ph in 0usize..2, pw in 0usize..2, seed in any::<u64>(),
    ) {
        let d = PoolDims { planes, h, w, kernel: (kh, kw), stride: (sh, sw), padding: (ph, pw) };
        prop_assume!(d.check().is_ok());
        check_max_pool(d, seed);
    }

    #[test]
    fn adaptive_average_pooling_matches_the_definition(
        planes in 1usize..4, h in 1usize..9, w in 1usize..9, oh in 1usize..5, ow in 1usize..5,
        seed in any::<u64>(),
    ) {
        check_adaptive(planes, (h, w), (oh, ow), seed);
    }
}

/// Zero-sized and absurd windows are named errors, never a panic (or, on CUDA, a read before
/// the plane).
#[test]
fn degenerate_windows_are_errors() {
    let d = PoolDims {
        planes: 1,
        h: 0,
        w: 0,
        kernel: (2, 2),
        stride: (1, 1),
        padding: (1, 1),
    };
    assert!(d
        .check()
        .unwrap_err()
        .to_string()
        .contains("nothing to pool"));
    let d = PoolDims {
        planes: 1,
        h: 3,
        w: 3,
        kernel: (2, usize::MAX),
        stride: (1, 1),
        padding: (1, usize::MAX / 2),
    };
    assert!(d.check().is_err());
}
