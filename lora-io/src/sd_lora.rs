//! Stable Diffusion LoRA files as people share them, read and merged into a loaded pipeline:
//!
//! - diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight` (and
//!   `text_encoder.<module>...`; keys without a prefix are the UNet's), the alphas from the
//!   `lora_adapter_metadata` JSON diffusers writes in the header (`unet.lora_alpha`,
//!   `unet.alpha_pattern`, `unet.use_rslora`, ...), else from `<module>.alpha` keys, else
//!   alpha = rank (scale 1, diffusers' convention);
//! - the older diffusers names: `<module>.lora.down.weight` / `lora.up.weight`, and the
//!   attention-processor form `...attn1.processor.to_q_lora.down.weight`;
//! - kohya (`lora_unet_<module with _>`, `lora_te_<module with _>`): `lora_down.weight`,
//!   `lora_up.weight`, `.alpha` with kohya's rule that a missing or zero alpha means alpha =
//!   rank; LoCon's convolution layers (`lora_down` a `(r, in, kh, kw)` convolution, `lora_up`
//!   `(out, r, 1, 1)`). kohya's flattened names are resolved against the model's own module
//!   paths, so `transformer_blocks` or `to_out_0` are never split at the wrong underscore.
//!
//! Each module's update `scale * weight * up @ down` (reshaped to the layer's weight) is added to
//! the frozen weight, so several files with their own weights add up. LyCORIS' LoHa
//! (`hada_w1_a` ... with Tucker cores `hada_t1/2`), LoKr (`lokr_w1` or `lokr_w1_a/b`, `lokr_w2`
//! or `lokr_w2_a/b`, Tucker `lokr_t2`) and Tucker LoCon (`lora_mid`) are rebuilt as LyCORIS does
//! (`alpha / r`, a missing or zero alpha meaning `r`; a LoKr of two full factors at scale 1).
//! DoRA magnitudes are refused by key, not ignored.

use crate::error::{IoError, Result};
use crate::safetensors::SafetensorsFile;
use crate::sd::SdPipeline;
use lora_core::models::{Conv, Linear};
use lora_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The model a LoRA module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The UNet.
    Unet,
    /// The (first) text encoder.
    TextEncoder,
}

impl Component {
    /// The prefix the model's keys carry in a diffusers LoRA file (`unet`, `text_encoder`).
    pub fn prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
        }
    }
}

/// How a module is named in the file: a dotted module path (diffusers / PEFT), or kohya's
/// flattened one (resolved against the model).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Name {
    Dotted(String),
    Flat(String),
}

/// How a module's update is factored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// LoRA / LoCon: `up @ down` (with a Tucker core `lora_mid` for convolutions).
    Lora,
    /// LyCORIS LoHa: `(w1a @ w1b) * (w2a @ w2b)` (Hadamard product; Tucker cores `hada_t1`,
    /// `hada_t2` for convolutions).
    LoHa,
    /// LyCORIS LoKr: `kron(w1, w2)`, each factor full or `a @ b` (w2 with a Tucker core
    /// `lokr_t2` for convolutions).
    LoKr,
}

/// A tensor of a module: values and shape.
pub type Part = (Vec<f32>, Vec<usize>);

/// One module of a LoRA file: its factors by part name (`lora_down.weight`, `lora_up.weight`,
/// `lora_mid.weight`, `hada_w1_a`, ..., `lokr_w2_b`, `lokr_t2`).
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// Which model.
    pub component: Component,
    /// The file's key stem (for messages).
    pub key: String,
    /// The factorization.
    pub kind: Kind,
    /// The factors by part name.
    pub parts: BTreeMap<&'static str, Part>,
    /// The scale the file gives the module (`alpha / r`, LyCORIS' and kohya's rules; PEFT's
    /// metadata for diffusers files); 1 for a LoKr of two full factors.
    pub scale: f32,
    /// LyCORIS' DoRA magnitude (`dora_scale`): `(out, 1[, 1, 1])` per output row or
    /// `(1, in[, 1, 1])` per input column of the weight (see [`LoraModule::apply`]).
    pub dora_scale: Option<Part>,
    /// PEFT's DoRA magnitude (`lora_magnitude_vector`): one per output channel, `(out)` or
    /// `(1, out, 1, 1)` (see [`LoraModule::apply`]).
    pub peft_magnitude: Option<Part>,
    name: Name,
}

