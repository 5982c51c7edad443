//! Bad input: every case is a clear error naming the file (and key or field), never a panic.

use lora_io::hf::ModelDir;
use lora_io::peft::load_adapter;
use lora_io::safetensors::SafetensorsFile;
use lora_io::tokenizer::TextTokenizer;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/parity")
        .join(name)
}

/// A fresh copy of a fixture directory tree in the temp dir.
fn scratch(tag: &str, from: &Path) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("lora-io-bad-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(from, &dst);
    dst
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

fn load_err(dir: &Path) -> String {
    match ModelDir::open(dir).and_then(|m| m.load_model()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors() {
    let d = scratch("trunc", &fixture("gpt2/model"));
    let f = d.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors")
            && e.contains("invalid safetensors")
            && e.contains(&format!("need {} bytes of data", len_data(&f, 100)))
            && e.contains("truncated"),
        "{e}"
    );
    // Bytes after the last tensor are refused too, and counted.
    let mut f2 = std::fs::OpenOptions::new().append(true).open(&f).unwrap();
    std::io::Write::write_all(&mut f2, &[0u8; 107]).unwrap();
    let e = load_err(&d);
    assert!(e.contains("7 bytes after the last tensor's data"), "{e}");
}

/// Data bytes a safetensors file's header promises, given that `cut` bytes were cut off its end.
fn len_data(f: &std::path::Path, cut: u64) -> u64 {
    let b = std::fs::read(f).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap());
    b.len() as u64 + cut - 8 - n
}

#[test]
fn header_length_larger_than_file() {
    let p = std::env::temp_dir().join(format!(
        "lora-io-bad-{}-hdr.safetensors",
        std::process::id()
    ));
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&p, &bytes).unwrap();
    let e = SafetensorsFile::open(&p).err().unwrap().to_string();
    assert!(
        e.contains("header length 1099511627776 is larger than the rest of the file (2 bytes)"),
        "{e}"
    );
    std::fs::write(&p, b"abc").unwrap();
    let e = SafetensorsFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("shorter than the 8-byte header"), "{e}");
    let mut bytes = 5u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{oops");
    std::fs::write(&p, &bytes).unwrap();
    let e = SafetensorsFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("invalid safetensors"), "{e}");
}

#[test]
fn tensor_shape_disagrees_with_config() {
    let d = scratch("shape", &fixture("gpt2/model"));
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"vocab_size\": 300", "\"vocab_size\": 301");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("`transformer.wte.weight` has shape [300, 32], config.json implies [301, 32]"),
        "{e}"
    );
}

