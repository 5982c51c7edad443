//! Hugging Face model directories: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, and `tokenizer.json` beside them.
//!
//! Supported `model_type`s: `gpt2`, `llama`, `mistral`, `qwen2`. Config fields that change the
//! math are read (with transformers' defaults where it has them) and checked; a value we do not
//! implement is an error naming the field rather than a silently different model.

use crate::error::{IoError, Result};
use crate::safetensors::SafetensorsFile;
use lora_core::models::gpt2::{Gpt2, Gpt2Config};
use lora_core::models::llama::{Llama, LlamaConfig, RopeScaling};
use lora_core::models::CausalLm;
use lora_core::Tensor;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The parsed architecture configuration.
#[derive(Clone, Debug, PartialEq)]
pub enum ArchConfig {
    /// `gpt2`
    Gpt2(Gpt2Config),
    /// `llama`, `mistral`, `qwen2`
    Llama(LlamaConfig),
}

impl ArchConfig {
    /// The most positions a sequence may have (`n_positions`, `max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        match self {
            ArchConfig::Gpt2(c) => c.n_positions,
            ArchConfig::Llama(c) => c.max_position_embeddings,
        }
    }
}

/// Reads and parses a JSON file, naming it in errors.
pub fn read_json(path: &Path) -> Result<Value> {
    let Some(text) = crate::files::read_small(path, "JSON file")? else {
        return Err(IoError::Missing {
            path: path.into(),
            what: "JSON file",
        });
    };
    serde_json::from_slice(&text).map_err(|source| IoError::Json {
        path: path.into(),
        source,
    })
}

/// The largest size a config field may give (2^31): real models are far below it, and shapes
/// built from two such sizes fit in 64 bits.
pub const MAX_SIZE: usize = 1 << 31;

pub(crate) struct Fields<'a> {
    pub(crate) path: &'a Path,
    pub(crate) v: &'a Value,
}

impl Fields<'_> {
    pub(crate) fn err(&self, field: &str, reason: impl Into<String>) -> IoError {
        IoError::Config {
            path: self.path.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn get(&self, field: &str) -> Option<&Value> {
        self.v.get(field).filter(|x| !x.is_null())
    }
    /// A size: a non-negative integer of at most [`MAX_SIZE`] (so that products of two sizes,
    /// as shapes need, cannot overflow; the tensors then decide what is real).
    pub(crate) fn usize_or(&self, field: &str, default: Option<usize>) -> Result<usize> {
        match self.get(field) {
            None => default.ok_or_else(|| self.err(field, "missing")),
            Some(x) => match x.as_u64() {
                Some(n) if n <= MAX_SIZE as u64 => Ok(n as usize),
                Some(n) => Err(self.err(
                    field,
                    format!("{n} is larger than any model's ({MAX_SIZE} at most)"),
                )),
                None => Err(self.err(field, format!("expected a non-negative integer, got {x}"))),
            },
        }
    }
    pub(crate) fn usize(&self, field: &str) -> Result<usize> {
        let n = self.usize_or(field, None)?;
        if n == 0 {
            return Err(self.err(field, "must be at least 1"));
        }
        Ok(n)
    }
    pub(crate) fn f32_or(&self, field: &str, default: f32) -> Result<f32> {
        match self.get(field) {
            None => Ok(default),
            Some(x) => x
                .as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| self.err(field, format!("expected a number, got {x}"))),
        }
    }
    /// A number that must be finite and positive (an epsilon).
    pub(crate) fn positive_f32_or(&self, field: &str, default: f32) -> Result<f32> {
        let x = self.f32_or(field, default)?;
        if !(x.is_finite() && x > 0.0) {
            return Err(self.err(field, format!("must be a positive number, got {x}")));
        }
        Ok(x)
    }
    pub(crate) fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(x) => x
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true or false, got {x}"))),
        }
    }
    pub(crate) fn str_or<'b>(&'b self, field: &str, default: &'b str) -> Result<&'b str> {
        match self.get(field) {
            None => Ok(default),
            Some(x) => x
                .as_str()
                .ok_or_else(|| self.err(field, format!("expected a string, got {x}"))),
        }
    }
}

