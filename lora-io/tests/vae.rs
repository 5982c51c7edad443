//! Stable Diffusion's autoencoder against diffusers (fixtures/parity/make_vae.py): a tiny random
//! `AutoencoderKL` (three levels, mid-block attention); the latent distribution of two images and
//! the decoding of its mean. The older attention names (`query`, `key`, `value`, `proj_attn`)
//! load the same model; bad configs and inputs are named errors.

use lora_core::{Tape, Tensor};
use lora_io::diffusion::{load_vae, read_vae_config};
use lora_io::safetensors::SafetensorsFile;
use lora_io::write::{write_safetensors, OutDtype, OutTensor};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/vae")
}

fn worst(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()))
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    let r = SafetensorsFile::open(dir().join("reference.safetensors")).unwrap();
    let vae = load_vae(&dir().join("model")).unwrap();
    assert_eq!(vae.config().scaling_factor, 0.18215);
    assert_eq!(vae.config().downscale(), 4);
    let (px, shape) = r.read_f32("pixels").unwrap();
    let pixels = Tensor::new(px, &shape).unwrap();
    let (mean, logvar) = vae.encode(&Tape::inference(), &pixels).unwrap();
    assert_eq!(mean.shape(), [2, 4, 6, 4]);
    let m = mean.try_to_vec().unwrap();
    let lv = logvar.try_to_vec().unwrap();
    let (wm, _) = r.read_f32("mean").unwrap();
    let (wl, _) = r.read_f32("logvar").unwrap();
    let (em, el) = (worst(&m, &wm), worst(&lv, &wl));
    // Decoded from diffusers' own mean, so the decoder is measured alone.
    let ref_mean = Tensor::new(wm.clone(), &[2, 4, 6, 4]).unwrap();
    let dec = vae.decode(&Tape::inference(), &ref_mean).unwrap();
    assert_eq!(dec.shape(), [2, 3, 24, 16]);
    let (wd, _) = r.read_f32("decoded").unwrap();
    let ed = worst(&dec.try_to_vec().unwrap(), &wd);
    eprintln!("mean {em:.2e}, logvar {el:.2e}, decoded {ed:.2e}");
    // f32 rounding (seen: 6.0e-7, 6.1e-7, 6.8e-6; the decoder's 16 convolutions and its
    // attention over 24 x 16 pixels sum in another order than PyTorch's).
    assert!(
        em < 5e-6 && el < 5e-6 && ed < 2e-5,
        "mean {em:.2e}, logvar {el:.2e}, decoded {ed:.2e}"
    );
}

#[test]
fn older_attention_names_load_the_same_vae() {
    let src = dir().join("model");
    let f = SafetensorsFile::open(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let renamed: Vec<(String, Vec<f32>, Vec<usize>)> = f
        .names()
        .iter()
        .map(|k| {
            let (v, s) = f.read_f32(k).unwrap();
            let k = k
                .replace("attentions.0.to_q.", "attentions.0.query.")
                .replace("attentions.0.to_k.", "attentions.0.key.")
                .replace("attentions.0.to_v.", "attentions.0.value.")
                .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
            (k, v, s)
        })
        .collect();
    assert!(renamed.iter().any(|(k, _, _)| k.contains("proj_attn")));
    let tmp = std::env::temp_dir().join(format!("lora-vae-legacy-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    let out: Vec<OutTensor> = renamed
        .iter()
        .map(|(name, v, s)| OutTensor {
            name: name.clone(),
            shape: s.clone(),
            values: v,
            dtype: OutDtype::F32,
        })
        .collect();
    write_safetensors(
        &tmp.join("diffusion_pytorch_model.safetensors"),
        &out,
        Default::default(),
    )
    .unwrap();
    let z = Tensor::new(
        (0..2 * 4 * 3 * 2)
            .map(|i| (i as f32 * 0.37).sin())
            .collect(),
        &[2, 4, 3, 2],
    )
    .unwrap();
    let run = |d: &std::path::Path| {
        load_vae(d)
            .unwrap()
            .decode(&Tape::inference(), &z)
            .unwrap()
            .try_to_vec()
            .unwrap()
    };
    assert_eq!(run(&tmp), run(&src));
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn vae_errors_are_named() {
    let src = dir().join("model");
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let tmp = std::env::temp_dir().join(format!("lora-vae-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for (field, value) in [
        (
            "down_block_types",
            "[\"DownEncoderBlock2D\", \"AttnDownEncoderBlock2D\", \"DownEncoderBlock2D\"]",
        ),
        ("latents_mean", "[0.1, 0.2, 0.3, 0.4]"),
        ("norm_num_groups", "3"),
        ("scaling_factor", "0"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        let p = tmp.join("config.json");
        std::fs::write(&p, v.to_string()).unwrap();
        let e = read_vae_config(&p).unwrap_err().to_string();
        assert!(
            e.contains(field) && e.contains("config.json"),
            "{field}: {e}"
        );
    }
    std::fs::remove_dir_all(&tmp).ok();
    let vae = load_vae(&src).unwrap();
    let odd = Tensor::new(vec![0.0; 3 * 6 * 6], &[1, 3, 6, 6]).unwrap();
    let e = vae
        .encode(&Tape::inference(), &odd)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("multiples of 4"), "{e}");
    let wrong = Tensor::new(vec![0.0; 3 * 2 * 2], &[1, 3, 2, 2]).unwrap();
    let e = vae
        .decode(&Tape::inference(), &wrong)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("latents"), "{e}");
}
