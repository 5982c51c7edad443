//! `lora extract` for language models: a PEFT LoRA adapter from the difference of a fine-tuned
//! model directory and its base, linear layer by linear layer, by the truncated SVD of
//! `W_tuned - W_base` ([`crate::sd_extract::truncated_svd`]): `lora_B = U_r diag(S_r)`,
//! `lora_A = V_r^T`, `lora_alpha = r` (scale 1), so `W_base + B A` is the best rank-r
//! approximation of the tuned weight. GPT-2's `Conv1D` weights (stored `(in, out)`) are
//! differenced as `(out, in)`, as PEFT's factors are, and the adapter says `fan_in_fan_out`.
//!
//! The adapter targets exactly the layers that changed: a leaf name (`q_proj`) when every layer
//! of that name changed, the full module paths otherwise. What a LoRA cannot carry — changed
//! embeddings, norms, biases — is listed in the report, never dropped in silence.

use crate::combine::Factors;
use crate::error::{IoError, Result};
use crate::hf::{ModelDir, Weights};
use crate::peft::{PeftConfig, Targets};
use lora_core::lora::WeightLayout;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What [`extract_llm`] found.
#[derive(Clone, Debug)]
pub struct LlmExtracted {
    /// The adapter's config.
    pub config: PeftConfig,
    /// Module path -> factors (scale 1).
    pub modules: BTreeMap<String, Factors>,
    /// Per module, the share of its difference's Frobenius norm the rank-r update keeps.
    pub kept: BTreeMap<String, f64>,
    /// Stored tensors other than the adapted linears' weights that differ between the models
    /// (embeddings, norms, biases, untargetable layers): the adapter does not carry them.
    pub not_carried: Vec<String>,
}

