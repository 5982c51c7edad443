//! RMSNorm over the last dimension.

use super::*;

/// RMSNorm over the last dimension.
pub fn rms_norm(tape: &Tape, x: &Tensor, gamma: &Tensor, eps: f32) -> Result<Tensor> {
    let c = x.last_dim();
    check_vec("rms_norm", "gamma", gamma, c)?;
    let on = placement("rms_norm", &[("x", x), ("gamma", gamma)])?;
    let (gx, gg) = (read(x)?, read(gamma)?);
    let [out, rstd] = on
        .accel
        .rmsnorm_forward(f32_of(&gx)?, f32_of(&gg)?, x.last_dim(), eps)?;
    drop((gx, gg));
    let y = on.tensor(out, x.shape(), x.requires_grad() || gamma.requires_grad())?;
    on.record(
        tape,
        RmsNormNode { rstd },
        vec![x.clone(), gamma.clone()],
        &y,
    );
    if tape.records() {
        // Its node keeps x and gamma: readers of y (a LoRA linear) recompute y from them.
        let (x, gamma, accel) = (x.clone(), gamma.clone(), on.accel);
        let source = x.clone();
        tape.rematerializable(
            &y,
            &[&source],
            Box::new(move || {
                let (gx, gg) = (read(&x)?, read(&gamma)?);
                let [out, _] = accel.rmsnorm_forward(f32_of(&gx)?, f32_of(&gg)?, c, eps)?;
                Ok(out)
            }),
        );
    }
    Ok(y)
}

/// [x, gamma]
struct RmsNormNode {
    rstd: DBuf,
}

impl OpNode for RmsNormNode {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    fn saved_elems(&self) -> usize {
        self.rstd.len()
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
        let (dx, dg) = (g.take(0), g.take(1));
        a.rmsnorm_backward(dx, dg, dout, data[0], data[1], &self.rstd, c)?;
        Ok(())
    }
}
