//! Optimizers with state only for the tensors they are given (the adapters), LoRA+ learning-rate
//! ratios through parameter groups, global-norm gradient clipping, and warmup + decay schedules.
//! Each follows PyTorch / transformers exactly (same update order in f32), checked against values
//! they computed (`fixtures/optim/reference.json`).

use lora_core::{Gradients, Tensor};
use std::collections::HashMap;

/// Tensors updated with one learning-rate multiplier (LoRA+: A at 1, B at the ratio).
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// The tensors.
    pub params: Vec<Tensor>,
    /// Multiplier on the scheduled learning rate.
    pub lr_scale: f32,
}

/// Optimizer state by parameter name, for checkpoints: named f32 buffers and step counts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState {
    /// `"<buffer>.<param name>"` -> values.
    pub buffers: Vec<(String, Vec<f32>)>,
    /// param name -> steps taken.
    pub steps: Vec<(String, u64)>,
}

/// An optimizer step over parameter groups.
pub trait Optimizer {
    /// Updates every tensor of `groups` that has a gradient in `grads`, at learning rate
    /// `lr * group.lr_scale`.
    fn step(&mut self, groups: &[ParamGroup], grads: &Gradients, lr: f32);
    /// Number of tensors holding optimizer state.
    fn state_len(&self) -> usize;
    /// The state of the `named` tensors, keyed by name (tensor ids do not survive a restart).
    fn export(&self, named: &[(String, Tensor)]) -> OptimizerState;
    /// Restores state exported for the same names.
    fn import(&mut self, named: &[(String, Tensor)], state: &OptimizerState);
}

/// AdamW (decoupled weight decay, bias-corrected moments), as `torch.optim.AdamW`.
///
/// ```
/// use lora_core::{ops, lora::WeightLayout, LoraConfig, LoraLinear, Tape, Tensor};
/// use lora_train::optim::{AdamW, Optimizer, ParamGroup};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let w = Tensor::new(vec![0.1; 2 * 4], &[2, 4])?;
/// let layer = LoraLinear::new(w, WeightLayout::OutIn, None, &LoraConfig::default(), 0)?;
/// let groups = [ParamGroup { params: vec![layer.lora_a.clone(), layer.lora_b.clone()], lr_scale: 1.0 }];
/// let mut opt = AdamW::new(0.9, 0.999, 1e-8, 0.0);
/// let x = Tensor::new(vec![1.0, 2.0, 3.0, 4.0], &[1, 4])?;
/// let mut losses = Vec::new();
/// for step in 0..20 {
///     let tape = Tape::new(step);
///     let loss = ops::cross_entropy(&tape, &layer.forward(&tape, &x)?, &[1])?;
///     losses.push(loss.scalar()?);
///     opt.step(&groups, &tape.backward(&loss)?, 1e-2);
/// }
/// assert!(losses[19] < losses[0]);
/// assert_eq!(opt.state_len(), 2); // state for A and B only
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct AdamW {
    /// beta1
    pub beta1: f32,
    /// beta2
    pub beta2: f32,
    /// eps
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    steps: HashMap<u64, u64>,
    state: HashMap<u64, (Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Self {
        Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            steps: HashMap::new(),
            state: HashMap::new(),
        }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, groups: &[ParamGroup], grads: &Gradients, lr: f32) {
        for g in groups {
            let lr = lr * g.lr_scale;
            for p in &g.params {
                let Some(grad) = grads.get(p) else { continue };
                let t = self.steps.entry(p.id()).or_insert(0);
                *t += 1;
                let (m, v) = self
                    .state
                    .entry(p.id())
                    .or_insert_with(|| (vec![0.0; p.numel()], vec![0.0; p.numel()]));
                let bc1 = 1.0 - self.beta1.powi(*t as i32);
                let bc2_sqrt = (1.0 - self.beta2.powi(*t as i32)).sqrt();
                let step_size = lr / bc1;
                let decay = 1.0 - lr * self.weight_decay;
                let mut data = p.data_mut();
                for i in 0..data.len() {
                    data[i] *= decay;
                    m[i] += (grad[i] - m[i]) * (1.0 - self.beta1);
                    v[i] = v[i] * self.beta2 + (1.0 - self.beta2) * grad[i] * grad[i];
                    let denom = v[i].sqrt() / bc2_sqrt + self.eps;
                    data[i] -= step_size * m[i] / denom;
                }
            }
        }
    }

    fn state_len(&self) -> usize {
        self.state.len()
    }

    fn export(&self, named: &[(String, Tensor)]) -> OptimizerState {
        let mut st = OptimizerState::default();
        for (n, t) in named {
            if let Some((m, v)) = self.state.get(&t.id()) {
                st.buffers.push((format!("exp_avg.{n}"), m.clone()));
                st.buffers.push((format!("exp_avg_sq.{n}"), v.clone()));
                st.steps.push((n.clone(), self.steps[&t.id()]));
            }
        }
        st
    }

    fn import(&mut self, named: &[(String, Tensor)], state: &OptimizerState) {
        let buf: std::collections::HashMap<&str, &Vec<f32>> =
            state.buffers.iter().map(|(k, v)| (k.as_str(), v)).collect();
        for (n, t) in named {
            if let (Some(m), Some(v), Some((_, s))) = (
                buf.get(format!("exp_avg.{n}").as_str()),
                buf.get(format!("exp_avg_sq.{n}").as_str()),
                state.steps.iter().find(|(k, _)| k == n),
            ) {
                self.state.insert(t.id(), ((*m).clone(), (*v).clone()));
                self.steps.insert(t.id(), *s);
            }
        }
    }
}

