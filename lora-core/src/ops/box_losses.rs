//! DETR's box losses of matched predictions.

use super::*;

/// `[loss_bbox, loss_giou] = [sum |p - t|, sum (1 - giou(p, t))] / num_boxes` for `(M, 4)`
/// matched `(cx, cy, w, h)` boxes: `pred` (trainable) and `target` (data, no gradient), as
/// DETR's and YOLOS's criterion computes them (`num_boxes` is the batch's object count, at least
/// 1). The result has shape `[2]`.
pub fn box_losses(tape: &Tape, pred: &Tensor, target: &Tensor, num_boxes: f32) -> Result<Tensor> {
    const OP: &str = "box_losses";
    if pred.shape().len() != 2 || pred.shape()[1] != 4 {
        return Err(shape_err(OP, "pred", pred, "[M, 4] boxes (cx, cy, w, h)"));
    }
    if target.shape() != pred.shape() {
        return Err(shape_err(
            OP,
            "target",
            target,
            format!("{:?} (pred's)", pred.shape()),
        ));
    }
    if !(num_boxes.is_finite() && num_boxes > 0.0) {
        return Err(CoreError::InvalidConfig {
            field: "num_boxes",
            reason: format!("{num_boxes}: must be positive"),
        });
    }
    if target.requires_grad() {
        return Err(CoreError::Unsupported(
            "box_losses: the target boxes are data and take no gradient",
        ));
    }
    let on = placement(OP, &[("pred", pred), ("target", target)])?;
    let (gp, gt) = (read(pred)?, read(target)?);
    let out = on
        .accel
        .box_losses_forward(f32_of(&gp)?, f32_of(&gt)?, num_boxes)?;
    drop((gp, gt));
    let y = on.tensor(out, &[2], pred.requires_grad())?;
    on.record(
        tape,
        BoxLossNode { num_boxes },
        vec![pred.clone(), target.clone()],
        &y,
    );
    Ok(y)
}

/// [pred, target]
struct BoxLossNode {
    num_boxes: f32,
}

impl OpNode for BoxLossNode {
    fn name(&self) -> &'static str {
        "box_losses"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    fn saved_elems(&self) -> usize {
        0
    }
    fn backward(
        &self,
        a: &dyn Accel,
        _: &[Input],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(gp) = g.take(0) {
            a.box_losses_backward(gp, dout, data[0], data[1], self.num_boxes)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{assert_close, test_devices};

    fn run(dev: Device, p: &[f32], t: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let tape = Tape::new(0);
        let m = p.len() / 4;
        let pt = Tensor::new_on(p.to_vec(), &[m, 4], true, dev).unwrap();
        let tt = Tensor::new_on(t.to_vec(), &[m, 4], false, dev).unwrap();
        let y = box_losses(&tape, &pt, &tt, 3.0).unwrap();
        let g = tape.backward_with(&y, &[0.5, 2.0]).unwrap();
        (y.try_to_vec().unwrap(), g.to_vec(&pt).unwrap().unwrap())
    }

    #[test]
    fn matches_the_kernel_on_each_backend() {
        let p = [0.5, 0.5, 0.4, 0.3, 0.2, 0.7, 0.1, 0.2, 0.8, 0.3, 0.3, 0.5];
        let t = [
            0.45, 0.55, 0.3, 0.3, 0.6, 0.6, 0.2, 0.1, 0.7, 0.35, 0.2, 0.4,
        ];
        let want = lora_kernels::ops::boxes::box_losses_forward(&p, &t, 3.0).unwrap();
        let mut wg = vec![0.0; 12];
        lora_kernels::ops::boxes::box_losses_backward(&mut wg, [0.5, 2.0], &p, &t, 3.0).unwrap();
        let (y, g) = run(Device::Cpu, &p, &t);
        assert_eq!(y, want);
        assert_eq!(g, wg);
        for dev in test_devices() {
            let (yd, gd) = run(dev, &p, &t);
            assert_close("box losses", dev, &yd, &y);
            assert_close("d pred", dev, &gd, &g);
        }
        let tape = Tape::new(0);
        let a = Tensor::new(vec![0.0; 6], &[2, 3]).unwrap();
        let e = box_losses(&tape, &a, &a, 1.0).unwrap_err().to_string();
        assert!(e.contains("[M, 4]"), "{e}");
        let b = Tensor::new(vec![0.0; 8], &[2, 4]).unwrap();
        let e = box_losses(&tape, &b, &b, 0.0).unwrap_err().to_string();
        assert!(e.contains("num_boxes"), "{e}");
    }
}
