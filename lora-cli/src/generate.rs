//! `lora generate`: continue a prompt (or answer a chat message) with a model and adapter.

use crate::args::GenerateArgs;
use crate::hub;
use crate::model::load;
use anyhow::{Context, Result};
use lora_core::models::generate::{generate, GenerateConfig};
use std::path::PathBuf;

/// `lora generate`.
pub fn command(a: GenerateArgs) -> Result<()> {
    run_generate(&GenerateRun {
        model: hub::model_dir(&a.model.model, a.model.revision.as_deref())?,
        adapter: a.model.adapter,
        prompt: a.prompt,
        chat: a.chat,
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        precision: a.precision,
    })
}

/// What `lora generate` runs.
pub struct GenerateRun {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub prompt: String,
    /// `prompt` is a user message for the chat template; print the reply only.
    pub chat: bool,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// The products' precision.
    pub precision: lora_core::models::Precision,
}

pub fn run_generate(r: &GenerateRun) -> Result<()> {
    let (md, model, tok) = load(&r.model, r.adapter.as_deref())?;
    if lora_core::models::set_precision(model.as_ref(), r.precision)? > 0 {
        eprintln!(
            "{} products ({})",
            r.precision,
            lora_kernels::gemm_bf16::kernel_name()
        );
    }
    let prompt = if r.chat {
        let t = lora_io::chat::ChatTemplate::from_model_dir(&r.model)?.with_context(|| {
            format!(
                "--chat: {} has no chat template (chat_template.jinja or tokenizer_config.json \
                 `chat_template`)",
                r.model.display()
            )
        })?;
        // The EOS the template's special tokens name must be a real token (as training checks).
        md.training_eos(&tok)?;
        let msg = serde_json::json!({"role": "user", "content": r.prompt});
        tok.encode_plain(&t.render(&[msg], true)?)?
    } else {
        tok.encode(&r.prompt)?
    };
    if !(r.temperature.is_finite() && r.temperature >= 0.0) {
        anyhow::bail!(
            "--temperature must be 0 (greedy) or positive, got {}",
            r.temperature
        );
    }
    if !(r.top_p > 0.0 && r.top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1], got {}", r.top_p);
    }
    if prompt.len() > model.max_positions() {
        anyhow::bail!(
            "--prompt: {} tokens, more than the model's {} positions",
            prompt.len(),
            model.max_positions()
        );
    }
    if let Some(&id) = prompt.iter().find(|&&t| t as usize >= model.vocab_size()) {
        anyhow::bail!(
            "{}: token id {id} of the prompt is past the model's vocabulary of {} (the tokenizer \
             belongs to another model)",
            tok.path().display(),
            model.vocab_size()
        );
    }
    let cfg = GenerateConfig {
        max_new_tokens: r.max_new_tokens,
        temperature: r.temperature,
        top_p: r.top_p,
        seed: r.seed,
        eos: md.eos_token_ids()?,
        adapters: true,
    };
    let ids = generate(model.as_ref(), &prompt, &cfg)?;
    let added = ids.len() - prompt.len();
    if added < r.max_new_tokens
        && ids.len() >= model.max_positions()
        && !ids.last().is_some_and(|t| cfg.eos.contains(t))
    {
        eprintln!(
            "note: stopped after {added} new tokens at the model's maximum of {} positions",
            model.max_positions()
        );
    }
    let shown = if r.chat {
        &ids[prompt.len()..]
    } else {
        &ids[..]
    };
    outln!("{}", tok.decode(shown)?);
    Ok(())
}
