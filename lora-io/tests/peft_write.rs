//! Writing PEFT adapters: what we write for each fixture has PEFT's tensors (same keys, shapes,
//! values) and the same meaning in adapter_config.json as the file PEFT wrote, and loads back to
//! the same logits. (That PEFT itself loads our files was checked with
//! `fixtures/parity/check_written_adapters.py`; see its header.)

use lora_core::models::CausalLm;
use lora_core::Tape;
use lora_io::hf::{read_json, ModelDir};
use lora_io::peft::{load_adapter, save_adapter};
use lora_io::safetensors::SafetensorsFile;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity")
}

fn as_set(v: &Value) -> Value {
    match v {
        Value::Array(a) => Value::from(
            a.iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>(),
        ),
        other => other.clone(),
    }
}

#[test]
fn written_adapters_match_peft_files_and_reload() {
    for name in ["gpt2", "llama_gqa", "llama_bf16", "qwen2_bias"] {
        let dir = root().join(name);
        let mut model: Box<dyn CausalLm> = ModelDir::open(dir.join("model"))
            .unwrap()
            .load_model()
            .unwrap();
        let cfg = load_adapter(model.as_mut(), &dir.join("adapter")).unwrap();
        // LORA_WRITE_DIR keeps the files for the PEFT-side check (check_written_adapters.py).
        let out = match std::env::var_os("LORA_WRITE_DIR") {
            Some(d) => PathBuf::from(d).join(name),
            None => {
                std::env::temp_dir().join(format!("lora-io-write-{}-{name}", std::process::id()))
            }
        };
        let _ = std::fs::remove_dir_all(&out);
        save_adapter(model.as_ref(), &cfg, &out).unwrap();

        let theirs = SafetensorsFile::open(dir.join("adapter/adapter_model.safetensors")).unwrap();
        let ours = SafetensorsFile::open(out.join("adapter_model.safetensors")).unwrap();
        assert_eq!(theirs.names(), ours.names(), "{name}: tensor keys");
        for k in theirs.names() {
            assert_eq!(
                theirs.read_f32(k).unwrap(),
                ours.read_f32(k).unwrap(),
                "{name}: {k}"
            );
            assert_eq!(ours.meta(k).unwrap().dtype, safetensors::Dtype::F32);
        }
        assert_eq!(ours.metadata.get("format").map(String::as_str), Some("pt"));

        let peft = read_json(&dir.join("adapter/adapter_config.json")).unwrap();
        let mine = read_json(&out.join("adapter_config.json")).unwrap();
        for key in [
            "peft_type",
            "r",
            "lora_alpha",
            "use_rslora",
            "rank_pattern",
            "alpha_pattern",
            "fan_in_fan_out",
            "bias",
            "lora_dropout",
            "layers_to_transform",
            "exclude_modules",
            "use_dora",
        ] {
            assert_eq!(peft[key], mine[key], "{name}: {key}");
        }
        assert_eq!(
            as_set(&peft["target_modules"]),
            as_set(&mine["target_modules"]),
            "{name}: target_modules"
        );
        let keys: Vec<&String> = mine.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "config keys are sorted");

        let mut again = ModelDir::open(dir.join("model"))
            .unwrap()
            .load_model()
            .unwrap();
        load_adapter(again.as_mut(), &out).unwrap();
        let reference = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
        let (ids, shape) = reference.read_i64("input_ids").unwrap();
        let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
        let got = again
            .forward(&Tape::inference(), &ids, shape[0], shape[1], true)
            .unwrap()
            .to_vec();
        let (want, _) = reference.read_f32("logits").unwrap();
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(err < 1e-5, "{name}: reloaded logits {err:e}");
    }
}
