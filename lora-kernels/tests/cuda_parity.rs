//! The CUDA LoRA linear against the f64 oracle (`lora_linear::reference`, the same oracle the
//! CPU kernel is tested against) on seeded random shapes: rank 1, one token, odd dims, both
//! weight layouts, with and without bias and dropout. Outputs are NaN-poisoned before each run
//! (`CudaDevice::poison`), so an element a kernel fails to write fails the test. Needs a GPU: where no CUDA device answers, it says it was skipped.
//! On a GPU machine: `scripts/gpu-check.sh` runs it from a prebuilt binary.
#![cfg(feature = "cuda")]

mod common;

use common::gpu_present;
use lora_kernels::cuda::{CudaDevice, LoraDims, LoraGrads};
use lora_kernels::lora_linear::reference;
use lora_kernels::lora_linear::{Dropout, WeightLayout};
use lora_kernels::rng::Rng;

fn rand(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|_| rng.uniform_range(-1.0, 1.0) as f32)
        .collect()
}

fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            if g.is_nan() {
                f64::INFINITY
            } else {
                (*g as f64 - w).abs() / scale
            }
        })
        .fold(0.0, f64::max)
}

#[test]
fn cuda_lora_linear_matches_the_oracle() {
    if !gpu_present() {
        return;
    }
    let mut dev = CudaDevice::open(0).expect("open cuda:0");
    dev.poison = true;
    println!("device: {}", dev.arch);
    let mut rng = Rng::new(11);
    let shapes = [
        (1, 1, 1, 1),
        (1, 17, 5, 3),
        (7, 13, 29, 1),
        (33, 64, 70, 8),
        (130, 96, 67, 16),
        (65, 40, 33, 64),
        (300, 257, 129, 7),
        // 282 row blocks: more than two per SM of an H200, so no split reductions.
        (9000, 33, 20, 2),
    ];
    println!("{} SMs", dev.sms);
    for &(n, k, m, r) in &shapes {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            for (with_bias, p) in [(false, 0.0f32), (true, 0.0), (true, 0.25)] {
                let x = rand(n * k, &mut rng);
                let w = rand(k * m, &mut rng);
                let bias = rand(m, &mut rng);
                let a = rand(r * k, &mut rng);
                let b = rand(m * r, &mut rng);
                let dy = rand(n * m, &mut rng);
                let d = LoraDims {
                    n,
                    k,
                    m,
                    r,
                    scale: 1.7,
                    p,
                    seed: 99,
                };
                let f64s = |v: &[f32]| v.iter().map(|&z| z as f64).collect::<Vec<f64>>();
                let dropout = (p > 0.0).then_some(Dropout { p, seed: 99 });
                let (ad, bd) = (f64s(&a), f64s(&b));
                let l = reference::Lora {
                    a: &ad,
                    b: &bd,
                    rank: r,
                    scale: 1.7,
                    dropout,
                };
                let bias64 = f64s(&bias);
                let (y_ref, _) = reference::forward(
                    &f64s(&x),
                    &f64s(&w),
                    layout,
                    with_bias.then_some(&bias64[..]),
                    Some(&l),
                    (n, k, m),
                );
                let (dx_ref, _, db_ref, da_ref, dbb_ref) = reference::backward(
                    &f64s(&dy),
                    &f64s(&x),
                    &f64s(&w),
                    layout,
                    Some(&l),
                    (n, k, m),
                );
                let up = |v: &[f32]| dev.upload(v).unwrap();
                let (xg, wg, bg, ag, bbg, dyg) =
                    (up(&x), up(&w), up(&bias), up(&a), up(&b), up(&dy));
                let (y, u) = dev
                    .lora_forward(&xg, &wg, layout, with_bias.then_some(&bg), &ag, &bbg, d)
                    .unwrap();
                // Gradients accumulate into buffers that already hold values (as in training):
                // an element the kernels miss keeps its old value and fails the comparison.
                let init: Vec<Vec<f32>> = [n * k, r * k, m * r, m]
                    .iter()
                    .map(|&len| rand(len, &mut rng))
                    .collect();
                let (mut dx, mut da, mut dbb, mut db) =
                    (up(&init[0]), up(&init[1]), up(&init[2]), up(&init[3]));
                let grads = LoraGrads {
                    dx: Some(&mut dx),
                    da: Some(&mut da),
                    db: Some(&mut dbb),
                    dbias: Some(&mut db),
                };
                dev.lora_backward_into(grads, &dyg, Some(&xg), &wg, layout, &ag, &bbg, &u, d)
                    .unwrap();
                let minus = |got: Vec<f32>, init: &[f32]| -> Vec<f32> {
                    got.iter().zip(init).map(|(g, i)| g - i).collect()
                };
                let tag = format!("n{n} k{k} m{m} r{r} {layout:?} bias={with_bias} p={p}");
                for (name, got, want) in [
                    ("y", dev.download(&y).unwrap(), &y_ref),
                    ("dx", minus(dev.download(&dx).unwrap(), &init[0]), &dx_ref),
                    ("dA", minus(dev.download(&da).unwrap(), &init[1]), &da_ref),
                    ("dB", minus(dev.download(&dbb).unwrap(), &init[2]), &dbb_ref),
                    (
                        "dbias",
                        minus(dev.download(&db).unwrap(), &init[3]),
                        &db_ref,
                    ),
                ] {
                    let e = max_rel(&got, want);
                    assert!(e < 1e-4, "{tag}: {name} relative error {e}");
                }
                // The wrapper into fresh buffers gives the same gradients.
                let [dx2, da2, dbb2, db2] = dev
                    .lora_backward(&dyg, &xg, &wg, layout, &ag, &bbg, &u, d)
                    .unwrap();
                for (name, got, want) in [
                    ("dx", dev.download(&dx2).unwrap(), &dx_ref),
                    ("dA", dev.download(&da2).unwrap(), &da_ref),
                    ("dB", dev.download(&dbb2).unwrap(), &dbb_ref),
                    ("dbias", dev.download(&db2).unwrap(), &db_ref),
                ] {
                    let e = max_rel(&got, want);
                    assert!(e < 1e-4, "{tag}: fresh {name} relative error {e}");
                }
                // Only dB wanted (no dx, dA or dbias): the other products are skipped and dB
                // is still right.
                let mut dbb3 = up(&init[2]);
                let only_db = LoraGrads {
                    db: Some(&mut dbb3),
                    ..Default::default()
                };
                dev.lora_backward_into(only_db, &dyg, Some(&xg), &wg, layout, &ag, &bbg, &u, d)
                    .unwrap();
                let e = max_rel(&minus(dev.download(&dbb3).unwrap(), &init[2]), &dbb_ref);
                assert!(e < 1e-4, "{tag}: dB alone relative error {e}");
            }
        }
    }
}

