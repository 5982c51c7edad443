//! The output directory: checked before anything loads, taken (locked, replaced under
//! `force`, cleaned of a killed run's temporaries) only once the run is ready to write.

use super::*;

/// The read-only checks of the output directory, before anything is loaded: never an input,
/// and a non-empty directory only with `resume` or (a previous training output holding nothing
/// else) `force`.
pub(super) fn check_output(cfg: &TrainConfig, resume: bool, force: bool) -> Result<()> {
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
pub(super) fn replaceable(out: &Path) -> Result<Existing> {
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
pub(super) fn take_output(
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
pub(super) fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
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
