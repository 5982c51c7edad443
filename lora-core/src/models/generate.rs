//! Text generation for a [`CausalLm`]: greedy when the temperature is 0, otherwise sampling
//! with temperature and nucleus (top-p) filtering from a seeded generator. Uses a [`KvCache`],
//! so each new token costs one position.

use super::{CausalLm, KvCache};
use crate::error::{CoreError, Result};
use lora_kernels::rng::Rng;

/// Sampling settings. Defaults: 32 new tokens, greedy, top-p 1, seed 0, no end token.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateConfig {
    /// Maximum tokens to add.
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop after producing one of these ids.
    pub eos: Vec<u32>,
    /// Use the adapters (false = the base model).
    pub adapters: bool,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos: Vec::new(),
            adapters: true,
        }
    }
}

/// Picks the next token from one row of logits.
pub fn pick(logits: &[f32], cfg: &GenerateConfig, rng: &mut Rng) -> u32 {
    if cfg.temperature <= 0.0 {
        // First maximum, as torch.argmax does.
        let mut best = 0;
        for (i, &z) in logits.iter().enumerate() {
            if z > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i, (((z - m) / cfg.temperature) as f64).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1;
        if mass >= cfg.top_p as f64 {
            break;
        }
    }
    let r = rng.uniform() * mass;
    let mut acc = 0.0;
    for p in &probs[..kept] {
        acc += p.1;
        if r < acc {
            return p.0 as u32;
        }
    }
    probs[kept - 1].0 as u32
}

/// Continues `prompt`; returns prompt + new tokens. Stops at `max_new_tokens`, an end token, or
/// the model's last position.
pub fn generate(model: &dyn CausalLm, prompt: &[u32], cfg: &GenerateConfig) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(CoreError::InvalidConfig {
            field: "prompt",
            reason: "must contain at least one token".into(),
        });
    }
    if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0)
        || !(cfg.temperature >= 0.0 && cfg.temperature.is_finite())
    {
        return Err(CoreError::InvalidConfig {
            field: "temperature/top_p",
            reason: format!(
                "need temperature >= 0 and 0 < top_p <= 1, got {} and {}",
                cfg.temperature, cfg.top_p
            ),
        });
    }
    if prompt.len() > model.max_positions() {
        return Err(CoreError::InvalidConfig {
            field: "prompt",
            reason: format!(
                "{} tokens exceed the model's {} positions",
                prompt.len(),
                model.max_positions()
            ),
        });
    }
    let v = model.vocab_size();
    let mut rng = Rng::new(cfg.seed);
    let mut cache = KvCache::new(model.num_layers());
    let mut out = prompt.to_vec();
    let mut logits = model
        .forward_cached(prompt, &mut cache, cfg.adapters)?
        .to_vec();
    for _ in 0..cfg.max_new_tokens {
        let last = &logits[logits.len() - v..];
        let next = pick(last, cfg, &mut rng);
        out.push(next);
        if cfg.eos.contains(&next) || out.len() >= model.max_positions() {
            break;
        }
        logits = model
            .forward_cached(&[next], &mut cache, cfg.adapters)?
            .to_vec();
    }
    Ok(out)
}
