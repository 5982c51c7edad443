//! The output head fused with the cross-entropy, in chunks of rows.

use super::*;

/// The output head fused with the cross-entropy: the mean loss of `logits = x W^T` (`x`
/// `(..., C)`, `w` `(V, C)`) against `targets` (one per row; negative = ignored), computed in
/// chunks of rows so the full `(N, V)` logits never exist. On a training tape the gradients for
/// `x` and (when trainable) `w` are computed chunk by chunk in the same pass and scaled by
/// `dloss` in backward; equal to `cross_entropy(linear(x, w))` up to rounding.
pub fn linear_cross_entropy(
    tape: &Tape,
    x: &Tensor,
    w: &Tensor,
    targets: &[i32],
) -> Result<Tensor> {
    const OP: &str = "linear_cross_entropy";
    let c = x.last_dim();
    if w.shape().len() != 2 || w.shape()[1] != c {
        return Err(shape_err(OP, "w", w, format!("(V, {c}) to match x")));
    }
    if x.rows() != targets.len() {
        return Err(shape_err(
            OP,
            "x",
            x,
            format!("{} rows (one per target)", targets.len()),
        ));
    }
    let on = placement(OP, &[("x", x), ("w", w)])?;
    let rows = on.accel.head_rows(w.shape()[0]);
    let training = tape.is_training();
    let want = (training && x.requires_grad(), training && w.requires_grad());
    let (loss, dx, dw) = head_chunked(&*on.accel, x, w, targets, want, rows)?;
    let requires = x.requires_grad() || w.requires_grad();
    let y = on.tensor(on.accel.upload(&[loss])?, &[1], requires)?;
    on.record(
        tape,
        LinearCrossEntropyNode { dx, dw },
        vec![x.clone(), w.clone()],
        &y,
    );
    Ok(y)
}

/// The fused head over row chunks of at most `rows` rows: the mean loss over all counted rows
/// and, as `(want_dx, want_dw)` asks, its gradients for `x` and `w` (each chunk's gradients of
/// its own mean rescaled by its share of the count).
fn head_chunked(
    a: &dyn Accel,
    x: &Tensor,
    w: &Tensor,
    targets: &[i32],
    (want_dx, want_dw): (bool, bool),
    rows: usize,
) -> Result<(f32, Option<DBuf>, Option<DBuf>)> {
    let (c, v, n) = (x.last_dim(), w.shape()[0], targets.len());
    // A frozen 16-bit head (bf16 / f16 checkpoint) is read as stored; one packed for the bf16
    // products (in place, or beside a tied embedding's f32 values) multiplies in bf16.
    let (gx, gw) = (read(x)?, w.store());
    let (xb, wb) = (f32_of(&gx)?, gw.product_weight());
    if n <= rows {
        let h = a.linear_cross_entropy(xb, wb, targets, c, v, want_dx, want_dw)?;
        return Ok((h.loss, h.dx, h.dw));
    }
    let total = targets.iter().filter(|&&t| t >= 0).count();
    let mut dx = want_dx.then(|| a.zeros(n * c)).transpose()?;
    let mut dw = want_dw.then(|| a.zeros(v * c)).transpose()?;
    let mut sum = 0.0f64;
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let xs = a.copy_range(xb, start * c, len * c)?;
        let ts = &targets[start..start + len];
        let h = a.linear_cross_entropy(&xs, wb, ts, c, v, want_dx, want_dw)?;
        sum += h.loss as f64 * h.count as f64;
        if h.count == 0 {
            continue;
        }
        let share = h.count as f32 / total as f32;
        if let (Some(dx), Some(mut dxc)) = (dx.as_mut(), h.dx) {
            a.scale(&mut dxc, share)?;
            a.write_range(dx, start * c, &dxc)?;
        }
        if let (Some(dw), Some(mut dwc)) = (dw.as_mut(), h.dw) {
            a.scale(&mut dwc, share)?;
            a.accumulate(dw, &dwc)?;
        }
    }
    let loss = if total == 0 {
        0.0
    } else {
        (sum / total as f64) as f32
    };
    Ok((loss, dx, dw))
}

/// [x, w]: the gradients of the mean loss for x and w, computed in forward.
struct LinearCrossEntropyNode {
    dx: Option<DBuf>,
    dw: Option<DBuf>,
}

