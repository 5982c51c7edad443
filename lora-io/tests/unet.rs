//! Stable Diffusion's UNet against diffusers (fixtures/parity/make_unet.py): two tiny random
//! `UNet2DConditionModel`s, laid out as SD 1.x's (1x1-convolution projections, three levels,
//! two layers per block) and SD 2.x's (linear projections, per-block head lists, two transformer
//! layers per block), loaded from fp16 `unet/` directories; the noise prediction for two latents
//! at two timesteps conditioned on 7 text tokens. Bad configs are named errors.

use lora_core::{Tape, Tensor};
use lora_io::diffusion::{load_unet, read_unet_config};
use lora_io::safetensors::SafetensorsFile;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/unet")
}

fn tensor(r: &SafetensorsFile, key: &str) -> Tensor {
    let (v, shape) = r.read_f32(key).unwrap();
    Tensor::new(v, &shape).unwrap()
}

/// Latent sides that are not multiples of 2^(levels - 1) (a 600x800 image's 75x100): each up
/// level matched to its skip connection's size as diffusers' `upsample_size` does
/// (fixtures/parity/make_unet_odd.py), and the gradient flows through the crop.
#[test]
fn unet_prediction_at_odd_sizes_matches_diffusers() {
    let r = SafetensorsFile::open(dir().join("odd.safetensors")).unwrap();
    for name in ["sd1", "sd2"] {
        let model = load_unet(&dir().join(name)).unwrap();
        let sample = tensor(&r, &format!("{name}.sample"));
        let context = tensor(&r, &format!("{name}.context"));
        let (ts, _) = r.read_f32(&format!("{name}.timesteps")).unwrap();
        let out = model
            .forward(&Tape::inference(), &sample, &ts, &context, false)
            .unwrap();
        assert_eq!(out.shape(), sample.shape());
        let (want, _) = r.read_f32(&format!("{name}.out")).unwrap();
        let got = out.try_to_vec().unwrap();
        let scale = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
        eprintln!(
            "{name} at {:?}: worst difference {worst:.2e}",
            sample.shape()
        );
        assert!(worst <= 1e-5 * scale.max(1.0), "{name}: {worst:.2e}");
        // Gradients reach the input through the cropped upsamplings.
        let x = Tensor::param(sample.try_to_vec().unwrap(), sample.shape()).unwrap();
        let tape = Tape::new(0);
        let y = model.forward(&tape, &x, &ts, &context, false).unwrap();
        let zero = Tensor::zeros(y.shape()).unwrap();
        let loss = lora_core::ops::mse_loss(&tape, &y, &zero, None).unwrap();
        let g = tape.backward(&loss).unwrap();
        let gx = g.to_vec(&x).unwrap().unwrap();
        assert!(gx.iter().all(|v| v.is_finite()) && gx.iter().any(|v| *v != 0.0));
    }
}

#[test]
fn unet_prediction_matches_diffusers() {
    let r = SafetensorsFile::open(dir().join("reference.safetensors")).unwrap();
    for name in ["sd1", "sd2"] {
        let model = load_unet(&dir().join(name)).unwrap();
        let sample = tensor(&r, &format!("{name}.sample"));
        let context = tensor(&r, &format!("{name}.context"));
        let (ts, _) = r.read_f32(&format!("{name}.timesteps")).unwrap();
        let out = model
            .forward(&Tape::inference(), &sample, &ts, &context, false)
            .unwrap();
        assert_eq!(out.shape(), sample.shape());
        let got = out.try_to_vec().unwrap();
        let (want, _) = r.read_f32(&format!("{name}.out")).unwrap();
        let scale = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
        eprintln!("{name}: worst difference {worst:.2e}, outputs up to {scale:.3}");
        // f32 rounding through ~40 layers (group norms, attention, convolutions); seen: 1.0e-6
        // (sd1) and 8.3e-7 (sd2) on outputs up to 1.4.
        assert!(
            worst <= 1e-5 * scale.max(1.0),
            "{name}: worst difference {worst:.2e} (outputs up to {scale:.2})"
        );
        // One timestep for the whole batch means that timestep for each image.
        let one = model
            .forward(&Tape::inference(), &sample, &ts[..1], &context, false)
            .unwrap();
        let both = model
            .forward(
                &Tape::inference(),
                &sample,
                &[ts[0], ts[0]],
                &context,
                false,
            )
            .unwrap();
        assert_eq!(one.try_to_vec().unwrap(), both.try_to_vec().unwrap());
    }
}

