//! A model's 2-D convolution: frozen, or wrapped with a LoRA adapter (PEFT's conv LoRA).

use crate::autograd::Tape;
use crate::error::Result;
use crate::lora::LoraConfig;
use crate::lora_conv::LoraConv2d;
use crate::ops::{self, Conv2dParams};
use crate::tensor::Tensor;

/// A convolution of a model. Injection turns `Frozen` into `Lora` without copying the weight.
#[derive(Clone, Debug)]
pub enum Conv {
    /// The pretrained convolution alone.
    Frozen {
        /// `(O, C/groups, KH, KW)`.
        weight: Tensor,
        /// `(O)`.
        bias: Option<Tensor>,
        /// Stride, padding, dilation, groups.
        params: Conv2dParams,
    },
    /// With an adapter.
    Lora(LoraConv2d),
}

impl Conv {
    /// A frozen convolution.
    pub fn frozen(weight: Tensor, bias: Option<Tensor>, params: Conv2dParams) -> Self {
        Conv::Frozen {
            weight,
            bias,
            params,
        }
    }

    /// Forward; `adapters == false` bypasses the adapter.
    pub fn forward(&self, tape: &Tape, x: &Tensor, adapters: bool) -> Result<Tensor> {
        match self {
            Conv::Lora(l) if adapters => l.forward(tape, x),
            _ => {
                let (w, b, p) = self.base();
                ops::conv2d(tape, x, w, b, p)
            }
        }
    }

    /// Adds an adapter (replacing any existing one) initialised from `seed`.
    pub fn inject(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        let (w, b, p) = self.base();
        let l = LoraConv2d::new(w.clone(), b.cloned(), p, cfg, seed)?;
        *self = Conv::Lora(l);
        Ok(())
    }

    /// The base weight, bias and parameters.
    pub fn base(&self) -> (&Tensor, Option<&Tensor>, Conv2dParams) {
        match self {
            Conv::Frozen {
                weight,
                bias,
                params,
            } => (weight, bias.as_ref(), *params),
            Conv::Lora(l) => (&l.weight, l.bias.as_ref(), l.params),
        }
    }

    /// Its tensors: the weight, the bias and the adapter's A and B, where present.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let (w, b, _) = self.base();
        let mut v = vec![w];
        v.extend(b);
        if let Some(l) = self.lora() {
            v.extend([&l.lora_a, &l.lora_b]);
        }
        v
    }

    /// The adapter, if any.
    pub fn lora(&self) -> Option<&LoraConv2d> {
        match self {
            Conv::Lora(l) => Some(l),
            Conv::Frozen { .. } => None,
        }
    }
}
