//! `lora inspect`: what is in a model directory, an adapter directory or a safetensors file.
//! For adapters: rank, alpha and scale per module (after `rank_pattern`/`alpha_pattern`), and the
//! Frobenius norms of A, B and the update `s * B @ A` (computed from the r x r Gram matrices,
//! `||B A||_F^2 = sum((B^T B) * (A A^T))`, without forming the full matrix).

use crate::error::{IoError, Result};
use crate::hf::{ModelDir, Weights};
use crate::peft::PeftConfig;
use crate::safetensors::SafetensorsFile;
use serde::Serialize;
use std::path::Path;

/// One stored tensor.
#[derive(Clone, Debug, Serialize)]
pub struct TensorEntry {
    /// Key.
    pub name: String,
    /// Storage dtype.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// One adapted module.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterModule {
    /// Module path.
    pub module: String,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f32,
    /// Scale `s`.
    pub scale: f32,
    /// `||A||_F`
    pub norm_a: f64,
    /// `||B||_F`
    pub norm_b: f64,
    /// `||s B A||_F` (NaN when A or B holds a non-finite value)
    pub norm_delta: f64,
    /// Values of A and B that are NaN or infinite (a damaged adapter: loading it is refused).
    pub non_finite: usize,
}

/// What `inspect` found.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    /// A Hugging Face model directory.
    Model {
        /// `model_type` and main sizes, as text.
        architecture: String,
        /// Parameters stored.
        params: usize,
        /// Linear modules adapters can target.
        linear_modules: Vec<String>,
        /// Stored tensors.
        tensors: Vec<TensorEntry>,
    },
    /// A PEFT adapter directory.
    Adapter {
        /// `target_modules` as written.
        target_modules: String,
        /// `use_rslora`.
        use_rslora: bool,
        /// Trainable parameters in the file.
        params: usize,
        /// Per module.
        modules: Vec<AdapterModule>,
    },
    /// A Stable Diffusion LoRA file (diffusers/PEFT or kohya).
    SdLora {
        /// `diffusers` or `kohya`.
        format: String,
        /// Parameters in the file's pairs.
        params: usize,
        /// Per block (`unet down_blocks.1`, `text_encoder layers.3`, ...), in order.
        blocks: Vec<SdLoraBlock>,
        /// Per module.
        modules: Vec<SdLoraModuleInfo>,
    },
    /// A bare safetensors file.
    File {
        /// Parameters stored.
        params: usize,
        /// `__metadata__`.
        metadata: std::collections::BTreeMap<String, String>,
        /// Stored tensors.
        tensors: Vec<TensorEntry>,
    },
}

/// A block of an SD LoRA file.
#[derive(Clone, Debug, Serialize)]
pub struct SdLoraBlock {
    /// `unet down_blocks.1`, `unet mid_block`, `text_encoder layers.0`, ...
    pub block: String,
    /// Modules in it.
    pub modules: usize,
    /// Distinct ranks.
    pub ranks: Vec<usize>,
    /// Distinct scales.
    pub scales: Vec<f32>,
    /// The Frobenius norm of the block's updates taken together.
    pub norm_delta: f64,
}

/// A module of an SD LoRA file.
#[derive(Clone, Debug, Serialize)]
pub struct SdLoraModuleInfo {
    /// `unet` or `text_encoder`.
    pub component: String,
    /// The module as the file names it.
    pub module: String,
    /// `linear`, or `conv KxK`.
    pub kind: String,
    /// Rank.
    pub r: usize,
    /// Scale (alpha / r, or as the file's metadata says).
    pub scale: f32,
    /// `|scale * up @ down|_F`.
    pub norm_delta: f64,
}

/// The block a module belongs to: the UNet's `down_blocks.N` / `mid_block` / `up_blocks.N` /
/// top-level layer, the text encoder's `layers.N`; from dotted or kohya's flattened names.
fn sd_block(component: &str, key: &str) -> String {
    let flat = key.replace('.', "_");
    let toks: Vec<&str> = flat.split('_').collect();
    let find = |word: &[&str]| -> Option<String> {
        let i = toks.windows(word.len()).position(|w| w == word)?;
        let n = toks
            .get(i + word.len())
            .filter(|t| t.parse::<usize>().is_ok());
        Some(match n {
            Some(n) => format!("{}.{n}", word.join("_")),
            None => word.join("_"),
        })
    };
    let block = find(&["down", "blocks"])
        .or_else(|| find(&["up", "blocks"]))
        .or_else(|| find(&["mid", "block"]))
        .or_else(|| find(&["layers"]))
        .or_else(|| find(&["time", "embedding"]))
        .unwrap_or_else(|| toks.iter().take(2).copied().collect::<Vec<_>>().join("_"));
    format!("{component} {block}")
}

