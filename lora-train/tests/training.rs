//! Batching and training steps on the committed tiny models: prompt/completion labels, packing,
//! padding, a resumable seeded shuffle; the loss falls when an adapter trains on a small text, the
//! run is bit-identical when repeated, and the frozen base weights never change.

use lora_core::models::CausalLm;
use lora_io::hf::ModelDir;
use lora_io::peft::{inject, PeftConfig};
use lora_io::tokenizer::TextTokenizer;
use lora_train::batches::{pack, tokenize, Batch, Example, Sampler, TokenizeOptions, IGNORE};
use lora_train::optim::{AdamW, Optimizer};
use lora_train::trainer::{adapter_groups, train_step};
use serde_json::json;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity")
}

#[test]
fn labels_packing_padding_and_sampler() {
    let tok = TextTokenizer::from_model_dir(root().join("llama_gqa/model")).unwrap();
    let ex = vec![
        Example::PromptCompletion {
            prompt: "red cat".into(),
            completion: " sings".into(),
        },
        Example::Text("blue dog runs".into()),
    ];
    let s = tokenize(&tok, &ex, &TokenizeOptions::new(64)).unwrap();
    let p = tok.encode("red cat").unwrap();
    assert_eq!(p[0], 0, "the llama fixture's tokenizer adds a BOS");
    assert!(s[0].labels[..p.len()].iter().all(|&l| l == IGNORE));
    assert!(s[0].labels[p.len()..].iter().all(|&l| l >= 0));
    assert_eq!(
        s[0].ids.len(),
        p.len() + tok.encode_plain(" sings").unwrap().len()
    );
    let packed = pack(&s, 4);
    assert_eq!(packed.len(), (s[0].ids.len() + s[1].ids.len()) / 4);
    assert!(packed.iter().all(|q| q.ids.len() == 4));
    let b = Batch::pad(&[&s[0], &s[1]]);
    assert_eq!(b.seq, s[0].ids.len().max(s[1].ids.len()));
    let short = if s[0].ids.len() < s[1].ids.len() {
        0
    } else {
        1
    };
    assert_eq!(
        b.labels[short * b.seq + b.seq - 1],
        IGNORE,
        "padding is ignored by the loss"
    );

    let mut a = Sampler::new(10, 7);
    let first: Vec<usize> = a.take(25);
    let mut sorted = first[..10].to_vec();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..10).collect::<Vec<_>>(),
        "an epoch visits every example once"
    );
    let mut b2 = Sampler::new(10, 7);
    b2.take(13);
    let mut resumed = Sampler::resume(10, 7, b2.epoch, b2.pos);
    assert_eq!(
        resumed.take(12),
        first[13..25].to_vec(),
        "resuming continues the same order"
    );
    assert_ne!(Sampler::new(10, 8).take(10), first[..10].to_vec());
}

