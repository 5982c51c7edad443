//! Stable Diffusion training checkpoints: `checkpoint-NNNNNN/` in a run's output directory,
//! holding the LoRA file as it stands at that step (usable as is), `trainer_state.safetensors`
//! (every adapter tensor in f32 and AdamW's moments) and `trainer_state.json` (the step, the
//! example sampler's position, the noise generator's state, AdamW's step counts and the run's
//! settings). Each is assembled in `.checkpoint-NNNNNN.tmp` and renamed into place, so a
//! checkpoint directory is complete or absent; `lora train --resume` continues from the newest
//! one that reads back whole, and only with the settings it was saved with.

use crate::diffusion::{Result, SdTrainState};
use crate::optim::OptimizerState;
use crate::run::is_checkpoint_tmp;
pub use crate::run::{checkpoint_step, checkpoints};
use lora_io::error::IoError;
use lora_io::safetensors::SafetensorsFile;
use lora_io::write::{write_atomic, write_safetensors, OutDtype, OutTensor};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The state files of a checkpoint (besides its LoRA file).
pub const STATE_FILES: [&str; 2] = ["trainer_state.json", "trainer_state.safetensors"];

/// A file of an SD checkpoint directory whose LoRA file is `lora_name`, or one a killed write
/// left there.
pub fn checkpoint_file(name: &str, lora_name: &str) -> bool {
    name == lora_name || STATE_FILES.contains(&name) || lora_io::outdir::is_temp_name(name)
}

/// Whether `name` is a checkpoint directory or one being assembled (a run's own entries).
pub fn is_checkpoint_entry(name: &str) -> bool {
    checkpoint_step(name).is_some() || is_checkpoint_tmp(name)
}

fn err(path: &Path, reason: impl Into<String>) -> IoError {
    IoError::Config {
        path: path.into(),
        field: "checkpoint".into(),
        reason: reason.into(),
    }
}