/// The SD LoRA report of `path`, or `None` when its keys are not an SD LoRA's.
fn inspect_sd_lora(path: &Path, f: &SafetensorsFile) -> Result<Option<Report>> {
    let names = f.names();
    let sd = !names.is_empty()
        && names.iter().all(|k| {
            k.starts_with("lora_unet_")
                || k.starts_with("lora_te")
                || k.starts_with("unet.")
                || k.starts_with("text_encoder")
        });
    if !sd {
        return Ok(None);
    }
    let lora = crate::sd_lora::read_sd_lora(path)?;
    let mut modules = Vec::new();
    let mut params = 0;
    let mut blocks: Vec<SdLoraBlock> = Vec::new();
    let mut sq: Vec<f64> = Vec::new();
    for m in &lora.modules {
        let r = m.rank();
        params += m.parts.values().map(|p| p.0.len()).sum::<usize>();
        let shape = m.natural_shape();
        let norm_delta = match (m.kind, m.part("lora_mid.weight")) {
            // Through the r x r Grams: no update matrix formed.
            (crate::sd_lora::Kind::Lora, None) => {
                let (down, up) = (m.part("lora_down.weight"), m.part("lora_up.weight"));
                let (down, up) = (down.expect("validated"), up.expect("validated"));
                let inner: usize = down.1[1..].iter().product();
                m.scale as f64
                    * delta_norm2(&down.0, &up.0, r, up.1[0], inner)
                        .max(0.0)
                        .sqrt()
            }
            _ => {
                // The other kinds are formed: refused past any real layer's size (SD's largest
                // holds 1280 x 1280 x 9 = 14.7M values) rather than allocated from the file's
                // claim.
                let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if n.is_none_or(|n| n > 1 << 27) {
                    return Err(IoError::Config {
                        path: path.into(),
                        field: m.key.clone(),
                        reason: format!(
                            "its update would be a {shape:?} matrix, larger than any layer"
                        ),
                    });
                }
                let d = m.delta(&shape).map_err(|why| IoError::Config {
                    path: path.into(),
                    field: m.key.clone(),
                    reason: why,
                })?;
                d.iter().map(|v| v * v).sum::<f64>().sqrt()
            }
        };
        let base = match shape.as_slice() {
            [_, _, kh, kw] => format!("conv {kh}x{kw}"),
            _ => "linear".into(),
        };
        let kind = match m.kind {
            crate::sd_lora::Kind::Lora if m.part("lora_mid.weight").is_some() => {
                format!("Tucker {base}")
            }
            crate::sd_lora::Kind::Lora => base,
            // Without a Tucker core a LoHa's kernel dims are flattened into `in`.
            crate::sd_lora::Kind::LoHa if m.part("hada_t1").is_none() => "LoHa".into(),
            crate::sd_lora::Kind::LoHa => format!("LoHa {base}"),
            // A 2-D second factor may hold a convolution's kernel flattened: not labelled.
            crate::sd_lora::Kind::LoKr if shape.len() == 2 => "LoKr".into(),
            crate::sd_lora::Kind::LoKr => format!("LoKr {base}"),
        };
        // DoRA: the norm shown is the update's before the decomposition rescales the weight.
        let kind = if m.peft_magnitude.is_some() {
            format!("{kind} + DoRA (PEFT)")
        } else {
            kind
        };
        let kind = match &m.dora_scale {
            Some((_, s)) if s.first() == Some(&1) && s.len() > 1 && s[1] > 1 => {
                format!("{kind} + DoRA (per input column)")
            }
            Some(_) => format!("{kind} + DoRA"),
            None => kind,
        };
        let component = match m.component {
            crate::sd_lora::Component::Unet => "unet",
            crate::sd_lora::Component::TextEncoder => "text_encoder",
        };
        let block = sd_block(component, &m.key);
        let bi = match blocks.iter().position(|b| b.block == block) {
            Some(i) => i,
            None => {
                blocks.push(SdLoraBlock {
                    block,
                    modules: 0,
                    ranks: Vec::new(),
                    scales: Vec::new(),
                    norm_delta: 0.0,
                });
                sq.push(0.0);
                blocks.len() - 1
            }
        };
        let b = &mut blocks[bi];
        b.modules += 1;
        if !b.ranks.contains(&r) {
            b.ranks.push(r);
        }
        if !b.scales.contains(&m.scale) {
            b.scales.push(m.scale);
        }
        sq[bi] += norm_delta * norm_delta;
        modules.push(SdLoraModuleInfo {
            component: component.into(),
            module: m.key.clone(),
            kind,
            r,
            scale: m.scale,
            norm_delta,
        });
    }
    for (b, s) in blocks.iter_mut().zip(sq) {
        b.norm_delta = s.sqrt();
    }
    Ok(Some(Report::SdLora {
        format: lora.format.into(),
        params,
        blocks,
        modules,
    }))
}

fn gram_rows(m: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    // (rows x rows) = M M^T for M (rows, cols)
    let mut g = vec![0.0f64; rows * rows];
    for i in 0..rows {
        for j in 0..rows {
            g[i * rows + j] = (0..cols)
                .map(|c| m[i * cols + c] as f64 * m[j * cols + c] as f64)
                .sum();
        }
    }
    g
}

fn gram_cols(m: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    // (cols x cols) = M^T M for M (rows, cols)
    let mut g = vec![0.0f64; cols * cols];
    for r in 0..rows {
        for i in 0..cols {
            for j in 0..cols {
                g[i * cols + j] += m[r * cols + i] as f64 * m[r * cols + j] as f64;
            }
        }
    }
    g
}