impl LoraModule {
    /// The merged weight: `weight` (stored values, shape `shape`) plus this module's update at
    /// the file weight `mult`. Without a DoRA magnitude that is `W + mult * dW`; with PEFT's
    /// (`lora_magnitude_vector`), `m (W + mult dW) / |W + mult dW|` per output channel; with
    /// LyCORIS' (`dora_scale`), its rule `(W + dW) * (mult * (m / |W + dW| - 1) + 1)`, the norm per output row or
    /// per input column as the magnitude's shape says, plus f32's epsilon (as LyCORIS). Errors
    /// name what does not fit the layer.
    pub fn apply(
        &self,
        weight: &[f32],
        shape: &[usize],
        mult: f32,
    ) -> std::result::Result<Vec<f32>, String> {
        let d = self.delta(shape)?;
        let mult = mult as f64;
        if let Some((m, ms)) = &self.peft_magnitude {
            // PEFT: W' = m (W + w dW) / |W + w dW|, the norm per output channel (no epsilon);
            // the file weight scales the update, as set_adapters scales PEFT's `scaling`.
            let out = shape[0];
            let per: usize = shape[1..].iter().product();
            if m.len() != out {
                return Err(format!(
                    "the DoRA magnitude {ms:?} does not have one value per output channel of a \
                     {shape:?} weight"
                ));
            }
            let full: Vec<f64> = weight
                .iter()
                .zip(&d)
                .map(|(w, dv)| *w as f64 + mult * dv)
                .collect();
            let mut w = vec![0.0f32; full.len()];
            for o in 0..out {
                let row = &full[o * per..(o + 1) * per];
                let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
                let f = m[o] as f64 / n;
                for (dst, v) in w[o * per..(o + 1) * per].iter_mut().zip(row) {
                    *dst = (v * f) as f32;
                }
            }
            return Ok(w);
        }
        let Some((m, ms)) = &self.dora_scale else {
            return Ok(weight
                .iter()
                .zip(&d)
                .map(|(w, dv)| (*w as f64 + mult * dv) as f32)
                .collect());
        };
        let (out, inp) = (shape[0], shape.get(1).copied().unwrap_or(1));
        let spatial: usize = shape[2..].iter().product();
        let unit = |dims: &[usize]| dims.iter().all(|&x| x == 1);
        let on_out = if ms.len() == shape.len() && ms[0] == out && unit(&ms[1..]) {
            true
        } else if ms.len() == shape.len() && ms[0] == 1 && ms[1] == inp && unit(&ms[2..]) {
            false
        } else {
            return Err(format!(
                "the DoRA magnitude {ms:?} fits neither the rows ({out}) nor the columns ({inp}) \
                 of a {shape:?} weight"
            ));
        };
        let full: Vec<f64> = weight
            .iter()
            .zip(&d)
            .map(|(w, dv)| *w as f64 + dv)
            .collect();
        let at = |o: usize, i: usize, s: usize| (o * inp + i) * spatial + s;
        let groups = if on_out { out } else { inp };
        let mut norm = vec![0.0f64; groups];
        for o in 0..out {
            for i in 0..inp {
                for s in 0..spatial {
                    let v = full[at(o, i, s)];
                    norm[if on_out { o } else { i }] += v * v;
                }
            }
        }
        let factor: Vec<f64> = norm
            .iter()
            .zip(m)
            .map(|(n, m)| mult * (*m as f64 / (n.sqrt() + f32::EPSILON as f64) - 1.0) + 1.0)
            .collect();
        let mut w = vec![0.0f32; full.len()];
        for o in 0..out {
            for i in 0..inp {
                for s in 0..spatial {
                    let k = at(o, i, s);
                    w[k] = (full[k] * factor[if on_out { o } else { i }]) as f32;
                }
            }
        }
        Ok(w)
    }

