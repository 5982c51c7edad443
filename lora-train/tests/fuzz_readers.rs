//! Every reader of user files under random bytes and mutated real files: the safetensors
//! reader, `config.json`, `adapter_config.json`, `tokenizer_config.json` (EOS and chat
//! template), kohya files and the data readers must return (a value or an error), never panic,
//! hang or allocate what the file only claims. Mutations start from the committed fixtures so
//! they reach past the first check.
//!
//! Bounded for CI: `LORA_FUZZ_CASES` cases per property (default 40); run longer locally with
//! e.g. `LORA_FUZZ_CASES=5000 cargo test -p lora-train --test fuzz_readers`.

use lora_io::chat::ChatTemplate;
use lora_io::hf::ModelDir;
use lora_io::safetensors::SafetensorsFile;
use lora_io::tokenizer::TextTokenizer;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn cases() -> u32 {
    std::env::var("LORA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/parity")
        .join(p)
}

/// A fresh scratch directory for one case.
fn scratch(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "lora-fuzz-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// JSON values of every kind, with the edge cases config readers trip on: huge and negative
/// integers, floats that overflow f32, strings that look like booleans or numbers, nesting.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(2),
            Just(64),
            Just(1 << 31),
            Just(1_000_000_000_000)
        ]
        .prop_map(Value::from),
        prop_oneof![
            Just(0.0f64),
            Just(-0.0),
            Just(0.5),
            Just(1e39),
            Just(-1e300),
            Just(1e-45),
            Just(1e18)
        ]
        .prop_map(Value::from),
        prop_oneof![
            Just("true"),
            Just("false"),
            Just(""),
            Just("1"),
            Just("-1"),
            Just("1e12"),
            Just("all-linear"),
            Just("(unclosed"),
            Just("{{ messages }}"),
            Just("{% for m in messages %}{{ m.content }}{% endfor %}"),
            Just("<|endoftext|>"),
            Just("c_attn"),
            Just("llama3"),
        ]
        .prop_map(Value::from),
        "[a-z_\\.]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// `v` with `field` set to `value` (or removed when `value` is absent).
fn with_field(v: &Value, field: &str, value: Option<Value>) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        match value {
            Some(x) => {
                o.insert(field.to_string(), x);
            }
            None => {
                o.remove(field);
            }
        }
    }
    v
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Opens a model directory and, when that works, builds the model and loads the fixture
/// adapter (its outcome is not the point: only that it returns).
fn exercise_model(dir: &Path) {
    if let Ok(md) = ModelDir::open(dir) {
        if let Ok(mut m) = md.load_model() {
            let _ = lora_io::peft::load_adapter(m.as_mut(), &fixture("gpt2/adapter"));
        }
        if let Ok(tok) = TextTokenizer::from_model_dir(dir) {
            let _ = md.training_eos(&tok);
        }
        let _ = md.eos_token_ids();
    }
    let _ = lora_io::inspect::inspect(dir);
}

/// Every reader on one file's bytes, each under the name it expects.
fn every_reader(bytes: &[u8]) {
    let d = scratch("bytes");
    let st = d.join("x.safetensors");
    std::fs::write(&st, bytes).unwrap();
    if let Ok(f) = SafetensorsFile::open(&st) {
        for k in f.names() {
            let _ = f.read_f32(k);
        }
    }
    let _ = lora_io::kohya::KohyaLora::read(&st);
    for name in [
        "config.json",
        "adapter_config.json",
        "tokenizer_config.json",
    ] {
        let m = scratch("bytes-model");
        copy_dir(&fixture("gpt2/model"), &m);
        std::fs::write(m.join(name), bytes).unwrap();
        exercise_model(&m);
        let _ = ChatTemplate::from_model_dir(&m);
        let _ = lora_io::peft::PeftConfig::load(&m);
        let _ = std::fs::remove_dir_all(&m);
    }
    for ext in ["jsonl", "txt"] {
        let p = d.join(format!("data.{ext}"));
        std::fs::write(&p, bytes).unwrap();
        let _ = lora_train::data::read_examples(&p);
    }
    let _ = std::fs::remove_dir_all(&d);
}

fn mutate(mut b: Vec<u8>, flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(i, x) in flips {
        if !b.is_empty() {
            let n = b.len();
            b[i % n] = x;
        }
    }
    if let Some(c) = cut {
        let n = b.len();
        b.truncate(c % (n + 1));
    }
    b
}

const GPT2_CONFIG_FIELDS: &[&str] = &[
    "model_type",
    "n_embd",
    "n_head",
    "n_layer",
    "n_positions",
    "n_inner",
    "vocab_size",
    "layer_norm_epsilon",
    "activation_function",
    "tie_word_embeddings",
    "scale_attn_weights",
    "add_cross_attention",
    "eos_token_id",
];

const LLAMA_CONFIG_FIELDS: &[&str] = &[
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "hidden_act",
    "rms_norm_eps",
];

