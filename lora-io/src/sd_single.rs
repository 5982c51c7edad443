//! Single-file Stable Diffusion checkpoints: one `.safetensors` holding the UNet under
//! `model.diffusion_model.`, the VAE under `first_stage_model.` (or `vae.`) and the text encoder
//! under `cond_stage_model.transformer.` (SD 1.x's CLIP, transformers' names) or
//! `cond_stage_model.model.` (SD 2.x's OpenCLIP: fused `in_proj` attention, `ln_1`, `c_fc`, ...),
//! with the original latent-diffusion names — the layout most shared checkpoints come in.
//!
//! Each diffusers parameter the models ask for is located in the file by [`SingleFile::locate`]
//! (the mapping diffusers' `from_single_file` applies, computed per name; the write-back of
//! `lora merge` uses the same function) and read in place: 16-bit weights stay 16-bit, OpenCLIP's
//! q/k/v are row ranges of `in_proj_weight`, the VAE's 1x1-convolution attention weights are read
//! as linear weights.
//!
//! The configurations come from a diffusers directory of the same family when one is given (as
//! diffusers' `config=`), or are inferred from the tensors' shapes for SD 1.x (CLIP ViT-L,
//! 8 heads per block, epsilon) and SD 2.x (OpenCLIP ViT-H, 64-wide heads, v-prediction, as
//! diffusers assumes for a `v2` file); the tokenizer then comes from the Hugging Face cache.

use crate::diffusion::{clip_text_config, unet_config, vae_config};
use crate::error::{IoError, Result};
use crate::safetensors::SafetensorsFile;
use lora_core::models::clip_text::{ClipTextConfig, ClipTextModel};
use lora_core::models::unet::{BlockKind, UNet2DCondition, UNetConfig};
use lora_core::models::vae::{AutoencoderKl, VaeConfig};
use lora_core::Tensor;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The UNet's prefix.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// The VAE's prefixes (`vae.` in some re-saved files).
const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
/// SD 1.x's CLIP text encoder (transformers' names after it).
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// SD 2.x's OpenCLIP text encoder.
const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// A model of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// The UNet.
    Unet,
    /// The VAE.
    Vae,
    /// The text encoder.
    TextEncoder,
}

/// The Stable Diffusion generation a file's shapes say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: CLIP ViT-L/14 text states (768 wide).
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H/14 text states (1024 wide).
    Sd2,
}

/// How the text encoder is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Text {
    /// transformers' CLIP names under `cond_stage_model.transformer.`, with (`true`) or without
    /// their `text_model.` level.
    Clip(bool),
    /// OpenCLIP's names under `cond_stage_model.model.`.
    OpenClip,
}

/// Where a diffusers parameter is stored: a tensor of the file, from element `start` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The file's key.
    pub key: String,
    /// The first element (row-major) of the parameter inside that tensor (OpenCLIP's k and v
    /// are row ranges of `in_proj_weight`; everything else starts at 0).
    pub start: usize,
}

/// Where a single file keeps its models: which text-encoder naming and VAE prefix it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyLayout {
    text: Text,
    vae_prefix: &'static str,
}

/// An open single-file checkpoint.
pub struct SingleFile {
    /// The file.
    pub path: PathBuf,
    /// Its tensors.
    pub file: SafetensorsFile,
    /// Its layout.
    pub layout: KeyLayout,
}

/// Every tensor's shape, by key.
pub type Shapes = std::collections::HashMap<String, Vec<usize>>;

/// The models' configurations for a single file.
#[derive(Clone, Debug)]
pub struct Configs {
    /// The UNet's.
    pub unet: UNetConfig,
    /// The VAE's.
    pub vae: VaeConfig,
    /// The text encoder's.
    pub text: ClipTextConfig,
    /// `scheduler_config.json`'s content.
    pub scheduler: Value,
    /// The family, when inferred from the shapes (`None` when read from a directory).
    pub family: Option<Family>,
}