/// `set_tf32`: the base products switch to TF32 tensor cores (results move by ~1e-3, far more
/// than f32 rounding, which proves the mode took effect) and back to f32.
#[test]
fn cuda_tf32_mode_switches_the_base_products() {
    if !gpu_present() {
        return;
    }
    let dev = CudaDevice::open(0).expect("open cuda:0");
    let mut rng = Rng::new(5);
    let (n, k, m, r) = (256, 512, 384, 8);
    let (x, w) = (rand(n * k, &mut rng), rand(k * m, &mut rng));
    let (a, b) = (rand(r * k, &mut rng), rand(m * r, &mut rng));
    let f64s = |v: &[f32]| v.iter().map(|&z| z as f64).collect::<Vec<f64>>();
    let (ad, bd) = (f64s(&a), f64s(&b));
    let l = reference::Lora {
        a: &ad,
        b: &bd,
        rank: r,
        scale: 2.0,
        dropout: None,
    };
    let (y_ref, _) = reference::forward(
        &f64s(&x),
        &f64s(&w),
        WeightLayout::OutIn,
        None,
        Some(&l),
        (n, k, m),
    );
    let d = LoraDims {
        n,
        k,
        m,
        r,
        scale: 2.0,
        p: 0.0,
        seed: 0,
    };
    let (xg, wg, ag, bg) = (
        dev.upload(&x).unwrap(),
        dev.upload(&w).unwrap(),
        dev.upload(&a).unwrap(),
        dev.upload(&b).unwrap(),
    );
    let err = |dev: &CudaDevice| {
        let (y, _) = dev
            .lora_forward(&xg, &wg, WeightLayout::OutIn, None, &ag, &bg, d)
            .unwrap();
        max_rel(&dev.download(&y).unwrap(), &y_ref)
    };
    let e_f32 = err(&dev);
    dev.set_tf32(true).unwrap();
    assert!(dev.tf32());
    let e_tf32 = err(&dev);
    dev.set_tf32(false).unwrap();
    let e_back = err(&dev);
    println!("max relative error: f32 {e_f32:.1e}, TF32 {e_tf32:.1e}, f32 again {e_back:.1e}");
    assert!(e_f32 < 1e-4 && e_back < 1e-4, "{e_f32} {e_back}");
    assert!(e_tf32 < 1e-2, "TF32 error {e_tf32}");
    assert!(
        e_tf32 > 4.0 * e_f32,
        "TF32 mode changed nothing: {e_tf32} vs {e_f32}"
    );
}

