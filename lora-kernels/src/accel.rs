//! The device backend: one trait, [`Accel`], with a method per op the models run, over buffers
//! in device memory ([`DBuf`]). `lora-core` keeps a tensor's values in a `DBuf` when the tensor
//! lives on a device and calls these methods instead of the host kernels, so a whole training
//! step (forward, backward, optimizer) stays on the device.
//!
//! Two implementations:
//! - [`crate::cuda::CudaDevice`]: the CUDA kernels of `cuda/*.cu` and cuBLAS (feature `cuda`);
//! - [`Emulated`]: "device" memory in host `Vec`s and the CPU kernels. It exists so the device
//!   plumbing of `lora-core` and `lora-train` (which buffer goes where, what is saved for
//!   backward, gradient accumulation and the optimizer on device buffers) is tested on machines
//!   without a GPU; the CUDA kernels themselves are checked against their CPU twins by
//!   `tests/cuda_parity.rs` on a GPU.
//!
//! Argument conventions follow the host kernels: outputs first, backward accumulates (`+=`) into
//! the gradients it is given. Integer inputs (token ids, positions, targets) are host slices;
//! a device implementation copies them over per call (they are small).

use crate::error::Result;
use crate::lora_linear::{
    lora_linear_backward, lora_linear_forward, BaseLinear, LinearGrads, LoraWeights,
};
use crate::operands::{Dropout, LinearDims, WeightData, WeightLayout};
use crate::ops::adamw::{adamw_step, AdamStep};
use crate::ops::attention::{self, AttnDims};
use crate::ops::{cross_entropy, elementwise, embedding, norm, rope, slice};

/// f32 values in a device's memory.
pub enum DBuf {
    /// Memory of the [`Emulated`] device.
    Host(Vec<f32>),
    /// CUDA device memory.
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<f32>),
}

impl DBuf {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            DBuf::Host(v) => v.len(),
            #[cfg(feature = "cuda")]
            DBuf::Cuda(s) => s.len(),
        }
    }
    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// 16-bit float bits (bf16 or f16) in a device's memory: a frozen weight kept as stored.
pub enum DBits {
    /// Memory of the [`Emulated`] device.
    Host(Vec<u16>),
    /// CUDA device memory.
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<u16>),
}

impl DBits {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            DBits::Host(v) => v.len(),
            #[cfg(feature = "cuda")]
            DBits::Cuda(s) => s.len(),
        }
    }
    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// GELU (tanh) or SiLU, the unary activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    /// `gelu_forward` / `gelu_backward`.
    Gelu,
    /// `silu_forward` / `silu_backward`.
    Silu,
}

/// The adapter operands of a device linear op.
#[derive(Clone, Copy)]
pub struct DevLora<'a> {
    /// A `(R, K)`.
    pub a: &'a DBuf,
    /// B `(M, R)`.
    pub b: &'a DBuf,
    /// R.
    pub rank: usize,
    /// s.
    pub scale: f32,
    /// Dropout on the adapter input (the host kernel's mask stream).
    pub dropout: Option<Dropout>,
}

/// The gradients a device linear backward accumulates into (`None` = not needed, and not
/// computed).
#[derive(Default)]
pub struct DevLinearGrads<'a> {
    /// `(N, K)`.
    pub dx: Option<&'a mut DBuf>,
    /// The base weight's, in its layout: `(M, K)` for `OutIn`, `(K, M)` for `InOut` (a
    /// trainable base weight: full fine-tuning).
    pub dw: Option<&'a mut DBuf>,
    /// `(M)`.
    pub dbias: Option<&'a mut DBuf>,
    /// `(R, K)`.
    pub da: Option<&'a mut DBuf>,
    /// `(M, R)`.
    pub db: Option<&'a mut DBuf>,
}

/// What the fused output head returns: the mean loss over the counted rows, their count, and
/// the gradients of that mean asked for.
pub struct HeadOut {
    /// Mean cross-entropy over the rows whose target is not negative (0 when none is).
    pub loss: f32,
    /// Rows counted.
    pub count: usize,
    /// `d loss / d x`, `(N, C)`.
    pub dx: Option<DBuf>,
    /// `d loss / d W`, `(V, C)`.
    pub dw: Option<DBuf>,
}

