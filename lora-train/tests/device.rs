//! The device code path without a GPU: `cuda:0` is made the host emulation of the device
//! backend (device buffers in host memory, the CPU kernels), so everything between the model and
//! the kernels — tensors moved to the device, every op's device twin and what it saves, the
//! device backward, gradient accumulation, clipping and AdamW on device buffers — runs exactly as
//! it does on a GPU, and must give what the host path gives. (The CUDA kernels themselves are
//! checked against their CPU twins by `lora-kernels/tests/cuda_parity.rs` on a GPU, and a whole
//! CUDA step against the host step by `tests/cuda_step.rs`.)

use lora_core::models::CausalLm;
use lora_core::{ops, Device, LoraConfig, Tape, Tensor};
use lora_io::hf::ModelDir;
use lora_io::safetensors::SafetensorsFile;
use lora_kernels::rng::Rng;
use lora_train::batches::Batch;
use lora_train::optim::{AdamW, Optimizer};
use lora_train::trainer::{adapter_groups, train_step};
use std::path::PathBuf;

const DEV: Device = Device::Cuda(0);

fn emulate() {
    lora_core::device::emulate_cuda(0);
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/parity")
        .join(name)
}

/// The fixture model with a rank-4 adapter (dropout 0.2, non-zero B) on every linear layer.
fn model(name: &str) -> Box<dyn CausalLm> {
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
    for (i, (_, l)) in model.linears_mut().into_iter().enumerate() {
        l.inject(&cfg, i as u64).unwrap();
    }
    let mut rng = Rng::new(5);
    for (_, l) in model.linears() {
        let b = &l.lora().unwrap().lora_b;
        let v = (0..b.numel())
            .map(|_| rng.uniform_range(-0.1, 0.1) as f32)
            .collect();
        b.set_data(v).unwrap();
    }
    model
}

