//! Batch norm (eval mode), max pooling and adaptive average pooling over `(N, C, H, W)`.

use super::*;
pub use lora_kernels::ops::pool::PoolDims;

fn nchw(op: &'static str, x: &Tensor) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(x.shape()).map_err(|_| shape_err(op, "x", x, "(N, C, H, W)"))
}

/// PyTorch's `BatchNorm2d` in eval mode: `(x - mean) / sqrt(var + eps) * gamma + beta` per
/// channel, with the running statistics `mean`, `var` `(C)` frozen (a trainable one is an
/// error); `gamma` and `beta` may train.
pub fn batch_norm2d(
    tape: &Tape,
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "batch_norm2d";
    let [n, c, h, w] = nchw(OP, x)?;
    for (what, t) in [
        ("mean", mean),
        ("var", var),
        ("gamma", gamma),
        ("beta", beta),
    ] {
        check_vec(OP, what, t, c)?;
    }
    for (what, t) in [("mean", mean), ("var", var)] {
        if t.requires_grad() {
            return Err(shape_err(
                OP,
                what,
                t,
                "frozen running statistics (eval mode)",
            ));
        }
    }
    let operands = [
        ("x", x),
        ("mean", mean),
        ("var", var),
        ("gamma", gamma),
        ("beta", beta),
    ];
    let on = placement(OP, &operands)?;
    let dims = (n, c, h * w);
    let gs = operands.map(|(_, t)| read(t));
    let [gx, gm, gv, gg, gb] = gs;
    let (gx, gm, gv, gg, gb) = (gx?, gm?, gv?, gg?, gb?);
    let y = on.accel.batchnorm_forward(
        f32_of(&gx)?,
        f32_of(&gm)?,
        f32_of(&gv)?,
        f32_of(&gg)?,
        f32_of(&gb)?,
        dims,
        eps,
    )?;
    drop((gx, gm, gv, gg, gb));
    let inputs = vec![
        x.clone(),
        mean.clone(),
        var.clone(),
        gamma.clone(),
        beta.clone(),
    ];
    let requires = inputs.iter().any(|t| t.requires_grad());
    let y = on.tensor(y, x.shape(), requires)?;
    on.record(tape, BatchNormNode { dims, eps }, inputs, &y);
    Ok(y)
}

/// [x, mean, var, gamma, beta]
struct BatchNormNode {
    dims: (usize, usize, usize),
    eps: f32,
}

impl OpNode for BatchNormNode {
    fn name(&self) -> &'static str {
        "batch_norm2d"
    }
    /// x only when gamma trains (dgamma); the statistics and gamma always (small, alive).
    fn reads_input(&self, i: usize, inputs: &[Tensor]) -> bool {
        match i {
            0 => inputs[3].requires_grad(),
            4 => false,
            _ => true,
        }
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        let (dx, dgamma, dbeta) = (g.take(0), g.take(3), g.take(4));
        a.batchnorm_backward(
            dx, dgamma, dbeta, dout, data[0], data[1], data[2], data[3], self.dims, self.eps,
        )?;
        Ok(())
    }
}

