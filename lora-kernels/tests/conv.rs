//! 2-D convolution: the im2col + GEMM kernel against the f64 definition on random shapes (odd
//! sizes, strides, padding, dilation, groups up to depthwise, one image, one output pixel), its
//! backward against the oracle's and against central finite differences of the oracle's forward,
//! accumulation into non-zero gradients, threading, and bad hyper-parameters as named errors.

mod common;

use common::{assert_close_bound, f64s, fd_grad, rand_vec};
use lora_kernels::ops::conv::{
    conv2d_backward, conv2d_forward, conv2d_pair_forward, reference, Conv2dDims, Conv2dGrads,
};
use proptest::prelude::*;

/// Error bound relative to the scale of the summed terms (see `check`).
const TOL: f64 = 1e-5;

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

/// Forward, backward (into gradients that already hold values) and finite differences for `d`.
fn check(d: Conv2dDims, seed: u64) {
    let (x, w) = (
        rand_vec(d.x_len(), seed, 1.0),
        rand_vec(d.w_len(), seed ^ 1, 1.0),
    );
    let bias = rand_vec(d.out_ch, seed ^ 2, 1.0);
    let (x64, w64, b64) = (f64s(&x), f64s(&w), f64s(&bias));
    let mut y = vec![f32::NAN; d.y_len()];
    conv2d_forward(&mut y, &x, &w, Some(&bias), d).unwrap();
    let want = reference::forward(&x64, &w64, Some(&b64), &d);
    // f32 rounding is proportional to the sum of |terms|: the same convolution of |x|, |w|.
    // The bound for a sum of m terms is about m * 2^-24 of it; the reductions here have up to
    // 27 terms (y, dx) and 128 (dw: images x pixels), so 1e-5 of the terms' scale.
    let bound = reference::forward(&abs(&x64), &abs(&w64), Some(&abs(&b64)), &d);
    assert_close_bound("y", &y, &want, &bound, TOL);

    let dy = rand_vec(d.y_len(), seed ^ 3, 1.0);
    let dy64 = f64s(&dy);
    let (dx0, dw0, db0) = (
        rand_vec(d.x_len(), seed ^ 4, 1.0),
        rand_vec(d.w_len(), seed ^ 5, 1.0),
        rand_vec(d.out_ch, seed ^ 6, 1.0),
    );
    let (mut dx, mut dw, mut db) = (dx0.clone(), dw0.clone(), db0.clone());
    let g = Conv2dGrads {
        dx: Some(&mut dx),
        dw: Some(&mut dw),
        dbias: Some(&mut db),
    };
    conv2d_backward(g, &dy, &x, &w, d).unwrap();
    let (rdx, rdw, rdb) = reference::backward(&dy64, &x64, &w64, &d);
    let (bdx, bdw, bdb) = reference::backward(&abs(&dy64), &abs(&x64), &abs(&w64), &d);
    let plus = |base: &[f32], v: &[f64]| -> Vec<f64> {
        base.iter().zip(v).map(|(a, b)| *a as f64 + b).collect()
    };
    let bump = |b: &[f64], base: &[f32]| -> Vec<f64> {
        b.iter()
            .zip(base)
            .map(|(a, c)| a + (*c as f64).abs())
            .collect()
    };
    assert_close_bound("dx", &dx, &plus(&dx0, &rdx), &bump(&bdx, &dx0), TOL);
    assert_close_bound("dw", &dw, &plus(&dw0, &rdw), &bump(&bdw, &dw0), TOL);
    assert_close_bound("dbias", &db, &plus(&db0, &rdb), &bump(&bdb, &db0), TOL);

    // The oracle's gradients against central differences of its forward.
    let fdx = fd_grad(&x64, &dy64, |xv| {
        reference::forward(xv, &w64, Some(&b64), &d)
    });
    let fdw = fd_grad(&w64, &dy64, |wv| {
        reference::forward(&x64, wv, Some(&b64), &d)
    });
    let fdb = fd_grad(&b64, &dy64, |bv| {
        reference::forward(&x64, &w64, Some(bv), &d)
    });
    for (what, fd, r) in [
        ("dx", &fdx, &rdx),
        ("dw", &fdw, &rdw),
        ("dbias", &fdb, &rdb),
    ] {
        let e = fd
            .iter()
            .zip(r.iter())
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(e <= 1e-6, "{what}: oracle vs finite differences {e:.2e}");
    }

    // Only the gradients asked for; x may be absent when dw is not asked for.
    let mut dx2 = vec![0.0; d.x_len()];
    let g = Conv2dGrads {
        dx: Some(&mut dx2),
        ..Default::default()
    };
    conv2d_backward(g, &dy, &[], &w, d).unwrap();
    assert_close_bound("dx alone", &dx2, &rdx, &bdx, TOL);
}

