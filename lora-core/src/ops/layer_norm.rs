//! LayerNorm over the last dimension.

use super::*;

/// LayerNorm over the last dimension.
pub fn layer_norm(
    tape: &Tape,
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    let c = x.last_dim();
    check_vec("layer_norm", "gamma", gamma, c)?;
    if let Some(b) = beta {
        check_vec("layer_norm", "beta", b, c)?;
    }
    let mut operands = vec![("x", x), ("gamma", gamma)];
    operands.extend(beta.map(|b| ("beta", b)));
    let on = placement("layer_norm", &operands)?;
    let (gx, gg) = (read(x)?, read(gamma)?);
    let gb = beta.map(read).transpose()?;
    let bb = gb.as_ref().map(f32_of).transpose()?;
    let [out, mean, rstd] =
        on.accel
            .layernorm_forward(f32_of(&gx)?, f32_of(&gg)?, bb, x.last_dim(), eps)?;
    drop((gx, gg, gb));
    let mut inputs = vec![x.clone(), gamma.clone()];
    inputs.extend(beta.cloned());
    let y = on.tensor(out, x.shape(), inputs.iter().any(|t| t.requires_grad()))?;
    on.record(tape, LayerNormNode { mean, rstd }, inputs, &y);
    if tape.records() {
        // Its node keeps x, gamma and beta: readers of y (a LoRA linear) recompute y from them.
        let (x, gamma, beta, accel) = (x.clone(), gamma.clone(), beta.cloned(), on.accel);
        let source = x.clone();
        tape.rematerializable(
            &y,
            &[&source],
            Box::new(move || {
                let (gx, gg) = (read(&x)?, read(&gamma)?);
                let gb = beta.as_ref().map(read).transpose()?;
                let bb = gb.as_ref().map(f32_of).transpose()?;
                let [out, _, _] =
                    accel.layernorm_forward(f32_of(&gx)?, f32_of(&gg)?, bb, c, eps)?;
                Ok(out)
            }),
        );
    }
    Ok(y)
}

/// [x, gamma, (beta)]
struct LayerNormNode {
    mean: DBuf,
    rstd: DBuf,
}

impl OpNode for LayerNormNode {
    fn name(&self) -> &'static str {
        "layer_norm"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    fn saved_elems(&self) -> usize {
        self.mean.len() + self.rstd.len()
    }
    fn backward(
        &self,
        a: &dyn Accel,
        inputs: &[Input],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        let c = inputs[0].last_dim();
        let (dx, dg, db) = (g.take(0), g.take(1), g.take(2));
        a.layernorm_backward(
            dx, dg, db, dout, data[0], data[1], &self.mean, &self.rstd, c,
        )?;
        Ok(())
    }
}