/// PyTorch's `MaxPool2d(kernel, stride, padding)` (no dilation, floor mode): the first maximum
/// of each window, NaN winning, the padding never.
pub fn max_pool2d(
    tape: &Tape,
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
) -> Result<Tensor> {
    const OP: &str = "max_pool2d";
    let [n, c, h, w] = nchw(OP, x)?;
    let d = PoolDims {
        planes: n * c,
        h,
        w,
        kernel,
        stride,
        padding,
    };
    let (oh, ow) = d.check()?;
    let on = placement(OP, &[("x", x)])?;
    let gx = read(x)?;
    let y = on.accel.max_pool2d_forward(f32_of(&gx)?, d)?;
    drop(gx);
    let y = on.tensor(y, &[n, c, oh, ow], x.requires_grad())?;
    on.record(tape, MaxPoolNode(d), vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct MaxPoolNode(PoolDims);

impl OpNode for MaxPoolNode {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(dx) = g.take(0) {
            a.max_pool2d_backward(dx, dout, data[0], self.0)?;
        }
        Ok(())
    }
}

/// PyTorch's `AdaptiveAvgPool2d(out)`: `(N, C, H, W)` to `(N, C, out.0, out.1)`, each output the
/// mean of its window (`(1, 1)`: the global average a ResNet pools with).
pub fn adaptive_avg_pool2d(tape: &Tape, x: &Tensor, out: (usize, usize)) -> Result<Tensor> {
    const OP: &str = "adaptive_avg_pool2d";
    let [n, c, h, w] = nchw(OP, x)?;
    let on = placement(OP, &[("x", x)])?;
    let gx = read(x)?;
    let y = on
        .accel
        .adaptive_avg_pool2d_forward(f32_of(&gx)?, n * c, (h, w), out)?;
    drop(gx);
    let y = on.tensor(y, &[n, c, out.0, out.1], x.requires_grad())?;
    let node = AdaptiveAvgNode {
        planes: n * c,
        hw: (h, w),
        out,
    };
    on.record(tape, node, vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct AdaptiveAvgNode {
    planes: usize,
    hw: (usize, usize),
    out: (usize, usize),
}

impl OpNode for AdaptiveAvgNode {
    fn name(&self) -> &'static str {
        "adaptive_avg_pool2d"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(dx) = g.take(0) {
            a.adaptive_avg_pool2d_backward(dx, dout, self.planes, self.hw, self.out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    /// A ResNet stem's tail (batch norm, ReLU, max pool) and head pool on every backend: the
    /// CPU's loss and gradients (x, gamma, beta), gradients against finite differences of the
    /// loss, x kept by batch norm only when gamma trains, and named errors.
    #[test]
    fn batch_norm_and_pooling_train_on_every_backend() {
        let mut r = lora_kernels::rng::Rng::new(9);
        let mut rand =
            |k: usize| -> Vec<f32> { (0..k).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect() };
        let (xv, gv, bv, mv) = (rand(2 * 3 * 7 * 6), rand(3), rand(3), rand(3));
        let var = vec![0.5f32, 1.5, 0.25];
        let targets: Vec<i32> = (0..6).map(|i| i % 2).collect(); // (2, 3, 1, 2) pooled
        let run = |device: Device, vals: [&[f32]; 3], gamma_trains: bool| {
            let x = Tensor::new_on(vals[0].to_vec(), &[2, 3, 7, 6], true, device).unwrap();
            let g = Tensor::new_on(vals[1].to_vec(), &[3], gamma_trains, device).unwrap();
            let b = Tensor::new_on(vals[2].to_vec(), &[3], true, device).unwrap();
            let m = Tensor::new_on(mv.clone(), &[3], false, device).unwrap();
            let v = Tensor::new_on(var.clone(), &[3], false, device).unwrap();
            let tape = Tape::new(0);
            let x1 = crate::ops::gelu(&tape, &x).unwrap(); // an activation the tape may drop
            let y = batch_norm2d(&tape, &x1, &m, &v, &g, &b, 1e-5).unwrap();
            let y = crate::ops::relu(&tape, &y).unwrap();
            let y = max_pool2d(&tape, &y, (3, 3), (2, 2), (1, 1)).unwrap();
            assert_eq!(y.shape(), [2, 3, 4, 3]);
            let y = adaptive_avg_pool2d(&tape, &y, (1, 2)).unwrap();
            let loss = crate::ops::cross_entropy(&tape, &y, &targets).unwrap();
            let saved = tape.saved_elems();
            let l = loss.try_to_vec().unwrap()[0];
            let grads = tape.backward(&loss).unwrap();
            let gr: Vec<Option<Vec<f32>>> = [&x, &g, &b]
                .iter()
                .map(|t| grads.to_vec(t).unwrap())
                .collect();
            (l, gr, saved)
        };
        let vals = [&xv[..], &gv[..], &bv[..]];
        let (l, g, saved) = run(Device::Cpu, vals, true);
        let (_, g_frozen, saved_frozen) = run(Device::Cpu, vals, false);
        assert!(g_frozen[1].is_none());
        assert_eq!(
            saved - saved_frozen,
            2 * 3 * 7 * 6,
            "x kept for dgamma only"
        );
        // Max pooling and ReLU are kinked: differences are taken at the inputs the pooling
        // picked (a non-zero gradient) where the loss is smooth across the step, i.e. two step
        // sizes agree (a window whose runner-up is within the step is skipped, and counted).
        let fd = |which: usize, i: usize, h: f32| {
            let mut plus = [xv.clone(), gv.clone(), bv.clone()];
            let mut minus = plus.clone();
            plus[which][i] += h;
            minus[which][i] -= h;
            let lp = run(Device::Cpu, [&plus[0], &plus[1], &plus[2]], true).0;
            let lm = run(Device::Cpu, [&minus[0], &minus[1], &minus[2]], true).0;
            (lp - lm) / (2.0 * h)
        };
        let close = |a: f32, b: f32| (a - b).abs() <= 3e-3 * b.abs().max(0.05);
        let gx = g[0].as_ref().unwrap();
        let picked: Vec<usize> = (0..gx.len()).filter(|&i| gx[i] != 0.0).collect();
        let mut compared = 0;
        for &i in &picked {
            let (f1, f2) = (fd(0, i, 2e-3), fd(0, i, 1e-3));
            if close(f1, f2) {
                assert!(
                    close(f1, gx[i]),
                    "x[{i}]: backward {} vs finite differences {f1}",
                    gx[i]
                );
                compared += 1;
            }
        }
        assert!(
            compared >= picked.len() * 3 / 4,
            "{compared} of {}",
            picked.len()
        );
        for which in [1, 2] {
            for i in 0..3 {
                let got = g[which].as_ref().unwrap()[i];
                let f = fd(which, i, 2e-3);
                assert!(
                    close(f, got),
                    "input {which}[{i}]: backward {got} vs finite differences {f}"
                );
            }
        }
        for dev in crate::device::test_devices() {
            let (ld, gd, _) = run(dev, vals, true);
            crate::device::assert_close("loss", dev, &[ld], &[l]);
            for (i, (h, d)) in g.iter().zip(&gd).enumerate() {
                crate::device::assert_close(
                    &format!("input {i}"),
                    dev,
                    d.as_ref().unwrap(),
                    h.as_ref().unwrap(),
                );
            }
        }
        let x = Tensor::new(vec![0.0; 12], &[3, 4]).unwrap();
        let e = max_pool2d(&Tape::new(0), &x, (2, 2), (1, 1), (0, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("(N, C, H, W)"), "{e}");
        let x = Tensor::new(vec![0.0; 16], &[1, 1, 4, 4]).unwrap();
        let e = max_pool2d(&Tape::new(0), &x, (2, 2), (1, 1), (2, 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("padding"), "{e}");
        let s = Tensor::param(vec![1.0], &[1]).unwrap();
        let c = Tensor::new(vec![1.0], &[1]).unwrap();
        let e = batch_norm2d(&Tape::new(0), &x, &s, &c, &c, &c, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("frozen running statistics"), "{e}");
    }
}
