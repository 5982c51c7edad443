//! The point of LoRA is what is not computed: a frozen weight gets no gradient buffer and no
//! weight-gradient GEMM. Proven by tracing every GEMM call, with a trainable-weight control
//! showing the trace does see a dW GEMM when one happens.

use lora_core::lora::WeightLayout;
use lora_core::{ops, LoraConfig, LoraLinear, Tape, Tensor};
use lora_kernels::gemm::{trace_start, trace_take, GemmCall};
use lora_kernels::rng::Rng;

fn rand(len: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..len)
        .map(|_| r.uniform_range(-1.0, 1.0) as f32)
        .collect()
}

fn is_weight_grad(c: &GemmCall, inp: usize, out: usize, n: usize) -> bool {
    // dW = dy^T x: output (out, in) or (in, out), reduced over the n tokens.
    c.k == n && ((c.m == out && c.n == inp) || (c.m == inp && c.n == out))
}

#[test]
fn frozen_weight_costs_no_gradient_buffer_and_no_dw_gemm() {
    // Dims chosen so no other product has shape (out, in) with k = n, and rank 20 so the
    // rank-R products also go through GEMMs and are traced.
    let (n, inp, out) = (37, 48, 40);
    for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
        let w = Tensor::new(
            rand(inp * out, 1),
            &[
                if layout == WeightLayout::OutIn {
                    out
                } else {
                    inp
                },
                if layout == WeightLayout::OutIn {
                    inp
                } else {
                    out
                },
            ],
        )
        .unwrap();
        let bias = Tensor::new(rand(out, 2), &[out]).unwrap();
        let cfg = LoraConfig {
            rank: 20,
            alpha: 16.0,
            ..Default::default()
        };
        let layer = LoraLinear::new(w.clone(), layout, Some(bias.clone()), &cfg, 3).unwrap();
        layer.lora_b.data_mut().copy_from_slice(&rand(out * 20, 4));
        let x = Tensor::param(rand(n * inp, 5), &[n, inp]).unwrap();
        let targets: Vec<i32> = (0..n as i32).map(|i| i % out as i32).collect();

        let tape = Tape::new(0);
        let y = layer.forward(&tape, &x).unwrap();
        let loss = ops::cross_entropy(&tape, &y, &targets).unwrap();
        trace_start();
        let grads = tape.backward(&loss).unwrap();
        let calls = trace_take();

        assert!(grads.get(&w).is_none(), "frozen weight got a gradient");
        assert!(grads.get(&bias).is_none(), "frozen bias got a gradient");
        assert!(grads.get(&layer.lora_a).is_some() && grads.get(&layer.lora_b).is_some());
        assert!(grads.get(&x).is_some());
        assert_eq!(grads.len(), 3, "exactly A, B and x hold gradient buffers");
        assert!(!calls.is_empty(), "trace saw no GEMM at all");
        assert!(
            !calls.iter().any(|c| is_weight_grad(c, inp, out, n)),
            "{layout:?}: weight-gradient GEMM ran: {calls:?}"
        );

        // Control: the same layer with a trainable weight does run the dW GEMM.
        let wt = Tensor::param(w.to_vec(), w.shape()).unwrap();
        let tape = Tape::new(0);
        let y = ops::linear(&tape, &x, &wt, layout, None, None).unwrap();
        let loss = ops::cross_entropy(&tape, &y, &targets).unwrap();
        trace_start();
        let grads = tape.backward(&loss).unwrap();
        let calls = trace_take();
        assert!(grads.get(&wt).is_some());
        assert!(
            calls.iter().any(|c| is_weight_grad(c, inp, out, n)),
            "control saw no dW GEMM: {calls:?}"
        );
    }
}

#[test]
fn inference_tape_records_nothing() {
    let w = Tensor::new(rand(12, 1), &[4, 3]).unwrap();
    let layer = LoraLinear::new(w, WeightLayout::OutIn, None, &LoraConfig::default(), 0).unwrap();
    let x = Tensor::new(rand(6, 2), &[2, 3]).unwrap();
    let tape = Tape::inference();
    layer.forward(&tape, &x).unwrap();
    assert!(tape.is_empty());
}
