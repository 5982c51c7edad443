//! `lora eval` and `lora generate`: load a model directory (and adapter), then evaluate a
//! dataset or continue a prompt.

use anyhow::{Context, Result};
use lora_core::models::generate::{generate, GenerateConfig};
use lora_core::models::{trainable_summary, CausalLm};
use lora_io::hf::ModelDir;
use lora_io::peft::load_adapter;
use lora_io::tokenizer::TextTokenizer;
use std::path::{Path, PathBuf};

/// What `lora eval` runs.
pub struct EvalRun {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub data: PathBuf,
    pub seq_len: Option<usize>,
    pub json: bool,
}

/// What `lora generate` runs.
pub struct GenerateRun {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub prompt: String,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

fn load(model: &Path, adapter: Option<&Path>) -> Result<(ModelDir, Box<dyn CausalLm>, TextTokenizer)> {
    let md = ModelDir::open(model).with_context(|| format!("loading model {}", model.display()))?;
    // The tokenizer first: a missing tokenizer.json should not cost a weight load.
    let tok = TextTokenizer::from_model_dir(model)?;
    let mut m = md.load_model().with_context(|| format!("loading weights of {}", model.display()))?;
    if let Some(a) = adapter {
        load_adapter(m.as_mut(), a).with_context(|| format!("loading adapter {}", a.display()))?;
    }
    Ok((md, m, tok))
}

pub fn run_eval(r: &EvalRun) -> Result<()> {
    let (_, model, tok) = load(&r.model, r.adapter.as_deref())?;
    let texts = lora_train::data::read_texts(&r.data)?;
    let seq_len = r.seq_len.unwrap_or(model.max_positions()).min(model.max_positions());
    let res = lora_train::eval::evaluate(model.as_ref(), &tok, &texts, seq_len, true)?;
    if r.json {
        println!("{}", serde_json::json!({"loss": res.loss, "perplexity": res.perplexity, "tokens": res.tokens, "examples": res.examples}));
    } else {
        if r.adapter.is_some() {
            println!("{}", trainable_summary(model.as_ref()));
        }
        println!(
            "loss {:.6} | perplexity {:.4} | {} tokens in {} examples (seq-len {seq_len})",
            res.loss, res.perplexity, res.tokens, res.examples
        );
    }
    Ok(())
}

pub fn run_generate(r: &GenerateRun) -> Result<()> {
    let (md, model, tok) = load(&r.model, r.adapter.as_deref())?;
    let prompt = tok.encode(&r.prompt)?;
    let cfg = GenerateConfig {
        max_new_tokens: r.max_new_tokens,
        temperature: r.temperature,
        top_p: r.top_p,
        seed: r.seed,
        eos: md.eos_token_ids(),
        adapters: true,
    };
    let ids = generate(model.as_ref(), &prompt, &cfg)?;
    println!("{}", tok.decode(&ids)?);
    Ok(())
}