fn bad(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> IoError {
    IoError::Config {
        path: path.into(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// A ResNet block's diffusers parameter -> LDM (`norm1` -> `in_layers.0`, ...).
fn unet_resnet(rest: &str) -> Option<String> {
    const MAP: [(&str, &str); 6] = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("time_emb_proj.", "emb_layers.1."),
        ("conv_shortcut.", "skip_connection."),
    ];
    MAP.iter()
        .find_map(|(d, l)| rest.strip_prefix(d).map(|r| format!("{l}{r}")))
}

/// A UNet parameter's LDM name (without [`UNET_PREFIX`]), for SD 1.x/2.x UNets (one
/// `layers_per_block` for all blocks, as the LDM layout has).
pub fn unet_ldm_name(name: &str, cfg: &UNetConfig) -> Option<String> {
    for (d, l) in [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ] {
        if let Some(leaf) = name.strip_prefix(d) {
            return Some(format!("{l}{leaf}"));
        }
    }
    let per = cfg.layers_per_block.first()? + 1;
    let num = |s: &str| s.parse::<usize>().ok();
    let p: Vec<&str> = name.splitn(5, '.').collect();
    match p.as_slice() {
        ["down_blocks", b, "downsamplers", "0", rest] => Some(format!(
            "input_blocks.{}.0.op.{}",
            1 + num(b)? * per + per - 1,
            rest.strip_prefix("conv.")?
        )),
        ["down_blocks", b, kind, j, rest] => {
            let i = 1 + num(b)? * per + num(j)?;
            match *kind {
                "resnets" => Some(format!("input_blocks.{i}.0.{}", unet_resnet(rest)?)),
                "attentions" => Some(format!("input_blocks.{i}.1.{rest}")),
                _ => None,
            }
        }
        ["up_blocks", b, "upsamplers", "0", rest] => {
            let b = num(b)?;
            let at = if *cfg.up_blocks.get(b)? == BlockKind::CrossAttn {
                2
            } else {
                1
            };
            Some(format!(
                "output_blocks.{}.{at}.conv.{}",
                b * per + per - 1,
                rest.strip_prefix("conv.")?
            ))
        }
        ["up_blocks", b, kind, j, rest] => {
            let i = num(b)? * per + num(j)?;
            match *kind {
                "resnets" => Some(format!("output_blocks.{i}.0.{}", unet_resnet(rest)?)),
                "attentions" => Some(format!("output_blocks.{i}.1.{rest}")),
                _ => None,
            }
        }
        _ => {
            let p: Vec<&str> = name.splitn(4, '.').collect();
            match p.as_slice() {
                ["mid_block", "resnets", k, rest] => Some(format!(
                    "middle_block.{}.{}",
                    2 * num(k)?,
                    unet_resnet(rest)?
                )),
                ["mid_block", "attentions", "0", rest] => Some(format!("middle_block.1.{rest}")),
                _ => None,
            }
        }
    }
}

/// A VAE parameter's LDM name (without its prefix); `blocks` = `block_out_channels.len()` (the
/// decoder's blocks are numbered the other way round).
pub fn vae_ldm_name(name: &str, blocks: usize) -> Option<String> {
    let (side, rest) = name.split_once('.')?;
    if matches!(side, "quant_conv" | "post_quant_conv") {
        return Some(name.to_string());
    }
    if !matches!(side, "encoder" | "decoder") {
        return None;
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return Some(name.to_string());
    }
    if let Some(leaf) = rest.strip_prefix("conv_norm_out.") {
        return Some(format!("{side}.norm_out.{leaf}"));
    }
    let num = |s: &str| s.parse::<usize>().ok();
    let shortcut = |r: &str| r.replacen("conv_shortcut.", "nin_shortcut.", 1);
    let m: Vec<&str> = rest.splitn(4, '.').collect();
    match m.as_slice() {
        ["mid_block", "resnets", k, r] => {
            return Some(format!("{side}.mid.block_{}.{r}", num(k)? + 1));
        }
        ["mid_block", "attentions", "0", r] => {
            let (part, leaf) = r.rsplit_once('.')?;
            let ldm = match part {
                "group_norm" => "norm",
                "to_q" => "q",
                "to_k" => "k",
                "to_v" => "v",
                "to_out.0" => "proj_out",
                _ => return None,
            };
            return Some(format!("{side}.mid.attn_1.{ldm}.{leaf}"));
        }
        _ => {}
    }
    let p: Vec<&str> = rest.splitn(5, '.').collect();
    match (side, p.as_slice()) {
        ("encoder", ["down_blocks", i, "downsamplers", "0", r]) => Some(format!(
            "encoder.down.{i}.downsample.conv.{}",
            r.strip_prefix("conv.")?
        )),
        ("encoder", ["down_blocks", i, "resnets", j, r]) => {
            Some(format!("encoder.down.{i}.block.{j}.{}", shortcut(r)))
        }
        ("decoder", ["up_blocks", i, "upsamplers", "0", r]) => Some(format!(
            "decoder.up.{}.upsample.conv.{}",
            blocks.checked_sub(1 + num(i)?)?,
            r.strip_prefix("conv.")?
        )),
        ("decoder", ["up_blocks", i, "resnets", j, r]) => Some(format!(
            "decoder.up.{}.block.{j}.{}",
            blocks.checked_sub(1 + num(i)?)?,
            shortcut(r)
        )),
        _ => None,
    }
}

/// A CLIP text-encoder parameter (transformers' name, `text_model.…`) in OpenCLIP's layout
/// (without its prefix): the key, and which third of a fused `in_proj` tensor it is (q, k, v).
pub fn open_clip_name(name: &str) -> Option<(String, Option<usize>)> {
    let rest = name.strip_prefix("text_model.")?;
    let plain = |s: &str| Some((s.to_string(), None));
    match rest {
        "embeddings.token_embedding.weight" => return plain("token_embedding.weight"),
        "embeddings.position_embedding.weight" => return plain("positional_embedding"),
        "final_layer_norm.weight" => return plain("ln_final.weight"),
        "final_layer_norm.bias" => return plain("ln_final.bias"),
        _ => {}
    }
    let rest = rest.strip_prefix("encoder.layers.")?;
    let (i, part) = rest.split_once('.')?;
    i.parse::<usize>().ok()?;
    let (module, leaf) = part.rsplit_once('.')?;
    let block = format!("transformer.resblocks.{i}.");
    for (third, q) in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        .iter()
        .enumerate()
    {
        if module == *q {
            let fused = match leaf {
                "weight" => "attn.in_proj_weight",
                "bias" => "attn.in_proj_bias",
                _ => return None,
            };
            return Some((format!("{block}{fused}"), Some(third)));
        }
    }
    let ldm = match module {
        "self_attn.out_proj" => "attn.out_proj",
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        _ => return None,
    };
    Some((format!("{block}{ldm}.{leaf}"), None))
}

impl KeyLayout {
    /// Finds the three models' prefixes among `names` (the keys of the file `path`); a file
    /// without them (a LoRA, a UNet alone, SDXL's two text encoders) is an error saying what it
    /// lacks.
    pub fn detect(path: &Path, names: &[&str]) -> Result<Self> {
        let has = |prefix: &str| names.iter().any(|k| k.starts_with(prefix));
        if has("conditioner.embedders.") {
            return Err(bad(
                path,
                "conditioner.embedders",
                "an SDXL checkpoint (two text encoders): SDXL is not supported yet; SD 1.x and \
                 2.x are",
            ));
        }
        if !has(UNET_PREFIX) {
            return Err(bad(
                path,
                UNET_PREFIX,
                "no UNet tensors: not a single-file Stable Diffusion checkpoint (a diffusers \
                 pipeline is a directory with model_index.json)",
            ));
        }
        let vae_prefix = VAE_PREFIXES
            .into_iter()
            .find(|p| has(&format!("{p}decoder.")))
            .ok_or_else(|| {
                bad(
                    path,
                    "first_stage_model",
                    "no VAE tensors (first_stage_model.*): a UNet-only file cannot generate \
                     images",
                )
            })?;
        let text = if has(&format!("{CLIP_PREFIX}text_model.")) {
            Text::Clip(true)
        } else if has(&format!("{CLIP_PREFIX}encoder.")) {
            Text::Clip(false)
        } else if has(OPEN_CLIP_PREFIX) {
            Text::OpenClip
        } else {
            return Err(bad(
                path,
                "cond_stage_model",
                "no text encoder tensors (cond_stage_model.transformer.* or \
                 cond_stage_model.model.*)",
            ));
        };
        Ok(Self { text, vae_prefix })
    }

    /// Whether `key` belongs to one of the three models.
    fn modelled(&self, key: &str) -> bool {
        key.starts_with(UNET_PREFIX)
            || key.starts_with(self.vae_prefix)
            || key.starts_with("cond_stage_model.")
    }

    /// Whether `key` is a tensor of the models the pipelines do not use (the text projection,
    /// `logit_scale`, `position_ids`, and OpenCLIP's last block, which SD 2.x skips by taking
    /// the penultimate states; `text_layers` = the text encoder's layers).
    pub fn ignorable(&self, key: &str, text_layers: usize) -> bool {
        key.ends_with("position_ids")
            || key.ends_with("text_projection")
            || key.ends_with("text_projection.weight")
            || key.ends_with("logit_scale")
            || key.ends_with("attn_mask")
            || (self.text == Text::OpenClip
                && key.starts_with(&format!(
                    "{OPEN_CLIP_PREFIX}transformer.resblocks.{text_layers}."
                )))
    }

    /// Where the diffusers parameter `name` of `part` is stored, or `None` when this layout has
    /// no place for it.
    pub fn locate(&self, part: Part, name: &str, cfg: &Configs) -> Option<Stored> {
        let whole = |key: String| Stored { key, start: 0 };
        match part {
            Part::Unet => {
                unet_ldm_name(name, &cfg.unet).map(|k| whole(format!("{UNET_PREFIX}{k}")))
            }
            Part::Vae => vae_ldm_name(name, cfg.vae.block_out_channels.len())
                .map(|k| whole(format!("{}{k}", self.vae_prefix))),
            Part::TextEncoder => match self.text {
                Text::Clip(true) => Some(whole(format!("{CLIP_PREFIX}{name}"))),
                Text::Clip(false) => name
                    .strip_prefix("text_model.")
                    .map(|n| whole(format!("{CLIP_PREFIX}{n}"))),
                Text::OpenClip => {
                    let (key, third) = open_clip_name(name)?;
                    let h = cfg.text.hidden_size;
                    let per = if key.ends_with("in_proj_weight") {
                        h * h
                    } else {
                        h
                    };
                    Some(Stored {
                        key: format!("{OPEN_CLIP_PREFIX}{key}"),
                        start: third.unwrap_or(0) * per,
                    })
                }
            },
        }
    }

    /// [`locate`](Self::locate), checked against the stored shape `stored(key)`: it must be
    /// `shape`, `shape` with trailing unit dimensions (1x1 convolutions read as linears), or,
    /// for a fused tensor, three of it stacked. `path` names the file in errors.
    pub fn find(
        &self,
        path: &Path,
        part: Part,
        name: &str,
        shape: &[usize],
        cfg: &Configs,
        stored: impl Fn(&str) -> Option<Vec<usize>>,
    ) -> Result<Stored> {
        let s = self.locate(part, name, cfg).ok_or_else(|| {
            bad(
                path,
                name,
                "the model has this parameter but the single-file layout has no place for it",
            )
        })?;
        let got = stored(&s.key).ok_or_else(|| IoError::MissingTensor {
            path: path.into(),
            key: s.key.clone(),
        })?;
        let fits = got == shape
            || (got.len() > shape.len()
                && got[..shape.len()] == *shape
                && got[shape.len()..].iter().all(|&d| d == 1))
            || (s.key.contains(".in_proj_")
                && !shape.is_empty()
                && got.len() == shape.len()
                && got[0] == 3 * shape[0]
                && got[1..] == shape[1..]);
        if !fits {
            return Err(IoError::TensorShape {
                path: path.into(),
                key: s.key,
                got,
                expected: shape.to_vec(),
            });
        }
        Ok(s)
    }
}

impl SingleFile {
    /// Opens `path` and finds its models (see [`KeyLayout::detect`]).
    pub fn open(path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let layout = KeyLayout::detect(path, &file.names())?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            layout,
        })
    }

    /// Every tensor's shape.
    pub fn shapes(&self) -> Shapes {
        self.file
            .names()
            .into_iter()
            .filter_map(|k| self.file.meta(k).map(|m| (k.to_string(), m.shape.clone())))
            .collect()
    }

    /// Reads the parameter `name` of `part` with the shape the model expects (see
    /// [`KeyLayout::find`]).
    fn read(
        &self,
        part: Part,
        name: &str,
        shape: &[usize],
        cfg: &Configs,
    ) -> Result<(Tensor, String)> {
        let s = self.layout.find(&self.path, part, name, shape, cfg, |k| {
            self.file.meta(k).map(|m| m.shape.clone())
        })?;
        Ok((self.file.tensor_slice(&s.key, s.start, shape)?, s.key))
    }

    /// Loads the three models with `cfg`. Every tensor under the models' prefixes must be used,
    /// except what the pipelines leave unused (the text projection, `logit_scale`,
    /// `position_ids`, and OpenCLIP's last block, which SD 2.x skips by taking the penultimate
    /// states); tensors outside them (EMA copies, training buffers) are ignored.
    pub fn load(&self, cfg: &Configs) -> Result<(ClipTextModel, UNet2DCondition, AutoencoderKl)> {
        let mut used: HashSet<String> = HashSet::new();
        let cfg_err = |e: IoError| match e {
            IoError::Core(lora_core::CoreError::InvalidConfig { field, reason }) => {
                bad(&self.path, field, reason)
            }
            e => e,
        };
        let text = {
            let mut load = |k: &str, shape: &[usize]| -> Result<Tensor> {
                let (t, key) = self.read(Part::TextEncoder, k, shape, cfg)?;
                used.insert(key);
                Ok(t)
            };
            ClipTextModel::load(&cfg.text, &mut load).map_err(cfg_err)?
        };
        let unet = {
            let mut load = |k: &str, shape: &[usize]| -> Result<Tensor> {
                let (t, key) = self.read(Part::Unet, k, shape, cfg)?;
                used.insert(key);
                Ok(t)
            };
            UNet2DCondition::load(&cfg.unet, &mut load).map_err(cfg_err)?
        };
        let vae = {
            let mut load = |k: &str, shape: &[usize]| -> Result<Tensor> {
                let (t, key) = self.read(Part::Vae, k, shape, cfg)?;
                used.insert(key);
                Ok(t)
            };
            AutoencoderKl::load(&cfg.vae, &mut load).map_err(cfg_err)?
        };
        let l = &self.layout;
        if let Some(extra) = self.file.names().into_iter().find(|k| {
            l.modelled(k) && !used.contains(*k) && !l.ignorable(k, cfg.text.num_hidden_layers)
        }) {
            return Err(bad(
                &self.path,
                extra,
                "a tensor the configured models do not use (do the configuration and the \
                 checkpoint belong together?)",
            ));
        }
        Ok((text, unet, vae))
    }

    /// The configurations from a diffusers pipeline directory (`unet/config.json`,
    /// `vae/config.json`, `text_encoder/config.json`, `scheduler/scheduler_config.json`; its
    /// weights are not read).
    pub fn configs_from_dir(&self, dir: &Path) -> Result<Configs> {
        let read = |p: &str| -> Result<(PathBuf, Value)> {
            let path = dir.join(p);
            let v = crate::hf::read_json(&path)?;
            Ok((path, v))
        };
        let (up, uv) = read("unet/config.json")?;
        let (vp, vv) = read("vae/config.json")?;
        let (tp, tv) = read("text_encoder/config.json")?;
        let (_, scheduler) = read("scheduler/scheduler_config.json")?;
        let unet = unet_config(&up, &uv)?;
        // The single-file layout numbers blocks with one layers_per_block for all.
        if unet
            .layers_per_block
            .iter()
            .any(|&l| l != unet.layers_per_block[0])
        {
            return Err(bad(
                &up,
                "layers_per_block",
                format!(
                    "{:?}: a single-file checkpoint's layout has one count for every block",
                    unet.layers_per_block
                ),
            ));
        }
        Ok(Configs {
            unet,
            vae: vae_config(&vp, &vv)?,
            text: clip_text_config(&tp, &tv)?,
            scheduler,
            family: None,
        })
    }

    /// [`infer_configs`] on this file's shapes.
    pub fn infer_configs(&self) -> Result<Configs> {
        infer_configs(&self.path, &self.layout, &self.shapes())
    }
}

/// The configurations of an SD 1.x or 2.x single file inferred from its tensors' shapes, with
/// the settings the shapes cannot tell taken from the family's released configs (head counts,
/// the text encoder's activation, the scheduler); a family the shapes do not identify is an
/// error asking for a configuration directory. `path` names the file in errors.
pub fn infer_configs(path: &Path, layout: &KeyLayout, shapes: &Shapes) -> Result<Configs> {
    // Every tensor read here is a matrix or a convolution kernel: at least two dimensions.
    let shape = |k: &str| -> Result<Vec<usize>> {
        let s = shapes.get(k).ok_or_else(|| IoError::MissingTensor {
            path: path.into(),
            key: k.into(),
        })?;
        if s.len() < 2 {
            return Err(IoError::TensorShape {
                path: path.into(),
                key: k.into(),
                got: s.clone(),
                expected: vec![0, 0],
            });
        }
        Ok(s.clone())
    };
    let count = |prefix: &str| -> usize {
        let mut seen = HashSet::new();
        for k in shapes.keys() {
            if let Some(rest) = k.strip_prefix(prefix) {
                if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
                    seen.insert(i);
                }
            }
        }
        (0..).take_while(|i| seen.contains(i)).count()
    };
    let has = |k: &str| shapes.contains_key(k);
    let u = |k: &str| format!("{UNET_PREFIX}{k}");
    // The text encoder, which tells the family.
    let (family, text) = match layout.text {
        Text::OpenClip => {
            let p = |k: &str| format!("{OPEN_CLIP_PREFIX}{k}");
            let emb = shape(&p("token_embedding.weight"))?;
            let blocks = count(&p("transformer.resblocks."));
            let fc = shape(&p("transformer.resblocks.0.mlp.c_fc.weight"))?;
            let pos = shape(&p("positional_embedding"))?;
            if blocks < 2 || emb.len() != 2 || fc.len() != 2 || pos.len() != 2 {
                return Err(bad(path, p("transformer"), "not an OpenCLIP text tower"));
            }
            (
                Family::Sd2,
                json!({
                    "vocab_size": emb[0], "hidden_size": emb[1], "intermediate_size": fc[0],
                    // SD 2.x takes the penultimate block's states: diffusers' converted
                    // encoder has one block fewer than the file.
                    "num_hidden_layers": blocks - 1, "num_attention_heads": emb[1] / 64,
                    "max_position_embeddings": pos[0], "hidden_act": "gelu",
                }),
            )
        }
        Text::Clip(with_text_model) => {
            let base = if with_text_model {
                format!("{CLIP_PREFIX}text_model.")
            } else {
                CLIP_PREFIX.to_string()
            };
            let emb = shape(&format!("{base}embeddings.token_embedding.weight"))?;
            let pos = shape(&format!("{base}embeddings.position_embedding.weight"))?;
            let fc = shape(&format!("{base}encoder.layers.0.mlp.fc1.weight"))?;
            let layers = count(&format!("{base}encoder.layers."));
            if emb.len() != 2 || pos.len() != 2 || fc.len() != 2 {
                return Err(bad(path, base, "not a CLIP text encoder"));
            }
            (
                Family::Sd1,
                json!({
                    "vocab_size": emb[0], "hidden_size": emb[1], "intermediate_size": fc[0],
                    "num_hidden_layers": layers, "num_attention_heads": emb[1] / 64,
                    "max_position_embeddings": pos[0], "hidden_act": "quick_gelu",
                }),
            )
        }
    };
    // The UNet.
    let conv_in = shape(&u("input_blocks.0.0.weight"))?;
    let conv_out = shape(&u("out.2.weight"))?;
    let inputs = count(&u("input_blocks."));
    let outputs = count(&u("output_blocks."));
    let first_down = (1..inputs)
        .find(|i| has(&u(&format!("input_blocks.{i}.0.op.weight"))))
        .ok_or_else(|| bad(path, u("input_blocks"), "no downsampling found"))?;
    let layers = first_down - 1;
    let per = layers + 1;
    if conv_in.len() != 4 {
        return Err(bad(
            path,
            u("input_blocks.0.0.weight"),
            format!("{conv_in:?}: not a convolution kernel"),
        ));
    }
    if layers == 0 || outputs == 0 || !outputs.is_multiple_of(per) {
        return Err(bad(
            path,
            u("output_blocks"),
            format!("{outputs} output blocks do not fit {layers} layers per block"),
        ));
    }
    let n = outputs / per;
    let mut channels = Vec::new();
    let mut down = Vec::new();
    let mut up = Vec::new();
    let mut cross = None;
    let mut linear = false;
    let kind = |attn: bool| {
        if attn {
            "CrossAttn"
        } else {
            ""
        }
    };
    for b in 0..n {
        let i = 1 + b * per;
        channels.push(shape(&u(&format!("input_blocks.{i}.0.in_layers.2.weight")))?[0]);
        let attn = format!("input_blocks.{i}.1.");
        let a = has(&u(&format!("{attn}proj_in.weight")));
        if a {
            let k = shape(&u(&format!("{attn}transformer_blocks.0.attn2.to_k.weight")))?;
            cross = Some(k[1]);
            linear = shape(&u(&format!("{attn}proj_in.weight")))?.len() == 2;
        }
        down.push(format!("{}DownBlock2D", kind(a)));
        let a = has(&u(&format!("output_blocks.{}.1.proj_in.weight", b * per)));
        up.push(format!("{}UpBlock2D", kind(a)));
    }
    let cross = cross.ok_or_else(|| bad(path, u("input_blocks"), "no cross-attention"))?;
    let depth = count(&u("input_blocks.1.1.transformer_blocks."));
    let heads: Vec<usize> = match (family, cross) {
        (Family::Sd1, 768) => vec![8; n],
        (Family::Sd2, 1024) => channels.iter().map(|c| c / 64).collect(),
        _ => {
            return Err(bad(
                path,
                "cross_attention_dim",
                format!(
                    "{cross}-wide text states with a {family:?} text encoder: not a released \
                         SD 1.x/2.x layout, so the head counts cannot be inferred; pass the \
                         diffusers directory its configuration comes from (--sd-config)"
                ),
            ))
        }
    };
    let unet = json!({
        "in_channels": conv_in[1], "out_channels": conv_out[0],
        "block_out_channels": channels, "down_block_types": down, "up_block_types": up,
        "layers_per_block": layers, "cross_attention_dim": cross,
        "attention_head_dim": heads, "use_linear_projection": linear,
        "transformer_layers_per_block": depth.max(1),
    });
    // The VAE.
    let v = |k: &str| format!("{}{k}", layout.vae_prefix);
    let levels = count(&v("encoder.down."));
    let vae_channels: Vec<usize> = (0..levels)
        .map(|i| shape(&v(&format!("encoder.down.{i}.block.0.conv1.weight"))).map(|s| s[0]))
        .collect::<Result<_>>()?;
    let vae = json!({
        "in_channels": shape(&v("encoder.conv_in.weight"))?[1],
        "out_channels": shape(&v("decoder.conv_out.weight"))?[0],
        "latent_channels": shape(&v("decoder.conv_in.weight"))?[1],
        "block_out_channels": vae_channels,
        "layers_per_block": count(&v("encoder.down.0.block.")),
        "use_quant_conv": has(&v("quant_conv.weight")),
        "use_post_quant_conv": has(&v("post_quant_conv.weight")),
        "scaling_factor": 0.18215,
    });
    // The scheduler: SD 1.5's, and SD 2.1's v-prediction for a 2.x file (as diffusers).
    let mut scheduler = json!({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
        "clip_sample": false, "prediction_type": "epsilon",
    });
    if family == Family::Sd2 {
        scheduler["_class_name"] = json!("DDIMScheduler");
        scheduler["prediction_type"] = json!("v_prediction");
    }
    Ok(Configs {
        unet: unet_config(path, &unet)?,
        vae: vae_config(path, &vae)?,
        text: clip_text_config(path, &text)?,
        scheduler,
        family: Some(family),
    })
}

