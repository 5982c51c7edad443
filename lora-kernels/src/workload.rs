//! Benchmark workloads shared by the criterion benches and `lora bench`: one LoRA linear layer's
//! forward + backward on seeded random data, and the same layer with the adapter removed (the
//! frozen-base baseline), plus a square GEMM for the machine's ceiling, and a frozen 3x3
//! convolution's forward + input gradient by each algorithm.
//!
//! FLOP counts are the multiply-adds of the formulas times two (useful work only): base forward
//! `2NKM`, input gradient `2NKM`; the adapter adds `2NR(K + M)` in forward (shrink, expand) and
//! `2NR(2K + 2M)` in backward (g, dB, dA, gA).

use crate::gemm::{matmul, Par, Trans};
use crate::lora_linear::{
    lora_linear_backward, lora_linear_forward, BaseLinear, LinearDims, LinearGrads, LoraWeights,
    WeightData, WeightLayout,
};
use crate::ops::conv::{conv2d_backward_by, conv2d_forward_by, Conv2dDims, Conv2dGrads, ConvAlgo};
use crate::rng::Rng;

fn random(len: usize, rng: &mut Rng, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| (rng.uniform() as f32 * 2.0 - 1.0) * scale)
        .collect()
}

/// One linear layer's buffers, ready to run forward + backward repeatedly.
pub struct LinearWorkload {
    /// Shape.
    pub dims: LinearDims,
    /// R; 0 means the frozen base layer alone.
    pub rank: usize,
    x: Vec<f32>,            // (N, K)
    w: Vec<f32>,            // (M, K)
    bias: Option<Vec<f32>>, // (M)
    a: Vec<f32>,            // (R, K)
    b: Vec<f32>,            // (M, R)
    y: Vec<f32>,            // (N, M)
    u: Vec<f32>,            // (N, R)
    dy: Vec<f32>,           // (N, M)
    dx: Vec<f32>,           // (N, K)
    da: Vec<f32>,           // (R, K)
    db: Vec<f32>,           // (M, R)
    /// `w` packed in bf16 ([`LinearWorkload::bf16`]): the products then take bf16 operands.
    packed: Option<crate::gemm_bf16::PackedWeight>,
    /// Pack the weight again on every step (what prepacking at load saves).
    repack: bool,
}

impl LinearWorkload {
    /// Seeded random layer; `rank == 0` builds the base-only layer.
    pub fn new(tokens: usize, inp: usize, out: usize, rank: usize, bias: bool, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let ws = 1.0 / (inp as f32).sqrt();
        Self {
            dims: LinearDims { tokens, inp, out },
            rank,
            x: random(tokens * inp, &mut rng, 1.0),
            w: random(out * inp, &mut rng, ws),
            bias: bias.then(|| random(out, &mut rng, 0.1)),
            a: random(rank * inp, &mut rng, ws),
            b: random(out * rank, &mut rng, 0.1),
            y: vec![0.0; tokens * out],
            u: vec![0.0; tokens * rank],
            dy: random(tokens * out, &mut rng, 1.0),
            dx: vec![0.0; tokens * inp],
            da: vec![0.0; rank * inp],
            db: vec![0.0; out * rank],
            packed: None,
            repack: false,
        }
    }

    /// The same layer with bf16 products (PyTorch autocast's): the frozen weight packed once,
    /// the activations rounded per call, f32 accumulation; the adapter stays f32.
    pub fn bf16(mut self) -> crate::Result<Self> {
        self.packed = Some(self.pack()?);
        Ok(self)
    }

    /// `w` packed for the bf16 products (the forward layout; the backward one on first use).
    fn pack(&self) -> crate::Result<crate::gemm_bf16::PackedWeight> {
        let LinearDims { inp, out, .. } = self.dims;
        crate::gemm_bf16::PackedWeight::new(
            crate::gemm_bf16::Source::F32(&self.w),
            WeightLayout::OutIn,
            out,
            inp,
        )
    }

    /// [`LinearWorkload::bf16`], but the weight is packed again on every step, both layouts
    /// (the forward's before it, the input gradient's on first use): the cost prepacking saves.
    pub fn bf16_repacked(self) -> crate::Result<Self> {
        let mut s = self.bf16()?;
        s.repack = true;
        Ok(s)
    }

    /// Useful FLOPs of one forward + backward.
    pub fn flops(&self) -> f64 {
        let LinearDims {
            tokens: n,
            inp: k,
            out: m,
        } = self.dims;
        let (n, k, m, r) = (n as f64, k as f64, m as f64, self.rank as f64);
        4.0 * n * k * m + 2.0 * n * r * (3.0 * k + 3.0 * m)
    }

