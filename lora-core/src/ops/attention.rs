//! Grouped-query attention: causal (decoders), bidirectional (encoders) or cross-attention
//! (queries from one sequence, keys and values from another: Stable Diffusion's UNet).

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
    attention_masked(tape, q, k, v, q_heads, kv_heads, true)
}

/// Bidirectional GQA attention (every query sees every key of its sequence: ViT, YOLOS, BERT),
/// shapes as [`attention`].
pub fn attention_bidirectional(
    tape: &Tape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    attention_masked(tape, q, k, v, q_heads, kv_heads, false)
}

/// Cross-attention: `q` `(B, T, H * D)` attends to every row of `k`, `v` `(B, S, H * D)` (S may
/// differ from T: latent pixels attending to text tokens); returns `(B, T, H * D)`. Scale
/// `1 / sqrt(D)`.
pub fn cross_attention(
    tape: &Tape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    attention_masked(tape, q, k, v, heads, heads, false)
}

fn attention_masked(
    tape: &Tape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_heads: usize,
    kv_heads: usize,
    causal: bool,
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
    // Self-attention reads T keys; cross-attention (no mask) takes k's own length.
    let s = match k.shape() {
        [_, s, _] if !causal && *s > 0 => *s,
        _ => t,
    };
    for (what, x) in [("k", k), ("v", v)] {
        if x.shape() != [b, s, kv_heads * hd] {
            let seq = if causal { t.to_string() } else { "seq".into() };
            return Err(shape_err(
                OP,
                what,
                x,
                format!("[{b}, {seq}, {}]", kv_heads * hd),
            ));
        }
    }
    let dims = attention::AttnDims {
        batch: b,
        seq: t,
        kv_seq: s,
        q_heads,
        kv_heads,
        head_dim: hd,
        causal,
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let on = placement(OP, &[("q", q), ("k", k), ("v", v)])?;
    // On a tape keeping bf16 activations, q, k and v (products' outputs) are rounded to bf16
    // before the forward too, as autocast's attention reads them: backward recomputes the
    // softmax from the kept (rounded) q and k with the forward's log-sum-exp, which must come
    // from the same values (with f32 scores in the forward, Qwen2's large q/k biases moved a
    // LoRA gradient by 9.3e-2 of its scale on the parity fixture, against 3.1e-2 this way).
    let rounded = [q, k, v].map(|t| tape.rounded_copy(t));
    let [sq, sk, sv] = [(&rounded[0], q), (&rounded[1], k), (&rounded[2], v)]
        .map(|(r, t)| r.as_ref().unwrap_or(t));
    let (gq, gk, gv) = (
        sq.read_transient()?,
        sk.read_transient()?,
        sv.read_transient()?,
    );
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
    /// q, k, v come from products; on a tape keeping bf16 activations the forward already
    /// read them rounded (see [`attention_masked`]), so backward reads what it read.
    fn saves_bf16(&self, _: usize) -> bool {
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

#[cfg(test)]
mod tests {
    use crate::{ops, Tape, Tensor};
    use lora_kernels::ops::attention::{reference, AttnDims};

    /// The bidirectional op records the mask it ran with: its output and gradients are the
    /// unmasked oracle's on every backend, and the causal op's differ from them.
    #[test]
    fn bidirectional_attention_sees_every_key() {
        let (b, t, hq, hkv, hd) = (2, 5, 4, 2, 3);
        let mut r = lora_kernels::rng::Rng::new(2);
        let mut rand =
            |k: usize| -> Vec<f32> { (0..k).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect() };
        let (qv, kv, vv, dout) = (
            rand(b * t * hq * hd),
            rand(b * t * hkv * hd),
            rand(b * t * hkv * hd),
            rand(b * t * hq * hd),
        );
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let d = AttnDims {
            batch: b,
            seq: t,
            kv_seq: t,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: hd,
            causal: false,
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let want = reference::forward(&f64s(&qv), &f64s(&kv), &f64s(&vv), d, scale);
        let (_, _, want_dv) =
            reference::backward(&f64s(&dout), &f64s(&qv), &f64s(&kv), &f64s(&vv), d, scale);
        for dev in crate::device::test_devices() {
            let run = |bidirectional: bool| {
                let q = Tensor::new_on(qv.clone(), &[b, t, hq * hd], true, dev).unwrap();
                let k = Tensor::new_on(kv.clone(), &[b, t, hkv * hd], true, dev).unwrap();
                let v = Tensor::new_on(vv.clone(), &[b, t, hkv * hd], true, dev).unwrap();
                let tape = Tape::new(0);
                let y = if bidirectional {
                    ops::attention_bidirectional(&tape, &q, &k, &v, hq, hkv)
                } else {
                    ops::attention(&tape, &q, &k, &v, hq, hkv)
                }
                .unwrap();
                let g = tape.backward_with(&y, &dout).unwrap();
                (y.try_to_vec().unwrap(), g.to_vec(&v).unwrap().unwrap())
            };
            let (y, dv) = run(true);
            let close = |got: &[f32], want: &[f64]| {
                got.iter()
                    .zip(want)
                    .all(|(a, b)| (*a as f64 - b).abs() <= 1e-5)
            };
            assert!(close(&y, &want), "{dev}: output");
            assert!(close(&dv, &want_dv), "{dev}: dv");
            let (yc, _) = run(false);
            assert!(!close(&yc, &want), "{dev}: the causal op must differ");
        }
    }
}
