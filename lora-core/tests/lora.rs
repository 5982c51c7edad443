//! Adapter math: scale variants, initialisation, merge/unmerge, merged vs unmerged forward.

use lora_core::lora::WeightLayout;
use lora_core::{LoraConfig, LoraInit, LoraLinear, Tape, Tensor};
use lora_kernels::rng::Rng;

fn rand(len: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..len)
        .map(|_| r.uniform_range(-1.0, 1.0) as f32)
        .collect()
}

fn layer(layout: WeightLayout, inp: usize, out: usize, cfg: &LoraConfig) -> LoraLinear {
    let shape = if layout == WeightLayout::OutIn {
        [out, inp]
    } else {
        [inp, out]
    };
    let w = Tensor::new(rand(inp * out, 1), &shape).unwrap();
    let b = Tensor::new(rand(out, 2), &[out]).unwrap();
    let l = LoraLinear::new(w, layout, Some(b), cfg, 3).unwrap();
    l.lora_b
        .data_mut()
        .copy_from_slice(&rand(out * cfg.rank, 4));
    l
}

#[test]
fn scale_variants() {
    let c = LoraConfig {
        rank: 16,
        alpha: 32.0,
        ..Default::default()
    };
    assert_eq!(c.scale(), 2.0);
    let c = LoraConfig {
        use_rslora: true,
        ..c
    };
    assert_eq!(c.scale(), 8.0);
}

#[test]
fn init_follows_peft() {
    let inp = 400;
    let w = Tensor::new(vec![0.0; 300 * inp], &[300, inp]).unwrap();
    let cfg = LoraConfig {
        rank: 16,
        ..Default::default()
    };
    let l = LoraLinear::new(w.clone(), WeightLayout::OutIn, None, &cfg, 1).unwrap();
    let a = l.lora_a.to_vec();
    let bound = 1.0 / (inp as f32).sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound));
    let max = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        max > 0.95 * bound,
        "uniform should reach near its bound: {max} vs {bound}"
    );
    // Var of U(-b, b) = b^2 / 3.
    let var = a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32;
    assert!(
        (var / (bound * bound / 3.0) - 1.0).abs() < 0.05,
        "variance {var}"
    );
    assert!(l.lora_b.to_vec().iter().all(|&v| v == 0.0));

    let g = LoraLinear::new(
        w.clone(),
        WeightLayout::OutIn,
        None,
        &LoraConfig {
            init: LoraInit::Gaussian,
            ..cfg.clone()
        },
        1,
    )
    .unwrap();
    let a = g.lora_a.to_vec();
    let std = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
    assert!(
        (std * 16.0 - 1.0).abs() < 0.05,
        "gaussian std {std}, want 1/r"
    );
    let z = LoraLinear::new(
        w,
        WeightLayout::OutIn,
        None,
        &LoraConfig {
            init: LoraInit::Zero,
            ..cfg
        },
        1,
    )
    .unwrap();
    assert!(z.lora_a.to_vec().iter().all(|&v| v == 0.0));
}

#[test]
fn fresh_adapter_is_a_no_op() {
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let shape = [6, 5];
    let w = Tensor::new(rand(30, 1), &shape).unwrap();
    let l = LoraLinear::new(w.clone(), WeightLayout::OutIn, None, &cfg, 3).unwrap();
    let x = Tensor::new(rand(10, 9), &[2, 5]).unwrap();
    let t = Tape::inference();
    let with = l.forward(&t, &x).unwrap().to_vec();
    let without = lora_core::ops::linear(&t, &x, &w, WeightLayout::OutIn, None, None)
        .unwrap()
        .to_vec();
    assert_eq!(with, without);
}

#[test]
fn merge_unmerge_round_trip_and_merged_forward_equals_unmerged() {
    for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
        for rslora in [false, true] {
            let cfg = LoraConfig {
                rank: 5,
                alpha: 10.0,
                use_rslora: rslora,
                ..Default::default()
            };
            let mut l = layer(layout, 37, 23, &cfg);
            let w0 = l.weight.to_vec();
            let x = Tensor::new(rand(7 * 37, 11), &[7, 37]).unwrap();
            let t = Tape::inference();
            let y_unmerged = l.forward(&t, &x).unwrap().to_vec();
            l.merge().unwrap();
            assert!(l.is_merged());
            let y_merged = l.forward(&t, &x).unwrap().to_vec();
            let scale = y_unmerged.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = y_unmerged
                .iter()
                .zip(&y_merged)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            assert!(err < 1e-5, "{layout:?} merged vs unmerged forward: {err:e}");
            // Training a merged layer is refused rather than silently losing adapter gradients.
            assert!(l.forward(&Tape::new(0), &x).is_err());
            assert!(l.merge().is_err());
            l.unmerge().unwrap();
            let w1 = l.weight.to_vec();
            let wscale = w0.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = w0
                .iter()
                .zip(&w1)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
                / wscale;
            assert!(err < 1e-6, "unmerge restores W: {err:e}");
            assert!(l.unmerge().is_err());
        }
    }
}

#[test]
fn delta_weight_is_s_b_a_in_the_weight_layout() {
    let cfg = LoraConfig {
        rank: 3,
        alpha: 6.0,
        ..Default::default()
    };
    for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
        let l = layer(layout, 4, 5, &cfg);
        let (a, b) = (l.lora_a.to_vec(), l.lora_b.to_vec());
        let d = l.delta_weight();
        for o in 0..5 {
            for k in 0..4 {
                let want: f64 = 2.0
                    * (0..3)
                        .map(|j| b[o * 3 + j] as f64 * a[j * 4 + k] as f64)
                        .sum::<f64>();
                let got = match layout {
                    WeightLayout::OutIn => d[o * 4 + k],
                    WeightLayout::InOut => d[k * 5 + o],
                };
                assert!((got as f64 - want).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn non_finite_merge_is_refused_and_writes_nothing() {
    let cfg = LoraConfig {
        rank: 2,
        alpha: 2.0,
        ..Default::default()
    };
    let mut l = layer(WeightLayout::OutIn, 3, 4, &cfg);
    l.lora_b.data_mut()[5] = f32::INFINITY;
    let w0 = l.weight.to_vec();
    let e = l.merge().unwrap_err().to_string();
    assert!(e.contains("merge") && e.contains("non-finite"), "{e}");
    assert!(!l.is_merged());
    assert_eq!(l.weight.to_vec(), w0);
}

#[test]
fn config_fields_are_validated_by_name() {
    for (cfg, field) in [
        (
            LoraConfig {
                rank: 0,
                ..Default::default()
            },
            "rank",
        ),
        (
            LoraConfig {
                alpha: f32::NAN,
                ..Default::default()
            },
            "alpha",
        ),
        (
            LoraConfig {
                dropout: 1.0,
                ..Default::default()
            },
            "dropout",
        ),
    ] {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("`{field}`")), "{e}");
    }
}
