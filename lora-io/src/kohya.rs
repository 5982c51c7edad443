//! kohya-ss LoRA files (the Stable Diffusion tools' format): one safetensors file with
//! `<name>.lora_down.weight` `(r, in[, kh, kw])`, `<name>.lora_up.weight` `(out, r[, 1, 1])` and
//! an optional scalar `<name>.alpha` (missing or 0: the rank, as kohya reads it), where `<name>` is a prefix (`lora_unet`,
//! `lora_te`, `lora_te1`, `lora_te2`) joined by `_` to the module path with its dots replaced by
//! `_`. The update is `alpha / r * up @ down`. `ss_*` metadata is kept through conversions;
//! 4-D (conv) pairs are read and carried unchanged.
//!
//! Converting kohya -> PEFT needs the module paths back, which `_` flattening loses
//! (`self_attn` vs `self.attn`): it takes the target model's module list and maps each name to
//! the module whose flattened path equals it.

use crate::error::{IoError, Result};
use crate::peft::{PeftConfig, Targets};
use crate::safetensors::SafetensorsFile;
use crate::write::{write_safetensors, OutDtype, OutTensor};
use lora_core::models::CausalLm;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The prefixes kohya uses.
pub const PREFIXES: [&str; 4] = ["lora_unet", "lora_te1", "lora_te2", "lora_te"];

/// One module's pair.
#[derive(Clone, Debug, PartialEq)]
pub struct KohyaModule {
    /// Flattened name including its prefix (`lora_te_model_layers_0_self_attn_q_proj`).
    pub name: String,
    /// `lora_down`: `(r, in)` or `(r, in, kh, kw)`.
    pub down: (Vec<usize>, Vec<f32>),
    /// `lora_up`: `(out, r)` or `(out, r, 1, 1)`.
    pub up: (Vec<usize>, Vec<f32>),
    /// alpha (the rank when the file has none).
    pub alpha: f32,
}

impl KohyaModule {
    /// r
    pub fn rank(&self) -> usize {
        self.down.0[0]
    }
    /// `alpha / r`
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank() as f32
    }
}

/// A kohya LoRA file in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct KohyaLora {
    /// Modules, sorted by name.
    pub modules: Vec<KohyaModule>,
    /// All `__metadata__` (the `ss_*` training notes among it).
    pub metadata: BTreeMap<String, String>,
}

/// Flattens a module path as kohya does: `prefix` + `_` + path with `.` -> `_`.
pub fn flatten(prefix: &str, module: &str) -> String {
    format!("{prefix}_{}", module.replace('.', "_"))
}