/// A device: memory and one method per op. See the module docs.
pub trait Accel: Send + Sync {
    /// One line naming the device (`cuda:0 NVIDIA H200 (sm_90)`).
    fn describe(&self) -> String;
    /// Waits until all queued work is done (timing).
    fn synchronize(&self) -> Result<()>;
    /// Lets the dense base products (cuBLAS: frozen linears, the output head) round their inputs
    /// to TF32 (10-bit mantissa, f32 accumulation) and use tensor cores, as PyTorch's
    /// `torch.backends.cuda.matmul.allow_tf32 = True` does. Off by default: results then differ
    /// from f32 by about 1e-3 relative. The rank-r adapter work, norms, attention, loss and
    /// optimizer stay f32 either way.
    fn set_tf32(&self, on: bool) -> Result<()>;

    /// Copies host values to a new device buffer.
    fn upload(&self, v: &[f32]) -> Result<DBuf>;
    /// Copies 16-bit bits to a new device buffer.
    fn upload_bits(&self, v: &[u16]) -> Result<DBits>;
    /// Copies a device buffer to the host.
    fn download(&self, b: &DBuf) -> Result<Vec<f32>>;
    /// A zero-filled buffer.
    fn zeros(&self, n: usize) -> Result<DBuf>;
    /// A copy of a buffer.
    fn copy(&self, b: &DBuf) -> Result<DBuf>;
    /// A copy of `len` values of `b` from `offset`.
    fn copy_range(&self, b: &DBuf, offset: usize, len: usize) -> Result<DBuf>;
    /// Writes `src` into `dst` from `offset`.
    fn write_range(&self, dst: &mut DBuf, offset: usize, src: &DBuf) -> Result<()>;
    /// bf16 (`f16 = false`) or f16 bits widened to f32 (exact).
    fn widen(&self, bits: &DBits, f16: bool) -> Result<DBuf>;

    /// `a + b`.
    fn add(&self, a: &DBuf, b: &DBuf) -> Result<DBuf>;
    /// `acc += g`.
    fn accumulate(&self, acc: &mut DBuf, g: &DBuf) -> Result<()>;
    /// `x *= s`.
    fn scale(&self, x: &mut DBuf, s: f32) -> Result<()>;
    /// `sum x^2` in f64 (gradient-norm clipping).
    fn sum_squares(&self, x: &DBuf) -> Result<f64>;
    /// [`Accel::sum_squares`] of each buffer, in order; a device may answer all of them with one
    /// wait (CUDA does) instead of one per buffer.
    fn sum_squares_many(&self, xs: &[&DBuf]) -> Result<Vec<f64>> {
        xs.iter().map(|x| self.sum_squares(x)).collect()
    }

    /// GELU or SiLU forward.
    fn unary_forward(&self, f: Unary, x: &DBuf) -> Result<DBuf>;
    /// `dx += dout * f'(x)`.
    fn unary_backward(&self, f: Unary, dx: &mut DBuf, dout: &DBuf, x: &DBuf) -> Result<()>;
    /// `silu(gate) * up`.
    fn swiglu_forward(&self, gate: &DBuf, up: &DBuf) -> Result<DBuf>;
    /// Accumulates both input gradients.
    fn swiglu_backward(
        &self,
        dgate: &mut DBuf,
        dup: &mut DBuf,
        dout: &DBuf,
        gate: &DBuf,
        up: &DBuf,
    ) -> Result<()>;

