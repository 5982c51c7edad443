//! The same values under another shape.

use super::*;

/// `x`'s values under `shape` (same number of elements; row-major order kept). The values are
/// copied, so the result is an independent tensor; its gradient flows back unchanged.
pub fn reshape(tape: &Tape, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if shape.iter().product::<usize>() != x.numel() {
        return Err(shape_err(
            "reshape",
            "x",
            x,
            format!(
                "{} elements (the shape {shape:?})",
                shape.iter().product::<usize>()
            ),
        ));
    }
    let on = placement("reshape", &[("x", x)])?;
    let g = read(x)?;
    let out = on.accel.copy(f32_of(&g)?)?;
    drop(g);
    let y = on.tensor(out, shape, x.requires_grad())?;
    on.record(tape, ReshapeNode, vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct ReshapeNode;

impl OpNode for ReshapeNode {
    fn name(&self) -> &'static str {
        "reshape"
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
            a.accumulate(g, dout)?;
        }
        Ok(())
    }
}
