//! The fused (LoRA) linear layer.

use super::*;

/// The adapter operands of [`linear`].
#[derive(Clone, Copy, Debug)]
pub struct LoraArgs<'a> {
    /// A: `(R, K)`.
    pub a: &'a Tensor,
    /// B: `(M, R)`.
    pub b: &'a Tensor,
    /// s.
    pub scale: f32,
    /// Dropout probability on the adapter input (applied only on a training tape).
    pub dropout: f32,
}

/// The fused (LoRA) linear layer: `y = x W^T + b + s * drop(x) A^T B^T`, `x`: `(..., K)`.
/// `w` is `(M, K)` for [`WeightLayout::OutIn`] and `(K, M)` for [`WeightLayout::InOut`].
/// A frozen `w` gets no gradient and no weight-gradient GEMM.
pub fn linear(
    tape: &Tape,
    x: &Tensor,
    w: &Tensor,
    layout: WeightLayout,
    bias: Option<&Tensor>,
    lora: Option<LoraArgs>,
) -> Result<Tensor> {
    const OP: &str = "linear";
    if w.shape().len() != 2 {
        return Err(shape_err(OP, "weight", w, "2 dimensions"));
    }
    let (k, m) = match layout {
        WeightLayout::OutIn => (w.shape()[1], w.shape()[0]),
        WeightLayout::InOut => (w.shape()[0], w.shape()[1]),
    };
    if x.last_dim() != k || x.shape().is_empty() {
        return Err(shape_err(
            OP,
            "x",
            x,
            format!("(..., {k}) to match the weight {:?}", w.shape()),
        ));
    }
    if let Some(b) = bias {
        if b.shape() != [m] {
            return Err(shape_err(OP, "bias", b, format!("[{m}]")));
        }
    }
    let dims = LinearDims {
        tokens: x.rows(),
        inp: k,
        out: m,
    };
    if let Some(l) = lora {
        let r = l.a.shape().first().copied().unwrap_or(0);
        if l.a.shape() != [r, k] || r == 0 {
            return Err(shape_err(OP, "lora_a", l.a, format!("[rank, {k}]")));
        }
        if l.b.shape() != [m, r] {
            return Err(shape_err(OP, "lora_b", l.b, format!("[{m}, {r}]")));
        }
    }
    let mut operands = vec![("x", x), ("weight", w)];
    operands.extend(bias.map(|b| ("bias", b)));
    if let Some(l) = lora {
        operands.extend([("lora_a", l.a), ("lora_b", l.b)]);
    }
    let on = placement(OP, &operands)?;
    let shape = with_last(x.shape(), m);
    let mut inputs = vec![x.clone(), w.clone()];
    inputs.extend(bias.cloned());
    let gx = read(x)?;
    let gw = w.store(); // 16-bit as stored when the weight is half-stored
    let gb = bias.map(read).transpose()?;
    let bias_buf = gb.as_ref().map(f32_of).transpose()?;
    let (y, saved) = match lora {
        None => {
            let (y, _) = on.accel.linear_forward(
                f32_of(&gx)?,
                gw.product_weight(),
                layout,
                bias_buf,
                None,
                dims,
            )?;
            (y, None)
        }
        Some(l) => {
            let rank = l.a.shape()[0];
            let dropout = (tape.is_training() && l.dropout > 0.0).then(|| Dropout {
                p: l.dropout,
                seed: tape.next_seed(),
            });
            let (ga, gbb) = (read(l.a)?, read(l.b)?);
            let dl = LoraBufs {
                a: f32_of(&ga)?,
                b: f32_of(&gbb)?,
                rank,
                scale: l.scale,
                dropout,
            };
            let (y, u) = on.accel.linear_forward(
                f32_of(&gx)?,
                gw.product_weight(),
                layout,
                bias_buf,
                Some(dl),
                dims,
            )?;
            inputs.push(l.a.clone());
            inputs.push(l.b.clone());
            let u = u.ok_or(CoreError::Internal(
                "linear: the backend returned no adapter u",
            ))?;
            (
                y,
                Some(LoraSaved {
                    rank,
                    scale: l.scale,
                    dropout,
                    u,
                }),
            )
        }
    };
    drop((gx, gw, gb));
    let requires = inputs.iter().any(|t| t.requires_grad());
    let out = on.tensor(y, &shape, requires)?;
    let op = LinearNode {
        layout,
        has_bias: bias.is_some(),
        dims,
        lora: saved,
    };
    on.record(tape, op, inputs, &out);
    Ok(out)
}

