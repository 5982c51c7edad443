//! `lora merge` on a Stable Diffusion pipeline: the LoRA files are merged into the loaded models
//! (see [`crate::sd_lora::merge_sd_lora`]) and the pipeline is written back in the layout it was
//! read from, changing only the merged layers' weights:
//!
//! - a diffusers directory becomes a directory: every file copied, `unet/` and `text_encoder/`
//!   (when a layer of theirs changed) with their weights rewritten as one file, each tensor in
//!   its stored dtype; their other weight files (`.bin`, `.fp16` variants, shards' index) are
//!   left out, since they would hold the unmerged weights;
//! - a single-file checkpoint becomes a single file: every tensor of the input (EMA copies,
//!   buffers, integer tensors included) in its dtype (in name order), the merged layers' tensors
//!   replaced (OpenCLIP's fused `in_proj` patched row-wise), the input's metadata kept.
//!
//! Every merged weight is checked finite before a byte is written; the output is assembled under
//! a temporary name and moved into place, and replaces only an earlier output of `lora merge`
//! (with `force`), never an input.

use crate::error::{io_err, IoError, Result};
use crate::outdir::{FILE_MARK, LOCK, MARKER};
use crate::safetensors::SafetensorsFile;
use crate::sd::{Layout, SdPipeline};
use crate::sd_lora::Component;
use crate::sd_single::{Configs, Part, SingleFile};
use crate::write::{write_safetensors_streamed, OutDtype, StreamedTensor};
use lora_core::lora::WeightLayout;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What [`write_merged`] wrote.
#[derive(Clone, Debug)]
pub struct SdMergeReport {
    /// Tensors replaced by merged ones.
    pub replaced: usize,
    /// Tensors written in all (weights files only).
    pub tensors: usize,
    /// The output.
    pub out: PathBuf,
    /// Temporaries of killed merges into the same output, removed.
    pub removed_stale: Vec<PathBuf>,
}

/// Merged weights (f32 values, shape) by layer.
type Merged = HashMap<(Component, String), (Vec<f32>, Vec<usize>)>;

/// The merged layers' weights, checked finite.
fn merged_weights(pipe: &SdPipeline, changed: &[(Component, String)]) -> Result<Merged> {
    let mut all: HashMap<(Component, String), &lora_core::Tensor> = HashMap::new();
    let bad_layout = |n: &str| IoError::Config {
        path: pipe.path.clone(),
        field: n.into(),
        reason: "a transposed weight layout; Stable Diffusion's linears are (out, in)".into(),
    };
    for (n, l) in pipe.unet.linears() {
        let (w, layout, _) = l.base();
        if layout != WeightLayout::OutIn {
            return Err(bad_layout(&n));
        }
        all.insert((Component::Unet, n), w);
    }
    for (n, c) in pipe.unet.convs() {
        all.insert((Component::Unet, n), c.base().0);
    }
    for (n, l) in pipe.text_encoder.linears() {
        let (w, layout, _) = l.base();
        if layout != WeightLayout::OutIn {
            return Err(bad_layout(&n));
        }
        all.insert((Component::TextEncoder, n), w);
    }
    let mut out = HashMap::new();
    for key in changed {
        if out.contains_key(key) {
            continue;
        }
        let w = all.get(key).ok_or_else(|| IoError::Config {
            path: pipe.path.clone(),
            field: key.1.clone(),
            reason: "merged but not a layer of the pipeline".into(),
        })?;
        let v = w.try_to_vec()?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(IoError::Config {
                path: pipe.path.clone(),
                field: format!("{}.{}", key.0.prefix(), key.1),
                reason: format!(
                    "the merged weight holds {} at index {i} (a LoRA weight too large?); nothing \
                     was written",
                    v[i]
                ),
            });
        }
        out.insert(key.clone(), (v, w.shape().to_vec()));
    }
    Ok(out)
}

/// Writes `pipe` (with its merged layers `changed`) to `out` in the layout it was read from.
/// `inputs`: the files the command read (the model and the LoRA files), which `out` must not be.
pub fn write_merged(
    pipe: &SdPipeline,
    changed: &[(Component, String)],
    out: &Path,
    force: bool,
    inputs: &[(&str, &Path)],
) -> Result<SdMergeReport> {
    crate::outdir::check_not_input("--out", out, inputs)?;
    let merged = merged_weights(pipe, changed)?;
    match &pipe.layout {
        Layout::Diffusers => write_dir(pipe, &merged, out, force),
        Layout::SingleFile { .. } => write_single(pipe, &merged, out, force),
    }
}

