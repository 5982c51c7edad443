//! Element-wise activations: GELU (tanh approximation) and SiLU.

use super::*;
use lora_kernels::ops::elementwise;

fn unary(
    tape: &Tape,
    x: &Tensor,
    op: UnaryNode,
    f: fn(&mut [f32], &[f32]) -> lora_kernels::Result<()>,
    dev: lora_kernels::accel::Unary,
) -> Result<Tensor> {
    if let Some(on) = placement(op.name(), &[("x", x)])? {
        return unary_dev(tape, on, x, dev);
    }
    let mut out = vec![0.0; x.numel()];
    f(&mut out, &x.data())?;
    let y = Tensor::from_op(out, x.shape(), x.requires_grad())?;
    tape.record(Op::host(op), vec![x.clone()], &y);
    Ok(y)
}

/// GELU, tanh approximation (GPT-2's `gelu_new`).
pub fn gelu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let dev = lora_kernels::accel::Unary::Gelu;
    unary(
        tape,
        x,
        UnaryNode(Unary::Gelu),
        elementwise::gelu_forward,
        dev,
    )
}

/// SiLU (`x * sigmoid(x)`).
pub fn silu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let dev = lora_kernels::accel::Unary::Silu;
    unary(
        tape,
        x,
        UnaryNode(Unary::Silu),
        elementwise::silu_forward,
        dev,
    )
}

fn unary_dev(tape: &Tape, on: On, x: &Tensor, f: Unary) -> Result<Tensor> {
    let g = read(x)?;
    let out = on.accel.unary_forward(f, f32_of(&g)?)?;
    drop(g);
    let y = on.tensor(out, x.shape(), x.requires_grad())?;
    on.record(tape, DevUnary(f), vec![x.clone()], &y);
    Ok(y)
}

/// [x]
struct UnaryNode(Unary);

fn unary_name(f: Unary) -> &'static str {
    match f {
        Unary::Gelu => "gelu",
        Unary::Silu => "silu",
    }
}

impl HostOp for UnaryNode {
    fn name(&self) -> &'static str {
        unary_name(self.0)
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    fn backward(
        &self,
        _: &[Input],
        data: &[&[f32]],
        dout: &[f32],
        g: &mut Slots<[f32]>,
    ) -> Result<()> {
        if let Some(g) = g.take(0) {
            match self.0 {
                Unary::Gelu => elementwise::gelu_backward(g, dout, data[0])?,
                Unary::Silu => elementwise::silu_backward(g, dout, data[0])?,
            }
        }
        Ok(())
    }
}

/// [x]
struct DevUnary(Unary);

impl DevOp for DevUnary {
    fn name(&self) -> &'static str {
        unary_name(self.0)
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[DevInput],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(g) = g.take(0) {
            a.unary_backward(self.0, g, dout, data[0])?;
        }
        Ok(())
    }
}
