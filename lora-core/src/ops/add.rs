//! `a + b`.

use super::*;
use lora_kernels::ops::elementwise;

/// `a + b` (same shapes).
pub fn add(tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return Err(shape_err(
            "add",
            "b",
            b,
            format!("{:?} (the shape of a)", a.shape()),
        ));
    }
    if let Some(on) = placement("add", &[("a", a), ("b", b)])? {
        return add_dev(tape, on, a, b);
    }
    let mut out = vec![0.0; a.numel()];
    elementwise::add_forward(&mut out, &a.data(), &b.data())?;
    let y = Tensor::from_op(out, a.shape(), any_grad(&[a, b]))?;
    tape.record(Op::host(AddNode), vec![a.clone(), b.clone()], &y);
    Ok(y)
}

fn add_dev(tape: &Tape, on: On, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ga, gb) = (read(a)?, read(b)?);
    let out = on.accel.add(f32_of(&ga)?, f32_of(&gb)?)?;
    drop((ga, gb));
    let y = on.tensor(out, a.shape(), a.requires_grad() || b.requires_grad())?;
    on.record(tape, DevAdd, vec![a.clone(), b.clone()], &y);
    Ok(y)
}

struct AddNode;

impl HostOp for AddNode {
    fn name(&self) -> &'static str {
        "add"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn backward(
        &self,
        _: &[Input],
        _: &[&[f32]],
        dout: &[f32],
        g: &mut Slots<[f32]>,
    ) -> Result<()> {
        for i in 0..2 {
            if let Some(g) = g.take(i) {
                elementwise::accumulate(g, dout)?;
            }
        }
        Ok(())
    }
}

struct DevAdd;

impl DevOp for DevAdd {
    fn name(&self) -> &'static str {
        "add"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[DevInput],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        for i in 0..2 {
            if let Some(g) = g.take(i) {
                a.accumulate(g, dout)?;
            }
        }
        Ok(())
    }
}
