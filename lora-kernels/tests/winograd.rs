//! Winograd F(4x4, 3x3) convolutions against the f64 definition: the kernel itself on random
//! small shapes (sizes that are not multiples of the 4x4 tile, one pixel, paddings 0-2, several
//! images, accumulation, the transposed kernels that compute `dx`), the routing of
//! `conv2d_forward` / `conv2d_backward` through it at a shape where it pays (proved by the GEMM
//! trace: 36 products reducing over the channels instead of one over 9 x channels), and the same
//! bits on any number of threads.

mod common;

use common::{assert_close_bound, f64s, rand_vec};
use lora_kernels::gemm::{trace_start, trace_take};
use lora_kernels::ops::conv::{
    conv2d_backward, conv2d_forward, conv2d_forward_by, reference, Conv2dDims, Conv2dGrads,
    ConvAlgo,
};
use lora_kernels::ops::winograd::{conv3x3, worth_it, Kernels};
use proptest::prelude::*;
use std::sync::{Mutex, MutexGuard};

/// Error bound relative to the scale of the summed terms (the same convolution of |x| and |w|):
/// im2col's bound (`tests/conv.rs`). Winograd's transforms scale intermediate values by up to
/// 10 x 10 (input) and 18 x 18 (output) around the products' rounding, so its f32 error is larger
/// than im2col's by a constant factor, but on these shapes it stays within the same bound: about
/// 1e-6 of the terms' scale on SD-like magnitudes (printed by `winograd_error_is_reported`).
const TOL: f64 = 1e-5;

/// The GEMM trace is process-wide: the tests of this file run one at a time so that the routing
/// test records only its own products.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

fn dims(n: usize, c: usize, (h, w): (usize, usize), o: usize, pad: (usize, usize)) -> Conv2dDims {
    Conv2dDims {
        batch: n,
        in_ch: c,
        h,
        w,
        out_ch: o,
        kh: 3,
        kw: 3,
        stride: (1, 1),
        padding: pad,
        dilation: (1, 1),
        groups: 1,
    }
}

/// The largest error of the kernel on `d` relative to the terms' scale: forward with a bias
/// (overwriting NaN), forward accumulated onto values, and `dx` through the transposed kernels.
fn errors(d: Conv2dDims, seed: u64) -> [f64; 3] {
    let (x, w) = (
        rand_vec(d.x_len(), seed, 1.0),
        rand_vec(d.w_len(), seed ^ 1, 1.0),
    );
    let bias = rand_vec(d.out_ch, seed ^ 2, 1.0);
    let (x64, w64, b64) = (f64s(&x), f64s(&w), f64s(&bias));
    let shape = (d.batch, d.in_ch, d.h, d.w);
    let mut y = vec![f32::NAN; d.y_len()];
    conv3x3(
        &mut y,
        false,
        &x,
        Kernels::Forward(&w),
        Some(&bias),
        shape,
        d.out_ch,
        d.padding,
    )
    .unwrap();
    let want = reference::forward(&x64, &w64, Some(&b64), &d);
    let bound = reference::forward(&abs(&x64), &abs(&w64), Some(&abs(&b64)), &d);
    let e_y = err(&y, &want, &bound);

    let y0 = rand_vec(d.y_len(), seed ^ 3, 1.0);
    let mut ya = y0.clone();
    conv3x3(
        &mut ya,
        true,
        &x,
        Kernels::Forward(&w),
        None,
        shape,
        d.out_ch,
        d.padding,
    )
    .unwrap();
    let plain = reference::forward(&x64, &w64, None, &d);
    let plain_b = reference::forward(&abs(&x64), &abs(&w64), None, &d);
    let want_a: Vec<f64> = y0.iter().zip(&plain).map(|(a, b)| *a as f64 + b).collect();
    let bound_a: Vec<f64> = y0
        .iter()
        .zip(&plain_b)
        .map(|(a, b)| a.abs() as f64 + b)
        .collect();
    let e_acc = err(&ya, &want_a, &bound_a);

    let [_, _, oh, ow] = d.out_shape();
    let dy = rand_vec(d.y_len(), seed ^ 4, 1.0);
    let dx0 = rand_vec(d.x_len(), seed ^ 5, 1.0);
    let mut dx = dx0.clone();
    let back = (d.batch, d.out_ch, oh, ow);
    let bpad = (2 - d.padding.0, 2 - d.padding.1);
    conv3x3(
        &mut dx,
        true,
        &dy,
        Kernels::Transposed(&w),
        None,
        back,
        d.in_ch,
        bpad,
    )
    .unwrap();
    let (rdx, _, _) = reference::backward(&f64s(&dy), &x64, &w64, &d);
    let (bdx, _, _) = reference::backward(&abs(&f64s(&dy)), &abs(&x64), &abs(&w64), &d);
    let want_dx: Vec<f64> = dx0.iter().zip(&rdx).map(|(a, b)| *a as f64 + b).collect();
    let bound_dx: Vec<f64> = dx0
        .iter()
        .zip(&bdx)
        .map(|(a, b)| a.abs() as f64 + b)
        .collect();
    let e_dx = err(&dx, &want_dx, &bound_dx);
    [e_y, e_acc, e_dx]
}

