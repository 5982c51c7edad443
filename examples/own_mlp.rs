//! Your own model, adapted with LoRA: a two-layer MLP whose "pretrained" weights are plain
//! `Vec<f32>`s, fine-tuned on a new synthetic task with rank-4 adapters (AdamW from
//! lora-train), saved as a PEFT adapter, then merged into the weights.
//!
//! `cargo run --release -p lora-examples --example own_mlp`

use lora_core::lora::WeightLayout;
use lora_core::{ops, LoraConfig, LoraLinear, Tape, Tensor};
use lora_io::peft::{save_layers, PeftConfig};
use lora_train::optim::{AdamW, Optimizer, ParamGroup};
use std::error::Error;

/// A tiny deterministic normal generator (Box-Muller over a 64-bit LCG).
struct Gauss(u64);
impl Gauss {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v) = (self.uniform(), self.uniform());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * std) as f32
            })
            .collect()
    }
}

struct Mlp {
    fc1: LoraLinear,
    fc2: LoraLinear,
}

impl Mlp {
    fn forward(&self, tape: &Tape, x: &Tensor) -> lora_core::Result<Tensor> {
        let h = ops::gelu(tape, &self.fc1.forward(tape, x)?)?;
        self.fc2.forward(tape, &h)
    }

    fn accuracy(&self, x: &Tensor, labels: &[i32]) -> lora_core::Result<f64> {
        let logits = self.forward(&Tape::inference(), x)?.to_vec();
        let k = logits.len() / labels.len();
        let hits = labels
            .iter()
            .enumerate()
            .filter(|(i, &l)| {
                let row = &logits[i * k..(i + 1) * k];
                let best = (0..k).fold(0, |b, j| if row[j] > row[b] { j } else { b });
                best as i32 == l
            })
            .count();
        Ok(hits as f64 / labels.len() as f64)
    }
}

/// Inputs and labels of the new task: the class is the argmax of a fixed projection of x.
fn task(g: &mut Gauss, teacher: &[f32], n: usize, inp: usize) -> (Tensor, Vec<i32>) {
    let x = g.vec(n * inp, 1.0);
    let classes = teacher.len() / inp;
    let labels = (0..n)
        .map(|i| {
            let score = |c: usize| -> f32 {
                (0..inp)
                    .map(|j| teacher[c * inp + j] * x[i * inp + j])
                    .sum()
            };
            (0..classes).fold(0, |b, c| if score(c) > score(b) { c } else { b }) as i32
        })
        .collect();
    (Tensor::new(x, &[n, inp]).expect("shape"), labels)
}

fn main() -> Result<(), Box<dyn Error>> {
    let (inp, hidden, classes) = (16, 64, 4);
    let mut g = Gauss(7);
    // The pretrained weights: any f32 buffers you own (or a safetensors tensor). Frozen.
    let w1 = Tensor::new(g.vec(hidden * inp, 0.3), &[hidden, inp])?;
    let b1 = Tensor::new(vec![0.0; hidden], &[hidden])?;
    let w2 = Tensor::new(g.vec(classes * hidden, 0.1), &[classes, hidden])?;
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let mut mlp = Mlp {
        fc1: LoraLinear::new(w1, WeightLayout::OutIn, Some(b1), &cfg, 1)?,
        fc2: LoraLinear::new(w2, WeightLayout::OutIn, None, &cfg, 2)?,
    };

    let teacher = g.vec(classes * inp, 1.0);
    let (x_test, y_test) = task(&mut g, &teacher, 512, inp);
    let before = mlp.accuracy(&x_test, &y_test)?;

    // Only A and B of each layer are optimized; the frozen weights get no gradient at all.
    let groups = [ParamGroup {
        params: vec![
            mlp.fc1.lora_a.clone(),
            mlp.fc1.lora_b.clone(),
            mlp.fc2.lora_a.clone(),
            mlp.fc2.lora_b.clone(),
        ],
        lr_scale: 1.0,
    }];
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
    for step in 0..400 {
        let (x, y) = task(&mut g, &teacher, 64, inp);
        let tape = Tape::new(step);
        let loss = ops::cross_entropy(&tape, &mlp.forward(&tape, &x)?, &y)?;
        let grads = tape.backward(&loss)?;
        assert!(grads.get(&mlp.fc1.weight).is_none());
        opt.step(&groups, &grads, 1e-2)?;
        if step % 100 == 0 {
            println!("step {step:>3}: loss {:.4}", loss.scalar()?);
        }
    }
    let after = mlp.accuracy(&x_test, &y_test)?;
    println!(
        "held-out accuracy: {:.1}% before, {:.1}% after",
        100.0 * before,
        100.0 * after
    );
    if after < 0.85 || after < before + 0.3 {
        return Err(format!("the adapter did not learn the task ({before} -> {after})").into());
    }

    // A PEFT adapter directory: `PeftModel.from_pretrained(model, dir)` loads it onto a PyTorch
    // module with submodules `fc1` and `fc2`.
    let dir = std::env::temp_dir().join("lora-example-own-mlp");
    save_layers(
        &[("fc1".into(), &mlp.fc1), ("fc2".into(), &mlp.fc2)],
        &PeftConfig::new(4, 8.0, &["fc1", "fc2"]),
        &dir,
    )?;
    println!("adapter written to {}", dir.display());

    // Merging folds s * B A into W: same outputs, no adapter cost at inference.
    let unmerged = mlp.forward(&Tape::inference(), &x_test)?.to_vec();
    mlp.fc1.merge()?;
    mlp.fc2.merge()?;
    let merged = mlp.forward(&Tape::inference(), &x_test)?.to_vec();
    let diff = unmerged
        .iter()
        .zip(&merged)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("merged vs unmerged logits: max |diff| = {diff:.2e}");
    if diff > 1e-4 {
        return Err(format!("merged output differs by {diff}").into());
    }
    Ok(())
}

#[test]
fn example_runs() {
    main().unwrap();
}
