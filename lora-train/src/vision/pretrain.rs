//! Full-parameter training of a small YOLOS from scratch: every weight is a trainable tensor,
//! so the same tape, kernels and DETR loss that fine-tune adapters train the whole detector.
//! The result is a Hugging Face model directory (`config.json`, `model.safetensors` with the
//! Hub checkpoints' key names, `preprocessor_config.json`) that `lora train` loads like any
//! checkpoint. This is how the detection demo's base model is made.

use crate::optim::{clip_grad_norm, lr_factor, AdamW, Optimizer, ParamGroup, Schedule};
use crate::{Result, TrainError};
use lora_core::models::vit::Activation;
use lora_core::models::yolos::{Objects, Yolos, YolosConfig};
use lora_core::{CoreError, Tape, Tensor};
use lora_io::images::{ImageProcessor, Rgb8};
use lora_io::vision::VisionArch;
use lora_io::write::write_atomic;
use lora_kernels::rng::Rng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A YOLOS whose every weight is trainable, with its parameters by the checkpoints' names.
pub struct TrainableYolos {
    /// The model.
    pub model: Yolos,
    /// `(name, tensor)` in load order; the tensors are the model's own handles.
    pub params: Vec<(String, Tensor)>,
}

/// YOLOS's initialisation as transformers' `_init_weights` draws it (linear and convolution
/// weights normal(0, `std`), biases zero, LayerNorm weight one and bias zero), except the token
/// and position tables: transformers starts them at zero, here they are normal(0, `std`) as ViT
/// draws its own (distinct detection tokens from the first step). Deterministic in `seed`.
pub fn init_yolos(cfg: &YolosConfig, std: f64, seed: u64) -> Result<TrainableYolos> {
    let mut rng = Rng::new(seed);
    let mut params = Vec::new();
    let mut load = |name: &str, shape: &[usize]| -> std::result::Result<Tensor, CoreError> {
        let n: usize = shape.iter().product();
        let norm = name.contains("layernorm") || name.contains("layer_norm");
        let data: Vec<f32> = if norm {
            vec![if name.ends_with(".weight") { 1.0 } else { 0.0 }; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        };
        let t = Tensor::param(data, shape)?;
        params.push((name.to_string(), t.clone()));
        Ok(t)
    };
    let model = Yolos::load(cfg, &mut load)?;
    Ok(TrainableYolos { model, params })
}

/// YOLOS's `config.json` for `cfg` with class names `labels`.
pub fn yolos_config_json(cfg: &YolosConfig, labels: &[String], init_std: f64) -> Value {
    let act = match cfg.hidden_act {
        Activation::GeluErf => "gelu",
        Activation::GeluTanh => "gelu_new",
        Activation::Relu => "relu",
        Activation::Silu => "silu",
        Activation::QuickGelu => "quick_gelu",
    };
    // f32 settings written as their shortest decimal (0.1, not 0.10000000149011612).
    let dec = |x: f32| -> f64 { x.to_string().parse().unwrap_or(x as f64) };
    // transformers' YolosConfig types the matcher costs and the box loss weights as `int` and
    // refuses a float there (1.0) when it loads the file: whole values are written as integers.
    let int = |x: f32| -> Value {
        if x.fract() == 0.0 && x.abs() < 1e9 {
            json!(x as i64)
        } else {
            json!(dec(x))
        }
    };
    json!({
        "architectures": ["YolosForObjectDetection"],
        "model_type": "yolos",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": act,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": init_std,
        "layer_norm_eps": dec(cfg.layer_norm_eps),
        "image_size": [cfg.image_size.0, cfg.image_size.1],
        "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels,
        "qkv_bias": cfg.qkv_bias,
        "num_detection_tokens": cfg.num_detection_tokens,
        "use_mid_position_embeddings": cfg.use_mid_position_embeddings,
        "auxiliary_loss": false,
        "class_cost": int(cfg.costs.0),
        "bbox_cost": int(cfg.costs.1),
        "giou_cost": int(cfg.costs.2),
        "bbox_loss_coefficient": int(cfg.bbox_loss_coefficient),
        "giou_loss_coefficient": int(cfg.giou_loss_coefficient),
        "eos_coefficient": dec(cfg.eos_coefficient),
        "id2label": labels.iter().enumerate().map(|(i, l)| (i.to_string(), Value::from(l.clone()))).collect::<serde_json::Map<_, _>>(),
        "label2id": labels.iter().enumerate().map(|(i, l)| (l.clone(), Value::from(i))).collect::<serde_json::Map<_, _>>(),
        "torch_dtype": "float32",
    })
}

/// Writes `dir/config.json`, `dir/model.safetensors` (f32) and `dir/preprocessor_config.json`,
/// each atomically.
pub fn save_yolos(
    dir: &Path,
    cfg: &YolosConfig,
    labels: &[String],
    init_std: f64,
    params: &[(String, Tensor)],
    proc: &ImageProcessor,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
    let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("serialises");
    write_atomic(
        &dir.join("config.json"),
        pretty(&yolos_config_json(cfg, labels, init_std)).as_bytes(),
    )?;
    crate::pretrain::write_f32_weights(&dir.join("model.safetensors"), params)?;
    let pj = super::processor_json(proc, &VisionArch::Yolos(cfg.clone()));
    write_atomic(
        &dir.join("preprocessor_config.json"),
        pretty(&pj).as_bytes(),
    )?;
    Ok(())
}

fn err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.into(),
        reason: reason.into(),
    }
}

