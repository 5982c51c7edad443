//! Bounding boxes: generalized IoU and DETR's box losses.
//!
//! Boxes are `(cx, cy, w, h)` (centre and size, normalised to the image, as DETR and YOLOS
//! predict them); IoU and generalized IoU are computed on their corners, as transformers'
//! `center_to_corners_format` + `generalized_box_iou` do: `giou = iou - (enclosing - union) /
//! enclosing`, with widths of intersection and enclosing box clamped at 0.
//!
//! `box_losses` is what DETR's criterion takes from matched `(prediction, target)` pairs:
//! `[sum |p - t|, sum (1 - giou(p, t))] / num_boxes` (`loss_bbox`, `loss_giou`); its backward
//! gives the predictions' gradient (targets are data).

use crate::error::{check_len, invalid, Result};

fn corners(b: &[f32]) -> [f64; 4] {
    let (cx, cy, w, h) = (b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64);
    [cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h]
}

/// Generalized IoU of two boxes `(cx, cy, w, h)` and its gradient with respect to the first
/// box's four values, in `f64`. Where a `min`/`max` of two sides ties, or an intersection or
/// enclosing side is clamped at zero, the first box's side gets no gradient (ties have measure
/// zero for predicted boxes; PyTorch splits a tie's gradient in halves there).
pub fn giou_and_grad(a: &[f32], b: &[f32]) -> (f64, [f64; 4]) {
    let [x0, y0, x1, y1] = corners(a);
    let [u0, v0, u1, v1] = corners(b);
    let area_a = (x1 - x0) * (y1 - y0);
    let area_b = (u1 - u0) * (v1 - v0);
    // Intersection.
    let (ix0, ix1) = (x0.max(u0), x1.min(u1));
    let (iy0, iy1) = (y0.max(v0), y1.min(v1));
    let (iw, ih) = ((ix1 - ix0).max(0.0), (iy1 - iy0).max(0.0));
    let inter = iw * ih;
    let union = area_a + area_b - inter;
    let iou = inter / union;
    // Enclosing box.
    let (ex0, ex1) = (x0.min(u0), x1.max(u1));
    let (ey0, ey1) = (y0.min(v0), y1.max(v1));
    let (ew, eh) = ((ex1 - ex0).max(0.0), (ey1 - ey0).max(0.0));
    let enc = ew * eh;
    let giou = iou - (enc - union) / enc;
    // Gradients with respect to (x0, y0, x1, y1) of the first box.
    let (iw_on, ih_on) = ((ix1 - ix0) > 0.0, (iy1 - iy0) > 0.0);
    let d_iw = [
        if iw_on && x0 > u0 { -1.0 } else { 0.0 },
        0.0,
        if iw_on && x1 < u1 { 1.0 } else { 0.0 },
        0.0,
    ];
    let d_ih = [
        0.0,
        if ih_on && y0 > v0 { -1.0 } else { 0.0 },
        0.0,
        if ih_on && y1 < v1 { 1.0 } else { 0.0 },
    ];
    let (ew_on, eh_on) = ((ex1 - ex0) > 0.0, (ey1 - ey0) > 0.0);
    let d_ew = [
        if ew_on && x0 < u0 { -1.0 } else { 0.0 },
        0.0,
        if ew_on && x1 > u1 { 1.0 } else { 0.0 },
        0.0,
    ];
    let d_eh = [
        0.0,
        if eh_on && y0 < v0 { -1.0 } else { 0.0 },
        0.0,
        if eh_on && y1 > v1 { 1.0 } else { 0.0 },
    ];
    let (w, h) = (x1 - x0, y1 - y0);
    let d_area = [-h, -w, h, w];
    let mut g = [0.0f64; 4];
    for k in 0..4 {
        let d_inter = d_iw[k] * ih + iw * d_ih[k];
        let d_union = d_area[k] - d_inter;
        let d_iou = (d_inter * union - inter * d_union) / (union * union);
        let d_enc = d_ew[k] * eh + ew * d_eh[k];
        // giou = iou - 1 + union / enc
        g[k] = d_iou + (d_union * enc - union * d_enc) / (enc * enc);
    }
    // To (cx, cy, w, h): x0 = cx - w/2, x1 = cx + w/2.
    let grad = [
        g[0] + g[2],
        g[1] + g[3],
        0.5 * (g[2] - g[0]),
        0.5 * (g[3] - g[1]),
    ];
    (giou, grad)
}

