//! Single-file Stable Diffusion checkpoints (fixtures/parity/make_sd_single_file.py, whose files
//! diffusers' `from_single_file` was checked to load into the same models): SD 1.x's layout
//! generates exactly what the same pipeline does from its diffusers directory, SD 2.x's (OpenCLIP
//! with fused attention and a skipped last block, linear projections, v-prediction) what diffusers
//! generates from the single file; the configurations inferred from SD 1.5's and SD 2.1's real
//! key/shape lists are their released configs, and every tensor of those lists has its place.

use lora_core::diffusion::{decode_latents, denoise, to_u8, Conditioning};
use lora_core::models::clip_text::ClipTextModel;
use lora_core::models::unet::{BlockKind, UNet2DCondition};
use lora_core::models::vae::AutoencoderKl;
use lora_core::{ExternalHalf, HalfFormat, Tensor};
use lora_io::safetensors::SafetensorsFile;
use lora_io::sd::{Layout, SdPipeline};
use lora_io::sd_single::{infer_configs, Family, KeyLayout, Part, Shapes};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity")
}

/// Images (B, 3, H, W) generated with Euler at guidance 7.5 from `noise`.
fn generate(
    pipe: &SdPipeline,
    prompts: &[&str],
    negative: &str,
    noise: &[f32],
    steps: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let shape = pipe.latent_shape(prompts.len(), h, w).unwrap();
    let cond = pipe.encode_prompts(prompts, 0).unwrap();
    let negs = vec![negative; prompts.len()];
    let uncond = pipe.encode_prompts(&negs, 0).unwrap();
    let mut sampler = pipe.sampler("euler".parse().unwrap(), steps).unwrap();
    let c = Conditioning {
        cond: &cond,
        uncond: &uncond,
        guidance: 7.5,
    };
    let latents = denoise(
        &pipe.unet,
        sampler.as_mut(),
        noise,
        shape,
        &c,
        false,
        &mut |_, _| {},
    )
    .unwrap();
    decode_latents(&pipe.vae, &latents, shape).unwrap()
}

/// The largest difference (in [0, 1] and in 8-bit steps) between ours (B, 3, H, W) and
/// diffusers' numpy output (B, H, W, 3).
fn worst(ours: &[f32], theirs: &[f32], b: usize, h: usize, w: usize) -> (f32, u8) {
    let (mut worst, mut worst_u8) = (0.0f32, 0u8);
    for n in 0..b {
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let g = ours[((n * 3 + c) * h + y) * w + x];
                    let t = theirs[((n * h + y) * w + x) * 3 + c];
                    worst = worst.max((g - t).abs());
                    worst_u8 = worst_u8.max(to_u8(g).abs_diff(to_u8(t)));
                }
            }
        }
    }
    (worst, worst_u8)
}

#[test]
fn sd1_single_file_generates_what_its_diffusers_directory_does() {
    let dir = fixtures().join("sd_pipeline");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let prompts: Vec<&str> = cases["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let negative = cases["negative_prompt"].as_str().unwrap();
    let euler = &cases["cases"][0];
    assert_eq!(euler["scheduler"], "euler");
    let steps = euler["steps"].as_u64().unwrap() as usize;
    let r = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    let (noise, _) = r.read_f32("latents").unwrap();
    let file = fixtures().join("sd_single/sd1.safetensors");
    let single = SdPipeline::open_single(&file, Some(&dir.join("model"))).unwrap();
    assert_eq!(
        single.layout,
        Layout::SingleFile {
            config: Some(dir.join("model"))
        }
    );
    let from_dir = SdPipeline::open(&dir.join("model")).unwrap();
    let a = generate(&single, &prompts, negative, &noise, steps, 24, 16);
    let b = generate(&from_dir, &prompts, negative, &noise, steps, 24, 16);
    // The same fp16 values through the same code: bit for bit.
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    let (want, _) = r.read_f32("euler.images").unwrap();
    let (d, d8) = worst(&a, &want, 2, 24, 16);
    eprintln!("sd1 single file vs diffusers: max |diff| {d:.2e}, {d8}/255");
    assert!(d8 <= 2, "{d8}/255");
}

#[test]
fn sd2_single_file_generates_what_diffusers_does() {
    let dir = fixtures().join("sd_single");
    let pipe = SdPipeline::open_single(&dir.join("sd2.safetensors"), Some(&dir.join("sd2_config")))
        .unwrap();
    assert!(pipe.unet.config().use_linear_projection);
    assert_eq!(pipe.text_encoder.config().num_hidden_layers, 23);
    let r = SafetensorsFile::open(dir.join("sd2_reference.safetensors")).unwrap();
    let (noise, _) = r.read_f32("latents").unwrap();
    let img = generate(
        &pipe,
        &[
            "a red fox in the snow",
            "a photograph of an astronaut riding a horse",
        ],
        "blurry",
        &noise,
        5,
        16,
        16,
    );
    let (want, _) = r.read_f32("images").unwrap();
    let (d, d8) = worst(&img, &want, 2, 16, 16);
    eprintln!("sd2 single file vs diffusers: max |diff| {d:.2e}, {d8}/255");
    assert!(d8 <= 2, "{d8}/255");
}

/// Zero-filled 16-bit weights that cost no memory until read (calloc'd pages).
struct Zeros(Arc<Vec<u16>>, usize);
impl ExternalHalf for Zeros {
    fn bits(&self) -> &[u16] {
        &self.0[..self.1]
    }
    fn format(&self) -> HalfFormat {
        HalfFormat::F16
    }
}

fn layouts() -> serde_json::Value {
    let p = fixtures().join("sd_single/layouts.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn shapes(v: &serde_json::Value) -> Shapes {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            let s = s
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k.clone(), s)
        })
        .collect()
}

