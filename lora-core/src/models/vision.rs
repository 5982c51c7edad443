//! Image classifiers: the trait the vision models share, and the classification head that
//! PEFT's `modules_to_save` trains in full.

use super::{Conv, Linear};
use crate::autograd::Tape;
use crate::error::{CoreError, Result};
use crate::lora::WeightLayout;
use crate::ops;
use crate::tensor::Tensor;
use lora_kernels::rng::Rng;

/// A vision model's adaptable parts: named linear layers and convolutions (LoRA targets), and
/// the linear layers that can train in full (PEFT's `modules_to_save`: a classifier's head, a
/// detector's MLP heads).
pub trait VisionModel {
    /// Every linear layer outside the heads, with its module path, in model order.
    fn linears(&self) -> Vec<(String, &Linear)>;
    /// The same, mutable.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    /// Every convolution, with its module path, in model order.
    fn convs(&self) -> Vec<(String, &Conv)> {
        Vec::new()
    }
    /// The same, mutable.
    fn convs_mut(&mut self) -> Vec<(String, &mut Conv)> {
        Vec::new()
    }
    /// The head layers (each a linear layer that may train in full), in model order.
    fn heads(&self) -> Vec<&ClassifierHead>;
    /// The same, mutable.
    fn heads_mut(&mut self) -> Vec<&mut ClassifierHead>;
    /// The tensors outside the linears, convolutions and heads (embeddings, norms): with those,
    /// every tensor of the model.
    fn other_tensors(&self) -> Vec<&Tensor>;
    /// Moves every tensor to `device` in place.
    fn to_device(&self, device: crate::Device) -> Result<()> {
        let mut all: Vec<&Tensor> = self.other_tensors();
        for (_, l) in self.linears() {
            all.extend(l.tensors());
        }
        for (_, c) in self.convs() {
            all.extend(c.tensors());
        }
        for h in self.heads() {
            all.extend(h.tensors());
        }
        for t in all {
            t.to_device(device)?;
        }
        Ok(())
    }
}

/// An image classifier: a [`VisionModel`] with one classification head.
pub trait ImageClassifier: VisionModel {
    /// Logits `(B, num_labels)` for `pixels` `(B, C, H, W)` (already preprocessed). With
    /// `adapters == false` every adapter and trained head copy is bypassed (the base model).
    fn forward(&self, tape: &Tape, pixels: &Tensor, adapters: bool) -> Result<Tensor>;
    /// transformers' single-label classification loss: the mean cross-entropy of the logits
    /// against `labels` (one class index per image; negative ones are ignored).
    fn loss(&self, tape: &Tape, pixels: &Tensor, labels: &[i64], adapters: bool) -> Result<Tensor> {
        let logits = self.forward(tape, pixels, adapters)?;
        let targets = class_targets(labels, self.num_labels())?;
        ops::cross_entropy(tape, &logits, &targets)
    }
    /// The `(height, width)` the model requires (ViT's position table), or `None` when any size
    /// works (convolutional models).
    fn fixed_size(&self) -> Option<(usize, usize)>;
    /// Input channels.
    fn num_channels(&self) -> usize;
    /// Number of classes.
    fn num_labels(&self) -> usize;
    /// The classification head.
    fn head(&self) -> &ClassifierHead;
    /// The same, mutable.
    fn head_mut(&mut self) -> &mut ClassifierHead;
}

/// Class indices as cross-entropy targets; a label past the head is an error naming it.
pub fn class_targets(labels: &[i64], num_labels: usize) -> Result<Vec<i32>> {
    labels
        .iter()
        .map(|&l| {
            if l >= num_labels as i64 {
                Err(CoreError::InvalidConfig {
                    field: "labels",
                    reason: format!("class {l} is past the head's {num_labels} classes"),
                })
            } else if l < 0 {
                Ok(-100)
            } else {
                Ok(l as i32)
            }
        })
        .collect()
}

