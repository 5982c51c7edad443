//! Bicubic resampling of position-embedding grids, as PyTorch's `F.interpolate(mode="bicubic",
//! align_corners=False)` computes it (Keys' cubic with `A = -0.75`, source index
//! `(dst + 0.5) * in / out - 0.5`, border samples repeated; no antialiasing). ViT-style detectors
//! (YOLOS) resize their frozen position tables to each input's patch grid this way; the tables
//! are frozen, so no backward is needed.

use crate::error::{check_len, invalid, Result};

const A: f64 = -0.75;

fn cc1(x: f64) -> f64 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cc2(x: f64) -> f64 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// The 4 taps `(first index, weights)` of output position `o` for `input -> output` samples.
fn taps(input: usize, output: usize, o: usize) -> (isize, [f64; 4]) {
    let scale = input as f64 / output as f64;
    let real = scale * (o as f64 + 0.5) - 0.5;
    let i = real.floor();
    let t = real - i;
    (
        i as isize - 1,
        [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)],
    )
}

/// `x` `(c, h, w)` planes resized to `(c, oh, ow)`.
pub fn bicubic_resize(
    x: &[f32],
    c: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Vec<f32>> {
    check_len("bicubic_resize", "x", x.len(), &[c, h, w])?;
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(invalid(
            "bicubic_resize",
            "size",
            format!("{h}x{w} -> {oh}x{ow}: every side must be at least 1"),
        ));
    }
    let rows: Vec<(isize, [f64; 4])> = (0..oh).map(|o| taps(h, oh, o)).collect();
    let cols: Vec<(isize, [f64; 4])> = (0..ow).map(|o| taps(w, ow, o)).collect();
    let at = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let mut out = vec![0.0f32; c * oh * ow];
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for (oy, (y0, wy)) in rows.iter().enumerate() {
            for (ox, (x0, wx)) in cols.iter().enumerate() {
                let mut acc = 0.0f64;
                for (dy, ky) in wy.iter().enumerate() {
                    let row = &plane[at(y0 + dy as isize, h) * w..];
                    let mut r = 0.0f64;
                    for (dx, kx) in wx.iter().enumerate() {
                        r += row[at(x0 + dx as isize, w)] as f64 * kx;
                    }
                    acc += r * ky;
                }
                out[(ch * oh + oy) * ow + ox] = acc as f32;
            }
        }
    }
    Ok(out)
}