fn bad(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> IoError {
    IoError::Config {
        path: path.into(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// Extracts a rank-`rank` adapter from `tuned_dir` - `base_dir` (two model directories of the
/// same architecture and sizes). A layer whose largest difference is at most `min_diff` times
/// its largest weight is left out.
pub fn extract_llm(
    base_dir: &Path,
    tuned_dir: &Path,
    rank: usize,
    min_diff: f32,
) -> Result<LlmExtracted> {
    if rank == 0 {
        return Err(bad(tuned_dir, "--rank", "must be at least 1"));
    }
    let (bm, tm) = (ModelDir::open(base_dir)?, ModelDir::open(tuned_dir)?);
    if format!("{:?}", bm.config) != format!("{:?}", tm.config) {
        return Err(bad(
            &tuned_dir.join("config.json"),
            "config",
            format!(
                "not the architecture of {} (the configurations differ)",
                base_dir.join("config.json").display()
            ),
        ));
    }
    let (base, tuned) = (bm.load_model()?, tm.load_model()?);
    let tuned_layers: BTreeMap<String, &lora_core::models::Linear> =
        tuned.linears().into_iter().collect();
    let mut modules = BTreeMap::new();
    let mut kept = BTreeMap::new();
    let mut fan_in_fan_out = None;
    let mut weight_keys = BTreeSet::new();
    let base_layers = base.linears();
    for (i, (name, lb)) in base_layers.iter().enumerate() {
        let lt = tuned_layers
            .get(name)
            .ok_or_else(|| bad(tuned_dir, name.as_str(), "no such layer in the tuned model"))?;
        let ((wb, layout, _), (wt, layout_t, _)) = (lb.base(), lt.base());
        if wb.shape() != wt.shape() || layout != layout_t {
            return Err(bad(
                tuned_dir,
                name.as_str(),
                format!("shape {:?}, the base's is {:?}", wt.shape(), wb.shape()),
            ));
        }
        weight_keys.insert(format!("{name}.weight"));
        let (a, b) = (wb.try_to_vec()?, wt.try_to_vec()?);
        let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        let largest = a
            .iter()
            .zip(&b)
            .fold(0.0f64, |m, (x, y)| m.max((*y as f64 - *x as f64).abs()));
        if largest <= min_diff as f64 * scale.max(f64::MIN_POSITIVE) {
            continue;
        }
        let (r0, c0) = (wb.shape()[0], wb.shape()[1]);
        // (out, in) = the stored shape, or its transpose for Conv1D's (in, out).
        let (out, inp) = match layout {
            WeightLayout::OutIn => (r0, c0),
            WeightLayout::InOut => (c0, r0),
        };
        let mut d = vec![0.0f64; out * inp];
        for o in 0..out {
            for k in 0..inp {
                let s = match layout {
                    WeightLayout::OutIn => o * inp + k,
                    WeightLayout::InOut => k * out + o,
                };
                d[o * inp + k] = b[s] as f64 - a[s] as f64;
            }
        }
        let inout = layout == WeightLayout::InOut;
        if *fan_in_fan_out.get_or_insert(inout) != inout {
            return Err(bad(
                base_dir,
                name.as_str(),
                "mixes (out, in) and (in, out) weight layouts; PEFT's fan_in_fan_out is one \
                 setting per adapter",
            ));
        }
        let (up, down, k) =
            crate::sd_extract::truncated_svd(&d, out, inp, rank, 0x11_e7 + i as u64);
        let r = rank.min(out).min(inp);
        modules.insert(
            name.clone(),
            Factors {
                a: down.iter().map(|&v| v as f32).collect(),
                b: up.iter().map(|&v| v as f32).collect(),
                r,
                inp,
                out,
                scale: 1.0,
            },
        );
        kept.insert(name.clone(), k);
    }
    // Everything else that changed: the adapter cannot carry it.
    let (wb, wt) = (Weights::open(base_dir)?, Weights::open(tuned_dir)?);
    let mut not_carried = Vec::new();
    for (key, _, shape) in wb.entries() {
        let adapted =
            weight_keys.contains(&key) || weight_keys.contains(&format!("transformer.{key}"));
        if adapted {
            continue;
        }
        if !wt.contains(&key) {
            not_carried.push(format!("{key} (absent from the tuned model)"));
            continue;
        }
        let same = match (wb.raw_bytes(&key), wt.raw_bytes(&key)) {
            (Ok(x), Ok(y)) if x == y => true,
            _ => {
                let (x, y) = (wb.read_f32(&key), wt.read_f32(&key));
                matches!((x, y), (Ok(x), Ok(y)) if x == y)
            }
        };
        if !same {
            not_carried.push(format!("{key} {shape:?}"));
        }
    }
    for (key, _, _) in wt.entries() {
        let adapted =
            weight_keys.contains(&key) || weight_keys.contains(&format!("transformer.{key}"));
        if !adapted && !wb.contains(&key) {
            not_carried.push(format!("{key} (absent from the base model)"));
        }
    }
    // Targets: a leaf name when every layer of that name changed, else the full paths.
    let mut leaves: BTreeMap<&str, (usize, Vec<&str>)> = BTreeMap::new();
    for (name, _) in &base_layers {
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let e = leaves.entry(leaf).or_default();
        e.0 += 1;
        if modules.contains_key(name) {
            e.1.push(name);
        }
    }
    let mut targets = Vec::new();
    for (leaf, (all, changed)) in leaves {
        if changed.len() == all {
            targets.push(leaf);
        } else {
            targets.extend(changed);
        }
    }
    let mut config = PeftConfig::new(rank, rank as f32, &targets);
    config.fan_in_fan_out = fan_in_fan_out.unwrap_or(false);
    config.task_type = Some("CAUSAL_LM".into());
    config.base_model_name_or_path = Some(base_dir.display().to_string());
    // A layer smaller than the rank keeps its own rank, with alpha = rank (scale 1).
    for (name, f) in &modules {
        if f.r != rank {
            config.rank_pattern.push((name.clone(), f.r));
            config.alpha_pattern.push((name.clone(), f.r as f32));
        }
    }
    debug_assert!(matches!(config.target_modules, Targets::List(_)));
    Ok(LlmExtracted {
        config,
        modules,
        kept,
        not_carried,
    })
}
