//! `a + b`.

use super::*;

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
    let on = placement("add", &[("a", a), ("b", b)])?;
    let (ga, gb) = (read(a)?, read(b)?);
    let out = on.accel.add(f32_of(&ga)?, f32_of(&gb)?)?;
    drop((ga, gb));
    let y = on.tensor(out, a.shape(), a.requires_grad() || b.requires_grad())?;
    on.record(tape, AddNode, vec![a.clone(), b.clone()], &y);
    Ok(y)
}

struct AddNode;

impl OpNode for AddNode {
    fn name(&self) -> &'static str {
        "add"
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
        for i in 0..2 {
            if let Some(g) = g.take(i) {
                a.accumulate(g, dout)?;
            }
        }
        Ok(())
    }
}
