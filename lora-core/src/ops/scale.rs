//! `s * x` for a constant `s`.

use super::*;

/// `s * x` (a constant factor: the scale of a LoRA branch that is not fused into its layer).
pub fn scale(tape: &Tape, x: &Tensor, s: f32) -> Result<Tensor> {
    let on = placement("scale", &[("x", x)])?;
    let g = read(x)?;
    let mut out = on.accel.copy(f32_of(&g)?)?;
    drop(g);
    on.accel.scale(&mut out, s)?;
    let y = on.tensor(out, x.shape(), x.requires_grad())?;
    on.record(tape, ScaleNode(s), vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct ScaleNode(f32);

impl OpNode for ScaleNode {
    fn name(&self) -> &'static str {
        "scale"
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
            let mut t = a.copy(dout)?;
            a.scale(&mut t, self.0)?;
            a.accumulate(g, &t)?;
        }
        Ok(())
    }
}