impl KohyaLora {
    /// Reads a kohya file. Every `lora_down` needs its `lora_up` and vice versa, ranks must
    /// agree, and no other keys are allowed.
    pub fn read(path: &Path) -> Result<Self> {
        let f = SafetensorsFile::open(path)?;
        let bad = |key: &str, reason: String| IoError::Config {
            path: path.into(),
            field: key.into(),
            reason,
        };
        let mut names: Vec<String> = Vec::new();
        for k in f.names() {
            if let Some(n) = k.strip_suffix(".lora_down.weight") {
                names.push(n.to_string());
            } else if k.ends_with(".lora_up.weight") || k.ends_with(".alpha") {
                let n = k
                    .rsplit_once(".lora_up.weight")
                    .map(|x| x.0)
                    .or_else(|| k.strip_suffix(".alpha"))
                    .unwrap_or(k);
                if f.meta(&format!("{n}.lora_down.weight")).is_none() {
                    return Err(bad(k, "has no matching `.lora_down.weight`".into()));
                }
            } else {
                return Err(bad(k, "is not a kohya LoRA key (expected .lora_down.weight, .lora_up.weight or .alpha)".into()));
            }
        }
        if names.is_empty() {
            return Err(bad(
                "(file)",
                "no `.lora_down.weight` tensors: not a kohya LoRA file".into(),
            ));
        }
        let mut modules = Vec::new();
        for n in names {
            if !PREFIXES.iter().any(|p| n.starts_with(&format!("{p}_"))) {
                return Err(bad(
                    &n,
                    format!("unknown prefix (expected one of {PREFIXES:?})"),
                ));
            }
            let (dv, ds) = f.read_f32_finite(&format!("{n}.lora_down.weight"))?;
            let upk = format!("{n}.lora_up.weight");
            if f.meta(&upk).is_none() {
                return Err(bad(&upk, "missing".into()));
            }
            let (uv, us) = f.read_f32_finite(&upk)?;
            if !(ds.len() == 2 || ds.len() == 4)
                || us.len() != ds.len()
                || us[1] != ds[0]
                || ds[0] == 0
            {
                return Err(bad(
                    &n,
                    format!("lora_down {ds:?} and lora_up {us:?} do not form a rank-r pair"),
                ));
            }
            // kohya's rule: a missing alpha, or an alpha of 0, means alpha = rank.
            let ak = format!("{n}.alpha");
            let alpha = match f.meta(&ak) {
                None => ds[0] as f32,
                Some(m) if m.shape.iter().product::<usize>() != 1 => {
                    return Err(bad(
                        &ak,
                        format!("must hold one value, has shape {:?}", m.shape),
                    ))
                }
                Some(_) => match f.read_f32(&ak)?.0[0] {
                    0.0 => ds[0] as f32,
                    a if a.is_finite() && a > 0.0 => a,
                    a => return Err(bad(&ak, format!("must be a positive number, got {a}"))),
                },
            };
            modules.push(KohyaModule {
                name: n,
                down: (ds, dv),
                up: (us, uv),
                alpha,
            });
        }
        modules.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            modules,
            metadata: f.metadata.clone().into_iter().collect(),
        })
    }

    /// Writes the file (f32 pairs, f32 scalar alpha), atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let alphas: Vec<[f32; 1]> = self.modules.iter().map(|m| [m.alpha]).collect();
        let mut tensors = Vec::new();
        for (m, a) in self.modules.iter().zip(&alphas) {
            tensors.push(OutTensor {
                name: format!("{}.lora_down.weight", m.name),
                shape: m.down.0.clone(),
                values: &m.down.1,
                dtype: OutDtype::F32,
            });
            tensors.push(OutTensor {
                name: format!("{}.lora_up.weight", m.name),
                shape: m.up.0.clone(),
                values: &m.up.1,
                dtype: OutDtype::F32,
            });
            tensors.push(OutTensor {
                name: format!("{}.alpha", m.name),
                shape: vec![],
                values: a,
                dtype: OutDtype::F32,
            });
        }
        write_safetensors(path, &tensors, self.metadata.clone().into_iter().collect())
    }

    /// From a PEFT adapter directory: each module's scale is kept (`alpha_kohya = s * r`, so an
    /// rsLoRA adapter gets `alpha * sqrt(r)`).
    pub fn from_peft(dir: &Path, prefix: &str) -> Result<Self> {
        if !PREFIXES.contains(&prefix) {
            return Err(IoError::Config {
                path: dir.into(),
                field: "--prefix".into(),
                reason: format!("must be one of {PREFIXES:?}"),
            });
        }
        let cfg = PeftConfig::load(dir)?;
        let f = SafetensorsFile::open(dir.join("adapter_model.safetensors"))?;
        let mut modules = Vec::new();
        for k in f.names() {
            let Some(module) = k
                .strip_prefix("base_model.model.")
                .and_then(|x| x.strip_suffix(".lora_A.weight"))
            else {
                continue;
            };
            let down = f.read_f32_finite(k)?;
            let up = f.read_f32_finite(&format!("base_model.model.{module}.lora_B.weight"))?;
            let r = down.1[0];
            let lc = cfg.lora_config_for(module)?;
            let s = if cfg.use_rslora {
                lc.alpha / (r as f32).sqrt()
            } else {
                lc.alpha / r as f32
            };
            modules.push(KohyaModule {
                name: flatten(prefix, module),
                down: (down.1, down.0),
                up: (up.1, up.0),
                alpha: s * r as f32,
            });
        }
        modules.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            modules,
            metadata: BTreeMap::new(),
        })
    }

    /// To a PEFT adapter directory for `model` (whose module paths resolve the flattened names).
    /// The most common rank/alpha become `r`/`lora_alpha`; the others go to
    /// `rank_pattern`/`alpha_pattern` (escaped full paths). `ss_*` metadata is not part of PEFT's
    /// format and is dropped (kohya -> kohya keeps it).
    pub fn to_peft(&self, model: &dyn CausalLm, dir: &Path) -> Result<()> {
        let linears = model.linears();
        let model_modules: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
        let by_flat: HashMap<String, &String> = model_modules
            .iter()
            .map(|m| (m.replace('.', "_"), m))
            .collect();
        let mut resolved: Vec<(String, &KohyaModule)> = Vec::new();
        for m in &self.modules {
            let bare = PREFIXES
                .iter()
                .find_map(|p| m.name.strip_prefix(&format!("{p}_")))
                .unwrap_or(&m.name);
            let path = by_flat.get(bare).ok_or_else(|| IoError::NoTarget {
                target: format!("kohya module `{}`", m.name),
                available: model_modules.join(", "),
            })?;
            if m.down.0.len() != 2 {
                return Err(IoError::Config {
                    path: dir.into(),
                    field: m.name.clone(),
                    reason: "conv (4-D) pairs have no linear module to map to".into(),
                });
            }
            if let Some((_, other)) = resolved.iter().find(|(p, _)| p == *path) {
                return Err(IoError::Config {
                    path: dir.into(),
                    field: m.name.clone(),
                    reason: format!(
                        "maps to module `{path}`, as `{}` does: two pairs for one module (a \
                         file mixing prefixes?)",
                        other.name
                    ),
                });
            }
            resolved.push(((*path).clone(), m));
        }
        let mode = |xs: Vec<String>| -> String {
            let mut c: BTreeMap<String, usize> = BTreeMap::new();
            for x in xs {
                *c.entry(x).or_default() += 1;
            }
            c.into_iter()
                .max_by_key(|(_, n)| *n)
                .map(|(k, _)| k)
                .unwrap_or_default()
        };
        let r: usize = mode(resolved.iter().map(|(_, m)| m.rank().to_string()).collect())
            .parse()
            .unwrap_or(1);
        let alpha: f32 = mode(resolved.iter().map(|(_, m)| m.alpha.to_string()).collect())
            .parse()
            .unwrap_or(r as f32);
        let mut rank_pattern = Vec::new();
        let mut alpha_pattern = Vec::new();
        for (path, m) in &resolved {
            if m.rank() != r {
                rank_pattern.push((regex::escape(path), m.rank()));
            }
            if m.alpha != alpha {
                alpha_pattern.push((regex::escape(path), m.alpha));
            }
        }
        let targets: Vec<String> = resolved.iter().map(|(p, _)| p.clone()).collect();
        let cfg = PeftConfig {
            r,
            lora_alpha: alpha,
            target_modules: Targets::List(targets.clone()),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern,
            alpha_pattern,
            use_rslora: false,
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            base_model_name_or_path: None,
            task_type: None,
            modules_to_save: Vec::new(),
        };
        std::fs::create_dir_all(dir).map_err(crate::error::io_err(dir))?;
        let mut tensors = Vec::new();
        for (path, m) in &resolved {
            tensors.push(OutTensor {
                name: format!("base_model.model.{path}.lora_A.weight"),
                shape: m.down.0.clone(),
                values: &m.down.1,
                dtype: OutDtype::F32,
            });
            tensors.push(OutTensor {
                name: format!("base_model.model.{path}.lora_B.weight"),
                shape: m.up.0.clone(),
                values: &m.up.1,
                dtype: OutDtype::F32,
            });
        }
        let meta = [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect();
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, meta)?;
        // GPT-2's Conv1D layers are stored (in, out): PEFT marks such adapters fan_in_fan_out.
        let fan_in_fan_out = linears.iter().any(|(n, l)| {
            targets.contains(n) && l.base().1 == lora_core::lora::WeightLayout::InOut
        });
        let json = crate::peft::config_json(&cfg, &targets, fan_in_fan_out);
        crate::write::write_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&json)
                .expect("serialises")
                .as_bytes(),
        )
    }
}