/// A from-scratch detector training run on generated images.
#[derive(Clone, Debug)]
pub struct DetPretrainConfig {
    /// The architecture (`num_labels` = `labels.len()`).
    pub model: YolosConfig,
    /// Class names.
    pub labels: Vec<String>,
    /// Output model directory.
    pub out: PathBuf,
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Peak learning rate (AdamW, warmup then cosine).
    pub lr: f32,
    /// Warmup steps.
    pub warmup: usize,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f32,
    /// The initialisation's standard deviation (`initializer_range`).
    pub init_std: f64,
    /// Seed of the initialisation.
    pub seed: u64,
}

/// What a detector pretraining run did.
#[derive(Clone, Debug, PartialEq)]
pub struct DetPretrainSummary {
    /// Parameters.
    pub params: usize,
    /// Mean training loss of the first and of the last 10% of steps.
    pub first_loss: f32,
    /// See `first_loss`.
    pub last_loss: f32,
    /// Wall time.
    pub seconds: f64,
}

/// Trains a YOLOS from scratch on images drawn by `sample(index)` (a fresh image per index:
/// `step * batch_size + i`), preprocessed by `proc` (which must give the config's image size),
/// and writes the model directory `cfg.out`. `on_step(step, total, loss)` sees every step.
pub fn pretrain_detector(
    cfg: &DetPretrainConfig,
    proc: &ImageProcessor,
    sample: &(dyn Fn(u64) -> (Rgb8, Objects) + Sync),
    on_step: &mut dyn FnMut(usize, usize, f32),
) -> Result<DetPretrainSummary> {
    use rayon::prelude::*;
    if cfg.steps == 0 || cfg.batch_size == 0 {
        return Err(TrainError::Setting {
            setting: "steps",
            reason: "steps and batch size must be at least 1".into(),
        });
    }
    if cfg.model.num_labels != cfg.labels.len() {
        return Err(TrainError::Setting {
            setting: "labels",
            reason: format!(
                "{} names for {} classes",
                cfg.labels.len(),
                cfg.model.num_labels
            ),
        });
    }
    let TrainableYolos { model, params } = init_yolos(&cfg.model, cfg.init_std, cfg.seed)?;
    let trainable: Vec<Tensor> = params.iter().map(|(_, t)| t.clone()).collect();
    let groups = vec![ParamGroup {
        params: trainable.clone(),
        lr_scale: 1.0,
    }];
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, cfg.weight_decay);
    let t0 = Instant::now();
    let mut losses = Vec::with_capacity(cfg.steps);
    let (ih, iw) = cfg.model.image_size;
    for step in 0..cfg.steps {
        let base = (step * cfg.batch_size) as u64;
        let drawn: Vec<(Vec<f32>, usize, usize, Objects)> = (0..cfg.batch_size as u64)
            .into_par_iter()
            .map(|i| {
                let (img, obj) = sample(base + i);
                let (v, h, w) = proc.pixels(&img);
                (v, h, w, obj)
            })
            .collect();
        let mut pixels = Vec::with_capacity(cfg.batch_size * 3 * ih * iw);
        let mut objects = Vec::with_capacity(cfg.batch_size);
        for (v, h, w, o) in drawn {
            if (h, w) != (ih, iw) {
                return Err(TrainError::Setting {
                    setting: "image-size",
                    reason: format!("the processor gives {h}x{w}, the model takes {ih}x{iw}"),
                });
            }
            pixels.extend(v);
            objects.push(o);
        }
        let pixels = Tensor::new(pixels, &[cfg.batch_size, 3, ih, iw])?;
        let lr = cfg.lr * lr_factor(Schedule::Cosine, step, cfg.warmup, cfg.steps);
        let tape = Tape::new(lora_kernels::rng::splitmix64(cfg.seed ^ step as u64));
        let loss = model.loss(&tape, &pixels, &objects, true)?;
        let l = loss.total.scalar()?;
        if !l.is_finite() {
            return Err(TrainError::Setting {
                setting: "lr",
                reason: format!("loss is {l} at step {}", step + 1),
            });
        }
        let mut grads = tape.backward(&loss.total)?;
        clip_grad_norm(&mut grads, &trainable, 1.0)?;
        opt.step(&groups, &grads, lr)?;
        losses.push(l);
        on_step(step + 1, cfg.steps, l);
    }
    save_yolos(
        &cfg.out,
        &cfg.model,
        &cfg.labels,
        cfg.init_std,
        &params,
        proc,
    )?;
    let k = (cfg.steps / 10).max(1);
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len().max(1) as f32;
    Ok(DetPretrainSummary {
        params: params.iter().map(|(_, t)| t.numel()).sum(),
        first_loss: mean(&losses[..k.min(losses.len())]),
        last_loss: mean(&losses[losses.len().saturating_sub(k)..]),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_core::models::vit::Activation;

    pub(crate) fn tiny(mid: bool) -> YolosConfig {
        YolosConfig {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            hidden_act: Activation::GeluErf,
            layer_norm_eps: 1e-12,
            image_size: (16, 16),
            patch_size: 4,
            num_channels: 3,
            qkv_bias: true,
            num_detection_tokens: 3,
            use_mid_position_embeddings: mid,
            num_labels: 2,
            costs: (1.0, 5.0, 2.0),
            bbox_loss_coefficient: 5.0,
            giou_loss_coefficient: 2.0,
            eos_coefficient: 0.1,
        }
    }

    /// Two random 16x16 images, with two objects and one. The targets are away from the
    /// untrained boxes (about 0.5 everywhere): L1 has a kink at equality, where a finite
    /// difference averages its two sides.
    fn batch(seed: u64) -> (Tensor, Vec<Objects>) {
        let mut rng = Rng::new(seed);
        let px: Vec<f32> = (0..2 * 3 * 16 * 16).map(|_| rng.normal() as f32).collect();
        let objects = vec![
            Objects {
                classes: vec![0, 1],
                boxes: vec![[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]],
            },
            Objects {
                classes: vec![1],
                boxes: vec![[0.62, 0.41, 0.33, 0.27]],
            },
        ];
        (Tensor::new(px, &[2, 3, 16, 16]).unwrap(), objects)
    }

    #[test]
    fn full_parameter_gradients_match_finite_differences() {
        let mut checked = 0;
        for mid in [false, true] {
            let cfg = tiny(mid);
            let TrainableYolos { model, params } = init_yolos(&cfg, 0.2, 7).unwrap();
            let (pixels, objects) = batch(3);
            // The loss and the Hungarian matching it used.
            let loss = |m: &Yolos| -> (f64, Vec<Vec<(usize, usize)>>) {
                let tape = Tape::inference();
                let r = m.loss(&tape, &pixels, &objects, true).unwrap();
                let (lg, bx) = (
                    r.detections.logits.try_to_vec().unwrap(),
                    r.detections.boxes.try_to_vec().unwrap(),
                );
                let s = r.detections.logits.shape().to_vec();
                let pairs = lora_core::models::yolos::match_predictions(
                    &lg,
                    &bx,
                    (s[0], s[1], s[2]),
                    &objects,
                    cfg.costs,
                )
                .unwrap();
                (r.total.scalar().unwrap() as f64, pairs)
            };
            let (base_l, base_pairs) = loss(&model);
            let tape = Tape::new(0);
            let l = model.loss(&tape, &pixels, &objects, true).unwrap();
            assert_eq!(l.total.scalar().unwrap() as f64, base_l);
            let grads = tape.backward(&l.total).unwrap();
            for (name, t) in &params {
                let g = grads.to_vec(t).unwrap().unwrap();
                let n = t.numel();
                for k in [0, n / 3, n / 2, n - 1] {
                    let orig = t.data()[k];
                    let eps = 1e-3f32;
                    t.data_mut()[k] = orig + eps;
                    let (up, pu) = loss(&model);
                    t.data_mut()[k] = orig - eps;
                    let (down, pd) = loss(&model);
                    t.data_mut()[k] = orig;
                    if pu != base_pairs || pd != base_pairs {
                        continue; // the matching changed: not differentiable here
                    }
                    checked += 1;
                    let fd = (up - down) / (2.0 * eps as f64);
                    let an = g[k] as f64;
                    assert!(
                        (fd - an).abs() <= 2e-3 + 2e-2 * fd.abs().max(an.abs()),
                        "mid {mid}: {name}[{k}]: finite difference {fd}, backward {an}"
                    );
                }
            }
        }
        assert!(checked > 250, "only {checked} entries checked");
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        let cfg = tiny(true);
        let TrainableYolos { model, params } = init_yolos(&cfg, 0.02, 1).unwrap();
        let (pixels, objects) = batch(2);
        let tape = Tape::new(0);
        let loss = model.loss(&tape, &pixels, &objects, true).unwrap();
        let grads = tape.backward(&loss.total).unwrap();
        assert!(params.len() > 30);
        for (name, t) in &params {
            let g = grads
                .to_vec(t)
                .unwrap()
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            assert_eq!(g.len(), t.numel());
            assert!(g.iter().any(|&v| v != 0.0), "{name}: all-zero gradient");
        }
    }
}