/// Parses a `config.json` value (`path` is only for messages).
pub fn parse_config(path: &Path, v: &Value) -> Result<ArchConfig> {
    let f = Fields { path, v };
    let model_type = match f.get("model_type") {
        None => return Err(f.err("model_type", "missing")),
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(f.err("model_type", format!("expected a string, got {other}"))),
    };
    match model_type {
        "gpt2" => {
            let act = f.str_or("activation_function", "gelu_new")?;
            if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
                return Err(f.err(
                    "activation_function",
                    format!("`{act}` is not supported (gelu_new, gelu_pytorch_tanh)"),
                ));
            }
            if !f.bool_or("scale_attn_weights", true)? {
                return Err(f.err("scale_attn_weights", "false is not supported"));
            }
            if f.bool_or("scale_attn_by_inverse_layer_idx", false)? {
                return Err(f.err("scale_attn_by_inverse_layer_idx", "true is not supported"));
            }
            if f.bool_or("add_cross_attention", false)? {
                return Err(f.err("add_cross_attention", "true is not supported"));
            }
            let n_embd = f.usize("n_embd")?;
            Ok(ArchConfig::Gpt2(Gpt2Config {
                vocab_size: f.usize("vocab_size")?,
                n_positions: f.usize("n_positions")?,
                n_embd,
                n_layer: f.usize("n_layer")?,
                n_head: f.usize("n_head")?,
                n_inner: f.usize_or("n_inner", Some(4 * n_embd))?,
                layer_norm_epsilon: f.positive_f32_or("layer_norm_epsilon", 1e-5)?,
                tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
            }))
        }
        "llama" | "mistral" | "qwen2" => {
            let act = f.str_or("hidden_act", "silu")?;
            if act != "silu" {
                return Err(f.err("hidden_act", format!("`{act}` is not supported (silu)")));
            }
            let hidden = f.usize("hidden_size")?;
            let heads = f.usize("num_attention_heads")?;
            let kv = f.usize_or("num_key_value_heads", Some(heads))?;
            let head_dim = f.usize_or("head_dim", Some(hidden / heads))?;
            // transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
            let rope_params = f.get("rope_parameters");
            let (theta, scaling_v, scaling_field) = match rope_params {
                Some(p) => (
                    match p.get("rope_theta").filter(|x| !x.is_null()) {
                        None => 10000.0,
                        Some(x) => x.as_f64().map(|x| x as f32).ok_or_else(|| {
                            f.err(
                                "rope_parameters.rope_theta",
                                format!("expected a number, got {x}"),
                            )
                        })?,
                    },
                    Some(p),
                    "rope_parameters",
                ),
                None => (
                    f.f32_or("rope_theta", 10000.0)?,
                    f.get("rope_scaling"),
                    "rope_scaling",
                ),
            };
            if !(theta.is_finite() && theta > 0.0) {
                return Err(f.err("rope_theta", format!("must be positive, got {theta}")));
            }
            let rope_scaling = parse_rope_scaling(&f, scaling_v, scaling_field)?;
            if rope_params.is_some() {
                // The older keys beside `rope_parameters`: read, and refused when they say
                // something else (which one transformers honours depends on its version).
                let old_theta = f.f32_or("rope_theta", theta)?;
                let old_scaling = match f.get("rope_scaling") {
                    Some(v) => parse_rope_scaling(&f, Some(v), "rope_scaling")?,
                    None => rope_scaling.clone(),
                };
                if old_theta != theta || old_scaling != rope_scaling {
                    return Err(f.err(
                        "rope_scaling",
                        "`rope_theta`/`rope_scaling` disagree with `rope_parameters`",
                    ));
                }
            }
            // transformers rotates only this fraction of each head when it is set.
            let partial = match rope_params.and_then(|p| p.get("partial_rotary_factor")) {
                Some(x) => Some(x),
                None => f.get("partial_rotary_factor"),
            };
            if let Some(x) = partial.filter(|x| !x.is_null()) {
                if x.as_f64() != Some(1.0) {
                    return Err(f.err(
                        "partial_rotary_factor",
                        format!("{x} is not supported (1.0)"),
                    ));
                }
            }
            let (qkv_bias, o_bias) = match model_type {
                "qwen2" => (true, false),
                "llama" => {
                    let b = f.bool_or("attention_bias", false)?;
                    (b, b)
                }
                _ => (false, false),
            };
            if model_type == "qwen2" && f.bool_or("use_sliding_window", false)? {
                return Err(f.err("use_sliding_window", "true is not supported yet"));
            }
            let sliding_window = if model_type == "mistral" {
                match f.get("sliding_window") {
                    None => None,
                    Some(_) => Some(f.usize("sliding_window")?),
                }
            } else {
                None
            };
            Ok(ArchConfig::Llama(LlamaConfig {
                vocab_size: f.usize("vocab_size")?,
                hidden_size: hidden,
                intermediate_size: f.usize("intermediate_size")?,
                num_hidden_layers: f.usize("num_hidden_layers")?,
                num_attention_heads: heads,
                num_key_value_heads: kv,
                head_dim,
                rms_norm_eps: f.positive_f32_or("rms_norm_eps", 1e-6)?,
                rope_theta: theta,
                rope_scaling,
                max_position_embeddings: f.usize_or("max_position_embeddings", Some(2048))?,
                tie_word_embeddings: f.bool_or("tie_word_embeddings", model_type == "qwen2")?,
                qkv_bias,
                o_bias,
                mlp_bias: f.bool_or("mlp_bias", false)?,
                sliding_window,
            }))
        }
        other => Err(f.err(
            "model_type",
            format!("`{other}` is not supported (gpt2, llama, mistral, qwen2)"),
        )),
    }
}

