//! `lora extract` for Stable Diffusion: a LoRA file from the difference of two pipelines (a
//! fine-tuned one and its base), layer by layer, by a truncated SVD of `W_tuned - W_base`, as
//! kohya's `extract_lora_from_models.py` makes one: `up = U_r diag(S_r)`, `down = V_r^T`,
//! `alpha = r` (scale 1), convolutions as LoCon pairs (`down` a `(r, in, kh, kw)` convolution,
//! `up` `(out, r, 1, 1)`). Written in kohya's format (`lora_unet_*`, `lora_te_*`), which
//! diffusers, kohya's tools and `lora sd generate --lora` read.
//!
//! The SVD is a randomised range finder (Halko, Martinsson and Tropp) with 8 extra columns and
//! two power iterations, orthonormalised at each step, then the exact SVD of the small
//! projected matrix: exact (to rounding) when a layer's difference has rank at most the chosen
//! one, the usual near-optimal truncation otherwise. Deterministic (a fixed seed per layer).

use crate::error::{IoError, Result};
use crate::sd::SdPipeline;
use lora_core::linalg::{jacobi_svd, qr};
use lora_core::rng::Rng;
use lora_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// One extracted module.
#[derive(Clone, Debug)]
pub struct Extracted {
    /// kohya's name (`lora_unet_<module with _>` / `lora_te_<module with _>`).
    pub name: String,
    /// `down` `(r, in)` or `(r, in, kh, kw)`.
    pub down: (Vec<f32>, Vec<usize>),
    /// `up` `(out, r)` or `(out, r, 1, 1)`.
    pub up: (Vec<f32>, Vec<usize>),
    /// The share of the difference's Frobenius norm the rank-r update keeps (1 when exact).
    pub kept: f64,
}

/// The rank-`r` truncated SVD of `d` (`out x k`, row-major, f64): `(U_r diag(S_r), V_r^T)` as
/// `(out x r, r x k)`, and the Frobenius norm it keeps.
pub fn truncated_svd(
    d: &[f64],
    out: usize,
    k: usize,
    r: usize,
    seed: u64,
) -> (Vec<f64>, Vec<f64>, f64) {
    let r = r.min(out).min(k);
    let l = (r + 8).min(out).min(k);
    let mut rng = Rng::new(seed);
    let omega: Vec<f64> = (0..k * l).map(|_| rng.normal()).collect();
    // y (out x l) = d @ m (k x l)
    let mul = |m: &[f64], cols: usize| -> Vec<f64> {
        let mut y = vec![0.0; out * cols];
        for o in 0..out {
            let row = &d[o * k..(o + 1) * k];
            for (j, &x) in row.iter().enumerate() {
                if x == 0.0 {
                    continue;
                }
                let mr = &m[j * cols..(j + 1) * cols];
                for (c, &v) in mr.iter().enumerate() {
                    y[o * cols + c] += x * v;
                }
            }
        }
        y
    };
    // z (k x l) = d^T @ q (out x l)
    let mul_t = |q: &[f64], cols: usize| -> Vec<f64> {
        let mut z = vec![0.0; k * cols];
        for o in 0..out {
            let row = &d[o * k..(o + 1) * k];
            let qr_ = &q[o * cols..(o + 1) * cols];
            for (j, &x) in row.iter().enumerate() {
                if x == 0.0 {
                    continue;
                }
                for (c, &v) in qr_.iter().enumerate() {
                    z[j * cols + c] += x * v;
                }
            }
        }
        z
    };
    let (mut q, _) = qr(&mul(&omega, l), out, l);
    for _ in 0..2 {
        let (qz, _) = qr(&mul_t(&q, l), k, l);
        q = qr(&mul(&qz, l), out, l).0;
    }
    // b (l x k) = q^T d; its SVD through the l x l Gram b b^T = W diag(s^2) W^T.
    let bt = mul_t(&q, l); // (k x l) = b^T
    let mut gram = vec![0.0f64; l * l];
    for j in 0..k {
        for a in 0..l {
            let x = bt[j * l + a];
            if x == 0.0 {
                continue;
            }
            for b in 0..l {
                gram[a * l + b] += x * bt[j * l + b];
            }
        }
    }
    let (w, s2, _) = jacobi_svd(&gram, l);
    let total: f64 = d.iter().map(|v| v * v).sum();
    let mut up = vec![0.0f64; out * r];
    let mut down = vec![0.0f64; r * k];
    let mut kept = 0.0f64;
    for c in 0..r {
        let sigma = s2[c].max(0.0).sqrt();
        if sigma <= 1e-300 {
            continue;
        }
        kept += sigma * sigma;
        // left vector u_c = q w_c; right vector v_c = b^T w_c / sigma.
        for o in 0..out {
            let u: f64 = (0..l).map(|a| q[o * l + a] * w[a * l + c]).sum();
            up[o * r + c] = u * sigma;
        }
        for j in 0..k {
            let v: f64 = (0..l).map(|a| bt[j * l + a] * w[a * l + c]).sum();
            down[c * k + j] = v / sigma;
        }
    }
    let kept = if total > 0.0 {
        (kept / total).min(1.0).sqrt()
    } else {
        1.0
    };
    (up, down, kept)
}