    /// Forward then backward (input gradient, and A/B gradients when there is an adapter).
    pub fn step(&mut self) -> crate::Result<()> {
        if self.repack {
            self.packed = Some(self.pack()?);
        }
        let base = BaseLinear {
            weight: match &self.packed {
                Some(p) => WeightData::PackedBf16(p),
                None => WeightData::F32(&self.w),
            },
            layout: WeightLayout::OutIn,
            bias: self.bias.as_deref(),
        };
        let lora = (self.rank > 0).then_some(LoraWeights {
            a: &self.a,
            b: &self.b,
            rank: self.rank,
            scale: 2.0,
            dropout: None,
        });
        let u = (self.rank > 0).then_some(&mut self.u[..]);
        lora_linear_forward(&mut self.y, u, &self.x, &base, lora.as_ref(), self.dims)?;
        let has = self.rank > 0;
        let grads = LinearGrads {
            dx: Some(&mut self.dx),
            dw: None,
            dbias: None,
            da: has.then_some(&mut self.da[..]),
            db: has.then_some(&mut self.db[..]),
        };
        let u = has.then_some(&self.u[..]);
        lora_linear_backward(grads, &self.dy, &self.x, &base, lora.as_ref(), u, self.dims)
    }
}

/// A square `n x n x n` f32 GEMM: the machine's dense ceiling for comparison.
pub struct GemmWorkload {
    n: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

impl GemmWorkload {
    /// Seeded random operands.
    pub fn new(n: usize) -> Self {
        let mut rng = Rng::new(1);
        Self {
            n,
            a: random(n * n, &mut rng, 1.0),
            b: random(n * n, &mut rng, 1.0),
            c: vec![0.0; n * n],
        }
    }
    /// `2 n^3`.
    pub fn flops(&self) -> f64 {
        2.0 * (self.n as f64).powi(3)
    }
    /// One product.
    pub fn step(&mut self) -> crate::Result<()> {
        let n = self.n;
        matmul(
            &mut self.c,
            &self.a,
            Trans::No,
            &self.b,
            Trans::No,
            (n, n, n),
            1.0,
            false,
            Par::Auto,
        )
    }
}

/// A square `n x n x n` bf16 product (f32 accumulation, [`crate::gemm_bf16`]): the bf16
/// ceiling. The right operand is packed once (as a frozen weight is); the left one, an f32
/// activation, is rounded and packed on every call unless `prepacked`.
pub struct GemmBf16Workload {
    n: usize,
    a: Vec<f32>,
    packed_a: crate::gemm_bf16::PackedLhs,
    packed_b: crate::gemm_bf16::PackedRhs,
    c: Vec<f32>,
}

impl GemmBf16Workload {
    /// Seeded random operands.
    pub fn new(n: usize) -> crate::Result<Self> {
        use crate::gemm_bf16::{pack_lhs, pack_rhs, Source, View};
        let mut rng = Rng::new(1);
        let a = random(n * n, &mut rng, 1.0);
        let b = random(n * n, &mut rng, 1.0);
        Ok(Self {
            n,
            packed_a: pack_lhs(View::row_major(Source::F32(&a), n, n))?,
            packed_b: pack_rhs(View::row_major(Source::F32(&b), n, n))?,
            a,
            c: vec![0.0; n * n],
        })
    }
    /// `2 n^3`.
    pub fn flops(&self) -> f64 {
        2.0 * (self.n as f64).powi(3)
    }
    /// One product on `kernel`: `prepacked` times the micro-kernel alone (the left operand is
    /// packed here only when the last packing was in another kernel's form), otherwise the
    /// left operand's rounding and packing is included.
    pub fn step(
        &mut self,
        prepacked: bool,
        kernel: crate::gemm_bf16::Bf16Kernel,
    ) -> crate::Result<()> {
        use crate::gemm_bf16::{matmul_packed_with, pack_lhs_for, Source, View};
        if !prepacked || self.packed_a.is_wide() != kernel.wide_lhs() {
            let a = View::row_major(Source::F32(&self.a), self.n, self.n);
            self.packed_a = pack_lhs_for(kernel, a)?;
        }
        matmul_packed_with(
            kernel,
            &mut self.c,
            &self.packed_a,
            &self.packed_b,
            false,
            Par::Auto,
        )
    }
}

/// A frozen 3x3 convolution (stride 1, padding 1, with a bias) as a LoRA step runs it: the
/// forward and the input gradient, by a chosen algorithm.
pub struct ConvWorkload {
    /// Shape.
    pub dims: Conv2dDims,
    x: Vec<f32>,    // (N, C, H, W)
    w: Vec<f32>,    // (O, C, 3, 3)
    bias: Vec<f32>, // (O)
    y: Vec<f32>,    // (N, O, H, W)
    dy: Vec<f32>,   // (N, O, H, W)
    dx: Vec<f32>,   // (N, C, H, W)
}

impl ConvWorkload {
    /// Seeded random convolution from `c` to `o` channels on `n` images of `side x side`.
    pub fn new(n: usize, c: usize, o: usize, side: usize) -> Self {
        let dims = Conv2dDims {
            batch: n,
            in_ch: c,
            h: side,
            w: side,
            out_ch: o,
            kh: 3,
            kw: 3,
            stride: (1, 1),
            padding: (1, 1),
            dilation: (1, 1),
            groups: 1,
        };
        let mut rng = Rng::new(3);
        let ws = 1.0 / ((9 * c) as f32).sqrt();
        Self {
            dims,
            x: random(dims.x_len(), &mut rng, 1.0),
            w: random(dims.w_len(), &mut rng, ws),
            bias: random(o, &mut rng, 0.1),
            y: vec![0.0; dims.y_len()],
            dy: random(dims.y_len(), &mut rng, 1.0),
            dx: vec![0.0; dims.x_len()],
        }
    }