#[test]
fn missing_files_and_tensors() {
    let d = scratch("missing", &fixture("gpt2/model"));
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let e = TextTokenizer::from_model_dir(&d).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );
    let e = load_err(&d.join("nope"));
    assert!(e.contains("not found (model directory)"), "{e}");
    // A shard named in the index but absent.
    let s = scratch("shard", &fixture("llama_gqa/model"));
    std::fs::remove_file(s.join("model-00002-of-00004.safetensors")).unwrap();
    let e = load_err(&s);
    assert!(
        e.contains("model-00002-of-00004.safetensors") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn unsupported_config_values_are_named() {
    for (from, to, needle) in [
        (
            "\"model_type\": \"gpt2\"",
            "\"model_type\": \"bert\"",
            "field `model_type`: `bert` is not supported",
        ),
        (
            "\"activation_function\": \"gelu_new\"",
            "\"activation_function\": \"relu\"",
            "field `activation_function`",
        ),
        (
            "\"n_head\": 4",
            "\"n_head\": \"four\"",
            "field `n_head`: expected a non-negative integer",
        ),
        (
            "\"n_layer\": 2",
            "\"n_layer\": 0",
            "field `n_layer`: must be at least 1",
        ),
    ] {
        let d = scratch("cfg", &fixture("gpt2/model"));
        let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
        assert!(cfg.contains(from), "{from}");
        std::fs::write(d.join("config.json"), cfg.replace(from, to)).unwrap();
        let e = load_err(&d);
        assert!(e.contains("config.json") && e.contains(needle), "{e}");
    }
    let d = scratch("json", &fixture("gpt2/model"));
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let e = load_err(&d);
    assert!(e.contains("config.json: invalid JSON"), "{e}");
}

#[test]
fn adapters_that_do_not_fit_the_model() {
    // GPT-2's targets on a Llama model: nothing matches; the message lists what exists.
    let mut llama = ModelDir::open(fixture("llama_gqa/model"))
        .unwrap()
        .load_model()
        .unwrap();
    let e = load_adapter(llama.as_mut(), &fixture("gpt2/adapter"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("matched no module") && e.contains("model.layers.0.self_attn.q_proj"),
        "{e}"
    );

    // Rank in the config disagrees with the stored tensors.
    let a = scratch("rank", &fixture("gpt2/adapter"));
    let cfg = std::fs::read_to_string(a.join("adapter_config.json"))
        .unwrap()
        .replace("\"r\": 4", "\"r\": 8");
    std::fs::write(a.join("adapter_config.json"), cfg).unwrap();
    let mut gpt2 = ModelDir::open(fixture("gpt2/model"))
        .unwrap()
        .load_model()
        .unwrap();
    let e = load_adapter(gpt2.as_mut(), &a).err().unwrap().to_string();
    assert!(
        e.contains("lora_A.weight`: shape [4, 32]")
            && e.contains("adapter_config.json")
            && e.contains("[8, 32]"),
        "{e}"
    );

    // Fewer targets than the file has tensors: the extra ones are refused, not ignored.
    let a = scratch("extra", &fixture("gpt2/adapter"));
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("adapter_config.json")).unwrap())
            .unwrap();
    cfg["target_modules"] = serde_json::json!(["c_attn"]);
    std::fs::write(a.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut gpt2 = ModelDir::open(fixture("gpt2/model"))
        .unwrap()
        .load_model()
        .unwrap();
    let e = load_adapter(gpt2.as_mut(), &a).err().unwrap().to_string();
    assert!(
        e.contains("mlp.c_fc.lora_") && e.contains("does not belong to any adapted module"),
        "{e}"
    );

    // Pickle weights only.
    let a = scratch("pickle", &fixture("gpt2/adapter"));
    std::fs::rename(
        a.join("adapter_model.safetensors"),
        a.join("adapter_model.bin"),
    )
    .unwrap();
    let mut gpt2 = ModelDir::open(fixture("gpt2/model"))
        .unwrap()
        .load_model()
        .unwrap();
    let e = load_adapter(gpt2.as_mut(), &a).err().unwrap().to_string();
    assert!(e.contains("pickle") && e.contains("never read"), "{e}");

    // Unknown peft_type, DoRA.
    for (from, to, field) in [
        (
            "\"peft_type\": \"LORA\"",
            "\"peft_type\": \"IA3\"",
            "peft_type",
        ),
        ("\"use_dora\": false", "\"use_dora\": true", "use_dora"),
    ] {
        let a = scratch("type", &fixture("gpt2/adapter"));
        let cfg = std::fs::read_to_string(a.join("adapter_config.json"))
            .unwrap()
            .replace(from, to);
        std::fs::write(a.join("adapter_config.json"), cfg).unwrap();
        let mut gpt2 = ModelDir::open(fixture("gpt2/model"))
            .unwrap()
            .load_model()
            .unwrap();
        let e = load_adapter(gpt2.as_mut(), &a).err().unwrap().to_string();
        assert!(e.contains(&format!("field `{field}`")), "{e}");
    }
}

#[test]
fn duplicate_keys_in_a_safetensors_header_are_refused() {
    // Two entries named "a": a JSON object with a repeated key. Which one a reader keeps is
    // arbitrary, so the file is refused.
    let hdr = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let mut bytes = (hdr.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(hdr.as_bytes());
    bytes.extend_from_slice(&[0u8; 8]);
    let p = std::env::temp_dir().join(format!(
        "lora-io-bad-{}-dup.safetensors",
        std::process::id()
    ));
    std::fs::write(&p, &bytes).unwrap();
    let e = SafetensorsFile::open(&p)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("dup.safetensors") && e.contains("duplicate"),
        "{e}"
    );
}

/// The gpt2 fixture adapter with `field` set to `value`, loaded onto the fixture model.
fn load_with(
    field: &str,
    value: serde_json::Value,
) -> Result<Box<dyn lora_core::models::CausalLm>, String> {
    let a = scratch(&format!("field-{field}"), &fixture("gpt2/adapter"));
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("adapter_config.json")).unwrap())
            .unwrap();
    cfg[field] = value;
    std::fs::write(a.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut m = ModelDir::open(fixture("gpt2/model"))
        .unwrap()
        .load_model()
        .unwrap();
    load_adapter(m.as_mut(), &a).map_err(|e| e.to_string())?;
    Ok(m)
}

