//! Image classifiers from Hugging Face directories (`ViTForImageClassification`,
//! `ResNetForImageClassification`) and their PEFT adapters: LoRA on linear layers and
//! convolutions, and the classification head in `modules_to_save`.
//!
//! ViT checkpoints come in two namings: the Hub's original one
//! (`vit.encoder.layer.N.attention.attention.query`, and without the `vit.` prefix for a bare
//! `ViTModel` such as `google/vit-base-patch16-224-in21k`) and transformers 5's
//! (`vit.layers.N.attention.q_proj`). Both load; adapters are written in transformers 5's naming,
//! which PEFT 0.21 writes.

use crate::error::{IoError, Result};
use crate::hf::{read_json, Fields, Weights};
use crate::peft::{PeftConfig, Targets};
use crate::safetensors::SafetensorsFile;
use lora_core::models::resnet::{ResNet, ResNetConfig};
use lora_core::models::vision::{head_init, head_init_uniform};
use lora_core::models::vit::{legacy_name, Activation, Vit, VitConfig};
use lora_core::models::yolos::{Yolos, YolosConfig};
use lora_core::models::{ImageClassifier, VisionModel};
use lora_core::Tensor;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// A vision architecture's configuration.
#[derive(Clone, Debug, PartialEq)]
pub enum VisionArch {
    /// `vit`
    Vit(VitConfig),
    /// `resnet`
    ResNet(ResNetConfig),
    /// `yolos` (an object detector)
    Yolos(YolosConfig),
}

/// A vision `config.json`: the architecture and the class names (`id2label`, in id order).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// The architecture.
    pub arch: VisionArch,
    /// Class names by id.
    pub labels: Vec<String>,
    /// `initializer_range` (a new head's standard deviation; ViT).
    pub initializer_range: f32,
}

impl VisionConfig {
    /// The classification head's module path.
    pub fn head_name(&self) -> &'static str {
        match self.arch {
            VisionArch::Vit(_) => "classifier",
            VisionArch::ResNet(_) => "classifier.1",
            VisionArch::Yolos(_) => "class_labels_classifier.layers.2",
        }
    }
    /// The head's input features.
    pub fn head_in(&self) -> usize {
        match &self.arch {
            VisionArch::Vit(c) => c.hidden_size,
            VisionArch::ResNet(c) => c.hidden_sizes.last().copied().unwrap_or(0),
            VisionArch::Yolos(c) => c.hidden_size,
        }
    }
    /// The head's outputs: the classes (and "no object" for a detector).
    pub fn head_rows(&self) -> usize {
        match &self.arch {
            VisionArch::Yolos(_) => self.labels.len() + 1,
            _ => self.labels.len(),
        }
    }
}

/// Whether `model_type` is a vision architecture this crate loads.
pub fn is_vision_model_type(model_type: &str) -> bool {
    matches!(model_type, "vit" | "resnet" | "yolos")
}

/// `image_size`-like fields: an integer or `[height, width]`.
fn pair(f: &Fields, field: &str, default: usize) -> Result<(usize, usize)> {
    match f.get(field) {
        None => Ok((default, default)),
        Some(Value::Array(a)) if a.len() == 2 => {
            let one = |x: &Value| {
                x.as_u64()
                    .filter(|&n| n >= 1 && n <= crate::hf::MAX_SIZE as u64)
                    .map(|n| n as usize)
                    .ok_or_else(|| f.err(field, format!("expected positive sizes, got {x}")))
            };
            Ok((one(&a[0])?, one(&a[1])?))
        }
        Some(_) => {
            let n = f.usize(field)?;
            Ok((n, n))
        }
    }
}

fn sizes(f: &Fields, field: &str, default: &[usize]) -> Result<Vec<usize>> {
    match f.get(field) {
        None => Ok(default.to_vec()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&n| n >= 1 && n <= crate::hf::MAX_SIZE as u64)
                    .map(|n| n as usize)
                    .ok_or_else(|| f.err(field, format!("expected positive sizes, got {x}")))
            })
            .collect(),
        Some(other) => Err(f.err(field, format!("expected a list of sizes, got {other}"))),
    }
}