#[test]
fn unet_config_and_input_errors_are_named() {
    let src = dir().join("sd1");
    let cfg_text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let tmp = std::env::temp_dir().join(format!("lora-unet-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let with = |field: &str, value: &str| -> String {
        let mut v: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        let p = tmp.join("config.json");
        std::fs::write(&p, v.to_string()).unwrap();
        read_unet_config(&p).unwrap_err().to_string()
    };
    for (field, value) in [
        ("addition_embed_type", "\"text_time\""),
        ("resnet_time_scale_shift", "\"scale_shift\""),
        (
            "down_block_types",
            "[\"SimpleCrossAttnDownBlock2D\", \"CrossAttnDownBlock2D\", \"DownBlock2D\"]",
        ),
        ("attention_head_dim", "[2, 3]"),
        ("attention_head_dim", "3"),
        ("norm_num_groups", "5"),
        ("layers_per_block", "-1"),
        ("mid_block_type", "\"UNetMidBlock2DSimpleCrossAttn\""),
    ] {
        let e = with(field, value);
        assert!(
            e.contains(field) && e.contains("config.json"),
            "{field}: {e}"
        );
    }
    // An empty sample, a wrong channel count, and a context of the wrong width.
    let model = load_unet(&src).unwrap();
    let ctx = Tensor::new(vec![0.0; 2 * 3 * 24], &[2, 3, 24]).unwrap();
    for shape in [[2, 4, 0, 8], [2, 3, 8, 8]] {
        let n: usize = shape.iter().product();
        let bad = Tensor::new(vec![0.0; n], &shape).unwrap();
        let e = model
            .forward(&Tape::inference(), &bad, &[1.0], &ctx, false)
            .unwrap_err();
        assert!(e.to_string().contains("H, W >= 1"), "{e}");
    }
    let x = Tensor::new(vec![0.0; 2 * 4 * 8 * 8], &[2, 4, 8, 8]).unwrap();
    let bad_ctx = Tensor::new(vec![0.0; 2 * 3 * 5], &[2, 3, 5]).unwrap();
    let e = model
        .forward(&Tape::inference(), &x, &[1.0], &bad_ctx, false)
        .unwrap_err();
    assert!(e.to_string().contains("encoder_hidden_states"), "{e}");
    let e = model
        .forward(&Tape::inference(), &x, &[1.0, 2.0, 3.0], &ctx, false)
        .unwrap_err();
    assert!(e.to_string().contains("timesteps"), "{e}");
    // SD 1.4/1.5's configs (diffusers 0.6) have no `mid_block_type`: the default mid block;
    // an explicit null has none, and then the mid block's weights are unused (named).
    let legacy = tmp.join("legacy");
    std::fs::create_dir_all(&legacy).unwrap();
    copy(&src, &legacy, "diffusion_pytorch_model.safetensors");
    let mut v: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    v.as_object_mut().unwrap().remove("mid_block_type");
    std::fs::write(legacy.join("config.json"), v.to_string()).unwrap();
    let a = load_unet(&legacy).unwrap();
    let b = load_unet(&src).unwrap();
    let ts = [10.0f32];
    let run = |m: &lora_core::models::unet::UNet2DCondition| {
        m.forward(&Tape::inference(), &x, &ts, &ctx, false)
            .unwrap()
            .try_to_vec()
            .unwrap()
    };
    assert_eq!(run(&a), run(&b));
    v["mid_block_type"] = serde_json::Value::Null;
    std::fs::write(legacy.join("config.json"), v.to_string()).unwrap();
    let e = load_unet(&legacy).err().unwrap().to_string();
    assert!(
        e.contains("mid_block.") && e.contains("diffusion_pytorch_model"),
        "{e}"
    );
    // A checkpoint with weights the config does not use (a config with fewer layers).
    let fewer = tmp.join("fewer");
    std::fs::create_dir_all(&fewer).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    v["layers_per_block"] = 1.into();
    std::fs::write(fewer.join("config.json"), v.to_string()).unwrap();
    copy(&src, &fewer, "diffusion_pytorch_model.safetensors");
    let e = load_unet(&fewer).err().unwrap().to_string();
    assert!(e.contains("does not use") || e.contains("shape"), "{e}");
    std::fs::remove_dir_all(&tmp).ok();
}

fn copy(from: &Path, to: &Path, name: &str) {
    std::fs::copy(from.join(name), to.join(name)).unwrap();
}

/// Training gradients against torch + PEFT (fixtures/parity/make_unet_lora_grad.py): LoRA on the
/// attention projections, `proj_in` (1x1 convolution) and every ResNet `conv1` (3x3, LoCon),
/// the same A and B, the loss `mse(unet(noisy, t, context), target)`: the loss and the gradient
/// of every A and B agree.
#[test]
fn unet_lora_gradients_match_torch_and_peft() {
    use lora_core::lora::LoraConfig;
    let r = SafetensorsFile::open(dir().join("reference.safetensors")).unwrap();
    let g = SafetensorsFile::open(dir().join("lora_grad.safetensors")).unwrap();
    let mut model = load_unet(&dir().join("sd1")).unwrap();
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let targets: Vec<String> = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let n = model.inject_lora(&cfg, &targets, 0).unwrap();
    let tensors = model.lora_tensors();
    assert_eq!(tensors.len(), 2 * n);
    assert_eq!(tensors.len(), 232, "PEFT adapted as many layers");
    for (name, t) in &tensors {
        let (v, shape) = g.read_f32(name).unwrap();
        assert_eq!(&shape, t.shape(), "{name}");
        t.set_data(v).unwrap();
    }
    let sample = tensor(&r, "sd1.sample");
    let context = tensor(&r, "sd1.context");
    let (ts, _) = r.read_f32("sd1.timesteps").unwrap();
    let target = tensor(&g, "target");
    let tape = Tape::new(0);
    let pred = model.forward(&tape, &sample, &ts, &context, true).unwrap();
    let loss = lora_core::ops::mse_loss(&tape, &pred, &target, None).unwrap();
    let (want_loss, _) = g.read_f32("loss").unwrap();
    let got_loss = loss.try_to_vec().unwrap()[0];
    assert!(
        (got_loss - want_loss[0]).abs() < 1e-5,
        "loss {got_loss} vs {}",
        want_loss[0]
    );
    let grads = tape.backward(&loss).unwrap();
    let mut worst = (0.0f32, String::new());
    for (name, t) in &tensors {
        let got = grads.to_vec(t).unwrap().expect("a gradient");
        let (want, _) = g.read_f32(&format!("grad.{name}")).unwrap();
        let scale = want.iter().fold(0.0f32, |m, w| m.max(w.abs())).max(1e-3);
        let e = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    eprintln!(
        "worst relative gradient difference {:.2e} ({})",
        worst.0, worst.1
    );
    // Seen: 2.7e-6 (relative to each tensor's largest gradient).
    assert!(worst.0 < 2e-5, "{}: {:.2e}", worst.1, worst.0);
}