    /// LayerNorm over rows of `c`: `[out, mean, rstd]`.
    fn layernorm_forward(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: Option<&DBuf>,
        c: usize,
        eps: f32,
    ) -> Result<[DBuf; 3]>;
    /// LayerNorm backward into whichever gradients are given.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dx: Option<&mut DBuf>,
        dgamma: Option<&mut DBuf>,
        dbeta: Option<&mut DBuf>,
        dout: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        mean: &DBuf,
        rstd: &DBuf,
        c: usize,
    ) -> Result<()>;
    /// RMSNorm over rows of `c`: `[out, rstd]`.
    fn rmsnorm_forward(&self, x: &DBuf, gamma: &DBuf, c: usize, eps: f32) -> Result<[DBuf; 2]>;
    /// RMSNorm backward into whichever gradients are given.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: Option<&mut DBuf>,
        dgamma: Option<&mut DBuf>,
        dout: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        rstd: &DBuf,
        c: usize,
    ) -> Result<()>;

    /// Rows of `table` (`(V, c)`) by id; ids are checked against `V` first.
    fn embedding_forward(&self, table: &DBuf, ids: &[u32], c: usize) -> Result<DBuf>;
    /// `dtable[ids[i], :] += dout[i, :]`, tokens in order (deterministic); ids checked first.
    fn embedding_backward(
        &self,
        dtable: &mut DBuf,
        dout: &DBuf,
        ids: &[u32],
        c: usize,
    ) -> Result<()>;

    /// RoPE on `x` `(N, heads * head_dim)`: forward writes `out`; `backward` accumulates the
    /// inverse rotation of `x` (= dout) into `out` (= dx).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        backward: bool,
        out: &mut DBuf,
        x: &DBuf,
        cos: &DBuf,
        sin: &DBuf,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    /// Causal GQA attention: `[out, lse]`.
    fn attention_forward(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        d: AttnDims,
        scale: f32,
    ) -> Result<[DBuf; 2]>;
    /// Attention backward, accumulating into all three.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut DBuf,
        dk: &mut DBuf,
        dv: &mut DBuf,
        dout: &DBuf,
        lse: &DBuf,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        d: AttnDims,
        scale: f32,
    ) -> Result<()>;

    /// Columns `[start, start + len)` of the `(n, cols)` `x` into `out` (`forward`), or
    /// `out[:, start..start + len] += x` (backward: `out` is `dx`, `x` is `dout`).
    #[allow(clippy::too_many_arguments)]
    fn narrow(
        &self,
        forward: bool,
        out: &mut DBuf,
        x: &DBuf,
        n: usize,
        cols: usize,
        start: usize,
        len: usize,
    ) -> Result<()>;

    /// The (LoRA) linear layer with an f32 base weight: `(y, u)` (`u` with an adapter).
    fn linear_forward(
        &self,
        x: &DBuf,
        w: &DBuf,
        layout: WeightLayout,
        bias: Option<&DBuf>,
        lora: Option<DevLora>,
        d: LinearDims,
    ) -> Result<(DBuf, Option<DBuf>)>;
    /// Its backward, into the gradients given; `x` may be empty when no gradient asked for
    /// reads it (`dw` and `dA` do).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        grads: DevLinearGrads,
        dy: &DBuf,
        x: &DBuf,
        w: &DBuf,
        layout: WeightLayout,
        lora: Option<DevLora>,
        u: Option<&DBuf>,
        d: LinearDims,
    ) -> Result<()>;

    /// Mean cross-entropy of `logits` `(N, v)`: `(loss, counted rows, lse)`.
    fn cross_entropy_forward(
        &self,
        logits: &DBuf,
        targets: &[i32],
        v: usize,
    ) -> Result<(f32, usize, DBuf)>;
    /// `dlogits += dloss / count * (softmax - onehot)`.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_backward(
        &self,
        dlogits: &mut DBuf,
        dloss: f32,
        logits: &DBuf,
        lse: &DBuf,
        targets: &[i32],
        v: usize,
        count: usize,
    ) -> Result<()>;
    /// The output head `x W^T` (`w` `(v, c)`) with the mean cross-entropy, and the gradients
    /// of that mean asked for (`want_dx`, `want_dw`).
    #[allow(clippy::too_many_arguments)]
    fn linear_cross_entropy(
        &self,
        x: &DBuf,
        w: &DBuf,
        targets: &[i32],
        c: usize,
        v: usize,
        want_dx: bool,
        want_dw: bool,
    ) -> Result<HeadOut>;

    /// One AdamW update (see [`adamw_step`]).
    fn adamw(&self, p: &mut DBuf, g: &DBuf, m: &mut DBuf, v: &mut DBuf, h: AdamStep) -> Result<()>;
}

/// The host implementation of [`Accel`]: device memory is host memory, each op the CPU kernel.
/// For tests of the device code paths on machines without a GPU (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct Emulated;