/// SGD with momentum and (coupled) weight decay, as `torch.optim.SGD` (no dampening).
#[derive(Clone, Debug)]
pub struct Sgd {
    /// Momentum (0 = plain SGD).
    pub momentum: f32,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
    state: HashMap<u64, Vec<f32>>,
}

impl Sgd {
    /// A fresh optimizer.
    pub fn new(momentum: f32, weight_decay: f32) -> Self {
        Self {
            momentum,
            weight_decay,
            state: HashMap::new(),
        }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, groups: &[ParamGroup], grads: &Gradients, lr: f32) {
        for g in groups {
            let lr = lr * g.lr_scale;
            for p in &g.params {
                let Some(grad) = grads.get(p) else { continue };
                let mut data = p.data_mut();
                let d: Vec<f32> = grad
                    .iter()
                    .zip(data.iter())
                    .map(|(g, w)| g + self.weight_decay * w)
                    .collect();
                let upd = if self.momentum != 0.0 {
                    match self.state.get_mut(&p.id()) {
                        Some(buf) => {
                            buf.iter_mut()
                                .zip(&d)
                                .for_each(|(b, x)| *b = self.momentum * *b + x);
                            buf.clone()
                        }
                        None => {
                            self.state.insert(p.id(), d.clone());
                            d
                        }
                    }
                } else {
                    d
                };
                data.iter_mut().zip(&upd).for_each(|(w, u)| *w -= lr * u);
            }
        }
    }

    fn state_len(&self) -> usize {
        self.state.len()
    }

    fn export(&self, named: &[(String, Tensor)]) -> OptimizerState {
        let mut st = OptimizerState::default();
        for (n, t) in named {
            if let Some(b) = self.state.get(&t.id()) {
                st.buffers.push((format!("momentum.{n}"), b.clone()));
            }
        }
        st
    }

    fn import(&mut self, named: &[(String, Tensor)], state: &OptimizerState) {
        for (n, t) in named {
            if let Some((_, b)) = state
                .buffers
                .iter()
                .find(|(k, _)| *k == format!("momentum.{n}"))
            {
                self.state.insert(t.id(), b.clone());
            }
        }
    }
}

/// Scales the gradients of `params` so their global 2-norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Gradients, params: &[Tensor], max_norm: f32) -> f32 {
    let total: f32 = params
        .iter()
        .filter_map(|p| grads.get(p))
        .map(|g| {
            g.iter()
                .map(|x| (*x as f64) * (*x as f64))
                .sum::<f64>()
                .sqrt() as f32
        })
        .map(|n| n * n)
        .sum::<f32>()
        .sqrt();
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    if coef == 1.0 {
        return total; // multiplying by 1 changes nothing: skip the pass
    }
    for p in params {
        if let Some(g) = grads.get_mut(p) {
            g.iter_mut().for_each(|x| *x *= coef);
        }
    }
    total
}

/// Learning-rate decay after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Constant after warmup.
    Constant,
    /// Linear to 0 at the last step.
    Linear,
    /// Half-cosine to 0 at the last step.
    Cosine,
}

/// Learning-rate multiplier at `step` (0-based) with linear warmup over `warmup` steps and
/// `total` steps in all, as transformers' `get_*_schedule_with_warmup`.
pub fn lr_factor(schedule: Schedule, step: usize, warmup: usize, total: usize) -> f32 {
    if step < warmup {
        return step as f32 / warmup.max(1) as f32;
    }
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => {
            ((total as f32 - step as f32) / (total - warmup).max(1) as f32).max(0.0)
        }
        Schedule::Cosine => {
            let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0) as f32
        }
    }
}
