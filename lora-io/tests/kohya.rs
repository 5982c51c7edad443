//! kohya files: PEFT -> kohya -> PEFT keeps every module's update (the reloaded adapter gives
//! the transformers + PEFT reference logits), alpha defaults to the rank, conv pairs and `ss_*`
//! metadata are carried, malformed files are named errors.

use lora_core::Tape;
use lora_io::hf::ModelDir;
use lora_io::kohya::{flatten, KohyaLora, KohyaModule};
use lora_io::peft::load_adapter;
use lora_io::safetensors::SafetensorsFile;
use lora_io::write::{write_safetensors, OutDtype, OutTensor};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity")
}

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("lora-io-kohya-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn peft_to_kohya_to_peft_keeps_the_model() {
    for name in ["gpt2", "llama_gqa", "llama_bf16", "qwen2_bias"] {
        let dir = root().join(name);
        let k = KohyaLora::from_peft(&dir.join("adapter"), "lora_te").unwrap();
        let t = tmp(name);
        k.write(&t.join("lora.safetensors")).unwrap();
        let back = KohyaLora::read(&t.join("lora.safetensors")).unwrap();
        assert_eq!(back, k, "{name}: kohya write/read");
        assert!(back.modules.iter().all(|m| m.name.starts_with("lora_te_")));

        let model = ModelDir::open(dir.join("model"))
            .unwrap()
            .load_model()
            .unwrap();
        back.to_peft(model.as_ref(), &t.join("peft")).unwrap();
        let mut model = ModelDir::open(dir.join("model"))
            .unwrap()
            .load_model()
            .unwrap();
        load_adapter(model.as_mut(), &t.join("peft")).unwrap();
        let r = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
        let (ids, shape) = r.read_i64("input_ids").unwrap();
        let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
        let got = model
            .forward(&Tape::inference(), &ids, shape[0], shape[1], true)
            .unwrap()
            .to_vec();
        let (want, _) = r.read_f32("logits").unwrap();
        let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let e = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()))
            / scale;
        assert!(
            e < 1e-5,
            "{name}: logits after PEFT -> kohya -> PEFT: {e:e}"
        );
    }
}

#[test]
fn alpha_defaults_conv_pairs_and_metadata() {
    let t = tmp("conv");
    let down = vec![0.5f32; 2 * 3 * 3 * 3];
    let up = vec![0.25f32; 4 * 2];
    let lin_down = vec![1.0f32; 2 * 5];
    let lin_up = vec![2.0f32; 6 * 2];
    let alpha = [1.0f32];
    let tensors = vec![
        OutTensor {
            name: "lora_unet_down_blocks_0_conv.lora_down.weight".into(),
            shape: vec![2, 3, 3, 3],
            values: &down,
            dtype: OutDtype::F16,
        },
        OutTensor {
            name: "lora_unet_down_blocks_0_conv.lora_up.weight".into(),
            shape: vec![4, 2, 1, 1],
            values: &up,
            dtype: OutDtype::F16,
        },
        OutTensor {
            name: "lora_te1_text_model_q_proj.lora_down.weight".into(),
            shape: vec![2, 5],
            values: &lin_down,
            dtype: OutDtype::F32,
        },
        OutTensor {
            name: "lora_te1_text_model_q_proj.lora_up.weight".into(),
            shape: vec![6, 2],
            values: &lin_up,
            dtype: OutDtype::F32,
        },
        OutTensor {
            name: "lora_te1_text_model_q_proj.alpha".into(),
            shape: vec![],
            values: &alpha,
            dtype: OutDtype::F32,
        },
    ];
    let meta = [
        ("ss_network_dim".to_string(), "2".to_string()),
        (
            "ss_base_model_version".to_string(),
            "sdxl_base_v1-0".to_string(),
        ),
    ]
    .into_iter()
    .collect();
    write_safetensors(&t.join("in.safetensors"), &tensors, meta).unwrap();
    let k = KohyaLora::read(&t.join("in.safetensors")).unwrap();
    let conv: &KohyaModule = k
        .modules
        .iter()
        .find(|m| m.name.starts_with("lora_unet"))
        .unwrap();
    assert_eq!(
        (conv.down.0.clone(), conv.up.0.clone(), conv.alpha),
        (vec![2, 3, 3, 3], vec![4, 2, 1, 1], 2.0),
        "alpha defaults to the rank"
    );
    let lin = k
        .modules
        .iter()
        .find(|m| m.name.starts_with("lora_te1"))
        .unwrap();
    assert_eq!((lin.alpha, lin.scale()), (1.0, 0.5));
    k.write(&t.join("out.safetensors")).unwrap();
    let again = KohyaLora::read(&t.join("out.safetensors")).unwrap();
    assert_eq!(again, k);
    assert_eq!(
        again
            .metadata
            .get("ss_base_model_version")
            .map(String::as_str),
        Some("sdxl_base_v1-0")
    );
    assert_eq!(
        flatten("lora_te", "model.layers.0.self_attn.q_proj"),
        "lora_te_model_layers_0_self_attn_q_proj"
    );
}

