//! The LoRA convolution as PEFT builds it (`peft.tuners.lora.layer.Conv2d`): beside a frozen
//! `conv2d` (weight `(O, C/g, KH, KW)`), `lora_A` is a convolution from the `C` input channels
//! to `r` with the base's kernel size, stride and padding (no groups, no dilation: weight
//! `(r, C, KH, KW)`), and `lora_B` a 1x1 convolution from `r` to `O` with the base's groups
//! (weight `(O, r/g, 1, 1)`). The layer computes `conv(x, W) + b + s * conv(conv(x, A), B)`;
//! kohya's LoCon keys hold the same two shapes.

use crate::autograd::Tape;
use crate::error::{CoreError, Result};
use crate::lora::LoraConfig;
use crate::ops::{self, Conv2dParams};
use crate::tensor::Tensor;
use lora_kernels::gemm::{matmul, Par, Trans};

/// A 2-D convolution with a frozen base and a trainable low-rank adapter.
#[derive(Clone, Debug)]
pub struct LoraConv2d {
    /// Frozen base weight `(O, C/g, KH, KW)`.
    pub weight: Tensor,
    /// Frozen bias `(O)`.
    pub bias: Option<Tensor>,
    /// The base convolution's stride, padding, dilation and groups.
    pub params: Conv2dParams,
    /// A: `(r, C, KH, KW)`, trainable.
    pub lora_a: Tensor,
    /// B: `(O, r/g, 1, 1)`, trainable.
    pub lora_b: Tensor,
    config: LoraConfig,
    merged: bool,
}

fn invalid(field: &'static str, reason: String) -> CoreError {
    CoreError::InvalidConfig { field, reason }
}

impl LoraConv2d {
    /// Wraps a frozen convolution with a freshly initialised adapter (`seed` drives the init).
    /// Refused, as PEFT refuses or cannot run them: a rank not divisible by the groups, a
    /// dilated base (PEFT's `lora_A` ignores dilation, so its output would not line up), and
    /// (not implemented yet here) adapter dropout.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        params: Conv2dParams,
        config: &LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        let shape_err = |what: &'static str, t: &Tensor, expected: String| CoreError::Shape {
            op: "LoraConv2d::new",
            what,
            got: t.shape().to_vec(),
            expected,
        };
        let [o, cg, kh, kw] = <[usize; 4]>::try_from(weight.shape())
            .map_err(|_| shape_err("weight", &weight, "(O, C/groups, KH, KW)".into()))?;
        if weight.requires_grad() {
            return Err(shape_err("weight", &weight, "a frozen tensor".into()));
        }
        if let Some(b) = &bias {
            if b.shape() != [o] {
                return Err(shape_err("bias", b, format!("[{o}]")));
            }
        }
        let (g, r) = (params.groups.max(1), config.rank);
        if o % g != 0 {
            return Err(invalid(
                "groups",
                format!("{g} groups do not divide {o} output channels"),
            ));
        }
        if r % g != 0 {
            return Err(invalid(
                "rank",
                format!(
                    "rank {r} is not divisible by the convolution's {g} groups (PEFT requires it)"
                ),
            ));
        }
        if params.dilation != (1, 1) {
            return Err(invalid(
                "dilation",
                format!(
                    "{:?}: PEFT's conv LoRA has no dilation, so its branch would not match a dilated base",
                    params.dilation
                ),
            ));
        }
        if config.dropout > 0.0 {
            return Err(invalid(
                "dropout",
                "adapter dropout on convolutions is not implemented yet".into(),
            ));
        }
        let c = cg * g;
        let a = crate::lora::init_a(config, c * kh * kw, seed);
        Ok(Self {
            weight,
            bias,
            params,
            lora_a: Tensor::param(a, &[r, c, kh, kw])?,
            lora_b: Tensor::param(vec![0.0; o * (r / g)], &[o, r / g, 1, 1])?,
            config: config.clone(),
            merged: false,
        })
    }

    /// The adapter configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }
    /// `s`.
    pub fn scale(&self) -> f32 {
        self.config.scale()
    }
    /// Whether the adapter is folded into `weight`.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// `conv(x, W) + b + s * conv(conv(x, A), B)`; after [`merge`](Self::merge) the base alone.
    pub fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        if !self.merged && self.params.groups == 1 && self.params.dilation == (1, 1) {
            // A's convolution has the base's kernel, stride and padding: one pass over the
            // input patches for both.
            let (base, h) = ops::conv2d_pair(
                tape,
                x,
                &self.weight,
                self.bias.as_ref(),
                &self.lora_a,
                self.params,
            )?;
            return self.up(tape, base, &h);
        }
        let base = ops::conv2d(tape, x, &self.weight, self.bias.as_ref(), self.params)?;
        if self.merged {
            if tape.is_training() {
                return Err(CoreError::MergeState(
                    "LoraConv2d::forward: the adapter is merged into the weight; unmerge before training",
                ));
            }
            return Ok(base);
        }
        let down = Conv2dParams {
            dilation: (1, 1),
            groups: 1,
            ..self.params
        };
        let h = ops::conv2d(tape, x, &self.lora_a, None, down)?;
        self.up(tape, base, &h)
    }

    /// `base + s * conv1x1(h, B)` (B with the base's groups).
    fn up(&self, tape: &Tape, base: Tensor, h: &Tensor) -> Result<Tensor> {
        let up = Conv2dParams {
            groups: self.params.groups,
            ..Conv2dParams::default()
        };
        let u = ops::conv2d(tape, h, &self.lora_b, None, up)?;
        let u = ops::scale(tape, &u, self.scale())?;
        ops::add(tape, &base, &u)
    }

    /// `s * B A` as a weight of the base's shape (PEFT's `get_delta_weight`: `delta[o, c, i, j]
    /// = s * sum_r B[o, r] A[r, c, i, j]`). PEFT cannot merge a grouped convolution; neither
    /// does this.
    pub fn delta_weight(&self) -> Result<Vec<f32>> {
        if self.params.groups > 1 {
            return Err(CoreError::MergeState(
                "LoraConv2d: merging a grouped convolution's adapter is not supported (as in PEFT)",
            ));
        }
        let (a, b) = (self.lora_a.data(), self.lora_b.data());
        let (r, o) = (self.config.rank, self.lora_b.shape()[0]);
        let k = self.lora_a.numel() / r;
        let mut delta = vec![0.0f32; o * k];
        let dims = (o, k, r);
        matmul(
            &mut delta,
            &b,
            Trans::No,
            &a,
            Trans::No,
            dims,
            self.scale(),
            false,
            Par::Auto,
        )?;
        Ok(delta)
    }

    fn apply_delta(&mut self, sign: f32, what: &str) -> Result<()> {
        crate::lora::fold_delta(&self.weight, &self.delta_weight()?, sign, what)
    }

    /// Folds the adapter into the base weight: `W <- W + s B A` (checked before writing).
    pub fn merge(&mut self) -> Result<()> {
        if self.merged {
            return Err(CoreError::MergeState("LoraConv2d::merge: already merged"));
        }
        self.apply_delta(1.0, "merge")?;
        self.merged = true;
        Ok(())
    }

    /// Reverses [`merge`](Self::merge) (within rounding).
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.merged {
            return Err(CoreError::MergeState("LoraConv2d::unmerge: not merged"));
        }
        self.apply_delta(-1.0, "unmerge")?;
        self.merged = false;
        Ok(())
    }
}
