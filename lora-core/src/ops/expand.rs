//! Copies of a tensor stacked along a new leading dimension.

use super::*;

/// `x (1, ...)` repeated `n` times along its first dimension: `(n, ...)`. A learned token or
/// position table shared by every image of a batch is broadcast this way; its gradient is the
/// sum over the copies.
pub fn expand(tape: &Tape, x: &Tensor, n: usize) -> Result<Tensor> {
    if x.shape().first() != Some(&1) {
        return Err(shape_err("expand", "x", x, "[1, ...]"));
    }
    let on = placement("expand", &[("x", x)])?;
    let len = x.numel();
    let mut out = on.accel.zeros(n * len)?;
    {
        let g = read(x)?;
        let src = f32_of(&g)?;
        for i in 0..n {
            on.accel.write_range(&mut out, i * len, src)?;
        }
    }
    let mut shape = x.shape().to_vec();
    shape[0] = n;
    let y = on.tensor(out, &shape, x.requires_grad())?;
    on.record(tape, ExpandNode { n, len }, vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct ExpandNode {
    n: usize,
    len: usize,
}

impl OpNode for ExpandNode {
    fn name(&self) -> &'static str {
        "expand"
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
        if let Some(g) = g.take(0) {
            for i in 0..self.n {
                a.accumulate(g, &a.copy_range(dout, i * self.len, self.len)?)?;
            }
        }
        Ok(())
    }
}