#[test]
fn malformed_kohya_files_are_named() {
    let t = tmp("bad");
    let v = vec![0.0f32; 6];
    let cases: Vec<(Vec<OutTensor>, &str)> = vec![
        (
            vec![OutTensor {
                name: "lora_unet_x.lora_up.weight".into(),
                shape: vec![3, 2],
                values: &v,
                dtype: OutDtype::F32,
            }],
            "no matching `.lora_down.weight`",
        ),
        (
            vec![OutTensor {
                name: "lora_unet_x.lora_down.weight".into(),
                shape: vec![2, 3],
                values: &v,
                dtype: OutDtype::F32,
            }],
            "lora_unet_x.lora_up.weight",
        ),
        (
            vec![
                OutTensor {
                    name: "lora_unet_x.lora_down.weight".into(),
                    shape: vec![2, 3],
                    values: &v,
                    dtype: OutDtype::F32,
                },
                OutTensor {
                    name: "lora_unet_x.lora_up.weight".into(),
                    shape: vec![2, 3],
                    values: &v,
                    dtype: OutDtype::F32,
                },
            ],
            "do not form a rank-r pair",
        ),
        (
            vec![OutTensor {
                name: "weird".into(),
                shape: vec![6],
                values: &v,
                dtype: OutDtype::F32,
            }],
            "not a kohya LoRA key",
        ),
        (
            vec![OutTensor {
                name: "foo_x.lora_down.weight".into(),
                shape: vec![2, 3],
                values: &v,
                dtype: OutDtype::F32,
            }],
            "unknown prefix",
        ),
    ];
    for (i, (tensors, needle)) in cases.into_iter().enumerate() {
        let p = t.join(format!("{i}.safetensors"));
        write_safetensors(&p, &tensors, Default::default()).unwrap();
        let e = KohyaLora::read(&p).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{i}.safetensors")) && e.contains(needle),
            "{e}"
        );
    }
    // kohya -> PEFT for a model without those modules lists what the model has.
    let k = KohyaLora::from_peft(&root().join("gpt2/adapter"), "lora_te").unwrap();
    let llama = ModelDir::open(root().join("llama_gqa/model"))
        .unwrap()
        .load_model()
        .unwrap();
    let e = k
        .to_peft(llama.as_ref(), &t.join("x"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_te_transformer_h_0_attn_c_attn")
            && e.contains("model.layers.0.self_attn.q_proj"),
        "{e}"
    );
}

#[test]
fn kohya_alpha_follows_kohya_and_damage_is_named() {
    let k = KohyaLora::from_peft(&root().join("gpt2/adapter"), "lora_te").unwrap();
    let t = tmp("alpha");
    let p = t.join("lora.safetensors");
    let m0 = &k.modules[0];
    let write_alpha = |alpha: &[f32], shape: Vec<usize>| {
        let mut tensors = Vec::new();
        for m in &k.modules {
            tensors.push(OutTensor {
                name: format!("{}.lora_down.weight", m.name),
                shape: m.down.0.clone(),
                values: &m.down.1,
                dtype: OutDtype::F32,
            });
            tensors.push(OutTensor {
                name: format!("{}.lora_up.weight", m.name),
                shape: m.up.0.clone(),
                values: &m.up.1,
                dtype: OutDtype::F32,
            });
        }
        tensors.push(OutTensor {
            name: format!("{}.alpha", m0.name),
            shape,
            values: alpha,
            dtype: OutDtype::F32,
        });
        write_safetensors(&p, &tensors, Default::default()).unwrap();
    };
    // 0 means alpha = rank, as kohya's loader reads it (so does a missing alpha).
    write_alpha(&[0.0], vec![]);
    let back = KohyaLora::read(&p).unwrap();
    assert_eq!(back.modules[0].alpha, m0.rank() as f32);
    assert_eq!(back.modules[0].scale(), 1.0);
    for (alpha, shape, want) in [
        (vec![f32::NAN], vec![], "must be a positive number, got NaN"),
        (vec![-4.0], vec![], "must be a positive number, got -4"),
        (
            vec![f32::INFINITY],
            vec![1],
            "must be a positive number, got inf",
        ),
        (
            vec![4.0, 8.0],
            vec![2],
            "must hold one value, has shape [2]",
        ),
    ] {
        write_alpha(&alpha, shape);
        let e = KohyaLora::read(&p).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{}.alpha", m0.name)) && e.contains(want),
            "{e}"
        );
    }
}

#[test]
fn two_pairs_for_one_module_are_refused() {
    // lora_te_ and lora_te2_ copies of the same module flatten to one PEFT key: refused (the
    // safetensors writer panicked on the repeated name).
    let mut k = KohyaLora::from_peft(&root().join("gpt2/adapter"), "lora_te").unwrap();
    let mut twin = k.modules[0].clone();
    twin.name = twin.name.replacen("lora_te_", "lora_te2_", 1);
    k.modules.push(twin);
    let model = ModelDir::open(root().join("gpt2/model"))
        .unwrap()
        .load_model()
        .unwrap();
    let t = tmp("twin");
    let e = k
        .to_peft(model.as_ref(), &t.join("peft"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("two pairs for one module"), "{e}");
}
