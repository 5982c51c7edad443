//! Stable Diffusion files: `text_encoder/` (the CLIP text model), `unet/` (the denoiser), `vae/`
//! (the autoencoder), and
//! `scheduler/scheduler_config.json` read into the core's
//! [`ScheduleConfig`] with diffusers' defaults for the sampler that will use it (a field a file
//! leaves out takes the default of the scheduler class that loads it, as `from_config` does:
//! SD 1.x's files, saved by `PNDMScheduler`, have no `timestep_spacing`, which DDIM then reads
//! as `leading` and Euler as `linspace`). Settings these samplers do not implement are refused
//! by name rather than ignored.

use crate::error::{IoError, Result};
use lora_core::diffusion::{BetaSchedule, Prediction, ScheduleConfig, Spacing};
use lora_core::models::clip_text::{ClipTextConfig, ClipTextModel};
use lora_core::models::unet::{BlockKind, UNet2DCondition, UNetConfig};
use lora_core::models::vae::{AutoencoderKl, VaeConfig};
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
    clip_text_config(path, &crate::hf::read_json(path)?)
}

/// [`read_clip_text_config`] on JSON already read (`path` names it in errors).
pub fn clip_text_config(path: &Path, v: &Value) -> Result<ClipTextConfig> {
    let f = crate::hf::Fields { path, v };
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

/// A per-block size that diffusers takes as one integer or a list of one per down block.
fn per_block(
    f: &crate::hf::Fields,
    field: &str,
    default: Option<usize>,
    blocks: usize,
) -> Result<Vec<usize>> {
    match f.get(field) {
        Some(Value::Array(items)) => {
            if items.len() != blocks {
                return Err(f.err(
                    field,
                    format!("{} entries for {blocks} blocks", items.len()),
                ));
            }
            items
                .iter()
                .map(|x| match x.as_u64() {
                    Some(n) if n >= 1 && n <= crate::hf::MAX_SIZE as u64 => Ok(n as usize),
                    _ => Err(f.err(field, format!("expected positive integers, got {x}"))),
                })
                .collect()
        }
        _ => Ok(vec![f.usize_or(field, default)?; blocks]),
    }
}

/// The block kinds of `down_block_types` / `up_block_types`.
fn block_kinds(
    f: &crate::hf::Fields,
    field: &str,
    plain: &str,
    cross: &str,
) -> Result<Vec<BlockKind>> {
    let items = f
        .get(field)
        .and_then(|v| v.as_array())
        .ok_or_else(|| f.err(field, "missing or not a list"))?;
    items
        .iter()
        .map(|x| match x.as_str() {
            Some(t) if t == plain => Ok(BlockKind::Plain),
            Some(t) if t == cross => Ok(BlockKind::CrossAttn),
            _ => Err(f.err(
                field,
                format!("{x} is not supported (only {plain} and {cross})"),
            )),
        })
        .collect()
}

/// Reads `unet/config.json` (diffusers' `UNet2DConditionModel`) as SD 1.x and 2.x use it. The
/// fields of variants not implemented here (SDXL's added conditioning, class embeddings,
/// scale-shift time conditioning, other block types, ...) are refused by name when set.
pub fn read_unet_config(path: &Path) -> Result<UNetConfig> {
    unet_config(path, &crate::hf::read_json(path)?)
}

/// [`read_unet_config`] on JSON already read (`path` names it in errors).
pub fn unet_config(path: &Path, v: &Value) -> Result<UNetConfig> {
    let f = crate::hf::Fields { path, v };
    let block_out_channels = sizes_list(&f, "block_out_channels", vec![320, 640, 1280, 1280])?;
    let n = block_out_channels.len();
    // Unsupported variants: each must be absent, null or its default.
    for (field, default) in [
        ("addition_embed_type", Value::Null),
        ("class_embed_type", Value::Null),
        ("num_class_embeds", Value::Null),
        ("encoder_hid_dim", Value::Null),
        ("encoder_hid_dim_type", Value::Null),
        ("time_cond_proj_dim", Value::Null),
        ("time_embedding_act_fn", Value::Null),
        ("timestep_post_act", Value::Null),
        ("cross_attention_norm", Value::Null),
        ("projection_class_embeddings_input_dim", Value::Null),
        ("reverse_transformer_layers_per_block", Value::Null),
        ("mid_block_only_cross_attention", Value::Null),
        ("time_embedding_type", Value::from("positional")),
        ("resnet_time_scale_shift", Value::from("default")),
        ("act_fn", Value::from("silu")),
        ("attention_type", Value::from("default")),
        ("dual_cross_attention", Value::from(false)),
        ("only_cross_attention", Value::from(false)),
        ("resnet_skip_time_act", Value::from(false)),
        ("class_embeddings_concat", Value::from(false)),
    ] {
        if let Some(x) = f.get(field) {
            let same = x == &default || (x.is_number() && x.as_f64() == default.as_f64());
            if !same {
                return Err(f.err(
                    field,
                    format!("{x} is not supported (only {default} is; SD 1.x and 2.x UNets)"),
                ));
            }
        }
    }
    if f.f32_or("resnet_out_scale_factor", 1.0)? != 1.0 {
        return Err(f.err("resnet_out_scale_factor", "only 1.0 is supported"));
    }
    // Absent means diffusers' default (SD 1.4/1.5's configs, written by diffusers 0.6, have no
    // such key); only an explicit null removes the mid block.
    let mid_block = match v.get("mid_block_type") {
        None => true,
        Some(Value::Null) => false,
        Some(Value::String(s)) if s == "UNetMidBlock2DCrossAttn" => true,
        Some(x) => {
            return Err(f.err(
                "mid_block_type",
                format!("{x} is not supported (UNetMidBlock2DCrossAttn or null)"),
            ))
        }
    };
    // diffusers' legacy naming: `attention_head_dim` is the head count when
    // `num_attention_heads` is absent.
    let heads = if f.get("num_attention_heads").is_some() {
        per_block(&f, "num_attention_heads", None, n)?
    } else {
        per_block(&f, "attention_head_dim", Some(8), n)?
    };
    let cross_attention_dim = match f.get("cross_attention_dim") {
        Some(Value::Array(_)) => {
            let v = per_block(&f, "cross_attention_dim", None, n)?;
            if v.iter().any(|&d| d != v[0]) {
                return Err(f.err(
                    "cross_attention_dim",
                    "different widths per block are not supported",
                ));
            }
            v[0]
        }
        _ => f.usize_or("cross_attention_dim", Some(1280))?,
    };
    let freq_shift = f.f32_or("freq_shift", 0.0)?;
    let mid_block_scale_factor = f.f32_or("mid_block_scale_factor", 1.0)?;
    for (field, x) in [
        ("freq_shift", freq_shift),
        ("mid_block_scale_factor", mid_block_scale_factor),
    ] {
        if !x.is_finite() {
            return Err(f.err(field, format!("must be finite, got {x}")));
        }
    }
    if mid_block_scale_factor == 0.0 {
        return Err(f.err("mid_block_scale_factor", "must not be 0"));
    }
    let cfg = UNetConfig {
        in_channels: f.usize_or("in_channels", Some(4))?,
        out_channels: f.usize_or("out_channels", Some(4))?,
        down_blocks: block_kinds(
            &f,
            "down_block_types",
            "DownBlock2D",
            "CrossAttnDownBlock2D",
        )?,
        up_blocks: block_kinds(&f, "up_block_types", "UpBlock2D", "CrossAttnUpBlock2D")?,
        layers_per_block: per_block(&f, "layers_per_block", Some(2), n)?,
        transformer_layers: per_block(&f, "transformer_layers_per_block", Some(1), n)?,
        heads,
        cross_attention_dim,
        norm_num_groups: f.usize_or("norm_num_groups", Some(32))?,
        norm_eps: f.positive_f32_or("norm_eps", 1e-5)?,
        use_linear_projection: f.bool_or("use_linear_projection", false)?,
        flip_sin_to_cos: f.bool_or("flip_sin_to_cos", true)?,
        freq_shift,
        downsample_padding: f.usize_or("downsample_padding", Some(1))?,
        mid_block_scale_factor,
        mid_block,
        center_input_sample: f.bool_or("center_input_sample", false)?,
        conv_in_kernel: f.usize_or("conv_in_kernel", Some(3))?,
        conv_out_kernel: f.usize_or("conv_out_kernel", Some(3))?,
        time_embed_dim: f.usize_or("time_embedding_dim", Some(4 * block_out_channels[0]))?,
        block_out_channels,
    };
    // 0 means diffusers' asymmetric (0, 1, 0, 1) padding before an unpadded convolution, which
    // this UNet does not implement (SD's configs have 1).
    if cfg.downsample_padding != 1 {
        return Err(f.err(
            "downsample_padding",
            "only 1 is supported (SD 1.x and 2.x's)",
        ));
    }
    cfg.check().map_err(|e| match e {
        lora_core::CoreError::InvalidConfig { field, reason } => f.err(field, reason),
        e => IoError::Core(e),
    })?;
    Ok(cfg)
}

/// Loads a diffusers `unet/` directory (config.json and `diffusion_pytorch_model.safetensors`,
/// sharded or not; fp16/bf16 weights stay 16-bit). A tensor the model does not use is an error
/// naming it.
pub fn load_unet(dir: &Path) -> Result<UNet2DCondition> {
    let cfg_path = dir.join("config.json");
    let cfg = read_unet_config(&cfg_path)?;
    load_part(
        dir,
        &cfg_path,
        |_| None,
        |load| UNet2DCondition::load(&cfg, load),
    )
}

/// Reads `vae/config.json` (diffusers' `AutoencoderKL`); other block types, latent statistics
/// and a disabled mid-block attention's alternatives are refused by name.
pub fn read_vae_config(path: &Path) -> Result<VaeConfig> {
    vae_config(path, &crate::hf::read_json(path)?)
}

/// [`read_vae_config`] on JSON already read (`path` names it in errors).
pub fn vae_config(path: &Path, v: &Value) -> Result<VaeConfig> {
    let f = crate::hf::Fields { path, v };
    let block_out_channels = sizes_list(&f, "block_out_channels", vec![64])?;
    for (field, kind) in [
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ] {
        if let Some(x) = f.get(field) {
            let items = x
                .as_array()
                .ok_or_else(|| f.err(field, "expected a list"))?;
            if items.len() != block_out_channels.len() {
                return Err(f.err(
                    field,
                    format!(
                        "{} entries for {} block_out_channels",
                        items.len(),
                        block_out_channels.len()
                    ),
                ));
            }
            if let Some(bad) = items.iter().find(|t| t.as_str() != Some(kind)) {
                return Err(f.err(field, format!("{bad} is not supported (only {kind})")));
            }
        }
    }
    for field in ["latents_mean", "latents_std"] {
        if f.get(field).is_some() {
            return Err(f.err(field, "per-channel latent statistics are not supported"));
        }
    }
    if f.str_or("act_fn", "silu")? != "silu" {
        return Err(f.err("act_fn", "only silu is supported"));
    }
    let cfg = VaeConfig {
        in_channels: f.usize_or("in_channels", Some(3))?,
        out_channels: f.usize_or("out_channels", Some(3))?,
        latent_channels: f.usize_or("latent_channels", Some(4))?,
        layers_per_block: f.usize_or("layers_per_block", Some(1))?,
        norm_num_groups: f.usize_or("norm_num_groups", Some(32))?,
        scaling_factor: f.f32_or("scaling_factor", 0.18215)?,
        shift_factor: f.f32_or("shift_factor", 0.0)?,
        use_quant_conv: f.bool_or("use_quant_conv", true)?,
        use_post_quant_conv: f.bool_or("use_post_quant_conv", true)?,
        mid_block_attention: f.bool_or("mid_block_add_attention", true)?,
        block_out_channels,
    };
    cfg.check().map_err(|e| match e {
        lora_core::CoreError::InvalidConfig { field, reason } => f.err(field, reason),
        e => IoError::Core(e),
    })?;
    Ok(cfg)
}

/// Loads a diffusers `vae/` directory (config.json and `diffusion_pytorch_model.safetensors`).
/// The mid blocks' attention is read under diffusers' current names (`to_q`, `to_k`, `to_v`,
/// `to_out.0`) or the older ones many SD 1.x repositories still ship (`query`, `key`, `value`,
/// `proj_attn`), as diffusers converts them on load. A tensor the model does not use is an
/// error naming it.
pub fn load_vae(dir: &Path) -> Result<AutoencoderKl> {
    let cfg_path = dir.join("config.json");
    let cfg = read_vae_config(&cfg_path)?;
    load_part(dir, &cfg_path, legacy_vae_name, |load| {
        AutoencoderKl::load(&cfg, load)
    })
}

/// A non-empty list of sizes (`block_out_channels`), `default` when absent.
fn sizes_list(f: &crate::hf::Fields, field: &str, default: Vec<usize>) -> Result<Vec<usize>> {
    match f.get(field) {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|x| match x.as_u64() {
                Some(n) if n >= 1 && n <= crate::hf::MAX_SIZE as u64 => Ok(n as usize),
                _ => Err(f.err(field, format!("expected positive integers, got {x}"))),
            })
            .collect(),
        None => Ok(default),
        Some(x) => Err(f.err(field, format!("expected a list of sizes, got {x}"))),
    }
}

