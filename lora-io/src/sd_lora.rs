//! Stable Diffusion LoRA files as people share them, read and merged into a loaded pipeline:
//!
//! - diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight` (and
//!   `text_encoder.<module>...`; keys without a prefix are the UNet's), the alphas from the
//!   `lora_adapter_metadata` JSON diffusers writes in the header (`unet.lora_alpha`,
//!   `unet.alpha_pattern`, `unet.use_rslora`, ...), else from `<module>.alpha` keys, else
//!   alpha = rank (scale 1, diffusers' convention);
//! - the older diffusers names: `<module>.lora.down.weight` / `lora.up.weight`, and the
//!   attention-processor form `...attn1.processor.to_q_lora.down.weight`;
//! - kohya (`lora_unet_<module with _>`, `lora_te_<module with _>`): `lora_down.weight`,
//!   `lora_up.weight`, `.alpha` with kohya's rule that a missing or zero alpha means alpha =
//!   rank; LoCon's convolution layers (`lora_down` a `(r, in, kh, kw)` convolution, `lora_up`
//!   `(out, r, 1, 1)`). kohya's flattened names are resolved against the model's own module
//!   paths, so `transformer_blocks` or `to_out_0` are never split at the wrong underscore.
//!
//! Each module's update `scale * weight * up @ down` (reshaped to the layer's weight) is added to
//! the frozen weight, so several files with their own weights add up. LyCORIS' other
//! decompositions (LoHa, LoKr, Tucker `lora_mid`) and DoRA magnitudes are refused by key, not
//! ignored.

use crate::error::{IoError, Result};
use crate::safetensors::SafetensorsFile;
use crate::sd::SdPipeline;
use lora_core::models::{Conv, Linear};
use lora_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The model a LoRA module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The UNet.
    Unet,
    /// The (first) text encoder.
    TextEncoder,
}

impl Component {
    fn prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
        }
    }
}

/// How a module is named in the file: a dotted module path (diffusers / PEFT), or kohya's
/// flattened one (resolved against the model).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Name {
    Dotted(String),
    Flat(String),
}

/// One module's low-rank pair.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// Which model.
    pub component: Component,
    /// The file's key stem (for messages).
    pub key: String,
    /// `down` (`A`): `(r, in)` or `(r, in, kh, kw)`.
    pub down: (Vec<f32>, Vec<usize>),
    /// `up` (`B`): `(out, r)` or `(out, r, 1, 1)`.
    pub up: (Vec<f32>, Vec<usize>),
    /// The scale `alpha / r` (`alpha / sqrt(r)` with rsLoRA) this file gives the module.
    pub scale: f32,
    name: Name,
}

impl LoraModule {
    /// The rank.
    pub fn rank(&self) -> usize {
        self.down.1[0]
    }
}

/// A LoRA file read for a Stable Diffusion pipeline.
#[derive(Clone, Debug)]
pub struct SdLora {
    /// The file.
    pub path: PathBuf,
    /// `kohya` or `diffusers` (PEFT and the older names).
    pub format: &'static str,
    /// Its modules, in key order.
    pub modules: Vec<LoraModule>,
}

/// What merging a file did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Modules merged, per component.
    pub merged: BTreeMap<String, usize>,
    /// Modules that matched nothing in the model (with `allow_unmatched`).
    pub unmatched: Vec<String>,
}

const KEY_LIMIT: usize = 5;

