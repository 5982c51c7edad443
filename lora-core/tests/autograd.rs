//! The tape against finite differences through a composite graph that uses every op, and the
//! bookkeeping rules (shared inputs, accumulation, non-scalar losses).
//!
//! The graph runs in f32, so the check uses central differences with h = 1e-2 on a loss of
//! order 1 and compares each gradient tensor with relative error (to its max magnitude) <= 2e-2.

use lora_core::lora::WeightLayout;
use lora_core::ops::{self, LoraArgs, RopeTables};
use lora_core::{Gradients, LoraConfig, LoraLinear, Tape, Tensor};
use lora_kernels::ops::rope::rope_inv_freq;
use lora_kernels::rng::Rng;

fn rand(len: usize, seed: u64, s: f64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..len).map(|_| r.uniform_range(-s, s) as f32).collect()
}

struct Graph {
    params: Vec<Tensor>,
}

const B: usize = 2;
const T: usize = 5;
const C: usize = 8;
const V: usize = 11;

impl Graph {
    fn new() -> Self {
        let shapes: [&[usize]; 13] = [
            &[V, C],     // 0 embedding
            &[C],        // 1 ln gamma
            &[C],        // 2 ln beta
            &[4, C],     // 3 lora A for q (rank 4)
            &[C, 4],     // 4 lora B for q
            &[C],        // 5 rms gamma
            &[2, C],     // 6 A for mlp up (rank 2)
            &[2 * C, 2], // 7 B for mlp up
            &[2 * C, C], // 8 trainable down proj (InOut layout: (in, out))
            &[C],        // 9 down bias (trainable)
            &[2 * C, C], // 10 gate weight (trainable, OutIn)
            &[C, C], // 11 frozen k/v weights are built inline; this one is the lm head (trainable)
            &[C],    // 12 final norm gamma
        ];
        let params = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| Tensor::param(rand(s.iter().product(), 100 + i as u64, 0.6), s).unwrap())
            .collect();
        Self { params }
    }

    fn loss(&self, tape: &Tape) -> Tensor {
        let p = &self.params;
        let ids: Vec<u32> = (0..(B * T) as u32)
            .map(|i| (i * 7 + 1) % V as u32)
            .collect();
        let targets: Vec<i32> = (0..(B * T) as i32)
            .map(|i| {
                if i % 4 == 3 {
                    -100
                } else {
                    (i * 3 + 2) % V as i32
                }
            })
            .collect();
        let wq = Tensor::new(rand(C * C, 1, 0.5), &[C, C]).unwrap();
        let wk = Tensor::new(rand(4 * C, 2, 0.5), &[4, C]).unwrap(); // 1 kv head of dim 4
        let wv = Tensor::new(rand(4 * C, 3, 0.5), &[4, C]).unwrap();
        let wup = Tensor::new(rand(2 * C * C, 4, 0.5), &[2 * C, C]).unwrap();
        let wo = Tensor::new(rand(C * C, 5, 0.5), &[C, C]).unwrap();

        let x = ops::embedding(tape, &p[0], &ids, &[B, T]).unwrap();
        let h = ops::layer_norm(tape, &x, &p[1], Some(&p[2]), 1e-5).unwrap();
        let q = ops::linear(
            tape,
            &h,
            &wq,
            WeightLayout::OutIn,
            None,
            Some(LoraArgs {
                a: &p[3],
                b: &p[4],
                scale: 0.5,
                dropout: 0.0,
            }),
        )
        .unwrap();
        let k = ops::linear(tape, &h, &wk, WeightLayout::OutIn, None, None).unwrap();
        let v = ops::linear(tape, &h, &wv, WeightLayout::OutIn, None, None).unwrap();
        let tables = RopeTables::new(&rope_inv_freq(4, 10000.0), T);
        let pos: Vec<u32> = (0..B).flat_map(|_| 0..T as u32).collect();
        let q = ops::rope(tape, &q, &tables, &pos, 2).unwrap();
        let k = ops::rope(tape, &k, &tables, &pos, 1).unwrap();
        let a = ops::attention(tape, &q, &k, &v, 2, 1).unwrap();
        let a = ops::linear(tape, &a, &wo, WeightLayout::OutIn, None, None).unwrap();
        let x = ops::add(tape, &x, &a).unwrap();
        let h = ops::rms_norm(tape, &x, &p[5], 1e-6).unwrap();
        let up = ops::linear(
            tape,
            &h,
            &wup,
            WeightLayout::OutIn,
            None,
            Some(LoraArgs {
                a: &p[6],
                b: &p[7],
                scale: 2.0,
                dropout: 0.0,
            }),
        )
        .unwrap();
        let gate = ops::linear(tape, &h, &p[10], WeightLayout::OutIn, None, None).unwrap();
        let m = ops::swiglu(tape, &gate, &up).unwrap();
        let m = ops::gelu(tape, &m).unwrap();
        let m = ops::silu(tape, &m).unwrap();
        let d = ops::linear(tape, &m, &p[8], WeightLayout::InOut, Some(&p[9]), None).unwrap();
        let x = ops::add(tape, &x, &d).unwrap();
        let x = ops::rms_norm(tape, &x, &p[12], 1e-6).unwrap();
        let x = ops::linear(tape, &x, &p[11], WeightLayout::OutIn, None, None).unwrap();
        let logits = ops::linear(tape, &x, &p[0], WeightLayout::OutIn, None, None).unwrap(); // tied head
        ops::cross_entropy(tape, &logits, &targets).unwrap()
    }
}

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    let g = Graph::new();
    let tape = Tape::new(0);
    let loss = g.loss(&tape);
    let grads: Gradients = tape.backward(&loss).unwrap();
    let h = 1e-2f32;
    for (pi, p) in g.params.iter().enumerate() {
        let analytic = grads
            .get(p)
            .unwrap_or_else(|| panic!("param {pi} has no gradient"))
            .to_vec();
        let mut fd = vec![0.0f32; p.numel()];
        for i in 0..p.numel() {
            let orig = p.data()[i];
            p.data_mut()[i] = orig + h;
            let lp = g.loss(&Tape::inference()).scalar().unwrap() as f64;
            p.data_mut()[i] = orig - h;
            let lm = g.loss(&Tape::inference()).scalar().unwrap() as f64;
            p.data_mut()[i] = orig;
            fd[i] = ((lp - lm) / (2.0 * h as f64)) as f32;
        }
        let scale = fd.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let err = analytic
            .iter()
            .zip(&fd)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(err <= 2e-2, "param {pi}: relative error {err:.3e}");
    }
}