/// The modules whose weights differ between `base` and `tuned` (same architecture), each as a
/// rank-`rank` pair (`conv_rank` for convolutions with a kernel larger than 1x1; `None`: skip
/// those). A layer whose largest difference is at most `min_diff` times its largest weight is
/// left out.
pub fn extract_sd_lora(
    base: &mut SdPipeline,
    tuned: &mut SdPipeline,
    rank: usize,
    conv_rank: Option<usize>,
    min_diff: f32,
) -> Result<Vec<Extracted>> {
    if rank == 0 || conv_rank == Some(0) {
        return Err(IoError::Core(lora_core::CoreError::InvalidConfig {
            field: "rank",
            reason: "must be at least 1".into(),
        }));
    }
    let mut out = Vec::new();
    let mut pairs: Vec<(String, Tensor, Tensor)> = Vec::new();
    {
        let (bl, bc) = base.unet.layers_mut();
        let (tl, tc) = tuned.unet.layers_mut();
        let tl: HashMap<String, Tensor> = tl
            .into_iter()
            .map(|(n, l)| (n, l.base().0.clone()))
            .collect();
        let tc: HashMap<String, Tensor> = tc
            .into_iter()
            .map(|(n, c)| (n, c.base().0.clone()))
            .collect();
        for (n, l) in bl {
            let t = tl.get(&n).cloned();
            pairs.push((
                format!("lora_unet_{}", n.replace('.', "_")),
                l.base().0.clone(),
                t.ok_or_else(|| mismatch(&n))?,
            ));
        }
        for (n, c) in bc {
            let t = tc.get(&n).cloned();
            pairs.push((
                format!("lora_unet_{}", n.replace('.', "_")),
                c.base().0.clone(),
                t.ok_or_else(|| mismatch(&n))?,
            ));
        }
        let te: HashMap<String, Tensor> = tuned
            .text_encoder
            .linears_mut()
            .into_iter()
            .map(|(n, l)| (n, l.base().0.clone()))
            .collect();
        for (n, l) in base.text_encoder.linears_mut() {
            let t = te.get(&n).cloned();
            pairs.push((
                format!("lora_te_{}", n.replace('.', "_")),
                l.base().0.clone(),
                t.ok_or_else(|| mismatch(&n))?,
            ));
        }
    }
    for (i, (name, wb, wt)) in pairs.into_iter().enumerate() {
        let shape = wb.shape().to_vec();
        if wt.shape() != shape.as_slice() {
            return Err(IoError::Config {
                path: tuned.path.clone(),
                field: name,
                reason: format!(
                    "shape {:?}, the base's is {shape:?}: not the same architecture",
                    wt.shape()
                ),
            });
        }
        let r = if shape.len() == 4 && shape[2] * shape[3] > 1 {
            match conv_rank {
                Some(r) => r,
                None => continue,
            }
        } else {
            rank
        };
        let (a, b) = (wb.try_to_vec()?, wt.try_to_vec()?);
        let d: Vec<f64> = b
            .iter()
            .zip(&a)
            .map(|(t, s)| *t as f64 - *s as f64)
            .collect();
        let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        let largest = d.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if largest <= min_diff as f64 * scale.max(f64::MIN_POSITIVE) {
            continue;
        }
        let o = shape[0];
        let k: usize = shape[1..].iter().product();
        let (up, down, kept) = truncated_svd(&d, o, k, r, 0x5eed_0000 + i as u64);
        let rr = r.min(o).min(k);
        let (dshape, ushape) = if shape.len() == 4 {
            (vec![rr, shape[1], shape[2], shape[3]], vec![o, rr, 1, 1])
        } else {
            (vec![rr, k], vec![o, rr])
        };
        out.push(Extracted {
            name,
            down: (down.iter().map(|&v| v as f32).collect(), dshape),
            up: (up.iter().map(|&v| v as f32).collect(), ushape),
            kept,
        });
    }
    Ok(out)
}

fn mismatch(name: &str) -> IoError {
    IoError::Core(lora_core::CoreError::InvalidConfig {
        field: "tuned",
        reason: format!("the tuned pipeline has no layer `{name}`: not the same architecture"),
    })
}

/// Writes `modules` as a kohya LoRA file (alpha = rank: scale 1), marked as lora-rs's.
pub fn write_kohya(path: &Path, modules: &[Extracted]) -> Result<()> {
    use crate::kohya::{KohyaLora, KohyaModule};
    let mut modules: Vec<KohyaModule> = modules
        .iter()
        .map(|m| KohyaModule {
            name: m.name.clone(),
            down: (m.down.1.clone(), m.down.0.clone()),
            up: (m.up.1.clone(), m.up.0.clone()),
            alpha: m.down.1[0] as f32,
        })
        .collect();
    modules.sort_by(|a, b| a.name.cmp(&b.name));
    let metadata = [
        (
            crate::outdir::FILE_MARK.to_string(),
            "lora extract".to_string(),
        ),
        ("ss_network_module".to_string(), "networks.lora".to_string()),
    ]
    .into_iter()
    .collect();
    KohyaLora { modules, metadata }.write(path)
}
