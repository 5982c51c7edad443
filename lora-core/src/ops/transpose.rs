//! The last two dimensions swapped.

use super::*;

/// `x (..., M, N)` as `(..., N, M)` (a copy in the new order): ViT turns the patch
/// convolution's `(B, C, P)` planes into `(B, P, C)` tokens with it.
pub fn transpose(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let r = x.shape().len();
    if r < 2 {
        return Err(shape_err("transpose", "x", x, "at least 2 dimensions"));
    }
    let (m, n) = (x.shape()[r - 2], x.shape()[r - 1]);
    let batch: usize = x.shape()[..r - 2].iter().product();
    let mut shape = x.shape().to_vec();
    shape.swap(r - 2, r - 1);
    let on = placement("transpose", &[("x", x)])?;
    let mut out = on.accel.zeros(x.numel())?;
    {
        let g = read(x)?;
        on.accel
            .transpose(&mut out, f32_of(&g)?, batch, m, n, false)?;
    }
    let y = on.tensor(out, &shape, x.requires_grad())?;
    on.record(tape, TransposeNode { batch, m, n }, vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct TransposeNode {
    batch: usize,
    m: usize,
    n: usize,
}

impl OpNode for TransposeNode {
    fn name(&self) -> &'static str {
        "transpose"
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
            // dout is (batch, n, m): transposed back and added.
            a.transpose(g, dout, self.batch, self.n, self.m, true)?;
        }
        Ok(())
    }
}
