//! The LoRA convolution (PEFT's layout): its output equals the base convolution with the merged
//! weight `W + s B A` computed independently in f64, merge / unmerge round-trip, the grouped
//! case against the two-convolution definition, adapter gradients against finite differences of
//! the loss, and the configurations PEFT refuses as named errors.

use lora_core::ops::{self, Conv2dParams};
use lora_core::{LoraConfig, LoraConv2d, Tape, Tensor};
use lora_kernels::ops::conv::{reference, Conv2dDims};
use lora_kernels::rng::Rng;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn dims(x: &[usize], w: &[usize], p: Conv2dParams) -> Conv2dDims {
    Conv2dDims::new(x.try_into().unwrap(), w.try_into().unwrap(), p).unwrap()
}

/// A layer over a random base with a random (as if trained) B.
fn layer(o: usize, c: usize, k: (usize, usize), p: Conv2dParams, rank: usize) -> LoraConv2d {
    let cg = c / p.groups;
    let w = Tensor::new(rand(o * cg * k.0 * k.1, 1), &[o, cg, k.0, k.1]).unwrap();
    let b = Tensor::new(rand(o, 2), &[o]).unwrap();
    let cfg = LoraConfig {
        rank,
        alpha: 6.0,
        ..LoraConfig::default()
    };
    let l = LoraConv2d::new(w, Some(b), p, &cfg, 3).unwrap();
    l.lora_b.set_data(rand(l.lora_b.numel(), 4)).unwrap();
    l
}

fn max_err(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs()))
        / scale
}

#[test]
fn the_adapted_convolution_is_the_merged_one() {
    for (k, p) in [
        (
            (3, 3),
            Conv2dParams {
                stride: (2, 1),
                padding: (1, 1),
                ..Conv2dParams::default()
            },
        ),
        ((1, 1), Conv2dParams::default()),
    ] {
        let (o, c, r) = (6, 4, 3);
        let mut l = layer(o, c, k, p, r);
        let x = Tensor::new(rand(2 * c * 9 * 7, 5), &[2, c, 9, 7]).unwrap();
        let y = l.forward(&Tape::inference(), &x).unwrap();
        // W + s B A in f64, from A and B directly.
        let (a, b, w) = (l.lora_a.to_vec(), l.lora_b.to_vec(), l.weight.to_vec());
        let kk = c * k.0 * k.1;
        let s = 6.0 / r as f64;
        let merged: Vec<f64> = (0..o * kk)
            .map(|i| {
                let (oi, j) = (i / kk, i % kk);
                w[i] as f64
                    + s * (0..r)
                        .map(|q| b[oi * r + q] as f64 * a[q * kk + j] as f64)
                        .sum::<f64>()
            })
            .collect();
        let d = dims(x.shape(), l.weight.shape(), p);
        let want = reference::forward(
            &f64s(&x.to_vec()),
            &merged,
            Some(&f64s(&l.bias.as_ref().unwrap().to_vec())),
            &d,
        );
        assert_eq!(y.shape(), &d.out_shape()[..]);
        let e = max_err(&y.to_vec(), &want);
        assert!(
            e <= 1e-5,
            "kernel {k:?}: adapted output vs merged definition {e:.2e}"
        );
        // Merge: the base alone now gives the same output; unmerge restores W.
        l.merge().unwrap();
        let ym = l.forward(&Tape::inference(), &x).unwrap();
        assert!(max_err(&ym.to_vec(), &want) <= 1e-5);
        assert!(
            l.forward(&Tape::new(0), &x).is_err(),
            "a merged layer cannot train"
        );
        l.unmerge().unwrap();
        let back = l.weight.to_vec();
        assert!(back.iter().zip(&w).all(|(p, q)| (p - q).abs() <= 1e-5));
    }
}