/// `offset + len <= buf_len`, naming the call otherwise.
pub(crate) fn check_range(
    op: &'static str,
    buf_len: usize,
    offset: usize,
    len: usize,
) -> Result<()> {
    if !matches!(offset.checked_add(len), Some(end) if end <= buf_len) {
        return Err(crate::error::invalid(
            op,
            "offset",
            format!("{offset} + {len} values exceed the buffer's {buf_len}"),
        ));
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn wrong(what: &str) -> crate::KernelError {
    crate::KernelError::Device(format!(
        "{what}: a buffer of another device was passed to the emulated device"
    ))
}

fn h(b: &DBuf) -> Result<&[f32]> {
    match b {
        DBuf::Host(v) => Ok(v),
        #[cfg(feature = "cuda")]
        DBuf::Cuda(_) => Err(wrong("read")),
    }
}

fn hm(b: &mut DBuf) -> Result<&mut [f32]> {
    match b {
        DBuf::Host(v) => Ok(v),
        #[cfg(feature = "cuda")]
        DBuf::Cuda(_) => Err(wrong("write")),
    }
}

fn hm_opt(b: Option<&mut DBuf>) -> Result<Option<&mut [f32]>> {
    b.map(hm).transpose()
}

impl Accel for Emulated {
    fn describe(&self) -> String {
        "emulated device (host memory, CPU kernels)".into()
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Accepted and ignored: the emulation tests plumbing, and computes in f32 either way.
    fn set_tf32(&self, _on: bool) -> Result<()> {
        Ok(())
    }
    fn upload(&self, v: &[f32]) -> Result<DBuf> {
        Ok(DBuf::Host(v.to_vec()))
    }
    fn upload_bits(&self, v: &[u16]) -> Result<DBits> {
        Ok(DBits::Host(v.to_vec()))
    }
    fn download(&self, b: &DBuf) -> Result<Vec<f32>> {
        Ok(h(b)?.to_vec())
    }
    fn zeros(&self, n: usize) -> Result<DBuf> {
        Ok(DBuf::Host(vec![0.0; n]))
    }
    fn copy(&self, b: &DBuf) -> Result<DBuf> {
        Ok(DBuf::Host(h(b)?.to_vec()))
    }
    fn copy_range(&self, b: &DBuf, offset: usize, len: usize) -> Result<DBuf> {
        check_range("copy_range", b.len(), offset, len)?;
        Ok(DBuf::Host(h(b)?[offset..offset + len].to_vec()))
    }
    fn write_range(&self, dst: &mut DBuf, offset: usize, src: &DBuf) -> Result<()> {
        check_range("write_range", dst.len(), offset, src.len())?;
        hm(dst)?[offset..offset + src.len()].copy_from_slice(h(src)?);
        Ok(())
    }
    fn widen(&self, bits: &DBits, f16: bool) -> Result<DBuf> {
        let b = match bits {
            DBits::Host(v) => v,
            #[cfg(feature = "cuda")]
            DBits::Cuda(_) => return Err(wrong("widen")),
        };
        let data = if f16 {
            WeightData::F16(b)
        } else {
            WeightData::Bf16(b)
        };
        let mut out = vec![0.0; b.len()];
        data.widen(0, &mut out);
        Ok(DBuf::Host(out))
    }
    fn add(&self, a: &DBuf, b: &DBuf) -> Result<DBuf> {
        let mut out = vec![0.0; a.len()];
        elementwise::add_forward(&mut out, h(a)?, h(b)?)?;
        Ok(DBuf::Host(out))
    }
    fn accumulate(&self, acc: &mut DBuf, g: &DBuf) -> Result<()> {
        elementwise::accumulate(hm(acc)?, h(g)?)
    }
    fn scale(&self, x: &mut DBuf, s: f32) -> Result<()> {
        hm(x)?.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }
    fn sum_squares(&self, x: &DBuf) -> Result<f64> {
        Ok(h(x)?.iter().map(|&v| v as f64 * v as f64).sum())
    }
    fn unary_forward(&self, f: Unary, x: &DBuf) -> Result<DBuf> {
        let mut out = vec![0.0; x.len()];
        match f {
            Unary::Gelu => elementwise::gelu_forward(&mut out, h(x)?)?,
            Unary::Silu => elementwise::silu_forward(&mut out, h(x)?)?,
        }
        Ok(DBuf::Host(out))
    }
    fn unary_backward(&self, f: Unary, dx: &mut DBuf, dout: &DBuf, x: &DBuf) -> Result<()> {
        match f {
            Unary::Gelu => elementwise::gelu_backward(hm(dx)?, h(dout)?, h(x)?),
            Unary::Silu => elementwise::silu_backward(hm(dx)?, h(dout)?, h(x)?),
        }
    }
    fn swiglu_forward(&self, gate: &DBuf, up: &DBuf) -> Result<DBuf> {
        let mut out = vec![0.0; gate.len()];
        elementwise::swiglu_forward(&mut out, h(gate)?, h(up)?)?;
        Ok(DBuf::Host(out))
    }
    fn swiglu_backward(
        &self,
        dgate: &mut DBuf,
        dup: &mut DBuf,
        dout: &DBuf,
        gate: &DBuf,
        up: &DBuf,
    ) -> Result<()> {
        elementwise::swiglu_backward(Some(hm(dgate)?), Some(hm(dup)?), h(dout)?, h(gate)?, h(up)?)
    }
    fn layernorm_forward(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: Option<&DBuf>,
        c: usize,
        eps: f32,
    ) -> Result<[DBuf; 3]> {
        let n = x.len() / c.max(1);
        let (mut out, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; n], vec![0.0; n]);
        let beta = beta.map(h).transpose()?;
        norm::layernorm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            h(x)?,
            h(gamma)?,
            beta,
            c,
            eps,
        )?;
        Ok([DBuf::Host(out), DBuf::Host(mean), DBuf::Host(rstd)])
    }
    fn layernorm_backward(
        &self,
        dx: Option<&mut DBuf>,
        dgamma: Option<&mut DBuf>,
        dbeta: Option<&mut DBuf>,
        dout: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        mean: &DBuf,
        rstd: &DBuf,
        c: usize,
    ) -> Result<()> {
        norm::layernorm_backward(
            hm_opt(dx)?,
            hm_opt(dgamma)?,
            hm_opt(dbeta)?,
            h(dout)?,
            h(x)?,
            h(gamma)?,
            h(mean)?,
            h(rstd)?,
            c,
        )
    }
    fn rmsnorm_forward(&self, x: &DBuf, gamma: &DBuf, c: usize, eps: f32) -> Result<[DBuf; 2]> {
        let n = x.len() / c.max(1);
        let (mut out, mut rstd) = (vec![0.0; x.len()], vec![0.0; n]);
        norm::rmsnorm_forward(&mut out, &mut rstd, h(x)?, h(gamma)?, c, eps)?;
        Ok([DBuf::Host(out), DBuf::Host(rstd)])
    }
    fn rmsnorm_backward(
        &self,
        dx: Option<&mut DBuf>,
        dgamma: Option<&mut DBuf>,
        dout: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        rstd: &DBuf,
        c: usize,
    ) -> Result<()> {
        norm::rmsnorm_backward(
            hm_opt(dx)?,
            hm_opt(dgamma)?,
            h(dout)?,
            h(x)?,
            h(gamma)?,
            h(rstd)?,
            c,
        )
    }
    fn embedding_forward(&self, table: &DBuf, ids: &[u32], c: usize) -> Result<DBuf> {
        let mut out = vec![0.0; ids.len() * c];
        embedding::embedding_forward(&mut out, h(table)?, ids, c)?;
        Ok(DBuf::Host(out))
    }
    fn embedding_backward(
        &self,
        dtable: &mut DBuf,
        dout: &DBuf,
        ids: &[u32],
        c: usize,
    ) -> Result<()> {
        embedding::embedding_backward(hm(dtable)?, h(dout)?, ids, c)
    }
    fn rope(
        &self,
        backward: bool,
        out: &mut DBuf,
        x: &DBuf,
        cos: &DBuf,
        sin: &DBuf,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let (o, x, cs, sn) = (hm(out)?, h(x)?, h(cos)?, h(sin)?);
        if backward {
            rope::rope_backward(o, x, cs, sn, positions, heads, head_dim)
        } else {
            rope::rope_forward(o, x, cs, sn, positions, heads, head_dim)
        }
    }
    fn attention_forward(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        d: AttnDims,
        scale: f32,
    ) -> Result<[DBuf; 2]> {
        let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; d.lse_len()]);
        attention::attention_forward(&mut out, &mut lse, h(q)?, h(k)?, h(v)?, d, scale)?;
        Ok([DBuf::Host(out), DBuf::Host(lse)])
    }
    fn attention_backward(
        &self,
        dq: &mut DBuf,
        dk: &mut DBuf,
        dv: &mut DBuf,
        dout: &DBuf,
        lse: &DBuf,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        d: AttnDims,
        scale: f32,
    ) -> Result<()> {
        attention::attention_backward(
            hm(dq)?,
            hm(dk)?,
            hm(dv)?,
            h(dout)?,
            h(lse)?,
            h(q)?,
            h(k)?,
            h(v)?,
            d,
            scale,
        )
    }
    fn narrow(
        &self,
        forward: bool,
        out: &mut DBuf,
        x: &DBuf,
        _n: usize,
        cols: usize,
        start: usize,
        len: usize,
    ) -> Result<()> {
        if forward {
            slice::narrow_forward(hm(out)?, h(x)?, cols, start, len)
        } else {
            slice::narrow_backward(hm(out)?, h(x)?, cols, start, len)
        }
    }
    fn linear_forward(
        &self,
        x: &DBuf,
        w: &DBuf,
        layout: WeightLayout,
        bias: Option<&DBuf>,
        lora: Option<DevLora>,
        d: LinearDims,
    ) -> Result<(DBuf, Option<DBuf>)> {
        let base = BaseLinear {
            weight: WeightData::F32(h(w)?),
            layout,
            bias: bias.map(h).transpose()?,
        };
        let mut y = vec![0.0; d.tokens * d.out];
        let Some(l) = lora else {
            lora_linear_forward(&mut y, None, h(x)?, &base, None, d)?;
            return Ok((DBuf::Host(y), None));
        };
        let lw = LoraWeights {
            a: h(l.a)?,
            b: h(l.b)?,
            rank: l.rank,
            scale: l.scale,
            dropout: l.dropout,
        };
        let mut u = vec![0.0; d.tokens * l.rank];
        lora_linear_forward(&mut y, Some(&mut u), h(x)?, &base, Some(&lw), d)?;
        Ok((DBuf::Host(y), Some(DBuf::Host(u))))
    }
    fn linear_backward(
        &self,
        grads: DevLinearGrads,
        dy: &DBuf,
        x: &DBuf,
        w: &DBuf,
        layout: WeightLayout,
        lora: Option<DevLora>,
        u: Option<&DBuf>,
        d: LinearDims,
    ) -> Result<()> {
        let base = BaseLinear {
            weight: WeightData::F32(h(w)?),
            layout,
            bias: None,
        };
        let lw = match lora {
            Some(l) => Some(LoraWeights {
                a: h(l.a)?,
                b: h(l.b)?,
                rank: l.rank,
                scale: l.scale,
                dropout: l.dropout,
            }),
            None => None,
        };
        // dx reads only W (and A, B); x is read for dA alone, so an unread x may be empty.
        let x = if x.is_empty() { &[][..] } else { h(x)? };
        let g = LinearGrads {
            dx: hm_opt(grads.dx)?,
            dw: hm_opt(grads.dw)?,
            dbias: hm_opt(grads.dbias)?,
            da: hm_opt(grads.da)?,
            db: hm_opt(grads.db)?,
        };
        lora_linear_backward(g, h(dy)?, x, &base, lw.as_ref(), u.map(h).transpose()?, d)
    }
    fn cross_entropy_forward(
        &self,
        logits: &DBuf,
        targets: &[i32],
        v: usize,
    ) -> Result<(f32, usize, DBuf)> {
        let mut lse = vec![0.0; targets.len()];
        let (loss, count) = cross_entropy::cross_entropy_forward(&mut lse, h(logits)?, targets, v)?;
        Ok((loss, count, DBuf::Host(lse)))
    }
    fn cross_entropy_backward(
        &self,
        dlogits: &mut DBuf,
        dloss: f32,
        logits: &DBuf,
        lse: &DBuf,
        targets: &[i32],
        v: usize,
        count: usize,
    ) -> Result<()> {
        cross_entropy::cross_entropy_backward(
            hm(dlogits)?,
            dloss,
            h(logits)?,
            h(lse)?,
            targets,
            v,
            count,
        )
    }
    fn linear_cross_entropy(
        &self,
        x: &DBuf,
        w: &DBuf,
        targets: &[i32],
        c: usize,
        v: usize,
        want_dx: bool,
        want_dw: bool,
    ) -> Result<HeadOut> {
        let mut dx = want_dx.then(|| vec![0.0f32; targets.len() * c]);
        let mut dw = want_dw.then(|| vec![0.0f32; v * c]);
        let chunk = (cross_entropy::HEAD_CHUNK_ELEMS / v.max(1)).max(16);
        let (loss, count) = cross_entropy::linear_cross_entropy(
            h(x)?,
            h(w)?,
            targets,
            c,
            v,
            dx.as_deref_mut(),
            dw.as_deref_mut(),
            chunk,
        )?;
        Ok(HeadOut {
            loss,
            count,
            dx: dx.map(DBuf::Host),
            dw: dw.map(DBuf::Host),
        })
    }
    fn adamw(
        &self,
        p: &mut DBuf,
        g: &DBuf,
        m: &mut DBuf,
        v: &mut DBuf,
        hp: AdamStep,
    ) -> Result<()> {
        adamw_step(hm(p)?, h(g)?, hm(m)?, hm(v)?, hp)
    }
}