/// `||B A||_F^2` for A (r, inp), B (out, r), in f64: through the r x r Gram matrices
/// (`trace(A A^T B^T B)`) when r is the small side, else by forming `B A` row by row (a rank
/// past min(out, in) made the Grams r^2 numbers: 80 GB for a rank-100000 file).
fn delta_norm2(a: &[f32], b: &[f32], r: usize, out: usize, inp: usize) -> f64 {
    if r * r <= out * inp {
        let (ga, gb) = (gram_rows(a, r, inp), gram_cols(b, out, r));
        return ga.iter().zip(&gb).map(|(x, y)| x * y).sum();
    }
    let mut row = vec![0.0f64; inp];
    let mut sum = 0.0;
    for o in 0..out {
        row.iter_mut().for_each(|v| *v = 0.0);
        for j in 0..r {
            let bj = b[o * r + j] as f64;
            for (v, &x) in row.iter_mut().zip(&a[j * inp..(j + 1) * inp]) {
                *v += bj * x as f64;
            }
        }
        sum += row.iter().map(|v| v * v).sum::<f64>();
    }
    sum
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// Inspects `path`.
pub fn inspect(path: &Path) -> Result<Report> {
    if path.is_dir() && path.join("adapter_config.json").exists() {
        let cfg = PeftConfig::load(path)?;
        let f = SafetensorsFile::open(path.join("adapter_model.safetensors"))?;
        let mut modules = Vec::new();
        let mut params = 0;
        for key in f.names() {
            let Some(module) = key
                .strip_prefix("base_model.model.")
                .and_then(|k| k.strip_suffix(".lora_A.weight"))
            else {
                continue;
            };
            let (a, ash) = f.read_f32(key)?;
            let bkey = format!("base_model.model.{module}.lora_B.weight");
            let (b, bsh) = f.read_f32(&bkey)?;
            if ash.len() != 2 || bsh.len() != 2 || bsh[1] != ash[0] {
                return Err(IoError::Config {
                    path: f.path().into(),
                    field: bkey,
                    reason: format!("A is {ash:?} and B is {bsh:?}: ranks disagree"),
                });
            }
            let r = ash[0];
            let lc = cfg.lora_config_for(module)?;
            let s = if cfg.use_rslora {
                lc.alpha / (r as f32).sqrt()
            } else {
                lc.alpha / r as f32
            };
            let non_finite = a.iter().chain(&b).filter(|x| !x.is_finite()).count();
            let delta2 = delta_norm2(&a, &b, r, bsh[0], ash[1]);
            params += a.len() + b.len();
            modules.push(AdapterModule {
                module: module.into(),
                r,
                alpha: lc.alpha,
                scale: s,
                norm_a: norm(&a),
                norm_b: norm(&b),
                // `max` would turn a NaN into 0: a damaged adapter must not look like a zero one.
                norm_delta: if delta2.is_nan() {
                    f64::NAN
                } else {
                    s as f64 * delta2.max(0.0).sqrt()
                },
                non_finite,
            });
        }
        let target_modules = match &cfg.target_modules {
            crate::peft::Targets::List(l) => l.join(", "),
            crate::peft::Targets::Regex(r) => format!("regex {r}"),
            crate::peft::Targets::AllLinear => "all-linear".into(),
        };
        return Ok(Report::Adapter {
            target_modules,
            use_rslora: cfg.use_rslora,
            params,
            modules,
        });
    }
    if path.is_dir() {
        let md = ModelDir::open(path)?;
        let w = Weights::open(path)?;
        let tensors: Vec<TensorEntry> = w
            .entries()
            .into_iter()
            .map(|(name, d, shape)| TensorEntry {
                name,
                dtype: format!("{d:?}"),
                shape,
            })
            .collect();
        let params = tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        let architecture = match &md.config {
            crate::hf::ArchConfig::Gpt2(c) => format!("gpt2: {} layers, {} hidden, {} heads, vocab {}", c.n_layer, c.n_embd, c.n_head, c.vocab_size),
            crate::hf::ArchConfig::Llama(c) => format!(
                "llama family: {} layers, {} hidden, {} heads ({} kv), head dim {}, vocab {}, tied head {}",
                c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size, c.tie_word_embeddings
            ),
        };
        let model = md.load_model()?;
        let linear_modules = model.linears().into_iter().map(|(n, _)| n).collect();
        return Ok(Report::Model {
            architecture,
            params,
            linear_modules,
            tensors,
        });
    }
    let f = SafetensorsFile::open(path)?;
    if let Some(rep) = inspect_sd_lora(path, &f)? {
        return Ok(rep);
    }
    let tensors: Vec<TensorEntry> = f
        .names()
        .into_iter()
        .map(|n| {
            let m = f.meta(n).expect("listed");
            TensorEntry {
                name: n.into(),
                dtype: format!("{:?}", m.dtype),
                shape: m.shape.clone(),
            }
        })
        .collect();
    let params = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    Ok(Report::File {
        params,
        metadata: f.metadata.clone().into_iter().collect(),
        tensors,
    })
}
