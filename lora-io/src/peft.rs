//! PEFT LoRA adapters: `adapter_config.json`, injection by module path with PEFT's matching
//! rules, and `adapter_model.safetensors` weights (keys
//! `base_model.model.<module>.lora_A.weight` `(r, in)` and `...lora_B.weight` `(out, r)`).
//!
//! Matching, as PEFT does it: `target_modules` as a list matches a module whose path equals an
//! entry or ends with `.` + entry; as a string it is a regex that must match the whole path;
//! `all-linear` means every linear layer except the output head. `exclude_modules` uses the same
//! rules. `layers_to_transform` keeps modules whose layer index (the number after
//! `.<layers_pattern>.`, e.g. `model.layers.3.` or `transformer.h.3.`) is listed.
//! `rank_pattern` / `alpha_pattern` keys are regexes matched against the end of the path; the
//! first matching key in the file's order wins, as in PEFT.

use crate::error::{IoError, Result};
use crate::hf::read_json;
use crate::safetensors::SafetensorsFile;
use lora_core::models::CausalLm;
use lora_core::{LoraConfig, LoraInit, LoraLinear};
use regex::Regex;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Which modules get an adapter.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Names: exact path or dotted suffix.
    List(Vec<String>),
    /// A regex over the whole path.
    Regex(String),
    /// Every linear layer but the output head.
    AllLinear,
}

impl Targets {
    /// A `--target` flag: `all-linear`, a regex (anything with a regex metacharacter), or a
    /// comma-separated list of module names.
    pub fn from_flag(flag: &str) -> Self {
        let t = flag.trim();
        if t == "all-linear" {
            Targets::AllLinear
        } else if t.chars().any(|c| "\\^$*+?()[]{}|".contains(c)) {
            Targets::Regex(t.to_string())
        } else {
            Targets::List(
                t.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            )
        }
    }

    fn parse(path: &Path, field: &str, v: &Value) -> Result<Option<Self>> {
        Ok(match v {
            Value::Null => None,
            Value::String(s) if s == "all-linear" => Some(Targets::AllLinear),
            Value::String(s) => Some(Targets::Regex(s.clone())),
            Value::Array(a) => Some(Targets::List(
                a.iter()
                    .map(|x| {
                        x.as_str()
                            .map(String::from)
                            .ok_or_else(|| cfg_err(path, field, "expected a list of strings"))
                    })
                    .collect::<Result<_>>()?,
            )),
            _ => {
                return Err(cfg_err(
                    path,
                    field,
                    "expected a string or a list of strings",
                ))
            }
        })
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Targets::List(l) => format!("{l:?}"),
            Targets::Regex(r) => format!("regex `{r}`"),
            Targets::AllLinear => "all-linear".into(),
        }
    }

    /// Checks a regex target compiles (as PEFT anchors it: the whole module path must match);
    /// the error is the regex parser's message.
    pub fn check(&self) -> std::result::Result<(), String> {
        match self {
            Targets::Regex(r) => Regex::new(&format!("^(?:{r})$"))
                .map(|_| ())
                .map_err(|e| format!("invalid regex: {e}")),
            _ => Ok(()),
        }
    }

    fn matches(&self, module: &str, head: &str) -> Result<bool> {
        Ok(match self {
            Targets::List(l) => l
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            Targets::Regex(r) => full_regex(r)?.is_match(module),
            Targets::AllLinear => module != head,
        })
    }
}

fn full_regex(r: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{r})$")).map_err(|e| IoError::Config {
        path: PathBuf::from("adapter_config.json"),
        field: "target_modules".into(),
        reason: format!("invalid regex: {e}"),
    })
}

/// The largest rank an adapter config may give (far above any real adapter; the tensors in the
/// file are checked against it before anything is allocated).
pub const MAX_RANK: u64 = 1 << 16;

/// A boolean field as PEFT reads it (Python truthiness of the JSON value): `true`/`false`,
/// numbers (0 is false), `null`/absent (false). Strings are accepted only as `"true"`/`"True"`:
/// PEFT reads every non-empty string, `"false"` included, as true, which is never what a file
/// saying `"false"` means, so other strings are refused rather than guessed.
fn py_bool(path: &Path, field: &str, v: &Value) -> Result<bool> {
    match v {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => Ok(n.as_f64().is_some_and(|x| x != 0.0)),
        Value::String(s) if s == "true" || s == "True" => Ok(true),
        other => Err(cfg_err(
            path,
            field,
            format!(
                "expected true or false, got {other} (PEFT would read any non-empty string as \
                 true)"
            ),
        )),
    }
}