/// Class names from `id2label` (ids `0..n`, each present once), else `num_labels` (default 2)
/// as transformers names them (`LABEL_i`).
fn labels(f: &Fields) -> Result<Vec<String>> {
    match f.get("id2label") {
        Some(Value::Object(o)) if !o.is_empty() => {
            let mut by_id = BTreeMap::new();
            for (k, v) in o {
                let id: usize =
                    k.parse()
                        .ok()
                        .filter(|&i: &usize| i < o.len())
                        .ok_or_else(|| {
                            f.err(
                                "id2label",
                                format!("key {k:?} is not a class id from 0 to {}", o.len() - 1),
                            )
                        })?;
                let name = v.as_str().ok_or_else(|| {
                    f.err("id2label", format!("class {k}: expected a name, got {v}"))
                })?;
                if by_id.insert(id, name.to_string()).is_some() {
                    return Err(f.err("id2label", format!("class id {id} appears twice")));
                }
            }
            Ok(by_id.into_values().collect())
        }
        Some(Value::Object(_)) | None => {
            let n = f.usize_or("num_labels", Some(2))?;
            if n == 0 || n > 1_000_000 {
                return Err(f.err("num_labels", format!("{n} classes")));
            }
            Ok((0..n).map(|i| format!("LABEL_{i}")).collect())
        }
        Some(other) => Err(f.err("id2label", format!("expected an object, got {other}"))),
    }
}

/// Parses a vision `config.json` value (`path` is only for messages).
pub fn parse_vision_config(path: &Path, v: &Value) -> Result<VisionConfig> {
    let f = Fields { path, v };
    let model_type = f.str_or("model_type", "")?;
    let labels = labels(&f)?;
    let act = |f: &Fields, default: &str| -> Result<Activation> {
        let name = f.str_or("hidden_act", default)?;
        Activation::parse(name).map_err(|e| f.err("hidden_act", e.to_string()))
    };
    let arch = match model_type {
        "vit" => VisionArch::Vit(VitConfig {
            hidden_size: f.usize_or("hidden_size", Some(768))?,
            num_hidden_layers: f.usize_or("num_hidden_layers", Some(12))?,
            num_attention_heads: f.usize_or("num_attention_heads", Some(12))?,
            intermediate_size: f.usize_or("intermediate_size", Some(3072))?,
            hidden_act: act(&f, "gelu")?,
            layer_norm_eps: f.positive_f32_or("layer_norm_eps", 1e-12)?,
            image_size: pair(&f, "image_size", 224)?,
            patch_size: pair(&f, "patch_size", 16)?,
            num_channels: f.usize_or("num_channels", Some(3))?,
            qkv_bias: f.bool_or("qkv_bias", true)?,
            num_labels: labels.len(),
        }),
        "resnet" => {
            let layer_type = f.str_or("layer_type", "bottleneck")?;
            if layer_type != "bottleneck" && layer_type != "basic" {
                return Err(f.err(
                    "layer_type",
                    format!("{layer_type:?} (bottleneck or basic)"),
                ));
            }
            VisionArch::ResNet(ResNetConfig {
                num_channels: f.usize_or("num_channels", Some(3))?,
                embedding_size: f.usize_or("embedding_size", Some(64))?,
                hidden_sizes: sizes(&f, "hidden_sizes", &[256, 512, 1024, 2048])?,
                depths: sizes(&f, "depths", &[3, 4, 6, 3])?,
                bottleneck: layer_type == "bottleneck",
                hidden_act: act(&f, "relu")?,
                downsample_in_first_stage: f.bool_or("downsample_in_first_stage", false)?,
                downsample_in_bottleneck: f.bool_or("downsample_in_bottleneck", false)?,
                num_labels: labels.len(),
            })
        }
        "yolos" => {
            if f.bool_or("auxiliary_loss", false)? {
                return Err(f.err(
                    "auxiliary_loss",
                    "true is not supported (the loss would differ)",
                ));
            }
            let (ih, iw) = match f.get("image_size") {
                None => (512, 864), // YolosConfig's default
                Some(_) => pair(&f, "image_size", 0)?,
            };
            let costs = (
                f.f32_or("class_cost", 1.0)?,
                f.f32_or("bbox_cost", 5.0)?,
                f.f32_or("giou_cost", 2.0)?,
            );
            if costs == (0.0, 0.0, 0.0) {
                return Err(f.err(
                    "class_cost",
                    "the matcher's three costs are all 0 (transformers refuses that too)",
                ));
            }
            VisionArch::Yolos(YolosConfig {
                hidden_size: f.usize_or("hidden_size", Some(768))?,
                num_hidden_layers: f.usize_or("num_hidden_layers", Some(12))?,
                num_attention_heads: f.usize_or("num_attention_heads", Some(12))?,
                intermediate_size: f.usize_or("intermediate_size", Some(3072))?,
                hidden_act: act(&f, "gelu")?,
                layer_norm_eps: f.positive_f32_or("layer_norm_eps", 1e-12)?,
                image_size: (ih, iw),
                patch_size: f.usize_or("patch_size", Some(16))?,
                num_channels: f.usize_or("num_channels", Some(3))?,
                qkv_bias: f.bool_or("qkv_bias", true)?,
                num_detection_tokens: f.usize_or("num_detection_tokens", Some(100))?,
                use_mid_position_embeddings: f.bool_or("use_mid_position_embeddings", true)?,
                num_labels: labels.len(),
                costs,
                bbox_loss_coefficient: f.f32_or("bbox_loss_coefficient", 5.0)?,
                giou_loss_coefficient: f.f32_or("giou_loss_coefficient", 2.0)?,
                eos_coefficient: f.f32_or("eos_coefficient", 0.1)?,
            })
        }
        other => {
            return Err(f.err(
                "model_type",
                format!("{other:?} is not a vision model this build loads (vit, resnet, yolos)"),
            ))
        }
    };
    Ok(VisionConfig {
        arch,
        labels,
        initializer_range: f.positive_f32_or("initializer_range", 0.02)?,
    })
}