fn err(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> IoError {
    IoError::Config {
        path: path.into(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// The (component, module name, part) of a key, or `None` for a key no format here knows.
/// `part` is `down`, `up` or `alpha`.
fn parse_key(key: &str) -> std::result::Result<Option<(Component, Name, &'static str)>, String> {
    // LyCORIS and DoRA parts, refused by name.
    for bad in [
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "hada_t1",
        "hada_t2",
        "lokr_w1",
        "lokr_w2",
        "lokr_t2",
        "lora_mid",
        "dora_scale",
        "lora_magnitude_vector",
    ] {
        if key.contains(bad) {
            return Err(format!(
                "`{key}`: `{bad}` (LyCORIS LoHa/LoKr, Tucker or DoRA) is not supported yet"
            ));
        }
    }
    let kohya = [
        ("lora_unet_", Component::Unet),
        ("lora_te_", Component::TextEncoder),
    ];
    for (p, comp) in kohya {
        if let Some(rest) = key.strip_prefix(p) {
            for (suffix, part) in [
                (".lora_down.weight", "down"),
                (".lora_up.weight", "up"),
                (".alpha", "alpha"),
            ] {
                if let Some(stem) = rest.strip_suffix(suffix) {
                    return Ok(Some((comp, Name::Flat(stem.to_string()), part)));
                }
            }
            return Ok(None);
        }
    }
    for p in ["lora_te1_", "lora_te2_"] {
        if key.starts_with(p) {
            return Err(format!(
                "`{key}`: SDXL's second text encoder (`{p}`) is not supported yet"
            ));
        }
    }
    let (comp, rest) = if let Some(r) = key.strip_prefix("unet.") {
        (Component::Unet, r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (Component::TextEncoder, r)
    } else if key.starts_with("text_encoder_2.") {
        return Err(format!(
            "`{key}`: SDXL's second text encoder is not supported yet"
        ));
    } else {
        (Component::Unet, key)
    };
    for (suffix, part) in [
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
        (".lora_linear_layer.down.weight", "down"),
        (".lora_linear_layer.up.weight", "up"),
        (".alpha", "alpha"),
    ] {
        if let Some(stem) = rest.strip_suffix(suffix) {
            return Ok(Some((comp, Name::Dotted(processor_name(stem)), part)));
        }
    }
    Ok(None)
}

/// diffusers' attention-processor form (`attn1.processor.to_q_lora`) as the module path
/// (`attn1.to_q`).
fn processor_name(stem: &str) -> String {
    let Some((head, tail)) = stem.split_once(".processor.") else {
        return stem.to_string();
    };
    let module = match tail {
        "to_q_lora" => "to_q",
        "to_k_lora" => "to_k",
        "to_v_lora" => "to_v",
        "to_out_lora" => "to_out.0",
        other => other,
    };
    format!("{head}.{module}")
}

/// diffusers' `lora_adapter_metadata`: per component, `lora_alpha`, `alpha_pattern`,
/// `use_rslora`.
struct AlphaRules {
    alpha: Option<f32>,
    pattern: Vec<(String, f32)>,
    rslora: bool,
}

fn alpha_rules(path: &Path, meta: &HashMap<String, String>, comp: Component) -> Result<AlphaRules> {
    let mut rules = AlphaRules {
        alpha: None,
        pattern: Vec::new(),
        rslora: false,
    };
    let Some(text) = meta.get("lora_adapter_metadata") else {
        return Ok(rules);
    };
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| err(path, "lora_adapter_metadata", format!("not JSON: {e}")))?;
    let p = comp.prefix();
    let field = |k: &str| v.get(format!("{p}.{k}")).filter(|x| !x.is_null());
    if let Some(a) = field("lora_alpha") {
        let a = a
            .as_f64()
            .ok_or_else(|| err(path, format!("{p}.lora_alpha"), "expected a number"))?;
        rules.alpha = Some(a as f32);
    }
    if let Some(pat) = field("alpha_pattern") {
        let obj = pat
            .as_object()
            .ok_or_else(|| err(path, format!("{p}.alpha_pattern"), "expected an object"))?;
        for (k, a) in obj {
            let a = a
                .as_f64()
                .ok_or_else(|| err(path, format!("{p}.alpha_pattern.{k}"), "expected a number"))?;
            rules.pattern.push((k.clone(), a as f32));
        }
    }
    if let Some(r) = field("use_rslora") {
        rules.rslora = r.as_bool().unwrap_or(false);
    }
    if field("use_dora").and_then(|d| d.as_bool()) == Some(true) {
        return Err(err(
            path,
            format!("{p}.use_dora"),
            "DoRA is not supported yet",
        ));
    }
    if field("lora_bias").and_then(|d| d.as_bool()) == Some(true) {
        return Err(err(
            path,
            format!("{p}.lora_bias"),
            "LoRA biases are not supported yet",
        ));
    }
    Ok(rules)
}

/// PEFT's pattern match: `key` matches a module path ending in it at a dot boundary.
fn pattern_matches(key: &str, module: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
}

/// Reads `path`. Every tensor key must belong to a known format; up/down pairs must be complete
/// and of matching ranks.
pub fn read_sd_lora(path: &Path) -> Result<SdLora> {
    let f = SafetensorsFile::open(path)?;
    type Parts = (Option<String>, Option<String>, Option<String>);
    let mut groups: BTreeMap<(Component, Name), Parts> = BTreeMap::new();
    let mut kohya = false;
    for key in f.names() {
        let (comp, name, part) = match parse_key(key) {
            Ok(Some(x)) => x,
            Ok(None) => {
                return Err(err(
                    path,
                    key,
                    "not a LoRA key this reader knows (diffusers/PEFT `lora_A`/`lora_B`, \
                     `lora.down`/`lora.up`, or kohya `lora_unet_`/`lora_te_` with \
                     `lora_down`/`lora_up`/`alpha`)",
                ))
            }
            Err(reason) => return Err(err(path, key, reason)),
        };
        kohya |= matches!(name, Name::Flat(_));
        let g = groups.entry((comp, name)).or_default();
        let slot = match part {
            "down" => &mut g.0,
            "up" => &mut g.1,
            _ => &mut g.2,
        };
        *slot = Some(key.to_string());
    }
    let rules = [
        alpha_rules(path, &f.metadata, Component::Unet)?,
        alpha_rules(path, &f.metadata, Component::TextEncoder)?,
    ];
    let mut modules = Vec::new();
    for ((comp, name), (down, up, alpha)) in groups {
        let stem = match &name {
            Name::Dotted(s) | Name::Flat(s) => s.clone(),
        };
        let (Some(dk), Some(uk)) = (down, up) else {
            return Err(err(
                path,
                stem,
                "a LoRA module needs both its down (A) and up (B) weights",
            ));
        };
        let down = f.read_f32_finite(&dk)?;
        let up = f.read_f32_finite(&uk)?;
        let r = *down.1.first().unwrap_or(&0);
        let ok = r > 0
            && (down.1.len() == 2 || down.1.len() == 4)
            && up.1.len() == down.1.len()
            && up.1[1] == r
            && up.1[2..].iter().all(|&d| d == 1);
        if !ok {
            return Err(err(
                path,
                stem,
                format!(
                    "down {:?} and up {:?} are not a low-rank pair ((r, in[, kh, kw]) and \
                     (out, r[, 1, 1]))",
                    down.1, up.1
                ),
            ));
        }
        let file_alpha = match alpha {
            Some(k) => {
                let (v, _) = f.read_f32_finite(&k)?;
                if v.len() != 1 {
                    return Err(err(path, k, "an alpha is one number"));
                }
                Some(v[0])
            }
            None => None,
        };
        let rule = &rules[(comp == Component::TextEncoder) as usize];
        let rf = r as f32;
        let scale = if matches!(name, Name::Flat(_)) {
            // kohya: a missing or zero alpha means alpha = rank.
            match file_alpha {
                Some(a) if a != 0.0 => a / rf,
                _ => 1.0,
            }
        } else {
            let patterned = rule
                .pattern
                .iter()
                .find(|(k, _)| pattern_matches(k, &stem))
                .map(|p| p.1);
            let alpha = patterned.or(rule.alpha).or(file_alpha).unwrap_or(rf);
            if rule.rslora {
                alpha / rf.sqrt()
            } else {
                alpha / rf
            }
        };
        modules.push(LoraModule {
            component: comp,
            key: stem,
            down,
            up,
            scale,
            name,
        });
    }
    if modules.is_empty() {
        return Err(err(path, "tensors", "no LoRA modules in the file"));
    }
    Ok(SdLora {
        path: path.to_path_buf(),
        format: if kohya { "kohya" } else { "diffusers" },
        modules,
    })
}

/// A layer a LoRA can merge into.
enum Layer<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv),
}

impl Layer<'_> {
    fn weight(&self) -> &Tensor {
        match self {
            Layer::Linear(l) => l.base().0,
            Layer::Conv(c) => c.base().0,
        }
    }
}

/// Adds `weight *` each module's update to the pipeline's frozen weights. Modules that match no
/// layer are an error listing a few (or, with `allow_unmatched`, counted in the report).
pub fn merge_sd_lora(
    pipe: &mut SdPipeline,
    lora: &SdLora,
    weight: f32,
    allow_unmatched: bool,
) -> Result<MergeReport> {
    if !weight.is_finite() {
        return Err(err(
            &lora.path,
            "weight",
            format!("{weight} is not a number"),
        ));
    }
    let mut layers: HashMap<(Component, String), Layer> = HashMap::new();
    let mut flat: HashMap<(Component, String), String> = HashMap::new();
    let unet = &mut pipe.unet;
    let (lin, conv) = unet_layers(unet);
    for (n, l) in lin {
        flat.insert((Component::Unet, n.replace('.', "_")), n.clone());
        layers.insert((Component::Unet, n), Layer::Linear(l));
    }
    for (n, c) in conv {
        flat.insert((Component::Unet, n.replace('.', "_")), n.clone());
        layers.insert((Component::Unet, n), Layer::Conv(c));
    }
    for (n, l) in pipe.text_encoder.linears_mut() {
        flat.insert((Component::TextEncoder, n.replace('.', "_")), n.clone());
        layers.insert((Component::TextEncoder, n), Layer::Linear(l));
    }
    let mut report = MergeReport::default();
    // Resolve every module first: nothing is merged when a file does not fit.
    let mut plan = Vec::new();
    for m in &lora.modules {
        let target = match &m.name {
            // transformers 5 saves CLIP without the `text_model.` of the Hub's checkpoints.
            Name::Dotted(d) if m.component == Component::TextEncoder => {
                [d.clone(), format!("text_model.{d}")]
                    .into_iter()
                    .find(|c| layers.contains_key(&(m.component, c.clone())))
            }
            Name::Dotted(d) => Some(d.clone()),
            Name::Flat(f) => flat.get(&(m.component, f.clone())).cloned(),
        };
        match target.filter(|t| layers.contains_key(&(m.component, t.clone()))) {
            Some(t) => plan.push((m, t)),
            None => report
                .unmatched
                .push(format!("{}.{}", m.component.prefix(), m.key)),
        }
    }
    if !report.unmatched.is_empty() && !allow_unmatched {
        let shown: Vec<&str> = report
            .unmatched
            .iter()
            .take(KEY_LIMIT)
            .map(String::as_str)
            .collect();
        return Err(err(
            &lora.path,
            "modules",
            format!(
                "{} of {} LoRA modules match no layer of this pipeline ({}{}); pass \
                 --allow-unmatched to merge the rest",
                report.unmatched.len(),
                lora.modules.len(),
                shown.join(", "),
                if report.unmatched.len() > KEY_LIMIT {
                    ", ..."
                } else {
                    ""
                }
            ),
        ));
    }
    for (m, t) in &plan {
        let layer = &layers[&(m.component, t.clone())];
        let shape = layer.weight().shape().to_vec();
        let out = m.up.1[0];
        let inner: usize = m.down.1[1..].iter().product();
        if shape.iter().product::<usize>() != out * inner || shape[0] != out {
            return Err(err(
                &lora.path,
                &m.key,
                format!(
                    "up {:?} x down {:?} does not fit the layer `{t}` of shape {shape:?}",
                    m.up.1, m.down.1
                ),
            ));
        }
    }
    for (m, t) in plan {
        let layer = layers
            .get_mut(&(m.component, t.clone()))
            .expect("resolved above");
        let w = layer.weight();
        let shape = w.shape().to_vec();
        let mut data = w.try_to_vec()?;
        let (out, r) = (m.up.1[0], m.rank());
        let inner: usize = m.down.1[1..].iter().product();
        let s = m.scale * weight;
        // data[o, i] += s * sum_k up[o, k] down[k, i], in f64 per element.
        for o in 0..out {
            let up_row = &m.up.0[o * r..(o + 1) * r];
            for i in 0..inner {
                let mut acc = 0.0f64;
                for (k, &u) in up_row.iter().enumerate() {
                    acc += u as f64 * m.down.0[k * inner + i] as f64;
                }
                data[o * inner + i] += (s as f64 * acc) as f32;
            }
        }
        let merged = Tensor::new(data, &shape)?;
        match layer {
            Layer::Linear(l) => {
                let (_, layout, bias) = l.base();
                if l.lora().is_some() {
                    return Err(err(&lora.path, t, "the layer carries a trainable adapter"));
                }
                let bias = bias.cloned();
                **l = Linear::frozen(merged, layout, bias);
            }
            Layer::Conv(c) => {
                let (_, bias, params) = c.base();
                if c.lora().is_some() {
                    return Err(err(&lora.path, t, "the layer carries a trainable adapter"));
                }
                let bias = bias.cloned();
                **c = Conv::frozen(merged, bias, params);
            }
        }
        *report
            .merged
            .entry(m.component.prefix().to_string())
            .or_default() += 1;
    }
    Ok(report)
}

fn unet_layers(
    unet: &mut lora_core::models::unet::UNet2DCondition,
) -> lora_core::models::unet::LayersMut<'_> {
    unet.layers_mut()
}

/// Parses `FILE[:WEIGHT]` (the weight after the last `:`, when it is a number).
pub fn parse_lora_arg(s: &str) -> (PathBuf, f32) {
    if let Some((f, w)) = s.rsplit_once(':') {
        if let Ok(w) = w.parse::<f32>() {
            return (PathBuf::from(f), w);
        }
    }
    (PathBuf::from(s), 1.0)
}
