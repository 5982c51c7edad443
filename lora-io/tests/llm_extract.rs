//! `lora extract` for language models: the demo adapter merged into the demo model (GPT-2,
//! `Conv1D` weights) is recovered from the two model directories as a PEFT adapter whose merge
//! gives the tuned weights back; what a LoRA cannot carry (a changed norm) is reported.

use lora_core::models::Linear;
use lora_io::hf::ModelDir;
use lora_io::llm_extract::extract_llm;
use lora_io::peft::load_adapter;
use lora_io::safetensors::SafetensorsFile;
use lora_io::write::{write_safetensors, OutDtype, OutTensor};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn a_merged_adapter_is_extracted_back() {
    let tmp = std::env::temp_dir().join(format!("lora-llm-extract-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let (base, tuned, out) = (
        root().join("demo/base"),
        tmp.join("tuned"),
        tmp.join("adapter"),
    );
    lora_io::merge::merge_to_dir(
        &base,
        &root().join("demo/adapter"),
        &tuned,
        Default::default(),
    )
    .unwrap();
    let ex = extract_llm(&base, &tuned, 8, 1e-6).unwrap();
    assert!(ex.config.fan_in_fan_out, "GPT-2's Conv1D");
    assert_eq!(
        ex.config.target_modules,
        lora_io::peft::Targets::List(vec!["c_attn".into(), "c_fc".into(), "c_proj".into()])
    );
    assert!(ex.not_carried.is_empty(), "{:?}", ex.not_carried);
    // The demo adapter has rank 8: the extraction is exact up to rounding.
    assert!(ex.kept.values().all(|k| *k > 1.0 - 1e-9), "{:?}", ex.kept);
    lora_io::combine::write(&out, &ex.config, &ex.modules).unwrap();
    // Base + extracted adapter, merged, is the tuned model.
    let mut m = ModelDir::open(&base).unwrap().load_model().unwrap();
    load_adapter(m.as_mut(), &out).unwrap();
    let t = ModelDir::open(&tuned).unwrap().load_model().unwrap();
    let tl: std::collections::HashMap<String, Vec<f32>> = t
        .linears()
        .into_iter()
        .map(|(n, l)| (n, l.base().0.try_to_vec().unwrap()))
        .collect();
    let mut worst = 0.0f64;
    let mut n = 0;
    for (name, lin) in m.linears_mut() {
        if let Linear::Lora(l) = lin {
            l.merge().unwrap();
            let got = l.weight.try_to_vec().unwrap();
            let want = &tl[&name];
            let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs() as f64));
            let e = got
                .iter()
                .zip(want)
                .fold(0.0f64, |a, (x, y)| a.max((*x as f64 - *y as f64).abs()))
                / scale;
            worst = worst.max(e);
            n += 1;
        }
    }
    eprintln!("{n} layers; worst relative difference {worst:.2e}");
    assert_eq!(n, ex.modules.len());
    assert!(worst < 1e-5, "{worst:.2e}");
    // A changed norm is reported, not dropped in silence.
    let file = tuned.join("model.safetensors");
    let f = SafetensorsFile::open(&file).unwrap();
    let mut vals = Vec::new();
    for k in f.names() {
        let (mut v, shape) = f.read_f32(k).unwrap();
        if k == "ln_f.weight" || k == "transformer.ln_f.weight" {
            v[0] += 0.5;
        }
        vals.push((k.to_string(), v, shape));
    }
    drop(f);
    let ts: Vec<OutTensor> = vals
        .iter()
        .map(|(k, v, s)| OutTensor {
            name: k.clone(),
            shape: s.clone(),
            values: v,
            dtype: OutDtype::F32,
        })
        .collect();
    write_safetensors(&file, &ts, Default::default()).unwrap();
    let ex = extract_llm(&base, &tuned, 8, 1e-6).unwrap();
    assert_eq!(ex.not_carried.len(), 1, "{:?}", ex.not_carried);
    assert!(ex.not_carried[0].contains("ln_f.weight"));
    std::fs::remove_dir_all(&tmp).ok();
}
