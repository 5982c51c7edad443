//! Causal grouped-query attention.

use super::*;
use lora_kernels::ops::attention;

/// Causal GQA attention. `q`: `(B, T, Hq * D)`, `k`, `v`: `(B, T, Hkv * D)`; returns
/// `(B, T, Hq * D)`. Scale `1 / sqrt(D)`.
pub fn attention(
    tape: &Tape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    const OP: &str = "attention";
    if q.shape().len() != 3 || q_heads == 0 || q.shape()[2] % q_heads != 0 {
        return Err(shape_err(
            OP,
            "q",
            q,
            format!("[batch, seq, {q_heads} * head_dim]"),
        ));
    }
    let (b, t) = (q.shape()[0], q.shape()[1]);
    let hd = q.shape()[2] / q_heads;
    for (what, x) in [("k", k), ("v", v)] {
        if x.shape() != [b, t, kv_heads * hd] {
            return Err(shape_err(
                OP,
                what,
                x,
                format!("[{b}, {t}, {}]", kv_heads * hd),
            ));
        }
    }
    let dims = attention::AttnDims {
        batch: b,
        seq: t,
        q_heads,
        kv_heads,
        head_dim: hd,
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let on = placement(OP, &[("q", q), ("k", k), ("v", v)])?;
    let (gq, gk, gv) = (read(q)?, read(k)?, read(v)?);
    let [out, lse] =
        on.accel
            .attention_forward(f32_of(&gq)?, f32_of(&gk)?, f32_of(&gv)?, dims, scale)?;
    drop((gq, gk, gv));
    let requires = q.requires_grad() || k.requires_grad() || v.requires_grad();
    let y = on.tensor(out, q.shape(), requires)?;
    let op = AttentionNode { lse, dims, scale };
    on.record(tape, op, vec![q.clone(), k.clone(), v.clone()], &y);
    Ok(y)
}

/// [q, k, v]
struct AttentionNode {
    lse: DBuf,
    dims: AttnDims,
    scale: f32,
}

impl OpNode for AttentionNode {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn reads_input(&self, _: usize, _: &[Tensor]) -> bool {
        true
    }
    fn saved_elems(&self) -> usize {
        self.lse.len()
    }
    fn backward(
        &self,
        a: &dyn Accel,
        inputs: &[Input],
        data: &[&DBuf],
        dout: &DBuf,
        g: &mut Slots<DBuf>,
    ) -> Result<()> {
        let (mut s0, mut s1, mut s2) = (None, None, None);
        let dq = or_scratch(g.take(0), &mut s0, a, inputs[0].numel())?;
        let dk = or_scratch(g.take(1), &mut s1, a, inputs[1].numel())?;
        let dv = or_scratch(g.take(2), &mut s2, a, inputs[2].numel())?;
        a.attention_backward(
            dq, dk, dv, dout, &self.lse, data[0], data[1], data[2], self.dims, self.scale,
        )?;
        Ok(())
    }
}
