//! The compute backend: one trait, [`Accel`], with a method per op the models run, over
//! [`DBuf`] buffers, and two implementations:
//! - [`crate::cpu::Cpu`]: host memory (owned or memory-mapped) and the CPU kernels of
//!   [`crate::ops`] and [`crate::lora_linear`];
//! - [`crate::cuda::CudaDevice`]: device memory, the CUDA kernels of `cuda/*.cu` and cuBLAS
//!   (feature `cuda`).
//!
//! `lora-core` keeps every tensor's values in a [`DBuf`] (or [`DBits`] for 16-bit frozen
//! weights) of its backend and calls these methods, so a training step (forward, backward,
//! optimizer) is one code path whether it runs on the CPU or a GPU.
//!
//! Argument conventions follow the kernels: outputs first, backward accumulates (`+=`) into
//! the gradients it is given. Integer inputs (token ids, positions, targets) are host slices;
//! a device implementation copies them over per call (they are small).

pub use crate::buffers::{
    release_free_memory, DBits, DBuf, DWeight, ExternalF32, ExternalHalf, HalfFormat,
};
use crate::error::Result;
use crate::operands::{Dropout, LinearDims, WeightLayout};
use crate::ops::adamw::AdamStep;
use crate::ops::attention::AttnDims;
use crate::ops::conv::Conv2dDims;
use crate::ops::norm::GroupDims;
use crate::ops::pool::PoolDims;

/// The unary activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    /// GELU, tanh approximation: `gelu_forward` / `gelu_backward`.
    Gelu,
    /// Exact GELU (erf): `gelu_erf_forward` / `gelu_erf_backward`.
    GeluErf,
    /// `silu_forward` / `silu_backward`.
    Silu,
    /// `relu_forward` / `relu_backward`.
    Relu,
    /// `sigmoid_forward` / `sigmoid_backward`.
    Sigmoid,
    /// `x sigmoid(1.702 x)` (CLIP's `quick_gelu`): `quick_gelu_forward` / `quick_gelu_backward`.
    QuickGelu,
}

impl Unary {
    /// The forward and backward kernels' names (CPU and CUDA alike).
    pub fn kernels(self) -> (&'static str, &'static str) {
        match self {
            Unary::Gelu => ("gelu_forward", "gelu_backward"),
            Unary::GeluErf => ("gelu_erf_forward", "gelu_erf_backward"),
            Unary::Silu => ("silu_forward", "silu_backward"),
            Unary::Relu => ("relu_forward", "relu_backward"),
            Unary::Sigmoid => ("sigmoid_forward", "sigmoid_backward"),
            Unary::QuickGelu => ("quick_gelu_forward", "quick_gelu_backward"),
        }
    }
}

/// The adapter operands of a backend's linear op.
#[derive(Clone, Copy)]
pub struct LoraBufs<'a> {
    /// A `(R, K)`.
    pub a: &'a DBuf,
    /// B `(M, R)`.
    pub b: &'a DBuf,
    /// R.
    pub rank: usize,
    /// s.
    pub scale: f32,
    /// Dropout on the adapter input (the counter-based mask stream every backend draws).
    pub dropout: Option<Dropout>,
}

/// The gradients a backend's linear backward accumulates into (`None` = not needed, and not
/// computed).
#[derive(Default)]
pub struct LinearGradBufs<'a> {
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