#[test]
fn cuda_elementwise_ops_match_their_cpu_twins() {
    use lora_kernels::ops::elementwise as cpu;
    if !gpu_present() {
        return;
    }
    let dev = CudaDevice::open(0).expect("open cuda:0");
    let mut rng = Rng::new(5);
    for n in [1usize, 31, 1000, 70_001] {
        let x = rand(n, &mut rng)
            .iter()
            .map(|v| v * 4.0)
            .collect::<Vec<f32>>();
        let y = rand(n, &mut rng);
        let dout = rand(n, &mut rng);
        let acc0 = rand(n, &mut rng);
        let close = |name: &str, got: Vec<f32>, want: &[f32]| {
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{name} n={n} [{i}]: cuda {g} cpu {w}"
                );
            }
        };
        // Forward ops: out = f(inputs); outputs poisoned with NaN first.
        for (name, two) in [
            ("add_forward", true),
            ("gelu_forward", false),
            ("silu_forward", false),
            ("swiglu_forward", true),
        ] {
            let mut want = vec![0.0f32; n];
            match name {
                "add_forward" => cpu::add_forward(&mut want, &x, &y).unwrap(),
                "gelu_forward" => cpu::gelu_forward(&mut want, &x).unwrap(),
                "silu_forward" => cpu::silu_forward(&mut want, &x).unwrap(),
                _ => cpu::swiglu_forward(&mut want, &x, &y).unwrap(),
            }
            let mut out = dev.filled(n, f32::NAN).unwrap();
            let (xg, yg) = (dev.upload(&x).unwrap(), dev.upload(&y).unwrap());
            let ins: Vec<&_> = if two { vec![&xg, &yg] } else { vec![&xg] };
            dev.launch_elementwise(name, &mut [&mut out], &ins, n)
                .unwrap();
            close(name, dev.download(&out).unwrap(), &want);
        }
        // Backward ops accumulate into dx.
        for name in ["gelu_backward", "silu_backward"] {
            let mut want = acc0.clone();
            match name {
                "gelu_backward" => cpu::gelu_backward(&mut want, &dout, &x).unwrap(),
                _ => cpu::silu_backward(&mut want, &dout, &x).unwrap(),
            }
            let mut dx = dev.upload(&acc0).unwrap();
            let (dg, xg) = (dev.upload(&dout).unwrap(), dev.upload(&x).unwrap());
            dev.launch_elementwise(name, &mut [&mut dx], &[&dg, &xg], n)
                .unwrap();
            close(name, dev.download(&dx).unwrap(), &want);
        }
    }
}