#[test]
fn shared_inputs_and_accumulation() {
    // y = x + x: dL/dx must be twice the upstream gradient.
    let x = Tensor::param(vec![0.3, -0.2, 0.5], &[1, 3]).unwrap();
    let tape = Tape::new(0);
    let y = ops::add(&tape, &x, &x).unwrap();
    let loss = ops::cross_entropy(&tape, &y, &[1]).unwrap();
    let g1 = tape.backward(&loss).unwrap();
    let tape = Tape::new(0);
    let loss = ops::cross_entropy(&tape, &x, &[1]).unwrap();
    let g2 = tape.backward(&loss).unwrap();
    // d/dx CE(2x) = 2 * softmax(2x) - 2 * onehot; compare against that directly.
    let z: Vec<f32> = x.to_vec().iter().map(|v| 2.0 * v).collect();
    let m = z.iter().cloned().fold(f32::MIN, f32::max);
    let s: f32 = z.iter().map(|v| (v - m).exp()).sum();
    let want: Vec<f32> = z
        .iter()
        .enumerate()
        .map(|(i, v)| 2.0 * ((v - m).exp() / s - if i == 1 { 1.0 } else { 0.0 }))
        .collect();
    for (a, b) in g1.get(&x).unwrap().iter().zip(&want) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    // Accumulating two gradient sets adds them.
    let mut acc = g2;
    let single = acc.get(&x).unwrap().to_vec();
    let tape = Tape::new(0);
    let loss = ops::cross_entropy(&tape, &x, &[1]).unwrap();
    acc.accumulate(tape.backward(&loss).unwrap()).unwrap();
    for (a, b) in acc.get(&x).unwrap().iter().zip(&single) {
        assert!((a - 2.0 * b).abs() < 1e-7);
    }
}

