//! CLIP's text encoder against transformers (fixtures/parity/make_clip_text.py): two tiny random
//! `CLIPTextModel`s (quick_gelu as SD 1.x's, gelu as SD 2.x's), loaded from the directory
//! transformers 5 saves (keys without `text_model.`; the Hub's prefixed names are read too),
//! on two 77-token prompts of the CLIP-tokenizer fixture: `last_hidden_state` and diffusers'
//! `clip_skip=1` conditioning. Bad input is a named error.

use lora_core::Tape;
use lora_io::diffusion::load_clip_text;
use lora_io::safetensors::SafetensorsFile;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/clip_text")
}

#[test]
fn text_encoder_matches_transformers() {
    let r = SafetensorsFile::open(dir().join("reference.safetensors")).unwrap();
    let (ids, shape) = r.read_i64("input_ids").unwrap();
    let ids: Vec<u32> = ids.iter().map(|&v| v as u32).collect();
    let (b, t) = (shape[0], shape[1]);
    for name in ["quick_gelu", "gelu"] {
        let model = load_clip_text(&dir().join(name)).unwrap();
        for (skip, key) in [(0, "last"), (1, "skip1")] {
            let out = model
                .forward(&Tape::inference(), &ids, (b, t), skip, false)
                .unwrap();
            assert_eq!(out.shape(), [b, t, 32]);
            let got = out.try_to_vec().unwrap();
            let (want, _) = r.read_f32(&format!("{name}.{key}")).unwrap();
            let worst = got
                .iter()
                .zip(&want)
                .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
            // Outputs are LayerNorm'd (order 1): f32 rounding through 3 blocks.
            assert!(
                worst < 2e-5,
                "{name} clip_skip {skip}: worst difference {worst:.2e}"
            );
        }
        // clip_skip really skips: the two conditionings differ.
        let a = model
            .forward(&Tape::inference(), &ids, (b, t), 0, false)
            .unwrap();
        let c = model
            .forward(&Tape::inference(), &ids, (b, t), 1, false)
            .unwrap();
        assert_ne!(a.try_to_vec().unwrap(), c.try_to_vec().unwrap());
    }
}

/// The Hub's SD checkpoints name the parameters `text_model.…` (transformers 4): the same
/// weights under those names give the same conditioning.
#[test]
fn hub_prefixed_names_load_the_same_model() {
    use lora_io::write::{write_safetensors, OutDtype, OutTensor};
    let src = dir().join("quick_gelu");
    let f = SafetensorsFile::open(src.join("model.safetensors")).unwrap();
    let vals: Vec<(String, Vec<f32>, Vec<usize>)> = f
        .names()
        .iter()
        .map(|k| {
            let (v, s) = f.read_f32(k).unwrap();
            (format!("text_model.{k}"), v, s)
        })
        .collect();
    let tmp = std::env::temp_dir().join(format!("lora-clip-hub-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    let out: Vec<OutTensor> = vals
        .iter()
        .map(|(name, v, s)| OutTensor {
            name: name.clone(),
            shape: s.clone(),
            values: v,
            dtype: OutDtype::F32,
        })
        .collect();
    write_safetensors(&tmp.join("model.safetensors"), &out, Default::default()).unwrap();
    let ids: Vec<u32> = (0..77).map(|i| (i * 7 % 651) as u32).collect();
    let run = |d: &std::path::Path| {
        load_clip_text(d)
            .unwrap()
            .forward(&Tape::inference(), &ids, (1, 77), 0, false)
            .unwrap()
            .try_to_vec()
            .unwrap()
    };
    assert_eq!(run(&tmp), run(&src));
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn bad_text_encoder_input_is_named() {
    let model = load_clip_text(&dir().join("quick_gelu")).unwrap();
    let tape = Tape::inference();
    let e = |r: lora_core::error::Result<lora_core::Tensor>| r.unwrap_err().to_string();
    assert!(e(model.forward(&tape, &[0; 5], (2, 3), 0, false)).contains("input_ids"));
    assert!(e(model.forward(&tape, &[0; 78], (1, 78), 0, false)).contains("max_position"));
    assert!(e(model.forward(&tape, &[651, 0], (1, 2), 0, false)).contains("vocab_size"));
    assert!(e(model.forward(&tape, &[0, 0], (1, 2), 3, false)).contains("clip_skip"));
    // A checkpoint with a layer more than its config: the extra tensor is named.
    let tmp = std::env::temp_dir().join(format!("lora-clip-text-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(
        dir().join("quick_gelu/model.safetensors"),
        tmp.join("model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(dir().join("quick_gelu/config.json")).unwrap();
    std::fs::write(
        tmp.join("config.json"),
        cfg.replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 2"),
    )
    .unwrap();
    let err = load_clip_text(&tmp).err().unwrap().to_string();
    assert!(err.contains("encoder.layers.2"), "{err}");
    std::fs::write(
        tmp.join("config.json"),
        cfg.replace("quick_gelu", "swiglu_x"),
    )
    .unwrap();
    let err = load_clip_text(&tmp).err().unwrap().to_string();
    assert!(
        err.contains("hidden_act") && err.contains("config.json"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).ok();
}