    /// A factor, by part name.
    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.get(name)
    }

    fn need(&self, name: &str) -> &Part {
        &self.parts[name]
    }

    /// The rank (LoKr: of its low-rank factor; 0 when both factors are full).
    pub fn rank(&self) -> usize {
        match self.kind {
            Kind::Lora => self.need("lora_down.weight").1[0],
            Kind::LoHa => self.need("hada_w1_b").1[0],
            Kind::LoKr => ["lokr_w1_b", "lokr_w2_b"]
                .iter()
                .find_map(|p| self.part(p))
                .map_or(0, |b| b.1[0]),
        }
    }

    /// Checks that the parts are a well-formed module of its kind (dimensions and the ranks
    /// the factors share), so that the shapes below index only what exists.
    fn validate(&self) -> std::result::Result<(), String> {
        let d = |p: &str| self.part(p).map(|x| x.1.as_slice());
        let dims = |p: &str, n: &[usize]| -> std::result::Result<Vec<usize>, String> {
            match d(p) {
                Some(s) if n.contains(&s.len()) && s.iter().all(|&x| x > 0) => Ok(s.to_vec()),
                Some(s) => Err(format!("`{p}` has shape {s:?}, expected {n:?} dimensions")),
                None => Err(format!("`{p}` is missing")),
            }
        };
        let same = |what: &str, x: usize, y: usize| -> std::result::Result<(), String> {
            if x == y {
                Ok(())
            } else {
                Err(format!("{what}: {x} and {y} differ"))
            }
        };
        match self.kind {
            Kind::Lora => {
                let down = dims("lora_down.weight", &[2, 4])?;
                let up = dims("lora_up.weight", &[2, 4])?;
                if d("lora_mid.weight").is_some() {
                    let mid = dims("lora_mid.weight", &[3, 4])?;
                    same("lora_mid's first dimension and the rank", mid[0], down[0])?;
                    same(
                        "lora_mid's second dimension and lora_up's rank",
                        mid[1],
                        up[1],
                    )?;
                    if down.len() != 4 || down[2..].iter().any(|&k| k != 1) {
                        return Err(format!("a Tucker lora_down is (r, in, 1, 1), got {down:?}"));
                    }
                }
            }
            Kind::LoHa => {
                let tucker = d("hada_t1").is_some() || d("hada_t2").is_some();
                for w in ["w1", "w2"] {
                    let a = dims(&format!("hada_{w}_a"), &[2])?;
                    let b = dims(&format!("hada_{w}_b"), &[2])?;
                    if tucker {
                        let t = dims(&format!("hada_t{}", &w[1..]), &[3, 4])?;
                        same("a Tucker core's first dimension and hada_*_a's", t[0], a[0])?;
                        same(
                            "a Tucker core's second dimension and hada_*_b's",
                            t[1],
                            b[0],
                        )?;
                    } else {
                        same("hada_*_a's columns and hada_*_b's rows", a[1], b[0])?;
                    }
                }
            }
            Kind::LoKr => {
                match (d("lokr_w1"), d("lokr_w1_a"), d("lokr_w1_b")) {
                    (Some(_), None, None) => {
                        dims("lokr_w1", &[2])?;
                    }
                    (None, Some(_), Some(_)) => {
                        let (a, b) = (dims("lokr_w1_a", &[2])?, dims("lokr_w1_b", &[2])?);
                        same("lokr_w1_a's columns and lokr_w1_b's rows", a[1], b[0])?;
                    }
                    _ => return Err("needs lokr_w1, or lokr_w1_a and lokr_w1_b".into()),
                }
                match (d("lokr_w2"), d("lokr_w2_a"), d("lokr_w2_b"), d("lokr_t2")) {
                    (Some(_), None, None, None) => {
                        dims("lokr_w2", &[2, 4])?;
                    }
                    (None, Some(_), Some(_), t) => {
                        let a = dims("lokr_w2_a", &[2])?;
                        let b = dims("lokr_w2_b", &[2, 4])?;
                        if t.is_some() {
                            let t = dims("lokr_t2", &[3, 4])?;
                            same("lokr_t2's first dimension and lokr_w2_a's", t[0], a[0])?;
                            same("lokr_t2's second dimension and lokr_w2_b's", t[1], b[0])?;
                        } else {
                            same("lokr_w2_a's columns and lokr_w2_b's rows", a[1], b[0])?;
                        }
                    }
                    _ => {
                        return Err(
                            "needs lokr_w2, or lokr_w2_a and lokr_w2_b (with lokr_t2)".into()
                        )
                    }
                }
            }
        }
        Ok(())
    }

    /// The weight shape the factors make on their own (`(out, in)` or `(out, in, kh, kw)`;
    /// a convolution's LoRA or non-Tucker LoHa without its kernel split: `(out, in * kh * kw)`).
    pub fn natural_shape(&self) -> Vec<usize> {
        let dims = |p: &str| self.part(p).map(|x| x.1.clone()).unwrap_or_default();
        match self.kind {
            Kind::Lora => {
                let (down, up) = (dims("lora_down.weight"), dims("lora_up.weight"));
                match self.part("lora_mid.weight") {
                    Some(mid) => [vec![up[0], down[1]], mid.1[2..].to_vec()].concat(),
                    None => [vec![up[0]], down[1..].to_vec()].concat(),
                }
            }
            Kind::LoHa => match self.part("hada_t1") {
                Some(t) => [
                    vec![dims("hada_w1_a")[1], dims("hada_w1_b")[1]],
                    t.1[2..].to_vec(),
                ]
                .concat(),
                None => vec![dims("hada_w1_a")[0], dims("hada_w1_b")[1]],
            },
            Kind::LoKr => {
                let (a, b) = match self.part("lokr_w1") {
                    Some(w) => (w.1[0], w.1[1]),
                    None => (dims("lokr_w1_a")[0], dims("lokr_w1_b")[1]),
                };
                let w2: Vec<usize> = match (self.part("lokr_w2"), self.part("lokr_t2")) {
                    (Some(w), _) => w.1.clone(),
                    (None, Some(t)) => [
                        vec![dims("lokr_w2_a")[1], dims("lokr_w2_b")[1]],
                        t.1[2..].to_vec(),
                    ]
                    .concat(),
                    (None, None) => {
                        let wb = dims("lokr_w2_b");
                        [vec![dims("lokr_w2_a")[0]], wb[1..].to_vec()].concat()
                    }
                };
                [vec![a * w2[0], b * w2[1]], w2[2..].to_vec()].concat()
            }
        }
    }

    /// The update `scale * ΔW` in f64, laid out as a weight of `shape` (`(out, in)` or
    /// `(out, in, kh, kw)`), or why the factors do not make one.
    pub fn delta(&self, shape: &[usize]) -> std::result::Result<Vec<f64>, String> {
        let (out, inp) = (shape[0], *shape.get(1).unwrap_or(&1));
        let sp: usize = shape.iter().skip(2).product();
        let n = out * inp * sp;
        let bad = |what: String| format!("{what} does not fit a weight of shape {shape:?}");
        let numel = |p: &Part| p.1.iter().product::<usize>();
        // (P, Q) = a^T-less product: m[p, q] = sum_k a[p, k] b[k, q] for a (P, R), b (R, Q).
        let matmul = |a: &[f32], b: &[f32], (pp, r, q): (usize, usize, usize)| -> Vec<f64> {
            let mut m = vec![0.0f64; pp * q];
            for i in 0..pp {
                for k in 0..r {
                    let x = a[i * r + k] as f64;
                    for j in 0..q {
                        m[i * q + j] += x * b[k * q + j] as f64;
                    }
                }
            }
            m
        };
        // Tucker: m[p, q, s] = sum_ij t[i, j, s] a[i, p] b[j, q], a (R1, P), b (R2, Q).
        let tucker = |t: &Part, a: &[f32], b: &[f32], (pp, q): (usize, usize)| -> Vec<f64> {
            let (r1, r2) = (t.1[0], t.1[1]);
            let ts: usize = t.1[2..].iter().product();
            let mut m = vec![0.0f64; pp * q * ts];
            for i in 0..r1 {
                for j in 0..r2 {
                    for s in 0..ts {
                        let tv = t.0[(i * r2 + j) * ts + s] as f64;
                        if tv == 0.0 {
                            continue;
                        }
                        for p in 0..pp {
                            let ap = tv * a[i * pp + p] as f64;
                            for qq in 0..q {
                                m[(p * q + qq) * ts + s] += ap * b[j * q + qq] as f64;
                            }
                        }
                    }
                }
            }
            m
        };
        let mut d = match self.kind {
            Kind::Lora => {
                let (down, up) = (self.need("lora_down.weight"), self.need("lora_up.weight"));
                let r = down.1[0];
                match self.part("lora_mid.weight") {
                    Some(mid) => {
                        // up (out, r, 1, 1) as (r, out)^T; down (r, in, 1, 1).
                        if numel(up) != out * r
                            || numel(down) != r * inp
                            || numel(mid) != r * r * sp
                        {
                            return Err(bad(format!(
                                "up {:?}, mid {:?}, down {:?}",
                                up.1, mid.1, down.1
                            )));
                        }
                        let mut ut = vec![0.0f32; r * out];
                        for o in 0..out {
                            for i in 0..r {
                                ut[i * out + o] = up.0[o * r + i];
                            }
                        }
                        tucker(mid, &ut, &down.0, (out, inp))
                    }
                    None => {
                        if numel(up) != out * r || numel(down) != r * inp * sp {
                            return Err(bad(format!("up {:?} x down {:?}", up.1, down.1)));
                        }
                        matmul(&up.0, &down.0, (out, r, inp * sp))
                    }
                }
            }
            Kind::LoHa => {
                let half = |w: &str| -> std::result::Result<Vec<f64>, String> {
                    let (a, b) = (
                        self.need(&format!("hada_{w}_a")),
                        self.need(&format!("hada_{w}_b")),
                    );
                    let t = format!("hada_t{}", &w[1..]);
                    match self.part(&t) {
                        Some(t) => {
                            if numel(a) != t.1[0] * out
                                || numel(b) != t.1[1] * inp
                                || numel(t) != t.1[0] * t.1[1] * sp
                            {
                                return Err(bad(format!(
                                    "Tucker LoHa {:?} {:?} {:?}",
                                    t.1, a.1, b.1
                                )));
                            }
                            Ok(tucker(t, &a.0, &b.0, (out, inp)))
                        }
                        None => {
                            let r = b.1[0];
                            if numel(a) != out * r || numel(b) != r * inp * sp {
                                return Err(bad(format!("LoHa {:?} x {:?}", a.1, b.1)));
                            }
                            Ok(matmul(&a.0, &b.0, (out, r, inp * sp)))
                        }
                    }
                };
                let (h1, h2) = (half("w1")?, half("w2")?);
                h1.iter().zip(&h2).map(|(x, y)| x * y).collect()
            }
            Kind::LoKr => {
                // w1 (a, b); w2 (c, d, sp): the update is kron(w1, w2), (a c, b d, sp).
                let (a, b) = match (
                    self.part("lokr_w1"),
                    self.part("lokr_w1_a"),
                    self.part("lokr_w1_b"),
                ) {
                    (Some(w), _, _) if w.1.len() == 2 => (w.1[0], w.1[1]),
                    (None, Some(wa), Some(wb))
                        if wa.1.len() == 2 && wb.1.len() == 2 && wa.1[1] == wb.1[0] =>
                    {
                        (wa.1[0], wb.1[1])
                    }
                    _ => return Err(bad("LoKr w1 (lokr_w1, or lokr_w1_a and lokr_w1_b)".into())),
                };
                // Checked before anything sized by the file is allocated.
                if a == 0 || b == 0 || out % a != 0 || inp % b != 0 {
                    return Err(bad(format!("LoKr w1 ({a}, {b})")));
                }
                let w1: Vec<f64> = match (
                    self.part("lokr_w1"),
                    self.part("lokr_w1_a"),
                    self.part("lokr_w1_b"),
                ) {
                    (Some(w), _, _) => w.0.iter().map(|&v| v as f64).collect(),
                    (_, Some(wa), Some(wb)) => matmul(&wa.0, &wb.0, (a, wa.1[1], b)),
                    _ => unreachable!("matched above"),
                };
                let (c, dd) = (out / a, inp / b);
                let w2: Vec<f64> = match (
                    self.part("lokr_w2"),
                    self.part("lokr_w2_a"),
                    self.part("lokr_w2_b"),
                    self.part("lokr_t2"),
                ) {
                    (Some(w), _, _, _) if numel(w) == c * dd * sp => {
                        w.0.iter().map(|&v| v as f64).collect()
                    }
                    (None, Some(wa), Some(wb), Some(t))
                        if numel(wa) == t.1[0] * c
                            && numel(wb) == t.1[1] * dd
                            && numel(t) == t.1[0] * t.1[1] * sp =>
                    {
                        tucker(t, &wa.0, &wb.0, (c, dd))
                    }
                    (None, Some(wa), Some(wb), None)
                        if wa.1.len() == 2 && wa.1[0] == c && numel(wb) == wa.1[1] * dd * sp =>
                    {
                        matmul(&wa.0, &wb.0, (c, wa.1[1], dd * sp))
                    }
                    _ => return Err(bad(format!("LoKr w2 for a w1 of ({a}, {b})"))),
                };
                let mut m = vec![0.0f64; n];
                for i in 0..a {
                    for j in 0..b {
                        let x = w1[i * b + j];
                        for k in 0..c {
                            for l in 0..dd {
                                let dst = ((i * c + k) * inp + j * dd + l) * sp;
                                let src = (k * dd + l) * sp;
                                for s in 0..sp {
                                    m[dst + s] = x * w2[src + s];
                                }
                            }
                        }
                    }
                }
                m
            }
        };
        debug_assert_eq!(d.len(), n);
        let s = self.scale as f64;
        d.iter_mut().for_each(|v| *v *= s);
        Ok(d)
    }
}