/// Checkpoint keys the classification model does not use, as transformers ignores them: the
/// bare `ViTModel`'s pooler, batch norm's step counter.
fn ignorable(key: &str) -> bool {
    key.ends_with(".num_batches_tracked")
        || key.starts_with("vit.pooler.")
        || key.starts_with("pooler.")
        || key.ends_with("embeddings.mask_token")
}

/// What loading found about the head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadSource {
    /// The checkpoint's head, as it is.
    Checkpoint,
    /// The checkpoint has no head (a bare backbone): a new one.
    Missing,
    /// The checkpoint's head has another number of classes: a new one
    /// (`ignore_mismatched_sizes`); the checkpoint's class count.
    Mismatched(usize),
    /// The checkpoint's head has other classes and [`VisionModelDir::keep_known_classes`] is
    /// set: a new head whose rows for classes the checkpoint names (by name; and a detector's
    /// "no object") are the checkpoint's, the others new. `(checkpoint's head rows, rows kept)`.
    Extended(usize, usize),
}

/// A vision model directory.
pub struct VisionModelDir {
    /// The directory.
    pub dir: PathBuf,
    /// Its parsed config.
    pub config: VisionConfig,
    /// The checkpoint's own class names (its `config.json`'s, whatever `set_labels` sets).
    pub checkpoint_labels: Vec<String>,
    /// When the classes differ from the checkpoint's, start the new head from the checkpoint's
    /// rows for the classes it already names instead of all anew (transformers'
    /// `ignore_mismatched_sizes` makes it all new): a detector keeps what it recognised.
    pub keep_known_classes: bool,
}