/// The gradients a convolution's backward accumulates into (`None` = not computed).
#[derive(Default)]
pub struct ConvGrads<'a> {
    /// `(N, C, H, W)`.
    pub dx: Option<&'a mut DBuf>,
    /// `(O, C/g, KH, KW)`.
    pub dw: Option<&'a mut DBuf>,
    /// `(O)`.
    pub dbias: Option<&'a mut DBuf>,
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
    /// from f32 by about 1e-3 relative. Every cuBLAS product of the device follows (the mode is
    /// the cuBLAS handle's): also the gradients of trainable base weights and biases, the
    /// fused head's dW and the convolutions; the rank-r adapter kernels, norms, attention, loss
    /// and optimizer stay f32 either way.
    fn set_tf32(&self, on: bool) -> Result<()>;

    /// Copies host values to a new device buffer.
    fn upload(&self, v: &[f32]) -> Result<DBuf>;
    /// Copies 16-bit bits to a new device buffer.
    fn upload_bits(&self, v: &[u16]) -> Result<DBits>;
    /// Copies a device buffer to the host.
    fn download(&self, b: &DBuf) -> Result<Vec<f32>>;
    /// Copies 16-bit bits to the host.
    fn download_bits(&self, b: &DBits) -> Result<Vec<u16>>;
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
    /// GroupNorm over `x (N, C, S)`: `[out, mean, rstd]` (statistics `(N, G)`).
    fn groupnorm_forward(
        &self,
        x: &DBuf,
        gamma: &DBuf,
        beta: Option<&DBuf>,
        d: GroupDims,
        eps: f32,
    ) -> Result<[DBuf; 3]>;
    /// GroupNorm backward into whichever gradients are given.
    #[allow(clippy::too_many_arguments)]
    fn groupnorm_backward(
        &self,
        dx: Option<&mut DBuf>,
        dgamma: Option<&mut DBuf>,
        dbeta: Option<&mut DBuf>,
        dout: &DBuf,
        x: &DBuf,
        gamma: &DBuf,
        mean: &DBuf,
        rstd: &DBuf,
        d: GroupDims,
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

    /// Rows of `table` (`(V, c)`) by id; ids are checked against `V` first. A 16-bit table is
    /// read as stored (the CPU widens row by row, never the whole table).
    fn embedding_forward(&self, table: DWeight, ids: &[u32], c: usize) -> Result<DBuf>;
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

    /// `x (batch, m, n)` with its last two dimensions swapped into `out (batch, n, m)`,
    /// written, or added (`accumulate`: the backward).
    fn transpose(
        &self,
        out: &mut DBuf,
        x: &DBuf,
        batch: usize,
        m: usize,
        n: usize,
        accumulate: bool,
    ) -> Result<()>;

    /// The (LoRA) linear layer: `(y, u)` (`u` with an adapter).
    fn linear_forward(
        &self,
        x: &DBuf,
        w: DWeight,
        layout: WeightLayout,
        bias: Option<&DBuf>,
        lora: Option<LoraBufs>,
        d: LinearDims,
    ) -> Result<(DBuf, Option<DBuf>)>;
    /// Its backward, into the gradients given; `x` may be empty when no gradient asked for
    /// reads it (`dw` and `dA` do).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        grads: LinearGradBufs,
        dy: &DBuf,
        x: &DBuf,
        w: DWeight,
        layout: WeightLayout,
        lora: Option<LoraBufs>,
        u: Option<&DBuf>,
        d: LinearDims,
    ) -> Result<()>;

    /// 2-D convolution (NCHW, see [`crate::ops::conv`]): `conv2d(x, w) + bias`.
    fn conv2d_forward(
        &self,
        x: &DBuf,
        w: &DBuf,
        bias: Option<&DBuf>,
        d: Conv2dDims,
    ) -> Result<DBuf>;
    /// `(conv2d(x, w) + bias, conv2d(x, a))` for `groups == 1`: a conv LoRA's base convolution
    /// and its `lora_A` (`a` `(R, C, KH, KW)`, same kernel, stride and padding), the values of
    /// two [`Accel::conv2d_forward`] calls. This default makes those two calls; a backend may
    /// share the work between them (the CPU builds each image's im2col matrix once).
    fn conv2d_pair_forward(
        &self,
        x: &DBuf,
        w: &DBuf,
        a: &DBuf,
        bias: Option<&DBuf>,
        d: Conv2dDims,
    ) -> Result<[DBuf; 2]> {
        let r = a.len() / (d.w_len() / d.out_ch.max(1)).max(1);
        let da = Conv2dDims { out_ch: r, ..d };
        Ok([
            self.conv2d_forward(x, w, bias, d)?,
            self.conv2d_forward(x, a, None, da)?,
        ])
    }
    /// Its backward into the gradients given; `x` may be empty without `dw`.
    fn conv2d_backward(
        &self,
        g: ConvGrads,
        dy: &DBuf,
        x: &DBuf,
        w: &DBuf,
        d: Conv2dDims,
    ) -> Result<()>;

    /// Batch norm in eval mode over `x (N, C, P)` (`dims = (N, C, P)`, see
    /// [`crate::ops::pool`]).
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_forward(
        &self,
        x: &DBuf,
        mean: &DBuf,
        var: &DBuf,
        gamma: &DBuf,
        beta: &DBuf,
        dims: (usize, usize, usize),
        eps: f32,
    ) -> Result<DBuf>;
    /// Its backward into the gradients given (the statistics frozen); `x` is read for `dgamma`
    /// only (empty otherwise).
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_backward(
        &self,
        dx: Option<&mut DBuf>,
        dgamma: Option<&mut DBuf>,
        dbeta: Option<&mut DBuf>,
        dy: &DBuf,
        x: &DBuf,
        mean: &DBuf,
        var: &DBuf,
        gamma: &DBuf,
        dims: (usize, usize, usize),
        eps: f32,
    ) -> Result<()>;
    /// GEGLU: `out` `(rows, f)` = `hidden * gelu_erf(gate)` of `x` rows `[hidden | gate]`
    /// `(rows, 2f)` (see [`crate::ops::elementwise::geglu_forward`]).
    fn geglu_forward(&self, x: &DBuf, f: usize) -> Result<DBuf>;
    /// Its backward, accumulated into `dx` `(rows, 2f)`.
    fn geglu_backward(&self, dx: &mut DBuf, dout: &DBuf, x: &DBuf, f: usize) -> Result<()>;
    /// `x + bias` with one bias value per plane of `inner` values (a `(B, C)` bias over
    /// `(B, C, H, W)`).
    fn add_planes_forward(&self, x: &DBuf, bias: &DBuf, inner: usize) -> Result<DBuf>;
    /// `dbias += ` the sum of each plane of `dout` (the input's gradient is `dout` itself).
    fn add_planes_backward_bias(&self, dbias: &mut DBuf, dout: &DBuf, inner: usize) -> Result<()>;
    /// Nearest upsampling of `planes` planes of `hw` by the integer factor `f`.
    fn upsample_nearest_forward(
        &self,
        x: &DBuf,
        planes: usize,
        hw: (usize, usize),
        f: usize,
    ) -> Result<DBuf>;
    /// Its backward (accumulates into `dx`).
    fn upsample_nearest_backward(
        &self,
        dx: &mut DBuf,
        dy: &DBuf,
        planes: usize,
        hw: (usize, usize),
        f: usize,
    ) -> Result<()>;
    /// Max pooling of planes (see [`crate::ops::pool`]).
    fn max_pool2d_forward(&self, x: &DBuf, d: PoolDims) -> Result<DBuf>;
    /// `dx[argmax] += dy`.
    fn max_pool2d_backward(&self, dx: &mut DBuf, dy: &DBuf, x: &DBuf, d: PoolDims) -> Result<()>;
    /// Adaptive average pooling of `planes` planes of `hw` to `out`.
    fn adaptive_avg_pool2d_forward(
        &self,
        x: &DBuf,
        planes: usize,
        hw: (usize, usize),
        out: (usize, usize),
    ) -> Result<DBuf>;
    /// Its backward (accumulates into `dx`).
    fn adaptive_avg_pool2d_backward(
        &self,
        dx: &mut DBuf,
        dy: &DBuf,
        planes: usize,
        hw: (usize, usize),
        out: (usize, usize),
    ) -> Result<()>;

    /// DETR's box losses of `(M, 4)` matched `(cx, cy, w, h)` pairs: a 2-value buffer
    /// `[sum |p - t|, sum (1 - giou)] / num_boxes` (see [`crate::ops::boxes`]).
    fn box_losses_forward(&self, pred: &DBuf, target: &DBuf, num_boxes: f32) -> Result<DBuf>;
    /// `dpred += (dout[0] sign(p - t) - dout[1] dgiou/dp) / num_boxes`.
    fn box_losses_backward(
        &self,
        dpred: &mut DBuf,
        dout: &DBuf,
        pred: &DBuf,
        target: &DBuf,
        num_boxes: f32,
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
        w: DWeight,
        targets: &[i32],
        c: usize,
        v: usize,
        want_dx: bool,
        want_dw: bool,
    ) -> Result<HeadOut>;
    /// Rows the caller should hand [`Accel::linear_cross_entropy`] at once for a vocabulary of
    /// `v` (bounding the logits a call holds): a GPU holds a chunk's logits whole, the CPU
    /// kernel chunks internally and takes any number.
    fn head_rows(&self, v: usize) -> usize {
        ((1usize << 26) / v.max(1)).max(1)
    }

    /// One AdamW update (see [`adamw_step`]).
    fn adamw(&self, p: &mut DBuf, g: &DBuf, m: &mut DBuf, v: &mut DBuf, h: AdamStep) -> Result<()>;
}

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
