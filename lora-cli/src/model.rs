//! Opening a model directory for `lora eval` and `lora generate`: the tokenizer first, then
//! the weights, then the adapter.

use anyhow::{Context, Result};
use lora_core::models::CausalLm;
use lora_io::hf::ModelDir;
use lora_io::peft::load_adapter;
use lora_io::tokenizer::TextTokenizer;
use std::path::Path;

/// The model at `model` with `adapter` loaded into it, and its tokenizer.
pub fn load(
    model: &Path,
    adapter: Option<&Path>,
) -> Result<(ModelDir, Box<dyn CausalLm>, TextTokenizer)> {
    let md = ModelDir::open(model).with_context(|| format!("loading model {}", model.display()))?;
    // The tokenizer first: a missing tokenizer.json should not cost a weight load.
    let tok = TextTokenizer::from_model_dir(model)?;
    let mut m = md
        .load_model()
        .with_context(|| format!("loading weights of {}", model.display()))?;
    if let Some(a) = adapter {
        load_adapter(m.as_mut(), a).with_context(|| format!("loading adapter {}", a.display()))?;
    }
    Ok((md, m, tok))
}