fn parse_rope_scaling(f: &Fields, v: Option<&Value>, field: &str) -> Result<RopeScaling> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    let kind = match v.get("rope_type").or_else(|| v.get("type")) {
        None | Some(Value::Null) => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(f.err(
                &format!("{field}.rope_type"),
                format!("expected a string, got {other}"),
            ))
        }
    };
    let num = |k: &str| -> Result<f32> {
        v.get(k)
            .and_then(|x| x.as_f64())
            .map(|x| x as f32)
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| f.err(&format!("{field}.{k}"), "missing or not a positive number"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(f.err(
            &format!("{field}.rope_type"),
            format!("`{other}` is not supported (default, linear, llama3)"),
        )),
    }
}

/// The weight files of a model directory: one file, or shards named by an index.
pub struct Weights {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// tensor name -> index into `files`
    map: HashMap<String, usize>,
}

impl Weights {
    /// Opens `model.safetensors.index.json` (and its shards) or `model.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_stem(dir, "model")
    }

    /// Opens `<stem>.safetensors.index.json` (and its shards) or `<stem>.safetensors` in `dir`
    /// (diffusers names its weights `diffusion_pytorch_model`).
    pub fn open_stem(dir: &Path, stem: &str) -> Result<Self> {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        let single = dir.join(format!("{stem}.safetensors"));
        let mut files = Vec::new();
        let mut map = HashMap::new();
        // transformers reads model.safetensors when it is there, the index only otherwise.
        if single.exists() {
            let f = SafetensorsFile::open(&single)?;
            for k in f.names() {
                map.insert(k.to_string(), 0);
            }
            files.push(f);
        } else if index.exists() {
            let v = read_json(&index)?;
            let wm = v
                .get("weight_map")
                .and_then(|x| x.as_object())
                .ok_or_else(|| IoError::Config {
                    path: index.clone(),
                    field: "weight_map".into(),
                    reason: "missing or not an object".into(),
                })?;
            let mut by_file: HashMap<String, usize> = HashMap::new();
            let mut shard_names: Vec<&str> = wm.values().filter_map(|x| x.as_str()).collect();
            shard_names.sort_unstable();
            shard_names.dedup();
            for name in shard_names {
                if name.contains('/') || name.contains("..") {
                    return Err(IoError::Config {
                        path: index.clone(),
                        field: "weight_map".into(),
                        reason: format!("shard name `{name}` must be a file in the same directory"),
                    });
                }
                let p = dir.join(name);
                if !p.exists() {
                    return Err(IoError::Missing {
                        path: p,
                        what: "shard listed in the weights' index file",
                    });
                }
                by_file.insert(name.to_string(), files.len());
                files.push(SafetensorsFile::open(&p)?);
            }
            for (k, f) in wm {
                let f = f.as_str().ok_or_else(|| IoError::Config {
                    path: index.clone(),
                    field: format!("weight_map.{k}"),
                    reason: "expected a file name".into(),
                })?;
                map.insert(k.clone(), by_file[f]);
            }
        } else {
            return Err(IoError::Missing {
                path: single,
                what: "model weights (<name>.safetensors or <name>.safetensors.index.json); pickle .bin checkpoints are not read",
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            map,
        })
    }

    /// Every stored tensor: name, storage dtype, shape (sorted by name).
    pub fn entries(&self) -> Vec<(String, safetensors::Dtype, Vec<usize>)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .filter_map(|(k, &i)| {
                self.files[i]
                    .meta(k)
                    .map(|m| (k.clone(), m.dtype, m.shape.clone()))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// How many consecutive layers `0..n` the checkpoint holds under any of `prefixes`
    /// (`model.layers.` -> `model.layers.0.…`, `model.layers.1.…`).
    pub fn layers_present(&self, prefixes: &[&str]) -> usize {
        let mut seen = std::collections::HashSet::new();
        for k in self.map.keys() {
            for p in prefixes {
                if let Some(rest) = k.strip_prefix(p) {
                    if let Some((i, _)) = rest.split_once('.') {
                        if let Ok(i) = i.parse::<usize>() {
                            seen.insert(i);
                        }
                    }
                }
            }
        }
        (0..).take_while(|i| seen.contains(i)).count()
    }

    /// Reads `key` as f32 values, whatever its float dtype.
    pub fn read_f32(&self, key: &str) -> Result<Vec<f32>> {
        let i = *self.map.get(key).ok_or_else(|| IoError::MissingTensor {
            path: self.dir.clone(),
            key: key.into(),
        })?;
        Ok(self.files[i].read_f32(key)?.0)
    }

    /// The stored bytes of `key` (its dtype, little-endian).
    pub fn raw_bytes(&self, key: &str) -> Result<&[u8]> {
        let i = *self.map.get(key).ok_or_else(|| IoError::MissingTensor {
            path: self.dir.clone(),
            key: key.into(),
        })?;
        self.files[i].raw_bytes(key)
    }

    /// Whether the checkpoint holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.map.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Loads `key` as a frozen f32 tensor of shape `expected`.
    pub fn tensor(&self, key: &str, expected: &[usize]) -> Result<Tensor> {
        // The original GPT-2 checkpoints store `h.0...` without the `transformer.` prefix.
        let key = match (self.map.contains_key(key), key.strip_prefix("transformer.")) {
            (false, Some(bare)) if self.map.contains_key(bare) => bare,
            _ => key,
        };
        let i = *self.map.get(key).ok_or_else(|| IoError::MissingTensor {
            path: self.dir.clone(),
            key: key.into(),
        })?;
        self.files[i].tensor(key, expected)
    }
}

/// A loaded model directory.
///
/// ```
/// use lora_core::models::generate::{generate, GenerateConfig};
/// use lora_io::{hf::ModelDir, peft::load_adapter, tokenizer::TextTokenizer};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let md = ModelDir::open("../demo/base")?; // the repository's demo model
/// let tok = TextTokenizer::from_model_dir("../demo/base")?;
/// let mut model = md.load_model()?;
/// load_adapter(model.as_mut(), std::path::Path::new("../demo/adapter"))?;
/// let prompt = tok.encode("english : the cat sees a dog . french :")?;
/// let cfg = GenerateConfig { max_new_tokens: 5, ..Default::default() };
/// let ids = generate(model.as_ref(), &prompt, &cfg)?;
/// assert_eq!(tok.decode(&ids[prompt.len()..])?, "le chat voit un chien");
/// # Ok(()) }
/// ```
pub struct ModelDir {
    /// The directory.
    pub dir: PathBuf,
    /// Its parsed config.
    pub config: ArchConfig,
}

impl ModelDir {
    /// Reads and checks `dir/config.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(IoError::Missing {
                path: dir,
                what: "model directory",
            });
        }
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(IoError::Missing {
                path: cfg_path,
                what: "config.json: is this a Hugging Face model directory?",
            });
        }
        let v = read_json(&cfg_path)?;
        let config = parse_config(&cfg_path, &v)?;
        Ok(Self { dir, config })
    }

    /// End-of-sequence ids for generation: `generation_config.json`'s `eos_token_id` if present,
    /// else `config.json`'s (an integer or a list; absent means none).
    pub fn eos_token_ids(&self) -> Result<Vec<u32>> {
        let from = |f: &str| -> Result<Option<Vec<u32>>> {
            let path = self.dir.join(f);
            if !path.exists() {
                return Ok(None);
            }
            let v = read_json(&path)?;
            let bad = |x: &Value| IoError::Config {
                path: path.clone(),
                field: "eos_token_id".into(),
                reason: format!("{x} is not a token id (a non-negative integer or a list of them)"),
            };
            let id = |x: &Value| {
                x.as_u64()
                    .filter(|&n| n <= u32::MAX as u64)
                    .map(|n| n as u32)
                    .ok_or_else(|| bad(x))
            };
            match v.get("eos_token_id") {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) => Ok(Some(a.iter().map(id).collect::<Result<_>>()?)),
                Some(x) => Ok(Some(vec![id(x)?])),
            }
        };
        Ok(match from("generation_config.json")? {
            Some(ids) => ids,
            None => from("config.json")?.unwrap_or_default(),
        })
    }

    /// The end-of-sequence token that training appends to each text and completion, as TRL's
    /// `SFTTrainer` does with `tokenizer.eos_token`: `tokenizer_config.json`'s `eos_token` (a
    /// string or `{"content": ..}`) looked up in `tok`, else the first of
    /// [`eos_token_ids`](Self::eos_token_ids). `None` when the directory names none.
    pub fn training_eos(&self, tok: &crate::tokenizer::TextTokenizer) -> Result<Option<u32>> {
        let path = self.dir.join("tokenizer_config.json");
        if path.exists() {
            let v = read_json(&path)?;
            let token = match v.get("eos_token") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.as_str()),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Some(s.as_str()),
                    _ => {
                        return Err(IoError::Config {
                            path,
                            field: "eos_token".into(),
                            reason: "an object without a string `content`".into(),
                        })
                    }
                },
                Some(other) => {
                    return Err(IoError::Config {
                        path,
                        field: "eos_token".into(),
                        reason: format!("expected a string, got {other}"),
                    })
                }
            };
            if let Some(t) = token {
                return match tok.token_id(t) {
                    Some(id) => Ok(Some(id)),
                    None => Err(IoError::Config {
                        path,
                        field: "eos_token".into(),
                        reason: format!("`{t}` is not in the vocabulary of tokenizer.json"),
                    }),
                };
            }
        }
        Ok(self.eos_token_ids()?.first().copied())
    }

    /// Loads the weights and builds the model (all weights frozen). The layer count of
    /// `config.json` is checked against the layers the checkpoint holds before anything is
    /// built, so a config that lies costs an error, not an allocation.
    pub fn load_model(&self) -> Result<Box<dyn CausalLm>> {
        let w = Weights::open(&self.dir)?;
        let (field, layers, prefixes): (&str, usize, &[&str]) = match &self.config {
            ArchConfig::Gpt2(c) => ("n_layer", c.n_layer, &["transformer.h.", "h."]),
            ArchConfig::Llama(c) => ("num_hidden_layers", c.num_hidden_layers, &["model.layers."]),
        };
        let present = w.layers_present(prefixes);
        if layers != present {
            let held = match present {
                0 => format!("no `{}N.` layers", prefixes[0]),
                n => format!("{n} (`{}0.` to `{}{}.`)", prefixes[0], prefixes[0], n - 1),
            };
            // transformers would build the configured layers and leave the others unused: a
            // model different from the checkpoint, so it is refused.
            return Err(IoError::Config {
                path: self.dir.join("config.json"),
                field: field.into(),
                reason: format!("{layers} layers, but the weights hold {held}"),
            });
        }
        let mut load = |k: &str, shape: &[usize]| w.tensor(k, shape);
        // A field the model rejects (heads that do not divide the width) is named with its file.
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
        Ok(match &self.config {
            ArchConfig::Gpt2(c) => Box::new(Gpt2::load(c, &mut load).map_err(in_config)?),
            ArchConfig::Llama(c) => Box::new(Llama::load(c, &mut load).map_err(in_config)?),
        })
    }
}