/// EOS ends every text and completion as a target (TRL's `add_eos`), exactly once, is cut with
/// the rest of a truncated sequence, and separates packed examples; the id comes from
/// `tokenizer_config.json` before `config.json`.
#[test]
fn eos_ends_texts_and_completions() {
    let dir = root().join("llama_gqa/model");
    let tok = TextTokenizer::from_model_dir(&dir).unwrap();
    let md = ModelDir::open(&dir).unwrap();
    let eos = md
        .training_eos(&tok)
        .unwrap()
        .expect("config.json has eos_token_id 2");
    assert_eq!(eos, 2);
    let ex = vec![
        Example::PromptCompletion {
            prompt: "red cat".into(),
            completion: " sings".into(),
        },
        Example::Text("blue dog runs".into()),
        Example::PromptCompletion {
            prompt: "red cat".into(),
            completion: String::new(),
        },
    ];
    let plain = tokenize(&tok, &ex, &TokenizeOptions::new(64)).unwrap();
    let s = tokenize(
        &tok,
        &ex,
        &TokenizeOptions {
            eos: Some(eos),
            ..TokenizeOptions::new(64)
        },
    )
    .unwrap();
    for (a, b) in plain.iter().zip(&s) {
        assert_eq!(b.ids.len(), a.ids.len() + 1);
        assert_eq!(&b.ids[..a.ids.len()], &a.ids[..]);
        assert_eq!(&b.labels[..a.labels.len()], &a.labels[..]);
        assert_eq!(*b.ids.last().unwrap(), eos);
        assert_eq!(*b.labels.last().unwrap(), eos as i64, "EOS is a target");
    }
    // An empty completion still teaches the stop: its only target is EOS.
    assert_eq!(s[2].labels.iter().filter(|&&l| l >= 0).count(), 1);
    // A completion that already ends with EOS gets no second one (id 2 is `"` in this
    // fixture's vocabulary).
    let ends = vec![Example::PromptCompletion {
        prompt: "red cat".into(),
        completion: " sings\"".into(),
    }];
    let done = tokenize(&tok, &ends, &TokenizeOptions::new(64)).unwrap();
    assert_eq!(done[0].ids.last(), Some(&eos));
    assert_eq!(
        tokenize(
            &tok,
            &ends,
            &TokenizeOptions {
                eos: Some(eos),
                ..TokenizeOptions::new(64)
            }
        )
        .unwrap(),
        done
    );
    // Truncation cuts the end, EOS included.
    let cut = tokenize(
        &tok,
        &ex[1..2],
        &TokenizeOptions {
            eos: Some(eos),
            ..TokenizeOptions::new(2)
        },
    )
    .unwrap();
    assert_eq!(cut[0].ids, s[1].ids[..2].to_vec());
    // Packed examples keep the boundary.
    let packed = pack(
        &tokenize(
            &tok,
            &ex[..2],
            &TokenizeOptions {
                pack: true,
                eos: Some(eos),
                ..TokenizeOptions::new(64)
            },
        )
        .unwrap(),
        1,
    );
    let flat: Vec<u32> = packed.iter().map(|q| q.ids[0]).collect();
    assert_eq!(flat[s[0].ids.len() - 1], eos);

    // tokenizer_config.json's eos_token wins over config.json, and a token the vocabulary
    // lacks is an error naming the file and field.
    let tmp = std::env::temp_dir().join(format!("lora-eos-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), tmp.join(f)).unwrap();
    }
    let md2 = ModelDir::open(&tmp).unwrap();
    let cfgp = tmp.join("tokenizer_config.json");
    std::fs::write(&cfgp, r#"{"eos_token": "<|endoftext|>"}"#).unwrap();
    assert_eq!(md2.training_eos(&tok).unwrap(), Some(0));
    std::fs::write(&cfgp, r#"{"eos_token": {"content": "<|endoftext|>"}}"#).unwrap();
    assert_eq!(md2.training_eos(&tok).unwrap(), Some(0));
    std::fs::write(&cfgp, r#"{"eos_token": "<nope>"}"#).unwrap();
    let e = md2.training_eos(&tok).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("eos_token") && e.contains("<nope>"),
        "{e}"
    );
    std::fs::write(&cfgp, r#"{"eos_token": null}"#).unwrap();
    assert_eq!(
        md2.training_eos(&tok).unwrap(),
        Some(2),
        "falls back to config.json"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn train(dir: &Path, steps: usize) -> (Vec<f32>, Vec<Vec<f32>>, Box<dyn CausalLm>) {
    let mut model = ModelDir::open(dir.join("model"))
        .unwrap()
        .load_model()
        .unwrap();
    let cfg = PeftConfig::from_json(
        Path::new("cfg"),
        &json!({"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.1}),
    )
    .unwrap();
    inject(model.as_mut(), &cfg, 42).unwrap();
    let tok = TextTokenizer::from_model_dir(dir.join("model")).unwrap();
    let text: Vec<Example> = [
        "red cat sings one two three",
        "blue dog runs one two three",
        "green bird sleeps one two three",
    ]
    .iter()
    .map(|t| Example::Text(t.to_string()))
    .collect();
    let seqs = tokenize(&tok, &text, &TokenizeOptions::new(16)).unwrap();
    let groups = adapter_groups(model.as_ref(), 4.0);
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
    let mut sampler = Sampler::new(seqs.len(), 1);
    let mut losses = Vec::new();
    for step in 0..steps {
        let micro: Vec<Batch> = (0..2)
            .map(|_| {
                let idx = sampler.take(2);
                Batch::pad(&idx.iter().map(|&i| &seqs[i]).collect::<Vec<_>>())
            })
            .collect();
        let st = train_step(
            model.as_ref(),
            &mut opt,
            &groups,
            &micro,
            5e-3,
            Some(1.0),
            3,
            step as u64,
            false,
        )
        .unwrap();
        losses.push(st.loss);
    }
    assert!(opt.state_len() > 0);
    let adapter: Vec<Vec<f32>> = groups
        .iter()
        .flat_map(|g| g.params.iter().map(|p| p.to_vec()))
        .collect();
    (losses, adapter, model)
}

#[test]
fn training_lowers_the_loss_reproducibly_and_leaves_the_base_alone() {
    let dir = root().join("gpt2");
    let before: Vec<Vec<f32>> = ModelDir::open(dir.join("model"))
        .unwrap()
        .load_model()
        .unwrap()
        .linears()
        .iter()
        .map(|(_, l)| l.base().0.to_vec())
        .collect();
    let (losses, adapter, model) = train(&dir, 30);
    let first = losses[..3].iter().sum::<f32>() / 3.0;
    let last = losses[losses.len() - 3..].iter().sum::<f32>() / 3.0;
    // The fixture's random weights (std 0.02, tied head) keep every logit near zero, so even a
    // perfect adapter cannot go far below ln(300) = 5.70 here; a working step still removes a
    // clear fraction of a nat in 30 steps (measured 5.53 -> 5.19), a broken one leaves it flat.
    assert!(
        last < first - 0.2,
        "loss should fall: {first} -> {last} ({losses:?})"
    );
    let (losses2, adapter2, _) = train(&dir, 30);
    assert_eq!(losses, losses2, "same seed, same data: the same losses");
    assert_eq!(adapter, adapter2, "and a bit-identical adapter");
    for ((_, l), w) in model.linears().iter().zip(&before) {
        assert!(
            l.base().0.is_external(),
            "frozen weights are still the untouched memory map"
        );
        assert_eq!(&l.base().0.to_vec(), w);
    }
}