impl VisionModelDir {
    /// Reads and checks `dir/config.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(IoError::Missing {
                path: cfg_path,
                what: "config.json: is this a Hugging Face model directory?",
            });
        }
        let v = read_json(&cfg_path)?;
        let config = parse_vision_config(&cfg_path, &v)?;
        Ok(Self {
            dir,
            checkpoint_labels: config.labels.clone(),
            config,
            keep_known_classes: false,
        })
    }

    /// Replaces the class names (a dataset's classes): the head is then built for them, anew
    /// when the checkpoint's head has another number of classes.
    pub fn set_labels(&mut self, labels: Vec<String>) {
        let n = labels.len();
        match &mut self.config.arch {
            VisionArch::Vit(c) => c.num_labels = n,
            VisionArch::ResNet(c) => c.num_labels = n,
            VisionArch::Yolos(c) => c.num_labels = n,
        }
        self.config.labels = labels;
    }

    /// Loads the weights and builds the model (all frozen). Every tensor of the checkpoint must
    /// be used (a config with fewer layers than the weights is refused), except the ones
    /// transformers also ignores. A missing head, or one with another number of classes than
    /// the config's labels, is initialised anew from `seed` (transformers' behaviour for a
    /// backbone checkpoint, and its `ignore_mismatched_sizes`); the report says which.
    pub fn load_model(&self, seed: u64) -> Result<(Box<dyn ImageClassifier>, HeadSource)> {
        self.load_with(seed, |cfg, load| {
            Ok(match cfg {
                VisionArch::Vit(c) => Box::new(Vit::load(c, load)?) as Box<dyn ImageClassifier>,
                VisionArch::ResNet(c) => Box::new(ResNet::load(c, load)?),
                VisionArch::Yolos(_) => {
                    return Err(IoError::Config {
                        path: self.dir.join("config.json"),
                        field: "model_type".into(),
                        reason: "yolos is an object detector, not an image classifier".into(),
                    })
                }
            })
        })
    }

    /// Loads a detector (YOLOS) as [`VisionModelDir::load_model`] loads a classifier: the class
    /// head's last layer is new when the classes differ from the checkpoint's.
    pub fn load_detector(&self, seed: u64) -> Result<(Yolos, HeadSource)> {
        self.load_with(seed, |cfg, load| match cfg {
            VisionArch::Yolos(c) => Ok(Yolos::load(c, load)?),
            _ => Err(IoError::Config {
                path: self.dir.join("config.json"),
                field: "model_type".into(),
                reason: "not an object detector (yolos)".into(),
            }),
        })
    }

    /// Builds a model with `build` from a loader that resolves checkpoint names, makes a new
    /// head where the checkpoint's does not fit, and checks that every checkpoint tensor is used.
    fn load_with<T>(
        &self,
        seed: u64,
        build: impl FnOnce(&VisionArch, &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>) -> Result<T>,
    ) -> Result<(T, HeadSource)> {
        let w = Weights::open(&self.dir)?;
        let head = self.config.head_name();
        let (nl, inp) = (self.config.head_rows(), self.config.head_in());
        let head_w = format!("{head}.weight");
        let head_b = format!("{head}.bias");
        let ckpt_head = self.resolve(&w, &head_w);
        let rows = ckpt_head.as_ref().map(|k| {
            w.entries()
                .into_iter()
                .find(|(n, _, _)| n == k)
                .and_then(|(_, _, s)| s.first().copied())
                .unwrap_or(0)
        });
        // With keep_known_classes: new row -> checkpoint row for each class the checkpoint names
        // (and a detector's "no object", last in both), when its rows fit its class names.
        let detector = matches!(self.config.arch, VisionArch::Yolos(_));
        let kept: Vec<(usize, usize)> = match rows {
            Some(r)
                if self.keep_known_classes
                    && r == self.checkpoint_labels.len() + detector as usize =>
            {
                let mut v: Vec<(usize, usize)> = (self.config.labels.iter().enumerate())
                    .filter_map(|(i, l)| {
                        Some((i, self.checkpoint_labels.iter().position(|o| o == l)?))
                    })
                    .collect();
                if detector {
                    v.push((nl - 1, r - 1));
                }
                v
            }
            _ => Vec::new(),
        };
        let same_classes = self.config.labels == self.checkpoint_labels;
        let source = match rows {
            None => HeadSource::Missing,
            Some(r) if r == nl && same_classes => HeadSource::Checkpoint,
            Some(r) if self.keep_known_classes => HeadSource::Extended(r, kept.len()),
            // transformers' semantics: a head of the right shape loads, whatever the names.
            Some(r) if r == nl => HeadSource::Checkpoint,
            Some(r) => HeadSource::Mismatched(r),
        };
        // A new head, made once: initialised as transformers does (ResNet keeps PyTorch's
        // default linear init, ViT and YOLOS draw a truncated normal of `initializer_range`,
        // bias 0), then the kept rows copied from the checkpoint.
        let new_head = match (&source, &ckpt_head) {
            (HeadSource::Checkpoint, _) => None,
            (src, key) => {
                let (mut wv, mut bv) = match self.config.arch {
                    VisionArch::ResNet(_) => head_init_uniform(nl, inp, seed),
                    _ => (
                        head_init(nl, inp, self.config.initializer_range, seed),
                        vec![0.0; nl],
                    ),
                };
                if let (HeadSource::Extended(r, 1..), Some(k)) = (src, key) {
                    let cw = w.tensor(k, &[*r, inp])?.try_to_vec()?;
                    let cb = match self.resolve(&w, &head_b) {
                        Some(b) => Some(w.tensor(&b, &[*r])?.try_to_vec()?),
                        None => None,
                    };
                    for &(i, j) in &kept {
                        wv[i * inp..(i + 1) * inp].copy_from_slice(&cw[j * inp..(j + 1) * inp]);
                        if let Some(cb) = &cb {
                            bv[i] = cb[j];
                        }
                    }
                }
                Some((wv, bv))
            }
        };
        let mut used = HashSet::new();
        let mut load = |k: &str, shape: &[usize]| -> Result<Tensor> {
            if let (Some((wv, bv)), true) = (&new_head, k == head_w || k == head_b) {
                if let Some(key) = self.resolve(&w, k) {
                    used.insert(key);
                }
                let v = if k == head_w { wv.clone() } else { bv.clone() };
                return Tensor::new(v, shape).map_err(Into::into);
            }
            let key = self.resolve(&w, k).unwrap_or_else(|| k.to_string());
            let t = w.tensor(&key, shape)?;
            used.insert(key);
            Ok(t)
        };
        let in_config = |e: IoError| match e {
            IoError::Core(lora_core::CoreError::InvalidConfig { field, reason }) => {
                IoError::Config {
                    path: self.dir.join("config.json"),
                    field: field.into(),
                    reason,
                }
            }
            e => e,
        };
        let model = build(&self.config.arch, &mut load).map_err(in_config)?;
        if let Some(extra) = w
            .names()
            .into_iter()
            .find(|k| !used.contains(*k) && !ignorable(k))
        {
            return Err(IoError::Config {
                path: self.dir.join("config.json"),
                field: "num_hidden_layers / depths / hidden_sizes".into(),
                reason: format!(
                    "the weights hold `{extra}`, which the model this config describes does not \
                     use (a config with fewer layers than its checkpoint?)"
                ),
            });
        }
        Ok((model, source))
    }

    /// The checkpoint key holding the parameter that transformers 5 names `k`: itself, its
    /// original (Hub) name, or either without the `vit.` prefix (a bare `ViTModel`).
    fn resolve(&self, w: &Weights, k: &str) -> Option<String> {
        let mut cands = vec![k.to_string()];
        if let VisionArch::Vit(_) = self.config.arch {
            if let Some(old) = legacy_name(k) {
                cands.push(old);
            }
            let bare: Vec<String> = cands
                .iter()
                .filter_map(|c| c.strip_prefix("vit.").map(str::to_string))
                .collect();
            cands.extend(bare);
        }
        if k == "vit.encoder.mid_position_embeddings" {
            // transformers 5 names it `encoder.interpolation.mid_position_embeddings` in memory.
            cands.push("vit.encoder.interpolation.mid_position_embeddings".into());
        }
        cands.into_iter().find(|c| w.contains(c))
    }
}