/// Builds a diffusers model part from `dir`'s `diffusion_pytorch_model` weights: `build` gets
/// the loader; a key the file lacks is tried under `fallback(key)` (older names); a config
/// error is reported against `cfg_path`, and so is a stored tensor the model did not use.
fn load_part<T>(
    dir: &Path,
    cfg_path: &Path,
    fallback: impl Fn(&str) -> Option<String>,
    build: impl FnOnce(&mut lora_core::models::unet::Loader<IoError>) -> Result<T>,
) -> Result<T> {
    let w = crate::hf::Weights::open_stem(dir, "diffusion_pytorch_model")?;
    let mut used = std::collections::HashSet::new();
    let mut load = |k: &str, shape: &[usize]| -> Result<lora_core::Tensor> {
        let key = if w.contains(k) {
            k.to_string()
        } else {
            fallback(k)
                .filter(|l| w.contains(l))
                .unwrap_or_else(|| k.to_string())
        };
        let t = w.tensor(&key, shape)?;
        used.insert(key);
        Ok(t)
    };
    let model = build(&mut load).map_err(|e| match e {
        IoError::Core(lora_core::CoreError::InvalidConfig { field, reason }) => IoError::Config {
            path: cfg_path.into(),
            field: field.into(),
            reason,
        },
        e => e,
    })?;
    if let Some(extra) = w.names().into_iter().find(|k| !used.contains(*k)) {
        return Err(IoError::Config {
            path: dir.join("diffusion_pytorch_model.safetensors"),
            field: extra.to_string(),
            reason: format!(
                "a tensor the model {} describes does not use (do the config and the weights \
                 belong together?)",
                cfg_path.display()
            ),
        });
    }
    Ok(model)
}

/// The pre-0.14 diffusers name of a VAE attention parameter (`...attentions.0.to_q.weight` was
/// `...attentions.0.query.weight`), if `name` is one of those.
fn legacy_vae_name(name: &str) -> Option<String> {
    let i = name.find(".attentions.0.")? + ".attentions.0.".len();
    let (head, tail) = name.split_at(i);
    let old = [
        ("to_q.", "query."),
        ("to_k.", "key."),
        ("to_v.", "value."),
        ("to_out.0.", "proj_attn."),
    ]
    .iter()
    .find_map(|(new, old)| tail.strip_prefix(new).map(|rest| format!("{old}{rest}")))?;
    Some(format!("{head}{old}"))
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