fn dims(n: usize, c: usize, hw: (usize, usize), o: usize, k: (usize, usize)) -> Conv2dDims {
    Conv2dDims {
        batch: n,
        in_ch: c,
        h: hw.0,
        w: hw.1,
        out_ch: o,
        kh: k.0,
        kw: k.1,
        stride: (1, 1),
        padding: (0, 0),
        dilation: (1, 1),
        groups: 1,
    }
}

#[test]
fn edge_shapes() {
    // A 1x1 convolution (a per-pixel linear layer), one image.
    check(dims(1, 3, (4, 5), 2, (1, 1)), 1);
    // A grouped 1x1 convolution (a conv LoRA's B with the base's groups): read in place.
    let mut d = dims(2, 6, (3, 4), 4, (1, 1));
    d.groups = 2;
    check(d, 6);
    // One output pixel: the kernel covers the whole image.
    check(dims(2, 2, (3, 3), 3, (3, 3)), 2);
    // Depthwise with stride 2 and padding (ResNet / MobileNet style).
    let mut d = dims(2, 4, (7, 6), 4, (3, 3));
    d.groups = 4;
    d.stride = (2, 2);
    d.padding = (1, 1);
    check(d, 3);
    // ViT's patch embedding: stride = kernel.
    let mut d = dims(1, 3, (8, 8), 5, (4, 4));
    d.stride = (4, 4);
    check(d, 4);
    // Dilation with asymmetric everything; padding wider than the kernel reach.
    let mut d = dims(3, 6, (5, 9), 4, (2, 3));
    d.groups = 2;
    d.stride = (1, 3);
    d.padding = (2, 3);
    d.dilation = (2, 1);
    check(d, 5);
}

/// Many images run in parallel with single-threaded products; the result equals one thread's.
#[test]
fn images_in_parallel_equal_one_thread() {
    let mut d = dims(6, 4, (9, 7), 6, (3, 3));
    d.padding = (1, 1);
    d.groups = 2;
    let (x, w) = (rand_vec(d.x_len(), 9, 1.0), rand_vec(d.w_len(), 10, 1.0));
    let dy = rand_vec(d.y_len(), 11, 1.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut y = vec![0.0; d.y_len()];
            conv2d_forward(&mut y, &x, &w, None, d).unwrap();
            let (mut dx, mut dw, mut db) =
                (vec![0.0; d.x_len()], vec![0.0; d.w_len()], vec![0.0; 6]);
            let g = Conv2dGrads {
                dx: Some(&mut dx),
                dw: Some(&mut dw),
                dbias: Some(&mut db),
            };
            conv2d_backward(g, &dy, &x, &w, d).unwrap();
            (y, dx, dw, db)
        })
    };
    assert_eq!(run(1), run(4));
}

