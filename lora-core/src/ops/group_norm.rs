//! GroupNorm over `(N, C, ...)` (PyTorch's `nn.GroupNorm`: Stable Diffusion's UNet and VAE).

use super::*;
use lora_kernels::ops::norm::GroupDims;

/// GroupNorm of `x` `(N, C, ...)` in `groups` groups of consecutive channels, with per-channel
/// `gamma` and `beta` `(C)`.
pub fn group_norm(
    tape: &Tape,
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    groups: usize,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "group_norm";
    let sh = x.shape();
    if sh.len() < 2 {
        return Err(shape_err(OP, "x", x, "(N, C, ...)"));
    }
    let (n, c) = (sh[0], sh[1]);
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(shape_err(
            OP,
            "x",
            x,
            format!("channels divisible by {groups} groups"),
        ));
    }
    check_vec(OP, "gamma", gamma, c)?;
    if let Some(b) = beta {
        check_vec(OP, "beta", b, c)?;
    }
    let d = GroupDims {
        batch: n,
        channels: c,
        spatial: sh[2..].iter().product(),
        groups,
    };
    let mut operands = vec![("x", x), ("gamma", gamma)];
    operands.extend(beta.map(|b| ("beta", b)));
    let on = placement(OP, &operands)?;
    let (gx, gg) = (read(x)?, read(gamma)?);
    let gb = beta.map(read).transpose()?;
    let bb = gb.as_ref().map(f32_of).transpose()?;
    let [out, mean, rstd] = on
        .accel
        .groupnorm_forward(f32_of(&gx)?, f32_of(&gg)?, bb, d, eps)?;
    drop((gx, gg, gb));
    let mut inputs = vec![x.clone(), gamma.clone()];
    inputs.extend(beta.cloned());
    let y = on.tensor(out, sh, inputs.iter().any(|t| t.requires_grad()))?;
    on.record(tape, GroupNormNode { mean, rstd, d }, inputs, &y);
    if tape.records() {
        // Its node keeps x, gamma and beta: readers of y (a LoRA convolution) recompute it.
        let (x, gamma, beta, accel) = (x.clone(), gamma.clone(), beta.cloned(), on.accel);
        let source = x.clone();
        tape.rematerializable(
            &y,
            &[&source],
            Box::new(move || {
                let (gx, gg) = (read(&x)?, read(&gamma)?);
                let gb = beta.as_ref().map(read).transpose()?;
                let bb = gb.as_ref().map(f32_of).transpose()?;
                let [out, _, _] =
                    accel.groupnorm_forward(f32_of(&gx)?, f32_of(&gg)?, bb, d, eps)?;
                Ok(out)
            }),
        );
    }
    Ok(y)
}

/// [x, gamma, (beta)]
struct GroupNormNode {
    mean: DBuf,
    rstd: DBuf,
    d: GroupDims,
}

impl OpNode for GroupNormNode {
    fn name(&self) -> &'static str {
        "group_norm"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    fn saved_elems(&self) -> usize {
        self.mean.len() + self.rstd.len()
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        let (dx, dg, db) = (g.take(0), g.take(1), g.take(2));
        a.groupnorm_backward(
            dx, dg, db, dout, data[0], data[1], &self.mean, &self.rstd, self.d,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    /// Loss and every gradient equal finite differences of the loss (f32, central), on each
    /// backend the same as on the CPU; a bad group count is a named error.
    #[test]
    fn group_norm_trains_its_input_and_affine() {
        let mut r = lora_kernels::rng::Rng::new(3);
        let mut rand =
            |k: usize| -> Vec<f32> { (0..k).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect() };
        let (xv, gv, bv) = (rand(2 * 6 * 4 * 3), rand(6), rand(6));
        // y is (2, 6, 4, 3): 48 rows of 3 logits.
        let targets: Vec<i32> = (0..48).map(|i| i * 5 % 3).collect();
        let run = |device: Device, vals: [&[f32]; 3]| {
            let x0 = Tensor::new_on(vals[0].to_vec(), &[2, 6, 4, 3], true, device).unwrap();
            let g = Tensor::new_on(vals[1].to_vec(), &[6], true, device).unwrap();
            let b = Tensor::new_on(vals[2].to_vec(), &[6], true, device).unwrap();
            let tape = Tape::new(0);
            let x = crate::ops::gelu(&tape, &x0).unwrap();
            let y = group_norm(&tape, &x, &g, Some(&b), 3, 1e-5).unwrap();
            let loss = crate::ops::cross_entropy(&tape, &y, &targets).unwrap();
            let l = loss.try_to_vec().unwrap()[0];
            let grads = tape.backward(&loss).unwrap();
            let gs: Vec<Vec<f32>> = [&x0, &g, &b]
                .iter()
                .map(|t| grads.to_vec(t).unwrap().unwrap())
                .collect();
            (l, gs)
        };
        let vals = [&xv[..], &gv[..], &bv[..]];
        let (l, g) = run(Device::Cpu, vals);
        let h = 1e-2f32;
        for (which, idx) in [(0usize, [0usize, 57, 143]), (1, [0, 2, 5]), (2, [1, 3, 4])] {
            for i in idx {
                let mut plus: Vec<Vec<f32>> = vec![xv.clone(), gv.clone(), bv.clone()];
                let mut minus = plus.clone();
                plus[which][i] += h;
                minus[which][i] -= h;
                let lp = run(Device::Cpu, [&plus[0], &plus[1], &plus[2]]).0;
                let lm = run(Device::Cpu, [&minus[0], &minus[1], &minus[2]]).0;
                let fd = (lp - lm) / (2.0 * h);
                let got = g[which][i];
                assert!(
                    (fd - got).abs() <= 2e-3 * got.abs().max(0.1),
                    "input {which}[{i}]: backward {got} vs finite differences {fd}"
                );
            }
        }
        for dev in crate::device::test_devices() {
            let (ld, gd) = run(dev, vals);
            crate::device::assert_close("loss", dev, &[ld], &[l]);
            for (i, (h, d)) in g.iter().zip(&gd).enumerate() {
                crate::device::assert_close(&format!("input {i}"), dev, d, h);
            }
        }
        let x = Tensor::new(vec![0.0; 12], &[1, 6, 2]).unwrap();
        let g = Tensor::new(vec![1.0; 6], &[6]).unwrap();
        let e = group_norm(&Tape::new(0), &x, &g, None, 4, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 groups"), "{e}");
    }
}
