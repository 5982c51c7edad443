//! YOLOS (`YolosForObjectDetection`): a ViT encoder over `[CLS] + patches + detection tokens`,
//! learned positions resized (bicubic) to each input's patch grid, optional mid-layer position
//! embeddings, and two 3-layer MLP heads on the detection tokens: class logits (the dataset's
//! classes plus "no object") and boxes `(cx, cy, w, h)` through a sigmoid.
//!
//! The training loss is DETR's, as transformers computes it from labels: each image's predictions
//! are matched one-to-one to its objects by the Hungarian algorithm on `bbox_cost * L1 +
//! class_cost * (-p(class)) + giou_cost * (-GIoU)`, then `loss = CE + bbox_loss_coefficient *
//! L1 + giou_loss_coefficient * (1 - GIoU)` with the cross-entropy over every detection token
//! (unmatched ones target "no object", weighted by `eos_coefficient`) and the box terms over the
//! matched pairs, divided by the batch's object count.
//!
//! Module paths are the checkpoints' (transformers keeps YOLOS's original names:
//! `vit.encoder.layer.N.attention.attention.query`, `class_labels_classifier.layers.0`, ...).

use super::vision::{ClassifierHead, VisionModel};
use super::vit::{check_heads, invalid, legacy_name, patch_tokens, Activation, Block};
use super::{Conv, Linear};
use crate::autograd::Tape;
use crate::error::{CoreError, Result};
use crate::lora::WeightLayout;
use crate::ops::{self, Conv2dParams};
use crate::tensor::Tensor;
use lora_kernels::assign::linear_sum_assignment;
use lora_kernels::ops::interp::bicubic_resize;

/// The fields of YOLOS's `config.json` that the math depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct YolosConfig {
    /// `hidden_size`
    pub hidden_size: usize,
    /// `num_hidden_layers`
    pub num_hidden_layers: usize,
    /// `num_attention_heads`
    pub num_attention_heads: usize,
    /// `intermediate_size`
    pub intermediate_size: usize,
    /// `hidden_act`
    pub hidden_act: Activation,
    /// `layer_norm_eps`
    pub layer_norm_eps: f32,
    /// `image_size` (height, width): the grid the position tables were trained for.
    pub image_size: (usize, usize),
    /// `patch_size`
    pub patch_size: usize,
    /// `num_channels`
    pub num_channels: usize,
    /// `qkv_bias`
    pub qkv_bias: bool,
    /// `num_detection_tokens`
    pub num_detection_tokens: usize,
    /// `use_mid_position_embeddings`
    pub use_mid_position_embeddings: bool,
    /// Object classes (without "no object").
    pub num_labels: usize,
    /// `class_cost`, `bbox_cost`, `giou_cost` of the matcher.
    pub costs: (f32, f32, f32),
    /// `bbox_loss_coefficient`
    pub bbox_loss_coefficient: f32,
    /// `giou_loss_coefficient`
    pub giou_loss_coefficient: f32,
    /// `eos_coefficient`: the weight of "no object" in the class loss.
    pub eos_coefficient: f32,
}

impl YolosConfig {
    /// The patch grid of the position tables.
    pub fn grid(&self) -> (usize, usize) {
        (
            self.image_size.0 / self.patch_size,
            self.image_size.1 / self.patch_size,
        )
    }
}

/// One image's objects: class ids and `(cx, cy, w, h)` boxes normalised to the image.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    /// Class id of each object.
    pub classes: Vec<usize>,
    /// Its box.
    pub boxes: Vec<[f32; 4]>,
}

/// YOLOS's outputs for a batch.
pub struct Detections {
    /// `(B, D, num_labels + 1)` class logits (the last class is "no object").
    pub logits: Tensor,
    /// `(B, D, 4)` boxes `(cx, cy, w, h)` in `[0, 1]`.
    pub boxes: Tensor,
}

