//! The CUDA LoRA linear against the f64 oracle (`lora_linear::reference`, the same oracle the
//! CPU kernel is tested against) on seeded random shapes: rank 1, one token, odd dims, both
//! weight layouts, with and without bias and dropout. Outputs are NaN-poisoned before each run
//! (`CudaDevice::poison`), so an element a kernel fails to write fails the test. Needs a GPU: where no CUDA device answers, it says it was skipped.
//! On a GPU machine: `scripts/gpu-check.sh` runs it from a prebuilt binary.
#![cfg(feature = "cuda")]

use lora_kernels::cuda::{device_count, CudaDevice, LoraDims};
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
    if device_count() == 0 {
        println!("SKIPPED: no CUDA device answers on this machine");
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
    ];
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
                let [dx, da, dbb, db] = dev
                    .lora_backward(&dyg, &xg, &wg, layout, &ag, &bbg, &u, d)
                    .unwrap();
                let tag = format!("n{n} k{k} m{m} r{r} {layout:?} bias={with_bias} p={p}");
                for (name, got, want) in [
                    ("y", dev.download(&y).unwrap(), &y_ref),
                    ("dx", dev.download(&dx).unwrap(), &dx_ref),
                    ("dA", dev.download(&da).unwrap(), &da_ref),
                    ("dB", dev.download(&dbb).unwrap(), &dbb_ref),
                    ("dbias", dev.download(&db).unwrap(), &db_ref),
                ] {
                    let e = max_rel(&got, want);
                    assert!(e < 1e-4, "{tag}: {name} relative error {e}");
                }
            }
        }
    }
}

#[test]
fn cuda_elementwise_ops_match_their_cpu_twins() {
    use lora_kernels::ops::elementwise as cpu;
    if device_count() == 0 {
        println!("SKIPPED: no CUDA device answers on this machine");
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
