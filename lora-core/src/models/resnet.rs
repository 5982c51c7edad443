//! ResNet (`ResNetForImageClassification`): a 7x7 stride-2 stem with batch norm, ReLU and a
//! 3x3 max pool, stages of basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual layers with a
//! projection shortcut where the shape changes, global average pooling and a linear head
//! (`classifier.1`). Batch norm runs in inference mode (frozen running statistics, as a LoRA
//! fine-tune of a frozen backbone keeps them). Module paths are transformers'.

use super::vision::{ClassifierHead, ImageClassifier, VisionModel};
use super::vit::Activation;
use super::{Conv, Linear};
use crate::autograd::Tape;
use crate::error::{CoreError, Result};
use crate::ops::{self, Conv2dParams};
use crate::tensor::Tensor;

/// The fields of ResNet's `config.json` that the math depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct ResNetConfig {
    /// `num_channels`
    pub num_channels: usize,
    /// `embedding_size`: the stem's output channels.
    pub embedding_size: usize,
    /// `hidden_sizes`: each stage's output channels.
    pub hidden_sizes: Vec<usize>,
    /// `depths`: layers per stage.
    pub depths: Vec<usize>,
    /// `layer_type == "bottleneck"` (else `basic`).
    pub bottleneck: bool,
    /// `hidden_act`
    pub hidden_act: Activation,
    /// `downsample_in_first_stage`
    pub downsample_in_first_stage: bool,
    /// `downsample_in_bottleneck`
    pub downsample_in_bottleneck: bool,
    /// Classes of the head.
    pub num_labels: usize,
}

/// Batch norm's epsilon in `nn.BatchNorm2d` (transformers' ResNet keeps the default).
const BN_EPS: f32 = 1e-5;

/// A convolution followed by inference-mode batch norm (and, in the model, maybe an activation).
#[derive(Clone)]
struct ConvBn {
    name: String,
    conv: Conv,
    /// gamma, beta, running mean, running var.
    bn: [Tensor; 4],
}

impl ConvBn {
    fn forward(&self, tape: &Tape, x: &Tensor, adapters: bool) -> Result<Tensor> {
        let y = self.conv.forward(tape, x, adapters)?;
        let [g, b, m, v] = &self.bn;
        ops::batch_norm2d(tape, &y, m, v, g, b, BN_EPS)
    }
}

#[derive(Clone)]
struct Layer {
    shortcut: Option<ConvBn>,
    convs: Vec<ConvBn>,
}

/// ResNet for image classification.
pub struct ResNet {
    cfg: ResNetConfig,
    stem: ConvBn,
    layers: Vec<Layer>,
    head: ClassifierHead,
}