fn check(op: &'static str, pred: &[f32], target: &[f32]) -> Result<usize> {
    if pred.len() % 4 != 0 {
        return Err(invalid(
            op,
            "pred",
            format!("{} values are not (M, 4) boxes", pred.len()),
        ));
    }
    let m = pred.len() / 4;
    check_len(op, "target", target.len(), &[m, 4])?;
    Ok(m)
}

/// `[sum |p - t|, sum (1 - giou(p, t))] / num_boxes` over the `(M, 4)` matched pairs.
pub fn box_losses_forward(pred: &[f32], target: &[f32], num_boxes: f32) -> Result<[f32; 2]> {
    let m = check("box_losses_forward", pred, target)?;
    let (mut l1, mut gl) = (0.0f64, 0.0f64);
    for i in 0..m {
        let (p, t) = (&pred[4 * i..4 * i + 4], &target[4 * i..4 * i + 4]);
        l1 += p
            .iter()
            .zip(t)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>();
        gl += 1.0 - giou_and_grad(p, t).0;
    }
    let nb = num_boxes as f64;
    Ok([(l1 / nb) as f32, (gl / nb) as f32])
}

/// `dpred += (dout[0] sign(p - t) - dout[1] dgiou/dp) / num_boxes`.
pub fn box_losses_backward(
    dpred: &mut [f32],
    dout: [f32; 2],
    pred: &[f32],
    target: &[f32],
    num_boxes: f32,
) -> Result<()> {
    let m = check("box_losses_backward", pred, target)?;
    check_len("box_losses_backward", "dpred", dpred.len(), &[m, 4])?;
    let nb = num_boxes as f64;
    let (s1, s2) = (dout[0] as f64 / nb, dout[1] as f64 / nb);
    for i in 0..m {
        let (p, t) = (&pred[4 * i..4 * i + 4], &target[4 * i..4 * i + 4]);
        let (_, g) = giou_and_grad(p, t);
        for k in 0..4 {
            let d = p[k] - t[k];
            let sign = if d > 0.0 {
                1.0
            } else if d < 0.0 {
                -1.0
            } else {
                0.0
            };
            dpred[4 * i + k] += (s1 * sign - s2 * g[k]) as f32;
        }
    }
    Ok(())
}

/// `f64` oracle.
pub mod reference {
    /// Generalized IoU of `(cx, cy, w, h)` boxes, from the definition.
    pub fn giou(a: &[f64], b: &[f64]) -> f64 {
        let c = |v: &[f64]| {
            [
                v[0] - v[2] / 2.0,
                v[1] - v[3] / 2.0,
                v[0] + v[2] / 2.0,
                v[1] + v[3] / 2.0,
            ]
        };
        let (p, q) = (c(a), c(b));
        let area = |r: [f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
        let iw = (p[2].min(q[2]) - p[0].max(q[0])).max(0.0);
        let ih = (p[3].min(q[3]) - p[1].max(q[1])).max(0.0);
        let inter = iw * ih;
        let union = area(p) + area(q) - inter;
        let ew = (p[2].max(q[2]) - p[0].min(q[0])).max(0.0);
        let eh = (p[3].max(q[3]) - p[1].min(q[1])).max(0.0);
        inter / union - (ew * eh - union) / (ew * eh)
    }

    /// `[sum |p - t|, sum (1 - giou)] / num_boxes`.
    pub fn box_losses(pred: &[f64], target: &[f64], num_boxes: f64) -> [f64; 2] {
        let (mut l1, mut g) = (0.0, 0.0);
        for (p, t) in pred.chunks(4).zip(target.chunks(4)) {
            l1 += p.iter().zip(t).map(|(a, b)| (a - b).abs()).sum::<f64>();
            g += 1.0 - giou(p, t);
        }
        [l1 / num_boxes, g / num_boxes]
    }
}
