//! A model's linear layer: frozen, or wrapped with a LoRA adapter.

use crate::autograd::Tape;
use crate::error::Result;
use crate::lora::{LoraConfig, LoraLinear, WeightLayout};
use crate::ops;
use crate::tensor::Tensor;

/// A linear layer of a model. Injection turns `Frozen` into `Lora` without copying the weight.
#[derive(Clone, Debug)]
pub enum Linear {
    /// The pretrained layer alone.
    Frozen {
        /// `(out, in)` or `(in, out)` per `layout`.
        weight: Tensor,
        /// Storage order.
        layout: WeightLayout,
        /// `(out)`.
        bias: Option<Tensor>,
    },
    /// With an adapter.
    Lora(LoraLinear),
}

impl Linear {
    /// A frozen layer.
    pub fn frozen(weight: Tensor, layout: WeightLayout, bias: Option<Tensor>) -> Self {
        Linear::Frozen {
            weight,
            layout,
            bias,
        }
    }

    /// Forward; `adapters == false` bypasses the adapter.
    pub fn forward(&self, tape: &Tape, x: &Tensor, adapters: bool) -> Result<Tensor> {
        match self {
            Linear::Frozen {
                weight,
                layout,
                bias,
            } => ops::linear(tape, x, weight, *layout, bias.as_ref(), None),
            Linear::Lora(l) if adapters => l.forward(tape, x),
            Linear::Lora(l) => ops::linear(tape, x, &l.weight, l.layout, l.bias.as_ref(), None),
        }
    }

    /// Adds an adapter (replacing any existing one) initialised from `seed`.
    pub fn inject(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        let (weight, layout, bias) = self.base();
        let l = LoraLinear::new(weight.clone(), layout, bias.cloned(), cfg, seed)?;
        *self = Linear::Lora(l);
        Ok(())
    }

    /// The base weight, its layout and bias.
    pub fn base(&self) -> (&Tensor, WeightLayout, Option<&Tensor>) {
        match self {
            Linear::Frozen {
                weight,
                layout,
                bias,
            } => (weight, *layout, bias.as_ref()),
            Linear::Lora(l) => (&l.weight, l.layout, l.bias.as_ref()),
        }
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        let (w, layout, _) = self.base();
        match layout {
            WeightLayout::OutIn => (w.shape()[1], w.shape()[0]),
            WeightLayout::InOut => (w.shape()[0], w.shape()[1]),
        }
    }

    /// Its tensors: the weight, the bias and the adapter's A and B, where present.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let (w, _, b) = self.base();
        let mut v = vec![w];
        v.extend(b);
        if let Some(l) = self.lora() {
            v.extend([&l.lora_a, &l.lora_b]);
        }
        v
    }

    /// The adapter, if any.
    pub fn lora(&self) -> Option<&LoraLinear> {
        match self {
            Linear::Lora(l) => Some(l),
            Linear::Frozen { .. } => None,
        }
    }
}