fn scale_of(m: &dyn lora_core::models::CausalLm) -> f32 {
    m.linears()
        .into_iter()
        .find_map(|(_, l)| l.lora().map(|l| l.scale()))
        .unwrap()
}

#[test]
fn peft_booleans_mean_what_peft_reads() {
    // PEFT reads `use_rslora` with Python truthiness: "true" and 1 are true, 0 is false.
    let plain = scale_of(
        load_with("use_rslora", serde_json::json!(false))
            .unwrap()
            .as_ref(),
    );
    let rs = scale_of(
        load_with("use_rslora", serde_json::json!(true))
            .unwrap()
            .as_ref(),
    );
    assert_ne!(plain, rs);
    for (v, want) in [
        (serde_json::json!("true"), rs),
        (serde_json::json!(1), rs),
        (serde_json::json!(0), plain),
        (serde_json::Value::Null, plain),
    ] {
        assert_eq!(
            scale_of(load_with("use_rslora", v.clone()).unwrap().as_ref()),
            want,
            "{v}"
        );
    }
    // "false" is true to PEFT (a non-empty string): never what the file means, so refused.
    for v in ["false", "yes", ""] {
        let e = load_with("use_rslora", serde_json::json!(v)).err().unwrap();
        assert!(
            e.contains("field `use_rslora`") && e.contains("expected true or false"),
            "{e}"
        );
    }
    // Variants we do not compute are refused whichever way they are written.
    for (field, v) in [
        ("use_dora", serde_json::json!("true")),
        ("use_dora", serde_json::json!(1)),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        (
            "target_parameters",
            serde_json::json!(["experts.gate_up_proj"]),
        ),
        ("lora_alpha", serde_json::json!(1e39)),
        ("lora_alpha", serde_json::json!("16")),
        ("lora_dropout", serde_json::json!("0.1")),
        ("rank_pattern", serde_json::json!({"c_attn": 2.5})),
        ("layers_pattern", serde_json::json!(["h", 3])),
        ("r", serde_json::json!(1_000_000_000_000u64)),
    ] {
        let e = load_with(field, v.clone()).err().unwrap();
        assert!(e.contains(&format!("field `{field}")), "{field} = {v}: {e}");
    }
}

