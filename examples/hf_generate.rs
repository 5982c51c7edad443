//! Load a Hugging Face model directory, then continue a prompt with and without a PEFT adapter.
//!
//! `cargo run --release -p lora-examples --example hf_generate [MODEL_DIR ADAPTER_DIR PROMPT]`
//!
//! By default it uses the built-in demo: the tiny GPT-2 in `demo/base` and the translation
//! adapter in `demo/adapter` (what `lora demo` trains).

use lora_core::models::generate::{generate, GenerateConfig};
use lora_io::hf::ModelDir;
use lora_io::peft::load_adapter;
use lora_io::tokenizer::TextTokenizer;
use std::error::Error;
use std::path::PathBuf;

/// Returns (base continuation, adapted continuation).
fn run(model: PathBuf, adapter: PathBuf, prompt: &str) -> Result<(String, String), Box<dyn Error>> {
    let md = ModelDir::open(&model)?;
    let tok = TextTokenizer::from_model_dir(&model)?;
    let mut lm = md.load_model()?; // f32 weights memory-mapped, frozen
    load_adapter(lm.as_mut(), &adapter)?;
    let ids = tok.encode(prompt)?;
    let mut cfg = GenerateConfig {
        max_new_tokens: 20,
        eos: tok.token_id(".").into_iter().collect(), // stop at the end of the sentence
        ..Default::default()
    };
    let mut continue_with = |adapters: bool| -> Result<String, Box<dyn Error>> {
        cfg.adapters = adapters; // false: the base model alone, adapter layers bypassed
        let out = generate(lm.as_ref(), &ids, &cfg)?;
        Ok(tok.decode(&out[ids.len()..])?)
    };
    Ok((continue_with(false)?, continue_with(true)?))
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let demo = lora_examples::repo_root().join("demo");
    let (model, adapter, prompt) = match args.as_slice() {
        [m, a, p] => (PathBuf::from(m), PathBuf::from(a), p.clone()),
        [] => (
            demo.join("base"),
            demo.join("adapter"),
            "english : a lazy wolf likes the white hen near the river . french :".to_string(),
        ),
        _ => return Err("usage: hf_generate [MODEL_DIR ADAPTER_DIR PROMPT]".into()),
    };
    let (base, adapted) = run(model, adapter, &prompt)?;
    println!("{prompt}\n  base model:   {base}\n  with adapter: {adapted}");
    Ok(())
}

#[test]
fn example_runs() {
    // A sentence that is not in demo/data/train.jsonl.
    let demo = lora_examples::repo_root().join("demo");
    let prompt = "english : a lazy wolf likes the white hen near the river . french :";
    let (base, adapted) = run(demo.join("base"), demo.join("adapter"), prompt).unwrap();
    assert_eq!(
        adapted.trim(),
        "un loup paresseux aime la poule blanche près de la rivière ."
    );
    assert_ne!(base.trim(), adapted.trim());
}
