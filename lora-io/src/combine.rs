//! Combining adapters into a new one, with PEFT's `add_weighted_adapter` semantics (PEFT 0.21):
//!
//! - `cat`: rank = sum of the adapters' ranks; `A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`,
//!   `B = [B_1, B_2, ...]`, zero-padded where an adapter lacks the module. Exact:
//!   `B A = sum_i w_i s_i B_i A_i`.
//! - `linear`: same ranks required; `A = sum_i sign_i sqrt|w_i s_i| A_i`,
//!   `B = sum_i sqrt|w_i s_i| B_i` (not the sum of the updates: cross terms remain, as in PEFT).
//! - `svd`: the truncated SVD of `sum_i w_i s_i B_i A_i` to the chosen rank (default: the largest
//!   input rank): `B = U_r S_r`, `A = V_r^T`. Computed without forming the full update's SVD:
//!   thin QR of the stacked factors, then a Jacobi SVD of the small core.
//!
//! The result has `r = lora_alpha = new rank` (scale 1 unless the first adapter uses rsLoRA,
//! as in PEFT). Where PEFT would leave a module with a different rank than `r` (a `linear` combine
//! of a module only one adapter has), we record it in `rank_pattern`/`alpha_pattern` so the file
//! stays loadable with the same scale.

use crate::error::{IoError, Result};
use crate::peft::{PeftConfig, Targets};
use crate::safetensors::SafetensorsFile;
use lora_core::linalg::{jacobi_svd, qr};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How to combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    /// Weighted sum of the factors.
    Linear,
    /// Concatenation (exact).
    Cat,
    /// Truncated SVD of the weighted sum of updates.
    Svd {
        /// Output rank (default: the largest input rank).
        rank: Option<usize>,
    },
}

/// One module's factors.
#[derive(Clone, Debug, PartialEq)]
pub struct Factors {
    /// A `(r, in)`.
    pub a: Vec<f32>,
    /// B `(out, r)`.
    pub b: Vec<f32>,
    /// r
    pub r: usize,
    /// in
    pub inp: usize,
    /// out
    pub out: usize,
    /// s (1 for combined outputs' own bookkeeping; the input adapters' scale otherwise)
    pub scale: f32,
}

/// A PEFT adapter read from disk, module by module.
#[derive(Clone, Debug)]
pub struct AdapterWeights {
    /// Its directory.
    pub dir: PathBuf,
    /// Its config.
    pub config: PeftConfig,
    /// Module path -> factors.
    pub modules: BTreeMap<String, Factors>,
}

impl AdapterWeights {
    /// Reads `dir` (adapter_config.json + adapter_model.safetensors).
    pub fn read(dir: &Path) -> Result<Self> {
        let config = PeftConfig::load(dir)?;
        let file = SafetensorsFile::open(dir.join("adapter_model.safetensors"))?;
        let bad = |k: &str, reason: String| IoError::Config {
            path: file.path().into(),
            field: k.into(),
            reason,
        };
        let mut modules = BTreeMap::new();
        for k in file.names() {
            let Some(m) = k
                .strip_prefix("base_model.model.")
                .and_then(|x| x.strip_suffix(".lora_A.weight"))
            else {
                if !k.ends_with(".lora_B.weight") {
                    return Err(bad(
                        k,
                        "not a LoRA tensor (expected base_model.model.<module>.lora_A/B.weight)"
                            .into(),
                    ));
                }
                continue;
            };
            let (a, ash) = file.read_f32_finite(k)?;
            let bk = format!("base_model.model.{m}.lora_B.weight");
            if file.meta(&bk).is_none() {
                return Err(bad(&bk, "missing (lora_A without lora_B)".into()));
            }
            let (b, bsh) = file.read_f32_finite(&bk)?;
            if ash.len() != 2 || bsh.len() != 2 || ash[0] != bsh[1] {
                return Err(bad(
                    m,
                    format!("lora_A {ash:?} and lora_B {bsh:?} ranks disagree"),
                ));
            }
            let lc = config.lora_config_for(m)?;
            let r = ash[0];
            let scale = if config.use_rslora {
                lc.alpha / (r as f32).sqrt()
            } else {
                lc.alpha / r as f32
            };
            modules.insert(
                m.to_string(),
                Factors {
                    a,
                    b,
                    r,
                    inp: ash[1],
                    out: bsh[0],
                    scale,
                },
            );
        }
        if file
            .names()
            .iter()
            .filter(|k| k.ends_with(".lora_B.weight"))
            .count()
            != modules.len()
        {
            return Err(bad("lora_B", "a lora_B without its lora_A".into()));
        }
        Ok(Self {
            dir: dir.into(),
            config,
            modules,
        })
    }

