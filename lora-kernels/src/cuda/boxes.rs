//! `boxes.cu`: DETR's box losses (see `ops::boxes`).

use super::*;

impl CudaDevice {
    fn check_boxes(op: &str, pred: usize, target: usize) -> Result<usize> {
        if pred % 4 != 0 || pred != target {
            return Err(KernelError::Device(format!(
                "{op}: {pred} predicted and {target} target values are not matching (M, 4) boxes"
            )));
        }
        Ok(pred / 4)
    }

    /// `[sum |p - t|, sum (1 - giou)] / num_boxes` into a 2-value buffer.
    pub fn box_losses_forward(
        &self,
        pred: &CudaSlice<f32>,
        target: &CudaSlice<f32>,
        num_boxes: f32,
    ) -> Result<CudaSlice<f32>> {
        let m = Self::check_boxes("box_losses_forward", pred.len(), target.len())?;
        // Written by thread 0 of the launch, even for no pairs (sums of 0).
        let mut out = self.output(2)?;
        let m_i = m as i64;
        let mut l = self.stream.launch_builder(self.func("box_losses_forward"));
        l.arg(&mut out)
            .arg(pred)
            .arg(target)
            .arg(&m_i)
            .arg(&num_boxes);
        // SAFETY: argument order matches boxes.cu; one block of 256 threads, as its reduction
        // assumes; lengths checked above.
        unsafe { l.launch(grid(1, 1)) }.map_err(cerr("box_losses_forward"))?;
        Ok(out)
    }

    /// `dpred += (dout[0] sign(p - t) - dout[1] dgiou/dp) / num_boxes`.
    pub fn box_losses_backward(
        &self,
        dpred: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        pred: &CudaSlice<f32>,
        target: &CudaSlice<f32>,
        num_boxes: f32,
    ) -> Result<()> {
        let m = Self::check_boxes("box_losses_backward", pred.len(), target.len())?;
        if dpred.len() != pred.len() || dout.len() != 2 {
            return Err(KernelError::Device(format!(
                "box_losses_backward: dpred {} (expected {}), dout {} (expected 2)",
                dpred.len(),
                pred.len(),
                dout.len()
            )));
        }
        if m == 0 {
            return Ok(());
        }
        let m_i = m as i64;
        let mut l = self.stream.launch_builder(self.func("box_losses_backward"));
        l.arg(dpred)
            .arg(dout)
            .arg(pred)
            .arg(target)
            .arg(&m_i)
            .arg(&num_boxes);
        // SAFETY: argument order matches boxes.cu; lengths checked above.
        unsafe { l.launch(grid(blocks(m, THREADS as usize), 1)) }
            .map_err(cerr("box_losses_backward"))?;
        Ok(())
    }
}