/// A new head's weight `(num_labels, in)`: normal with standard deviation `std`, truncated to
/// `[-2, 2]` (PyTorch's `trunc_normal_` defaults, as transformers initialises a ViT head).
pub fn head_init(num_labels: usize, inp: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..num_labels * inp)
        .map(|_| loop {
            let v = rng.normal() * std as f64;
            if v.abs() <= 2.0 {
                break v as f32;
            }
        })
        .collect()
}

/// PyTorch's default `nn.Linear` initialisation (`kaiming_uniform_(a=sqrt(5))`, which
/// transformers' ResNet keeps for its head): weight `(num_labels, in)` then bias `(num_labels)`,
/// both uniform in `[-1/sqrt(in), 1/sqrt(in)]`.
pub fn head_init_uniform(num_labels: usize, inp: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let bound = 1.0 / (inp.max(1) as f64).sqrt();
    let mut draw = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| rng.uniform_range(-bound, bound) as f32)
            .collect()
    };
    let w = draw(num_labels * inp);
    (w, draw(num_labels))
}

/// A head layer: the pretrained linear layer, and (when `modules_to_save` names it or a module
/// around it) a trainable copy that is used while adapters are on, as PEFT's
/// `ModulesToSaveWrapper` does; the original stays for `adapters == false`.
#[derive(Clone, Debug)]
pub struct ClassifierHead {
    /// Module path (`classifier`, ResNet's `classifier.1`, YOLOS's
    /// `class_labels_classifier.layers.0`).
    pub name: String,
    /// The pretrained (or newly initialised) head, frozen.
    pub base: Linear,
    /// The trained copy.
    pub trained: Option<Linear>,
}

impl ClassifierHead {
    /// A frozen head `weight (L, C)`, `bias (L)`.
    pub fn new(name: &str, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            name: name.into(),
            base: Linear::frozen(weight, WeightLayout::OutIn, bias),
            trained: None,
        }
    }

    /// Logits; the trained copy while adapters are on.
    pub fn forward(&self, tape: &Tape, x: &Tensor, adapters: bool) -> Result<Tensor> {
        match (&self.trained, adapters) {
            (Some(t), true) => t.forward(tape, x, false),
            _ => self.base.forward(tape, x, false),
        }
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        self.base.dims()
    }

    /// Starts training the head in full: a trainable copy of its weight and bias.
    pub fn train_in_full(&mut self) -> Result<()> {
        let (w, _, b) = self.base.base();
        let copy = |t: &Tensor| -> Result<Tensor> {
            let t2 = Tensor::param(t.try_to_vec()?, t.shape())?;
            t2.to_device(t.device())?;
            Ok(t2)
        };
        let bias = b.map(copy).transpose()?;
        self.trained = Some(Linear::frozen(copy(w)?, WeightLayout::OutIn, bias));
        Ok(())
    }

    /// The trained copy's weight and bias, if the head trains.
    pub fn trained_params(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        self.trained.as_ref().map(|l| {
            let (w, _, b) = l.base();
            (w, b)
        })
    }

    /// A new head for `num_labels` classes (transformers' `ignore_mismatched_sizes`: the
    /// checkpoint's head does not fit the dataset's classes): weight from [`head_init`], bias
    /// zero, on the old head's device. A trained copy, if any, is dropped.
    pub fn reinit(&mut self, num_labels: usize, std: f32, seed: u64) -> Result<()> {
        let (c, _) = self.dims();
        let (w, _, _) = self.base.base();
        let device = w.device();
        let w = Tensor::new(head_init(num_labels, c, std, seed), &[num_labels, c])?;
        let b = Tensor::new(vec![0.0; num_labels], &[num_labels])?;
        w.to_device(device)?;
        b.to_device(device)?;
        self.base = Linear::frozen(w, WeightLayout::OutIn, Some(b));
        self.trained = None;
        Ok(())
    }

    /// Its tensors: the base's and the trained copy's.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut v = self.base.tensors();
        if let Some(t) = &self.trained {
            v.extend(t.tensors());
        }
        v
    }
}
