//! LoRA adapter math: configuration, initialisation, the adapted linear layer, merge/unmerge.
//!
//! A LoRA layer keeps the pretrained weight `W` frozen and trains `A` `(r, in)` and `B`
//! `(out, r)`; the layer computes `x W^T + b + s * (drop(x) A^T) B^T` with
//! `s = alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajdzievski 2023), which keeps the
//! update's scale stable as `r` grows. Derivations: `docs/lora-math.md`.

use crate::autograd::Tape;
use crate::error::{check_finite, CoreError, Result};
use crate::ops::{self, LoraArgs};
use crate::tensor::Tensor;
use lora_kernels::gemm::{matmul, Par, Trans};
use lora_kernels::rng::Rng;

pub use lora_kernels::lora_linear::WeightLayout;

/// How `A` and `B` start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's and loralib's default: `A ~ kaiming_uniform(a = sqrt(5))`, i.e.
    /// `U(-1/sqrt(in), 1/sqrt(in))`, and `B = 0`, so the adapter starts as the identity change.
    #[default]
    KaimingUniform,
    /// PEFT's `"gaussian"`: `A ~ N(0, (1/r)^2)`, `B = 0`.
    Gaussian,
    /// `A = 0`, `B = 0`: a placeholder to be overwritten by loaded weights. Training from it
    /// cannot move (both gradients are zero), so `validate` for training should not use it.
    Zero,
}

/// Adapter hyper-parameters. Defaults: `rank = 8`, `alpha = 8.0`, `use_rslora = false`,
/// `dropout = 0.0`, `init = KaimingUniform` (PEFT's defaults except `alpha`, which PEFT sets
/// to 8 as well).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// r: the rank of the update, at least 1.
    pub rank: usize,
    /// alpha: the scale numerator (finite, positive).
    pub alpha: f32,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Dropout probability on the adapter input during training, in `[0, 1)`.
    pub dropout: f32,
    /// Initialisation of A and B.
    pub init: LoraInit,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 8.0,
            use_rslora: false,
            dropout: 0.0,
            init: LoraInit::KaimingUniform,
        }
    }
}

impl LoraConfig {
    /// Checks every field, naming the first one out of range.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(CoreError::InvalidConfig {
                field: "rank",
                reason: "must be at least 1".into(),
            });
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(CoreError::InvalidConfig {
                field: "alpha",
                reason: format!("must be finite and > 0, got {}", self.alpha),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(CoreError::InvalidConfig {
                field: "dropout",
                reason: format!("must be in [0, 1), got {}", self.dropout),
            });
        }
        Ok(())
    }

    /// `s = alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// A's initial values, `rank * fan_in` of them, as `config.init` says (`fan_in`: the input
/// features of a linear layer, `C * KH * KW` of a convolution).
pub(crate) fn init_a(config: &LoraConfig, fan_in: usize, seed: u64) -> Vec<f32> {
    let r = config.rank;
    let mut rng = Rng::new(seed);
    match config.init {
        LoraInit::KaimingUniform => {
            // kaiming_uniform_(a=sqrt(5)): gain = sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in)
            let bound = (1.0 / fan_in as f64).sqrt();
            (0..r * fan_in)
                .map(|_| rng.uniform_range(-bound, bound) as f32)
                .collect()
        }
        LoraInit::Gaussian => (0..r * fan_in)
            .map(|_| (rng.normal() / r as f64) as f32)
            .collect(),
        LoraInit::Zero => vec![0.0; r * fan_in],
    }
}

/// `W <- W + sign * delta` for merge (`+1`) and unmerge (`-1`): nothing is written unless every
/// new value is finite (the error names `what`).
pub(crate) fn fold_delta(weight: &Tensor, delta: &[f32], sign: f32, what: &str) -> Result<()> {
    let new: Vec<f32> = weight
        .data()
        .iter()
        .zip(delta)
        .map(|(w, d)| w + sign * d)
        .collect();
    check_finite(
        format!("{what}: W {} s*B@A", if sign > 0.0 { "+" } else { "-" }),
        &new,
    )?;
    weight.set_data(new)?;
    Ok(())
}

/// A linear layer with a frozen base weight and a trainable low-rank adapter.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    /// Frozen base weight: `(out, in)` for [`WeightLayout::OutIn`], `(in, out)` for
    /// [`WeightLayout::InOut`] (GPT-2 `Conv1D`).
    pub weight: Tensor,
    /// Storage order of `weight`.
    pub layout: WeightLayout,
    /// Frozen bias `(out)`.
    pub bias: Option<Tensor>,
    /// A: `(r, in)`, trainable.
    pub lora_a: Tensor,
    /// B: `(out, r)`, trainable.
    pub lora_b: Tensor,
    config: LoraConfig,
    merged: bool,
}