    /// Useful FLOPs of the forward and `dx` as direct convolution counts them (`2 * 9 C O` per
    /// output pixel, twice): Winograd's rate in these units is an effective one, above the
    /// machine's peak when it does fewer multiplications.
    pub fn flops(&self) -> f64 {
        let d = &self.dims;
        4.0 * (d.batch * d.in_ch * d.out_ch * 9 * d.h * d.w) as f64
    }

    /// Forward, then `dx` (accumulated, as backward does).
    pub fn step(&mut self, algo: ConvAlgo) -> crate::Result<()> {
        conv2d_forward_by(
            algo,
            &mut self.y,
            &self.x,
            &self.w,
            Some(&self.bias),
            self.dims,
        )?;
        let g = Conv2dGrads {
            dx: Some(&mut self.dx),
            ..Default::default()
        };
        conv2d_backward_by(algo, g, &self.dy, &[], &self.w, self.dims)
    }
}

/// A mixed-adapter inference batch: `adapters` adapters of one rank, rows assigned round-robin
/// (every adapter gets `tokens / adapters` rows, scattered through the batch).
pub struct MixedWorkload {
    dims: LinearDims,
    rank: usize,
    x: Vec<f32>,                     // (N, K)
    w: Vec<f32>,                     // (M, K)
    mats: Vec<(Vec<f32>, Vec<f32>)>, // per adapter: A (R, K), B (M, R)
    assign: Vec<i32>,                // (N)
    y: Vec<f32>,                     // (N, M)
}

impl MixedWorkload {
    /// Seeded random batch.
    pub fn new(tokens: usize, inp: usize, out: usize, rank: usize, adapters: usize) -> Self {
        let mut rng = Rng::new(3);
        let ws = 1.0 / (inp as f32).sqrt();
        Self {
            dims: LinearDims { tokens, inp, out },
            rank,
            x: random(tokens * inp, &mut rng, 1.0),
            w: random(out * inp, &mut rng, ws),
            mats: (0..adapters)
                .map(|_| {
                    (
                        random(rank * inp, &mut rng, ws),
                        random(out * rank, &mut rng, 0.1),
                    )
                })
                .collect(),
            assign: (0..tokens).map(|i| (i % adapters.max(1)) as i32).collect(),
            y: vec![0.0; tokens * out],
        }
    }

    /// Forward FLOPs (base GEMM plus each row's shrink and expand).
    pub fn flops(&self) -> f64 {
        let LinearDims {
            tokens: n,
            inp: k,
            out: m,
        } = self.dims;
        2.0 * n as f64 * k as f64 * m as f64 + 2.0 * n as f64 * self.rank as f64 * (k + m) as f64
    }

    /// One forward, with the mixed kernel (`looped = false`) or one layer call per adapter.
    pub fn step(&mut self, looped: bool) -> crate::Result<()> {
        let base = BaseLinear {
            weight: WeightData::F32(&self.w),
            layout: WeightLayout::OutIn,
            bias: None,
        };
        let adapters: Vec<LoraWeights> = self
            .mats
            .iter()
            .map(|(a, b)| LoraWeights {
                a,
                b,
                rank: self.rank,
                scale: 2.0,
                dropout: None,
            })
            .collect();
        let f = if looped {
            crate::mixed::lora_linear_looped_forward
        } else {
            crate::mixed::lora_linear_mixed_forward
        };
        f(
            &mut self.y,
            &self.x,
            &base,
            &adapters,
            &self.assign,
            self.dims,
        )
    }
}
