//! Full-parameter training of a small GPT-2 from scratch: every weight is a trainable tensor, so
//! the same tape, kernels and [`train_step`] that train adapters
//! train the whole model. The result is written as a Hugging Face model directory
//! (`config.json`, `model.safetensors`, `tokenizer.json`) that `lora train` (and transformers)
//! load like any checkpoint. This is how the built-in demo's base model is made.

use crate::batches::{pack, read_examples, tokenize, Batch, Sampler, TokenizeOptions};
use crate::optim::{lr_factor, AdamW, Optimizer, ParamGroup, Schedule};
use crate::trainer::train_step;
use crate::{Result, TrainError};
use lora_core::models::gpt2::{Gpt2, Gpt2Config};
use lora_core::{CoreError, Tensor};
use lora_io::tokenizer::TextTokenizer;
use lora_io::write::{write_atomic, write_safetensors, OutDtype, OutTensor};
use lora_kernels::rng::Rng;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A GPT-2 whose every weight is trainable, with its parameters by transformers' names.
pub struct TrainableGpt2 {
    /// The model.
    pub model: Gpt2,
    /// `(name, tensor)` in load order; the tensors are the model's own handles.
    pub params: Vec<(String, Tensor)>,
}

/// GPT-2's initialisation (transformers' `_init_weights`): linear and embedding weights
/// normal(0, 0.02), residual projections (`c_proj`) normal(0, 0.02 / sqrt(2 n_layer)),
/// biases zero, LayerNorm weight one and bias zero. Deterministic in `seed`.
pub fn init_gpt2(cfg: &Gpt2Config, seed: u64) -> Result<TrainableGpt2> {
    let mut rng = Rng::new(seed);
    let mut params = Vec::new();
    let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
    let mut load = |name: &str, shape: &[usize]| -> std::result::Result<Tensor, CoreError> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.contains(".ln_") || name.contains("ln_f") {
            let one = if name.ends_with(".weight") { 1.0 } else { 0.0 };
            vec![one; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let std = if name.ends_with("c_proj.weight") {
                proj_std
            } else {
                0.02
            };
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        };
        let t = Tensor::param(data, shape)?;
        params.push((name.to_string(), t.clone()));
        Ok(t)
    };
    let model = Gpt2::load(cfg, &mut load)?;
    Ok(TrainableGpt2 { model, params })
}

/// Writes `dir/config.json` and `dir/model.safetensors` (f32, transformers' key names; the
/// output head is tied to `wte` and, as transformers saves it, not stored) and copies the
/// tokenizer. Each file is written atomically.
pub fn save_gpt2(
    dir: &Path,
    cfg: &Gpt2Config,
    params: &[(String, Tensor)],
    tokenizer: &Path,
    special_id: u32,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
    let config = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "bos_token_id": special_id,
        "eos_token_id": special_id,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
        "initializer_range": 0.02,
    });
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)
            .expect("serialises")
            .as_bytes(),
    )?;
    write_f32_weights(&dir.join("model.safetensors"), params)?;
    let tok = std::fs::read(tokenizer).map_err(|e| err(tokenizer, e.to_string()))?;
    write_atomic(&dir.join("tokenizer.json"), &tok)?;
    Ok(())
}

/// Writes `params` (by name) as an f32 safetensors file with PyTorch's `format: pt` metadata,
/// atomically: a trained model's `model.safetensors`.
pub fn write_f32_weights(path: &Path, params: &[(String, Tensor)]) -> Result<()> {
    let data: Vec<(String, Vec<usize>, Vec<f32>)> = params
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.shape().to_vec(), t.try_to_vec()?)))
        .collect::<std::result::Result<_, CoreError>>()?;
    let tensors: Vec<OutTensor> = data
        .iter()
        .map(|(n, s, v)| OutTensor {
            name: n.clone(),
            shape: s.clone(),
            values: v,
            dtype: OutDtype::F32,
        })
        .collect();
    let meta = [("format".to_string(), "pt".to_string())].into();
    write_safetensors(path, &tensors, meta)?;
    Ok(())
}

