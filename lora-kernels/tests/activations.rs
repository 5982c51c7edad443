//! ReLU, sigmoid, exact (erf) GELU and quick_gelu against their f64 definitions, the oracle's
//! derivative against central finite differences, and the edge values PyTorch defines
//! (ReLU'(0) = 0, NaN kept, GELU's far tails).

mod common;

use common::{assert_close_f64, assert_close_stable, f64s, fd_grad_elementwise, rand_vec};
use lora_kernels::ops::elementwise::{
    gelu_erf_backward, gelu_erf_forward, quick_gelu_backward, quick_gelu_forward, reference,
    relu_backward, relu_forward, sigmoid_backward, sigmoid_forward,
};
use proptest::prelude::*;

fn check(len: usize, seed: u64, scale: f64) {
    let x = rand_vec(len, seed, scale);
    let dout = rand_vec(len, seed ^ 1, 1.0);
    let ones = vec![1.0f64; len];
    let mut out = vec![f32::NAN; len];
    gelu_erf_forward(&mut out, &x).unwrap();
    assert_close_stable("gelu_erf", &out, &x, reference::gelu_erf, 1e-6);
    let mut dx = vec![0.0; len];
    gelu_erf_backward(&mut dx, &vec![1.0; len], &x).unwrap();
    assert_close_stable("gelu_erf'", &dx, &x, reference::gelu_erf_grad, 1e-6);
    // The oracle's derivative against central differences of its forward (element-wise, so
    // the finite-difference gradient with unit weights is the derivative at each point).
    let x64 = f64s(&x);
    let fd = fd_grad_elementwise(&x64, &ones, |_, t| reference::gelu_erf(t));
    let an: Vec<f64> = x64.iter().map(|&t| reference::gelu_erf_grad(t)).collect();
    // The bound the other activations' oracles use.
    assert_close_f64("gelu_erf' oracle vs finite differences", &an, &fd, 1e-7);

    quick_gelu_forward(&mut out, &x).unwrap();
    assert_close_stable("quick_gelu", &out, &x, reference::quick_gelu, 1e-6);
    let mut dx = vec![0.0; len];
    quick_gelu_backward(&mut dx, &vec![1.0; len], &x).unwrap();
    assert_close_stable("quick_gelu'", &dx, &x, reference::quick_gelu_grad, 1e-6);
    let h = 1e-5;
    let fd: Vec<f64> = x64
        .iter()
        .map(|&t| (reference::quick_gelu(t + h) - reference::quick_gelu(t - h)) / (2.0 * h))
        .collect();
    let an: Vec<f64> = x64.iter().map(|&t| reference::quick_gelu_grad(t)).collect();
    assert_close_f64("quick_gelu' oracle vs finite differences", &an, &fd, 1e-7);

    sigmoid_forward(&mut out, &x).unwrap();
    assert_close_stable("sigmoid", &out, &x, reference::sigmoid, 1e-6);
    let mut dx = vec![0.0; len];
    sigmoid_backward(&mut dx, &vec![1.0; len], &x).unwrap();
    let sd = |t: f64| reference::sigmoid(t) * reference::sigmoid(-t);
    assert_close_stable("sigmoid'", &dx, &x, sd, 1e-6);
    // Element by element (the function is element-wise): central differences of one value
    // round at about 1e-16 / h, far below the bound, where a sum over all elements would not.
    let h = 1e-5;
    let fd: Vec<f64> = x64
        .iter()
        .map(|&t| (reference::sigmoid(t + h) - reference::sigmoid(t - h)) / (2.0 * h))
        .collect();
    let an: Vec<f64> = x64.iter().map(|&t| sd(t)).collect();
    assert_close_f64("sigmoid' oracle vs finite differences", &an, &fd, 1e-7);

    relu_forward(&mut out, &x).unwrap();
    for (o, v) in out.iter().zip(&x) {
        assert_eq!(*o, v.max(0.0));
    }
    let mut dx: Vec<f32> = rand_vec(len, seed ^ 2, 1.0);
    let before = dx.clone();
    relu_backward(&mut dx, &dout, &x).unwrap();
    for i in 0..len {
        let want = before[i] + if x[i] > 0.0 { dout[i] } else { 0.0 };
        assert_eq!(dx[i], want, "relu' at {}", x[i]);
    }
}

#[test]
fn edge_values() {
    let x = [0.0f32, -0.0, f32::NAN, -40.0, 40.0, -8.5, 1e-30];
    let mut out = [0.0f32; 7];
    relu_forward(&mut out, &x).unwrap();
    assert_eq!(&out[..2], &[0.0, 0.0]);
    assert!(out[2].is_nan(), "ReLU keeps NaN");
    let mut dx = [0.0f32; 7];
    relu_backward(&mut dx, &[1.0; 7], &x).unwrap();
    assert_eq!(dx[0], 0.0, "ReLU'(0) = 0, as PyTorch");
    gelu_erf_forward(&mut out, &x).unwrap();
    assert_eq!(
        out[3], -0.0,
        "the far negative tail underflows to (-)0, not garbage"
    );
    assert_eq!(out[4], 40.0);
    // At x = -8.5 GELU is about -8.5 * 9.5e-18: kept with full relative precision (erfc, not
    // 1 + erf, which would give 0 there).
    let want = reference::gelu_erf(-8.5);
    assert!(
        ((out[5] as f64 - want) / want).abs() < 1e-5,
        "{} vs {want}",
        out[5]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn relu_and_exact_gelu_match_their_definitions(len in 1usize..5000, seed in any::<u64>()) {
        check(len, seed, 4.0);
    }
}