/// Launches `name` with one block per row (or per 256 columns when `per_column`).
fn launch<'a>(
    dev: &'a CudaDevice,
    name: &str,
    rows: usize,
    per_column: Option<usize>,
    push: impl FnOnce(&mut cudarc::driver::LaunchArgs<'a>),
) {
    use cudarc::driver::LaunchConfig;
    let grid = match per_column {
        Some(c) => c.div_ceil(256) as u32,
        None => rows as u32,
    };
    let mut l = dev.stream.launch_builder(dev.func(name));
    push(&mut l);
    let cfg = LaunchConfig {
        grid_dim: (grid.max(1), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: each call site pushes the arguments in the kernel's order with sized buffers.
    unsafe { l.launch(cfg) }.unwrap();
}

#[test]
fn cuda_row_ops_match_their_cpu_twins() {
    use cudarc::driver::PushKernelArg;
    use lora_kernels::ops::{cross_entropy as ce, embedding as emb, norm, rope};
    if !gpu_present() {
        return;
    }
    let dev = CudaDevice::open(0).expect("open cuda:0");
    let mut rng = Rng::new(8);
    let close = |name: &str, got: &[f32], want: &[f32], tol: f32| {
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{name}[{i}]: cuda {g} cpu {w}"
            );
        }
    };
    for &(n, c) in &[(1usize, 1usize), (3, 7), (17, 64), (64, 769)] {
        let (ni, ci) = (n as i32, c as i32);
        let x = rand(n * c, &mut rng);
        let gamma = rand(c, &mut rng);
        let beta = rand(c, &mut rng);
        let dout = rand(n * c, &mut rng);
        let up = |v: &[f32]| dev.upload(v).unwrap();
        let (xg, gg, bg, dg) = (up(&x), up(&gamma), up(&beta), up(&dout));
        // LayerNorm forward and backward.
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        norm::layernorm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            &x,
            &gamma,
            Some(&beta),
            c,
            1e-5,
        )
        .unwrap();
        let (mut o, mut m, mut r) = (
            dev.filled(n * c, f32::NAN).unwrap(),
            dev.filled(n, f32::NAN).unwrap(),
            dev.filled(n, f32::NAN).unwrap(),
        );
        let eps = 1e-5f32;
        launch(&dev, "layernorm_forward", n, None, |l| {
            l.arg(&mut o)
                .arg(&mut m)
                .arg(&mut r)
                .arg(&xg)
                .arg(&gg)
                .arg(&bg)
                .arg(&ni)
                .arg(&ci)
                .arg(&eps);
        });
        close("layernorm out", &dev.download(&o).unwrap(), &out, 1e-5);
        close("layernorm rstd", &dev.download(&r).unwrap(), &rstd, 1e-5);
        let (mut dx, mut dgm, mut dbt) = (vec![0.1; n * c], vec![0.2; c], vec![0.3; c]);
        norm::layernorm_backward(
            Some(&mut dx),
            Some(&mut dgm),
            Some(&mut dbt),
            &dout,
            &x,
            &gamma,
            &mean,
            &rstd,
            c,
        )
        .unwrap();
        let (mut dxg, mut dgg, mut dbg) =
            (up(&vec![0.1; n * c]), up(&vec![0.2; c]), up(&vec![0.3; c]));
        let (mg, rg) = (up(&mean), up(&rstd));
        launch(&dev, "layernorm_backward", n, None, |l| {
            l.arg(&mut dxg)
                .arg(&dg)
                .arg(&xg)
                .arg(&gg)
                .arg(&mg)
                .arg(&rg)
                .arg(&ni)
                .arg(&ci);
        });
        launch(&dev, "layernorm_backward_params", n, Some(c), |l| {
            l.arg(&mut dgg)
                .arg(&mut dbg)
                .arg(&dg)
                .arg(&xg)
                .arg(&mg)
                .arg(&rg)
                .arg(&ni)
                .arg(&ci);
        });
        close("layernorm dx", &dev.download(&dxg).unwrap(), &dx, 1e-4);
        close("layernorm dgamma", &dev.download(&dgg).unwrap(), &dgm, 1e-4);
        close("layernorm dbeta", &dev.download(&dbg).unwrap(), &dbt, 1e-4);
        // RMSNorm forward and backward.
        let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        norm::rmsnorm_forward(&mut out, &mut rstd, &x, &gamma, c, 1e-6).unwrap();
        let (mut o, mut r) = (
            dev.filled(n * c, f32::NAN).unwrap(),
            dev.filled(n, f32::NAN).unwrap(),
        );
        let eps = 1e-6f32;
        launch(&dev, "rmsnorm_forward", n, None, |l| {
            l.arg(&mut o)
                .arg(&mut r)
                .arg(&xg)
                .arg(&gg)
                .arg(&ni)
                .arg(&ci)
                .arg(&eps);
        });
        close("rmsnorm out", &dev.download(&o).unwrap(), &out, 1e-5);
        let (mut dx, mut dgm) = (vec![0.1; n * c], vec![0.2; c]);
        norm::rmsnorm_backward(Some(&mut dx), Some(&mut dgm), &dout, &x, &gamma, &rstd, c).unwrap();
        let (mut dxg, mut dgg, rg) = (up(&vec![0.1; n * c]), up(&vec![0.2; c]), up(&rstd));
        launch(&dev, "rmsnorm_backward", n, None, |l| {
            l.arg(&mut dxg)
                .arg(&dg)
                .arg(&xg)
                .arg(&gg)
                .arg(&rg)
                .arg(&ni)
                .arg(&ci);
        });
        launch(&dev, "rmsnorm_backward_params", n, Some(c), |l| {
            l.arg(&mut dgg).arg(&dg).arg(&xg).arg(&rg).arg(&ni).arg(&ci);
        });
        close("rmsnorm dx", &dev.download(&dxg).unwrap(), &dx, 1e-4);
        close("rmsnorm dgamma", &dev.download(&dgg).unwrap(), &dgm, 1e-4);
        // Embedding with repeated ids.
        let v = 5usize;
        let table = rand(v * c, &mut rng);
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 3) % v as u32).collect();
        let mut out = vec![0.0; n * c];
        emb::embedding_forward(&mut out, &table, &ids, c).unwrap();
        let idg = dev.stream.clone_htod(&ids).unwrap();
        let tg = up(&table);
        let mut o = dev.filled(n * c, f32::NAN).unwrap();
        launch(&dev, "embedding_forward", n, None, |l| {
            l.arg(&mut o).arg(&tg).arg(&idg).arg(&ni).arg(&ci);
        });
        close("embedding out", &dev.download(&o).unwrap(), &out, 0.0);
        let mut dt = vec![0.5; v * c];
        emb::embedding_backward(&mut dt, &dout, &ids, c).unwrap();
        let mut dtg = up(&vec![0.5; v * c]);
        launch(&dev, "embedding_backward", n, Some(c), |l| {
            l.arg(&mut dtg).arg(&dg).arg(&idg).arg(&ni).arg(&ci);
        });
        close("embedding dtable", &dev.download(&dtg).unwrap(), &dt, 1e-6);
        // Cross-entropy over a vocabulary of c, one ignored row.
        let targets: Vec<i32> = (0..n as i32)
            .map(|i| if i == 1 { -100 } else { (i * 7) % c as i32 })
            .collect();
        let mut lse = vec![0.0; n];
        let (loss, count) = ce::cross_entropy_forward(&mut lse, &x, &targets, c).unwrap();
        let tgt = dev.stream.clone_htod(&targets).unwrap();
        let (mut lg, mut rl) = (
            dev.filled(n, f32::NAN).unwrap(),
            dev.filled(n, f32::NAN).unwrap(),
        );
        launch(&dev, "cross_entropy_forward", n, None, |l| {
            l.arg(&mut lg)
                .arg(&mut rl)
                .arg(&xg)
                .arg(&tgt)
                .arg(&ni)
                .arg(&ci);
        });
        close("lse", &dev.download(&lg).unwrap(), &lse, 1e-5);
        let total: f32 = dev.download(&rl).unwrap().iter().sum();
        if count > 0 {
            close("loss", &[total / count as f32], &[loss], 1e-5);
            let mut dl = vec![0.25; n * c];
            ce::cross_entropy_backward(&mut dl, 1.0, &x, &lse, &targets, c, count).unwrap();
            let mut dlg = up(&vec![0.25; n * c]);
            let scale = 1.0f32 / count as f32;
            launch(&dev, "cross_entropy_backward", n, None, |l| {
                l.arg(&mut dlg)
                    .arg(&xg)
                    .arg(&lg)
                    .arg(&tgt)
                    .arg(&ni)
                    .arg(&ci)
                    .arg(&scale);
            });
            close("dlogits", &dev.download(&dlg).unwrap(), &dl, 1e-5);
        }
    }
    // RoPE on (n, h, d) with positions.
    let (n, h, d) = (6usize, 3usize, 8usize);
    let x = rand(n * h * d, &mut rng);
    let (cosv, sinv) = rope::rope_tables(&rope::rope_inv_freq(d, 10000.0), 16);
    let pos: Vec<u32> = vec![0, 3, 1, 15, 7, 2];
    let mut out = vec![0.0; n * h * d];
    rope::rope_forward(&mut out, &x, &cosv, &sinv, &pos, h, d).unwrap();
    let mut dx = vec![0.5; n * h * d];
    rope::rope_backward(&mut dx, &x, &cosv, &sinv, &pos, h, d).unwrap();
    let up = |v: &[f32]| dev.upload(v).unwrap();
    let (xg, cg, sg) = (up(&x), up(&cosv), up(&sinv));
    let pg = dev.stream.clone_htod(&pos).unwrap();
    let (ni, hi, di) = (n as i32, h as i32, d as i32);
    let mut o = dev.filled(n * h * d, f32::NAN).unwrap();
    launch(&dev, "rope_forward", n, None, |l| {
        l.arg(&mut o)
            .arg(&xg)
            .arg(&cg)
            .arg(&sg)
            .arg(&pg)
            .arg(&ni)
            .arg(&hi)
            .arg(&di);
    });
    close("rope out", &dev.download(&o).unwrap(), &out, 1e-6);
    let mut dxg = up(&vec![0.5; n * h * d]);
    launch(&dev, "rope_backward", n, None, |l| {
        l.arg(&mut dxg)
            .arg(&xg)
            .arg(&cg)
            .arg(&sg)
            .arg(&pg)
            .arg(&ni)
            .arg(&hi)
            .arg(&di);
    });
    close("rope dx", &dev.download(&dxg).unwrap(), &dx, 1e-6);
}

