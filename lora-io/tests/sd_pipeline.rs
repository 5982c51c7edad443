//! A whole Stable Diffusion generation against diffusers (fixtures/parity/make_sd_pipeline.py): a
//! tiny random pipeline directory (fp16 weights), the same initial latents, two prompts with a
//! negative prompt at guidance 7.5 with each sampler (Euler, DDIM, DPM++ 2M) and one unguided
//! run: the images agree within 2/255 per pixel (the bar); the figures seen are far
//! tighter.

use lora_core::diffusion::{decode_latents, denoise, to_u8, Conditioning};
use lora_io::safetensors::SafetensorsFile;
use lora_io::sd::SdPipeline;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/sd_pipeline")
}

#[test]
fn generation_matches_diffusers_for_each_sampler() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    let r = SafetensorsFile::open(dir().join("reference.safetensors")).unwrap();
    let pipe = SdPipeline::open(&dir().join("model")).unwrap();
    let prompts: Vec<&str> = cases["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let negative = cases["negative_prompt"].as_str().unwrap();
    let (h, w) = (
        cases["height"].as_u64().unwrap() as usize,
        cases["width"].as_u64().unwrap() as usize,
    );
    let shape = pipe.latent_shape(prompts.len(), h, w).unwrap();
    assert_eq!(shape, [2, 4, 12, 8]);
    let (noise, _) = r.read_f32("latents").unwrap();
    let cond = pipe.encode_prompts(&prompts, 0).unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kind = case["scheduler"].as_str().unwrap().parse().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let guidance = case["guidance"].as_f64().unwrap() as f32;
        // diffusers encodes "" as the negative prompt when none is given.
        let neg = if guidance > 1.0 { negative } else { "" };
        let uncond = pipe.encode_prompts(&[neg, neg], 0).unwrap();
        let mut sampler = pipe.sampler(kind, steps).unwrap();
        let c = Conditioning {
            cond: &cond,
            uncond: &uncond,
            guidance,
        };
        let mut calls = 0;
        let latents = denoise(
            &pipe.unet,
            sampler.as_mut(),
            &noise,
            shape,
            &c,
            false,
            &mut |i, n| {
                calls += 1;
                assert_eq!((i, n), (calls, steps));
            },
        )
        .unwrap();
        assert_eq!(calls, steps);
        let img = decode_latents(&pipe.vae, &latents, shape).unwrap();
        // Ours is (B, 3, H, W); diffusers' numpy output is (B, H, W, 3).
        let (want, _) = r.read_f32(&format!("{name}.images")).unwrap();
        let (mut worst, mut worst_u8) = (0.0f32, 0u8);
        for b in 0..2 {
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        let g = img[((b * 3 + c) * h + y) * w + x];
                        let t = want[((b * h + y) * w + x) * 3 + c];
                        worst = worst.max((g - t).abs());
                        worst_u8 = worst_u8.max(to_u8(g).abs_diff(to_u8(t)));
                    }
                }
            }
        }
        eprintln!("{name}: worst pixel difference {worst:.2e} ({worst_u8}/255 in 8 bits)");
        assert!(worst_u8 <= 2, "{name}: {worst_u8}/255");
        // Seen: 1.8e-6 at most (f32 rounding through the UNet steps and the VAE).
        assert!(worst < 1e-5, "{name}: worst {worst:.2e}");
    }
}
