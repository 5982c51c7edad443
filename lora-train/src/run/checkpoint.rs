//! Checkpoints: naming, writing (assembled in a temporary directory and renamed), reading back
//! whole, and finding the newest one that does.

use super::*;

pub(super) fn named_params(model: &dyn CausalLm) -> Vec<(String, Tensor)> {
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
pub fn checkpoint_step(name: &str) -> Option<usize> {
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
pub(super) const CHECKPOINT_FILES: [&str; 4] = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
];

/// What a checkpoint directory (or one being assembled) holds besides the files a checkpoint
/// is made of: someone else's, so the directory is not ours to remove.
pub(super) fn foreign_in_checkpoint(dir: &Path) -> Vec<String> {
    outdir::foreign_entries(dir, lm_checkpoint_file)
}

/// A checkpoint being assembled (`.checkpoint-NNNNNN.tmp`); one found when a run starts was
/// left by a run that was killed while writing it.
pub fn is_checkpoint_tmp(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .is_some_and(|n| checkpoint_step(n).is_some())
}

/// The `checkpoint-*` directories of `out`, newest first.
pub fn checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
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
pub(super) struct Resumable {
    pub(super) step: usize,
    pub(super) dir: PathBuf,
    pub(super) state: Value,
    pub(super) sampler_epoch: u64,
    pub(super) sampler_pos: usize,
    pub(super) optimizer: OptimizerState,
}

/// The fields every trainer writes in a checkpoint's `trainer_state.json`.
pub struct SavedState {
    /// The file.
    pub path: PathBuf,
    /// The whole document (for the trainer's own fields).
    pub doc: Value,
    /// The sampler's epoch.
    pub sampler_epoch: u64,
    /// The sampler's position in its epoch.
    pub sampler_pos: usize,
    /// The optimizer's step count per tensor; `None` when the file has none.
    pub optimizer_steps: Option<Vec<(String, u64)>>,
}

/// Reads `trainer_state.json` of checkpoint `dir`, which its name says is of `step`, and checks
/// the fields every trainer writes (the error is the reason it cannot be resumed).
pub fn read_trainer_state(dir: &Path, step: usize) -> std::result::Result<SavedState, String> {
    let path = dir.join("trainer_state.json");
    let doc = lora_io::hf::read_json(&path).map_err(|e| e.to_string())?;
    let uint = |k: &str| {
        doc[k].as_u64().ok_or_else(|| {
            format!(
                "{}: `{k}` missing or not a non-negative integer",
                path.display()
            )
        })
    };
    if uint("step")? != step as u64 {
        return Err(format!(
            "{}: `step` is {}, the directory's name says {step}",
            path.display(),
            doc["step"]
        ));
    }
    let sampler_epoch = uint("sampler_epoch")?;
    let sampler_pos = usize::try_from(uint("sampler_pos")?).map_err(|e| e.to_string())?;
    let optimizer_steps = match doc["optimizer_steps"].as_object() {
        None => None,
        Some(m) => Some(
            m.iter()
                .map(|(k, v)| {
                    v.as_u64().map(|n| (k.clone(), n)).ok_or_else(|| {
                        format!(
                            "{}: `optimizer_steps.{k}` is not an integer",
                            path.display()
                        )
                    })
                })
                .collect::<std::result::Result<Vec<_>, String>>()?,
        ),
    };
    Ok(SavedState {
        path,
        doc,
        sampler_epoch,
        sampler_pos,
        optimizer_steps,
    })
}

/// Reads a checkpoint back and checks it is whole: the trainer state with every field a resume
/// needs, an adapter whose tensors are all finite, and optimizer state for every adapter tensor
/// of the right length (a moment missing would silently restart from zero). The error is the
/// reason it cannot be resumed.
pub(super) fn read_checkpoint(
    step: usize,
    dir: &Path,
    opt: &dyn Optimizer,
) -> std::result::Result<Resumable, String> {
    let SavedState {
        path: sp,
        doc: state,
        sampler_epoch,
        sampler_pos,
        optimizer_steps,
    } = read_trainer_state(dir, step)?;
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
    let mut optimizer = OptimizerState {
        steps: optimizer_steps.unwrap_or_default(),
        ..Default::default()
    };
    for k in f.names() {
        optimizer
            .buffers
            .push((k.to_string(), f.read_f32(k).map_err(|e| e.to_string())?.0));
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
pub(super) fn newest_resumable(
    out: &Path,
    opt: &dyn Optimizer,
    note: &mut dyn FnMut(&str),
) -> Result<Resumable> {
    newest_whole(
        out,
        |step, dir| read_checkpoint(step, dir, opt),
        "the run stopped before its first checkpoint, or --out differs",
        note,
    )
    .map(|(r, _)| r)
    .map_err(|e| err(out, e))
}

/// The newest `checkpoint-*` directory of `out` that `read(step, dir)` accepts, with that
/// directory; each newer one it refuses is reported through `note` with the reason. The error
/// (a message for `out`) says there is none (`hint`: why that may be) or why each failed.
/// Shared by the language-model and the Stable Diffusion trainers.
pub fn newest_whole<T>(
    out: &Path,
    read: impl Fn(usize, &Path) -> std::result::Result<T, String>,
    hint: &str,
    note: &mut dyn FnMut(&str),
) -> std::result::Result<(T, PathBuf), String> {
    let all = checkpoints(out);
    if all.is_empty() {
        return Err(format!(
            "--resume: no checkpoint-* directory found ({hint})"
        ));
    }
    let mut why = Vec::new();
    for (step, dir) in &all {
        match read(*step, dir) {
            Ok(r) => {
                if !why.is_empty() {
                    note(&format!(
                        "resuming from {} (the newer checkpoints are damaged: {})",
                        dir.display(),
                        why.join("; ")
                    ));
                }
                return Ok((r, dir.clone()));
            }
            Err(e) => why.push(e),
        }
    }
    Err(format!(
        "--resume: no checkpoint reads back whole: {}",
        why.join("; ")
    ))
}

/// Removes the checkpoints of `out` beyond the newest `keep` of those up to `step` (the one
/// just written among them, so never it; one above `step` is a stale one of an interrupted run,
/// replaced when the run gets there). One holding a file `ours` does not name stays; the
/// returned notes say so.
pub fn rotate(out: &Path, keep: usize, step: usize, ours: &dyn Fn(&str) -> bool) -> Vec<String> {
    let mut notes = Vec::new();
    if keep == 0 {
        return notes;
    }
    let older = checkpoints(out).into_iter().filter(|(s, _)| *s <= step);
    for (_, p) in older.skip(keep) {
        let foreign = outdir::foreign_entries(&p, ours);
        if foreign.is_empty() {
            let _ = std::fs::remove_dir_all(&p);
        } else {
            notes.push(format!(
                "kept {} beyond --keep-checkpoints: it holds files lora-rs did not write ({})",
                p.display(),
                foreign.join(", ")
            ));
        }
    }
    notes
}

/// Moves the assembled checkpoint `tmp` to `final_dir`. A checkpoint already there (a stale
/// one of the same step: a resumed run passed a damaged newer one) is replaced only when `ours`
/// names everything in it.
pub fn put_in_place(
    tmp: &Path,
    final_dir: &Path,
    ours: &dyn Fn(&str) -> bool,
) -> std::result::Result<(), String> {
    if final_dir.exists() {
        let foreign = outdir::foreign_entries(final_dir, ours);
        if !foreign.is_empty() {
            return Err(format!(
                "holds files lora-rs did not write ({}); not replaced (move them away)",
                foreign.join(", ")
            ));
        }
        std::fs::remove_dir_all(final_dir).map_err(|e| e.to_string())?;
    }
    std::fs::rename(tmp, final_dir).map_err(|e| e.to_string())
}

/// A file of a language-model checkpoint directory, or one a killed write left there.
fn lm_checkpoint_file(n: &str) -> bool {
    CHECKPOINT_FILES.contains(&n) || outdir::is_temp_name(n)
}

/// What [`save_checkpoint`] records besides the model and optimizer.
pub(super) struct CheckpointExtras {
    /// The time the chat template's `strftime_now` rendered with.
    pub(super) chat_now: Option<i64>,
    /// The last step's training loss.
    pub(super) loss: f32,
    /// The eval loss before training, for a resumed run's summary.
    pub(super) eval_before: Option<f64>,
}

/// Everything a checkpoint records.
pub(super) struct CheckpointState<'a> {
    pub(super) model: &'a dyn CausalLm,
    pub(super) peft: &'a PeftConfig,
    pub(super) opt: &'a dyn Optimizer,
    pub(super) sampler: &'a Sampler,
    pub(super) cfg: &'a TrainConfig,
    pub(super) extras: CheckpointExtras,
}

/// Writes `checkpoint-<step>` in `out` and rotates the old ones; returns notes for the user.
pub(super) fn save_checkpoint(
    out: &Path,
    step: usize,
    st: &CheckpointState,
) -> Result<Vec<String>> {
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
    // Only after the new one is complete.
    Ok(rotate(out, cfg.keep_checkpoints, step, &lm_checkpoint_file))
}

/// Assembles a checkpoint in `tmp` and renames it to `final_dir`.
pub(super) fn write_checkpoint(
    tmp: &Path,
    final_dir: &Path,
    step: usize,
    st: &CheckpointState,
) -> Result<()> {
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
    put_in_place(tmp, final_dir, &lm_checkpoint_file).map_err(|e| err(final_dir, e))
}
