//! Two tensors joined along one dimension.

use super::*;

/// `a` and `b` joined along dimension `dim` (their other dimensions equal): ViT puts its
/// class token before the patch tokens this way (`dim = 1`), YOLOS adds its detection tokens
/// after them.
pub fn concat(tape: &Tape, a: &Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
    const OP: &str = "concat";
    let (sa, sb) = (a.shape(), b.shape());
    if dim >= sa.len() {
        return Err(shape_err(OP, "a", a, format!("more than {dim} dimensions")));
    }
    let same = sa.len() == sb.len()
        && sa
            .iter()
            .zip(sb)
            .enumerate()
            .all(|(i, (x, y))| i == dim || x == y);
    if !same {
        let mut want = sa.to_vec();
        want[dim] = sb.get(dim).copied().unwrap_or(0);
        return Err(shape_err(
            OP,
            "b",
            b,
            format!("{want:?} (a's shape, any size along dimension {dim})"),
        ));
    }
    let on = placement(OP, &[("a", a), ("b", b)])?;
    let outer: usize = sa[..dim].iter().product();
    let inner: usize = sa[dim + 1..].iter().product();
    let (la, lb) = (sa[dim] * inner, sb[dim] * inner);
    let cols = la + lb;
    let mut out = on.accel.zeros(outer * cols)?;
    {
        // Placing a part is the backward of taking it: `out[:, start..start + len] += part`.
        let (ga, gb) = (read(a)?, read(b)?);
        on.accel
            .narrow(false, &mut out, f32_of(&ga)?, outer, cols, 0, la)?;
        on.accel
            .narrow(false, &mut out, f32_of(&gb)?, outer, cols, la, lb)?;
    }
    let mut shape = sa.to_vec();
    shape[dim] += sb[dim];
    let y = on.tensor(out, &shape, a.requires_grad() || b.requires_grad())?;
    on.record(
        tape,
        ConcatNode { outer, la, lb },
        vec![a.clone(), b.clone()],
        &y,
    );
    Ok(y)
}

/// [a, b], each seen as `(outer, la)` / `(outer, lb)` columns of the `(outer, la + lb)` output.
struct ConcatNode {
    outer: usize,
    la: usize,
    lb: usize,
}

impl OpNode for ConcatNode {
    fn name(&self) -> &'static str {
        "concat"
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
        let cols = self.la + self.lb;
        for (i, start, len) in [(0, 0, self.la), (1, self.la, self.lb)] {
            if let Some(g) = g.take(i) {
                let mut part = a.zeros(self.outer * len)?;
                a.narrow(true, &mut part, dout, self.outer, cols, start, len)?;
                a.accumulate(g, &part)?;
            }
        }
        Ok(())
    }
}