impl LoraLinear {
    /// Wraps a frozen base weight with a freshly initialised adapter (`seed` drives the init).
    pub fn new(
        weight: Tensor,
        layout: WeightLayout,
        bias: Option<Tensor>,
        config: &LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        if weight.shape().len() != 2 {
            return Err(CoreError::Shape {
                op: "LoraLinear::new",
                what: "weight",
                got: weight.shape().to_vec(),
                expected: "2 dimensions".into(),
            });
        }
        if weight.requires_grad() {
            return Err(CoreError::Shape {
                op: "LoraLinear::new",
                what: "weight",
                got: weight.shape().to_vec(),
                expected: "a frozen tensor (Tensor::new), not a parameter".into(),
            });
        }
        let (inp, out) = match layout {
            WeightLayout::OutIn => (weight.shape()[1], weight.shape()[0]),
            WeightLayout::InOut => (weight.shape()[0], weight.shape()[1]),
        };
        if let Some(b) = &bias {
            if b.shape() != [out] {
                return Err(CoreError::Shape {
                    op: "LoraLinear::new",
                    what: "bias",
                    got: b.shape().to_vec(),
                    expected: format!("[{out}]"),
                });
            }
        }
        let r = config.rank;
        let a = init_a(config, inp, seed);
        Ok(Self {
            weight,
            layout,
            bias,
            lora_a: Tensor::param(a, &[r, inp])?,
            lora_b: Tensor::param(vec![0.0; out * r], &[out, r])?,
            config: config.clone(),
            merged: false,
        })
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.lora_a.shape()[1]
    }
    /// Output features.
    pub fn out_features(&self) -> usize {
        self.lora_b.shape()[0]
    }
    /// The adapter configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }
    /// `s`.
    pub fn scale(&self) -> f32 {
        self.config.scale()
    }
    /// Whether the adapter is currently folded into `weight`.
    pub fn is_merged(&self) -> bool {
        self.merged
    }
    /// Trainable parameter count (`r * (in + out)`).
    pub fn trainable_params(&self) -> usize {
        self.lora_a.numel() + self.lora_b.numel()
    }

    /// `y = x W^T + b + s * drop(x) A^T B^T`; after [`merge`](Self::merge), just `x W'^T + b`.
    /// A merged layer cannot be trained (its adapter is inside `W`): on a training tape this
    /// is an error rather than a silent loss of gradients.
    pub fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        if self.merged {
            if tape.is_training() {
                return Err(CoreError::MergeState("LoraLinear::forward: the adapter is merged into the weight; unmerge before training"));
            }
            return ops::linear(tape, x, &self.weight, self.layout, self.bias.as_ref(), None);
        }
        let lora = LoraArgs {
            a: &self.lora_a,
            b: &self.lora_b,
            scale: self.scale(),
            dropout: self.config.dropout,
        };
        ops::linear(
            tape,
            x,
            &self.weight,
            self.layout,
            self.bias.as_ref(),
            Some(lora),
        )
    }

    /// `s * B @ A` in the weight's own layout (`(out, in)` or `(in, out)`), computed in f32.
    pub fn delta_weight(&self) -> Vec<f32> {
        let (a, b) = (self.lora_a.data(), self.lora_b.data());
        let (r, inp, out) = (self.config.rank, self.in_features(), self.out_features());
        let s = self.scale();
        let mut delta = vec![0.0f32; out * inp];
        let res = match self.layout {
            // (out, in) = B (out, r) @ A (r, in)
            WeightLayout::OutIn => matmul(
                &mut delta,
                &b,
                Trans::No,
                &a,
                Trans::No,
                (out, inp, r),
                s,
                false,
                Par::Auto,
            ),
            // (in, out) = A^T (in, r) @ B^T (r, out)
            WeightLayout::InOut => matmul(
                &mut delta,
                &a,
                Trans::Yes,
                &b,
                Trans::Yes,
                (inp, out, r),
                s,
                false,
                Par::Auto,
            ),
        };
        res.expect("A and B shapes are fixed at construction");
        delta
    }

    fn apply_delta(&mut self, sign: f32, what: &str) -> Result<()> {
        fold_delta(&self.weight, &self.delta_weight(), sign, what)
    }

    /// Folds the adapter into the base weight: `W <- W + s * B @ A` (f32, NaN/inf-checked
    /// before anything is written). Inference then costs nothing extra.
    ///
    /// ```
    /// use lora_core::{lora::WeightLayout, LoraConfig, LoraLinear, Tape, Tensor};
    /// # fn main() -> lora_core::Result<()> {
    /// let w = Tensor::new((0..12).map(|i| i as f32 * 0.1).collect(), &[4, 3])?;
    /// let mut layer = LoraLinear::new(w, WeightLayout::OutIn, None, &LoraConfig::default(), 7)?;
    /// layer.lora_b.data_mut().iter_mut().for_each(|v| *v = 0.5); // as if trained
    /// let x = Tensor::new(vec![1.0, -2.0, 0.5], &[1, 3])?;
    /// let before = layer.forward(&Tape::inference(), &x)?.to_vec();
    /// layer.merge()?;
    /// let after = layer.forward(&Tape::inference(), &x)?.to_vec();
    /// assert!(before.iter().zip(&after).all(|(a, b)| (a - b).abs() < 1e-5));
    /// layer.unmerge()?; // W restored within rounding
    /// # Ok(()) }
    /// ```
    pub fn merge(&mut self) -> Result<()> {
        if self.merged {
            return Err(CoreError::MergeState("LoraLinear::merge: already merged"));
        }
        self.apply_delta(1.0, "merge")?;
        self.merged = true;
        Ok(())
    }

    /// Reverses [`merge`](Self::merge): `W <- W - s * B @ A` (restores `W` within rounding).
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.merged {
            return Err(CoreError::MergeState("LoraLinear::unmerge: not merged"));
        }
        self.apply_delta(-1.0, "unmerge")?;
        self.merged = false;
        Ok(())
    }
}