impl ResNet {
    /// Builds the model from `load(name, shape)` (transformers' parameter names).
    pub fn load<E: From<CoreError>>(
        cfg: &ResNetConfig,
        load: &mut dyn FnMut(&str, &[usize]) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Self, E> {
        let invalid =
            |field: &'static str, reason: String| CoreError::InvalidConfig { field, reason };
        if cfg.hidden_sizes.is_empty() || cfg.hidden_sizes.len() != cfg.depths.len() {
            return Err(invalid(
                "depths",
                format!(
                    "{} stages in depths but {} in hidden_sizes",
                    cfg.depths.len(),
                    cfg.hidden_sizes.len()
                ),
            )
            .into());
        }
        if cfg.num_labels == 0 {
            return Err(invalid("num_labels", "the head needs at least one class".into()).into());
        }
        let mut conv_bn = |name: String,
                           inp: usize,
                           out: usize,
                           k: usize,
                           stride: usize|
         -> std::result::Result<ConvBn, E> {
            let w = load(&format!("{name}.convolution.weight"), &[out, inp, k, k])?;
            let p = Conv2dParams {
                stride: (stride, stride),
                padding: (k / 2, k / 2),
                ..Conv2dParams::default()
            };
            let n = format!("{name}.normalization");
            let bn = [
                load(&format!("{n}.weight"), &[out])?,
                load(&format!("{n}.bias"), &[out])?,
                load(&format!("{n}.running_mean"), &[out])?,
                load(&format!("{n}.running_var"), &[out])?,
            ];
            Ok(ConvBn {
                name: format!("{name}.convolution"),
                conv: Conv::frozen(w, None, p),
                bn,
            })
        };
        let stem = conv_bn(
            "resnet.embedder.embedder".into(),
            cfg.num_channels,
            cfg.embedding_size,
            7,
            2,
        )?;
        let mut layers = Vec::new();
        let mut inp = cfg.embedding_size;
        for (s, (&out, &depth)) in cfg.hidden_sizes.iter().zip(&cfg.depths).enumerate() {
            let stage_stride = if s > 0 || cfg.downsample_in_first_stage {
                2
            } else {
                1
            };
            for l in 0..depth {
                let (cin, stride) = if l == 0 {
                    (inp, stage_stride)
                } else {
                    (out, 1)
                };
                let p = format!("resnet.encoder.stages.{s}.layers.{l}");
                let shortcut = if cin != out || stride != 1 {
                    // A 1x1 projection: its padding is 0 (k / 2).
                    Some(conv_bn(format!("{p}.shortcut"), cin, out, 1, stride)?)
                } else {
                    None
                };
                let convs = if cfg.bottleneck {
                    let red = out / 4;
                    let (s1, s2) = if cfg.downsample_in_bottleneck {
                        (stride, 1)
                    } else {
                        (1, stride)
                    };
                    vec![
                        conv_bn(format!("{p}.layer.0"), cin, red, 1, s1)?,
                        conv_bn(format!("{p}.layer.1"), red, red, 3, s2)?,
                        conv_bn(format!("{p}.layer.2"), red, out, 1, 1)?,
                    ]
                } else {
                    vec![
                        conv_bn(format!("{p}.layer.0"), cin, out, 3, stride)?,
                        conv_bn(format!("{p}.layer.1"), out, out, 3, 1)?,
                    ]
                };
                layers.push(Layer { shortcut, convs });
            }
            inp = out;
        }
        let l = cfg.num_labels;
        let head = ClassifierHead::new(
            "classifier.1",
            load("classifier.1.weight", &[l, inp])?,
            Some(load("classifier.1.bias", &[l])?),
        );
        Ok(Self {
            cfg: cfg.clone(),
            stem,
            layers,
            head,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// Every conv + batch-norm unit in model order.
    fn units(&self) -> impl Iterator<Item = &ConvBn> {
        std::iter::once(&self.stem).chain(
            self.layers
                .iter()
                .flat_map(|l| l.convs.iter().chain(l.shortcut.iter())),
        )
    }
}

impl VisionModel for ResNet {
    fn linears(&self) -> Vec<(String, &Linear)> {
        Vec::new()
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        Vec::new()
    }
    fn convs(&self) -> Vec<(String, &Conv)> {
        self.units().map(|u| (u.name.clone(), &u.conv)).collect()
    }
    fn convs_mut(&mut self) -> Vec<(String, &mut Conv)> {
        let stem = std::iter::once(&mut self.stem);
        let rest = self
            .layers
            .iter_mut()
            .flat_map(|l| l.convs.iter_mut().chain(l.shortcut.iter_mut()));
        stem.chain(rest)
            .map(|u| (u.name.clone(), &mut u.conv))
            .collect()
    }
    fn other_tensors(&self) -> Vec<&Tensor> {
        self.units().flat_map(|u| u.bn.iter()).collect()
    }
    fn heads(&self) -> Vec<&ClassifierHead> {
        vec![&self.head]
    }
    fn heads_mut(&mut self) -> Vec<&mut ClassifierHead> {
        vec![&mut self.head]
    }
}

impl ImageClassifier for ResNet {
    fn forward(&self, tape: &Tape, pixels: &Tensor, adapters: bool) -> Result<Tensor> {
        let s = pixels.shape();
        if s.len() != 4 || s[1] != self.cfg.num_channels {
            return Err(CoreError::Shape {
                op: "ResNet",
                what: "pixels",
                got: s.to_vec(),
                expected: format!("[batch, {}, height, width]", self.cfg.num_channels),
            });
        }
        let act = self.cfg.hidden_act;
        let x = self.stem.forward(tape, pixels, adapters)?;
        let x = act.apply(tape, &x)?;
        let mut x = ops::max_pool2d(tape, &x, (3, 3), (2, 2), (1, 1))?;
        for layer in &self.layers {
            let mut h = x.clone();
            for (i, u) in layer.convs.iter().enumerate() {
                h = u.forward(tape, &h, adapters)?;
                if i + 1 < layer.convs.len() {
                    // Inner convolutions use ReLU (ResNetConvLayer's default), the last none.
                    h = ops::relu(tape, &h)?;
                }
            }
            let r = match &layer.shortcut {
                Some(sc) => sc.forward(tape, &x, adapters)?,
                None => x,
            };
            x = act.apply(tape, &ops::add(tape, &h, &r)?)?;
        }
        let pooled = ops::adaptive_avg_pool2d(tape, &x, (1, 1))?;
        let b = pooled.shape()[0];
        let c = pooled.shape()[1];
        let flat = ops::reshape(tape, &pooled, &[b, c])?;
        self.head.forward(tape, &flat, adapters)
    }
    fn fixed_size(&self) -> Option<(usize, usize)> {
        None
    }
    fn num_channels(&self) -> usize {
        self.cfg.num_channels
    }
    fn num_labels(&self) -> usize {
        self.head.dims().1
    }
    fn head(&self) -> &ClassifierHead {
        &self.head
    }
    fn head_mut(&mut self) -> &mut ClassifierHead {
        &mut self.head
    }
}