#[test]
fn backward_needs_a_scalar_and_shapes_are_checked() {
    let x = Tensor::param(vec![0.0; 6], &[2, 3]).unwrap();
    let tape = Tape::new(0);
    let e = tape.backward(&x).unwrap_err().to_string();
    assert!(e.contains("scalar loss"), "{e}");
    let w = Tensor::new(vec![0.0; 8], &[2, 4]).unwrap();
    let e = ops::linear(&tape, &x, &w, WeightLayout::OutIn, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("linear: x has shape [2, 3], expected (..., 4)"),
        "{e}"
    );
    let cfg = LoraConfig {
        rank: 0,
        ..Default::default()
    };
    let e = LoraLinear::new(w, WeightLayout::OutIn, None, &cfg, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`rank`"), "{e}");
}

#[test]
fn dropout_is_seeded_by_the_tape_and_off_for_inference() {
    let w = Tensor::new(rand(16 * 8, 1, 0.5), &[16, 8]).unwrap();
    let cfg = LoraConfig {
        rank: 4,
        dropout: 0.5,
        ..Default::default()
    };
    let layer = LoraLinear::new(w, WeightLayout::OutIn, None, &cfg, 0).unwrap();
    layer.lora_b.data_mut().copy_from_slice(&rand(64, 2, 1.0));
    let x = Tensor::new(rand(3 * 8, 3, 1.0), &[3, 8]).unwrap();
    let run = |tape: &Tape| layer.forward(tape, &x).unwrap().to_vec();
    assert_eq!(run(&Tape::new(7)), run(&Tape::new(7)));
    assert_ne!(run(&Tape::new(7)), run(&Tape::new(8)));
    assert_eq!(run(&Tape::inference()), run(&Tape::inference()));
    assert_ne!(run(&Tape::inference()), run(&Tape::new(7)));
}

#[test]
fn the_tape_keeps_only_activations_a_backward_reads() {
    // p -> gelu -> a -> linear(W frozen) -> y -> gelu -> z -> cross-entropy.
    let (n, k, m, r) = (5, 7, 3, 2);
    let p = Tensor::param(rand(n * k, 1, 1.0), &[n, k]).unwrap();
    let w = Tensor::new(rand(m * k, 2, 0.5), &[m, k]).unwrap();
    let targets = [0, 1, 2, 1, 0];
    let run = |lora: Option<LoraArgs>| {
        let tape = Tape::new(0);
        let a = ops::gelu(&tape, &p).unwrap();
        let y = ops::linear(&tape, &a, &w, WeightLayout::OutIn, None, lora).unwrap();
        drop(a);
        let z = ops::gelu(&tape, &y).unwrap();
        let loss = ops::cross_entropy(&tape, &z, &targets).unwrap();
        let saved = tape.saved_elems();
        let g = tape.backward(&loss).unwrap().get(&p).unwrap().to_vec();
        (saved, g)
    };
    // A frozen linear's input is not needed by its backward (dx reads only W): not kept.
    // Kept: y (read by the second GELU), z, the log-sum-exp and the targets.
    let (saved, g_frozen) = run(None);
    assert_eq!(saved, 2 * n * m + 2 * n);
    // With a trainable adapter, dA reads the input: a and u = a A^T are kept too.
    let la = Tensor::param(rand(r * k, 3, 0.3), &[r, k]).unwrap();
    let lb = Tensor::new(vec![0.0; m * r], &[m, r]).unwrap();
    let args = LoraArgs {
        a: &la,
        b: &lb,
        scale: 2.0,
        dropout: 0.0,
    };
    let (saved, g_lora) = run(Some(args));
    assert_eq!(saved, 2 * n * m + 2 * n + n * k + n * r);
    // B = 0: the adapter adds nothing, and the input gradient is the same either way.
    assert_eq!(g_frozen, g_lora);
    // A frozen adapter (inference-style weights on a training tape): the input is not kept.
    let fa = Tensor::new(rand(r * k, 3, 0.3), &[r, k]).unwrap();
    let args = LoraArgs { a: &fa, ..args };
    let (saved, _) = run(Some(args));
    assert_eq!(saved, 2 * n * m + 2 * n + n * r);
}

/// A norm's output read by LoRA linears is recomputed in backward instead of kept (the
/// tape's `Remat`): the gradients are bit for bit those of a graph that keeps it (an exact
/// `* 1.0` in between makes the linears read a kept copy), and the tape holds one activation
/// less. Two adapters read the same output, as q_proj and v_proj do, and a frozen linear that
/// reads nothing sits beside them.
#[test]
fn norm_outputs_are_recomputed_not_kept_and_gradients_are_unchanged() {
    let (n, c, m, r) = (6, 9, 5, 3);
    let p = Tensor::param(rand(n * c, 11, 1.0), &[n, c]).unwrap();
    let gamma = Tensor::param(rand(c, 12, 1.0), &[c]).unwrap();
    let beta = Tensor::param(rand(c, 13, 0.5), &[c]).unwrap();
    let w = [14, 15, 16].map(|s| Tensor::new(rand(m * c, s, 0.5), &[m, c]).unwrap());
    let la = [17, 18].map(|s| Tensor::param(rand(r * c, s, 0.5), &[r, c]).unwrap());
    let lb = [19, 20].map(|s| Tensor::param(rand(m * r, s, 0.5), &[m, r]).unwrap());
    let targets: Vec<i32> = (0..n as i32).map(|i| i % m as i32).collect();
    for rms in [false, true] {
        let run = |keep: bool| {
            let tape = Tape::new(0);
            let x = ops::gelu(&tape, &p).unwrap();
            let a = if rms {
                ops::rms_norm(&tape, &x, &gamma, 1e-5).unwrap()
            } else {
                ops::layer_norm(&tape, &x, &gamma, Some(&beta), 1e-5).unwrap()
            };
            let a = if keep {
                ops::scale(&tape, &a, 1.0).unwrap()
            } else {
                a
            };
            let lora = |i: usize| LoraArgs {
                a: &la[i],
                b: &lb[i],
                scale: 0.5,
                dropout: 0.0,
            };
            let q = ops::linear(&tape, &a, &w[0], WeightLayout::OutIn, None, Some(lora(0)));
            let k = ops::linear(&tape, &a, &w[1], WeightLayout::OutIn, None, None);
            let v = ops::linear(&tape, &a, &w[2], WeightLayout::OutIn, None, Some(lora(1)));
            drop(a);
            let y = ops::add(&tape, &q.unwrap(), &k.unwrap()).unwrap();
            let y = ops::add(&tape, &y, &v.unwrap()).unwrap();
            let loss = ops::cross_entropy(&tape, &y, &targets).unwrap();
            let saved = tape.saved_elems();
            let g = tape.backward(&loss).unwrap();
            let mut params = vec![&p, &gamma];
            if !rms {
                params.push(&beta);
            }
            params.extend(la.iter().chain(&lb));
            let bits: Vec<Vec<u32>> = params
                .iter()
                .map(|t| g.get(t).unwrap().iter().map(|v| v.to_bits()).collect())
                .collect();
            (saved, bits, loss.scalar().unwrap().to_bits())
        };
        let (saved_kept, g_kept, l_kept) = run(true);
        let (saved, g, l) = run(false);
        assert_eq!(l, l_kept, "rms {rms}: loss");
        assert_eq!(g, g_kept, "rms {rms}: gradients");
        assert_eq!(saved + n * c, saved_kept, "rms {rms}: saved elements");
    }
}

/// `Tape::with_bf16_activations` (`--precision bf16`): what backward reads of the products'
/// outputs (attention's q, k, v, SwiGLU's gate and up, GELU's and SiLU's inputs) is kept
/// rounded to bf16, so the tape holds less; attention's forward reads the rounded q, k, v
/// too (autocast's), so the loss moves by bf16 rounding (bound 1e-3 relative) and the
/// gradients stay within bf16's rounding of the f32 tape's (each operand moves by at most
/// 2^-9 relative; bound 2e-2 of each gradient's largest magnitude, as for the finite
/// differences above), and are not the f32 ones exactly.
#[test]
fn bf16_activations_keep_less_and_stay_close() {
    let g = Graph::new();
    let run = |bf16: bool| {
        let tape = Tape::new(0).with_bf16_activations(bf16);
        assert_eq!(tape.bf16_activations(), bf16);
        let loss = g.loss(&tape);
        let saved = tape.saved_elems();
        let grads = tape.backward(&loss).unwrap();
        let gs: Vec<Vec<f32>> = g
            .params
            .iter()
            .map(|p| grads.get(p).unwrap().to_vec())
            .collect();
        (loss.scalar().unwrap().to_bits(), saved, gs)
    };
    let (l32, s32, g32) = run(false);
    let (l16, s16, g16) = run(true);
    let (l32, l16) = (f32::from_bits(l32), f32::from_bits(l16));
    assert!(
        ((l16 - l32) / l32).abs() <= 1e-3 && l16 != l32,
        "loss {l16} (bf16 activations) vs {l32}"
    );
    // Rounded: q (2 heads of 4), k and v (1 head of 4) of the attention, gate and up of
    // SwiGLU, and the inputs of GELU and SiLU (2C each); each holds half its f32 size.
    let rounded = B * T * (C + 4 + 4) + 4 * B * T * 2 * C;
    assert_eq!(s32 - s16, rounded / 2, "saved {s32} (f32) vs {s16} (bf16)");
    let mut worst = 0.0f32;
    for (pi, (a, b)) in g32.iter().zip(&g16).enumerate() {
        let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let err = a
            .iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        assert!(
            err <= 2e-2,
            "param {pi}: bf16 activations moved the gradient by {err:.2e}"
        );
        worst = worst.max(err);
    }
    println!("bf16 activations: worst gradient change {worst:.2e}");
    assert!(worst > 0.0, "nothing was rounded");
    // Inference tapes keep nothing, bf16 or not.
    assert!(!Tape::inference()
        .with_bf16_activations(true)
        .bf16_activations());
}

/// Only activations are rounded: an op reading a leaf (a parameter, or a tensor the caller
/// made) keeps it as it is, so its gradient is the f32 tape's bit for bit; an activation whose
/// values are already bf16-exact gives the f32 gradients bit for bit too (the rounding is all
/// that differs), and one that is not gives different ones.
#[test]
fn bf16_activations_round_only_activations() {
    let n = 24;
    let targets: Vec<i32> = (0..4).map(|i| i % 6).collect();
    let grads = |p: &Tensor, bf16: bool, through: bool| {
        let tape = Tape::new(0).with_bf16_activations(bf16);
        let x = if through {
            ops::scale(&tape, p, 1.0).unwrap() // an activation with p's values
        } else {
            p.clone()
        };
        let y = ops::gelu(&tape, &x).unwrap();
        let loss = ops::cross_entropy(&tape, &y, &targets).unwrap();
        let saved = tape.saved_elems();
        let g = tape.backward(&loss).unwrap().get(p).unwrap().to_vec();
        (saved, g)
    };
    let raw = rand(n, 31, 2.0);
    let exact: Vec<f32> = raw
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    for (vals, bf16_exact) in [(raw, false), (exact, true)] {
        let p = Tensor::param(vals, &[4, 6]).unwrap();
        let (s32, leaf32) = grads(&p, false, false);
        let (s16, leaf16) = grads(&p, true, false);
        assert_eq!((s32, &leaf32), (s16, &leaf16), "a leaf is kept as it is");
        let (a32, act32) = grads(&p, false, true);
        let (a16, act16) = grads(&p, true, true);
        assert_eq!(a32 - a16, n / 2, "the activation is kept in bf16");
        assert_eq!(act32, leaf32);
        if bf16_exact {
            assert_eq!(act16, act32, "rounding bf16-exact values changes nothing");
        } else {
            assert_ne!(act16, act32, "rounded values give other gradients");
        }
    }
}

/// bf16 activations under activation checkpointing: the segment's first (unrecorded) run
/// rounds attention's q, k, v as its recording rerun in backward does (those that need a
/// gradient; a k computed from frozen values only is read in f32 by both, as without
/// checkpointing), so the loss and the gradients are those of the same graph without
/// checkpointing, bit for bit.
#[test]
fn bf16_activations_agree_with_and_without_checkpointing() {
    let (b, t, c, heads) = (2, 5, 8, 2);
    let p = Tensor::param(rand(b * t * c, 41, 1.0), &[b, t, c]).unwrap();
    let w = Tensor::new(rand(3 * c * c, 42, 0.5), &[3 * c, c]).unwrap();
    let frozen = Tensor::new(rand(b * t * c, 43, 1.0), &[b, t, c]).unwrap();
    let targets: Vec<i32> = (0..(b * t) as i32).map(|i| i % c as i32).collect();
    let run = |ckpt: bool, frozen_k: bool| {
        let tape = Tape::new(0)
            .with_bf16_activations(true)
            .with_checkpointing(ckpt);
        let x = ops::scale(&tape, &p, 1.0).unwrap();
        let (w, frozen) = (w.clone(), frozen.clone());
        let block = move |tape: &Tape, x: &Tensor| {
            let qkv = ops::linear(tape, x, &w, WeightLayout::OutIn, None, None)?;
            let q = ops::narrow(tape, &qkv, 0, c)?;
            let k = if frozen_k {
                // Needs no gradient: no node records it.
                let kf = ops::linear(tape, &frozen, &w, WeightLayout::OutIn, None, None)?;
                ops::narrow(tape, &kf, c, c)?
            } else {
                ops::narrow(tape, &qkv, c, c)?
            };
            let v = ops::narrow(tape, &qkv, 2 * c, c)?;
            let a = ops::attention(tape, &q, &k, &v, heads, heads)?;
            ops::gelu(tape, &a)
        };
        let y = if ckpt {
            ops::checkpoint(&tape, &x, block).unwrap()
        } else {
            block(&tape, &x).unwrap()
        };
        let loss = ops::cross_entropy(&tape, &y, &targets).unwrap();
        let l = loss.scalar().unwrap().to_bits();
        let g: Vec<u32> = tape
            .backward(&loss)
            .unwrap()
            .get(&p)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        (l, g)
    };
    for frozen_k in [false, true] {
        let (plain, ckpt) = (run(false, frozen_k), run(true, frozen_k));
        assert_eq!(plain.0, ckpt.0, "the same loss (frozen k: {frozen_k})");
        assert_eq!(plain.1, ckpt.1, "the same gradient (frozen k: {frozen_k})");
    }
}
