//! `merge_to_dir`: the merged model directory loads and gives the adapter model's logits (the
//! transformers + PEFT reference), in f32 or in the checkpoint's bf16; NaN adapters and existing
//! outputs are refused without writing anything.

use lora_core::Tape;
use lora_io::hf::ModelDir;
use lora_io::merge::{merge_to_dir, MergeOptions};
use lora_io::safetensors::SafetensorsFile;
use lora_io::write::OutDtype;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity")
}

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("lora-io-merge-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn logits_err(model_dir: &Path, fixture: &str) -> f32 {
    let m = ModelDir::open(model_dir).unwrap().load_model().unwrap();
    assert!(m.linears().iter().all(|(_, l)| l.lora().is_none()));
    let r = SafetensorsFile::open(root().join(fixture).join("reference.safetensors")).unwrap();
    let (ids, shape) = r.read_i64("input_ids").unwrap();
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let got = m
        .forward(&Tape::inference(), &ids, shape[0], shape[1], false)
        .unwrap()
        .to_vec();
    let (want, _) = r.read_f32("logits").unwrap();
    let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    got.iter()
        .zip(&want)
        .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()))
        / scale
}

#[test]
fn merged_models_reproduce_the_adapter_logits() {
    for name in ["gpt2", "llama_gqa", "llama_bf16", "qwen2_bias"] {
        // LORA_WRITE_DIR keeps the outputs for the transformers-side check
        // (fixtures/parity/check_written_adapters.py).
        let out = match std::env::var_os("LORA_WRITE_DIR") {
            Some(d) => {
                let p = PathBuf::from(d).join(format!("merged-{name}"));
                let _ = std::fs::remove_dir_all(&p);
                p
            }
            None => tmp(name),
        };
        let rep = merge_to_dir(
            &root().join(name).join("model"),
            &root().join(name).join("adapter"),
            &out,
            MergeOptions {
                dtype: Some(OutDtype::F32),
                force: false,
            },
        )
        .unwrap();
        assert!(!rep.merged.is_empty());
        assert!(out.join("config.json").exists() && out.join("tokenizer.json").exists());
        let e = logits_err(&out, name);
        assert!(e < 1e-5, "{name}: merged f32 logits relative error {e:e}");
    }
}