/// The Hugging Face hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (as `huggingface_hub`).
pub fn hub_cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE") {
        return p;
    }
    if let Some(p) = var("HF_HOME") {
        return p.join("hub");
    }
    let cache = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// Whether `s` reads as a Hub model id (`org/name`), not a path.
pub fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// `--model`: a directory as given, or a Hub id (`org/name`) found in the local Hugging Face
/// cache (`models--org--name/snapshots/<commit>`, the commit named by `refs/<revision>` or
/// given as `revision`; `main` by default). An id that is not there is an error saying where it
/// looked and how to download it; anything else is returned as given (opening it names what is
/// missing).
pub fn resolve_model_dir(model: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let s = model.to_string_lossy();
    if model.exists() || !is_hub_id(&s) {
        if revision.is_some() && model.exists() {
            return Err(IoError::Config {
                path: model.into(),
                field: "--revision".into(),
                reason: "applies to a Hub id (org/name), not to a directory".into(),
            });
        }
        return Ok(model.to_path_buf());
    }
    let rev = revision.unwrap_or("main");
    let repo = hub_cache_dir().join(format!("models--{}", s.replace('/', "--")));
    let ref_file = repo.join("refs").join(rev);
    let ref_text = crate::files::read_small(&ref_file, "Hub cache ref")
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok());
    let commit = match ref_text.ok_or(()) {
        Ok(c) => Some(c.trim().to_string()),
        Err(_) if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(rev.to_string())
        }
        Err(_) => None,
    };
    if let Some(c) = commit.filter(|c| !c.is_empty() && !c.contains('/') && !c.contains("..")) {
        let snap = repo.join("snapshots").join(&c);
        if snap.join("config.json").exists() {
            return Ok(snap);
        }
    }
    Err(IoError::Config {
        path: model.into(),
        field: "--model".into(),
        reason: format!(
            "not a directory, and the Hub model `{s}` (revision {rev}) is not in the local \
             Hugging Face cache (looked in {}/snapshots/, the commit from refs/{rev}); download \
             it with `hf download {s}` (pip install huggingface_hub), or set HF_HUB_CACHE / \
             HF_HOME to where it is, or pass its directory",
            repo.display()
        ),
    })
}
