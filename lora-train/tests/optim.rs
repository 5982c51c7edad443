//! Optimizers, schedules and clipping against PyTorch / transformers
//! (`fixtures/optim/reference.json`, written by `make_optim_reference.py`). Bounds: parameters
//! after 5 steps within 1e-6 relative; schedule factors within 1e-6; clipped gradients 1e-6.

use lora_core::{Gradients, Tensor};
use lora_train::optim::{clip_grad_norm, lr_factor, AdamW, Optimizer, ParamGroup, Schedule, Sgd};
use serde_json::Value;
use std::path::PathBuf;

fn reference() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/optim/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let s = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let e = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / s;
    assert!(e <= tol, "{what}: relative error {e:e}");
}

#[test]
fn optimizers_match_pytorch() {
    let r = reference();
    for case in r["optimizers"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let init = case["init"].as_array().unwrap();
        let p1 = Tensor::param(floats(&init[0]), &[3, 4]).unwrap();
        let p2 = Tensor::param(floats(&init[1]), &[5]).unwrap();
        let f = |k: &str| case[k].as_f64().unwrap() as f32;
        let (mut opt, groups): (Box<dyn Optimizer>, Vec<ParamGroup>) = match name {
            "adamw" => (
                Box::new(AdamW::new(
                    f("beta1"),
                    f("beta2"),
                    f("eps"),
                    f("weight_decay"),
                )),
                vec![ParamGroup {
                    params: vec![p1.clone(), p2.clone()],
                    lr_scale: 1.0,
                }],
            ),
            "adamw_groups" => (
                Box::new(AdamW::new(
                    f("beta1"),
                    f("beta2"),
                    f("eps"),
                    f("weight_decay"),
                )),
                vec![
                    ParamGroup {
                        params: vec![p1.clone()],
                        lr_scale: 1.0,
                    },
                    ParamGroup {
                        params: vec![p2.clone()],
                        lr_scale: f("lr_ratio_second"),
                    },
                ],
            ),
            "sgd" => (
                Box::new(Sgd::new(f("momentum"), f("weight_decay"))),
                vec![ParamGroup {
                    params: vec![p1.clone(), p2.clone()],
                    lr_scale: 1.0,
                }],
            ),
            other => panic!("unknown case {other}"),
        };
        for step in case["grads"].as_array().unwrap() {
            let mut g = Gradients::default();
            g.set(&p1, floats(&step[0])).unwrap();
            g.set(&p2, floats(&step[1])).unwrap();
            opt.step(&groups, &g, f("lr")).unwrap();
        }
        let fin = case["final"].as_array().unwrap();
        close(&format!("{name} p1"), &p1.to_vec(), &floats(&fin[0]), 1e-6);
        close(&format!("{name} p2"), &p2.to_vec(), &floats(&fin[1]), 1e-6);
        assert_eq!(
            opt.state_len(),
            2,
            "{name}: state for exactly the two tensors"
        );
    }
}

#[test]
fn state_only_for_tensors_with_gradients() {
    let a = Tensor::param(vec![1.0; 4], &[4]).unwrap();
    let frozen = Tensor::new(vec![1.0; 4], &[4]).unwrap();
    let mut g = Gradients::default();
    g.set(&a, vec![0.5; 4]).unwrap();
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
    opt.step(
        &[ParamGroup {
            params: vec![a.clone(), frozen.clone()],
            lr_scale: 1.0,
        }],
        &g,
        0.1,
    )
    .unwrap();
    assert_eq!(opt.state_len(), 1);
    assert_eq!(frozen.to_vec(), vec![1.0; 4]);
}

#[test]
fn schedules_match_transformers() {
    let r = reference();
    let s = &r["schedules"];
    let (warmup, total) = (
        s["warmup"].as_u64().unwrap() as usize,
        s["total"].as_u64().unwrap() as usize,
    );
    for (name, kind) in [
        ("cosine", Schedule::Cosine),
        ("linear", Schedule::Linear),
        ("constant", Schedule::Constant),
    ] {
        let want = floats(&s["values"][name]);
        let got: Vec<f32> = (0..want.len())
            .map(|i| lr_factor(kind, i, warmup, total))
            .collect();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-6, "{name} step {i}: {g} vs {w}");
        }
    }
}

#[test]
fn clipping_matches_pytorch() {
    let r = reference();
    let c = &r["clip"];
    let a = Tensor::param(vec![0.0; 12], &[4, 3]).unwrap();
    let b = Tensor::param(vec![0.0; 7], &[7]).unwrap();
    let mut g = Gradients::default();
    g.set(&a, floats(&c["grads"][0])).unwrap();
    g.set(&b, floats(&c["grads"][1])).unwrap();
    let total = clip_grad_norm(
        &mut g,
        &[a.clone(), b.clone()],
        c["max_norm"].as_f64().unwrap() as f32,
    )
    .unwrap();
    assert!((total - c["total_norm"].as_f64().unwrap() as f32).abs() < 1e-5);
    close(
        "clipped a",
        g.get(&a).unwrap(),
        &floats(&c["clipped"][0]),
        1e-6,
    );
    close(
        "clipped b",
        g.get(&b).unwrap(),
        &floats(&c["clipped"][1]),
        1e-6,
    );
}

#[test]
fn optimizer_kinds_parse_print_and_build() {
    use lora_train::optim::OptimizerKind;
    for k in [OptimizerKind::AdamW, OptimizerKind::Sgd] {
        assert_eq!(k.to_string().parse::<OptimizerKind>().unwrap(), k);
    }
    assert_eq!(OptimizerKind::default(), OptimizerKind::AdamW);
    let e = "adam".parse::<OptimizerKind>().unwrap_err();
    assert_eq!(e, "must be adamw or sgd, got `adam`");
    // AdamW keeps two moments per parameter; SGD one momentum buffer.
    let adamw = OptimizerKind::AdamW.build(0.0).state_keys("w");
    assert_eq!(
        adamw,
        (vec!["exp_avg.w".into(), "exp_avg_sq.w".into()], true)
    );
    let sgd = OptimizerKind::Sgd.build(0.0).state_keys("w");
    assert_eq!(sgd, (vec!["momentum.w".into()], false));
}