/// A number field as a finite f32.
fn finite_f32(path: &Path, field: &str, v: &Value) -> Result<f32> {
    match v.as_f64().map(|x| x as f32) {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(cfg_err(
            path,
            field,
            format!("expected a finite number, got {v}"),
        )),
    }
}

fn cfg_err(path: &Path, field: &str, reason: impl Into<String>) -> IoError {
    IoError::Config {
        path: path.into(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// The fields of a PEFT `LoraConfig` that decide what is adapted and how.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftConfig {
    /// `r`
    pub r: usize,
    /// `lora_alpha`
    pub lora_alpha: f32,
    /// `target_modules`
    pub target_modules: Targets,
    /// `exclude_modules`
    pub exclude_modules: Option<Targets>,
    /// `layers_to_transform`
    pub layers_to_transform: Option<Vec<usize>>,
    /// `layers_pattern`
    pub layers_pattern: Option<Vec<String>>,
    /// `rank_pattern`
    pub rank_pattern: Vec<(String, usize)>,
    /// `alpha_pattern`
    pub alpha_pattern: Vec<(String, f32)>,
    /// `use_rslora`
    pub use_rslora: bool,
    /// `lora_dropout`
    pub lora_dropout: f32,
    /// `fan_in_fan_out` (true for GPT-2 `Conv1D` targets)
    pub fan_in_fan_out: bool,
    /// `base_model_name_or_path`
    pub base_model_name_or_path: Option<String>,
    /// `task_type` (e.g. `CAUSAL_LM`)
    pub task_type: Option<String>,
    /// `modules_to_save`: modules trained in full and saved with the adapter (supported for an
    /// image classifier's head; a language model's adapter with any is refused).
    pub modules_to_save: Vec<String>,
}

impl PeftConfig {
    /// A plain config: rank `r`, `lora_alpha`, the listed target module names (exact paths or
    /// dotted suffixes), no dropout, no patterns, standard `alpha / r` scaling.
    pub fn new(r: usize, lora_alpha: f32, target_modules: &[&str]) -> Self {
        Self {
            r,
            lora_alpha,
            target_modules: Targets::List(target_modules.iter().map(|s| s.to_string()).collect()),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            use_rslora: false,
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            base_model_name_or_path: None,
            task_type: None,
            modules_to_save: Vec::new(),
        }
    }

    /// Parses an `adapter_config.json` value. Variants that change the math and are not
    /// implemented (DoRA, `lora_bias`, trained biases) are errors naming the field.
    pub fn from_json(path: &Path, v: &Value) -> Result<Self> {
        let get = |k: &str| v.get(k).unwrap_or(&Value::Null);
        if !v.is_object() {
            return Err(cfg_err(path, "(file)", "expected a JSON object"));
        }
        let string = |k: &str, default: &'static str| -> Result<String> {
            match get(k) {
                Value::Null => Ok(default.to_string()),
                Value::String(s) => Ok(s.clone()),
                other => Err(cfg_err(path, k, format!("expected a string, got {other}"))),
            }
        };
        let flag = |k: &str| py_bool(path, k, get(k));
        let peft_type = string("peft_type", "LORA")?;
        if peft_type != "LORA" {
            return Err(cfg_err(
                path,
                "peft_type",
                format!("`{peft_type}` is not supported (LORA)"),
            ));
        }
        if flag("use_dora")? {
            return Err(cfg_err(path, "use_dora", "DoRA adapters are not supported"));
        }
        if flag("lora_bias")? {
            return Err(cfg_err(path, "lora_bias", "true is not supported"));
        }
        if flag("use_qalora")? {
            return Err(cfg_err(path, "use_qalora", "true is not supported"));
        }
        let bias = string("bias", "none")?;
        if bias != "none" {
            return Err(cfg_err(
                path,
                "bias",
                format!("`{bias}` is not supported (none)"),
            ));
        }
        // Variants whose tensors or math we do not implement: refused when set, rather than an
        // adapter that loads and computes something else.
        let modules_to_save = match get("modules_to_save") {
            Value::Null => Vec::new(),
            Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        cfg_err(
                            path,
                            "modules_to_save",
                            format!("expected module names, got {x}"),
                        )
                    })
                })
                .collect::<Result<_>>()?,
            other => {
                return Err(cfg_err(
                    path,
                    "modules_to_save",
                    format!("expected a list of module names, got {other}"),
                ))
            }
        };
        for k in [
            "target_parameters",
            "trainable_token_indices",
            "layer_replication",
            "alora_invocation_tokens",
        ] {
            let set = match get(k) {
                Value::Null => false,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                _ => true,
            };
            if set {
                return Err(cfg_err(path, k, format!("{} is not supported", get(k))));
            }
        }
        let r = match get("r") {
            Value::Number(n) => match n.as_u64() {
                Some(r) if (1..=MAX_RANK).contains(&r) => r as usize,
                _ => {
                    return Err(cfg_err(
                        path,
                        "r",
                        format!("must be an integer from 1 to {MAX_RANK}, got {n}"),
                    ))
                }
            },
            other => {
                return Err(cfg_err(
                    path,
                    "r",
                    format!("must be a positive integer, got {other}"),
                ))
            }
        };
        // Absent: PEFT's default (8). An explicit null is not a number PEFT could use.
        let lora_alpha = match v.get("lora_alpha") {
            None => 8.0,
            Some(x) => finite_f32(path, "lora_alpha", x)?,
        };
        let target_modules = Targets::parse(path, "target_modules", get("target_modules"))?
            .ok_or_else(|| cfg_err(path, "target_modules", "missing"))?;
        let layers_to_transform = match get("layers_to_transform") {
            Value::Null => None,
            Value::Number(n) => Some(vec![n
                .as_u64()
                .ok_or_else(|| cfg_err(path, "layers_to_transform", "expected a layer index"))?
                as usize]),
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| {
                        x.as_u64().map(|n| n as usize).ok_or_else(|| {
                            cfg_err(path, "layers_to_transform", "expected layer indices")
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => {
                return Err(cfg_err(
                    path,
                    "layers_to_transform",
                    "expected an integer or a list",
                ))
            }
        };
        let layers_pattern = match get("layers_pattern") {
            Value::Null => None,
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| {
                        x.as_str().map(String::from).ok_or_else(|| {
                            cfg_err(path, "layers_pattern", "expected a list of strings")
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => {
                return Err(cfg_err(
                    path,
                    "layers_pattern",
                    "expected a string or a list",
                ))
            }
        };
        let pattern = |field: &str| -> Result<Vec<(String, &Value)>> {
            match get(field) {
                Value::Null => Ok(Vec::new()),
                Value::Object(m) => Ok(m.iter().map(|(k, x)| (k.clone(), x)).collect()),
                _ => Err(cfg_err(path, field, "expected an object")),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(k, x)| match x.as_u64() {
                Some(r) if (1..=MAX_RANK).contains(&r) => Ok((k, r as usize)),
                _ => Err(cfg_err(
                    path,
                    &format!("rank_pattern.{k}"),
                    format!("must be an integer from 1 to {MAX_RANK}, got {x}"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let alpha_pattern = pattern("alpha_pattern")?
            .into_iter()
            .map(|(k, x)| {
                Ok((
                    k.clone(),
                    finite_f32(path, &format!("alpha_pattern.{k}"), x)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let lora_dropout = match get("lora_dropout") {
            Value::Null => 0.0,
            x => finite_f32(path, "lora_dropout", x)?,
        };
        if !(0.0..1.0).contains(&lora_dropout) {
            return Err(cfg_err(
                path,
                "lora_dropout",
                format!("must be in [0, 1), got {lora_dropout}"),
            ));
        }
        Ok(Self {
            r,
            lora_alpha,
            target_modules,
            exclude_modules: Targets::parse(path, "exclude_modules", get("exclude_modules"))?,
            layers_to_transform,
            layers_pattern,
            rank_pattern,
            alpha_pattern,
            use_rslora: flag("use_rslora")?,
            lora_dropout,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            base_model_name_or_path: get("base_model_name_or_path").as_str().map(String::from),
            task_type: get("task_type").as_str().map(String::from),
            modules_to_save,
        })
    }

    /// Reads `dir/adapter_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("adapter_config.json");
        Self::from_json(&p, &read_json(&p)?)
    }

    /// The layer index PEFT reads from a module path: the first numeric segment that follows a
    /// `layers_pattern` segment, or (without a pattern) the first `.<name>.<digits>.` after at
    /// least one leading segment.
    fn layer_index(&self, module: &str) -> Option<usize> {
        let parts: Vec<&str> = module.split('.').collect();
        // The index segment must be followed by another segment (PEFT's regex ends in `\.`).
        for i in 1..parts.len().saturating_sub(1) {
            let ok = match &self.layers_pattern {
                Some(pats) if !pats.is_empty() => pats.iter().any(|p| p == parts[i - 1]),
                _ => i >= 2,
            };
            if ok {
                if let Ok(n) = parts[i].parse::<usize>() {
                    if parts[i].bytes().all(|b| b.is_ascii_digit()) {
                        return Some(n);
                    }
                }
            }
        }
        None
    }

    /// Whether `module` gets an adapter.
    pub fn selects(&self, module: &str, head: &str) -> Result<bool> {
        if !self.target_modules.matches(module, head)? {
            return Ok(false);
        }
        if let Some(ex) = &self.exclude_modules {
            if ex.matches(module, "")? && !matches!(ex, Targets::AllLinear) {
                return Ok(false);
            }
        }
        // As in PEFT, layer filtering applies to name-list targets (and all-linear, which PEFT
        // expands into a name list), not to a regex, which already says what it wants.
        if let (Some(layers), false) = (
            &self.layers_to_transform,
            matches!(self.target_modules, Targets::Regex(_)),
        ) {
            match self.layer_index(module) {
                Some(i) if layers.contains(&i) => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    fn pattern_value<T: Copy>(pats: &[(String, T)], module: &str) -> Result<Option<T>> {
        for (k, v) in pats {
            let re = Regex::new(&format!("^(?:.*\\.)?(?:{k})$")).map_err(|e| IoError::Config {
                path: PathBuf::from("adapter_config.json"),
                field: format!("pattern `{k}`"),
                reason: e.to_string(),
            })?;
            if re.is_match(module) {
                return Ok(Some(*v));
            }
        }
        Ok(None)
    }

    /// The `LoraConfig` for `module`, after `rank_pattern` / `alpha_pattern`.
    pub fn lora_config_for(&self, module: &str) -> Result<LoraConfig> {
        let rank = Self::pattern_value(&self.rank_pattern, module)?.unwrap_or(self.r);
        let alpha = Self::pattern_value(&self.alpha_pattern, module)?.unwrap_or(self.lora_alpha);
        let cfg = LoraConfig {
            rank,
            alpha,
            use_rslora: self.use_rslora,
            dropout: self.lora_dropout,
            init: LoraInit::KaimingUniform,
        };
        cfg.validate().map_err(|e| {
            cfg_err(
                Path::new("adapter_config.json"),
                "lora_alpha / r (or their patterns)",
                format!("for module `{module}`: {e}"),
            )
        })?;
        Ok(cfg)
    }
}

/// Adds adapters to every module `cfg` selects; returns their paths. A target that selects
/// nothing is an error listing the model's linear modules.
pub fn inject(model: &mut dyn CausalLm, cfg: &PeftConfig, seed: u64) -> Result<Vec<String>> {
    let head = model.output_head().to_string();
    let mut chosen = Vec::new();
    for (i, (name, lin)) in model.linears_mut().into_iter().enumerate() {
        if cfg.selects(&name, &head)? {
            let lc = cfg.lora_config_for(&name)?;
            lin.inject(&lc, seed.wrapping_add(i as u64))?;
            chosen.push(name);
        }
    }
    if chosen.is_empty() {
        let available: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
        return Err(IoError::NoTarget {
            target: cfg.target_modules.describe(),
            available: available.join(", "),
        });
    }
    Ok(chosen)
}

/// Loads a PEFT adapter directory into `model`: reads the config, injects, and copies the
/// weights. Every adapted module must have both tensors with the right shapes, and every tensor
/// in the file must belong to an adapted module (an adapter for another model is refused).
pub fn load_adapter(model: &mut dyn CausalLm, dir: &Path) -> Result<PeftConfig> {
    if dir.is_file() {
        return Err(IoError::Config {
            path: dir.into(),
            field: "--adapter".into(),
            reason: "is a file, but an adapter is a PEFT directory (adapter_config.json and \
                     adapter_model.safetensors); a kohya file converts to one with `lora convert \
                     --from FILE --to DIR --model MODEL`"
                .into(),
        });
    }
    if !dir.is_dir() {
        return Err(IoError::Missing {
            path: dir.into(),
            what: "adapter directory",
        });
    }
    let cfg = PeftConfig::load(dir)?;
    if !cfg.modules_to_save.is_empty() {
        return Err(cfg_err(
            &dir.join("adapter_config.json"),
            "modules_to_save",
            format!(
                "{:?}: modules trained in full are supported for image classifiers' heads, not \
                 for language models yet",
                cfg.modules_to_save
            ),
        ));
    }
    let st = dir.join("adapter_model.safetensors");
    if !st.exists() {
        let bin = dir.join("adapter_model.bin");
        let what = if bin.exists() {
            "adapter_model.safetensors (adapter_model.bin is a pickle file, which is never read: unpickling can run arbitrary code; convert it with PEFT's save_pretrained(safe_serialization=True))"
        } else {
            "adapter weights"
        };
        return Err(IoError::Missing { path: st, what });
    }
    let file = SafetensorsFile::open(&st)?;
    // The shapes the config implies are checked against the file before any adapter is
    // allocated: a config's rank is only a claim until the tensors agree.
    let head = model.output_head().to_string();
    for (name, lin) in model.linears() {
        if !cfg.selects(&name, &head)? {
            continue;
        }
        let r = cfg.lora_config_for(&name)?.rank;
        let (i, o) = lin.dims();
        for (part, expected) in [("lora_A", [r, i]), ("lora_B", [o, r])] {
            let key = format!("base_model.model.{name}.{part}.weight");
            match file.meta(&key) {
                None => {
                    return Err(IoError::MissingTensor {
                        path: st.clone(),
                        key,
                    })
                }
                Some(m) if m.shape != expected => {
                    return Err(IoError::Config {
                        path: st.clone(),
                        field: key,
                        reason: format!(
                            "shape {:?}, but adapter_config.json's rank for this module and the \
                             model's layer give {expected:?}",
                            m.shape
                        ),
                    })
                }
                Some(_) => {}
            }
        }
    }
    let chosen = inject(model, &cfg, 0)?;
    let mut used = std::collections::HashSet::new();
    for (name, lin) in model.linears_mut() {
        if !chosen.contains(&name) {
            continue;
        }
        let l = match lin {
            lora_core::models::Linear::Lora(l) => l,
            lora_core::models::Linear::Frozen { .. } => {
                unreachable!("inject wrapped every chosen module")
            }
        };
        for (part, t) in [("lora_A", &l.lora_a), ("lora_B", &l.lora_b)] {
            let key = format!("base_model.model.{name}.{part}.weight");
            // Shapes were checked above.
            let (values, _) = file.read_f32_finite(&key)?;
            t.set_data(values)?;
            used.insert(key);
        }
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

fn number(x: f64) -> Value {
    // PEFT writes what Python holds: an int stays an int (`"lora_alpha": 8`).
    if x.fract() == 0.0 && x.abs() < 1e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

fn targets_json(t: &Targets, adapted: &[String]) -> Value {
    match t {
        Targets::List(l) => Value::from(l.clone()),
        Targets::Regex(r) => Value::from(r.clone()),
        // PEFT saves all-linear expanded into the leaf names it matched.
        Targets::AllLinear => {
            let mut names: Vec<String> = adapted
                .iter()
                .map(|n| n.rsplit('.').next().unwrap_or(n).to_string())
                .collect();
            names.sort();
            names.dedup();
            Value::from(names)
        }
    }
}

/// The `adapter_config.json` PEFT would write for `cfg` (keys sorted, as PEFT's
/// `json.dumps(..., sort_keys=True)`).
pub fn config_json(cfg: &PeftConfig, adapted: &[String], fan_in_fan_out: bool) -> Value {
    let opt_targets =
        |t: &Option<Targets>| t.as_ref().map_or(Value::Null, |t| targets_json(t, adapted));
    let pattern =
        |p: Vec<(String, f64)>| Value::Object(p.into_iter().map(|(k, v)| (k, number(v))).collect());
    let mut fields: Vec<(&str, Value)> = vec![
        (
            "alpha_pattern",
            pattern(
                cfg.alpha_pattern
                    .iter()
                    .map(|(k, v)| (k.clone(), *v as f64))
                    .collect(),
            ),
        ),
        ("auto_mapping", Value::Null),
        (
            "base_model_name_or_path",
            cfg.base_model_name_or_path
                .clone()
                .map_or(Value::Null, Value::from),
        ),
        ("bias", Value::from("none")),
        ("exclude_modules", opt_targets(&cfg.exclude_modules)),
        ("fan_in_fan_out", Value::from(fan_in_fan_out)),
        ("inference_mode", Value::from(true)),
        ("init_lora_weights", Value::from(true)),
        (
            "layers_pattern",
            cfg.layers_pattern.clone().map_or(Value::Null, Value::from),
        ),
        (
            "layers_to_transform",
            cfg.layers_to_transform
                .clone()
                .map_or(Value::Null, Value::from),
        ),
        ("lora_alpha", number(cfg.lora_alpha as f64)),
        ("lora_bias", Value::from(false)),
        ("lora_dropout", Value::from(cfg.lora_dropout as f64)),
        (
            "modules_to_save",
            if cfg.modules_to_save.is_empty() {
                Value::Null
            } else {
                Value::from(cfg.modules_to_save.clone())
            },
        ),
        ("peft_type", Value::from("LORA")),
        ("r", Value::from(cfg.r)),
        (
            "rank_pattern",
            pattern(
                cfg.rank_pattern
                    .iter()
                    .map(|(k, v)| (k.clone(), *v as f64))
                    .collect(),
            ),
        ),
        ("revision", Value::Null),
        ("target_modules", targets_json(&cfg.target_modules, adapted)),
        (
            "task_type",
            cfg.task_type.clone().map_or(Value::Null, Value::from),
        ),
        ("use_dora", Value::from(false)),
        ("use_rslora", Value::from(cfg.use_rslora)),
    ];
    fields.sort_by(|a, b| a.0.cmp(b.0));
    Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// Writes `model`'s adapters as a PEFT adapter directory (`adapter_config.json`,
/// `adapter_model.safetensors`, f32), each file atomically. `dir` is created if needed.
pub fn save_adapter(model: &dyn CausalLm, cfg: &PeftConfig, dir: &Path) -> Result<()> {
    let layers: Vec<(String, &LoraLinear)> = model
        .linears()
        .into_iter()
        .filter_map(|(name, lin)| lin.lora().map(|l| (name, l)))
        .collect();
    save_layers(&layers, cfg, dir)
}

/// Writes LoRA layers of your own model as a PEFT adapter directory: each `(module path,
/// layer)` becomes `base_model.model.<path>.lora_A.weight` / `.lora_B.weight`, as PEFT names
/// them, so PEFT loads the adapter onto a PyTorch model with the same module paths.
///
/// ```
/// use lora_core::{lora::WeightLayout, LoraConfig, LoraLinear, Tensor};
/// use lora_io::peft::{save_layers, PeftConfig};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg = LoraConfig { rank: 4, alpha: 8.0, ..Default::default() };
/// let w = Tensor::new(vec![0.0; 16 * 8], &[16, 8])?;
/// let layer = LoraLinear::new(w, WeightLayout::OutIn, None, &cfg, 0)?;
/// let dir = std::env::temp_dir().join("lora-doc-save-layers");
/// save_layers(&[("encoder.proj".into(), &layer)], &PeftConfig::new(4, 8.0, &["proj"]), &dir)?;
/// assert!(dir.join("adapter_model.safetensors").exists());
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(()) }
/// ```
pub fn save_layers(layers: &[(String, &LoraLinear)], cfg: &PeftConfig, dir: &Path) -> Result<()> {
    let mut adapted = Vec::new();
    let mut fan_in_fan_out = false;
    let mut data: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, l) in layers {
        fan_in_fan_out |= l.layout == lora_core::lora::WeightLayout::InOut;
        for (part, t) in [("lora_A", &l.lora_a), ("lora_B", &l.lora_b)] {
            data.push((
                format!("base_model.model.{name}.{part}.weight"),
                t.shape().to_vec(),
                t.try_to_vec()?, // a device tensor is downloaded; a failure is an error
            ));
        }
        adapted.push(name.clone());
    }
    if adapted.is_empty() {
        return Err(IoError::NoTarget {
            target: "(save)".into(),
            available: "the model has no adapters to save".into(),
        });
    }
    write_adapter(dir, &config_json(cfg, &adapted, fan_in_fan_out), &data)
}

/// Writes an adapter directory: `adapter_model.safetensors` (f32 tensors `(key, shape,
/// values)`) and `adapter_config.json` (`json`), each atomically; `dir` is created if needed.
pub(crate) fn write_adapter(
    dir: &Path,
    json: &Value,
    data: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(crate::error::io_err(dir))?;
    let tensors: Vec<crate::write::OutTensor> = data
        .iter()
        .map(|(n, s, v)| crate::write::OutTensor {
            name: n.clone(),
            shape: s.clone(),
            values: v,
            dtype: crate::write::OutDtype::F32,
        })
        .collect();
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    crate::write::write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, meta)?;
    let text = serde_json::to_string_pretty(json).expect("a JSON value always serialises");
    crate::write::write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
}