    fn max_rank(&self) -> usize {
        self.config
            .rank_pattern
            .iter()
            .map(|(_, r)| *r)
            .chain([self.config.r])
            .max()
            .unwrap_or(self.config.r)
    }
}

fn combined_targets(adapters: &[AdapterWeights]) -> Result<Targets> {
    let first = &adapters[0].config.target_modules;
    match first {
        Targets::Regex(_) => {
            let mut parts = Vec::new();
            for a in adapters {
                match &a.config.target_modules {
                    Targets::Regex(r) => parts.push(format!("({r})")),
                    _ => {
                        return Err(IoError::Config {
                            path: a.dir.clone(),
                            field: "target_modules".into(),
                            reason: "cannot combine regex targets with name lists".into(),
                        })
                    }
                }
            }
            Ok(Targets::Regex(parts.join("|")))
        }
        _ => {
            let mut names: Vec<String> = Vec::new();
            for a in adapters {
                match &a.config.target_modules {
                    Targets::List(l) => names.extend(l.iter().cloned()),
                    Targets::AllLinear => names.extend(
                        a.modules
                            .keys()
                            .map(|m| m.rsplit('.').next().unwrap_or(m).to_string()),
                    ),
                    Targets::Regex(_) => {
                        return Err(IoError::Config {
                            path: a.dir.clone(),
                            field: "target_modules".into(),
                            reason: "cannot combine regex targets with name lists".into(),
                        })
                    }
                }
            }
            names.sort();
            names.dedup();
            Ok(Targets::List(names))
        }
    }
}