#[test]
fn gpt2_with_its_own_head_uses_it() {
    // tie_word_embeddings false with an lm_head.weight of twice wte: logits exactly twice the
    // tied model's (transformers uses the head; it was ignored).
    let tied = ModelDir::open(fixture("gpt2/model"))
        .unwrap()
        .load_model()
        .unwrap();
    let d = scratch("untied", &fixture("gpt2/model"));
    let f = SafetensorsFile::open(d.join("model.safetensors")).unwrap();
    let mut data: Vec<(String, Vec<usize>, Vec<f32>)> = f
        .names()
        .iter()
        .map(|k| {
            let (v, s) = f.read_f32(k).unwrap();
            (k.to_string(), s, v)
        })
        .collect();
    drop(f);
    let (_, s, w) = data
        .iter()
        .find(|t| t.0 == "transformer.wte.weight")
        .unwrap()
        .clone();
    data.push((
        "lm_head.weight".into(),
        s,
        w.iter().map(|x| 2.0 * x).collect(),
    ));
    let tensors: Vec<lora_io::write::OutTensor> = data
        .iter()
        .map(|(k, s, v)| lora_io::write::OutTensor {
            name: k.clone(),
            shape: s.clone(),
            values: v,
            dtype: lora_io::write::OutDtype::F32,
        })
        .collect();
    lora_io::write::write_safetensors(&d.join("model.safetensors"), &tensors, Default::default())
        .unwrap();
    let cfg_path = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = serde_json::json!(false);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let untied = ModelDir::open(&d).unwrap().load_model().unwrap();
    assert!(untied.linears().iter().any(|(n, _)| n == "lm_head"));
    let ids = [1u32, 5, 9, 2];
    let t = lora_core::Tape::inference();
    let a = tied.forward(&t, &ids, 1, 4, false).unwrap().to_vec();
    let b = untied.forward(&t, &ids, 1, 4, false).unwrap().to_vec();
    assert!(a.iter().zip(&b).all(|(x, y)| 2.0 * x == *y));
    // Untied without the tensor is an error naming it.
    let d2 = scratch("untied-missing", &fixture("gpt2/model"));
    std::fs::write(d2.join("config.json"), cfg.to_string()).unwrap();
    let e = load_err(&d2);
    assert!(e.contains("lm_head.weight"), "{e}");
}

#[test]
fn config_fields_are_read_with_their_meaning_or_refused() {
    let cases: [(&str, &str, serde_json::Value, &str); 9] = [
        (
            "gpt2",
            "n_layer",
            serde_json::json!(4_600_000_000_000_000_000u64),
            "larger than any model's",
        ),
        (
            "gpt2",
            "n_layer",
            serde_json::json!(1_000_000_000),
            "1000000000 layers, but the weights hold 2",
        ),
        (
            "gpt2",
            "tie_word_embeddings",
            serde_json::json!("false"),
            "expected true or false",
        ),
        (
            "gpt2",
            "add_cross_attention",
            serde_json::json!(true),
            "not supported",
        ),
        (
            "llama_gqa",
            "num_hidden_layers",
            serde_json::json!(1_000_000),
            "but the weights hold",
        ),
        (
            "llama_gqa",
            "rope_parameters",
            serde_json::json!({"rope_theta": "10000"}),
            "field `rope_parameters.rope_theta`",
        ),
        (
            "llama_gqa",
            "partial_rotary_factor",
            serde_json::json!(0.5),
            "field `partial_rotary_factor`",
        ),
        (
            "llama_gqa",
            "rope_scaling",
            serde_json::json!({"rope_type": 3, "factor": 2}),
            "rope_scaling.rope_type",
        ),
        (
            "llama_gqa",
            "rope_scaling",
            serde_json::json!({"rope_type": "linear", "factor": 2}),
            "disagree with `rope_parameters`",
        ),
    ];
    for (model, field, value, want) in cases {
        let d = scratch(
            &format!("cfg-{model}-{field}"),
            &fixture(&format!("{model}/model")),
        );
        let p = d.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg[field] = value;
        std::fs::write(&p, cfg.to_string()).unwrap();
        let e = load_err(&d);
        assert!(
            e.contains("config.json") && e.contains(want),
            "{field}: {e}"
        );
    }
    // Positions far beyond any sequence cost nothing until used (RoPE tables grow on demand).
    let d = scratch("positions", &fixture("llama_gqa/model"));
    let p = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["max_position_embeddings"] = serde_json::json!(1u64 << 31);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let m = ModelDir::open(&d).unwrap().load_model().unwrap();
    let ids = [1u32, 2, 3];
    m.forward(&lora_core::Tape::inference(), &ids, 1, 3, false)
        .unwrap();
}