/// `max |got - want| / max bound`, after checking every value is finite.
fn err(got: &[f32], want: &[f64], bound: &[f64]) -> f64 {
    assert!(got.iter().all(|v| v.is_finite()), "a value was not written");
    assert_close_bound("winograd", got, want, bound, TOL);
    let scale = bound.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs()))
        / scale
}

#[test]
fn edge_shapes_match_the_definition() {
    let _one = serial();
    // One output pixel from a 3x3 image; one pixel padded to 1x1 output; sizes one short of and
    // one past a tile; a row; wide padding; channels with a partial lane group of tiles.
    for (d, seed) in [
        (dims(1, 1, (3, 3), 1, (0, 0)), 1),
        (dims(2, 3, (1, 1), 2, (1, 1)), 2),
        (dims(1, 2, (3, 5), 3, (1, 1)), 3),
        (dims(3, 2, (5, 6), 2, (1, 1)), 4),
        (dims(1, 4, (1, 17), 5, (1, 1)), 5),
        (dims(2, 3, (2, 3), 4, (2, 2)), 6),
        (dims(1, 3, (7, 4), 2, (2, 0)), 7),
        (dims(2, 9, (9, 13), 7, (1, 1)), 8),
        // Enough input channels that the output channels run in two blocks (the transformed
        // kernels of one block are capped at 48 MB).
        (dims(1, 1100, (6, 7), 400, (1, 1)), 9),
    ] {
        errors(d, seed);
    }
}

/// The errors on SD-like magnitudes (many channels, 16x16 images), printed for the docs.
#[test]
fn winograd_error_is_reported() {
    let _one = serial();
    let d = dims(1, 96, (16, 16), 80, (1, 1));
    let [y, acc, dx] = errors(d, 42);
    println!(
        "winograd F(4x4,3x3) error / terms' scale: y {y:.2e}, accumulated {acc:.2e}, dx {dx:.2e}"
    );
}