/// GQA attention, forward (out, lse) and backward (dq, dk, dv accumulated onto random
/// values), against the CPU twin on shapes with one token, odd head dims, groups of 1-4 query
/// heads, several 32-row tiles and the largest head dim the kernels take: causal, and
/// cross-attention (S keys != T queries, unmasked) on each shape.
#[test]
fn cuda_attention_matches_its_cpu_twin() {
    use lora_kernels::cuda::ATTN_MAX_HEAD_DIM;
    use lora_kernels::ops::attention::{attention_backward, attention_forward, AttnDims};
    if !gpu_present() {
        return;
    }
    let dev = CudaDevice::open(0).expect("open cuda:0");
    let mut rng = Rng::new(21);
    let shapes = [
        (1, 1, 1, 1, 1),
        (2, 5, 4, 2, 8),
        (1, 37, 3, 1, 20),
        (2, 70, 4, 4, 33),
        (1, 150, 12, 12, 64),
        (1, 97, 8, 2, ATTN_MAX_HEAD_DIM),
    ];
    let cases = shapes.iter().flat_map(|&(b, t, hq, hkv, hd)| {
        [
            AttnDims::self_attn(b, t, (hq, hkv, hd), true),
            AttnDims {
                kv_seq: (t * 7) % 45 + 1,
                ..AttnDims::self_attn(b, t, (hq, hkv, hd), false)
            },
        ]
    });
    for d in cases {
        let scale = 1.0 / (d.head_dim as f32).sqrt();
        let nq = d.batch * d.seq * d.q_heads * d.head_dim;
        let nk = d.batch * d.kv_seq * d.kv_heads * d.head_dim;
        let (q, k, v, dout) = (
            rand(nq, &mut rng),
            rand(nk, &mut rng),
            rand(nk, &mut rng),
            rand(nq, &mut rng),
        );
        let (dq0, dk0, dv0) = (rand(nq, &mut rng), rand(nk, &mut rng), rand(nk, &mut rng));
        let (mut out, mut lse) = (vec![0.0; nq], vec![0.0; d.lse_len()]);
        attention_forward(&mut out, &mut lse, &q, &k, &v, d, scale).unwrap();
        let (mut dq, mut dk, mut dv) = (dq0.clone(), dk0.clone(), dv0.clone());
        attention_backward(&mut dq, &mut dk, &mut dv, &dout, &lse, &q, &k, &v, d, scale).unwrap();
        let up = |x: &[f32]| dev.upload(x).unwrap();
        let (qg, kg, vg, dog) = (up(&q), up(&k), up(&v), up(&dout));
        let mut og = dev.filled(nq, f32::NAN).unwrap();
        let mut lg = dev.filled(d.lse_len(), f32::NAN).unwrap();
        dev.attention_forward(&mut og, &mut lg, &qg, &kg, &vg, d, scale)
            .unwrap();
        let (mut dqg, mut dkg, mut dvg) = (up(&dq0), up(&dk0), up(&dv0));
        // The backward reads the CPU's lse: each direction is checked on its own.
        let lcpu = up(&lse);
        dev.attention_backward(
            &mut dqg, &mut dkg, &mut dvg, &dog, &lcpu, &qg, &kg, &vg, d, scale,
        )
        .unwrap();
        let tag = format!("{d:?}");
        for (name, got, want) in [
            ("out", &og, &out),
            ("lse", &lg, &lse),
            ("dq", &dqg, &dq),
            ("dk", &dkg, &dk),
            ("dv", &dvg, &dv),
        ] {
            let got = dev.download(got).unwrap();
            let want64: Vec<f64> = want.iter().map(|&w| w as f64).collect();
            let e = max_rel(&got, &want64);
            assert!(
                e <= 1e-5,
                "attention {name} {tag}: max relative error {e:.3e}"
            );
        }
    }
}