#[test]
fn grouped_convolutions_follow_peft_layout() {
    // groups 2, rank 4: A (4, C, KH, KW) without groups, B (O, r/g, 1, 1) with them.
    let p = Conv2dParams {
        groups: 2,
        padding: (1, 0),
        ..Conv2dParams::default()
    };
    let (o, c, r) = (6, 4, 4);
    let mut l = layer(o, c, (3, 2), p, r);
    assert_eq!(l.lora_a.shape(), [4, 4, 3, 2]);
    assert_eq!(l.lora_b.shape(), [6, 2, 1, 1]);
    let x = Tensor::new(rand(c * 5 * 6, 6), &[1, c, 5, 6]).unwrap();
    let y = l.forward(&Tape::inference(), &x).unwrap().to_vec();
    let x64 = f64s(&x.to_vec());
    let base = reference::forward(
        &x64,
        &f64s(&l.weight.to_vec()),
        Some(&f64s(&l.bias.as_ref().unwrap().to_vec())),
        &dims(x.shape(), l.weight.shape(), p),
    );
    let down = Conv2dParams { groups: 1, ..p };
    let dd = dims(x.shape(), l.lora_a.shape(), down);
    let h = reference::forward(&x64, &f64s(&l.lora_a.to_vec()), None, &dd);
    let hs = dd.out_shape();
    let du = dims(
        &hs,
        l.lora_b.shape(),
        Conv2dParams {
            groups: 2,
            ..Conv2dParams::default()
        },
    );
    let u = reference::forward(&h, &f64s(&l.lora_b.to_vec()), None, &du);
    let s = 6.0 / r as f64;
    let want: Vec<f64> = base.iter().zip(&u).map(|(b, u)| b + s * u).collect();
    let e = max_err(&y, &want);
    assert!(e <= 1e-5, "grouped: {e:.2e}");
    let err = l.merge().unwrap_err().to_string();
    assert!(err.contains("grouped"), "{err}");
}

#[test]
fn adapter_gradients_match_finite_differences() {
    let p = Conv2dParams {
        stride: (1, 2),
        padding: (1, 1),
        ..Conv2dParams::default()
    };
    let l = layer(5, 3, (3, 3), p, 2);
    let x = Tensor::new(rand(2 * 3 * 6 * 8, 7), &[2, 3, 6, 8]).unwrap();
    let loss_of = |l: &LoraConv2d, tape: &Tape| {
        let y = l.forward(tape, &x).unwrap();
        let rows = y.numel() / y.last_dim();
        let v = y.last_dim() as i32;
        let targets: Vec<i32> = (0..rows as i32).map(|i| (i * 3) % v).collect();
        ops::cross_entropy(tape, &y, &targets).unwrap()
    };
    let tape = Tape::new(0);
    let loss = loss_of(&l, &tape);
    let g = tape.backward(&loss).unwrap();
    assert!(g.get(&l.weight).is_none(), "the base stays frozen");
    let h = 1e-2f32;
    for (name, t) in [("A", &l.lora_a), ("B", &l.lora_b)] {
        let grad = g.get(t).unwrap().to_vec();
        assert!(grad.iter().any(|&v| v != 0.0), "{name}");
        for i in [0, t.numel() / 2, t.numel() - 1] {
            let orig = t.to_vec();
            let mut v = orig.clone();
            v[i] = orig[i] + h;
            t.set_data(v.clone()).unwrap();
            let lp = loss_of(&l, &Tape::inference()).to_vec()[0];
            v[i] = orig[i] - h;
            t.set_data(v).unwrap();
            let lm = loss_of(&l, &Tape::inference()).to_vec()[0];
            t.set_data(orig).unwrap();
            let fd = (lp - lm) / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() <= 2e-3 * grad[i].abs().max(0.05),
                "{name}[{i}]: backward {} vs finite differences {fd}",
                grad[i]
            );
        }
    }
}

#[test]
fn what_peft_refuses_is_a_named_error() {
    let w = || Tensor::new(vec![0.0; 4 * 2 * 3 * 3], &[4, 2, 3, 3]).unwrap();
    let cfg = |rank: usize, dropout: f32| LoraConfig {
        rank,
        dropout,
        ..LoraConfig::default()
    };
    let p = |groups, dilation| Conv2dParams {
        groups,
        dilation,
        ..Conv2dParams::default()
    };
    let err = |p, c: LoraConfig| {
        LoraConv2d::new(w(), None, p, &c, 0)
            .unwrap_err()
            .to_string()
    };
    assert!(err(p(2, (1, 1)), cfg(3, 0.0)).contains("not divisible by the convolution's 2 groups"));
    assert!(err(p(1, (2, 2)), cfg(4, 0.0)).contains("dilation"));
    assert!(err(p(1, (1, 1)), cfg(4, 0.1)).contains("dropout"));
    let trainable = Tensor::param(vec![0.0; 4 * 2 * 3 * 3], &[4, 2, 3, 3]).unwrap();
    let e = LoraConv2d::new(trainable, None, p(1, (1, 1)), &cfg(4, 0.0), 0).unwrap_err();
    assert!(e.to_string().contains("frozen"), "{e}");
}
