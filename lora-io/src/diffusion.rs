//! Stable Diffusion files: `scheduler/scheduler_config.json` read into the core's
//! [`ScheduleConfig`] with diffusers' defaults for the sampler that will use it (a field a file
//! leaves out takes the default of the scheduler class that loads it, as `from_config` does:
//! SD 1.x's files, saved by `PNDMScheduler`, have no `timestep_spacing`, which DDIM then reads
//! as `leading` and Euler as `linspace`). Settings these samplers do not implement are refused
//! by name rather than ignored.

use crate::error::{IoError, Result};
use lora_core::diffusion::{BetaSchedule, Prediction, ScheduleConfig, Spacing};
use serde_json::Value;
use std::path::Path;

/// The samplers, for their defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    /// `DDIMScheduler` (and `DDPMScheduler` for training noise).
    Ddim,
    /// `EulerDiscreteScheduler`.
    Euler,
}

/// Reads `path` (a `scheduler_config.json`) for `kind`.
pub fn read_scheduler_config(path: &Path, kind: SamplerKind) -> Result<ScheduleConfig> {
    let v = crate::hf::read_json(path)?;
    scheduler_config(path, &v, kind)
}

/// [`read_scheduler_config`] of an already parsed file (`path` names it in errors).
pub fn scheduler_config(path: &Path, v: &Value, kind: SamplerKind) -> Result<ScheduleConfig> {
    let err = |field: &str, reason: String| IoError::Config {
        path: path.into(),
        field: field.into(),
        reason,
    };
    if !v.is_object() {
        return Err(err("(file)", "expected a JSON object".into()));
    }
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    let num = |k: &str, default: f64| -> Result<f64> {
        match get(k) {
            None => Ok(default),
            Some(x) => x
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| err(k, format!("expected a number, got {x}"))),
        }
    };
    let uint = |k: &str, default: usize| -> Result<usize> {
        match get(k) {
            None => Ok(default),
            Some(x) => x
                .as_u64()
                .filter(|&n| n <= 1 << 20)
                .map(|n| n as usize)
                .ok_or_else(|| err(k, format!("expected a whole number up to 2^20, got {x}"))),
        }
    };
    let flag = |k: &str, default: bool| -> Result<bool> {
        match get(k) {
            None => Ok(default),
            Some(x) => x
                .as_bool()
                .ok_or_else(|| err(k, format!("expected true or false, got {x}"))),
        }
    };
    let text = |k: &str, default: &'static str| -> Result<String> {
        match get(k) {
            None => Ok(default.into()),
            Some(x) => x
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| err(k, format!("expected a string, got {x}"))),
        }
    };
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
        SamplerKind::Euler => "linspace",
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
        if kind == SamplerKind::Euler && flag(k, ok)? != ok {
            return Err(err(k, "this sigma schedule is not supported yet".into()));
        }
    }
    for (k, want) in [
        ("interpolation_type", "linear"),
        ("final_sigmas_type", "zero"),
        ("timestep_type", "discrete"),
    ] {
        let got = text(k, want)?;
        if kind == SamplerKind::Euler && got != want {
            return Err(err(
                k,
                format!("`{got}` is not supported yet (only `{want}`)"),
            ));
        }
    }
    let rescale = flag("rescale_betas_zero_snr", false)?;
    if rescale && kind == SamplerKind::Euler {
        return Err(err(
            "rescale_betas_zero_snr",
            "Euler with zero terminal SNR is not supported yet".into(),
        ));
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
        set_alpha_to_one: flag("set_alpha_to_one", true)?,
        rescale_betas_zero_snr: rescale,
        clip_sample: clip,
    })
}