/// The tokenizer of an inferred family from the Hugging Face cache: SD 1.x's is
/// `openai/clip-vit-large-patch14`'s, SD 2.x's the `tokenizer/` of a Stability SD 2 repository
/// (it pads with `!`). None there is an error saying what to download or pass.
pub fn cached_tokenizer(path: &Path, family: Family) -> Result<PathBuf> {
    let candidates: &[(&str, &str)] = match family {
        Family::Sd1 => &[
            ("openai/clip-vit-large-patch14", ""),
            ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
            ("runwayml/stable-diffusion-v1-5", "tokenizer"),
            ("CompVis/stable-diffusion-v1-4", "tokenizer"),
        ],
        Family::Sd2 => &[
            ("stabilityai/stable-diffusion-2-1", "tokenizer"),
            ("stabilityai/stable-diffusion-2", "tokenizer"),
            ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
            ("stabilityai/stable-diffusion-2-base", "tokenizer"),
        ],
    };
    let cache = crate::hf::hub_cache_dir();
    for (repo, sub) in candidates {
        let root = cache.join(format!("models--{}", repo.replace('/', "--")));
        let commit = std::fs::read_to_string(root.join("refs/main")).unwrap_or_default();
        let commit = commit.trim();
        if commit.is_empty() || commit.contains('/') || commit.contains("..") {
            continue;
        }
        let dir = root.join("snapshots").join(commit).join(sub);
        if dir.join("vocab.json").is_file() || dir.join("tokenizer.json").is_file() {
            return Ok(dir);
        }
    }
    Err(bad(
        path,
        "tokenizer",
        format!(
            "a single-file checkpoint carries no tokenizer and none was found in the Hugging \
             Face cache ({}): download one (`hf download {} {}`) or pass --sd-config with a \
             diffusers pipeline directory of the same family",
            cache.display(),
            candidates[0].0,
            if candidates[0].1.is_empty() {
                "vocab.json merges.txt tokenizer_config.json special_tokens_map.json".to_string()
            } else {
                "--include 'tokenizer/*'".to_string()
            }
        ),
    ))
}
