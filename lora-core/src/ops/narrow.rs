//! Columns `[start, start + len)` of the last dimension.

use super::*;

/// Columns `[start, start + len)` of the last dimension.
pub fn narrow(tape: &Tape, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    let on = placement("narrow", &[("x", x)])?;
    let shape = with_last(x.shape(), len);
    let mut out = on.accel.zeros(x.rows() * len)?;
    {
        let g = read(x)?;
        let (n, cols) = (x.rows(), x.last_dim());
        on.accel
            .narrow(true, &mut out, f32_of(&g)?, n, cols, start, len)?;
    }
    let y = on.tensor(out, &shape, x.requires_grad())?;
    on.record(tape, NarrowNode { start, len }, vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct NarrowNode {
    start: usize,
    len: usize,
}

impl OpNode for NarrowNode {
    fn name(&self) -> &'static str {
        "narrow"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn backward(
        &self,
        a: &dyn Accel,
        inputs: &[Input],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(g) = g.take(0) {
            let cols = inputs[0].last_dim();
            let n = inputs[0].numel() / cols.max(1);
            a.narrow(false, g, dout, n, cols, self.start, self.len)?;
        }
        Ok(())
    }
}
