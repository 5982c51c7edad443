//! Row lookup in an embedding table.

use super::*;

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
    let on = placement("embedding", &[("table", table)])?;
    let c = table.shape()[1];
    // A half-stored table (bf16 / f16 checkpoint) is read as stored, row by row.
    let g = table.store();
    let out = on.accel.embedding_forward(g.weight(), ids, c)?;
    drop(g);
    let mut s = shape.to_vec();
    s.push(c);
    let y = on.tensor(out, &s, table.requires_grad())?;
    on.record(
        tape,
        EmbeddingNode { ids: ids.to_vec() },
        vec![table.clone()],
        &y,
    );
    Ok(y)
}

/// [table]
struct EmbeddingNode {
    ids: Vec<u32>,
}

impl OpNode for EmbeddingNode {
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
        inputs: &[Input],
        _: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        if let Some(g) = g.take(0) {
            a.embedding_backward(g, dout, &self.ids, inputs[0].last_dim())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{ops, Device, Tape, Tensor};

    /// A trainable table gets its gradient (repeated ids summed in token order) where it lives,
    /// on every backend, equal to the CPU's.
    #[test]
    fn a_trainable_table_on_a_device_gets_the_host_gradient() {
        for dev in crate::device::test_devices() {
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
            crate::device::assert_close("loss", dev, &[ld], &[lh]);
            crate::device::assert_close("dtable", dev, &on_dev, &host);
            // Row 2 is never looked up; rows 0 and 3 are, more than once.
            assert!(host[2 * c..3 * c].iter().all(|&x| x == 0.0));
            assert!(host[3 * c..4 * c].iter().any(|&x| x != 0.0));
        }
    }

    struct Bits(Vec<u16>);
    impl crate::ExternalHalf for Bits {
        fn bits(&self) -> &[u16] {
            &self.0
        }
        fn format(&self) -> crate::HalfFormat {
            crate::HalfFormat::Bf16
        }
    }

    /// A bf16 table (a checkpoint's, memory-mapped) is read as stored: the rows equal the
    /// widened values and the table stays 16-bit (no f32 copy of the whole table).
    #[test]
    fn a_bf16_table_is_read_as_stored() {
        let (v, c) = (4usize, 3usize);
        let bits: Vec<u16> = (0..v * c)
            .map(|i| half::bf16::from_f32(i as f32 * 0.75 - 4.0).to_bits())
            .collect();
        let t =
            Tensor::from_external_half(std::sync::Arc::new(Bits(bits.clone())), &[v, c]).unwrap();
        let ids = [2u32, 0, 2];
        let e = ops::embedding(&Tape::new(0), &t, &ids, &[3]).unwrap();
        assert!(t.is_half_stored(), "the lookup widened the whole table");
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&id| {
                bits[id as usize * c..(id as usize + 1) * c]
                    .iter()
                    .map(|&b| half::bf16::from_bits(b).to_f32())
            })
            .collect();
        assert_eq!(e.to_vec(), want);
    }
}