/// Whether `modules_to_save` entry `entry` names the head layer `head` (PEFT wraps every module
/// whose path ends with the entry; the head may be inside it, as ResNet's `classifier.1` is
/// inside `classifier`).
fn saves_head(entry: &str, head: &str) -> bool {
    let mut module = head;
    loop {
        // PEFT's test is a plain suffix (`key.endswith(target_key)`): `classifier` names YOLOS's
        // `class_labels_classifier` too.
        if module.ends_with(entry) {
            return true;
        }
        match module.rsplit_once('.') {
            Some((parent, _)) => module = parent,
            None => return false,
        }
    }
}

/// The head layers `modules_to_save` names (indices into `model.heads()`); an entry that names
/// no head is an error (only heads train in full).
fn saved_heads(model: &dyn VisionModel, cfg: &PeftConfig, path: &Path) -> Result<Vec<usize>> {
    let heads: Vec<String> = model.heads().iter().map(|h| h.name.clone()).collect();
    let mut out = Vec::new();
    for m in &cfg.modules_to_save {
        let hit: Vec<usize> = (0..heads.len())
            .filter(|&i| saves_head(m, &heads[i]))
            .collect();
        if hit.is_empty() {
            return Err(IoError::Config {
                path: path.into(),
                field: "modules_to_save".into(),
                reason: format!(
                    "`{m}` is not a head of this model ({}): only heads train in full",
                    heads.join(", ")
                ),
            });
        }
        out.extend(hit);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Whether `cfg` selects `module`, under its own name or (ViT) its original one.
fn selects(cfg: &PeftConfig, module: &str, head: &str) -> Result<bool> {
    if cfg.selects(module, head)? {
        return Ok(true);
    }
    match legacy_name(module) {
        Some(old) => cfg.selects(&old, head),
        None => Ok(false),
    }
}

/// Adds adapters to every linear layer and convolution `cfg` selects (never a head), and makes
/// the heads `modules_to_save` names train in full; returns the adapted paths. A target that
/// selects nothing is an error listing the model's modules.
pub fn inject(model: &mut dyn VisionModel, cfg: &PeftConfig, seed: u64) -> Result<Vec<String>> {
    let head = "";
    let save = saved_heads(model, cfg, Path::new("adapter_config.json"))?;
    let mut chosen = Vec::new();
    let mut i = 0u64;
    for (name, lin) in model.linears_mut() {
        if selects(cfg, &name, head)? {
            lin.inject(&cfg.lora_config_for(&name)?, seed.wrapping_add(i))?;
            chosen.push(name);
        }
        i += 1;
    }
    for (name, conv) in model.convs_mut() {
        if selects(cfg, &name, head)? {
            conv.inject(&cfg.lora_config_for(&name)?, seed.wrapping_add(i))?;
            chosen.push(name);
        }
        i += 1;
    }
    if chosen.is_empty() {
        let mut available: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
        available.extend(model.convs().into_iter().map(|(n, _)| n));
        return Err(IoError::NoTarget {
            target: cfg.target_modules.describe(),
            available: available.join(", "),
        });
    }
    for (i, h) in model.heads_mut().into_iter().enumerate() {
        if save.contains(&i) {
            h.train_in_full()?;
        }
    }
    Ok(chosen)
}

/// The trainable tensors of a model, each with its key in PEFT's adapter file
/// (`base_model.model.<module>.lora_A.weight`, `base_model.model.<head>.weight`): LoRA A and B
/// of each adapted layer in model order, then the trained heads.
pub fn adapter_tensors(model: &dyn VisionModel) -> Vec<(String, &Tensor)> {
    let mut v = Vec::new();
    let key = |name: &str, part: &str| format!("base_model.model.{name}.{part}.weight");
    for (name, lin) in model.linears() {
        if let Some(l) = lin.lora() {
            v.push((key(&name, "lora_A"), &l.lora_a));
            v.push((key(&name, "lora_B"), &l.lora_b));
        }
    }
    for (name, conv) in model.convs() {
        if let Some(l) = conv.lora() {
            v.push((key(&name, "lora_A"), &l.lora_a));
            v.push((key(&name, "lora_B"), &l.lora_b));
        }
    }
    for h in model.heads() {
        if let Some((w, b)) = h.trained_params() {
            v.push((format!("base_model.model.{}.weight", h.name), w));
            if let Some(b) = b {
                v.push((format!("base_model.model.{}.bias", h.name), b));
            }
        }
    }
    v
}

/// The file key holding adapter tensor `key` (transformers 5 naming): itself or, for a ViT
/// adapter written over transformers 4, the original module name.
fn file_key(file: &SafetensorsFile, key: &str) -> Option<String> {
    if file.meta(key).is_some() {
        return Some(key.to_string());
    }
    let inner = key.strip_prefix("base_model.model.")?;
    let old = legacy_name(inner)?;
    let k = format!("base_model.model.{old}");
    file.meta(&k).is_some().then_some(k)
}

/// Loads a PEFT adapter directory into an image classifier: reads the config, injects,
/// checks every tensor's shape against the model before copying, and copies the LoRA weights
/// and the trained head. Every tensor in the file must belong to the adapter (one for another
/// model is refused).
pub fn load_adapter(model: &mut dyn VisionModel, dir: &Path) -> Result<PeftConfig> {
    if !dir.is_dir() {
        return Err(IoError::Missing {
            path: dir.into(),
            what: "adapter directory",
        });
    }
    let cfg = PeftConfig::load(dir)?;
    let st = dir.join("adapter_model.safetensors");
    if !st.exists() {
        return Err(IoError::Missing {
            path: st,
            what: "adapter weights",
        });
    }
    let file = SafetensorsFile::open(&st)?;
    // Shapes first, from the config's ranks and the model's layers, before any allocation.
    let head = "";
    let mut expected: Vec<(String, Vec<usize>)> = Vec::new();
    for (name, lin) in model.linears() {
        if selects(&cfg, &name, head)? {
            let r = cfg.lora_config_for(&name)?.rank;
            let (i, o) = lin.dims();
            expected.push((format!("base_model.model.{name}.lora_A.weight"), vec![r, i]));
            expected.push((format!("base_model.model.{name}.lora_B.weight"), vec![o, r]));
        }
    }
    for (name, conv) in model.convs() {
        if selects(&cfg, &name, head)? {
            let r = cfg.lora_config_for(&name)?.rank;
            let (w, _, p) = conv.base();
            let s = w.shape();
            let g = p.groups.max(1);
            expected.push((
                format!("base_model.model.{name}.lora_A.weight"),
                vec![r, s[1] * g, s[2], s[3]],
            ));
            expected.push((
                format!("base_model.model.{name}.lora_B.weight"),
                vec![s[0], r / g, 1, 1],
            ));
        }
    }
    let save = saved_heads(model, &cfg, &dir.join("adapter_config.json"))?;
    for (i, h) in model.heads().into_iter().enumerate() {
        if save.contains(&i) {
            let (inp, out) = h.dims();
            expected.push((
                format!("base_model.model.{}.weight", h.name),
                vec![out, inp],
            ));
            expected.push((format!("base_model.model.{}.bias", h.name), vec![out]));
        }
    }
    let mut keys = BTreeMap::new();
    for (key, shape) in &expected {
        let fk = file_key(&file, key).ok_or_else(|| IoError::MissingTensor {
            path: st.clone(),
            key: key.clone(),
        })?;
        let got = &file.meta(&fk).map(|m| m.shape.clone()).unwrap_or_default();
        if got != shape {
            return Err(IoError::Config {
                path: st.clone(),
                field: fk,
                reason: format!(
                    "shape {got:?}, but adapter_config.json's rank and the model give {shape:?} \
                     (a head for another number of classes?)"
                ),
            });
        }
        keys.insert(key.clone(), fk);
    }
    inject(model, &cfg, 0)?;
    let mut used = HashSet::new();
    for (key, t) in adapter_tensors(model) {
        let fk = keys
            .get(&key)
            .ok_or(IoError::Core(lora_core::CoreError::Internal(
                "an injected tensor without a checked key",
            )))?;
        let (values, _) = file.read_f32_finite(fk)?;
        t.set_data(values)?;
        used.insert(fk.clone());
    }
    if let Some(extra) = file.names().into_iter().find(|k| !used.contains(*k)) {
        return Err(IoError::Config {
            path: st,
            field: extra.to_string(),
            reason: "tensor does not belong to any adapted module of this model".into(),
        });
    }
    Ok(cfg)
}

/// Writes an image classifier's adapter as PEFT does: `adapter_config.json` (with
/// `modules_to_save` when the head trains) and `adapter_model.safetensors` (LoRA A/B of each
/// adapted layer, the trained head's weight and bias), in transformers 5's module naming. Target
/// names given in the original ViT naming (`query`, `value`) are written as the adapted modules'
/// current names, which PEFT 0.21 matches.
pub fn save_adapter(model: &dyn VisionModel, cfg: &PeftConfig, dir: &Path) -> Result<()> {
    let mut adapted: Vec<String> = model
        .linears()
        .into_iter()
        .filter(|(_, l)| l.lora().is_some())
        .map(|(n, _)| n)
        .collect();
    adapted.extend(
        model
            .convs()
            .into_iter()
            .filter(|(_, c)| c.lora().is_some())
            .map(|(n, _)| n),
    );
    if adapted.is_empty() {
        return Err(IoError::NoTarget {
            target: "(save)".into(),
            available: "the model has no adapters to save".into(),
        });
    }
    let mut out_cfg = cfg.clone();
    let current = adapted
        .iter()
        .map(|n| cfg.selects(n, ""))
        .collect::<Result<Vec<bool>>>()?;
    if current.iter().any(|s| !s) {
        // Targets given in names the model no longer has (ViT's original ones): written so that
        // PEFT selects exactly the adapted modules: their leaf names when those select no other
        // module, else their full paths.
        let mut leaves: Vec<String> = adapted
            .iter()
            .map(|n| n.rsplit('.').next().unwrap_or(n).to_string())
            .collect();
        leaves.sort();
        leaves.dedup();
        let by_leaf = PeftConfig::new(cfg.r, cfg.lora_alpha, &[]);
        let by_leaf = PeftConfig {
            target_modules: Targets::List(leaves.clone()),
            ..by_leaf
        };
        let mut all: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
        all.extend(model.convs().into_iter().map(|(n, _)| n));
        let mut exact = true;
        for n in &all {
            if by_leaf.selects(n, "")? != adapted.contains(n) {
                exact = false;
                break;
            }
        }
        out_cfg.target_modules = Targets::List(if exact { leaves } else { adapted.clone() });
    }
    let trained: Vec<String> = model
        .heads()
        .iter()
        .filter(|h| h.trained.is_some())
        .map(|h| h.name.split('.').next().unwrap_or(&h.name).to_string())
        .collect();
    if trained.is_empty() {
        out_cfg.modules_to_save.clear();
    } else if out_cfg.modules_to_save.is_empty() {
        let mut top = trained;
        top.dedup();
        out_cfg.modules_to_save = top;
    }
    let data = adapter_tensors(model)
        .into_iter()
        .map(|(k, t)| Ok((k, t.shape().to_vec(), t.try_to_vec()?)))
        .collect::<Result<Vec<_>>>()?;
    let json = crate::peft::config_json(&out_cfg, &adapted, false);
    crate::peft::write_adapter(dir, &json, &data)
}
