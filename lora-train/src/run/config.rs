//! [`TrainConfig`]: a run's settings, their checks, and how they are recorded in a checkpoint
//! (and compared on resume).

use super::*;

/// Everything a run needs. Defaults are the CLI's (see `lora train --help`).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Hugging Face model directory.
    pub model: PathBuf,
    /// Training data (.txt, .jsonl with text, or .jsonl with prompt/completion).
    pub data: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f32,
    /// `all-linear`, a comma-separated list of module names, or a regex (anything with regex
    /// metacharacters).
    pub target: String,
    /// Adapter dropout.
    pub dropout: f32,
    /// rsLoRA scaling.
    pub rslora: bool,
    /// Peak learning rate.
    pub lr: f32,
    /// LoRA+ learning-rate ratio for B.
    pub loraplus_ratio: f32,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Optimizer steps (ignored when `epochs` is set).
    pub steps: usize,
    /// Passes over the training sequences; sets the step count from the data size.
    pub epochs: Option<f32>,
    /// Warmup steps.
    pub warmup: usize,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// AdamW weight decay (SGD: L2).
    pub weight_decay: f32,
    /// `adamw` or `sgd` (momentum 0.9).
    pub optimizer: OptimizerKind,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f32>,
    /// Pack examples into full `seq_len` blocks.
    pub pack: bool,
    /// End every text and completion with the tokenizer's EOS token, as a target (TRL's
    /// `SFTTrainer` default; see [`ModelDir::training_eos`]). Without it a model trained on
    /// prompt/completion pairs never learns to stop.
    pub eos: bool,
    /// In conversations, take the loss on the assistant's turns only (see
    /// [`crate::batches::tokenize`]).
    pub assistant_only_loss: bool,
    /// Seed for init, shuffling, dropout.
    pub seed: u64,
    /// Held-out data file.
    pub eval_data: Option<PathBuf>,
    /// Fraction of the data held out when no eval file is given.
    pub eval_split: f32,
    /// Evaluate every this many steps (0: only before and after).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Also checkpoint whenever this many minutes of training have passed since the last
    /// checkpoint (0: never by time), so a killed run loses at most that much work.
    pub save_minutes: f32,
    /// Keep only the newest this many checkpoints (0: keep all).
    pub keep_checkpoints: usize,
    /// Activation checkpointing: recompute each transformer block's forward during backward
    /// (less activation memory, about a third more compute; same results up to rounding).
    pub gradient_checkpointing: bool,
    /// Stop after this many steps of this invocation (a checkpoint is written): for tests and
    /// time-boxed runs; `None` runs to `steps`.
    pub stop_after: Option<usize>,
    /// Where the model trains (the whole step runs there). Not part of the run's identity: a
    /// run checkpointed on one device resumes on another.
    pub device: lora_core::Device,
    /// The products' precision: f32, or bf16 as PyTorch autocast computes them (the operands of
    /// the frozen linear layers and the output head rounded to bf16, f32 accumulation; adapters,
    /// optimizer state, norms, softmax, attention and the loss in f32). Part of the run's identity: resume refuses a change.
    pub precision: lora_core::models::Precision,
}

impl TrainConfig {
    pub(super) fn to_json(&self) -> Value {
        // f32 settings as their shortest decimal (2e-4, not 0.00019999999494757503).
        let f = |x: f32| short_f32(x);
        json!({
            "model": self.model, "data": self.data, "rank": self.rank, "alpha": f(self.alpha), "target": self.target,
            "dropout": f(self.dropout), "rslora": self.rslora, "lr": f(self.lr), "loraplus_ratio": f(self.loraplus_ratio),
            "batch_size": self.batch_size, "grad_accum": self.grad_accum, "seq_len": self.seq_len, "steps": self.steps, "epochs": self.epochs.map(f),
            "warmup": self.warmup, "schedule": format!("{:?}", self.schedule).to_lowercase(), "weight_decay": f(self.weight_decay),
            "optimizer": self.optimizer.to_string(), "max_grad_norm": self.max_grad_norm.map(f), "pack": self.pack, "eos": self.eos, "assistant_only_loss": self.assistant_only_loss, "seed": self.seed,
            "eval_data": self.eval_data, "eval_split": f(self.eval_split), "precision": self.precision.name(),
        })
    }