const ADAPTER_FIELDS: &[&str] = &[
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "lora_dropout",
    "bias",
    "peft_type",
    "modules_to_save",
    "lora_bias",
];

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_bytes_reach_every_reader(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        every_reader(&bytes);
    }

    #[test]
    fn mutated_safetensors_and_kohya_files(
        which in 0usize..3,
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        header_flips in prop::collection::vec((0usize..200, any::<u8>()), 0..4),
        cut in prop::option::of(any::<usize>()),
    ) {
        let src = match which {
            0 => std::fs::read(fixture("gpt2/adapter/adapter_model.safetensors")).unwrap(),
            1 => std::fs::read(fixture("gpt2/model/model.safetensors")).unwrap(),
            _ => {
                let k = lora_io::kohya::KohyaLora::from_peft(&fixture("gpt2/adapter"), "lora_te").unwrap();
                let d = scratch("kohya-src");
                k.write(&d.join("k.safetensors")).unwrap();
                let b = std::fs::read(d.join("k.safetensors")).unwrap();
                let _ = std::fs::remove_dir_all(&d);
                b
            }
        };
        // Flips anywhere, and flips in the header (length field and JSON), where they matter.
        let b = mutate(src, &flips, None);
        let b = mutate(b, &header_flips, cut);
        every_reader(&b);
        // As the weights of a whole model directory.
        if which == 1 {
            let m = scratch("weights");
            copy_dir(&fixture("gpt2/model"), &m);
            std::fs::write(m.join("model.safetensors"), &b).unwrap();
            exercise_model(&m);
            let _ = std::fs::remove_dir_all(&m);
        }
    }

    #[test]
    fn config_fields_of_any_value(
        llama in any::<bool>(),
        i in 0usize..32,
        value in prop::option::of(arb_json()),
    ) {
        let (src, fields) = if llama {
            (fixture("llama_gqa/model"), LLAMA_CONFIG_FIELDS)
        } else {
            (fixture("gpt2/model"), GPT2_CONFIG_FIELDS)
        };
        let m = scratch("config");
        copy_dir(&src, &m);
        let cfg = read_json(&m.join("config.json"));
        let field = fields[i % fields.len()];
        std::fs::write(m.join("config.json"), with_field(&cfg, field, value).to_string()).unwrap();
        exercise_model(&m);
        let _ = std::fs::remove_dir_all(&m);
    }

    #[test]
    fn adapter_config_fields_of_any_value(i in 0usize..32, value in prop::option::of(arb_json())) {
        let a = scratch("adapter");
        copy_dir(&fixture("gpt2/adapter"), &a);
        let cfg = read_json(&a.join("adapter_config.json"));
        let field = ADAPTER_FIELDS[i % ADAPTER_FIELDS.len()];
        std::fs::write(a.join("adapter_config.json"), with_field(&cfg, field, value).to_string()).unwrap();
        if let Ok(mut m) = ModelDir::open(fixture("gpt2/model")).and_then(|md| md.load_model()) {
            let _ = lora_io::peft::load_adapter(m.as_mut(), &a);
        }
        let _ = lora_io::inspect::inspect(&a);
        let _ = lora_io::combine::AdapterWeights::read(&a);
        let _ = lora_io::kohya::KohyaLora::from_peft(&a, "lora_te");
        let _ = std::fs::remove_dir_all(&a);
    }

    #[test]
    fn tokenizer_config_and_chat_data(
        eos in prop::option::of(arb_json()),
        template in prop::option::of(arb_json()),
        lines in prop::collection::vec(arb_json(), 1..4),
    ) {
        let m = scratch("tokcfg");
        copy_dir(&fixture("gpt2/model"), &m);
        let mut cfg = json!({});
        if let Some(e) = eos { cfg["eos_token"] = e; }
        if let Some(t) = template { cfg["chat_template"] = t; }
        std::fs::write(m.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        exercise_model(&m);
        // Data lines of any shape, rendered through whatever template there is.
        let data = m.join("data.jsonl");
        let text: Vec<String> = lines
            .iter()
            .map(|l| match l {
                Value::Object(_) => l.to_string(),
                other => json!({"messages": [{"role": "user", "content": other}], "text": other}).to_string(),
            })
            .collect();
        std::fs::write(&data, text.join("\n")).unwrap();
        if let (Ok(examples), Ok(tok)) = (lora_train::data::read_examples(&data), TextTokenizer::from_model_dir(&m)) {
            if let Ok(chat) = lora_train::batches::chat_template_for(&m, &data, &examples) {
                let opts = lora_train::batches::TokenizeOptions {
                    chat: chat.as_ref(),
                    assistant_only: true,
                    ..lora_train::batches::TokenizeOptions::new(16)
                };
                let _ = lora_train::batches::tokenize(&tok, &examples, &opts);
            }
        }
        let _ = std::fs::remove_dir_all(&m);
    }
}
