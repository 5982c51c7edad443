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
        return embedding_dev(on, table, ids, shape);
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

fn embedding_dev(on: On, table: &Tensor, ids: &[u32], shape: &[usize]) -> Result<Tensor> {
    frozen("embedding", "table", table)?;
    let c = table.shape()[1];
    let g = read(table)?;
    let out = on.accel.embedding_forward(f32_of(&g)?, ids, c)?;
    drop(g);
    let mut s = shape.to_vec();
    s.push(c);
    on.tensor(out, &s, false)
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