/// Combines `adapters` with `weights`; returns the new config and factors per module.
pub fn combine(
    adapters: &[AdapterWeights],
    weights: &[f32],
    how: Combination,
) -> Result<(PeftConfig, BTreeMap<String, Factors>)> {
    if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
        return Err(IoError::Config {
            path: adapters
                .get(i)
                .map_or_else(|| PathBuf::from("combine"), |a| a.dir.clone()),
            field: "--weight".into(),
            reason: format!("must be finite, got {w}"),
        });
    }
    if adapters.is_empty() || adapters.len() != weights.len() {
        return Err(IoError::Config {
            path: PathBuf::from("combine"),
            field: "weights".into(),
            reason: format!("{} adapters but {} weights", adapters.len(), weights.len()),
        });
    }
    // PEFT: a single adapter can only be combined linearly.
    let how = if adapters.len() == 1 {
        Combination::Linear
    } else {
        how
    };
    let ranks: Vec<usize> = adapters.iter().map(|a| a.max_rank()).collect();
    let new_rank = match how {
        Combination::Linear => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(IoError::Config {
                    path: adapters[0].dir.clone(),
                    field: "r".into(),
                    reason: format!(
                        "linear combination needs equal ranks, got {ranks:?} (use cat or svd)"
                    ),
                });
            }
            ranks[0]
        }
        Combination::Cat => ranks.iter().sum(),
        Combination::Svd { rank } => rank.unwrap_or(*ranks.iter().max().expect("non-empty")),
    };
    if new_rank == 0 {
        return Err(IoError::Config {
            path: adapters[0].dir.clone(),
            field: "rank".into(),
            reason: "must be at least 1".into(),
        });
    }
    let mut names: Vec<&String> = adapters.iter().flat_map(|a| a.modules.keys()).collect();
    names.sort();
    names.dedup();
    let mut out = BTreeMap::new();
    for name in names {
        let present: Vec<(&Factors, f32)> = adapters
            .iter()
            .zip(weights)
            .filter_map(|(a, &w)| a.modules.get(name).map(|f| (f, w)))
            .collect();
        let (inp, outd) = (present[0].0.inp, present[0].0.out);
        if let Some((f, _)) = present.iter().find(|(f, _)| f.inp != inp || f.out != outd) {
            return Err(IoError::Config {
                path: PathBuf::from("combine"),
                field: name.clone(),
                reason: format!(
                    "layer shapes differ between adapters: ({}, {}) vs ({}, {})",
                    outd, inp, f.out, f.inp
                ),
            });
        }
        let f = match how {
            Combination::Cat => {
                let mut a = vec![0.0f32; new_rank * inp];
                let mut b = vec![0.0f32; outd * new_rank];
                let mut row = 0;
                for (fac, w) in &present {
                    let c = w * fac.scale;
                    for j in 0..fac.r {
                        for k in 0..inp {
                            a[(row + j) * inp + k] = fac.a[j * inp + k] * c;
                        }
                        for o in 0..outd {
                            b[o * new_rank + row + j] = fac.b[o * fac.r + j];
                        }
                    }
                    row += fac.r;
                }
                Factors {
                    a,
                    b,
                    r: new_rank,
                    inp,
                    out: outd,
                    scale: 1.0,
                }
            }
            Combination::Linear => {
                let r = present[0].0.r;
                if let Some((fac, _)) = present.iter().find(|(f, _)| f.r != r) {
                    return Err(IoError::Config {
                        path: PathBuf::from("combine"),
                        field: name.clone(),
                        reason: format!(
                            "linear combination needs equal ranks, got {r} and {}",
                            fac.r
                        ),
                    });
                }
                let mut a = vec![0.0f32; r * inp];
                let mut b = vec![0.0f32; outd * r];
                for (fac, w) in &present {
                    let ws = w * fac.scale;
                    let root = ws.abs().sqrt();
                    let sa = if ws >= 0.0 { root } else { -root };
                    a.iter_mut().zip(&fac.a).for_each(|(d, s)| *d += sa * s);
                    b.iter_mut().zip(&fac.b).for_each(|(d, s)| *d += root * s);
                }
                Factors {
                    a,
                    b,
                    r,
                    inp,
                    out: outd,
                    scale: 1.0,
                }
            }
            Combination::Svd { .. } => {
                if new_rank > inp.min(outd) {
                    return Err(IoError::Config {
                        path: PathBuf::from("combine"),
                        field: name.clone(),
                        reason: format!(
                            "svd rank {new_rank} exceeds min(out, in) = {} of this layer \
                             ({outd} x {inp}): its update has no more singular values",
                            inp.min(outd)
                        ),
                    });
                }
                svd_combine(&present, new_rank, inp, outd)
            }
        };
        out.insert(name.clone(), f);
    }
    let first = &adapters[0].config;
    let mut cfg = first.clone();
    cfg.r = new_rank;
    cfg.lora_alpha = new_rank as f32;
    cfg.target_modules = combined_targets(adapters)?;
    cfg.rank_pattern = Vec::new();
    cfg.alpha_pattern = Vec::new();
    cfg.exclude_modules = None;
    cfg.layers_to_transform = None;
    cfg.layers_pattern = None;
    for (name, f) in &out {
        if f.r != new_rank {
            // Keep PEFT's in-memory scale (alpha/r of the new adapter) with the module's own rank.
            let s = if cfg.use_rslora {
                (new_rank as f32).sqrt()
            } else {
                1.0
            };
            let alpha = if cfg.use_rslora {
                s * (f.r as f32).sqrt()
            } else {
                s * f.r as f32
            };
            cfg.rank_pattern.push((regex::escape(name), f.r));
            cfg.alpha_pattern.push((regex::escape(name), alpha));
        }
    }
    // Weights far from 1 can overflow f32 in the products: refuse rather than write NaN.
    for (name, f) in &out {
        if f.a.iter().chain(&f.b).any(|x| !x.is_finite()) {
            return Err(IoError::Config {
                path: adapters[0].dir.clone(),
                field: name.clone(),
                reason: format!(
                    "the combination overflows (weights {weights:?}): its factors are not finite"
                ),
            });
        }
    }
    Ok((cfg, out))
}

