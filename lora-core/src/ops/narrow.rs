//! Columns `[start, start + len)` of the last dimension.

use super::*;
use lora_kernels::ops::slice;

/// Columns `[start, start + len)` of the last dimension.
pub fn narrow(tape: &Tape, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    let cols = x.last_dim();
    if let Some(on) = placement("narrow", &[("x", x)])? {
        let shape = with_last(x.shape(), len);
        return narrow_dev(tape, on, x, start, len, &shape);
    }
    let mut out = vec![0.0; x.rows() * len];
    slice::narrow_forward(&mut out, &x.data(), cols, start, len)?;
    let y = Tensor::from_op(out, &with_last(x.shape(), len), x.requires_grad())?;
    tape.record(Op::host(NarrowNode { start, len }), vec![x.clone()], &y);
    Ok(y)
}

fn narrow_dev(
    tape: &Tape,
    on: On,
    x: &Tensor,
    start: usize,
    len: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    let mut out = on.accel.zeros(x.rows() * len)?;
    {
        let g = read(x)?;
        let (n, cols) = (x.rows(), x.last_dim());
        on.accel
            .narrow(true, &mut out, f32_of(&g)?, n, cols, start, len)?;
    }
    let y = on.tensor(out, out_shape, x.requires_grad())?;
    on.record(tape, DevNarrow { start, len }, vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct NarrowNode {
    start: usize,
    len: usize,
}

impl HostOp for NarrowNode {
    fn name(&self) -> &'static str {
        "narrow"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn backward(
        &self,
        inputs: &[Input],
        _: &[&[f32]],
        dout: &[f32],
        g: &mut Slots<[f32]>,
    ) -> Result<()> {
        if let Some(g) = g.take(0) {
            slice::narrow_backward(g, dout, inputs[0].last_dim(), self.start, self.len)?;
        }
        Ok(())
    }
}

/// [x]
struct DevNarrow {
    start: usize,
    len: usize,
}

impl DevOp for DevNarrow {
    fn name(&self) -> &'static str {
        "narrow"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn backward(
        &self,
        a: &dyn Accel,
        inputs: &[DevInput],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(g) = g.take(0) {
            let cols = inputs[0].last_dim;
            let n = inputs[0].numel / cols.max(1);
            a.narrow(false, g, dout, n, cols, self.start, self.len)?;
        }
        Ok(())
    }
}