/// Whether a file of a model directory holds weights (left out of a rewritten component).
fn is_weights(name: &str) -> bool {
    [
        ".safetensors",
        ".bin",
        ".ckpt",
        ".pt",
        ".pth",
        ".msgpack",
        ".h5",
        ".onnx",
        ".safetensors.index.json",
        ".bin.index.json",
    ]
    .iter()
    .any(|e| name.ends_with(e))
}

/// Copies `from` into `to` recursively (following symlinks, as a Hub cache snapshot has them),
/// leaving out lora-rs's marker and lock and, when `skip_weights`, the weight files.
fn copy_tree(from: &Path, to: &Path, skip_weights: bool) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io_err(to))?;
    for entry in std::fs::read_dir(from).map_err(io_err(from))? {
        let entry = entry.map_err(io_err(from))?;
        let p = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name == MARKER || name == LOCK || (skip_weights && is_weights(&name)) {
            continue;
        }
        if p.is_dir() {
            copy_tree(&p, &to.join(&name), false)?;
        } else if p.is_file() {
            std::fs::copy(&p, to.join(&name)).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// One weights file rewritten: every tensor of `weights` in its stored dtype, those `merged`
/// names replaced; returns (tensors, replaced).
fn rewrite_weights(
    weights: &crate::hf::Weights,
    path: &Path,
    merged: &HashMap<String, &Vec<f32>>,
) -> Result<(usize, usize)> {
    let entries = weights.entries();
    let heads: Vec<StreamedTensor> = entries
        .iter()
        .map(|(name, dtype, shape)| StreamedTensor {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
        })
        .collect();
    let mut replaced = 0;
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    write_safetensors_streamed(path, &heads, meta, |i| {
        let (name, dtype, _) = &entries[i];
        match merged.get(name) {
            Some(v) => {
                replaced += 1;
                let d = OutDtype::from_dtype(*dtype).ok_or_else(|| IoError::Dtype {
                    path: path.into(),
                    key: name.clone(),
                    dtype: format!("{dtype:?}"),
                })?;
                Ok(d.encode(v))
            }
            None => Ok(weights.raw_bytes(name)?.to_vec()),
        }
    })?;
    Ok((entries.len(), replaced))
}

fn write_dir(pipe: &SdPipeline, merged: &Merged, out: &Path, force: bool) -> Result<SdMergeReport> {
    // Never inside the pipeline being copied (the copy would take in its own output).
    let (src_r, out_r) = (
        crate::outdir::resolve(&pipe.path),
        crate::outdir::resolve(out),
    );
    if out_r.starts_with(&src_r) {
        return Err(IoError::Output {
            path: out.into(),
            reason: format!(
                "--out is inside the pipeline directory {} (--model); choose a place outside it",
                pipe.path.display()
            ),
        });
    }
    let _lock = crate::outdir::OutputLock::beside(out)?;
    match crate::outdir::inspect_output("--out", out, "lora merge", crate::outdir::Owned::Listed)? {
        crate::outdir::Existing::Empty => {}
        crate::outdir::Existing::Ours(_) if !force => {
            return Err(IoError::Output {
                path: out.into(),
                reason: "--out exists (pass --force to replace an earlier merge)".into(),
            })
        }
        crate::outdir::Existing::Ours(_) => {}
    }
    let src = &pipe.path;
    let (mut tensors, mut replaced) = (0, 0);
    let removed_stale = crate::outdir::build_dir_atomically(out, "lora merge", |tmp| {
        let mut written = Vec::new();
        for entry in std::fs::read_dir(src).map_err(io_err(src))? {
            let entry = entry.map_err(io_err(src))?;
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name == MARKER || name == LOCK {
                continue;
            }
            let component = match name.as_str() {
                "unet" => Some((Component::Unet, "diffusion_pytorch_model")),
                "text_encoder" => Some((Component::TextEncoder, "model")),
                _ => None,
            };
            match component {
                Some((c, stem)) if merged.keys().any(|(k, _)| *k == c) => {
                    copy_tree(&p, &tmp.join(&name), true)?;
                    let weights = crate::hf::Weights::open_stem(&p, stem)?;
                    // The model's module paths; a text encoder stored without `text_model.`
                    // (transformers 5) is matched under its stored name.
                    let mut by_key: HashMap<String, &Vec<f32>> = HashMap::new();
                    for ((k, layer), (v, _)) in merged {
                        if *k != c {
                            continue;
                        }
                        let key = format!("{layer}.weight");
                        let stored = [key.clone(), key.replacen("text_model.", "", 1)]
                            .into_iter()
                            .find(|k| weights.contains(k))
                            .ok_or_else(|| IoError::MissingTensor {
                                path: p.clone(),
                                key: key.clone(),
                            })?;
                        by_key.insert(stored, v);
                    }
                    let file = tmp.join(&name).join(format!("{stem}.safetensors"));
                    let (n, r) = rewrite_weights(&weights, &file, &by_key)?;
                    tensors += n;
                    replaced += r;
                }
                _ if p.is_dir() => copy_tree(&p, &tmp.join(&name), false)?,
                _ if p.is_file() => {
                    std::fs::copy(&p, tmp.join(&name)).map_err(io_err(&p))?;
                }
                _ => continue,
            }
            written.push(name);
        }
        Ok(written)
    })?;
    Ok(SdMergeReport {
        replaced,
        tensors,
        out: out.into(),
        removed_stale,
    })
}

/// A single-file output: absent, or (with `force`) an earlier single-file `lora merge` output:
/// never another file lora-rs wrote (a trained LoRA), nor anyone else's.
pub fn check_single_output(out: &Path, force: bool) -> Result<()> {
    crate::outdir::check_output_file("--out", out, force)?;
    if out.exists() {
        let by = SafetensorsFile::open(out)
            .ok()
            .and_then(|f| f.metadata.get(FILE_MARK).cloned());
        if by.as_deref() != Some("lora merge") {
            return Err(IoError::Output {
                path: out.into(),
                reason: format!(
                    "--out was written by `{}`, not by `lora merge`; --force replaces only an \
                     earlier merge",
                    by.unwrap_or_default()
                ),
            });
        }
    }
    Ok(())
}

fn write_single(
    pipe: &SdPipeline,
    merged: &Merged,
    out: &Path,
    force: bool,
) -> Result<SdMergeReport> {
    check_single_output(out, force)?;
    let _lock = crate::outdir::OutputLock::beside(out)?;
    let single = SingleFile::open(&pipe.path)?;
    let cfgs = Configs {
        unet: pipe.unet.config().clone(),
        vae: pipe.vae.config().clone(),
        text: pipe.text_encoder.config().clone(),
        scheduler: serde_json::Value::Null,
        family: None,
    };
    // Stored key -> (first element, values) patches.
    let mut patches: BTreeMap<String, Vec<(usize, &Vec<f32>)>> = BTreeMap::new();
    for ((c, layer), (v, shape)) in merged {
        let part = match c {
            Component::Unet => Part::Unet,
            Component::TextEncoder => Part::TextEncoder,
        };
        let s = single.layout.find(
            &pipe.path,
            part,
            &format!("{layer}.weight"),
            shape,
            &cfgs,
            |k| single.file.meta(k).map(|m| m.shape.clone()),
        )?;
        patches.entry(s.key).or_default().push((s.start, v));
    }
    let names: Vec<String> = single.file.names().iter().map(|s| s.to_string()).collect();
    let heads: Vec<StreamedTensor> = names
        .iter()
        .map(|n| {
            let m = single.file.meta(n).expect("listed");
            StreamedTensor {
                name: n.clone(),
                dtype: m.dtype,
                shape: m.shape.clone(),
            }
        })
        .collect();
    let mut meta = single.file.metadata.clone();
    meta.insert(FILE_MARK.into(), "lora merge".into());
    write_safetensors_streamed(out, &heads, meta, |i| {
        let name = &names[i];
        let Some(ps) = patches.get(name) else {
            return Ok(single.file.raw_bytes(name)?.to_vec());
        };
        let m = single.file.meta(name).expect("listed");
        let d = OutDtype::from_dtype(m.dtype).ok_or_else(|| IoError::Dtype {
            path: pipe.path.clone(),
            key: name.clone(),
            dtype: format!("{:?}", m.dtype),
        })?;
        let (mut values, _) = single.file.read_f32(name)?;
        for (start, v) in ps {
            values[*start..*start + v.len()].copy_from_slice(v);
        }
        Ok(d.encode(&values))
    })?;
    Ok(SdMergeReport {
        replaced: patches.len(),
        tensors: names.len(),
        out: out.into(),
        removed_stale: Vec::new(),
    })
}