/// 16-bit weights widened on the device equal the CPU's widening bit for bit: every bf16 and
/// every f16 bit pattern (subnormals, infinities and NaNs included).
#[test]
fn cuda_widening_of_16_bit_weights_matches_the_cpu() {
    use lora_kernels::lora_linear::WeightData;
    if !gpu_present() {
        return;
    }
    let mut dev = CudaDevice::open(0).expect("open cuda:0");
    dev.poison = true;
    let all: Vec<u16> = (0..=u16::MAX).collect();
    for f16 in [false, true] {
        let mut want = vec![0.0f32; all.len()];
        let data = if f16 {
            WeightData::F16(&all)
        } else {
            WeightData::Bf16(&all)
        };
        data.widen(0, &mut want);
        let got = dev
            .download(&dev.widen(&dev.upload_bits(&all).unwrap(), f16).unwrap())
            .unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // NaN payloads may differ; everything else must be the same bits.
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "f16={f16} bits {i:#06x}: cuda {g:e} cpu {w:e}"
            );
        }
    }
}

/// GPT-2's q/k/v split: `narrow` forward (NaN-poisoned output) and backward (accumulating) against
/// the CPU twins.
#[test]
fn cuda_narrow_matches_its_cpu_twin() {
    use lora_kernels::ops::slice::{narrow_backward, narrow_forward};
    if !gpu_present() {
        return;
    }
    let dev = CudaDevice::open(0).expect("open cuda:0");
    let mut rng = Rng::new(13);
    for &(n, cols, start, len) in &[(1, 1, 0, 1), (7, 9, 3, 4), (300, 2304, 768, 768)] {
        let x = rand(n * cols, &mut rng);
        let dout = rand(n * len, &mut rng);
        let dx0 = rand(n * cols, &mut rng);
        let mut want = vec![0.0; n * len];
        narrow_forward(&mut want, &x, cols, start, len).unwrap();
        let mut out = dev.filled(n * len, f32::NAN).unwrap();
        dev.narrow(
            true,
            &mut out,
            &dev.upload(&x).unwrap(),
            n,
            cols,
            start,
            len,
        )
        .unwrap();
        assert_eq!(
            dev.download(&out).unwrap(),
            want,
            "narrow_forward {n}x{cols}"
        );
        let mut want = dx0.clone();
        narrow_backward(&mut want, &dout, cols, start, len).unwrap();
        let mut dx = dev.upload(&dx0).unwrap();
        dev.narrow(
            false,
            &mut dx,
            &dev.upload(&dout).unwrap(),
            n,
            cols,
            start,
            len,
        )
        .unwrap();
        assert_eq!(
            dev.download(&dx).unwrap(),
            want,
            "narrow_backward {n}x{cols}"
        );
    }
}
