//! Stable Diffusion files: `text_encoder/` (the CLIP text model), and
//! `scheduler/scheduler_config.json` read into the core's
//! [`ScheduleConfig`] with diffusers' defaults for the sampler that will use it (a field a file
//! leaves out takes the default of the scheduler class that loads it, as `from_config` does:
//! SD 1.x's files, saved by `PNDMScheduler`, have no `timestep_spacing`, which DDIM then reads
//! as `leading` and Euler as `linspace`). Settings these samplers do not implement are refused
//! by name rather than ignored.

use crate::error::{IoError, Result};
use lora_core::diffusion::{BetaSchedule, Prediction, ScheduleConfig, Spacing};
use lora_core::models::clip_text::{ClipTextConfig, ClipTextModel};
use lora_core::models::vit::Activation;
use serde_json::Value;
use std::path::Path;

/// The samplers, for their defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    /// `DDIMScheduler` (and `DDPMScheduler` for training noise).
    Ddim,
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `DPMSolverMultistepScheduler` (DPM++ 2M).
    DpmPP,
}

/// Reads `path` (a `scheduler_config.json`) for `kind`.
pub fn read_scheduler_config(path: &Path, kind: SamplerKind) -> Result<ScheduleConfig> {
    let Some(bytes) = crate::files::read_small(path, "scheduler config")? else {
        return Err(IoError::Missing {
            path: path.into(),
            what: "scheduler config",
        });
    };
    let text = String::from_utf8_lossy(&bytes);
    let v: Value =
        serde_json::from_str(&quote_python_literals(&text)).map_err(|source| IoError::Json {
            path: path.into(),
            source,
        })?;
    scheduler_config(path, &v, kind)
}