/// Writes a combined adapter as a PEFT directory.
pub fn write(dir: &Path, cfg: &PeftConfig, modules: &BTreeMap<String, Factors>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(crate::error::io_err(dir))?;
    let mut tensors = Vec::new();
    for (m, f) in modules {
        tensors.push(crate::write::OutTensor {
            name: format!("base_model.model.{m}.lora_A.weight"),
            shape: vec![f.r, f.inp],
            values: &f.a,
            dtype: crate::write::OutDtype::F32,
        });
        tensors.push(crate::write::OutTensor {
            name: format!("base_model.model.{m}.lora_B.weight"),
            shape: vec![f.out, f.r],
            values: &f.b,
            dtype: crate::write::OutDtype::F32,
        });
    }
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    crate::write::write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, meta)?;
    let names: Vec<String> = modules.keys().cloned().collect();
    let json = crate::peft::config_json(cfg, &names, cfg.fan_in_fan_out);
    crate::write::write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&json)
            .expect("serialises")
            .as_bytes(),
    )
}

/// Truncated SVD of `sum_i w_i s_i B_i A_i` to rank `r`.
fn svd_combine(present: &[(&Factors, f32)], r: usize, inp: usize, out: usize) -> Factors {
    let k: usize = present.iter().map(|(f, _)| f.r).sum();
    // Stacked factors: Bc (out x k), Ac^T (in x k), with w_i s_i folded into A.
    let mut bc = vec![0.0f64; out * k];
    let mut act = vec![0.0f64; inp * k];
    let mut col = 0;
    for (f, w) in present {
        let c = (*w * f.scale) as f64;
        for j in 0..f.r {
            for o in 0..out {
                bc[o * k + col + j] = f.b[o * f.r + j] as f64;
            }
            for i in 0..inp {
                act[i * k + col + j] = c * f.a[j * inp + i] as f64;
            }
        }
        col += f.r;
    }
    let (qb, rb) = qr(&bc, out, k);
    let (qa, ra) = qr(&act, inp, k);
    // Core (k x k) = Rb Ra^T, so delta = Qb core Qa^T.
    let mut core = vec![0.0f64; k * k];
    for i in 0..k {
        for j in 0..k {
            core[i * k + j] = (0..k).map(|t| rb[i * k + t] * ra[j * k + t]).sum();
        }
    }
    let (u, s, v) = jacobi_svd(&core, k);
    let keep = r.min(k);
    let mut a = vec![0.0f32; r * inp];
    let mut b = vec![0.0f32; out * r];
    for c in 0..keep {
        for o in 0..out {
            b[o * r + c] =
                ((0..k).map(|t| qb[o * k + t] * u[t * k + c]).sum::<f64>() * s[c]) as f32;
        }
        for i in 0..inp {
            a[c * inp + i] = (0..k).map(|t| qa[i * k + t] * v[t * k + c]).sum::<f64>() as f32;
        }
    }
    Factors {
        a,
        b,
        r,
        inp,
        out,
        scale: 1.0,
    }
}