/// Writes `out/checkpoint-<step>` for `state`: `write_lora(path)` writes the LoRA file named
/// `lora_name` there; `settings` are the run's (a resume must match them). Then removes the
/// oldest checkpoints beyond `keep` (0: keep all) — except one holding files lora-rs did not
/// write, which stays and is reported in the returned notes.
pub fn save(
    out: &Path,
    state: &SdTrainState,
    settings: &Value,
    lora_name: &str,
    write_lora: &dyn Fn(&Path) -> Result<()>,
    keep: usize,
) -> Result<Vec<String>> {
    let step = state.step;
    let final_dir = out.join(format!("checkpoint-{step:06}"));
    let tmp = out.join(format!(".checkpoint-{step:06}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    let r = write_dir(&tmp, &final_dir, state, settings, lora_name, write_lora);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r?;
    Ok(crate::run::rotate(out, keep, step, &|n| {
        checkpoint_file(n, lora_name)
    }))
}

fn write_dir(
    tmp: &Path,
    final_dir: &Path,
    st: &SdTrainState,
    settings: &Value,
    lora_name: &str,
    write_lora: &dyn Fn(&Path) -> Result<()>,
) -> Result<()> {
    std::fs::create_dir_all(tmp).map_err(|e| err(tmp, e.to_string()))?;
    write_lora(&tmp.join(lora_name))?;
    let tensors: Vec<OutTensor> = st
        .adapters
        .iter()
        .map(|(k, v)| (format!("adapter.{k}"), v))
        .chain(st.optimizer.buffers.iter().map(|(k, v)| (k.clone(), v)))
        .map(|(name, v)| OutTensor {
            name,
            shape: vec![v.len()],
            values: v,
            dtype: OutDtype::F32,
        })
        .collect();
    write_safetensors(
        &tmp.join("trainer_state.safetensors"),
        &tensors,
        Default::default(),
    )?;
    let doc = json!({
        "step": st.step,
        "sampler_epoch": st.epoch,
        "sampler_pos": st.pos,
        // As a string: a JSON reader holding numbers as doubles would round it.
        "rng": st.rng.to_string(),
        "optimizer_steps": st.optimizer.steps.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "settings": settings,
    });
    write_atomic(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(&doc)
            .expect("serialises")
            .as_bytes(),
    )?;
    crate::run::put_in_place(tmp, final_dir, &|n| checkpoint_file(n, lora_name))
        .map_err(|e| err(final_dir, e))
}

/// Reads checkpoint `dir` (of `step`) back whole: `(state, settings)`, or why it cannot be
/// resumed.
pub fn read(dir: &Path, step: usize) -> std::result::Result<(SdTrainState, Value), String> {
    let crate::run::SavedState {
        path: sp,
        doc,
        sampler_epoch,
        sampler_pos,
        optimizer_steps,
    } = crate::run::read_trainer_state(dir, step)?;
    let rng = doc["rng"]
        .as_str()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| format!("{}: `rng` missing or not an integer string", sp.display()))?;
    let settings = doc["settings"].clone();
    if !settings.is_object() {
        return Err(format!("{}: `settings` missing", sp.display()));
    }
    let mut optimizer = OptimizerState {
        steps: optimizer_steps
            .ok_or_else(|| format!("{}: `optimizer_steps` missing", sp.display()))?,
        ..Default::default()
    };
    let tp = dir.join("trainer_state.safetensors");
    let f = SafetensorsFile::open(&tp).map_err(|e| e.to_string())?;
    let mut adapters = Vec::new();
    for k in f.names() {
        let (v, _) = f.read_f32_finite(k).map_err(|e| e.to_string())?;
        match k.strip_prefix("adapter.") {
            Some(name) => adapters.push((name.to_string(), v)),
            None => optimizer.buffers.push((k.to_string(), v)),
        }
    }
    if adapters.is_empty() {
        return Err(format!("{}: no adapter tensor", tp.display()));
    }
    Ok((
        SdTrainState {
            step,
            epoch: sampler_epoch,
            pos: sampler_pos,
            rng,
            adapters,
            optimizer,
        },
        settings,
    ))
}

/// The newest checkpoint of `out` that reads back whole, with its settings and directory; each
/// newer one that does not is reported through `note` with the reason. None whole is an error
/// listing why.
pub fn newest(out: &Path, note: &mut dyn FnMut(&str)) -> Result<(SdTrainState, Value, PathBuf)> {
    let ((st, settings), dir) = crate::run::newest_whole(
        out,
        |step, dir| read(dir, step),
        "the run stopped before its first checkpoint, was started without --save-every, or \
         --out differs",
        note,
    )
    .map_err(|e| err(out, e))?;
    Ok((st, settings, dir))
}

/// The first setting that differs between a checkpoint's run (`saved`) and this one (`now`),
/// as a sentence; `None` when they agree.
pub fn settings_mismatch(saved: &Value, now: &Value) -> Option<String> {
    let (Some(a), Some(b)) = (saved.as_object(), now.as_object()) else {
        return Some("the checkpoint's settings are not an object".into());
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().find_map(|k| {
        let (x, y) = (
            a.get(k).unwrap_or(&Value::Null),
            b.get(k).unwrap_or(&Value::Null),
        );
        (x != y).then(|| format!("`{k}` was {x} in the checkpoint's run, is {y} now"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> SdTrainState {
        SdTrainState {
            step,
            epoch: 3,
            pos: 5,
            rng: u64::MAX - 7,
            adapters: vec![
                ("unet.a.lora_A.weight".into(), vec![1.0, -2.5]),
                ("unet.a.lora_B.weight".into(), vec![0.25]),
            ],
            optimizer: OptimizerState {
                buffers: vec![
                    ("exp_avg.unet.a.lora_A.weight".into(), vec![0.5, 0.75]),
                    ("exp_avg_sq.unet.a.lora_A.weight".into(), vec![1e-8, 2e-8]),
                ],
                steps: vec![("unet.a.lora_A.weight".into(), 9)],
            },
        }
    }

    #[test]
    fn a_checkpoint_reads_back_as_written_and_old_ones_rotate() {
        let out = std::env::temp_dir().join(format!("lora-sd-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let settings = json!({"lr": 1e-4, "rank": 4});
        let lora = |p: &Path| -> Result<()> {
            std::fs::write(p, b"lora").map_err(|e| err(p, e.to_string()))
        };
        for step in [2, 4, 6] {
            save(&out, &state(step), &settings, "l.safetensors", &lora, 2).unwrap();
        }
        let steps: Vec<usize> = checkpoints(&out).iter().map(|c| c.0).collect();
        assert_eq!(steps, [6, 4]);
        let (st, s, dir) = newest(&out, &mut |_| {}).unwrap();
        let sorted = |s: &SdTrainState| {
            let mut s = s.clone();
            s.adapters.sort_by(|a, b| a.0.cmp(&b.0));
            s.optimizer.buffers.sort_by(|a, b| a.0.cmp(&b.0));
            s.optimizer.steps.sort();
            s
        };
        assert_eq!(sorted(&st), sorted(&state(6)));
        assert_eq!(s, settings);
        assert!(dir.join("l.safetensors").is_file());
        // A damaged newest one is skipped, with the reason.
        std::fs::write(dir.join("trainer_state.json"), "{").unwrap();
        let mut notes = Vec::new();
        let (st, _, _) = newest(&out, &mut |n| notes.push(n.to_string())).unwrap();
        assert_eq!(st.step, 4);
        assert!(notes[0].contains("damaged"), "{notes:?}");
        // One holding someone else's file is kept beyond the limit, and said so.
        std::fs::write(out.join("checkpoint-000004/mine.txt"), "x").unwrap();
        let notes = save(&out, &state(8), &settings, "l.safetensors", &lora, 1).unwrap();
        assert!(notes.iter().any(|n| n.contains("mine.txt")), "{notes:?}");
        assert!(out.join("checkpoint-000004/mine.txt").is_file());
        assert!(!out.join("checkpoint-000006").exists());
        // A resumed run saving below a stale newer checkpoint keeps what it just wrote.
        save(&out, &state(3), &settings, "l.safetensors", &lora, 1).unwrap();
        assert!(out.join("checkpoint-000003").is_dir() && out.join("checkpoint-000008").is_dir());
        // And does not replace a same-step checkpoint holding someone else's file.
        std::fs::write(out.join("checkpoint-000003/mine.txt"), "x").unwrap();
        let e = save(&out, &state(3), &settings, "l.safetensors", &lora, 1).unwrap_err();
        assert!(e.to_string().contains("mine.txt"), "{e}");
        assert!(out.join("checkpoint-000003/mine.txt").is_file());
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn settings_are_compared_key_by_key() {
        let a = json!({"lr": 1e-4, "rank": 4});
        assert_eq!(settings_mismatch(&a, &a), None);
        let m = settings_mismatch(&a, &json!({"lr": 2e-4, "rank": 4})).unwrap();
        assert!(m.contains("`lr`"), "{m}");
        let m = settings_mismatch(&a, &json!({"lr": 1e-4, "rank": 4, "seed": 1})).unwrap();
        assert!(m.contains("`seed` was null"), "{m}");
        assert!(is_checkpoint_entry("checkpoint-000010"));
        assert!(is_checkpoint_entry(".checkpoint-000010.tmp"));
        assert!(!is_checkpoint_entry("checkpoint-x"));
    }
}