/// diffusers writes its configs with Python's `json`, which spells non-finite floats as the
/// bare words `-Infinity`, `Infinity` and `NaN` (DPMSolverMultistepScheduler's
/// `lambda_min_clipped` is `-Infinity` by default): outside strings they become the strings
/// `"-Infinity"`, `"Infinity"`, `"NaN"`, which the fields that accept them read and the others
/// refuse as not a number.
fn quote_python_literals(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_str, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else if let Some(word) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|w| rest.starts_with(w))
        {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// [`read_scheduler_config`] of an already parsed file (`path` names it in errors).
pub fn scheduler_config(path: &Path, v: &Value, kind: SamplerKind) -> Result<ScheduleConfig> {
    // The config-field readers hf.rs gives model configs (sizes, flags, strings, errors naming
    // the file and field); numbers stay f64 here (the schedule is computed in f64).
    let f = crate::hf::Fields { path, v };
    let err = |field: &str, reason: String| f.err(field, reason);
    if !v.is_object() {
        return Err(err("(file)", "expected a JSON object".into()));
    }
    let get = |k: &str| f.get(k);
    let num = |k: &str, default: f64| -> Result<f64> {
        match get(k) {
            None => Ok(default),
            Some(x) => x
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| err(k, format!("expected a number, got {x}"))),
        }
    };
    let uint = |k: &str, default: usize| f.usize_or(k, Some(default));
    let flag = |k: &str, default: bool| f.bool_or(k, default);
    let text = |k: &str, default: &'static str| f.str_or(k, default).map(str::to_owned);
    let beta_schedule = match text("beta_schedule", "linear")?.as_str() {
        "linear" => BetaSchedule::Linear,
        "scaled_linear" => BetaSchedule::ScaledLinear,
        "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
        other => {
            return Err(err(
                "beta_schedule",
                format!("`{other}`: expected linear, scaled_linear or squaredcos_cap_v2"),
            ))
        }
    };
    let prediction = match text("prediction_type", "epsilon")?.as_str() {
        "epsilon" => Prediction::Epsilon,
        "v_prediction" => Prediction::V,
        "sample" => Prediction::Sample,
        other => {
            return Err(err(
                "prediction_type",
                format!("`{other}`: expected epsilon, v_prediction or sample"),
            ))
        }
    };
    let default_spacing = match kind {
        SamplerKind::Ddim => "leading",
        SamplerKind::Euler | SamplerKind::DpmPP => "linspace",
    };
    let spacing = match text("timestep_spacing", default_spacing)?.as_str() {
        "leading" => Spacing::Leading,
        "trailing" => Spacing::Trailing,
        "linspace" => Spacing::Linspace,
        other => {
            return Err(err(
                "timestep_spacing",
                format!("`{other}`: expected leading, trailing or linspace"),
            ))
        }
    };
    if get("trained_betas").is_some() {
        return Err(err(
            "trained_betas",
            "explicit betas are not supported yet".into(),
        ));
    }
    if flag("thresholding", false)? {
        return Err(err(
            "thresholding",
            "dynamic thresholding is not supported yet".into(),
        ));
    }
    // Euler's options beyond the plain schedule: refused when set, not ignored.
    for (k, ok) in [
        ("use_karras_sigmas", false),
        ("use_exponential_sigmas", false),
        ("use_beta_sigmas", false),
    ] {
        if kind != SamplerKind::Ddim && flag(k, ok)? != ok {
            return Err(err(k, "this sigma schedule is not supported yet".into()));
        }
    }
    for (k, want) in [
        ("interpolation_type", "linear"),
        ("final_sigmas_type", "zero"),
        ("timestep_type", "discrete"),
    ] {
        let got = text(k, want)?;
        let applies = match k {
            "interpolation_type" | "timestep_type" => kind == SamplerKind::Euler,
            _ => kind != SamplerKind::Ddim,
        };
        if applies && got != want {
            return Err(err(
                k,
                format!("`{got}` is not supported yet (only `{want}`)"),
            ));
        }
    }
    let rescale = flag("rescale_betas_zero_snr", false)?;
    if rescale && kind != SamplerKind::Ddim {
        return Err(err(
            "rescale_betas_zero_snr",
            "Euler and DPM++ with zero terminal SNR are not supported yet".into(),
        ));
    }
    let (mut solver_order, mut solver_heun) = (2, false);
    if kind == SamplerKind::DpmPP {
        let algo = text("algorithm_type", "dpmsolver++")?;
        if algo != "dpmsolver++" {
            return Err(err(
                "algorithm_type",
                format!("`{algo}` is not supported yet (only dpmsolver++)"),
            ));
        }
        solver_order = uint("solver_order", 2)?;
        if !(1..=2).contains(&solver_order) {
            return Err(err(
                "solver_order",
                format!("{solver_order}: only 1 and 2 are supported"),
            ));
        }
        solver_heun = match text("solver_type", "midpoint")?.as_str() {
            "midpoint" => false,
            "heun" => true,
            other => {
                return Err(err(
                    "solver_type",
                    format!("`{other}`: expected midpoint or heun"),
                ))
            }
        };
        if flag("use_lu_lambdas", false)? || flag("use_flow_sigmas", false)? {
            return Err(err(
                "use_lu_lambdas",
                "this sigma schedule is not supported yet".into(),
            ));
        }
        if get("variance_type").is_some() {
            return Err(err(
                "variance_type",
                "learned variance is not supported".into(),
            ));
        }
        match get("lambda_min_clipped") {
            None => {}
            Some(x) if x.as_str() == Some("-Infinity") => {}
            Some(x) => {
                return Err(err(
                    "lambda_min_clipped",
                    format!("{x}: clipping lambda is not supported yet (only -Infinity)"),
                ))
            }
        }
    }
    // DDIM clips by default (diffusers' DDIMScheduler: clip_sample=True, range 1).
    let clip = match kind {
        SamplerKind::Ddim if flag("clip_sample", true)? => Some(num("clip_sample_range", 1.0)?),
        _ => None,
    };
    Ok(ScheduleConfig {
        num_train_timesteps: uint("num_train_timesteps", 1000)?,
        beta_start: num("beta_start", 0.0001)?,
        beta_end: num("beta_end", 0.02)?,
        beta_schedule,
        prediction,
        spacing,
        steps_offset: uint("steps_offset", 0)?,
        // DDIM's alone (false, unused, for the others).
        set_alpha_to_one: kind == SamplerKind::Ddim && flag("set_alpha_to_one", true)?,
        rescale_betas_zero_snr: rescale,
        clip_sample: clip,
        solver_order,
        solver_heun,
    })
}