impl OpNode for LinearCrossEntropyNode {
    fn name(&self) -> &'static str {
        "linear_cross_entropy"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn saved_elems(&self) -> usize {
        self.dx.as_ref().map_or(0, DBuf::len) + self.dw.as_ref().map_or(0, DBuf::len)
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        let mut dloss = None;
        for (i, saved) in [(0, &self.dx), (1, &self.dw)] {
            let (Some(g), Some(s)) = (g.take(i), saved.as_ref()) else {
                continue;
            };
            let d = match dloss {
                Some(d) => d,
                None => *dloss.insert(a.download(dout)?[0]),
            };
            if d == 1.0 {
                // The loss is the output (the usual case): `g += 1 * s` is `g += s`
                // exactly, without the scaled copy.
                a.accumulate(g, s)?;
            } else {
                let mut t = a.copy(s)?;
                a.scale(&mut t, d)?;
                a.accumulate(g, &t)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    /// A loss used twice (`loss + loss`) reaches the head's backward with `dloss = 2`: the
    /// node scales its stored dx and dW (the path the usual `dloss = 1` skips), exactly, on
    /// every backend, equal to the CPU's.
    #[test]
    fn device_head_scales_its_gradient_by_dloss() {
        use crate::ops;
        for dev in crate::device::test_devices() {
            let (n, c, v) = (5usize, 4usize, 9usize);
            let mut r = lora_kernels::rng::Rng::new(8);
            let mut rand = |k: usize| -> Vec<f32> {
                (0..k).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect()
            };
            let (xv, wv) = (rand(n * c), rand(v * c));
            let targets = [3, -100, 8, 0, 5];
            let grad = |device: Device, twice: bool| -> Vec<f32> {
                let x = Tensor::new_on(xv.clone(), &[n, c], true, device).unwrap();
                let w = Tensor::new_on(wv.clone(), &[v, c], true, device).unwrap();
                let tape = Tape::new(0);
                let loss = ops::linear_cross_entropy(&tape, &x, &w, &targets).unwrap();
                let out = if twice {
                    ops::add(&tape, &loss, &loss).unwrap()
                } else {
                    loss
                };
                let g = tape.backward(&out).unwrap();
                let mut both = g.to_vec(&x).unwrap().unwrap();
                both.extend(g.to_vec(&w).unwrap().unwrap());
                both
            };
            let (host1, host2) = (grad(Device::Cpu, false), grad(Device::Cpu, true));
            let (dev1, dev2) = (grad(dev, false), grad(dev, true));
            crate::device::assert_close("dloss = 1", dev, &dev1, &host1);
            crate::device::assert_close("dloss = 2", dev, &dev2, &host2);
            assert!(host1.iter().any(|&g| g != 0.0));
            for (a, b) in dev1.iter().zip(&dev2) {
                assert_eq!(2.0 * a, *b, "doubling is exact in binary floating point");
            }
        }
    }

    /// The fused head over row chunks (as a large vocabulary or batch runs it) equals one pass.
    #[test]
    fn chunked_device_head_equals_one_pass() {
        for dev in crate::device::test_devices() {
            let a = crate::device::accel(dev).unwrap();
            let (n, c, v) = (11usize, 6usize, 17usize);
            let mut r = lora_kernels::rng::Rng::new(3);
            let mut rand = |k: usize| -> Vec<f32> {
                (0..k).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect()
            };
            let x = Tensor::new_on(rand(n * c), &[n, c], false, dev).unwrap();
            let w = Tensor::new_on(rand(v * c), &[v, c], true, dev).unwrap();
            let targets = [3, -100, 16, 0, 5, -100, 9, 9, 1, 2, 15];
            let (l1, dx1, dw1) = head_chunked(&*a, &x, &w, &targets, (true, true), n).unwrap();
            let dx1 = a.download(&dx1.unwrap()).unwrap();
            let dw1 = a.download(&dw1.unwrap()).unwrap();
            for rows in [1, 2, 4, 10] {
                let (l, dx, dw) = head_chunked(&*a, &x, &w, &targets, (true, true), rows).unwrap();
                let dx = a.download(&dx.unwrap()).unwrap();
                let dw = a.download(&dw.unwrap()).unwrap();
                assert!(
                    (l - l1).abs() <= 1e-6 * l1.abs(),
                    "rows {rows}: {l} vs {l1}"
                );
                let e = dx
                    .iter()
                    .zip(&dx1)
                    .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(e <= 1e-6, "rows {rows}: dx differs by {e}");
                let e = dw
                    .iter()
                    .zip(&dw1)
                    .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(e <= 1e-6, "rows {rows}: dw differs by {e}");
            }
            let none = [-100i32; 11];
            let (l, dx, dw) = head_chunked(&*a, &x, &w, &none, (true, true), 3).unwrap();
            assert_eq!(l, 0.0);
            assert!(a.download(&dx.unwrap()).unwrap().iter().all(|&g| g == 0.0));
            assert!(a.download(&dw.unwrap()).unwrap().iter().all(|&g| g == 0.0));
        }
    }
}