/// The training loss and its parts (the parts for logging).
pub struct DetrLoss {
    /// `loss_ce + bbox_coef * loss_bbox + giou_coef * loss_giou`, shape `[1]`.
    pub total: Tensor,
    /// The class loss.
    pub loss_ce: f32,
    /// The L1 box loss.
    pub loss_bbox: f32,
    /// The GIoU loss.
    pub loss_giou: f32,
    /// The forward pass's outputs the loss was computed from (evaluation reads them instead of
    /// running the model again).
    pub detections: Detections,
}

/// A 3-layer MLP head (`layers.0..2`, ReLU between), each layer trainable in full.
#[derive(Clone)]
pub struct MlpHead {
    /// Module path (`class_labels_classifier`, `bbox_predictor`).
    pub name: String,
    /// Its three layers (named `<name>.layers.<i>`).
    pub layers: Vec<ClassifierHead>,
}

impl MlpHead {
    fn forward(&self, tape: &Tape, x: &Tensor, adapters: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(tape, &h, adapters)?;
            if i + 1 < self.layers.len() {
                h = ops::relu(tape, &h)?;
            }
        }
        Ok(h)
    }
}

/// YOLOS for object detection.
pub struct Yolos {
    cfg: YolosConfig,
    patch: Conv,
    cls_token: Tensor,             // (1, 1, C)
    det_tokens: Tensor,            // (1, D, C)
    positions: Tensor,             // (1, 1 + P + D, C)
    mid_positions: Option<Tensor>, // (L - 1, 1, 1 + P + D, C)
    blocks: Vec<Block>,
    layernorm: (Tensor, Tensor),
    /// The class head (`num_labels + 1` outputs).
    pub class_head: MlpHead,
    /// The box head (4 outputs, then a sigmoid).
    pub bbox_head: MlpHead,
}

