//! A whole training run: load the model, inject adapters, tokenize the data, step with the
//! schedule, evaluate, log metrics, checkpoint, resume.
//!
//! Output directory layout:
//! ```text
//! out/adapter_config.json, out/adapter_model.safetensors   the final adapter (PEFT format)
//! out/metrics.jsonl                                         one JSON object per step / eval
//! out/loss.svg                                              train and eval loss over steps
//! out/checkpoint-000100/                                    adapter + optimizer.safetensors +
//!                                                           trainer_state.json
//! ```
//! A checkpoint is assembled in a temporary directory and renamed into place, so the newest
//! `checkpoint-*` directory is always complete. Resuming restores the adapter, the optimizer
//! moments, the step (which drives the schedule and dropout seeds) and the sampler position,
//! so a resumed run ends with the same adapter as an uninterrupted one. A checkpoint that does
//! not read back whole (a damaged file, missing moments or sampler position) is skipped for the
//! newest one that does, and the run says which.
//!
//! The output directory carries lora-rs's marker (see [`lora_io::outdir`]) and, while a run
//! writes there, its lock: a second run into the same directory is refused with the first one's
//! pid. Temporaries a killed run left (`.checkpoint-N.tmp`, half-written files) are removed by
//! the next run and reported. `force` replaces only a previous training output holding nothing
//! else, and never an input.

use crate::batches::{
    chat_template_for, pack, read_examples, tokenize, training_eos, Batch, Sampler, Sequence,
    TokenizeOptions,
};
use crate::eval::eval_sequences;
use crate::optim::{lr_factor, Optimizer, OptimizerKind, OptimizerState, Schedule};
use crate::trainer::{adapter_groups, train_step, StepStats};
use crate::{Result, TrainError};
use lora_core::models::{param_counts, CausalLm};
use lora_core::Tensor;
use lora_io::hf::ModelDir;
use lora_io::outdir::{self, Existing, Owned};
use lora_io::peft::{inject, load_adapter, save_adapter, PeftConfig, Targets};
use lora_io::safetensors::SafetensorsFile;
use lora_io::tokenizer::TextTokenizer;
use lora_io::write::{write_atomic, write_safetensors, OutDtype, OutTensor};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
}

impl TrainConfig {
    fn to_json(&self) -> Value {
        // f32 settings as their shortest decimal (2e-4, not 0.00019999999494757503).
        let f = |x: f32| short_f32(x);
        json!({
            "model": self.model, "data": self.data, "rank": self.rank, "alpha": f(self.alpha), "target": self.target,
            "dropout": f(self.dropout), "rslora": self.rslora, "lr": f(self.lr), "loraplus_ratio": f(self.loraplus_ratio),
            "batch_size": self.batch_size, "grad_accum": self.grad_accum, "seq_len": self.seq_len, "steps": self.steps, "epochs": self.epochs.map(f),
            "warmup": self.warmup, "schedule": format!("{:?}", self.schedule).to_lowercase(), "weight_decay": f(self.weight_decay),
            "optimizer": self.optimizer.to_string(), "max_grad_norm": self.max_grad_norm.map(f), "pack": self.pack, "eos": self.eos, "assistant_only_loss": self.assistant_only_loss, "seed": self.seed,
            "eval_data": self.eval_data, "eval_split": f(self.eval_split),
        })
    }

    fn validate(&self) -> Result<()> {
        let bad = |f: &str, r: String| {
            Err(TrainError::Data {
                path: PathBuf::from(format!("--{f}")),
                reason: r,
            })
        };
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
        if let Err(e) = self.peft().target_modules.check() {
            return bad("target", e);
        }
        Ok(())
    }

    fn peft(&self) -> PeftConfig {
        let t = self.target.trim();
        let targets = if t == "all-linear" {
            Targets::AllLinear
        } else if t.chars().any(|c| "\\^$*+?()[]{}|".contains(c)) {
            Targets::Regex(t.to_string())
        } else {
            Targets::List(
                t.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            )
        };
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
        }
    }
}

