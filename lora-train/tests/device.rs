//! The device code path without a GPU: `cuda:0` is made the host emulation of the device
//! backend (device buffers in host memory, the CPU kernels), so everything between the model and
//! the kernels — tensors moved to the device, every op's device twin and what it saves, the
//! device backward, gradient accumulation, clipping and AdamW on device buffers — runs exactly as
//! it does on a GPU, and must give what the host path gives. (The CUDA kernels themselves are
//! checked against their CPU twins by `lora-kernels/tests/cuda_parity.rs` on a GPU, and a whole
//! CUDA step against the host step by `tests/cuda_step.rs`.)

mod common;

use common::{adapters, max_rel, micro_batches, model, model_with, step, three_steps, worst_rel};
use lora_core::models::CausalLm;
use lora_core::{ops, Device, Tape, Tensor};

const DEV: Device = Device::Cuda(0);

fn emulate() {
    lora_core::device::emulate_cuda(0);
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
    let e = worst_rel(&g_h, &g_d);
    assert!(
        e <= 1e-6,
        "{name}: adapter gradients: relative difference {e:.2e}"
    );
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
    let e = worst_rel(&g_h, &g_c);
    assert!(e <= 1e-5, "{name}: checkpointed adapter gradients: {e:.2e}");
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

/// Adapters on q_proj only: in the first layer k and v need no gradient, so the attention
/// backward writes scratch buffers for them.
#[test]
fn partial_adapters_device_step_matches_the_host_step() {
    emulate();
    let name = "llama_gqa";
    let host = model_with(name, |p| p.ends_with("q_proj"));
    let dev = model_with(name, |p| p.ends_with("q_proj"));
    dev.to_device(DEV).unwrap();
    let (loss_h, g_h, _) = step(host.as_ref(), name, false);
    let (loss_d, g_d, _) = step(dev.as_ref(), name, false);
    assert_eq!(loss_h.to_bits(), loss_d.to_bits());
    assert_eq!(g_h.len(), 2 * 2, "two layers, A and B");
    assert!(worst_rel(&g_h, &g_d) <= 1e-6);
}

#[test]
fn llama3_rope_scaling_and_mistral_device_steps_match_the_host_steps() {
    check_step("llama3_rope");
    check_step("mistral");
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
    let micro = micro_batches(name);
    let run = |m: &dyn CausalLm| three_steps(m, &micro);
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

/// The gradient-norm sums asked for together (one wait per device) equal the one-by-one sums,
/// in the caller's order, with host gradients, device gradients and tensors without a gradient
/// interleaved.
#[test]
fn gradient_sums_of_squares_together_equal_one_by_one() {
    emulate();
    let name = "gpt2";
    let dev = model(name);
    dev.to_device(DEV).unwrap();
    let (ids, b, t) = common::ids(name);
    let ids_u32: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let tape = Tape::new(3);
    let loss = dev.loss(&tape, &ids_u32, &ids, b, t, true).unwrap();
    let mut grads = tape.backward(&loss).unwrap();
    let host = Tensor::param(vec![0.0; 4], &[4]).unwrap();
    grads.set(&host, vec![1.0, -2.0, 3.0, 0.5]).unwrap();
    let missing = Tensor::param(vec![0.0; 2], &[2]).unwrap();
    let mut ts = adapters(dev.as_ref());
    assert!(ts.len() >= 2);
    ts.insert(1, host.clone());
    ts.insert(3, missing);
    let together = grads.sum_squares_many(&ts).unwrap();
    let one_by_one: Vec<Option<f64>> = ts.iter().map(|t| grads.sum_squares(t).unwrap()).collect();
    assert_eq!(together, one_by_one);
    assert_eq!(together[1], Some(1.0 + 4.0 + 9.0 + 0.25));
    assert_eq!(together[3], None);
    assert!(
        together
            .iter()
            .filter(|v| v.is_some_and(|s| s > 0.0))
            .count()
            >= 3
    );
}
