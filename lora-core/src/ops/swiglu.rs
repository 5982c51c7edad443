//! SwiGLU: `silu(gate) * up`.

use super::*;

/// SwiGLU: `silu(gate) * up`.
pub fn swiglu(tape: &Tape, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        return Err(shape_err(
            "swiglu",
            "up",
            up,
            format!("{:?} (the shape of gate)", gate.shape()),
        ));
    }
    let on = placement("swiglu", &[("gate", gate), ("up", up)])?;
    let (gg, gu) = (read(gate)?, read(up)?);
    let out = on.accel.swiglu_forward(f32_of(&gg)?, f32_of(&gu)?)?;
    drop((gg, gu));
    let y = on.tensor(
        out,
        gate.shape(),
        gate.requires_grad() || up.requires_grad(),
    )?;
    on.record(tape, SwiGluNode, vec![gate.clone(), up.clone()], &y);
    Ok(y)
}

/// [gate, up]
struct SwiGluNode;

impl OpNode for SwiGluNode {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    /// gate and up are products' outputs (bf16 under autocast).
    fn saves_bf16(&self, _: usize) -> bool {
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
        let (mut s0, mut s1) = (None, None);
        let dg = or_scratch(g.take(0), &mut s0, a, dout.len())?;
        let du = or_scratch(g.take(1), &mut s1, a, dout.len())?;
        a.swiglu_backward(dg, du, dout, data[0], data[1])?;
        Ok(())
    }
}