/// Builds the three models of `cfgs` on zero weights, each parameter located in `shapes`;
/// returns the keys used.
fn place_every_parameter(
    path: &Path,
    layout: &KeyLayout,
    cfgs: &lora_io::sd_single::Configs,
    shapes: &Shapes,
) -> HashSet<String> {
    let zeros = Arc::new(vec![
        0u16;
        shapes
            .values()
            .map(|s| s.iter().product::<usize>())
            .max()
            .unwrap()
    ]);
    let mut used = HashSet::new();
    let mut loader = |part: Part| {
        let zeros = zeros.clone();
        let used = &mut used as *mut HashSet<String>;
        move |name: &str, shape: &[usize]| -> lora_io::error::Result<Tensor> {
            let s = layout.find(path, part, name, shape, cfgs, |k| shapes.get(k).cloned())?;
            // SAFETY: the loaders run one after another on this thread, never together.
            unsafe { (*used).insert(s.key) };
            let n = shape.iter().product();
            Ok(Tensor::from_external_half(
                Arc::new(Zeros(zeros.clone(), n)),
                shape,
            )?)
        }
    };
    ClipTextModel::load(&cfgs.text, &mut loader(Part::TextEncoder)).unwrap();
    UNet2DCondition::load(&cfgs.unet, &mut loader(Part::Unet)).unwrap();
    AutoencoderKl::load(&cfgs.vae, &mut loader(Part::Vae)).unwrap();
    used
}

#[test]
fn sd15_and_sd21_configs_are_inferred_and_every_tensor_has_its_place() {
    let all = layouts();
    for (name, family, cross, linear, heads, text) in [
        (
            "sd15",
            Family::Sd1,
            768,
            false,
            vec![8, 8, 8, 8],
            (768, 12, 12),
        ),
        (
            "sd21",
            Family::Sd2,
            1024,
            true,
            vec![5, 10, 20, 20],
            (1024, 23, 16),
        ),
    ] {
        let shapes = shapes(&all[name]);
        let path = Path::new(name);
        let names: Vec<&str> = shapes.keys().map(String::as_str).collect();
        let layout = KeyLayout::detect(path, &names).unwrap();
        let cfgs = infer_configs(path, &layout, &shapes).unwrap();
        assert_eq!(cfgs.family, Some(family));
        let u = &cfgs.unet;
        assert_eq!(u.block_out_channels, [320, 640, 1280, 1280]);
        assert_eq!(u.layers_per_block, [2; 4]);
        assert_eq!(u.transformer_layers, [1; 4]);
        assert_eq!(u.heads, heads);
        assert_eq!(u.cross_attention_dim, cross);
        assert_eq!(u.use_linear_projection, linear);
        assert_eq!(
            (u.in_channels, u.out_channels, u.norm_num_groups),
            (4, 4, 32)
        );
        use BlockKind::{CrossAttn, Plain};
        assert_eq!(u.down_blocks, [CrossAttn, CrossAttn, CrossAttn, Plain]);
        assert_eq!(u.up_blocks, [Plain, CrossAttn, CrossAttn, CrossAttn]);
        let v = &cfgs.vae;
        assert_eq!(v.block_out_channels, [128, 256, 512, 512]);
        assert_eq!(
            (v.layers_per_block, v.latent_channels, v.scaling_factor),
            (2, 4, 0.18215)
        );
        let t = &cfgs.text;
        assert_eq!(
            (t.hidden_size, t.num_hidden_layers, t.num_attention_heads),
            text
        );
        assert_eq!((t.vocab_size, t.max_position_embeddings), (49408, 77));
        let prediction = cfgs.scheduler["prediction_type"].as_str().unwrap();
        assert_eq!(
            prediction,
            if family == Family::Sd2 {
                "v_prediction"
            } else {
                "epsilon"
            }
        );
        // Every stored tensor is read by the models, or is one the pipelines leave unused.
        let used = place_every_parameter(path, &layout, &cfgs, &shapes);
        let left: Vec<&str> = names
            .iter()
            .copied()
            .filter(|k| !used.contains(*k) && !layout.ignorable(k, t.num_hidden_layers))
            .filter(|k| !matches!(*k, "alphas_cumprod" | "model_ema.decay"))
            .collect();
        assert!(left.is_empty(), "{name}: unplaced {left:?}");
    }
}

#[test]
fn files_that_are_not_sd_checkpoints_are_refused_by_name() {
    let p = Path::new("x.safetensors");
    let sdxl = [
        "conditioner.embedders.0.transformer.text_model.x",
        "model.diffusion_model.x",
    ];
    let e = KeyLayout::detect(p, &sdxl).unwrap_err().to_string();
    assert!(e.contains("SDXL"), "{e}");
    let lora = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"];
    let e = KeyLayout::detect(p, &lora).unwrap_err().to_string();
    assert!(
        e.contains("model.diffusion_model.") && e.contains("no UNet"),
        "{e}"
    );
    let unet_only = ["model.diffusion_model.input_blocks.0.0.weight"];
    let e = KeyLayout::detect(p, &unet_only).unwrap_err().to_string();
    assert!(e.contains("no VAE"), "{e}");
    // A file whose config does not fit: the single file read with another family's configs.
    let dir = fixtures().join("sd_single");
    let e = SdPipeline::open_single(
        &dir.join("sd2.safetensors"),
        Some(&fixtures().join("sd_pipeline/model")),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("sd2.safetensors"), "{e}");
    // Unknown widths: inference refuses to guess head counts.
    let e = SdPipeline::open(&dir.join("sd2.safetensors"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--sd-config"), "{e}");
}
