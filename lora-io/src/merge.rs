//! `lora merge`: fold a PEFT adapter into its base model and write a complete model directory
//! that transformers loads: `W' = W + s * B @ A` computed in f32, NaN/inf-checked for every
//! layer before anything is written, stored in the checkpoint's dtype (or the one asked for).
//!
//! The output is assembled in a temporary directory next to the target and renamed into place
//! at the end, so a failure never leaves a half-written model. The output is never the model or
//! the adapter (nor a directory holding them), and an existing one is replaced only when it is
//! an earlier merge holding nothing else, and only with `force`.

use crate::error::{io_err, IoError, Result};
use crate::hf::{read_json, ModelDir, Weights};
use crate::peft::load_adapter;
use crate::write::{write_atomic, write_safetensors_streamed, OutDtype, StreamedTensor};
use lora_core::models::Linear;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Options of [`merge_to_dir`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MergeOptions {
    /// Storage dtype of the output (default: each tensor's dtype in the checkpoint).
    pub dtype: Option<OutDtype>,
    /// Replace an existing non-empty output directory.
    pub force: bool,
}

/// What [`merge_to_dir`] did.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// Module paths whose weights changed.
    pub merged: Vec<String>,
    /// Tensors written.
    pub tensors: usize,
    /// The output directory.
    pub out: PathBuf,
    /// Temporaries of merges into the same output that were killed, removed by this one.
    pub removed_stale: Vec<PathBuf>,
}

/// Merges `adapter_dir` into the model at `model_dir` and writes the result to `out`.
pub fn merge_to_dir(
    model_dir: &Path,
    adapter_dir: &Path,
    out: &Path,
    opts: MergeOptions,
) -> Result<MergeReport> {
    // Never an input; an existing output only when it is an earlier merge holding nothing
    // else, and only with `force` (see `outdir`).
    crate::outdir::check_not_input(
        "--out",
        out,
        &[
            ("model directory (--model)", model_dir),
            ("adapter (--adapter)", adapter_dir),
        ],
    )?;
    // One command at a time writes this output.
    let _lock = crate::outdir::OutputLock::beside(out)?;
    match crate::outdir::inspect_output("--out", out, "lora merge", crate::outdir::Owned::Listed)? {
        crate::outdir::Existing::Empty => {}
        crate::outdir::Existing::Ours(_) if !opts.force => {
            return Err(IoError::Output {
                path: out.into(),
                reason: "--out exists (pass --force to replace an earlier merge)".into(),
            })
        }
        crate::outdir::Existing::Ours(_) => {}
    }
    let md = ModelDir::open(model_dir)?;
    let mut model = md.load_model()?;
    load_adapter(model.as_mut(), adapter_dir)?;

    // Merge every layer first (in place, in the model): a NaN anywhere stops the run before a
    // byte is written.
    let mut names = Vec::new();
    for (name, lin) in model.linears_mut() {
        if let Linear::Lora(l) = lin {
            l.merge().map_err(|e| IoError::Config {
                path: adapter_dir.into(),
                field: name.clone(),
                reason: e.to_string(),
            })?;
            names.push(name);
        }
    }
    let merged: HashMap<String, &lora_core::Tensor> = model
        .linears()
        .into_iter()
        .filter_map(|(name, lin)| match lin {
            Linear::Lora(l) => Some((format!("{name}.weight"), &l.weight)),
            Linear::Frozen { .. } => None,
        })
        .collect();

    // What the output holds: every stored tensor, the merged ones replaced. Written one tensor
    // at a time (see below), so memory holds the model's own weights and one tensor more.
    let weights = Weights::open(model_dir)?;
    // (name, output dtype, shape), the merged weight if any, the stored dtype.
    type Entry = (String, OutDtype, Vec<usize>);
    let mut plan: Vec<(Entry, Option<&lora_core::Tensor>, OutDtype)> = Vec::new();
    for (key, dtype, shape) in weights.entries() {
        let stored = OutDtype::from_dtype(dtype).ok_or_else(|| IoError::Dtype {
            path: model_dir.into(),
            key: key.clone(),
            dtype: format!("{dtype:?}"),
        })?;
        // Original GPT-2 files omit the `transformer.` prefix our module paths carry.
        let m = merged
            .get(&key)
            .or_else(|| merged.get(&format!("transformer.{key}")))
            .copied();
        let dtype = opts.dtype.unwrap_or(stored);
        plan.push(((key, dtype, shape), m, stored));
    }
    let used = plan.iter().filter(|p| p.1.is_some()).count();
    if used != merged.len() {
        return Err(IoError::Config {
            path: model_dir.into(),
            field: "weights".into(),
            reason: format!(
                "{} merged layers but only {used} found in the checkpoint",
                merged.len()
            ),
        });
    }

    let removed_stale = crate::outdir::build_dir_atomically(out, "lora merge", |tmp| {
        let meta = [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect();
        let heads: Vec<StreamedTensor> = plan
            .iter()
            .map(|((name, dtype, shape), _, _)| StreamedTensor {
                name: name.clone(),
                dtype: (*dtype).into(),
                shape: shape.clone(),
            })
            .collect();
        write_safetensors_streamed(&tmp.join("model.safetensors"), &heads, meta, |i| {
            let ((name, dtype, _), merged, stored) = &plan[i];
            Ok(match merged {
                Some(w) => dtype.encode(&w.try_to_vec()?),
                // Unchanged and in its own dtype: the stored bytes as they are.
                None if dtype == stored => weights.raw_bytes(name)?.to_vec(),
                None => dtype.encode(&weights.read_f32(name)?),
            })
        })?;
        let mut written = vec!["model.safetensors".to_string()];
        for entry in std::fs::read_dir(model_dir).map_err(io_err(model_dir))? {
            let entry = entry.map_err(io_err(model_dir))?;
            let p = entry.path();
            let fname = entry.file_name().to_string_lossy().to_string();
            if !p.is_file()
                || fname.ends_with(".safetensors")
                || fname == "model.safetensors.index.json"
                || fname == crate::outdir::MARKER
                || fname == crate::outdir::LOCK
                || fname.ends_with(".bin")
            {
                continue;
            }
            if fname == "config.json" {
                let mut cfg = read_json(&p)?;
                if let (Some(d), Some(obj)) = (opts.dtype, cfg.as_object_mut()) {
                    let key = if obj.contains_key("torch_dtype") {
                        "torch_dtype"
                    } else {
                        "dtype"
                    };
                    obj.insert(key.into(), d.torch_name().into());
                }
                let text = serde_json::to_string_pretty(&cfg).expect("JSON value serialises");
                write_atomic(&tmp.join(&fname), text.as_bytes())?;
            } else {
                std::fs::copy(&p, tmp.join(&fname)).map_err(io_err(&p))?;
            }
            written.push(fname);
        }
        Ok(written)
    })?;
    Ok(MergeReport {
        merged: names,
        tensors: plan.len(),
        out: out.into(),
        removed_stale,
    })
}
