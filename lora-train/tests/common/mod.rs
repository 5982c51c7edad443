//! Shared by the device tests: fixture models with adapters, one step's loss and gradients.
#![allow(dead_code)]

use lora_core::models::CausalLm;
use lora_core::{LoraConfig, Tape, Tensor};
use lora_io::hf::ModelDir;
use lora_io::safetensors::SafetensorsFile;
use lora_kernels::rng::Rng;
use lora_train::batches::Batch;
use lora_train::optim::{AdamW, Optimizer, OptimizerState};
use lora_train::trainer::{adapter_groups, train_step, StepStats};
use std::path::PathBuf;

/// A parity fixture: under the source tree the binary was built from, or, when that is not
/// there (a test binary carried to a GPU machine), under `../fixtures` from the working
/// directory (`scripts/gpu-check.sh` runs it from `lora-train/`).
pub fn fixture(name: &str) -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity");
    let root = if built.exists() {
        built
    } else {
        PathBuf::from("../fixtures/parity")
    };
    root.join(name)
}

/// The fixture model with a rank-4 adapter (dropout 0.2, non-zero B) on every linear layer.
pub fn model(name: &str) -> Box<dyn CausalLm> {
    model_with(name, |_| true)
}

/// The same with adapters only on the linear layers whose path `target` accepts.
pub fn model_with(name: &str, target: impl Fn(&str) -> bool) -> Box<dyn CausalLm> {
    let mut model = ModelDir::open(fixture(name).join("model"))
        .unwrap()
        .load_model()
        .unwrap();
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.2,
        ..Default::default()
    };
    for (i, (path, l)) in model.linears_mut().into_iter().enumerate() {
        if target(&path) {
            l.inject(&cfg, i as u64).unwrap();
        }
    }
    let mut rng = Rng::new(5);
    for (_, l) in model.linears() {
        let Some(l) = l.lora() else { continue };
        let b = &l.lora_b;
        let v = (0..b.numel())
            .map(|_| rng.uniform_range(-0.1, 0.1) as f32)
            .collect();
        b.set_data(v).unwrap();
    }
    model
}

pub fn adapters(model: &dyn CausalLm) -> Vec<Tensor> {
    model
        .linears()
        .iter()
        .filter_map(|(_, l)| l.lora())
        .flat_map(|l| [l.lora_a.clone(), l.lora_b.clone()])
        .collect()
}

pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// The worst [`max_rel`] over matching tensors of two lists.
pub fn worst_rel(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| max_rel(x, y))
        .fold(0.0f32, f32::max)
}

pub fn ids(name: &str) -> (Vec<i64>, usize, usize) {
    let reference = SafetensorsFile::open(fixture(name).join("reference.safetensors")).unwrap();
    let (ids, shape) = reference.read_i64("input_ids").unwrap();
    (ids, shape[0], shape[1])
}

/// Loss, adapter gradients (as host vectors) and the tape's saved elements of one step.
pub fn step(model: &dyn CausalLm, name: &str, ckpt: bool) -> (f32, Vec<Vec<f32>>, usize) {
    let (ids, b, t) = ids(name);
    let ids_u32: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let tape = Tape::new(7).with_checkpointing(ckpt);
    let loss = model.loss(&tape, &ids_u32, &ids, b, t, true).unwrap();
    let saved = tape.saved_elems();
    let grads = tape.backward(&loss).unwrap();
    let g = adapters(model)
        .iter()
        .map(|p| grads.to_vec(p).unwrap().expect("adapter gradient"))
        .collect();
    (loss.try_to_vec().unwrap()[0], g, saved)
}

/// Two micro-batches of the fixture's reference ids (the second shifted).
pub fn micro_batches(name: &str) -> Vec<Batch> {
    let (ids, b, t) = ids(name);
    (0..2)
        .map(|k| {
            let ids: Vec<u32> = ids.iter().map(|&x| (x as u32 + k) % 100).collect();
            let labels = ids.iter().map(|&x| x as i64).collect();
            Batch {
                ids,
                labels,
                batch: b,
                seq: t,
            }
        })
        .collect()
}

/// Three optimizer steps (AdamW, weight decay, LoRA+ groups, clipping at 0.5) over `micro`:
/// the step statistics and the optimizer state.
pub fn three_steps(m: &dyn CausalLm, micro: &[Batch]) -> (Vec<StepStats>, OptimizerState) {
    let groups = adapter_groups(m, 4.0);
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.01);
    let stats: Vec<_> = (0..3)
        .map(|s| train_step(m, &mut opt, &groups, micro, 5e-3, Some(0.5), 11, s, false).unwrap())
        .collect();
    let named: Vec<(String, Tensor)> = adapters(m)
        .into_iter()
        .enumerate()
        .map(|(i, t)| (format!("p{i}"), t))
        .collect();
    (stats, opt.export(&named).unwrap())
}