    pub(super) fn validate(&self) -> Result<()> {
        let bad =
            |setting: &'static str, reason: String| Err(TrainError::Setting { setting, reason });
        if self.rank == 0 || self.rank as u64 > lora_io::peft::MAX_RANK {
            return bad(
                "rank",
                format!(
                    "must be from 1 to {}, got {}",
                    lora_io::peft::MAX_RANK,
                    self.rank
                ),
            );
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return bad(
                "alpha",
                format!("must be a positive number, got {}", self.alpha),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            );
        }
        if self.steps == 0 && self.epochs.is_none() {
            return bad("steps", "must be at least 1".into());
        }
        if let Some(e) = self.epochs {
            if !(e.is_finite() && e > 0.0) {
                return bad("epochs", format!("must be positive, got {e}"));
            }
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad(
                "batch-size",
                "batch size and grad-accum must be at least 1".into(),
            );
        }
        if self.seq_len < 2 {
            return bad("seq-len", "must be at least 2".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("must be positive, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight-decay",
                format!("must be finite and >= 0, got {}", self.weight_decay),
            );
        }
        if !(self.loraplus_ratio.is_finite() && self.loraplus_ratio > 0.0) {
            return bad(
                "loraplus-ratio",
                format!(
                    "must be finite and > 0 (1 = plain LoRA), got {}",
                    self.loraplus_ratio
                ),
            );
        }
        if let Some(c) = self.max_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(
                    "max-grad-norm",
                    format!("must be finite and > 0 (0 on the command line disables), got {c}"),
                );
            }
        }
        if !(self.save_minutes.is_finite() && self.save_minutes >= 0.0) {
            return bad(
                "save-minutes",
                format!(
                    "must be >= 0 (0: no checkpoints by time), got {}",
                    self.save_minutes
                ),
            );
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            return bad(
                "eval-split",
                format!("must be in [0, 1), got {}", self.eval_split),
            );
        }
        if self.optimizer == OptimizerKind::Sgd && self.device != lora_core::Device::Cpu {
            return bad(
                "optimizer",
                format!("sgd runs on the CPU only; use adamw on {}", self.device),
            );
        }
        if self.precision != lora_core::models::Precision::F32
            && self.device != lora_core::Device::Cpu
        {
            return bad(
                "precision",
                format!(
                    "{} runs on the CPU only (the GPU products are f32, or TF32 with --tf32); \
                     got --device {}",
                    self.precision, self.device
                ),
            );
        }
        if let Err(e) = self.peft().target_modules.check() {
            return bad("target", e);
        }
        Ok(())
    }

    pub(super) fn peft(&self) -> PeftConfig {
        let targets = Targets::from_flag(&self.target);
        PeftConfig {
            r: self.rank,
            lora_alpha: self.alpha,
            target_modules: targets,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            use_rslora: self.rslora,
            lora_dropout: self.dropout,
            fan_in_fan_out: false,
            base_model_name_or_path: Some(self.model.to_string_lossy().to_string()),
            task_type: Some("CAUSAL_LM".into()),
            modules_to_save: Vec::new(),
        }
    }
}

/// An f32 as the JSON number its shortest decimal spells (`2e-4`, not the f64 widening
/// `0.00019999999494757503`).
pub(super) fn short_f32(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// The settings that differ between a checkpoint's config and this run's, as
/// `key: checkpoint VALUE, now VALUE`. A checkpoint written before `eos` or
/// `assistant_only_loss` existed trained without them, so a missing key reads as `false`; one
/// written before `precision` existed trained in f32.
/// Numbers compare as the f32 settings they are (older checkpoints wrote their f64 widening).
/// `steps` and `epochs` are not part of a run's identity: a resumed run may be extended.
pub(super) fn config_diff(saved: &Value, now: &Value) -> Vec<String> {
    let mut saved = saved.clone();
    if let Some(m) = saved.as_object_mut() {
        for k in ["eos", "assistant_only_loss"] {
            m.entry(k).or_insert(Value::Bool(false));
        }
        m.entry("precision").or_insert(Value::from("f32"));
    }
    let empty = serde_json::Map::new();
    let (a, b) = (
        saved.as_object().unwrap_or(&empty),
        now.as_object().unwrap_or(&empty),
    );
    let as_f32 = |v: Option<&Value>| v.and_then(|v| v.as_f64()).map(|x| x as f32);
    // Paths compare as the files they name (`./d.jsonl` and `/abs/d.jsonl` are one file).
    let same = |x: Option<&Value>, y: Option<&Value>| match (as_f32(x), as_f32(y)) {
        (Some(p), Some(q)) => p == q,
        _ => match (x.and_then(|v| v.as_str()), y.and_then(|v| v.as_str())) {
            (Some(p), Some(q)) if p != q => {
                outdir::resolve(Path::new(p)) == outdir::resolve(Path::new(q))
                    && (Path::new(p).exists() || Path::new(q).exists())
            }
            _ => x == y,
        },
    };
    let show = |v: Option<&Value>| match (v, as_f32(v)) {
        (Some(Value::Number(n)), Some(x)) if n.is_f64() => x.to_string(),
        (Some(v), _) => v.to_string(),
        (None, _) => "(none)".to_string(),
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !matches!(k.as_str(), "steps" | "epochs"))
        .filter(|k| !same(a.get(*k), b.get(*k)))
        .map(|k| format!("{k}: checkpoint {}, now {}", show(a.get(k)), show(b.get(k))))
        .collect()
}

/// A tokenization error about one example, re-addressed to the data file it came from (its
/// number counts the examples left after the held-out split when `split`).
pub(super) fn in_file(e: TrainError, file: &Path, split: bool) -> TrainError {
    match e {
        TrainError::Data { reason, .. } => err(
            file,
            if split {
                format!("{reason} (examples numbered after the --eval-split hold-out)")
            } else {
                reason
            },
        ),
        e => e,
    }
}