impl Yolos {
    /// Builds the model from `load(name, shape)` (the checkpoint's names).
    pub fn load<E: From<CoreError>>(
        cfg: &YolosConfig,
        load: &mut dyn FnMut(&str, &[usize]) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Self, E> {
        let c = cfg.hidden_size;
        check_heads(cfg.num_attention_heads, c)?;
        let (gh, gw) = cfg.grid();
        if cfg.patch_size == 0 || gh == 0 || gw == 0 {
            return Err(invalid(
                "patch_size",
                format!(
                    "{} does not fit image_size {:?}",
                    cfg.patch_size, cfg.image_size
                ),
            )
            .into());
        }
        if cfg.num_detection_tokens == 0 {
            return Err(invalid("num_detection_tokens", "must be at least 1".into()).into());
        }
        let f = cfg.intermediate_size;
        let mut blocks = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let name = |p: &str| {
                let new = format!("vit.layers.{i}.{p}");
                legacy_name(&new).unwrap_or(new)
            };
            blocks.push(Block::load(load, &name, (c, f, cfg.qkv_bias))?);
        }
        let seq = 1 + gh * gw + cfg.num_detection_tokens;
        let mid_positions = if cfg.use_mid_position_embeddings && cfg.num_hidden_layers > 1 {
            Some(load(
                "vit.encoder.mid_position_embeddings",
                &[cfg.num_hidden_layers - 1, 1, seq, c],
            )?)
        } else {
            None
        };
        let mut head = |name: &str, out: usize| -> std::result::Result<MlpHead, E> {
            let mut layers = Vec::new();
            for (i, (inp, o)) in [(c, c), (c, c), (c, out)].into_iter().enumerate() {
                let p = format!("{name}.layers.{i}");
                layers.push(ClassifierHead::new(
                    &p,
                    load(&format!("{p}.weight"), &[o, inp])?,
                    Some(load(&format!("{p}.bias"), &[o])?),
                ));
            }
            Ok(MlpHead {
                name: name.into(),
                layers,
            })
        };
        let class_head = head("class_labels_classifier", cfg.num_labels + 1)?;
        let bbox_head = head("bbox_predictor", 4)?;
        let pe = PATCH;
        let p = cfg.patch_size;
        let patch = Conv::frozen(
            load(&format!("{pe}.weight"), &[c, cfg.num_channels, p, p])?,
            Some(load(&format!("{pe}.bias"), &[c])?),
            Conv2dParams {
                stride: (p, p),
                ..Conv2dParams::default()
            },
        );
        Ok(Self {
            patch,
            cls_token: load("vit.embeddings.cls_token", &[1, 1, c])?,
            det_tokens: load(
                "vit.embeddings.detection_tokens",
                &[1, cfg.num_detection_tokens, c],
            )?,
            positions: load("vit.embeddings.position_embeddings", &[1, seq, c])?,
            mid_positions,
            layernorm: (
                load("vit.layernorm.weight", &[c])?,
                load("vit.layernorm.bias", &[c])?,
            ),
            blocks,
            class_head,
            bbox_head,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &YolosConfig {
        &self.cfg
    }

    /// A `(1, 1 + P + D, C)` position table (`table`, laid out `[CLS, patches, detection]` on
    /// the config's grid) with its patch part resized to a `(gh, gw)` grid, as transformers'
    /// `InterpolateInitialPositionEmbeddings` does (bicubic); the table itself when the grid is
    /// the config's. Position tables are frozen: resizing happens on the host, outside the tape.
    fn positions_for(&self, table: &[f32], (gh, gw): (usize, usize)) -> Result<Vec<f32>> {
        let c = self.cfg.hidden_size;
        let (h0, w0) = self.cfg.grid();
        let d = self.cfg.num_detection_tokens;
        if (gh, gw) == (h0, w0) {
            return Ok(table.to_vec());
        }
        let p0 = h0 * w0;
        // Patch rows (P, C) as C planes of (h0, w0).
        let mut planes = vec![0.0f32; c * p0];
        for t in 0..p0 {
            for ch in 0..c {
                planes[ch * p0 + t] = table[(1 + t) * c + ch];
            }
        }
        let resized = bicubic_resize(&planes, c, (h0, w0), (gh, gw))?;
        let p = gh * gw;
        let mut out = Vec::with_capacity((1 + p + d) * c);
        out.extend_from_slice(&table[..c]);
        for t in 0..p {
            out.extend((0..c).map(|ch| resized[ch * p + t]));
        }
        out.extend_from_slice(&table[(1 + p0) * c..]);
        Ok(out)
    }

    fn frozen_table(&self, t: &Tensor, what: &'static str) -> Result<Vec<f32>> {
        if t.requires_grad() {
            return Err(CoreError::Unsupported(what));
        }
        t.try_to_vec()
    }

    /// Class logits and boxes for `pixels` `(B, C, H, W)` (H and W multiples of the patch size
    /// or not: the last partial patches are dropped, as the convolution does).
    pub fn forward(&self, tape: &Tape, pixels: &Tensor, adapters: bool) -> Result<Detections> {
        let cfg = &self.cfg;
        let s = pixels.shape();
        if s.len() != 4
            || s[1] != cfg.num_channels
            || s[2] < cfg.patch_size
            || s[3] < cfg.patch_size
        {
            return Err(CoreError::Shape {
                op: "YOLOS",
                what: "pixels",
                got: s.to_vec(),
                expected: format!(
                    "[batch, {}, height, width] with sides of at least {}",
                    cfg.num_channels, cfg.patch_size
                ),
            });
        }
        let (b, c, d) = (s[0], cfg.hidden_size, cfg.num_detection_tokens);
        let grid = (s[2] / cfg.patch_size, s[3] / cfg.patch_size);
        let (tokens, p) = patch_tokens(tape, &self.patch, pixels, adapters)?; // (B, P, C)
        let cls = ops::expand(tape, &self.cls_token, b)?;
        let det = ops::expand(tape, &self.det_tokens, b)?;
        let x = ops::concat(tape, &cls, &tokens, 1)?;
        let x = ops::concat(tape, &x, &det, 1)?;
        let seq = 1 + p + d;
        let device = pixels.device();
        let pos = if grid == cfg.grid() {
            self.positions.clone()
        } else {
            let t = self.frozen_table(
                &self.positions,
                "YOLOS: resizing trainable position embeddings",
            )?;
            Tensor::new_on(self.positions_for(&t, grid)?, &[1, seq, c], false, device)?
        };
        let pos = ops::expand(tape, &pos, b)?;
        let mut x = ops::add(tape, &x, &pos)?;
        let mids: Vec<Tensor> = match &self.mid_positions {
            None => Vec::new(),
            // On the config's grid the tables are used where they live (no host copy).
            Some(m) if grid == cfg.grid() => (0..cfg.num_hidden_layers - 1)
                .map(|i| {
                    let t = ops::narrow_dim(tape, m, 0, i, 1)?;
                    ops::reshape(tape, &t, &[1, seq, c])
                })
                .collect::<Result<_>>()?,
            Some(m) => {
                let all = self.frozen_table(m, "YOLOS: trainable mid-layer position embeddings")?;
                let per = all.len() / (cfg.num_hidden_layers - 1);
                all.chunks(per)
                    .map(|t| {
                        Tensor::new_on(self.positions_for(t, grid)?, &[1, seq, c], false, device)
                    })
                    .collect::<Result<_>>()?
            }
        };
        let (h, eps, act) = (cfg.num_attention_heads, cfg.layer_norm_eps, cfg.hidden_act);
        for (i, blk) in self.blocks.iter().enumerate() {
            x = if tape.checkpointing() {
                let blk = blk.clone();
                ops::checkpoint(tape, &x, move |t, x| {
                    blk.forward(t, x, (h, eps, act), adapters)
                })?
            } else {
                blk.forward(tape, &x, (h, eps, act), adapters)?
            };
            if let Some(m) = mids.get(i) {
                let m = ops::expand(tape, m, b)?;
                x = ops::add(tape, &x, &m)?;
            }
        }
        let x = ops::layer_norm(tape, &x, &self.layernorm.0, Some(&self.layernorm.1), eps)?;
        let det = ops::narrow_dim(tape, &x, 1, 1 + p, d)?; // (B, D, C)
        let logits = self.class_head.forward(tape, &det, adapters)?;
        let boxes = self.bbox_head.forward(tape, &det, adapters)?;
        let boxes = ops::sigmoid(tape, &boxes)?;
        Ok(Detections { logits, boxes })
    }

    /// transformers' training loss of `pixels` against each image's `objects` (see the module
    /// documentation); a class id past the model's classes is an error naming it.
    pub fn loss(
        &self,
        tape: &Tape,
        pixels: &Tensor,
        objects: &[Objects],
        adapters: bool,
    ) -> Result<DetrLoss> {
        let cfg = &self.cfg;
        let det = self.forward(tape, pixels, adapters)?;
        let (b, q, l1) = (
            det.logits.shape()[0],
            det.logits.shape()[1],
            det.logits.shape()[2],
        );
        if objects.len() != b {
            return Err(CoreError::InvalidConfig {
                field: "labels",
                reason: format!("{} images of objects for a batch of {b}", objects.len()),
            });
        }
        for o in objects {
            if o.classes.len() != o.boxes.len() {
                return Err(CoreError::InvalidConfig {
                    field: "labels",
                    reason: format!("{} classes for {} boxes", o.classes.len(), o.boxes.len()),
                });
            }
            if let Some(&bad) = o.classes.iter().find(|&&c| c >= cfg.num_labels) {
                return Err(CoreError::InvalidConfig {
                    field: "labels",
                    reason: format!("class {bad} is past the model's {} classes", cfg.num_labels),
                });
            }
        }
        let logits = det.logits.try_to_vec()?;
        let boxes = det.boxes.try_to_vec()?;
        let matches = match_predictions(&logits, &boxes, (b, q, l1), objects, cfg.costs)?;
        // Class targets: the matched object's class, else "no object" (the last class).
        let no_object = cfg.num_labels as i32;
        let mut matched_t = vec![-100i32; b * q];
        let mut unmatched_t = vec![no_object; b * q];
        let (mut rows, mut tgt) = (Vec::new(), Vec::new());
        for (bi, pairs) in matches.iter().enumerate() {
            for &(qi, ti) in pairs {
                let r = bi * q + qi;
                matched_t[r] = objects[bi].classes[ti] as i32;
                unmatched_t[r] = -100;
                rows.push(r as u32);
                tgt.extend_from_slice(&objects[bi].boxes[ti]);
            }
        }
        let n_m = rows.len();
        let n_u = b * q - n_m;
        let flat = ops::reshape(tape, &det.logits, &[b * q, l1])?;
        // PyTorch's class-weighted mean: (sum_matched nll + eos * sum_unmatched nll) /
        // (n_matched + eos * n_unmatched), from the two plain means.
        let eos = cfg.eos_coefficient;
        let denom = n_m as f32 + eos * n_u as f32;
        let mut ce: Option<Tensor> = None;
        for (targets, n, w) in [(&matched_t, n_m, 1.0f32), (&unmatched_t, n_u, eos)] {
            if n == 0 || w == 0.0 {
                continue;
            }
            let part = ops::cross_entropy(tape, &flat, targets)?;
            let part = ops::scale(tape, &part, w * n as f32 / denom)?;
            ce = Some(match ce {
                None => part,
                Some(acc) => ops::add(tape, &acc, &part)?,
            });
        }
        let ce = match ce {
            Some(t) => t,
            None => ops::scale(tape, &ops::cross_entropy(tape, &flat, &matched_t)?, 0.0)?,
        };
        let loss_ce = ce.scalar()?;
        if n_m == 0 {
            return Ok(DetrLoss {
                total: ce,
                loss_ce,
                loss_bbox: 0.0,
                loss_giou: 0.0,
                detections: det,
            });
        }
        let num_boxes = objects.iter().map(|o| o.boxes.len()).sum::<usize>().max(1) as f32;
        let all_boxes = ops::reshape(tape, &det.boxes, &[b * q, 4])?;
        let picked = ops::embedding(tape, &all_boxes, &rows, &[n_m])?;
        let target = Tensor::new_on(tgt, &[n_m, 4], false, pixels.device())?;
        let parts = ops::box_losses(tape, &picked, &target, num_boxes)?; // [2]
        let pv = parts.try_to_vec()?;
        let coef = Tensor::new_on(
            vec![cfg.bbox_loss_coefficient, cfg.giou_loss_coefficient],
            &[1, 2],
            false,
            pixels.device(),
        )?;
        let parts = ops::reshape(tape, &parts, &[1, 2])?;
        let boxes_term = ops::linear(tape, &parts, &coef, WeightLayout::OutIn, None, None)?; // (1, 1)
        let boxes_term = ops::reshape(tape, &boxes_term, &[1])?;
        Ok(DetrLoss {
            total: ops::add(tape, &ce, &boxes_term)?,
            loss_ce,
            loss_bbox: pv[0],
            loss_giou: pv[1],
            detections: det,
        })
    }
}

impl VisionModel for Yolos {
    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            for (p, l) in b.parts() {
                let new = format!("vit.layers.{i}.{p}");
                v.push((legacy_name(&new).unwrap_or(new), l));
            }
        }
        v
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            for (p, l) in b.parts_mut() {
                let new = format!("vit.layers.{i}.{p}");
                v.push((legacy_name(&new).unwrap_or(new), l));
            }
        }
        v
    }
    fn convs(&self) -> Vec<(String, &Conv)> {
        vec![(PATCH.into(), &self.patch)]
    }
    fn convs_mut(&mut self) -> Vec<(String, &mut Conv)> {
        vec![(PATCH.into(), &mut self.patch)]
    }
    fn heads(&self) -> Vec<&ClassifierHead> {
        self.class_head
            .layers
            .iter()
            .chain(&self.bbox_head.layers)
            .collect()
    }
    fn heads_mut(&mut self) -> Vec<&mut ClassifierHead> {
        self.class_head
            .layers
            .iter_mut()
            .chain(self.bbox_head.layers.iter_mut())
            .collect()
    }
    fn other_tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![
            &self.cls_token,
            &self.det_tokens,
            &self.positions,
            &self.layernorm.0,
            &self.layernorm.1,
        ];
        v.extend(&self.mid_positions);
        for b in &self.blocks {
            v.extend([&b.ln_before.0, &b.ln_before.1, &b.ln_after.0, &b.ln_after.1]);
        }
        v
    }
}