#[test]
fn the_single_weights_file_wins_and_layer_counts_must_agree() {
    // model.safetensors beside a stale shard index: transformers reads the single file.
    let d = scratch("both", &fixture("gpt2/model"));
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    ModelDir::open(&d).unwrap().load_model().unwrap();
    // Fewer layers in config.json than in the weights: a different model, refused.
    let d = scratch("fewer", &fixture("gpt2/model"));
    let p = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["n_layer"] = serde_json::json!(1);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(&d);
    assert!(e.contains("1 layers, but the weights hold 2"), "{e}");
    // An explicit null alpha is not PEFT's default; weights that overflow a combination are
    // refused.
    let e = load_with("lora_alpha", serde_json::Value::Null)
        .err()
        .unwrap();
    assert!(e.contains("field `lora_alpha`"), "{e}");
    let a = || lora_io::combine::AdapterWeights::read(&fixture("gpt2/adapter")).unwrap();
    let e = lora_io::combine::combine(
        &[a(), a()],
        &[3e38, 3e38],
        lora_io::combine::Combination::Cat,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("the combination overflows"), "{e}");
}

#[test]
fn devices_pipes_holes_and_locks() {
    // A FIFO or a device where a file is read: refused before it is opened (a FIFO would
    // block the open for ever, /dev/zero never ends).
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        let d = scratch(&format!("fifo-{name}"), &fixture("gpt2/model"));
        std::fs::remove_file(d.join(name)).unwrap();
        let c = std::ffi::CString::new(d.join(name).to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path we own.
        assert_eq!(unsafe { libc_mkfifo(c.as_ptr(), 0o600) }, 0);
        let t0 = std::time::Instant::now();
        let e = match ModelDir::open(&d).and_then(|m| {
            TextTokenizer::from_model_dir(&d)?;
            m.load_model()
        }) {
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("not a regular file") && e.contains(name),
            "{name}: {e}"
        );
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        let d2 = scratch(&format!("zero-{name}"), &fixture("gpt2/model"));
        std::fs::remove_file(d2.join(name)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d2.join(name)).unwrap();
        let e = match ModelDir::open(&d2).and_then(|m| {
            TextTokenizer::from_model_dir(&d2)?;
            m.load_model()
        }) {
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("not a regular file"), "{name}: {e}");
    }
    // A file whose header declares a tensor far larger than memory (its data a sparse hole):
    // refused by name, not an allocation abort.
    let p = std::env::temp_dir().join(format!(
        "lora-io-bad-{}-hole.safetensors",
        std::process::id()
    ));
    let n: u64 = 1 << 40; // 4 TiB of f32
    let hdr = format!(
        r#"{{"base_model.model.x.lora_A.weight":{{"dtype":"F32","shape":[4,{}],"data_offsets":[0,{}]}}}}"#,
        n / 4,
        n * 4
    );
    let mut f = std::fs::File::create(&p).unwrap();
    std::io::Write::write_all(&mut f, &(hdr.len() as u64).to_le_bytes()).unwrap();
    std::io::Write::write_all(&mut f, hdr.as_bytes()).unwrap();
    f.set_len(8 + hdr.len() as u64 + n * 4).unwrap();
    drop(f);
    let st = SafetensorsFile::open(&p).unwrap();
    let e = st
        .read_f32("base_model.model.x.lora_A.weight")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_A.weight") && e.contains("more than the"),
        "{e}"
    );
    let _ = std::fs::remove_file(&p);
    // An output another command holds is refused, naming the holder.
    let out = std::env::temp_dir().join(format!("lora-io-bad-{}-locked", std::process::id()));
    let held = lora_io::outdir::OutputLock::beside(&out).unwrap();
    let e = lora_io::merge::merge_to_dir(
        &fixture("gpt2/model"),
        &fixture("gpt2/adapter"),
        &out,
        Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!("process {} is writing", std::process::id())),
        "{e}"
    );
    drop(held);
    assert!(!out.exists());
    // A config value the model rejects is named with its file.
    let d = scratch("heads", &fixture("gpt2/model"));
    let p = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["n_head"] = serde_json::json!(3);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(&d);
    assert!(e.contains("config.json") && e.contains("n_head"), "{e}");
}

extern "C" {
    #[link_name = "mkfifo"]
    fn libc_mkfifo(path: *const std::ffi::c_char, mode: u32) -> i32;
}