#[test]
fn bf16_checkpoint_merges_into_bf16_by_default() {
    let out = tmp("bf16");
    merge_to_dir(
        &root().join("llama_bf16/model"),
        &root().join("llama_bf16/adapter"),
        &out,
        MergeOptions::default(),
    )
    .unwrap();
    let f = SafetensorsFile::open(out.join("model.safetensors")).unwrap();
    assert!(f
        .names()
        .iter()
        .all(|k| f.meta(k).unwrap().dtype == safetensors::Dtype::BF16));
    // The merged weights are rounded to bf16 (8 bits of mantissa): logits within bf16 tolerance.
    let e = logits_err(&out, "llama_bf16");
    assert!(e < 2e-2, "bf16 merged logits relative error {e:e}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
}

#[test]
fn existing_outputs_and_nan_adapters_are_refused() {
    let m = root().join("gpt2/model");
    let a = root().join("gpt2/adapter");
    let out = tmp("exists");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    // A directory lora-rs did not write is never replaced, with or without --force.
    let force = MergeOptions {
        force: true,
        ..Default::default()
    };
    for opts in [MergeOptions::default(), force] {
        let e = merge_to_dir(&m, &a, &out, opts).unwrap_err().to_string();
        assert!(
            e.contains("not written by lora-rs") && e.contains("keep.txt"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("keep.txt")).unwrap(),
            "mine"
        );
    }
    // An earlier merge is replaced with --force only.
    std::fs::remove_dir_all(&out).unwrap();
    merge_to_dir(&m, &a, &out, MergeOptions::default()).unwrap();
    let e = merge_to_dir(&m, &a, &out, MergeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pass --force to replace an earlier merge"),
        "{e}"
    );
    merge_to_dir(&m, &a, &out, force).unwrap();
    assert!(out.join("model.safetensors").exists() && out.join(".lora-rs.json").exists());
    // ...but not once a file of someone else's is among its files.
    std::fs::write(out.join("notes.md"), "mine").unwrap();
    let e = merge_to_dir(&m, &a, &out, force).unwrap_err().to_string();
    assert!(e.contains("did not write: notes.md"), "{e}");
    // Never the model or the adapter, nor a directory holding them.
    for (o, want) in [
        (m.clone(), "is the model directory"),
        (a.clone(), "is the adapter"),
        (root().join("gpt2"), "contains the model directory"),
    ] {
        let e = merge_to_dir(&m, &a, &o, force).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    assert!(m.join("model.safetensors").exists() && a.join("adapter_model.safetensors").exists());
    // A merge killed before its rename left a temporary beside the output: the next merge
    // into that output removes it and reports it.
    let parent = out.parent().unwrap();
    let name = out.file_name().unwrap().to_string_lossy().to_string();
    let stale = parent.join(format!(".{name}.merge-tmp-999999999"));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::remove_file(out.join("notes.md")).unwrap();
    let rep = merge_to_dir(&m, &a, &out, force).unwrap();
    assert_eq!(rep.removed_stale, vec![stale.clone()]);
    assert!(!stale.exists());

    // An adapter with an infinity: nothing is written.
    let bad = tmp("nan-adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        a.join("adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let src = SafetensorsFile::open(a.join("adapter_model.safetensors")).unwrap();
    let mut data: Vec<(String, Vec<usize>, Vec<f32>)> = src
        .names()
        .iter()
        .map(|k| {
            let (v, s) = src.read_f32(k).unwrap();
            (k.to_string(), s, v)
        })
        .collect();
    data[1].2[0] = f32::INFINITY;
    let tensors: Vec<lora_io::write::OutTensor> = data
        .iter()
        .map(|(k, s, v)| lora_io::write::OutTensor {
            name: k.clone(),
            shape: s.clone(),
            values: v,
            dtype: OutDtype::F32,
        })
        .collect();
    lora_io::write::write_safetensors(
        &bad.join("adapter_model.safetensors"),
        &tensors,
        Default::default(),
    )
    .unwrap();
    let out = tmp("nan-out");
    let e = merge_to_dir(&m, &bad, &out, MergeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds inf at index 0"), "{e}");
    assert!(
        !out.exists(),
        "nothing may be written when a merge is refused"
    );
}

#[test]
fn unwritable_output_fails_cleanly() {
    // The output's parent is a regular file: nothing can be created there (a read-only location
    // as far as the merge is concerned; permission bits do not stop root, this does).
    let f = tmp("parent-file");
    std::fs::write(&f, "not a dir").unwrap();
    let out = f.join("merged");
    let e = merge_to_dir(
        &root().join("gpt2/model"),
        &root().join("gpt2/adapter"),
        &out,
        MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("parent-file"), "{e}");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "not a dir");
}

#[test]
fn streamed_safetensors_read_back_and_refuse_wrong_sizes() {
    use lora_io::write::{write_safetensors_streamed, StreamedTensor};
    let p = tmp("streamed").join("x.safetensors");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let vals: Vec<Vec<f32>> = vec![vec![1.0, -2.5, 3.25], vec![0.5; 4], vec![7.0]];
    let heads = vec![
        StreamedTensor {
            name: "b".into(),
            dtype: OutDtype::F32.into(),
            shape: vec![3],
        },
        StreamedTensor {
            name: "a".into(),
            dtype: OutDtype::BF16.into(),
            shape: vec![2, 2],
        },
        StreamedTensor {
            name: "c".into(),
            dtype: OutDtype::F16.into(),
            shape: vec![],
        },
    ];
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    let dtypes = [OutDtype::F32, OutDtype::BF16, OutDtype::F16];
    write_safetensors_streamed(&p, &heads, meta, |i| Ok(dtypes[i].encode(&vals[i]))).unwrap();
    let f = SafetensorsFile::open(&p).unwrap();
    assert_eq!(f.names(), ["a", "b", "c"]);
    assert_eq!(f.read_f32("b").unwrap(), (vals[0].clone(), vec![3]));
    assert_eq!(f.read_f32("a").unwrap(), (vals[1].clone(), vec![2, 2]));
    assert_eq!(f.read_f32("c").unwrap().0, vals[2]);
    assert_eq!(f.metadata.get("format").map(String::as_str), Some("pt"));
    // A tensor of the wrong size: an error, and the old file stays.
    let e = write_safetensors_streamed(&p, &heads, Default::default(), |i| {
        Ok(if i == 1 {
            vec![0u8; 3]
        } else {
            dtypes[i].encode(&vals[i])
        })
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("tensor `a`: 3 bytes for a shape that needs 8"),
        "{e}"
    );
    assert_eq!(
        SafetensorsFile::open(&p).unwrap().read_f32("b").unwrap().0,
        vals[0]
    );
}
