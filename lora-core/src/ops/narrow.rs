//! A range of indices along one dimension.

use super::*;

/// Columns `[start, start + len)` of the last dimension.
pub fn narrow(tape: &Tape, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    let last = x.shape().len().max(1) - 1;
    narrow_dim(tape, x, last, start, len)
}

/// Indices `[start, start + len)` of dimension `dim` (ViT's class token: `dim = 1`, `len = 1`).
pub fn narrow_dim(tape: &Tape, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    const OP: &str = "narrow";
    let s = x.shape();
    let size = match s.get(dim) {
        Some(&d) => d,
        None if s.is_empty() && dim == 0 => 1,
        None => return Err(shape_err(OP, "x", x, format!("more than {dim} dimensions"))),
    };
    if start.checked_add(len).is_none_or(|e| e > size) {
        return Err(shape_err(
            OP,
            "x",
            x,
            format!(
                "at least {} along dimension {dim}",
                start.saturating_add(len)
            ),
        ));
    }
    let on = placement(OP, &[("x", x)])?;
    let outer: usize = s[..dim.min(s.len())].iter().product();
    let inner: usize = s.get(dim + 1..).map_or(1, |r| r.iter().product());
    let (cols, start, width) = (size * inner, start * inner, len * inner);
    let mut shape = s.to_vec();
    match shape.get_mut(dim) {
        Some(d) => *d = len,
        None => shape.push(len),
    }
    let mut out = on.accel.zeros(outer * width)?;
    {
        let g = read(x)?;
        on.accel
            .narrow(true, &mut out, f32_of(&g)?, outer, cols, start, width)?;
    }
    let y = on.tensor(out, &shape, x.requires_grad())?;
    let node = NarrowNode {
        outer,
        cols,
        start,
        len: width,
    };
    on.record(tape, node, vec![x.clone()], &y);
    Ok(y)
}

/// [x], seen as `(outer, cols)` of which columns `[start, start + len)` are kept.
struct NarrowNode {
    outer: usize,
    cols: usize,
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
        _: &[Input],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(g) = g.take(0) {
            a.narrow(false, g, dout, self.outer, self.cols, self.start, self.len)?;
        }
        Ok(())
    }
}