/// The pair (a conv LoRA's base and A from one im2col per image) gives exactly the two
/// convolutions' values, on one thread and in parallel; grouped convolutions are refused.
#[test]
fn pair_forward_equals_two_convolutions() {
    let mut shapes = vec![];
    let mut d = dims(5, 6, (9, 7), 8, (3, 3));
    d.padding = (1, 1);
    shapes.push(d);
    let mut d = dims(3, 4, (8, 9), 5, (3, 2));
    d.stride = (2, 1);
    d.padding = (0, 1);
    shapes.push(d);
    shapes.push(dims(4, 6, (5, 5), 3, (1, 1)));
    shapes.push(dims(1, 2, (3, 3), 2, (3, 3)));
    for (i, d) in shapes.into_iter().enumerate() {
        let r = 3;
        let da = Conv2dDims { out_ch: r, ..d };
        let seed = 20 + 4 * i as u64;
        let (x, w, a) = (
            rand_vec(d.x_len(), seed, 1.0),
            rand_vec(d.w_len(), seed + 1, 1.0),
            rand_vec(da.w_len(), seed + 2, 1.0),
        );
        let bias = rand_vec(d.out_ch, seed + 3, 1.0);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (mut y, mut h) = (vec![f32::NAN; d.y_len()], vec![f32::NAN; da.y_len()]);
                conv2d_pair_forward(&mut y, &mut h, &x, &w, &a, Some(&bias), d).unwrap();
                let (mut y2, mut h2) = (vec![0.0; d.y_len()], vec![0.0; da.y_len()]);
                conv2d_forward(&mut y2, &x, &w, Some(&bias), d).unwrap();
                conv2d_forward(&mut h2, &x, &a, None, da).unwrap();
                assert_eq!(y, y2, "shape {i}, {threads} threads: y");
                assert_eq!(h, h2, "shape {i}, {threads} threads: h");
            });
        }
    }
    let mut d = dims(1, 4, (5, 5), 4, (3, 3));
    d.groups = 2;
    let da = Conv2dDims {
        out_ch: 2,
        groups: 1,
        ..d
    };
    let (mut y, mut h) = (vec![0.0; d.y_len()], vec![0.0; da.y_len()]);
    let e = conv2d_pair_forward(
        &mut y,
        &mut h,
        &vec![0.0; d.x_len()],
        &vec![0.0; d.w_len()],
        &vec![0.0; 2 * 36],
        None,
        d,
    )
    .unwrap_err();
    assert!(e.to_string().contains("groups"), "{e}");
}

#[test]
fn bad_dims_are_named_errors() {
    let base = dims(1, 4, (5, 5), 6, (3, 3));
    let err = |d: Conv2dDims| d.check().unwrap_err().to_string();
    let mut d = base;
    d.groups = 3;
    assert!(
        err(d).contains("3 groups do not divide 4 input and 6 output channels"),
        "{}",
        err(d)
    );
    let mut d = base;
    d.kh = 7;
    assert!(
        err(d).contains("kh") && err(d).contains("larger than the padded input"),
        "{}",
        err(d)
    );
    let mut d = base;
    d.stride = (0, 1);
    assert!(err(d).contains("stride"), "{}", err(d));
    let mut d = base;
    d.batch = usize::MAX / 2;
    assert!(err(d).contains("do not fit in memory"), "{}", err(d));
    // Buffers of the wrong length: named, never a panic.
    let mut y = vec![0.0; base.y_len()];
    let e = conv2d_forward(&mut y, &[0.0; 3], &vec![0.0; base.w_len()], None, base).unwrap_err();
    assert!(e.to_string().contains("x"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_convolutions_match_the_definition(
        n in 1usize..3, cg in 1usize..4, og in 1usize..4, groups in 1usize..4,
        h in 1usize..9, w in 1usize..9, kh in 1usize..4, kw in 1usize..4,
        sh in 1usize..4, sw in 1usize..4, ph in 0usize..3, pw in 0usize..3,
        dh in 1usize..3, dw in 1usize..3, seed in any::<u64>(),
    ) {
        let d = Conv2dDims {
            batch: n, in_ch: cg * groups, h, w, out_ch: og * groups, kh, kw,
            stride: (sh, sw), padding: (ph, pw), dilation: (dh, dw), groups,
        };
        prop_assume!(d.check().is_ok());
        check(d, seed);
    }
}