/// A from-scratch training run.
#[derive(Clone, Debug)]
pub struct PretrainConfig {
    /// The architecture (its `vocab_size` must cover the tokenizer).
    pub model: Gpt2Config,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Training text (`.txt` paragraphs or `.jsonl` with `text`), packed into `seq_len` blocks.
    pub data: PathBuf,
    /// Output model directory.
    pub out: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// Blocks per step.
    pub batch_size: usize,
    /// Tokens per block (at most `n_positions`).
    pub seq_len: usize,
    /// Peak learning rate (AdamW, warmup then cosine).
    pub lr: f32,
    /// Warmup steps.
    pub warmup: usize,
    /// Seed of the initialisation and the shuffle.
    pub seed: u64,
    /// The id written as `bos_token_id` / `eos_token_id`.
    pub special_id: u32,
}

/// What a pretraining run did.
#[derive(Clone, Debug, PartialEq)]
pub struct PretrainSummary {
    /// Parameters.
    pub params: usize,
    /// Mean training loss of the first and of the last 10% of steps.
    pub first_loss: f32,
    /// See `first_loss`.
    pub last_loss: f32,
    /// Wall time.
    pub seconds: f64,
}

fn err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.into(),
        reason: reason.into(),
    }
}

/// A setting of the run (`--rank`, ...) that does not fit the model or the data.
fn setting_err(setting: &'static str, reason: impl Into<String>) -> TrainError {
    TrainError::Setting {
        setting,
        reason: reason.into(),
    }
}

/// Trains a GPT-2 from scratch on `cfg.data` and writes the model directory `cfg.out`.
/// `on_step(step, total, loss)` sees every step.
pub fn pretrain(
    cfg: &PretrainConfig,
    on_step: &mut dyn FnMut(usize, usize, f32),
) -> Result<PretrainSummary> {
    if cfg.seq_len < 2 || cfg.seq_len > cfg.model.n_positions {
        return Err(setting_err(
            "seq-len",
            format!(
                "must be in [2, n_positions = {}], got {}",
                cfg.model.n_positions, cfg.seq_len
            ),
        ));
    }
    let tok = TextTokenizer::open(&cfg.tokenizer)?;
    let examples = read_examples(&cfg.data)?;
    // No EOS appended: the demo tokenizer's post-processor starts every text with
    // `<|endoftext|>`, which already separates packed texts (and the committed base stays
    // reproducible by its documented command).
    let seqs = pack(
        &tokenize(
            &tok,
            &examples,
            &TokenizeOptions {
                pack: true,
                ..TokenizeOptions::new(cfg.seq_len)
            },
        )?,
        cfg.seq_len,
    );
    if seqs.is_empty() {
        return Err(err(&cfg.data, "not enough text for one block"));
    }
    if let Some(&big) = seqs.iter().flat_map(|s| s.ids.iter()).max() {
        if big as usize >= cfg.model.vocab_size {
            return Err(err(
                &cfg.tokenizer,
                format!(
                    "token id {big} does not fit vocab_size {}",
                    cfg.model.vocab_size
                ),
            ));
        }
    }
    let TrainableGpt2 { model, params } = init_gpt2(&cfg.model, cfg.seed)?;
    let groups = vec![ParamGroup {
        params: params.iter().map(|(_, t)| t.clone()).collect(),
        lr_scale: 1.0,
    }];
    let mut opt = AdamW::new(0.9, 0.95, 1e-8, 0.0);
    let mut sampler = Sampler::new(seqs.len(), cfg.seed);
    let t0 = Instant::now();
    let mut losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let idx = sampler.take(cfg.batch_size);
        let batch = Batch::pad(&idx.iter().map(|&i| &seqs[i]).collect::<Vec<_>>());
        let lr = cfg.lr * lr_factor(Schedule::Cosine, step, cfg.warmup, cfg.steps);
        let st = train_step(
            &model,
            &mut opt as &mut dyn Optimizer,
            &groups,
            &[batch],
            lr,
            Some(1.0),
            cfg.seed,
            step as u64,
            false,
        )?;
        losses.push(st.loss);
        on_step(step + 1, cfg.steps, st.loss);
    }
    save_gpt2(
        &cfg.out,
        &cfg.model,
        &params,
        &cfg.tokenizer,
        cfg.special_id,
    )?;
    let k = (cfg.steps / 10).max(1);
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len().max(1) as f32;
    Ok(PretrainSummary {
        params: params.iter().map(|(_, t)| t.numel()).sum(),
        first_loss: mean(&losses[..k.min(losses.len())]),
        last_loss: mean(&losses[losses.len().saturating_sub(k)..]),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