const PATCH: &str = "vit.embeddings.patch_embeddings.projection";

/// transformers' Hungarian matching, per image: `(query, object)` pairs minimising
/// `bbox_cost * L1 + class_cost * (-softmax(logits)[class]) + giou_cost * (-GIoU)`, computed in
/// f32 as PyTorch does, solved by scipy's algorithm. `logits` `(B, Q, L + 1)`, `boxes` `(B, Q, 4)`.
pub fn match_predictions(
    logits: &[f32],
    boxes: &[f32],
    (b, q, l1): (usize, usize, usize),
    objects: &[Objects],
    (class_cost, bbox_cost, giou_cost): (f32, f32, f32),
) -> Result<Vec<Vec<(usize, usize)>>> {
    let corners = |v: &[f32]| {
        [
            v[0] - 0.5 * v[2],
            v[1] - 0.5 * v[3],
            v[0] + 0.5 * v[2],
            v[1] + 0.5 * v[3],
        ]
    };
    let giou = |a: [f32; 4], c: [f32; 4]| -> f32 {
        let area = |r: [f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
        let iw = (a[2].min(c[2]) - a[0].max(c[0])).max(0.0);
        let ih = (a[3].min(c[3]) - a[1].max(c[1])).max(0.0);
        let inter = iw * ih;
        let union = area(a) + area(c) - inter;
        let iou = inter / union;
        let ew = (a[2].max(c[2]) - a[0].min(c[0])).max(0.0);
        let eh = (a[3].max(c[3]) - a[1].min(c[1])).max(0.0);
        let enc = ew * eh;
        iou - (enc - union) / enc
    };
    let mut out = Vec::with_capacity(b);
    for (bi, obj) in objects.iter().enumerate() {
        let t = obj.boxes.len();
        let mut cost = vec![0.0f64; q * t];
        for qi in 0..q {
            let row = &logits[(bi * q + qi) * l1..(bi * q + qi + 1) * l1];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().map(|&v| (v - m).exp()).sum();
            let pb = &boxes[(bi * q + qi) * 4..(bi * q + qi + 1) * 4];
            for ti in 0..t {
                let prob = (row[obj.classes[ti]] - m).exp() / z;
                let tb = &obj.boxes[ti];
                let l1d: f32 = pb.iter().zip(tb).map(|(a, c)| (a - c).abs()).sum();
                let g = giou(corners(pb), corners(tb));
                let c = bbox_cost * l1d + class_cost * -prob + giou_cost * -g;
                // transformers replaces every non-finite cost by the largest finite value.
                let c = if c.is_finite() { c } else { f32::MAX };
                cost[qi * t + ti] = c as f64;
            }
        }
        let pairs = linear_sum_assignment(&cost, q, t)
            .map_err(|_| CoreError::Internal("the matcher's cost matrix is finite, so feasible"))?;
        out.push(pairs);
    }
    Ok(out)
}
