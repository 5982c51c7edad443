//! Mean cross-entropy of logits against targets (negative targets ignored).

use super::*;

/// Mean cross-entropy of `logits` `(..., V)` against `targets` (one per row; negative =
/// ignored). Returns a scalar tensor.
pub fn cross_entropy(tape: &Tape, logits: &Tensor, targets: &[i32]) -> Result<Tensor> {
    if logits.rows() != targets.len() {
        return Err(shape_err(
            "cross_entropy",
            "logits",
            logits,
            format!("{} rows (one per target)", targets.len()),
        ));
    }
    let on = placement("cross_entropy", &[("logits", logits)])?;
    let g = read(logits)?;
    let (loss, count, lse) =
        on.accel
            .cross_entropy_forward(f32_of(&g)?, targets, logits.last_dim())?;
    drop(g);
    let y = on.tensor(on.accel.upload(&[loss])?, &[1], logits.requires_grad())?;
    let op = CrossEntropyNode {
        lse,
        targets: targets.to_vec(),
        count,
    };
    on.record(tape, op, vec![logits.clone()], &y);
    Ok(y)
}

/// [logits]
struct CrossEntropyNode {
    lse: DBuf,
    targets: Vec<i32>,
    count: usize,
}

impl OpNode for CrossEntropyNode {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    fn saved_elems(&self) -> usize {
        self.lse.len() + self.targets.len()
    }
    fn backward(
        &self,
        a: &dyn Accel,
        inputs: &[Input],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(g) = g.take(0) {
            let dloss = a.download(dout)?[0];
            let v = inputs[0].last_dim();
            a.cross_entropy_backward(g, dloss, data[0], &self.lse, &self.targets, v, self.count)?;
        }
        Ok(())
    }
}