fn adapters(model: &dyn CausalLm) -> Vec<Tensor> {
    model
        .linears()
        .iter()
        .flat_map(|(_, l)| {
            let l = l.lora().unwrap();
            [l.lora_a.clone(), l.lora_b.clone()]
        })
        .collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn ids(name: &str) -> (Vec<i64>, usize, usize) {
    let reference = SafetensorsFile::open(fixture(name).join("reference.safetensors")).unwrap();
    let (ids, shape) = reference.read_i64("input_ids").unwrap();
    (ids, shape[0], shape[1])
}

/// Loss, adapter gradients (as host vectors) and the tape's saved elements of one step.
fn step(model: &dyn CausalLm, name: &str, ckpt: bool) -> (f32, Vec<Vec<f32>>, usize) {
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

fn check_step(name: &str) {
    emulate();
    let host = model(name);
    let dev = model(name);
    dev.to_device(DEV).unwrap();
    for (path, l) in dev.linears() {
        for t in l.tensors() {
            assert_eq!(t.device(), DEV, "{name}: {path} not moved");
        }
    }
    let (loss_h, g_h, saved_h) = step(host.as_ref(), name, false);
    let (loss_d, g_d, saved_d) = step(dev.as_ref(), name, false);
    assert_eq!(
        loss_h.to_bits(),
        loss_d.to_bits(),
        "{name}: loss {loss_h} vs {loss_d}"
    );
    for (i, (a, b)) in g_h.iter().zip(&g_d).enumerate() {
        let e = max_rel(a, b);
        assert!(
            e <= 1e-6,
            "{name}: adapter tensor {i}: relative difference {e:.2e}"
        );
    }
    // The device tape keeps x of every adapted linear (its backward reads it for dA in the
    // same pass); otherwise it holds what the host tape holds.
    assert!(
        saved_d >= saved_h && saved_d <= 2 * saved_h,
        "{name}: {saved_h} vs {saved_d}"
    );
    // Checkpointing on the device: the same loss and gradients.
    let (loss_c, g_c, saved_c) = step(dev.as_ref(), name, true);
    assert_eq!(
        loss_h.to_bits(),
        loss_c.to_bits(),
        "{name}: checkpointed loss"
    );
    for (i, (a, b)) in g_h.iter().zip(&g_c).enumerate() {
        let e = max_rel(a, b);
        assert!(
            e <= 1e-5,
            "{name}: checkpointed adapter tensor {i}: {e:.2e}"
        );
    }
    assert!(
        saved_c * 3 < saved_d,
        "{name}: checkpointed tape {saved_c} vs {saved_d}"
    );
}

#[test]
fn gpt2_device_step_matches_the_host_step() {
    check_step("gpt2");
}

#[test]
fn llama_gqa_device_step_matches_the_host_step() {
    check_step("llama_gqa");
}

#[test]
fn qwen2_device_step_matches_the_host_step() {
    check_step("qwen2_bias");
}

#[test]
fn bf16_weights_stay_16_bit_on_the_device() {
    check_step("llama_bf16");
    emulate();
    let dev = model("llama_bf16");
    dev.to_device(DEV).unwrap();
    let (_, _, _) = step(dev.as_ref(), "llama_bf16", false);
    for (path, l) in dev.linears() {
        assert!(
            l.base().0.is_half_stored(),
            "{path}: the frozen bf16 weight was widened in device memory"
        );
    }
}

/// Three optimizer steps of two micro-batches each, with clipping, AdamW and LoRA+ groups.
#[test]
fn device_training_steps_match_host_steps() {
    emulate();
    let name = "gpt2";
    let host = model(name);
    let dev = model(name);
    dev.to_device(DEV).unwrap();
    let (ids, b, t) = ids(name);
    let micro: Vec<Batch> = (0..2)
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
        .collect();
    let run = |m: &dyn CausalLm| {
        let groups = adapter_groups(m, 4.0);
        let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.01);
        let stats: Vec<_> = (0..3)
            .map(|s| {
                train_step(m, &mut opt, &groups, &micro, 5e-3, Some(0.5), 11, s, false).unwrap()
            })
            .collect();
        let named: Vec<(String, Tensor)> = adapters(m)
            .into_iter()
            .enumerate()
            .map(|(i, t)| (format!("p{i}"), t))
            .collect();
        (stats, opt.export(&named))
    };
    let (st_h, opt_h) = run(host.as_ref());
    let (st_d, opt_d) = run(dev.as_ref());
    for (h, d) in st_h.iter().zip(&st_d) {
        assert_eq!(h.loss.to_bits(), d.loss.to_bits(), "loss {h:?} vs {d:?}");
        assert!(
            (h.grad_norm - d.grad_norm).abs() <= 1e-6 * h.grad_norm,
            "{h:?} vs {d:?}"
        );
    }
    assert!(
        st_h[0].grad_norm > 0.5,
        "clipping must have acted: {:?}",
        st_h[0]
    );
    for (a, d) in adapters(host.as_ref()).iter().zip(adapters(dev.as_ref())) {
        assert_eq!(d.device(), DEV, "the update kept the adapter on the device");
        let e = max_rel(&a.to_vec(), &d.try_to_vec().unwrap());
        assert!(e <= 1e-6, "adapter after 3 steps: {e:.2e}");
    }
    assert_eq!(opt_h.steps, opt_d.steps);
    for ((kh, vh), (kd, vd)) in opt_h.buffers.iter().zip(&opt_d.buffers) {
        assert_eq!(kh, kd);
        assert!(max_rel(vh, vd) <= 1e-5, "{kh}");
    }
}

#[test]
fn mixed_devices_and_trainable_base_weights_are_clear_errors() {
    emulate();
    let w = Tensor::new(vec![0.5; 6], &[2, 3]).unwrap();
    w.to_device(DEV).unwrap();
    let x = Tensor::new(vec![1.0; 3], &[1, 3]).unwrap();
    let tape = Tape::new(0);
    let e = ops::linear(
        &tape,
        &x,
        &w,
        lora_core::lora::WeightLayout::OutIn,
        None,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`x` is on cpu but `weight` is on cuda:0"), "{e}");
    x.to_device(DEV).unwrap();
    let y = ops::linear(
        &tape,
        &x,
        &w,
        lora_core::lora::WeightLayout::OutIn,
        None,
        None,
    )
    .unwrap();
    assert_eq!(y.device(), DEV);
    assert_eq!(y.try_to_vec().unwrap(), vec![1.5, 1.5]);
    let trainable = Tensor::param(vec![0.5; 6], &[2, 3]).unwrap();
    trainable.to_device(DEV).unwrap();
    let e = ops::linear(
        &tape,
        &x,
        &trainable,
        lora_core::lora::WeightLayout::OutIn,
        None,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("only adapters"), "{e}");
    // A host write moves the tensor back: no stale copy can be read.
    w.data_mut()[0] = 2.0;
    assert_eq!(w.device(), Device::Cpu);
    assert_eq!(w.to_vec()[0], 2.0);
}