/// At an SD-like shape the public convolution takes the Winograd route (36 products over the
/// 64 channels each, for the forward and for dx) and stays within the bound, gradients of the
/// weight and bias still by im2col.
#[test]
fn conv2d_routes_large_3x3_convolutions_through_winograd() {
    let _one = serial();
    let d = dims(1, 64, (32, 30), 72, (1, 1));
    assert!(worth_it(&d));
    let (x, w) = (rand_vec(d.x_len(), 11, 1.0), rand_vec(d.w_len(), 12, 1.0));
    let bias = rand_vec(d.out_ch, 13, 1.0);
    let (x64, w64, b64) = (f64s(&x), f64s(&w), f64s(&bias));
    let mut y = vec![f32::NAN; d.y_len()];
    trace_start();
    conv2d_forward(&mut y, &x, &w, Some(&bias), d).unwrap();
    let calls = trace_take();
    assert_eq!(calls.len(), 36, "{calls:?}");
    assert!(calls.iter().all(|c| c.m == 72 && c.k == 64), "{calls:?}");
    let want = reference::forward(&x64, &w64, Some(&b64), &d);
    let bound = reference::forward(&abs(&x64), &abs(&w64), Some(&abs(&b64)), &d);
    assert_close_bound("y", &y, &want, &bound, TOL);

    let dy = rand_vec(d.y_len(), 14, 1.0);
    let dy64 = f64s(&dy);
    let (mut dx, mut dw, mut db) = (vec![0.0; d.x_len()], vec![0.0; d.w_len()], vec![0.0; 72]);
    trace_start();
    let g = Conv2dGrads {
        dx: Some(&mut dx),
        dw: Some(&mut dw),
        dbias: Some(&mut db),
    };
    conv2d_backward(g, &dy, &x, &w, d).unwrap();
    let calls = trace_take();
    // dW by im2col (one product reducing over the 960 pixels), dx by 36 products over the 72
    // output channels.
    assert_eq!(
        calls.iter().filter(|c| c.k == 72 && c.m == 64).count(),
        36,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| c.k == 32 * 30).count(),
        1,
        "{calls:?}"
    );
    let (rdx, rdw, rdb) = reference::backward(&dy64, &x64, &w64, &d);
    let (bdx, bdw, bdb) = reference::backward(&abs(&dy64), &abs(&x64), &abs(&w64), &d);
    assert_close_bound("dx", &dx, &rdx, &bdx, TOL);
    assert_close_bound("dw", &dw, &rdw, &bdw, 1e-5);
    assert_close_bound("dbias", &db, &rdb, &bdb, 1e-5);
}

/// Few tiles or few channels stay on im2col, as does anything but a 3x3 stride-1 kernel.
#[test]
fn small_or_other_convolutions_stay_on_im2col() {
    assert!(!worth_it(&dims(1, 64, (8, 8), 64, (1, 1)))); // 4 tiles
    assert!(!worth_it(&dims(1, 32, (64, 64), 64, (1, 1)))); // 32 input channels
    let mut d = dims(1, 64, (64, 64), 64, (1, 1));
    d.stride = (2, 2);
    assert!(!worth_it(&d));
    let mut d = dims(1, 64, (64, 64), 64, (1, 1));
    d.groups = 2;
    assert!(!worth_it(&d));
    let mut d = dims(1, 64, (64, 64), 64, (3, 3));
    d.padding = (3, 3);
    assert!(!worth_it(&d));
    // Asking for Winograd on a convolution it does not handle is a named error.
    let mut d = dims(1, 4, (8, 8), 4, (1, 1));
    d.stride = (2, 2);
    let mut y = vec![0.0; d.y_len()];
    let (x, w) = (vec![0.0; d.x_len()], vec![0.0; d.w_len()]);
    let e = conv2d_forward_by(ConvAlgo::Winograd, &mut y, &x, &w, None, d).unwrap_err();
    assert!(e.to_string().contains("stride (2, 2)"), "{e}");
}

/// The tiles of a chunk and the 36 products are spread over the pool; the bits do not depend on
/// how many threads there are.
#[test]
fn any_thread_count_gives_the_same_bits() {
    let _one = serial();
    let d = dims(3, 70, (19, 21), 66, (1, 1));
    assert!(worth_it(&d));
    let (x, w) = (rand_vec(d.x_len(), 21, 1.0), rand_vec(d.w_len(), 22, 1.0));
    let dy = rand_vec(d.y_len(), 23, 1.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut y = vec![0.0; d.y_len()];
            conv2d_forward(&mut y, &x, &w, None, d).unwrap();
            let mut dx = vec![0.0; d.x_len()];
            let g = Conv2dGrads {
                dx: Some(&mut dx),
                ..Default::default()
            };
            conv2d_backward(g, &dy, &[], &w, d).unwrap();
            (y, dx)
        })
    };
    assert_eq!(run(1), run(3));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_3x3_convolutions_match_the_definition(
        n in 1usize..3, c in 1usize..10, o in 1usize..10, h in 1usize..14, w in 1usize..14,
        ph in 0usize..3, pw in 0usize..3, seed in any::<u64>(),
    ) {
        let d = dims(n, c, (h, w), o, (ph, pw));
        prop_assume!(d.check().is_ok());
        let _one = serial();
        errors(d, seed);
    }
}