/// What a linear op's backward reads: dW and dA read x; dx reads W (and A, B). The weights are
/// kept (they are alive anyway): only x, an activation, is worth dropping.
fn reads_x_or_weights(i: usize, inputs: &[Tensor], has_bias: bool, lora: bool) -> bool {
    let a_idx = if has_bias { 3 } else { 2 };
    i != 0 || inputs[1].requires_grad() || (lora && inputs[a_idx].requires_grad())
}

/// Saved state of the adapter part of a linear op.
struct LoraSaved {
    rank: usize,
    scale: f32,
    dropout: Option<Dropout>,
    u: DBuf,
}

/// [x, w, (bias), (lora_a, lora_b)]
struct LinearNode {
    layout: WeightLayout,
    has_bias: bool,
    dims: LinearDims,
    lora: Option<LoraSaved>,
}

impl OpNode for LinearNode {
    fn name(&self) -> &'static str {
        "lora_linear"
    }
    fn reads_input(&self, i: usize, inputs: &[Tensor]) -> bool {
        reads_x_or_weights(i, inputs, self.has_bias, self.lora.is_some())
    }
    fn saved_elems(&self) -> usize {
        self.lora.as_ref().map_or(0, |l| l.u.len())
    }
    fn reads_stored(&self, i: usize) -> bool {
        i == 1
    }
    fn backward(
        &self,
        a: &dyn Accel,
        inputs: &[Input],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        let Self {
            layout,
            has_bias,
            dims,
            lora,
        } = self;
        let bias_idx = has_bias.then_some(2);
        let a_idx = if *has_bias { 3 } else { 2 };
        let dl = lora.as_ref().map(|l| LoraBufs {
            a: data[a_idx],
            b: data[a_idx + 1],
            rank: l.rank,
            scale: l.scale,
            dropout: l.dropout,
        });
        let grads = LinearGradBufs {
            dx: g.take(0),
            dw: g.take(1),
            dbias: bias_idx.and_then(|i| g.take(i)),
            da: if lora.is_some() { g.take(a_idx) } else { None },
            db: if lora.is_some() {
                g.take(a_idx + 1)
            } else {
                None
            },
        };
        let w = inputs[1].values.as_ref().ok_or(CoreError::Internal(
            "linear: the weight was not kept for backward",
        ))?;
        let u = lora.as_ref().map(|l| &l.u);
        let gw = w.store();
        a.linear_backward(
            grads,
            dout,
            data[0],
            gw.product_weight(),
            *layout,
            dl,
            u,
            *dims,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{ops, Device, Tape, Tensor};
    use lora_kernels::lora_linear::WeightLayout;

    /// A trainable base weight (full fine-tuning) and bias, with and without an adapter, in both
    /// layouts, on every backend, with the CPU's gradients; the tape keeps the layer's input
    /// only when the weight or A trains (its `n * k` values), and the adapter's `u` (`n * r`).
    #[test]
    fn a_device_trains_weights_and_biases_as_the_host_does() {
        for dev in crate::device::test_devices() {
            let (n, k, m, r) = (5usize, 7usize, 4usize, 2usize);
            let mut rng = lora_kernels::rng::Rng::new(21);
            let mut rand = |len: usize| -> Vec<f32> {
                (0..len)
                    .map(|_| rng.uniform_range(-1.0, 1.0) as f32)
                    .collect()
            };
            let (xv, wv, bv, av, bbv) =
                (rand(n * k), rand(m * k), rand(m), rand(r * k), rand(m * r));
            let targets = [1, 3, -100, 0, 2];
            // (weight trains, bias trains, adapter, A trains, B trains)
            let cases = [
                (false, true, false, false, false),
                (true, true, false, false, false),
                (true, false, true, true, true),
                (false, true, true, true, true),
                (true, true, true, false, false),
                (false, false, true, true, true),
                (false, false, true, false, true), // LoRA-FA: x is not kept
                (false, false, false, false, false),
            ];
            for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
                // The tape of a layer keeping nothing: the loss's own saved values.
                let mut base_saved = None;
                for (wt, bt, with_lora, at, lt) in cases {
                    let run = |device: Device| -> (f32, usize, Vec<Option<Vec<f32>>>) {
                        let x0 = Tensor::new_on(xv.clone(), &[n, k], true, device).unwrap();
                        let wshape = match layout {
                            WeightLayout::OutIn => [m, k],
                            WeightLayout::InOut => [k, m],
                        };
                        let w = Tensor::new_on(wv.clone(), &wshape, wt, device).unwrap();
                        let b = Tensor::new_on(bv.clone(), &[m], bt, device).unwrap();
                        let a = Tensor::new_on(av.clone(), &[r, k], at, device).unwrap();
                        let bb = Tensor::new_on(bbv.clone(), &[m, r], lt, device).unwrap();
                        let tape = Tape::new(4);
                        // An activation (what the tape may drop), not a leaf.
                        let x = ops::gelu(&tape, &x0).unwrap();
                        let lora = with_lora.then_some(ops::LoraArgs {
                            a: &a,
                            b: &bb,
                            scale: 1.5,
                            dropout: 0.0,
                        });
                        let y = ops::linear(&tape, &x, &w, layout, Some(&b), lora).unwrap();
                        let loss = ops::cross_entropy(&tape, &y, &targets).unwrap();
                        let saved = tape.saved_elems();
                        let l = loss.try_to_vec().unwrap()[0];
                        let g = tape.backward(&loss).unwrap();
                        let grads = [&x0, &w, &b, &a, &bb]
                            .iter()
                            .map(|t| g.to_vec(t).unwrap())
                            .collect();
                        (l, saved, grads)
                    };
                    let what =
                        format!("{layout:?} weight {wt} bias {bt} lora {with_lora} A {at} B {lt}");
                    let (lh, sh, gh) = run(Device::Cpu);
                    let (ld, sd, gd) = run(dev);
                    crate::device::assert_close(&what, dev, &[ld], &[lh]);
                    assert_eq!(sh, sd, "{what}: saved activations");
                    for (i, (h, d)) in gh.iter().zip(&gd).enumerate() {
                        assert_eq!(h.is_some(), d.is_some(), "{what}: input {i}");
                        if let (Some(h), Some(d)) = (h, d) {
                            crate::device::assert_close(&format!("{what}: input {i}"), dev, d, h);
                        }
                    }
                    let keeps_x = wt || (with_lora && at);
                    let own = keeps_x as usize * n * k + with_lora as usize * n * r;
                    if !with_lora && !wt {
                        base_saved.get_or_insert(sh);
                    }
                    if let Some(base) = base_saved {
                        assert_eq!(sh, base + own, "{what}: saved activations");
                    }
                    let trains = [true, wt, bt, with_lora && at, with_lora && lt];
                    for (i, (g, t)) in gh.iter().zip(trains).enumerate() {
                        assert_eq!(g.is_some(), t, "{what}: input {i} has a gradient");
                        if let Some(g) = g {
                            assert!(g.iter().any(|&v| v != 0.0), "{what}: input {i}");
                        }
                    }
                }
            }
        }
    }
}
