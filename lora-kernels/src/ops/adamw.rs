//! The AdamW update on one parameter, the CPU twin of `adamw.cu`'s `adamw_step`
//! (`torch.optim.AdamW`'s order of operations in f32): decoupled decay, the moments, then the
//! bias-corrected step. The optimizer (lora-train) keeps the state and the step counts and
//! calls this per tensor, on the host or, through the device backend, on the GPU.

use crate::error::{check_len, Result};

/// Hyper-parameters of one update of a tensor at step `t` (1-based).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Learning rate (after schedule and group multiplier).
    pub lr: f32,
    /// beta1.
    pub beta1: f32,
    /// beta2.
    pub beta2: f32,
    /// eps.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// The tensor's step count, counting this one.
    pub t: u64,
}

/// The per-step scalars are computed in f64 and rounded once, as PyTorch computes them in Python
/// floats: `1 - beta2^t` in f32 would lose up to 1e-4 of its value to cancellation.
impl AdamStep {
    /// `lr / (1 - beta1^t)`.
    pub fn step_size(&self) -> f32 {
        (self.lr as f64 / (1.0 - (self.beta1 as f64).powi(self.t as i32))) as f32
    }
    /// `sqrt(1 - beta2^t)`.
    pub fn bc2_sqrt(&self) -> f32 {
        (1.0 - (self.beta2 as f64).powi(self.t as i32)).sqrt() as f32
    }
    /// The decoupled decay factor `1 - lr * weight_decay`.
    pub fn decay(&self) -> f32 {
        (1.0 - self.lr as f64 * self.weight_decay as f64) as f32
    }
}

/// One AdamW update of `param` with `grad`, moments `m`, `v` updated in place.
pub fn adamw_step(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: AdamStep,
) -> Result<()> {
    const OP: &str = "adamw_step";
    let n = param.len();
    check_len(OP, "grad", grad.len(), &[n])?;
    check_len(OP, "m", m.len(), &[n])?;
    check_len(OP, "v", v.len(), &[n])?;
    let (step_size, bc2_sqrt, decay) = (h.step_size(), h.bc2_sqrt(), h.decay());
    for i in 0..n {
        param[i] *= decay;
        m[i] += (grad[i] - m[i]) * (1.0 - h.beta1);
        v[i] = v[i] * h.beta2 + (1.0 - h.beta2) * grad[i] * grad[i];
        let denom = v[i].sqrt() / bc2_sqrt + h.eps;
        param[i] -= step_size * m[i] / denom;
    }
    Ok(())
}

/// The naive oracle.
pub mod reference {
    use super::AdamStep;

    /// One element's update in f64, written from the AdamW paper's algorithm (decay first):
    /// `(param, m, v)` after the step.
    pub fn adamw_step(p: f64, g: f64, m: f64, v: f64, h: AdamStep) -> (f64, f64, f64) {
        let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
        let lr = h.lr as f64;
        let p = p * (1.0 - lr * h.weight_decay as f64);
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * g * g;
        let mh = m / (1.0 - b1.powi(h.t as i32));
        let vh = v / (1.0 - b2.powi(h.t as i32));
        (p - lr * mh / (vh.sqrt() + h.eps as f64), m, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_f64_update_and_checks_lengths() {
        let h = AdamStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            t: 3,
        };
        let mut p = vec![0.5f32, -1.0, 2.0];
        let g = [0.1f32, -0.3, 0.0];
        let mut m = vec![0.01f32, 0.02, -0.03];
        let mut v = vec![1e-3f32, 2e-3, 3e-4];
        let want: Vec<_> = (0..3)
            .map(|i| reference::adamw_step(p[i] as f64, g[i] as f64, m[i] as f64, v[i] as f64, h))
            .collect();
        adamw_step(&mut p, &g, &mut m, &mut v, h).unwrap();
        for i in 0..3 {
            assert!(
                (p[i] as f64 - want[i].0).abs() < 1e-6,
                "{i}: {} {:?}",
                p[i],
                want[i]
            );
            assert!((m[i] as f64 - want[i].1).abs() < 1e-7);
            assert!((v[i] as f64 - want[i].2).abs() < 1e-9);
        }
        let e = adamw_step(&mut p, &g[..2], &mut m, &mut v, h).unwrap_err();
        assert!(e.to_string().contains("adamw_step: `grad`"), "{e}");
    }
}
