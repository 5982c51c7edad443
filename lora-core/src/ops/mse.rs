//! Mean squared error with per-sample weights: the diffusion training loss (diffusers'
//! `F.mse_loss(pred, target)`, or with min-SNR weighting `(mse per sample * w).mean()`).

use super::*;

/// `mean_b(w_b * mean((pred_b - target_b)^2))` over the `B` samples (leading dimension) of
/// `pred`; `target` (same shape) is a constant. `weights` `None` means 1 for every sample (the
/// plain mean). Returns a `[1]` tensor. The per-sample sums of squares are taken in f64.
pub fn mse_loss(
    tape: &Tape,
    pred: &Tensor,
    target: &Tensor,
    weights: Option<&[f32]>,
) -> Result<Tensor> {
    const OP: &str = "mse_loss";
    if pred.shape() != target.shape() || pred.shape().is_empty() || pred.numel() == 0 {
        return Err(shape_err(
            OP,
            "target",
            target,
            format!("{:?} (the shape of pred, not empty)", pred.shape()),
        ));
    }
    let b = pred.shape()[0];
    let w: Vec<f32> = match weights {
        Some(w) if w.len() == b && w.iter().all(|x| x.is_finite()) => w.to_vec(),
        Some(w) => {
            return Err(CoreError::InvalidConfig {
                field: "loss weights",
                reason: format!("{} finite weights needed for {b} samples, got {:?}", b, w),
            })
        }
        None => vec![1.0; b],
    };
    let on = placement(OP, &[("pred", pred), ("target", target)])?;
    let per = pred.numel() / b;
    let diff = {
        let (gp, gt) = (read(pred)?, read(target)?);
        let mut neg = on.accel.copy(f32_of(&gt)?)?;
        on.accel.scale(&mut neg, -1.0)?;
        on.accel.add(f32_of(&gp)?, &neg)?
    };
    let mut loss = 0.0f64;
    for (i, &wi) in w.iter().enumerate() {
        let piece = on.accel.copy_range(&diff, i * per, per)?;
        loss += wi as f64 * on.accel.sum_squares(&piece)? / per as f64;
    }
    loss /= b as f64;
    let y = on.tensor(on.accel.upload(&[loss as f32])?, &[1], pred.requires_grad())?;
    on.record(tape, MseNode { diff, w, per }, vec![pred.clone()], &y);
    Ok(y)
}

/// [pred]
struct MseNode {
    diff: DBuf,
    w: Vec<f32>,
    per: usize,
}

impl OpNode for MseNode {
    fn name(&self) -> &'static str {
        "mse_loss"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn saved_elems(&self) -> usize {
        self.diff.len()
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(dp) = g.take(0) {
            let d = a.download(dout)?[0] as f64;
            let b = self.w.len() as f64;
            let mut full = a.zeros(self.diff.len())?;
            for (i, &wi) in self.w.iter().enumerate() {
                let mut piece = a.copy_range(&self.diff, i * self.per, self.per)?;
                a.scale(
                    &mut piece,
                    (2.0 * d * wi as f64 / (b * self.per as f64)) as f32,
                )?;
                a.write_range(&mut full, i * self.per, &piece)?;
            }
            a.accumulate(dp, &full)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{ops, Tape, Tensor};

    /// The value against its definition in f64, and the gradient against central differences,
    /// with and without per-sample weights, on every backend.
    #[test]
    fn weighted_mse_value_and_gradient() {
        let mut r = lora_kernels::rng::Rng::new(3);
        let (b, per) = (3, 5);
        let p: Vec<f32> = (0..b * per)
            .map(|_| r.uniform_range(-1.0, 1.0) as f32)
            .collect();
        let t: Vec<f32> = (0..b * per)
            .map(|_| r.uniform_range(-1.0, 1.0) as f32)
            .collect();
        for weights in [None, Some(vec![0.5f32, 2.0, 1.25])] {
            let want = |p: &[f32]| -> f64 {
                (0..b)
                    .map(|i| {
                        let w = weights.as_ref().map_or(1.0, |w| w[i] as f64);
                        let s: f64 = (0..per)
                            .map(|j| (p[i * per + j] as f64 - t[i * per + j] as f64).powi(2))
                            .sum();
                        w * s / per as f64
                    })
                    .sum::<f64>()
                    / b as f64
            };
            for dev in crate::device::test_devices() {
                let tape = Tape::new(0);
                let pt = Tensor::new_on(p.clone(), &[b, per], true, dev).unwrap();
                let tt = Tensor::new_on(t.clone(), &[b, per], false, dev).unwrap();
                let y = ops::mse_loss(&tape, &pt, &tt, weights.as_deref()).unwrap();
                let v = y.try_to_vec().unwrap()[0] as f64;
                assert!((v - want(&p)).abs() < 1e-6, "{dev}: {v} vs {}", want(&p));
                let g = tape.backward(&y).unwrap().to_vec(&pt).unwrap().unwrap();
                for j in 0..p.len() {
                    let (mut hi, mut lo) = (p.clone(), p.clone());
                    hi[j] += 1e-3;
                    lo[j] -= 1e-3;
                    let fd = (want(&hi) - want(&lo)) / 2e-3;
                    assert!(
                        (g[j] as f64 - fd).abs() < 1e-4,
                        "{dev} [{j}]: {} vs {fd}",
                        g[j]
                    );
                }
            }
        }
        let tape = Tape::new(0);
        let a = Tensor::new(vec![0.0; 6], &[2, 3]).unwrap();
        let c = Tensor::new(vec![0.0; 6], &[3, 2]).unwrap();
        assert!(ops::mse_loss(&tape, &a, &c, None).is_err());
        assert!(ops::mse_loss(&tape, &a, &a, Some(&[1.0])).is_err());
    }
}