/// A LoRA file read for a Stable Diffusion pipeline.
#[derive(Clone, Debug)]
pub struct SdLora {
    /// The file.
    pub path: PathBuf,
    /// `kohya` or `diffusers` (PEFT and the older names).
    pub format: &'static str,
    /// Its modules, in key order.
    pub modules: Vec<LoraModule>,
}

/// What merging a file did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Modules merged, per component.
    pub merged: BTreeMap<String, usize>,
    /// Modules that matched nothing in the model (with `allow_unmatched`).
    pub unmatched: Vec<String>,
    /// The layers whose weights changed (their module paths in the model).
    pub layers: Vec<(Component, String)>,
}

const KEY_LIMIT: usize = 5;

fn err(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> IoError {
    IoError::Config {
        path: path.into(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// The parts of kohya/LyCORIS keys (`<module>.<part>`).
const KOHYA_PARTS: [(&str, &str); 18] = [
    (".dora_scale", "dora_scale"),
    (".lora_down.weight", "lora_down.weight"),
    (".lora_up.weight", "lora_up.weight"),
    (".lora_mid.weight", "lora_mid.weight"),
    (".alpha", "alpha"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_t2", "lokr_t2"),
];

/// The (component, module name, part) of a key, or `None` for a key no format here knows.
/// `part` is one of [`KOHYA_PARTS`]' names (`lora_down.weight` for PEFT's `lora_A`).
fn parse_key(key: &str) -> std::result::Result<Option<(Component, Name, &'static str)>, String> {
    let kohya = [
        ("lora_unet_", Component::Unet),
        ("lora_te_", Component::TextEncoder),
    ];
    for (p, comp) in kohya {
        if let Some(rest) = key.strip_prefix(p) {
            for (suffix, part) in KOHYA_PARTS {
                if let Some(stem) = rest.strip_suffix(suffix) {
                    return Ok(Some((comp, Name::Flat(stem.to_string()), part)));
                }
            }
            return Ok(None);
        }
    }
    for p in ["lora_te1_", "lora_te2_"] {
        if key.starts_with(p) {
            return Err(format!(
                "`{key}`: SDXL's second text encoder (`{p}`) is not supported yet"
            ));
        }
    }
    let (comp, rest) = if let Some(r) = key.strip_prefix("unet.") {
        (Component::Unet, r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (Component::TextEncoder, r)
    } else if key.starts_with("text_encoder_2.") {
        return Err(format!(
            "`{key}`: SDXL's second text encoder is not supported yet"
        ));
    } else {
        (Component::Unet, key)
    };
    for (suffix, part) in [
        (".lora_A.weight", "lora_down.weight"),
        (".lora_B.weight", "lora_up.weight"),
        (".lora.down.weight", "lora_down.weight"),
        (".lora.up.weight", "lora_up.weight"),
        (".lora_linear_layer.down.weight", "lora_down.weight"),
        (".lora_linear_layer.up.weight", "lora_up.weight"),
        (".lora_magnitude_vector", "lora_magnitude_vector"),
        (".alpha", "alpha"),
    ] {
        if let Some(stem) = rest.strip_suffix(suffix) {
            return Ok(Some((comp, Name::Dotted(processor_name(stem)), part)));
        }
    }
    // The attention-processor form: `...attn1.processor.to_q_lora.down.weight`.
    if rest.contains(".processor.") {
        for (suffix, part) in [
            (".down.weight", "lora_down.weight"),
            (".up.weight", "lora_up.weight"),
        ] {
            if let Some(stem) = rest.strip_suffix(suffix) {
                if stem.ends_with("_lora") {
                    return Ok(Some((comp, Name::Dotted(processor_name(stem)), part)));
                }
            }
        }
    }
    Ok(None)
}

/// diffusers' attention-processor form (`attn1.processor.to_q_lora`) as the module path
/// (`attn1.to_q`).
fn processor_name(stem: &str) -> String {
    let Some((head, tail)) = stem.split_once(".processor.") else {
        return stem.to_string();
    };
    let module = match tail {
        "to_q_lora" => "to_q",
        "to_k_lora" => "to_k",
        "to_v_lora" => "to_v",
        "to_out_lora" => "to_out.0",
        other => other,
    };
    format!("{head}.{module}")
}

/// diffusers' `lora_adapter_metadata`: per component, `lora_alpha`, `alpha_pattern`,
/// `use_rslora`.
struct AlphaRules {
    alpha: Option<f32>,
    pattern: Vec<(String, f32)>,
    rslora: bool,
    /// The metadata's `use_dora`: every module must then carry its magnitude.
    dora: bool,
}

fn alpha_rules(path: &Path, meta: &HashMap<String, String>, comp: Component) -> Result<AlphaRules> {
    let mut rules = AlphaRules {
        alpha: None,
        pattern: Vec::new(),
        rslora: false,
        dora: false,
    };
    let Some(text) = meta.get("lora_adapter_metadata") else {
        return Ok(rules);
    };
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| err(path, "lora_adapter_metadata", format!("not JSON: {e}")))?;
    let p = comp.prefix();
    let field = |k: &str| v.get(format!("{p}.{k}")).filter(|x| !x.is_null());
    if let Some(a) = field("lora_alpha") {
        let a = a
            .as_f64()
            .ok_or_else(|| err(path, format!("{p}.lora_alpha"), "expected a number"))?;
        rules.alpha = Some(a as f32);
    }
    if let Some(pat) = field("alpha_pattern") {
        let obj = pat
            .as_object()
            .ok_or_else(|| err(path, format!("{p}.alpha_pattern"), "expected an object"))?;
        for (k, a) in obj {
            let a = a
                .as_f64()
                .ok_or_else(|| err(path, format!("{p}.alpha_pattern.{k}"), "expected a number"))?;
            rules.pattern.push((k.clone(), a as f32));
        }
    }
    if let Some(r) = field("use_rslora") {
        rules.rslora = r.as_bool().unwrap_or(false);
    }
    rules.dora = field("use_dora").and_then(|d| d.as_bool()) == Some(true);
    if field("lora_bias").and_then(|d| d.as_bool()) == Some(true) {
        return Err(err(
            path,
            format!("{p}.lora_bias"),
            "LoRA biases are not supported yet",
        ));
    }
    Ok(rules)
}

/// PEFT's pattern match: `key` matches a module path ending in it at a dot boundary.
fn pattern_matches(key: &str, module: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
}

/// Reads `path`. Every tensor key must belong to a known format; up/down pairs must be complete
/// and of matching ranks.
pub fn read_sd_lora(path: &Path) -> Result<SdLora> {
    let f = SafetensorsFile::open(path)?;
    let mut groups: BTreeMap<(Component, Name), BTreeMap<&'static str, String>> = BTreeMap::new();
    let mut kohya = false;
    for key in f.names() {
        let (comp, name, part) = match parse_key(key) {
            Ok(Some(x)) => x,
            Ok(None) => {
                return Err(err(
                    path,
                    key,
                    "not a LoRA key this reader knows (diffusers/PEFT `lora_A`/`lora_B`, \
                     `lora.down`/`lora.up`, or kohya/LyCORIS `lora_unet_`/`lora_te_` with \
                     `lora_down`/`lora_up`/`lora_mid`/`hada_*`/`lokr_*`/`alpha`)",
                ))
            }
            Err(reason) => return Err(err(path, key, reason)),
        };
        kohya |= matches!(name, Name::Flat(_));
        groups
            .entry((comp, name))
            .or_default()
            .insert(part, key.to_string());
    }
    let rules = [
        alpha_rules(path, &f.metadata, Component::Unet)?,
        alpha_rules(path, &f.metadata, Component::TextEncoder)?,
    ];
    let mut modules = Vec::new();
    for ((comp, name), keys) in groups {
        let stem = match &name {
            Name::Dotted(s) | Name::Flat(s) => s.clone(),
        };
        let has = |p: &str| keys.contains_key(p);
        let kind = if has("lora_down.weight") || has("lora_up.weight") {
            Kind::Lora
        } else if keys.keys().any(|k| k.starts_with("hada_")) {
            Kind::LoHa
        } else if keys.keys().any(|k| k.starts_with("lokr_")) {
            Kind::LoKr
        } else {
            return Err(err(
                path,
                stem,
                "an alpha or DoRA magnitude without any weights",
            ));
        };
        let required: &[&str] = match kind {
            Kind::Lora => &["lora_down.weight", "lora_up.weight"],
            Kind::LoHa => &["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
            Kind::LoKr => &[],
        };
        if let Some(missing) = required.iter().find(|p| !has(p)) {
            return Err(err(
                path,
                stem,
                format!(
                    "`{missing}` is missing: a LoRA module needs both its down (A) and up (B) \
                     weights, a LoHa its four hada_w* factors"
                ),
            ));
        }
        let mixed = keys.keys().any(|k| {
            let family = if k.starts_with("hada_") {
                Kind::LoHa
            } else if k.starts_with("lokr_") {
                Kind::LoKr
            } else if matches!(*k, "alpha" | "dora_scale" | "lora_magnitude_vector") {
                kind
            } else {
                Kind::Lora
            };
            family != kind
        });
        if mixed {
            return Err(err(
                path,
                stem,
                "mixes the parts of different kinds of adapters",
            ));
        }
        let mut parts = BTreeMap::new();
        let mut file_alpha = None;
        let mut dora_scale = None;
        let mut peft_magnitude = None;
        for (part, key) in &keys {
            let (v, shape) = f.read_f32_finite(key)?;
            if *part == "alpha" {
                if v.len() != 1 {
                    return Err(err(path, key.as_str(), "an alpha is one number"));
                }
                file_alpha = Some(v[0]);
            } else if *part == "dora_scale" {
                if !matches!(shape.len(), 2 | 4) || v.iter().any(|x| *x < 0.0) {
                    return Err(err(
                        path,
                        key.as_str(),
                        format!(
                            "a DoRA magnitude is a non-negative (out, 1[, 1, 1]) or (1, in[, 1, \
                             1]) tensor, got {shape:?}"
                        ),
                    ));
                }
                dora_scale = Some((v, shape));
            } else if *part == "lora_magnitude_vector" {
                if v.iter().any(|x| *x < 0.0) {
                    return Err(err(path, key.as_str(), "a DoRA magnitude is non-negative"));
                }
                peft_magnitude = Some((v, shape));
            } else {
                parts.insert(*part, (v, shape));
            }
        }
        let m = LoraModule {
            component: comp,
            key: stem.clone(),
            kind,
            parts,
            scale: 1.0,
            dora_scale,
            peft_magnitude,
            name,
        };
        m.validate().map_err(|why| err(path, stem.as_str(), why))?;
        if kind == Kind::Lora {
            let (down, up) = (m.need("lora_down.weight"), m.need("lora_up.weight"));
            let r = *down.1.first().unwrap_or(&0);
            let ok = r > 0
                && (down.1.len() == 2 || down.1.len() == 4)
                && up.1.len() == down.1.len()
                && up.1[1] == r
                && up.1[2..].iter().all(|&d| d == 1);
            if !ok {
                return Err(err(
                    path,
                    stem,
                    format!(
                        "down {:?} and up {:?} are not a low-rank pair ((r, in[, kh, kw]) and \
                         (out, r[, 1, 1]))",
                        down.1, up.1
                    ),
                ));
            }
        }
        let rank = m.rank();
        let rf = rank as f32;
        let rule = &rules[(comp == Component::TextEncoder) as usize];
        // PEFT would start a magnitude the file lacks from the weight's norms: not what was
        // trained, so refused rather than guessed.
        if rule.dora && m.peft_magnitude.is_none() {
            return Err(err(
                path,
                stem,
                "the metadata says use_dora but the module has no lora_magnitude_vector",
            ));
        }
        let scale = match (&m.name, kind) {
            // LoKr of two full factors: scale 1 whatever the alpha (LyCORIS).
            (_, Kind::LoKr) if rank == 0 => 1.0,
            // kohya and LyCORIS: a missing or zero alpha means alpha = rank.
            (Name::Flat(_), _) => match file_alpha {
                Some(a) if a != 0.0 => a / rf,
                _ => 1.0,
            },
            (Name::Dotted(_), _) => {
                let patterned = rule
                    .pattern
                    .iter()
                    .find(|(k, _)| pattern_matches(k, &stem))
                    .map(|p| p.1);
                let alpha = patterned.or(rule.alpha).or(file_alpha).unwrap_or(rf);
                if rule.rslora {
                    alpha / rf.sqrt()
                } else {
                    alpha / rf
                }
            }
        };
        modules.push(LoraModule { scale, ..m });
    }
    if modules.is_empty() {
        return Err(err(path, "tensors", "no LoRA modules in the file"));
    }
    Ok(SdLora {
        path: path.to_path_buf(),
        format: if kohya { "kohya" } else { "diffusers" },
        modules,
    })
}

/// A layer a LoRA can merge into.
enum Layer<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv),
}

impl Layer<'_> {
    fn weight(&self) -> &Tensor {
        match self {
            Layer::Linear(l) => l.base().0,
            Layer::Conv(c) => c.base().0,
        }
    }
}

/// Adds `weight *` each module's update to the pipeline's frozen weights. Modules that match no
/// layer are an error listing a few (or, with `allow_unmatched`, counted in the report).
pub fn merge_sd_lora(
    pipe: &mut SdPipeline,
    lora: &SdLora,
    weight: f32,
    allow_unmatched: bool,
) -> Result<MergeReport> {
    if !weight.is_finite() {
        return Err(err(
            &lora.path,
            "weight",
            format!("{weight} is not a number"),
        ));
    }
    let mut layers: HashMap<(Component, String), Layer> = HashMap::new();
    let mut flat: HashMap<(Component, String), String> = HashMap::new();
    let unet = &mut pipe.unet;
    let (lin, conv) = unet.layers_mut();
    for (n, l) in lin {
        flat.insert((Component::Unet, n.replace('.', "_")), n.clone());
        layers.insert((Component::Unet, n), Layer::Linear(l));
    }
    for (n, c) in conv {
        flat.insert((Component::Unet, n.replace('.', "_")), n.clone());
        layers.insert((Component::Unet, n), Layer::Conv(c));
    }
    for (n, l) in pipe.text_encoder.linears_mut() {
        flat.insert((Component::TextEncoder, n.replace('.', "_")), n.clone());
        layers.insert((Component::TextEncoder, n), Layer::Linear(l));
    }
    let mut report = MergeReport::default();
    // Resolve every module first: nothing is merged when a file does not fit.
    let mut plan = Vec::new();
    for m in &lora.modules {
        let target = match &m.name {
            // transformers 5 saves CLIP without the `text_model.` of the Hub's checkpoints.
            Name::Dotted(d) if m.component == Component::TextEncoder => {
                [d.clone(), format!("text_model.{d}")]
                    .into_iter()
                    .find(|c| layers.contains_key(&(m.component, c.clone())))
            }
            Name::Dotted(d) => Some(d.clone()),
            Name::Flat(f) => flat.get(&(m.component, f.clone())).cloned(),
        };
        match target.filter(|t| layers.contains_key(&(m.component, t.clone()))) {
            Some(t) => plan.push((m, t)),
            None => report
                .unmatched
                .push(format!("{}.{}", m.component.prefix(), m.key)),
        }
    }
    if !report.unmatched.is_empty() && !allow_unmatched {
        let shown: Vec<&str> = report
            .unmatched
            .iter()
            .take(KEY_LIMIT)
            .map(String::as_str)
            .collect();
        return Err(err(
            &lora.path,
            "modules",
            format!(
                "{} of {} LoRA modules match no layer of this pipeline ({}{}); pass \
                 --allow-unmatched to merge the rest",
                report.unmatched.len(),
                lora.modules.len(),
                shown.join(", "),
                if report.unmatched.len() > KEY_LIMIT {
                    ", ..."
                } else {
                    ""
                }
            ),
        ));
    }
    // Every update is formed once before anything is merged (a file that does not fit changes
    // nothing), then again, one at a time, to merge it: never all of them in memory at once.
    for (m, t) in &plan {
        let layer = &layers[&(m.component, t.clone())];
        let trainable = match layer {
            Layer::Linear(l) => l.lora().is_some(),
            Layer::Conv(c) => c.lora().is_some(),
        };
        if trainable {
            return Err(err(&lora.path, t, "the layer carries a trainable adapter"));
        }
        let shape = layer.weight().shape().to_vec();
        let w = layer.weight().try_to_vec()?;
        m.apply(&w, &shape, weight)
            .map_err(|why| err(&lora.path, &m.key, format!("{why} (the layer `{t}`)")))?;
    }
    for (m, t) in plan {
        let layer = layers
            .get_mut(&(m.component, t.clone()))
            .expect("resolved above");
        let w = layer.weight();
        let shape = w.shape().to_vec();
        let data = m
            .apply(&w.try_to_vec()?, &shape, weight)
            .map_err(|why| err(&lora.path, &m.key, why))?;
        let merged = Tensor::new(data, &shape)?;
        match layer {
            Layer::Linear(l) => {
                let (_, layout, bias) = l.base();
                let bias = bias.cloned();
                **l = Linear::frozen(merged, layout, bias);
            }
            Layer::Conv(c) => {
                let (_, bias, params) = c.base();
                let bias = bias.cloned();
                **c = Conv::frozen(merged, bias, params);
            }
        }
        *report
            .merged
            .entry(m.component.prefix().to_string())
            .or_default() += 1;
        report.layers.push((m.component, t));
    }
    Ok(report)
}

/// Parses `FILE[:WEIGHT]` (the weight after the last `:`, when it is a number).
pub fn parse_lora_arg(s: &str) -> (PathBuf, f32) {
    if let Some((f, w)) = s.rsplit_once(':') {
        if let Ok(w) = w.parse::<f32>() {
            return (PathBuf::from(f), w);
        }
    }
    (PathBuf::from(s), 1.0)
}