/// An f32 as the JSON number its shortest decimal spells (`2e-4`, not the f64 widening
/// `0.00019999999494757503`).
fn short_f32(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// The settings that differ between a checkpoint's config and this run's, as
/// `key: checkpoint VALUE, now VALUE`. A checkpoint written before `eos` or
/// `assistant_only_loss` existed trained without them, so a missing key reads as `false`.
/// Numbers compare as the f32 settings they are (older checkpoints wrote their f64 widening).
/// `steps` and `epochs` are not part of a run's identity: a resumed run may be extended.
fn config_diff(saved: &Value, now: &Value) -> Vec<String> {
    let mut saved = saved.clone();
    if let Some(m) = saved.as_object_mut() {
        for k in ["eos", "assistant_only_loss"] {
            m.entry(k).or_insert(Value::Bool(false));
        }
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
fn in_file(e: TrainError, file: &Path, split: bool) -> TrainError {
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

/// One line of progress.
#[derive(Clone, Debug, PartialEq)]
pub struct StepLog {
    /// 1-based step.
    pub step: usize,
    /// Of this many.
    pub total: usize,
    /// Training loss.
    pub loss: f32,
    /// Learning rate used.
    pub lr: f32,
    /// Target tokens per second over the run so far.
    pub tokens_per_s: f64,
    /// Eval loss, when this step evaluated.
    pub eval_loss: Option<f64>,
}

/// What a run reports as it goes.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// A step finished.
    Step(&'a StepLog),
    /// A one-line notice for the user: a stale temporary removed, a damaged checkpoint skipped,
    /// examples dropped, a run extended.
    Note(&'a str),
}

/// What a run did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary {
    /// Steps completed (in total, including before a resume).
    pub steps: usize,
    /// Last training loss.
    pub final_loss: f32,
    /// Eval loss before training (a resumed run reports its original run's).
    pub eval_before: Option<f64>,
    /// Eval loss at the end.
    pub eval_after: Option<f64>,
    /// Target tokens trained on in this invocation.
    pub tokens: usize,
    /// Wall time of this invocation.
    pub seconds: f64,
    /// Trainable parameters.
    pub trainable: usize,
    /// All parameters.
    pub all_params: usize,
    /// The output directory.
    pub out: PathBuf,
    /// Stopped early by the stop flag (a checkpoint was written; `--resume` continues).
    pub interrupted: bool,
    /// `--resume` found the run already finished: nothing was trained (`final_loss` is the
    /// run's last).
    pub already_complete: bool,
}

fn err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.into(),
        reason: reason.into(),
    }
}

fn named_params(model: &dyn CausalLm) -> Vec<(String, Tensor)> {
    model
        .linears()
        .into_iter()
        .filter_map(|(n, l)| {
            l.lora().map(|l| {
                vec![
                    (format!("{n}.lora_A"), l.lora_a.clone()),
                    (format!("{n}.lora_B"), l.lora_b.clone()),
                ]
            })
        })
        .flatten()
        .collect()
}

/// The step a `checkpoint-NNNNNN` name holds.
fn checkpoint_step(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("checkpoint-")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Whether a training run writes an entry of this name in its output directory (what `force`
/// may replace there).
pub fn is_train_output(name: &str) -> bool {
    matches!(
        name,
        "adapter_config.json" | "adapter_model.safetensors" | "metrics.jsonl" | "loss.svg"
    ) || checkpoint_step(name).is_some()
        || is_checkpoint_tmp(name)
        || outdir::is_dead_temp(name)
}

/// The files of a checkpoint directory.
const CHECKPOINT_FILES: [&str; 4] = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
];

/// What a checkpoint directory (or one being assembled) holds besides the files a checkpoint
/// is made of: someone else's, so the directory is not ours to remove.
fn foreign_in_checkpoint(dir: &Path) -> Vec<String> {
    outdir::foreign_entries(dir, |n| {
        CHECKPOINT_FILES.contains(&n) || outdir::is_temp_name(n)
    })
}

/// A checkpoint being assembled (`.checkpoint-NNNNNN.tmp`); one found when a run starts was
/// left by a run that was killed while writing it.
fn is_checkpoint_tmp(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .is_some_and(|n| checkpoint_step(n).is_some())
}

/// The `checkpoint-*` directories of `out`, newest first.
fn checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let step = checkpoint_step(&e.file_name().to_string_lossy())?;
                    (e.path().is_dir() && !e.path().is_symlink()).then(|| (step, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
    v
}

/// A checkpoint that read back whole.
struct Resumable {
    step: usize,
    dir: PathBuf,
    state: Value,
    sampler_epoch: u64,
    sampler_pos: usize,
    optimizer: OptimizerState,
}

/// Reads a checkpoint back and checks it is whole: the trainer state with every field a resume
/// needs, an adapter whose tensors are all finite, and optimizer state for every adapter tensor
/// of the right length (a moment missing would silently restart from zero). The error is the
/// reason it cannot be resumed.
fn read_checkpoint(
    step: usize,
    dir: &Path,
    opt: &dyn Optimizer,
) -> std::result::Result<Resumable, String> {
    let sp = dir.join("trainer_state.json");
    let state = lora_io::hf::read_json(&sp).map_err(|e| e.to_string())?;
    let uint = |k: &str| {
        state[k].as_u64().ok_or_else(|| {
            format!(
                "{}: `{k}` missing or not a non-negative integer",
                sp.display()
            )
        })
    };
    if uint("step")? != step as u64 {
        return Err(format!(
            "{}: `step` is {}, the directory's name says {step}",
            sp.display(),
            state["step"]
        ));
    }
    let sampler_epoch = uint("sampler_epoch")?;
    let sampler_pos = usize::try_from(uint("sampler_pos")?).map_err(|e| e.to_string())?;
    if !state["config"].is_object() {
        return Err(format!("{}: `config` missing", sp.display()));
    }
    lora_io::peft::PeftConfig::load(dir).map_err(|e| e.to_string())?;
    let af = dir.join("adapter_model.safetensors");
    let adapter = SafetensorsFile::open(&af).map_err(|e| e.to_string())?;
    let mut sizes = Vec::new();
    for k in adapter.names() {
        let (v, _) = adapter.read_f32_finite(k).map_err(|e| e.to_string())?;
        let Some(name) = k
            .strip_prefix("base_model.model.")
            .and_then(|n| n.strip_suffix(".weight"))
        else {
            return Err(format!("{}: `{k}` is not a PEFT LoRA key", af.display()));
        };
        sizes.push((name.to_string(), v.len()));
    }
    let of = dir.join("optimizer.safetensors");
    let f = SafetensorsFile::open(&of).map_err(|e| e.to_string())?;
    let mut optimizer = OptimizerState::default();
    for k in f.names() {
        optimizer
            .buffers
            .push((k.to_string(), f.read_f32(k).map_err(|e| e.to_string())?.0));
    }
    if let Some(m) = state["optimizer_steps"].as_object() {
        for (k, v) in m {
            let n = v.as_u64().ok_or_else(|| {
                format!("{}: `optimizer_steps.{k}` is not an integer", sp.display())
            })?;
            optimizer.steps.push((k.clone(), n));
        }
    }
    if step > 0 {
        for (name, len) in &sizes {
            if let Some(missing) = opt.missing_state(name, *len, &optimizer) {
                return Err(format!(
                    "{}: no optimizer state {missing} (resuming would restart it from zero)",
                    of.display()
                ));
            }
        }
    }
    Ok(Resumable {
        step,
        dir: dir.to_path_buf(),
        state,
        sampler_epoch,
        sampler_pos,
        optimizer,
    })
}

/// The newest checkpoint of `out` that reads back whole; each newer one that does not is
/// reported through `note` with the reason. None whole is an error listing why.
fn newest_resumable(
    out: &Path,
    opt: &dyn Optimizer,
    note: &mut dyn FnMut(&str),
) -> Result<Resumable> {
    let all = checkpoints(out);
    if all.is_empty() {
        return Err(err(
            out,
            "--resume: no checkpoint-* directory found (the run stopped before its first \
             checkpoint, or --out differs)",
        ));
    }
    let mut why = Vec::new();
    for (step, dir) in &all {
        match read_checkpoint(*step, dir, opt) {
            Ok(r) => {
                if !why.is_empty() {
                    note(&format!(
                        "resuming from {} (the newer checkpoints are damaged: {})",
                        dir.display(),
                        why.join("; ")
                    ));
                }
                return Ok(r);
            }
            Err(e) => why.push(e),
        }
    }
    Err(err(
        out,
        format!(
            "--resume: no checkpoint reads back whole: {}",
            why.join("; ")
        ),
    ))
}

/// What [`save_checkpoint`] records besides the model and optimizer.
struct CheckpointExtras {
    /// The time the chat template's `strftime_now` rendered with.
    chat_now: Option<i64>,
    /// The last step's training loss.
    loss: f32,
    /// The eval loss before training, for a resumed run's summary.
    eval_before: Option<f64>,
}

/// Everything a checkpoint records.
struct CheckpointState<'a> {
    model: &'a dyn CausalLm,
    peft: &'a PeftConfig,
    opt: &'a dyn Optimizer,
    sampler: &'a Sampler,
    cfg: &'a TrainConfig,
    extras: CheckpointExtras,
}

/// Writes `checkpoint-<step>` in `out` and rotates the old ones; returns notes for the user.
fn save_checkpoint(out: &Path, step: usize, st: &CheckpointState) -> Result<Vec<String>> {
    let cfg = st.cfg;
    let final_dir = out.join(format!("checkpoint-{step:06}"));
    let tmp = out.join(format!(".checkpoint-{step:06}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    let r = write_checkpoint(&tmp, &final_dir, step, st);
    if r.is_err() {
        // A full disk or a failing write: the half-assembled checkpoint goes, the newest
        // complete one stays.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r?;
    let mut kept = Vec::new();
    if cfg.keep_checkpoints > 0 {
        // Only after the new one is complete: older ones go, newest first kept; one holding
        // someone else's files stays (and is reported).
        for (_, p) in checkpoints(out).into_iter().skip(cfg.keep_checkpoints) {
            let foreign = foreign_in_checkpoint(&p);
            if foreign.is_empty() {
                let _ = std::fs::remove_dir_all(p);
            } else {
                kept.push(format!(
                    "kept {} beyond --keep-checkpoints: it holds files lora-rs did not write ({})",
                    p.display(),
                    foreign.join(", ")
                ));
            }
        }
    }
    Ok(kept)
}

/// Assembles a checkpoint in `tmp` and renames it to `final_dir`.
fn write_checkpoint(tmp: &Path, final_dir: &Path, step: usize, st: &CheckpointState) -> Result<()> {
    let &CheckpointState {
        model,
        peft,
        opt,
        sampler,
        cfg,
        ref extras,
    } = st;
    std::fs::create_dir_all(tmp).map_err(|e| err(tmp, e.to_string()))?;
    save_adapter(model, peft, tmp)?;
    let st: OptimizerState = opt.export(&named_params(model))?;
    let tensors: Vec<OutTensor> = st
        .buffers
        .iter()
        .map(|(k, v)| OutTensor {
            name: k.clone(),
            shape: vec![v.len()],
            values: v,
            dtype: OutDtype::F32,
        })
        .collect();
    write_safetensors(
        &tmp.join("optimizer.safetensors"),
        &tensors,
        Default::default(),
    )?;
    let mut state = json!({
        "step": step, "sampler_epoch": sampler.epoch, "sampler_pos": sampler.pos,
        "optimizer_steps": st.steps.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "config": cfg.to_json(),
        "loss": short_f32(extras.loss), "eval_before": extras.eval_before,
    });
    if let Some(t) = extras.chat_now {
        // The time the chat template's strftime_now rendered with: a resumed run renders the
        // same text (a template that prints today's date would otherwise change the data).
        state["chat_now"] = json!(t);
    }
    write_atomic(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(&state)
            .expect("serialises")
            .as_bytes(),
    )?;
    let _ = std::fs::remove_dir_all(final_dir);
    std::fs::rename(tmp, final_dir).map_err(|e| err(final_dir, e.to_string()))
}

/// Runs (or, with `resume`, continues) training; `on_event` sees every step and notice.
pub fn train(
    cfg: &TrainConfig,
    resume: bool,
    force: bool,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    train_until(
        cfg,
        resume,
        force,
        on_event,
        &std::sync::atomic::AtomicBool::new(false),
    )
}

/// The read-only checks of the output directory, before anything is loaded: never an input,
/// and a non-empty directory only with `resume` or (a previous training output holding nothing
/// else) `force`.
fn check_output(cfg: &TrainConfig, resume: bool, force: bool) -> Result<()> {
    let out = &cfg.out;
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("model directory (--model)", &cfg.model),
        ("training data (--data)", &cfg.data),
    ];
    if let Some(e) = &cfg.eval_data {
        inputs.push(("eval data (--eval-data)", e));
    }
    outdir::check_not_input("--out", out, &inputs)?;
    outdir::DirLock::check_free(out)?;
    let links = outdir::symlinked(out, is_train_output);
    if !links.is_empty() {
        return Err(err(
            out,
            format!(
                "--out holds symlinks where lora-rs writes its own files ({}): writing through \
                 them would change someone else's; remove them",
                links.join(", ")
            ),
        ));
    }
    if resume {
        return Ok(());
    }
    match replaceable(out)? {
        Existing::Ours(_) if !force => Err(err(
            out,
            "output directory is not empty (pass --resume to continue or --force to start over)",
        )),
        _ => Ok(()),
    }
}

/// What `out` holds: nothing, or an earlier training output holding nothing else, checkpoint
/// folders included (what `force` may remove); anything of someone else's is an error naming it.
fn replaceable(out: &Path) -> Result<Existing> {
    let found = outdir::inspect_output(
        "--out",
        out,
        "lora train",
        Owned::Matching(&is_train_output),
    )?;
    if let Existing::Ours(entries) = &found {
        for e in entries {
            let name = e.file_name().map(|n| n.to_string_lossy().to_string());
            let is_ckpt = name
                .as_deref()
                .is_some_and(|n| checkpoint_step(n).is_some() || is_checkpoint_tmp(n));
            let foreign = if is_ckpt && e.is_dir() {
                foreign_in_checkpoint(e)
            } else {
                Vec::new()
            };
            if !foreign.is_empty() {
                return Err(err(
                    out,
                    format!(
                        "--out: {} holds files lora-rs did not write ({}); --force replaces only \
                         what training wrote (move them out first)",
                        e.display(),
                        foreign.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(found)
}

/// Takes the output directory for this run: the lock, temporaries of killed runs removed (and
/// reported), a previous output replaced under `force` (checked again under the lock), the
/// marker written.
fn take_output(
    cfg: &TrainConfig,
    resumed_at: Option<usize>,
    force: bool,
    note: &mut dyn FnMut(&str),
) -> Result<outdir::DirLock> {
    let resume = resumed_at.is_some();
    let out = &cfg.out;
    let lock = outdir::DirLock::acquire(out)?;
    let stale = outdir::clean_stale(out, |n| {
        outdir::is_dead_temp(n)
            || (is_checkpoint_tmp(n) && foreign_in_checkpoint(&out.join(n)).is_empty())
    })?;
    for p in stale {
        note(&format!(
            "removed {}, left by a run that was stopped while writing it",
            p.display()
        ));
    }
    if force && !resume {
        // Checked again under the lock: the directory may have changed since the run began.
        if let Existing::Ours(entries) = replaceable(out)? {
            outdir::remove_owned(&entries)?;
        }
    }
    if let Some(step) = resumed_at {
        truncate_metrics(&out.join("metrics.jsonl"), step)?;
    }
    outdir::write_marker(out, "lora train", None)?;
    Ok(lock)
}

/// Drops the metrics lines past `step` (a run resumed from an older checkpoint than its last
/// step will write those steps again).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !lora_io::files::check_regular(path, u64::MAX, "metrics")? {
        return Ok(());
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let keep: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    if keep.len() != text.lines().count() {
        let mut body = keep.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        write_atomic(path, body.as_bytes())?;
    }
    Ok(())
}

/// The number of examples `seqs` holds with no target token (e.g. a prompt that fills
/// `--seq-len`, an empty completion with `--no-eos`), and the sequences without them.
fn drop_targetless(seqs: Vec<Sequence>) -> (Vec<Sequence>, usize) {
    let n = seqs.len();
    let kept: Vec<Sequence> = seqs
        .into_iter()
        .filter(|s| s.labels.iter().skip(1).any(|&l| l >= 0))
        .collect();
    let dropped = n - kept.len();
    (kept, dropped)
}

/// Every token id must index the model's embedding: a tokenizer (or an EOS id) from another
/// model would otherwise fail deep inside the embedding with no file named.
pub fn check_vocab<'a>(
    model_dir: &Path,
    vocab: usize,
    seqs: impl IntoIterator<Item = &'a Sequence>,
) -> Result<()> {
    let max = seqs.into_iter().flat_map(|s| s.ids.iter()).max();
    match max {
        Some(&id) if id as usize >= vocab => Err(err(
            model_dir,
            format!(
                "token id {id} (from tokenizer.json, or the EOS id) is past the model's \
                 vocabulary of {vocab} (config.json `vocab_size`): the tokenizer or EOS belongs \
                 to another model"
            ),
        )),
        _ => Ok(()),
    }
}

/// The largest rank each targeted layer allows is min(in, out): more adds parameters that
/// cannot raise the update's rank.
fn check_rank(model: &dyn CausalLm, peft: &PeftConfig) -> Result<()> {
    let head = model.output_head().to_string();
    for (name, lin) in model.linears() {
        if !peft.selects(&name, &head)? {
            continue;
        }
        let (i, o) = lin.dims();
        let r = peft.lora_config_for(&name)?.rank;
        if r > i.min(o) {
            return Err(err(
                Path::new("--rank"),
                format!(
                    "{r} exceeds what `{name}` ({i} -> {o} features) can use: at most {}",
                    i.min(o)
                ),
            ));
        }
    }
    Ok(())
}

/// [`train`] with a stop flag: when it becomes true (Ctrl-C, SIGTERM), the run checkpoints after
/// the current step and returns early (`TrainSummary::interrupted`).
pub fn train_until(
    cfg: &TrainConfig,
    resume: bool,
    force: bool,
    on_event: &mut dyn FnMut(Event),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<TrainSummary> {
    cfg.validate()?;
    let out = &cfg.out;
    check_output(cfg, resume, force)?;
    let mut note = |s: &str| on_event(Event::Note(s));
    let mut opt = cfg.optimizer.build(cfg.weight_decay);
    let checkpoint = if resume {
        Some(newest_resumable(out, opt.as_ref(), &mut note)?)
    } else {
        None
    };

    let md = ModelDir::open(&cfg.model)?;
    let tok = TextTokenizer::from_model_dir(&cfg.model)?;
    // Data: a seeded split of the examples when no eval file is given.
    let mut examples = read_examples(&cfg.data)?;
    let eval_examples = match &cfg.eval_data {
        Some(p) => read_examples(p)?,
        None if cfg.eval_split > 0.0 => {
            let mut order = Sampler::new(examples.len(), cfg.seed ^ 0xE7A1).take(examples.len());
            let k = ((examples.len() as f32 * cfg.eval_split).round() as usize)
                .clamp(1, examples.len().saturating_sub(1).max(1));
            order.truncate(k);
            order.sort_unstable();
            let held: Vec<_> = order.iter().rev().map(|&i| examples.remove(i)).collect();
            held.into_iter().rev().collect()
        }
        None => Vec::new(),
    };
    let eos = if cfg.eos {
        training_eos(
            &md,
            &tok,
            examples.iter().chain(&eval_examples),
            "pass --no-eos to train without one",
        )?
    } else {
        None
    };
    let mut model = md.load_model()?;
    if cfg.seq_len > model.max_positions() {
        return Err(err(
            Path::new("--seq-len"),
            format!(
                "{} exceeds the model's maximum of {} positions ({})",
                cfg.seq_len,
                model.max_positions(),
                cfg.model.join("config.json").display()
            ),
        ));
    }
    let peft = cfg.peft();
    let saved_chat_now = match &checkpoint {
        Some(c) => {
            let sp = c.dir.join("trainer_state.json");
            let diff = config_diff(&c.state["config"], &cfg.to_json());
            if !diff.is_empty() {
                return Err(err(
                    &sp,
                    format!(
                        "the run's settings differ from this checkpoint's ({}); resume with the \
                         same flags",
                        diff.join("; ")
                    ),
                ));
            }
            load_adapter(model.as_mut(), &c.dir)?;
            c.state["chat_now"].as_i64()
        }
        None => {
            check_rank(model.as_ref(), &peft)?;
            let chosen = inject(model.as_mut(), &peft, cfg.seed)?;
            if let Targets::List(names) = &peft.target_modules {
                for t in names {
                    if !chosen
                        .iter()
                        .any(|c| c == t || c.ends_with(&format!(".{t}")))
                    {
                        note(&format!("--target `{t}` matched no module of this model"));
                    }
                }
            }
            None
        }
    };

    // Conversations need the model's chat template; read only when the data has some.
    // The file named in an error is the one whose conversations need the template.
    let chat = match chat_template_for(&cfg.model, &cfg.data, &examples)? {
        Some(c) => Some(c),
        None => chat_template_for(
            &cfg.model,
            cfg.eval_data.as_deref().unwrap_or(&cfg.data),
            &eval_examples,
        )?,
    };
    if let (Some(c), Some(t)) = (&chat, saved_chat_now) {
        c.set_now(t);
    }
    let chat_now = chat.as_ref().map(|c| c.now());
    let train_seqs = tokenize(
        &tok,
        &examples,
        &TokenizeOptions {
            pack: cfg.pack,
            eos,
            chat: chat.as_ref(),
            assistant_only: cfg.assistant_only_loss,
            ..TokenizeOptions::new(cfg.seq_len)
        },
    )
    .map_err(|e| {
        in_file(
            e,
            &cfg.data,
            cfg.eval_data.is_none() && cfg.eval_split > 0.0,
        )
    })?;
    let (train_seqs, dropped) = if cfg.pack {
        let packed = pack(&train_seqs, cfg.seq_len);
        drop_targetless(packed)
    } else {
        drop_targetless(train_seqs)
    };
    if train_seqs.is_empty() {
        return Err(err(
            &cfg.data,
            format!(
                "no training example keeps a target token within --seq-len {} (a prompt that \
                 fills it leaves its completion nothing; an empty completion with --no-eos, an \
                 empty conversation, or one without an assistant turn under \
                 --assistant-only-loss has none){}",
                cfg.seq_len,
                if cfg.pack {
                    "; with --pack, the data is shorter than one block"
                } else {
                    ""
                }
            ),
        ));
    }
    if dropped > 0 {
        note(&format!(
            "{dropped} of {} {} no target token within --seq-len {} and {} left out of training",
            dropped + train_seqs.len(),
            if cfg.pack {
                "blocks have"
            } else {
                "training examples have"
            },
            cfg.seq_len,
            if dropped == 1 { "is" } else { "are" }
        ));
    }
    let step_seqs = cfg.batch_size.saturating_mul(cfg.grad_accum);
    if cfg.batch_size > train_seqs.len() || step_seqs > train_seqs.len() {
        return Err(err(
            Path::new("--batch-size"),
            format!(
                "a step would take {} sequences ({} x --grad-accum {}) but the data has {} \
                 training sequences: lower --batch-size or --grad-accum",
                step_seqs,
                cfg.batch_size,
                cfg.grad_accum,
                train_seqs.len()
            ),
        ));
    }
    let eval_seqs = tokenize(
        &tok,
        &eval_examples,
        &TokenizeOptions {
            eos,
            chat: chat.as_ref(),
            assistant_only: cfg.assistant_only_loss,
            ..TokenizeOptions::new(cfg.seq_len)
        },
    )
    .map_err(|e| match &cfg.eval_data {
        Some(p) => in_file(e, p, false),
        None => in_file(e, &cfg.data, true),
    })?;
    let (eval_seqs, eval_dropped) = drop_targetless(eval_seqs);
    check_vocab(
        &cfg.model,
        model.vocab_size(),
        train_seqs.iter().chain(&eval_seqs),
    )?;
    if eval_dropped > 0 {
        note(&format!(
            "{eval_dropped} of {} held-out examples have no target token within --seq-len {} and \
             are left out of the eval loss",
            eval_dropped + eval_seqs.len(),
            cfg.seq_len
        ));
    }
    let total_steps = match cfg.epochs {
        // The f32 setting as the decimal it was written as (0.1, not 0.10000000149), so that a
        // whole number of steps does not round up to one more.
        Some(e) => {
            let e = e.to_string().parse::<f64>().unwrap_or(e as f64);
            ((e * train_seqs.len() as f64 / step_seqs as f64).ceil() as usize).max(1)
        }
        None => cfg.steps,
    };
    if cfg.warmup >= total_steps && checkpoint.is_none() {
        note(&format!(
            "--warmup {} is not shorter than the run's {total_steps} steps: the learning rate \
             never reaches --lr {}",
            cfg.warmup, cfg.lr
        ));
    }
    let mut sampler = Sampler::new(train_seqs.len(), cfg.seed);
    let start = match &checkpoint {
        Some(c) => {
            if c.sampler_pos > train_seqs.len() {
                return Err(err(
                    &c.dir.join("trainer_state.json"),
                    format!(
                        "`sampler_pos` {} is past the {} training sequences (was the data \
                         changed since the run began?)",
                        c.sampler_pos,
                        train_seqs.len()
                    ),
                ));
            }
            sampler = Sampler::resume(train_seqs.len(), cfg.seed, c.sampler_epoch, c.sampler_pos);
            opt.import(&named_params(model.as_ref()), &c.optimizer)?;
            let saved_total = c.state["config"]["steps"].as_u64().unwrap_or(0) as usize;
            if c.step > total_steps {
                return Err(err(
                    &c.dir,
                    format!(
                        "the checkpoint is at step {}, past this run's {total_steps} steps; \
                         pass --steps {} or more to go on",
                        c.step, c.step
                    ),
                ));
            }
            if c.step == total_steps && out.join("adapter_model.safetensors").exists() {
                let loss = c.state["loss"].as_f64().map_or(f32::NAN, |x| x as f32);
                return Ok(TrainSummary {
                    steps: c.step,
                    final_loss: loss,
                    eval_before: c.state["eval_before"].as_f64(),
                    eval_after: None,
                    tokens: 0,
                    seconds: 0.0,
                    trainable: 0,
                    all_params: 0,
                    out: out.clone(),
                    interrupted: false,
                    already_complete: true,
                });
            }
            if cfg.epochs.is_none() && saved_total != 0 && saved_total != total_steps {
                note(&format!(
                    "extending the run from {saved_total} to {total_steps} steps: the \
                     learning-rate schedule spans {total_steps} steps from here on"
                ));
            }
            c.step
        }
        None => 0,
    };

    let groups = adapter_groups(model.as_ref(), cfg.loraplus_ratio);
    // Everything the step touches moves to the device now (weights, adapters; the optimizer
    // state follows its tensors on the first step).
    model.to_device(cfg.device)?;
    let (trainable, all_params) = param_counts(model.as_ref());
    let eval_before = match &checkpoint {
        None => eval_sequences(model.as_ref(), &eval_seqs, true)?.map(|r| r.loss),
        Some(c) => c.state["eval_before"].as_f64(),
    };
    // Only now, with the model, data and settings checked, is the output directory touched.
    let _lock = take_output(cfg, checkpoint.as_ref().map(|c| c.step), force, &mut note)?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("metrics.jsonl"))
        .map_err(|e| err(out, e.to_string()))?;
    let mut metric = |step: usize,
                      st: Option<&StepStats>,
                      lr: Option<f32>,
                      tps: Option<f64>,
                      elapsed: f64,
                      eval: Option<f64>| {
        // Every line has the same keys; the line before training has no step statistics.
        let line = json!({
            "step": step, "loss": st.map(|s| s.loss), "lr": lr, "grad_norm": st.map(|s| s.grad_norm),
            "tokens": st.map_or(0, |s| s.tokens), "tokens_per_s": tps, "elapsed_s": elapsed, "eval_loss": eval,
        });
        writeln!(metrics, "{line}").map_err(|e| err(out, e.to_string()))
    };
    if checkpoint.is_none() {
        if let Some(e) = eval_before {
            metric(0, None, None, None, 0.0, Some(e))?;
        }
    }
    let t0 = Instant::now();
    let mut last_save = Instant::now();
    let mut tokens = 0usize;
    let mut last_loss = checkpoint
        .as_ref()
        .and_then(|c| c.state["loss"].as_f64())
        .map_or(f32::NAN, |x| x as f32);
    let end = match cfg.stop_after {
        Some(k) => (start + k).min(total_steps),
        None => total_steps,
    };
    let save = |step: usize, opt: &dyn Optimizer, sampler: &Sampler, loss: f32| {
        let st = CheckpointState {
            model: model.as_ref(),
            peft: &peft,
            opt,
            sampler,
            cfg,
            extras: CheckpointExtras {
                chat_now,
                loss,
                eval_before,
            },
        };
        save_checkpoint(out, step, &st)
    };
    let mut eval_after = None;
    for step in start..end {
        let micro: Vec<Batch> = (0..cfg.grad_accum)
            .map(|_| {
                let idx = sampler.take(cfg.batch_size);
                Batch::pad(&idx.iter().map(|&i| &train_seqs[i]).collect::<Vec<_>>())
            })
            .collect();
        let lr = cfg.lr * lr_factor(cfg.schedule, step, cfg.warmup, total_steps);
        let st = train_step(
            model.as_ref(),
            opt.as_mut(),
            &groups,
            &micro,
            lr,
            cfg.max_grad_norm,
            cfg.seed,
            step as u64,
            cfg.gradient_checkpointing,
        )?;
        tokens += st.tokens;
        last_loss = st.loss;
        let done = step + 1;
        let eval_loss = if done == total_steps || (cfg.eval_every > 0 && done % cfg.eval_every == 0)
        {
            eval_sequences(model.as_ref(), &eval_seqs, true)?.map(|r| r.loss)
        } else {
            None
        };
        if done == total_steps {
            eval_after = eval_loss;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let tps = tokens as f64 / elapsed.max(1e-9);
        metric(done, Some(&st), Some(lr), Some(tps), elapsed, eval_loss)?;
        on_event(Event::Step(&StepLog {
            step: done,
            total: total_steps,
            loss: st.loss,
            lr,
            tokens_per_s: tps,
            eval_loss,
        }));
        if stop.load(std::sync::atomic::Ordering::SeqCst) && done != end {
            for n in save(done, opt.as_ref(), &sampler, last_loss)? {
                on_event(Event::Note(&n));
            }
            return Ok(TrainSummary {
                steps: done,
                final_loss: last_loss,
                eval_before,
                eval_after: None,
                tokens,
                seconds: t0.elapsed().as_secs_f64(),
                trainable,
                all_params,
                out: out.clone(),
                interrupted: true,
                already_complete: false,
            });
        }
        let by_steps = cfg.save_every > 0 && done % cfg.save_every == 0;
        let by_time = cfg.save_minutes > 0.0
            && last_save.elapsed().as_secs_f64() >= cfg.save_minutes as f64 * 60.0;
        if (by_steps || by_time) && done != end {
            for n in save(done, opt.as_ref(), &sampler, last_loss)? {
                on_event(Event::Note(&n));
            }
            last_save = Instant::now();
        }
    }
    if start == end && end == total_steps {
        // Resumed from the last step's checkpoint of a run stopped before its adapter was
        // written: nothing to train, the end's eval still to do.
        eval_after = eval_sequences(model.as_ref(), &eval_seqs, true)?.map(|r| r.loss);
    }
    for n in save(end, opt.as_ref(), &sampler, last_loss)? {
        on_event(Event::Note(&n));
    }
    if end == total_steps {
        save_adapter(model.as_ref(), &peft, out)?;
        let (train_pts, eval_pts) = crate::plot::read_metrics(&out.join("metrics.jsonl"))?;
        crate::plot::write_loss_svg(&out.join("loss.svg"), &train_pts, &eval_pts)?;
    }
    Ok(TrainSummary {
        steps: end,
        final_loss: last_loss,
        eval_before,
        eval_after,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        trainable,
        all_params,
        out: out.clone(),
        interrupted: false,
        already_complete: false,
    })
}