/// Reads a `text_encoder/config.json` (`CLIPTextModel`) into the core's config. CLIP's text
/// defaults (transformers' `CLIPTextConfig`) apply to absent fields.
pub fn read_clip_text_config(path: &Path) -> Result<ClipTextConfig> {
    let v = crate::hf::read_json(path)?;
    let f = crate::hf::Fields { path, v: &v };
    let act = f.str_or("hidden_act", "quick_gelu")?;
    let hidden_act = Activation::parse(act).map_err(|e| f.err("hidden_act", e.to_string()))?;
    let cfg = ClipTextConfig {
        vocab_size: f.usize_or("vocab_size", Some(49408))?,
        hidden_size: f.usize_or("hidden_size", Some(512))?,
        intermediate_size: f.usize_or("intermediate_size", Some(2048))?,
        num_hidden_layers: f.usize_or("num_hidden_layers", Some(12))?,
        num_attention_heads: f.usize_or("num_attention_heads", Some(8))?,
        max_position_embeddings: f.usize_or("max_position_embeddings", Some(77))?,
        hidden_act,
        layer_norm_eps: f.positive_f32_or("layer_norm_eps", 1e-5)?,
    };
    for (k, n) in [
        ("vocab_size", cfg.vocab_size),
        ("hidden_size", cfg.hidden_size),
        ("num_attention_heads", cfg.num_attention_heads),
        ("max_position_embeddings", cfg.max_position_embeddings),
    ] {
        if n == 0 {
            return Err(f.err(k, "must be at least 1"));
        }
    }
    Ok(cfg)
}

/// Loads a `text_encoder/` directory (config.json, model.safetensors): the Hub's SD checkpoints
/// name the parameters `text_model.…`, transformers 5 saves them without that prefix; both
/// read. A tensor the model does not use is an error naming it (a config with fewer layers
/// than its checkpoint).
pub fn load_clip_text(dir: &Path) -> Result<ClipTextModel> {
    let cfg = read_clip_text_config(&dir.join("config.json"))?;
    let w = crate::hf::Weights::open(dir)?;
    let mut used = std::collections::HashSet::new();
    let mut load = |k: &str, shape: &[usize]| -> Result<lora_core::Tensor> {
        let key = [k, k.strip_prefix("text_model.").unwrap_or(k)]
            .into_iter()
            .find(|c| w.contains(c))
            .unwrap_or(k)
            .to_string();
        let t = w.tensor(&key, shape)?;
        used.insert(key);
        Ok(t)
    };
    let model = ClipTextModel::load(&cfg, &mut load).map_err(|e| match e {
        IoError::Core(lora_core::CoreError::InvalidConfig { field, reason }) => IoError::Config {
            path: dir.join("config.json"),
            field: field.into(),
            reason,
        },
        e => e,
    })?;
    // position_ids is a buffer some checkpoints carry; the projection belongs to
    // CLIPTextModelWithProjection (SDXL's second encoder), not used here.
    let ignorable = |k: &str| k.ends_with("position_ids") || k.starts_with("text_projection");
    if let Some(extra) = w
        .names()
        .into_iter()
        .find(|k| !used.contains(*k) && !ignorable(k))
    {
        return Err(IoError::Config {
            path: dir.join("config.json"),
            field: "num_hidden_layers".into(),
            reason: format!("the weights hold `{extra}`, which this config's model does not use"),
        });
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    /// Python's non-finite literals become strings outside strings only.
    #[test]
    fn python_literals_are_quoted_outside_strings() {
        let t = r#"{"a": -Infinity, "b": "NaN and \" Infinity", "c": [NaN, Infinity]}"#;
        let v: serde_json::Value = serde_json::from_str(&super::quote_python_literals(t)).unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"], "NaN and \" Infinity");
        assert_eq!(v["c"][0], "NaN");
        assert_eq!(v["c"][1], "Infinity");
    }
}
