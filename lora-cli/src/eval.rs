//! `lora eval`: mean token cross-entropy of a model (and adapter) over a dataset.

use crate::args::EvalArgs;
use crate::device::resolve_device;
use crate::hub;
use crate::model::load;
use anyhow::{Context, Result};
use std::path::PathBuf;

/// `lora eval`.
pub fn command(mut a: EvalArgs) -> Result<()> {
    a.model.model = hub::model_dir(&a.model.model, a.model.revision.as_deref())?;
    let (device, note) = resolve_device(&a.device)?;
    if !a.json && device != lora_core::Device::Cpu {
        outln!("{note}");
    }
    let bf16 = a.precision != lora_core::models::Precision::F32;
    if crate::vision::is_image_task(&a.model.model, "auto")? {
        if bf16 {
            anyhow::bail!(
                "--precision {} applies to language models for now; image models evaluate in f32",
                a.precision
            );
        }
        return crate::vision::eval(&a, device);
    }
    if bf16 && device != lora_core::Device::Cpu {
        anyhow::bail!(
            "--precision {} runs on the CPU only (the GPU products are f32); got --device {}",
            a.precision,
            a.device
        );
    }
    run_eval(&EvalRun {
        model: a.model.model,
        adapter: a.model.adapter,
        data: a.data,
        seq_len: a.seq_len,
        eos: a.eos,
        assistant_only_loss: a.assistant_only_loss,
        json: a.json,
        device,
        precision: a.precision,
    })
}

/// What `lora eval` runs.
pub struct EvalRun {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub data: PathBuf,
    pub seq_len: Option<usize>,
    /// Append the training EOS to each text and completion.
    pub eos: bool,
    /// Score the assistant's turns only.
    pub assistant_only_loss: bool,
    pub json: bool,
    /// Where the forward passes run.
    pub device: lora_core::Device,
    /// The products' precision (bf16: CPU only).
    pub precision: lora_core::models::Precision,
}

pub fn run_eval(r: &EvalRun) -> Result<()> {
    let (md, model, tok) = load(&r.model, r.adapter.as_deref())?;
    model.to_device(r.device)?;
    lora_core::models::set_precision(model.as_ref(), r.precision)?;
    let examples = lora_train::data::read_examples(&r.data)?;
    let eos = if r.eos {
        lora_train::batches::training_eos(&md, &tok, &examples, "drop --eos")?
    } else {
        None
    };
    let chat = lora_train::batches::chat_template_for(&r.model, &r.data, &examples)?;
    let seq_len = match r.seq_len {
        None => model.max_positions(),
        Some(0 | 1) => anyhow::bail!("--seq-len must be at least 2"),
        Some(n) if n > model.max_positions() => anyhow::bail!(
            "--seq-len {n} exceeds the model's maximum of {} positions ({})",
            model.max_positions(),
            r.model.join("config.json").display()
        ),
        Some(n) => n,
    };
    let res = lora_train::eval::evaluate_examples(
        model.as_ref(),
        &tok,
        &examples,
        &lora_train::batches::TokenizeOptions {
            eos,
            chat: chat.as_ref(),
            assistant_only: r.assistant_only_loss,
            ..lora_train::batches::TokenizeOptions::new(seq_len)
        },
        true,
    )
    .with_context(|| format!("evaluating {}", r.data.display()))?;
    if !res.loss.is_finite() {
        anyhow::bail!(
            "the loss on {} is {}: the model{} computes non-finite values (a damaged weight or \
             config value)",
            r.data.display(),
            res.loss,
            if r.adapter.is_some() {
                " or the adapter"
            } else {
                ""
            }
        );
    }
    if r.json {
        outln!(
            "{}",
            serde_json::json!({"loss": res.loss, "perplexity": res.perplexity, "tokens": res.tokens, "examples": res.examples, "precision": r.precision.name()})
        );
    } else {
        outln!(
            "loss {:.6} | perplexity {:.4} | {} tokens in {} examples (seq-len {seq_len}{})",
            res.loss,
            res.perplexity,
            res.tokens,
            res.examples,
            match r.precision {
                lora_core::models::Precision::F32 => String::new(),
                p => format!(", {p} products"),
            }
        );
    }
    Ok(())
}
