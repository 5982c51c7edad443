//! Row lookup in an embedding table.

use super::*;
use lora_kernels::ops::embedding;

/// Row lookup: `table` `(V, C)`, `ids` of shape `shape` → `(shape..., C)`.
pub fn embedding(tape: &Tape, table: &Tensor, ids: &[u32], shape: &[usize]) -> Result<Tensor> {
    if table.shape().len() != 2 {
        return Err(shape_err("embedding", "table", table, "[vocab, channels]"));
    }
    if shape.iter().product::<usize>() != ids.len() {
        return Err(CoreError::DataLength {
            len: ids.len(),
            shape: shape.to_vec(),
            needed: shape.iter().product(),
        });
    }
    if let Some(on) = placement("embedding", &[("table", table)])? {
        return embedding_dev(tape, on, table, ids, shape);
    }
    let c = table.shape()[1];
    let mut out = vec![0.0; ids.len() * c];
    // A half-stored table (bf16 / f16 checkpoint) is read as stored, row by row.
    embedding::embedding_forward_stored(&mut out, table.weight().as_data(), ids, c)?;
    let mut s = shape.to_vec();
    s.push(c);
    let y = Tensor::from_op(out, &s, table.requires_grad())?;
    tape.record(
        Op::host(EmbeddingNode { ids: ids.to_vec() }),
        vec![table.clone()],
        &y,
    );
    Ok(y)
}

fn embedding_dev(
    tape: &Tape,
    on: On,
    table: &Tensor,
    ids: &[u32],
    shape: &[usize],
) -> Result<Tensor> {
    let c = table.shape()[1];
    let g = read(table)?;
    let out = on.accel.embedding_forward(f32_of(&g)?, ids, c)?;
    drop(g);
    let mut s = shape.to_vec();
    s.push(c);
    let y = on.tensor(out, &s, table.requires_grad())?;
    on.record(
        tape,
        DevEmbedding { ids: ids.to_vec() },
        vec![table.clone()],
        &y,
    );
    Ok(y)
}

/// [table]
struct EmbeddingNode {
    ids: Vec<u32>,
}

impl HostOp for EmbeddingNode {
    fn name(&self) -> &'static str {
        "embedding"
    }
    // The gradient of the table is a scatter of dout: the values are not read.
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn saved_elems(&self) -> usize {
        self.ids.len()
    }
    fn backward(
        &self,
        inputs: &[Input],
        _: &[&[f32]],
        dout: &[f32],
        g: &mut Slots<[f32]>,
    ) -> Result<()> {
        if let Some(g) = g.take(0) {
            embedding::embedding_backward(g, dout, &self.ids, inputs[0].last_dim())?;
        }
        Ok(())
    }
}

/// [table]
struct DevEmbedding {
    ids: Vec<u32>,
}

impl DevOp for DevEmbedding {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        false
    }
    fn saved_elems(&self) -> usize {
        self.ids.len()
    }
    fn backward(
        &self,
        a: &dyn Accel,
        inputs: &[DevInput],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(g) = g.take(0) {
            a.embedding_backward(g, dout, &self.ids, inputs[0].last_dim)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{ops, Device, Tape, Tensor};

    /// A trainable table on a device (the host emulation here) gets the host's gradient,
    /// repeated ids summed in token order, and AdamW-ready device gradients.
    #[test]
    fn a_trainable_table_on_a_device_gets_the_host_gradient() {
        crate::device::emulate_cuda(972);
        let dev = Device::Cuda(972);
        let (v, c) = (5usize, 6usize);
        let ids = [3u32, 0, 3, 4, 3, 1, 0];
        let targets = [2, -100, 5, 0, 5, 1, 3];
        let mut r = lora_kernels::rng::Rng::new(11);
        let table: Vec<f32> = (0..v * c)
            .map(|_| r.uniform_range(-1.0, 1.0) as f32)
            .collect();
        let grad = |device: Device| -> (Vec<f32>, f32) {
            let t = Tensor::new_on(table.clone(), &[v, c], true, device).unwrap();
            let tape = Tape::new(0);
            let e = ops::embedding(&tape, &t, &ids, &[ids.len()]).unwrap();
            let loss = ops::cross_entropy(&tape, &e, &targets).unwrap();
            let l = loss.try_to_vec().unwrap()[0];
            let g = tape.backward(&loss).unwrap();
            assert_eq!(g.is_on_device(&t), device != Device::Cpu);
            (g.to_vec(&t).unwrap().unwrap(), l)
        };
        let (host, lh) = grad(Device::Cpu);
        let (on_dev, ld) = grad(dev);
        assert_eq!(lh.to_bits(), ld.to_bits());
        assert_eq!(host, on_dev);
        // Row 2 is never looked up; rows 0 and 3 are, more than once.
        assert!(host[2 * c..3 * c].iter().all(|&x| x == 0.0));
        assert!(host[3 * c..4 * c].iter().any(|&x| x != 0.0));
    }
}
